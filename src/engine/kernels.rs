//! Dot-product kernels for the CPU backend: a small tile of probes x rows at a time.
//!
//! All loops run over the padded row length (rows and probes are zero padded to a
//! 64-byte multiple), so there are no tails. On x86-64 with AVX2 + FMA + F16C
//! (detected at run time) the tiles use 256-bit registers: P probes x R rows of
//! accumulators, each row vector loaded once per P probes. Elsewhere a portable
//! scalar loop computes the same products. i8 products are exact integers on every path.

/// Which implementation the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx2,
    Portable,
}

impl Isa {
    /// The best the running CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// Score `P` probes against the rows of `rows` (row-major, `len` elements each, the
/// element type given by the caller's choice of function) into `out[p * n + r]`.
pub fn tile_f32(isa: Isa, probes: &[&[f32]], rows: &[f32], len: usize, out: &mut [f32]) {
    let n = rows.len() / len;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: the features were detected at run time (Isa::detect).
        unsafe { avx2::tile_f32(probes, rows, len, n, out) };
        return;
    }
    let _ = isa;
    for (p, probe) in probes.iter().enumerate() {
        for r in 0..n {
            let row = &rows[r * len..(r + 1) * len];
            out[p * n + r] = probe.iter().zip(row).map(|(a, b)| a * b).sum();
        }
    }
}

/// As [`tile_f32`], rows stored as IEEE half precision.
pub fn tile_f16(isa: Isa, probes: &[&[f32]], rows: &[half::f16], len: usize, out: &mut [f32]) {
    let n = rows.len() / len;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: the features were detected at run time (Isa::detect).
        unsafe { avx2::tile_f16(probes, rows, len, n, out) };
        return;
    }
    let _ = isa;
    for (p, probe) in probes.iter().enumerate() {
        for r in 0..n {
            let row = &rows[r * len..(r + 1) * len];
            out[p * n + r] = probe.iter().zip(row).map(|(a, b)| a * b.to_f32()).sum();
        }
    }
}

/// Exact integer dot products of i8 rows with probes widened to i16.
pub fn tile_i8(isa: Isa, probes: &[&[i16]], rows: &[i8], len: usize, out: &mut [i32]) {
    let n = rows.len() / len;
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: the features were detected at run time (Isa::detect).
        unsafe { avx2::tile_i8(probes, rows, len, n, out) };
        return;
    }
    let _ = isa;
    for (p, probe) in probes.iter().enumerate() {
        for r in 0..n {
            let row = &rows[r * len..(r + 1) * len];
            out[p * n + r] = probe.iter().zip(row).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Distance ahead of the rows being scored at which to prefetch. A one-probe scan is
    /// a sequential read that the hardware prefetcher drops at every page boundary.
    const PREFETCH_DISTANCE: usize = 4096;

    /// Prefetch the `bytes` that lie `PREFETCH_DISTANCE` after byte `at` of a `total`-byte block.
    #[inline(always)]
    fn prefetch_ahead(base: *const i8, at: usize, bytes: usize, total: usize) {
        let start = at + PREFETCH_DISTANCE;
        let end = (start + bytes).min(total);
        let mut off = start;
        while off < end {
            // SAFETY: prefetching is a hint; the address is inside the block.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(off)) };
            off += 64;
        }
    }

    #[inline(always)]
    fn hsum_ps(v: __m256) -> f32 {
        // SAFETY: only called from functions compiled with AVX2 enabled.
        unsafe {
            let lo = _mm256_castps256_ps128(v);
            let hi = _mm256_extractf128_ps(v, 1);
            let s = _mm_add_ps(lo, hi);
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }

    #[inline(always)]
    fn hsum_epi32(v: __m256i) -> i32 {
        // SAFETY: only called from functions compiled with AVX2 enabled.
        unsafe {
            let lo = _mm256_castsi256_si128(v);
            let hi = _mm256_extracti128_si256(v, 1);
            let s = _mm_add_epi32(lo, hi);
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
            _mm_cvtsi128_si32(s)
        }
    }

    /// Generates the P x R register tile and the driver that covers all probes and rows.
    macro_rules! float_tile {
        ($tile:ident, $micro:ident, $elem:ty, $load:ident, $prefetch:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $micro<const P: usize, const R: usize>(
                probes: [*const f32; P],
                rows: [*const $elem; R],
                len: usize,
            ) -> [[f32; R]; P] {
                let mut acc = [[_mm256_setzero_ps(); R]; P];
                let mut i = 0;
                while i < len {
                    let mut rv = [_mm256_setzero_ps(); R];
                    for r in 0..R {
                        // SAFETY: i + 8 <= len and every row has len elements.
                        rv[r] = unsafe { $load!(rows[r].add(i)) };
                    }
                    for p in 0..P {
                        // SAFETY: as above, for the probe.
                        let pv = unsafe { _mm256_loadu_ps(probes[p].add(i)) };
                        for r in 0..R {
                            acc[p][r] = _mm256_fmadd_ps(pv, rv[r], acc[p][r]);
                        }
                    }
                    i += 8;
                }
                let mut out = [[0.0; R]; P];
                for p in 0..P {
                    for r in 0..R {
                        out[p][r] = hsum_ps(acc[p][r]);
                    }
                }
                out
            }

            #[target_feature(enable = "avx2,fma,f16c")]
            pub unsafe fn $tile(probes: &[&[f32]], rows: &[$elem], len: usize, n: usize, out: &mut [f32]) {
                debug_assert!(len.is_multiple_of(8) && rows.len() >= n * len);
                let row = |r: usize| rows[r * len..].as_ptr();
                let mut p = 0;
                while p < probes.len() {
                    let left = probes.len() - p;
                    if left >= 4 {
                        let pp = [0, 1, 2, 3].map(|j| probes[p + j].as_ptr());
                        let mut r = 0;
                        while r + 2 <= n {
                            // SAFETY: rows r, r+1 exist; probes have len elements.
                            let t = unsafe { $micro::<4, 2>(pp, [row(r), row(r + 1)], len) };
                            for j in 0..4 {
                                out[(p + j) * n + r] = t[j][0];
                                out[(p + j) * n + r + 1] = t[j][1];
                            }
                            r += 2;
                        }
                        if r < n {
                            // SAFETY: as above.
                            let t = unsafe { $micro::<4, 1>(pp, [row(r)], len) };
                            for j in 0..4 {
                                out[(p + j) * n + r] = t[j][0];
                            }
                        }
                        p += 4;
                    } else {
                        let pp = [probes[p].as_ptr()];
                        let mut r = 0;
                        while r + 4 <= n {
                            if $prefetch {
                                let e = size_of::<$elem>();
                                prefetch_ahead(rows.as_ptr().cast(), r * len * e, 4 * len * e, rows.len() * e);
                            }
                            // SAFETY: rows r..r+4 exist.
                            let t = unsafe { $micro::<1, 4>(pp, [row(r), row(r + 1), row(r + 2), row(r + 3)], len) };
                            out[p * n + r..p * n + r + 4].copy_from_slice(&t[0]);
                            r += 4;
                        }
                        while r < n {
                            // SAFETY: row r exists.
                            out[p * n + r] = unsafe { $micro::<1, 1>(pp, [row(r)], len) }[0][0];
                            r += 1;
                        }
                        p += 1;
                    }
                }
            }
        };
    }

    macro_rules! load_f32 {
        ($ptr:expr) => {
            _mm256_loadu_ps($ptr)
        };
    }
    macro_rules! load_f16 {
        ($ptr:expr) => {
            _mm256_cvtph_ps(_mm_loadu_si128($ptr as *const __m128i))
        };
    }
    // Measured (scripts/cpu-bench.sh): prefetching helps f16 and i8 one-probe scans
    // by about 1.5x and does nothing for f32, whose wider loads keep the hardware busy.
    float_tile!(tile_f32, micro_f32, f32, load_f32, false);
    float_tile!(tile_f16, micro_f16, half::f16, load_f16, true);

    #[target_feature(enable = "avx2")]
    unsafe fn micro_i8<const P: usize, const R: usize>(
        probes: [*const i16; P],
        rows: [*const i8; R],
        len: usize,
    ) -> [[i32; R]; P] {
        let mut acc = [[_mm256_setzero_si256(); R]; P];
        let mut i = 0;
        while i < len {
            let mut rv = [_mm256_setzero_si256(); R];
            for r in 0..R {
                // SAFETY: i + 16 <= len and every row has len elements.
                rv[r] = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(rows[r].add(i) as *const __m128i) });
            }
            for p in 0..P {
                // SAFETY: as above, for the probe.
                let pv = unsafe { _mm256_loadu_si256(probes[p].add(i) as *const __m256i) };
                for r in 0..R {
                    acc[p][r] = _mm256_add_epi32(acc[p][r], _mm256_madd_epi16(pv, rv[r]));
                }
            }
            i += 16;
        }
        let mut out = [[0; R]; P];
        for p in 0..P {
            for r in 0..R {
                out[p][r] = hsum_epi32(acc[p][r]);
            }
        }
        out
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn tile_i8(probes: &[&[i16]], rows: &[i8], len: usize, n: usize, out: &mut [i32]) {
        debug_assert!(len.is_multiple_of(16) && rows.len() >= n * len);
        let row = |r: usize| rows[r * len..].as_ptr();
        let mut p = 0;
        while p < probes.len() {
            if probes.len() - p >= 4 {
                let pp = [0, 1, 2, 3].map(|j| probes[p + j].as_ptr());
                let mut r = 0;
                while r + 2 <= n {
                    // SAFETY: rows r, r+1 exist; probes have len elements.
                    let t = unsafe { micro_i8::<4, 2>(pp, [row(r), row(r + 1)], len) };
                    for j in 0..4 {
                        out[(p + j) * n + r] = t[j][0];
                        out[(p + j) * n + r + 1] = t[j][1];
                    }
                    r += 2;
                }
                if r < n {
                    // SAFETY: as above.
                    let t = unsafe { micro_i8::<4, 1>(pp, [row(r)], len) };
                    for j in 0..4 {
                        out[(p + j) * n + r] = t[j][0];
                    }
                }
                p += 4;
            } else {
                let pp = [probes[p].as_ptr()];
                let mut r = 0;
                while r + 4 <= n {
                    prefetch_ahead(rows.as_ptr().cast(), r * len, 4 * len, rows.len());
                    // SAFETY: rows r..r+4 exist.
                    let t = unsafe { micro_i8::<1, 4>(pp, [row(r), row(r + 1), row(r + 2), row(r + 3)], len) };
                    out[p * n + r..p * n + r + 4].copy_from_slice(&t[0]);
                    r += 4;
                }
                while r < n {
                    // SAFETY: row r exists.
                    out[p * n + r] = unsafe { micro_i8::<1, 1>(pp, [row(r)], len) }[0][0];
                    r += 1;
                }
                p += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avx2_and_portable_agree() {
        let isa = Isa::detect();
        let len = 64;
        let rows: Vec<f32> = (0..len * 7).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
        let probes: Vec<Vec<f32>> = (0..6)
            .map(|p| (0..len).map(|i| ((i + p * 5) % 11) as f32 / 11.0).collect())
            .collect();
        let refs: Vec<&[f32]> = probes.iter().map(|p| p.as_slice()).collect();
        let (mut a, mut b) = (vec![0.0; 6 * 7], vec![0.0; 6 * 7]);
        tile_f32(isa, &refs, &rows, len, &mut a);
        tile_f32(Isa::Portable, &refs, &rows, len, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        let rows16: Vec<half::f16> = rows.iter().map(|&x| half::f16::from_f32(x)).collect();
        tile_f16(isa, &refs, &rows16, len, &mut a);
        tile_f16(Isa::Portable, &refs, &rows16, len, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        let rows8: Vec<i8> = (0..len * 7)
            .map(|i| ((i * 53) % 255) as i32 - 127)
            .map(|v| v as i8)
            .collect();
        let p16: Vec<Vec<i16>> = (0..6)
            .map(|p| (0..len).map(|i| (((i * 29 + p * 7) % 255) as i16) - 127).collect())
            .collect();
        let refs16: Vec<&[i16]> = p16.iter().map(|p| p.as_slice()).collect();
        let (mut c, mut d) = (vec![0; 6 * 7], vec![0; 6 * 7]);
        tile_i8(isa, &refs16, &rows8, len, &mut c);
        tile_i8(Isa::Portable, &refs16, &rows8, len, &mut d);
        assert_eq!(c, d);
    }
}
