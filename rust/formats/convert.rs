//! Weights from a checkpoint into memory: each tensor read a slab at a time from the map,
//! dequantized as ggml does when needed, checked finite, converted to the load's weight type
//! (Q8_0 quantization, bf16) and its source pages released. Q8_0 matrices end repacked for the
//! GEMM kernel (a file's Q8_0 blocks copied as stored); f32 and bf16 ones are used in place when
//! the file already holds that type. `pack` writes files from the same slabs.

use crate::error::{Error, Result};
use crate::formats::checkpoint::{Source, Tensor};
use crate::kernels::half::f32_to_bf16;
use crate::kernels::matrix::Matrix;
use crate::kernels::ops;
use crate::kernels::quant::gemm::{PackedLowBit, PackedQ8_0};
use crate::kernels::quant::ggml::GgmlType;
use crate::kernels::quant::{self, ggml, quantize, BlockQ8_0, QK8_0};
use crate::kernels::threads::Threads;
use crate::model::config::Config;
use crate::model::schema::{all_tensors, LoadWeight, Norm, TensorName, WeightType};

/// The weights of a checkpoint as [`LoadWeight`] serves them to the model, converted to
/// `weights`; `progress(done, total)` is told the source bytes read after each slab.
pub struct SourceLoader<'a> {
    src: &'a Source,
    c: Config,
    weights: WeightType,
    threads: &'a Threads,
    progress: &'a mut dyn FnMut(u64, u64) -> Result<()>,
    done: u64,
    total: u64,
}

impl<'a> SourceLoader<'a> {
    /// Checks every tensor of a model of config `c` (present, of its shape) before any is read.
    pub fn new(
        src: &'a Source,
        c: &Config,
        weights: WeightType,
        threads: &'a Threads,
        progress: &'a mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<SourceLoader<'a>> {
        let mut total = 0u64;
        for name in all_tensors(c) {
            total += checked(src, &name, &name.shape(c))?.data.len() as u64;
        }
        Ok(SourceLoader { src, c: c.clone(), weights, threads, progress, done: 0, total })
    }

    fn advance(&mut self, bytes: u64) -> Result<()> {
        self.done += bytes;
        (self.progress)(self.done, self.total)
    }
}

impl LoadWeight for SourceLoader<'_> {
    fn norm(&mut self, name: &TensorName, n: usize) -> Result<Norm> {
        let t = checked(self.src, name, &[n])?;
        let w = finite_f32(&t)?;
        self.advance(t.data.len() as u64)?;
        // GGUF files store the sum already; the sum is computed in f32.
        Ok(if self.src.norms_include_one() { w } else { w.into_iter().map(|w| 1.0 + w).collect() })
    }

    /// Used in place from the map when the file already holds the wanted f32 or bf16, Q8_0
    /// blocks copied as stored into the GEMM kernel's layout, else converted (refused if it holds
    /// a NaN or an infinity); the source pages released.
    fn matrix(&mut self, name: &TensorName, rows: usize, cols: usize) -> Result<Matrix> {
        let src = self.src;
        let t = checked(src, name, &[rows, cols])?;
        let ty = self.weights.matrix_type(name, &self.c, t.ty);
        let in_place = match (ty, t.ty) {
            (GgmlType::F32, GgmlType::F32) => src.in_place(&t).map(|data| Matrix::F32 { data, rows, cols }),
            (GgmlType::BF16, GgmlType::BF16) => src.in_place(&t).map(|data| Matrix::Bf16 { data, rows, cols }),
            _ => None,
        };
        if let Some(m) = in_place {
            self.advance(t.data.len() as u64)?;
            return Ok(m);
        }
        let before = self.done;
        let threads = self.threads;
        let m = match ty {
            GgmlType::F32 => Matrix::F32 { data: finite_f32(&t)?.into(), rows, cols },
            GgmlType::Q8_0 => Matrix::Q8_0(pack_q8_0(src, &t, rows, cols, threads, &mut |b| self.advance(b))?),
            ty if ty.low_bit().is_some() => {
                Matrix::LowBit(pack_low_bit(src, &t, ty, threads, &mut |b| self.advance(b))?)
            }
            GgmlType::BF16 => {
                let mut bits = Vec::with_capacity(rows * cols);
                for_slabs(&t, rows, cols, |r0, x| {
                    bits.extend(x.iter().map(|&v| f32_to_bf16(v)));
                    self.advance(t.byte_range(r0 * cols..r0 * cols + x.len()).len() as u64)
                })?;
                Matrix::Bf16 { data: bits.into(), rows, cols }
            }
            other => unreachable!("weights are never held as {}", other.name()),
        };
        src.release(&t, 0..t.data.len());
        // Whatever was not reported slab by slab (a tensor converted whole).
        let rest = t.data.len() as u64 - (self.done - before);
        if rest > 0 {
            self.advance(rest)?;
        }
        Ok(m)
    }
}

/// The matrix `t` (checked 2-D) as the low-bit type `ty`, packed for the low-bit GEMM kernel a
/// slab of row groups at a time, each slab's pages released once packed: blocks of the file
/// kept in their bits when it holds `ty`, else quantized from its values.
fn pack_low_bit(
    src: &Source,
    t: &Tensor,
    ty: GgmlType,
    threads: &Threads,
    advanced: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<PackedLowBit> {
    let [rows, cols] = t.shape[..] else { unreachable!("a matrix") };
    let mut packed = PackedLowBit::zeroed(ty, rows, cols);
    if t.ty == ty {
        let row_bytes = ty.row_bytes(cols).expect("whole blocks (checked by matrix_type)");
        let slab = (SLAB_BYTES / row_bytes.max(1)).max(1).next_multiple_of(64);
        for r0 in (0..rows).step_by(slab) {
            let r1 = (r0 + slab).min(rows);
            packed.pack_rows(r0, &t.data[r0 * row_bytes..r1 * row_bytes], threads);
            src.release(t, r0 * row_bytes..r1 * row_bytes);
            advanced(((r1 - r0) * row_bytes) as u64)?;
        }
    } else {
        let mut bytes = Vec::new();
        for_slabs(t, rows, cols, |r0, x| {
            quantize_low_bit(t, ty, x, cols, &mut bytes, threads)?;
            packed.pack_rows(r0, &bytes, threads);
            let range = t.byte_range(r0 * cols..r0 * cols + x.len());
            let n = range.len() as u64;
            src.release(t, range);
            advanced(n)
        })?;
    }
    Ok(packed)
}

/// The rows of `x (n, cols)` of tensor `t` quantized to the low-bit `ty` into `out` (resized),
/// split across threads; an error if a block's f16 scale overflowed.
pub fn quantize_low_bit(
    t: &Tensor,
    ty: GgmlType,
    x: &[f32],
    cols: usize,
    out: &mut Vec<u8>,
    threads: &Threads,
) -> Result<()> {
    let row_bytes = ty.row_bytes(cols).expect("whole blocks");
    out.resize(x.len() / cols * row_bytes, 0);
    threads.for_rows_mut(out, row_bytes, 1, x.len() * 8, |r, b| {
        quantize::quantize(ty, &x[r.start * cols..r.end * cols], b);
    });
    let mut back = vec![0f32; x.len()];
    ggml::dequantize(ty, out, &mut back);
    match ops::first_non_finite(&back) {
        None => Ok(()),
        Some(i) => Err(Error::format(
            t.path(),
            format!(
                "tensor {} has values too large for {} (value {i}); load it with weights=\"bf16\" or \"f32\"",
                t.name,
                ty.name()
            ),
        )),
    }
}

/// Source bytes converted per step (Q8_0 packing, bf16 conversion, `pack`): the most of a
/// tensor's source that is resident, and of its f32 copy, at a time.
const SLAB_BYTES: usize = 1 << 20;

/// The `(rows, cols)` tensor `t` as Q8_0 blocks repacked for the GEMM kernel, a slab of rows at
/// a time: Q8_0 blocks of the file copied as they are (never requantized), any other type
/// quantized from its values (dequantized first when the file holds another quantization). Each
/// slab's pages are released once packed, so loading never holds the whole source tensor
/// resident, nor any full-precision copy of it. `advanced(bytes)` is told the source bytes of
/// each slab done.
pub fn pack_q8_0(
    src: &Source,
    t: &Tensor,
    rows: usize,
    cols: usize,
    threads: &Threads,
    advanced: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<PackedQ8_0> {
    let per_row = cols / QK8_0;
    let mut packed = PackedQ8_0::zeroed(rows, cols);
    let mut slab_done = |r0: usize, blocks: &[BlockQ8_0]| {
        packed.pack_rows(r0, blocks, threads);
        let range = t.byte_range(r0 * cols..r0 * cols + blocks.len() * QK8_0);
        let bytes = range.len() as u64;
        src.release(t, range);
        advanced(bytes)
    };
    if t.ty == GgmlType::Q8_0 {
        // Whole slabs of the kernel's row groups (slabs end on group boundaries).
        let slab = (SLAB_BYTES / (per_row * BLOCK_BYTES).max(1)).max(1).next_multiple_of(64);
        let mut blocks = Vec::with_capacity(slab.min(rows) * per_row);
        for r0 in (0..rows).step_by(slab) {
            let r1 = (r0 + slab).min(rows);
            blocks.clear();
            blocks.extend(
                t.data[r0 * per_row * BLOCK_BYTES..r1 * per_row * BLOCK_BYTES].chunks_exact(BLOCK_BYTES).map(|b| {
                    BlockQ8_0 { d: u16::from_le_bytes([b[0], b[1]]), qs: std::array::from_fn(|i| b[2 + i] as i8) }
                }),
            );
            slab_done(r0, &blocks)?;
        }
    } else {
        let mut blocks = Vec::new();
        for_slabs(t, rows, cols, |r0, x| {
            blocks.resize(x.len() / QK8_0, BlockQ8_0::default());
            quantize_rows(x, cols, &mut blocks, threads);
            check_q8_0_scales(t, r0 * per_row, &blocks)?;
            slab_done(r0, &blocks)
        })?;
    }
    Ok(packed)
}

/// Bytes of a ggml Q8_0 block in a file.
const BLOCK_BYTES: usize = std::mem::size_of::<BlockQ8_0>();

/// Q8_0 blocks `first ..` quantized from the finite values of `t`: a block whose values exceed
/// what an f16 scale can hold (|x| > 65504 × 127) got an infinite scale; refused, naming the way
/// out.
pub fn check_q8_0_scales(t: &Tensor, first: usize, blocks: &[BlockQ8_0]) -> Result<()> {
    match blocks.iter().position(|b| b.d & 0x7C00 == 0x7C00).map(|i| first + i) {
        None => Ok(()),
        Some(i) => Err(Error::format(
            t.path(),
            format!(
                "tensor {} has values too large for Q8_0 (block {i}: f16 scales hold at most \
                 65504 × 127); load it with weights=\"bf16\" or \"f32\"",
                t.name
            ),
        )),
    }
}

/// The rows of `x (n, cols)` quantized into `out` (`cols / 32` blocks a row), split across
/// threads.
pub fn quantize_rows(x: &[f32], cols: usize, out: &mut [BlockQ8_0], threads: &Threads) {
    let (n, per_row) = (x.len() / cols, cols / QK8_0);
    assert_eq!(out.len(), n * per_row, "quantize_rows: output length");
    threads.for_rows_mut(out, per_row, 1, n * cols * 4, |r, blocks| {
        quant::quantize_row_q8_0(&x[r.start * cols..r.end * cols], blocks);
    });
}

/// Calls `f(first_row, values)` for consecutive slabs of rows of `t (rows, cols)` read as f32,
/// about `SLAB_BYTES` of source each, and stops at its first error; a NaN or infinite value is
/// an error too (Q8_0 packing would silently turn a NaN into 0: the block's maximum skips it).
pub fn for_slabs(t: &Tensor, rows: usize, cols: usize, mut f: impl FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
    let row_bytes = t.byte_range(0..cols).len().max(1);
    // Whole multiples of 64 rows: the row groups of every GEMM kernel's layout.
    let slab = (SLAB_BYTES / row_bytes).max(1).next_multiple_of(64);
    let mut buf = vec![0f32; slab.min(rows) * cols];
    for r0 in (0..rows).step_by(slab) {
        let r1 = (r0 + slab).min(rows);
        let x = &mut buf[..(r1 - r0) * cols];
        t.read_f32(r0 * cols, x);
        check_finite(t, r0 * cols, x)?;
        f(r0, x)?;
    }
    Ok(())
}

/// The whole tensor as f32, refused if it holds a NaN or an infinity.
pub fn finite_f32(t: &Tensor) -> Result<Vec<f32>> {
    let v = t.to_f32();
    check_finite(t, 0, &v)?;
    Ok(v)
}

/// `x`, values `first..` of `t`, must be finite.
fn check_finite(t: &Tensor, first: usize, x: &[f32]) -> Result<()> {
    if let Some(i) = ops::first_non_finite(x) {
        let i = first + i;
        let what = format!("tensor {} holds a NaN or infinite value (element {i})", t.name);
        return Err(Error::format(t.path(), what));
    }
    Ok(())
}

/// The tensor `name`, checked to be of `shape`.
pub fn checked<'a>(src: &'a Source, name: &TensorName, shape: &[usize]) -> Result<Tensor<'a>> {
    let t = src.tensor(name)?;
    if t.shape != shape {
        let path = t.path().to_path_buf();
        return Err(Error::ShapeMismatch { path, name: t.name, expected: shape.to_vec(), found: t.shape });
    }
    Ok(t)
}
