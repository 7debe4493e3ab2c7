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

#[target_feature(enable = "avx2,fma")]
pub unsafe fn attention_values(out: &mut [f32], p: &[f32], values: [&[f32]; 2], stride: usize, offset: usize) {
    super::attention_values_portable(out, p, values, stride, offset)
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
