//! The portable Q8_0 quantizers compiled for AVX2 (the matrix products' kernels are in
//! `gemm/x86.rs`).

use super::BlockQ8_0;

pub fn has_avx2() -> bool {
    crate::kernels::cpu::features().avx2_fma
}

/// The portable quantizers compiled here for 8-lane vectors (same operations, same bits).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    super::quantize_row_q8_0_portable(x, out)
}

#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_activations(x: &[f32], d: &mut [f32], qs: &mut [i8]) {
    super::quantize_activations_portable(x, d, qs)
}
