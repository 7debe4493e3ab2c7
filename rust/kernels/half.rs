//! 16-bit floats as bit patterns: bf16 (the top half of an f32) and IEEE binary16, which GGML
//! uses for the scale of each Q8_0 block.

pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Round-to-nearest-even on the f32 bits (NaN stays NaN).
pub fn f32_to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if x.is_nan() {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// IEEE half to f32, exact (subnormals included).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: value = man * 2^-24.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        0x1F => sign | 0x7F80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 to IEEE half, rounded to nearest even as the F16C instruction and numpy's `astype(float16)`
/// do (ggml's `GGML_FP32_TO_FP16`): overflow gives ±inf, tiny values give subnormals or ±0.
pub fn f32_to_f16(x: f32) -> u16 {
    let u = x.to_bits();
    let sign = ((u >> 16) & 0x8000) as u16;
    let exp = ((u >> 23) & 0xFF) as i32;
    let man = u & 0x7F_FFFF;
    if exp == 0xFF {
        // Inf stays inf; NaN stays a quiet NaN.
        return sign | 0x7C00 | if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
    }
    // Unbiased exponent; half normals have -14 ..= 15.
    let e = exp - 127;
    if e > 15 {
        return sign | 0x7C00;
    }
    if e >= -14 {
        // Normal: keep 10 mantissa bits, round the 13 dropped ones to nearest even. A carry out
        // of the mantissa correctly bumps the exponent (and 65520 and above become inf).
        let h = (((e + 15) as u32) << 10) | (man >> 13);
        let rest = man & 0x1FFF;
        let round_up = rest > 0x1000 || (rest == 0x1000 && (h & 1) == 1);
        return sign | (h + round_up as u32) as u16;
    }
    if e < -25 {
        // Below half the smallest subnormal (2^-25): rounds to zero.
        return sign;
    }
    // Subnormal: the result counts units of 2^-24; value = full * 2^(e - 23).
    let full = man | 0x80_0000;
    let shift = (-1 - e) as u32; // bits dropped so that the unit is 2^-24: 14 ..= 24
    let kept = full >> shift;
    let rest = full & ((1 << shift) - 1);
    let half = 1 << (shift - 1);
    let round_up = rest > half || (rest == half && (kept & 1) == 1);
    sign | (kept + round_up as u32) as u16
}

/// `dst[i] = f16_to_f32(src[i])`, eight at a time with F16C on x86 and with NEON's `fcvtl` on
/// aarch64 (both exact, like the scalar conversion: every path gives the same bits).
pub fn f16_to_f32_slice(src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "f16_to_f32_slice: lengths");
    #[cfg(target_arch = "x86_64")]
    let done = if crate::kernels::cpu::features().f16c {
        // SAFETY: F16C is present; the loads and stores stay within the slices (whole groups of
        // 8 below `len`).
        unsafe { f16c_to_f32(src, dst) }
    } else {
        0
    };
    // SAFETY: NEON is part of aarch64; whole groups of 4 below `len`.
    #[cfg(target_arch = "aarch64")]
    let done = unsafe { neon_to_f32(src, dst) };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let done = 0;
    for (d, &h) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f16_to_f32(h);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16c_to_f32(src: &[u16], dst: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = src.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
        _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    n
}

#[cfg(target_arch = "aarch64")]
unsafe fn neon_to_f32(src: &[u16], dst: &mut [f32]) -> usize {
    use std::arch::aarch64::*;
    let n = src.len() / 4 * 4;
    for i in (0..n).step_by(4) {
        let h = vld1_u16(src.as_ptr().add(i));
        // fcvtl: four halves to four singles, exactly.
        let f: float32x4_t;
        std::arch::asm!("fcvtl {f:v}.4s, {h:v}.4h", h = in(vreg) h, f = out(vreg) f, options(pure, nomem, nostack));
        vst1q_f32(dst.as_mut_ptr().add(i), f);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slice_conversion_has_the_scalar_bits() {
        // Every half bit pattern, at an odd length so that the tail runs too.
        let src: Vec<u16> = (0..=u16::MAX).chain([0x3C00, 0x8001, 0x7C00]).collect();
        let mut dst = vec![0f32; src.len()];
        f16_to_f32_slice(&src, &mut dst);
        for (&h, &x) in src.iter().zip(&dst) {
            let want = f16_to_f32(h);
            assert!(x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()), "{h:#06x}");
        }
    }

    #[test]
    fn f16_conversion_is_exact() {
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(f16_to_f32(0xC000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7BFF), 65504.0);
        assert!(f16_to_f32(0x7C00).is_infinite());
        assert!(f16_to_f32(0x7E00).is_nan());
    }

    #[test]
    fn every_half_round_trips() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan());
            } else {
                assert_eq!(f32_to_f16(x), h, "{h:#06x} = {x}");
            }
        }
    }

    #[test]
    fn f16_rounds_to_nearest_even() {
        // Midpoints between consecutive halves go to the even one; anything past them goes up.
        for h in [0x0000u16, 0x0001, 0x03FF, 0x0400, 0x3C00, 0x3C01, 0x7BFE, 0x8001, 0xBC00] {
            let (lo, hi) = (f16_to_f32(h) as f64, f16_to_f32(h + 1) as f64);
            let mid = ((lo + hi) / 2.0) as f32;
            let even = if h & 1 == 0 { h } else { h + 1 };
            assert_eq!(f32_to_f16(mid), even, "midpoint after {h:#06x}");
            let above = f32::from_bits(mid.to_bits() + if mid >= 0.0 { 1 } else { 0 });
            if mid > 0.0 {
                assert_eq!(f32_to_f16(above), h + 1, "just above the midpoint after {h:#06x}");
            }
        }
        assert_eq!(f32_to_f16(65520.0), 0x7C00); // rounds past the largest half
        assert_eq!(f32_to_f16(65519.99), 0x7BFF);
        assert_eq!(f32_to_f16(1e-9), 0);
        assert_eq!(f32_to_f16(-1e-9), 0x8000);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0); // ties to even: zero
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.0001), 1);
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
    }
}
