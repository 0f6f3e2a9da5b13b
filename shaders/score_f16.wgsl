// f16 rows: each vec4<u32> holds 8 halves, widened exactly to f32 (as the CPU engine
// does) and scored against f32 probes, so no f16 arithmetic and no SHADER_F16 needed.
alias Word = vec4<f32>;
alias Acc = f32;
// Probe words per gallery word: 8 halves meet 8 floats.
const PW: u32 = 2u;

// Halves 4h..4h + 3 of gallery word `w`, widened.
fn widen(w: vec4<u32>, h: u32) -> Word {
    if h == 0u {
        return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y));
    }
    return vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w));
}
