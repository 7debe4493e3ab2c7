//! The constraint engine alone (no model): the time and resident memory of building the token
//! trie of a vocabulary, a grammar's compile time, and the time of a mask (plus advancing the
//! parser) per token.
//!
//!     cargo run --release --example constraint_mask -- TOKENIZER_JSON GRAMMAR [IDS_JSON]
//!
//! GRAMMAR is a JSON Schema (a `.json` file) or a Lark grammar (any other file). With IDS_JSON
//! (a JSON list of token ids, e.g. a real generation's `Completion.token_ids`) the masks are
//! timed along those tokens, three times; without, along five walks that each take the allowed
//! token with the highest random logit. The end ids are Gemma 3's (1 and 106). Inside a
//! generation the forward pass evicts the engine's data from the caches between masks, so
//! bench/constrained.py's in-model numbers are the ones to quote; these isolate the engine.

use gemma_rs::runtime::constraint::{Constraint, Grammar, Vocabulary};
use gemma_rs::runtime::sampler::Rng;
use gemma_rs::text::tokenizer::Tokenizer;
use std::path::Path;
use std::time::Instant;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap_or("VmRSS: 0 kB");
    line.split_whitespace().nth(1).and_then(|k| k.parse::<u64>().ok()).unwrap_or(0) * 1024
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !(3..=4).contains(&args.len()) {
        eprintln!("usage: constraint_mask TOKENIZER_JSON GRAMMAR [IDS_JSON]");
        std::process::exit(2);
    }
    let tok = Tokenizer::from_file(Path::new(&args[1])).unwrap_or_else(|e| panic!("{}: {e}", args[1]));
    let before = rss_bytes();
    let t = Instant::now();
    let vocab = Vocabulary::new(&tok, &[1, 106]).unwrap();
    println!(
        "token trie of {} tokens: {:.2} s, +{} MiB resident",
        tok.vocab_size(),
        t.elapsed().as_secs_f64(),
        (rss_bytes() - before) >> 20
    );
    let text = std::fs::read_to_string(&args[2]).unwrap_or_else(|e| panic!("{}: {e}", args[2]));
    let grammar = if args[2].ends_with(".json") { Grammar::JsonSchema(text) } else { Grammar::Lark(text) };
    let replay: Option<Vec<u32>> = args
        .get(3)
        .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"))).unwrap());

    let (mut times, mut compile) = (Vec::new(), Vec::new());
    let mut logits = vec![0f32; tok.vocab_size()];
    for walk in 0..if replay.is_some() { 3 } else { 5 } {
        let t = Instant::now();
        let mut c = Constraint::new(&vocab, &grammar).unwrap();
        compile.push(t.elapsed().as_secs_f64());
        let mut rng = Rng::new(walk);
        for step in 0..replay.as_ref().map_or(400, Vec::len) {
            logits.iter_mut().for_each(|l| *l = rng.next_f64() as f32);
            let t = Instant::now();
            c.mask(&mut logits).unwrap();
            let id = match &replay {
                Some(ids) => ids[step],
                None => (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap() as u32,
            };
            if id == 1 || id == 106 {
                break;
            }
            c.consume(id).unwrap();
            times.push(t.elapsed().as_secs_f64());
            if c.is_finished() {
                break;
            }
        }
    }
    times.sort_by(f64::total_cmp);
    compile.sort_by(f64::total_cmp);
    let us = |s: f64| s * 1e6;
    let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
    println!("{}: compile and first mask {:.1} ms (median)", args[2], compile[compile.len() / 2] * 1e3);
    println!(
        "mask + advance over {} tokens: mean {:.0} us, median {:.0} us, p90 {:.0} us, max {:.0} us",
        times.len(),
        us(mean),
        us(times[times.len() / 2]),
        us(times[times.len() * 9 / 10]),
        us(times[times.len() - 1])
    );
}
