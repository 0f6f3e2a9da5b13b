// f32 rows and probes: a gallery word is 4 floats, scored against 4 floats of the probe.
alias Word = vec4<f32>;
alias Acc = f32;
// Probe words per gallery word.
const PW: u32 = 1u;

// Part `h` (< PW) of gallery word `w`, as the scan multiplies it.
fn widen(w: vec4<u32>, h: u32) -> Word {
    return bitcast<vec4<f32>>(w);
}
