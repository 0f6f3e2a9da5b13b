//! `biogate synth`: identity-structured synthetic templates on disk.

use super::progress;
use biogate::error::Result;
use biogate::synth::{Difficulty, SynthSpec, write_dir};
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
    /// How hard the data is: easy (mates and non-mates fully apart), realistic (3% poor
    /// captures among mated probes, 1% lookalike subjects) or hard (10%, 3%).
    #[arg(long, value_enum, default_value_t = Difficulty::Realistic)]
    difficulty: Difficulty,
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
        difficulty: a.difficulty,
    };
    let bar = progress((a.subjects * a.samples) as u64, "synth");
    write_dir(&spec, &a.out, &|n| bar.set_position(n))?;
    bar.finish_and_clear();
    outln!(
        "wrote {} gallery rows ({} subjects x {}), {} mated and {} non-mated probes ({} data) to {}",
        a.subjects * a.samples,
        a.subjects,
        a.samples,
        a.probes,
        a.probes,
        a.difficulty,
        a.out.display()
    );
    Ok(())
}
