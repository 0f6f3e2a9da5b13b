// f16 rows: each vec4<u32> holds 8 halves, widened exactly to f32 (as the CPU engine
// does) and scored against f32 probes, so no f16 arithmetic and no SHADER_F16 needed.
fn score_row(row: u32, probe0: u32) -> array<f32, PROBE_TILE> {
    var acc: array<f32, PROBE_TILE>;
    let n = params.row_vec4s;
    let g0 = tile_base(row);
    for (var j = 0u; j < n; j++) {
        let w = gallery[g0 + j * TILE_ROWS];
        let lo = vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
        let hi = vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
        for (var p = 0u; p < PROBE_TILE; p++) {
            let at = (probe0 + p) * params.probe_vec4s + 2u * j;
            acc[p] += dot(bitcast<vec4<f32>>(probes[at]), lo) + dot(bitcast<vec4<f32>>(probes[at + 1u]), hi);
        }
    }
    return acc;
}
