//! The repacked Q8_0 GEMM (`kernels::quant::gemm`) against today's `ops::matmul`, on Gemma 3 270M's
//! matrix shapes, at n = 1 (decode) and n = 512 (prefill), on 1 and 2 threads.
//!
//!     cargo run --release --example gemm -- [--all] [--reps N] [--only MATRIX]
//!
//! GMAC/s counts n · rows · cols multiply-adds per product (activations quantized beforehand, as
//! both paths take them; the "quantize x" lines time that step alone); time is the fastest of
//! the runs (the machine may be shared) after 200 ms of warm-up. `old` is `ops::matmul` with
//! `Kernel::best()` (`GEMMA_RS_KERNEL` picks another), `new` is `gemm_parallel` with
//! `Gemm::best()`; `--all` adds every available new kernel. "7 per layer" sums q, k, v, o, gate,
//! up, down; "18 layers, tok/s" is the prefill rate those products alone would allow. Every new
//! product is checked against the old one (within float rounding).

use gemma_rs::kernels::matrix::Matrix;
use gemma_rs::kernels::ops::{matmul, Activations, QuantBuf};
use gemma_rs::kernels::quant::gemm::{gemm_parallel, Gemm, PackedQ8_0, QuantizedActs};
use gemma_rs::kernels::quant::{quantize_row_q8_0, BlockQ8_0, Kernel};
use gemma_rs::kernels::threads::Threads;

#[path = "timing.rs"]
mod timing;

/// The fastest of `reps` calls of `f`.
fn time(reps: usize, f: impl FnMut()) -> f64 {
    timing::sorted_times(reps, f)[0]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let all = args.iter().any(|a| a == "--all");
    let reps = args.iter().position(|a| a == "--reps").map_or(9, |i| args[i + 1].parse().expect("--reps N"));
    let shapes: [(&str, usize, usize, &[usize]); 7] = [
        ("q", 1024, 640, &[1, 512]),
        ("k/v", 256, 640, &[1, 512]),
        ("o", 640, 1024, &[1, 512]),
        ("gate/up", 2048, 640, &[1, 512]),
        ("down", 640, 2048, &[1, 512]),
        ("lm_head", 262_144, 640, &[1, 8]),
        ("layer", 0, 0, &[1, 512]),
    ];
    let only = args.iter().position(|a| a == "--only").map(|i| args[i + 1].clone());
    let kernels: Vec<&'static Gemm> = if all { Gemm::available() } else { vec![Gemm::best()] };
    let pools = [Threads::new(1), Threads::new(2)];
    println!("old = ops::matmul ({}), new = kernels::quant::gemm; GMAC/s (ms)", Kernel::best().name);
    let mut head = format!("{:<8} {:>6} {:>4} {:>4} {:>27}", "matrix", "rows", "cols", "n", "old 1 thread | 2 threads");
    for k in &kernels {
        head += &format!(" | {:>27}", format!("{} 1 | 2 threads", k.name));
    }
    println!("{head}");
    // Per layer (q, k, v, o, gate, up, down at n tokens), summed, for the "layer" line.
    // Quantizing the activations (shared by the products of one input, e.g. q, k and v).
    for cols in [640, 1024, 2048] {
        let n = 512;
        let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut line = format!("{:<14} {cols:>4} {n:>4}", "quantize x");
        for threads in &pools {
            let mut buf = QuantBuf::new(n * cols);
            let s = time(reps, || {
                Activations::quantized(&x, n, cols, &mut buf, threads);
            });
            line += &format!(" {:>13}", format!("old {:.3} ms", s * 1e3));
        }
        for threads in &pools {
            let mut acts = QuantizedActs::new();
            let s = time(reps, || acts.quantize_parallel(&x, n, cols, threads));
            line += &format!(" {:>13}", format!("new {:.3} ms", s * 1e3));
        }
        println!("{line}");
    }
    let mut layer = vec![[[0f64; 2]; 2]; 1 + kernels.len()];
    for (name, rows, cols, ns) in shapes {
        if only.as_ref().is_some_and(|o| o != name) {
            continue;
        }
        for (ni, &n) in ns.iter().enumerate() {
            if name == "layer" {
                let macs = 5_570_560.0 * n as f64;
                let mut line = format!("{:<14} {:>4} {:>4}", "7 per layer", "", n);
                for (i, t) in layer.iter().enumerate() {
                    let sep = if i == 0 { " " } else { " | " };
                    line += &format!(
                        "{sep}{:>5.1} ({:>5.2}) {:>5.1} ({:>5.2})",
                        macs / t[ni][0] / 1e9,
                        t[ni][0] * 1e3,
                        macs / t[ni][1] / 1e9,
                        t[ni][1] * 1e3
                    );
                }
                println!("{line}");
                if n > 1 {
                    let mut line = format!("{:<19} {:>4}", "=> 18 layers, tok/s", n);
                    for (i, t) in layer.iter().enumerate() {
                        let sep = if i == 0 { " " } else { " | " };
                        line += &format!(
                            "{sep}{:>13.0} {:>13.0}",
                            n as f64 / (18.0 * t[ni][0]),
                            n as f64 / (18.0 * t[ni][1])
                        );
                    }
                    println!("{line}");
                }
                continue;
            }
            let wf: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4).collect();
            let mut blocks = vec![BlockQ8_0::default(); rows * cols / 32];
            quantize_row_q8_0(&wf, &mut blocks);
            drop(wf);
            let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let macs = (n * rows * cols) as f64;
            let mut out = vec![0f32; n * rows];
            let mut line = format!("{name:<8} {rows:>6} {cols:>4} {n:>4}");
            // Count q, k, v, o, gate, up, down once each per layer.
            let per_layer = match name {
                "k/v" | "gate/up" => 2.0,
                "lm_head" => 0.0,
                _ => 1.0,
            };
            let old_out = {
                let m = Matrix::Q8_0 { data: blocks.clone().into(), rows, cols };
                for (p, threads) in pools.iter().enumerate() {
                    let mut buf = QuantBuf::new(n * cols);
                    let a = Activations::quantized(&x, n, cols, &mut buf, threads);
                    let s = time(reps, || matmul(&mut out, &a, &m, 0..rows, threads));
                    layer[0][ni][p] += per_layer * s;
                    line += &format!(" {:>5.1} ({:>5.2})", macs / s / 1e9, s * 1e3);
                }
                out.clone()
            };
            let mut acts = QuantizedActs::new();
            acts.quantize(&x, n, cols);
            for (ki, k) in kernels.iter().enumerate() {
                let packed = PackedQ8_0::for_kernel(k, &blocks, rows, cols);
                line += " |";
                for (p, threads) in pools.iter().enumerate() {
                    let s = time(reps, || gemm_parallel(&mut out, &acts, &packed, threads));
                    layer[1 + ki][ni][p] += per_layer * s;
                    line += &format!(" {:>5.1} ({:>5.2})", macs / s / 1e9, s * 1e3);
                }
                // Same products as the old path, within float rounding.
                let scale = old_out.iter().fold(0f32, |m, v| m.max(v.abs()));
                let err = out.iter().zip(&old_out).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err <= 1e-4 * scale, "{}: {name} differs from the old path by {err} (max {scale})", k.name);
            }
            println!("{line}");
        }
    }
}
