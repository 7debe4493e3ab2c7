//! A loaded model at work: [`Model`] (the transformer, its tokenizer and a session: a KV cache
//! with scratch, behind a lock), prefill with prefix reuse ([`session`]), the generation loop with
//! stop strings ([`generate`]), several generations' decode steps in one pass ([`batch`]), the sampler and the constraint that masks its choices
//! ([`constraint`]).

pub mod batch;
pub mod constraint;
pub mod generate;
pub mod model;
pub mod sampler;
pub mod session;
#[cfg(test)]
mod tests;

pub use model::{memory_plan, resolve_max_inference_len, LoadOptions, Model, DEFAULT_MAX_INFERENCE_LEN};

use crate::error::Result;

/// Asked between chunks of a forward pass and between tokens: `true` stops the call with
/// `Error::Interrupted` (the Python binding answers it from Python's signal handlers: Ctrl-C).
pub type Cancel<'a> = &'a mut dyn FnMut() -> bool;

/// Told `(done, total)` bytes as a long job goes; an error stops it.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64) -> Result<()>;

/// A `Cancel` that never cancels.
pub fn never() -> bool {
    false
}
