//! Resident and peak memory of loading a tokenizer.json with gemma_rs's tokenizer.
//!
//!     cargo run --release --example tokenizer_memory -- PATH/TO/tokenizer.json [RESIDENT_MIB PEAK_MIB]
//!
//! Prints VmRSS and VmHWM (Linux, /proc/self/status) before and after loading, and the
//! tables' own size (`Tokenizer::memory_bytes`). With the two limits, exits 1 when loading
//! added more resident or peak memory than that (scripts/test checks 40 and 80 MiB).

use gemma_rs::text::tokenizer::Tokenizer;
use std::time::Instant;

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let limits: Vec<f64> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (Some(path), 0 | 2) = (args.first(), limits.len()) else {
        eprintln!("usage: tokenizer_memory PATH/TO/tokenizer.json [RESIDENT_MIB PEAK_MIB]");
        std::process::exit(2);
    };
    let (rss0, hwm0) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    let t = Instant::now();
    let tok = match Tokenizer::from_file(std::path::Path::new(path)) {
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
    let (resident, peak) = (mib(rss1 - rss0), mib(hwm1.saturating_sub(hwm0)));
    println!("peak:     +{peak:.1} MiB ({:.1} -> {:.1})", mib(hwm0), mib(hwm1));
    if let [max_resident, max_peak] = limits[..] {
        if resident > max_resident || peak > max_peak {
            eprintln!("over the limits: +{resident:.1} MiB resident (max {max_resident}), +{peak:.1} MiB peak (max {max_peak})");
            std::process::exit(1);
        }
        println!("within the limits: {max_resident} MiB resident, {max_peak} MiB peak");
    }
}
