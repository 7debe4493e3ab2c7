//! Gemma 3: its hyperparameters, its tensors (one schema), the forward pass, the KV cache and
//! what it all takes in memory. Nothing here reads files: weights arrive through
//! [`schema::LoadWeight`].

pub mod config;
pub mod fast_head;
pub mod forward;
pub mod kv_cache;
pub mod memory;
pub mod schema;
