//! x86_64 GEMM microkernels on the 16-row layout (R = 16, I = 4, values stored `w ^ 0x80`).
//!
//! A K block of a group is eight 64-byte lines; line `q` holds values `4q .. 4q + 4` of the 16
//! rows, so the i32 lane `r` of a `vpdpbusd` of line `q` with the token's four values `4q ..`
//! broadcast to every lane is row `r`'s dot product of those four values. `vpdpbusd` multiplies
//! unsigned by signed bytes: the weights are stored as `w + 128` (u8) and each block's sum starts
//! from `-128 · Σx` (computed when the activations are quantized), so the eight `vpdpbusd` of a
//! block leave exactly `Σ w·x` in each row's lane. Then one conversion, one product of the 16
//! rows' scales (one `vcvtph2ps` per block, shared by the tile's tokens) with the token's scale,
//! and one FMA per (16 rows, token, block).
//!
//! - `avx512vnni`: one zmm per (16 rows, token); a tile is two groups (32 rows) × 6 tokens:
//!   per line, two weight loads, and per token one broadcast of its four values feeding two
//!   `vpdpbusd`; 24 i32 and 12 f32 accumulators. Measured on one Sapphire Rapids core: 16 × 8
//!   with the broadcasts as memory operands ran ~165 GMAC/s, 32 × 6 ~235 (of ~350 for
//!   `vpdpbusd` alone; the conversion, scale product and FMA per 8 `vpdpbusd` bound it near
//!   255). With one token (decode) the two groups are two independent streams of sums.
//! - `avxvnni` (VEX `vpdpbusd`, 16 ymm registers): the 16 rows as two ymm halves, 3 tokens.
//! - `avx2`: the same tile with `vpmaddubsw` + `vpmaddwd` for `vpdpbusd`. `vpmaddubsw` would
//!   saturate on `(w + 128) · x` pairs, so the weights are turned back into `w` (xor) and
//!   multiplied as `|w|` (u8) by `x · sign(w)` (s8): each pair sum is at most 2 · 128 · 127.

use super::{Gemm, Layout, TileArgs};
use std::arch::x86_64::*;

/// How far ahead (in K blocks of 512 bytes per group) a matrix-vector product prefetches: with
/// one token the weights stream by once, and the hardware prefetchers alone left decode ~20%
/// slower on Sapphire Rapids (Gemma 3 270M Q8_0, 2 threads: 57 → 71 tok/s; 4 and 16 blocks
/// ahead measured the same as 8).
const PREFETCH_BLOCKS: usize = 8;
/// Tiles of at most this many tokens prefetch: they too stream the weights by about once (a
/// server's batched decode steps), while wider tiles reuse each block enough to hide its load.
pub(in crate::kernels::quant::gemm) const DECODE_TOKENS: usize = 4;

const LAYOUT: Layout = Layout { rows: 16, interleave: 4, xor: 0x80 };

pub fn available() -> Vec<&'static Gemm> {
    by_features([&AVX512_VNNI, &AVX_VNNI, &AVX2])
}

/// Of a kernel set `[avx512vnni, avxvnni, avx2]`, those this CPU runs, in that order.
pub(super) fn by_features([avx512, avxvnni, avx2_kernel]: [&'static Gemm; 3]) -> Vec<&'static Gemm> {
    let f = crate::kernels::cpu::features();
    let mut v: Vec<&'static Gemm> = Vec::new();
    let avx2 = f.avx2_fma && f.f16c;
    if avx2 && f.avx512_bw && f.avx512_vnni {
        v.push(avx512);
    }
    if avx2 && f.avx_vnni {
        v.push(avxvnni);
    }
    if avx2 {
        v.push(avx2_kernel);
    }
    v
}

pub static AVX512_VNNI: Gemm = Gemm { name: "avx512vnni", layout: LAYOUT, tokens: 6, groups: 2, tile: avx512_tile };
pub static AVX_VNNI: Gemm = Gemm { name: "avxvnni", layout: LAYOUT, tokens: 3, groups: 1, tile: avxvnni_tile };
pub static AVX2: Gemm = Gemm { name: "avx2", layout: LAYOUT, tokens: 2, groups: 1, tile: avx2_tile };

/// The AVX-512 tile: `G` groups of 16 rows × `T` tokens, quad-outer: line `q` of each group is
/// loaded once per tile, each token's four values `4q ..` are broadcast once and multiplied with
/// the `G` lines; the `G · T` integer sums of a block advance together.
///
/// # Safety
/// Inside a function enabling avx512f, avx512bw, avx512vnni; `TileFn`'s contract for `G` groups
/// and `T` tokens.
#[inline(always)]
unsafe fn avx512_body<const G: usize, const T: usize>(a: &TileArgs) {
    // SAFETY (whole function): the caller's contract: the CPU has the features; `vals` covers
    // 512 64-byte-aligned bytes per block and group, `scales` 16 per block and group, each token
    // `32 · blocks` values and `blocks` scales and sums, and `acc` `16 G` floats per token.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); G]; T];
        if a.load {
            for (t, acc) in acc.iter_mut().enumerate() {
                for (g, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_loadu_ps(a.acc.add(t * a.acc_stride + 16 * g));
                }
            }
        }
        for b in 0..a.blocks {
            let wp = a.vals.add(b * 512);
            let mut isum: [[__m512i; G]; T] =
                std::array::from_fn(|t| [_mm512_set1_epi32(*a.bsum.add(t * a.nb_stride + b)); G]);
            if T <= DECODE_TOKENS {
                // One token streams the weights once: fetch PREFETCH_BLOCKS blocks ahead.
                for g in 0..G {
                    for q in 0..8 {
                        // A hint: past the end of the weights it fetches nothing and cannot fault.
                        let ahead = wp.wrapping_add(g * a.group_vals + PREFETCH_BLOCKS * 512 + 64 * q);
                        _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                    }
                }
            }
            for q in 0..8 {
                let w: [__m512i; G] =
                    std::array::from_fn(|g| _mm512_load_si512(wp.add(g * a.group_vals + 64 * q) as *const __m512i));
                for (t, isum) in isum.iter_mut().enumerate() {
                    let xq = (a.qs.add(t * a.qs_stride + b * 32 + 4 * q) as *const i32).read_unaligned();
                    let x = _mm512_set1_epi32(xq);
                    for (isum, w) in isum.iter_mut().zip(&w) {
                        *isum = _mm512_dpbusd_epi32(*isum, *w, x);
                    }
                }
            }
            let dw: [__m512; G] = std::array::from_fn(|g| {
                _mm512_cvtph_ps(_mm256_loadu_si256(a.scales.add(g * a.group_scales + b * 16) as *const __m256i))
            });
            for (t, acc) in acc.iter_mut().enumerate() {
                let dx = _mm512_set1_ps(*a.d.add(t * a.nb_stride + b));
                for g in 0..G {
                    acc[g] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][g]), _mm512_mul_ps(dw[g], dx), acc[g]);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            for (g, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(a.acc.add(t * a.acc_stride + 16 * g), *acc);
            }
        }
    }
}

/// `avx512_body::<1, T>`.
///
/// # Safety
/// As `avx512_body`.
#[inline(always)]
unsafe fn avx512_one<const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract.
    unsafe { avx512_body::<1, T>(a) }
}

/// `avx512_body::<2, T>`.
///
/// # Safety
/// As `avx512_body`.
#[inline(always)]
unsafe fn avx512_two<const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract.
    unsafe { avx512_body::<2, T>(a) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn avx512_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe {
        if a.groups == 2 {
            dispatch!(avx512_two, a, ntok, 1 2 3 4 5 6)
        } else {
            dispatch!(avx512_one, a, ntok, 1 2 3 4 5 6)
        }
    }
}

/// The 256-bit tile: 16 rows (two ymm) × `T` tokens, line by line. `prep` turns a weight half
/// into what `dot` takes; `dot(isum, prepped, x)` adds row lanes' four products; `bias` says
/// whether sums start at `-128 Σx` (the weights multiplied as `w + 128`) or at 0.
///
/// # Safety
/// Inside a function enabling avx2, fma, f16c and what `prep` and `dot` use; `TileFn`'s
/// contract for `T` tokens.
#[inline(always)]
unsafe fn ymm_body<const T: usize, P: Copy>(
    a: &TileArgs,
    bias: bool,
    prep: impl Fn(__m256i) -> P,
    dot: impl Fn(__m256i, P, __m256i) -> __m256i,
) {
    // SAFETY (whole function): as `avx512_body`.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        if a.load {
            for (t, acc) in acc.iter_mut().enumerate() {
                let p = a.acc.add(t * a.acc_stride);
                *acc = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
            }
        }
        for b in 0..a.blocks {
            let wp = a.vals.add(b * 512);
            let mut isum = [[_mm256_setzero_si256(); 2]; T];
            if bias {
                for (t, isum) in isum.iter_mut().enumerate() {
                    let s = _mm256_set1_epi32(*a.bsum.add(t * a.nb_stride + b));
                    *isum = [s, s];
                }
            }
            if T <= DECODE_TOKENS {
                for q in 0..8 {
                    // As in `avx512_body`.
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(PREFETCH_BLOCKS * 512 + 64 * q) as *const i8);
                }
            }
            for q in 0..8 {
                let w0 = prep(_mm256_load_si256(wp.add(64 * q) as *const __m256i));
                let w1 = prep(_mm256_load_si256(wp.add(64 * q + 32) as *const __m256i));
                for (t, isum) in isum.iter_mut().enumerate() {
                    let xq = (a.qs.add(t * a.qs_stride + b * 32 + 4 * q) as *const i32).read_unaligned();
                    let x = _mm256_set1_epi32(xq);
                    isum[0] = dot(isum[0], w0, x);
                    isum[1] = dot(isum[1], w1, x);
                }
            }
            let sp = a.scales.add(b * 16);
            let dw0 = _mm256_cvtph_ps(_mm_loadu_si128(sp as *const __m128i));
            let dw1 = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(8) as *const __m128i));
            for (t, acc) in acc.iter_mut().enumerate() {
                let dx = _mm256_set1_ps(*a.d.add(t * a.nb_stride + b));
                acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][0]), _mm256_mul_ps(dw0, dx), acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][1]), _mm256_mul_ps(dw1, dx), acc[1]);
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
/// Inside a function enabling avx2, fma, f16c, avxvnni; `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn avxvnni_body<const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract; `vpdpbusd` (VEX) needs avxvnni, enabled by the caller.
    unsafe { ymm_body::<T, __m256i>(a, true, |w| w, |s, w, x| _mm256_dpbusd_avx_epi32(s, w, x)) }
}

#[target_feature(enable = "avx2,fma,f16c,avxvnni")]
unsafe fn avxvnni_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { dispatch!(avxvnni_body, a, ntok, 1 2 3) }
}

/// # Safety
/// Inside a function enabling avx2, fma, f16c; `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn avx2_body<const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract (AVX2 enabled by the caller).
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        ymm_body::<T, (__m256i, __m256i)>(
            a,
            false,
            |w| {
                let w = _mm256_xor_si256(w, flip); // back to int8 w
                (_mm256_sign_epi8(w, w), w) // (|w| read as u8, w)
            },
            |s, (abs_w, w), x| {
                _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(x, w)), ones))
            },
        )
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { dispatch!(avx2_body, a, ntok, 1 2) }
}

/// `super::quantize_activations` and the sums `-128 · Σq` of each block, for AVX2: the same
/// bits (tested), 8 values per instruction. Per block: `max|x|` and the non-finite test on the
/// integer bits; `d = max / 127` and `1 / d` as the portable code computes them; then
/// `x · (1 / d)` (a NaN from `0 · inf`, when `1 / d` overflowed, becomes 0 as `as i8` makes it),
/// clamped to ±127 and rounded to nearest even by `vcvtps2dq`.
///
/// # Safety
/// The CPU has AVX2; `x.len() == qs.len() == 32 · d.len() == 32 · bsum.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_token(x: &[f32], d: &mut [f32], qs: &mut [i8], bsum: &mut [i32]) {
    // SAFETY (whole function): block `b` reads `x[32b .. 32b + 32]` and writes
    // `qs[32b .. 32b + 32]`, `d[b]`, `bsum[b]`, in bounds by the caller's contract.
    unsafe {
        let abs_mask = _mm256_set1_epi32(0x7FFF_FFFF);
        let max_finite = _mm256_set1_epi32(0x7F7F_FFFF);
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        for b in 0..d.len() {
            let xp = x.as_ptr().add(32 * b);
            let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xp.add(8 * i)));
            let a: [__m256i; 4] = v.map(|v| _mm256_and_si256(_mm256_castps_si256(v), abs_mask));
            let big = a.map(|a| _mm256_cmpgt_epi32(a, max_finite));
            let any_big = _mm256_or_si256(_mm256_or_si256(big[0], big[1]), _mm256_or_si256(big[2], big[3]));
            if _mm256_testz_si256(any_big, any_big) == 0 {
                d[b] = f32::NAN;
                _mm256_storeu_si256(qs.as_mut_ptr().add(32 * b) as *mut __m256i, _mm256_setzero_si256());
                bsum[b] = 0;
                continue;
            }
            // Finite: the integer maximum of |x| bits is the float maximum.
            let m = _mm256_max_epi32(_mm256_max_epi32(a[0], a[1]), _mm256_max_epi32(a[2], a[3]));
            let m = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
            let m = _mm_max_epi32(m, _mm_shuffle_epi32::<0b01_00_11_10>(m));
            let m = _mm_max_epi32(m, _mm_shuffle_epi32::<0b10_11_00_01>(m));
            let amax = f32::from_bits(_mm_cvtsi128_si32(m) as u32);
            let db = amax / 127.0;
            d[b] = db;
            let id = _mm256_set1_ps(if db != 0.0 { 1.0 / db } else { 0.0 });
            let q: [__m256i; 4] = v.map(|v| {
                let p = _mm256_mul_ps(v, id);
                let p = _mm256_and_ps(p, _mm256_cmp_ps::<_CMP_ORD_Q>(p, p));
                _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(p, lo), hi))
            });
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
            bsum[b] = -128 * _mm_cvtsi128_si32(s);
            // packs work within 128-bit lanes: (q0, q1) → i16 lanes [q0a q1a q0b q1b], then
            // (.., ..) → i8 [q0a q1a q2a q3a q0b q1b q2b q3b] in 32-bit units; permute back.
            let w01 = _mm256_packs_epi32(q[0], q[1]);
            let w23 = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_packs_epi16(w01, w23);
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(qs.as_mut_ptr().add(32 * b) as *mut __m256i, bytes);
        }
    }
}
