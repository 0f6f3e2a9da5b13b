// Exact per-workgroup selection of the best `params.keep` candidates for each probe of
// the tile. Order: higher score first, then smaller key (subject rank), then smaller row.
//
// Candidates at or above a probe's bar are appended to its buffer in workgroup memory.
// After each round (at most ROUND offers per probe) a buffer that could overflow in the
// next round is sorted (bitonic) and cut to `keep`, and its bar is raised to the
// keep-th score. Admission is `>=`, so a later row tied with the bar still gets in and
// the sort decides the tie: nothing that belongs in the best `keep` is ever dropped.

var<workgroup> cand_score: array<f32, PROBE_TILE * CAP>;
var<workgroup> cand_key: array<u32, PROBE_TILE * CAP>;
var<workgroup> cand_row: array<u32, PROBE_TILE * CAP>;
var<workgroup> cand_count: array<atomic<u32>, PROBE_TILE>;
var<workgroup> cand_bar: array<f32, PROBE_TILE>;
var<workgroup> sort_mask: u32;

fn select_init(lid: u32) {
    if lid < PROBE_TILE {
        atomicStore(&cand_count[lid], 0u);
        cand_bar[lid] = params.floor;
    }
    workgroupBarrier();
}

fn select_offer(p: u32, score: f32, key: u32, row: u32) {
    if score >= cand_bar[p] {
        let at = p * CAP + atomicAdd(&cand_count[p], 1u);
        cand_score[at] = score;
        cand_key[at] = key;
        cand_row[at] = row;
    }
}

// Whether slot `a` ranks before slot `b`.
fn ranks_before(a: u32, b: u32) -> bool {
    if cand_score[a] != cand_score[b] {
        return cand_score[a] > cand_score[b];
    }
    if cand_key[a] != cand_key[b] {
        return cand_key[a] < cand_key[b];
    }
    return cand_row[a] < cand_row[b];
}

fn swap_slots(a: u32, b: u32) {
    let s = cand_score[a];
    cand_score[a] = cand_score[b];
    cand_score[b] = s;
    let k = cand_key[a];
    cand_key[a] = cand_key[b];
    cand_key[b] = k;
    let r = cand_row[a];
    cand_row[a] = cand_row[b];
    cand_row[b] = r;
}

// Sort the buffers of the probes in `mask` best first and cut them to `keep`.
// Every invocation calls this with the same `mask` (it holds barriers).
fn select_compact(lid: u32, mask: u32) {
    for (var p = 0u; p < PROBE_TILE; p++) {
        if ((mask >> p) & 1u) == 0u {
            continue;
        }
        for (var i = atomicLoad(&cand_count[p]) + lid; i < CAP; i += WG) {
            cand_score[p * CAP + i] = MIN_SCORE;
            cand_key[p * CAP + i] = EMPTY;
            cand_row[p * CAP + i] = EMPTY;
        }
    }
    workgroupBarrier();
    const HALF: u32 = CAP / 2u;
    for (var k = 2u; k <= CAP; k <<= 1u) {
        for (var j = k >> 1u; j > 0u; j >>= 1u) {
            for (var t = lid; t < PROBE_TILE * HALF; t += WG) {
                let p = t / HALF;
                if ((mask >> p) & 1u) == 0u {
                    continue;
                }
                let u = t % HALF;
                let i = (u / j) * 2u * j + (u % j);
                let a = p * CAP + i;
                let b = a + j;
                // Blocks with bit k clear end up best first, the others worst first;
                // the last pass (k == CAP) leaves the whole buffer best first.
                let best_first = (i & k) == 0u;
                if select(ranks_before(a, b), ranks_before(b, a), best_first) {
                    swap_slots(a, b);
                }
            }
            workgroupBarrier();
        }
    }
    if lid < PROBE_TILE && ((mask >> lid) & 1u) != 0u {
        let n = atomicLoad(&cand_count[lid]);
        if n >= params.keep {
            atomicStore(&cand_count[lid], params.keep);
            cand_bar[lid] = max(cand_score[lid * CAP + params.keep - 1u], params.floor);
        }
    }
    workgroupBarrier();
}

// After a round of offers (at most ROUND per probe): compact the buffers that could
// overflow in the next round; after the last round (`done`), cut every buffer to
// `keep` (unordered: whoever reads the result selects again).
fn select_round_end(lid: u32, done: bool) {
    workgroupBarrier();
    if lid == 0u {
        let limit = select(CAP - ROUND, params.keep, done);
        var mask = 0u;
        for (var p = 0u; p < PROBE_TILE; p++) {
            if atomicLoad(&cand_count[p]) > limit {
                mask |= 1u << p;
            }
        }
        sort_mask = mask;
    }
    let mask = workgroupUniformLoad(&sort_mask);
    if mask != 0u {
        select_compact(lid, mask);
    }
}

// Slot `i` of probe `p`'s selection (after the last round).
fn select_result(p: u32, i: u32) -> Candidate {
    if i < atomicLoad(&cand_count[p]) {
        return Candidate(cand_score[p * CAP + i], cand_key[p * CAP + i], cand_row[p * CAP + i]);
    }
    return Candidate(MIN_SCORE, EMPTY, EMPTY);
}

// A scan's end (scan.wgsl, scan_coop.wgsl): each probe's selection becomes list `block`
// of the tile's probes in `lists_in`.
fn select_write_block(lid: u32, probe0: u32, block: u32) {
    for (var p = 0u; p < PROBE_TILE; p++) {
        let out = ((probe0 + p) * params.blocks + block) * params.keep;
        for (var i = lid; i < params.keep; i += WG) {
            lists_in[out + i] = select_result(p, i);
        }
    }
}

