//! GGML's Q8_0 format and the quantizers of weights and activations.
//!
//! Weights are blocks of 32 int8 values with one f16 scale, 34 bytes: the layout of ggml's
//! `block_q8_0` (ggml-common.h), so that a model packed here is readable by llama.cpp, and a Q8_0
//! tensor of a GGUF file is read as stored and repacked once, at load, into the row-interleaved
//! layout of [`gemm`], whose kernels compute every Q8_0 matrix product (prefill's GEMM and
//! decode's matrix-vector product alike). Activations are quantized at run time into blocks of
//! 32 int8 with an f32 scale. A block's dot product is exact in i32; only its scaling and the sum
//! over blocks round.
//!
//! Kernels (in `gemm/`): AVX-512 VNNI, AVX-VNNI and AVX2 on x86_64; NEON i8mm, dotprod and plain
//! NEON on aarch64; portable scalar code everywhere; one chosen at run time by CPU feature
//! detection (`GEMMA_RS_KERNEL` names another for tests and benchmarks). `ggml` reads the other
//! GGUF block types: exactly widened to f32, or (Q4_0 .. Q6_K) as the sub-blocks that
//! `gemm::lowbit` keeps in their bits and multiplies natively.

use crate::kernels::half::{f16_to_f32, f32_to_f16};

pub mod gemm;
pub mod ggml;
pub mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Values per block.
pub const QK8_0: usize = 32;

/// ggml's `block_q8_0`: value `i` is `f16(d) * qs[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockQ8_0 {
    /// The scale, IEEE binary16 bits.
    pub d: u16,
    pub qs: [i8; QK8_0],
}

const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

impl BlockQ8_0 {
    /// Blocks as the bytes GGML stores (little-endian scale, then the 32 values).
    pub fn as_bytes(blocks: &[BlockQ8_0]) -> &[u8] {
        // SAFETY: `BlockQ8_0` is `repr(C)`, 34 bytes without padding (asserted above), made of
        // plain integers; on the little-endian targets this crate supports the bytes are GGML's.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks)) }
    }
}

/// Quantizes `x` (a whole number of blocks) into `out` exactly as ggml's reference
/// `quantize_row_q8_0_ref` (ggml-quants.c): `d = max|x| / 127`, `q = roundf(x * (1 / d))`, rounded
/// half away from zero, and `d` stored as f16 rounded to nearest even.
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), out.len() * QK8_0, "quantize_row_q8_0: {} values for {} blocks", x.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { x86::quantize_row_q8_0(x, out) };
    }
    quantize_row_q8_0_portable(x, out)
}

#[inline(always)]
fn quantize_row_q8_0_portable(x: &[f32], out: &mut [BlockQ8_0]) {
    for (xb, b) in x.chunks_exact(QK8_0).zip(out) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (q, &v) in b.qs.iter_mut().zip(xb) {
            // The clamp changes nothing unless 1 / d overflowed (max|x| below ~4e-37), where
            // it keeps q in [-127, 127] as the kernels require.
            *q = round_half_away((v * id).clamp(-127.0, 127.0)) as i8;
        }
        b.d = f32_to_f16(d);
    }
}

/// C's `roundf` (half away from zero) for |x| < 2^23, written so that it vectorizes.
#[inline(always)]
fn round_half_away(x: f32) -> i32 {
    let t = x as i32;
    // x - t is exact here, so the comparisons see the true fraction.
    let f = x - t as f32;
    t + (f >= 0.5) as i32 - (f <= -0.5) as i32
}

/// Rounds to the nearest integer, ties to even, for |x| < 2^22: adding 1.5 · 2^23 leaves no
/// fraction bits, so the addition itself rounds (and it vectorizes without SSE4.1).
#[inline(always)]
fn round_ties_even(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    (x + ROUND) - ROUND
}

/// `out = d * q` for every value of `blocks`.
pub fn dequantize_row_q8_0(blocks: &[BlockQ8_0], out: &mut [f32]) {
    assert_eq!(out.len(), blocks.len() * QK8_0, "dequantize_row_q8_0: output length");
    for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK8_0)) {
        let d = f16_to_f32(b.d);
        for (o, &q) in o.iter_mut().zip(&b.qs) {
            *o = d * q as f32;
        }
    }
}

/// Quantizes one activation row: per block `d = max|x| / 127` (kept in f32, finer than Q8_0's
/// f16) and `q = x / d` rounded to nearest even. A block holding a NaN or an infinity gets
/// `d = NaN`, so that the products it enters are NaN too (the maximum alone would skip a NaN
/// and quantize it to 0, hiding a broken weight or an overflow from the logits' check).
pub fn quantize_activations(x: &[f32], d: &mut [f32], qs: &mut [i8]) {
    assert!(x.len() == qs.len() && x.len() == d.len() * QK8_0, "quantize_activations: lengths");
    #[cfg(target_arch = "x86_64")]
    if x86::has_avx2() {
        // SAFETY: the CPU has AVX2.
        return unsafe { x86::quantize_activations(x, d, qs) };
    }
    quantize_activations_portable(x, d, qs)
}

#[inline(always)]
fn quantize_activations_portable(x: &[f32], d: &mut [f32], qs: &mut [i8]) {
    for ((xb, d), qb) in x.chunks_exact(QK8_0).zip(d.iter_mut()).zip(qs.chunks_exact_mut(QK8_0)) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        // An integer OR vectorizes; a float test per value would branch.
        let non_finite = xb.iter().fold(0u32, |a, v| a | ((v.to_bits() & 0x7FFF_FFFF) >= 0x7F80_0000) as u32);
        *d = if non_finite == 0 { amax / 127.0 } else { f32::NAN };
        let id = if *d != 0.0 { 1.0 / *d } else { 0.0 };
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = round_ties_even((v * id).clamp(-127.0, 127.0)) as i8; // see quantize_row_q8_0
        }
    }
}

/// The first of `all` (available kernels, fastest first), or the one the environment variable
/// `var` names if it is among them (a warning on stderr if it is not).
pub(crate) fn choose<K>(all: Vec<&'static K>, var: &str, name: fn(&K) -> &'static str) -> &'static K {
    let Ok(wanted) = std::env::var(var) else { return all[0] };
    all.iter().copied().find(|k| name(k) == wanted).unwrap_or_else(|| {
        let names: Vec<&str> = all.iter().map(|k| name(k)).collect();
        eprintln!("gemma_rs: {var}={wanted:?} is not available here {names:?}; using {}", name(all[0]));
        all[0]
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// xorshift floats in [-scale, scale), value `i` replaced by `special(i)` where that is
    /// `Some` (the sequence advances either way).
    pub(crate) fn random_with(n: usize, seed: u64, scale: f32, special: impl Fn(usize) -> Option<f32>) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32;
                special(i).unwrap_or((2.0 * u - 1.0) * scale)
            })
            .collect()
    }

    /// xorshift floats in [-scale, scale), with a few exact zeros and outliers.
    fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        random_with(n, seed, scale, |i| match i % 97 {
            0 => Some(0.0),
            1 => Some(scale * 40.0),
            _ => None,
        })
    }

    fn quantized(x: &[f32]) -> Vec<BlockQ8_0> {
        let mut b = vec![BlockQ8_0::default(); x.len() / QK8_0];
        quantize_row_q8_0(x, &mut b);
        b
    }

    #[test]
    fn quantizer_follows_ggml_reference() {
        // max|x| = 2.54 → d = 0.02, q = round(x / 0.02) half away from zero.
        let mut x = vec![0f32; 32];
        x[0] = 2.54;
        x[1] = -2.54;
        x[2] = 0.01; // exactly half a step: rounds away from zero
        x[3] = -0.01;
        x[4] = 0.009;
        let b = quantized(&x);
        assert_eq!(b[0].d, f32_to_f16(2.54 / 127.0));
        assert_eq!(&b[0].qs[..5], &[127, -127, 1, -1, 0]);
        // An all-zero block has d = 0 and q = 0.
        assert_eq!(quantized(&[0.0; 32])[0], BlockQ8_0::default());
        let mut back = vec![0f32; 32];
        dequantize_row_q8_0(&b, &mut back);
        for (a, b) in x.iter().zip(&back) {
            assert!((a - b).abs() <= 0.0101, "{a} {b}");
        }
    }

    #[test]
    fn rounding_is_c_roundf() {
        let below_half = f32::from_bits(0.5f32.to_bits() - 1);
        for x in [0.0, 0.5, -0.5, 1.5, 2.5, -2.5, below_half, -below_half, 126.5, -126.49, 127.0] {
            assert_eq!(round_half_away(x) as f32, x.round(), "{x}");
            assert_eq!(round_ties_even(x), x.round_ties_even(), "{x}");
        }
    }

    #[test]
    fn tiny_blocks_stay_in_range() {
        // max|x| so small that 1 / d overflows to infinity.
        let mut x = [0f32; 32];
        x[0] = 1e-38;
        x[1] = -3e-39;
        let b = quantized(&x);
        assert!(b[0].qs.iter().all(|&q| q >= -127));
        let (mut d, mut qs) = ([0f32; 1], [0i8; 32]);
        quantize_activations(&x, &mut d, &mut qs);
        assert!(qs.iter().all(|&q| q >= -127), "{qs:?}");
        assert_eq!((qs[0], qs[1]), (127, -127));
    }

    #[test]
    fn activation_dot_is_close_to_f32() {
        let (rows, cols) = (3, 256);
        let w = random(rows * cols, 1, 0.05);
        let x = random(cols, 2, 3.0);
        let packed = gemm::PackedQ8_0::new(&quantized(&w), rows, cols);
        let mut acts = gemm::QuantizedActs::new();
        acts.quantize(&x, 1, cols);
        let mut got = vec![0f32; rows];
        gemm::gemm(&mut got, rows, &acts, &packed, 0..rows);
        for (r, got) in got.iter().enumerate() {
            let exact: f32 = w[r * cols..(r + 1) * cols].iter().zip(&x).map(|(a, b)| a * b).sum();
            let norm: f32 = w[r * cols..(r + 1) * cols].iter().map(|v| v.abs()).sum::<f32>() * 3.0;
            assert!((got - exact).abs() < 0.01 * norm, "row {r}: {got} vs {exact}");
        }
    }
}
