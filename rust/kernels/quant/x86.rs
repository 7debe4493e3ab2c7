//! Q8_0 kernels for x86_64: AVX2 (+FMA, F16C), and AVX-512 VNNI's `vpdpbusd` on 256-bit vectors
//! where the CPU has it.
//!
//! Per block: the 32 weight and activation int8 values are multiplied and summed into 8 i32 lanes
//! (AVX2: `maddubs` of |w| with x·sign(w), then `madd` with ones, as ggml does; VNNI: one
//! `vpdpbusd`, see `vnni_tile`), converted to f32 and added into 8 float lanes with the block's
//! scale `f16(w.d) * x.d` by one FMA. The lanes are summed once, at the end, in a fixed order.

use super::{BlockQ8_0, Kernel, QRow, QK8_0};
use std::arch::x86_64::*;

pub fn available() -> Vec<&'static Kernel> {
    let f = crate::kernels::cpu::features();
    let avx2 = f.avx2_fma && f.f16c;
    let mut v: Vec<&'static Kernel> = Vec::new();
    if avx2 && f.avx512_vnni {
        v.push(&AVX512_VNNI);
    }
    if avx2 {
        v.push(&AVX2);
    }
    v
}

pub fn has_avx2() -> bool {
    crate::kernels::cpu::features().avx2_fma
}

/// The portable quantizers compiled here for 8-lane vectors (same operations, same bits).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    super::quantize_row_q8_0_portable(x, out)
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_activations(x: &[f32], d: &mut [f32], qs: &mut [i8]) {
    super::quantize_activations_portable(x, d, qs)
}

pub static AVX2: Kernel = Kernel { name: "avx2", dot4: avx2_dot4, dot1: avx2_dot1, tile4: avx2_tile };
pub static AVX512_VNNI: Kernel = Kernel { name: "avx512vnni", dot4: vnni_dot4, dot1: vnni_dot1, tile4: vnni_tile4 };

/// The f16 scale of a weight block as f32 (F16C).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale(d: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)))
}

/// Sum of the 8 lanes in a fixed order: (0+4, 1+5, 2+6, 3+7), then pairs, then the last two.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum(v: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let p = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(p, _mm_shuffle_ps::<1>(p, p)))
}

/// # Safety
/// `p` points to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load32(p: *const i8) -> __m256i {
    // SAFETY: the caller guarantees 32 readable bytes; the load is unaligned.
    unsafe { _mm256_loadu_si256(p as *const __m256i) }
}

/// Pairwise products of |w| (u8) and x·sign(w) (i8) summed into 8 i32 lanes (ggml's trick to use
/// `maddubs`, which multiplies unsigned by signed bytes; activations within ±127 keep its i16
/// sums exact, even for a weight of −128, whose "absolute value" 128 is read unsigned).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn avx2_block(abs_w: __m256i, w: __m256i, x: __m256i) -> __m256i {
    let signed_x = _mm256_sign_epi8(x, w);
    _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, signed_x), _mm256_set1_epi16(1))
}

/// The shared loop: `T` activation rows against one weight row, block by block; `block` is one
/// of the two i8 products above, inlined into each target-feature wrapper below. Each token goes
/// through the same operations in the same order whatever `T`, so `dot4` and `dot1` agree bit
/// for bit.
#[inline(always)]
unsafe fn dot_rows<const T: usize>(
    w: &[BlockQ8_0],
    xs: [QRow<'_>; T],
    block: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
) -> [f32; T] {
    // SAFETY (whole function): the caller runs this inside a function enabling avx2, fma and
    // f16c, and guarantees each row has `w.len()` scales and `32 * w.len()` values.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); T];
        for (b, wb) in w.iter().enumerate() {
            let wq = load32(wb.qs.as_ptr());
            let abs_w = _mm256_sign_epi8(wq, wq);
            let dw = scale(wb.d);
            for t in 0..T {
                let xq = load32(xs[t].qs.as_ptr().add(b * QK8_0));
                let sums = _mm256_cvtepi32_ps(block(abs_w, wq, xq));
                let d = _mm256_set1_ps(dw * *xs[t].d.get_unchecked(b));
                acc[t] = _mm256_fmadd_ps(d, sums, acc[t]);
            }
        }
        acc.map(|a| hsum(a))
    }
}

/// The two entry points of a kernel from its block product.
macro_rules! entry_points {
    ($features:literal, $block:ident, $dot4:ident, $dot1:ident) => {
        #[target_feature(enable = $features)]
        unsafe fn $dot4(w: &[BlockQ8_0], xs: [QRow<'_>; 4]) -> [f32; 4] {
            // SAFETY: features enabled here; lengths are the caller's contract.
            unsafe { dot_rows(w, xs, |a, w, x| $block(a, w, x)) }
        }

        #[target_feature(enable = $features)]
        unsafe fn $dot1(w: &[BlockQ8_0], x: QRow<'_>) -> f32 {
            // SAFETY: as above.
            unsafe { dot_rows(w, [x], |a, w, x| $block(a, w, x))[0] }
        }
    };
}

entry_points!("avx2,fma,f16c", avx2_block, avx2_dot4, avx2_dot1);

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile(w: [&[BlockQ8_0]; 4], xs: [QRow<'_>; 4]) -> [[f32; 4]; 4] {
    // SAFETY: as `avx2_dot4`, row by row (so the bits are those of `dot4`).
    w.map(|w| unsafe { avx2_dot4(w, xs) })
}

/// The AVX-512 VNNI loop: `R` weight rows against `T` activation rows, block by block.
///
/// `vpdpbusd` multiplies unsigned by signed bytes, so the activations are made unsigned
/// (`x + 128`, an xor of the sign bit) and each sum starts from `-128 Σw` instead of zero:
/// `-128 Σw + Σ (x + 128) w = Σ x w`, exact in i32 for any int8 values. Per (row, token, block)
/// that is four instructions: `vpdpbusd`, a conversion, the scale product (the weight's and the
/// activation's scales, each broadcast once per block and shared across the tile) and an FMA;
/// loads, the correction and the scales are shared by the tile's other rows or tokens. Each
/// (row, token) pair goes through the same operations in the same order whatever `R` and `T`.
#[inline(always)]
unsafe fn vnni_tile<const R: usize, const T: usize>(w: [&[BlockQ8_0]; R], xs: [QRow<'_>; T]) -> [[f32; T]; R] {
    // SAFETY (whole function): the caller runs this inside a function enabling avx2, fma, f16c,
    // avx512vnni and avx512vl, and guarantees every weight row has `w[0].len()` blocks and each
    // activation row `w[0].len()` scales and `32 * w[0].len()` values.
    unsafe {
        let bias = _mm256_set1_epi8(-128);
        let zero = _mm256_setzero_si256();
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for b in 0..w[0].len() {
            let mut xu = [zero; T];
            let mut dx = [_mm256_setzero_ps(); T];
            for t in 0..T {
                xu[t] = _mm256_xor_si256(load32(xs[t].qs.as_ptr().add(b * QK8_0)), bias);
                dx[t] = opaque(_mm256_set1_ps(*xs[t].d.get_unchecked(b)));
            }
            for r in 0..R {
                let wb = w[r].get_unchecked(b);
                let wq = load32(wb.qs.as_ptr());
                let start = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, bias, wq));
                let dw = _mm256_set1_ps(scale(wb.d));
                for t in 0..T {
                    let sums = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(start, xu[t], wq));
                    acc[r][t] = _mm256_fmadd_ps(sums, _mm256_mul_ps(dw, dx[t]), acc[r][t]);
                }
            }
        }
        acc.map(|row| row.map(|a| hsum(a)))
    }
}

/// `v` unchanged, hidden from the optimizer: a product of two broadcasts then stays one vector
/// multiply, instead of a scalar multiply and a broadcast per (row, token) pair.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn opaque(mut v: __m256) -> __m256 {
    // SAFETY: an empty instruction string: nothing runs; `v` passes through its register.
    unsafe { std::arch::asm!("/* {0} */", inout(ymm_reg) v, options(pure, nomem, nostack, preserves_flags)) };
    v
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn vnni_dot4(w: &[BlockQ8_0], xs: [QRow<'_>; 4]) -> [f32; 4] {
    // SAFETY: features enabled here; lengths are the caller's contract.
    unsafe { vnni_tile([w], xs)[0] }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn vnni_dot1(w: &[BlockQ8_0], x: QRow<'_>) -> f32 {
    // SAFETY: as above.
    unsafe { vnni_tile([w], [x])[0][0] }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn vnni_tile4(w: [&[BlockQ8_0]; 4], xs: [QRow<'_>; 4]) -> [[f32; 4]; 4] {
    // SAFETY: as above.
    unsafe { vnni_tile(w, xs) }
}
