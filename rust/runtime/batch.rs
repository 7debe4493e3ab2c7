//! Batched decoding: a step of several generations, each in its own session, in one pass over
//! the weights (`Transformer::forward_segments`) and one lm_head GEMM. Decoding one token reads
//! every weight for little arithmetic, so n streams cost little more than one (a server's
//! `--parallel` slots). A generation that needs a prefill (a new prompt) adds a chunk of it to
//! the pass, so that the others keep decoding while it prefills, a chunk a step.
//! Each generation gets the bits it would get alone: every row of a batched matmul is computed
//! as the single-row one, and attention reads only its own cache.

use crate::error::{Error, Result};
use crate::kernels::threads::Threads;
use crate::model::forward::{Segment, Transformer, CHUNK};
use crate::runtime::generate::Generation;
use crate::runtime::session::Session;
use crate::runtime::Cancel;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

/// Decode tokens per pass at most: the rest of the pass's `CHUNK` rows take a prefill chunk.
const MAX_DECODE: usize = CHUNK / 2;

/// The logits of a pass's tokens, kept between steps (grown to the largest pass seen).
#[derive(Default)]
pub struct Batch {
    logits: Vec<f32>,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    /// One step of every generation in `gens` (of one model, each in its own session): what
    /// `Generation::step` would return for each, in order, except that a generation still
    /// prefilling returns empty text until its first token. The generations that only need
    /// their last token's forward pass decode together; the first that needs a prefill adds a
    /// chunk of it (the others wait for theirs). One generation alone and decoding takes
    /// `Generation::step`'s path (and the fast lm_head, when loaded). An error of one
    /// generation is its own result.
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
        // Locked in address order, so that batches sharing sessions cannot deadlock.
        let mut order: Vec<usize> = (0..slots.len()).collect();
        order.sort_by_key(|&i| Arc::as_ptr(&slots[i]) as usize);
        let mut locked: Vec<Option<MutexGuard<'_, Session>>> = (0..slots.len()).map(|_| None).collect();
        for i in order {
            locked[i] = Some(slots[i].lock_or_cancel(cancel)?);
        }
        let mut sessions: Vec<_> = locked.into_iter().map(|g| g.expect("every session locked")).collect();
        let mut out: Vec<Result<Option<String>>> = (0..gens.len()).map(|_| Ok(Some(String::new()))).collect();
        let (mut ready, mut waiting) = (Vec::new(), Vec::new());
        for (i, (g, s)) in gens.iter_mut().zip(sessions.iter_mut()).enumerate() {
            if g.at_end() {
                out[i] = g.step_with(s, cancel).map(|r| g.piece(r)); // the rest of its text
            } else if g.decode_ready(s) {
                ready.push(i);
            } else {
                waiting.push(i);
            }
        }
        if let ([i], []) = (&ready[..], &waiting[..]) {
            let i = *i;
            out[i] = gens[i].step_with(&mut sessions[i], cancel).map(|r| gens[i].piece(r));
            return Ok(out);
        }
        let mut prefill = waiting.first().copied();
        if ready.is_empty() && prefill.is_none() {
            return Ok(out); // every generation was at its end
        }
        let groups: Vec<&[usize]> = if ready.is_empty() { vec![&[]] } else { ready.chunks(MAX_DECODE).collect() };
        for group in groups {
            let tf = &model.transformer;
            for (i, r) in self.pass(tf, &model.threads, gens, &mut sessions, group, prefill.take()) {
                out[i] = r;
            }
        }
        Ok(out)
    }

    /// One forward pass: the last tokens of generations `decode` (decode-ready) and, for
    /// `prefill`, its next chunk; then the lm_head over the rows that give a token (the decode
    /// rows, and the prefill's last row when the chunk ends its prompt), and each of those
    /// generations' constraint and sampler on its row.
    fn pass(
        &mut self,
        tf: &Transformer,
        threads: &Threads,
        gens: &mut [&mut Generation],
        sessions: &mut [MutexGuard<'_, Session>],
        decode: &[usize],
        prefill: Option<usize>,
    ) -> Vec<(usize, Result<Option<String>>)> {
        let t0 = Instant::now();
        let (vocab, h, m) = (tf.config.vocab_size, tf.config.hidden_size, decode.len());
        // Each part: its generation, tokens and first position.
        let mut parts: Vec<(usize, Vec<u32>, usize)> = decode
            .iter()
            .map(|&i| {
                let (tok, pos) = gens[i].last();
                (i, vec![tok], pos)
            })
            .collect();
        // The prefill resumes after what its session can reuse, up to the pass's free rows.
        let mut reused = 0;
        if let Some(i) = prefill {
            let seq = gens[i].seq();
            reused = sessions[i].reusable(tf, seq);
            sessions[i].tokens.truncate(reused);
            let end = (reused + CHUNK - m).min(seq.len());
            parts.push((i, seq[reused..end].to_vec(), reused));
        }
        let ends_prompt = prefill.is_some_and(|i| parts[m].2 + parts[m].1.len() == gens[i].seq().len());

        let mut by_index: Vec<Option<&mut Session>> = sessions.iter_mut().map(|s| Some(&mut **s)).collect();
        let mut chosen: Vec<&mut Session> =
            parts.iter().map(|(i, ..)| by_index[*i].take().expect("distinct sessions")).collect();
        {
            let (head, rest) = chosen.split_first_mut().expect("a non-empty pass");
            let Session { cache, scratch, .. } = &mut **head;
            let mut segments = vec![Segment { cache, tokens: &parts[0].1, start: parts[0].2 }];
            for (s, (_, tokens, start)) in rest.iter_mut().zip(&parts[1..]) {
                segments.push(Segment { cache: &mut s.cache, tokens, start: *start });
            }
            tf.forward_segments(scratch, &mut segments, threads);
        }
        for (s, (_, tokens, _)) in chosen.iter_mut().zip(&parts) {
            s.tokens.extend_from_slice(tokens);
        }
        // The rows that give a token, together: the decode rows, then the prompt's last.
        let rows = m + ends_prompt as usize;
        let scratch = &mut chosen[0].scratch;
        if ends_prompt {
            let last = m + parts[m].1.len() - 1;
            scratch.x.copy_within(last * h..(last + 1) * h, m * h);
        }
        if self.logits.len() < rows * vocab {
            self.logits.resize(rows * vocab, 0.0);
        }
        if rows > 0 {
            let x = tf.activations(&scratch.x[..rows * h], rows, h, &mut scratch.xq, threads);
            tf.lm_head(&mut self.logits[..rows * vocab], &x, 0..vocab, threads);
        }
        let seconds = t0.elapsed().as_secs_f64();
        let mut out = Vec::with_capacity(parts.len());
        for (k, (i, _, start)) in parts.iter().enumerate() {
            let g = &mut *gens[*i];
            let r = if k < rows {
                let logits = &mut self.logits[k * vocab..(k + 1) * vocab];
                let first = if k < m { *start } else { reused };
                g.choose(logits).and_then(|tok| {
                    g.timed(seconds, first);
                    g.accept(tok).map(|r| g.piece(r))
                })
            } else {
                g.timed(seconds, reused); // a prefill chunk that gives no token yet
                Ok(Some(String::new()))
            };
            out.push((*i, r));
        }
        out
    }
}
