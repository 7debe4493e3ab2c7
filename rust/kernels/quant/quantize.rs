//! Quantizers of f32 rows into GGUF's low-bit blocks, for `pack` and for loading a checkpoint
//! as Q4_0 or a Q4_K_M-like mix: Q4_0 and Q5_0 as ggml's reference `quantize_row_q4_0_ref` and
//! `quantize_row_q5_0_ref` (ggml-quants.c) compute them; Q4_K and Q6_K after ggml's reference
//! quantizers, with their weighted searches of a sub-block's scale (`make_qkx2_quants`,
//! `make_qx_quants`) written from the algorithm, not copied. Block layouts: `ggml`.

use super::ggml::GgmlType;
use crate::kernels::half::{f16_to_f32, f32_to_f16};

/// `x` (whole blocks of `t`) quantized into `out` (`t.row_bytes(x.len())` bytes). Panics for a
/// type without a quantizer here (Q4_0, Q5_0, Q4_K, Q6_K have one).
pub fn quantize(t: GgmlType, x: &[f32], out: &mut [u8]) {
    let (bv, bb) = (t.block_values(), t.block_bytes());
    assert!(x.len().is_multiple_of(bv) && out.len() == x.len() / bv * bb, "quantize {t:?}: lengths");
    for (x, b) in x.chunks_exact(bv).zip(out.chunks_exact_mut(bb)) {
        match t {
            GgmlType::Q4_0 => q4_0(x, b),
            GgmlType::Q5_0 => q5_0(x, b),
            GgmlType::Q4_K => q4_k(x, b),
            GgmlType::Q6_K => q6_k(x, b),
            _ => panic!("no quantizer for {}", t.name()),
        }
    }
}

/// The value of largest magnitude, with its sign (the first of equal magnitudes).
fn signed_max(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

/// C's `(int8_t)` of a float in range: truncation toward zero.
fn trunc(v: f32) -> i32 {
    v as i32
}

/// ggml's `nearest_int`: round half to even, as `lrintf` in the default rounding mode.
fn nearest_int(v: f32) -> i32 {
    v.round_ties_even() as i32
}

/// `quantize_row_q4_0_ref`: `d = max / −8`, `q = min(15, trunc(x / d + 8.5))`.
fn q4_0(x: &[f32], b: &mut [u8]) {
    let d = signed_max(x) / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    for j in 0..16 {
        let lo = trunc(x[j] * id + 8.5).min(15) as u8;
        let hi = trunc(x[j + 16] * id + 8.5).min(15) as u8;
        b[2 + j] = lo | hi << 4;
    }
}

/// `quantize_row_q5_0_ref`: `d = max / −16`, `q = min(31, trunc(x / d + 16.5))`, the fifth bits
/// in `qh`.
fn q5_0(x: &[f32], b: &mut [u8]) {
    let d = signed_max(x) / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    b[..2].copy_from_slice(&f32_to_f16(d).to_le_bytes());
    let mut qh = 0u32;
    for j in 0..16 {
        let lo = trunc(x[j] * id + 16.5).min(31) as u32;
        let hi = trunc(x[j + 16] * id + 16.5).min(31) as u32;
        b[6 + j] = (lo & 0xF) as u8 | ((hi & 0xF) as u8) << 4;
        qh |= ((lo >> 4) & 1) << j | ((hi >> 4) & 1) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

/// A sub-block's `(scale, min)` and integers `l` in `0..=nmax` for `x ≈ scale · l − min`, by a
/// weighted least-squares search over candidate scales (ggml's `make_qkx2_quants` with
/// rmin −1, rdelta 0.1, 20 steps).
fn scale_min(x: &[f32], w: &[f32], nmax: i32, l: &mut [u8]) -> (f32, f32) {
    let (mut lo, mut hi) = (x[0], x[0]);
    let (mut sum_w, mut sum_x) = (0f32, 0f32);
    for (&x, &w) in x.iter().zip(w) {
        lo = lo.min(x);
        hi = hi.max(x);
        sum_w += w;
        sum_x += w * x;
    }
    lo = lo.min(0.0);
    if hi == lo {
        l.fill(0);
        return (0.0, -lo);
    }
    let err = |scale: f32, min: f32, l: &[u8]| -> f32 {
        x.iter().zip(w).zip(l).map(|((&x, &w), &l)| w * (scale * l as f32 + min - x).powi(2)).sum()
    };
    let iscale = nmax as f32 / (hi - lo);
    let mut scale = 1.0 / iscale;
    let mut min = lo;
    for (l, &x) in l.iter_mut().zip(x) {
        *l = nearest_int(iscale * (x - lo)).clamp(0, nmax) as u8;
    }
    let mut best = err(scale, min, l);
    let mut aux = vec![0u8; x.len()];
    for step in 0..=20 {
        let iscale = (-1.0 + 0.1 * step as f32 + nmax as f32) / (hi - lo);
        let (mut sl, mut sl2, mut sxl) = (0f32, 0f32, 0f32);
        for ((a, &x), &w) in aux.iter_mut().zip(x).zip(w) {
            let q = nearest_int(iscale * (x - lo)).clamp(0, nmax);
            *a = q as u8;
            let q = q as f32;
            sl += w * q;
            sl2 += w * q * q;
            sxl += w * q * x;
        }
        let det = sum_w * sl2 - sl * sl;
        if det <= 0.0 {
            continue;
        }
        let mut s = (sum_w * sxl - sum_x * sl) / det;
        let mut m = (sl2 * sum_x - sl * sxl) / det;
        if m > 0.0 {
            m = 0.0;
            s = sxl / sl2;
        }
        let e = err(s, m, &aux);
        if e < best {
            (best, scale, min) = (e, s, m);
            l.copy_from_slice(&aux);
        }
    }
    (scale, -min)
}

/// The 8 scales and mins (each `< 64`) packed as ggml's `get_scale_min_k4` reads them.
pub(crate) fn pack_scales_k4(sc: [u8; 8], m: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    s
}

/// Q4_K after `quantize_row_q4_K_ref`: per sub-block of 32 a weighted `(scale, min)` (weights
/// `rms(x) + |x|`), both quantized to 6 bits against the block's largest, then the integers
/// again from the quantized scales.
fn q4_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; 256];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let rms = (xs.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        let w: Vec<f32> = xs.iter().map(|v| rms + v.abs()).collect();
        (scales[j], mins[j]) = scale_min(xs, &w, 15, &mut l[32 * j..32 * j + 32]);
    }
    let max_scale = scales.iter().fold(0f32, |m, &s| m.max(s));
    let max_min = mins.iter().fold(0f32, |m, &s| m.max(s));
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let ls: [u8; 8] = std::array::from_fn(|j| nearest_int(inv_scale * scales[j]).min(63) as u8);
    let lm: [u8; 8] = std::array::from_fn(|j| nearest_int(inv_min * mins[j]).min(63) as u8);
    let (d, dmin) = (f32_to_f16(max_scale / 63.0), f32_to_f16(max_min / 63.0));
    b[0..2].copy_from_slice(&d.to_le_bytes());
    b[2..4].copy_from_slice(&dmin.to_le_bytes());
    b[4..16].copy_from_slice(&pack_scales_k4(ls, lm));
    let (d, dmin) = (f16_to_f32(d), f16_to_f32(dmin));
    for j in 0..8 {
        let dj = d * ls[j] as f32;
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * lm[j] as f32;
        for i in 32 * j..32 * j + 32 {
            l[i] = nearest_int((x[i] + dm) / dj).clamp(0, 15) as u8;
        }
    }
    for (c, q) in b[16..144].chunks_exact_mut(32).enumerate() {
        for (i, q) in q.iter_mut().enumerate() {
            *q = l[64 * c + i] | l[64 * c + 32 + i] << 4;
        }
    }
}

/// A sub-block's signed scale and integers `l + nmax` in `0..2 nmax` for `x ≈ scale · l`, by a
/// search over candidate scales weighted by `x²` (ggml's `make_qx_quants`, rmse type 1).
fn scale_signed(x: &[f32], nmax: i32, l: &mut [u8]) -> f32 {
    let max = signed_max(x);
    if max.abs() < 1e-15 {
        l.fill(nmax as u8);
        return 0.0;
    }
    let fit = |iscale: f32, l: &mut [u8]| -> (f32, f32) {
        let (mut sxl, mut sl2) = (0f32, 0f32);
        for (l, &x) in l.iter_mut().zip(x) {
            let q = nearest_int(iscale * x).clamp(-nmax, nmax - 1);
            *l = (q + nmax) as u8;
            let w = x * x;
            sxl += w * x * q as f32;
            sl2 += w * (q * q) as f32;
        }
        (sxl, sl2)
    };
    let (sxl, sl2) = fit(-(nmax as f32) / max, l);
    let mut scale = if sl2 > 0.0 { sxl / sl2 } else { 0.0 };
    let mut best = scale * sxl;
    let mut aux = vec![0u8; x.len()];
    for step in -9..=9 {
        if step == 0 {
            continue;
        }
        let (sxl, sl2) = fit(-(nmax as f32 + 0.1 * step as f32) / max, &mut aux);
        if sl2 > 0.0 && sxl * sxl > best * sl2 {
            scale = sxl / sl2;
            best = scale * sxl;
            l.copy_from_slice(&aux);
        }
    }
    scale
}

/// Q6_K after `quantize_row_q6_K_ref`: per 16 values a signed scale, the 16 scales quantized to
/// int8 against the largest, then the integers again from the quantized scales.
fn q6_k(x: &[f32], b: &mut [u8]) {
    let mut l = [0u8; 256];
    let mut scales = [0f32; 16];
    for (i, s) in scales.iter_mut().enumerate() {
        *s = scale_signed(&x[16 * i..16 * i + 16], 32, &mut l[16 * i..16 * i + 16]);
    }
    let max_scale = signed_max(&scales);
    b.fill(0);
    if max_scale.abs() < 1e-15 {
        return;
    }
    let iscale = -128.0 / max_scale;
    let d = f32_to_f16(1.0 / iscale);
    b[208..210].copy_from_slice(&d.to_le_bytes());
    let d = f16_to_f32(d);
    for (i, s) in scales.iter().enumerate() {
        let sc = nearest_int(iscale * s).min(127) as i8;
        b[192 + i] = sc as u8;
        let di = d * sc as f32;
        if di == 0.0 {
            continue;
        }
        for j in 16 * i..16 * i + 16 {
            l[j] = (nearest_int(x[j] / di).clamp(-32, 31) + 32) as u8;
        }
    }
    for h in 0..2 {
        for k in 0..32 {
            let v = |s: usize| l[128 * h + 32 * s + k];
            b[64 * h + k] = (v(0) & 0xF) | (v(2) & 0xF) << 4;
            b[64 * h + 32 + k] = (v(1) & 0xF) | (v(3) & 0xF) << 4;
            b[128 + 32 * h + k] = (v(0) >> 4) | (v(1) >> 4) << 2 | (v(2) >> 4) << 4 | (v(3) >> 4) << 6;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quant::ggml::dequantize;

    /// Each quantizer round-trips through `dequantize` within its type's error, on smooth and
    /// outlier-laden rows, and zeros stay zeros.
    #[test]
    fn quantized_rows_dequantize_close_to_the_input() {
        for (t, tol) in [(GgmlType::Q4_0, 0.15), (GgmlType::Q5_0, 0.1), (GgmlType::Q4_K, 0.12), (GgmlType::Q6_K, 0.035)]
        {
            for seed in 0..4u64 {
                let x = crate::kernels::quant::tests::random_with(1024, seed, 1.0, |i| (i % 97 == 5).then_some(6.0));
                let mut b = vec![0u8; t.row_bytes(x.len()).unwrap()];
                quantize(t, &x, &mut b);
                let mut y = vec![0f32; x.len()];
                dequantize(t, &b, &mut y);
                let rms = |v: &[f32]| (v.iter().map(|v| v * v).sum::<f32>() / v.len() as f32).sqrt();
                let err: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a - b).collect();
                assert!(rms(&err) <= tol * rms(&x), "{t:?} seed {seed}: rms error {} of {}", rms(&err), rms(&x));
            }
            let mut b = vec![0u8; t.row_bytes(256).unwrap()];
            quantize(t, &[0.0; 256], &mut b);
            let mut y = vec![1f32; 256];
            dequantize(t, &b, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{t:?}");
        }
    }

    #[test]
    fn q4_0_follows_the_reference_rounding() {
        // max = −2 → d = 0.25, id = 4: x = 1.0 → trunc(4 + 8.5) = 12; x = −2 → 0; x = 0.1 → 8.
        let mut x = [0f32; 32];
        (x[0], x[1], x[2]) = (1.0, -2.0, 0.1);
        let mut b = [0u8; 18];
        quantize(GgmlType::Q4_0, &x, &mut b);
        assert_eq!(f16_to_f32(u16::from_le_bytes([b[0], b[1]])), 0.25);
        assert_eq!([b[2] & 0xF, b[3] & 0xF, b[4] & 0xF, b[5] & 0xF], [12, 0, 8, 8]);
    }
}
