//! Batched decoding: a step of several generations, each in its own session, where those that
//! only need their last token's forward pass share one pass over the weights
//! (`Transformer::forward_segments`) and one lm_head GEMM. Decoding one token reads every weight
//! for little arithmetic, so n streams cost little more than one (a server's `--parallel` slots).
//! Each generation gets the bits it would get alone: every row of a batched matmul is computed
//! as the single-row one.

use crate::error::{Error, Result};
use crate::model::forward::{Segment, CHUNK};
use crate::runtime::generate::Generation;
use crate::runtime::session::Session;
use crate::runtime::Cancel;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

/// The logits of a batch's tokens, kept between steps (grown to the largest batch seen).
#[derive(Default)]
pub struct Batch {
    logits: Vec<f32>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// One step of every generation in `gens` (of one model, each in its own session): what
    /// `Generation::step` would return for each, in order. Generations that need a prefill (a
    /// new prompt, or a session another call displaced) run theirs alone first; the others
    /// decode their next token together. An error of one generation is its own result.
    pub fn step(&mut self, gens: &mut [&mut Generation], cancel: Cancel<'_>) -> Result<Vec<Result<Option<String>>>> {
        let Some(first) = gens.first() else { return Ok(Vec::new()) };
        let model = Arc::clone(&first.model);
        for (i, g) in gens.iter().enumerate() {
            if !Arc::ptr_eq(&g.model, &model) {
                return Err(Error::InvalidArgument("a batch's generations must be of one model".into()));
            }
            if gens[..i].iter().any(|o| Arc::ptr_eq(&o.slot, &g.slot)) {
                return Err(Error::InvalidArgument("a batch's generations must each have their own session".into()));
            }
        }
        let slots: Vec<_> = gens.iter().map(|g| Arc::clone(&g.slot)).collect();
        let mut sessions =
            slots.iter().map(|s| s.lock_or_cancel(cancel)).collect::<Result<Vec<MutexGuard<'_, Session>>>>()?;
        let mut out: Vec<Option<Result<Option<String>>>> = (0..gens.len()).map(|_| None).collect();
        let mut ready = Vec::new();
        for (i, (g, s)) in gens.iter_mut().zip(sessions.iter_mut()).enumerate() {
            if !g.at_end() && g.decode_ready(s) {
                ready.push(i);
            } else {
                out[i] = Some(g.step_with(s, cancel).map(|r| g.piece(r)));
            }
        }
        if let [i] = ready[..] {
            out[i] = Some(gens[i].step_with(&mut sessions[i], cancel).map(|r| gens[i].piece(r)));
        } else {
            for group in ready.chunks(CHUNK) {
                let steps = self.decode(&model.transformer, &model.threads, gens, &mut sessions, group);
                for (&i, r) in group.iter().zip(steps) {
                    out[i] = Some(r);
                }
            }
        }
        Ok(out.into_iter().map(|r| r.expect("every generation stepped")).collect())
    }

    /// The next token of generations `which` (decode-ready, at most `CHUNK`): their last
    /// tokens' forward pass in one, the lm_head over all of them in one, then each one's
    /// constraint and sampler on its row.
    fn decode(
        &mut self,
        tf: &crate::model::forward::Transformer,
        threads: &crate::kernels::threads::Threads,
        gens: &mut [&mut Generation],
        sessions: &mut [MutexGuard<'_, Session>],
        which: &[usize],
    ) -> Vec<Result<Option<String>>> {
        let t0 = Instant::now();
        let (vocab, h, m) = (tf.config.vocab_size, tf.config.hidden_size, which.len());
        let last: Vec<(u32, usize)> = which.iter().map(|&i| gens[i].last()).collect();
        let mut chosen: Vec<&mut Session> =
            sessions.iter_mut().enumerate().filter(|(i, _)| which.contains(i)).map(|(_, s)| &mut **s).collect();
        let (head, rest) = chosen.split_first_mut().expect("a non-empty batch");
        let Session { cache, scratch, tokens } = &mut **head;
        let mut segments = vec![Segment { cache, tokens: std::slice::from_ref(&last[0].0), start: last[0].1 }];
        for (s, (tok, pos)) in rest.iter_mut().zip(&last[1..]) {
            segments.push(Segment { cache: &mut s.cache, tokens: std::slice::from_ref(tok), start: *pos });
        }
        tf.forward_segments(scratch, &mut segments, threads);
        tokens.push(last[0].0);
        for (s, (tok, _)) in rest.iter_mut().zip(&last[1..]) {
            s.tokens.push(*tok);
        }
        if self.logits.len() < m * vocab {
            self.logits.resize(m * vocab, 0.0);
        }
        let x = tf.activations(&scratch.x[..m * h], m, h, &mut scratch.xq, threads);
        tf.lm_head(&mut self.logits[..m * vocab], &x, 0..vocab, threads);
        let seconds = t0.elapsed().as_secs_f64();
        let rows = self.logits.chunks_exact_mut(vocab);
        which
            .iter()
            .zip(rows)
            .map(|(&i, logits)| {
                let g = &mut *gens[i];
                let tok = g.choose(logits)?;
                g.timed(seconds, g.last().1);
                g.accept(tok).map(|r| g.piece(r))
            })
            .collect()
    }
}
