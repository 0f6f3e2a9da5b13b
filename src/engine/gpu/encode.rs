//! Encoding one planned batch into one submission: the buffers it needs, the passes in
//! order (poison, scan or GEMM and selection per chunk, merge levels), cached bind
//! groups, the readback copy and its mapping.

use super::*;

/// Most workgroups of the poison pass (each loops over the slots).
pub(super) const POISON_WORKGROUPS: usize = 1024;

/// What a cached bind group binds: a shard, a scratch set as it was (its buffers are
/// replaced when they grow), and the regions of the work buffers. The uniform block is
/// bound with a dynamic offset, so one group serves every pass over the same regions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct GroupKey {
    pub(super) shard: u64,
    pub(super) scratch: u64,
    pub(super) generation: u64,
    pub(super) input: Region,
    pub(super) output: Region,
}

/// Encoding one batch, with the device's lock held.
pub(super) struct Job<'a> {
    pub(super) ctx: &'a GpuContext,
    pub(super) layout: &'a wgpu::BindGroupLayout,
    pub(super) kernels: &'a Kernels,
    pub(super) two_stage: Option<&'a TwoStageKernels>,
    pub(super) groups: &'a mut HashMap<GroupKey, wgpu::BindGroup>,
    pub(super) resident: &'a ResidentSlab,
    pub(super) plan: &'a Plan,
    pub(super) timestamps: bool,
}

/// The scratch set's buffers for one batch.
pub(super) struct Buffers {
    pub(super) probes: wgpu::Buffer,
    pub(super) scales: wgpu::Buffer,
    pub(super) lists: wgpu::Buffer,
    pub(super) best: wgpu::Buffer,
    pub(super) scores: Vec<wgpu::Buffer>,
    pub(super) params: wgpu::Buffer,
    pub(super) no_scales: wgpu::Buffer,
}

impl Buffers {
    pub(super) fn work(&self, work: Work) -> &wgpu::Buffer {
        match work {
            Work::Lists => &self.lists,
            Work::Best => &self.best,
            Work::Scores(i) => &self.scores[i],
        }
    }
}

impl Job<'_> {
    pub(super) fn encode_and_submit(&mut self, scratch: &mut Scratch) -> (wgpu::SubmissionIndex, Arc<AtomicU8>) {
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

    pub(super) fn pipeline(&self, kernel: Kernel) -> &wgpu::ComputePipeline {
        let two_stage = || self.two_stage.expect("a two-stage plan has its kernels");
        match kernel {
            Kernel::Scan => &self.kernels.scan,
            Kernel::Merge => &self.kernels.merge,
            Kernel::Gemm => &two_stage().gemm,
            Kernel::Select => &two_stage().select,
        }
    }

    /// The bind group of one pass over one shard, made once and cached.
    pub(super) fn group(
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

/// The dynamic offset of a pass's uniform block.
pub(super) fn params_offset(pass: &Pass) -> u32 {
    (pass.params as u64 * BINDING_ALIGN) as u32
}
