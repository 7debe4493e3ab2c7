//! Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p,
//! min-p and a repetition penalty, in the order transformers applies them (repetition penalty,
//! temperature, top-k, top-p, min-p). Seeded runs are reproducible. A logit of -inf (a token a
//! constraint forbids) is never chosen.

use crate::error::{Error, Result};
use crate::kernels::ops;

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    /// 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub min_p: f32,
    /// 1 is no penalty.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: None }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64.
#[derive(Clone, Debug)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    /// A seed from the OS-randomised hasher keys and the clock.
    pub fn entropy_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
        h.finish()
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Reused between calls: (token, probability) candidates.
    candidates: Vec<(u32, f32)>,
    /// Reused between calls: one bit per token id, set for ids already penalized.
    penalized: Vec<u64>,
}

/// Candidates sorted first when top-p needs an order; more are sorted only if these do not reach p.
const TOP_P_FIRST_PASS: usize = 1024;

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(Rng::entropy_seed);
        Ok(Sampler { params, rng: Rng::new(seed), candidates: Vec::new(), penalized: Vec::new() })
    }

    /// Whether `sample` is the argmax of the logits as given (greedy, no repetition penalty):
    /// then it needs only the largest logit.
    pub fn is_greedy(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty == 1.0 && (p.temperature == 0.0 || !(1.0 / p.temperature).is_finite())
    }

    /// `Some(k)` when `sample` keeps only the `k ≤ max_k` largest logits (and ties) of the logits
    /// as given (top-k sampling without a repetition penalty): then it needs only those rows,
    /// every other may be −inf.
    pub fn top_k_only(&self, max_k: usize) -> Option<usize> {
        let p = &self.params;
        (!self.is_greedy() && p.repetition_penalty == 1.0 && p.top_k > 0 && p.top_k <= max_k).then_some(p.top_k)
    }

    /// The next token given `logits` (modified in place) and the sequence so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            // Each distinct token once: divide positive logits, multiply negative ones.
            let bits = &mut self.penalized;
            bits.resize(logits.len().div_ceil(64), 0);
            for &t in history {
                let (word, bit) = (t as usize / 64, 1u64 << (t % 64));
                if let Some(l) = logits.get_mut(t as usize).filter(|_| bits[word] & bit == 0) {
                    bits[word] |= bit;
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
            for &t in history {
                if let Some(w) = bits.get_mut(t as usize / 64) {
                    *w = 0;
                }
            }
        }
        let inv_t = 1.0 / p.temperature;
        // A temperature so small that 1/t overflows is greedy too.
        if p.temperature == 0.0 || !inv_t.is_finite() {
            return ops::argmax(logits) as u32;
        }
        let c = &mut self.candidates;
        c.clear();
        // A constraint's -inf marks tokens that may not be chosen at all: never candidates.
        c.extend(
            logits.iter().enumerate().filter(|(_, &l)| l > f32::NEG_INFINITY).map(|(i, &l)| (i as u32, l * inv_t)),
        );
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            // Keep every token at least as likely as the k-th (ties included, as transformers).
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            let kth = c[p.top_k - 1].1;
            c.retain(|x| x.1 >= kth);
            // In one order whatever the logits' other rows were (the fast lm_head passes only
            // the rows that can survive): the same sums and the same draw.
            c.sort_unstable_by(by_logit_desc);
        }
        // Softmax over the survivors.
        let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f64;
        for x in c.iter_mut() {
            x.1 = (x.1 - max).exp();
            sum += x.1 as f64;
        }
        for x in c.iter_mut() {
            x.1 = (x.1 as f64 / sum) as f32;
        }
        if p.top_p < 1.0 {
            // The smallest set of most likely tokens whose mass reaches top_p (at least one).
            let first = TOP_P_FIRST_PASS.min(c.len());
            if first < c.len() {
                c.select_nth_unstable_by(first - 1, by_logit_desc);
            }
            c[..first].sort_unstable_by(by_logit_desc);
            let mut keep = cutoff(&c[..first], p.top_p);
            if keep.is_none() {
                c.sort_unstable_by(by_logit_desc);
                keep = cutoff(c, p.top_p);
            }
            c.truncate(keep.unwrap_or(c.len()));
        }
        if p.min_p > 0.0 {
            let top = c.iter().map(|x| x.1).fold(0f32, f32::max);
            c.retain(|x| x.1 >= p.min_p * top);
        }
        let total: f64 = c.iter().map(|x| x.1 as f64).sum();
        if !(total > 0.0 && total.is_finite()) {
            return ops::argmax(logits) as u32;
        }
        let mut r = self.rng.next_f64() * total;
        for &(tok, prob) in c.iter() {
            r -= prob as f64;
            if r < 0.0 {
                return tok;
            }
        }
        c.last().map_or(0, |x| x.0)
    }
}

/// How many of the sorted candidates it takes for the mass to reach `p`, if they reach it.
fn cutoff(sorted: &[(u32, f32)], p: f32) -> Option<usize> {
    let mut acc = 0f64;
    for (i, x) in sorted.iter().enumerate() {
        acc += x.1 as f64;
        if acc >= p as f64 {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut r = Rng::new(seed);
        (0..n).map(|_| (r.next_f64() * 8.0 - 4.0) as f32).collect()
    }

    fn draw(params: SamplingParams, n: usize) -> Vec<u32> {
        let mut s = Sampler::new(params).unwrap();
        let l = logits(5000, 1);
        (0..n).map(|_| s.sample(&mut l.clone(), &[])).collect()
    }

    #[test]
    fn greedy_is_argmax_with_first_tie() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&mut [0.0, 2.0, 2.0, 1.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let p = SamplingParams { temperature: 1.0, seed: Some(42), ..Default::default() };
        let a = draw(p.clone(), 50);
        assert_eq!(a, draw(p.clone(), 50));
        assert_ne!(a, draw(SamplingParams { seed: Some(43), ..p }, 50));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let l = logits(5000, 1);
        let mut order: Vec<u32> = (0..5000).collect();
        order.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let top3 = &order[..3];
        let k = draw(SamplingParams { temperature: 1.0, top_k: 3, seed: Some(1), ..Default::default() }, 300);
        assert!(k.iter().all(|t| top3.contains(t)));
        // A tiny top_p keeps only the most likely token.
        let p = draw(SamplingParams { temperature: 1.0, top_p: 1e-6, seed: Some(1), ..Default::default() }, 50);
        assert!(p.iter().all(|&t| t == order[0]));
        // min_p = 1 keeps only the maximum.
        let m = draw(SamplingParams { temperature: 1.0, min_p: 1.0, seed: Some(1), ..Default::default() }, 50);
        assert!(m.iter().all(|&t| t == order[0]));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed: Some(7), ..Default::default() }).unwrap();
        let base = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        let ones = (0..4000).filter(|_| s.sample(&mut base.clone(), &[]) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..Default::default() }).unwrap();
        let mut l = [3.0f32, 2.0, -1.0];
        assert_eq!(s.sample(&mut l, &[0, 0, 2]), 1);
        assert_eq!(l, [1.5, 2.0, -2.0]);
    }

    #[test]
    fn top_k_keeps_ties_and_tiny_temperatures_are_greedy() {
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, top_k: 1, seed: Some(3), ..Default::default() }).unwrap();
        let drawn: std::collections::HashSet<u32> =
            (0..200).map(|_| s.sample(&mut [0.0, 5.0, 5.0, 1.0], &[])).collect();
        assert_eq!(drawn, [1, 2].into_iter().collect());
        let mut s = Sampler::new(SamplingParams { temperature: 1e-40, seed: Some(3), ..Default::default() }).unwrap();
        assert_eq!(s.sample(&mut [0.0, 5.0, 4.0], &[]), 1);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for p in [
            SamplingParams { temperature: -1.0, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.5, ..Default::default() },
            SamplingParams { min_p: -0.1, ..Default::default() },
            SamplingParams { repetition_penalty: 0.0, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
        ] {
            assert!(Sampler::new(p).is_err());
        }
    }
}
