use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
    let cli = ferryfs::cli::Cli::parse();
    if let Err(e) = ferryfs::cli::run(cli) {
        eprintln!("ferryfs: error: {e}");
        std::process::exit(1);
    }
}
