//! Kernel-level numbers for this machine: the thread pool's hand-off, then per available Q8_0
//! GEMM kernel the multiply-adds per second of `ops::matmul` (the product the model runs) on
//! Gemma 3 270M's layer matrices — q, k, v, o, gate, up, down summed — at 512 tokens (prefill)
//! and 1 token (decode), and the time of decode's lm_head (262144 × 640, one token).
//!
//!     cargo run --release --example kernels -- [THREADS]
//!
//! `GEMMA_RS_KERNEL` is read once per process, so each kernel is measured in a child process of
//! this one (`--child NAME`).

use gemma_rs::kernels::matrix::Matrix;
use gemma_rs::kernels::ops::{matmul, Activations};
use gemma_rs::kernels::quant::gemm::{Gemm, PackedQ8_0, QuantizedActs};
use gemma_rs::kernels::quant::{quantize_row_q8_0, BlockQ8_0};
use gemma_rs::kernels::threads::Threads;
use std::time::Instant;

#[path = "timing.rs"]
mod timing;

fn q8_0(rows: usize, cols: usize) -> Matrix {
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3).collect();
    let mut data = vec![BlockQ8_0::default(); rows * cols / 32];
    quantize_row_q8_0(&w, &mut data);
    Matrix::Q8_0(PackedQ8_0::new(&data, rows, cols))
}

/// Median seconds of `reps` calls of `f`, after 200 ms of warm-up calls (clock ramp-up, the
/// pool's workers awake).
fn time(reps: usize, f: impl FnMut()) -> f64 {
    timing::sorted_times(reps, f)[reps / 2]
}

fn measure(name: &str, threads: &Threads) {
    let mut line = format!("{name:>13}");
    // One layer's products: q, k, v (640 → 1024, 256, 256), o (1024 → 640), gate, up
    // (640 → 2048), down (2048 → 640).
    let layer = [(1024, 640), (256, 640), (256, 640), (640, 1024), (2048, 640), (2048, 640), (640, 2048)];
    let mats: Vec<Matrix> = layer.iter().map(|&(rows, cols)| q8_0(rows, cols)).collect();
    for (n, reps) in [(512, 7), (1, 201)] {
        let (mut seconds, mut macs) = (0.0, 0usize);
        for (m, &(rows, cols)) in mats.iter().zip(&layer) {
            let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut buf = QuantizedActs::with_capacity(n * cols);
            let a = Activations::quantized(&x, n, cols, threads, &mut buf);
            let mut out = vec![0f32; n * rows];
            seconds += time(reps, || matmul(&mut out, &a, m, 0..rows, threads));
            macs += n * rows * cols;
        }
        line += &format!("  {:>11.1}", macs as f64 / seconds / 1e9);
    }
    let (rows, cols) = (262_144, 640);
    let m = q8_0(rows, cols);
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut buf = QuantizedActs::with_capacity(cols);
    let a = Activations::quantized(&x, 1, cols, threads, &mut buf);
    let mut out = vec![0f32; rows];
    let s = time(11, || matmul(&mut out, &a, &m, 0..rows, threads));
    line += &format!("  {:>9.2} ms {:>6.1} GB/s", s * 1e3, m.bytes() as f64 / s / 1e9);
    println!("{line}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        let threads = Threads::new(args[3].parse().expect("threads"));
        return measure(&args[2], &threads);
    }
    let t: usize = args.get(1).map(|s| s.parse().expect("THREADS")).unwrap_or_else(Threads::available);
    let threads = Threads::new(t);
    let jobs = 100_000;
    let start = Instant::now();
    for _ in 0..jobs {
        threads.for_ranges(t, 1, usize::MAX, |_, r| {
            std::hint::black_box(r);
        });
    }
    println!("threads {t}: pool hand-off {:.2} µs per job", start.elapsed().as_secs_f64() * 1e6 / jobs as f64);
    println!("       kernel  GMAC/s layer n=512        n=1  lm_head 262144×640, n=1");
    for k in Gemm::available() {
        let status = std::process::Command::new(&args[0])
            .args(["--child", k.name, &t.to_string()])
            .env("GEMMA_RS_KERNEL", k.name)
            .status()
            .expect("run the child");
        assert!(status.success(), "{} failed", k.name);
    }
}
