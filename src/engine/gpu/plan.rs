//! How one batch is cut: which passes run over each shard (the fused scan, or the
//! two-stage chunks of a GEMM and a selection, then the merge tree), their uniform
//! blocks and workgroups, the regions of the work buffers they bind, and the probes as
//! the kernels read them.

use super::*;

/// Workgroups a scan aims for on a GPU (enough to fill a large one several times
/// over); on a CPU adapter (lavapipe) a few per core, as more only add overhead.
pub(super) const TARGET_WORKGROUPS: usize = 4096;

pub(super) const TARGET_WORKGROUPS_PER_CPU_CORE: usize = 4;

/// Most rows a scan block covers on a software adapter (lavapipe). lavapipe (Mesa 22.3,
/// LLVM 15) loses results in workgroups that run long: with blocks of 12,544 rows it
/// dropped candidates, and a workgroup writing its ten results wrote the first only.
/// The old one-row-per-invocation kernel did the same with padded batches, so it is
/// not the new kernels' logic; short blocks keep lavapipe exact (`bench --check` and
/// tests/gpu.rs), and the merge tree takes the extra blocks.
pub(super) const SOFTWARE_MAX_ROWS_PER_BLOCK: usize = 2048;

/// Fewest rows a scan block covers, per probe of its tile. Each block starts its
/// selection with no bar and sorts often until the bar rises, so a wider tile (more
/// probes sorting) wants longer blocks. Measured on an H100 (BENCHMARKS.md, "block
/// sweep"): at 1M x 512 the best of 256 / 1,024 / 4,096 / 16,384 rows per block was
/// 256 for one-probe tiles and 4,096 for 16-probe tiles, as this gives; 32-probe
/// tiles (8,192 here) measured best at 16,384 of those four (not 8,192 itself).
pub(super) const MIN_ROWS_PER_BLOCK_PER_PROBE: usize = 256;

/// Bytes of per-block lists one submission may write (all shards together).
pub(super) const MAX_LIST_BYTES: u64 = 256 << 20;

/// Candidates one merge workgroup folds (its fan-in is this over `keep`).
pub(super) const MERGE_CANDIDATES: usize = 512;

/// Bytes per candidate slot (score, key, row).
pub(super) const SLOT_BYTES: u64 = 12;

/// Offsets of bindings into shared buffers must be multiples of this.
pub(super) const BINDING_ALIGN: u64 = 256;

/// Timestamps per submission: scan start and end, merge start and end.
pub(super) const QUERIES: u32 = 4;

/// Bytes of one chunk's score buffer on the two-stage path (two are used in turn).
pub(super) const CHUNK_BYTES: u64 = 128 << 20;

/// Rows each selection workgroup of the two-stage path reduces: on a GPU, and at most
/// on a software adapter (which loses results in workgroups that run long).
pub(super) const SELECT_ROWS: usize = 8192;

pub(super) const SOFTWARE_SELECT_ROWS: usize = 2048;
/// Most rows one selection segment may be asked to cover (`BIOGATE_GPU_SELECT_ROWS`).
pub(super) const MAX_SELECT_ROWS: usize = 1 << 24;

/// A work buffer of a scratch set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Work {
    /// The candidate lists of scan blocks and merge levels.
    Lists,
    /// Every shard's results (copied to the readback buffer).
    Best,
    /// One of the two-stage path's two score buffers.
    Scores(usize),
}

/// Where a binding points: a buffer, an offset and a size in bytes.
pub(super) type Region = (Work, u64, u64);

/// Which kernel a dispatch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    Scan,
    Gemm,
    Select,
    Merge,
}

/// The uniform block of one dispatch (layout.wgsl `Params`).
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct Params {
    pub(super) rows: u32,
    pub(super) row_vec4s: u32,
    pub(super) probe_vec4s: u32,
    pub(super) keep: u32,
    pub(super) blocks: u32,
    pub(super) rows_per_block: u32,
    pub(super) floor: f32,
    pub(super) lists: u32,
    pub(super) fan: u32,
    pub(super) out_lists: u32,
    pub(super) chunk_start: u32,
    pub(super) chunk_len: u32,
    pub(super) chunk_rows: u32,
    pub(super) first_block: u32,
    pub(super) probes_padded: u32,
    pub(super) pad: [u32; 3],
}

/// One batch of probes against every shard: how the work is cut and where each part's
/// lists go. Offsets are bytes into the scratch set's buffers.
pub(super) struct Plan {
    /// Invocations per workgroup of the shape's kernels.
    pub(super) workgroup: u32,
    pub(super) first: usize,
    pub(super) count: usize,
    pub(super) keep: u32,
    /// Bytes of one probe batch's results (keep slots per padded probe).
    pub(super) results_bytes: u64,
    pub(super) shards: Vec<ShardPlan>,
    /// Uniform blocks, one per dispatch, BINDING_ALIGN apart.
    pub(super) params: Vec<Params>,
    pub(super) probe_bytes: Vec<u8>,
    pub(super) scale_bytes: Vec<u8>,
    pub(super) lists_bytes: u64,
    pub(super) best_bytes: u64,
    /// Bytes of each score buffer of the two-stage path (0 on the fused path).
    pub(super) scores_bytes: u64,
    /// Which kernels search it (KernelTimes::path).
    pub(super) path: &'static str,
}

pub(super) struct ShardPlan {
    pub(super) shard: usize,
    pub(super) first_row: usize,
    pub(super) rows: u32,
    /// The fused scan, or each chunk's GEMM and selection: every block's list.
    pub(super) scan: Vec<Pass>,
    pub(super) levels: Vec<Pass>,
    /// Offset of its results in the `best` buffer.
    pub(super) best_at: u64,
}

/// One dispatch: its kernel, its uniform block, its workgroups, and the regions bound
/// as `lists_in` (binding 6) and `lists_out` or `scores` (binding 7).
pub(super) struct Pass {
    pub(super) kernel: Kernel,
    pub(super) params: usize,
    pub(super) groups: (u32, u32),
    pub(super) input: Region,
    pub(super) output: Region,
}

pub(super) fn align(bytes: u64) -> u64 {
    bytes.div_ceil(BINDING_ALIGN) * BINDING_ALIGN
}

/// How the two-stage path cuts a shard: rows per selection segment and per chunk.
#[derive(Clone, Copy, Debug)]
pub(super) struct Chunking {
    pub(super) shape: TwoStageShape,
    pub(super) segment_rows: usize,
    pub(super) chunk_rows: usize,
}

impl Chunking {
    /// Segments of the options' length (at most `SOFTWARE_SELECT_ROWS` on a software
    /// adapter, and long enough that a shard's lists fit `max_blocks`), as many per
    /// chunk as the chunk's score buffer holds for `padded` probes (within the largest
    /// power of two a binding takes, as scratch buffers are grown to powers of two) and
    /// a GEMM dispatch's grid takes (`max_groups` row tiles); `None` when not even one
    /// segment fits (the fused scan takes the batch).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        options: &GpuOptions,
        resident: &ResidentSlab,
        software: bool,
        shape: TwoStageShape,
        padded: usize,
        max_blocks: usize,
        binding_limit: u64,
        max_groups: u32,
    ) -> Option<Chunking> {
        let most_rows = resident.shards.iter().map(|s| s.rows).max().unwrap_or(1).max(1);
        let mut wanted = options.select_rows.unwrap_or(SELECT_ROWS).clamp(1, MAX_SELECT_ROWS);
        if software {
            wanted = wanted.min(SOFTWARE_SELECT_ROWS);
        }
        let unit = TWO_STAGE_WORKGROUP as usize;
        let segment_rows = wanted.max(most_rows.div_ceil(max_blocks.max(1))).div_ceil(unit) * unit;
        let grid_rows = shape.gemm_tile().0 as usize * max_groups as usize;
        if segment_rows > grid_rows {
            return None;
        }
        let score_row_bytes = padded as u64 * 4;
        let largest_buffer = 1u64 << (63 - binding_limit.max(1).leading_zeros());
        let chunk_bytes = options.chunk_bytes.unwrap_or(CHUNK_BYTES).min(largest_buffer);
        let segments_per_chunk = ((chunk_bytes / score_row_bytes) as usize / segment_rows)
            .max(1)
            .min(most_rows.div_ceil(segment_rows))
            .min(grid_rows / segment_rows);
        let chunk_rows = segments_per_chunk * segment_rows;
        ((chunk_rows as u64 * score_row_bytes).next_power_of_two() <= binding_limit).then_some(Chunking {
            shape,
            segment_rows,
            chunk_rows,
        })
    }
}

impl Plan {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
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
                ctx.limits.max_compute_workgroups_per_dimension,
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

    pub(super) fn readback_bytes(&self) -> u64 {
        self.best_bytes + 8 * u64::from(QUERIES)
    }
}

/// The power of two that brings `largest` (a probe's largest magnitude) into
/// [2^14, 2^15), where an f16 has room to spare (1 for a zero probe).
pub(super) fn split_scale(largest: f32) -> f32 {
    if !(largest.is_finite() && largest > 0.0) {
        return 1.0;
    }
    let exponent = 14 - largest.log2().floor() as i32;
    2f32.powi(exponent.clamp(-100, 100))
}

/// Probes `first..first + count` as the kernels read them, padded to `padded` probes
/// with zeros: (probe words, vec4s per probe, probe scales). `word_major` (the GEMM's
/// layout) puts word w of every probe together: probe p's word w at w * padded + p.
/// `split` (f16 on the tensor cores, gemm_coop.wgsl) makes each float probe's scale the
/// power of two 2^s that brings its largest entry into [2^14, 2^15).
pub(super) fn encode_probes(
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
