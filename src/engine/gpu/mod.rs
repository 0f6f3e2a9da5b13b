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
//! 3. Per shard, `scan` scores rows by blocks and keeps each probe's best `keep` per
//!    block in workgroup memory; `merge` reduces the blocks to `keep` per probe.
//! 4. One readback of every shard's `best`, checked slot by slot (poisoned beforehand:
//!    a slot the kernels did not write is an error naming the probe and rank).
//! 5. [`TopSubjects`] folds the rows into distinct subjects, as the CPU engine does.

pub mod context;
pub mod residency;
pub mod shaders;

use super::cpu::CpuBackend;
use super::topk::{Hit, TopSubjects};
use super::{Backend, EncodedProbes};
use crate::error::{Error, GpuErrorKind, Result};
use crate::gallery::Slab;
use crate::template::Dtype;
use context::GpuContext;
use residency::{Residency, Resident};
use shaders::{KernelShape, WORKGROUP};
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Workgroups a dispatch aims for on a GPU (enough to fill a large one several times
/// over); on a CPU adapter (lavapipe) a few per core, as more only add overhead.
const TARGET_WORKGROUPS: usize = 4096;
const TARGET_WORKGROUPS_PER_CPU_CORE: usize = 4;
/// Fewest rows a workgroup scans (amortises its final selection).
const MIN_ROWS_PER_BLOCK: usize = 4 * WORKGROUP as usize;
/// Probes sent to the GPU in one dispatch.
const MAX_PROBES_PER_DISPATCH: usize = 4096;
/// Bytes of per-block selections one dispatch may write.
const MAX_BLOCK_BYTES: u64 = 256 << 20;
/// Written into the result slots before a search; no kernel writes it.
const POISON: u32 = 0xDEAD_BEEF;
/// The row of a result slot with no candidate (layout.wgsl `EMPTY`).
const EMPTY: u32 = u32::MAX;
/// Bytes per candidate slot (score, key, row).
const SLOT_BYTES: u64 = 12;
/// Offsets of bindings into shared buffers must be multiples of this.
const BINDING_ALIGN: u64 = 256;

/// Settings for the GPU backend.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Largest shard in bytes (default: the device's storage binding limit). Tests set
    /// it small so that the multi-shard path runs on tiny galleries.
    pub max_shard_bytes: Option<u64>,
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
        Ok(GpuOptions { max_shard_bytes })
    }
}

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
    state: Mutex<State>,
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
    timestamps: Option<Timestamps>,
    last_kernel_time: Option<Duration>,
}

struct Kernels {
    scan: wgpu::ComputePipeline,
    merge: wgpu::ComputePipeline,
}

struct Timestamps {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
}

/// One shard's work in a dispatch.
struct ShardPlan {
    shard: usize,
    rows: u32,
    blocks: u32,
    rows_per_block: u32,
    /// Offset of its results in the `best` buffer.
    offset: u64,
}

impl GpuBackend {
    /// The GPU the environment selects (see [`context`]); `Ok(None)` when there is none.
    pub fn open(options: GpuOptions) -> Result<Option<GpuBackend>> {
        let Some(ctx) = GpuContext::open()? else {
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

    /// GPU time of the last search's kernels (needs TIMESTAMP_QUERY).
    pub fn last_kernel_time(&self) -> Option<Duration> {
        self.device().lock().last_kernel_time
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
        let ctx = GpuContext::open()?.ok_or_else(|| {
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
        let (layout, pipeline_layout, timestamps) = ctx.checked("creating the pipeline layout", || {
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
                    has_dynamic_offset: false,
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
            let timestamps = ctx
                .features
                .contains(wgpu::Features::TIMESTAMP_QUERY)
                .then(|| Timestamps {
                    set: ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
                        label: Some("kernel time"),
                        ty: wgpu::QueryType::Timestamp,
                        count: 2,
                    }),
                    resolve: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                        label: Some("kernel time"),
                        size: 16,
                        usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                        mapped_at_creation: false,
                    }),
                });
            (layout, pipeline_layout, timestamps)
        })?;
        Ok(Device {
            state: Mutex::new(State {
                residency: Residency::new(shard_bytes),
                layout,
                pipeline_layout,
                kernels: HashMap::new(),
                timestamps,
                last_kernel_time: None,
            }),
            ctx,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Search one slab; `None` when the GPU cannot take it (see the callers).
    fn search_on_gpu(
        &self,
        state: &mut State,
        slab: &Slab<'_>,
        probes: &EncodedProbes,
        k: usize,
        floor: f32,
    ) -> Result<Option<Vec<Vec<Hit>>>> {
        let State {
            residency,
            layout,
            pipeline_layout,
            kernels,
            timestamps,
            last_kernel_time,
        } = state;
        let resident = match residency.sync(&self.ctx, slab)? {
            Resident::Ready(r) => r,
            Resident::Stale => {
                tracing::debug!("GPU holds a newer version of the log's rows: scoring this one on the CPU");
                return Ok(None);
            }
        };
        let keep = ((k - 1) * resident.max_rows_per_subject + 1).min(slab.rows());
        let workgroup_limit = self.ctx.limits.max_compute_workgroup_storage_size;
        let Some(shape) = KernelShape::choose(slab.dtype(), probes.count, keep, workgroup_limit) else {
            tracing::debug!(
                keep,
                "too many rows per subject to select on the GPU: scoring this slab on the CPU"
            );
            return Ok(None);
        };
        let kernels = match kernels.entry(shape) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => v.insert(self.ctx.checked("compiling the kernels", || {
                build_kernels(&self.ctx, pipeline_layout, &shape)
            })?),
        };
        let mut tops: Vec<TopSubjects> = vec![TopSubjects::new(k, floor); probes.count];
        let mut kernel_time = Duration::ZERO;
        for first in (0..probes.count).step_by(MAX_PROBES_PER_DISPATCH) {
            let count = (probes.count - first).min(MAX_PROBES_PER_DISPATCH);
            let dispatch = Dispatch {
                ctx: &self.ctx,
                layout,
                kernels,
                timestamps: timestamps.as_ref(),
                shape,
                keep: keep as u32,
                floor,
            };
            let (rows, time) = dispatch.run(resident, probes, first, count)?;
            kernel_time += time.unwrap_or_default();
            for (q, shard, c) in rows {
                let global = resident.shards[shard].first_row + c.row as usize;
                let ordinal = slab.row_subjects()[global];
                tops[first + q].offer(c.score, ordinal, slab.rank(ordinal));
            }
        }
        *last_kernel_time = timestamps.as_ref().map(|_| kernel_time);
        Ok(Some(tops.into_iter().map(TopSubjects::into_sorted).collect()))
    }
}

fn build_kernels(ctx: &GpuContext, layout: &wgpu::PipelineLayout, shape: &KernelShape) -> Kernels {
    let source = shape.source();
    let module = ctx.device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("biogate search"),
        source: wgpu::ShaderSource::Wgsl(source.into()),
    });
    let pipeline = |entry: &str| {
        ctx.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: Some(layout),
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    };
    Kernels {
        scan: pipeline("scan"),
        merge: pipeline("merge"),
    }
}

/// A selected row as the kernels write it.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Slot {
    score: f32,
    key: u32,
    row: u32,
}

/// The uniform block of one shard's dispatch (layout.wgsl `Params`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    row_vec4s: u32,
    probe_vec4s: u32,
    keep: u32,
    blocks: u32,
    rows_per_block: u32,
    floor: f32,
    pad: u32,
}

/// One batch of probes against every shard of a resident slab.
struct Dispatch<'a> {
    ctx: &'a GpuContext,
    layout: &'a wgpu::BindGroupLayout,
    kernels: &'a Kernels,
    timestamps: Option<&'a Timestamps>,
    shape: KernelShape,
    keep: u32,
    floor: f32,
}

/// (probe within the dispatch, shard, slot) for every filled slot.
type DispatchRows = Vec<(usize, usize, Slot)>;

impl Dispatch<'_> {
    fn run(
        &self,
        resident: &residency::ResidentSlab,
        probes: &EncodedProbes,
        first: usize,
        count: usize,
    ) -> Result<(DispatchRows, Option<Duration>)> {
        let ctx = self.ctx;
        let tile = self.shape.probe_tile as usize;
        let padded = count.div_ceil(tile) * tile;
        let tiles = (padded / tile) as u32;
        let keep = self.keep as usize;
        let (probe_bytes, probe_vec4s, scale_bytes) = encode_probes(probes, first, count, padded);
        let row_vec4s = (resident.stride / 16) as u32;
        let target_workgroups = if ctx.info.device_type == wgpu::DeviceType::Cpu {
            TARGET_WORKGROUPS_PER_CPU_CORE * std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            TARGET_WORKGROUPS
        };

        // Plan the shards: blocks per shard and where each one's results go.
        let results_bytes = (padded * keep) as u64 * SLOT_BYTES;
        let region = results_bytes.div_ceil(BINDING_ALIGN) * BINDING_ALIGN;
        let binding_limit = ctx.limits.max_storage_buffer_binding_size;
        let max_blocks_by_memory =
            ((MAX_BLOCK_BYTES.min(binding_limit) / results_bytes).max(1) as usize).min(u16::MAX as usize);
        let plans: Vec<ShardPlan> = resident
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let wanted = target_workgroups.div_ceil(tiles as usize);
                let blocks = wanted
                    .min(s.rows.div_ceil(MIN_ROWS_PER_BLOCK))
                    .min(max_blocks_by_memory)
                    .max(1);
                let rows_per_block = s.rows.div_ceil(blocks).div_ceil(WORKGROUP as usize) * WORKGROUP as usize;
                ShardPlan {
                    shard: i,
                    rows: s.rows as u32,
                    blocks: s.rows.div_ceil(rows_per_block) as u32,
                    rows_per_block: rows_per_block as u32,
                    offset: i as u64 * region,
                }
            })
            .collect();
        let most_blocks = plans.iter().map(|p| p.blocks as u64).max().unwrap_or(1);

        let run = || -> wgpu::Buffer {
            let device = &ctx.device;
            let buffer = |label: &str, size: u64, usage: wgpu::BufferUsages| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: size.max(16),
                    usage,
                    mapped_at_creation: false,
                })
            };
            use wgpu::BufferUsages as U;
            let probe_buf = buffer("probes", probe_bytes.len() as u64, U::STORAGE | U::COPY_DST);
            ctx.queue.write_buffer(&probe_buf, 0, &probe_bytes);
            let scale_buf = buffer("probe scales", scale_bytes.len() as u64, U::STORAGE | U::COPY_DST);
            ctx.queue.write_buffer(&scale_buf, 0, &scale_bytes);
            let no_scales = buffer("no row scales", 16, U::STORAGE);
            let block_buf = buffer("block selections", most_blocks * results_bytes, U::STORAGE);
            let best_size = plans.len() as u64 * region;
            let best_buf = buffer("best rows", best_size, U::STORAGE | U::COPY_DST | U::COPY_SRC);
            ctx.queue.write_buffer(
                &best_buf,
                0,
                bytemuck::cast_slice(&vec![POISON; (best_size / 4) as usize]),
            );
            let params_buf = buffer("params", plans.len() as u64 * BINDING_ALIGN, U::UNIFORM | U::COPY_DST);
            let readback = buffer(
                "readback",
                best_size + if self.timestamps.is_some() { 16 } else { 0 },
                U::MAP_READ | U::COPY_DST,
            );
            let mut encoder = device.create_command_encoder(&Default::default());
            let passes = plans.len() * 2;
            for (n, plan) in plans.iter().enumerate() {
                let shard = &resident.shards[plan.shard];
                let params = Params {
                    rows: plan.rows,
                    row_vec4s,
                    probe_vec4s,
                    keep: self.keep,
                    blocks: plan.blocks,
                    rows_per_block: plan.rows_per_block,
                    floor: self.floor.max(f32::MIN),
                    pad: 0,
                };
                let params_at = n as u64 * BINDING_ALIGN;
                ctx.queue
                    .write_buffer(&params_buf, params_at, bytemuck::bytes_of(&params));
                fn binding(buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindingResource<'_> {
                    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer,
                        offset,
                        size: std::num::NonZeroU64::new(size),
                    })
                }
                let entries = [
                    binding(&params_buf, params_at, std::mem::size_of::<Params>() as u64),
                    shard.gallery.as_entire_binding(),
                    shard.keys.as_entire_binding(),
                    shard.scales.as_ref().unwrap_or(&no_scales).as_entire_binding(),
                    probe_buf.as_entire_binding(),
                    scale_buf.as_entire_binding(),
                    binding(&block_buf, 0, plan.blocks as u64 * results_bytes),
                    binding(&best_buf, plan.offset, results_bytes),
                ];
                let entries: Vec<wgpu::BindGroupEntry> = entries
                    .into_iter()
                    .enumerate()
                    .map(|(i, resource)| wgpu::BindGroupEntry {
                        binding: i as u32,
                        resource,
                    })
                    .collect();
                let group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("biogate search"),
                    layout: self.layout,
                    entries: &entries,
                });
                for (pass, pipeline, groups) in [
                    (2 * n, &self.kernels.scan, (plan.blocks, tiles)),
                    (2 * n + 1, &self.kernels.merge, (tiles, 1)),
                ] {
                    let timestamp_writes = self.timestamps.map(|t| wgpu::ComputePassTimestampWrites {
                        query_set: &t.set,
                        beginning_of_pass_write_index: (pass == 0).then_some(0),
                        end_of_pass_write_index: (pass + 1 == passes).then_some(1),
                    });
                    let mut cpass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("biogate search"),
                        timestamp_writes: timestamp_writes.filter(|w| {
                            w.beginning_of_pass_write_index.is_some() || w.end_of_pass_write_index.is_some()
                        }),
                    });
                    cpass.set_pipeline(pipeline);
                    cpass.set_bind_group(0, &group, &[]);
                    cpass.dispatch_workgroups(groups.0, groups.1, 1);
                }
            }
            encoder.copy_buffer_to_buffer(&best_buf, 0, &readback, 0, best_size);
            if let Some(t) = self.timestamps {
                encoder.resolve_query_set(&t.set, 0..2, &t.resolve, 0);
                encoder.copy_buffer_to_buffer(&t.resolve, 0, &readback, best_size, 16);
            }
            ctx.queue.submit([encoder.finish()]);
            readback.map_async(wgpu::MapMode::Read, .., |_| {});
            readback
        };
        let readback = ctx.checked("running the search kernels", run)?;
        ctx.wait()?;
        let bytes = readback
            .get_mapped_range(..)
            .map_err(|e| Error::gpu(GpuErrorKind::Internal, format!("reading the results back: {e}")))?;
        let best_size = plans.len() as u64 * region;
        let mut out = Vec::new();
        for plan in &plans {
            let at = plan.offset as usize;
            let slots: Vec<Slot> = bytemuck::pod_collect_to_vec(&bytes[at..at + results_bytes as usize]);
            check_slots(&slots, count, keep, plan.rows, first, plan.shard, &mut out)?;
        }
        let time = self.timestamps.map(|_| {
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes[best_size as usize..best_size as usize + 16]);
            let ns = ticks[1].saturating_sub(ticks[0]) as f64 * f64::from(ctx.queue.get_timestamp_period());
            Duration::from_nanos(ns as u64)
        });
        drop(bytes);
        readback.unmap();
        Ok((out, time))
    }
}

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
/// with zeros: (probe words, vec4s per probe, probe scales).
fn encode_probes(probes: &EncodedProbes, first: usize, count: usize, padded: usize) -> (Vec<u8>, u32, Vec<u8>) {
    let len = probes.len;
    let mut scales = vec![0.0f32; padded];
    scales[..count].copy_from_slice(&probes.scales[first..first + count]);
    match probes.dtype {
        Dtype::F32 | Dtype::F16 => {
            let mut values = vec![0.0f32; padded * len];
            values[..count * len].copy_from_slice(&probes.values[first * len..(first + count) * len]);
            (
                bytemuck::cast_slice(&values).to_vec(),
                (len / 4) as u32,
                bytemuck::cast_slice(&scales).to_vec(),
            )
        }
        Dtype::I8 => {
            let mut values = vec![0i8; padded * len];
            for (dst, &src) in values
                .iter_mut()
                .zip(&probes.quantized[first * len..(first + count) * len])
            {
                *dst = src as i8;
            }
            (
                bytemuck::cast_slice(&values).to_vec(),
                (len / 16) as u32,
                bytemuck::cast_slice(&scales).to_vec(),
            )
        }
    }
}

impl Device {
    /// Search one slab here, or on the CPU when the GPU cannot take it.
    fn search(
        &self,
        cpu: &CpuBackend,
        slab: &Slab<'_>,
        probes: &EncodedProbes,
        k: usize,
        floor: f32,
    ) -> Result<Vec<Vec<Hit>>> {
        let mut state = self.lock();
        match self.search_on_gpu(&mut state, slab, probes, k, floor)? {
            Some(hits) => Ok(hits),
            None => {
                drop(state);
                cpu.search_slab(slab, probes, k, floor)
            }
        }
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
