//! Settings and reports of the GPU backend, the same with or without the `gpu` feature.

use crate::error::{Error, Result};
use std::time::Duration;

/// Settings for the GPU backend.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Largest shard in bytes (default: the device's storage binding limit). Tests set
    /// it small so that the multi-shard path runs on tiny galleries.
    pub max_shard_bytes: Option<u64>,
    /// Most rows one scan block covers (default: whatever spreads the scan over the
    /// card). Tests set it small so that merges run over many lists.
    pub max_rows_per_block: Option<usize>,
    /// Fewest rows one scan block covers (default 256 per probe of the workgroup's
    /// tile; `BIOGATE_GPU_BLOCK_ROWS`). Longer blocks raise each selection's bar sooner
    /// and leave fewer lists to merge, but spread the scan over fewer workgroups: a
    /// tuning knob for a card's table.
    pub min_rows_per_block: Option<usize>,
    /// Lists one merge workgroup folds (default: about 512 candidates' worth). Tests
    /// set 2 so that merge trees have many levels.
    pub merge_fan: Option<usize>,
    /// Score f16 galleries on cooperative matrices (tensor cores) where the adapter has
    /// them (`BIOGATE_GPU_COOPERATIVE=1`). Off by default: answers are within the f16
    /// tolerance rather than equal to the CPU engine's (checked on an H100: within
    /// 3.4e-5, near ties in another order).
    pub cooperative: bool,
    /// How batches are searched (`BIOGATE_GPU_PIPELINE`): `auto` (default) takes the
    /// two-stage path for batches of at least `gemm_min_batch` probes and the fused
    /// scan below; `fused` and `twostage` force one for every batch.
    pub pipeline: Pipeline,
    /// Fewest probes a batch needs for `auto` to take the two-stage path (default 64,
    /// `BIOGATE_GPU_GEMM_MIN_BATCH`).
    pub gemm_min_batch: Option<usize>,
    /// Bytes of one chunk's score buffer on the two-stage path (default 128 MiB, within
    /// the device's binding limit; `BIOGATE_GPU_CHUNK_MB`).
    pub chunk_bytes: Option<u64>,
    /// Rows each selection workgroup of the two-stage path reduces (default 8,192; at
    /// most 2,048 on a software adapter; `BIOGATE_GPU_SELECT_ROWS`, rounded up to a
    /// multiple of 256).
    pub select_rows: Option<usize>,
    /// Compile the kernels with wgpu's runtime checks (bounds-checked indexing, loop
    /// bounding) and zero-filled workgroup memory (`BIOGATE_GPU_CHECKS=1`). Off by
    /// default: the kernels index only within what they bound and write every word of
    /// workgroup memory before reading it, and the checks cost time on every access.
    pub runtime_checks: bool,
}

/// Which kernels search a batch (see [`GpuOptions::pipeline`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pipeline {
    #[default]
    Auto,
    /// The fused scan (product and selection in one kernel) for every batch.
    Fused,
    /// A GEMM into a chunk of scores, then a separate selection, for every batch.
    TwoStage,
}

impl GpuOptions {
    /// Defaults, with the `BIOGATE_GPU_*` variables named on each field when set (the
    /// README lists them); a value a variable does not take is an error naming it.
    pub fn from_env() -> Result<GpuOptions> {
        let max_shard_bytes = positive_from_env("BIOGATE_GPU_SHARD_BYTES", "bytes")?;
        let min_rows_per_block = positive_from_env("BIOGATE_GPU_BLOCK_ROWS", "rows")?.map(|n| n as usize);
        let cooperative = switch_from_env("BIOGATE_GPU_COOPERATIVE", "on")?;
        let pipeline = match env_text("BIOGATE_GPU_PIPELINE")?.as_deref() {
            Some("auto") | None => Pipeline::Auto,
            Some("fused") => Pipeline::Fused,
            Some("twostage") => Pipeline::TwoStage,
            Some(v) => {
                return Err(Error::invalid(format!(
                    "BIOGATE_GPU_PIPELINE={v:?} must be auto, fused or twostage"
                )));
            }
        };
        let runtime_checks = switch_from_env("BIOGATE_GPU_CHECKS", "wgpu's runtime checks on")?;
        let gemm_min_batch = positive_from_env("BIOGATE_GPU_GEMM_MIN_BATCH", "probes")?.map(|n| n as usize);
        let chunk_bytes = match positive_from_env("BIOGATE_GPU_CHUNK_MB", "MiB")? {
            Some(mib) => Some(mib.checked_mul(1 << 20).ok_or_else(|| {
                Error::invalid(format!(
                    "BIOGATE_GPU_CHUNK_MB={mib} is more bytes than a buffer can have"
                ))
            })?),
            None => None,
        };
        let select_rows = positive_from_env("BIOGATE_GPU_SELECT_ROWS", "rows")?.map(|n| n as usize);
        Ok(GpuOptions {
            max_shard_bytes,
            min_rows_per_block,
            cooperative,
            pipeline,
            gemm_min_batch,
            chunk_bytes,
            select_rows,
            runtime_checks,
            ..GpuOptions::default()
        })
    }
}

/// The environment variable `name`, if set; an error naming it when it is not text.
fn env_text(name: &str) -> Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(Error::invalid(format!("{name}={v:?} is not text"))),
    }
}

/// A 0/1 switch from the environment variable `name` (off when unset); `on` says what 1
/// means, in the error for any other value.
fn switch_from_env(name: &str, on: &str) -> Result<bool> {
    match env_text(name)?.as_deref() {
        Some("1") => Ok(true),
        Some("0") | None => Ok(false),
        Some(v) => Err(Error::invalid(format!("{name}={v:?} must be 1 ({on}) or 0 (off)"))),
    }
}

/// A positive whole number from the environment variable `name`, if set.
fn positive_from_env(name: &str, unit: &str) -> Result<Option<u64>> {
    match env_text(name)? {
        Some(v) => Ok(Some(v.parse::<u64>().ok().filter(|&n| n > 0).ok_or_else(|| {
            Error::invalid(format!("{name}={v:?} is not a positive number of {unit}"))
        })?)),
        None => Ok(None),
    }
}

/// GPU time of a search's kernels, from timestamp queries (summed over its batches).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelTimes {
    pub scan: Duration,
    pub merge: Duration,
    /// Which kernels searched the last batch: "fused", "tensor cores" (the fused scan on
    /// them), "two-stage" or "two-stage, tensor cores".
    pub path: &'static str,
}

/// What the last upload of a whole slab cost (the first search's extra time).
#[derive(Clone, Copy, Debug)]
pub struct Upload {
    /// Which upload of this device it was (1 for the first): tells a new one from the last.
    pub number: u64,
    pub time: Duration,
    pub bytes: u64,
}
