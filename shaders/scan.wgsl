// Pass 1: a tiled product of rows and probes with the selection fused into it.
//
// Workgroup (block, tile) scans rows [block * rows_per_block, ...) of the shard against
// the PROBE_TILE probes of `tile`, ROW_TILE rows at a time. Its WG invocations form a
// grid of ROUND row groups x (PROBE_TILE / PROBES_PER_INV) probe groups; invocation
// (rg, pg) accumulates a register block of ROWS_PER_INV x PROBES_PER_INV scores: rows
// r0 + rg + i * ROUND, probes pg * PROBES_PER_INV + j.
//
// Both operands go through workgroup memory SLICE words of the rows at a time: the
// probes' words always (every row group reads them), the rows' words when STAGE_ROWS
// (more than one probe group reads each). Without STAGE_ROWS (small batches) each
// invocation reads its rows' words straight from `gallery`, ROWS_PER_INV loads in
// flight, consecutive invocations on consecutive words.
//
// The tile's scores then go to the selection (select.wgsl) in ROWS_PER_INV rounds of
// ROUND offers per probe: they never reach global memory. Each probe's best `keep`
// rows of the block are written to `lists_in`.
//
// `score_slice` (the SLICE words' multiply-adds) and `offer_row` (one row's offers) are
// written out by the host with every loop over the register block unrolled
// (shaders.rs, `unrolled`): the accumulators are indexed by constants only, so they
// stay in registers, and a slice's row loads are all issued before its arithmetic.

var<workgroup> slice_rows: array<Word, ROW_SLOTS>;
var<workgroup> slice_probes: array<Word, PROBE_TILE * SLICE * PW>;

const BLOCK: u32 = ROWS_PER_INV * PROBES_PER_INV;

fn score_tile(lid: u32, r0: u32, end: u32, probe0: u32) -> array<Acc, BLOCK> {
    var acc: array<Acc, BLOCK>;
    let rg = lid % ROUND;
    let p0 = (lid / ROUND) * PROBES_PER_INV;
    for (var k0 = 0u; k0 < params.row_vec4s; k0 += SLICE) {
        // Stage probe words k0 * PW.. of the tile: slot (x * PROBE_TILE + probe).
        for (var t = lid; t < PROBE_TILE * SLICE * PW; t += WG) {
            slice_probes[t] = probe_word(probe_raw(probe0 + t % PROBE_TILE, k0 * PW + t / PROBE_TILE));
        }
        if STAGE_ROWS {
            // Stage row words k0.. of the tile, widened: slot ((w * PW + h) * ROW_TILE + row).
            for (var t = lid; t < ROW_TILE * SLICE; t += WG) {
                let lr = t % ROW_TILE;
                let w = t / ROW_TILE;
                let raw = gallery_word(r0 + lr, end, k0 + w);
                for (var h = 0u; h < PW; h++) {
                    slice_rows[(w * PW + h) * ROW_TILE + lr] = widen(raw, h);
                }
            }
        }
        workgroupBarrier();
        acc = score_slice(acc, rg, p0, r0, end, k0);
        workgroupBarrier();
    }
    return acc;
}

@compute @workgroup_size(WG)
fn scan(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    select_init(lid);
    let probe0 = wg.y * PROBE_TILE;
    let start = wg.x * params.rows_per_block;
    let end = min(start + params.rows_per_block, params.rows);
    let rg = lid % ROUND;
    let p0 = (lid / ROUND) * PROBES_PER_INV;
    // The pass after the last tile only finishes the selection (one call site of the
    // selection code keeps the compiled kernel small).
    for (var r0 = start; ; r0 += ROW_TILE) {
        let live = r0 < end;
        var acc: array<Acc, BLOCK>;
        if live {
            acc = score_tile(lid, r0, end, probe0);
        }
        for (var i = 0u; i < ROWS_PER_INV; i++) {
            let row = r0 + rg + i * ROUND;
            if live && row < end {
                let key = row_keys[row];
                if key != DEAD {
                    offer_row(acc, i, row, key, probe0 + p0, p0);
                }
            }
            select_round_end(lid, !live);
            if !live {
                break;
            }
        }
        if !live {
            break;
        }
    }
    select_write_block(lid, probe0, wg.x);
}
