//! Templates: dimension, storage dtype, L2 normalisation and the encodings stored on disk.
//!
//! Every template and probe is L2-normalised on ingest, so a score is the cosine
//! similarity in [-1, 1]. A gallery stores its rows in one of three dtypes:
//!
//! * `f32`: the normalised values as they are.
//! * `f16`: IEEE half precision (round to nearest); scores are within about 2e-3 of f32.
//! * `i8`: symmetric per-row quantisation. With `m = max_i |x_i|` the row's scale is
//!   `s = m / 127` and `q_i = round(x_i / s)` in [-127, 127]. A probe is quantised the
//!   same way. The raw score is the exact integer `sum_i q_i * r_i` (i32), and the
//!   reported score is `(raw as f32) * (s_probe * s_row)`, computed in that order in
//!   f32, so every backend (CPU SIMD, portable CPU, GPU) gives bit-identical scores.
//!
//! Worst-case i8 error: each component is off by at most `s/2 = m/254`, so for a
//! probe `p` and row `g` (both unit length) the dequantised score differs from the
//! exact cosine by at most
//! `(|p|_1 * m_g + |g|_1 * m_p) / 254 + d * m_p * m_g / 254^2` (see
//! [`i8_score_error_bound`]). For random unit vectors at d = 512 (m about 0.14,
//! |x|_1 about 18) that bound is 0.016..0.029; the errors actually seen are far smaller
//! (mean 3.7e-4, p99 1.2e-3, max 2.4e-3 over 1M pairs: `scripts/i8-error.py`), because
//! rounding errors are independent and cancel.

use crate::error::{Error, Result};
use half::f16;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Largest template dimension biogate accepts.
pub const MAX_DIM: usize = 4096;
/// Every stored row starts on a 64-byte boundary so vector loads never straddle rows.
pub const ROW_ALIGN: usize = 64;
/// Largest magnitude of a quantised i8 component.
pub const I8_MAX: f32 = 127.0;

/// How a gallery stores its rows; chosen when the gallery is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    I8,
}

impl Dtype {
    /// All dtypes, in the order reports list them.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::I8];

    /// Bytes per stored component.
    pub fn elem_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 => 2,
            Dtype::I8 => 1,
        }
    }

    /// The code written in segment headers.
    pub fn code(self) -> u32 {
        match self {
            Dtype::F32 => 1,
            Dtype::F16 => 2,
            Dtype::I8 => 3,
        }
    }

    /// Inverse of [`Dtype::code`].
    pub fn from_code(code: u32) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.code() == code)
    }

    /// Lower-case name, as on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::I8 => "i8",
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Check that a gallery dimension is in range.
pub fn check_dim(dim: usize) -> Result<()> {
    if dim == 0 || dim > MAX_DIM {
        return Err(Error::invalid(format!("dimension {dim} is out of range 1..={MAX_DIM}")));
    }
    Ok(())
}

/// Bytes one stored row occupies (padded with zeros to [`ROW_ALIGN`]).
pub fn row_stride(dtype: Dtype, dim: usize) -> usize {
    (dim * dtype.elem_bytes()).div_ceil(ROW_ALIGN) * ROW_ALIGN
}

/// Components per row including the zero padding (what kernels loop over).
pub fn padded_dim(dtype: Dtype, dim: usize) -> usize {
    row_stride(dtype, dim) / dtype.elem_bytes()
}

/// Longest subject id, in bytes of UTF-8.
pub const MAX_SUBJECT_ID_BYTES: usize = 128;

/// A subject id as biogate stores and compares it: checked ([`check_subject_id`]) and
/// in Unicode Normalization Form C, so that ids that look the same are the same
/// subject (`"e\u{301}"`, an e and a combining accent, is `"\u{e9}"`, é). Every id that
/// comes in (enrollment, deletion, verification, manifests, imports, the cluster's
/// shard routing) goes through this; borrowed when it is already canonical.
pub fn canonical_subject_id(id: &str) -> Result<std::borrow::Cow<'_, str>> {
    use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};
    let canonical = match is_nfc_quick(id.chars()) {
        IsNormalized::Yes => std::borrow::Cow::Borrowed(id),
        _ => {
            let nfc: String = id.nfc().collect();
            if nfc == id {
                std::borrow::Cow::Borrowed(id)
            } else {
                std::borrow::Cow::Owned(nfc)
            }
        }
    };
    check_subject_id(&canonical)?;
    Ok(canonical)
}

/// Check a subject id: 1 to 128 bytes of UTF-8 (guaranteed by `&str`), with no
/// control characters, no bidirectional formatting characters (which can make an id
/// display as another: "abc\u{202e}fed" shows as "abcdef") and no characters that
/// display as nothing (zero-width space, word joiner, byte-order mark). The error names
/// the character and its position.
pub fn check_subject_id(id: &str) -> Result<()> {
    check_stored_subject_id(id)?;
    if let Some((at, c, what)) = id
        .chars()
        .enumerate()
        .find_map(|(i, c)| hidden_character(c).map(|w| (i, c, w)))
    {
        return Err(Error::invalid(format!(
            "subject id {:?} contains {what} (U+{:04X}) at character {at}: ids must display as what they are",
            truncate_for_message(id),
            u32::from(c)
        )));
    }
    Ok(())
}

/// What is checked of an id read back from the store's own files (written by any
/// version of biogate): its length and no control characters.
pub fn check_stored_subject_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_SUBJECT_ID_BYTES {
        return Err(Error::invalid(format!(
            "subject id {:?} must be 1 to {MAX_SUBJECT_ID_BYTES} bytes of UTF-8, it is {} bytes",
            truncate_for_message(id),
            id.len()
        )));
    }
    if let Some((at, c)) = id.chars().enumerate().find(|(_, c)| c.is_control()) {
        return Err(Error::invalid(format!(
            "subject id {:?} contains a control character (U+{:04X}) at character {at}",
            truncate_for_message(id),
            u32::from(c)
        )));
    }
    Ok(())
}

/// The kind of a character that changes how an id displays without showing itself.
fn hidden_character(c: char) -> Option<&'static str> {
    match c {
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => {
            Some("a bidirectional formatting character")
        }
        '\u{200B}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' => Some("an invisible character"),
        _ => None,
    }
}

fn truncate_for_message(id: &str) -> &str {
    let mut end = id.len().min(40);
    while !id.is_char_boundary(end) {
        end -= 1;
    }
    &id[..end]
}

/// L2-normalise `row` into `out`; `what` names the row in the error ("probe 3", "row 17").
///
/// Rejects NaN, infinities and zero vectors. The norm is accumulated in f64.
pub fn normalize_into(row: &[f32], out: &mut [f32], what: impl Fn() -> String) -> Result<()> {
    debug_assert_eq!(row.len(), out.len());
    let mut sum = 0.0f64;
    for (i, &x) in row.iter().enumerate() {
        if !x.is_finite() {
            return Err(Error::invalid(format!(
                "{} has a non-finite value ({x}) at component {i}",
                what()
            )));
        }
        sum += f64::from(x) * f64::from(x);
    }
    if sum == 0.0 || !sum.is_finite() {
        return Err(Error::invalid(format!(
            "{} is a zero vector (or too small to normalise)",
            what()
        )));
    }
    let inv = 1.0 / sum.sqrt();
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (f64::from(x) * inv) as f32;
    }
    Ok(())
}

/// Normalise every row of a row-major `rows x dim` matrix; errors name `label` and the row.
pub fn normalize_rows(data: &[f32], dim: usize, label: &str) -> Result<Vec<f32>> {
    if data.is_empty() {
        return Err(Error::invalid(format!("{label}: no templates given")));
    }
    if !data.len().is_multiple_of(dim) {
        return Err(Error::invalid(format!(
            "{label}: {} values is not a whole number of rows of dimension {dim}",
            data.len()
        )));
    }
    let mut out = vec![0.0f32; data.len()];
    for (i, (src, dst)) in data.chunks_exact(dim).zip(out.chunks_exact_mut(dim)).enumerate() {
        normalize_into(src, dst, || format!("{label} {i}"))?;
    }
    Ok(out)
}

/// The i8 scale of a normalised row: `max |x_i| / 127`.
pub fn i8_scale(row: &[f32]) -> f32 {
    let m = row.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
    m / I8_MAX
}

/// Quantise a normalised row to i8 with the given scale (see the module docs).
pub fn quantize_i8(row: &[f32], scale: f32, out: &mut [i8]) {
    let inv = 1.0 / scale;
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x * inv).round().clamp(-I8_MAX, I8_MAX) as i8;
    }
}

/// Encode a normalised row into `out` (one stride, zero padded); returns the row's scale
/// (1.0 for float dtypes, the i8 dequantisation scale for i8).
pub fn encode_row(dtype: Dtype, row: &[f32], out: &mut [u8]) -> f32 {
    out.fill(0);
    match dtype {
        Dtype::F32 => {
            for (chunk, &x) in out.chunks_exact_mut(4).zip(row) {
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            1.0
        }
        Dtype::F16 => {
            for (chunk, &x) in out.chunks_exact_mut(2).zip(row) {
                chunk.copy_from_slice(&f16::from_f32(x).to_le_bytes());
            }
            1.0
        }
        Dtype::I8 => {
            let scale = i8_scale(row);
            let q: &mut [i8] = bytemuck::cast_slice_mut(&mut out[..row.len()]);
            quantize_i8(row, scale, q);
            scale
        }
    }
}

/// Decode a stored row back to f32 (what the engine actually scores against).
pub fn decode_row(dtype: Dtype, dim: usize, bytes: &[u8], scale: f32) -> Vec<f32> {
    match dtype {
        Dtype::F32 => bytes[..dim * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes[..dim * 2]
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::I8 => bytes[..dim].iter().map(|&b| f32::from(b as i8) * scale).collect(),
    }
}

/// The dequantised i8 score from an exact integer dot product; the one formula every
/// backend uses, so that all of them agree bit for bit.
#[inline]
pub fn i8_score(raw: i32, probe_scale: f32, row_scale: f32) -> f32 {
    (raw as f32) * (probe_scale * row_scale)
}

/// Worst-case |cosine(p, g) - i8 score| for two normalised rows (module docs), plus a
/// small allowance for f32 rounding of the final product.
pub fn i8_score_error_bound(p: &[f32], g: &[f32]) -> f64 {
    let l1 = |v: &[f32]| v.iter().map(|&x| f64::from(x.abs())).sum::<f64>();
    let mx = |v: &[f32]| v.iter().fold(0.0f64, |m, &x| m.max(f64::from(x.abs())));
    let (mp, mg) = (mx(p), mx(g));
    (l1(p) * mg + l1(g) * mp) / 254.0 + p.len() as f64 * mp * mg / (254.0 * 254.0) + 1e-6
}

/// Random unit vectors, `rows * dim`, reproducible from `seed`.
pub fn random_unit_rows(rows: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * dim];
    out.par_chunks_mut(dim * 1024).enumerate().for_each(|(c, chunk)| {
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed ^ (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        for row in chunk.chunks_exact_mut(dim) {
            let mut n = 0.0f64;
            for x in row.iter_mut() {
                *x = rand::Rng::sample(&mut rng, rand_distr::StandardNormal);
                n += f64::from(*x) * f64::from(*x);
            }
            let inv = (1.0 / n.sqrt()) as f32;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_rejects_bad_rows_naming_them() {
        let mut out = [0.0; 3];
        let e = normalize_into(&[0.0, 0.0, 0.0], &mut out, || "row 7".into()).unwrap_err();
        assert!(e.to_string().contains("row 7") && e.to_string().contains("zero"));
        let e = normalize_into(&[1.0, f32::NAN, 0.0], &mut out, || "probe 2".into()).unwrap_err();
        assert!(e.to_string().contains("probe 2") && e.to_string().contains("component 1"));
        let e = normalize_into(&[1.0, f32::INFINITY, 0.0], &mut out, || "x".into()).unwrap_err();
        assert!(e.to_string().contains("non-finite"));
        normalize_into(&[3.0, 0.0, 4.0], &mut out, || "x".into()).unwrap();
        assert_eq!(out, [0.6, 0.0, 0.8]);
    }

    #[test]
    fn subject_ids_are_checked() {
        assert!(check_subject_id("alice").is_ok());
        assert!(check_subject_id(&"é".repeat(64)).is_ok());
        assert!(check_subject_id("").is_err());
        assert!(check_subject_id(&"x".repeat(129)).is_err());
        assert!(check_subject_id("a\nb").is_err());
    }

    #[test]
    fn strides_are_aligned() {
        assert_eq!(row_stride(Dtype::F32, 1), 64);
        assert_eq!(row_stride(Dtype::F32, 17), 128);
        assert_eq!(row_stride(Dtype::I8, 513), 576);
        assert_eq!(padded_dim(Dtype::F16, 17), 32);
    }

    #[test]
    fn encode_decode_round_trip_within_dtype_precision() {
        let mut row = vec![0.0f32; 17];
        let raw: Vec<f32> = (0..17).map(|i| (i as f32 * 0.37).sin()).collect();
        normalize_into(&raw, &mut row, || "r".into()).unwrap();
        for dtype in Dtype::ALL {
            let mut buf = vec![0xAAu8; row_stride(dtype, 17)];
            let scale = encode_row(dtype, &row, &mut buf);
            assert!(buf[17 * dtype.elem_bytes()..].iter().all(|&b| b == 0), "padding zeroed");
            let back = decode_row(dtype, 17, &buf, scale);
            let tol = match dtype {
                Dtype::F32 => 0.0,
                Dtype::F16 => 1e-3,
                Dtype::I8 => scale / 2.0 + 1e-7,
            };
            for (a, b) in row.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dtype}: {a} vs {b}");
            }
        }
    }
}
