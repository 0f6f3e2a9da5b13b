// Bindings shared by every biogate kernel. One dispatch covers one shard of one slab:
// `gallery` holds its rows (`row_vec4s` vec4<u32> per row, zero padded) interleaved in
// tiles of TILE_ROWS rows: word j of the tile's rows, then word j + 1 (see tile_base),
// so the invocations reading consecutive rows read consecutive words. `row_keys` the
// tie-break rank of each row's subject (DEAD for deleted subjects: the tombstone mask),
// `row_scales` the i8 dequantisation scale of each row.
//
// Bindings 6 and 7 are the work buffers, declared by each module (lists.wgsl for the
// fused scan and the merge, two_stage.wgsl for the GEMM and its selection).
//
// The host prepends the kernel shape as constants (see shaders.rs): WG (invocations per
// workgroup), PROBE_TILE (probes per workgroup), CAP (candidate slots per probe in
// workgroup memory), ROW_TILE, ROWS_PER_INV, PROBES_PER_INV, SLICE, STAGE_ROWS and
// ROW_SLOTS (the scan's register blocking and staging, scan.wgsl).

struct Params {
    rows: u32,           // rows in this shard
    row_vec4s: u32,      // vec4<u32> per gallery row
    probe_vec4s: u32,    // vec4<u32> per probe (f16 rows are scored against f32 probes)
    keep: u32,           // candidates kept per list (<= CAP - ROUND)
    blocks: u32,         // scan: workgroups along the rows
    rows_per_block: u32, // scan: rows each of them scans (a multiple of ROW_TILE)
    floor: f32,          // lowest admissible score (the threshold, or -FLT_MAX)
    lists: u32,          // merge: lists per probe in lists_in
    fan: u32,            // merge: lists each workgroup merges
    out_lists: u32,      // merge: lists per probe written to lists_out
    chunk_start: u32,    // two-stage: the chunk's first row in the shard
    chunk_len: u32,      // two-stage: rows in the chunk
    chunk_rows: u32,     // two-stage: rows per probe in the score buffer (its stride)
    first_block: u32,    // two-stage: the list of the chunk's first segment
    probes_padded: u32,  // two-stage: probes in the word-major probe buffer
    pad0: u32,
    pad1: u32,
    pad2: u32,
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
const POISON: u32 = 0xdeadbeefu;
const MIN_SCORE: f32 = -3.40282347e38;
// Offers per probe between two checks of the selection buffers (select.wgsl): one per
// row group of the scan (scan.wgsl), and the merge feeds its lists at the same pace.
const ROUND: u32 = ROW_TILE / ROWS_PER_INV;

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gallery: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> row_keys: array<u32>;
@group(0) @binding(3) var<storage, read> row_scales: array<f32>;
@group(0) @binding(4) var<storage, read> probes: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> probe_scales: array<f32>;

// Index in `gallery` of word 0 of `row`; word j is at tile_base(row) + j * TILE_ROWS.
fn tile_base(row: u32) -> u32 {
    return (row / TILE_ROWS) * params.row_vec4s * TILE_ROWS + row % TILE_ROWS;
}

// Word `word` of shard row `row`, zero past the rows of this block or past the row.
fn gallery_word(row: u32, end: u32, word: u32) -> vec4<u32> {
    if row < end && word < params.row_vec4s {
        return gallery[tile_base(row) + word * TILE_ROWS];
    }
    return vec4<u32>();
}

// Vec4 `word` of probe `probe`, zero past its end.
fn probe_raw(probe: u32, word: u32) -> vec4<u32> {
    if word < params.probe_vec4s {
        return probes[probe * params.probe_vec4s + word];
    }
    return vec4<u32>();
}
