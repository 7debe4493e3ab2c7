//! `pack`: writes a model (Hugging Face directory or GGUF) as a GGUF file that llama.cpp and
//! gemma_rs both load: 2-D weights in the chosen type (a Q8_0 matrix whose rows are not whole
//! 32-value blocks is written BF16) (Q8_0 by default, quantized exactly as
//! gemma_rs quantizes at load, so the packed file loaded with `weights="q8_0"` gives the same
//! bits as its source loaded that way), norms as F32
//! `1 + w`, and the metadata llama.cpp's Gemma 3 loader reads, tokenizer and chat template
//! included. A board then maps the file and starts without quantizing anything.

use crate::error::{Error, Result};
use crate::formats::checkpoint::{Checkpoint, Source};
use crate::formats::convert::{check_q8_0_scales, checked, finite_f32, for_slabs, quantize_low_bit, quantize_rows};
use crate::formats::gemma3_gguf;
use crate::formats::gguf::Writer;
use crate::formats::integrity::DIGESTS_KEY;
use crate::kernels::half::f32_to_bf16;
use crate::kernels::quant::ggml::GgmlType;
use crate::kernels::quant::{BlockQ8_0, QK8_0};
use crate::kernels::threads::Threads;
use crate::model::config::Config;
use crate::model::schema::{all_tensors, TensorName, WeightType};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// What was written.
#[derive(Clone, Debug)]
pub struct PackReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub tensors: usize,
}

/// One tensor to write: its name, shape (rows 1 for a norm) and type.
struct Plan {
    name: TensorName,
    rows: usize,
    cols: usize,
    ty: GgmlType,
    norm: bool,
}

/// ggml's `llama_ftype` of a file whose matrices are `weights` (llama.h: ALL_F32 0,
/// MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_Q4_K_M 15, MOSTLY_BF16 32).
fn file_type(weights: WeightType) -> u32 {
    match weights {
        WeightType::F32 => 0,
        WeightType::Q8_0 => 7,
        WeightType::Bf16 => 32,
        WeightType::Q4_0 => 2,
        WeightType::Q4KM => 15,
        WeightType::Stored => unreachable!("pack refuses \"stored\""),
    }
}

/// Writes `src` to `dst` as GGUF; `progress(done, total)` is called as source bytes are
/// processed and may stop the work by returning an error.
pub fn pack(
    src: &Path,
    dst: &Path,
    weights: WeightType,
    threads: &Threads,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<PackReport> {
    if weights == WeightType::Stored {
        return Err(Error::InvalidArgument(
            "pack writes weights=\"q8_0\", \"bf16\" or \"f32\" (\"stored\" is a way to load a file)".into(),
        ));
    }
    let ck = Checkpoint::open(src)?;
    refuse_to_overwrite(&ck, dst)?;
    gemma3_gguf::check_expressible(&ck.config, &ck.path)?;
    let c = &ck.config;
    let plans = plan(c, weights);
    let mut w = Writer::new();
    metadata(&mut w, &ck, weights)?;
    w.digests(DIGESTS_KEY);
    let mut total = 0u64;
    for p in &plans {
        let shape = p.name.shape(c);
        total += checked(&ck.source, &p.name, &shape)?.data.len() as u64;
        // GGUF lists the innermost dimension first.
        w.tensor(&p.name.gguf(), &shape.iter().rev().copied().collect::<Vec<_>>(), p.ty);
    }

    let partial = dst.with_file_name(format!(
        "{}.partial",
        dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.gguf".into())
    ));
    let file = std::fs::File::create(&partial).map_err(|e| Error::io(&partial, e))?;
    // Removes the partial file on every way out but success (errors, panics).
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut done = 0u64;
    // The data closure reports failures other than I/O through `failure`.
    let mut failure: Option<Error> = None;
    let result = w.write(&mut out, |i, sink| {
        let r = write_tensor(&ck.source, &plans[i], threads, sink, &mut |bytes| {
            done += bytes;
            progress(done, total)
        });
        r.map_err(|e| {
            let io = std::io::Error::other(e.to_string());
            failure = Some(e);
            io
        })
    });
    let result = result.and_then(|()| out.flush()).and_then(|()| out.get_ref().sync_all());
    drop(out);
    if let Err(e) = result {
        return Err(failure.unwrap_or_else(|| Error::io(&partial, e)));
    }
    std::fs::rename(&partial, dst).map_err(|e| Error::io(dst, e))?;
    guard.0 = None; // complete: keep it
    let bytes = std::fs::metadata(dst).map_err(|e| Error::io(dst, e))?.len();
    Ok(PackReport { path: dst.to_path_buf(), bytes, tensors: plans.len() })
}

/// `dst` must not be the file being read (writing it would destroy the source it reads from).
fn refuse_to_overwrite(ck: &Checkpoint, dst: &Path) -> Result<()> {
    let Ok(dst_real) = std::fs::canonicalize(dst) else { return Ok(()) }; // not there yet
    let mut sources = vec![ck.path.clone()];
    if let Source::Gguf(g) = &ck.source {
        sources.push(g.path.clone());
    }
    if sources.iter().any(|s| std::fs::canonicalize(s).is_ok_and(|s| s == dst_real)) {
        return Err(Error::InvalidArgument(format!(
            "{}: the destination is the source; pack writes a new file, give it another name",
            dst.display()
        )));
    }
    Ok(())
}

/// Deletes a file when dropped (a partial output), unless its path was taken out.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The tensors of a Gemma 3 model in file order, with the GGUF type each is written as.
fn plan(c: &Config, weights: WeightType) -> Vec<Plan> {
    all_tensors(c)
        .into_iter()
        .map(|name| {
            let (rows, cols, norm) = match name.shape(c)[..] {
                [n] => (1, n, true),
                [rows, cols] => (rows, cols, false),
                _ => unreachable!("weights are 1-D or 2-D"),
            };
            let ty = if norm { GgmlType::F32 } else { weights.matrix_type(&name, c, GgmlType::F32) };
            Plan { name, rows, cols, ty, norm }
        })
        .collect()
}

/// The metadata: copied from a GGUF source, except `general.file_type`,
/// `general.quantization_version` and `general.alignment` (rewritten) and `quantize.*` (the
/// source's quantization); written from config.json and tokenizer.json otherwise, with the keys
/// llama.cpp's gemma3 loader reads.
fn metadata(w: &mut Writer, ck: &Checkpoint, weights: WeightType) -> Result<()> {
    const OURS: [&str; 4] = ["general.file_type", "general.quantization_version", "general.alignment", DIGESTS_KEY];
    if let Source::Gguf(g) = &ck.source {
        // `quantize.*` (e.g. the importance matrix used) describes the source's quantization.
        let copied = |key: &str| !OURS.contains(&key) && !key.starts_with("quantize.");
        for kv in g.kvs.iter().filter(|kv| copied(&kv.key)) {
            w.copy(g, kv);
        }
        w.u32("general.file_type", file_type(weights));
        w.u32("general.quantization_version", 2);
        return Ok(());
    }
    let c = &ck.config;
    let name = ck.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "gemma3".into());
    gemma3_gguf::write_config(w, c)?;
    w.str("general.type", "model");
    w.str("general.name", &name);
    w.u32("general.file_type", file_type(weights));
    w.u32("general.quantization_version", 2);
    if let Some(t) = &ck.tokenizer {
        let mut v = t.to_gguf_vocab();
        if let Some(&eos) = ck.eos_token_ids.first() {
            v.eos_id = Some(eos);
        }
        // llama.cpp checks that the vocabulary has a token per embedding row.
        while v.tokens.len() < c.vocab_size {
            v.tokens.push(format!("<unused_row_{}>", v.tokens.len()));
            v.scores.push(-1000.0);
            v.token_types.push(5); // unused
        }
        if let Some(pad) = c.raw.get("pad_token_id").and_then(|p| p.as_u64()).and_then(|p| u32::try_from(p).ok()) {
            v.pad_id = Some(pad);
        }
        w.str("tokenizer.ggml.model", "llama");
        w.str("tokenizer.ggml.pre", "default");
        w.strings("tokenizer.ggml.tokens", &v.tokens);
        w.f32s("tokenizer.ggml.scores", &v.scores);
        w.i32s("tokenizer.ggml.token_type", &v.token_types);
        for (key, id) in [
            ("tokenizer.ggml.bos_token_id", v.bos_id),
            ("tokenizer.ggml.eos_token_id", v.eos_id),
            ("tokenizer.ggml.unknown_token_id", v.unk_id),
            ("tokenizer.ggml.padding_token_id", v.pad_id),
        ] {
            if let Some(id) = id {
                w.u32(key, id);
            }
        }
        // A second end-of-sequence id (an instruction-tuned model's <end_of_turn>) is GGUF's
        // end-of-turn id; llama.cpp and gemma_rs both stop at it.
        if let Some(&eot) = ck.eos_token_ids.get(1) {
            w.u32("tokenizer.ggml.eot_token_id", eot);
        }
        w.bool("tokenizer.ggml.add_bos_token", v.add_bos);
        w.bool("tokenizer.ggml.add_eos_token", false);
        w.bool("tokenizer.ggml.add_space_prefix", false);
    }
    if let Some(t) = &ck.chat_template {
        w.str("tokenizer.chat_template", t);
    }
    Ok(())
}

/// Streams one tensor's bytes into `sink`, calling `advanced(source bytes)` after each slab.
fn write_tensor(
    src: &Source,
    p: &Plan,
    threads: &Threads,
    sink: &mut dyn Write,
    advanced: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<()> {
    let t = src.tensor(&p.name)?;
    let io = |e: std::io::Error| Error::io(t.path(), e);
    if p.norm {
        let one = if src.norms_include_one() { 0.0 } else { 1.0 };
        for v in finite_f32(&t)? {
            sink.write_all(&(one + v).to_le_bytes()).map_err(io)?;
        }
        return advanced(t.data.len() as u64);
    }
    if t.ty == p.ty {
        // Already in the wanted type: copied as stored, once its values are checked finite.
        for_slabs(&t, p.rows, p.cols, |_, _| Ok(()))?;
        for chunk in t.data.chunks(1 << 20) {
            sink.write_all(chunk).map_err(io)?;
            advanced(chunk.len() as u64)?;
        }
        return Ok(());
    }
    let mut blocks: Vec<BlockQ8_0> = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    for_slabs(&t, p.rows, p.cols, |r0, x| {
        let n = x.len() / p.cols;
        bytes.clear();
        match p.ty {
            GgmlType::Q8_0 => {
                blocks.resize(n * (p.cols / QK8_0), BlockQ8_0::default());
                quantize_rows(x, p.cols, &mut blocks, threads);
                check_q8_0_scales(&t, r0 * (p.cols / QK8_0), &blocks)?;
                bytes.extend_from_slice(BlockQ8_0::as_bytes(&blocks));
            }
            GgmlType::BF16 => x.iter().for_each(|&v| bytes.extend_from_slice(&f32_to_bf16(v).to_le_bytes())),
            GgmlType::F32 => x.iter().for_each(|&v| bytes.extend_from_slice(&v.to_le_bytes())),
            ty if ty.low_bit().is_some() => quantize_low_bit(&t, ty, x, p.cols, &mut bytes, threads)?,
            other => unreachable!("pack writes no {}", other.name()),
        }
        let range = t.byte_range(r0 * p.cols..(r0 + n) * p.cols);
        sink.write_all(&bytes).map_err(io)?;
        src.release(&t, range.clone());
        advanced(range.len() as u64)
    })
}
