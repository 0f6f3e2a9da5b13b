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
//!    pattern no kernel writes; `scan` scores every shard by blocks of rows (a tiled
//!    product of rows and probes with the selection fused in) and keeps each probe's
//!    best `keep` per block; `merge` reduces the blocks' lists level by level (a tree
//!    spread over many workgroups) to `keep` per probe and shard. Shards have their own
//!    regions of the work buffers, so nothing serialises them.
//! 5. The readback (every shard's results) is checked slot by slot: a slot the kernels
//!    did not write is an error naming the probe and rank.
//! 6. [`TopSubjects`] folds the rows into distinct subjects, as the CPU engine does.
//!
//! Buffers live in a pool of scratch sets reused by later searches (grown, never made
//! per search), and bind groups are cached per shard and scratch set. The device's lock
//! is held while a batch is encoded and submitted, never while it runs: concurrent
//! searches queue up behind each other on the card, and a large batch keeps two
//! dispatches in flight (the next one's probes go up while the last one runs).

pub mod context;
pub mod residency;
pub mod shaders;

use super::cpu::CpuBackend;
pub use super::gpu_options::{GpuOptions, KernelTimes, Pipeline, Upload};
use super::topk::{Hit, TopSubjects};
use super::{Backend, EncodedProbes};
use crate::error::{Error, GpuErrorKind, Result};
use crate::gallery::Slab;
use crate::template::Dtype;
use context::GpuContext;
use residency::{Residency, Resident, ResidentSlab, Shard};
use shaders::{GEMM_PROBES, KernelShape, TWO_STAGE_WORKGROUP, TwoStageShape};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Workgroups a scan aims for on a GPU (enough to fill a large one several times
/// over); on a CPU adapter (lavapipe) a few per core, as more only add overhead.
const TARGET_WORKGROUPS: usize = 4096;
const TARGET_WORKGROUPS_PER_CPU_CORE: usize = 4;
/// Most rows a scan block covers on a software adapter (lavapipe). lavapipe (Mesa 22.3,
/// LLVM 15) loses results in workgroups that run long: with blocks of 12,544 rows it
/// dropped candidates, and a workgroup writing its ten results wrote the first only.
/// The old one-row-per-invocation kernel did the same with padded batches, so it is
/// not the new kernels' logic; short blocks keep lavapipe exact (`bench --check` and
/// tests/gpu.rs), and the merge tree takes the extra blocks.
const SOFTWARE_MAX_ROWS_PER_BLOCK: usize = 2048;
/// Fewest rows a scan block covers, per probe of its tile. Each block starts its
/// selection with no bar and sorts often until the bar rises, so a wider tile (more
/// probes sorting) wants longer blocks. Measured on an H100 (BENCHMARKS.md, "block
/// sweep"): at 1M x 512 the best of 256 / 1,024 / 4,096 / 16,384 rows per block was
/// 256 for one-probe tiles and 4,096 for 16-probe tiles, as this gives; 32-probe
/// tiles (8,192 here) measured best at 16,384 of those four (not 8,192 itself).
const MIN_ROWS_PER_BLOCK_PER_PROBE: usize = 256;
/// Probes sent to the GPU in one submission.
const MAX_PROBES_PER_DISPATCH: usize = 4096;
/// Bytes of per-block lists one submission may write (all shards together).
const MAX_LIST_BYTES: u64 = 256 << 20;
/// Candidates one merge workgroup folds (its fan-in is this over `keep`).
const MERGE_CANDIDATES: usize = 512;
/// Submissions of one search in flight at once.
const IN_FLIGHT: usize = 2;
/// Scratch sets kept for reuse.
const POOLED: usize = 4;
/// Bind groups cached before the cache is cleared.
const CACHED_GROUPS: usize = 1024;
/// Most workgroups of the poison pass (each loops over the slots).
const POISON_WORKGROUPS: usize = 1024;
/// Written into the result slots before a search (layout.wgsl `POISON`); no kernel
/// writes it.
const POISON: u32 = 0xDEAD_BEEF;
/// The row of a result slot with no candidate (layout.wgsl `EMPTY`).
const EMPTY: u32 = u32::MAX;
/// Bytes per candidate slot (score, key, row).
const SLOT_BYTES: u64 = 12;
/// Offsets of bindings into shared buffers must be multiples of this.
const BINDING_ALIGN: u64 = 256;
/// Timestamps per submission: scan start and end, merge start and end.
const QUERIES: u32 = 4;
/// Fewest probes a batch needs for the two-stage path when the pipeline is `auto`.
const GEMM_MIN_BATCH: usize = 64;
/// Bytes of one chunk's score buffer on the two-stage path (two are used in turn).
const CHUNK_BYTES: u64 = 128 << 20;
/// Rows each selection workgroup of the two-stage path reduces: on a GPU, and at most
/// on a software adapter (which loses results in workgroups that run long).
const SELECT_ROWS: usize = 8192;
const SOFTWARE_SELECT_ROWS: usize = 2048;

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

/// One opened device and what lives on it.
pub struct Device {
    ctx: GpuContext,
    options: GpuOptions,
    state: Mutex<State>,
    pool: Mutex<Vec<Scratch>>,
    last_times: Mutex<Option<KernelTimes>>,
}

impl std::ops::Deref for Device {
    type Target = GpuContext;
    fn deref(&self) -> &GpuContext {
        &self.ctx
    }
}

struct State {
    residency: Residency,
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    kernels: HashMap<KernelShape, Kernels>,
    two_stage: HashMap<TwoStageShape, TwoStageKernels>,
    groups: HashMap<GroupKey, wgpu::BindGroup>,
    /// `Residency::changes` when `groups` was last pruned.
    groups_seen: u64,
}

struct Kernels {
    scan: wgpu::ComputePipeline,
    merge: wgpu::ComputePipeline,
    poison: wgpu::ComputePipeline,
}

/// The two-stage path's kernels (two_stage.wgsl).
struct TwoStageKernels {
    gemm: wgpu::ComputePipeline,
    select: wgpu::ComputePipeline,
}

/// What a cached bind group binds: a shard, a scratch set as it was (its buffers are
/// replaced when they grow), and the regions of the work buffers. The uniform block is
/// bound with a dynamic offset, so one group serves every pass over the same regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GroupKey {
    shard: u64,
    scratch: u64,
    generation: u64,
    input: Region,
    output: Region,
}

/// A work buffer of a scratch set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Work {
    /// The candidate lists of scan blocks and merge levels.
    Lists,
    /// Every shard's results (copied to the readback buffer).
    Best,
    /// One of the two-stage path's two score buffers.
    Scores(usize),
}

/// Where a binding points: a buffer, an offset and a size in bytes.
type Region = (Work, u64, u64);

/// Which kernel a dispatch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Scan,
    Gemm,
    Select,
    Merge,
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

    /// GPU time of the last search's kernels, per pass (needs TIMESTAMP_QUERY).
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

impl Device {
    fn on(ctx: GpuContext, options: &GpuOptions) -> Result<Device> {
        let limit = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        let shard_bytes = options.max_shard_bytes.map_or(limit, |b| b.min(limit));
        let (layout, pipeline_layout) = ctx.checked("creating the pipeline layout", || {
            let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            };
            let uniform = wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: None,
                },
                count: None,
            };
            let layout = ctx.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("biogate search"),
                entries: &[
                    uniform,
                    storage(1, true),
                    storage(2, true),
                    storage(3, true),
                    storage(4, true),
                    storage(5, true),
                    storage(6, false),
                    storage(7, false),
                ],
            });
            let pipeline_layout = ctx.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("biogate search"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            (layout, pipeline_layout)
        })?;
        Ok(Device {
            state: Mutex::new(State {
                residency: Residency::new(shard_bytes),
                layout,
                pipeline_layout,
                kernels: HashMap::new(),
                two_stage: HashMap::new(),
                groups: HashMap::new(),
                groups_seen: 0,
            }),
            options: options.clone(),
            pool: Mutex::new(Vec::new()),
            last_times: Mutex::new(None),
            ctx,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_timestamps(&self) -> bool {
        self.ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Search one slab here, or on the CPU when the GPU cannot take it (an older
    /// version of the log than the one resident, or more rows to keep per probe than
    /// workgroup memory holds).
    fn search(
        &self,
        cpu: &CpuBackend,
        slab: &Slab<'_>,
        probes: &EncodedProbes,
        k: usize,
        floor: f32,
    ) -> Result<Vec<Vec<Hit>>> {
        let mut tops: Vec<TopSubjects> = vec![TopSubjects::new(k, floor); probes.count];
        let mut times = KernelTimes::default();
        let mut in_flight: VecDeque<Pending> = VecDeque::new();
        for first in (0..probes.count).step_by(MAX_PROBES_PER_DISPATCH) {
            let count = (probes.count - first).min(MAX_PROBES_PER_DISPATCH);
            let Some(pending) = self.submit(slab, probes, k, floor, first, count)? else {
                for p in in_flight {
                    self.discard(p);
                }
                return cpu.search_slab(slab, probes, k, floor);
            };
            in_flight.push_back(pending);
            if in_flight.len() >= IN_FLIGHT {
                let p = in_flight.pop_front().expect("two in flight");
                self.collect(p, slab, &mut tops, &mut times)?;
            }
        }
        while let Some(p) = in_flight.pop_front() {
            self.collect(p, slab, &mut tops, &mut times)?;
        }
        *self.last_times.lock().unwrap_or_else(|p| p.into_inner()) = Some(times);
        Ok(tops.into_iter().map(TopSubjects::into_sorted).collect())
    }

    /// Encode and submit probes `first..first + count` against every shard of the
    /// slab's resident copy; `None` when the GPU cannot take the slab.
    fn submit(
        &self,
        slab: &Slab<'_>,
        probes: &EncodedProbes,
        k: usize,
        floor: f32,
        first: usize,
        count: usize,
    ) -> Result<Option<Pending>> {
        let mut state = self.lock();
        let State {
            residency,
            layout,
            pipeline_layout,
            kernels,
            two_stage,
            groups,
            groups_seen,
        } = &mut *state;
        let index = match residency.sync(&self.ctx, slab)? {
            Resident::Ready(index) => index,
            Resident::Stale => {
                tracing::debug!("GPU holds a newer version of the log's rows: scoring this one on the CPU");
                return Ok(None);
            }
        };
        let residency = &*residency;
        let resident = residency.slab(index);
        let keep = ((k - 1) * resident.max_rows_per_subject + 1).min(slab.rows());
        let workgroup_limit = self.ctx.limits.max_compute_workgroup_storage_size;
        let batch = probes.count.min(MAX_PROBES_PER_DISPATCH);
        let Some(shape) = KernelShape::choose(slab.dtype(), batch, keep, workgroup_limit, self.ctx.cooperative) else {
            tracing::debug!(
                keep,
                "too many rows per subject to select on the GPU: scoring this slab on the CPU"
            );
            return Ok(None);
        };
        let checks = self.options.runtime_checks;
        let kernels = match kernels.entry(shape) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(self.ctx.checked("compiling the kernels", || {
                build_kernels(&self.ctx, pipeline_layout, &shape, checks)
            })?),
        };
        let wants_two_stage = match self.options.pipeline {
            Pipeline::Fused => false,
            Pipeline::TwoStage => true,
            Pipeline::Auto => batch >= self.options.gemm_min_batch.unwrap_or(GEMM_MIN_BATCH),
        };
        let two_stage_shape = wants_two_stage
            .then(|| TwoStageShape::choose(slab.dtype(), probes.len, keep, workgroup_limit, self.ctx.cooperative))
            .flatten();
        let two_stage_kernels = match two_stage_shape {
            None => None,
            Some(ts) => Some(&*match two_stage.entry(ts) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(v) => v.insert(self.ctx.checked("compiling the two-stage kernels", || {
                    build_two_stage_kernels(&self.ctx, pipeline_layout, &ts, checks)
                })?),
            }),
        };
        if groups.len() > CACHED_GROUPS {
            groups.clear();
        }
        if residency.changes() != *groups_seen {
            // Shards were dropped or replaced: their bind groups (which hold their
            // buffers) go too.
            groups.retain(|key, _| residency.holds_shard(key.shard));
            *groups_seen = residency.changes();
        }
        let mut scratch = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(Scratch::new);
        let plan = Plan::new(
            &self.ctx,
            &self.options,
            resident,
            probes,
            shape,
            two_stage_kernels.and(two_stage_shape),
            keep,
            floor,
            first,
            count,
        );
        let generation = scratch.generation;
        let submitted = self.ctx.checked("running the search kernels", || {
            let mut job = Job {
                ctx: &self.ctx,
                layout,
                kernels,
                two_stage: two_stage_kernels,
                groups,
                resident,
                plan: &plan,
                timestamps: self.has_timestamps(),
            };
            job.encode_and_submit(&mut scratch)
        });
        if scratch.generation != generation {
            // Its old buffers are gone: so are the bind groups that named them.
            groups.retain(|key, _| key.scratch != scratch.id || key.generation == scratch.generation);
        }
        let (index, mapped) = submitted?;
        Ok(Some(Pending {
            scratch,
            plan,
            index,
            mapped,
        }))
    }

    /// Wait for a submission, check its results and fold them into `tops`.
    fn collect(&self, p: Pending, slab: &Slab<'_>, tops: &mut [TopSubjects], times: &mut KernelTimes) -> Result<()> {
        self.ctx.wait_for(p.index.clone())?;
        if !self.mapped(&p) {
            return Err(Error::gpu(
                GpuErrorKind::Internal,
                "the search results could not be mapped for reading",
            ));
        }
        let plan = &p.plan;
        times.path = plan.path;
        let readback = p
            .scratch
            .readback
            .as_ref()
            .expect("a submitted scratch set has a readback buffer");
        let bytes = readback
            .get_mapped_range(..plan.readback_bytes())
            .map_err(|e| Error::gpu(GpuErrorKind::Internal, format!("reading the results back: {e}")))?;
        let keep = plan.keep as usize;
        let mut rows = Vec::new();
        for (i, shard) in plan.shards.iter().enumerate() {
            let at = shard.best_at as usize;
            let slots: Vec<Slot> = bytemuck::pod_collect_to_vec(&bytes[at..at + plan.results_bytes as usize]);
            check_slots(&slots, plan.count, keep, shard.rows, plan.first, i, &mut rows)?;
        }
        for (q, shard, c) in rows {
            let global = plan.shards[shard].first_row + c.row as usize;
            let ordinal = slab.row_subjects()[global];
            tops[plan.first + q].offer(c.score, ordinal, slab.rank(ordinal));
        }
        if self.has_timestamps() {
            let at = plan.best_bytes as usize;
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes[at..at + 8 * QUERIES as usize]);
            let period = f64::from(self.ctx.queue.get_timestamp_period());
            let span =
                |a: usize, b: usize| Duration::from_nanos((ticks[b].saturating_sub(ticks[a]) as f64 * period) as u64);
            times.scan += span(0, 1);
            times.merge += span(2, 3);
        }
        drop(bytes);
        readback.unmap();
        self.give_back(p.scratch);
        Ok(())
    }

    /// Drop a submission whose results are not needed (its scratch set is reused once
    /// the GPU is done with it).
    fn discard(&self, p: Pending) {
        if self.ctx.wait_for(p.index.clone()).is_ok() && self.mapped(&p) {
            if let Some(r) = &p.scratch.readback {
                r.unmap();
            }
            self.give_back(p.scratch);
        }
    }

    /// Whether a finished submission's readback is mapped (another thread's poll may
    /// be the one running its callback: wait for that a while).
    fn mapped(&self, p: &Pending) -> bool {
        let deadline = std::time::Instant::now() + MAP_WAIT;
        while p.mapped.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            let _ = self.ctx.device.poll(wgpu::PollType::Poll);
            std::thread::yield_now();
        }
        p.mapped.load(Ordering::SeqCst) == MAPPED
    }

    fn give_back(&self, scratch: Scratch) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < POOLED {
            pool.push(scratch);
        }
    }
}

/// Compile `source` and make a pipeline of each of `entries`. Without `checks` the
/// module is trusted (no bounds checks or loop bounding added by wgpu) and workgroup
/// memory is not zero-filled: every kernel indexes only within what it bounds and
/// writes every word of workgroup memory before reading it (`BIOGATE_GPU_CHECKS=1`
/// restores both; the GPU tests run in both modes).
fn pipelines<const N: usize>(
    ctx: &GpuContext,
    layout: &wgpu::PipelineLayout,
    source: String,
    entries: [&str; N],
    checks: bool,
) -> [wgpu::ComputePipeline; N] {
    let desc = wgpu::ShaderModuleDescriptor {
        label: Some("biogate search"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    };
    let module = if checks {
        ctx.device.create_shader_module(desc)
    } else {
        // SAFETY: the kernels bound every index into a buffer by its length or by the
        // rows and words the host sized the buffers for (layout.wgsl's `gallery_word`
        // and `probe_raw`, the plans' regions), their loops end on uniform bounds, and
        // the GPU tests run both modes against the CPU engine.
        unsafe {
            ctx.device
                .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
        }
    };
    entries.map(|entry| {
        ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                zero_initialize_workgroup_memory: checks,
                ..Default::default()
            },
            cache: None,
        })
    })
}

fn build_kernels(ctx: &GpuContext, layout: &wgpu::PipelineLayout, shape: &KernelShape, checks: bool) -> Kernels {
    let [scan, merge, poison] = pipelines(ctx, layout, shape.source(), ["scan", "merge", "poison"], checks);
    Kernels { scan, merge, poison }
}

fn build_two_stage_kernels(
    ctx: &GpuContext,
    layout: &wgpu::PipelineLayout,
    shape: &TwoStageShape,
    checks: bool,
) -> TwoStageKernels {
    let [gemm, select] = pipelines(ctx, layout, shape.source(), ["gemm", "select_scores"], checks);
    TwoStageKernels { gemm, select }
}

/// A selected row as the kernels write it.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Slot {
    score: f32,
    key: u32,
    row: u32,
}

/// The uniform block of one dispatch (layout.wgsl `Params`).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    row_vec4s: u32,
    probe_vec4s: u32,
    keep: u32,
    blocks: u32,
    rows_per_block: u32,
    floor: f32,
    lists: u32,
    fan: u32,
    out_lists: u32,
    chunk_start: u32,
    chunk_len: u32,
    chunk_rows: u32,
    first_block: u32,
    probes_padded: u32,
    pad: [u32; 3],
}

/// One batch of probes against every shard: how the work is cut and where each part's
/// lists go. Offsets are bytes into the scratch set's buffers.
struct Plan {
    /// Invocations per workgroup of the shape's kernels.
    workgroup: u32,
    first: usize,
    count: usize,
    keep: u32,
    /// Bytes of one probe batch's results (keep slots per padded probe).
    results_bytes: u64,
    shards: Vec<ShardPlan>,
    /// Uniform blocks, one per dispatch, BINDING_ALIGN apart.
    params: Vec<Params>,
    probe_bytes: Vec<u8>,
    scale_bytes: Vec<u8>,
    lists_bytes: u64,
    best_bytes: u64,
    /// Bytes of each score buffer of the two-stage path (0 on the fused path).
    scores_bytes: u64,
    /// Which kernels search it (KernelTimes::path).
    path: &'static str,
}

struct ShardPlan {
    shard: usize,
    first_row: usize,
    rows: u32,
    /// The fused scan, or each chunk's GEMM and selection: every block's list.
    scan: Vec<Pass>,
    levels: Vec<Pass>,
    /// Offset of its results in the `best` buffer.
    best_at: u64,
}

/// One dispatch: its kernel, its uniform block, its workgroups, and the regions bound
/// as `lists_in` (binding 6) and `lists_out` or `scores` (binding 7).
struct Pass {
    kernel: Kernel,
    params: usize,
    groups: (u32, u32),
    input: Region,
    output: Region,
}

fn align(bytes: u64) -> u64 {
    bytes.div_ceil(BINDING_ALIGN) * BINDING_ALIGN
}

/// How the two-stage path cuts a shard: rows per selection segment and per chunk.
#[derive(Clone, Copy, Debug)]
struct Chunking {
    shape: TwoStageShape,
    segment_rows: usize,
    chunk_rows: usize,
}

impl Chunking {
    /// Segments of the options' length (at most `SOFTWARE_SELECT_ROWS` on a software
    /// adapter, and long enough that a shard's lists fit `max_blocks`), as many per
    /// chunk as the chunk's score buffer holds for `padded` probes; `None` when not even
    /// one segment's scores fit a binding.
    fn new(
        options: &GpuOptions,
        resident: &ResidentSlab,
        software: bool,
        shape: TwoStageShape,
        padded: usize,
        max_blocks: usize,
        binding_limit: u64,
    ) -> Option<Chunking> {
        let most_rows = resident.shards.iter().map(|s| s.rows).max().unwrap_or(1).max(1);
        let mut wanted = options.select_rows.unwrap_or(SELECT_ROWS);
        if software {
            wanted = wanted.min(SOFTWARE_SELECT_ROWS);
        }
        let unit = TWO_STAGE_WORKGROUP as usize;
        let segment_rows = wanted.max(most_rows.div_ceil(max_blocks)).div_ceil(unit).max(1) * unit;
        let score_row_bytes = padded as u64 * 4;
        let chunk_bytes = options.chunk_bytes.unwrap_or(CHUNK_BYTES).min(binding_limit);
        let segments_per_chunk = ((chunk_bytes / score_row_bytes) as usize / segment_rows)
            .max(1)
            .min(most_rows.div_ceil(segment_rows));
        let chunk_rows = segments_per_chunk * segment_rows;
        (chunk_rows as u64 * score_row_bytes <= binding_limit).then_some(Chunking {
            shape,
            segment_rows,
            chunk_rows,
        })
    }
}

impl Plan {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ctx: &GpuContext,
        options: &GpuOptions,
        resident: &ResidentSlab,
        probes: &EncodedProbes,
        shape: KernelShape,
        two_stage: Option<TwoStageShape>,
        keep: usize,
        floor: f32,
        first: usize,
        count: usize,
    ) -> Plan {
        let software = ctx.info.device_type == wgpu::DeviceType::Cpu;
        let binding_limit = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        let max_blocks = |padded: usize, shards: usize| {
            let results_bytes = (padded * keep) as u64 * SLOT_BYTES;
            ((MAX_LIST_BYTES / shards.max(1) as u64).min(binding_limit) / results_bytes).clamp(1, u64::from(u16::MAX))
                as usize
        };
        // The two-stage path pads the batch to whole GEMM tiles (a multiple of every
        // merge tile); it gives way to the fused scan where a chunk cannot be bound.
        let gemm_padded = count.div_ceil(GEMM_PROBES as usize) * GEMM_PROBES as usize;
        let chunking = two_stage.and_then(|ts| {
            Chunking::new(
                options,
                resident,
                software,
                ts,
                gemm_padded,
                max_blocks(gemm_padded, resident.shards.len()),
                binding_limit,
            )
        });
        let tile = if chunking.is_some() {
            GEMM_PROBES as usize
        } else {
            shape.probe_tile() as usize
        };
        let padded = count.div_ceil(tile) * tile;
        let merge_tiles = (padded / shape.probe_tile() as usize) as u32;
        let split = chunking.is_some_and(|c| c.shape.cooperative && c.shape.dtype == Dtype::F16);
        let (probe_bytes, probe_vec4s, scale_bytes) =
            encode_probes(probes, first, count, padded, chunking.is_some(), split);
        let row_vec4s = (resident.stride / 16) as u32;
        let target_workgroups = if software {
            TARGET_WORKGROUPS_PER_CPU_CORE * std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            TARGET_WORKGROUPS
        };
        let row_tile = shape.blocking.row_tile() as usize;
        let min_rows_per_block = options
            .min_rows_per_block
            .unwrap_or(MIN_ROWS_PER_BLOCK_PER_PROBE * tile);
        let results_bytes = (padded * keep) as u64 * SLOT_BYTES;
        let max_blocks_by_memory = max_blocks(padded, resident.shards.len());
        let fan = options.merge_fan.unwrap_or(MERGE_CANDIDATES / keep).max(2);
        let scores_bytes = chunking.map_or(0, |c| c.chunk_rows as u64 * padded as u64 * 4);
        let base = Params {
            row_vec4s,
            probe_vec4s,
            keep: keep as u32,
            floor: floor.max(f32::MIN),
            probes_padded: padded as u32,
            ..Params::default()
        };
        let mut params = Vec::new();
        let mut lists_at = 0u64;
        let mut chunks_so_far = 0usize;
        let mut shards = Vec::new();
        for (i, s) in resident.shards.iter().enumerate() {
            let best_at = i as u64 * align(results_bytes);
            let best = (Work::Best, best_at, results_bytes);
            let (blocks, scan) = match chunking {
                None => {
                    let wanted = target_workgroups.div_ceil(padded / tile);
                    let mut blocks = wanted
                        .min(s.rows.div_ceil(min_rows_per_block.max(row_tile)))
                        .min(max_blocks_by_memory)
                        .max(1);
                    let most_rows = if software {
                        Some(options.max_rows_per_block.unwrap_or(SOFTWARE_MAX_ROWS_PER_BLOCK))
                    } else {
                        options.max_rows_per_block
                    };
                    if let Some(most) = most_rows {
                        blocks = blocks.max(s.rows.div_ceil(most.max(1)).min(max_blocks_by_memory));
                    }
                    let rows_per_block = s.rows.div_ceil(blocks).div_ceil(row_tile) * row_tile;
                    let blocks = s.rows.div_ceil(rows_per_block).max(1) as u32;
                    let lists = (Work::Lists, lists_at, u64::from(blocks) * results_bytes);
                    let scan = Pass {
                        kernel: Kernel::Scan,
                        params: params.len(),
                        groups: (blocks, merge_tiles),
                        input: lists,
                        output: best,
                    };
                    params.push(Params {
                        rows: s.rows as u32,
                        blocks,
                        rows_per_block: rows_per_block as u32,
                        ..base
                    });
                    (blocks, vec![scan])
                }
                Some(c) => {
                    let blocks = s.rows.div_ceil(c.segment_rows).max(1) as u32;
                    let lists = (Work::Lists, lists_at, u64::from(blocks) * results_bytes);
                    let mut passes = Vec::new();
                    for chunk_start in (0..s.rows.max(1)).step_by(c.chunk_rows) {
                        let chunk_len = (s.rows - chunk_start).min(c.chunk_rows);
                        let scores = (Work::Scores(chunks_so_far % 2), 0, scores_bytes);
                        chunks_so_far += 1;
                        let at = params.len();
                        params.push(Params {
                            rows: s.rows as u32,
                            blocks,
                            rows_per_block: c.segment_rows as u32,
                            chunk_start: chunk_start as u32,
                            chunk_len: chunk_len as u32,
                            chunk_rows: c.chunk_rows as u32,
                            first_block: (chunk_start / c.segment_rows) as u32,
                            ..base
                        });
                        let (tile_rows, tile_probes) = c.shape.gemm_tile();
                        passes.push(Pass {
                            kernel: Kernel::Gemm,
                            params: at,
                            groups: (
                                (padded / tile_probes as usize) as u32,
                                chunk_len.div_ceil(tile_rows as usize).max(1) as u32,
                            ),
                            input: lists,
                            output: scores,
                        });
                        passes.push(Pass {
                            kernel: Kernel::Select,
                            params: at,
                            groups: (chunk_len.div_ceil(c.segment_rows).max(1) as u32, count as u32),
                            input: lists,
                            output: scores,
                        });
                    }
                    (blocks, passes)
                }
            };
            let mut input = scan[0].input;
            lists_at += align(input.2);
            // The merge tree: `fan` lists into one per level, at least one level (it
            // writes the shard's results).
            let mut levels = Vec::new();
            let mut lists = blocks;
            loop {
                let out_lists = lists.div_ceil(fan as u32);
                let out_bytes = u64::from(out_lists) * results_bytes;
                let output = if out_lists == 1 {
                    best
                } else {
                    let at = lists_at;
                    lists_at += align(out_bytes);
                    (Work::Lists, at, out_bytes)
                };
                levels.push(Pass {
                    kernel: Kernel::Merge,
                    params: params.len(),
                    groups: (out_lists, merge_tiles),
                    input,
                    output,
                });
                params.push(Params {
                    lists,
                    fan: fan as u32,
                    out_lists,
                    ..base
                });
                if out_lists == 1 {
                    break;
                }
                input = output;
                lists = out_lists;
            }
            shards.push(ShardPlan {
                shard: i,
                first_row: s.first_row,
                rows: s.rows as u32,
                scan,
                levels,
                best_at,
            });
        }
        Plan {
            workgroup: shape.workgroup(),
            first,
            count,
            keep: keep as u32,
            results_bytes,
            best_bytes: resident.shards.len() as u64 * align(results_bytes),
            shards,
            params,
            probe_bytes,
            scale_bytes,
            lists_bytes: lists_at,
            scores_bytes,
            path: if chunking.is_some_and(|c| c.shape.cooperative) {
                "two-stage, tensor cores"
            } else if chunking.is_some() {
                "two-stage"
            } else if shape.cooperative {
                "tensor cores"
            } else {
                "fused"
            },
        }
    }

    fn readback_bytes(&self) -> u64 {
        self.best_bytes + 8 * u64::from(QUERIES)
    }
}

/// The buffers of one search in flight, kept in a pool and grown (to powers of two)
/// when a batch needs more: never made per search.
struct Scratch {
    /// Unique among the scratch sets this process made.
    id: u64,
    /// Changes whenever one of its buffers is replaced.
    generation: u64,
    probes: Option<wgpu::Buffer>,
    scales: Option<wgpu::Buffer>,
    lists: Option<wgpu::Buffer>,
    best: Option<wgpu::Buffer>,
    /// The two-stage path's score buffers, used by alternate chunks.
    scores: [Option<wgpu::Buffer>; 2],
    params: Option<wgpu::Buffer>,
    readback: Option<wgpu::Buffer>,
    /// Timestamp queries (when the device has them) and where they are resolved.
    queries: Option<(wgpu::QuerySet, wgpu::Buffer)>,
    /// Bound where a gallery has no row scales (f32, f16).
    no_scales: Option<wgpu::Buffer>,
}

static NEXT_SCRATCH: AtomicU64 = AtomicU64::new(1);

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            id: NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed),
            generation: NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed),
            probes: None,
            scales: None,
            lists: None,
            best: None,
            scores: [None, None],
            params: None,
            readback: None,
            queries: None,
            no_scales: None,
        }
    }
}

/// `slot`'s buffer, replaced by one of at least `size` bytes (a power of two) when
/// it is smaller; a replacement changes the scratch set's generation.
fn ensure(
    ctx: &GpuContext,
    slot: &mut Option<wgpu::Buffer>,
    generation: &mut u64,
    label: &str,
    size: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    if slot.as_ref().is_none_or(|b| b.size() < size) {
        *slot = Some(ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(BINDING_ALIGN).next_power_of_two(),
            usage,
            mapped_at_creation: false,
        }));
        *generation = NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed);
    }
    slot.clone().expect("just ensured")
}

/// A submitted batch waiting for its results.
struct Pending {
    scratch: Scratch,
    plan: Plan,
    index: wgpu::SubmissionIndex,
    mapped: Arc<AtomicU8>,
}

/// How long a finished submission's readback may take to be mapped.
const MAP_WAIT: Duration = Duration::from_secs(10);
/// Set by the readback's map callback.
const MAPPED: u8 = 1;
const MAP_FAILED: u8 = 2;

/// Encoding one batch, with the device's lock held.
struct Job<'a> {
    ctx: &'a GpuContext,
    layout: &'a wgpu::BindGroupLayout,
    kernels: &'a Kernels,
    two_stage: Option<&'a TwoStageKernels>,
    groups: &'a mut HashMap<GroupKey, wgpu::BindGroup>,
    resident: &'a ResidentSlab,
    plan: &'a Plan,
    timestamps: bool,
}

/// The scratch set's buffers for one batch.
struct Buffers {
    probes: wgpu::Buffer,
    scales: wgpu::Buffer,
    lists: wgpu::Buffer,
    best: wgpu::Buffer,
    scores: Vec<wgpu::Buffer>,
    params: wgpu::Buffer,
    no_scales: wgpu::Buffer,
}

impl Buffers {
    fn work(&self, work: Work) -> &wgpu::Buffer {
        match work {
            Work::Lists => &self.lists,
            Work::Best => &self.best,
            Work::Scores(i) => &self.scores[i],
        }
    }
}

impl Job<'_> {
    fn encode_and_submit(&mut self, scratch: &mut Scratch) -> (wgpu::SubmissionIndex, Arc<AtomicU8>) {
        let ctx = self.ctx;
        let plan = self.plan;
        use wgpu::BufferUsages as U;
        let g = &mut scratch.generation;
        let buffers = Buffers {
            probes: ensure(
                ctx,
                &mut scratch.probes,
                g,
                "probes",
                plan.probe_bytes.len() as u64,
                U::STORAGE | U::COPY_DST,
            ),
            scales: ensure(
                ctx,
                &mut scratch.scales,
                g,
                "probe scales",
                plan.scale_bytes.len() as u64,
                U::STORAGE | U::COPY_DST,
            ),
            lists: ensure(
                ctx,
                &mut scratch.lists,
                g,
                "candidate lists",
                plan.lists_bytes,
                U::STORAGE,
            ),
            best: ensure(
                ctx,
                &mut scratch.best,
                g,
                "results",
                plan.best_bytes,
                U::STORAGE | U::COPY_SRC,
            ),
            params: ensure(
                ctx,
                &mut scratch.params,
                g,
                "params",
                plan.params.len() as u64 * BINDING_ALIGN,
                U::UNIFORM | U::COPY_DST,
            ),
            scores: if plan.scores_bytes == 0 {
                Vec::new()
            } else {
                let [a, b] = &mut scratch.scores;
                [a, b]
                    .into_iter()
                    .map(|slot| ensure(ctx, slot, g, "scores", plan.scores_bytes, U::STORAGE))
                    .collect()
            },
            no_scales: ensure(ctx, &mut scratch.no_scales, g, "no row scales", 16, U::STORAGE),
        };
        let readback = ensure(
            ctx,
            &mut scratch.readback,
            g,
            "readback",
            plan.readback_bytes(),
            U::MAP_READ | U::COPY_DST,
        );
        ctx.queue.write_buffer(&buffers.probes, 0, &plan.probe_bytes);
        ctx.queue.write_buffer(&buffers.scales, 0, &plan.scale_bytes);
        let mut params = vec![0u8; plan.params.len() * BINDING_ALIGN as usize];
        for (i, p) in plan.params.iter().enumerate() {
            let at = i * BINDING_ALIGN as usize;
            params[at..at + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(p));
        }
        ctx.queue.write_buffer(&buffers.params, 0, &params);
        let queries = self.timestamps.then(|| {
            scratch
                .queries
                .get_or_insert_with(|| {
                    (
                        ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                            label: Some("kernel time"),
                            ty: wgpu::QueryType::Timestamp,
                            count: QUERIES,
                        }),
                        ctx.device.create_buffer(&wgpu::BufferDescriptor {
                            label: Some("kernel time"),
                            size: 8 * u64::from(QUERIES),
                            usage: U::QUERY_RESOLVE | U::COPY_SRC,
                            mapped_at_creation: false,
                        }),
                    )
                })
                .clone()
        });
        let (id, generation) = (scratch.id, scratch.generation);

        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let writes = |begin: u32| {
            queries.as_ref().map(|(set, _)| wgpu::ComputePassTimestampWrites {
                query_set: set,
                beginning_of_pass_write_index: Some(begin),
                end_of_pass_write_index: Some(begin + 1),
            })
        };
        // Poison every shard's results (with the bind group of its last merge level,
        // which writes them).
        {
            let mut cpass = encoder.begin_compute_pass(&Default::default());
            cpass.set_pipeline(&self.kernels.poison);
            let slots = (plan.results_bytes / SLOT_BYTES) as usize;
            let workgroups = slots.div_ceil(plan.workgroup as usize).clamp(1, POISON_WORKGROUPS) as u32;
            for s in &plan.shards {
                let last = s.levels.last().expect("at least one merge level");
                let group = self.group(&buffers, s, last, id, generation);
                cpass.set_bind_group(0, &group, &[params_offset(last)]);
                cpass.dispatch_workgroups(workgroups, 1, 1);
            }
        }
        {
            let mut cpass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("scan"),
                timestamp_writes: writes(0),
            });
            let mut current = None;
            for s in &plan.shards {
                for pass in &s.scan {
                    if current != Some(pass.kernel) {
                        cpass.set_pipeline(self.pipeline(pass.kernel));
                        current = Some(pass.kernel);
                    }
                    let group = self.group(&buffers, s, pass, id, generation);
                    cpass.set_bind_group(0, &group, &[params_offset(pass)]);
                    cpass.dispatch_workgroups(pass.groups.0, pass.groups.1, 1);
                }
            }
        }
        {
            let mut cpass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("merge"),
                timestamp_writes: writes(2),
            });
            cpass.set_pipeline(&self.kernels.merge);
            let depth = plan.shards.iter().map(|s| s.levels.len()).max().unwrap_or(0);
            for level in 0..depth {
                for s in &plan.shards {
                    if let Some(pass) = s.levels.get(level) {
                        let group = self.group(&buffers, s, pass, id, generation);
                        cpass.set_bind_group(0, &group, &[params_offset(pass)]);
                        cpass.dispatch_workgroups(pass.groups.0, pass.groups.1, 1);
                    }
                }
            }
        }
        encoder.copy_buffer_to_buffer(&buffers.best, 0, &readback, 0, plan.best_bytes);
        if let Some((set, resolve)) = &queries {
            encoder.resolve_query_set(set, 0..QUERIES, resolve, 0);
            encoder.copy_buffer_to_buffer(resolve, 0, &readback, plan.best_bytes, 8 * u64::from(QUERIES));
        }
        let index = ctx.queue.submit([encoder.finish()]);
        let mapped = Arc::new(AtomicU8::new(0));
        let flag = mapped.clone();
        readback.map_async(wgpu::MapMode::Read, ..plan.readback_bytes(), move |r| {
            flag.store(if r.is_ok() { MAPPED } else { MAP_FAILED }, Ordering::SeqCst);
        });
        (index, mapped)
    }

    fn pipeline(&self, kernel: Kernel) -> &wgpu::ComputePipeline {
        let two_stage = || self.two_stage.expect("a two-stage plan has its kernels");
        match kernel {
            Kernel::Scan => &self.kernels.scan,
            Kernel::Merge => &self.kernels.merge,
            Kernel::Gemm => &two_stage().gemm,
            Kernel::Select => &two_stage().select,
        }
    }

    /// The bind group of one pass over one shard, made once and cached.
    fn group(
        &mut self,
        buffers: &Buffers,
        s: &ShardPlan,
        pass: &Pass,
        scratch: u64,
        generation: u64,
    ) -> wgpu::BindGroup {
        let shard: &Shard = &self.resident.shards[s.shard];
        let key = GroupKey {
            shard: shard.id,
            scratch,
            generation,
            input: pass.input,
            output: pass.output,
        };
        if let Some(g) = self.groups.get(&key) {
            return g.clone();
        }
        fn region(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
            wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer,
                offset,
                size: std::num::NonZeroU64::new(size),
            })
        }
        let resources = [
            region(&buffers.params, 0, std::mem::size_of::<Params>() as u64),
            shard.gallery.as_entire_binding(),
            shard.keys.as_entire_binding(),
            shard.scales.as_ref().unwrap_or(&buffers.no_scales).as_entire_binding(),
            buffers.probes.as_entire_binding(),
            buffers.scales.as_entire_binding(),
            region(buffers.work(pass.input.0), pass.input.1, pass.input.2),
            region(buffers.work(pass.output.0), pass.output.1, pass.output.2),
        ];
        let entries: Vec<wgpu::BindGroupEntry> = resources
            .into_iter()
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource,
            })
            .collect();
        let group = self.ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("biogate search"),
            layout: self.layout,
            entries: &entries,
        });
        self.groups.insert(key, group.clone());
        group
    }
}

/// The power of two that brings `largest` (a probe's largest magnitude) into
/// [2^14, 2^15), where an f16 has room to spare (1 for a zero probe).
fn split_scale(largest: f32) -> f32 {
    if !(largest.is_finite() && largest > 0.0) {
        return 1.0;
    }
    let exponent = 14 - largest.log2().floor() as i32;
    2f32.powi(exponent.clamp(-100, 100))
}

/// The dynamic offset of a pass's uniform block.
fn params_offset(pass: &Pass) -> u32 {
    (pass.params as u64 * BINDING_ALIGN) as u32
}

/// (probe within the batch, shard, slot) for every filled slot.
type DispatchRows = Vec<(usize, usize, Slot)>;

/// Validate one shard's result slots (`keep` per probe for `count` probes) and collect
/// the filled ones as (probe, shard, slot). Every slot must have been written (none may
/// still hold [`POISON`]) and name a row of the shard with a finite score.
fn check_slots(
    slots: &[Slot],
    count: usize,
    keep: usize,
    rows: u32,
    first: usize,
    shard: usize,
    out: &mut DispatchRows,
) -> Result<()> {
    for q in 0..count {
        for (i, slot) in slots[q * keep..(q + 1) * keep].iter().enumerate() {
            if slot.row == POISON || slot.key == POISON {
                return Err(Error::gpu(
                    GpuErrorKind::Internal,
                    format!(
                        "the kernels left result slot {i} of probe {} (shard {shard}) unwritten",
                        first + q
                    ),
                ));
            }
            if slot.row == EMPTY {
                continue;
            }
            if slot.row >= rows || !slot.score.is_finite() {
                return Err(Error::gpu(
                    GpuErrorKind::Internal,
                    format!(
                        "the kernels wrote an impossible candidate (row {} of {rows}, score {}) in result slot {i} of probe {} (shard {shard})",
                        slot.row,
                        slot.score,
                        first + q
                    ),
                ));
            }
            out.push((q, shard, *slot));
        }
    }
    Ok(())
}

/// Probes `first..first + count` as the kernels read them, padded to `padded` probes
/// with zeros: (probe words, vec4s per probe, probe scales). `word_major` (the GEMM's
/// layout) puts word w of every probe together: probe p's word w at w * padded + p.
/// `split` (f16 on the tensor cores, gemm_coop.wgsl) makes each float probe's scale the
/// power of two 2^s that brings its largest entry into [2^14, 2^15).
fn encode_probes(
    probes: &EncodedProbes,
    first: usize,
    count: usize,
    padded: usize,
    word_major: bool,
    split: bool,
) -> (Vec<u8>, u32, Vec<u8>) {
    let len = probes.len;
    let mut scales = vec![0.0f32; padded];
    scales[..count].copy_from_slice(&probes.scales[first..first + count]);
    if split {
        for (q, scale) in scales.iter_mut().enumerate() {
            let row = (q < count).then(|| &probes.values[(first + q) * len..(first + q + 1) * len]);
            let largest = row.map_or(0.0, |r| r.iter().fold(0.0f32, |m, v| m.max(v.abs())));
            *scale = split_scale(largest);
        }
    }
    let (bytes, per_word): (Vec<u8>, usize) = match probes.dtype {
        Dtype::F32 | Dtype::F16 => {
            let mut values = vec![0.0f32; padded * len];
            values[..count * len].copy_from_slice(&probes.values[first * len..(first + count) * len]);
            (bytemuck::cast_slice(&values).to_vec(), 4)
        }
        Dtype::I8 => {
            let mut values = vec![0i8; padded * len];
            for (dst, &src) in values
                .iter_mut()
                .zip(&probes.quantized[first * len..(first + count) * len])
            {
                *dst = src as i8;
            }
            (bytemuck::cast_slice(&values).to_vec(), 16)
        }
    };
    let words = len / per_word;
    let bytes = if word_major {
        let mut out = vec![0u8; bytes.len()];
        for p in 0..padded {
            for w in 0..words {
                let from = (p * words + w) * 16;
                let to = (w * padded + p) * 16;
                out[to..to + 16].copy_from_slice(&bytes[from..from + 16]);
            }
        }
        out
    } else {
        bytes
    };
    (bytes, words as u32, bytemuck::cast_slice(&scales).to_vec())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(score: f32, row: u32) -> Slot {
        Slot { score, key: row, row }
    }

    #[test]
    fn an_unwritten_slot_is_reported_with_its_probe_and_slot() {
        let mut slots = vec![slot(0.5, 1), slot(0.25, 0), slot(f32::MIN, EMPTY), slot(0.1, 2)];
        let mut out = Vec::new();
        check_slots(&slots, 2, 2, 3, 0, 0, &mut out).unwrap();
        assert_eq!(out.len(), 3, "the empty slot is skipped");
        slots[3] = Slot {
            score: 0.0,
            key: POISON,
            row: POISON,
        };
        let e = check_slots(&slots, 2, 2, 3, 10, 4, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("slot 1 of probe 11 (shard 4) unwritten"), "{e}");
        slots[3] = slot(0.3, 7);
        let e = check_slots(&slots, 2, 2, 3, 0, 0, &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 7 of 3"), "{e}");
        slots[3] = slot(f32::NAN, 1);
        assert!(check_slots(&slots, 2, 2, 3, 0, 0, &mut Vec::new()).is_err());
    }
}
