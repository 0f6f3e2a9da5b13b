// Pass 1 on the tensor cores, for f16 galleries on adapters with cooperative matrices
// (16 x 16 x 16, f16 operands, f32 accumulation). Same contract as scan.wgsl: workgroup
// (block, tile) keeps each probe's best `keep` rows of its block in `lists_in`.
//
// A tile is ROW_TILE rows x PROBE_TILE probes, cut into 16 x 16 output blocks. Every
// 16 dimensions the rows (exact f16) and the probes (rounded to f16: answers are within
// the f16 tolerance, not bit-equal to the CPU engine) are staged in workgroup memory,
// and each subgroup multiplies its output blocks (two) on the tensor cores.
// The tile's scores then pass through workgroup memory to the selection, ROUND rows
// at a time.

const COOP: u32 = 16u;
const OUT_BLOCKS: u32 = (ROW_TILE / COOP) * (PROBE_TILE / COOP);

var<workgroup> coop_rows: array<f16, ROW_TILE * COOP>;         // [row][dim]
var<workgroup> coop_probes: array<f16, COOP * PROBE_TILE>;     // [dim][probe]
var<workgroup> coop_scores: array<f32, ROW_TILE * PROBE_TILE + COOP * COOP>; // [row][probe], spare

// Where output block `b` of the tile starts in coop_scores; blocks past the tile go to
// a spare block nobody reads (cooperative operations must run in workgroup-uniform
// control flow, so every subgroup multiplies and stores two blocks, real or not).
fn coop_block_at(b: u32) -> u32 {
    if b >= OUT_BLOCKS {
        return ROW_TILE * PROBE_TILE;
    }
    return (b / (PROBE_TILE / COOP)) * COOP * PROBE_TILE + (b % (PROBE_TILE / COOP)) * COOP;
}

// Scores of rows r0.. x the tile's probes into coop_scores. Subgroup `sg` computes
// output blocks sg and sg + subgroups (with 32-wide subgroups, four of them cover the
// tile's four blocks once; narrower or wider ones share them out).
fn coop_tile(lid: u32, sg: u32, subgroups: u32, r0: u32, end: u32, probe0: u32) {
    var acc0 = coop_mat16x16<f32, C>();
    var acc1 = coop_mat16x16<f32, C>();
    let b0 = sg % OUT_BLOCKS;
    let b1 = (sg + subgroups) % OUT_BLOCKS;
    // 16 dimensions are two gallery words and four probe words.
    for (var k0 = 0u; k0 < params.row_vec4s; k0 += 2u) {
        for (var t = lid; t < ROW_TILE * 2u; t += WG) {
            let lr = t % ROW_TILE;
            let w = t / ROW_TILE;
            let raw = gallery_word(r0 + lr, end, k0 + w);
            for (var h = 0u; h < 4u; h++) {
                // Exact: the two halves widened, then narrowed back to what they were.
                let pair = unpack2x16float(raw[h]);
                coop_rows[lr * COOP + w * 8u + 2u * h] = f16(pair.x);
                coop_rows[lr * COOP + w * 8u + 2u * h + 1u] = f16(pair.y);
            }
        }
        for (var t = lid; t < PROBE_TILE * 4u; t += WG) {
            let p = t % PROBE_TILE;
            let x = t / PROBE_TILE;
            let q = bitcast<vec4<f32>>(probe_raw(probe0 + p, k0 * 2u + x));
            for (var c = 0u; c < 4u; c++) {
                coop_probes[(x * 4u + c) * PROBE_TILE + p] = f16(q[c]);
            }
        }
        workgroupBarrier();
        let a0 = coopLoadT<coop_mat16x16<f16, A>>(&coop_rows[(b0 / (PROBE_TILE / COOP)) * COOP * COOP], COOP);
        let q0 = coopLoadT<coop_mat16x16<f16, B>>(&coop_probes[(b0 % (PROBE_TILE / COOP)) * COOP], PROBE_TILE);
        acc0 = coopMultiplyAdd(a0, q0, acc0);
        let a1 = coopLoadT<coop_mat16x16<f16, A>>(&coop_rows[(b1 / (PROBE_TILE / COOP)) * COOP * COOP], COOP);
        let q1 = coopLoadT<coop_mat16x16<f16, B>>(&coop_probes[(b1 % (PROBE_TILE / COOP)) * COOP], PROBE_TILE);
        acc1 = coopMultiplyAdd(a1, q1, acc1);
        workgroupBarrier();
    }
    coopStoreT(acc0, &coop_scores[coop_block_at(sg)], PROBE_TILE);
    coopStoreT(acc1, &coop_scores[coop_block_at(sg + subgroups)], PROBE_TILE);
    workgroupBarrier();
}

@compute @workgroup_size(WG)
fn scan(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) subgroups: u32,
) {
    select_init(lid);
    let probe0 = wg.y * PROBE_TILE;
    let start = wg.x * params.rows_per_block;
    let end = min(start + params.rows_per_block, params.rows);
    for (var r0 = start; ; r0 += ROW_TILE) {
        let live = r0 < end;
        if live {
            coop_tile(lid, sg, subgroups, r0, end, probe0);
        }
        for (var i = 0u; i < ROW_TILE / ROUND; i++) {
            if live {
                for (var t = lid; t < ROUND * PROBE_TILE; t += WG) {
                    let lr = i * ROUND + t % ROUND;
                    let p = t / ROUND;
                    let row = r0 + lr;
                    if row < end {
                        let key = row_keys[row];
                        if key != DEAD {
                            select_offer(p, coop_scores[lr * PROBE_TILE + p], key, row);
                        }
                    }
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
