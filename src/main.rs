//! The `biogate` command line: parses the arguments and dispatches to `cli/`.

mod cli;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "biogate=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    if let Err(e) = cli::run(cli.command) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
