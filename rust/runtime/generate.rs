//! One prompt's generation: prefill (reusing the session's cached prefix), then a token at a
//! time through the sampler until an end-of-sequence id, a stop string or a length limit; text
//! is released as it becomes final (never a split UTF-8 character, never the start of a stop).

use crate::error::{Error, Result};
use crate::kernels::ops;
use crate::runtime::constraint::{Constraint, Grammar};
use crate::runtime::model::Model;
use crate::runtime::sampler::{Sampler, SamplingParams};
use crate::runtime::session::{Session, Slot};
use crate::runtime::Cancel;
use crate::text::tokenizer::StreamDecoder;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string, or the end of a constraint's language (nothing but an end-of-sequence id
    /// could follow).
    Stop,
    /// `max_new_tokens` or `max_inference_len`.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// The caller wants text (not only ids): a model without a tokenizer is then an error.
    pub text: bool,
    /// What the output must match (JSON Schema or Lark grammar), if anything.
    pub grammar: Option<Grammar>,
}

/// The result of a finished generation.
#[derive(Clone, Debug)]
pub struct Completion {
    pub text: String,
    /// The new ids, without the end-of-sequence id that ended them.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Time spent in the constraint (masks and advancing it), part of the two above.
    pub constraint_seconds: f64,
    /// Greedy tokens the fast lm_head chose (`model::fast_head`), tokens where it could not
    /// decide and the full head ran, and the rows it rescored in all.
    pub fast_head_tokens: usize,
    pub fast_head_fallbacks: usize,
    pub fast_head_candidates: usize,
}

/// Top-k sampling up to this k takes the fast lm_head (`model::fast_head`).
const FAST_TOP_K: usize = 64;

/// One prompt's decode loop. `run` holds the session for the whole generation; each `step`
/// takes it for one token only (a stream), so other calls may interleave, and the session then
/// recomputes what they displaced.
pub struct Generation {
    pub(crate) model: Arc<Model>,
    pub(crate) slot: Arc<Slot>,
    params: GenerateParams,
    sampler: Sampler,
    constraint: Option<Constraint>,
    decoder: Option<StreamDecoder>,
    prompt_len: usize,
    /// Prompt then generated ids.
    seq: Vec<u32>,
    /// Generated text, cut at a stop string.
    text: String,
    /// Bytes of `text` already handed out by `step`.
    sent: usize,
    finish: Option<FinishReason>,
    flushed: bool,
    /// A stop string cut `text`: what the decoder still holds came after it.
    cut: bool,
    /// Set by the first step that works on the prompt.
    reused_tokens: Option<usize>,
    prefill_seconds: f64,
    decode_seconds: f64,
    constraint_seconds: f64,
    fast_head_tokens: usize,
    fast_head_fallbacks: usize,
    fast_head_candidates: usize,
}

impl Generation {
    /// A generation in the model's own session.
    pub fn new(model: Arc<Model>, prompt: Vec<u32>, params: GenerateParams) -> Result<Generation> {
        let slot = model.slot.clone();
        Generation::in_session(model, slot, prompt, params)
    }

    /// A generation in the session `slot` (one of `model.new_slot()`'s).
    pub fn in_session(
        model: Arc<Model>,
        slot: Arc<Slot>,
        prompt: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Generation> {
        model.check_sequence(&prompt, "the prompt")?;
        if prompt.len() == model.max_inference_len && params.max_new_tokens > 0 {
            return Err(Error::InvalidArgument(format!(
                "the prompt is {} tokens, which fills max_inference_len ({}) and leaves no room to \
                 generate: shorten it, or load the model with a larger max_inference_len",
                prompt.len(),
                model.max_inference_len
            )));
        }
        let sampler = Sampler::new(params.sampling.clone())?;
        if params.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument("stop strings must not be empty".into()));
        }
        let decoder = match model.tokenizer {
            Some(_) => Some(StreamDecoder::new(false)),
            None if params.stop.is_empty() && !params.text && params.grammar.is_none() => None,
            None => return Err(Error::NoTokenizer),
        };
        let constraint = match &params.grammar {
            Some(g) => Some(Constraint::new(&*model.vocabulary()?, g)?),
            None => None,
        };
        Ok(Generation {
            model,
            slot,
            sampler,
            constraint,
            decoder,
            prompt_len: prompt.len(),
            seq: prompt,
            text: String::new(),
            sent: 0,
            finish: None,
            flushed: false,
            cut: false,
            reused_tokens: None,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            constraint_seconds: 0.0,
            fast_head_tokens: 0,
            fast_head_fallbacks: 0,
            fast_head_candidates: 0,
            params,
        })
    }

    fn generated(&self) -> &[u32] {
        &self.seq[self.prompt_len..]
    }

    /// Generates one token and returns the text that became final (possibly empty); `None`
    /// once the generation is finished and all its text was returned.
    pub fn step(&mut self, cancel: Cancel<'_>) -> Result<Option<String>> {
        let slot = Arc::clone(&self.slot);
        let mut session = slot.lock_or_cancel(cancel)?;
        let range = self.step_with(&mut session, cancel)?;
        Ok(self.piece(range))
    }

    /// Steps until the end, holding the session throughout, and returns the completion;
    /// `cancel` is asked before every token (and between prefill chunks).
    pub fn run(&mut self, cancel: Cancel<'_>) -> Result<Completion> {
        let slot = Arc::clone(&self.slot);
        let mut session = slot.lock_or_cancel(cancel)?;
        while self.step_with(&mut session, cancel)?.is_some() {}
        Ok(self.completion().expect("finished"))
    }

    /// One token; returns the range of `text` that became final.
    pub(crate) fn step_with(&mut self, s: &mut Session, cancel: Cancel<'_>) -> Result<Option<Range<usize>>> {
        if self.at_end() {
            return Ok(self.flush());
        }
        let t0 = Instant::now();
        let model = &*self.model;
        let tf = &model.transformer;
        let (vocab, h) = (tf.config.vocab_size, tf.config.hidden_size);
        let mut last_row = 0;
        let reused = s.extend_to(tf, &self.seq, &model.threads, cancel, |_, _, n| last_row = n - 1)?;
        let scratch = &mut s.scratch;
        let logits = &mut scratch.logits[..vocab];
        let x = &scratch.x[last_row * h..(last_row + 1) * h];
        let x = tf.activations(x, 1, h, &mut scratch.xq, &model.threads);
        // Greedy or small top-k without a constraint: the fast head's shadow finds the rows of
        // the full head that can be chosen, and only those are computed.
        let fast_top_k = self.sampler.top_k_only(FAST_TOP_K);
        let fast =
            self.constraint.is_none() && tf.fast_head.is_some() && (self.sampler.is_greedy() || fast_top_k.is_some());
        let choice = match fast_top_k {
            _ if !fast => None,
            None => tf.greedy_token(&x, logits, &model.threads).map(|c| (Some(c.token), c.candidates)),
            Some(k) => tf.top_k_logits(&x, k, logits, &model.threads).map(|n| (None, n)),
        };
        let tok = if let Some((token, rows)) = choice {
            self.fast_head_tokens += 1;
            self.fast_head_candidates += rows;
            token.unwrap_or_else(|| self.sampler.sample(logits, &self.seq))
        } else {
            self.fast_head_fallbacks += fast as usize;
            tf.lm_head(logits, &x, 0..vocab, &model.threads);
            self.choose(logits)?
        };
        self.timed(t0.elapsed().as_secs_f64(), reused);
        self.accept(tok)
    }

    /// Whether the generation is over: finished, or at `max_new_tokens` or `max_inference_len`
    /// (which finish it).
    pub(crate) fn at_end(&mut self) -> bool {
        if self.finish.is_none()
            && (self.generated().len() >= self.params.max_new_tokens || self.seq.len() >= self.model.max_inference_len)
        {
            self.finish = Some(FinishReason::Length);
        }
        self.finish.is_some()
    }

    /// Whether `s` holds all of the sequence but its last token, so that the next step is that
    /// one token's forward pass (which `batch` runs for several generations at once).
    pub(crate) fn decode_ready(&self, s: &Session) -> bool {
        s.tokens.len() + 1 == self.seq.len() && self.seq.starts_with(&s.tokens)
    }

    /// The last token of the sequence, and its position.
    pub(crate) fn last(&self) -> (u32, usize) {
        (self.seq[self.seq.len() - 1], self.seq.len() - 1)
    }

    /// The next token from the full lm_head's `logits` of the last token: the constraint's
    /// mask, then the sampler.
    pub(crate) fn choose(&mut self, logits: &mut [f32]) -> Result<u32> {
        if ops::first_non_finite(logits).is_some() {
            return Err(self.model.non_finite(self.seq.len() - 1));
        }
        if let Some(c) = &mut self.constraint {
            let t = Instant::now();
            c.mask(logits)?;
            self.constraint_seconds += t.elapsed().as_secs_f64();
        }
        Ok(self.sampler.sample(logits, &self.seq))
    }

    /// Counts a step of `seconds` (whose prefill, if any, started after `reused` cached tokens)
    /// as prefill until it gives the first token (a batch prefills a long prompt in several
    /// steps), then as decoding.
    pub(crate) fn timed(&mut self, seconds: f64, reused: usize) {
        if self.generated().is_empty() {
            self.reused_tokens.get_or_insert(reused);
            self.prefill_seconds += seconds;
        } else {
            self.decode_seconds += seconds;
        }
    }

    /// The prompt, then the generated ids.
    pub(crate) fn seq(&self) -> &[u32] {
        &self.seq
    }

    /// Takes the chosen token `tok`: the end, or one more token of text and of the constraint;
    /// returns the range of `text` that became final.
    pub(crate) fn accept(&mut self, tok: u32) -> Result<Option<Range<usize>>> {
        let model = &*self.model;
        if model.eos_token_ids.contains(&tok) {
            self.finish = Some(FinishReason::Eos);
            return Ok(self.flush());
        }
        self.seq.push(tok);
        if let (Some(d), Some(t)) = (&mut self.decoder, &model.tokenizer) {
            d.push_into(t, tok, &mut self.text);
        }
        if let Some(c) = &mut self.constraint {
            let t = Instant::now();
            c.consume(tok)?;
            self.constraint_seconds += t.elapsed().as_secs_f64();
            if c.is_finished() {
                self.finish = Some(FinishReason::Stop);
                return Ok(self.flush());
            }
        }
        Ok(Some(self.release()))
    }

    /// `range` of the text, as `step` returns it.
    pub(crate) fn piece(&self, range: Option<Range<usize>>) -> Option<String> {
        range.map(|r| self.text[r].to_string())
    }

    /// Cuts the text decoded so far at the first stop string and returns the range that may be
    /// shown: everything not yet shown except a tail that could still become a stop string.
    fn release(&mut self) -> Range<usize> {
        let stops = &self.params.stop;
        // A stop string cannot start inside text already sent (that tail was held back).
        let found = stops.iter().filter_map(|s| self.text[self.sent..].find(s.as_str())).min();
        if let Some(at) = found {
            self.text.truncate(self.sent + at);
            self.finish = Some(FinishReason::Stop);
            self.cut = true;
        }
        let held = if self.finish.is_some() { 0 } else { held_back(&self.text[self.sent..], stops) };
        let range = self.sent..self.text.len() - held;
        self.sent = range.end;
        range
    }

    /// After the finish: the decoder's remainder and any held-back text, once.
    fn flush(&mut self) -> Option<Range<usize>> {
        if self.flushed {
            return None;
        }
        self.flushed = true;
        if let Some(d) = self.decoder.as_mut().filter(|_| !self.cut) {
            d.flush_into(&mut self.text);
        }
        Some(self.release())
    }

    /// The completion, once the generation finished and all its text was returned.
    pub fn completion(&self) -> Option<Completion> {
        let finish_reason = self.finish.filter(|_| self.flushed)?;
        Some(Completion {
            text: self.text.clone(),
            token_ids: self.generated().to_vec(),
            finish_reason,
            prompt_tokens: self.prompt_len,
            reused_tokens: self.reused_tokens.unwrap_or(0),
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_seconds,
            constraint_seconds: self.constraint_seconds,
            fast_head_tokens: self.fast_head_tokens,
            fast_head_fallbacks: self.fast_head_fallbacks,
            fast_head_candidates: self.fast_head_candidates,
        })
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    text.char_indices()
        .map(|(i, _)| i)
        .filter(|&i| text.len() - i < longest)
        .find(|&i| stops.iter().any(|s| s.starts_with(&text[i..])))
        .map_or(0, |i| text.len() - i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_keeps_possible_stop_prefixes() {
        let stops = vec!["</end>".to_string(), "xy".to_string()];
        assert_eq!(held_back("hello </e", &stops), 3);
        assert_eq!(held_back("hello x", &stops), 1);
        assert_eq!(held_back("hello", &stops), 0);
        assert_eq!(held_back("é<", &stops), 1);
        assert_eq!(held_back("anything", &[]), 0);
    }
}
