//! A session: one sequence's KV cache and scratch, and the tokens they hold. Making the cache
//! hold a new sequence reuses the longest prefix it already holds (while the sliding rings still
//! hold what the rest reads) and prefills the rest a chunk at a time.

use crate::error::{Error, Result};
use crate::kernels::threads::Threads;
use crate::model::config::Config;
use crate::model::forward::{Scratch, Transformer, CHUNK};
use crate::model::kv_cache::{KvCache, KvDtype};
use crate::runtime::Cancel;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// What the cache currently holds: the KV rows of `tokens`, positions `0..tokens.len()`.
pub struct Session {
    pub cache: KvCache,
    pub scratch: Scratch,
    pub tokens: Vec<u32>,
}

impl Session {
    /// An empty session of a model of config `c`: its KV cache (of `kv_dtype`) and scratch for
    /// sequences of at most `max_len` tokens on `threads` threads.
    pub fn new(c: &Config, max_len: usize, threads: usize, kv_dtype: KvDtype) -> Session {
        Session {
            cache: KvCache::for_model(c, max_len, kv_dtype),
            scratch: Scratch::new(c, max_len, threads),
            tokens: Vec::new(),
        }
    }

    /// Makes the cache hold `seq` (non-empty), reusing the longest prefix it already holds but
    /// always recomputing the last token, and calls `on_chunk(scratch, start, len)` after each
    /// forward chunk with the chunk's hidden states in `scratch.x`. Returns the reused count, or
    /// `Error::Interrupted` when `cancel()` says so before a chunk (the cache then holds the
    /// chunks done so far, consistently).
    pub fn extend_to(
        &mut self,
        model: &Transformer,
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
    pub(crate) fn reusable(&self, model: &Transformer, seq: &[u32]) -> usize {
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

/// A session behind its lock: what one user of a model holds (Python's `Model`, or each of its
/// `session()`s). Calls on one slot take turns; calls on different slots run at once (their
/// kernel jobs interleave on the model's thread pool). `live` counts the model's slots alive, so
/// that `Model::memory` counts their caches.
pub struct Slot {
    session: Mutex<Session>,
    live: Arc<AtomicUsize>,
}

impl Slot {
    pub fn new(session: Session, live: Arc<AtomicUsize>) -> Slot {
        live.fetch_add(1, Ordering::Relaxed);
        Slot { session: Mutex::new(session), live }
    }

    /// The session, usable even if a panic poisoned the lock (its state is always consistent:
    /// `tokens` only grows after a chunk completed).
    pub fn lock(&self) -> MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session, waiting for another call to release it unless `cancel` says to stop (so a
    /// Ctrl-C is seen while another thread's long generation holds it).
    pub fn lock_or_cancel(&self, cancel: Cancel<'_>) -> Result<MutexGuard<'_, Session>> {
        loop {
            match self.session.try_lock() {
                Ok(s) => return Ok(s),
                Err(TryLockError::Poisoned(e)) => return Ok(e.into_inner()),
                Err(TryLockError::WouldBlock) if cancel() => return Err(Error::Interrupted),
                Err(TryLockError::WouldBlock) => std::thread::sleep(std::time::Duration::from_micros(200)),
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}
