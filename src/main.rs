//! The `biogate` command line: parses the arguments and dispatches to `cli/`.

mod cli;

use clap::Parser;
use std::io::IsTerminal;

fn main() {
    let cli = cli::Cli::parse();
    quiet_headless_vulkan_loaders();
    // `serve` logs what it does (INFO); the other verbs print their results on stdout
    // and only warnings and errors on stderr, unless -v / -vv or RUST_LOG asks for more.
    let default = match (&cli.command, cli.verbose) {
        (_, 2..) => "biogate=debug",
        (cli::Command::Serve(_), _) | (_, 1) => "biogate=info",
        _ => "biogate=warn",
    };
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none()
        && std::env::var("TERM").map_or(true, |t| t != "dumb");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()))
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .init();
    if let Err(e) = cli::run(cli.command) {
        if cli::reader_went_away(&e) {
            return;
        }
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Vulkan loaders probe the Wayland display while they enumerate adapters, and
/// libwayland prints "error: XDG_RUNTIME_DIR is invalid or not set in the environment."
/// on a headless machine, which reads as biogate failing. Where the variable is unset,
/// point it at a directory that does not exist: the probe then finds no display and
/// says nothing (nothing is created). Runs before any thread starts (the environment
/// is only safe to change then).
fn quiet_headless_vulkan_loaders() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let nowhere = std::env::temp_dir().join("biogate-no-display");
        // SAFETY: called at the start of main, before any other thread exists.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", nowhere) };
    }
}
