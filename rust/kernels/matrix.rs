//! Weight matrices as stored in memory: f32 or bf16 bits (widened on the fly), owned or used in
//! place from a memory-mapped model file, or GGML Q8_0 blocks repacked at load for the GEMM
//! kernels (`quant::gemm::PackedQ8_0`), or GGUF low-bit blocks kept in their bits for the low-bit
//! kernels (`quant::gemm::PackedLowBit`).

use crate::kernels::quant::gemm::{self, PackedLowBit, PackedQ8_0};
use crate::kernels::quant::BlockQ8_0;
use memmap2::Mmap;
use std::ops::Deref;
use std::sync::Arc;

/// Plain little-endian values that any aligned bytes of the right length are a valid slice of.
///
/// # Safety
/// Implementors have no padding, no invalid bit patterns and no drop glue.
pub unsafe trait Plain: Copy {}
// SAFETY: integers and floats; `BlockQ8_0` is `repr(C)` of integers without padding.
unsafe impl Plain for f32 {}
unsafe impl Plain for u16 {}
unsafe impl Plain for BlockQ8_0 {}

/// The values of a weight: owned, or a range of a memory-mapped file used in place.
pub struct Storage<T: Plain>(Place<T>);

/// Private, so that a mapped range exists only as `Storage::mapped` checked it.
enum Place<T: Plain> {
    Owned(Vec<T>),
    Mapped { map: Arc<Mmap>, offset: usize, len: usize },
}

impl<T: Plain> Storage<T> {
    /// `len` values at byte `offset` of `map`, or `None` if that range is outside the map or
    /// not aligned for `T`.
    pub fn mapped(map: &Arc<Mmap>, offset: usize, len: usize) -> Option<Storage<T>> {
        let end = len.checked_mul(std::mem::size_of::<T>())?.checked_add(offset)?;
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>());
        (end <= map.len() && aligned).then(|| Storage(Place::Mapped { map: map.clone(), offset, len }))
    }
}

impl<T: Plain> From<Vec<T>> for Storage<T> {
    fn from(v: Vec<T>) -> Self {
        Storage(Place::Owned(v))
    }
}

impl<T: Plain> Deref for Storage<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.0 {
            Place::Owned(v) => v,
            // SAFETY: `mapped` checked the range and the alignment; `T: Plain` accepts any
            // bytes; the map is read-only and lives as long as `self` (the `Arc`).
            Place::Mapped { map, offset, len } => unsafe {
                std::slice::from_raw_parts(map.as_ptr().add(*offset) as *const T, *len)
            },
        }
    }
}

/// A row-major `(rows, cols)` weight matrix.
pub enum Matrix {
    F32 {
        data: Storage<f32>,
        rows: usize,
        cols: usize,
    },
    /// bf16 bit patterns; value = f32::from_bits(bits << 16).
    Bf16 {
        data: Storage<u16>,
        rows: usize,
        cols: usize,
    },
    /// `cols / 32` blocks per row, in the row groups of the GEMM kernel.
    Q8_0(PackedQ8_0),
    /// A GGUF low-bit type kept in its bits, in the row groups of the low-bit GEMM kernel.
    LowBit(PackedLowBit),
}

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::F32 { rows, .. } | Matrix::Bf16 { rows, .. } => *rows,
            Matrix::Q8_0(p) => p.rows(),
            Matrix::LowBit(p) => gemm::Packed::rows(p),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::F32 { cols, .. } | Matrix::Bf16 { cols, .. } => *cols,
            Matrix::Q8_0(p) => p.cols(),
            Matrix::LowBit(p) => gemm::Packed::cols(p),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Matrix::F32 { data, .. } => std::mem::size_of_val(&data[..]),
            Matrix::Bf16 { data, .. } => std::mem::size_of_val(&data[..]),
            Matrix::Q8_0(p) => p.bytes(),
            Matrix::LowBit(p) => p.bytes(),
        }
    }

    /// The index of the first NaN or infinite value (for Q8_0: of the first value of a block
    /// whose f16 scale is NaN or infinite; its int8 values cannot be), if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            Matrix::F32 { data, .. } => data.iter().position(|v| !v.is_finite()),
            Matrix::Bf16 { data, .. } => data.iter().position(|&b| b & 0x7F80 == 0x7F80),
            Matrix::Q8_0(p) => p.first_non_finite(),
            Matrix::LowBit(p) => p.first_non_finite(),
        }
    }

    /// Row `r` widened to f32 into `out` (length `cols`): the embedding gather.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols();
        match self {
            Matrix::F32 { data, .. } => out.copy_from_slice(&data[r * c..(r + 1) * c]),
            Matrix::Bf16 { data, .. } => {
                for (o, &b) in out.iter_mut().zip(&data[r * c..(r + 1) * c]) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            Matrix::Q8_0(p) => p.dequantize_row(r, out),
            Matrix::LowBit(p) => p.dequantize_row(r, out),
        }
    }
}
