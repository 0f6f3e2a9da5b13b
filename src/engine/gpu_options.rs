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
    /// Lists one merge workgroup folds (default: about 512 candidates' worth). Tests
    /// set 2 so that merge trees have many levels.
    pub merge_fan: Option<usize>,
    /// Score f16 galleries on cooperative matrices (tensor cores) where the adapter has
    /// them (`BIOGATE_GPU_COOPERATIVE=1`). Off by default: answers are within the f16
    /// tolerance rather than equal to the CPU engine's, and the path has not yet run on
    /// a card in this project's tests.
    pub cooperative: bool,
}

impl GpuOptions {
    /// Defaults, with `BIOGATE_GPU_SHARD_BYTES` (largest shard in bytes) when set.
    pub fn from_env() -> Result<GpuOptions> {
        let max_shard_bytes = match std::env::var("BIOGATE_GPU_SHARD_BYTES") {
            Ok(v) => Some(v.parse::<u64>().ok().filter(|&b| b > 0).ok_or_else(|| {
                Error::invalid(format!(
                    "BIOGATE_GPU_SHARD_BYTES={v:?} is not a positive number of bytes"
                ))
            })?),
            Err(_) => None,
        };
        let cooperative = match std::env::var("BIOGATE_GPU_COOPERATIVE").as_deref() {
            Ok("1") => true,
            Ok("0") | Err(_) => false,
            Ok(v) => {
                return Err(Error::invalid(format!(
                    "BIOGATE_GPU_COOPERATIVE={v:?} must be 1 (on) or 0 (off)"
                )));
            }
        };
        Ok(GpuOptions {
            max_shard_bytes,
            cooperative,
            ..GpuOptions::default()
        })
    }
}

/// GPU time of a search's kernels, from timestamp queries (summed over its batches).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KernelTimes {
    pub scan: Duration,
    pub merge: Duration,
}

/// What the last upload of a whole slab cost (the first search's extra time).
#[derive(Clone, Copy, Debug)]
pub struct Upload {
    /// Which upload of this device it was (1 for the first): tells a new one from the last.
    pub number: u64,
    pub time: Duration,
    pub bytes: u64,
}
