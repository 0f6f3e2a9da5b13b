// Bindings shared by every biogate kernel. One dispatch covers one shard of one slab:
// `gallery` holds its rows (`row_vec4s` vec4<u32> per row, zero padded) interleaved in
// tiles of TILE_ROWS rows: word j of the tile's rows, then word j + 1 (see tile_base),
// so the invocations scoring consecutive rows read consecutive words. `row_keys` the
// tie-break rank of each row's subject (DEAD for deleted subjects: the tombstone mask),
// `row_scales` the i8 dequantisation scale of each row.
//
// The host prepends PROBE_TILE (probes per workgroup), CAP (candidate slots per probe
// in workgroup memory, a power of two >= keep + WG) and WG (invocations per workgroup).

struct Params {
    rows: u32,           // rows in this shard
    row_vec4s: u32,      // vec4<u32> per gallery row
    probe_vec4s: u32,    // vec4<u32> per probe (f16 rows are scored against f32 probes)
    keep: u32,           // candidates kept per probe and block (<= CAP - WG)
    blocks: u32,         // workgroups along the rows
    rows_per_block: u32, // rows each of them scans
    floor: f32,          // lowest admissible score (the threshold, or -FLT_MAX)
    pad: u32,
}

// One selected row. `row == EMPTY` marks a slot with no candidate.
struct Candidate {
    score: f32,
    key: u32,
    row: u32,
}

const TILE_ROWS: u32 = 64u;
const EMPTY: u32 = 0xffffffffu;
const DEAD: u32 = 0xffffffffu;
const MIN_SCORE: f32 = -3.40282347e38;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gallery: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> row_keys: array<u32>;
@group(0) @binding(3) var<storage, read> row_scales: array<f32>;
@group(0) @binding(4) var<storage, read> probes: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> probe_scales: array<f32>;
@group(0) @binding(6) var<storage, read_write> block_best: array<Candidate>;
@group(0) @binding(7) var<storage, read_write> best: array<Candidate>;

// Index in `gallery` of word 0 of `row`; word j is at tile_base(row) + j * TILE_ROWS.
fn tile_base(row: u32) -> u32 {
    return (row / TILE_ROWS) * params.row_vec4s * TILE_ROWS + row % TILE_ROWS;
}
