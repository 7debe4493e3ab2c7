//! What a loaded model holds, in bytes: one computation for `memory_plan` (before loading) and
//! `Model.memory` (after), so that the two cannot drift apart.

use crate::model::config::Config;
use crate::model::forward::Scratch;
use crate::model::kv_cache::KvCache;

/// Bytes held by each part of a loaded model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    pub weights: usize,
    pub kv_cache: usize,
    pub scratch: usize,
    pub tokenizer: usize,
}

impl Memory {
    /// A model of config `c` whose weights take `weights` bytes and its tokenizer `tokenizer`,
    /// with `sessions` KV caches and scratches for sequences of `max_len` tokens on `threads`
    /// threads (the model's own session and each `session()`).
    pub fn new(
        c: &Config,
        weights: usize,
        tokenizer: usize,
        max_len: usize,
        threads: usize,
        sessions: usize,
    ) -> Memory {
        Memory {
            weights,
            kv_cache: sessions * KvCache::bytes_for_model(c, max_len),
            scratch: sessions * Scratch::bytes_for(c, max_len, threads),
            tokenizer,
        }
    }

    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.scratch + self.tokenizer
    }
}
