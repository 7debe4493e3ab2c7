//! Model files: safetensors and GGUF readers (bounds-checked views of memory-mapped files), a
//! checkpoint of either format as named Gemma 3 tensors, and `pack`, which writes GGUF.

pub mod checkpoint;
pub mod gguf;
pub mod pack;
pub mod safetensors;
