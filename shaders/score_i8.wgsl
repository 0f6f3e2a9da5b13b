// i8 rows and probes: exact integer dot products (dot4I8Packed, 4 x i8 per u32), then
// the same single rounding as the CPU engine: f32(raw) * (probe_scale * row_scale).
alias Word = vec4<u32>;
alias Acc = i32;
// Probe words per gallery word.
const PW: u32 = 1u;

fn widen(w: vec4<u32>, h: u32) -> Word {
    return w;
}

fn probe_word(w: vec4<u32>) -> Word {
    return w;
}

fn fma_word(acc: Acc, g: Word, q: Word) -> Acc {
    return acc + dot4I8Packed(q.x, g.x) + dot4I8Packed(q.y, g.y) + dot4I8Packed(q.z, g.z) + dot4I8Packed(q.w, g.w);
}

fn to_score(acc: Acc, row: u32, probe: u32) -> f32 {
    return f32(acc) * (probe_scales[probe] * row_scales[row]);
}
