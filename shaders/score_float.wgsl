// Float rows (f32, and f16 once widened) against f32 probes: a probe word is 4 floats,
// accumulated in f32 in the order of the words, as the CPU engine does.
fn probe_word(w: vec4<u32>) -> Word {
    return bitcast<vec4<f32>>(w);
}

fn fma_word(acc: Acc, g: Word, q: Word) -> Acc {
    return acc + dot(q, g);
}

fn to_score(acc: Acc, row: u32, probe: u32) -> f32 {
    return acc;
}
