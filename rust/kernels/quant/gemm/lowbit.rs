//! GGUF's low-bit types (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) kept in their bits and
//! multiplied natively, on the driver, the row groups and the activations of the Q8_0 GEMM.
//!
//! # Layout
//! [`PackedLowBit`] holds a matrix in groups of `R` rows (the kernel's), per 32-value block
//! (the [`Sub`] of `ggml::sub_blocks`) the block's unsigned integers `q` in planes, then its
//! scales:
//! - the low 4 bits: `16 R` bytes. Byte `v` of the Q8_0 layout's block (value `k` of row `r` at
//!   `((k / I) R + r) I + k % I`) is, for `v < 16 R` (values 0..16), the low nibble of byte `v`,
//!   and for `v ≥ 16 R` the high nibble of byte `v − 16 R`: one AND or one shift turns a vector of
//!   the plane into a vector of the Q8_0 layout.
//! - the bits above (Q5_*: 1, Q6_K: 2): `4 R · hi_bits` bytes. Let `c = v / 4R` (which eighth of
//!   the block) and `j = v % 4R`: one bit is bit `c` of byte `j`; two bits are bits `2 (c % 4)`
//!   and up of byte `4R (c / 4) + j`, so a shift and an AND put them at bit 4 of line `c`.
//! - scales: `R` per block (`2R` for Q6_K's halves) `ws`, then `R` biases `wb` for types with a
//!   min; f16 as stored for Q4_0..Q5_1, f32 (the exact products `d · sc`) for the K-quants.
//!
//! Bytes per 32 values: Q4_0 18, Q4_1 20, Q5_0 22, Q5_1 24 (as stored), Q4_K 24 and Q5_K 28
//! (144 and 176 per 256 stored), Q6_K 32 (210 per 256): the K-quants' scales are unpacked to f32
//! so that no kernel multiplies them out per block.
//!
//! # Numerics
//! With the activations' values `x`, scale `dx` and half sums `h0, h1` (`QuantizedActs`), the
//! integer sums `i0, i1` of each half block (`Σ q · x`, exact), and `o` the type's offset, every
//! kernel computes, block after block from `acc = 0`:
//! ```text
//! split (Q6_K): acc = fma(f32(i0 − o·h0), ws0 · dx, acc); acc = fma(f32(i1 − o·h1), ws1 · dx, acc)
//! else:         acc = fma(f32(i0 + i1 − o·(h0 + h1)), ws · dx, acc)
//! with a min:   acc = fma(wb, dx · f32(h0 + h1), acc)
//! ```
//! the same float operations in the same order on every kernel, tile and batch: the same bits.
//!
//! Kernels: `avx512vnni`, `avxvnni`, `avx2` (lowbit_x86.rs: the planes unpacked in registers),
//! `neon-dotprod`, `neon` (lowbit_neon.rs: a block unpacked to the Q8_0 layout on the stack, then
//! the Q8_0 lines) and `scalar`; the one whose name `Gemm::best()` has, else the fastest.

use super::{Gemm, Layout, Line, Operand, Packed, TileArgs};
use crate::kernels::half::{f16_to_f32, f32_to_f16};
use crate::kernels::quant::ggml::{sub_blocks, GgmlType, LowBit, Sub};
use crate::kernels::quant::QK8_0;
use crate::kernels::threads::{split_rows, Threads};
use std::sync::OnceLock;

#[cfg_attr(not(any(target_arch = "x86_64", target_arch = "aarch64")), allow(unused_macros))]
/// Calls `$body::<HB, SPLIT, T>` for the tile's type and token count.
macro_rules! by_type {
    ($body:ident, $a:expr, $ntok:expr, $($t:literal)*) => {
        match ($a.low_bit.hi_bits, $a.low_bit.split, $ntok) {
            $((0, false, $t) => $body::<0, false, $t>($a),)*
            $((1, false, $t) => $body::<1, false, $t>($a),)*
            $((2, false, $t) => $body::<2, false, $t>($a),)*
            $((2, true, $t) => $body::<2, true, $t>($a),)*
            (h, s, n) => unreachable!("low-bit tile: {h} high bits, split {s}, {n} tokens"),
        }
    };
}

#[cfg(target_arch = "aarch64")]
#[path = "lowbit_neon.rs"]
mod neon;
#[cfg(target_arch = "x86_64")]
#[path = "lowbit_x86.rs"]
mod x86;

/// The low-bit kernels this CPU runs, fastest first; the scalar one last.
pub fn available() -> Vec<&'static Gemm> {
    let mut v = simd();
    v.push(&SCALAR);
    v
}

#[cfg(target_arch = "aarch64")]
use neon::available as simd;
#[cfg(target_arch = "x86_64")]
use x86::available as simd;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn simd() -> Vec<&'static Gemm> {
    Vec::new()
}

/// The low-bit kernel named as `Gemm::best()` (so `GEMMA_RS_KERNEL` picks both), else the
/// fastest available.
pub fn best() -> &'static Gemm {
    static BEST: OnceLock<&'static Gemm> = OnceLock::new();
    BEST.get_or_init(|| {
        let all = available();
        all.iter().copied().find(|k| k.name == Gemm::best().name).unwrap_or(all[0])
    })
}

/// The byte geometry of a type's blocks for a kernel's `R` rows.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    r: usize,
    lb: LowBit,
}

impl Geometry {
    /// Value bytes per group and block.
    fn block_bytes(self) -> usize {
        self.r * (16 + 4 * self.lb.hi_bits as usize)
    }

    /// Scales per row and block (`ws` and `wb`).
    fn scales_per_row(self) -> usize {
        1 + self.lb.split as usize + self.lb.min as usize
    }

    /// u16 of scales per group and block.
    fn block_scales(self) -> usize {
        self.r * self.scales_per_row() * if self.lb.f16 { 1 } else { 2 }
    }
}

/// A low-bit matrix `(rows, cols)` packed for one kernel (see the module doc).
pub struct PackedLowBit {
    rows: usize,
    cols: usize,
    lb: LowBit,
    /// The GGUF type the blocks came from; None for a matrix made from sub-blocks.
    ty: Option<GgmlType>,
    kernel: &'static Gemm,
    vals: Vec<Line>,
    /// Per group, per block: `block_scales` u16 (f32 as two, little-endian); u32 storage keeps
    /// every f32 aligned.
    scales: Vec<u32>,
}

impl PackedLowBit {
    /// A `(rows, cols)` matrix of type `ty` of zeros for `best()`, to be filled by `pack_rows`.
    /// Panics if `ty` has no low-bit view or `cols` is not whole blocks of it.
    pub fn zeroed(ty: GgmlType, rows: usize, cols: usize) -> PackedLowBit {
        PackedLowBit::zeroed_for(best(), ty, rows, cols)
    }

    /// The same for the given kernel (one of `available()`).
    pub fn zeroed_for(kernel: &'static Gemm, ty: GgmlType, rows: usize, cols: usize) -> PackedLowBit {
        let lb = ty.low_bit().unwrap_or_else(|| panic!("PackedLowBit: {} is not a low-bit type", ty.name()));
        assert!(ty.row_bytes(cols).is_some(), "PackedLowBit: {cols} columns is not whole {} blocks", ty.name());
        PackedLowBit::zeroed_as(kernel, lb, Some(ty), rows, cols)
    }

    fn zeroed_as(kernel: &'static Gemm, lb: LowBit, ty: Option<GgmlType>, rows: usize, cols: usize) -> PackedLowBit {
        assert!(cols.is_multiple_of(QK8_0), "PackedLowBit: {cols} columns is not whole blocks");
        let g = Geometry { r: kernel.layout.rows, lb };
        let (groups, nb) = (rows.div_ceil(g.r), cols / QK8_0);
        let vals = vec![Line([0; 64]); (groups * nb * g.block_bytes()).div_ceil(64)];
        let scales = vec![0u32; (groups * nb * g.block_scales()).div_ceil(2)];
        PackedLowBit { rows, cols, lb, ty, kernel, vals, scales }
    }

    /// `bytes` (whole rows of `ty` as stored in GGUF) packed for `best()`.
    pub fn new(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> PackedLowBit {
        PackedLowBit::for_kernel(best(), ty, bytes, rows, cols)
    }

    /// The same for the given kernel.
    pub fn for_kernel(kernel: &'static Gemm, ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> PackedLowBit {
        let mut p = PackedLowBit::zeroed_for(kernel, ty, rows, cols);
        p.pack_rows(0, bytes, &Threads::new(1));
        p
    }

    /// A `(rows, cols)` matrix of integers read as `lb` says, for `best()`: `fill(r, subs)`
    /// writes row `r`'s `cols / 32` sub-blocks. Groups are split between `threads`.
    pub fn from_subs(
        lb: LowBit,
        rows: usize,
        cols: usize,
        threads: &Threads,
        fill: impl Fn(usize, &mut [Sub]) + Sync,
    ) -> PackedLowBit {
        let mut p = PackedLowBit::zeroed_as(best(), lb, None, rows, cols);
        p.fill_groups(0, rows, threads, |r, subs| fill(r, subs));
        p
    }

    fn geometry(&self) -> Geometry {
        Geometry { r: self.kernel.layout.rows, lb: self.lb }
    }

    /// Packs `bytes`, the stored blocks of whole rows `first ..`: `first` is a multiple of
    /// `group_rows()`, and so is the row count unless the rows reach the end. Groups are split
    /// between `threads`.
    pub fn pack_rows(&mut self, first: usize, bytes: &[u8], threads: &Threads) {
        let ty = self.ty.expect("pack_rows: a matrix of GGUF blocks");
        let row_bytes = ty.row_bytes(self.cols).expect("whole blocks");
        let n = bytes.len().checked_div(row_bytes).unwrap_or(0);
        assert!(
            bytes.len() == n * row_bytes,
            "pack_rows: {} bytes is not whole {} rows of {} columns",
            bytes.len(),
            ty.name(),
            self.cols
        );
        self.fill_groups(first, n, threads, |r, subs| {
            sub_blocks(ty, &bytes[(r - first) * row_bytes..][..row_bytes], subs)
        });
    }

    /// Packs rows `first .. first + n` (`first` on a group boundary, `n` whole groups unless
    /// the rows reach the end), each row's sub-blocks written by `fill(r, subs)`.
    fn fill_groups(&mut self, first: usize, n: usize, threads: &Threads, fill: impl Fn(usize, &mut [Sub]) + Sync) {
        let g = self.geometry();
        assert!(
            first.is_multiple_of(g.r) && (n.is_multiple_of(g.r) || first + n == self.rows) && first + n <= self.rows,
            "pack: {n} rows at row {first} of ({}, {})",
            self.rows,
            self.cols
        );
        let nb = self.cols / QK8_0;
        let (gv, gs) = (nb * g.block_bytes(), nb * g.block_scales());
        let (g0, g1) = (first / g.r, (first + n).div_ceil(g.r));
        let vals = &mut Line::bytes_mut(&mut self.vals)[g0 * gv..g1 * gv];
        let scales = &mut u16s_mut(&mut self.scales)[g0 * gs..g1 * gs];
        let ranges = threads.ranges(g1 - g0, 1, (g1 - g0) * gv);
        let parts: Vec<_> =
            ranges.iter().cloned().zip(split_rows(vals, gv, &ranges)).zip(split_rows(scales, gs, &ranges)).collect();
        let layout = self.kernel.layout;
        threads.run(parts, |_, ((part, v), s)| {
            let mut subs = vec![Sub::default(); g.r * nb];
            for (i, grp) in part.enumerate() {
                subs.fill(Sub::default());
                let row0 = first + grp * g.r;
                for (ri, row) in subs.chunks_exact_mut(nb).enumerate().take((first + n - row0).min(g.r)) {
                    fill(row0 + ri, row);
                }
                pack_group(layout, g, &subs, nb, &mut v[i * gv..][..gv], &mut s[i * gs..][..gs]);
            }
        });
    }

    /// The GGUF type the blocks came from (None for a matrix made `from_subs`).
    pub fn ty(&self) -> Option<GgmlType> {
        self.ty
    }

    /// The kernel this copy is laid out for.
    pub fn kernel(&self) -> &'static Gemm {
        self.kernel
    }

    /// Rows per group (row ranges given to `gemm` start on a multiple of this).
    pub fn group_rows(&self) -> usize {
        self.kernel.layout.rows
    }

    /// Bytes held, padding rows included.
    pub fn bytes(&self) -> usize {
        self.vals.len() * 64 + self.scales.len() * 4
    }

    /// Bytes a `(rows, cols)` matrix of `ty` takes packed for `best()`.
    pub fn bytes_for(ty: GgmlType, rows: usize, cols: usize) -> usize {
        PackedLowBit::bytes_for_low_bit(ty.low_bit().expect("a low-bit type"), rows, cols)
    }

    /// Bytes a `(rows, cols)` matrix read as `lb` takes packed for `best()`.
    pub fn bytes_for_low_bit(lb: LowBit, rows: usize, cols: usize) -> usize {
        let g = Geometry { r: best().layout.rows, lb };
        let (groups, nb) = (rows.div_ceil(g.r), cols / QK8_0);
        (groups * nb * g.block_bytes()).div_ceil(64) * 64 + (groups * nb * g.block_scales()).div_ceil(2) * 4
    }

    /// The index (row-major) of the first value of the first block with a NaN or infinite
    /// scale or bias, if any (the integers cannot be).
    pub fn first_non_finite(&self) -> Option<usize> {
        (0..self.rows).find_map(|r| {
            let s = self.row_subs(r);
            s.iter()
                .position(|s| !(s.ws[0].is_finite() && s.ws[1].is_finite() && s.wb.is_finite()))
                .map(|b| r * self.cols + b * QK8_0)
        })
    }

    /// Row `r`'s sub-blocks back from the planes.
    fn row_subs(&self, r: usize) -> Vec<Sub> {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let g = self.geometry();
        let nb = self.cols / QK8_0;
        let (grp, ri) = (r / g.r, r % g.r);
        let vals = Line::bytes(&self.vals);
        let scales = u16s(&self.scales);
        (0..nb)
            .map(|b| {
                let gb = grp * nb + b;
                let v = &vals[gb * g.block_bytes()..][..g.block_bytes()];
                let s = &scales[gb * g.block_scales()..][..g.block_scales()];
                let scale = |i: usize| scale_at(s, g, i * g.r + ri);
                let ws0 = scale(0);
                let ws = [ws0, if g.lb.split { scale(1) } else { ws0 }];
                let wb = if g.lb.min { scale(1 + g.lb.split as usize) } else { 0.0 };
                Sub { q: std::array::from_fn(|k| value(self.kernel.layout, g, v, ri, k)), ws, wb }
            })
            .collect()
    }

    /// Row `r` widened to f32: the bits of `ggml::dequantize` on the stored blocks.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "dequantize_row: {} values for {} columns", out.len(), self.cols);
        let lb = self.geometry().lb;
        for (s, y) in self.row_subs(r).iter().zip(out.chunks_exact_mut(QK8_0)) {
            s.dequantize(lb, y);
        }
    }
}

impl Packed for PackedLowBit {
    fn operand(&self) -> Operand {
        let (k, g) = (self.kernel, self.geometry());
        Operand {
            tile: k.tile,
            tokens: k.tokens,
            groups: k.groups,
            group_rows: g.r,
            rows: self.rows,
            cols: self.cols,
            vals: self.vals.as_ptr() as *const u8,
            block_bytes: g.block_bytes(),
            scales: self.scales.as_ptr() as *const u16,
            block_scales: g.block_scales(),
            low_bit: g.lb,
        }
    }

    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn tile_rows(&self) -> usize {
        self.kernel.layout.rows * self.kernel.groups
    }
}

fn u16s(v: &[u32]) -> &[u16] {
    // SAFETY: u32 storage read as twice as many u16; any bits are valid.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u16, v.len() * 2) }
}

fn u16s_mut(v: &mut [u32]) -> &mut [u16] {
    // SAFETY: as `u16s`, borrowing `v` uniquely.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u16, v.len() * 2) }
}

/// Scale `i` (`ws` of row `r` at `r`, `ws1` at `R + r`, ...) of a block's scales.
fn scale_at(s: &[u16], g: Geometry, i: usize) -> f32 {
    if g.lb.f16 {
        f16_to_f32(s[i])
    } else {
        f32::from_bits(s[2 * i] as u32 | (s[2 * i + 1] as u32) << 16)
    }
}

/// Where the bits of byte `v` of the Q8_0 layout's block are: (low plane byte, its shift) and
/// (high plane byte, its shift).
#[inline(always)]
fn planes(g: Geometry, v: usize) -> ((usize, u32), (usize, u32)) {
    let (quarter, c, j) = (16 * g.r, v / (4 * g.r), v % (4 * g.r));
    let lo = if v < quarter { (v, 0) } else { (v - quarter, 4) };
    let hi = match g.lb.hi_bits {
        1 => (16 * g.r + j, c as u32),
        _ => (16 * g.r + 4 * g.r * (c / 4) + j, 2 * (c % 4) as u32),
    };
    (lo, hi)
}

/// The integer of value `k` of row `r` in a block's planes `v`.
#[inline(always)]
fn value(l: Layout, g: Geometry, v: &[u8], r: usize, k: usize) -> u8 {
    let ((lo, ls), (hi, hs)) = planes(g, l.offset(r, k));
    let mask = (1u8 << g.lb.hi_bits) - 1;
    let high = if g.lb.hi_bits == 0 { 0 } else { (v[hi] >> hs) & mask };
    ((v[lo] >> ls) & 0xF) | high << 4
}

/// One group: `subs` holds its rows' sub-blocks (`nb` each, zeros for missing rows).
fn pack_group(l: Layout, g: Geometry, subs: &[Sub], nb: usize, vals: &mut [u8], scales: &mut [u16]) {
    let mask = (1u8 << g.lb.hi_bits) - 1;
    for b in 0..nb {
        let v = &mut vals[b * g.block_bytes()..][..g.block_bytes()];
        let s = &mut scales[b * g.block_scales()..][..g.block_scales()];
        for ri in 0..g.r {
            let sub = &subs[ri * nb + b];
            for (k, &q) in sub.q.iter().enumerate() {
                let ((lo, ls), (hi, hs)) = planes(g, l.offset(ri, k));
                v[lo] |= (q & 0xF) << ls;
                if g.lb.hi_bits > 0 {
                    v[hi] |= ((q >> 4) & mask) << hs;
                }
            }
            let mut put = |i: usize, x: f32| {
                if g.lb.f16 {
                    s[i] = f32_to_f16(x);
                } else {
                    (s[2 * i], s[2 * i + 1]) = (x.to_bits() as u16, (x.to_bits() >> 16) as u16);
                }
            };
            put(ri, sub.ws[0]);
            if g.lb.split {
                put(g.r + ri, sub.ws[1]);
            }
            if g.lb.min {
                put((1 + g.lb.split as usize) * g.r + ri, sub.wb);
            }
        }
    }
}

/// The portable kernel: R = 4, I = 4, the module doc's formula as written.
pub static SCALAR: Gemm =
    Gemm { name: "scalar", layout: Layout { rows: 4, interleave: 4, xor: 0 }, tokens: 4, groups: 1, tile: scalar_tile };

/// # Safety
/// As `TileFn`.
unsafe fn scalar_tile(a: &TileArgs, ntok: usize) {
    let g = Geometry { r: 4, lb: a.low_bit };
    let (bb, bs) = (g.block_bytes(), g.block_scales());
    for t in 0..ntok {
        // SAFETY: the pointers cover `a.blocks` blocks and `ntok` tokens (`TileFn` contract).
        unsafe {
            let acc = a.acc.add(t * a.acc_stride);
            let mut sums = [0f32; 4];
            if a.load {
                sums.copy_from_slice(std::slice::from_raw_parts(acc, 4));
            }
            for b in 0..a.blocks {
                let x = std::slice::from_raw_parts(a.qs.add(t * a.qs_stride + b * QK8_0), QK8_0);
                let dx = *a.d.add(t * a.nb_stride + b);
                let (h0, h1) = (*a.hsum.add(2 * (t * a.nb_stride + b)), *a.hsum.add(2 * (t * a.nb_stride + b) + 1));
                let v = std::slice::from_raw_parts(a.vals.add(b * bb), bb);
                let s = std::slice::from_raw_parts(a.scales.add(b * bs), bs);
                for (r, acc) in sums.iter_mut().enumerate() {
                    let mut i = [0i32; 2];
                    for (k, &x) in x.iter().enumerate() {
                        i[k / 16] += value(SCALAR.layout, g, v, r, k) as i32 * x as i32;
                    }
                    let (o, ws0) = (a.low_bit.offset, scale_at(s, g, r));
                    if g.lb.split {
                        *acc = ((i[0] - o * h0) as f32).mul_add(ws0 * dx, *acc);
                        *acc = ((i[1] - o * h1) as f32).mul_add(scale_at(s, g, 4 + r) * dx, *acc);
                    } else {
                        *acc = ((i[0] + i[1] - o * (h0 + h1)) as f32).mul_add(ws0 * dx, *acc);
                    }
                    if g.lb.min {
                        let wb = scale_at(s, g, (1 + g.lb.split as usize) * 4 + r);
                        *acc = wb.mul_add(dx * (h0 + h1) as f32, *acc);
                    }
                }
            }
            std::ptr::copy_nonoverlapping(sums.as_ptr(), acc, 4);
        }
    }
}

#[cfg(test)]
#[path = "lowbit_tests.rs"]
mod tests;
