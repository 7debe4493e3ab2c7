//! A loaded model: the transformer, its tokenizer, and one session (KV cache + scratch) behind a
//! lock; what `load` and `memory_plan` do; teacher-forced logits and log-probabilities.

use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::formats::convert::{checked, SourceLoader};
use crate::formats::{integrity, state};
use crate::kernels::ops::{self, LogSumExp};
use crate::kernels::threads::Threads;
use crate::model::config::Config;
use crate::model::forward::{Transformer, CHUNK};
use crate::model::kv_cache::{KvCache, KvDtype};
use crate::model::memory::{Memory, SessionPlan};
use crate::model::schema::{all_tensors, WeightType};
use crate::runtime::constraint::Vocabulary;
use crate::runtime::session::{Session, Slot};
use crate::runtime::{Cancel, Progress};
use crate::text::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The default cap on a sequence when the caller gives none (and the model allows it).
pub const DEFAULT_MAX_INFERENCE_LEN: usize = 4096;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub max_inference_len: Option<usize>,
    pub weights: WeightType,
    pub threads: Option<usize>,
    /// Refuse to load when the memory plan's total exceeds this many bytes.
    pub memory_limit: Option<usize>,
    pub kv_dtype: KvDtype,
    /// Check the file's digests before loading (`formats::integrity`): an error for a damaged
    /// file, or for one without digests.
    pub verify: bool,
    /// Decide greedy tokens with the exact fast lm_head (`model::fast_head`) when the tied
    /// head is held as Q8_0: fewer bytes read per token, its shadow held besides.
    pub fast_lm_head: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            max_inference_len: None,
            weights: WeightType::Stored,
            threads: None,
            memory_limit: None,
            kv_dtype: KvDtype::F32,
            verify: false,
            fast_lm_head: false,
        }
    }
}

/// What a model of `ck` holds with these settings and `sessions` sessions (the weights are not
/// read).
fn plan(ck: &Checkpoint, opts: &LoadOptions, sp: &SessionPlan, sessions: usize) -> Result<Memory> {
    let c = &ck.config;
    for name in all_tensors(c) {
        checked(&ck.source, &name, &name.shape(c))?;
    }
    let tokenizer = ck.tokenizer.as_ref().map_or(0, Tokenizer::memory_bytes);
    let weights = ck.weight_bytes(opts.weights) + if opts.fast_lm_head { ck.fast_head_bytes(opts.weights) } else { 0 };
    Ok(Memory::new(c, weights, tokenizer, sp, sessions))
}

/// The memory a model at `path` would hold when loaded with `opts` and used through `sessions`
/// sessions (its own and `sessions - 1` more), without loading its weights (their shapes and
/// types are read, and the tokenizer is built): equal to `Model::memory` after `Model::load`
/// and as many `new_slot()`s.
pub fn memory_plan(path: &Path, opts: &LoadOptions, sessions: usize) -> Result<Memory> {
    let ck = Checkpoint::open(path)?;
    let max_len = resolve_max_inference_len(&ck.config, opts.max_inference_len)?;
    if sessions == 0 {
        return Err(Error::InvalidArgument("sessions must be at least 1 (the model's own)".into()));
    }
    let sp = SessionPlan { max_len, threads: Threads::count_for(opts.threads)?, kv_dtype: opts.kv_dtype };
    plan(&ck, opts, &sp, sessions)
}

/// What Python's `Model` wraps: the transformer, its tokenizer and one session.
pub struct Model {
    pub transformer: Transformer,
    pub tokenizer: Option<Tokenizer>,
    pub max_inference_len: usize,
    /// Generation stops at any of these (generation_config.json, else config.json).
    pub eos_token_ids: Vec<u32>,
    pub threads: Threads,
    /// The model's own chat template, when its files have one.
    pub chat_template: Option<String>,
    /// The file or directory it was loaded from (for messages).
    pub path: PathBuf,
    /// Tells this model, as loaded, from any other (`Checkpoint::fingerprint`): state files
    /// carry it.
    pub fingerprint: u64,
    /// The type of every session's KV cache.
    pub kv_dtype: KvDtype,
    /// The session of calls made on the model itself.
    pub slot: Arc<Slot>,
    /// Slots alive: this one and every `new_slot()` not dropped.
    live_slots: Arc<AtomicUsize>,
    /// The constraint engine's view of the tokenizer, built by the first constrained call.
    vocabulary: Mutex<Option<Arc<Vocabulary>>>,
}

impl Model {
    /// Loads a Hugging Face model directory, a GGUF file, or a directory holding one GGUF.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
        Model::load_with_progress(path, opts, &mut |_, _| Ok(()))
    }

    /// `load`, calling `progress(done, total)` in bytes of tensor data after each tensor; an
    /// error from it stops loading.
    pub fn load_with_progress(path: &Path, opts: &LoadOptions, progress: Progress<'_>) -> Result<Model> {
        let ck = Checkpoint::open(path)?;
        let max_inference_len = resolve_max_inference_len(&ck.config, opts.max_inference_len)
            .map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
        let n_threads = Threads::count_for(opts.threads)?;
        let sp = SessionPlan { max_len: max_inference_len, threads: n_threads, kv_dtype: opts.kv_dtype };
        if let Some(limit) = opts.memory_limit {
            let plan = plan(&ck, opts, &sp, 1)?;
            if plan.total() > limit {
                let hint = match opts.weights {
                    WeightType::F32 | WeightType::Bf16 => " or use weights=\"q8_0\"",
                    WeightType::Q8_0 | WeightType::Stored => " or use weights=\"q4_k_m\"",
                    WeightType::Q4_0 | WeightType::Q4KM => "",
                };
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
        if opts.verify {
            integrity::verify(&ck, &threads)?;
        }
        let fingerprint = ck.fingerprint(opts.weights)?;
        let Checkpoint { source, config, tokenizer, eos_token_ids, chat_template, .. } = ck;
        let mut from = SourceLoader::new(&source, &config, opts.weights, &threads, progress)?;
        let mut transformer = Transformer::load(config, &mut from, opts.weights)?;
        if opts.fast_lm_head {
            transformer.with_fast_head(&threads);
        }
        let live_slots = Arc::new(AtomicUsize::new(0));
        let session = Session::new(&transformer.config, max_inference_len, threads.count(), opts.kv_dtype);
        let slot = Arc::new(Slot::new(session, live_slots.clone()));
        Ok(Model {
            transformer,
            tokenizer,
            max_inference_len,
            eos_token_ids,
            threads,
            chat_template,
            path: path.to_path_buf(),
            fingerprint,
            kv_dtype: opts.kv_dtype,
            slot,
            live_slots,
            vocabulary: Mutex::new(None),
        })
    }

    /// The constraint engine's vocabulary (built on first use, then shared by every call).
    pub fn vocabulary(&self) -> Result<Arc<Vocabulary>> {
        let mut v = self.vocabulary.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = &*v {
            return Ok(Arc::clone(v));
        }
        let built = Arc::new(Vocabulary::new(self.tokenizer()?, &self.eos_token_ids)?);
        *v = Some(Arc::clone(&built));
        Ok(built)
    }

    pub fn config(&self) -> &Config {
        &self.transformer.config
    }

    pub fn memory(&self) -> Memory {
        let tokenizer = self.tokenizer.as_ref().map_or(0, Tokenizer::memory_bytes);
        let (c, weights) = (&self.transformer.config, self.transformer.weight_bytes());
        let sessions = self.live_slots.load(Ordering::Relaxed);
        let sp =
            SessionPlan { max_len: self.max_inference_len, threads: self.threads.count(), kv_dtype: self.kv_dtype };
        Memory::new(c, weights, tokenizer, &sp, sessions)
    }

    /// A new session over the same weights: its own KV cache and scratch, empty.
    pub fn new_slot(&self) -> Slot {
        let session = Session::new(self.config(), self.max_inference_len, self.threads.count(), self.kv_dtype);
        Slot::new(session, self.live_slots.clone())
    }

    /// The model's own session, for tests.
    pub fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.slot.lock()
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

    /// Writes the KV state of the tokens the session holds to `path` (`docs/STATE_FORMAT.md`),
    /// after bringing it to exactly `prompt` when one is given (prefilling only what the cache
    /// lacks); returns the token count.
    pub fn save_state(&self, slot: &Slot, path: &Path, prompt: Option<&[u32]>, cancel: Cancel<'_>) -> Result<usize> {
        if let Some(p) = prompt {
            self.check_sequence(p, "the prompt")?;
        }
        let mut s = slot.lock_or_cancel(cancel)?;
        if let Some(p) = prompt {
            s.extend_to(&self.transformer, p, &self.threads, cancel, |_, _, _| {})?;
        }
        let n = s.tokens.len();
        if n == 0 {
            return Err(Error::InvalidArgument(
                "the model holds no tokens to save: give a prompt, or call it after a generation".into(),
            ));
        }
        let rows = KvCache::live_rows(self.config(), n);
        state::save(path, self.fingerprint, &s.cache, &s.tokens, &rows)?;
        Ok(n)
    }

    /// Restores the state file `path` (written by `save_state` from this model, on any host):
    /// the session then holds its tokens, and the next call whose prompt starts with them reuses
    /// them. Returns the token count. A file that is not such a state, or not this model's, is
    /// an error: one refused by its header (missing, foreign, another model, too long) leaves
    /// the session as it was, one damaged further on leaves it empty.
    pub fn load_state(&self, slot: &Slot, path: &Path, cancel: Cancel<'_>) -> Result<usize> {
        let mut s = slot.lock_or_cancel(cancel)?;
        let c = self.config();
        let live = |n| KvCache::live_rows(c, n);
        let want = state::Expect {
            fingerprint: self.fingerprint,
            kv_dtype: self.kv_dtype,
            kv_dim: c.kv_dim(),
            max_tokens: self.max_inference_len,
            vocab: c.vocab_size,
            rows: &live,
        };
        let Session { cache, tokens, .. } = &mut *s;
        // A file refused by its header leaves the session as it was; one refused later, empty.
        let ids = state::load(path, cache, &want, || tokens.clear())?;
        *tokens = ids;
        Ok(tokens.len())
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
        let vocab = self.transformer.config.vocab_size;
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!("token id {bad} is outside the vocabulary (size {vocab})")));
        }
        Ok(())
    }

    /// Logits `(ids.len(), vocab)` of a fresh forward pass over `ids`, into `out` (the caller
    /// allocates it, after `check_sequence`, so that a too large request fails there).
    pub fn logits(&self, slot: &Slot, ids: &[u32], out: &mut [f32], cancel: Cancel<'_>) -> Result<()> {
        self.check_sequence(ids, "the sequence")?;
        let vocab = self.transformer.config.vocab_size;
        if out.len() != ids.len() * vocab {
            return Err(Error::Internal(format!("logits buffer of {} floats for {} tokens", out.len(), ids.len())));
        }
        let mut s = slot.lock_or_cancel(cancel)?;
        s.tokens.clear();
        let mut non_finite = None;
        s.extend_to(&self.transformer, ids, &self.threads, cancel, |scratch, start, n| {
            let rows = &mut out[start * vocab..(start + n) * vocab];
            let h = self.transformer.config.hidden_size;
            let x = self.transformer.activations(&scratch.x, n, h, &mut scratch.xq, &self.threads);
            self.transformer.lm_head(rows, &x, 0..vocab, &self.threads);
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
    /// holds such a value (tensors the file held in the wanted type are not scanned at load), or says
    /// that the weights are finite and an activation overflowed.
    pub(crate) fn non_finite(&self, position: usize) -> Error {
        let cause = match self.transformer.first_non_finite_weight() {
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
    pub fn logprobs(&self, slot: &Slot, ids: &[u32], cancel: Cancel<'_>) -> Result<Vec<f32>> {
        self.check_sequence(ids, "the sequence")?;
        if ids.len() < 2 {
            return Ok(Vec::new());
        }
        let vocab = self.transformer.config.vocab_size;
        let mut out = vec![0f32; ids.len() - 1];
        let mut s = slot.lock_or_cancel(cancel)?;
        s.tokens.clear();
        s.extend_to(&self.transformer, ids, &self.threads, cancel, |scratch, start, n| {
            let n = n.min(ids.len() - 1 - start); // the last token has no target
            if n == 0 {
                return;
            }
            let tile = (scratch.logits.len() / n).min(vocab);
            let h = self.transformer.config.hidden_size;
            let x = self.transformer.activations(&scratch.x, n, h, &mut scratch.xq, &self.threads);
            let mut lse = [LogSumExp::default(); CHUNK];
            let mut target = [0f32; CHUNK];
            for v0 in (0..vocab).step_by(tile) {
                let v1 = (v0 + tile).min(vocab);
                let m = v1 - v0;
                let buf = &mut scratch.logits[..n * m];
                self.transformer.lm_head(buf, &x, v0..v1, &self.threads);
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

/// The cap a model of config `c` gets for `requested` (None: the default).
pub fn resolve_max_inference_len(c: &Config, requested: Option<usize>) -> Result<usize> {
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
