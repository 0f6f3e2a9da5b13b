//! Which backend a search runs on: `cpu`, `gpu`, or `auto`, which routes each slab to
//! whichever a cost model measured at start-up predicts is faster.
//!
//! The model times both backends on a synthetic slab ([`CALIBRATION_ROWS`] rows of
//! dimension 512, k = 10) at batch 1 and 16 for each storage dtype, plus the GPU's
//! fixed cost of one search on a tiny slab, and predicts a search of `rows x probes` as
//! `fixed + rows * len / 512 * (per_row + per_row_probe * probes)`. A one-flight gallery
//! (hundreds of rows) therefore stays on the CPU: the GPU's fixed cost alone exceeds
//! the whole scan. Uploading a slab the GPU does not hold yet is not in the model (a
//! resident gallery is searched many times); the first GPU search of it pays for it.
//!
//! A slab the GPU fails on (out of its memory, a lost device) is answered on the CPU,
//! and stays there: `auto` does not retry a failing upload on every search.
//!
//! A software adapter (lavapipe, WARP) is never chosen by `auto`: it runs on the same
//! cores as the CPU engine, with slower kernels (BENCHMARKS.md measures both).

use super::cpu::CpuBackend;
use super::gpu::{GpuBackend, GpuOptions};
use super::topk::Hit;
use super::{Backend, EncodedProbes, Engine};
use crate::error::{Error, GpuErrorKind, Result};
use crate::gallery::{Slab, SubjectIds};
use crate::template::Dtype;
use serde::Deserialize;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Rows of the calibration slab.
pub const CALIBRATION_ROWS: usize = 32_768;
/// Batch sizes the model is fitted to.
const CALIBRATION_BATCHES: [usize; 2] = [1, 16];
/// Dimension the per-row costs are expressed for.
const REFERENCE_LEN: f64 = 512.0;

/// The backend asked for on the command line or in the server's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The CPU engine.
    Cpu,
    /// The GPU; an error when there is none.
    Gpu,
    /// The GPU where the cost model says it is faster, the CPU otherwise.
    #[default]
    Auto,
}

impl std::str::FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<BackendChoice> {
        match s {
            "cpu" => Ok(BackendChoice::Cpu),
            "gpu" => Ok(BackendChoice::Gpu),
            "auto" => Ok(BackendChoice::Auto),
            other => Err(Error::invalid(format!("backend {other:?}: expected cpu, gpu or auto"))),
        }
    }
}

impl std::fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendChoice::Cpu => "cpu",
            BackendChoice::Gpu => "gpu",
            BackendChoice::Auto => "auto",
        })
    }
}

/// An engine on the chosen backend, and the GPU when one is in use (for reports).
pub fn open_engine(choice: BackendChoice) -> Result<(Engine, Option<Arc<GpuBackend>>)> {
    let options = GpuOptions::from_env()?;
    match choice {
        BackendChoice::Cpu => Ok((Engine::cpu(), None)),
        BackendChoice::Gpu => {
            let gpu = Arc::new(GpuBackend::require(options)?);
            Ok((Engine::new(gpu.clone()), Some(gpu)))
        }
        BackendChoice::Auto => {
            let gpu = match GpuBackend::open(options) {
                Ok(Some(g)) => g,
                Ok(None) => {
                    tracing::info!("no GPU adapter: the CPU engine serves every search");
                    return Ok((Engine::cpu(), None));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the GPU could not be opened: the CPU engine serves every search");
                    return Ok((Engine::cpu(), None));
                }
            };
            if gpu.is_software() {
                tracing::info!(adapter = %gpu.describe(), "software GPU adapter: the CPU engine serves every search");
                return Ok((Engine::cpu(), None));
            }
            let gpu = Arc::new(gpu);
            let auto = AutoBackend::calibrate(gpu.clone())?;
            Ok((Engine::new(Arc::new(auto)), Some(gpu)))
        }
    }
}

/// Predicted seconds for one search: `fixed + rows * len / 512 * (per_row + per_row_probe * probes)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cost {
    pub fixed: f64,
    pub per_row: f64,
    pub per_row_probe: f64,
}

impl Cost {
    /// Predicted seconds for `rows` rows of `len` components and `probes` probes.
    pub fn predict(&self, rows: usize, len: usize, probes: usize) -> f64 {
        self.fixed + rows as f64 * (len as f64 / REFERENCE_LEN) * (self.per_row + self.per_row_probe * probes as f64)
    }

    /// Fit from times at batch 1 and 16 on `rows` rows, given the fixed cost.
    fn fit(fixed: f64, rows: usize, t1: f64, t16: f64) -> Cost {
        let per_row_probe = ((t16 - t1) / 15.0 / rows as f64).max(0.0);
        let per_row = ((t1 - fixed) / rows as f64 - per_row_probe).max(0.0);
        Cost {
            fixed,
            per_row,
            per_row_probe,
        }
    }
}

/// Routes each slab to the CPU or the GPU by the measured cost model.
pub struct AutoBackend {
    cpu: CpuBackend,
    gpu: Arc<GpuBackend>,
    /// (cpu, gpu) per dtype, in `Dtype::ALL` order.
    costs: [(Cost, Cost); 3],
    /// Slabs (by identity) the GPU failed on for good (a defect, no GPU left): the CPU
    /// takes them from then on instead of failing again on every search.
    gpu_failed: Mutex<HashSet<u64>>,
    /// Slabs the GPU had no memory (or time) for, and when to try the GPU again.
    gpu_retry_at: Mutex<HashMap<u64, Instant>>,
    /// How long a slab waits for the GPU after running it out of memory.
    retry_after: Duration,
}

/// How long a slab that ran the GPU out of memory is searched on the CPU before the GPU
/// is tried again (by then other slabs may have been released).
pub const GPU_RETRY_AFTER: Duration = Duration::from_secs(30);

fn dtype_index(dtype: Dtype) -> usize {
    Dtype::ALL
        .iter()
        .position(|&d| d == dtype)
        .expect("every dtype is in ALL")
}

/// Median seconds of `runs` calls of `f` (after one warm-up call).
fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64())
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

impl AutoBackend {
    /// Measure both backends (see the module docs).
    pub fn calibrate(gpu: Arc<GpuBackend>) -> Result<AutoBackend> {
        let started = Instant::now();
        let cpu = CpuBackend::new();
        let dim = REFERENCE_LEN as usize;
        let rows = crate::template::random_unit_rows(CALIBRATION_ROWS, dim, 1);
        let probes = crate::template::random_unit_rows(16, dim, 2);
        let mut costs = [(Cost::default(), Cost::default()); 3];
        for dtype in Dtype::ALL {
            let big = crate::gallery::Snapshot::from_rows(&rows, dim, dtype);
            let tiny = crate::gallery::Snapshot::from_rows(&rows[..dim], dim, dtype);
            let big_slab = big.slabs()[0];
            let tiny_slab = tiny.slabs()[0];
            let measure = |backend: &dyn Backend| -> Result<Cost> {
                let one = EncodedProbes::new(dtype, dim, &probes[..dim])?;
                let fixed = time(5, || backend.search_slab(&tiny_slab, &one, 10, f32::MIN).map(drop))?;
                let mut t = [0.0; 2];
                for (i, &batch) in CALIBRATION_BATCHES.iter().enumerate() {
                    let p = EncodedProbes::new(dtype, dim, &probes[..batch * dim])?;
                    t[i] = time(3, || backend.search_slab(&big_slab, &p, 10, f32::MIN).map(drop))?;
                }
                Ok(Cost::fit(fixed, CALIBRATION_ROWS, t[0], t[1]))
            };
            let c = measure(&cpu)?;
            let g = measure(gpu.as_ref())?;
            tracing::info!(%dtype, cpu = ?c, gpu = ?g, "cost model");
            costs[dtype_index(dtype)] = (c, g);
        }
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "calibrated the CPU/GPU cost model"
        );
        Ok(AutoBackend::with_costs(gpu, costs))
    }

    /// Route by given (cpu, gpu) costs per dtype (in `Dtype::ALL` order), e.g. a
    /// calibration kept from an earlier run.
    pub fn with_costs(gpu: Arc<GpuBackend>, costs: [(Cost, Cost); 3]) -> AutoBackend {
        AutoBackend {
            cpu: CpuBackend::new(),
            gpu,
            costs,
            gpu_failed: Mutex::new(HashSet::new()),
            gpu_retry_at: Mutex::new(HashMap::new()),
            retry_after: GPU_RETRY_AFTER,
        }
    }

    /// The same, trying the GPU again this soon after it ran out of memory (tests).
    pub fn with_retry_after(mut self, retry_after: Duration) -> AutoBackend {
        self.retry_after = retry_after;
        self
    }

    /// Whether a search of `rows x probes` on `dtype` rows of `len` goes to the GPU.
    pub fn prefers_gpu(&self, dtype: Dtype, rows: usize, len: usize, probes: usize) -> bool {
        let (cpu, gpu) = &self.costs[dtype_index(dtype)];
        gpu.predict(rows, len, probes) < cpu.predict(rows, len, probes)
    }

    /// The fitted (cpu, gpu) costs of a dtype.
    pub fn costs(&self, dtype: Dtype) -> (Cost, Cost) {
        self.costs[dtype_index(dtype)]
    }
}

impl Backend for AutoBackend {
    fn name(&self) -> &'static str {
        "auto"
    }

    fn search_slab(&self, slab: &Slab<'_>, probes: &EncodedProbes, k: usize, floor: f32) -> Result<Vec<Vec<Hit>>> {
        let uid = slab.identity().uid;
        let failed = || self.gpu_failed.lock().unwrap_or_else(|p| p.into_inner());
        let retry = || self.gpu_retry_at.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = retry().get(&uid).is_some_and(|&at| Instant::now() < at);
        if self.prefers_gpu(slab.dtype(), slab.rows(), probes.len, probes.count) && !waiting && !failed().contains(&uid)
        {
            // The GPU does not check rows as it scores them: a segment never verified is
            // verified first (the CPU below checks it as it scores).
            if let SubjectIds::Segment(segment) = slab.ids() {
                segment.ensure_verified()?;
            }
            match self.gpu.search_slab(slab, probes, k, floor) {
                Ok(hits) => {
                    retry().remove(&uid);
                    return Ok(hits);
                }
                // Damage found while uploading: never answered around.
                Err(e @ Error::Corrupt(_)) => return Err(e),
                // No room (or time) on the GPU now: the CPU answers, the GPU is tried again later.
                Err(e) if matches!(e.gpu_kind(), Some(GpuErrorKind::OutOfMemory | GpuErrorKind::Timeout)) => {
                    tracing::warn!(error = %e, rows = slab.rows(), retry_in = ?self.retry_after, "GPU search failed: this slab is searched on the CPU for now");
                    retry().insert(uid, Instant::now() + self.retry_after);
                }
                // A defect, or no GPU at all (a lost device is opened again by the GPU
                // backend; this is when that failed): the CPU takes this slab from now on.
                Err(e) => {
                    tracing::warn!(error = %e, rows = slab.rows(), "GPU search failed: this slab goes to the CPU from now on");
                    failed().insert(uid);
                }
            }
        }
        self.cpu.search_slab(slab, probes, k, floor)
    }

    fn verifies_rows(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fitted_cost_reproduces_its_measurements() {
        let c = Cost::fit(0.001, 1000, 0.003, 0.0105);
        assert!((c.predict(1000, 512, 1) - 0.003).abs() < 1e-12);
        assert!((c.predict(1000, 512, 16) - 0.0105).abs() < 1e-12);
        assert!((c.predict(0, 512, 16) - 0.001).abs() < 1e-12);
    }

    #[test]
    fn choices_parse() {
        assert_eq!("gpu".parse::<BackendChoice>().unwrap(), BackendChoice::Gpu);
        assert!(
            "tpu"
                .parse::<BackendChoice>()
                .unwrap_err()
                .to_string()
                .contains("cpu, gpu or auto")
        );
    }
}
