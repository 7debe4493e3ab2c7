use super::*;
use crate::kernels::quant::gemm::{gemm, QuantizedActs};
use crate::kernels::quant::ggml::dequantize;

pub(crate) const TYPES: [GgmlType; 7] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

/// `rows` rows of `cols` values of `ty` as GGUF stores them: random bytes, with the f16 scales
/// (and mins) replaced by finite ones of either sign, and a few zero scales.
pub(crate) fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let n = rows * ty.row_bytes(cols).expect("whole blocks");
    let mut b: Vec<u8> = (0..n).map(|_| next() as u8).collect();
    let f16s: &[usize] = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => unreachable!(),
    };
    for (i, blk) in b.chunks_exact_mut(ty.block_bytes()).enumerate() {
        for &at in f16s {
            let u = (next() >> 40) as f32 / (1u64 << 24) as f32;
            let v = if i % 13 == 5 { 0.0 } else { (2.0 * u - 1.0) * 0.02 };
            blk[at..at + 2].copy_from_slice(&f32_to_f16(v).to_le_bytes());
        }
    }
    b
}

fn acts(n: usize, cols: usize, seed: u64) -> (Vec<f32>, QuantizedActs) {
    let x = crate::kernels::quant::tests::random_with(n * cols, seed, 2.0, |i| match i % 89 {
        0 => Some(0.0),
        1 => Some(50.0),
        _ => None,
    });
    let mut a = QuantizedActs::new();
    a.quantize(&x, n, cols);
    (x, a)
}

/// The module doc's formula, straight from `sub_blocks` of the stored bytes.
fn reference(ty: GgmlType, bytes: &[u8], a: &QuantizedActs, r: usize, t: usize) -> f32 {
    let lb = ty.low_bit().unwrap();
    let nb = a.cols / QK8_0;
    let rb = ty.row_bytes(a.cols).unwrap();
    let mut subs = vec![Sub::default(); nb];
    sub_blocks(ty, &bytes[r * rb..(r + 1) * rb], &mut subs);
    let mut acc = 0f32;
    for (b, s) in subs.iter().enumerate() {
        let x = &a.qs[t * a.cols + b * QK8_0..][..QK8_0];
        let (dx, h0, h1) = (a.d[t * nb + b], a.hsum[2 * (t * nb + b)], a.hsum[2 * (t * nb + b) + 1]);
        let i = |h: usize| (16 * h..16 * h + 16).map(|k| s.q[k] as i32 * x[k] as i32).sum::<i32>();
        let o = lb.offset;
        if lb.split {
            acc = ((i(0) - o * h0) as f32).mul_add(s.ws[0] * dx, acc);
            acc = ((i(1) - o * h1) as f32).mul_add(s.ws[1] * dx, acc);
        } else {
            acc = ((i(0) + i(1) - o * (h0 + h1)) as f32).mul_add(s.ws[0] * dx, acc);
        }
        if lb.min {
            acc = s.wb.mul_add(dx * (h0 + h1) as f32, acc);
        }
    }
    acc
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn packing_keeps_every_value_bit_for_bit() {
    for k in available() {
        for ty in TYPES {
            for (rows, cols) in [(1, 256), (17, 512), (40, 768)] {
                let bytes = random_blocks(ty, rows, cols, rows as u64);
                let p = PackedLowBit::for_kernel(k, ty, &bytes, rows, cols);
                let rb = ty.row_bytes(cols).unwrap();
                let (mut got, mut want) = (vec![0f32; cols], vec![0f32; cols]);
                for r in 0..rows {
                    p.dequantize_row(r, &mut got);
                    dequantize(ty, &bytes[r * rb..(r + 1) * rb], &mut want);
                    assert!(got.iter().zip(&want).all(|(a, b)| same(*a, *b)), "{} {ty:?} row {r}", k.name);
                }
                if std::ptr::eq(k, best()) {
                    assert_eq!(p.bytes(), PackedLowBit::bytes_for(ty, rows, cols), "{ty:?}");
                    let mut q = PackedLowBit::zeroed(ty, rows, cols);
                    q.pack_rows(0, &bytes, &Threads::new(2));
                    assert!(q.vals.iter().zip(&p.vals).all(|(a, b)| a.0 == b.0) && q.scales == p.scales);
                }
                assert_eq!(p.first_non_finite(), None);
            }
        }
    }
}

#[test]
fn every_kernel_gives_the_reference_bits() {
    for k in available() {
        for ty in TYPES {
            for blocks in [1usize, 3, 8, 20] {
                let cols = blocks * 256;
                for rows in [1usize, 5, 16, 17, 40] {
                    let bytes = random_blocks(ty, rows, cols, (rows * 100 + blocks) as u64);
                    let p = PackedLowBit::for_kernel(k, ty, &bytes, rows, cols);
                    for n in [1usize, 2, 3, 5, 7, 13] {
                        let (_, a) = acts(n, cols, (n * 7 + blocks) as u64);
                        let mut out = vec![f32::NAN; n * rows];
                        gemm(&mut out, rows, &a, &p, 0..rows);
                        for t in 0..n {
                            for r in 0..rows {
                                let (got, want) = (out[t * rows + r], reference(ty, &bytes, &a, r, t));
                                assert!(
                                    same(got, want),
                                    "{} {ty:?} ({rows}, {cols}) n {n} t {t} r {r}: {got} vs {want}",
                                    k.name
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn products_are_close_to_f32_on_the_dequantized_weights() {
    let (rows, cols, n) = (33, 1024, 3);
    for ty in TYPES {
        let bytes = random_blocks(ty, rows, cols, 9);
        let mut w = vec![0f32; rows * cols];
        dequantize(ty, &bytes, &mut w);
        let (x, a) = acts(n, cols, 10);
        let p = PackedLowBit::new(ty, &bytes, rows, cols);
        let mut out = vec![0f32; n * rows];
        gemm(&mut out, rows, &a, &p, 0..rows);
        for t in 0..n {
            for r in 0..rows {
                let wr = &w[r * cols..(r + 1) * cols];
                let xt = &x[t * cols..(t + 1) * cols];
                let exact: f64 = wr.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                let norm: f64 = wr.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                assert!((out[t * rows + r] as f64 - exact).abs() <= 0.02 * norm + 1e-6, "{ty:?} t {t} r {r}");
            }
        }
    }
}

#[test]
fn a_non_finite_scale_is_found() {
    let ty = GgmlType::Q4_K;
    let mut bytes = random_blocks(ty, 5, 512, 3);
    let at = 3 * ty.row_bytes(512).unwrap() + 144; // row 3, second super-block's d
    bytes[at..at + 2].copy_from_slice(&f32_to_f16(f32::INFINITY).to_le_bytes());
    assert_eq!(PackedLowBit::new(ty, &bytes, 5, 512).first_non_finite(), Some(3 * 512 + 256));
}
