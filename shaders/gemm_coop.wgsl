// The two-stage path's product on the tensor cores (16 x 16 x 16 cooperative matrices,
// f16 operands, f32 accumulation) for f16 and i8 galleries; same contract as gemm.wgsl.
// Workgroup (probe tile, row tile) computes COOP_ROWS x COOP_PROBES scores as 16 x 16
// output blocks. Each round, subgroup sg computes blocks first + sg + j * subgroups for
// j < 4: with four subgroups (32 lanes on NVIDIA) one round covers the tile, with fewer
// more rounds do, with more the spare blocks go to a scratch block nobody reads, so
// nothing assumes a subgroup size (cooperative operations run in uniform control flow).
// Every 16 dimensions the rows and probes are staged in workgroup memory as f16.
//
// Precision:
// - i8: every i8 value is exact in f16, every product exact in f32, and for dimensions
//   up to 1024 every partial sum is an integer below 2^24, so the accumulator holds the
//   i32 dot product and the score f32(raw) * (probe_scale * row_scale) is the CPU
//   engine's bit for bit (the host takes this path for i8 only up to 1024 dimensions).
// - f16: the rows are f16 already. Each f32 probe is scaled by 2^s (its probe_scales
//   entry, chosen by the host so that its largest entry is below 2^15) and split into
//   hi (its top 11 bits) and lo = f16(q - hi): hi + lo holds 22 of its 24 bits, both
//   products go into one f32 accumulator, and the score is scaled back by 2^-s (exact).

const COOP: u32 = 16u;
const PROBE_BLOCKS: u32 = COOP_PROBES / COOP;
const OUT_BLOCKS: u32 = (COOP_ROWS / COOP) * PROBE_BLOCKS;
// Row stride of the staged scores (padded: the write-out reads them row-fastest).
const OUT_STRIDE: u32 = COOP_PROBES + 4u;
const SPARE: u32 = COOP_ROWS * OUT_STRIDE;

var<workgroup> coop_rows: array<f16, COOP_ROWS * COOP>;        // [row][dim]
var<workgroup> coop_hi: array<f16, COOP * COOP_PROBES>;        // [dim][probe]
var<workgroup> coop_lo: array<f16, COOP * COOP_PROBES>;        // [dim][probe], f16 only
var<workgroup> coop_out: array<f32, COOP_ROWS * OUT_STRIDE + COOP * OUT_STRIDE>; // [row][probe], spare

// Where output block `b` of the tile goes in coop_out (blocks past the tile: the spare).
fn coop_out_at(b: u32) -> u32 {
    if b >= OUT_BLOCKS {
        return SPARE;
    }
    return (b / PROBE_BLOCKS) * COOP * OUT_STRIDE + (b % PROBE_BLOCKS) * COOP;
}

fn coop_row_at(b: u32) -> u32 {
    return ((b % OUT_BLOCKS) / PROBE_BLOCKS) * COOP * COOP;
}

fn coop_probe_at(b: u32) -> u32 {
    return (b % PROBE_BLOCKS) * COOP;
}

// Stage dimensions 16 k .. 16 k + 15 of the tile's rows and probes.
fn coop_stage(lid: u32, r0: u32, probe0: u32, k: u32) {
    if COOP_I8 {
        for (var t = lid; t < COOP_ROWS; t += GEMM_WG) {
            let raw = gallery_word(r0 + t, params.rows, k);
            for (var c = 0u; c < 4u; c++) {
                let v = unpack4xI8(raw[c]);
                for (var e = 0u; e < 4u; e++) {
                    coop_rows[t * COOP + 4u * c + e] = f16(v[e]);
                }
            }
        }
        for (var t = lid; t < COOP_PROBES; t += GEMM_WG) {
            let raw = probe_word_major(probe0 + t, k);
            for (var c = 0u; c < 4u; c++) {
                let v = unpack4xI8(raw[c]);
                for (var e = 0u; e < 4u; e++) {
                    coop_hi[(4u * c + e) * COOP_PROBES + t] = f16(v[e]);
                }
            }
        }
    } else {
        for (var t = lid; t < COOP_ROWS * 2u; t += GEMM_WG) {
            let lr = t % COOP_ROWS;
            let w = t / COOP_ROWS;
            let raw = gallery_word(r0 + lr, params.rows, 2u * k + w);
            for (var h = 0u; h < 4u; h++) {
                // Exact: the two halves widened, then narrowed back to what they were.
                let pair = unpack2x16float(raw[h]);
                coop_rows[lr * COOP + 8u * w + 2u * h] = f16(pair.x);
                coop_rows[lr * COOP + 8u * w + 2u * h + 1u] = f16(pair.y);
            }
        }
        for (var t = lid; t < COOP_PROBES * 4u; t += GEMM_WG) {
            let p = t % COOP_PROBES;
            let x = t / COOP_PROBES;
            let q = bitcast<vec4<f32>>(probe_word_major(probe0 + p, 4u * k + x)) * probe_scales[probe0 + p];
            for (var c = 0u; c < 4u; c++) {
                // hi keeps the top 11 bits of q (its mantissa cut to f16's 10 bits by a
                // mask, exact in f16), lo the rest (exact in f32, rounded to f16 once).
                // A round trip through f16 instead (f32(f16(q))) was folded away by the
                // NVIDIA driver on an H200: lo came out zero.
                let hi = bitcast<f32>(bitcast<u32>(q[c]) & 0xffffe000u);
                coop_hi[(4u * x + c) * COOP_PROBES + p] = f16(hi);
                coop_lo[(4u * x + c) * COOP_PROBES + p] = f16(q[c] - hi);
            }
        }
    }
}

// The score of a staged accumulator (see the top of this file).
fn coop_score(acc: f32, row: u32, probe: u32) -> f32 {
    if COOP_I8 {
        return acc * (probe_scales[probe] * row_scales[row]);
    }
    return acc / probe_scales[probe];
}

@compute @workgroup_size(GEMM_WG)
fn gemm(
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) subgroups: u32,
) {
    let probe0 = wg.x * COOP_PROBES;
    let r0 = params.chunk_start + wg.y * COOP_ROWS;
    // 16 dimensions are one i8 gallery word, or two f16 ones.
    let steps = select((params.row_vec4s + 1u) / 2u, params.row_vec4s, COOP_I8);
    for (var first = 0u; first < OUT_BLOCKS; first += 4u * subgroups) {
        let b0 = first + sg;
        let b1 = b0 + subgroups;
        let b2 = b1 + subgroups;
        let b3 = b2 + subgroups;
        var acc0 = coop_mat16x16<f32, C>();
        var acc1 = coop_mat16x16<f32, C>();
        var acc2 = coop_mat16x16<f32, C>();
        var acc3 = coop_mat16x16<f32, C>();
        for (var k = 0u; k < steps; k++) {
            workgroupBarrier();
            coop_stage(lid, r0, probe0, k);
            workgroupBarrier();
            let a0 = coopLoadT<coop_mat16x16<f16, A>>(&coop_rows[coop_row_at(b0)], COOP);
            let a1 = coopLoadT<coop_mat16x16<f16, A>>(&coop_rows[coop_row_at(b1)], COOP);
            let a2 = coopLoadT<coop_mat16x16<f16, A>>(&coop_rows[coop_row_at(b2)], COOP);
            let a3 = coopLoadT<coop_mat16x16<f16, A>>(&coop_rows[coop_row_at(b3)], COOP);
            acc0 = coopMultiplyAdd(a0, coopLoadT<coop_mat16x16<f16, B>>(&coop_hi[coop_probe_at(b0)], COOP_PROBES), acc0);
            acc1 = coopMultiplyAdd(a1, coopLoadT<coop_mat16x16<f16, B>>(&coop_hi[coop_probe_at(b1)], COOP_PROBES), acc1);
            acc2 = coopMultiplyAdd(a2, coopLoadT<coop_mat16x16<f16, B>>(&coop_hi[coop_probe_at(b2)], COOP_PROBES), acc2);
            acc3 = coopMultiplyAdd(a3, coopLoadT<coop_mat16x16<f16, B>>(&coop_hi[coop_probe_at(b3)], COOP_PROBES), acc3);
            if !COOP_I8 {
                acc0 = coopMultiplyAdd(a0, coopLoadT<coop_mat16x16<f16, B>>(&coop_lo[coop_probe_at(b0)], COOP_PROBES), acc0);
                acc1 = coopMultiplyAdd(a1, coopLoadT<coop_mat16x16<f16, B>>(&coop_lo[coop_probe_at(b1)], COOP_PROBES), acc1);
                acc2 = coopMultiplyAdd(a2, coopLoadT<coop_mat16x16<f16, B>>(&coop_lo[coop_probe_at(b2)], COOP_PROBES), acc2);
                acc3 = coopMultiplyAdd(a3, coopLoadT<coop_mat16x16<f16, B>>(&coop_lo[coop_probe_at(b3)], COOP_PROBES), acc3);
            }
        }
        coopStoreT(acc0, &coop_out[coop_out_at(b0)], OUT_STRIDE);
        coopStoreT(acc1, &coop_out[coop_out_at(b1)], OUT_STRIDE);
        coopStoreT(acc2, &coop_out[coop_out_at(b2)], OUT_STRIDE);
        coopStoreT(acc3, &coop_out[coop_out_at(b3)], OUT_STRIDE);
    }
    workgroupBarrier();
    let end = min(params.chunk_start + params.chunk_len, params.rows);
    for (var t = lid; t < COOP_ROWS * COOP_PROBES; t += GEMM_WG) {
        let lr = t % COOP_ROWS;
        let p = t / COOP_ROWS;
        let row = r0 + lr;
        if row < end {
            scores[(probe0 + p) * params.chunk_rows + row - params.chunk_start] =
                coop_score(coop_out[lr * OUT_STRIDE + p], row, probe0 + p);
        }
    }
}
