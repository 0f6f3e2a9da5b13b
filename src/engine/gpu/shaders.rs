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
                "enable f16;\nenable wgpu_cooperative_matrix;\n\n{prelude}\n{LAYOUT}\n{SELECT}\n{SCAN_COOP}\n{MERGE}"
            );
        }
        let score = match self.dtype {
            Dtype::F32 => format!("{SCORE_F32}\n{SCORE_FLOAT}"),
            Dtype::F16 => format!("{SCORE_F16}\n{SCORE_FLOAT}"),
            Dtype::I8 => SCORE_I8.to_owned(),
        };
        format!(
            "{prelude}\
             const PROBES_PER_INV: u32 = {}u;\n\
             const SLICE: u32 = {}u;\n\
             const STAGE_ROWS: bool = {};\n\
             const ROW_SLOTS: u32 = {}u;\n\n\
             {LAYOUT}\n{SELECT}\n{score}\n{SCAN}\n{}\n{MERGE}",
            b.probes_per_inv,
            self.slice,
            b.stage_rows(),
            self.row_slots(),
            self.unrolled(),
        )
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
        let source = shape.source();
        let module = naga::front::wgsl::parse_str(&source)
            .unwrap_or_else(|e| panic!("{shape:?}: {}", e.emit_to_string(&source)));
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{shape:?}: {}", e.emit_to_string(&source)));
        for entry in ["scan", "merge", "poison"] {
            assert!(
                module.entry_points.iter().any(|e| e.name == entry),
                "{shape:?}: no {entry}"
            );
        }
    }

    /// The tensor-core scan cannot run on lavapipe: it must at least parse and validate
    /// (with the capabilities it needs) for every selection size.
    #[test]
    fn the_cooperative_matrix_shader_validates() {
        for keep in [1, 10, 100, 200] {
            let shape = KernelShape::choose(Dtype::F16, 256, keep, 65536, true).unwrap();
            assert!(shape.cooperative, "keep {keep}");
            assert!(shape.workgroup_bytes() <= 65536);
            validate(&shape);
        }
        let big = KernelShape::choose(Dtype::F16, 256, 900, 65536, true).unwrap();
        assert!(
            !big.cooperative,
            "16 probes x 1024 slots do not fit: the plain scan takes it"
        );
        let plain = KernelShape::choose(Dtype::F16, 8, 10, 65536, true).unwrap();
        assert!(
            !plain.cooperative,
            "a batch that cannot fill a 16-probe tile stays on the plain scan"
        );
        assert!(
            !KernelShape::choose(Dtype::I8, 256, 10, 65536, true)
                .unwrap()
                .cooperative
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
