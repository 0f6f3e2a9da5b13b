//! The GPU backend (wgpu + the WGSL kernels in shaders/): scores a batch of probes
//! against the resident gallery and selects the best rows on the GPU; only `keep`
//! candidates per probe and shard come back, never the score matrix.
//!
//! A search, in order:
//! 1. [`residency`] brings the slab's resident copy up to date (upload, appended rows,
//!    tombstones) and says how many rows one subject can have there (`m`).
//! 2. The host picks `keep = (k - 1) * m + 1` rows per probe: the best row of each of
//!    the k best subjects is among them (a row above the k-th subject's best belongs to
//!    one of the k - 1 subjects ahead of it, m rows each at most), so aggregating them
//!    into subjects on the host is exact, with the CPU engine's order and ties.
//! 3. [`shaders::KernelShape::choose`] picks the kernel shape for the batch, the dtype
//!    and the card's workgroup memory; pipelines are made once per shape.
//! 4. One submission per batch of probes: `poison` fills the result slots with a
//!    pattern no kernel writes; then either `scan` scores every shard by blocks of rows
//!    (a tiled product of rows and probes with the selection fused in) and keeps each
//!    probe's best `keep` per block, or (batches of 64 probes or more) the two-stage
//!    path: per chunk of a shard's rows, `gemm` writes every probe's scores and
//!    `select_scores` keeps each probe's best `keep` per segment; `merge` reduces the
//!    lists level by level (a tree spread over many workgroups) to `keep` per probe and
//!    shard. Shards have their own regions of the work buffers.
//! 5. The readback (every shard's results) is checked slot by slot: a slot the kernels
//!    did not write is an error naming the probe and rank.
//! 6. [`TopSubjects`] folds the rows into distinct subjects, as the CPU engine does.
//!
//! Buffers live in a pool of scratch sets reused by later searches (grown, never made
//! per search), and bind groups are cached per shard and scratch set. The device's lock
//! is held while a batch is encoded and submitted, never while it runs: concurrent
//! searches queue up behind each other on the card, and a large batch keeps two
//! dispatches in flight (the next one's probes go up while the last one runs).
//!
//! Files: this one (`GpuBackend`: the backend and its recovery from a lost device),
//! `device` (one device's state and a search's submissions), `plan` (how a batch is
//! cut into passes), `encode` (a plan into one submission), `scratch` (pooled buffers
//! and submissions in flight), `readback` (checking what the kernels wrote), `shaders`
//! (the WGSL assembled per shape), `residency` (the resident gallery), `context` (the
//! adapter and device).

pub mod context;
mod device;
mod encode;
mod plan;
mod readback;
pub mod residency;
mod scratch;
pub mod shaders;

use super::cpu::CpuBackend;
pub use super::gpu_options::{GpuOptions, KernelTimes, Pipeline, Upload};
use super::topk::{Hit, TopSubjects};
use super::{Backend, EncodedProbes};
use crate::error::{Error, GpuErrorKind, Result};
use crate::gallery::Slab;
use crate::template::Dtype;
use context::GpuContext;
pub use device::Device;
use device::*;
use encode::*;
use plan::*;
use readback::*;
use residency::{Residency, Resident, ResidentSlab, Shard};
use scratch::*;
use shaders::{GEMM_PROBES, KernelShape, TWO_STAGE_WORKGROUP, TwoStageShape};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Exact search on a GPU. Holds the device it searches on; a device that is lost
/// (driver reset, hung GPU) is opened again and the search retried once.
pub struct GpuBackend {
    options: GpuOptions,
    device: Mutex<Arc<Device>>,
    cpu: CpuBackend,
    /// How many times a lost device was opened again.
    reopened: AtomicU64,
    /// Faults to report instead of searching (tests of the callers' recovery).
    injected: Mutex<Vec<GpuErrorKind>>,
}

impl GpuBackend {
    /// The GPU the environment selects (see [`context`]); `Ok(None)` when there is none.
    pub fn open(options: GpuOptions) -> Result<Option<GpuBackend>> {
        let Some(ctx) = GpuContext::open(options.cooperative)? else {
            return Ok(None);
        };
        let device = Device::on(ctx, &options)?;
        Ok(Some(GpuBackend {
            options,
            device: Mutex::new(Arc::new(device)),
            cpu: CpuBackend::new(),
            reopened: AtomicU64::new(0),
            injected: Mutex::new(Vec::new()),
        }))
    }

    /// Open the GPU or fail with an error saying why (for `--backend gpu`).
    pub fn require(options: GpuOptions) -> Result<GpuBackend> {
        GpuBackend::open(options)?.ok_or_else(|| {
            Error::gpu(
                GpuErrorKind::NotAvailable,
                "no GPU adapter found (set WGPU_BACKEND / WGPU_ADAPTER_NAME, or install a Vulkan driver such as mesa-vulkan-drivers)",
            )
        })
    }

    /// The device searched on now.
    pub fn device(&self) -> Arc<Device> {
        self.device.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The card and how it is reached.
    pub fn describe(&self) -> String {
        self.device().describe()
    }

    /// Whether the adapter is a software renderer running on the CPU (lavapipe, WARP).
    pub fn is_software(&self) -> bool {
        self.device().info.device_type == wgpu::DeviceType::Cpu
    }

    /// The path that searched the last batch and its kernels' GPU time per pass (zero
    /// without TIMESTAMP_QUERY); `None` when the last search ran on the CPU.
    pub fn last_kernel_times(&self) -> Option<KernelTimes> {
        *self.device().last_times.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the last upload of a whole slab cost.
    pub fn last_upload(&self) -> Option<Upload> {
        self.device().lock().residency.last_upload()
    }

    /// Bytes of gallery resident on the GPU.
    pub fn resident_bytes(&self) -> u64 {
        self.device().lock().residency.bytes()
    }

    /// How many times a lost device was opened again.
    pub fn reopened(&self) -> u64 {
        self.reopened.load(Ordering::SeqCst)
    }

    /// Make the next search report `kind` instead of searching, as if the device had
    /// failed so (tests of how callers recover; a `DeviceLost` also destroys the device).
    pub fn inject_fault(&self, kind: GpuErrorKind) {
        if kind == GpuErrorKind::DeviceLost {
            self.device().device.destroy();
        } else {
            self.injected.lock().unwrap_or_else(|p| p.into_inner()).push(kind);
        }
    }

    /// Open the device again after `lost` was lost (unless another search already did);
    /// what was resident on it is uploaded again as searches need it.
    fn reopen(&self, lost: &Arc<Device>) -> Result<Arc<Device>> {
        let mut current = self.device.lock().unwrap_or_else(|p| p.into_inner());
        if !Arc::ptr_eq(&current, lost) {
            return Ok(current.clone());
        }
        let ctx = GpuContext::open(self.options.cooperative)?.ok_or_else(|| {
            Error::gpu(
                GpuErrorKind::NotAvailable,
                "the GPU was lost and no adapter is found any more",
            )
        })?;
        let device = Arc::new(Device::on(ctx, &self.options)?);
        tracing::warn!(gpu = %device.describe(), "the GPU device was lost; opened it again");
        *current = device.clone();
        self.reopened.fetch_add(1, Ordering::SeqCst);
        Ok(device)
    }
}

impl Backend for GpuBackend {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn search_slab(&self, slab: &Slab<'_>, probes: &EncodedProbes, k: usize, floor: f32) -> Result<Vec<Vec<Hit>>> {
        if slab.rows() == 0 {
            return Ok(vec![Vec::new(); probes.count]);
        }
        let injected = self.injected.lock().unwrap_or_else(|p| p.into_inner()).pop();
        if let Some(kind) = injected {
            return Err(Error::gpu(kind, "an injected fault"));
        }
        let device = self.device();
        match device.search(&self.cpu, slab, probes, k, floor) {
            // The device is gone: open it again (once) and search there.
            Err(e) if e.gpu_kind() == Some(GpuErrorKind::DeviceLost) => {
                tracing::warn!(error = %e, "GPU device lost during a search");
                self.reopen(&device)?.search(&self.cpu, slab, probes, k, floor)
            }
            other => other,
        }
    }
}
