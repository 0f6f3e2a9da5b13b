//! WGSL sources (shaders/*.wgsl, one concern per file) assembled into one module per
//! storage dtype and kernel shape, and the shape chosen for a search.
//!
//! A module is `prelude + layout + select + score_<dtype> + scan + merge`; the prelude
//! fixes the probes per workgroup, the candidate slots per probe and the workgroup size
//! as constants, so loops over them unroll and arrays live in registers.

use crate::template::Dtype;

const LAYOUT: &str = include_str!("../../../shaders/layout.wgsl");
const SELECT: &str = include_str!("../../../shaders/select.wgsl");
const SCORE_F32: &str = include_str!("../../../shaders/score_f32.wgsl");
const SCORE_F16: &str = include_str!("../../../shaders/score_f16.wgsl");
const SCORE_I8: &str = include_str!("../../../shaders/score_i8.wgsl");
const SCAN: &str = include_str!("../../../shaders/scan.wgsl");
const MERGE: &str = include_str!("../../../shaders/merge.wgsl");

/// Invocations per workgroup (one gallery row each per round).
pub const WORKGROUP: u32 = 64;
/// Probes-per-workgroup choices, largest first.
pub const PROBE_TILES: [u32; 4] = [16, 8, 4, 1];
/// Bytes of workgroup memory per candidate slot (score, key, row).
const SLOT_BYTES: u32 = 12;

/// The compile-time shape of a kernel module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelShape {
    pub dtype: Dtype,
    /// Probes scored per workgroup (each gallery row read once for all of them).
    pub probe_tile: u32,
    /// Candidate slots per probe in workgroup memory: a power of two >= keep + WORKGROUP.
    pub cap: u32,
}

impl KernelShape {
    /// Workgroup memory the module needs, in bytes.
    pub fn workgroup_bytes(&self) -> u32 {
        self.probe_tile * (self.cap * SLOT_BYTES + 8) + 4
    }

    /// The shape for `probes` probes keeping `keep` candidates each, within
    /// `workgroup_limit` bytes of workgroup memory; `None` when even one probe per
    /// workgroup cannot hold `keep` candidates.
    pub fn choose(dtype: Dtype, probes: usize, keep: usize, workgroup_limit: u32) -> Option<KernelShape> {
        let cap = (u32::try_from(keep).ok()?.checked_add(WORKGROUP)?).next_power_of_two();
        PROBE_TILES
            .iter()
            .map(|&probe_tile| KernelShape { dtype, probe_tile, cap })
            // The largest tile that fits and that the batch can fill.
            .find(|s| s.workgroup_bytes() <= workgroup_limit && s.probe_tile as usize <= probes.next_power_of_two())
    }

    /// The module's WGSL source.
    pub fn source(&self) -> String {
        let score = match self.dtype {
            Dtype::F32 => SCORE_F32,
            Dtype::F16 => SCORE_F16,
            Dtype::I8 => SCORE_I8,
        };
        format!(
            "const PROBE_TILE: u32 = {}u;\nconst CAP: u32 = {}u;\nconst WG: u32 = {WORKGROUP}u;\n\n{LAYOUT}\n{SELECT}\n{score}\n{SCAN}\n{MERGE}",
            self.probe_tile, self.cap
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wgpu::naga;

    /// Every module biogate can build parses and validates with naga, without a GPU.
    #[test]
    fn every_shader_validates() {
        for dtype in Dtype::ALL {
            for probe_tile in PROBE_TILES {
                for cap in [128, 1024, 2048] {
                    let shape = KernelShape { dtype, probe_tile, cap };
                    let source = shape.source();
                    let module = naga::front::wgsl::parse_str(&source)
                        .unwrap_or_else(|e| panic!("{shape:?}: {}", e.emit_to_string(&source)));
                    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
                        .validate(&module)
                        .unwrap_or_else(|e| panic!("{shape:?}: {}", e.emit_to_string(&source)));
                    for entry in ["scan", "merge"] {
                        assert!(
                            module.entry_points.iter().any(|e| e.name == entry),
                            "{shape:?}: no {entry}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn shapes_fit_the_workgroup_memory_and_the_batch() {
        let s = KernelShape::choose(Dtype::F32, 1, 10, 16384).unwrap();
        assert_eq!((s.probe_tile, s.cap), (1, 128));
        let s = KernelShape::choose(Dtype::F32, 256, 10, 16384).unwrap();
        assert_eq!(s.probe_tile, 8, "16 x 128 slots do not fit 16 KiB");
        assert!(s.workgroup_bytes() <= 16384);
        let s = KernelShape::choose(Dtype::I8, 3, 900, 16384).unwrap();
        assert_eq!((s.probe_tile, s.cap), (1, 1024));
        assert!(KernelShape::choose(Dtype::I8, 1, 2000, 16384).is_none());
    }
}
