//! Q8_0 matrix products on weights repacked once at load: a GEMM for prefill whose n = 1 case is
//! decode's matrix-vector product.
//!
//! # Layout
//! [`PackedQ8_0`] holds the rows of a ggml Q8_0 matrix in groups of `R` rows (`Layout::rows`;
//! the last group padded with zero rows). Per group and per K block (32 values) there are `R`
//! f16 scales side by side, in one array, and the `R × 32` int8 values, in another, interleaved
//! `I` bytes (`Layout::interleave`, the width of the dot-product instruction) per row:
//! value `k` of row `r` of the group is at byte `((k / I) · R + r) · I + k % I` of the block. So
//! one vector load holds `I` consecutive values of several rows, one vector instruction applies
//! `R` rows' scales, and each i32 lane of a dot-product instruction belongs to one row. The
//! layout is the kernel's, chosen at run time:
//!
//! | kernel        | R  | I | values stored |
//! |---------------|----|---|---------------|
//! | avx512vnni, avxvnni, avx2 | 16 | 4 | `w ^ 0x80` (`w + 128` as u8, for `vpdpbusd`'s u8 × s8) |
//! | neon-dotprod, neon | 8 | 4 | `w` |
//! | neon-i8mm     | 8  | 8 | `w` (`smmla` takes 2 rows × 8 values) |
//! | scalar        | 4  | 4 | `w` |
//!
//! Bytes: exactly 34 per 32 weights (plus the padding rows of the last group); the values are
//! 64-byte aligned, and both arrays are read front to back by a matrix-vector product.
//!
//! # Numerics
//! For every (row, token) all kernels compute, block after block in order,
//! `acc = fma(float(isum), f16(w.d) · x.d, acc)` from `acc = 0`, where `isum` is the block's
//! exact i32 dot product of the int8 values. Integer sums are exact, the float operations are
//! the same and in the same order whatever the kernel, the tile a token falls in, the number of
//! tokens and the K blocking (partial sums round-trip through f32 memory unchanged): the result
//! of a (row, token) is the same bits on every kernel and every batch.
//!
//! # Activations
//! [`QuantizedActs`] quantizes each token exactly as [`super::quantize_activations`] (per block
//! `d = max|x| / 127`, round to nearest even, NaN and q = 0 for a non-finite block; AVX2 and NEON
//! versions with the same bits, ~8× faster) and adds the per-block `-128 · Σq` that the x86 VNNI
//! kernels start their integer sums from (they multiply `w + 128`).
//!
//! # Driver and tiles
//! [`gemm`] takes a row range on group boundaries (threads get disjoint ranges: each thread
//! writes its own columns of the output, `threads::split_columns`, and streams its own weights).
//! Loops: token chunks whose activations stay in L2 (1 MiB) → tiles of `Gemm::groups` row
//! groups → K chunks of at most 64 KiB of those groups' weights → tiles of `Gemm::tokens` tokens
//! → the microkernel over the chunk's blocks, accumulators in registers, stored to a scratch
//! (one register tile's, copied into the output rows while in L1; the token chunk's when K is
//! split). With n = 1 it reads each group's weights once, front to back.
//! Register tiles: avx512vnni 2 groups (32 rows) × 6 tokens, avxvnni 16 × 3, avx2 16 × 2,
//! neon-i8mm 8 × 4, neon-dotprod 8 × 4, neon 8 × 2, scalar 4 × 4 (see x86.rs, neon.rs).
//!
//! # Use
//! ```ignore
//! let w = PackedQ8_0::new_parallel(&blocks, rows, cols, &threads); // once, at load
//! let mut x = QuantizedActs::new();                                 // reused buffers
//! x.quantize_parallel(&input, n, cols, &threads);                   // once per input
//! gemm_parallel(&mut out, &x, &w, &threads);                        // out (n, rows)
//! // or, per thread: gemm(&mut out[..], stride, &x, &w, rows_on_group_boundaries)
//! ```
//!
//! # Tests
//! `cargo test --release kernels::quant::gemm` natively; aarch64 under qemu-user (scripts/aarch64-env.sh
//! sets up the cross toolchain and rootfs), one CPU model per kernel set:
//! ```text
//! source scripts/aarch64-env.sh && aarch64_setup
//! export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
//! export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $ROOTFS"
//! QEMU_CPU=cortex-a53 GEMMA_RS_EXPECT_GEMM=neon,scalar \
//!     cross cargo test --release --lib --target $TARGET kernels::quant::gemm
//! QEMU_CPU=cortex-a76 GEMMA_RS_EXPECT_GEMM=neon-dotprod,neon,scalar ...   (also neoverse-n1)
//! QEMU_CPU=max GEMMA_RS_EXPECT_GEMM=neon-i8mm,neon-dotprod,neon,scalar ...
//! ```
//! (qemu 7.2 has no cortex-a55 or neoverse-n2 model; a76/n1 have dotprod, max has i8mm.)

use super::ggml::LowBit;
use super::{quantize_activations, BlockQ8_0, QK8_0};
use crate::kernels::half::f16_to_f32;
use crate::kernels::threads::{split_columns, split_rows, ColumnsMut, Threads};
pub use lowbit::PackedLowBit;
use std::ops::Range;
use std::sync::OnceLock;

/// Calls `$body::<T>(args)` for `T = ntok`, one of the literals listed (the SIMD tiles'
/// token counts).
#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_macros))]
macro_rules! dispatch {
    ($body:ident, $args:expr, $ntok:expr, $($t:literal)*) => {
        match $ntok {
            $($t => $body::<$t>($args),)*
            n => unreachable!("{n} tokens in a tile"),
        }
    };
}

pub mod lowbit;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

/// How a kernel wants the weights: groups of `rows` rows, `interleave` consecutive values of a
/// row together, values stored xor `xor` (0x80 turns int8 `w` into the u8 `w + 128`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub rows: usize,
    pub interleave: usize,
    pub xor: u8,
}

impl Layout {
    /// Byte of value `k` (`< 32`) of row `r` (`< rows`) in a block of a group.
    #[inline(always)]
    fn offset(&self, r: usize, k: usize) -> usize {
        ((k / self.interleave) * self.rows + r) * self.interleave + k % self.interleave
    }
}

/// What a microkernel works on: `groups` row groups, `blocks` K blocks from the same first block
/// of weights and activations, `ntok` tokens.
#[derive(Clone, Copy)]
pub(crate) struct TileArgs {
    /// The group's values at its first block (`R × 32` bytes per block, 64-byte aligned).
    pub vals: *const u8,
    /// The group's scales at its first block (`R` per block).
    pub scales: *const u16,
    pub blocks: usize,
    /// Row groups in the tile (1 ..= `Gemm::groups`), consecutive: group `j` is at
    /// `vals + j · group_vals` and `scales + j · group_scales`, its results at `acc + j · R`.
    pub groups: usize,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub group_vals: usize,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub group_scales: usize,
    /// Token 0 of the tile at the first block: values, scales and `-128 Σq` per block.
    pub qs: *const i8,
    pub d: *const f32,
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub bsum: *const i32,
    /// Bytes between the values of consecutive tokens (the row length).
    pub qs_stride: usize,
    /// Elements between the scales (and sums) of consecutive tokens.
    pub nb_stride: usize,
    /// Result of (token `t`, row `r` of the group) at `acc[t · acc_stride + r]`, `R` floats per
    /// token; read first (a partial sum of earlier K blocks) when `load`, else start from 0.
    pub acc: *mut f32,
    pub acc_stride: usize,
    pub load: bool,
    /// Low-bit weights only: token 0's sums of each half block's values (2 per block, `2 ·
    /// nb_stride` per token), and how the weights' integers become values.
    #[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(dead_code))]
    pub hsum: *const i32,
    pub low_bit: LowBit,
}

/// The microkernel: `ntok` (1 ..= `Gemm::tokens`) tokens of a `TileArgs`.
///
/// # Safety
/// The CPU has the kernel's features; every pointer of `args` covers what it describes for
/// `args.blocks` blocks and `ntok` tokens, in the kernel's layout.
pub(crate) type TileFn = unsafe fn(&TileArgs, usize);

/// A GEMM kernel: its weight layout, its register tile and its microkernel.
pub struct Gemm {
    pub name: &'static str,
    pub layout: Layout,
    /// Tokens per register tile.
    pub tokens: usize,
    /// Row groups per register tile, at most.
    pub groups: usize,
    pub(crate) tile: TileFn,
}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm").field("name", &self.name).field("layout", &self.layout).finish()
    }
}

impl Gemm {
    /// The kernels this CPU can run, fastest first; the scalar one is always last.
    pub fn available() -> Vec<&'static Gemm> {
        #[cfg(target_arch = "x86_64")]
        let simd = x86::available();
        #[cfg(target_arch = "aarch64")]
        let simd = neon::available();
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        let simd = Vec::new();
        [simd, vec![&SCALAR]].concat()
    }

    /// The fastest available kernel, or the one named by `GEMMA_RS_KERNEL` when this CPU runs it;
    /// chosen once.
    pub fn best() -> &'static Gemm {
        static BEST: OnceLock<&'static Gemm> = OnceLock::new();
        BEST.get_or_init(|| super::choose(Gemm::available(), "GEMMA_RS_KERNEL", |k| k.name))
    }

    /// The available kernel called `name`.
    pub fn named(name: &str) -> Option<&'static Gemm> {
        Gemm::available().into_iter().find(|k| k.name == name)
    }
}

/// 64 bytes, 64-byte aligned: the unit of the values array.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

impl Line {
    fn bytes(lines: &[Line]) -> &[u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding.
        unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const u8, std::mem::size_of_val(lines)) }
    }

    fn bytes_mut(lines: &mut [Line]) -> &mut [u8] {
        // SAFETY: `Line` is 64 plain bytes with no padding, and any byte values are a valid
        // `Line`; the bytes borrow `lines` uniquely for their life.
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u8, std::mem::size_of_val(lines)) }
    }
}

/// A Q8_0 matrix `(rows, cols)` repacked for one `Gemm` kernel (see the module doc).
pub struct PackedQ8_0 {
    rows: usize,
    cols: usize,
    kernel: &'static Gemm,
    /// Per group, per block: `R × 32` values.
    vals: Vec<Line>,
    /// Per group, per block: `R` f16 scales.
    scales: Vec<u16>,
}

impl PackedQ8_0 {
    /// Repacks `blocks` (`rows × cols / 32` ggml blocks, row after row) for `Gemm::best()`.
    pub fn new(blocks: &[BlockQ8_0], rows: usize, cols: usize) -> PackedQ8_0 {
        PackedQ8_0::pack(Gemm::best(), blocks, rows, cols, None)
    }

    /// The same, row groups split between `threads` (packing is bound by memory bandwidth and
    /// first-touch page faults of the new copy).
    pub fn new_parallel(blocks: &[BlockQ8_0], rows: usize, cols: usize, threads: &Threads) -> PackedQ8_0 {
        PackedQ8_0::pack(Gemm::best(), blocks, rows, cols, Some(threads))
    }

    /// Repacks for the given kernel (one of `Gemm::available()`, the only way to get one, so
    /// this CPU runs it).
    pub fn for_kernel(kernel: &'static Gemm, blocks: &[BlockQ8_0], rows: usize, cols: usize) -> PackedQ8_0 {
        PackedQ8_0::pack(kernel, blocks, rows, cols, None)
    }

    fn pack(
        kernel: &'static Gemm,
        blocks: &[BlockQ8_0],
        rows: usize,
        cols: usize,
        threads: Option<&Threads>,
    ) -> PackedQ8_0 {
        let mut p = PackedQ8_0::zeroed_for(kernel, rows, cols);
        p.pack_rows(0, blocks, threads.unwrap_or(&Threads::new(1)));
        p
    }

    /// A `(rows, cols)` matrix of zeros laid out for `Gemm::best()`, to be filled by
    /// `pack_rows` (a slab at a time, as a model loads).
    pub fn zeroed(rows: usize, cols: usize) -> PackedQ8_0 {
        PackedQ8_0::zeroed_for(Gemm::best(), rows, cols)
    }

    fn zeroed_for(kernel: &'static Gemm, rows: usize, cols: usize) -> PackedQ8_0 {
        assert!(cols.is_multiple_of(QK8_0), "PackedQ8_0: {cols} columns is not a whole number of blocks");
        let (l, nb) = (kernel.layout, cols / QK8_0);
        let groups = rows.div_ceil(l.rows);
        // Zeroed by the allocator: fresh pages, each touched first by the thread packing it.
        let vals = vec![Line([0; 64]); groups * nb * l.rows * QK8_0 / 64];
        let scales = vec![0u16; groups * nb * l.rows];
        PackedQ8_0 { rows, cols, kernel, vals, scales }
    }

    /// Packs `blocks`, the ggml blocks of whole rows `first ..`, into their groups: `first` is a
    /// multiple of `group_rows()`, and so is the row count unless the rows reach the end.
    /// Groups are split between `threads` (packing is bound by memory bandwidth).
    pub fn pack_rows(&mut self, first: usize, blocks: &[BlockQ8_0], threads: &Threads) {
        let (l, nb) = (self.kernel.layout, self.blocks());
        let n = blocks.len().checked_div(nb).unwrap_or(0);
        assert!(
            blocks.len() == n * nb
                && first.is_multiple_of(l.rows)
                && (n.is_multiple_of(l.rows) || first + n == self.rows)
                && first + n <= self.rows,
            "pack_rows: {} blocks at row {first} of ({}, {})",
            blocks.len(),
            self.rows,
            self.cols
        );
        let group_bytes = nb * l.rows * QK8_0;
        let (g0, g1) = (first / l.rows, (first + n).div_ceil(l.rows));
        let vals = &mut Line::bytes_mut(&mut self.vals)[g0 * group_bytes..g1 * group_bytes];
        let scales = &mut self.scales[g0 * nb * l.rows..g1 * nb * l.rows];
        // Each thread packs its own consecutive groups into its own parts of both arrays.
        let ranges = threads.ranges(g1 - g0, 1, (g1 - g0) * group_bytes);
        let parts: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(split_rows(vals, group_bytes, &ranges))
            .zip(split_rows(scales, nb * l.rows, &ranges))
            .collect();
        threads.run(parts, |_, ((part, v), s)| {
            for (i, g) in part.enumerate() {
                let valid = (n - g * l.rows).min(l.rows);
                let (v, s) = (&mut v[i * group_bytes..][..group_bytes], &mut s[i * nb * l.rows..][..nb * l.rows]);
                let src = &blocks[g * l.rows * nb..(g * l.rows + valid) * nb];
                match l.interleave {
                    4 => pack_group::<4>(l, src, nb, v, s),
                    8 => pack_group::<8>(l, src, nb, v, s),
                    i => unreachable!("interleave {i}"),
                }
            }
        });
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The kernel this copy is laid out for (and that `gemm` runs).
    pub fn kernel(&self) -> &'static Gemm {
        self.kernel
    }

    /// Rows per group: row ranges given to `gemm` start (and end, but for the last) on a
    /// multiple of this.
    pub fn group_rows(&self) -> usize {
        self.kernel.layout.rows
    }

    /// Rows per register tile (a multiple of `group_rows`): threads given ranges on multiples
    /// of this run only full tiles, but the last.
    pub fn tile_rows(&self) -> usize {
        self.kernel.layout.rows * self.kernel.groups
    }

    /// Bytes held (34 per 32 weights, padding rows included).
    pub fn bytes(&self) -> usize {
        self.vals.len() * 64 + self.scales.len() * 2
    }

    /// Bytes a `(rows, cols)` matrix takes packed for `Gemm::best()` (34 per 32 weights, the
    /// last group's padding rows included): what `new` will allocate.
    pub fn bytes_for(rows: usize, cols: usize) -> usize {
        let r = Gemm::best().layout.rows;
        rows.div_ceil(r) * r * cols / QK8_0 * (QK8_0 + 2)
    }

    /// The index (row-major, in the unpacked matrix) of the first value of the first block
    /// whose f16 scale is NaN or infinite, if any (int8 values cannot be).
    pub fn first_non_finite(&self) -> Option<usize> {
        let bad = |d: &u16| d & 0x7C00 == 0x7C00;
        if !self.scales.iter().any(bad) {
            return None;
        }
        let (r, nb) = (self.kernel.layout.rows, self.blocks());
        // Scale `i` is of group `i / (nb · R)`, block `i / R % nb`, row `i % R` of the group.
        self.scales
            .iter()
            .enumerate()
            .filter(|(_, d)| bad(d))
            .map(|(i, _)| (i / (nb * r) * r + i % r) * self.cols + i / r % nb * QK8_0)
            .min()
    }

    fn blocks(&self) -> usize {
        self.cols / QK8_0
    }

    fn val_bytes(&self) -> &[u8] {
        Line::bytes(&self.vals)
    }

    /// `out = f16(d) · q` for every value of row `r`: the bits of `dequantize_row_q8_0` on the
    /// original blocks (the tied embedding gathers its rows from this copy).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() == self.cols,
            "dequantize_row: row {r} of {}, {} values",
            self.rows,
            out.len()
        );
        let l = self.kernel.layout;
        let (g, ri, nb) = (r / l.rows, r % l.rows, self.blocks());
        let bytes = self.val_bytes();
        fn row<const I: usize>(l: Layout, ri: usize, src: &[u8], d: f32, out: &mut [f32]) {
            for (c, o) in out.chunks_exact_mut(I).enumerate() {
                let v: &[u8; I] = src[(c * l.rows + ri) * I..][..I].try_into().expect("I bytes");
                for (o, &v) in o.iter_mut().zip(v) {
                    *o = d * (v ^ l.xor) as i8 as f32;
                }
            }
        }
        for (b, o) in out.chunks_exact_mut(QK8_0).enumerate() {
            let gb = g * nb + b;
            let d = f16_to_f32(self.scales[gb * l.rows + ri]);
            let src = &bytes[gb * l.rows * QK8_0..(gb + 1) * l.rows * QK8_0];
            match l.interleave {
                4 => row::<4>(l, ri, src, d, o),
                8 => row::<8>(l, ri, src, d, o),
                i => unreachable!("interleave {i}"),
            }
        }
    }

    /// Row `r` as ggml blocks again.
    pub fn row_blocks(&self, r: usize) -> Vec<BlockQ8_0> {
        assert!(r < self.rows, "row_blocks: row {r} of {}", self.rows);
        let l = self.kernel.layout;
        let (g, ri, nb) = (r / l.rows, r % l.rows, self.blocks());
        let bytes = self.val_bytes();
        (0..nb)
            .map(|b| {
                let gb = g * nb + b;
                let src = &bytes[gb * l.rows * QK8_0..(gb + 1) * l.rows * QK8_0];
                BlockQ8_0 {
                    d: self.scales[gb * l.rows + ri],
                    qs: std::array::from_fn(|k| (src[l.offset(ri, k)] ^ l.xor) as i8),
                }
            })
            .collect()
    }
}

/// One group: `src` holds its real rows (`nb` blocks each, fewer than `l.rows` in the last
/// group, whose other rows get zero weights and scales), `vals` and `scales` its part of the
/// arrays.
fn pack_group<const I: usize>(l: Layout, src: &[BlockQ8_0], nb: usize, vals: &mut [u8], scales: &mut [u16]) {
    let block_bytes = l.rows * QK8_0;
    let valid = src.len() / nb.max(1);
    // Block by block, so that each block's bytes are written together (the rows are read as
    // `R` streams).
    for (b, dst) in vals.chunks_exact_mut(block_bytes).take(nb).enumerate() {
        for ri in 0..l.rows {
            let (d, qs) = if ri < valid { (src[ri * nb + b].d, src[ri * nb + b].qs) } else { (0, [0; QK8_0]) };
            scales[b * l.rows + ri] = d;
            for (c, q) in qs.chunks_exact(I).enumerate() {
                let to: &mut [u8; I] = (&mut dst[(c * l.rows + ri) * I..][..I]).try_into().expect("I bytes");
                for (t, &q) in to.iter_mut().zip(q) {
                    *t = q as u8 ^ l.xor;
                }
            }
        }
    }
}

/// Activations `(n, cols)` quantized for `gemm`: per token `cols / 32` f32 scales, `cols` int8
/// values and `cols / 32` sums `-128 · Σq`. The buffers are kept and reused by the next
/// `quantize`.
#[derive(Default)]
pub struct QuantizedActs {
    n: usize,
    cols: usize,
    d: Vec<f32>,
    qs: Vec<i8>,
    bsum: Vec<i32>,
    /// `Σq` of each half block (16 values), for the low-bit kernels.
    hsum: Vec<i32>,
}

impl QuantizedActs {
    pub fn new() -> QuantizedActs {
        QuantizedActs::default()
    }

    /// Room for `values` activations (whole blocks), allocated now: quantizing up to that many
    /// allocates nothing.
    pub fn with_capacity(values: usize) -> QuantizedActs {
        let nb = values.div_ceil(QK8_0);
        QuantizedActs {
            n: 0,
            cols: 0,
            d: Vec::with_capacity(nb),
            qs: Vec::with_capacity(values),
            bsum: Vec::with_capacity(nb),
            hsum: Vec::with_capacity(2 * nb),
        }
    }

    /// Bytes `with_capacity(values)` allocates.
    pub fn bytes_for(values: usize) -> usize {
        values + values.div_ceil(QK8_0) * 16
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    fn resize(&mut self, n: usize, cols: usize) {
        assert!(cols.is_multiple_of(QK8_0), "QuantizedActs: {cols} columns is not a whole number of blocks");
        let nb = cols / QK8_0;
        (self.n, self.cols) = (n, cols);
        self.d.resize(n * nb, 0.0);
        self.qs.resize(n * cols, 0);
        self.bsum.resize(n * nb, 0);
        self.hsum.resize(2 * n * nb, 0);
    }

    /// The Euclidean norm of token `t`'s values as quantized (`Σ_b d_b² Σ q²`, in f64), the
    /// length every product with these activations sees.
    pub fn norm(&self, t: usize) -> f64 {
        let nb = self.cols / QK8_0;
        let qs = &self.qs[t * self.cols..(t + 1) * self.cols];
        let sq: f64 = qs
            .chunks_exact(QK8_0)
            .zip(&self.d[t * nb..(t + 1) * nb])
            .map(|(q, &d)| (d as f64).powi(2) * q.iter().map(|&v| (v as i32 * v as i32) as f64).sum::<f64>())
            .sum();
        sq.sqrt()
    }

    /// Quantizes `x` (`n` rows of `cols`) on this thread.
    pub fn quantize(&mut self, x: &[f32], n: usize, cols: usize) {
        self.quantize_parallel(x, n, cols, &Threads::new(1))
    }

    /// The same, tokens split between `threads`.
    pub fn quantize_parallel(&mut self, x: &[f32], n: usize, cols: usize, threads: &Threads) {
        assert!(x.len() >= n * cols, "QuantizedActs::quantize: {} floats for ({n}, {cols})", x.len());
        self.resize(n, cols);
        let nb = cols / QK8_0;
        let ranges = threads.ranges(n, 1, n * cols * 4);
        let parts: Vec<_> = ranges
            .iter()
            .cloned()
            .zip(split_rows(&mut self.d, nb, &ranges))
            .zip(split_rows(&mut self.qs, cols, &ranges))
            .zip(split_rows(&mut self.bsum, nb, &ranges))
            .zip(split_rows(&mut self.hsum, 2 * nb, &ranges))
            .collect();
        threads.run(parts, |_, ((((tokens, d), qs), bsum), hsum)| {
            for (i, t) in tokens.enumerate() {
                let qs = &mut qs[i * cols..(i + 1) * cols];
                quantize_token(
                    &x[t * cols..(t + 1) * cols],
                    &mut d[i * nb..(i + 1) * nb],
                    qs,
                    &mut bsum[i * nb..(i + 1) * nb],
                );
                for (h, q) in hsum[2 * i * nb..2 * (i + 1) * nb].iter_mut().zip(qs.chunks_exact(QK8_0 / 2)) {
                    *h = q.iter().map(|&v| v as i32).sum();
                }
            }
        });
    }
}

/// One token: `quantize_activations` and the block sums; a SIMD version with the same bits
/// where there is one.
fn quantize_token(x: &[f32], d: &mut [f32], qs: &mut [i8], bsum: &mut [i32]) {
    assert!(x.len() == qs.len() && x.len() == d.len() * QK8_0 && d.len() == bsum.len(), "quantize_token: lengths");
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::cpu::features().avx2_fma {
        // SAFETY: the CPU has AVX2 and FMA; lengths checked.
        return unsafe { x86::quantize_token(x, d, qs, bsum) };
    }
    #[cfg(target_arch = "aarch64")]
    if crate::kernels::cpu::features().neon {
        // SAFETY: the CPU has NEON; lengths checked.
        return unsafe { neon::quantize_token(x, d, qs, bsum) };
    }
    quantize_token_portable(x, d, qs, bsum)
}

fn quantize_token_portable(x: &[f32], d: &mut [f32], qs: &mut [i8], bsum: &mut [i32]) {
    quantize_activations(x, d, qs);
    for (s, q) in bsum.iter_mut().zip(qs.chunks_exact(QK8_0)) {
        *s = -128 * q.iter().map(|&v| v as i32).sum::<i32>();
    }
}

/// Weight bytes of a tile's groups over one K chunk, kept in L1/L2 while token tiles pass over
/// them (64 KiB: Gemma's K ≤ 2048 takes one chunk; smaller chunks measured slower).
const L1_WEIGHT_BYTES: usize = 64 << 10;
/// Activation bytes of a token chunk kept in L2 while the row groups pass over it.
const L2_ACT_BYTES: usize = 1 << 20;

/// Packed weights the GEMM driver runs: [`PackedQ8_0`] and [`PackedLowBit`].
pub trait Packed: Sync {
    /// The pointers and strides the driver walks (private to the kernels).
    #[doc(hidden)]
    fn operand(&self) -> Operand;

    fn rows(&self) -> usize;

    fn cols(&self) -> usize;

    /// Rows per register tile: threads given ranges on multiples of this read disjoint weights
    /// and run only full tiles, but the last.
    fn tile_rows(&self) -> usize;
}

/// What the driver needs of packed weights: the kernel's tile, the groups' geometry and the two
/// arrays, by K block.
#[doc(hidden)]
pub struct Operand {
    tile: TileFn,
    tokens: usize,
    groups: usize,
    group_rows: usize,
    rows: usize,
    cols: usize,
    vals: *const u8,
    /// Bytes of values of one group per K block.
    block_bytes: usize,
    scales: *const u16,
    /// u16 of scales of one group per K block.
    block_scales: usize,
    low_bit: LowBit,
}

impl Packed for PackedQ8_0 {
    fn operand(&self) -> Operand {
        let (k, l) = (self.kernel, self.kernel.layout);
        Operand {
            tile: k.tile,
            tokens: k.tokens,
            groups: k.groups,
            group_rows: l.rows,
            rows: self.rows,
            cols: self.cols,
            vals: self.vals.as_ptr() as *const u8,
            block_bytes: l.rows * QK8_0,
            scales: self.scales.as_ptr(),
            block_scales: l.rows,
            low_bit: LowBit::default(),
        }
    }

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn tile_rows(&self) -> usize {
        PackedQ8_0::tile_rows(self)
    }
}

/// `out[t · stride + (r - rows.start)] = Σ_k w[r][k] · x[t][k]` for `r` in `rows`, `t < n`, on
/// this thread (see `gemm_into` for the ranges). `out` holds
/// `(n - 1) · stride + rows.len()` floats (`stride ≥ rows.len()`).
pub fn gemm(out: &mut [f32], stride: usize, acts: &QuantizedActs, w: &impl Packed, rows: Range<usize>) {
    let n = acts.n;
    assert!(stride >= rows.len() && (n == 0 || out.len() >= (n - 1) * stride + rows.len()), "gemm: output size");
    drive(acts, &w.operand(), rows, |t, at, sums| out[t * stride + at..][..sums.len()].copy_from_slice(sums));
}

/// `out (n, w.rows())` for all rows, split between `threads` on whole register tiles of groups
/// (the last part takes any odd group): each thread writes its own columns of the output
/// (`split_columns`) and streams its own weights.
pub fn gemm_parallel(out: &mut [f32], acts: &QuantizedActs, w: &impl Packed, threads: &Threads) {
    let (n, m, tile) = (acts.n, w.rows(), w.tile_rows());
    assert!(out.len() >= n * m, "gemm_parallel: output size");
    let rows: Vec<Range<usize>> = threads
        .ranges(m.div_ceil(tile), 1, n * m * w.cols())
        .into_iter()
        .map(|tiles| tiles.start * tile..(tiles.end * tile).min(m))
        .collect();
    let parts = split_columns(&mut out[..n * m], m, &rows);
    let op = w.operand();
    threads.run(rows.into_iter().zip(parts).collect(), |_, (rows, mut out): (Range<usize>, ColumnsMut<'_, f32>)| {
        drive(acts, &op, rows, |t, at, sums| out.row(t)[at..][..sums.len()].copy_from_slice(sums))
    });
}

/// The products of `rows` on this thread, handed to `put(t, r - rows.start, sums)` a token and
/// a tile of rows at a time (`sums` for rows `r ..`). Any range works; threads given ranges on
/// whole groups (better: on whole register tiles, `w.tile_rows()`) read disjoint weights.
pub fn gemm_into(acts: &QuantizedActs, w: &impl Packed, rows: Range<usize>, put: impl FnMut(usize, usize, &[f32])) {
    drive(acts, &w.operand(), rows, put)
}

// SAFETY: the pointers of an `Operand` are shared reads of weights that outlive its use (it
// is made from a borrowed `Packed` and used within that borrow).
unsafe impl Sync for Operand {}

/// The driver of `gemm` and `gemm_into`.
fn drive(acts: &QuantizedActs, w: &Operand, rows: Range<usize>, mut put: impl FnMut(usize, usize, &[f32])) {
    let r_g = w.group_rows;
    let (n, nb) = (acts.n, w.cols / QK8_0);
    assert_eq!(acts.cols, w.cols, "gemm: activations have {} columns, weights {}", acts.cols, w.cols);
    assert!(rows.start <= rows.end && rows.end <= w.rows, "gemm: rows {rows:?} of {}", w.rows);
    if n == 0 || rows.is_empty() || nb == 0 {
        return;
    }
    let block_bytes = w.block_bytes;
    // K chunks of at most `L1_WEIGHT_BYTES` of a tile's groups, of equal size.
    let kchunks = (nb * block_bytes * w.groups).div_ceil(L1_WEIGHT_BYTES).max(1);
    let kc = nb.div_ceil(kchunks);
    // Token chunks whose activations stay in L2, a whole number of tiles.
    let tok_bytes = w.cols + 16 * nb;
    let nc = (L2_ACT_BYTES / tok_bytes).max(w.tokens) / w.tokens * w.tokens;
    let nc = nc.min(n.div_ceil(w.tokens) * w.tokens);
    let gmax = w.groups;
    // The accumulators: with one K chunk, one register tile's, copied out while in L1; with
    // several, the token chunk's partial sums, kept between K chunks.
    let slots = if kc == nb { w.tokens } else { nc };
    let mut scratch = vec![0f32; slots * gmax * r_g];
    let (g0, g1) = (rows.start / r_g, rows.end.div_ceil(r_g));
    for c0 in (0..n).step_by(nc) {
        let c1 = (c0 + nc).min(n);
        for g in (g0..g1).step_by(gmax) {
            let groups = gmax.min(g1 - g);
            let r0 = g * r_g;
            let valid = (rows.end - r0).min(groups * r_g);
            let acc_stride = groups * r_g;
            for kb0 in (0..nb).step_by(kc) {
                let blocks = kc.min(nb - kb0);
                let gb = g * nb + kb0;
                for t0 in (c0..c1).step_by(w.tokens) {
                    let ntok = w.tokens.min(c1 - t0);
                    let slot = if kc == nb { 0 } else { t0 - c0 };
                    let args = TileArgs {
                        // SAFETY (all pointers): groups g.., blocks kb0.., tokens t0.. are
                        // inside the weights and activations (shapes checked above); slots
                        // `slot .. slot + ntok` are inside the scratch.
                        vals: unsafe { w.vals.add(gb * block_bytes) },
                        scales: unsafe { w.scales.add(gb * w.block_scales) },
                        blocks,
                        groups,
                        group_vals: nb * block_bytes,
                        group_scales: nb * w.block_scales,
                        qs: unsafe { acts.qs.as_ptr().add(t0 * w.cols + kb0 * QK8_0) },
                        d: unsafe { acts.d.as_ptr().add(t0 * nb + kb0) },
                        bsum: unsafe { acts.bsum.as_ptr().add(t0 * nb + kb0) },
                        qs_stride: w.cols,
                        nb_stride: nb,
                        acc: unsafe { scratch.as_mut_ptr().add(slot * acc_stride) },
                        acc_stride,
                        load: kb0 > 0,
                        hsum: unsafe { acts.hsum.as_ptr().add(2 * (t0 * nb + kb0)) },
                        low_bit: w.low_bit,
                    };
                    // SAFETY: `w.tile` is the kernel the weights were packed for, from the
                    // available ones; the pointers cover `groups` groups, `blocks` blocks and
                    // `ntok` tokens, and `ntok` slots of `groups · R` floats of the scratch.
                    unsafe { (w.tile)(&args, ntok) };
                    if kb0 + blocks == nb {
                        // The first group may begin before `rows.start`: its rows above are
                        // computed and dropped.
                        let skip = rows.start.saturating_sub(r0);
                        for t in 0..ntok {
                            let sums = &scratch[(slot + t) * acc_stride..][skip..valid];
                            put(t0 + t, r0 + skip - rows.start, sums);
                        }
                    }
                }
            }
        }
    }
}

/// The portable kernel: layout R = 4, I = 4; `mul_add` is an FMA instruction where the target
/// has one and a correctly rounded library call elsewhere, so the bits are those of every SIMD
/// kernel.
pub static SCALAR: Gemm =
    Gemm { name: "scalar", layout: Layout { rows: 4, interleave: 4, xor: 0 }, tokens: 4, groups: 1, tile: scalar_tile };

/// # Safety
/// As `TileFn`.
unsafe fn scalar_tile(a: &TileArgs, ntok: usize) {
    const R: usize = 4;
    debug_assert_eq!(a.groups, 1);
    for t in 0..ntok {
        // SAFETY: the pointers cover `a.blocks` blocks and `ntok` tokens (`TileFn` contract).
        unsafe {
            let acc = a.acc.add(t * a.acc_stride);
            let mut sums = [0f32; R];
            if a.load {
                sums.copy_from_slice(std::slice::from_raw_parts(acc, R));
            }
            for b in 0..a.blocks {
                let x = std::slice::from_raw_parts(a.qs.add(t * a.qs_stride + b * QK8_0), QK8_0);
                let dx = *a.d.add(t * a.nb_stride + b);
                let w = std::slice::from_raw_parts(a.vals.add(b * R * QK8_0), R * QK8_0);
                for (r, s) in sums.iter_mut().enumerate() {
                    let mut isum = 0i32;
                    for k in 0..QK8_0 {
                        isum += w[SCALAR.layout.offset(r, k)] as i8 as i32 * x[k] as i32;
                    }
                    let dw = f16_to_f32(*a.scales.add(b * R + r));
                    *s = (isum as f32).mul_add(dw * dx, *s);
                }
            }
            std::ptr::copy_nonoverlapping(sums.as_ptr(), acc, R);
        }
    }
}

#[cfg(test)]
mod tests;
