// Pass 1: workgroup (block, tile) scores rows [block * rows_per_block, ...) of the shard
// against the PROBE_TILE probes of `tile` and keeps each probe's best `keep` rows.
// Scores live only in registers and workgroup memory; `keep` per probe and block
// reach `block_best`.
@compute @workgroup_size(WG)
fn scan(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    select_init(lid);
    let probe0 = wg.y * PROBE_TILE;
    let start = wg.x * params.rows_per_block;
    let end = min(start + params.rows_per_block, params.rows);
    // One round per WG rows; the round after the last one only finishes the selection
    // (one call site of the selection code keeps the compiled kernel small).
    for (var base = start; ; base += WG) {
        let row = base + lid;
        if row < end {
            let key = row_keys[row];
            if key != DEAD {
                let s = score_row(row, probe0);
                for (var p = 0u; p < PROBE_TILE; p++) {
                    select_offer(p, s[p], key, row);
                }
            }
        }
        let done = base >= end;
        select_round_end(lid, done);
        if done {
            break;
        }
    }
    for (var p = 0u; p < PROBE_TILE; p++) {
        let out = ((probe0 + p) * params.blocks + wg.x) * params.keep;
        for (var i = lid; i < params.keep; i += WG) {
            block_best[out + i] = select_result(p, i);
        }
    }
}
