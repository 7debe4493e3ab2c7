//! Resident and peak memory of loading a tokenizer.json with gemma_rs's tokenizer.
//!
//!     cargo run --release --example tokenizer_memory -- PATH/TO/tokenizer.json
//!
//! Prints VmRSS and VmHWM (Linux, /proc/self/status) before and after loading, and the
//! tables' own size (`Tokenizer::memory_bytes`).

use gemma_rs::tokenizer::Tokenizer;
use std::time::Instant;

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: tokenizer_memory PATH/TO/tokenizer.json");
        std::process::exit(2);
    };
    let (rss0, hwm0) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    let t = Instant::now();
    let tok = match Tokenizer::from_file(path.as_ref()) {
        Ok(tok) => tok,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let secs = t.elapsed().as_secs_f64();
    let (rss1, hwm1) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    let mib = |k: u64| k as f64 / 1024.0;
    println!("vocab {} tokens, loaded in {secs:.2} s", tok.vocab_size());
    println!("tables (memory_bytes): {:.1} MiB", tok.memory_bytes() as f64 / 1048576.0);
    println!("resident: +{:.1} MiB ({:.1} -> {:.1})", mib(rss1 - rss0), mib(rss0), mib(rss1));
    println!("peak:     +{:.1} MiB ({:.1} -> {:.1})", mib(hwm1.saturating_sub(hwm0)), mib(hwm0), mib(hwm1));
}
