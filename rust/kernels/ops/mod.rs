//! Pure kernels on slices: matrix products (f32, bf16 and Q8_0 weights), rms_norm, RoPE, softmax,
//! gelu_tanh. They know nothing of the model.
//!
//! Every dot product accumulates in `LANES` independent partial sums reduced in one fixed order,
//! whatever the number of tokens in the batch: a token's result does not depend on the batch it
//! was computed in, so prefill in one pass and token-by-token decoding give identical bits.

use crate::kernels::matrix::Matrix;
use crate::kernels::quant::gemm::{self, QuantizedActs};
use crate::kernels::quant::QK8_0;
use crate::kernels::threads::{split_columns, ColumnsMut, Threads};
use std::ops::Range;
use std::sync::OnceLock;

/// Partial sums per dot product (two AVX2 vectors, four NEON vectors).
const LANES: usize = 16;

/// A weight element widened to f32.
trait Elem: Copy + Send + Sync {
    fn f32(self) -> f32;
}

impl Elem for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

/// bf16 bit pattern.
impl Elem for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// Fixed-order reduction of the partial sums.
#[inline(always)]
fn reduce(a: &[f32; LANES]) -> f32 {
    let mut h = [0f32; LANES / 2];
    for j in 0..LANES / 2 {
        h[j] = a[j] + a[j + LANES / 2];
    }
    let q = [h[0] + h[4], h[1] + h[5], h[2] + h[6], h[3] + h[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

/// `T` dot products of one weight row `w` with `T` activation rows, sharing each load of `w`.
#[inline(always)]
fn dot_rows<E: Elem, const T: usize>(w: &[E], xs: [&[f32]; T]) -> [f32; T] {
    let n = w.len();
    let full = n / LANES * LANES;
    let mut acc = [[0f32; LANES]; T];
    for c in (0..full).step_by(LANES) {
        let wc: &[E; LANES] = w[c..c + LANES].try_into().expect("LANES");
        for t in 0..T {
            let xc: &[f32; LANES] = xs[t][c..c + LANES].try_into().expect("LANES");
            for j in 0..LANES {
                acc[t][j] += wc[j].f32() * xc[j];
            }
        }
    }
    let mut out = [0f32; T];
    for t in 0..T {
        let mut tail = 0f32;
        for i in full..n {
            tail += w[i].f32() * xs[t][i];
        }
        out[t] = reduce(&acc[t]) + tail;
    }
    out
}

/// Where one thread's share of a matrix product writes: its columns of the `(n, m)` output,
/// weight row `r` in column `r - row0`.
struct Out<'a> {
    cols: ColumnsMut<'a, f32>,
    row0: usize,
}

/// Dot products of one weight row with four or one activation rows. Both give the same bits
/// for a token: they share the lane structure and the reduction order.
struct RowKernel<E> {
    dot4: unsafe fn(&[E], [&[f32]; 4]) -> [f32; 4],
    dot1: unsafe fn(&[E], &[f32]) -> f32,
}

impl<E: Elem> RowKernel<E> {
    /// The portable kernel.
    fn scalar() -> Self {
        RowKernel { dot4: |w, xs| dot_rows::<E, 4>(w, xs), dot1: |w, x| dot_rows::<E, 1>(w, [x])[0] }
    }
}

impl RowKernel<f32> {
    /// The fastest kernel this CPU supports, chosen once.
    fn best() -> &'static Self {
        static BEST: OnceLock<RowKernel<f32>> = OnceLock::new();
        BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if avx2::has_avx512() {
                return RowKernel { dot4: avx2::dot4_f32_avx512, dot1: avx2::dot1_f32_avx512 };
            }
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                return RowKernel { dot4: avx2::dot4_f32, dot1: avx2::dot1_f32 };
            }
            Self::scalar()
        })
    }
}

impl RowKernel<u16> {
    /// The fastest kernel this CPU supports, chosen once.
    fn best() -> &'static Self {
        static BEST: OnceLock<RowKernel<u16>> = OnceLock::new();
        BEST.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            if avx2::available() {
                return RowKernel { dot4: avx2::dot4_bf16, dot1: avx2::dot1_bf16 };
            }
            Self::scalar()
        })
    }
}

/// Activation bytes kept in L1 per tile of tokens, weight bytes kept in L2 per tile of rows.
const L1_TILE_BYTES: usize = 24 << 10;
const L2_TILE_BYTES: usize = 256 << 10;

/// Activations `(n, cols)` as the matrix products take them: the f32 rows and, for Q8_0 weights,
/// the same rows quantized once (so q, k and v, or gate and up, share one quantization).
pub struct Activations<'a> {
    x: &'a [f32],
    n: usize,
    cols: usize,
    q: Option<&'a QuantizedActs>,
}

impl<'a> Activations<'a> {
    /// Rows for f32 and bf16 weights only.
    pub fn f32(x: &'a [f32], n: usize, cols: usize) -> Activations<'a> {
        assert!(x.len() >= n * cols, "activations: {} floats for ({n}, {cols})", x.len());
        Activations { x, n, cols, q: None }
    }

    /// Rows for any weights: quantized (on `threads`) into `buf` when `cols` is a whole number
    /// of blocks.
    pub fn quantized(
        x: &'a [f32],
        n: usize,
        cols: usize,
        threads: &Threads,
        buf: &'a mut QuantizedActs,
    ) -> Activations<'a> {
        let mut a = Activations::f32(x, n, cols);
        if cols.is_multiple_of(QK8_0) {
            buf.quantize_parallel(x, n, cols, threads);
            a.q = Some(buf);
        }
        a
    }

    pub fn n(&self) -> usize {
        self.n
    }

    fn row(&self, t: usize) -> &[f32] {
        &self.x[t * self.cols..(t + 1) * self.cols]
    }

    /// The 8-bit activations, when quantized.
    pub fn quantized_parts(&self) -> Option<&'a QuantizedActs> {
        self.q
    }

    fn quantized_acts(&self) -> &QuantizedActs {
        self.q.expect("Q8_0 weights need quantized activations (Activations::quantized)")
    }
}

/// `out[t][r - row0] = dot(r, t)` for `r` in `rows`, `t` in `0..n`, tiled so that a tile of weight
/// rows (`row_bytes` each) stays in L2 while tiles of tokens (`token_bytes` each) pass over it from
/// L1. Four rows and four tokens make a register tile (`tile4`), and the rows left over take four
/// tokens at a time (`dot4`); the tokens left over (all of them when decoding) take one row after
/// the other (`dot1`), so a matrix-vector product
/// reads the weights strictly in order, which the hardware prefetchers follow best (four rows
/// interleaved ran 2× slower on this project's x86 machine).
fn tiled(
    out: Out,
    n: usize,
    rows: Range<usize>,
    (row_bytes, token_bytes): (usize, usize),
    tile4: impl Fn([usize; 4], [usize; 4]) -> [[f32; 4]; 4],
    dot4: impl Fn(usize, [usize; 4]) -> [f32; 4],
    dot1: impl Fn(usize, usize) -> f32,
) {
    let Out { mut cols, row0 } = out;
    // This part's first column holds weight row `base`.
    let base = row0 + cols.cols().start;
    let token_tile = (L1_TILE_BYTES / token_bytes.max(1)).max(4) / 4 * 4;
    let row_tile = (L2_TILE_BYTES / row_bytes.max(1)).max(4);
    for rt in (rows.start..rows.end).step_by(row_tile) {
        let rt_end = (rt + row_tile).min(rows.end);
        for tt in (0..n).step_by(token_tile) {
            let t_end = (tt + token_tile).min(n);
            let t4_end = tt + (t_end - tt) / 4 * 4;
            let r4_end = rt + (rt_end - rt) / 4 * 4;
            for r in (rt..r4_end).step_by(4) {
                for t in (tt..t4_end).step_by(4) {
                    let tile = tile4([r, r + 1, r + 2, r + 3], [t, t + 1, t + 2, t + 3]);
                    for j in 0..4 {
                        // Token `t + j`'s four outputs, one row slice.
                        cols.row(t + j)[r - base..r - base + 4].copy_from_slice(&tile.map(|row| row[j]));
                    }
                }
            }
            for r in r4_end..rt_end {
                for t in (tt..t4_end).step_by(4) {
                    for (i, v) in dot4(r, [t, t + 1, t + 2, t + 3]).into_iter().enumerate() {
                        cols.row(t + i)[r - base] = v;
                    }
                }
            }
            for t in t4_end..t_end {
                for r in rt..rt_end {
                    cols.row(t)[r - base] = dot1(r, t);
                }
            }
        }
    }
}

/// Rows `rows` of an f32 or bf16 weight `w (_, cols)` applied to `x`.
fn matmul_float<E: Elem>(k: &RowKernel<E>, out: Out, x: &Activations, w: &[E], rows: Range<usize>) {
    let cols = x.cols;
    let wrow = |r: usize| &w[r * cols..(r + 1) * cols];
    // SAFETY (both kernels): chosen for this CPU; every slice has `cols` elements.
    let dot4 = |r, t: [usize; 4]| unsafe { (k.dot4)(wrow(r), t.map(|t| x.row(t))) };
    let dot1 = |r, t| unsafe { (k.dot1)(wrow(r), x.row(t)) };
    let tile4 = |r: [usize; 4], t| r.map(|r| dot4(r, t));
    tiled(out, x.n, rows, (std::mem::size_of::<E>() * cols, 4 * cols), tile4, dot4, dot1);
}

/// `out (n, rows.len()) = x (n, cols) · w[rows]ᵀ`: the rows `rows` of `w` applied to `n` tokens.
/// Threads split the rows (each writes its own columns of `out`); for Q8_0 weights on whole
/// register tiles of the GEMM kernel, counted from row 0, so that no two threads read a group.
pub fn matmul(out: &mut [f32], x: &Activations, w: &Matrix, rows: Range<usize>, threads: &Threads) {
    let (n, cols, m) = (x.n, w.cols(), rows.len());
    assert!(rows.end <= w.rows() && out.len() >= n * m && x.cols == cols, "matmul shapes");
    let parts = match w {
        Matrix::Q8_0(_) | Matrix::LowBit(_) => {
            let tile = match w {
                Matrix::Q8_0(p) => p.tile_rows(),
                Matrix::LowBit(p) => gemm::Packed::tile_rows(p),
                _ => unreachable!(),
            };
            let first = rows.start / tile;
            threads
                .ranges(rows.end.div_ceil(tile) - first, 1, n * m * cols)
                .into_iter()
                .map(|t| {
                    ((first + t.start) * tile).max(rows.start) - rows.start
                        ..((first + t.end) * tile).min(rows.end) - rows.start
                })
                .collect()
        }
        _ => threads.ranges(m, 4, n * m * cols),
    };
    let outs = split_columns(&mut out[..n * m], m, &parts);
    threads.run(outs, |_, cols| {
        let part = rows.start + cols.cols().start..rows.start + cols.cols().end;
        match w {
            Matrix::F32 { data, .. } => {
                matmul_float(RowKernel::<f32>::best(), Out { cols, row0: rows.start }, x, data, part)
            }
            Matrix::Bf16 { data, .. } => {
                matmul_float(RowKernel::<u16>::best(), Out { cols, row0: rows.start }, x, data, part)
            }
            Matrix::Q8_0(p) => matmul_packed(cols, x, p, part),
            Matrix::LowBit(p) => matmul_packed(cols, x, p, part),
        }
    });
}

/// Rows `rows` of a packed Q8_0 or low-bit weight applied to the quantized `x`, into a thread's
/// columns.
fn matmul_packed(mut out: ColumnsMut<'_, f32>, x: &Activations, w: &impl gemm::Packed, rows: Range<usize>) {
    gemm::gemm_into(x.quantized_acts(), w, rows, |t, at, sums| out.row(t)[at..][..sums.len()].copy_from_slice(sums));
}

/// The index of the first NaN or infinite value of `x`, if any. An integer OR over the
/// exponent test runs first, vectorized (a search would branch per value).
pub fn first_non_finite(x: &[f32]) -> Option<usize> {
    let bad = |v: &f32| (v.to_bits() & 0x7FFF_FFFF) >= 0x7F80_0000;
    if x.iter().fold(false, |any, v| any | bad(v)) {
        x.iter().position(bad)
    } else {
        None
    }
}

/// Plain f32 dot product, bit-identical to a matrix product row.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: `best` only returns kernels this CPU supports.
    unsafe { (RowKernel::<f32>::best().dot1)(a, &b[..a.len()]) }
}

/// Attention scores of `h` query heads (`q`, `(h, hd)`) against `len` keys, each `hd` values at
/// `offset` in a row of `stride`: `out (h, len) = scale * q · kᵀ`. The keys come in two
/// segments, oldest first (a ring buffer's wrap; the second may be empty). Four heads at a time
/// share each key load; the bits are those of `dot(q_head, key) * scale` whatever `h`.
pub fn attention_scores(out: &mut [f32], q: &[f32], keys: [&[f32]; 2], stride: usize, offset: usize, scale: f32) {
    let len = (keys[0].len() + keys[1].len()) / stride;
    let h = out.len() / len;
    attention_scores_into(out, len, h, q, Values { rows: keys, stride, offset }, scale)
}

/// `attention_scores` of `h` heads into rows of `out_stride` (`out[i · out_stride + j]` for
/// key `j`), for a block of keys of longer rows. The same bits.
pub fn attention_scores_into(out: &mut [f32], out_stride: usize, h: usize, q: &[f32], keys: Values<'_>, scale: f32) {
    let Values { rows: keys, stride, offset } = keys;
    let len = (keys[0].len() + keys[1].len()) / stride;
    let hd = q.len() / h.max(1);
    assert!(
        len <= out_stride
            && (h == 0 || out.len() >= (h - 1) * out_stride + len)
            && q.len() == h * hd
            && offset + hd <= stride,
        "attention_scores: shapes"
    );
    let k = RowKernel::<f32>::best();
    let qrow = |i: usize| &q[i * hd..(i + 1) * hd];
    let split = keys[0].len() / stride;
    let key = |j: usize| {
        let (seg, j) = if j < split { (keys[0], j) } else { (keys[1], j - split) };
        &seg[j * stride + offset..j * stride + offset + hd]
    };
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))] // only x86 has a 4 × 4 kernel
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    if h.is_multiple_of(4) && avx2::has_avx512() {
        // Four keys × four heads a call, the bits of `dot4` (AVX-512's `RowKernel`).
        while j + 4 <= len {
            let ks = [key(j), key(j + 1), key(j + 2), key(j + 3)];
            for i in (0..h).step_by(4) {
                // SAFETY: the CPU has AVX-512; every slice has `hd` elements.
                let d = unsafe { avx2::dot4x4_f32_avx512(ks, [qrow(i), qrow(i + 1), qrow(i + 2), qrow(i + 3)]) };
                for (kk, d) in d.into_iter().enumerate() {
                    for (u, v) in d.into_iter().enumerate() {
                        out[(i + u) * out_stride + j + kk] = v * scale;
                    }
                }
            }
            j += 4;
        }
    }
    for j in j..len {
        let key = key(j);
        let mut i = 0;
        while i + 4 <= h {
            // SAFETY: the kernel was chosen for this CPU; every slice has `hd` elements.
            let d = unsafe { (k.dot4)(key, [qrow(i), qrow(i + 1), qrow(i + 2), qrow(i + 3)]) };
            for (u, v) in d.into_iter().enumerate() {
                out[(i + u) * out_stride + j] = v * scale;
            }
            i += 4;
        }
        for i in i..h {
            // SAFETY: as above.
            out[i * out_stride + j] = unsafe { (k.dot1)(key, qrow(i)) } * scale;
        }
    }
}

/// Rows of a key or value cache as the attention kernels read them: `hd` values at `offset` in
/// rows of `stride`, in two segments, oldest first (a ring buffer's wrap; the second may be
/// empty).
#[derive(Clone, Copy)]
pub struct Values<'a> {
    pub rows: [&'a [f32]; 2],
    pub stride: usize,
    pub offset: usize,
}

/// `out (h, hd) = p (h, len) · v`: the attention-weighted sum of `len` value rows (`hd` values at
/// `offset` in a row of `stride`, in two segments as for `attention_scores`): every output is
/// `fma(p[j], v[j], acc)` over the keys in order, from 0. The SIMD kernels give the same bits:
/// they let the rows of `p` (the query heads of a key/value group) share each load of a value
/// row, with many columns in registers. Where the segments split does not change the bits.
pub fn attention_values(out: &mut [f32], p: &[f32], values: [&[f32]; 2], stride: usize, offset: usize) {
    let len = (values[0].len() + values[1].len()) / stride;
    let h = p.len() / len.max(1);
    attention_values_into(out, h, p, len, Values { rows: values, stride, offset }, false)
}

/// `attention_values` for a block of keys: `p` holds `h` rows of `p_stride` whose first `len`
/// weights are this block's; with `accumulate` the sums continue from `out` (the blocks before,
/// in key order), so a row computed block by block has the bits of one call over all keys.
pub fn attention_values_into(out: &mut [f32], h: usize, p: &[f32], p_stride: usize, v: Values<'_>, accumulate: bool) {
    #[cfg(target_arch = "x86_64")]
    if avx2::has_avx512() {
        // SAFETY: the CPU has AVX2, FMA and AVX-512 F/BW.
        return unsafe { avx2::attention_values_avx512(out, h, p, p_stride, v, accumulate) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::attention_values(out, h, p, p_stride, v, accumulate) };
    }
    values_tail(out, h, p, p_stride, v, accumulate, 0)
}

/// `(hd, len, split)` of an `attention_values_into` call, its slices checked to hold them.
fn values_shape(out: &[f32], h: usize, p: &[f32], p_stride: usize, v: Values<'_>) -> (usize, usize, usize) {
    let Values { rows, stride, offset } = v;
    let len = (rows[0].len() + rows[1].len()) / stride;
    assert!(len > 0, "attention_values: no keys");
    let hd = out.len().checked_div(h).unwrap_or(0);
    assert!(
        len <= p_stride
            && (h == 0 || p.len() >= (h - 1) * p_stride + len)
            && out.len() == h * hd
            && rows.iter().all(|v| v.len().is_multiple_of(stride))
            && offset + hd <= stride,
        "attention_values: shapes"
    );
    (hd, len, rows[0].len() / stride)
}

/// Columns `from ..` of `attention_values_into`, portably (16 columns at a time in an array
/// that the compiler keeps in vector registers): the bits of the SIMD kernels.
fn values_tail(out: &mut [f32], h: usize, p: &[f32], p_stride: usize, v: Values<'_>, accumulate: bool, from: usize) {
    const W: usize = 16;
    let (hd, len, split) = values_shape(out, h, p, p_stride, v);
    let Values { rows: values, stride, offset } = v;
    for (r, o) in out.chunks_exact_mut(hd.max(1)).enumerate().take(h) {
        let p = &p[r * p_stride..r * p_stride + len];
        let parts = [(values[0], &p[..split]), (values[1], &p[split..])];
        let mut c = from;
        while c < hd {
            let w = (hd - c).min(W);
            let mut acc = [0f32; W];
            if accumulate {
                acc[..w].copy_from_slice(&o[c..c + w]);
            }
            for (seg, p) in parts {
                for (j, &a) in p.iter().enumerate() {
                    let x = &seg[j * stride + offset + c..][..w];
                    for (acc, &x) in acc.iter_mut().zip(x) {
                        *acc = a.mul_add(x, *acc);
                    }
                }
            }
            o[c..c + w].copy_from_slice(&acc[..w]);
            c += w;
        }
    }
}

/// Gemma's RMSNorm: `x / sqrt(mean(x²) + eps) * w1`, with `w1 = 1 + weight` precomputed.
pub fn rms_norm(out: &mut [f32], x: &[f32], w1: &[f32], eps: f32) {
    let scale = rms_scale(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(w1) {
        *o = v * scale * w;
    }
}

pub fn rms_norm_inplace(x: &mut [f32], w1: &[f32], eps: f32) {
    let scale = rms_scale(x, eps);
    for (v, &w) in x.iter_mut().zip(w1) {
        *v = *v * scale * w;
    }
}

/// `1 / sqrt(mean(x²) + eps)`, the mean of squares summed in f64 over eight independent lanes
/// (vectorizable, and no rounding worth the name for a few thousand values).
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64) * (v as f64)).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += (v as f64) * (v as f64);
        }
    }
    let ss = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
    let mean = (ss / x.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// Rotate-half RoPE on one head `x` (length `2 * cos.len()`).
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (lo, hi) = x.split_at_mut(half);
    for i in 0..half {
        let (a, b) = (lo[i], hi[i]);
        lo[i] = a * cos[i] - b * sin[i];
        hi[i] = b * cos[i] + a * sin[i];
    }
}

/// The RoPE frequencies `1 / base^(2i / dim)`, in f32 as transformers computes them.
pub fn rope_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            1.0 / (base.powf(exponent as f64) as f32)
        })
        .collect()
}

/// cos and sin of `pos * inv_freq` (angle rounded to f32 first, as transformers does).
pub fn rope_cos_sin(pos: usize, inv_freq: &[f32], cos: &mut [f32], sin: &mut [f32]) {
    for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
        let angle = (pos as f32 * f) as f64;
        *c = angle.cos() as f32;
        *s = angle.sin() as f32;
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = lanes_max(x);
    #[cfg(target_arch = "x86_64")]
    if avx2::has_avx512() {
        // SAFETY: the CPU has AVX2, FMA and AVX-512.
        return unsafe { avx2::softmax_from_avx512(x, max) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::softmax_from(x, max) };
    }
    softmax_from(x, max)
}

/// The maximum of `x` (−∞ if empty), over `LANES` running maxima so that it vectorizes (the
/// maximum is exact in any order).
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (m, &v) in m.iter_mut().zip(c) {
            *m = m.max(v);
        }
    }
    chunks.remainder().iter().chain(&m).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Softmax given the maximum: the exponentials branch-free in one loop and their sum over
/// `LANES` partial sums reduced in a fixed order in another, so that both vectorize.
#[inline(always)]
fn softmax_from(x: &mut [f32], max: f32) {
    for v in x.iter_mut() {
        *v = exp(*v - max);
    }
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    let sum = chunks.remainder().iter().fold(reduce(&acc), |s, &v| s + v);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `cap * tanh(x / cap)`.
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = (*v / cap).tanh() * cap;
    }
}

/// GELU, tanh approximation (PyTorch's `gelu(approximate="tanh")`):
/// `0.5 x (1 + tanh(u))` with `u = sqrt(2/π) (x + 0.044715 x³)`, computed as the equal
/// `x / (1 + e^(-2u))` with one exponential.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// `gate = gelu_tanh(gate) * up`, element by element: the MLP's gated activation.
pub fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2::has_avx512() {
        // SAFETY: the CPU has AVX2, FMA and AVX-512.
        return unsafe { avx2::gelu_tanh_mul_avx512(gate, up) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { avx2::gelu_tanh_mul(gate, up) };
    }
    gelu_tanh_mul_portable(gate, up)
}

#[inline(always)]
fn gelu_tanh_mul_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// `e^x` in f32 without libm and without branches, so that loops over slices vectorize:
/// `2^k p(r)` with `k = round(x / ln 2)`, `r = x - k ln 2` (ln 2 in two parts, Cody-Waite), and
/// `p` the degree-7 Taylor polynomial, relative error about 1e-7 over the whole range. Inputs
/// are clamped to [-87, 88], where `2^k` stays a normal float.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75; // ln 2 with its last 12 bits zero: k · LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: (y + ROUND) - ROUND rounds y to an integer
    let x = x.clamp(-87.0, 88.0);
    let k = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// Index of the first maximum (as `torch.argmax`).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Running log-sum-exp over a stream of values, for log-probabilities without keeping all logits.
#[derive(Clone, Copy, Debug)]
pub struct LogSumExp {
    max: f32,
    sum: f64,
}

impl Default for LogSumExp {
    fn default() -> Self {
        LogSumExp { max: f32::NEG_INFINITY, sum: 0.0 }
    }
}

impl LogSumExp {
    pub fn add_all(&mut self, xs: &[f32]) {
        let m = xs.iter().copied().fold(self.max, f32::max);
        if m == f32::NEG_INFINITY {
            return;
        }
        if m > self.max {
            self.sum *= ((self.max - m) as f64).exp();
            self.max = m;
        }
        self.sum += xs.iter().map(|&v| ((v - m) as f64).exp()).sum::<f64>();
    }

    pub fn value(&self) -> f64 {
        self.max as f64 + self.sum.ln()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
use x86 as avx2;

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn naive_matmul(x: &[f32], n: usize, w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * rows];
        for t in 0..n {
            for r in 0..rows {
                out[t * rows + r] =
                    (0..cols).map(|i| w[r * cols + i] as f64 * x[t * cols + i] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn matmul_matches_naive_for_odd_shapes_and_threads() {
        let mut s = 7u64;
        for &(n, rows, cols) in &[(1, 1, 1), (3, 5, 17), (4, 9, 64), (7, 33, 100), (9, 130, 640)] {
            let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
            let want = naive_matmul(&x, n, &w, rows, cols);
            for threads in [1, 3] {
                let m = Matrix::F32 { data: w.clone().into(), rows, cols };
                let mut out = vec![0f32; n * rows];
                matmul(&mut out, &Activations::f32(&x, n, cols), &m, 0..rows, &Threads::new(threads));
                for (a, b) in out.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4 * (cols as f32).sqrt(), "{a} {b}");
                }
                // A sub-range of rows lands at the start of `out`.
                let k = rows.min(2);
                let mut part = vec![0f32; n * k];
                matmul(&mut part, &Activations::f32(&x, n, cols), &m, rows - k..rows, &Threads::new(threads));
                for t in 0..n {
                    assert_eq!(&part[t * k..(t + 1) * k], &out[(t + 1) * rows - k..(t + 1) * rows]);
                }
            }
        }
    }

    #[test]
    fn simd_kernels_match_the_portable_kernel() {
        let mut s = 5u64;
        for cols in [1, 15, 16, 17, 100, 640, 2048] {
            let w: Vec<f32> = (0..cols).map(|_| lcg(&mut s)).collect();
            let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
            let xs: Vec<Vec<f32>> = (0..4).map(|_| (0..cols).map(|_| lcg(&mut s)).collect()).collect();
            let xr = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            let tol = 1e-5 * (cols as f32).sqrt();
            // SAFETY: `best` returns kernels this CPU supports.
            unsafe {
                let (a, b) = (RowKernel::<f32>::best(), &RowKernel::<f32>::scalar());
                let (y, z) = ((a.dot4)(&w, xr), (b.dot4)(&w, xr));
                for i in 0..4 {
                    assert!((y[i] - z[i]).abs() <= tol, "f32 cols {cols}: {} vs {}", y[i], z[i]);
                    assert_eq!(y[i], (a.dot1)(&w, xr[i]));
                }
                let (a, b) = (RowKernel::<u16>::best(), &RowKernel::<u16>::scalar());
                let (y, z) = ((a.dot4)(&wb, xr), (b.dot4)(&wb, xr));
                for i in 0..4 {
                    assert!((y[i] - z[i]).abs() <= tol, "bf16 cols {cols}: {} vs {}", y[i], z[i]);
                    assert_eq!(y[i], (a.dot1)(&wb, xr[i]));
                }
            }
        }
    }

    #[test]
    fn attention_values_kernels_give_the_portable_bits() {
        let mut s = 17u64;
        for &(h, hd, len, stride_extra) in
            &[(1, 1, 1, 0), (4, 256, 37, 0), (3, 17, 5, 3), (5, 40, 9, 1), (2, 300, 3, 7), (6, 96, 70, 5)]
        {
            let stride = hd + stride_extra;
            let offset = stride_extra.min(2);
            let stride = stride + offset;
            let v: Vec<f32> = (0..len * stride).map(|_| lcg(&mut s)).collect();
            let p: Vec<f32> = (0..h * len).map(|_| lcg(&mut s).abs()).collect();
            let mut want = vec![f32::NAN; h * hd];
            values_tail(&mut want, h, &p, len, Values { rows: [&v, &[]], stride, offset }, false, 0);
            for t in 0..hd.min(3) {
                let exact: f64 = (0..len).map(|j| p[j] as f64 * v[j * stride + offset + t] as f64).sum();
                assert!((want[t] as f64 - exact).abs() < 1e-5 * (1.0 + exact.abs()), "{} vs {exact}", want[t]);
            }
            for split in [0, len / 2, len] {
                let (a, b) = v.split_at(split * stride);
                let mut got = vec![f32::NAN; h * hd];
                attention_values(&mut got, &p, [a, b], stride, offset);
                assert_eq!(got, want, "h {h} hd {hd} len {len} split {split}");
                // Block by block (keys 0..split, then split..len), continuing from `out`.
                if split > 0 && split < len {
                    let mut blocks = vec![f32::NAN; h * hd];
                    let first = Values { rows: [a, &[]], stride, offset };
                    attention_values_into(&mut blocks, h, &p, len, first, false);
                    let rest = Values { rows: [b, &[]], stride, offset };
                    attention_values_into(&mut blocks, h, &p[split..], len, rest, true);
                    assert_eq!(blocks, want, "in blocks: h {h} hd {hd} len {len} split {split}");
                }
                #[cfg(target_arch = "x86_64")]
                if avx2::available() {
                    let mut ymm = vec![f32::NAN; h * hd];
                    // SAFETY: the CPU has AVX2 and FMA.
                    unsafe {
                        avx2::attention_values(&mut ymm, h, &p, len, Values { rows: [a, b], stride, offset }, false)
                    };
                    assert_eq!(ymm, want, "avx2: h {h} hd {hd} len {len} split {split}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_dot_products_give_the_avx2_bits() {
        if !avx2::has_avx512() {
            return;
        }
        let mut s = 19u64;
        for cols in [1, 15, 16, 17, 100, 256, 640] {
            let w: Vec<f32> = (0..cols).map(|_| lcg(&mut s)).collect();
            let xs: Vec<Vec<f32>> = (0..4).map(|_| (0..cols).map(|_| lcg(&mut s)).collect()).collect();
            let xr = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            // SAFETY: the CPU has AVX2, FMA and AVX-512.
            unsafe {
                assert_eq!(avx2::dot4_f32_avx512(&w, xr), avx2::dot4_f32(&w, xr), "cols {cols}");
                assert_eq!(avx2::dot1_f32_avx512(&w, xr[1]), avx2::dot1_f32(&w, xr[1]), "cols {cols}");
                let four = avx2::dot4x4_f32_avx512([xr[2], &w, xr[0], xr[3]], xr);
                for (k, wk) in [xr[2], &w, xr[0], xr[3]].into_iter().enumerate() {
                    assert_eq!(four[k], avx2::dot4_f32(wk, xr), "cols {cols}, row {k}");
                }
            }
        }
    }

    #[test]
    fn bf16_matmul_is_f32_matmul_of_widened_weights() {
        let mut s = 3u64;
        let (n, rows, cols) = (5, 7, 75);
        let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut s)).collect();
        let bits: Vec<u16> = (0..rows * cols).map(|_| (lcg(&mut s).to_bits() >> 16) as u16).collect();
        let wide: Vec<f32> = bits.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
        let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        let x = Activations::f32(&x, n, cols);
        matmul(&mut a, &x, &Matrix::Bf16 { data: bits.into(), rows, cols }, 0..rows, &Threads::new(1));
        matmul(&mut b, &x, &Matrix::F32 { data: wide.into(), rows, cols }, 0..rows, &Threads::new(1));
        assert_eq!(a, b);
    }

    #[test]
    fn a_token_gives_the_same_bits_alone_or_in_a_batch() {
        let mut s = 11u64;
        let (n, rows, cols) = (7, 6, 640);
        let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut s)).collect();
        let m = Matrix::F32 { data: (0..rows * cols).map(|_| lcg(&mut s)).collect::<Vec<_>>().into(), rows, cols };
        let mut all = vec![0f32; n * rows];
        matmul(&mut all, &Activations::f32(&x, n, cols), &m, 0..rows, &Threads::new(1));
        for t in 0..n {
            let mut one = vec![0f32; rows];
            matmul(&mut one, &Activations::f32(&x[t * cols..(t + 1) * cols], 1, cols), &m, 0..rows, &Threads::new(1));
            assert_eq!(one, all[t * rows..(t + 1) * rows]);
            for r in 0..rows {
                let d = dot(
                    &x[t * cols..(t + 1) * cols],
                    match &m {
                        Matrix::F32 { data, .. } => &data[r * cols..(r + 1) * cols],
                        _ => unreachable!(),
                    },
                );
                assert_eq!(d, one[r]);
            }
        }
    }

    fn q8_0(w: &[f32], rows: usize, cols: usize) -> Matrix {
        let mut data = vec![crate::kernels::quant::BlockQ8_0::default(); rows * cols / QK8_0];
        crate::kernels::quant::quantize_row_q8_0(w, &mut data);
        Matrix::Q8_0(crate::kernels::quant::gemm::PackedQ8_0::new(&data, rows, cols))
    }

    #[test]
    fn q8_0_matmul_is_close_to_f32_and_batch_independent() {
        let mut s = 13u64;
        for &(n, rows, cols) in &[(1, 1, 32), (5, 9, 96), (9, 130, 640), (66, 7, 2048), (3, 300, 64)] {
            let x: Vec<f32> = (0..n * cols).map(|_| lcg(&mut s)).collect();
            let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s) * 0.1).collect();
            let want = naive_matmul(&x, n, &w, rows, cols);
            let m = q8_0(&w, rows, cols);
            for threads in [1, 3] {
                let threads = Threads::new(threads);
                let mut buf = QuantizedActs::new();
                let xa = Activations::quantized(&x, n, cols, &threads, &mut buf);
                let mut all = vec![0f32; n * rows];
                matmul(&mut all, &xa, &m, 0..rows, &threads);
                // Two 8-bit roundings: relative error about 1% of the row's |w|·|x|.
                for (a, b) in all.iter().zip(&want) {
                    assert!((a - b).abs() < 0.02 * 0.1 * cols as f32 / 2.0, "{a} {b}");
                }
                // Any sub-range of rows (here not on a group boundary) gives the same bits.
                let sub = rows / 3..rows - rows / 4;
                let mut part = vec![0f32; n * sub.len()];
                matmul(&mut part, &xa, &m, sub.clone(), &threads);
                for t in 0..n {
                    assert_eq!(part[t * sub.len()..(t + 1) * sub.len()], all[t * rows + sub.start..t * rows + sub.end]);
                }
                let mut one_buf = QuantizedActs::new();
                for t in [0, n / 2, n - 1] {
                    let xt = Activations::quantized(&x[t * cols..(t + 1) * cols], 1, cols, &threads, &mut one_buf);
                    let mut one = vec![0f32; rows];
                    matmul(&mut one, &xt, &m, 0..rows, &threads);
                    assert_eq!(one, all[t * rows..(t + 1) * rows], "token {t} of {n}");
                }
            }
        }
    }

    #[test]
    fn norms_and_activations_match_their_formulas() {
        let x = [1.0f32, -2.0, 3.0, 0.5];
        let w1 = [1.0f32, 0.5, 2.0, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&mut out, &x, &w1, 1e-6);
        let rms = ((1.0 + 4.0 + 9.0 + 0.25) / 4.0f64 + 1e-6).sqrt();
        for i in 0..4 {
            assert!((out[i] as f64 - x[i] as f64 / rms * w1[i] as f64).abs() < 1e-6);
        }
        let mut y = x;
        rms_norm_inplace(&mut y, &w1, 1e-6);
        assert_eq!(y, out);

        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-6);
        assert_eq!(gelu_tanh(0.0), 0.0);
        for i in -2000..=2000 {
            let x = i as f32 * 0.01;
            let want =
                0.5 * x as f64 * (1.0 + (0.797_884_560_802_865_4 * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh());
            // Relative error grows with |u| (the rounding of u is scaled by the exponential).
            let tol = 4e-7 * (1.0 + (x as f64).abs().powi(3)) * want.abs().max(1e-6);
            assert!((gelu_tanh(x) as f64 - want).abs() <= tol, "gelu({x})");
        }
        for i in -870..880 {
            let x = i as f32 * 0.1 + 0.037;
            let want = (x as f64).exp();
            assert!(((exp(x) as f64 - want) / want).abs() < 3e-7, "exp({x}): {} vs {want}", exp(x));
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
        let (mut g, u) = (vec![0.5f32, -3.0, 7.0, 0.0, -0.25], [2.0f32, 1.0, 0.5, 3.0, -1.0]);
        let want: Vec<f32> = g.iter().zip(&u).map(|(&a, &b)| gelu_tanh(a) * b).collect();
        gelu_tanh_mul(&mut g, &u);
        assert_eq!(g, want);

        let mut p = [1.0f32, 2.0, 3.0];
        softmax(&mut p);
        let z = 1f64.exp() + 2f64.exp() + 3f64.exp();
        assert!((p[2] as f64 - 3f64.exp() / z).abs() < 1e-6);

        let mut c = [100.0f32, -1.0];
        softcap(&mut c, 30.0);
        assert!((c[0] - 30.0 * (100.0f32 / 30.0).tanh()).abs() < 1e-5);

        let mut l = LogSumExp::default();
        l.add_all(&[1.0, 2.0]);
        l.add_all(&[3.0]);
        assert!((l.value() - z.ln()).abs() < 1e-9);
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn rope_rotates_pairs_half_a_head_apart() {
        let inv = rope_inv_freq(10_000.0, 4);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.01).abs() < 1e-9);
        let (mut c, mut s) = ([0f32; 2], [0f32; 2]);
        rope_cos_sin(3, &inv, &mut c, &mut s);
        let mut x = [1.0f32, 0.0, 0.0, 1.0];
        rope(&mut x, &c, &s);
        assert!((x[0] - 3f32.cos()).abs() < 1e-6 && (x[2] - 3f32.sin()).abs() < 1e-6);
        assert!((x[1] + 0.03f32.sin()).abs() < 1e-6 && (x[3] - 0.03f32.cos()).abs() < 1e-6);
    }
}
