//! One opened device and what lives on it: the resident galleries, the pipeline layout,
//! the compiled kernels per shape, cached bind groups and the scratch pool; a search cut
//! into submissions, each planned (plan.rs), encoded (encode.rs) and collected
//! (readback.rs) here.

use super::*;

/// Probes sent to the GPU in one submission.
pub(super) const MAX_PROBES_PER_DISPATCH: usize = 4096;

/// Submissions of one search in flight at once.
pub(super) const IN_FLIGHT: usize = 2;

/// Scratch sets kept for reuse.
pub(super) const POOLED: usize = 4;

/// Bind groups cached before the cache is cleared.
pub(super) const CACHED_GROUPS: usize = 1024;

/// Fewest probes a batch needs for the two-stage path when the pipeline is `auto`.
pub(super) const GEMM_MIN_BATCH: usize = 64;

/// One opened device and what lives on it.
pub struct Device {
    pub(super) ctx: GpuContext,
    pub(super) options: GpuOptions,
    pub(super) state: Mutex<State>,
    pub(super) pool: Mutex<Vec<Scratch>>,
    pub(super) last_times: Mutex<Option<KernelTimes>>,
}

impl std::ops::Deref for Device {
    type Target = GpuContext;
    fn deref(&self) -> &GpuContext {
        &self.ctx
    }
}

pub(super) struct State {
    pub(super) residency: Residency,
    pub(super) layout: wgpu::BindGroupLayout,
    pub(super) pipeline_layout: wgpu::PipelineLayout,
    pub(super) kernels: HashMap<KernelShape, Kernels>,
    pub(super) two_stage: HashMap<TwoStageShape, TwoStageKernels>,
    pub(super) groups: HashMap<GroupKey, wgpu::BindGroup>,
    /// `Residency::changes` when `groups` was last pruned.
    pub(super) groups_seen: u64,
}

pub(super) struct Kernels {
    pub(super) scan: wgpu::ComputePipeline,
    pub(super) merge: wgpu::ComputePipeline,
    pub(super) poison: wgpu::ComputePipeline,
}

/// The two-stage path's kernels (two_stage.wgsl).
pub(super) struct TwoStageKernels {
    pub(super) gemm: wgpu::ComputePipeline,
    pub(super) select: wgpu::ComputePipeline,
}

impl Device {
    pub(super) fn on(ctx: GpuContext, options: &GpuOptions) -> Result<Device> {
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn has_timestamps(&self) -> bool {
        self.ctx.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Search one slab here, or on the CPU when the GPU cannot take it (an older
    /// version of the log than the one resident, or more rows to keep per probe than
    /// workgroup memory holds).
    pub(super) fn search(
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
                *self.last_times.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
    pub(super) fn submit(
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
    pub(super) fn collect(
        &self,
        p: Pending,
        slab: &Slab<'_>,
        tops: &mut [TopSubjects],
        times: &mut KernelTimes,
    ) -> Result<()> {
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
    pub(super) fn discard(&self, p: Pending) {
        if self.ctx.wait_for(p.index.clone()).is_ok() && self.mapped(&p) {
            if let Some(r) = &p.scratch.readback {
                r.unmap();
            }
            self.give_back(p.scratch);
        }
    }

    /// Whether a finished submission's readback is mapped (another thread's poll may
    /// be the one running its callback: wait for that a while).
    pub(super) fn mapped(&self, p: &Pending) -> bool {
        let deadline = std::time::Instant::now() + MAP_WAIT;
        while p.mapped.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            let _ = self.ctx.device.poll(wgpu::PollType::Poll);
            std::thread::yield_now();
        }
        p.mapped.load(Ordering::SeqCst) == MAPPED
    }

    pub(super) fn give_back(&self, scratch: Scratch) {
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
pub(super) fn pipelines<const N: usize>(
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

pub(super) fn build_kernels(
    ctx: &GpuContext,
    layout: &wgpu::PipelineLayout,
    shape: &KernelShape,
    checks: bool,
) -> Kernels {
    let [scan, merge, poison] = pipelines(ctx, layout, shape.source(), ["scan", "merge", "poison"], checks);
    Kernels { scan, merge, poison }
}

pub(super) fn build_two_stage_kernels(
    ctx: &GpuContext,
    layout: &wgpu::PipelineLayout,
    shape: &TwoStageShape,
    checks: bool,
) -> TwoStageKernels {
    let [gemm, select] = pipelines(ctx, layout, shape.source(), ["gemm", "select_scores"], checks);
    TwoStageKernels { gemm, select }
}
