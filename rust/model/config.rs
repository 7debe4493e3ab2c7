//! Gemma 3 hyperparameters from a Hugging Face `config.json`, and the per-layer facts derived from
//! them (sliding or global attention, RoPE base). Names mirror config.json.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// Whether a layer attends to a sliding window or to the whole sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerType {
    Sliding,
    Global,
}

/// The most layers a config may declare.
pub const MAX_LAYERS: usize = 1024;

#[derive(Clone, Debug)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub query_pre_attn_scalar: f64,
    pub sliding_window: usize,
    /// RoPE base of the global layers (`rope_theta`, 1 000 000 for Gemma 3).
    pub rope_theta: f64,
    /// RoPE base of the sliding layers (`rope_local_base_freq`, 10 000 for Gemma 3).
    pub rope_local_base_freq: f64,
    pub final_logit_softcapping: Option<f32>,
    pub layer_types: Vec<LayerType>,
    pub eos_token_ids: Vec<u32>,
    /// The JSON as read, exposed to Python as `model.config`.
    pub raw: Value,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Config> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let raw: Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        Config::from_json(raw).map_err(|e| match e {
            Error::Config(msg) => Error::format(path, msg),
            e => e,
        })
    }

    /// Builds the config from the parsed JSON of a `Gemma3ForCausalLM` / `gemma3_text` config.
    /// A multimodal `gemma3` config is accepted through its `text_config`.
    pub fn from_json(raw: Value) -> Result<Config> {
        let obj = raw.as_object().ok_or_else(|| Error::Config("config.json is not an object".into()))?;
        let text = match obj.get("text_config") {
            Some(t @ Value::Object(_)) => t,
            _ => &raw,
        };
        if let Some(mt) = text.get("model_type").and_then(Value::as_str) {
            if !matches!(mt, "gemma3_text" | "gemma3") {
                return Err(Error::Config(format!("model_type {mt:?} is not Gemma 3 (expected \"gemma3_text\")")));
            }
        }
        let c = Fields(text);
        let hidden_size = c.usize("hidden_size", None)?;
        let num_attention_heads = c.usize("num_attention_heads", None)?;
        let num_hidden_layers = c.usize("num_hidden_layers", None)?;
        // Per-layer tables are sized by it before any tensor is read: bound it (Gemma 3 27B has 62).
        if num_hidden_layers > MAX_LAYERS {
            return Err(Error::Config(format!("num_hidden_layers ({num_hidden_layers}) is above {MAX_LAYERS}")));
        }
        let head_dim = c.usize("head_dim", Some(hidden_size / num_attention_heads.max(1)))?;
        let num_key_value_heads = c.usize("num_key_value_heads", Some(num_attention_heads))?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads ({num_attention_heads}) is not a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            )));
        }
        // The products size buffers; bounding them keeps every later size computation exact.
        for (what, heads) in
            [("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)]
        {
            if heads.checked_mul(head_dim).is_none_or(|n| n > 1 << 24) {
                return Err(Error::Config(format!("{what} ({heads}) × head_dim ({head_dim}) is absurd")));
            }
        }
        if head_dim % 2 != 0 {
            return Err(Error::Config(format!("head_dim ({head_dim}) must be even for RoPE")));
        }
        if let Some(act) = c.0.get("hidden_activation").and_then(Value::as_str) {
            if act != "gelu_pytorch_tanh" {
                return Err(Error::Config(format!(
                    "hidden_activation {act:?} is not supported (expected \"gelu_pytorch_tanh\")"
                )));
            }
        }

        // RoPE bases: transformers >= 5 writes `rope_parameters` per layer type, older configs
        // write `rope_theta` and `rope_local_base_freq`.
        let (mut rope_theta, mut rope_local) =
            (c.f64("rope_theta", Some(1_000_000.0))?, c.f64("rope_local_base_freq", Some(10_000.0))?);
        if let Some(params) = c.0.get("rope_parameters").and_then(Value::as_object) {
            for (key, slot) in [("full_attention", &mut rope_theta), ("sliding_attention", &mut rope_local)] {
                if let Some(p) = params.get(key) {
                    let kind = p.get("rope_type").and_then(Value::as_str).unwrap_or("default");
                    if kind != "default" {
                        return Err(Error::Config(format!(
                            "rope_type {kind:?} for {key} is not supported (only \"default\")"
                        )));
                    }
                    if let Some(theta) = p.get("rope_theta").and_then(Value::as_f64) {
                        *slot = theta;
                    }
                }
            }
        }
        // What this engine does not implement is refused, not silently ignored.
        for (key, unsupported) in
            [("tie_word_embeddings", false), ("attention_bias", true), ("use_bidirectional_attention", true)]
        {
            if c.0.get(key).and_then(Value::as_bool) == Some(unsupported) {
                return Err(Error::Config(format!("{key} = {unsupported} is not supported")));
            }
        }
        if let Some(scaling) = c.0.get("rope_scaling") {
            if !scaling.is_null() {
                return Err(Error::Config("rope_scaling is not supported".into()));
            }
        }

        // Layer `i` is global when `(i + 1) % pattern == 0`, unless `layer_types` says otherwise.
        let layer_types = match c.0.get("layer_types") {
            Some(Value::Array(types)) => types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    Some("full_attention") => Ok(LayerType::Global),
                    _ => Err(Error::Config(format!("unknown layer type {t} in layer_types"))),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => {
                let pattern =
                    c.usize("sliding_window_pattern", None).or_else(|_| c.usize("_sliding_window_pattern", Some(6)))?;
                (0..num_hidden_layers)
                    .map(|i| if (i + 1) % pattern == 0 { LayerType::Global } else { LayerType::Sliding })
                    .collect()
            }
        };
        if layer_types.len() != num_hidden_layers {
            return Err(Error::Config(format!(
                "layer_types has {} entries for {num_hidden_layers} layers",
                layer_types.len()
            )));
        }

        let eos_token_ids = token_ids(c.0.get("eos_token_id"));
        let config = Config {
            vocab_size: c.usize("vocab_size", None)?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size", None)?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings: c.usize("max_position_embeddings", Some(32_768))?,
            rms_norm_eps: c.f64("rms_norm_eps", Some(1e-6))? as f32,
            query_pre_attn_scalar: c.f64("query_pre_attn_scalar", Some(head_dim as f64))?,
            sliding_window: c.usize("sliding_window", Some(4096))?,
            rope_theta,
            rope_local_base_freq: rope_local,
            // `attn_logit_softcapping` is not read: transformers' Gemma 3 does not apply it.
            final_logit_softcapping: c.opt_f64("final_logit_softcapping")?.map(|v| v as f32),
            layer_types,
            eos_token_ids,
            raw: text.clone(),
        };
        if config.query_pre_attn_scalar <= 0.0 || config.rms_norm_eps < 0.0 {
            return Err(Error::Config("query_pre_attn_scalar must be > 0 and rms_norm_eps >= 0".into()));
        }
        if config.rope_theta <= 0.0 || config.rope_local_base_freq <= 0.0 {
            return Err(Error::Config("the RoPE bases must be > 0".into()));
        }
        Ok(config)
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// Token ids given as an int, a list of ints, or null.
pub fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok())).collect(),
        _ => Vec::new(),
    }
}

/// Typed access to config.json fields with range checks.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    /// A positive integer field; `default` is used when the key is absent or null.
    fn usize(&self, key: &str, default: Option<usize>) -> Result<usize> {
        match self.0.get(key) {
            None | Some(Value::Null) => default.ok_or_else(|| Error::Config(format!("{key} is missing"))),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 && n <= (1 << 32) => Ok(n as usize),
                _ => Err(Error::Config(format!("{key} must be a positive integer, got {v}"))),
            },
        }
    }

    fn f64(&self, key: &str, default: Option<f64>) -> Result<f64> {
        self.opt_f64(key)?.or(default).ok_or_else(|| Error::Config(format!("{key} is missing")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() => Ok(Some(x)),
                _ => Err(Error::Config(format!("{key} must be a finite number, got {v}"))),
            },
        }
    }
}
