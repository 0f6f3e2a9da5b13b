//! `biogate synth`: identity-structured synthetic templates on disk.

use super::progress;
use biogate::error::Result;
use biogate::synth::{SynthSpec, write_dir};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct SynthArgs {
    /// Number of enrolled subjects.
    #[arg(long)]
    subjects: usize,
    /// Templates per enrolled subject.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Template dimension.
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Mated probes (and as many non-mated probes).
    #[arg(long, default_value_t = 1000)]
    probes: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

/// Write the data set and say what was written.
pub(crate) fn run(a: SynthArgs) -> Result<()> {
    let spec = SynthSpec {
        subjects: a.subjects,
        samples: a.samples,
        dim: a.dim,
        probes: a.probes,
        seed: a.seed,
    };
    let bar = progress((a.subjects * a.samples) as u64, "synth");
    write_dir(&spec, &a.out, &|n| bar.set_position(n))?;
    bar.finish_and_clear();
    println!(
        "wrote {} gallery rows ({} subjects x {}), {} mated and {} non-mated probes to {}",
        a.subjects * a.samples,
        a.subjects,
        a.samples,
        a.probes,
        a.probes,
        a.out.display()
    );
    Ok(())
}
