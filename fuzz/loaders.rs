//! Mutation fuzzing of everything `Model::load` parses: safetensors (header and data),
//! config.json, tokenizer.json, generation_config.json and GGUF (header, metadata, tensor
//! infos, data). A small valid checkpoint is made here (random weights, a hand-written BPE
//! tokenizer) and packed to GGUF; each iteration breaks one file of one of them — bit flips,
//! "interesting" integers written over header fields, truncation, inserted and deleted bytes,
//! and, for JSON, a random value of the parsed tree replaced (zero, negative, huge, fractional,
//! wrong type, deleted) — then loads it and, when that succeeds, generates two tokens.
//!
//! Every input must give `Ok` or an error whose message names the file's directory, never a
//! panic, within a second, and with at most 100 MB allocated at once above the start (a
//! counting global allocator measures it). A failing input is written to
//! `target/fuzz-failures/` with its seed.
//!
//!     cargo test --release --test fuzz_loaders                      # 400 iterations, seed 1
//!     GEMMA_RS_FUZZ_ITERS=20000 GEMMA_RS_FUZZ_SEED=7 cargo test --release --test fuzz_loaders
//!
//! Not coverage-guided (that needs a nightly compiler for cargo-fuzz), but structured: most
//! mutations land in headers, where the parsers are.

use gemma_rs::kernels::threads::Threads;
use gemma_rs::model::config::Config;
use gemma_rs::model::schema::{all_tensors, WeightType};
use gemma_rs::runtime::generate::{GenerateParams, Generation};
use gemma_rs::runtime::{never, LoadOptions, Model};
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

/// Counts live bytes and their peak, so that a single input's allocations can be bounded.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_BYTES: usize = 100 << 20;
const MAX_SECONDS: f64 = 1.0;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

// --- the seed checkpoint ----------------------------------------------------------------------

const TOKENS: &[&str] = &["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "b", "c", "▁a", "ab", "bc", "abc", "\n"];

fn seed_config(vocab: usize) -> Value {
    json!({
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0, "sliding_window": 8, "query_pre_attn_scalar": 32,
        "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention",
                        "sliding_attention", "sliding_attention", "full_attention"], "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": null, "tie_word_embeddings": true,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0
    })
}

fn seed_tokenizer() -> Value {
    let vocab: serde_json::Map<String, Value> =
        TOKENS.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    let added = |id: usize| {
        json!({"id": id, "content": TOKENS[id], "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [added(0), added(1), added(2), added(3)],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null, "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": ["▁ a", "a b", "b c", "ab c"]
        }
    })
}

/// A safetensors file of `tensors` (name, shape) with random F32 values (norms near zero).
fn safetensors(tensors: &[(String, Vec<usize>)], rng: &mut Rng) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, shape) in tensors {
        let n: usize = shape.iter().product();
        let start = data.len();
        for _ in 0..n {
            let v = (rng.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            data.extend_from_slice(&(v * if shape.len() == 1 { 0.1 } else { 0.2 }).to_le_bytes());
        }
        header.insert(
            format!("model.{name}"),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let h = Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

struct Seed {
    /// (file name, contents) of the Hugging Face directory.
    hf: Vec<(&'static str, Vec<u8>)>,
    gguf: Vec<u8>,
}

fn make_seed(work: &Path) -> Seed {
    let mut rng = Rng(0x5EED);
    let config = seed_config(TOKENS.len());
    let c = Config::from_json(config.clone()).expect("seed config");
    let tensors: Vec<(String, Vec<usize>)> = all_tensors(&c).iter().map(|t| (t.hf(), t.shape(&c))).collect();
    let hf: Vec<(&str, Vec<u8>)> = vec![
        ("config.json", serde_json::to_vec_pretty(&config).unwrap()),
        ("model.safetensors", safetensors(&tensors, &mut rng)),
        ("tokenizer.json", serde_json::to_vec_pretty(&seed_tokenizer()).unwrap()),
        ("generation_config.json", br#"{"bos_token_id": 2, "eos_token_id": [1, 12]}"#.to_vec()),
    ];
    let dir = work.join("seed");
    write_dir(&dir, &hf);
    let gguf = work.join("seed.gguf");
    gemma_rs::formats::pack::pack(&dir, &gguf, WeightType::Q8_0, &Threads::new(1), &mut |_, _| Ok(()))
        .expect("pack the seed");
    Seed { hf, gguf: std::fs::read(&gguf).unwrap() }
}

fn write_dir(dir: &Path, files: &[(&str, Vec<u8>)]) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

// --- mutations --------------------------------------------------------------------------------

const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    31,
    32,
    255,
    0x7FFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 7,
];

/// Where a binary file's parsers look: the safetensors header, the GGUF header up to its data.
fn header_len(name: &str, bytes: &[u8]) -> usize {
    if name.ends_with(".safetensors") && bytes.len() >= 8 {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        n.saturating_add(8).min(bytes.len())
    } else if name.ends_with(".gguf") {
        // The metadata holds the token strings; tensor data follows far later.
        bytes.len().min(16 << 10)
    } else {
        bytes.len()
    }
}

fn mutate_bytes(name: &str, bytes: &mut Vec<u8>, rng: &mut Rng) -> String {
    if bytes.is_empty() {
        // An earlier mutation truncated it to nothing: no byte to flip or overwrite.
        bytes.push(rng.below(256) as u8);
        return "one byte into an empty file".into();
    }
    let head = header_len(name, bytes).max(1);
    // Mostly the header; sometimes anywhere (tensor data).
    let at = |rng: &mut Rng, len: usize| if rng.chance(5) { rng.below(len) } else { rng.below(head.min(len)) };
    match rng.below(6) {
        0 => {
            let k = 1 + rng.below(8);
            for _ in 0..k {
                let i = at(rng, bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            format!("{k} bit flips")
        }
        1 | 2 => {
            let width = [1, 2, 4, 8][rng.below(4)];
            let i = at(rng, bytes.len().saturating_sub(width).max(1));
            let v = INTERESTING[rng.below(INTERESTING.len())].wrapping_add(rng.below(3) as u64).wrapping_sub(1);
            let end = (i + width).min(bytes.len());
            bytes[i..end].copy_from_slice(&v.to_le_bytes()[..end - i]);
            format!("{width}-byte {v:#x} at {i}")
        }
        3 => {
            let n = rng.below(bytes.len());
            bytes.truncate(n);
            format!("truncated to {n}")
        }
        4 => {
            let i = at(rng, bytes.len());
            let n = 1 + rng.below(16);
            let fill = rng.next().to_le_bytes();
            for k in 0..n {
                bytes.insert(i.min(bytes.len()), fill[k % 8]);
            }
            format!("{n} bytes inserted at {i}")
        }
        _ => {
            let i = at(rng, bytes.len());
            let n = (1 + rng.below(16)).min(bytes.len() - i);
            bytes.drain(i..i + n);
            format!("{n} bytes deleted at {i}")
        }
    }
}

fn interesting_json(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => json!(0),
        1 => json!(-1),
        2 => json!(1),
        3 => json!(2.5),
        4 => json!(1e300),
        5 => json!(u64::MAX),
        6 => json!(i64::MIN),
        7 => json!(1u64 << 33),
        8 => json!(""),
        9 => json!("x".repeat(rng.below(100))),
        10 => json!([]),
        11 => json!({}),
        12 => Value::Null,
        _ => json!(true),
    }
}

/// Replaces (or deletes) one random node of `v`; returns its path.
fn mutate_tree(v: &mut Value, rng: &mut Rng, depth: usize) -> String {
    let children = match v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if children == 0 || (depth > 0 && rng.chance(3)) {
        *v = interesting_json(rng);
        return format!(" = {v}");
    }
    let i = rng.below(children);
    match v {
        Value::Object(m) => {
            let key = m.keys().nth(i).unwrap().clone();
            if rng.chance(6) {
                m.remove(&key);
                return format!(".{key} deleted");
            }
            format!(".{key}{}", mutate_tree(m.get_mut(&key).unwrap(), rng, depth + 1))
        }
        Value::Array(a) => {
            if rng.chance(6) {
                a.remove(i);
                return format!("[{i}] deleted");
            }
            format!("[{i}]{}", mutate_tree(&mut a[i], rng, depth + 1))
        }
        _ => unreachable!(),
    }
}

/// One mutation of one file of `files`; returns a description.
fn mutate(files: &mut [(&'static str, Vec<u8>)], rng: &mut Rng) -> String {
    let f = rng.below(files.len());
    let (name, bytes) = &mut files[f];
    let json_file = name.ends_with(".json");
    if json_file && rng.below(3) > 0 {
        if let Ok(mut v) = serde_json::from_slice::<Value>(bytes) {
            let what = mutate_tree(&mut v, rng, 0);
            *bytes = v.to_string().into_bytes();
            return format!("{name}: {what}");
        }
    }
    if name.ends_with(".safetensors") && rng.chance(2) && bytes.len() >= 8 {
        // The header's JSON, as a tree, keeping the data behind it.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        if let Some(Ok(mut v)) = bytes.get(8..8 + n).map(serde_json::from_slice::<Value>) {
            let what = mutate_tree(&mut v, rng, 0);
            let h = v.to_string().into_bytes();
            let mut out = (h.len() as u64).to_le_bytes().to_vec();
            out.extend_from_slice(&h);
            out.extend_from_slice(&bytes[8 + n..]);
            *bytes = out;
            return format!("{name} header{what}");
        }
    }
    let what = mutate_bytes(name, bytes, rng);
    format!("{name}: {what}")
}

// --- the run ----------------------------------------------------------------------------------

/// Loads `path` and, if it loads, generates two tokens; `Ok(true)` if it did, `Ok(false)` if
/// it was refused properly (an error naming `dir`, the case's directory, or a file in it),
/// `Err` describes a violation.
fn check(path: &Path, dir: &Path) -> Result<bool, String> {
    let opts = LoadOptions { max_inference_len: Some(32), threads: Some(1), ..Default::default() };
    let start = Instant::now();
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let engine = Arc::new(Model::load(path, &opts)?);
        // A config may cap the context below the prompt's length: the prompt then leaves room
        // for at least one token (a prompt that fills the cap is an argument error).
        let cap = engine.max_inference_len;
        let prompt = vec![2, 5, 6][..cap.saturating_sub(1).clamp(1, 3)].to_vec();
        let max_new_tokens = if prompt.len() < cap { 2 } else { 0 };
        let params = GenerateParams { max_new_tokens, ..Default::default() };
        Generation::new(engine, prompt, params)?.run(&mut never).map(|_| ())
    }));
    let seconds = start.elapsed().as_secs_f64();
    let peak = PEAK.load(Relaxed).saturating_sub(base);
    let result = match outcome {
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(format!("panic: {}", msg.unwrap_or_default()))
        }
        Ok(Ok(())) => Ok(true),
        Ok(Err(e)) => {
            let msg = e.to_string();
            if msg.contains(&*dir.to_string_lossy()) {
                Ok(false)
            } else {
                Err(format!("the error does not name the file: {msg}"))
            }
        }
    };
    let ran = result?;
    if seconds > MAX_SECONDS {
        return Err(format!("took {seconds:.2} s"));
    }
    if peak > MAX_BYTES {
        return Err(format!("allocated {} MB at once", peak >> 20));
    }
    Ok(ran)
}

fn main() {
    let iters: usize = std::env::var("GEMMA_RS_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(400);
    let seed: u64 = std::env::var("GEMMA_RS_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    let work = std::env::temp_dir().join(format!("gemma_rs-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let seed_files = make_seed(&work);
    // The seeds themselves load and generate.
    assert_eq!(check(&work.join("seed"), &work.join("seed")), Ok(true), "the HF seed loads and generates");
    assert_eq!(check(&work.join("seed.gguf"), &work), Ok(true), "the GGUF seed loads and generates");

    std::panic::set_hook(Box::new(|_| {})); // panics are reported below, with their input
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let (mut ran, mut refused, mut failures) = (0usize, 0usize, Vec::new());
    let start = Instant::now();
    for i in 0..iters {
        let dir = work.join("case");
        let (path, what, files): (PathBuf, String, Vec<(&str, Vec<u8>)>) = if i % 2 == 0 {
            let mut files = seed_files.hf.clone();
            let mut what = mutate(&mut files, &mut rng);
            while rng.chance(4) {
                what += &format!("; {}", mutate(&mut files, &mut rng));
            }
            write_dir(&dir, &files);
            (dir.clone(), what, files)
        } else {
            let mut files = vec![("model.gguf", seed_files.gguf.clone())];
            let what = mutate(&mut files, &mut rng);
            write_dir(&dir, &files);
            (dir.join("model.gguf"), what, files)
        };
        match check(&path, &dir) {
            Ok(true) => ran += 1,
            Ok(false) => refused += 1,
            Err(why) => {
                let keep = target.join("fuzz-failures").join(format!("seed{seed}-iter{i}"));
                write_dir(&keep, &files);
                eprintln!("FAIL seed {seed} iteration {i}: {what}\n  {why}\n  input kept in {}", keep.display());
                failures.push(i);
            }
        }
    }
    let _ = std::panic::take_hook();
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "fuzz_loaders: {iters} inputs (seed {seed}) in {:.1} s: {ran} loaded and generated, {refused} \
         refused with an error naming the file, {} failed",
        start.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{} inputs failed: iterations {failures:?}", failures.len());
}
