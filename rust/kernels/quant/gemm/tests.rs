use super::*;
use crate::kernels::half::f32_to_f16;
use crate::kernels::quant::{dequantize_row_q8_0, quantize_row_q8_0};

/// xorshift floats in [-scale, scale), with exact zeros and outliers.
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    crate::kernels::quant::tests::random_with(n, seed, scale, |i| match i % 89 {
        0 | 7 => Some(0.0),
        1 => Some(scale * 40.0),
        2 => Some(-scale * 25.0),
        _ => None,
    })
}

fn weights(rows: usize, cols: usize, seed: u64) -> Vec<BlockQ8_0> {
    let mut b = vec![BlockQ8_0::default(); rows * cols / QK8_0];
    quantize_row_q8_0(&random(rows * cols, seed, 0.1), &mut b);
    // A whole block of zeros and one of −128 (ggml files may hold it; the quantizer does not).
    if b.len() > 3 {
        b[1].qs = [0; 32];
        b[1].d = 0;
        b[2].qs = [-128; 32];
    }
    b
}

/// Weights `(rows, 32 · blocks)` from `seed` and `n` tokens of activations from `seed + 1`.
fn case(rows: usize, blocks: usize, n: usize, seed: u64) -> (usize, Vec<BlockQ8_0>, QuantizedActs) {
    let cols = blocks * QK8_0;
    (cols, weights(rows, cols, seed), acts(n, cols, seed + 1).1)
}

fn acts(n: usize, cols: usize, seed: u64) -> (Vec<f32>, QuantizedActs) {
    let x = random(n * cols, seed, 2.0);
    let mut a = QuantizedActs::new();
    a.quantize(&x, n, cols);
    (x, a)
}

/// The contract's formula, straight from the ggml blocks.
fn reference(w: &[BlockQ8_0], a: &QuantizedActs, r: usize, t: usize) -> f32 {
    let nb = a.cols / QK8_0;
    let mut acc = 0f32;
    for b in 0..nb {
        let wb = &w[r * nb + b];
        let x = &a.qs[t * a.cols + b * QK8_0..][..QK8_0];
        let isum: i32 = wb.qs.iter().zip(x).map(|(&p, &q)| p as i32 * q as i32).sum();
        acc = (isum as f32).mul_add(f16_to_f32(wb.d) * a.d[t * nb + b], acc);
    }
    acc
}

fn run(k: &'static Gemm, w: &[BlockQ8_0], rows: usize, a: &QuantizedActs) -> Vec<f32> {
    let p = PackedQ8_0::for_kernel(k, w, rows, a.cols);
    let mut out = vec![f32::NAN; a.n * rows];
    gemm(&mut out, rows, a, &p, 0..rows);
    out
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

/// `out (n, rows)` holds the reference bits for tokens `tokens`.
fn assert_reference(k: &Gemm, w: &[BlockQ8_0], a: &QuantizedActs, out: &[f32], tokens: impl Iterator<Item = usize>) {
    let rows = out.len() / a.n;
    for t in tokens {
        for r in 0..rows {
            let (got, want) = (out[t * rows + r], reference(w, a, r, t));
            assert!(same(got, want), "{}: ({rows}, {}) n {} (t {t}, r {r}): {got} vs {want}", k.name, a.cols, a.n);
        }
    }
}

#[test]
fn packing_keeps_every_weight_and_its_bytes() {
    for k in Gemm::available() {
        for (rows, blocks) in [(1, 1), (17, 3), (40, 20)] {
            let cols = blocks * QK8_0;
            let w = weights(rows, cols, 3);
            let p = PackedQ8_0::for_kernel(k, &w, rows, cols);
            let groups = rows.div_ceil(k.layout.rows);
            if std::ptr::eq(k, Gemm::best()) {
                let q = PackedQ8_0::new_parallel(&w, rows, cols, &Threads::new(2));
                assert!(q.val_bytes() == p.val_bytes() && q.scales == p.scales);
            }
            assert_eq!(p.bytes(), groups * k.layout.rows * blocks * 34, "{}", k.name);
            let (mut got, mut want) = (vec![0f32; cols], vec![0f32; cols]);
            for r in 0..rows {
                let row = &w[r * blocks..(r + 1) * blocks];
                assert_eq!(p.row_blocks(r), row, "{} row {r}", k.name);
                p.dequantize_row(r, &mut got);
                dequantize_row_q8_0(row, &mut want);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{} row {r}", k.name);
            }
        }
    }
}

#[test]
fn every_kernel_gives_the_reference_bits_on_odd_shapes() {
    for k in Gemm::available() {
        for blocks in [1usize, 3, 20, 64] {
            let cols = blocks * QK8_0;
            for rows in [1usize, 5, 16, 17, 40] {
                let w = weights(rows, cols, (rows * 100 + blocks) as u64);
                for n in [1usize, 2, 3, 5, 8, 9, 13] {
                    let (_, a) = acts(n, cols, (n * 7 + blocks) as u64);
                    assert_reference(k, &w, &a, &run(k, &w, rows, &a), 0..n);
                }
            }
        }
    }
}

#[test]
fn kernels_agree_with_scalar_and_with_f32_sums_within_rounding() {
    let (rows, blocks, n) = (37, 20, 11);
    let (cols, w, a) = case(rows, blocks, n, 5);
    let scalar = run(&SCALAR, &w, rows, &a);
    for k in Gemm::available() {
        let out = run(k, &w, rows, &a);
        for t in 0..n {
            for r in 0..rows {
                let (got, want) = (out[t * rows + r], scalar[t * rows + r]);
                // The products summed in f64 from the dequantized values: any order's sum.
                let exact: f64 = (0..cols)
                    .map(|k| {
                        let b = &w[r * blocks + k / QK8_0];
                        f16_to_f32(b.d) as f64
                            * b.qs[k % QK8_0] as f64
                            * a.d[t * blocks + k / QK8_0] as f64
                            * a.qs[t * cols + k] as f64
                    })
                    .sum();
                let old = exact as f32;
                let scale: f32 = w[r * blocks..(r + 1) * blocks].iter().map(|b| f16_to_f32(b.d).abs()).sum::<f32>()
                    * 2.0
                    * 40.0
                    * 32.0;
                assert!((got - want).abs() <= 1e-5 * want.abs() + 1e-6 * scale, "{} vs scalar: {got} {want}", k.name);
                assert!((got - old).abs() <= 1e-5 * old.abs() + 1e-6 * scale, "{} vs exact: {got} {old}", k.name);
            }
        }
    }
}

#[test]
fn a_token_alone_gives_the_bits_it_gets_in_a_batch_of_37() {
    for k in Gemm::available() {
        for blocks in [1usize, 3, 20] {
            let (rows, n, cols) = (33, 37, blocks * QK8_0);
            let w = weights(rows, cols, 9);
            let (x, batch) = acts(n, cols, 10);
            let p = PackedQ8_0::for_kernel(k, &w, rows, cols);
            let mut all = vec![0f32; n * rows];
            gemm(&mut all, rows, &batch, &p, 0..rows);
            for t in 0..n {
                let mut one = QuantizedActs::new();
                one.quantize(&x[t * cols..(t + 1) * cols], 1, cols);
                let mut out = vec![0f32; rows];
                gemm(&mut out, rows, &one, &p, 0..rows);
                for r in 0..rows {
                    assert!(
                        same(out[r], all[t * rows + r]),
                        "{}: token {t} row {r} alone {} vs batch {}",
                        k.name,
                        out[r],
                        all[t * rows + r]
                    );
                }
            }
        }
    }
}

#[test]
fn k_and_token_chunks_change_no_bits() {
    // 300 blocks: several K chunks on every layout; 1400 tokens of 64 values: two token chunks.
    for k in Gemm::available() {
        for (rows, blocks, n) in [(19, 300, 5), (9, 2, 1400)] {
            let (_, w, a) = case(rows, blocks, n, 11);
            let out = run(k, &w, rows, &a);
            assert_reference(k, &w, &a, &out, (0..n).step_by(if n > 100 { 97 } else { 1 }));
        }
    }
}

#[test]
fn row_ranges_threads_and_strides() {
    let (rows, blocks, n) = (45, 4, 6);
    let (cols, w, a) = case(rows, blocks, n, 13);
    for k in Gemm::available() {
        let p = PackedQ8_0::for_kernel(k, &w, rows, cols);
        let g = p.group_rows();
        let mut whole = vec![0f32; n * rows];
        gemm_parallel(&mut whole, &a, &p, &Threads::new(3));
        assert_reference(k, &w, &a, &whole, 0..n);
        // Rows g .. end, into columns 1.. of a wider output.
        let stride = rows + 3;
        let mut out = vec![-1f32; n * stride];
        gemm(&mut out[1..], stride, &a, &p, g..rows);
        for t in 0..n {
            assert_eq!(out[t * stride], -1.0);
            for r in g..rows {
                assert!(same(out[t * stride + 1 + r - g], whole[t * rows + r]), "{}", k.name);
            }
            for c in rows - g + 1..stride {
                assert_eq!(out[t * stride + c], -1.0, "{}: wrote past its rows", k.name);
            }
        }
    }
}

#[test]
fn extremes_do_not_saturate_and_nan_stays_in_its_token() {
    let blocks = 3;
    let cols = blocks * QK8_0;
    let rows = 18;
    let mut w = vec![BlockQ8_0 { d: f32_to_f16(1.0), qs: [-128; 32] }; rows * blocks];
    for (i, b) in w.iter_mut().enumerate() {
        if i % 2 == 1 {
            b.qs = [127; 32];
        }
        if i % 5 == 2 {
            b.qs = std::array::from_fn(|k| if k % 2 == 0 { -128 } else { 127 });
        }
    }
    let n = 4;
    let mut x = vec![0f32; n * cols];
    for (i, v) in x.iter_mut().enumerate() {
        *v = match (i / cols, i % 3) {
            (0, _) => 1.0,
            (1, _) => -1.0,
            (2, 0) => f32::NAN,
            (_, r) => r as f32 - 1.0,
        };
    }
    let mut a = QuantizedActs::new();
    a.quantize_parallel(&x, n, cols, &Threads::new(2));
    for k in Gemm::available() {
        let out = run(k, &w, rows, &a);
        assert_reference(k, &w, &a, &out, 0..n);
        for (i, got) in out.iter().enumerate() {
            assert_eq!(got.is_nan(), i / rows == 2, "{}: t {} r {}: {got}", k.name, i / rows, i % rows);
        }
    }
}

#[test]
fn the_expected_kernels_are_available() {
    // GEMMA_RS_EXPECT_GEMM="neon-i8mm,neon-dotprod,neon,scalar" (e.g. under qemu -cpu max)
    // checks what run-time detection found.
    let names: Vec<&str> = Gemm::available().iter().map(|k| k.name).collect();
    eprintln!("kernels::quant::gemm kernels here: {names:?}");
    if let Ok(want) = std::env::var("GEMMA_RS_EXPECT_GEMM") {
        assert_eq!(names.join(","), want);
    }
    assert_eq!(names.last(), Some(&"scalar"));
}

#[test]
fn fast_quantizer_gives_the_bits_of_quantize_activations() {
    let blocks = 64;
    let mut x = random(blocks * QK8_0, 21, 3.0);
    // Block 3: NaN; 4: +inf; 5: -inf; 6: all zero; 7: tiny (1 / d overflows) with zeros; 8: huge;
    // 9: subnormals; 10: -0.0; 11: halfway cases.
    x[3 * 32 + 5] = f32::NAN;
    x[4 * 32] = f32::INFINITY;
    x[5 * 32 + 31] = f32::NEG_INFINITY;
    x[6 * 32..7 * 32].fill(0.0);
    x[7 * 32..8 * 32].fill(0.0);
    x[7 * 32] = 1e-38;
    x[7 * 32 + 1] = -3e-39;
    for (i, v) in x[8 * 32..9 * 32].iter_mut().enumerate() {
        *v = f32::MAX * (i as f32 / 31.0 - 0.5);
    }
    for (i, v) in x[9 * 32..10 * 32].iter_mut().enumerate() {
        *v = f32::from_bits(i as u32 * 977) * if i % 2 == 0 { 1.0 } else { -1.0 };
    }
    x[10 * 32..11 * 32].fill(-0.0);
    for (i, v) in x[11 * 32..12 * 32].iter_mut().enumerate() {
        *v = (i as f32 - 15.5) * 0.5; // max 7.75: many exact halves of a step
    }
    let (mut d0, mut q0, mut s0) = (vec![0f32; blocks], vec![0i8; blocks * 32], vec![0i32; blocks]);
    let (mut d1, mut q1, mut s1) = (d0.clone(), q0.clone(), s0.clone());
    quantize_token_portable(&x, &mut d0, &mut q0, &mut s0);
    quantize_token(&x, &mut d1, &mut q1, &mut s1);
    assert!(d0.iter().zip(&d1).all(|(a, b)| same(*a, *b)), "scales");
    assert_eq!(q0, q1);
    assert_eq!(s0, s1);
    assert!(d1[3].is_nan() && d1[4].is_nan() && d1[5].is_nan() && !d1[6].is_nan());
}
