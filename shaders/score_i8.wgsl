// i8 rows: exact integer dot products (dot4I8Packed, 4 x i8 per u32), then the same
// single rounding as the CPU engine: f32(raw) * (probe_scale * row_scale).
fn score_row(row: u32, probe0: u32) -> array<f32, PROBE_TILE> {
    var raw: array<i32, PROBE_TILE>;
    let n = params.row_vec4s;
    let g0 = tile_base(row);
    for (var j = 0u; j < n; j++) {
        let g = gallery[g0 + j * TILE_ROWS];
        for (var p = 0u; p < PROBE_TILE; p++) {
            let q = probes[(probe0 + p) * n + j];
            raw[p] += dot4I8Packed(q.x, g.x) + dot4I8Packed(q.y, g.y) + dot4I8Packed(q.z, g.z) + dot4I8Packed(q.w, g.w);
        }
    }
    var out: array<f32, PROBE_TILE>;
    let rs = row_scales[row];
    for (var p = 0u; p < PROBE_TILE; p++) {
        out[p] = f32(raw[p]) * (probe_scales[probe0 + p] * rs);
    }
    return out;
}
