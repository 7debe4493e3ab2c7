//! gemma_rs: Gemma 3 270M-class inference on small CPUs.
//!
//! The crate is layered; each room knows only those above it in this list
//! (docs/ARCHITECTURE.md tells what each holds and how a token flows through them):
//! - [`kernels`]: pure numeric code on slices (Q8_0, SIMD, norms, RoPE, attention dot products,
//!   the thread pool); nothing of models or files.
//! - [`model`]: Gemma 3 itself: its config, its tensors, the forward pass and the KV cache.
//! - [`text`]: the tokenizer and chat templates.
//! - [`formats`]: files on disk: safetensors, GGUF, a checkpoint of either, `pack`.
//! - [`runtime`]: a loaded model and its sessions: prefill with prefix reuse, the decode loop,
//!   the sampler.
//! - `python`: the PyO3 binding, the only module that knows Python.

#[cfg(target_endian = "big")]
compile_error!("gemma_rs reads little-endian model files in place");

pub mod error;
pub mod formats;
pub mod kernels;
pub mod model;
pub mod runtime;
pub mod text;

#[cfg(feature = "python")]
mod python;
#[cfg(test)]
mod testing;

pub use error::{Error, Result};
