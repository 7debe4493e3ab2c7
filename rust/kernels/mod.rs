//! Pure kernels: functions on slices that know nothing of models or files. Q8_0 and the other
//! ggml block types, the SIMD dot products chosen at run time, norms, RoPE, softmax, attention's
//! dot products, matrix products over weight matrices, and the thread pool that splits them.

pub mod cpu;
pub mod half;
pub mod matrix;
pub mod ops;
pub mod quant;
pub mod threads;
