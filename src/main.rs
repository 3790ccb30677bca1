use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Off before the first tables are allocated; `serve` turns huge pages back on if
    // `huge_pages` asks for them (src/alloc.rs).
    let _ = ringgate::alloc::allow_huge_pages(false); // (serve says it if this was refused)
    ringgate::alloc::shorten_purge_delay();
    let cli = match ringgate::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(message) = ringgate::cli::env_value_error(&e) {
                eprintln!("ringgate: {message}");
                std::process::exit(2);
            }
            e.exit()
        }
    };
    std::process::exit(ringgate::cli::run(cli));
}
