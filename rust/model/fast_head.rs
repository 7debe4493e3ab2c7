//! The exact fast lm_head: the greedy token read from a 6-bit shadow of the tied Q8_0 head.
//!
//! The head's int8 values `q` (scale `d` per block) have a shadow `s = clamp(round(q / 4), −32,
//! 31)` with scale `4d`, kept by the low-bit kernels (26 bytes per 32 values instead of 34). For
//! the token's quantized activations `x̂`, the shadow's score `S_r` of row `r` and the full
//! head's logit `F_r` (both as computed) differ by at most
//!
//! ```text
//! B_r = c_r · ‖x̂‖₂,   c_r = ‖w_r − w'_r‖₂ + 64 u (‖w_r‖₂ + ‖w'_r‖₂)
//! ```
//!
//! (Cauchy–Schwarz on the weights' difference, plus the rounding of both products: each is a
//! sum of `2 · blocks + 1` correctly rounded operations on terms bounded by `|w|·|x̂|`, so its
//! error is below `(2 · blocks + 1) u Σ|w||x̂|`, and 64 covers the 20 blocks of a 640-wide row
//! and more; `u = 2⁻²⁴`). `c_r` is computed in f64 at load and rounded up. With
//! `L = max_r (S_r − B_r)`, every row with `S_r + B_r < L` has `F_r < L ≤ F_{r*}` for the row
//! `r*` attaining `L`: it cannot be the argmax, not even in a tie. The rows left are rescored by
//! the full head (their groups only) and the first largest logit wins, as the sampler's greedy
//! choice does on the full logits. When more than [`MAX_CANDIDATES`] rows are left, or a score is
//! not finite, the caller runs the full head instead.
//!
//! On Gemma 3 270M (`bench/fast_head.py`, Q8_0, Intel Xeon, 2 threads) 64 rows were left per
//! token and none of 128 tokens fell back: 245 MB of weights read per token instead of 285, and
//! decode 1.11× faster. The shadow is held besides the head (+137 MB), so
//! `LoadOptions::fast_lm_head` is off by default.

use crate::kernels::half::{f16_to_f32, f32_to_f16};
use crate::kernels::quant::gemm::{self, PackedLowBit, PackedQ8_0, QuantizedActs};
use crate::kernels::quant::ggml::{LowBit, Sub};
use crate::kernels::threads::Threads;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The shadow's integers: 6 bits, offset 32, one f16 scale per 32 values.
pub const SHADOW: LowBit = LowBit { hi_bits: 2, offset: 32, min: false, split: false, f16: true };

/// Beyond this many rows left, the full head is cheaper than rescoring them one group at a time.
pub const MAX_CANDIDATES: usize = 4096;

/// The shadow of a tied Q8_0 head and each row's bound factor `c_r`.
pub struct FastHead {
    shadow: PackedLowBit,
    bound: Vec<f32>,
}

/// One greedy choice: the token, and how many rows were rescored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Choice {
    pub token: u32,
    pub candidates: usize,
}

impl FastHead {
    /// The shadow of `head`, or None when a block's scale times 4 does not fit an f16 (the full
    /// head is then always used).
    pub fn new(head: &PackedQ8_0, threads: &Threads) -> Option<FastHead> {
        let (rows, cols) = (head.rows(), head.cols());
        let overflow = AtomicBool::new(false);
        let bound: Vec<AtomicU32> = (0..rows).map(|_| AtomicU32::new(0)).collect();
        // One pass over the head: each row's shadow sub-blocks and its bound factor.
        let shadow = PackedLowBit::from_subs(SHADOW, rows, cols, threads, |r, subs: &mut [Sub]| {
            let blocks = head.row_blocks(r);
            for (s, b) in subs.iter_mut().zip(&blocks) {
                let ws = 4.0 * f16_to_f32(b.d);
                if f32_to_f16(ws) & 0x7C00 == 0x7C00 {
                    overflow.store(true, Ordering::Relaxed);
                }
                *s = Sub { q: b.qs.map(|q| (shadow_int(q) + 32) as u8), ws: [ws, ws], wb: 0.0 };
            }
            bound[r].store(bound_factor(&blocks).to_bits(), Ordering::Relaxed);
        });
        if overflow.into_inner() {
            return None;
        }
        Some(FastHead { shadow, bound: bound.into_iter().map(|b| f32::from_bits(b.into_inner())).collect() })
    }

    /// Bytes held: the shadow and one f32 per row.
    pub fn bytes(&self) -> usize {
        self.shadow.bytes() + self.bound.len() * 4
    }

    /// Bytes `new` holds for a `(rows, cols)` head.
    pub fn bytes_for(rows: usize, cols: usize) -> usize {
        PackedLowBit::bytes_for_low_bit(SHADOW, rows, cols) + rows * 4
    }

    /// Bytes one `argmax` reads: the shadow and the bounds (the candidates' groups besides).
    pub fn bytes_read(&self) -> usize {
        self.bytes()
    }

    /// The first row of the largest logit that `head` gives the one token of `x`, or None when
    /// the shadow cannot decide cheaply (more than `MAX_CANDIDATES` rows left, or a score that is
    /// not finite). `scores` (at least `rows` floats) is scratch.
    pub fn argmax(
        &self,
        head: &PackedQ8_0,
        x: &QuantizedActs,
        scores: &mut [f32],
        threads: &Threads,
    ) -> Option<Choice> {
        let candidates = self.candidates(head, x, 1, scores, threads)?;
        let mut best: Option<(f32, u32)> = None;
        rescore(head, x, &candidates, |r, v| {
            if best.is_none_or(|(b, _)| v > b) {
                best = Some((v, r));
            }
        })?;
        best.map(|(_, token)| Choice { token, candidates: candidates.len() })
    }

    /// The full head's logits of the one token of `x` for every row that can be among the `k`
    /// largest (ties with the k-th included, also after a multiplication by 1 / temperature),
    /// and −inf for every other, into `logits`: what top-k sampling keeps of the full logits.
    /// Returns the rows rescored, or None as `argmax` does.
    pub fn top_k(
        &self,
        head: &PackedQ8_0,
        x: &QuantizedActs,
        k: usize,
        logits: &mut [f32],
        threads: &Threads,
    ) -> Option<usize> {
        let candidates = self.candidates(head, x, k, logits, threads)?;
        logits[..head.rows()].fill(f32::NEG_INFINITY);
        rescore(head, x, &candidates, |r, v| logits[r as usize] = v)?;
        Some(candidates.len())
    }

    /// The rows whose full logit can be among the `k` largest: with `L` the k-th largest
    /// `S − B`, every row with `S + B` within a relative 1e-5 of `L` or above (the margin keeps
    /// rows that a rounding of `logit / temperature` could tie with the k-th).
    fn candidates(
        &self,
        head: &PackedQ8_0,
        x: &QuantizedActs,
        k: usize,
        scores: &mut [f32],
        threads: &Threads,
    ) -> Option<Vec<u32>> {
        assert!(x.n() == 1 && k >= 1, "FastHead: one token, k >= 1");
        let rows = head.rows();
        if k > rows {
            return None;
        }
        let scores = &mut scores[..rows];
        gemm::gemm_parallel(scores, x, &self.shadow, threads);
        // ‖x̂‖ rounded up by far more than its f64 error.
        let nx = x.norm(0) * (1.0 + 1e-12);
        let scores = &*scores;
        // Each thread's k largest `S − B` (NaN if a score is not finite: no decision).
        let parts = threads.ranges(rows, 1024, rows * 16);
        let mut tops: Vec<Vec<f64>> = vec![Vec::new(); parts.len()];
        threads.run(
            parts.iter().cloned().zip(tops.iter_mut()).collect(),
            |_, (part, top): (std::ops::Range<usize>, &mut Vec<f64>)| {
                for (&s, &c) in scores[part.clone()].iter().zip(&self.bound[part]) {
                    if !s.is_finite() {
                        *top = vec![f64::NAN];
                        return;
                    }
                    let v = s as f64 - c as f64 * nx;
                    if top.len() < k || v > top[k - 1] {
                        let at = top.partition_point(|&t| t >= v);
                        top.insert(at, v);
                        top.truncate(k);
                    }
                }
            },
        );
        let mut all: Vec<f64> = tops.concat();
        if all.iter().any(|v| v.is_nan()) || all.len() < k {
            return None;
        }
        all.sort_unstable_by(|a, b| b.total_cmp(a));
        let low = all[k - 1];
        let mut candidates: Vec<u32> = Vec::new();
        for (r, (&s, &c)) in scores.iter().zip(&self.bound).enumerate() {
            let (s, b) = (s as f64, c as f64 * nx);
            if s + b + 1e-5 * (s.abs() + b + 1.0) >= low {
                if candidates.len() == MAX_CANDIDATES {
                    return None;
                }
                candidates.push(r as u32);
            }
        }
        Some(candidates)
    }
}

/// The full head's logits of `candidates` (sorted rows), a group of rows at a time, handed to
/// `put(row, logit)` in row order; None if one is not finite.
fn rescore(head: &PackedQ8_0, x: &QuantizedActs, candidates: &[u32], mut put: impl FnMut(u32, f32)) -> Option<()> {
    let (g, rows) = (head.group_rows(), head.rows());
    let mut exact = vec![0f32; g];
    let mut i = 0;
    while i < candidates.len() {
        let group = candidates[i] as usize / g;
        let range = group * g..((group + 1) * g).min(rows);
        gemm::gemm(&mut exact, range.len(), x, head, range.clone());
        while i < candidates.len() && candidates[i] as usize / g == group {
            let r = candidates[i];
            let v = exact[r as usize - range.start];
            if !v.is_finite() {
                return None;
            }
            put(r, v);
            i += 1;
        }
    }
    Some(())
}

/// The shadow integer of an int8 value: `round(q / 4)` (half away from zero), clamped to 6 bits.
fn shadow_int(q: i8) -> i32 {
    let q = q as i32;
    let r = if q >= 0 { (q + 2) / 4 } else { -((-q + 2) / 4) };
    r.clamp(-32, 31)
}

/// `c_r` of the module doc for one row's Q8_0 blocks, rounded up to f32.
fn bound_factor(blocks: &[crate::kernels::quant::BlockQ8_0]) -> f32 {
    let (mut diff, mut full, mut shadow) = (0f64, 0f64, 0f64);
    for b in blocks {
        let d = f16_to_f32(b.d) as f64;
        let (mut e2, mut w2, mut s2) = (0i64, 0i64, 0i64);
        for &q in &b.qs {
            let s = 4 * shadow_int(q) as i64;
            let q = q as i64;
            e2 += (q - s) * (q - s);
            w2 += q * q;
            s2 += s * s;
        }
        diff += d * d * e2 as f64;
        full += d * d * w2 as f64;
        shadow += d * d * s2 as f64;
    }
    let u = f32::EPSILON as f64 / 2.0;
    let c = diff.sqrt() + 64.0 * u * (full.sqrt() + shadow.sqrt());
    // Up by a relative 1e-6: more than the f64 rounding above and the f32 conversion.
    (c * (1.0 + 1e-6)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::{quantize_row_q8_0, BlockQ8_0, QK8_0};

    fn head(rows: usize, cols: usize, seed: u64) -> (Vec<BlockQ8_0>, PackedQ8_0) {
        let w = crate::kernels::quant::tests::random_with(rows * cols, seed, 0.05, |i| (i % 71 == 3).then_some(0.4));
        let mut b = vec![BlockQ8_0::default(); rows * cols / QK8_0];
        quantize_row_q8_0(&w, &mut b);
        let p = PackedQ8_0::new(&b, rows, cols);
        (b, p)
    }

    #[test]
    fn shadow_integers_round_half_away_and_clamp() {
        let got: Vec<i32> = [0i8, 1, 2, 3, 5, 6, -2, -6, 125, 126, 127, -128].iter().map(|&q| shadow_int(q)).collect();
        assert_eq!(got, [0, 0, 1, 1, 1, 2, -1, -2, 31, 31, 31, -32]);
    }

    /// The greedy token of the fast head is the argmax of the full head's logits (first on
    /// ties), token after token, including rows made equal on purpose.
    #[test]
    fn the_fast_argmax_is_the_full_argmax() {
        let (rows, cols) = (3000, 640);
        let (mut blocks, _) = head(rows, cols, 5);
        // Rows 10 and 2500 equal, so that ties happen.
        let nb = cols / QK8_0;
        let copy: Vec<BlockQ8_0> = blocks[10 * nb..11 * nb].to_vec();
        blocks[2500 * nb..2501 * nb].copy_from_slice(&copy);
        let full = PackedQ8_0::new(&blocks, rows, cols);
        let threads = Threads::new(2);
        let fast = FastHead::new(&full, &threads).expect("scales fit");
        assert_eq!(fast.bytes(), FastHead::bytes_for(rows, cols));
        let mut decided = 0;
        let mut row10 = vec![0f32; cols];
        full.dequantize_row(10, &mut row10);
        for t in 0..40u64 {
            let mut x = crate::kernels::quant::tests::random_with(cols, 100 + t, 3.0, |_| None);
            if t % 4 == 0 {
                // Aligned with rows 10 and 2500: a tie for the largest logit.
                x.iter_mut().zip(&row10).for_each(|(x, w)| *x = 0.1 * *x + 200.0 * w);
            }
            let mut a = QuantizedActs::new();
            a.quantize(&x, 1, cols);
            let mut logits = vec![0f32; rows];
            gemm::gemm_parallel(&mut logits, &a, &full, &threads);
            let want = logits.iter().enumerate().fold(0, |b, (i, &v)| if v > logits[b] { i } else { b });
            let mut scores = vec![0f32; rows];
            if let Some(c) = fast.argmax(&full, &a, &mut scores, &threads) {
                assert_eq!(c.token as usize, want, "token {t}");
                if t % 4 == 0 {
                    assert_eq!(want, 10, "the tie goes to the first row");
                }
                assert!(c.candidates >= 1);
                decided += 1;
            }
        }
        assert!(decided >= 30, "{decided} of 40 decided");
    }

    /// Top-k: every row that could survive top-k of the full logits gets its exact logit, every
    /// other −inf and strictly below the k-th largest; so a sampler sees the same survivors.
    #[test]
    fn top_k_keeps_every_row_that_can_survive() {
        let (rows, cols) = (3000, 640);
        let (_, full) = head(rows, cols, 7);
        let threads = Threads::new(2);
        let fast = FastHead::new(&full, &threads).expect("scales fit");
        for (t, k) in [(0u64, 1usize), (1, 5), (2, 40), (3, 64)] {
            let x = crate::kernels::quant::tests::random_with(cols, 300 + t, 3.0, |_| None);
            let mut a = QuantizedActs::new();
            a.quantize(&x, 1, cols);
            let mut want = vec![0f32; rows];
            gemm::gemm_parallel(&mut want, &a, &full, &threads);
            let mut sorted = want.clone();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            let mut got = vec![0f32; rows];
            let n = fast.top_k(&full, &a, k, &mut got, &threads).expect("decided");
            assert!(n >= k);
            for (r, (&g, &w)) in got.iter().zip(&want).enumerate() {
                if g == f32::NEG_INFINITY {
                    assert!(w < kth, "k {k}: row {r} ({w}) dropped but not below the k-th ({kth})");
                } else {
                    assert_eq!(g.to_bits(), w.to_bits(), "k {k}: row {r}");
                }
            }
        }
    }
}
