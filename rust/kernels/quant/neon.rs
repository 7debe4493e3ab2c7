//! Q8_0 kernels for aarch64: NEON with the dotprod extension's `sdot` (Cortex-A55, A76 and
//! later), and plain NEON widening multiplies for cores without it (Cortex-A53, A72).
//!
//! The technique is that of ggml's `ggml_vec_dot_q8_0_q8_0` ARM path: per block, the 32 int8
//! products are summed exactly into 4 i32 lanes, converted to f32 and added into 4 float lanes
//! with the block's scale `f16(w.d) * x.d` by one FMA; even and odd blocks go to separate
//! accumulators (two independent chains for in-order cores), which are added and their lanes
//! summed once, at the end, in a fixed order.
//!
//! Per block and activation row:
//! - dotprod: two `sdot` (16 products each, four into each i32 lane);
//! - plain NEON: `smull` + `smlal` of the low halves and `smull2` + `smlal2` of the high halves
//!   give two i16x8 whose lanes hold two products each, at most 2 × 127² = 32258 in magnitude,
//!   exact because activations stay within ±127 (the quantizer clamps; even a weight of −128
//!   keeps a lane within 2 × 128 × 127); `saddlp` + `sadalp` widen them into i32x4;
//!
//! then `scvtf` and one `fmla` by the scalar scale. The weight block (two 16-byte loads and its
//! scale) is loaded once for the four rows of `dot4`.
//!
//! `vdotq_s32` is still unstable in Rust (`stdarch_neon_dotprod`, as of 1.96), so `sdot` is
//! written as inline assembly; so is the f16 → f32 `fcvt` of the weight scale (`vcvt_f32_f16`
//! is stable only since Rust 1.94), one exact instruction per block.

use super::{BlockQ8_0, Kernel, QRow, QK8_0};
use std::arch::aarch64::*;
use std::arch::asm;

pub fn available() -> Vec<&'static Kernel> {
    let f = crate::kernels::cpu::features();
    let mut v: Vec<&'static Kernel> = Vec::new();
    if f.dotprod {
        v.push(&NEON_DOTPROD);
    }
    if f.neon {
        v.push(&NEON);
    }
    v
}

pub static NEON_DOTPROD: Kernel =
    Kernel { name: "neon-dotprod", dot4: dotprod_dot4, dot1: dotprod_dot1, tile4: dotprod_tile4 };
pub static NEON: Kernel = Kernel { name: "neon", dot4: neon_dot4, dot1: neon_dot1, tile4: neon_tile4 };

/// The f16 scale of a weight block as f32: one `fcvt`, exact (subnormals included).
#[inline]
#[target_feature(enable = "neon")]
fn scale(d: u16) -> f32 {
    let out: f32;
    // SAFETY: `fcvt` reads and writes only the two named FP registers; neon (and so the FP unit)
    // is enabled for this function.
    unsafe {
        asm!("fcvt {out:s}, {d:h}", d = in(vreg) d, out = lateout(vreg) out, options(pure, nomem, nostack, preserves_flags));
    }
    out
}

/// `acc + ` the dot products of each group of four int8 of `a` and `b` (`sdot`).
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: `sdot` reads and writes only the named vector registers; dotprod is enabled for
    // this function, so only callers on a CPU with it can reach this.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The 32 products of a block (`w0`, `w1`: its two halves; `x0`, `x1`: the activations') summed
/// into 4 i32 lanes with `sdot`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn dotprod_block(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
    sdot(sdot(vdupq_n_s32(0), w0, x0), w1, x1)
}

/// The same with widening multiplies: lane `i` of each i16x8 is `w0[i]·x0[i] + w1[i]·x1[i]`
/// (|.| ≤ 2 × 128 × 127 with activations within ±127: no overflow), then pairs of lanes are
/// added into i32.
#[inline]
#[target_feature(enable = "neon")]
fn neon_block(w0: int8x16_t, w1: int8x16_t, x0: int8x16_t, x1: int8x16_t) -> int32x4_t {
    let lo = vmlal_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)), vget_low_s8(w1), vget_low_s8(x1));
    let hi = vmlal_high_s8(vmull_high_s8(w0, x0), w1, x1);
    vpadalq_s16(vpaddlq_s16(lo), hi)
}

/// Adds block `b` (`wb`) of every row into `acc`.
///
/// # Safety
/// As `dot_rows`.
#[inline(always)]
unsafe fn accumulate<const T: usize>(
    acc: &mut [float32x4_t; T],
    wb: &BlockQ8_0,
    xs: &[QRow<'_>; T],
    b: usize,
    block: &impl Fn(int8x16_t, int8x16_t, int8x16_t, int8x16_t) -> int32x4_t,
) {
    // SAFETY: `wb.qs` has 32 bytes; each row has block `b` (its scale and 32 values) by the
    // caller's contract; loads are unaligned; neon is part of the aarch64 baseline.
    unsafe {
        let w0 = vld1q_s8(wb.qs.as_ptr());
        let w1 = vld1q_s8(wb.qs.as_ptr().add(16));
        let dw = scale(wb.d);
        for t in 0..T {
            let xp = xs[t].qs.as_ptr().add(b * QK8_0);
            let sums = vcvtq_f32_s32(block(w0, w1, vld1q_s8(xp), vld1q_s8(xp.add(16))));
            acc[t] = vfmaq_n_f32(acc[t], sums, dw * *xs[t].d.get_unchecked(b));
        }
    }
}

/// The shared loop: `T` activation rows against one weight row, two blocks per step (even blocks
/// into one accumulator, odd into the other). `block` is one of the two i8 products above,
/// inlined into each target-feature wrapper below; every row goes through the same operations
/// in the same order whatever `T`, so `dot4` and `dot1` agree bit for bit.
///
/// # Safety
/// The caller enables neon (and dotprod for `dotprod_block`), and each row has `w.len()` scales
/// and `32 * w.len()` values.
#[inline(always)]
unsafe fn dot_rows<const T: usize>(
    w: &[BlockQ8_0],
    xs: [QRow<'_>; T],
    block: impl Fn(int8x16_t, int8x16_t, int8x16_t, int8x16_t) -> int32x4_t,
) -> [f32; T] {
    // SAFETY: the caller's contract above (for the whole function), passed on to `accumulate`
    // with block indices below `w.len()`.
    unsafe {
        let mut even = [vdupq_n_f32(0.0); T];
        let mut odd = [vdupq_n_f32(0.0); T];
        let pairs = w.chunks_exact(2);
        let last = pairs.remainder();
        for (p, pair) in pairs.enumerate() {
            accumulate(&mut even, &pair[0], &xs, 2 * p, &block);
            accumulate(&mut odd, &pair[1], &xs, 2 * p + 1, &block);
        }
        if let [wb] = last {
            accumulate(&mut even, wb, &xs, w.len() - 1, &block);
        }
        let mut out = [0f32; T];
        for t in 0..T {
            out[t] = vaddvq_f32(vaddq_f32(even[t], odd[t]));
        }
        out
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dotprod_dot4(w: &[BlockQ8_0], xs: [QRow<'_>; 4]) -> [f32; 4] {
    // SAFETY: features enabled here; lengths are the caller's contract.
    unsafe { dot_rows(w, xs, |w0, w1, x0, x1| dotprod_block(w0, w1, x0, x1)) }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dotprod_dot1(w: &[BlockQ8_0], x: QRow<'_>) -> f32 {
    // SAFETY: as above.
    unsafe { dot_rows(w, [x], |w0, w1, x0, x1| dotprod_block(w0, w1, x0, x1))[0] }
}

#[target_feature(enable = "neon")]
unsafe fn neon_dot4(w: &[BlockQ8_0], xs: [QRow<'_>; 4]) -> [f32; 4] {
    // SAFETY: as above.
    unsafe { dot_rows(w, xs, |w0, w1, x0, x1| neon_block(w0, w1, x0, x1)) }
}

#[target_feature(enable = "neon")]
unsafe fn neon_dot1(w: &[BlockQ8_0], x: QRow<'_>) -> f32 {
    // SAFETY: as above.
    unsafe { dot_rows(w, [x], |w0, w1, x0, x1| neon_block(w0, w1, x0, x1))[0] }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn dotprod_tile4(w: [&[BlockQ8_0]; 4], xs: [QRow<'_>; 4]) -> [[f32; 4]; 4] {
    // SAFETY: as above; row by row, so the bits are those of `dot4`.
    w.map(|w| unsafe { dot_rows(w, xs, |w0, w1, x0, x1| dotprod_block(w0, w1, x0, x1)) })
}

#[target_feature(enable = "neon")]
unsafe fn neon_tile4(w: [&[BlockQ8_0]; 4], xs: [QRow<'_>; 4]) -> [[f32; 4]; 4] {
    // SAFETY: as above.
    w.map(|w| unsafe { dot_rows(w, xs, |w0, w1, x0, x1| neon_block(w0, w1, x0, x1)) })
}
