//! The engine a Python `Model` wraps: weights, tokenizer, and one session (KV cache + scratch)
//! behind a mutex; `Generation` is one prompt's decode loop, stepped a token at a time.

use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::kernels::ops::{self, LogSumExp};
use crate::kernels::threads::Threads;
use crate::model::config::Config;
use crate::model::forward::{Model, Scratch, WeightType, CHUNK};
use crate::model::kv_cache::KvCache;
use crate::runtime::sampler::{Sampler, SamplingParams};
use crate::text::tokenizer::{StreamDecoder, Tokenizer};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::Instant;

/// The default cap on a sequence when the caller gives none (and the model allows it).
pub const DEFAULT_MAX_INFERENCE_LEN: usize = 4096;

/// More worker threads than this only cost memory (each has a scores row) and hand-offs.
pub const MAX_THREADS: usize = 256;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub max_inference_len: Option<usize>,
    pub weights: WeightType,
    pub threads: Option<usize>,
    /// Refuse to load when the memory plan's total exceeds this many bytes.
    pub memory_limit: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { max_inference_len: None, weights: WeightType::Q8_0, threads: None, memory_limit: None }
    }
}

/// Bytes held by each part of a loaded model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub weights: usize,
    pub kv_cache: usize,
    pub scratch: usize,
    pub tokenizer: usize,
}

impl Memory {
    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.scratch + self.tokenizer
    }

    /// What a model of `ck` holds with these settings (the weights are not read).
    fn plan(ck: &Checkpoint, max_len: usize, weights: WeightType, threads: usize) -> Result<Memory> {
        let c = &ck.config;
        Ok(Memory {
            weights: Model::plan_weight_bytes(c, &ck.source, weights)?,
            kv_cache: KvCache::bytes_for(&Model::cache_capacities(c, max_len), c.kv_dim(), max_len),
            scratch: Scratch::bytes_for(c, max_len, threads),
            tokenizer: ck.tokenizer.as_ref().map_or(0, Tokenizer::memory_bytes),
        })
    }
}

/// The memory a model at `path` would hold when loaded with `opts`, without loading its weights
/// (their shapes and types are read, and the tokenizer is built): equal to `Engine::memory`
/// after `Engine::load`.
pub fn memory_plan(path: &Path, opts: &LoadOptions) -> Result<Memory> {
    let ck = Checkpoint::open(path)?;
    let max_len = resolve_max_inference_len(&ck.config, opts.max_inference_len)?;
    Memory::plan(&ck, max_len, opts.weights, thread_count(opts.threads)?)
}

/// The worker count `threads` asks for (`None`: every CPU this process may use).
pub fn thread_count(threads: Option<usize>) -> Result<usize> {
    match threads {
        Some(n) if n == 0 || n > MAX_THREADS => {
            Err(Error::InvalidArgument(format!("threads must be between 1 and {MAX_THREADS}, got {n}")))
        }
        Some(n) => Ok(n),
        None => Ok(Threads::available().min(MAX_THREADS)),
    }
}

/// What the cache currently holds: the KV rows of `tokens`, positions `0..tokens.len()`.
struct Session {
    cache: KvCache,
    scratch: Scratch,
    tokens: Vec<u32>,
}

impl Session {
    /// Makes the cache hold `seq` (non-empty), reusing the longest prefix it already holds but
    /// always recomputing the last token, and calls `on_chunk(scratch, start, len)` after each
    /// forward chunk with the chunk's hidden states in `scratch.x`. Returns the reused count, or
    /// `Error::Interrupted` when `cancel()` says so before a chunk (the cache then holds the
    /// chunks done so far, consistently).
    fn extend_to(
        &mut self,
        model: &Model,
        seq: &[u32],
        threads: &Threads,
        cancel: Cancel<'_>,
        mut on_chunk: impl FnMut(&mut Scratch, usize, usize),
    ) -> Result<usize> {
        let reused = self.reusable(model, seq);
        self.tokens.truncate(reused);
        for chunk in seq[reused..].chunks(CHUNK) {
            if cancel() {
                return Err(Error::Interrupted);
            }
            let start = self.tokens.len();
            model.forward(&mut self.scratch, &mut self.cache, chunk, start, threads);
            self.tokens.extend_from_slice(chunk);
            on_chunk(&mut self.scratch, start, chunk.len());
        }
        Ok(reused)
    }

    /// How many leading tokens of the cache can serve `seq`: the common prefix (but not the
    /// whole of `seq`, whose last token must be recomputed for its logits), or none when a
    /// sliding layer's ring no longer holds a position that the rest of `seq` reads (the window
    /// behind the first recomputed position), as the ring's slot tags tell.
    fn reusable(&self, model: &Model, seq: &[u32]) -> usize {
        let common = self.tokens.iter().zip(seq).take_while(|(a, b)| a == b).count();
        let reused = common.min(seq.len() - 1);
        let first = (reused + 1).saturating_sub(model.config.sliding_window);
        let intact = (0..model.config.num_hidden_layers).all(|l| self.cache.holds(l, first, reused));
        if intact {
            reused
        } else {
            0
        }
    }
}

/// Asked between chunks of a forward pass and between tokens: `true` stops the call with
/// `Error::Interrupted` (the Python binding answers it from Python's signal handlers: Ctrl-C).
pub type Cancel<'a> = &'a mut dyn FnMut() -> bool;

/// Told `(done, total)` bytes as a long job goes; an error stops it.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> Result<()>;

/// A `Cancel` that never cancels.
pub fn never() -> bool {
    false
}

pub struct Engine {
    pub model: Model,
    pub tokenizer: Option<Tokenizer>,
    pub max_inference_len: usize,
    /// Generation stops at any of these (generation_config.json, else config.json).
    pub eos_token_ids: Vec<u32>,
    pub threads: Threads,
    /// The model's own chat template, when its files have one.
    pub chat_template: Option<String>,
    /// The file or directory it was loaded from (for messages).
    pub path: PathBuf,
    session: Mutex<Session>,
}

impl Engine {
    /// Loads a Hugging Face model directory, a GGUF file, or a directory holding one GGUF.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Engine> {
        Engine::load_with_progress(path, opts, &mut |_, _| Ok(()))
    }

    /// `load`, calling `progress(done, total)` in bytes of tensor data after each tensor; an
    /// error from it stops loading.
    pub fn load_with_progress(path: &Path, opts: &LoadOptions, progress: Progress<'_>) -> Result<Engine> {
        let ck = Checkpoint::open(path)?;
        let max_inference_len = resolve_max_inference_len(&ck.config, opts.max_inference_len)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        let n_threads = thread_count(opts.threads)?;
        if let Some(limit) = opts.memory_limit {
            let plan = Memory::plan(&ck, max_inference_len, opts.weights, n_threads)?;
            if plan.total() > limit {
                let hint = if opts.weights == WeightType::Q8_0 { "" } else { " or use weights=\"q8_0\"" };
                return Err(Error::MemoryLimit(format!(
                    "{}: loading would take {:.1} MB (weights {:.1}, KV cache {:.1}, scratch {:.1}, \
                     tokenizer {:.1}), more than memory_limit {:.1} MB; lower max_inference_len \
                     (the KV cache){hint}",
                    path.display(),
                    plan.total() as f64 / 1e6,
                    plan.weights as f64 / 1e6,
                    plan.kv_cache as f64 / 1e6,
                    plan.scratch as f64 / 1e6,
                    plan.tokenizer as f64 / 1e6,
                    limit as f64 / 1e6
                )));
            }
        }
        let threads = Threads::new(n_threads);
        let Checkpoint { source, config, tokenizer, eos_token_ids, chat_template, .. } = ck;
        let model = Model::load(config, &source, opts.weights, &threads, progress)?;
        let c = &model.config;
        let session = Session {
            cache: KvCache::new(&Model::cache_capacities(c, max_inference_len), c.kv_dim(), max_inference_len),
            scratch: Scratch::new(c, max_inference_len, threads.count()),
            tokens: Vec::new(),
        };
        Ok(Engine {
            model,
            tokenizer,
            max_inference_len,
            eos_token_ids,
            threads,
            chat_template,
            path: path.to_path_buf(),
            session: Mutex::new(session),
        })
    }

    pub fn config(&self) -> &Config {
        &self.model.config
    }

    pub fn memory(&self) -> Memory {
        let c = &self.model.config;
        Memory {
            weights: self.model.weight_bytes(),
            kv_cache: KvCache::bytes_for(
                &Model::cache_capacities(c, self.max_inference_len),
                c.kv_dim(),
                self.max_inference_len,
            ),
            scratch: Scratch::bytes_for(c, self.max_inference_len, self.threads.count()),
            tokenizer: self.tokenizer.as_ref().map_or(0, Tokenizer::memory_bytes),
        }
    }

    /// Forgets the cached sequence: the next call computes its prompt from the start.
    pub fn reset(&self) {
        self.session().tokens.clear();
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or(Error::NoTokenizer)
    }

    pub fn tokenize(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        Ok(self.tokenizer()?.encode(text, add_bos))
    }

    pub fn detokenize(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer()?.decode(ids, skip_special_tokens)
    }

    /// The session, usable even if a panic poisoned the lock (its state is always consistent:
    /// `tokens` only grows after a chunk completed).
    fn session(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session, waiting for another call to release it unless `cancel` says to stop (so a
    /// Ctrl-C is seen while another thread's long generation holds the model).
    fn session_or_cancel(&self, cancel: Cancel<'_>) -> Result<MutexGuard<'_, Session>> {
        loop {
            match self.session.try_lock() {
                Ok(s) => return Ok(s),
                Err(TryLockError::Poisoned(e)) => return Ok(e.into_inner()),
                Err(TryLockError::WouldBlock) if cancel() => return Err(Error::Interrupted),
                Err(TryLockError::WouldBlock) => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
        }
    }

    /// Checks that `ids` is a non-empty sequence of vocabulary ids that fits the cache.
    pub fn check_sequence(&self, ids: &[u32], what: &str) -> Result<()> {
        if ids.is_empty() {
            return Err(Error::InvalidArgument(format!("{what} is empty")));
        }
        if ids.len() > self.max_inference_len {
            return Err(Error::InvalidArgument(format!(
                "{what} is {} tokens, more than max_inference_len ({})",
                ids.len(),
                self.max_inference_len
            )));
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        Ok(())
    }

    /// Logits `(ids.len(), vocab)` of a fresh forward pass over `ids`, into `out` (the caller
    /// allocates it, after `check_sequence`, so that a too large request fails there).
    pub fn logits(&self, ids: &[u32], out: &mut [f32], cancel: Cancel<'_>) -> Result<()> {
        self.check_sequence(ids, "the sequence")?;
        let vocab = self.model.config.vocab_size;
        if out.len() != ids.len() * vocab {
            return Err(Error::Internal(format!("logits buffer of {} floats for {} tokens", out.len(), ids.len())));
        }
        let mut s = self.session_or_cancel(cancel)?;
        s.tokens.clear();
        let mut non_finite = None;
        s.extend_to(&self.model, ids, &self.threads, cancel, |scratch, start, n| {
            let rows = &mut out[start * vocab..(start + n) * vocab];
            let h = self.model.config.hidden_size;
            let x = self.model.activations(&scratch.x, n, h, &mut scratch.xq, &self.threads);
            self.model.lm_head(rows, &x, 0..vocab, &self.threads);
            if non_finite.is_none() {
                non_finite = ops::first_non_finite(rows).map(|i| start + i / vocab);
            }
        })?;
        match non_finite {
            Some(pos) => Err(self.non_finite(pos)),
            None => Ok(()),
        }
    }

    /// The error for NaN or infinite logits at `position`: names the first weight tensor that
    /// holds such a value (tensors used in place from a file are not scanned at load), or says
    /// that the weights are finite and an activation overflowed.
    fn non_finite(&self, position: usize) -> Error {
        let cause = match self.model.first_non_finite_weight() {
            Some((name, i)) => format!("tensor {name} holds a NaN or infinite value (element {i})"),
            None => "the weights are finite, so an activation overflowed f32".to_string(),
        };
        Error::NonFinite(format!(
            "{}: the forward pass gave NaN or infinite logits at position {position}: {cause}",
            self.path.display()
        ))
    }

    /// `log p(ids[i + 1] | ids[..=i])` for every `i`, teacher-forced, vocabulary tile by tile
    /// so that no more than the scratch logits buffer is ever held.
    pub fn logprobs(&self, ids: &[u32], cancel: Cancel<'_>) -> Result<Vec<f32>> {
        self.check_sequence(ids, "the sequence")?;
        if ids.len() < 2 {
            return Ok(Vec::new());
        }
        let vocab = self.model.config.vocab_size;
        let mut out = vec![0f32; ids.len() - 1];
        let mut s = self.session_or_cancel(cancel)?;
        s.tokens.clear();
        s.extend_to(&self.model, ids, &self.threads, cancel, |scratch, start, n| {
            let n = n.min(ids.len() - 1 - start); // the last token has no target
            if n == 0 {
                return;
            }
            let tile = (scratch.logits.len() / n).min(vocab);
            let h = self.model.config.hidden_size;
            let x = self.model.activations(&scratch.x, n, h, &mut scratch.xq, &self.threads);
            let mut lse = [LogSumExp::default(); CHUNK];
            let mut target = [0f32; CHUNK];
            for v0 in (0..vocab).step_by(tile) {
                let v1 = (v0 + tile).min(vocab);
                let m = v1 - v0;
                let buf = &mut scratch.logits[..n * m];
                self.model.lm_head(buf, &x, v0..v1, &self.threads);
                for t in 0..n {
                    let row = &buf[t * m..(t + 1) * m];
                    lse[t].add_all(row);
                    let want = ids[start + t + 1] as usize;
                    if (v0..v1).contains(&want) {
                        target[t] = row[want - v0];
                    }
                }
            }
            for t in 0..n {
                out[start + t] = (target[t] as f64 - lse[t].value()) as f32;
            }
        })?;
        match ops::first_non_finite(&out) {
            Some(pos) => Err(self.non_finite(pos)),
            None => Ok(out),
        }
    }
}

fn resolve_max_inference_len(c: &Config, requested: Option<usize>) -> Result<usize> {
    match requested {
        None => Ok(c.max_position_embeddings.min(DEFAULT_MAX_INFERENCE_LEN)),
        Some(0) => Err(Error::InvalidArgument("max_inference_len must be a positive integer, got 0".into())),
        Some(n) if n > c.max_position_embeddings => Err(Error::InvalidArgument(format!(
            "max_inference_len {n} is above the model's max_position_embeddings ({})",
            c.max_position_embeddings
        ))),
        Some(n) => Ok(n),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
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
}

/// One prompt's decode loop. `run` holds the session for the whole generation; each `step`
/// takes it for one token only (a stream), so other calls may interleave, and the session then
/// recomputes what they displaced.
pub struct Generation {
    engine: Arc<Engine>,
    params: GenerateParams,
    sampler: Sampler,
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
    reused_tokens: usize,
    prefill_seconds: f64,
    decode_seconds: f64,
}

impl Generation {
    pub fn new(engine: Arc<Engine>, prompt: Vec<u32>, params: GenerateParams) -> Result<Generation> {
        engine.check_sequence(&prompt, "the prompt")?;
        let sampler = Sampler::new(params.sampling.clone())?;
        if params.stop.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument("stop strings must not be empty".into()));
        }
        let decoder = match engine.tokenizer {
            Some(_) => Some(StreamDecoder::new(false)),
            None if params.stop.is_empty() && !params.text => None,
            None => return Err(Error::NoTokenizer),
        };
        Ok(Generation {
            engine,
            sampler,
            decoder,
            prompt_len: prompt.len(),
            seq: prompt,
            text: String::new(),
            sent: 0,
            finish: None,
            flushed: false,
            reused_tokens: 0,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            params,
        })
    }

    fn generated(&self) -> &[u32] {
        &self.seq[self.prompt_len..]
    }

    /// Generates one token and returns the text that became final (possibly empty); `None`
    /// once the generation is finished and all its text was returned.
    pub fn step(&mut self, cancel: Cancel<'_>) -> Result<Option<String>> {
        let engine = Arc::clone(&self.engine);
        let mut session = engine.session_or_cancel(cancel)?;
        Ok(self.step_with(&mut session, cancel)?.map(|piece| self.text[piece].to_string()))
    }

    /// Steps until the end, holding the session throughout, and returns the completion;
    /// `cancel` is asked before every token (and between prefill chunks).
    pub fn run(&mut self, cancel: Cancel<'_>) -> Result<Completion> {
        let engine = Arc::clone(&self.engine);
        let mut session = engine.session_or_cancel(cancel)?;
        while self.step_with(&mut session, cancel)?.is_some() {}
        Ok(self.completion().expect("finished"))
    }

    /// One token; returns the range of `text` that became final.
    fn step_with(&mut self, s: &mut Session, cancel: Cancel<'_>) -> Result<Option<Range<usize>>> {
        if self.finish.is_none()
            && (self.generated().len() >= self.params.max_new_tokens || self.seq.len() >= self.engine.max_inference_len)
        {
            self.finish = Some(FinishReason::Length);
        }
        if self.finish.is_some() {
            return Ok(self.flush());
        }
        let t0 = Instant::now();
        let engine = &*self.engine;
        let model = &engine.model;
        let (vocab, h) = (model.config.vocab_size, model.config.hidden_size);
        let mut last_row = 0;
        let reused = s.extend_to(model, &self.seq, &engine.threads, cancel, |_, _, n| last_row = n - 1)?;
        let scratch = &mut s.scratch;
        let logits = &mut scratch.logits[..vocab];
        let x = &scratch.x[last_row * h..(last_row + 1) * h];
        let x = model.activations(x, 1, h, &mut scratch.xq, &engine.threads);
        model.lm_head(logits, &x, 0..vocab, &engine.threads);
        if ops::first_non_finite(logits).is_some() {
            return Err(engine.non_finite(self.seq.len() - 1));
        }
        let tok = self.sampler.sample(logits, &self.seq);
        if self.generated().is_empty() {
            self.reused_tokens = reused;
            self.prefill_seconds = t0.elapsed().as_secs_f64();
        } else {
            self.decode_seconds += t0.elapsed().as_secs_f64();
        }

        if engine.eos_token_ids.contains(&tok) {
            self.finish = Some(FinishReason::Eos);
            return Ok(self.flush());
        }
        self.seq.push(tok);
        if let (Some(d), Some(t)) = (&mut self.decoder, &engine.tokenizer) {
            d.push_into(t, tok, &mut self.text);
        }
        Ok(Some(self.release()))
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
        if let Some(d) = self.decoder.as_mut().filter(|_| self.finish != Some(FinishReason::Stop)) {
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
            reused_tokens: self.reused_tokens,
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_seconds,
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
    use crate::testing::fixtures;

    /// transformers' `input_ids` (40 tokens) and `logits` (40 × vocab) for a tiny checkpoint.
    fn reference(dir: &Path) -> (Vec<u32>, Vec<f32>) {
        let st = crate::formats::safetensors::SafeTensors::open_files(&[dir.join("reference.safetensors")]).unwrap();
        let ids = st.get("input_ids").unwrap().data.chunks_exact(8);
        let ids = ids.map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
        let logits = st.get("logits").unwrap();
        (ids, logits.to_f32(dir).unwrap())
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn tiny_checkpoints_match_transformers_in_one_pass_and_token_by_token() {
        for name in ["tiny-gqa", "tiny-mqa-softcap"] {
            let dir = fixtures().join("tiny").join(name);
            let (ids, want) = reference(&dir);
            // bf16 and Q8_0 round the weights (Q8_0 the activations too): close, not exact.
            for (weights, tol) in [(WeightType::F32, 1e-3), (WeightType::Bf16, 0.25), (WeightType::Q8_0, 1.0)] {
                for threads in [1, 2] {
                    let opts = LoadOptions { weights, threads: Some(threads), ..Default::default() };
                    let engine = Engine::load(&dir, &opts).unwrap();
                    let vocab = engine.config().vocab_size;
                    let mut full = vec![0f32; ids.len() * vocab];
                    engine.logits(&ids, &mut full, &mut never).unwrap();
                    let err = max_abs_diff(&full, &want);
                    assert!(err < tol, "{name} {weights:?}: one pass off by {err}");

                    // One token at a time through the KV cache: each call reuses all but the new token.
                    let mut s = engine.session();
                    s.tokens.clear();
                    let mut stepped = vec![0f32; ids.len() * vocab];
                    for i in 0..ids.len() {
                        let reused =
                            s.extend_to(&engine.model, &ids[..=i], &engine.threads, &mut never, |scratch, _, n| {
                                assert_eq!(n, 1);
                                let h = engine.model.config.hidden_size;
                                let x = engine.model.activations(&scratch.x, 1, h, &mut scratch.xq, &engine.threads);
                                engine.model.lm_head(
                                    &mut stepped[i * vocab..(i + 1) * vocab],
                                    &x,
                                    0..vocab,
                                    &engine.threads,
                                );
                            });
                        assert_eq!(reused.unwrap(), i);
                    }
                    // Same bits as the batched pass: a token's arithmetic does not depend on its batch.
                    assert_eq!(stepped, full, "{name} {weights:?}: token-by-token differs from one pass");
                }
            }
        }
    }

    #[test]
    fn generation_stops_at_the_cap_and_is_reproducible() {
        let dir = fixtures().join("tiny").join("tiny-gqa");
        let (ids, _) = reference(&dir);
        let opts =
            LoadOptions { max_inference_len: Some(12), weights: WeightType::F32, threads: Some(1), memory_limit: None };
        let engine = Arc::new(Engine::load(&dir, &opts).unwrap());
        assert!(Generation::new(engine.clone(), ids[..13].to_vec(), GenerateParams::default()).is_err());
        let params = GenerateParams { max_new_tokens: 100, ..Default::default() };
        let mut g = Generation::new(engine.clone(), ids[..9].to_vec(), params.clone()).unwrap();
        let c = g.run(&mut never).unwrap();
        assert_eq!((c.token_ids.len(), c.finish_reason), (3, FinishReason::Length));

        let sampled = |seed| {
            let sampling = SamplingParams {
                // The tiny random model's logits span tens: flatten them to see the seed at work.
                temperature: 30.0,
                seed: Some(seed),
                ..Default::default()
            };
            let mut g =
                Generation::new(engine.clone(), ids[..2].to_vec(), GenerateParams { sampling, ..params.clone() })
                    .unwrap();
            g.run(&mut never).unwrap().token_ids
        };
        assert_eq!(sampled(5), sampled(5));
        assert_ne!(sampled(5), sampled(6));
    }

    /// 256 tokens through tiny-gqa (sliding window 8): its sliding layers keep rings of 135
    /// slots, which wrap; the logits have the bits of a cache that keeps every position, in one
    /// pass and token by token. Prefix reuse over a wrapped ring reuses what the rings still hold
    /// and recomputes otherwise, with the bits of a fresh model either way.
    #[test]
    fn sliding_rings_give_the_bits_of_a_full_cache() {
        let dir = fixtures().join("tiny").join("tiny-gqa");
        let opts = LoadOptions {
            max_inference_len: Some(256),
            weights: WeightType::F32,
            threads: Some(2),
            memory_limit: None,
        };
        let engine = Arc::new(Engine::load(&dir, &opts).unwrap());
        let (m, c, threads) = (&engine.model, engine.config().clone(), &engine.threads);
        assert!(Model::cache_capacities(&c, 256).contains(&135));
        let vocab = c.vocab_size;
        let ids: Vec<u32> = std::iter::once(2).chain((1..256).map(|i| (i * 37 % 500 + 5) as u32)).collect();
        let mut ring = vec![0f32; ids.len() * vocab];
        engine.logits(&ids, &mut ring, &mut never).unwrap();

        let mut full = vec![0f32; ids.len() * vocab];
        let mut cache = KvCache::new(&vec![256; c.num_hidden_layers], c.kv_dim(), 256);
        let mut s = Scratch::new(&c, 256, threads.count());
        for (t, &tok) in ids.iter().enumerate() {
            m.forward(&mut s, &mut cache, &[tok], t, threads);
            let x = m.activations(&s.x, 1, c.hidden_size, &mut s.xq, threads);
            m.lm_head(&mut full[t * vocab..(t + 1) * vocab], &x, 0..vocab, threads);
        }
        assert!(ring == full, "a ring changed the logits");

        let run = |engine: &Arc<Engine>, prompt: &[u32]| {
            let params = GenerateParams { max_new_tokens: 4, ..Default::default() };
            Generation::new(engine.clone(), prompt.to_vec(), params).unwrap().run(&mut never).unwrap()
        };
        let fresh = |prompt: &[u32]| run(&Arc::new(Engine::load(&dir, &opts).unwrap()), prompt);
        run(&engine, &ids[..200]); // the session now holds 203 positions
        let mut b = ids[..150].to_vec();
        b.extend_from_slice(&[7, 8, 9]);
        let got = run(&engine, &b);
        assert_eq!(got.reused_tokens, 150); // 150 + 135 >= 203 + 8: the rings hold what it reads
        assert_eq!(got.token_ids, fresh(&b).token_ids);
        run(&engine, &ids[..240]);
        let mut d = ids[..60].to_vec();
        d.extend_from_slice(&[7, 8, 9]);
        let got = run(&engine, &d);
        assert_eq!(got.reused_tokens, 0); // positions 53..59 were overwritten: recomputed
        assert_eq!(got.token_ids, fresh(&d).token_ids);

        // A shorter sequence after a longer one: the slots of positions 43..49 hold 178..184 of
        // the 200-token sequence even though the session holds only 104 tokens since.
        run(&engine, &ids[..200]);
        let mut e = ids[..100].to_vec();
        e.push(7);
        assert_eq!(run(&engine, &e).reused_tokens, 100);
        let mut f = ids[..50].to_vec();
        f.extend_from_slice(&[7, 8, 9]);
        let got = run(&engine, &f);
        assert_eq!(got.reused_tokens, 0);
        assert_eq!(got.token_ids, fresh(&f).token_ids);
    }

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
