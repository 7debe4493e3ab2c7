//! aarch64 GEMM microkernels on 8-row groups.
//!
//! - `neon-dotprod` and `neon` (layout R = 8, I = 4): a K block of a group is eight 32-byte
//!   lines; line `q` holds values `4q .. 4q + 4` of the 8 rows, as two vectors of 4 rows × 4
//!   values. dotprod: `sdot v.4s, w.16b, x.4b[l]` multiplies one vector with the token's four
//!   values `4q ..` (lane `l` of the token's block, loaded once) and adds each row's four
//!   products into its i32 lane. Plain NEON (Cortex-A53, A72): `smull`/`smlal` of two lines
//!   with the four values duplicated to every lane give i16 lanes of two products each
//!   (|.| ≤ 2 · 128 · 127), `sadalp` adds pairs of them into i32 (two lanes per row), and one
//!   `addp` per block makes them one lane per row. Tile: 8 rows × 4 tokens (dotprod), × 2 (neon).
//! - `neon-i8mm` (R = 8, I = 8): line `c` of a block holds values `8c .. 8c + 8` of the 8 rows,
//!   as four vectors of 2 rows × 8 values; `smmla` multiplies one with two tokens' 8 values
//!   (a 2 × 8 by 8 × 2 product) and adds the 2 × 2 i32 results. A tile's tokens go in pairs (an
//!   odd last token is paired with zeros); lanes are (row, token) pairs, put back in row order
//!   when stored. Tile: 8 rows × 4 tokens.
//!
//! Then, per (4 lanes, block): `scvtf`, the product of the rows' scales (one `fcvtl` of the
//! block's 8 f16 scales, shared by the tile's tokens) with the token's scale, and one `fmla`,
//! lane by lane: the same operations as every other kernel.
//!
//! `sdot`, `smmla` and the f16 → f32 `fcvtl` are written as inline assembly: their intrinsics
//! are unstable or newer than the crate's minimum Rust.

use super::{Gemm, Layout, TileArgs};
use std::arch::aarch64::*;
use std::arch::asm;

pub fn available() -> Vec<&'static Gemm> {
    let f = crate::kernels::cpu::features();
    let mut v: Vec<&'static Gemm> = Vec::new();
    if f.neon {
        if f.dotprod && f.i8mm {
            v.push(&NEON_I8MM);
        }
        if f.dotprod {
            v.push(&NEON_DOTPROD);
        }
        v.push(&NEON);
    }
    v
}

const LAYOUT4: Layout = Layout { rows: 8, interleave: 4, xor: 0 };
const LAYOUT8: Layout = Layout { rows: 8, interleave: 8, xor: 0 };

pub static NEON_I8MM: Gemm = Gemm { name: "neon-i8mm", layout: LAYOUT8, tokens: 4, groups: 1, tile: i8mm_tile };
pub static NEON_DOTPROD: Gemm =
    Gemm { name: "neon-dotprod", layout: LAYOUT4, tokens: 4, groups: 1, tile: dotprod_tile };
pub static NEON: Gemm = Gemm { name: "neon", layout: LAYOUT4, tokens: 2, groups: 1, tile: neon_tile };

/// The 8 f16 scales at `p` as two f32x4 (rows 0-3, 4-7): `fcvtl`, `fcvtl2`, exact.
///
/// # Safety
/// `p` points to 8 readable u16.
#[inline(always)]
pub(super) unsafe fn scales8(p: *const u16) -> [float32x4_t; 2] {
    // SAFETY: 16 readable bytes (caller); the instructions touch only the named registers.
    unsafe {
        let h = vld1q_u16(p);
        let (lo, hi): (float32x4_t, float32x4_t);
        asm!("fcvtl {lo:v}.4s, {h:v}.4h", "fcvtl2 {hi:v}.4s, {h:v}.8h", h = in(vreg) h, lo = out(vreg) lo, hi = lateout(vreg) hi,
            options(pure, nomem, nostack, preserves_flags));
        [lo, hi]
    }
}

/// `acc + ` each row's dot product of `w`'s four values with lane `L` (four int8) of `x`.
#[inline(always)]
pub(super) fn sdot_lane<const L: usize>(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: `sdot` reads and writes only the named vector registers; every caller is a
    // function enabling dotprod, reached only on CPUs with it.
    unsafe {
        asm!("sdot {acc:v}.4s, {w:v}.16b, {x:v}.4b[{l}]", acc = inout(vreg) acc, w = in(vreg) w, x = in(vreg) x, l = const L,
            options(pure, nomem, nostack, preserves_flags));
    }
    acc
}

/// `acc + w · xᵀ` for `w` 2 rows × 8 and `x` 2 tokens × 8 int8 (`smmla`).
#[inline(always)]
fn smmla(acc: int32x4_t, w: int8x16_t, x: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: `smmla` reads and writes only the named vector registers; every caller is a
    // function enabling i8mm, reached only on CPUs with it.
    unsafe {
        asm!("smmla {acc:v}.4s, {w:v}.16b, {x:v}.16b", acc = inout(vreg) acc, w = in(vreg) w, x = in(vreg) x,
            options(pure, nomem, nostack, preserves_flags));
    }
    acc
}

/// `acc = fma(float(isum), dw · dx, acc)` per lane, the kernels' common float step.
#[inline(always)]
pub(super) fn step(acc: float32x4_t, isum: int32x4_t, dw: float32x4_t, dx: float32x4_t) -> float32x4_t {
    // SAFETY: neon is part of the aarch64 baseline.
    unsafe { vfmaq_f32(acc, vcvtq_f32_s32(isum), vmulq_f32(dw, dx)) }
}

/// Loads (or zeroes) and stores the `[rows 0-3, rows 4-7]` accumulators of `T` tokens.
///
/// # Safety
/// `a.acc` covers 8 floats per token for `T` tokens.
#[inline(always)]
pub(super) unsafe fn load_acc<const T: usize>(a: &TileArgs) -> [[float32x4_t; 2]; T] {
    // SAFETY: the caller's contract.
    unsafe {
        std::array::from_fn(|t| {
            if a.load {
                let p = a.acc.add(t * a.acc_stride);
                [vld1q_f32(p), vld1q_f32(p.add(4))]
            } else {
                [vdupq_n_f32(0.0); 2]
            }
        })
    }
}

/// # Safety
/// As `load_acc`.
#[inline(always)]
pub(super) unsafe fn store_acc<const T: usize>(a: &TileArgs, acc: &[[float32x4_t; 2]; T]) {
    for (t, acc) in acc.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe {
            let p = a.acc.add(t * a.acc_stride);
            vst1q_f32(p, acc[0]);
            vst1q_f32(p.add(4), acc[1]);
        }
    }
}

/// The R = 8, I = 4 tile: 8 rows × `T` tokens, line-outer: each line's two weight vectors are
/// loaded once and used by every token, so the tile's `2T` integer sums (or `4T` for plain NEON)
/// are independent chains, which in-order cores (Cortex-A53, A55) need. `lines(wp, x, isum)`
/// adds the block's products at `wp` with the tokens' values `x` into the tokens' sums; the
/// float step follows, per token.
///
/// # Safety
/// Inside a function enabling what `lines` uses; `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn body4<const T: usize>(a: &TileArgs, lines: impl Fn(*const i8, &[[int8x16_t; 2]; T]) -> [[int32x4_t; 2]; T]) {
    // SAFETY (whole function): the caller's contract: `vals` covers 256 bytes per block,
    // `scales` 8 per block, each token `32 · blocks` values and `blocks` scales, `acc` 8 floats
    // per token.
    unsafe {
        let mut acc = load_acc::<T>(a);
        for b in 0..a.blocks {
            let x: [[int8x16_t; 2]; T] = std::array::from_fn(|t| {
                let xp = a.qs.add(t * a.qs_stride + b * 32);
                [vld1q_s8(xp), vld1q_s8(xp.add(16))]
            });
            let isum = lines(a.vals.add(b * 256) as *const i8, &x);
            let dw = scales8(a.scales.add(b * 8));
            for (t, acc) in acc.iter_mut().enumerate() {
                let dx = vdupq_n_f32(*a.d.add(t * a.nb_stride + b));
                acc[0] = step(acc[0], isum[t][0], dw[0], dx);
                acc[1] = step(acc[1], isum[t][1], dw[1], dx);
            }
        }
        store_acc(a, &acc);
    }
}

/// A block's sums with `sdot`: line `q` (32 bytes at `wp + 32q`) with lane `q % 4` of value
/// vector `q / 4` of each token.
///
/// # Safety
/// Inside a function enabling dotprod; `wp` points to 256 readable bytes.
#[inline(always)]
unsafe fn dotprod_lines<const T: usize>(wp: *const i8, x: &[[int8x16_t; 2]; T]) -> [[int32x4_t; 2]; T] {
    let mut s = [[vdupq_n_s32(0); 2]; T];
    // SAFETY: the caller's contract.
    unsafe {
        dotprod_half::<0, T>(wp, x, &mut s);
        dotprod_half::<1, T>(wp, x, &mut s);
    }
    s
}

/// Adds half `V` of a block (lines `4V .. 4V + 4`, values `16V ..`) into `s` with `sdot`.
///
/// # Safety
/// Inside a function enabling dotprod; `wp` points to 256 readable bytes.
#[inline(always)]
pub(super) unsafe fn dotprod_half<const V: usize, const T: usize>(
    wp: *const i8,
    x: &[[int8x16_t; 2]; T],
    s: &mut [[int32x4_t; 2]; T],
) {
    // SAFETY: the caller's contract.
    unsafe {
        macro_rules! line {
            ($q:literal, $l:literal) => {
                let w0 = vld1q_s8(wp.add(32 * (4 * V + $q)));
                let w1 = vld1q_s8(wp.add(32 * (4 * V + $q) + 16));
                for (s, x) in s.iter_mut().zip(x) {
                    s[0] = sdot_lane::<$l>(s[0], w0, x[V]);
                    s[1] = sdot_lane::<$l>(s[1], w1, x[V]);
                }
            };
        }
        line!(0, 0);
        line!(1, 1);
        line!(2, 2);
        line!(3, 3);
    }
}

/// # Safety
/// Inside a function enabling dotprod; `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn dotprod_body<const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract.
    unsafe { body4::<T>(a, |wp, x| dotprod_lines(wp, x)) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dotprod_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { dispatch!(dotprod_body, a, ntok, 1 2 3 4) }
}

/// A block's sums with widening multiplies, lines `q` and `q + 1` per step: each i16 lane
/// holds two products, `sadalp` adds pairs of lanes into two i32 lanes per row (`[r, r, r', r']`
/// for rows `r = 4h + 2e`, `r' = r + 1`), one `addp` per block makes them one lane per row.
///
/// # Safety
/// `wp` points to 256 readable bytes.
#[inline(always)]
unsafe fn neon_lines<const T: usize>(wp: *const i8, x: &[[int8x16_t; 2]; T]) -> [[int32x4_t; 2]; T] {
    let mut s = [[[vdupq_n_s32(0); 2]; 2]; T];
    // SAFETY: the caller's contract.
    unsafe {
        neon_half::<0, T>(wp, x, &mut s);
        neon_half::<1, T>(wp, x, &mut s);
    }
    s.map(|s| s.map(|s| vpaddq_s32(s[0], s[1])))
}

/// Adds half `V` of a block (lines `4V .. 4V + 4`) into `s[t][h][e]`: token t, rows
/// 4h .. 4h + 4, e = 0 for the first two rows, 1 for the others (`vpaddq` of `s[t][h]` gives
/// one lane per row).
///
/// # Safety
/// `wp` points to 256 readable bytes.
#[inline(always)]
pub(super) unsafe fn neon_half<const V: usize, const T: usize>(
    wp: *const i8,
    x: &[[int8x16_t; 2]; T],
    s: &mut [[[int32x4_t; 2]; 2]; T],
) {
    // SAFETY: the caller's contract; lane indices are constants in range.
    unsafe {
        macro_rules! lines {
            ($q:literal, $l:literal) => {
                let q = 4 * V + $q;
                let w = [
                    [vld1q_s8(wp.add(32 * q)), vld1q_s8(wp.add(32 * q + 32))],
                    [vld1q_s8(wp.add(32 * q + 16)), vld1q_s8(wp.add(32 * q + 48))],
                ];
                for (s, x) in s.iter_mut().zip(x) {
                    let xs = vreinterpretq_s32_s8(x[V]);
                    let xa = vreinterpretq_s8_s32(vdupq_laneq_s32::<$l>(xs));
                    let xb = vreinterpretq_s8_s32(vdupq_laneq_s32::<{ $l + 1 }>(xs));
                    for (s, [wa, wb]) in s.iter_mut().zip(w) {
                        let lo = vmlal_s8(vmull_s8(vget_low_s8(wa), vget_low_s8(xa)), vget_low_s8(wb), vget_low_s8(xb));
                        let hi = vmlal_high_s8(vmull_high_s8(wa, xa), wb, xb);
                        s[0] = vpadalq_s16(s[0], lo);
                        s[1] = vpadalq_s16(s[1], hi);
                    }
                }
            };
        }
        lines!(0, 0);
        lines!(2, 2);
    }
}

/// # Safety
/// `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn neon_body<const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract.
    unsafe { body4::<T>(a, |wp, x| neon_lines(wp, x)) }
}

#[target_feature(enable = "neon")]
unsafe fn neon_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { dispatch!(neon_body, a, ntok, 1 2) }
}

/// The i8mm tile: 8 rows × `P` token pairs (`ntok` tokens, the last pair possibly half).
///
/// Accumulator `acc[p][j]` holds rows `2j, 2j + 1` × tokens `2p, 2p + 1` as
/// `[r2j·t, r2j·t', r2j+1·t, r2j+1·t']`.
///
/// # Safety
/// Inside a function enabling i8mm; `TileFn`'s contract for `ntok ≤ 2P` tokens.
#[inline(always)]
unsafe fn i8mm_body<const P: usize>(a: &TileArgs, ntok: usize) {
    // SAFETY (whole function): the caller's contract, as `body4`; the missing token of an odd
    // last pair is never read (zeros are used) nor written.
    unsafe {
        let has = |t: usize| t < ntok;
        let zero = vdupq_n_f32(0.0);
        let mut acc = [[zero; 4]; P];
        if a.load {
            for (p, acc) in acc.iter_mut().enumerate() {
                let rows =
                    |t: usize, h: usize| if has(t) { vld1q_f32(a.acc.add(t * a.acc_stride + 4 * h)) } else { zero };
                for h in 0..2 {
                    let (u, v) = (rows(2 * p, h), rows(2 * p + 1, h));
                    // Rows 4h .. 4h + 4 of both tokens into the (row, token) lane order.
                    acc[2 * h] = vzip1q_f32(u, v);
                    acc[2 * h + 1] = vzip2q_f32(u, v);
                }
            }
        }
        for b in 0..a.blocks {
            let wp = a.vals.add(b * 256) as *const i8;
            let mut isum = [[vdupq_n_s32(0); 4]; P];
            for c in 0..4 {
                let x: [int8x16_t; P] = std::array::from_fn(|p| {
                    let part = |t: usize| {
                        if has(t) {
                            vld1_s8(a.qs.add(t * a.qs_stride + b * 32 + 8 * c))
                        } else {
                            vdup_n_s8(0)
                        }
                    };
                    vcombine_s8(part(2 * p), part(2 * p + 1))
                });
                for j in 0..4 {
                    let w = vld1q_s8(wp.add(64 * c + 16 * j));
                    for (isum, x) in isum.iter_mut().zip(&x) {
                        isum[j] = smmla(isum[j], w, *x);
                    }
                }
            }
            let dw = scales8(a.scales.add(b * 8));
            // [d2j, d2j, d2j+1, d2j+1] for row pair j.
            let dwp = [
                vzip1q_f32(dw[0], dw[0]),
                vzip2q_f32(dw[0], dw[0]),
                vzip1q_f32(dw[1], dw[1]),
                vzip2q_f32(dw[1], dw[1]),
            ];
            for (p, acc) in acc.iter_mut().enumerate() {
                let dx = |t: usize| if has(t) { *a.d.add(t * a.nb_stride + b) } else { 0.0 };
                let (u, v) = (dx(2 * p), dx(2 * p + 1));
                let pair = vld1q_f32([u, v, u, v].as_ptr());
                for j in 0..4 {
                    acc[j] = step(acc[j], isum[p][j], dwp[j], pair);
                }
            }
        }
        for (p, acc) in acc.iter().enumerate() {
            for h in 0..2 {
                // Lanes 0, 2 of two row pairs are token 2p's rows, lanes 1, 3 token 2p + 1's.
                let (u, v) = (vuzp1q_f32(acc[2 * h], acc[2 * h + 1]), vuzp2q_f32(acc[2 * h], acc[2 * h + 1]));
                for (t, rows) in [(2 * p, u), (2 * p + 1, v)] {
                    if has(t) {
                        vst1q_f32(a.acc.add(t * a.acc_stride + 4 * h), rows);
                    }
                }
            }
        }
    }
}

#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn i8mm_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe {
        match ntok {
            1 | 2 => i8mm_body::<1>(a, ntok),
            3 | 4 => i8mm_body::<2>(a, ntok),
            n => unreachable!("{n} tokens in a tile"),
        }
    }
}

/// `super::quantize_activations` and the sums `-128 · Σq` of each block, for NEON: the same
/// bits (tested). Per block: one integer maximum of the |x| bits gives both `max|x|` and the
/// non-finite test; `d = max / 127` and `1 / d` as the portable code computes them; then
/// `x · (1 / d)` clamped to ±127 (`fmax`/`fmin` keep the NaN of `0 · inf` when `1 / d`
/// overflowed) and rounded to nearest even by `fcvtns`, which turns that NaN into 0 as `as i8`
/// does.
///
/// # Safety
/// `x.len() == qs.len() == 32 · d.len() == 32 · bsum.len()`.
#[target_feature(enable = "neon")]
pub unsafe fn quantize_token(x: &[f32], d: &mut [f32], qs: &mut [i8], bsum: &mut [i32]) {
    // SAFETY (whole function): block `b` reads `x[32b .. 32b + 32]` and writes
    // `qs[32b .. 32b + 32]`, `d[b]`, `bsum[b]`, in bounds by the caller's contract.
    unsafe {
        let (lo, hi) = (vdupq_n_f32(-127.0), vdupq_n_f32(127.0));
        for b in 0..d.len() {
            let xp = x.as_ptr().add(32 * b);
            let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(xp.add(4 * i)));
            let m = v.iter().fold(vdupq_n_u32(0), |m, v| vmaxq_u32(m, vreinterpretq_u32_f32(vabsq_f32(*v))));
            let bits = vmaxvq_u32(m);
            let qp = qs.as_mut_ptr().add(32 * b);
            if bits > 0x7F7F_FFFF {
                d[b] = f32::NAN;
                vst1q_s8(qp, vdupq_n_s8(0));
                vst1q_s8(qp.add(16), vdupq_n_s8(0));
                bsum[b] = 0;
                continue;
            }
            let db = f32::from_bits(bits) / 127.0;
            d[b] = db;
            let id = vdupq_n_f32(if db != 0.0 { 1.0 / db } else { 0.0 });
            let q: [int32x4_t; 8] = v.map(|v| vcvtnq_s32_f32(vminq_f32(vmaxq_f32(vmulq_f32(v, id), lo), hi)));
            let s = q.iter().fold(vdupq_n_s32(0), |s, q| vaddq_s32(s, *q));
            bsum[b] = -128 * vaddvq_s32(s);
            for h in 0..2 {
                let w0 = vqmovn_high_s32(vqmovn_s32(q[4 * h]), q[4 * h + 1]);
                let w1 = vqmovn_high_s32(vqmovn_s32(q[4 * h + 2]), q[4 * h + 3]);
                vst1q_s8(qp.add(16 * h), vqmovn_high_s16(vqmovn_s16(w0), w1));
            }
        }
    }
}
