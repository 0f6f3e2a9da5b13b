// Pass 2, one level of a merge tree: workgroup (group, tile) merges lists
// [group * fan, group * fan + fan) of the `lists` per probe in `lists_in` for the
// PROBE_TILE probes of `tile` into list `group` of the `out_lists` per probe in
// `lists_out`. Many workgroups work at once; the host runs levels until one list per
// probe is left.
@compute @workgroup_size(WG)
fn merge(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    select_init(lid);
    let probe0 = wg.y * PROBE_TILE;
    let first = wg.x * params.fan;
    let total = (min(first + params.fan, params.lists) - first) * params.keep;
    for (var base = 0u; ; base += ROUND) {
        let done = base >= total;
        if !done {
            for (var t = lid; t < PROBE_TILE * ROUND; t += WG) {
                let p = t / ROUND;
                let i = base + t % ROUND;
                if i < total {
                    let c = lists_in[((probe0 + p) * params.lists + first) * params.keep + i];
                    if c.row != EMPTY {
                        select_offer(p, c.score, c.key, c.row);
                    }
                }
            }
        }
        select_round_end(lid, done);
        if done {
            break;
        }
    }
    for (var p = 0u; p < PROBE_TILE; p++) {
        let out = ((probe0 + p) * params.out_lists + wg.x) * params.keep;
        for (var i = lid; i < params.keep; i += WG) {
            lists_out[out + i] = select_result(p, i);
        }
    }
}

// Before the kernels run: every slot of `lists_out` holds POISON, which no kernel
// writes, so a slot left unwritten is caught after readback.
@compute @workgroup_size(WG)
fn poison(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let n = arrayLength(&lists_out);
    for (var i = id.x; i < n; i += groups.x * WG) {
        lists_out[i] = Candidate(bitcast<f32>(POISON), POISON, POISON);
    }
}
