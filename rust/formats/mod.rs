//! Model files: safetensors and GGUF readers (bounds-checked views of memory-mapped files), the
//! Gemma 3 ↔ GGUF metadata table, a checkpoint of either format, the conversion of its tensors
//! into the model's weights, `pack`, which writes GGUF, the digests that verify a packed file, and
//! the state files of a KV cache.

pub mod checkpoint;
pub mod convert;
pub mod digest;
pub mod gemma3_gguf;
pub mod gguf;
pub mod integrity;
pub mod pack;
pub mod safetensors;
pub mod state;
