//! x86_64 low-bit microkernels on the 16-row layout (R = 16, I = 4): one group × `T` tokens.
//!
//! Line `c` (64 bytes: values `4c .. 4c + 4` of the 16 rows) is made in registers from the low
//! plane (an AND for `c < 4`, a 16-bit shift right by 4 and an AND for the others) ORed with its
//! high bits moved to bit 4 (a 16-bit shift and an AND: the mask drops what the shift carried
//! over from the neighbouring byte). The integers are unsigned and at most 6 bits, so
//! `vpdpbusd` takes them as they are (u8 × s8) and `vpmaddubsw`'s pair sums (≤ 2 · 63 · 128)
//! cannot saturate; each half block's sum starts from `−offset · Σx`. Then the float steps of the
//! module doc, per (16 rows, token). Tiles: avx512vnni 16 × 6, avxvnni and avx2 16 × 2.

use super::super::{Gemm, TileArgs};
use super::Geometry;
use std::arch::x86_64::*;

/// As the Q8_0 matrix-vector product: one token streams the weights once, so fetch ahead.
const PREFETCH_BLOCKS: usize = 8;
use crate::kernels::quant::gemm::x86::DECODE_TOKENS;

const LAYOUT: super::Layout = super::Layout { rows: 16, interleave: 4, xor: 0 };

pub fn available() -> Vec<&'static Gemm> {
    super::super::x86::by_features([&AVX512_VNNI, &AVX_VNNI, &AVX2])
}

pub static AVX512_VNNI: Gemm = Gemm { name: "avx512vnni", layout: LAYOUT, tokens: 6, groups: 1, tile: avx512_tile };
pub static AVX_VNNI: Gemm = Gemm { name: "avxvnni", layout: LAYOUT, tokens: 2, groups: 1, tile: avxvnni_tile };
pub static AVX2: Gemm = Gemm { name: "avx2", layout: LAYOUT, tokens: 2, groups: 1, tile: avx2_tile };

/// Where line `c`'s high bits are: (which 64-byte vector of the high plane, shift left to bit 4
/// (negative: right), mask).
#[inline(always)]
const fn high(hb: usize, c: usize) -> (usize, i32, i8) {
    if hb == 1 {
        (0, 4 - c as i32, 0x10)
    } else {
        (c / 4, 4 - 2 * (c % 4) as i32, 0x30)
    }
}

/// The per-block scalars of token `t`: `(dx, h0, h1)`.
///
/// # Safety
/// `a`'s pointers cover block `b` of token `t`.
#[inline(always)]
unsafe fn token_block(a: &TileArgs, t: usize, b: usize) -> (f32, i32, i32) {
    // SAFETY: the caller's contract.
    unsafe {
        let i = t * a.nb_stride + b;
        (*a.d.add(i), *a.hsum.add(2 * i), *a.hsum.add(2 * i + 1))
    }
}

/// The AVX-512 tile: 16 rows × `T` tokens, `HB` high bits, `SPLIT` halves with their own scales.
///
/// # Safety
/// Inside a function enabling avx512f, avx512bw, avx512vnni, f16c, fma; `TileFn`'s contract.
#[inline(always)]
unsafe fn avx512_body<const HB: usize, const SPLIT: bool, const T: usize>(a: &TileArgs) {
    // SAFETY (whole function): the caller's contract: `vals` covers `block_bytes` 64-byte-aligned
    // bytes per block, `scales` `block_scales` u16 per block, each token `32 · blocks` values,
    // `blocks` scales and `2 · blocks` half sums, and `acc` 16 floats per token.
    unsafe {
        let lb = a.low_bit;
        let g = Geometry { r: 16, lb };
        let (bb, bs) = (g.block_bytes(), g.block_scales());
        let nib = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); T];
        if a.load {
            for (t, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_loadu_ps(a.acc.add(t * a.acc_stride));
            }
        }
        for b in 0..a.blocks {
            let wp = a.vals.add(b * bb);
            if T <= DECODE_TOKENS {
                for q in 0..bb / 64 {
                    // A hint: past the end of the weights it fetches nothing and cannot fault.
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH_BLOCKS * bb + 64 * q) as *const i8);
                }
            }
            let mut isum: [[__m512i; 2]; T] = std::array::from_fn(|t| {
                let (_, h0, h1) = token_block(a, t, b);
                if SPLIT {
                    [_mm512_set1_epi32(-lb.offset * h0), _mm512_set1_epi32(-lb.offset * h1)]
                } else {
                    [_mm512_set1_epi32(-lb.offset * (h0 + h1)), _mm512_setzero_si512()]
                }
            });
            for c in 0..8 {
                let lo = _mm512_load_si512(wp.add(64 * (c % 4)) as *const __m512i);
                let mut w = if c < 4 { lo } else { _mm512_srli_epi16::<4>(lo) };
                w = _mm512_and_si512(w, nib);
                if HB > 0 {
                    let (v, shift, mask) = high(HB, c);
                    let h = _mm512_load_si512(wp.add(256 + 64 * v) as *const __m512i);
                    // Immediate shifts (the match folds away once `c` is unrolled).
                    let h = match shift {
                        4 => _mm512_slli_epi16::<4>(h),
                        3 => _mm512_slli_epi16::<3>(h),
                        2 => _mm512_slli_epi16::<2>(h),
                        1 => _mm512_slli_epi16::<1>(h),
                        0 => h,
                        -1 => _mm512_srli_epi16::<1>(h),
                        -2 => _mm512_srli_epi16::<2>(h),
                        _ => _mm512_srli_epi16::<3>(h),
                    };
                    w = _mm512_or_si512(w, _mm512_and_si512(h, _mm512_set1_epi8(mask)));
                }
                let half = if SPLIT && c >= 4 { 1 } else { 0 };
                for (t, isum) in isum.iter_mut().enumerate() {
                    let xq = (a.qs.add(t * a.qs_stride + b * 32 + 4 * c) as *const i32).read_unaligned();
                    isum[half] = _mm512_dpbusd_epi32(isum[half], w, _mm512_set1_epi32(xq));
                }
            }
            let sp = a.scales.add(b * bs);
            let scale = |i: usize| {
                if lb.f16 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(sp.add(16 * i) as *const __m256i))
                } else {
                    _mm512_loadu_ps(sp.add(32 * i) as *const f32)
                }
            };
            let ws0 = scale(0);
            let ws1 = if SPLIT { scale(1) } else { ws0 };
            let wb = if lb.min { scale(1 + SPLIT as usize) } else { ws0 };
            for (t, acc) in acc.iter_mut().enumerate() {
                let (dx, h0, h1) = token_block(a, t, b);
                let dxv = _mm512_set1_ps(dx);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][0]), _mm512_mul_ps(ws0, dxv), *acc);
                if SPLIT {
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][1]), _mm512_mul_ps(ws1, dxv), *acc);
                }
                if lb.min {
                    *acc = _mm512_fmadd_ps(wb, _mm512_set1_ps(dx * (h0 + h1) as f32), *acc);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(a.acc.add(t * a.acc_stride), *acc);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn avx512_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { by_type!(avx512_body, a, ntok, 1 2 3 4 5 6) }
}

/// The 256-bit tile: 16 rows as two ymm halves × `T` tokens; `dot(isum, w, x)` adds each i32
/// lane's four u8 × s8 products.
///
/// # Safety
/// Inside a function enabling avx2, fma, f16c and what `dot` uses; `TileFn`'s contract.
#[inline(always)]
unsafe fn ymm_body<const HB: usize, const SPLIT: bool, const T: usize>(
    a: &TileArgs,
    dot: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
) {
    // SAFETY (whole function): as `avx512_body`.
    unsafe {
        let lb = a.low_bit;
        let g = Geometry { r: 16, lb };
        let (bb, bs) = (g.block_bytes(), g.block_scales());
        let nib = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        if a.load {
            for (t, acc) in acc.iter_mut().enumerate() {
                let p = a.acc.add(t * a.acc_stride);
                *acc = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
            }
        }
        for b in 0..a.blocks {
            let wp = a.vals.add(b * bb);
            if T <= DECODE_TOKENS {
                for q in 0..bb / 64 {
                    // As in `avx512_body`.
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH_BLOCKS * bb + 64 * q) as *const i8);
                }
            }
            // isum[t][half][rows 0-7, 8-15]
            let mut isum: [[[__m256i; 2]; 2]; T] = std::array::from_fn(|t| {
                let (_, h0, h1) = token_block(a, t, b);
                if SPLIT {
                    [[_mm256_set1_epi32(-lb.offset * h0); 2], [_mm256_set1_epi32(-lb.offset * h1); 2]]
                } else {
                    [[_mm256_set1_epi32(-lb.offset * (h0 + h1)); 2], [_mm256_setzero_si256(); 2]]
                }
            });
            for c in 0..8 {
                let half = if SPLIT && c >= 4 { 1 } else { 0 };
                let w: [__m256i; 2] = std::array::from_fn(|e| {
                    let lo = _mm256_load_si256(wp.add(64 * (c % 4) + 32 * e) as *const __m256i);
                    let mut w = if c < 4 { lo } else { _mm256_srli_epi16::<4>(lo) };
                    w = _mm256_and_si256(w, nib);
                    if HB > 0 {
                        let (v, shift, mask) = high(HB, c);
                        let h = _mm256_load_si256(wp.add(256 + 64 * v + 32 * e) as *const __m256i);
                        let h = if shift >= 0 {
                            _mm256_sll_epi16(h, _mm_cvtsi32_si128(shift))
                        } else {
                            _mm256_srl_epi16(h, _mm_cvtsi32_si128(-shift))
                        };
                        w = _mm256_or_si256(w, _mm256_and_si256(h, _mm256_set1_epi8(mask)));
                    }
                    w
                });
                for (t, isum) in isum.iter_mut().enumerate() {
                    let xq = (a.qs.add(t * a.qs_stride + b * 32 + 4 * c) as *const i32).read_unaligned();
                    let x = _mm256_set1_epi32(xq);
                    isum[half][0] = dot(isum[half][0], w[0], x);
                    isum[half][1] = dot(isum[half][1], w[1], x);
                }
            }
            let sp = a.scales.add(b * bs);
            let scale = |i: usize, e: usize| {
                if lb.f16 {
                    _mm256_cvtph_ps(_mm_loadu_si128(sp.add(16 * i + 8 * e) as *const __m128i))
                } else {
                    _mm256_loadu_ps(sp.add(32 * i + 16 * e) as *const f32)
                }
            };
            for e in 0..2 {
                let ws0 = scale(0, e);
                let ws1 = if SPLIT { scale(1, e) } else { ws0 };
                let wb = if lb.min { scale(1 + SPLIT as usize, e) } else { ws0 };
                for (t, acc) in acc.iter_mut().enumerate() {
                    let (dx, h0, h1) = token_block(a, t, b);
                    let dxv = _mm256_set1_ps(dx);
                    acc[e] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][0][e]), _mm256_mul_ps(ws0, dxv), acc[e]);
                    if SPLIT {
                        acc[e] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][1][e]), _mm256_mul_ps(ws1, dxv), acc[e]);
                    }
                    if lb.min {
                        acc[e] = _mm256_fmadd_ps(wb, _mm256_set1_ps(dx * (h0 + h1) as f32), acc[e]);
                    }
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let p = a.acc.add(t * a.acc_stride);
            _mm256_storeu_ps(p, acc[0]);
            _mm256_storeu_ps(p.add(8), acc[1]);
        }
    }
}

/// # Safety
/// Inside a function enabling avx2, fma, f16c, avxvnni; `TileFn`'s contract.
#[inline(always)]
unsafe fn avxvnni_body<const HB: usize, const SPLIT: bool, const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract; VEX `vpdpbusd` needs avxvnni, enabled by the caller.
    unsafe { ymm_body::<HB, SPLIT, T>(a, |s, w, x| _mm256_dpbusd_avx_epi32(s, w, x)) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn avxvnni_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { by_type!(avxvnni_body, a, ntok, 1 2) }
}

/// # Safety
/// Inside a function enabling avx2, fma, f16c; `TileFn`'s contract.
#[inline(always)]
unsafe fn avx2_body<const HB: usize, const SPLIT: bool, const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract (AVX2 enabled by the caller).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        ymm_body::<HB, SPLIT, T>(a, |s, w, x| _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones)))
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { by_type!(avx2_body, a, ntok, 1 2) }
}
