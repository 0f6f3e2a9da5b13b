// The fused scan's and the merge's work buffers: candidate lists, `keep` slots each.
// The scan writes one list per probe and block to `lists_in`; each merge level reads
// `lists` lists per probe from `lists_in` and writes `out_lists` per probe to
// `lists_out` (the last level writes the shard's result, the only thing read back).
@group(0) @binding(6) var<storage, read_write> lists_in: array<Candidate>;
@group(0) @binding(7) var<storage, read_write> lists_out: array<Candidate>;
