//! ggml's tensor types and their exact dequantization: the reader of GGUF tensor data.
//!
//! Block layouts follow ggml-common.h (`block_q4_0`, ..., `block_q6_K`), the arithmetic follows
//! the reference `dequantize_row_*` functions of ggml-quants.c. Every value is computed with the
//! same f32 operations in the same order as gguf-py's numpy `gguf.quants.dequantize`, which
//! produced this project's reference weights, so both give the same bits. ggml's C code writes
//! the same expressions, but a C compiler may fuse `a * b + c` into one FMA (clang by default, gcc
//! with FMA enabled), which rounds once instead of twice: Q4_1, Q5_1 and the K-quants with a min
//! (Q4_K, Q5_K) can then differ from this module (and from gguf-py) in the last bit. Rust never
//! fuses implicitly, so the two roundings here are deliberate.

use crate::kernels::half::{bf16_to_f32, f16_to_f32};

/// Values per K-quant super-block (ggml-common.h `QK_K`).
const QK_K: usize = 256;

/// ggml's tensor types (ggml.h `enum ggml_type`) that this crate reads.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    BF16,
}

impl GgmlType {
    /// Every type, in `ggml_type` order.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ];

    /// From the u32 stored in a GGUF tensor info (F32=0, F16=1, Q4_0=2, Q4_1=3, Q5_0=6, Q5_1=7,
    /// Q8_0=8, Q4_K=12, Q5_K=13, Q6_K=14, BF16=30); None for any other value.
    pub fn from_u32(v: u32) -> Option<GgmlType> {
        GgmlType::ALL.into_iter().find(|t| t.to_u32() == v)
    }

    pub fn to_u32(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name, e.g. "Q4_K", "F32", "BF16".
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }

    /// Values per block (1 for F32/F16/BF16, 32 for Q4_0..Q8_0, 256 for K-quants).
    pub fn block_values(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => QK_K,
        }
    }

    /// Bytes per block (ggml's `type_size`), the sizes of ggml-common.h's block structs.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,                // d, qs[16]
            GgmlType::Q4_1 => 2 + 2 + 16,            // d, m, qs[16]
            GgmlType::Q5_0 => 2 + 4 + 16,            // d, qh[4], qs[16]
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,        // d, m, qh[4], qs[16]
            GgmlType::Q8_0 => 2 + 32,                // d, qs[32]
            GgmlType::Q4_K => 2 + 2 + 12 + 128,      // d, dmin, scales[12], qs[128]
            GgmlType::Q5_K => 2 + 2 + 12 + 32 + 128, // d, dmin, scales[12], qh[32], qs[128]
            GgmlType::Q6_K => 128 + 64 + 16 + 2,     // ql[128], qh[64], scales[16], d
        }
    }

    /// Bytes of a row of `n` values, None if `n` is not a whole number of blocks or overflows.
    pub fn row_bytes(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_values()) {
            return None;
        }
        (n / self.block_values()).checked_mul(self.block_bytes())
    }
}

/// The ggml name of any `ggml_type` id (ggml.h), for error messages; None if unknown.
pub fn type_name(v: u32) -> Option<&'static str> {
    Some(match v {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "Q4_2 (removed)",
        5 => "Q4_3 (removed)",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        31 => "Q4_0_4_4 (removed)",
        32 => "Q4_0_4_8 (removed)",
        33 => "Q4_0_8_8 (removed)",
        34 => "TQ1_0",
        35 => "TQ2_0",
        36 => "IQ4_NL_4_4 (removed)",
        37 => "IQ4_NL_4_8 (removed)",
        38 => "IQ4_NL_8_8 (removed)",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        _ => return None,
    })
}

/// Dequantizes `bytes` (whole blocks of type `t`, little-endian, as stored in GGUF) into `out`,
/// exactly as ggml's reference `dequantize_row_*` (ggml-quants.c) and gguf-py's
/// `gguf.quants.dequantize` do, bit for bit (see the module comment on FMA).
///
/// Panics if `out.len()` is not a whole number of blocks or `bytes.len()` is not
/// `out.len() / block_values * block_bytes`.
pub fn dequantize(t: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let (n, bv, bb) = (out.len(), t.block_values(), t.block_bytes());
    assert!(n.is_multiple_of(bv), "dequantize {t:?}: {n} values is not a whole number of blocks");
    assert_eq!(bytes.len(), n / bv * bb, "dequantize {t:?}: {} bytes for {n} values", bytes.len());
    match t {
        GgmlType::F32 => each_block(bytes, out, |b: &[u8; 4], y: &mut [f32; 1]| y[0] = f32::from_le_bytes(*b)),
        GgmlType::F16 => {
            each_block(bytes, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = f16_to_f32(u16::from_le_bytes(*b)))
        }
        GgmlType::BF16 => {
            each_block(bytes, out, |b: &[u8; 2], y: &mut [f32; 1]| y[0] = bf16_to_f32(u16::from_le_bytes(*b)))
        }
        GgmlType::Q8_0 => each_block(bytes, out, block_q8_0),
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K => dequantize_low_bit(t, t.low_bit().expect("a low-bit type"), bytes, out),
    }
}

/// Runs `f` on each block of `B` bytes and its `V` output values (lengths already checked).
#[inline(always)]
fn each_block<const B: usize, const V: usize>(bytes: &[u8], out: &mut [f32], f: impl Fn(&[u8; B], &mut [f32; V])) {
    for (b, y) in bytes.chunks_exact(B).zip(out.chunks_exact_mut(V)) {
        f(b.try_into().unwrap(), y.try_into().unwrap());
    }
}

/// The little-endian f16 at `b[i..i + 2]`, as f32.
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]))
}

/// layout: ggml-common.h `block_q8_0` {d: f16, qs[32]: i8}; `y = q * d`.
#[inline(always)]
fn block_q8_0(b: &[u8; 34], y: &mut [f32; 32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

// The low-bit types as the native kernels take them: every 32 values of a block are a [`Sub`],
// unsigned integers `q` (at most 6 bits) and one f32 scale per 16 values, plus for the types
// with a min one f32 bias. Dequantization below is written on the same decoding, so the kernels'
// packing and the exact reader share one home for each block layout.

/// How a low-bit type turns a [`Sub`]'s integers into values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LowBit {
    /// Bits of `q` above the low 4 (0 for Q4_*, 1 for Q5_*, 2 for Q6_K).
    pub hi_bits: u8,
    /// Subtracted from `q`: `value = ws · (q − offset)` (Q4_0: 8, Q5_0: 16, Q6_K: 32; else 0).
    pub offset: i32,
    /// `value = ws · q + wb` (Q4_1, Q5_1, Q4_K, Q5_K): the bias is the block's min.
    pub min: bool,
    /// The two halves of 16 values have their own scales (Q6_K); else `ws[0] == ws[1]`.
    pub split: bool,
    /// `ws` and `wb` are f16 values as stored (Q4_0, Q4_1, Q5_0, Q5_1); else f32 products
    /// (a K-quant's `d · sc`, exact in f32).
    pub f16: bool,
}

impl GgmlType {
    /// The low-bit view of this type, None for F32, F16, BF16 and Q8_0.
    pub fn low_bit(self) -> Option<LowBit> {
        let l = |hi_bits, offset, min, split, f16| Some(LowBit { hi_bits, offset, min, split, f16 });
        match self {
            GgmlType::Q4_0 => l(0, 8, false, false, true),
            GgmlType::Q4_1 => l(0, 0, true, false, true),
            GgmlType::Q5_0 => l(1, 16, false, false, true),
            GgmlType::Q5_1 => l(1, 0, true, false, true),
            GgmlType::Q4_K => l(0, 0, true, false, false),
            GgmlType::Q5_K => l(1, 0, true, false, false),
            GgmlType::Q6_K => l(2, 32, false, true, false),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 => None,
        }
    }
}

/// 32 values of a low-bit block: value `j` is `ws[j / 16] · (q[j] − offset)`, or
/// `ws[j / 16] · q[j] + wb` for a type with a min (two roundings, as ggml and gguf-py).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sub {
    pub q: [u8; 32],
    pub ws: [f32; 2],
    pub wb: f32,
}

/// The sub-blocks of `bytes` (whole blocks of the low-bit type `t`), in value order, into `out`
/// (`32` values each). Panics on a type without a low-bit view or on lengths that disagree.
pub fn sub_blocks(t: GgmlType, bytes: &[u8], out: &mut [Sub]) {
    let (bb, per) = (t.block_bytes(), t.block_values() / 32);
    assert!(t.low_bit().is_some(), "sub_blocks: {} is not a low-bit type", t.name());
    assert_eq!(
        bytes.len() / bb * per,
        out.len(),
        "sub_blocks {t:?}: {} bytes for {} sub-blocks",
        bytes.len(),
        out.len()
    );
    assert!(bytes.len().is_multiple_of(bb), "sub_blocks {t:?}: {} bytes is not whole blocks", bytes.len());
    for (b, s) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(per)) {
        match t {
            GgmlType::Q4_0 => s[0] = q4_sub(f16_at(b, 0), 0.0, &b[2..18]),
            GgmlType::Q4_1 => s[0] = q4_sub(f16_at(b, 0), f16_at(b, 2), &b[4..20]),
            GgmlType::Q5_0 => s[0] = q5_sub(f16_at(b, 0), 0.0, &b[2..6], &b[6..22]),
            GgmlType::Q5_1 => s[0] = q5_sub(f16_at(b, 0), f16_at(b, 2), &b[4..8], &b[8..24]),
            GgmlType::Q4_K => k_subs(b, None, s),
            GgmlType::Q5_K => k_subs(&b[..16], Some((&b[16..48], &b[48..176])), s),
            GgmlType::Q6_K => q6_k_subs(b, s),
            _ => unreachable!(),
        }
    }
}

// Legacy 32-value blocks. Value j of a block takes its low 4 bits from the low nibble of qs[j]
// for j < 16 and from the high nibble of qs[j - 16] otherwise; Q5_* take bit 4 from bit j of qh
// (a little-endian u32).

/// layout: ggml-common.h `block_q4_0` {d: f16, qs[16]} (`y = (q − 8) d`) and `block_q4_1`
/// {d: f16, m: f16, qs[16]} (`y = q d + m`).
#[inline(always)]
fn q4_sub(d: f32, m: f32, qs: &[u8]) -> Sub {
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = qs[j] & 0xF;
        q[j + 16] = qs[j] >> 4;
    }
    Sub { q, ws: [d, d], wb: m }
}

/// layout: ggml-common.h `block_q5_0` {d: f16, qh[4], qs[16]} (`y = (q − 16) d`) and
/// `block_q5_1` {d: f16, m: f16, qh[4], qs[16]} (`y = q d + m`).
#[inline(always)]
fn q5_sub(d: f32, m: f32, qh: &[u8], qs: &[u8]) -> Sub {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) | (((qh >> j) & 1) << 4) as u8;
        q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
    }
    Sub { q, ws: [d, d], wb: m }
}

// K-quants: 256-value super-blocks of 8 sub-blocks of 32 (Q4_K, Q5_K) or 16 of 16 (Q6_K).

/// ggml-quants.c `get_scale_min_k4`: the 6-bit scales and mins of the 8 sub-blocks of a
/// Q4_K/Q5_K block, packed in 12 bytes: bytes 0..4 hold scales 0..4 in their low 6 bits, bytes
/// 4..8 mins 0..4; scales and mins 4..8 have their low 4 bits in the nibbles of bytes 8..12 and
/// their top 2 bits in the top bits of bytes 0..4 (scales) and 4..8 (mins).
#[inline(always)]
fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 63;
        m[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, m)
}

/// layout: ggml-common.h `block_q4_K` {d: f16, dmin: f16, scales[12], qs[128]} and `block_q5_K`
/// {d, dmin, scales[12], qh[32], qs[128]} (`head` is the first 16 bytes; `q5` the qh and qs of
/// a Q5_K). Sub-block `s` has scale `d · sc[s]` and min `dmin · m[s]` (each rounded to f32) and
/// `y = scale · q − min`; sub-blocks 2i and 2i+1 take the low and high nibbles of
/// qs[32i..32i + 32], and a Q5_K's fifth bit of value l of sub-block s is bit s of qh[l].
#[inline(always)]
fn k_subs(head: &[u8], q5: Option<(&[u8], &[u8])>, out: &mut [Sub]) {
    let (d, dmin) = (f16_at(head, 0), f16_at(head, 2));
    let (sc, m) = scales_mins_k4(&head[4..16]);
    let qs = match q5 {
        Some((_, qs)) => qs,
        None => &head[16..144],
    };
    for (s, o) in out.iter_mut().enumerate() {
        let (i, shift) = (s / 2, 4 * (s % 2));
        let ws = d * sc[s] as f32;
        o.ws = [ws, ws];
        o.wb = -(dmin * m[s] as f32);
        for l in 0..32 {
            let high = q5.map_or(0, |(qh, _)| ((qh[l] >> s) & 1) << 4);
            o.q[l] = ((qs[32 * i + l] >> shift) & 0xF) | high;
        }
    }
}

/// layout: ggml-common.h `block_q6_K` {ql[128], qh[64], scales[16]: i8, d: f16}. Each half of
/// 128 values uses 64 bytes of ql and 32 of qh: value 32k + l (k < 4, l < 32) has low bits from
/// ql[l + 32 (k & 1)] (low nibble for k < 2, high for k >= 2) and high bits (qh[l] >> 2k) & 3,
/// and `y = (d · scales[value / 16]) · (q − 32)`, `d · scale` rounded to f32 as ggml does.
#[inline(always)]
fn q6_k_subs(b: &[u8], out: &mut [Sub]) {
    let d = f16_at(b, 208);
    let scales = &b[192..208];
    for (s, o) in out.iter_mut().enumerate() {
        let (h, k) = (s / 4, s % 4);
        let ql = &b[64 * h + 32 * (k & 1)..][..32];
        let qh = &b[128 + 32 * h..][..32];
        let sc = |i: usize| d * scales[8 * h + 2 * k + i] as i8 as f32;
        o.ws = [sc(0), sc(1)];
        o.wb = 0.0;
        for l in 0..32 {
            o.q[l] = ((ql[l] >> (4 * (k / 2))) & 0xF) | (((qh[l] >> (2 * k)) & 3) << 4);
        }
    }
}

impl Sub {
    /// The 32 values as `l` reads them (the type's formula, gguf-py's bits).
    pub fn dequantize(&self, l: LowBit, y: &mut [f32]) {
        for (j, (y, &q)) in y.iter_mut().zip(&self.q).enumerate() {
            let ws = self.ws[j / 16];
            *y = if l.min { ws * q as f32 + self.wb } else { (q as i32 - l.offset) as f32 * ws };
        }
    }
}

/// Dequantizes whole blocks of a low-bit type through [`sub_blocks`].
fn dequantize_low_bit(t: GgmlType, l: LowBit, bytes: &[u8], out: &mut [f32]) {
    let mut subs = [Sub::default(); 8];
    let per = t.block_values() / 32;
    for (b, y) in bytes.chunks_exact(t.block_bytes()).zip(out.chunks_exact_mut(t.block_values())) {
        sub_blocks(t, b, &mut subs[..per]);
        for (s, y) in subs[..per].iter().zip(y.chunks_exact_mut(32)) {
            s.dequantize(l, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::half::f32_to_f16;

    fn f16le(x: f32) -> [u8; 2] {
        f32_to_f16(x).to_le_bytes()
    }

    fn deq(t: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![f32::NAN; bytes.len() / t.block_bytes() * t.block_values()];
        dequantize(t, bytes, &mut out);
        out
    }

    #[test]
    fn ids_names_and_sizes() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.to_u32()), Some(t));
            assert_eq!(type_name(t.to_u32()), Some(t.name()));
        }
        for v in [4, 5, 9, 10, 11, 15, 16, 23, 29, 31, 39, 42, 1000, u32::MAX] {
            assert_eq!(GgmlType::from_u32(v), None, "{v}");
        }
        assert_eq!(type_name(10), Some("Q2_K"));
        assert_eq!(type_name(11), Some("Q3_K"));
        assert_eq!(type_name(15), Some("Q8_K"));
        assert_eq!(type_name(16), Some("IQ2_XXS"));
        assert_eq!(type_name(23), Some("IQ4_XS"));
        assert_eq!(type_name(4), Some("Q4_2 (removed)"));
        assert_eq!(type_name(39), Some("MXFP4"));
        assert_eq!(type_name(42), None);
        let sizes = [(GgmlType::F32, 1, 4), (GgmlType::Q4_0, 32, 18), (GgmlType::Q5_1, 32, 24)];
        for (t, bv, bb) in sizes.into_iter().chain([(GgmlType::Q4_K, 256, 144), (GgmlType::Q6_K, 256, 210)]) {
            assert_eq!((t.block_values(), t.block_bytes()), (bv, bb), "{t:?}");
        }
    }

    #[test]
    fn row_bytes() {
        assert_eq!(GgmlType::Q4_K.row_bytes(640), None);
        assert_eq!(GgmlType::Q4_K.row_bytes(1024), Some(4 * 144));
        assert_eq!(GgmlType::Q5_0.row_bytes(640), Some(20 * 22));
        assert_eq!(GgmlType::Q8_0.row_bytes(33), None);
        assert_eq!(GgmlType::F16.row_bytes(3), Some(6));
        assert_eq!(GgmlType::BF16.row_bytes(0), Some(0));
        assert_eq!(GgmlType::F32.row_bytes(usize::MAX), None);
        assert_eq!(GgmlType::Q8_0.row_bytes(usize::MAX / 32 * 32), None); // 34 bytes per 32 values
        assert_eq!(GgmlType::Q6_K.row_bytes(usize::MAX / 256 * 256), Some(usize::MAX / 256 * 210));
    }

    #[test]
    fn float_types() {
        let x = [1.5f32, -0.0, 65504.0, f32::INFINITY];
        let f32s: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(deq(GgmlType::F32, &f32s), x);
        let f16s: Vec<u8> = x.iter().flat_map(|&v| f16le(v)).collect();
        assert_eq!(deq(GgmlType::F16, &f16s), x);
        let bf16s: Vec<u8> = x.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect();
        // bf16 is the top half of an f32: 65504 truncates to 65280.
        assert_eq!(deq(GgmlType::BF16, &bf16s), [1.5, -0.0, 65280.0, f32::INFINITY]);
    }

    #[test]
    fn q4_0_and_q4_1() {
        // Nibble j of the low halves is j, of the high halves 15 - j.
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let b = [&f16le(1.0)[..], &qs].concat();
        let want: Vec<f32> = (0..16).chain((0..16).rev()).map(|q| q as f32 - 8.0).collect();
        assert_eq!(deq(GgmlType::Q4_0, &b), want);
        let b = [&f16le(0.5)[..], &f16le(-2.0), &qs].concat();
        let want: Vec<f32> = (0..16).chain((0..16).rev()).map(|q| q as f32 * 0.5 - 2.0).collect();
        assert_eq!(deq(GgmlType::Q4_1, &b), want);
    }

    #[test]
    fn q5_0_and_q5_1() {
        // Value j is j: low nibbles j & 15, fifth bits set for j >= 16 (qh bits 16..32).
        let qs: Vec<u8> = (0..16u8).map(|j| j | (j << 4)).collect();
        let qh = 0xFFFF_0000u32.to_le_bytes();
        let b = [&f16le(2.0)[..], &qh, &qs].concat();
        let want: Vec<f32> = (0..32).map(|q| (q as f32 - 16.0) * 2.0).collect();
        assert_eq!(deq(GgmlType::Q5_0, &b), want);
        let b = [&f16le(0.25)[..], &f16le(1.0), &qh, &qs].concat();
        let want: Vec<f32> = (0..32).map(|q| q as f32 * 0.25 + 1.0).collect();
        assert_eq!(deq(GgmlType::Q5_1, &b), want);
        // Only bit 3 of qh: value 3 gets 16 added.
        let b = [&f16le(1.0)[..], &8u32.to_le_bytes(), &[0u8; 16]].concat();
        let got = deq(GgmlType::Q5_0, &b);
        assert!(got.iter().enumerate().all(|(j, &v)| v == if j == 3 { 0.0 } else { -16.0 }));
    }

    #[test]
    fn q8_0() {
        let qs: Vec<u8> = (0..32).map(|j| (j * 8 - 128) as i8 as u8).collect();
        let b = [&f16le(0.5)[..], &qs].concat();
        let want: Vec<f32> = (0..32).map(|j| (j * 8 - 128) as f32 * 0.5).collect();
        assert_eq!(deq(GgmlType::Q8_0, &b), want);
        // Two blocks, the second with a subnormal scale.
        let tiny = f32::from_bits(0x3380_0000); // 2^-24, the smallest f16
        let b2 = [&b[..], &[1, 0], &qs].concat();
        let got = deq(GgmlType::Q8_0, &b2);
        assert_eq!(got[..32], want[..]);
        assert!(got[32..].iter().zip(0..).all(|(&v, j)| v == (j * 8 - 128) as f32 * tiny));
    }

    #[test]
    fn scale_min_k4_unpacks_what_was_packed() {
        let sc = [0, 1, 17, 63, 32, 15, 48, 63];
        let m = [63, 2, 40, 0, 5, 63, 16, 33];
        assert_eq!(scales_mins_k4(&crate::kernels::quant::quantize::pack_scales_k4(sc, m)), (sc, m));
    }

    #[test]
    fn q4_k_and_q5_k() {
        let sc = [1, 2, 3, 4, 60, 61, 62, 63];
        let m = [0, 1, 10, 20, 30, 40, 50, 63];
        let scales = crate::kernels::quant::quantize::pack_scales_k4(sc, m);
        // qs byte 32i + l holds l & 15 (sub-block 2i) and 15 - (l & 15) (sub-block 2i + 1).
        let qs: Vec<u8> = (0..128u8).map(|k| (k & 15) | ((15 - (k & 15)) << 4)).collect();
        let nib = |s: usize, l: usize| if s.is_multiple_of(2) { l & 15 } else { 15 - (l & 15) };
        let (d, dmin) = (0.5f32, 0.25f32);
        let b = [&f16le(d)[..], &f16le(dmin), &scales, &qs].concat();
        let got = deq(GgmlType::Q4_K, &b);
        for (i, &v) in got.iter().enumerate() {
            let (s, l) = (i / 32, i % 32);
            assert_eq!(v, d * sc[s] as f32 * nib(s, l) as f32 - dmin * m[s] as f32, "{i}");
        }
        // Q5_K: qh[l] = l gives value l of sub-block s a fifth bit when bit s of l is set.
        let qh: Vec<u8> = (0..32).collect();
        let b = [&f16le(d)[..], &f16le(dmin), &scales, &qh, &qs].concat();
        let got = deq(GgmlType::Q5_K, &b);
        for (i, &v) in got.iter().enumerate() {
            let (s, l) = (i / 32, i % 32);
            let q = nib(s, l) + if (l >> s) & 1 == 1 { 16 } else { 0 };
            assert_eq!(v, d * sc[s] as f32 * q as f32 - dmin * m[s] as f32, "{i}");
        }
    }

    #[test]
    fn q6_k() {
        // Wanted 6-bit values: value i is i % 64; pack them as ggml's quantize_row_q6_K does.
        let q: Vec<u8> = (0..256).map(|i| (i % 64) as u8).collect();
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for h in 0..2 {
            for l in 0..32 {
                let v = |k: usize| q[128 * h + 32 * k + l];
                ql[64 * h + l] = (v(0) & 0xF) | ((v(2) & 0xF) << 4);
                ql[64 * h + l + 32] = (v(1) & 0xF) | ((v(3) & 0xF) << 4);
                qh[32 * h + l] = (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
            }
        }
        let scales: Vec<i8> = (0..16).map(|s| s * 8 - 64).collect();
        let d = 0.125f32;
        let b = [&ql[..], &qh, &scales.iter().map(|&s| s as u8).collect::<Vec<_>>(), &f16le(d)].concat();
        let got = deq(GgmlType::Q6_K, &b);
        for (i, &v) in got.iter().enumerate() {
            assert_eq!(v, d * scales[i / 16] as f32 * (q[i] as f32 - 32.0), "{i}");
        }
    }

    #[test]
    #[should_panic(expected = "bytes for")]
    fn wrong_byte_count_panics() {
        dequantize(GgmlType::Q4_0, &[0; 17], &mut [0.0; 32]);
    }

    #[test]
    #[should_panic(expected = "whole number of blocks")]
    fn partial_block_panics() {
        dequantize(GgmlType::Q4_K, &[0; 144], &mut [0.0; 255]);
    }
}
