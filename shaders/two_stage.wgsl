// Batches as a product of matrices, then a separate selection (the FAISS design).
//
// A shard's rows are cut into chunks. For each chunk:
// 1. `gemm` scores the chunk's rows against every probe of the batch and writes the
//    scores to `scores` (probe-major: probe p's row r at p * chunk_rows + r). Workgroup
//    (probe tile, row tile) computes GEMM_ROWS x GEMM_PROBES scores; its invocations
//    form a 16 x 16 grid, each holding an 8 x 8 register block of scores: rows
//    tx + 16 i, probes ty + 16 j. Both operands go through workgroup memory KW probe
//    words at a time (a k-step); the next k-step's words are loaded from memory into
//    registers while this one's are multiplied. The probe tile varies fastest across
//    workgroups, so the workgroups resident at once share their rows through the cache
//    and the gallery is read about once per batch.
// 2. `select_scores` reduces each probe's scores of the chunk, SEG rows per workgroup
//    (params.rows_per_block), to its best `keep` rows with the workgroup selection of
//    select.wgsl (one probe per workgroup, ROUND = WG offers per round), skipping
//    deleted rows, and writes them as list `first_block + segment` of the probe in
//    `lists_in`. The merge tree (merge.wgsl) then reduces the lists as after a scan.
//
// No selection barrier ever runs inside the product, and the product has no
// data-dependent control flow: the score of every row of the chunk is written, in the
// same arithmetic as the fused scan (score_*.wgsl), so i8 scores are the CPU engine's
// bit for bit.
//
// This file holds the two kernels' bindings and the selection; the product is
// gemm.wgsl (SIMT) or gemm_coop.wgsl (tensor cores).

@group(0) @binding(6) var<storage, read_write> lists_in: array<Candidate>;
@group(0) @binding(7) var<storage, read_write> scores: array<f32>;

// Probe word `word` of probe `probe` in the word-major probe buffer, zero past the end.
fn probe_word_major(probe: u32, word: u32) -> vec4<u32> {
    if word < params.probe_vec4s {
        return probes[word * params.probes_padded + probe];
    }
    return vec4<u32>();
}

// Workgroup (segment, probe): rows [segment * SEG, ...) of the chunk, for one probe.
@compute @workgroup_size(WG)
fn select_scores(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    select_init(lid);
    let probe = wg.y;
    let start = wg.x * params.rows_per_block;
    let end = min(start + params.rows_per_block, params.chunk_len);
    let at = probe * params.chunk_rows;
    for (var base = start; ; base += WG) {
        let live = base < end;
        let r = base + lid;
        if live && r < end {
            let row = params.chunk_start + r;
            let key = row_keys[row];
            if key != DEAD {
                select_offer(0u, scores[at + r], key, row);
            }
        }
        select_round_end(lid, !live);
        if !live {
            break;
        }
    }
    select_write_block(lid, probe, params.first_block + wg.x);
}
