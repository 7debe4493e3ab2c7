//! A model on disk, whatever its format: a Hugging Face directory (config.json, safetensors,
//! tokenizer.json) or a GGUF file (llama.cpp's layout, its own metadata and tokenizer). Both
//! give a `Config`, an optional `Tokenizer` and the `Tensor`s of `model::schema`, which is all
//! loading (`formats::convert`) and `pack` see.

use crate::error::{Error, Result};
use crate::formats::digest::Digest;
use crate::formats::gemma3_gguf;
use crate::formats::gguf::{self, Gguf};
use crate::formats::safetensors::{Dtype, SafeTensors};
use crate::kernels::matrix::{Plain, Storage};
use crate::kernels::quant::ggml::{self, GgmlType};
use crate::model::config::{token_ids, Config};
use crate::model::schema::{self, all_tensors, Kind, TensorName, WeightType};
use crate::text::tokenizer::{GgufVocab, Tokenizer};
use serde_json::Value;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Where the weights are.
pub enum Source {
    /// Hugging Face tensors are named `{prefix}layers.N.…`.
    SafeTensors {
        st: SafeTensors,
        prefix: &'static str,
    },
    Gguf(Gguf),
}

/// Everything read from a model's files before the weights.
pub struct Checkpoint {
    pub source: Source,
    pub config: Config,
    pub tokenizer: Option<Tokenizer>,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
    /// The model's own chat template (tokenizer_config.json or `tokenizer.chat_template`).
    pub chat_template: Option<String>,
    /// The file or directory given.
    pub path: PathBuf,
}

/// One tensor of the source, as stored.
pub struct Tensor<'a> {
    /// Its name in the file (for messages).
    pub name: String,
    pub ty: GgmlType,
    /// Outermost dimension first.
    pub shape: Vec<usize>,
    pub data: &'a [u8],
    /// Absolute byte offset of `data` in its file.
    offset: usize,
    path: &'a Path,
}

impl Tensor<'_> {
    /// Values `start..start + out.len()` as f32 (dequantized exactly as ggml does); both ends
    /// must fall on block boundaries, which whole rows always do.
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        let (bv, bb) = (self.ty.block_values(), self.ty.block_bytes());
        assert!(start.is_multiple_of(bv) && out.len().is_multiple_of(bv), "read_f32: not whole blocks");
        ggml::dequantize(self.ty, &self.data[start / bv * bb..(start + out.len()) / bv * bb], out);
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.shape.iter().product()];
        self.read_f32(0, &mut v);
        v
    }

    /// The byte range of values `values` in `data` (whole blocks).
    pub fn byte_range(&self, values: Range<usize>) -> Range<usize> {
        let (bv, bb) = (self.ty.block_values(), self.ty.block_bytes());
        values.start / bv * bb..values.end.div_ceil(bv) * bb
    }

    pub fn path(&self) -> &Path {
        self.path
    }
}

impl Source {
    /// The tensor `name`, by its Hugging Face name or its GGUF name as the format has it.
    pub fn tensor(&self, name: &TensorName) -> Result<Tensor<'_>> {
        match self {
            Source::SafeTensors { st, prefix } => {
                let full = format!("{prefix}{}", name.hf());
                let t = st.get(&full)?;
                let path = st.path_of(&full);
                let ty = match t.dtype {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::BF16,
                    Dtype::Other(_) => {
                        return Err(Error::format(path, format!("tensor {full} is not F32, F16 or BF16")));
                    }
                };
                let offset = st.offset_of(&full).expect("present");
                Ok(Tensor { name: full, ty, shape: t.shape.to_vec(), data: t.data, offset, path })
            }
            Source::Gguf(g) => {
                let missing = |n: String| Error::MissingTensor { path: g.path.clone(), name: n };
                let gname = name.gguf();
                let info = g.tensor(&gname).ok_or_else(|| missing(format!("{gname} ({})", name.hf())))?;
                let ty = info.ty.map_err(|_| {
                    Error::format(
                        &g.path,
                        format!(
                            "tensor {gname} has type {}, which gemma_rs cannot read \
                             (it reads F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K)",
                            gguf::type_description(info.ty)
                        ),
                    )
                })?;
                Ok(Tensor {
                    name: gname,
                    ty,
                    shape: info.shape(),
                    data: g.bytes(info),
                    offset: info.data.start,
                    path: &g.path,
                })
            }
        }
    }

    /// Whether norm weights are stored as `1 + w` (GGUF) rather than `w` (Hugging Face).
    pub fn norms_include_one(&self) -> bool {
        matches!(self, Source::Gguf(_))
    }

    /// The tensor's values used in place from the map, when the file allows it (GGUF only).
    pub fn in_place<T: Plain>(&self, t: &Tensor) -> Option<Storage<T>> {
        let Source::Gguf(g) = self else { return None };
        let size = std::mem::size_of::<T>();
        if !t.data.len().is_multiple_of(size) {
            return None;
        }
        Storage::mapped(&g.map, t.offset, t.data.len() / size)
    }

    /// Tells the OS that bytes `range` of `t` are no longer needed (once converted).
    pub fn release(&self, t: &Tensor, range: Range<usize>) {
        let (start, end) = (t.offset + range.start, t.offset + range.end.min(t.data.len()));
        match self {
            Source::SafeTensors { st, .. } => st.release_bytes(&t.name, range),
            Source::Gguf(g) => g.release(start..end),
        }
    }
}

impl Checkpoint {
    /// Bytes the fast lm_head's shadow takes when loaded as `weights`: what `FastHead::new`
    /// holds when the tied head is held as Q8_0, else 0.
    pub fn fast_head_bytes(&self, weights: WeightType) -> usize {
        let c = &self.config;
        let embed = schema::embedding();
        let held = self.source.tensor(&embed).map_or(GgmlType::F32, |t| weights.matrix_type(&embed, c, t.ty));
        if held == GgmlType::Q8_0 {
            crate::model::fast_head::FastHead::bytes_for(c.vocab_size, c.hidden_size)
        } else {
            0
        }
    }

    /// Bytes its weights take when loaded as `weights` (each tensor's stored type decides what
    /// `WeightType::Stored` keeps).
    pub fn weight_bytes(&self, weights: WeightType) -> usize {
        schema::weight_bytes(&self.config, weights, |name| self.source.tensor(name).map_or(GgmlType::F32, |t| t.ty))
    }

    /// A digest that tells this model, loaded as `weights`, from any other: the config, every
    /// tensor's name, stored type, held type (so two `weights` that hold the same, as `"stored"`
    /// and `"q8_0"` do for a Q8_0 file, agree) and shape with bytes sampled across its data (17 × 64 bytes: the
    /// start, the end and 15 points between; a fine-tune or a re-quantization changes them all),
    /// the tokenizer's vocabulary and the chat template. About 4 000 small reads, so `load`
    /// does not slow down; the same on every host (nothing of the kernel's layout enters it).
    pub fn fingerprint(&self, weights: WeightType) -> Result<u64> {
        let c = &self.config;
        let mut d = Digest::new(0x6765_6d6d_615f_7273); // "gemma_rs"
        d.field(format!("{c:?}").as_bytes());
        for name in all_tensors(c) {
            let t = self.source.tensor(&name)?;
            d.field(name.hf().as_bytes());
            d.field(t.ty.name().as_bytes());
            let held = match (name.spec.kind, &t.shape[..]) {
                (Kind::Matrix, [_, _]) => weights.matrix_type(&name, c, t.ty),
                _ => GgmlType::F32,
            };
            d.field(held.name().as_bytes());
            for &n in &t.shape {
                d.u64(n as u64);
            }
            d.u64(t.data.len() as u64);
            const SAMPLE: usize = 64;
            const POINTS: usize = 17;
            if t.data.len() <= SAMPLE * POINTS {
                d.update(t.data);
            } else {
                let step = (t.data.len() - SAMPLE) / (POINTS - 1);
                for i in 0..POINTS {
                    let at = if i == POINTS - 1 { t.data.len() - SAMPLE } else { i * step };
                    d.update(&t.data[at..at + SAMPLE]);
                }
            }
        }
        match &self.tokenizer {
            Some(tok) => tok.digest(&mut d),
            None => d.u64(0),
        }
        d.field(self.chat_template.as_deref().unwrap_or("").as_bytes());
        for &id in &self.eos_token_ids {
            d.u64(id as u64);
        }
        Ok(d.finish())
    }

    /// Opens a Hugging Face directory, a `.gguf` file, or a directory holding one GGUF file
    /// and no safetensors.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let has_safetensors =
                path.join("model.safetensors").exists() || path.join("model.safetensors.index.json").exists();
            let ggufs = gguf_files(path)?;
            if !has_safetensors && ggufs.len() == 1 {
                return Checkpoint::open_gguf(&ggufs[0], path);
            }
            if !has_safetensors && ggufs.len() > 1 {
                let names: Vec<String> = ggufs.iter().map(|p| p.display().to_string()).collect();
                return Err(Error::format(path, format!("several GGUF files here, pass one: {}", names.join(", "))));
            }
            return Checkpoint::open_hf(path);
        }
        if is_gguf(path) {
            return Checkpoint::open_gguf(path, path.parent().unwrap_or(Path::new(".")));
        }
        Err(Error::format(
            path,
            "expected a Hugging Face model directory (config.json, model.safetensors, tokenizer.json) \
             or a .gguf file",
        ))
    }

    fn open_hf(dir: &Path) -> Result<Checkpoint> {
        let config_path = dir.join("config.json");
        if !config_path.exists() {
            return Err(Error::format(dir, "no config.json in this directory (nor a single .gguf file)"));
        }
        let config = Config::from_file(&config_path)?;
        let eos_token_ids = generation_eos(dir)?.unwrap_or_else(|| config.eos_token_ids.clone());
        let tokenizer = tokenizer_json_beside(dir, &config)?;
        let chat_template = chat_template_json(dir)?;
        let st = SafeTensors::open_dir(dir)?;
        let prefix = ["model.", "language_model.model.", "model.language_model."]
            .into_iter()
            .find(|p| st.contains(&format!("{p}embed_tokens.weight")))
            .unwrap_or("model.");
        Ok(Checkpoint {
            source: Source::SafeTensors { st, prefix },
            config,
            tokenizer,
            eos_token_ids,
            chat_template,
            path: dir.to_path_buf(),
        })
    }

    fn open_gguf(file: &Path, dir: &Path) -> Result<Checkpoint> {
        let g = Gguf::open(file)?;
        let config = gemma3_gguf::read_config(&g)?;
        let tokenizer = match tokenizer_json_beside(dir, &config)? {
            Some(t) => Some(t),
            None => gguf_tokenizer(&g, &config)?,
        };
        let mut eos_token_ids = Vec::new();
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = g.get(key).and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok()) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        if g.tensor("output.weight").is_some() {
            return Err(Error::format(file, "an untied output.weight (lm_head) is not supported: Gemma 3 ties it"));
        }
        let chat_template = g.get_str("tokenizer.chat_template").map(str::to_string);
        // The metadata (mostly the 262 k tokens, their scores and types: 7 MB) was read into our own tables:
        // drop its mapped pages, or they would count in the resident memory for good.
        let data_start = g.tensors.iter().map(|t| t.data.start).min().unwrap_or(g.map.len());
        g.release(0..data_start);
        Ok(Checkpoint { source: Source::Gguf(g), config, tokenizer, eos_token_ids, chat_template, path: file.into() })
    }
}

fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) || (read.is_ok() && &magic == b"GGUF")
}

fn gguf_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let p = entry.map_err(|e| Error::io(dir, e))?.path();
        if p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// `dir/tokenizer.json`, when present, checked against the model's vocabulary.
fn tokenizer_json_beside(dir: &Path, config: &Config) -> Result<Option<Tokenizer>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let t = Tokenizer::from_file(&path)?;
    if t.vocab_size() > config.vocab_size {
        return Err(Error::format(
            &path,
            format!("tokenizer has {} tokens, the model's vocab_size is {}", t.vocab_size(), config.vocab_size),
        ));
    }
    Ok(Some(t))
}

/// `eos_token_id` of generation_config.json, when the file exists and sets it.
fn generation_eos(dir: &Path) -> Result<Option<Vec<u32>>> {
    let path = dir.join("generation_config.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    let ids = token_ids(v.get("eos_token_id"));
    Ok(if ids.is_empty() { None } else { Some(ids) })
}

/// `chat_template` of tokenizer_config.json (a string, or the `default` of a list of named
/// templates), when present.
fn chat_template_json(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| Error::format(&path, format!("not valid JSON: {e}")))?;
    Ok(match v.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    })
}

/// The tokenizer of `tokenizer.ggml.*` metadata, `None` when the file has none.
fn gguf_tokenizer(g: &Gguf, config: &Config) -> Result<Option<Tokenizer>> {
    let bad = |msg: String| Error::format(&g.path, msg);
    let Some(tokens) = g.get("tokenizer.ggml.tokens") else { return Ok(None) };
    match g.get_str("tokenizer.ggml.model") {
        Some("llama") => {}
        other => {
            return Err(bad(format!(
                "tokenizer.ggml.model is {other:?}; gemma_rs reads SentencePiece (\"llama\") vocabularies"
            )))
        }
    }
    let tokens = g.strings(tokens).ok_or_else(|| bad("tokenizer.ggml.tokens is not an array of strings".into()))?;
    let numbers = |key: &str| -> Result<Option<Vec<f64>>> {
        match g.get(key) {
            None => Ok(None),
            Some(v) => g.numbers(v).map(Some).ok_or_else(|| bad(format!("{key} is not a numeric array"))),
        }
    };
    let token_types: Vec<i32> = match numbers("tokenizer.ggml.token_type")? {
        Some(t) => t.into_iter().map(|x| x as i32).collect(),
        None => vec![1; tokens.len()],
    };
    let scores = numbers("tokenizer.ggml.scores")?.map(|s| s.into_iter().map(|x| x as f32).collect());
    let id = |key: &str| g.get(key).and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok());
    let vocab = GgufVocab {
        tokens,
        scores,
        token_types,
        bos_id: id("tokenizer.ggml.bos_token_id"),
        eos_id: id("tokenizer.ggml.eos_token_id"),
        unk_id: id("tokenizer.ggml.unknown_token_id"),
        pad_id: id("tokenizer.ggml.padding_token_id"),
        add_bos: !matches!(g.get("tokenizer.ggml.add_bos_token"), Some(gguf::Value::Bool(false))),
    };
    let t = Tokenizer::from_gguf_vocab(&vocab, &g.path)?;
    if t.vocab_size() > config.vocab_size {
        return Err(bad(format!(
            "the tokenizer has {} tokens, token_embd.weight has {} rows",
            t.vocab_size(),
            config.vocab_size
        )));
    }
    Ok(Some(t))
}
