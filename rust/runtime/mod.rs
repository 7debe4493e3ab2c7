//! A loaded model at work: the engine (weights, tokenizer, a session with its KV cache), the
//! generation loop with prefix reuse and stop strings, and the sampler.

pub mod generate;
pub mod sampler;
