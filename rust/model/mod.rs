//! Gemma 3: its hyperparameters, its weights, the forward pass and the KV cache.

pub mod config;
pub mod forward;
pub mod kv_cache;
