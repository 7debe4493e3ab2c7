//! Weight matrices as stored in memory: f32, bf16 bits widened on the fly, or GGML Q8_0 blocks.

use crate::quant::{self, BlockQ8_0, QK8_0};

/// A row-major `(rows, cols)` weight matrix.
pub enum Matrix {
    F32 {
        data: Vec<f32>,
        rows: usize,
        cols: usize,
    },
    /// bf16 bit patterns; value = f32::from_bits(bits << 16).
    Bf16 {
        data: Vec<u16>,
        rows: usize,
        cols: usize,
    },
    /// `cols / 32` blocks per row.
    Q8_0 {
        data: Vec<BlockQ8_0>,
        rows: usize,
        cols: usize,
    },
}

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::F32 { rows, .. } | Matrix::Bf16 { rows, .. } | Matrix::Q8_0 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::F32 { cols, .. } | Matrix::Bf16 { cols, .. } | Matrix::Q8_0 { cols, .. } => *cols,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Matrix::F32 { data, .. } => std::mem::size_of_val(&data[..]),
            Matrix::Bf16 { data, .. } => std::mem::size_of_val(&data[..]),
            Matrix::Q8_0 { data, .. } => std::mem::size_of_val(&data[..]),
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
            Matrix::Q8_0 { data, .. } => {
                let blocks = c / QK8_0;
                quant::dequantize_row_q8_0(&data[r * blocks..(r + 1) * blocks], out)
            }
        }
    }
}
