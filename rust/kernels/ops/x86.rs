//! AVX2 + FMA kernels of the f32 operations: the same 16 partial sums and reduction order as
//! `dot_rows`, with fused multiply-adds (so within rounding of the portable kernel, not
//! bit-equal to it); the portable loops compiled for 8-lane vectors elsewhere.

use std::arch::x86_64::*;

pub fn available() -> bool {
    crate::kernels::cpu::features().avx2_fma
}

/// The portable loops, compiled here for 8-lane vectors (same operations, same bits).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    super::gelu_tanh_mul_portable(gate, up)
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax_from(x: &mut [f32], max: f32) {
    super::softmax_from(x, max)
}

/// The portable loops compiled for 16-lane vectors (same operations, same bits).
#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn gelu_tanh_mul_avx512(gate: &mut [f32], up: &[f32]) {
    super::gelu_tanh_mul_portable(gate, up)
}

#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn softmax_from_avx512(x: &mut [f32], max: f32) {
    super::softmax_from(x, max)
}

/// Whether the AVX-512 versions run here.
pub fn has_avx512() -> bool {
    let f = crate::kernels::cpu::features();
    f.avx2_fma && f.avx512_bw
}

/// Generates `attention_values_into` for one vector width: rows of `p` four at a time share each
/// load of a value row, `C` vectors of columns per row in registers; the columns left over by
/// whole vectors go through `super::values_tail`. Every output is `fma(p, v, acc)` in key
/// order from 0 (or from `out`): the bits of `super::values_tail`.
macro_rules! values_kernel {
    ($name:ident, $tile:ident, $feat:literal, $w:literal, $c:literal, $zero:ident, $load:ident, $store:ident, $set1:ident, $fma:ident) => {
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            out: &mut [f32],
            h: usize,
            p: &[f32],
            p_stride: usize,
            v: super::Values<'_>,
            accumulate: bool,
        ) {
            let (hd, _, split) = super::values_shape(out, h, p, p_stride, v);
            let super::Values { rows: values, stride, offset } = v;
            let full = hd / $w * $w;
            for r0 in (0..h).step_by(4) {
                let rows = (h - r0).min(4);
                let mut c = 0;
                while c < full {
                    let wide = full - c >= $c * $w;
                    // SAFETY: rows r0 .. r0 + rows of `p` (len values each) and `out` (hd each),
                    // columns c .. c + (C or 1)·W ≤ hd of the value rows, as values_shape checked.
                    unsafe {
                        let o = out.as_mut_ptr().add(r0 * hd + c);
                        let args = (
                            o,
                            hd,
                            p.as_ptr().add(r0 * p_stride),
                            p_stride,
                            values,
                            split,
                            stride,
                            offset + c,
                            accumulate,
                        );
                        match (rows, wide) {
                            (4, true) => $tile::<4, $c>(args),
                            (3, true) => $tile::<3, $c>(args),
                            (2, true) => $tile::<2, $c>(args),
                            (1, true) => $tile::<1, $c>(args),
                            (4, false) => $tile::<4, 1>(args),
                            (3, false) => $tile::<3, 1>(args),
                            (2, false) => $tile::<2, 1>(args),
                            _ => $tile::<1, 1>(args),
                        }
                    }
                    c += if wide { $c * $w } else { $w };
                }
            }
            super::values_tail(out, h, p, p_stride, v, accumulate, full);
        }

        /// `R` rows × `C` vectors of columns of `attention_values`.
        ///
        /// # Safety
        /// Inside a function enabling the features; the pointers cover what `values_kernel`
        /// checked.
        #[inline(always)]
        #[allow(clippy::type_complexity)]
        unsafe fn $tile<const R: usize, const C: usize>(
            (out, hd, p, p_stride, values, split, stride, offset, accumulate): (
                *mut f32,
                usize,
                *const f32,
                usize,
                [&[f32]; 2],
                usize,
                usize,
                usize,
                bool,
            ),
        ) {
            // SAFETY: the caller's contract.
            unsafe {
                let mut acc = [[$zero(); C]; R];
                if accumulate {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        for (c, acc) in acc.iter_mut().enumerate() {
                            *acc = $load(out.add(r * hd + $w * c));
                        }
                    }
                }
                for (seg, first) in [(values[0], 0), (values[1], split)] {
                    let count = seg.len() / stride;
                    let base = seg.as_ptr().add(offset);
                    for k in 0..count {
                        let v = base.add(k * stride);
                        let x: [_; C] = std::array::from_fn(|c| $load(v.add($w * c)));
                        for (r, acc) in acc.iter_mut().enumerate() {
                            let a = $set1(*p.add(r * p_stride + first + k));
                            for (acc, x) in acc.iter_mut().zip(&x) {
                                *acc = $fma(a, *x, *acc);
                            }
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (c, acc) in acc.iter().enumerate() {
                        $store(out.add(r * hd + $w * c), *acc);
                    }
                }
            }
        }
    };
}

values_kernel!(
    attention_values,
    values_tile_avx2,
    "avx2,fma",
    8,
    2,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_set1_ps,
    _mm256_fmadd_ps
);
values_kernel!(
    attention_values_avx512,
    values_tile_avx512,
    "avx2,fma,avx512f",
    16,
    4,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_set1_ps,
    _mm512_fmadd_ps
);

/// `dot4_f32` on 512-bit vectors: lane `j` of one zmm is lane `j` of the AVX2 version's
/// two-register accumulator, and the reduction is the same, so the bits are the same.
#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn dot4_f32_avx512(w: &[f32], xs: [&[f32]; 4]) -> [f32; 4] {
    let n = w.len();
    let full = n / 16 * 16;
    assert!(xs.iter().all(|x| x.len() >= n));
    let wp = w.as_ptr();
    let xp = xs.map(|x| x.as_ptr());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= n, and every slice holds at least n elements.
        unsafe {
            let wv = _mm512_loadu_ps(wp.add(c));
            for i in 0..4 {
                acc[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xp[i].add(c)), acc[i]);
            }
        }
        c += 16;
    }
    let mut out = [0f32; 4];
    for i in 0..4 {
        let tail: f32 = (full..n).map(|j| w[j] * xs[i][j]).sum();
        let (lo, hi) =
            (_mm512_castps512_ps256(acc[i]), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[i]))));
        out[i] = reduce(lo, hi) + tail;
    }
    out
}

/// `dot4_f32_avx512` of four weight rows at once (`out[k][i]` is `w[k]` with `xs[i]`): each
/// load of an `x` feeds four rows, the 16 sums stay in registers; the same bits as four calls.
#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn dot4x4_f32_avx512(w: [&[f32]; 4], xs: [&[f32]; 4]) -> [[f32; 4]; 4] {
    let n = w[0].len();
    let full = n / 16 * 16;
    assert!(w.iter().all(|w| w.len() == n) && xs.iter().all(|x| x.len() >= n));
    let wp = w.map(|w| w.as_ptr());
    let xp = xs.map(|x| x.as_ptr());
    let mut acc = [[_mm512_setzero_ps(); 4]; 4];
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= n, and every slice holds at least n elements.
        unsafe {
            let x = xp.map(|x| _mm512_loadu_ps(x.add(c)));
            for (acc, w) in acc.iter_mut().zip(wp) {
                let wv = _mm512_loadu_ps(w.add(c));
                for (acc, x) in acc.iter_mut().zip(x) {
                    *acc = _mm512_fmadd_ps(wv, x, *acc);
                }
            }
        }
        c += 16;
    }
    std::array::from_fn(|k| {
        std::array::from_fn(|i| {
            let tail: f32 = (full..n).map(|j| w[k][j] * xs[i][j]).sum();
            let a = acc[k][i];
            reduce(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)))) + tail
        })
    })
}

/// `dot1_f32` on 512-bit vectors, the same bits (see `dot4_f32_avx512`).
#[target_feature(enable = "avx2,fma,avx512f")]
pub unsafe fn dot1_f32_avx512(w: &[f32], x: &[f32]) -> f32 {
    let n = w.len();
    let full = n / 16 * 16;
    assert!(x.len() >= n);
    let mut acc = _mm512_setzero_ps();
    let mut c = 0;
    while c < full {
        // SAFETY: c + 16 <= n for both slices.
        unsafe { acc = _mm512_fmadd_ps(_mm512_loadu_ps(w.as_ptr().add(c)), _mm512_loadu_ps(x.as_ptr().add(c)), acc) };
        c += 16;
    }
    let tail: f32 = (full..n).map(|j| w[j] * x[j]).sum();
    reduce(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)))) + tail
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_f32(p: *const f32) -> __m256 {
    unsafe { _mm256_loadu_ps(p) }
}

/// Eight bf16 values widened to f32 (a 16-bit shift of each lane).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load_bf16(p: *const u16) -> __m256 {
    unsafe {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// (a + b) over 8 lanes, then high + low 128 bits, then (q0 + q2) + (q1 + q3).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn reduce(a: __m256, b: __m256) -> f32 {
    let h = _mm256_add_ps(a, b);
    let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
    let pair = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps::<0b01>(pair, pair)))
}

macro_rules! kernels {
    ($dot4:ident, $dot1:ident, $elem:ty, $load:ident) => {
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn $dot4(w: &[$elem], xs: [&[f32]; 4]) -> [f32; 4] {
            let n = w.len();
            let full = n / 16 * 16;
            assert!(xs.iter().all(|x| x.len() >= n));
            let wp = w.as_ptr();
            let xp = xs.map(|x| x.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut c = 0;
            while c < full {
                // SAFETY: c + 16 <= n, and every slice holds at least n elements.
                unsafe {
                    let (w0, w1) = ($load(wp.add(c)), $load(wp.add(c + 8)));
                    for i in 0..4 {
                        acc[2 * i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp[i].add(c)), acc[2 * i]);
                        acc[2 * i + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp[i].add(c + 8)), acc[2 * i + 1]);
                    }
                }
                c += 16;
            }
            let mut out = [0f32; 4];
            for i in 0..4 {
                let tail: f32 = (full..n).map(|j| super::Elem::f32(w[j]) * xs[i][j]).sum();
                out[i] = reduce(acc[2 * i], acc[2 * i + 1]) + tail;
            }
            out
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn $dot1(w: &[$elem], x: &[f32]) -> f32 {
            let n = w.len();
            let full = n / 16 * 16;
            assert!(x.len() >= n);
            let (wp, xp) = (w.as_ptr(), x.as_ptr());
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut c = 0;
            while c < full {
                // SAFETY: c + 16 <= n for both slices.
                unsafe {
                    a0 = _mm256_fmadd_ps($load(wp.add(c)), _mm256_loadu_ps(xp.add(c)), a0);
                    a1 = _mm256_fmadd_ps($load(wp.add(c + 8)), _mm256_loadu_ps(xp.add(c + 8)), a1);
                }
                c += 16;
            }
            let tail: f32 = (full..n).map(|j| super::Elem::f32(w[j]) * x[j]).sum();
            reduce(a0, a1) + tail
        }
    };
}

kernels!(dot4_f32, dot1_f32, f32, load_f32);
kernels!(dot4_bf16, dot1_bf16, u16, load_bf16);
