//! What the kernels wrote, checked slot by slot before anything is believed.

use super::*;

/// Written into the result slots before a search (layout.wgsl `POISON`); no kernel
/// writes it.
pub(super) const POISON: u32 = 0xDEAD_BEEF;

/// The row of a result slot with no candidate (layout.wgsl `EMPTY`).
pub(super) const EMPTY: u32 = u32::MAX;

/// A selected row as the kernels write it.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct Slot {
    pub(super) score: f32,
    pub(super) key: u32,
    pub(super) row: u32,
}

/// (probe within the batch, shard, slot) for every filled slot.
pub(super) type DispatchRows = Vec<(usize, usize, Slot)>;

/// Validate one shard's result slots (`keep` per probe for `count` probes) and collect
/// the filled ones as (probe, shard, slot). Every slot must have been written (none may
/// still hold [`POISON`]) and name a row of the shard with a finite score.
pub(super) fn check_slots(
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
