//! aarch64 low-bit microkernels on the 8-row layout (R = 8, I = 4): one group × `T` tokens.
//!
//! Each block is first unpacked into the Q8_0 kernels' layout on the stack (256 bytes: per 16
//! bytes of the low plane an AND and a shift, per 16 bytes of values their high bits moved to
//! bit 4 with `ushl` and an AND), then its two halves go through the Q8_0 kernels' lines
//! (`sdot`, or `smull`/`sadalp`), which take the unsigned ≤ 6-bit integers as int8 unchanged.
//! The float steps of the module doc follow, per (4 rows, token). Tiles: neon-dotprod 8 × 4,
//! neon 8 × 2.

use super::super::neon::{dotprod_half, load_acc, neon_half, scales8, step, store_acc};
use super::super::{Gemm, Layout, TileArgs};
use super::Geometry;
use std::arch::aarch64::*;

const LAYOUT: Layout = Layout { rows: 8, interleave: 4, xor: 0 };

pub fn available() -> Vec<&'static Gemm> {
    let f = crate::kernels::cpu::features();
    let mut v: Vec<&'static Gemm> = Vec::new();
    if f.neon {
        if f.dotprod {
            v.push(&NEON_DOTPROD);
        }
        v.push(&NEON);
    }
    v
}

pub static NEON_DOTPROD: Gemm = Gemm { name: "neon-dotprod", layout: LAYOUT, tokens: 4, groups: 1, tile: dotprod_tile };
pub static NEON: Gemm = Gemm { name: "neon", layout: LAYOUT, tokens: 2, groups: 1, tile: neon_tile };

/// The block at `wp` (`HB` high bits) as the 256 int8 values of the Q8_0 layout.
///
/// # Safety
/// `wp` points to the block's `8 · (16 + 4 HB)` readable bytes.
#[inline(always)]
unsafe fn unpack<const HB: usize>(wp: *const u8, out: &mut [u8; 256]) {
    // SAFETY: the caller's contract; every store is inside `out`.
    unsafe {
        let nib = vdupq_n_u8(0x0F);
        for u in 0..16 {
            // Bytes 16u .. 16u + 16 of the block: line c = u / 2, bytes j = 16 (u % 2) .. of it.
            let lo = vld1q_u8(wp.add(16 * (u % 8)));
            let mut w = if u < 8 { vandq_u8(lo, nib) } else { vshrq_n_u8::<4>(lo) };
            if HB > 0 {
                let c = u / 2;
                let (at, shift, mask) =
                    if HB == 1 { (0, 4 - c as i8, 0x10) } else { (32 * (c / 4), 4 - 2 * (c % 4) as i8, 0x30) };
                let h = vld1q_u8(wp.add(128 + at + 16 * (u % 2)));
                w = vorrq_u8(w, vandq_u8(vshlq_u8(h, vdupq_n_s8(shift)), vdupq_n_u8(mask)));
            }
            vst1q_u8(out.as_mut_ptr().add(16 * u), w);
        }
    }
}

/// The tile, `sums(block, x)` giving per token the integer sums of each half block
/// (`[t][half][rows 0-3, 4-7]`; with `SPLIT` off, the whole block's in half 0).
///
/// # Safety
/// Inside a function enabling what `sums` uses; `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn body<const HB: usize, const SPLIT: bool, const T: usize>(
    a: &TileArgs,
    sums: impl Fn(*const i8, &[[int8x16_t; 2]; T]) -> [[[int32x4_t; 2]; 2]; T],
) {
    // SAFETY (whole function): the caller's contract: `vals` covers `block_bytes` bytes per
    // block, `scales` `block_scales` u16 per block, each token `32 · blocks` values, `blocks`
    // scales and `2 · blocks` half sums, `acc` 8 floats per token.
    unsafe {
        let lb = a.low_bit;
        let g = Geometry { r: 8, lb };
        let (bb, bs) = (g.block_bytes(), g.block_scales());
        let mut acc = load_acc::<T>(a);
        let mut buf = [0u8; 256];
        for b in 0..a.blocks {
            unpack::<HB>(a.vals.add(b * bb), &mut buf);
            let x: [[int8x16_t; 2]; T] = std::array::from_fn(|t| {
                let xp = a.qs.add(t * a.qs_stride + b * 32);
                [vld1q_s8(xp), vld1q_s8(xp.add(16))]
            });
            let isum = sums(buf.as_ptr() as *const i8, &x);
            let sp = a.scales.add(b * bs);
            let scale = |i: usize| {
                if lb.f16 {
                    scales8(sp.add(8 * i))
                } else {
                    let p = sp.add(16 * i) as *const f32;
                    [vld1q_f32(p), vld1q_f32(p.add(4))]
                }
            };
            let ws0 = scale(0);
            let ws1 = if SPLIT { scale(1) } else { ws0 };
            let wb = if lb.min { scale(1 + SPLIT as usize) } else { ws0 };
            for (t, acc) in acc.iter_mut().enumerate() {
                let i = t * a.nb_stride + b;
                let (dx, h0, h1) = (*a.d.add(i), *a.hsum.add(2 * i), *a.hsum.add(2 * i + 1));
                let dxv = vdupq_n_f32(dx);
                for e in 0..2 {
                    if SPLIT {
                        let i0 = vaddq_s32(isum[t][0][e], vdupq_n_s32(-lb.offset * h0));
                        let i1 = vaddq_s32(isum[t][1][e], vdupq_n_s32(-lb.offset * h1));
                        acc[e] = step(acc[e], i0, ws0[e], dxv);
                        acc[e] = step(acc[e], i1, ws1[e], dxv);
                    } else {
                        let i0 = vaddq_s32(isum[t][0][e], vdupq_n_s32(-lb.offset * (h0 + h1)));
                        acc[e] = step(acc[e], i0, ws0[e], dxv);
                    }
                    if lb.min {
                        acc[e] = vfmaq_f32(acc[e], wb[e], vdupq_n_f32(dx * (h0 + h1) as f32));
                    }
                }
            }
        }
        store_acc(a, &acc);
    }
}

/// # Safety
/// Inside a function enabling dotprod; `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn dotprod_body<const HB: usize, const SPLIT: bool, const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract; the buffer holds 256 bytes.
    unsafe {
        body::<HB, SPLIT, T>(a, |wp, x| {
            let mut s = [[[vdupq_n_s32(0); 2]; 2]; T];
            let mut h0 = [[vdupq_n_s32(0); 2]; T];
            dotprod_half::<0, T>(wp, x, &mut h0);
            if SPLIT {
                let mut h1 = [[vdupq_n_s32(0); 2]; T];
                dotprod_half::<1, T>(wp, x, &mut h1);
                for t in 0..T {
                    s[t][1] = h1[t];
                }
            } else {
                dotprod_half::<1, T>(wp, x, &mut h0);
            }
            for t in 0..T {
                s[t][0] = h0[t];
            }
            s
        })
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dotprod_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { by_type!(dotprod_body, a, ntok, 1 2 3 4) }
}

/// # Safety
/// `TileFn`'s contract for `T` tokens.
#[inline(always)]
unsafe fn neon_body<const HB: usize, const SPLIT: bool, const T: usize>(a: &TileArgs) {
    // SAFETY: the caller's contract; the buffer holds 256 bytes.
    unsafe {
        body::<HB, SPLIT, T>(a, |wp, x| {
            let zero = [[[vdupq_n_s32(0); 2]; 2]; T];
            let mut h0 = zero;
            neon_half::<0, T>(wp, x, &mut h0);
            let mut h1 = zero;
            if SPLIT {
                neon_half::<1, T>(wp, x, &mut h1);
            } else {
                neon_half::<1, T>(wp, x, &mut h0);
            }
            std::array::from_fn(|t| {
                let rows = |s: &[[int32x4_t; 2]; 2]| s.map(|s| vpaddq_s32(s[0], s[1]));
                [rows(&h0[t]), rows(&h1[t])]
            })
        })
    }
}

#[target_feature(enable = "neon")]
unsafe fn neon_tile(a: &TileArgs, ntok: usize) {
    // SAFETY: features enabled here; the rest is the caller's `TileFn` contract.
    unsafe { by_type!(neon_body, a, ntok, 1 2) }
}
