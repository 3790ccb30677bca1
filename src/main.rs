use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ringgate=info".into()),
        )
        .init();
    let cli = ringgate::cli::Cli::parse();
    std::process::exit(ringgate::cli::run(cli));
}
