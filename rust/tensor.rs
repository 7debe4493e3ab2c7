//! Weight matrices as stored in memory: f32, or bf16 bits widened on the fly.

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
}

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::F32 { rows, .. } | Matrix::Bf16 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::F32 { cols, .. } | Matrix::Bf16 { cols, .. } => *cols,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Matrix::F32 { data, .. } => data.len() * 4,
            Matrix::Bf16 { data, .. } => data.len() * 2,
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
        }
    }
}
