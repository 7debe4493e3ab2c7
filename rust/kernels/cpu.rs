//! What this CPU offers the kernels, detected once at run time: the one place that asks. Every
//! SIMD kernel is chosen from these flags, and `gemma_rs.cpu_features()` reports them.

use std::sync::OnceLock;

/// The instruction set extensions the kernels use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// x86_64 AVX2 with FMA (the f32 kernels and activation quantizers).
    pub avx2_fma: bool,
    /// x86_64 F16C (the Q8_0 AVX2 kernel converts scales with it).
    pub f16c: bool,
    /// x86_64 AVX-512 VNNI with AVX-512 VL (`vpdpbusd` on 256-bit vectors).
    pub avx512_vnni: bool,
    /// x86_64 AVX-512 F and BW (the 512-bit GEMM tile of `quant::gemm`, with `avx512_vnni`).
    pub avx512_bw: bool,
    /// x86_64 AVX-VNNI (VEX-encoded `vpdpbusd` on 256-bit vectors, without AVX-512).
    pub avx_vnni: bool,
    /// aarch64 Advanced SIMD.
    pub neon: bool,
    /// aarch64 `sdot` (Armv8.2 dot product: Cortex-A55, A76 and later).
    pub dotprod: bool,
    /// aarch64 `smmla` (Armv8.6 int8 matrix multiply: Cortex-A510, A710, Neoverse N2, V1 and
    /// later).
    pub i8mm: bool,
}

/// This CPU's features, detected on first use.
pub fn features() -> &'static Features {
    static FEATURES: OnceLock<Features> = OnceLock::new();
    FEATURES.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Features {
    use std::arch::is_x86_feature_detected as has;
    Features {
        avx2_fma: has!("avx2") && has!("fma"),
        f16c: has!("f16c"),
        avx512_vnni: has!("avx512vnni") && has!("avx512vl"),
        avx512_bw: has!("avx512f") && has!("avx512bw"),
        avx_vnni: has!("avxvnni"),
        ..Features::default()
    }
}

#[cfg(target_arch = "aarch64")]
fn detect() -> Features {
    use std::arch::is_aarch64_feature_detected as has;
    Features {
        neon: has!("neon"),
        dotprod: has!("neon") && has!("dotprod"),
        i8mm: has!("neon") && has!("i8mm"),
        ..Features::default()
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> Features {
    Features::default()
}

/// The features' names as users know them: "avx2", "fma", "f16c", "avx512vnni", "avx512vl",
/// "avx512f", "avx512bw", "avxvnni" on x86_64; "neon", "dotprod", "i8mm" on aarch64.
pub fn names() -> Vec<&'static str> {
    let f = features();
    let flags: [(&[&'static str], bool); 8] = [
        (&["avx2", "fma"], f.avx2_fma),
        (&["f16c"], f.f16c),
        (&["avx512vnni", "avx512vl"], f.avx512_vnni),
        (&["neon"], f.neon),
        (&["dotprod"], f.dotprod),
        (&["avx512f", "avx512bw"], f.avx512_bw),
        (&["avxvnni"], f.avx_vnni),
        (&["i8mm"], f.i8mm),
    ];
    flags.iter().filter(|(_, on)| *on).flat_map(|(names, _)| names.iter().copied()).collect()
}
