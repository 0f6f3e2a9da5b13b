// f32 rows: one invocation scores one row against the PROBE_TILE probes of its tile.
fn score_row(row: u32, probe0: u32) -> array<f32, PROBE_TILE> {
    var acc: array<f32, PROBE_TILE>;
    let n = params.row_vec4s;
    let g0 = tile_base(row);
    for (var j = 0u; j < n; j++) {
        let g = bitcast<vec4<f32>>(gallery[g0 + j * TILE_ROWS]);
        for (var p = 0u; p < PROBE_TILE; p++) {
            acc[p] += dot(bitcast<vec4<f32>>(probes[(probe0 + p) * n + j]), g);
        }
    }
    return acc;
}
