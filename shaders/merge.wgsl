// Pass 2: workgroup `tile` merges the blocks' selections of its PROBE_TILE probes into
// each probe's best `keep` rows of the shard, written to `best` (the only readback).
@compute @workgroup_size(WG)
fn merge(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    select_init(lid);
    let probe0 = wg.x * PROBE_TILE;
    let total = params.blocks * params.keep;
    for (var base = 0u; ; base += WG) {
        let i = base + lid;
        if i < total {
            for (var p = 0u; p < PROBE_TILE; p++) {
                let c = block_best[(probe0 + p) * total + i];
                if c.row != EMPTY {
                    select_offer(p, c.score, c.key, c.row);
                }
            }
        }
        let done = base >= total;
        select_round_end(lid, done);
        if done {
            break;
        }
    }
    for (var p = 0u; p < PROBE_TILE; p++) {
        for (var i = lid; i < params.keep; i += WG) {
            best[(probe0 + p) * params.keep + i] = select_result(p, i);
        }
    }
}
