//! What a loaded model holds, in bytes: one computation for `memory_plan` (before loading) and
//! `Model.memory` (after), so that the two cannot drift apart.

use crate::model::config::Config;
use crate::model::forward::Scratch;
use crate::model::kv_cache::{KvCache, KvDtype};

/// What sizes a session: its cap on a sequence, the threads (a scores buffer each) and the
/// cache's type.
#[derive(Clone, Copy, Debug)]
pub struct SessionPlan {
    pub max_len: usize,
    pub threads: usize,
    pub kv_dtype: KvDtype,
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
    /// A model of config `c` whose weights take `weights` bytes and its tokenizer `tokenizer`,
    /// with `sessions` sessions of `plan` (the model's own and each `session()`): a KV cache
    /// and a scratch each.
    pub fn new(c: &Config, weights: usize, tokenizer: usize, plan: &SessionPlan, sessions: usize) -> Memory {
        let SessionPlan { max_len, threads, kv_dtype } = *plan;
        Memory {
            weights,
            kv_cache: sessions * KvCache::bytes_for_model(c, max_len, kv_dtype),
            scratch: sessions * Scratch::bytes_for(c, max_len, threads),
            tokenizer,
        }
    }

    pub fn total(&self) -> usize {
        self.weights + self.kv_cache + self.scratch + self.tokenizer
    }
}
