// The two-stage path's product on the SIMT cores (see two_stage.wgsl): workgroup
// (probe tile, row tile) computes GEMM_ROWS x GEMM_PROBES scores; its invocations form a
// 16 x 16 grid, each holding an 8 x 8 register block of scores: rows tx + 16 i, probes
// ty + 16 j. Both operands go through workgroup memory KW probe words at a time (a
// k-step); the next k-step's words are loaded from memory into registers while this
// one's are multiplied.
//
// The host prepends GEMM_ROWS, GEMM_PROBES and KW, and generates `load_step` and
// `store_step` (this invocation's share of a k-step's words, from memory to registers
// and from registers to workgroup memory), `gemm_step` (the k-step's multiply-adds) and
// `gemm_write` (the scores of the register block), every loop written out so that the
// accumulators and staged words are indexed by constants and stay in registers.

// Gallery words per k-step (f16 rows hold two probe words per gallery word).
const GW: u32 = KW / PW;
const GEMM_BLOCK: u32 = 64u;

var<workgroup> step_rows: array<Word, KW * GEMM_ROWS>;
var<workgroup> step_probes: array<Word, KW * GEMM_PROBES>;

@compute @workgroup_size(WG)
fn gemm(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let probe0 = wg.x * GEMM_PROBES;
    let r0 = params.chunk_start + wg.y * GEMM_ROWS;
    let tx = lid % 16u;
    let ty = lid / 16u;
    var acc: array<Acc, GEMM_BLOCK>;
    var next = load_step(lid, r0, probe0, 0u);
    for (var k0 = 0u; k0 < params.probe_vec4s; k0 += KW) {
        workgroupBarrier();
        store_step(lid, next);
        workgroupBarrier();
        if k0 + KW < params.probe_vec4s {
            next = load_step(lid, r0, probe0, k0 + KW);
        }
        acc = gemm_step(acc, tx, ty);
    }
    gemm_write(acc, r0, probe0, tx, ty);
}

