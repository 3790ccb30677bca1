use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = ringgate::cli::Cli::parse();
    std::process::exit(ringgate::cli::run(cli));
}
