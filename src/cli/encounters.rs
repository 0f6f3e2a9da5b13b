//! `biogate encounters`: reports over the encounter log a server records in its data
//! directory (`encounters.sqlite`), read in place (the server may be running).

use biogate::encounters::{EncounterStore, Format, Report, Retention, StatsBy};
use biogate::error::Result;
use biogate::time_text::{format_duration, now_ms, parse_duration, parse_time};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct EncountersArgs {
    /// The server's data directory.
    #[arg(long, env = "BIOGATE_DATA_DIR", default_value = "./biogate-data", global = true)]
    data_dir: PathBuf,
    /// table, jsonl or csv.
    #[arg(long, default_value = "table", global = true)]
    format: String,
    #[command(subcommand)]
    command: EncountersCommand,
}

#[derive(Subcommand)]
pub(crate) enum EncountersCommand {
    /// A traveller's matched entries, exits and transits, oldest first.
    History { subject: String },
    /// Subjects whose last entry has no exit within --max-stay (still in, or left late).
    Overstays {
        /// The longest allowed stay: a whole number and s, m, h, d or y (e.g. 90d).
        #[arg(long)]
        max_stay: String,
        /// Report as of this RFC 3339 time (default: now); later encounters are ignored.
        #[arg(long)]
        as_of: Option<String>,
    },
    /// Probes, matches and match rate per gallery (and location, gate or UTC day).
    Stats {
        /// location, gate or day.
        #[arg(long)]
        by: Option<String>,
    },
    /// Apply the retention rule now (the server does this on its own, see its TOML).
    Purge {
        #[arg(long, default_value = "3y")]
        keep: String,
        #[arg(long, default_value = "5y")]
        keep_overstayers: String,
        #[arg(long, default_value = "90d")]
        max_stay: String,
    },
}

pub(crate) fn run(a: EncountersArgs) -> Result<()> {
    let format = Format::parse(&a.format)?;
    let mut store = EncounterStore::open(&a.data_dir)?;
    let report = match a.command {
        EncountersCommand::History { subject } => Report::history(&store.history(&subject)?),
        EncountersCommand::Overstays { max_stay, as_of } => {
            let max_stay = parse_duration(&max_stay, "--max-stay")?;
            let as_of = match as_of {
                Some(t) => parse_time(&t, "--as-of")?,
                None => now_ms(),
            };
            Report::overstays(&store.overstays(max_stay, as_of)?)
        }
        EncountersCommand::Stats { by } => {
            let by = StatsBy::parse(by.as_deref().unwrap_or(""), "--by")?;
            Report::stats(&store.stats(by)?, by)
        }
        EncountersCommand::Purge {
            keep,
            keep_overstayers,
            max_stay,
        } => {
            let rule = Retention {
                keep_ms: parse_duration(&keep, "--keep")?,
                keep_overstayers_ms: parse_duration(&keep_overstayers, "--keep-overstayers")?,
                max_stay_ms: parse_duration(&max_stay, "--max-stay")?,
            };
            let r = store.purge(rule, now_ms())?;
            eprintln!(
                "removed {} encounters older than {} ({} kept for overstayers, up to {})",
                r.removed,
                format_duration(rule.keep_ms),
                r.kept_for_overstayers,
                format_duration(rule.keep_overstayers_ms)
            );
            return Ok(());
        }
    };
    out!("{}", report.render(format));
    Ok(())
}
