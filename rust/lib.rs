//! gemma_rs: Gemma 3 270M-class inference on small CPUs.
//!
//! Layers, each knowing only those below it (see DESIGN.md):
//! `half`, `quant`, `tensor`, `ops`, `threads` (pure kernels) and `config`, `tokenizer`,
//! `safetensors`, `gguf` (formats) → `checkpoint` (a model on disk) → `kv_cache`, `model` →
//! `sampler`, `generate`, `pack` → `python` (the only module that knows PyO3).

#[cfg(target_endian = "big")]
compile_error!("gemma_rs reads little-endian model files in place");

pub mod error;
pub mod tokenizer;

pub use error::{Error, Result};
pub mod chat_template;
pub mod checkpoint;
pub mod config;
pub mod generate;
pub mod gguf;
pub mod half;
pub mod kv_cache;
pub mod model;
pub mod ops;
pub mod pack;
#[cfg(feature = "python")]
mod python;
pub mod quant;
pub mod safetensors;
pub mod sampler;
pub mod tensor;
#[cfg(test)]
mod testing;
pub mod threads;
