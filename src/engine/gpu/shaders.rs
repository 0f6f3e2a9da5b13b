//! WGSL sources (shaders/*.wgsl, one concern per file) assembled into one module per
//! storage dtype and kernel shape, and the shape chosen for a search.
//!
//! A module is `prelude + layout + select + score_<dtype> (+ score_float) + scan +
//! merge`; the prelude
//! fixes the shape as constants (probes per workgroup, register blocking, slice of the
//! dimensions staged at a time, candidate slots), so loops over them unroll and arrays
//! live in registers.

use crate::template::Dtype;

const LAYOUT: &str = include_str!("../../../shaders/layout.wgsl");
const SELECT: &str = include_str!("../../../shaders/select.wgsl");
const SCORE_F32: &str = include_str!("../../../shaders/score_f32.wgsl");
const SCORE_F16: &str = include_str!("../../../shaders/score_f16.wgsl");
const SCORE_FLOAT: &str = include_str!("../../../shaders/score_float.wgsl");
const SCORE_I8: &str = include_str!("../../../shaders/score_i8.wgsl");
const SCAN: &str = include_str!("../../../shaders/scan.wgsl");
const SCAN_COOP: &str = include_str!("../../../shaders/scan_coop.wgsl");
const MERGE: &str = include_str!("../../../shaders/merge.wgsl");
const LISTS: &str = include_str!("../../../shaders/lists.wgsl");
const TWO_STAGE: &str = include_str!("../../../shaders/two_stage.wgsl");
const GEMM: &str = include_str!("../../../shaders/gemm.wgsl");
const GEMM_COOP: &str = include_str!("../../../shaders/gemm_coop.wgsl");

/// Invocations per workgroup.
pub const WORKGROUP: u32 = 64;
/// Invocations per workgroup of the cooperative-matrix scan (four subgroups of 32 on
/// NVIDIA; a subgroup takes two output blocks where there are fewer).
pub const COOP_WORKGROUP: u32 = 128;
/// The cooperative-matrix scan's tile: 64 rows x 16 probes, selection rounds of 16 rows.
const COOP_BLOCKING: Blocking = Blocking {
    probe_tile: 16,
    rows_per_inv: 4,
    probes_per_inv: 4,
};
/// Bytes of workgroup memory per candidate slot (score, key, row).
const SLOT_BYTES: u32 = 12;
/// Bytes of one staged word (vec4).
const WORD_BYTES: u32 = 16;
/// Words of the rows staged at a time, largest first (the largest that fits is used;
/// a blocking that stages rows takes at least two, or its barriers would dominate).
const SLICES: [u32; 4] = [8, 4, 2, 1];
const MIN_STAGED_SLICE: u32 = 2;

/// How a workgroup's invocations cover a tile of rows x probes (see scan.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Blocking {
    /// Probes per workgroup.
    pub probe_tile: u32,
    /// Scores each invocation accumulates: rows x probes.
    pub rows_per_inv: u32,
    pub probes_per_inv: u32,
}

/// Blockings, largest first. Batches of one to four probes stream the rows straight
/// from memory (each row read once, four rows in flight per invocation); larger
/// batches stage rows and probes in workgroup memory and reuse each row word for 4 to
/// 8 probes in registers.
pub const BLOCKINGS: [Blocking; 6] = [
    Blocking {
        probe_tile: 32,
        rows_per_inv: 8,
        probes_per_inv: 8,
    },
    Blocking {
        probe_tile: 16,
        rows_per_inv: 4,
        probes_per_inv: 4,
    },
    Blocking {
        probe_tile: 8,
        rows_per_inv: 4,
        probes_per_inv: 4,
    },
    Blocking {
        probe_tile: 4,
        rows_per_inv: 4,
        probes_per_inv: 4,
    },
    Blocking {
        probe_tile: 2,
        rows_per_inv: 4,
        probes_per_inv: 2,
    },
    Blocking {
        probe_tile: 1,
        rows_per_inv: 4,
        probes_per_inv: 1,
    },
];

impl Blocking {
    /// Probe groups: invocations that share a row group.
    fn probe_groups(&self) -> u32 {
        self.probe_tile / self.probes_per_inv
    }

    /// Offers per probe between two checks of the selection: one per row group.
    pub fn round(&self) -> u32 {
        WORKGROUP / self.probe_groups()
    }

    /// Rows per tile.
    pub fn row_tile(&self) -> u32 {
        self.round() * self.rows_per_inv
    }

    /// Rows are staged in workgroup memory when more than one probe group reads them.
    fn stage_rows(&self) -> bool {
        self.probe_groups() > 1
    }
}

/// The compile-time shape of a kernel module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelShape {
    pub dtype: Dtype,
    pub blocking: Blocking,
    /// Candidate slots per probe in workgroup memory: a power of two >= keep + round.
    pub cap: u32,
    /// Words of the rows staged per step.
    pub slice: u32,
    /// The f16 scan on cooperative matrices (scan_coop.wgsl) instead of scan.wgsl.
    pub cooperative: bool,
}

impl KernelShape {
    /// Probe words per row word (f16 rows meet f32 probes).
    fn probe_words(&self) -> u32 {
        if self.dtype == Dtype::F16 { 2 } else { 1 }
    }

    /// Words of workgroup memory holding staged rows (one unused word when not staged).
    fn row_slots(&self) -> u32 {
        if self.blocking.stage_rows() {
            self.blocking.row_tile() * self.slice * self.probe_words()
        } else {
            1
        }
    }

    /// Workgroup memory the module needs, in bytes.
    pub fn workgroup_bytes(&self) -> u32 {
        let select = self.blocking.probe_tile * (self.cap * SLOT_BYTES + 8) + 4;
        if self.cooperative {
            let (rows, probes) = (self.blocking.row_tile(), self.blocking.probe_tile);
            return select + rows * 16 * 2 + 16 * probes * 2 + (rows * probes + 256) * 4;
        }
        let probes = self.blocking.probe_tile * self.slice * self.probe_words() * WORD_BYTES;
        select + probes + self.row_slots() * WORD_BYTES
    }

    /// Probes per workgroup.
    pub fn probe_tile(&self) -> u32 {
        self.blocking.probe_tile
    }

    /// The shape for `probes` probes keeping `keep` candidates each, within
    /// `workgroup_limit` bytes of workgroup memory: the largest blocking the batch can
    /// fill that fits, with the widest slice that fits; `None` when even one probe per
    /// workgroup cannot hold `keep` candidates. With `cooperative` (the adapter has
    /// 16 x 16 x 16 f16 cooperative matrices and the user turned them on), f16
    /// batches of 16 probes or more take the tensor-core scan.
    pub fn choose(
        dtype: Dtype,
        probes: usize,
        keep: usize,
        workgroup_limit: u32,
        cooperative: bool,
    ) -> Option<KernelShape> {
        let keep = u32::try_from(keep).ok()?;
        if cooperative && dtype == Dtype::F16 && probes >= COOP_BLOCKING.probe_tile as usize {
            let shape = KernelShape {
                dtype,
                blocking: COOP_BLOCKING,
                cap: keep.checked_add(COOP_BLOCKING.round())?.next_power_of_two(),
                slice: 2,
                cooperative: true,
            };
            if shape.workgroup_bytes() <= workgroup_limit {
                return Some(shape);
            }
        }
        BLOCKINGS
            .iter()
            .filter(|b| b.probe_tile as usize <= probes.next_power_of_two())
            .find_map(|&blocking| {
                let cap = keep.checked_add(blocking.round())?.next_power_of_two();
                SLICES
                    .iter()
                    .filter(|&&slice| !blocking.stage_rows() || slice >= MIN_STAGED_SLICE)
                    .map(|&slice| KernelShape {
                        dtype,
                        blocking,
                        cap,
                        slice,
                        cooperative: false,
                    })
                    .find(|s| s.workgroup_bytes() <= workgroup_limit)
            })
    }

    /// Invocations per workgroup of every kernel of the module.
    pub fn workgroup(&self) -> u32 {
        if self.cooperative { COOP_WORKGROUP } else { WORKGROUP }
    }

    /// The module's WGSL source.
    pub fn source(&self) -> String {
        let b = &self.blocking;
        let prelude = format!(
            "const WG: u32 = {}u;\n\
             const PROBE_TILE: u32 = {}u;\n\
             const CAP: u32 = {}u;\n\
             const ROW_TILE: u32 = {}u;\n\
             const ROWS_PER_INV: u32 = {}u;\n",
            self.workgroup(),
            b.probe_tile,
            self.cap,
            b.row_tile(),
            b.rows_per_inv,
        );
        if self.cooperative {
            return format!(
                "enable f16;\nenable wgpu_cooperative_matrix;\n\n{prelude}\n{LAYOUT}\n{LISTS}\n{SELECT}\n{SCAN_COOP}\n{MERGE}"
            );
        }
        let score = score_source(self.dtype);
        format!(
            "{prelude}\
             const PROBES_PER_INV: u32 = {}u;\n\
             const SLICE: u32 = {}u;\n\
             const STAGE_ROWS: bool = {};\n\
             const ROW_SLOTS: u32 = {}u;\n\n\
             {LAYOUT}\n{LISTS}\n{SELECT}\n{score}\n{SCAN}\n{}\n{MERGE}",
            b.probes_per_inv,
            self.slice,
            b.stage_rows(),
            self.row_slots(),
            self.unrolled(),
        )
    }
}

/// The arithmetic of one storage dtype (score_*.wgsl).
fn score_source(dtype: Dtype) -> String {
    match dtype {
        Dtype::F32 => format!("{SCORE_F32}\n{SCORE_FLOAT}"),
        Dtype::F16 => format!("{SCORE_F16}\n{SCORE_FLOAT}"),
        Dtype::I8 => SCORE_I8.to_owned(),
    }
}

/// Invocations per workgroup of the two-stage kernels (two_stage.wgsl).
pub const TWO_STAGE_WORKGROUP: u32 = 256;
/// Rows and probes of one GEMM workgroup's tile; each of its 16 x 16 invocations holds
/// 8 x 8 scores.
const GEMM_ROWS: u32 = 128;
pub const GEMM_PROBES: u32 = 128;
/// Probe words (vec4) staged per k-step: 16 floats, or 64 i8.
const GEMM_KW: u32 = 4;
/// Rows and probes of the register block.
const GEMM_REG: u32 = 8;
/// Invocations per workgroup of the tensor-core GEMM (four subgroups of 32 on NVIDIA),
/// and its tile: rows x probes, 16 output blocks of 16 x 16.
const COOP_GEMM_WORKGROUP: u32 = 128;
const COOP_ROWS: u32 = 64;
const COOP_PROBES: u32 = 64;
/// Most dimensions i8 rows may have on the tensor cores (every partial sum of a dot
/// product stays an integer below 2^24, exact in f32).
pub const COOP_I8_MAX_DIM: usize = 1024;

/// The compile-time shape of a two-stage module (two_stage.wgsl): the GEMM writes a
/// chunk of scores, the selection keeps `keep` per probe and segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TwoStageShape {
    pub dtype: Dtype,
    /// Candidate slots of the selection: a power of two >= keep + its round.
    pub cap: u32,
    /// The product on the tensor cores (gemm_coop.wgsl; f16 and i8) rather than the
    /// SIMT cores (gemm.wgsl).
    pub cooperative: bool,
}

impl TwoStageShape {
    /// The shape keeping `keep` candidates per probe within `workgroup_limit` bytes of
    /// workgroup memory; `None` when they do not fit (the fused scan takes the batch).
    /// With `cooperative` (the adapter has f16 cooperative matrices and the user turned
    /// them on), f16 galleries, and i8 ones of at most [`COOP_I8_MAX_DIM`] dimensions,
    /// take the tensor-core product.
    pub fn choose(
        dtype: Dtype,
        dim: usize,
        keep: usize,
        workgroup_limit: u32,
        cooperative: bool,
    ) -> Option<TwoStageShape> {
        let cap = u32::try_from(keep)
            .ok()?
            .checked_add(TWO_STAGE_WORKGROUP)?
            .next_power_of_two();
        let cooperative = cooperative
            && match dtype {
                Dtype::F16 => true,
                Dtype::I8 => dim <= COOP_I8_MAX_DIM,
                Dtype::F32 => false,
            };
        // The tensor cores' staging needs more workgroup memory than the SIMT product:
        // where it does not fit, the SIMT product takes the batch.
        [cooperative, false]
            .into_iter()
            .map(|cooperative| TwoStageShape {
                dtype,
                cap,
                cooperative,
            })
            .find(|shape| shape.workgroup_bytes() <= workgroup_limit)
    }

    /// Workgroup memory of the larger of the two kernels, in bytes.
    pub fn workgroup_bytes(&self) -> u32 {
        let gemm = if self.cooperative {
            COOP_ROWS * 16 * 2 + 2 * 16 * COOP_PROBES * 2 + (COOP_ROWS + 16) * (COOP_PROBES + 4) * 4
        } else {
            GEMM_KW * (GEMM_ROWS + GEMM_PROBES) * 16
        };
        let select = self.cap * SLOT_BYTES + 8 + 4;
        gemm.max(select)
    }

    /// Rows and probes of one GEMM workgroup's tile.
    pub fn gemm_tile(&self) -> (u32, u32) {
        if self.cooperative {
            (COOP_ROWS, COOP_PROBES)
        } else {
            (GEMM_ROWS, GEMM_PROBES)
        }
    }

    /// The module's WGSL source (entry points `gemm` and `select_scores`).
    pub fn source(&self) -> String {
        let prelude = format!(
            "const WG: u32 = {TWO_STAGE_WORKGROUP}u;\n\
             const PROBE_TILE: u32 = 1u;\n\
             const CAP: u32 = {}u;\n\
             const ROW_TILE: u32 = {TWO_STAGE_WORKGROUP}u;\n\
             const ROWS_PER_INV: u32 = 1u;\n\
             const GEMM_ROWS: u32 = {GEMM_ROWS}u;\n\
             const GEMM_PROBES: u32 = {GEMM_PROBES}u;\n\
             const KW: u32 = {GEMM_KW}u;\n",
            self.cap,
        );
        if self.cooperative {
            return format!(
                "enable f16;\nenable wgpu_cooperative_matrix;\n\n{prelude}\
                 const GEMM_WG: u32 = {COOP_GEMM_WORKGROUP}u;\n\
                 const COOP_ROWS: u32 = {COOP_ROWS}u;\n\
                 const COOP_PROBES: u32 = {COOP_PROBES}u;\n\
                 const COOP_I8: bool = {};\n\n{LAYOUT}\n{SELECT}\n{}\n{TWO_STAGE}\n{GEMM_COOP}",
                self.dtype == Dtype::I8,
                score_source(self.dtype),
            );
        }
        format!(
            "{prelude}\n{LAYOUT}\n{SELECT}\n{}\n{TWO_STAGE}\n{GEMM}\n{}",
            score_source(self.dtype),
            self.unrolled()
        )
    }

    /// Probe words per row word (f16 rows meet f32 probes).
    fn probe_words(&self) -> u32 {
        if self.dtype == Dtype::F16 { 2 } else { 1 }
    }

    /// two_stage.wgsl's `load_step`, `store_step`, `gemm_step` and `gemm_write`, every
    /// loop written out.
    fn unrolled(&self) -> String {
        use std::fmt::Write;
        let wg = TWO_STAGE_WORKGROUP;
        let row_words = GEMM_KW / self.probe_words() * GEMM_ROWS / wg;
        let probe_words = GEMM_KW * GEMM_PROBES / wg;
        let mut f = String::from("// Generated (shaders.rs, TwoStageShape::unrolled).\nstruct StepWords {\n");
        for i in 0..row_words {
            let _ = writeln!(f, "    r{i}: vec4<u32>,");
        }
        for i in 0..probe_words {
            let _ = writeln!(f, "    q{i}: Word,");
        }
        f.push_str(
            "}\n\nfn load_step(lid: u32, r0: u32, probe0: u32, k0: u32) -> StepWords {\n    var s: StepWords;\n",
        );
        for i in 0..row_words {
            let _ = writeln!(
                f,
                "    s.r{i} = gallery_word(r0 + (lid + {o}u) % GEMM_ROWS, params.rows, k0 / PW + (lid + {o}u) / GEMM_ROWS);",
                o = i * wg
            );
        }
        for i in 0..probe_words {
            let _ = writeln!(
                f,
                "    s.q{i} = probe_word(probe_word_major(probe0 + (lid + {o}u) % GEMM_PROBES, k0 + (lid + {o}u) / GEMM_PROBES));",
                o = i * wg
            );
        }
        f.push_str("    return s;\n}\n\nfn store_step(lid: u32, s: StepWords) {\n");
        for i in 0..row_words {
            let _ = writeln!(f, "    let t{i} = lid + {}u;", i * wg);
            for h in 0..self.probe_words() {
                let _ = writeln!(
                    f,
                    "    step_rows[((t{i} / GEMM_ROWS) * PW + {h}u) * GEMM_ROWS + t{i} % GEMM_ROWS] = widen(s.r{i}, {h}u);"
                );
            }
        }
        for i in 0..probe_words {
            let _ = writeln!(f, "    step_probes[lid + {}u] = s.q{i};", i * wg);
        }
        f.push_str(
            "}\n\nfn gemm_step(acc_in: array<Acc, GEMM_BLOCK>, tx: u32, ty: u32) -> array<Acc, GEMM_BLOCK> {\n    var acc = acc_in;\n",
        );
        for w in 0..GEMM_KW {
            for i in 0..GEMM_REG {
                let _ = writeln!(f, "    let a{w}_{i} = step_rows[{}u + tx];", w * GEMM_ROWS + 16 * i);
            }
            for j in 0..GEMM_REG {
                let _ = writeln!(f, "    let b{w}_{j} = step_probes[{}u + ty];", w * GEMM_PROBES + 16 * j);
            }
            for i in 0..GEMM_REG {
                for j in 0..GEMM_REG {
                    let a = i * GEMM_REG + j;
                    let _ = writeln!(f, "    acc[{a}] = fma_word(acc[{a}], a{w}_{i}, b{w}_{j});");
                }
            }
        }
        f.push_str(
            "    return acc;\n}\n\nfn gemm_write(acc: array<Acc, GEMM_BLOCK>, r0: u32, probe0: u32, tx: u32, ty: u32) {\n\
             \x20   let end = min(params.chunk_start + params.chunk_len, params.rows);\n",
        );
        for j in 0..GEMM_REG {
            let _ = writeln!(f, "    let p{j} = probe0 + ty + {}u;", 16 * j);
        }
        for i in 0..GEMM_REG {
            let _ = writeln!(f, "    let row{i} = r0 + tx + {}u;", 16 * i);
            let _ = writeln!(f, "    if row{i} < end {{");
            for j in 0..GEMM_REG {
                let _ = writeln!(
                    f,
                    "        scores[p{j} * params.chunk_rows + row{i} - params.chunk_start] = to_score(acc[{}], row{i}, p{j});",
                    i * GEMM_REG + j
                );
            }
            f.push_str("    }\n");
        }
        f.push_str("}\n");
        f
    }
}

impl KernelShape {
    /// scan.wgsl's `score_slice` and `offer_row`, with every loop over the register
    /// block, the slice's words and the parts of a word written out, so that the
    /// accumulators are indexed by constants only (drivers keep an array indexed by a
    /// loop variable in memory rather than registers, and unroll few loops).
    fn unrolled(&self) -> String {
        use std::fmt::Write;
        let b = &self.blocking;
        let (rows, probes, words, parts) = (b.rows_per_inv, b.probes_per_inv, self.slice, self.probe_words());
        let round = b.round();
        let row_tile = b.row_tile();
        let tile = b.probe_tile;
        let mut f = String::from(
            "// Generated (shaders.rs, KernelShape::unrolled): SLICE words of the register block.\n\
             fn score_slice(acc_in: array<Acc, BLOCK>, rg: u32, p0: u32, r0: u32, end: u32, k0: u32) -> array<Acc, BLOCK> {\n\
             \x20   var acc = acc_in;\n",
        );
        if !b.stage_rows() {
            // Every row word of the slice is asked for before any is used.
            for w in 0..words {
                for i in 0..rows {
                    let _ = writeln!(
                        f,
                        "    let raw_{w}_{i} = gallery_word(r0 + rg + {}u, end, k0 + {w}u);",
                        i * round
                    );
                }
            }
        }
        for w in 0..words {
            for h in 0..parts {
                let x = w * parts + h;
                for i in 0..rows {
                    if b.stage_rows() {
                        let _ = writeln!(
                            f,
                            "    let g_{x}_{i} = slice_rows[{}u + rg + {}u];",
                            x * row_tile,
                            i * round
                        );
                    } else {
                        let _ = writeln!(f, "    let g_{x}_{i} = widen(raw_{w}_{i}, {h}u);");
                    }
                }
                for j in 0..probes {
                    let _ = writeln!(f, "    let q_{x}_{j} = slice_probes[{}u + p0 + {j}u];", x * tile);
                    for i in 0..rows {
                        let a = i * probes + j;
                        let _ = writeln!(f, "    acc[{a}] = fma_word(acc[{a}], g_{x}_{i}, q_{x}_{j});");
                    }
                }
            }
        }
        f.push_str("    return acc;\n}\n\n");
        f.push_str(
            "// Generated: the offers of row group `i` of the register block (row `row`, the\n\
             // probes from `probe`, selection slots from `p`).\n\
             fn offer_row(acc: array<Acc, BLOCK>, i: u32, row: u32, key: u32, probe: u32, p: u32) {\n\
             \x20   var a: array<Acc, PROBES_PER_INV>;\n\
             \x20   switch i {\n",
        );
        for i in 0..rows {
            let items: Vec<String> = (0..probes).map(|j| format!("acc[{}]", i * probes + j)).collect();
            let _ = writeln!(
                f,
                "        case {i}u: {{ a = array<Acc, PROBES_PER_INV>({}); }}",
                items.join(", ")
            );
        }
        f.push_str("        default: {}\n    }\n");
        for j in 0..probes {
            let _ = writeln!(
                f,
                "    select_offer(p + {j}u, to_score(a[{j}], row, probe + {j}u), key, row);"
            );
        }
        f.push_str("}\n");
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::naga;

    fn validate(shape: &KernelShape) {
        validate_source(&format!("{shape:?}"), &shape.source(), &["scan", "merge", "poison"]);
    }

    fn validate_source(what: &str, source: &str, entries: &[&str]) {
        let module =
            naga::front::wgsl::parse_str(source).unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(source)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{what}: {}", e.emit_to_string(source)));
        for entry in entries {
            assert!(
                module.entry_points.iter().any(|e| e.name == *entry),
                "{what}: no {entry}"
            );
        }
    }

    /// Every two-stage module parses and validates, and fits 16 KiB of workgroup
    /// memory for the usual selection sizes.
    #[test]
    fn every_two_stage_shader_validates() {
        for dtype in Dtype::ALL {
            for cooperative in [false, true] {
                for keep in [1, 10, 100, 700] {
                    let shape = TwoStageShape::choose(dtype, 512, keep, 32768, cooperative).unwrap();
                    assert_eq!(shape.cooperative, cooperative && dtype != Dtype::F32, "{dtype}");
                    assert!(shape.cap as usize >= keep + TWO_STAGE_WORKGROUP as usize);
                    validate_source(&format!("{shape:?}"), &shape.source(), &["gemm", "select_scores"]);
                }
                // The SIMT path fits the 16 KiB every adapter has; the tensor cores'
                // staging of 64 x 64 scores needs more (NVIDIA has 48 KiB).
                let in_16k = TwoStageShape::choose(dtype, 512, 100, 16384, cooperative).unwrap();
                assert!(!in_16k.cooperative, "{dtype}");
                assert!(TwoStageShape::choose(dtype, 512, 3000, 32768, cooperative).is_none());
            }
        }
        let wide = TwoStageShape::choose(Dtype::I8, 1040, 10, 32768, true).unwrap();
        assert!(
            !wide.cooperative,
            "i8 sums past 1024 dimensions may not be exact in f32: SIMT"
        );
    }

    /// Every module biogate can build parses and validates with naga, without a GPU.
    #[test]
    fn every_shader_validates() {
        for dtype in Dtype::ALL {
            for blocking in BLOCKINGS {
                for cap in [32, 128, 2048] {
                    for slice in SLICES {
                        validate(&KernelShape {
                            dtype,
                            blocking,
                            cap,
                            slice,
                            cooperative: false,
                        });
                    }
                }
            }
        }
    }

    #[test]
    fn blockings_cover_the_workgroup_exactly() {
        for b in BLOCKINGS {
            assert_eq!(b.probe_tile % b.probes_per_inv, 0, "{b:?}");
            assert_eq!(b.round() * b.probe_groups(), WORKGROUP, "{b:?}");
            assert_eq!(b.row_tile() % 64, 0, "{b:?}: tiles start on an interleaved tile");
            assert!(b.probe_tile <= 32, "{b:?}: the selection's probe mask is 32 bits");
        }
    }

    #[test]
    fn shapes_fit_the_workgroup_memory_and_the_batch() {
        let s = KernelShape::choose(Dtype::F32, 1, 10, 16384, false).unwrap();
        assert_eq!((s.probe_tile(), s.cap, s.slice), (1, 128, 8));
        let s = KernelShape::choose(Dtype::F32, 256, 10, 16384, false).unwrap();
        assert_eq!(
            s.probe_tile(),
            16,
            "32 probes of 32 slots and their staging do not fit 16 KiB"
        );
        assert!(s.workgroup_bytes() <= 16384);
        let s = KernelShape::choose(Dtype::F16, 256, 10, 49152, false).unwrap();
        assert_eq!(
            (s.probe_tile(), s.slice),
            (32, 4),
            "a 48 KiB card takes the largest tile"
        );
        let s = KernelShape::choose(Dtype::I8, 3, 900, 16384, false).unwrap();
        assert_eq!((s.probe_tile(), s.cap), (1, 1024));
        assert!(KernelShape::choose(Dtype::I8, 1, 2000, 16384, false).is_none());
    }

    /// On lavapipe (32 KiB of workgroup memory) batches of 1 to 17+ probes reach every
    /// blocking for every dtype, so the GPU tests run each of them.
    #[test]
    fn lavapipe_runs_every_blocking() {
        for dtype in Dtype::ALL {
            let tiles: Vec<u32> = [1, 2, 3, 5, 13, 17]
                .iter()
                .map(|&batch| KernelShape::choose(dtype, batch, 7, 32768, false).unwrap().probe_tile())
                .collect();
            assert_eq!(tiles, [1, 2, 4, 8, 16, 32], "{dtype}");
        }
    }
}
