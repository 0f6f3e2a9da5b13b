//! The command line, one file per verb group. `main.rs` parses [`Cli`] and calls
//! [`run`]; each verb parses its flags, calls the library, and prints.

/// `println!` for a verb's results: a failed write to stdout is an error the verb
/// returns (a reader that went away, as in `biogate ... | head`, ends the verb quietly
/// in `main`), never a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err($crate::cli::stdout_error)?
    }};
}

/// `print!` for a verb's results (see [`outln!`]).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($arg)*).and_then(|_| stdout.flush()).map_err($crate::cli::stdout_error)?
    }};
}

mod bench;
mod client;
mod demo;
mod encounters;
mod gallery;
mod search;
mod serve;
mod synth;

use biogate::engine::{BackendChoice, Engine, open_engine};
use biogate::error::{Error, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "biogate",
    version,
    about = "Exact 1:N biometric identification over a memory-mapped gallery"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// More on stderr: -v for what each step does (INFO), -vv for detail (DEBUG).
    /// RUST_LOG overrides both.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Synthesise a gallery, enroll it, identify mated and non-mated probes, print accuracy and speed.
    Demo(demo::DemoArgs),
    /// Write identity-structured synthetic templates (gallery, mated and non-mated probes).
    Synth(synth::SynthArgs),
    /// Create, import into, inspect, check, compact and edit galleries.
    #[command(subcommand)]
    Gallery(gallery::GalleryCommand),
    /// Search probes against a gallery; one JSON line (or CSV rows) per probe.
    Identify(search::IdentifyArgs),
    /// Measure probes/s and gallery GB/s per dtype and batch size.
    Bench(bench::BenchArgs),
    /// Accuracy report: rank-1/rank-k rates, FNIR at FPIR 0.001/0.003/0.01, DET and score plots.
    Eval(search::EvalArgs),
    /// N:N de-duplication: pairs of different subjects with near-identical templates.
    Dedup(search::DedupArgs),
    /// Serve galleries over gRPC (defaults: ./biogate-data on 127.0.0.1:50051).
    Serve(serve::ServeArgs),
    /// The cluster's front door: serve the same API over galleries sharded on `serve --etcd` nodes.
    Router(serve::RouterArgs),
    /// Talk to a running server.
    Client(client::ClientArgs),
    /// Border reports from a server's encounter log: history, overstays, stats.
    Encounters(encounters::EncountersArgs),
    /// Print a shell completion script (e.g. `biogate completions bash > /etc/bash_completion.d/biogate`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `biogate man | man -l -`.
    Man,
}

/// Run one verb.
pub(crate) fn run(command: Command) -> Result<()> {
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Gallery(g) => gallery::run(g),
        Command::Identify(a) => search::identify(a),
        Command::Bench(a) => bench::run(a),
        Command::Eval(a) => search::eval(a),
        Command::Dedup(a) => search::dedup(a),
        Command::Serve(a) => runtime()?.block_on(serve::run(a)),
        Command::Router(a) => runtime()?.block_on(serve::router(a)),
        Command::Client(a) => runtime()?.block_on(client::run(a)),
        Command::Encounters(a) => encounters::run(a),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "biogate", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| Error::Io {
                    context: "writing the manual page".into(),
                    source: e,
                })
        }
    }
}

/// A failed write of a verb's results.
pub(crate) fn stdout_error(source: std::io::Error) -> Error {
    Error::Io {
        context: "writing to standard output".into(),
        source,
    }
}

/// Whether `e` says that whoever read our standard output went away (`| head`): the
/// verb then ends quietly, as Unix tools do.
pub(crate) fn reader_went_away(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().map_err(|e| Error::Io {
        context: "starting the async runtime".into(),
        source: e,
    })
}

pub(crate) fn progress(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

pub(crate) fn engine_for(choice: BackendChoice) -> Result<Engine> {
    let (engine, gpu) = open_engine(choice)?;
    if let Some(gpu) = gpu {
        tracing::info!(backend = %choice, gpu = %gpu.describe(), "engine");
    }
    Ok(engine)
}
