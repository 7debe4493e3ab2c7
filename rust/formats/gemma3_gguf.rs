//! Gemma 3's config as GGUF metadata, both ways: the `gemma3.*` keys llama.cpp's gemma3 loader
//! reads (src/llama-model.cpp, `LLM_ARCH_GEMMA3`) with the config.json field each one is, read
//! into a `Config` when a GGUF is opened and written from one by `pack`; and what llama.cpp
//! fixes for Gemma 3 instead of storing it. (The tensor names are in `model::schema`.)

use crate::error::{Error, Result};
use crate::formats::gguf::{Gguf, Writer};
use crate::model::config::{Config, LayerType};
use serde_json::json;
use std::path::Path;

/// `general.architecture` of a Gemma 3 GGUF, and the prefix of its keys.
pub const ARCH: &str = "gemma3";

/// llama.cpp stores no layer pattern for Gemma 3: layer `i` is global when `(i + 1) % 6 == 0`.
pub const GLOBAL_EVERY: usize = 6;

/// llama.cpp's fixed RoPE base of the sliding layers (`rope_local_base_freq`).
pub const ROPE_LOCAL_BASE: f64 = 10_000.0;

/// One `gemma3.*` key: its name after the prefix, the config.json field it holds, whether it is
/// an integer (u32) or a float (f32), and the field's value in a `Config`.
pub struct Key {
    pub gguf: &'static str,
    pub field: &'static str,
    pub integer: bool,
    pub get: fn(&Config) -> f64,
}

/// A row of [`KEYS`]: `key!(u32 "gguf.key" => config_field)` or `key!(f32 ...)`.
macro_rules! key {
    ($ty:ident $gguf:literal => $field:ident) => {
        Key { gguf: $gguf, field: stringify!($field), integer: key!(@int $ty), get: |c| c.$field as f64 }
    };
    (@int u32) => { true };
    (@int f32) => { false };
}

/// The keys, in the order `pack` writes them. `attention.value_length` is read only to check
/// that it equals `key_length` (transformers has no field of its own for it).
#[rustfmt::skip]
pub const KEYS: [Key; 11] = [
    key!(u32 "context_length" => max_position_embeddings),
    key!(u32 "embedding_length" => hidden_size),
    key!(u32 "block_count" => num_hidden_layers),
    key!(u32 "feed_forward_length" => intermediate_size),
    key!(u32 "attention.head_count" => num_attention_heads),
    key!(f32 "attention.layer_norm_rms_epsilon" => rms_norm_eps),
    key!(u32 "attention.key_length" => head_dim),
    key!(u32 "attention.value_length" => head_dim),
    key!(f32 "rope.freq_base" => rope_theta),
    key!(u32 "attention.sliding_window" => sliding_window),
    key!(u32 "attention.head_count_kv" => num_key_value_heads),
];

/// The full key name, `gemma3.{key}`.
pub fn key(k: &str) -> String {
    format!("{ARCH}.{k}")
}

/// `query_pre_attn_scalar` as llama.cpp derives it for Gemma 3 (its `f_attention_scale`): the
/// head dimension, but hidden / heads for the 62-layer 27B model. GGUF stores no key for it.
pub fn query_pre_attn_scalar(layers: usize, hidden: usize, heads: usize, head_dim: usize) -> usize {
    if layers == 62 {
        hidden / heads.max(1)
    } else {
        head_dim
    }
}

/// The model's config from `gemma3.*` metadata, written as the config.json transformers makes
/// of it and checked by `Config::from_json`, with what llama.cpp fixes for Gemma 3 rather than
/// storing: [`ROPE_LOCAL_BASE`], a global layer every [`GLOBAL_EVERY`], [`query_pre_attn_scalar`],
/// the tanh GELU and tied embeddings.
pub fn read_config(g: &Gguf) -> Result<Config> {
    let bad = |msg: String| Error::format(&g.path, msg);
    let arch = g.get_str("general.architecture").ok_or_else(|| bad("no general.architecture".into()))?;
    if arch != ARCH {
        return Err(bad(format!("general.architecture is {arch:?}; gemma_rs runs Gemma 3 ({ARCH:?})")));
    }
    // llama.cpp scales RoPE when a factor is given (linear unless a type says otherwise).
    if let Some(kind) = g.get_str(&key("rope.scaling.type")) {
        if kind != "none" {
            return Err(bad(format!("{} {kind:?} is not supported", key("rope.scaling.type"))));
        }
    }
    for k in ["rope.scaling.factor", "rope.scale_linear"] {
        if let Some(f) = g.get(&key(k)).and_then(|v| v.as_f64()).filter(|&f| f != 0.0 && f != 1.0) {
            return Err(bad(format!("{} = {f}: RoPE scaling is not supported", key(k))));
        }
    }
    let mut raw = json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "rope_local_base_freq": ROPE_LOCAL_BASE,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": null,
        "tie_word_embeddings": true,
    });
    for k in &KEYS {
        let full = key(k.gguf);
        let v = g.get(&full);
        if k.gguf == "attention.value_length" {
            // Optional; when present it must equal key_length.
            if let Some(v) = v.and_then(|v| v.as_u64()) {
                if Some(v) != raw["head_dim"].as_u64() {
                    return Err(bad(format!("{full} {v} differs from {}", key("attention.key_length"))));
                }
            }
            continue;
        }
        raw[k.field] = if k.integer {
            json!(v.and_then(|v| v.as_u64()).ok_or_else(|| bad(format!("{full} is missing or not an integer")))?)
        } else {
            let x = v.and_then(|v| v.as_f64()).filter(|v| v.is_finite());
            json!(x.ok_or_else(|| bad(format!("{full} is missing or not a finite number")))?)
        };
    }
    let int = |field: &str| raw[field].as_u64().unwrap_or(0) as usize;
    let layers = int("num_hidden_layers");
    if layers > 1 << 16 {
        return Err(bad(format!("{} {layers} is absurd", key("block_count"))));
    }
    raw["query_pre_attn_scalar"] =
        json!(query_pre_attn_scalar(layers, int("hidden_size"), int("num_attention_heads"), int("head_dim")));
    raw["layer_types"] = (0..layers)
        .map(|i| if (i + 1) % GLOBAL_EVERY == 0 { "full_attention" } else { "sliding_attention" })
        .collect::<Vec<_>>()
        .into();
    let embd = g
        .tensor("token_embd.weight")
        .ok_or_else(|| Error::MissingTensor { path: g.path.clone(), name: "token_embd.weight".into() })?;
    raw["vocab_size"] = json!(embd.dims.get(1).copied().unwrap_or(0));
    for (k, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = g.get(k).and_then(|v| v.as_u64()) {
            raw[field] = json!(id);
        }
    }
    Config::from_json(raw).map_err(|e| match e {
        Error::Config(msg) => bad(msg),
        e => e,
    })
}

/// Refuses configs that the metadata cannot express (the file would load as another model).
pub fn check_expressible(c: &Config, path: &Path) -> Result<()> {
    let pattern =
        c.layer_types.iter().enumerate().all(|(i, &t)| (t == LayerType::Global) == ((i + 1) % GLOBAL_EVERY == 0));
    let problems = [
        (
            c.query_pre_attn_scalar
                != query_pre_attn_scalar(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim) as f64,
            "query_pre_attn_scalar differs from head_dim (hidden_size / heads for 62 layers)",
        ),
        (c.rope_local_base_freq != ROPE_LOCAL_BASE, "rope_local_base_freq is not 10000"),
        (!pattern, "the global layers are not every sixth"),
        (c.final_logit_softcapping.is_some(), "final_logit_softcapping is set"),
    ];
    match problems.iter().find(|(bad, _)| *bad) {
        Some((_, what)) => Err(Error::format(
            path,
            format!("cannot be written as a Gemma 3 GGUF: {what}, which llama.cpp's gemma3 loader assumes otherwise"),
        )),
        None => Ok(()),
    }
}

/// Writes `general.architecture` and the `gemma3.*` keys of `c`.
pub fn write_config(w: &mut Writer, c: &Config) -> Result<()> {
    w.str("general.architecture", ARCH);
    for k in &KEYS {
        let v = (k.get)(c);
        if k.integer {
            let n = u32::try_from(v as u64).map_err(|_| Error::Config(format!("{v} does not fit a GGUF u32")))?;
            w.u32(&key(k.gguf), n);
        } else {
            w.f32(&key(k.gguf), v as f32);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_names_a_config_field() {
        let c = Config::from_json(json!({
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 7,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "sliding_window": 8,
            "rope_theta": 1e6,
        }))
        .unwrap();
        for k in &KEYS {
            assert_eq!(c.raw[k.field].as_f64().map(|v| v as f32), Some((k.get)(&c) as f32), "{}", k.gguf);
        }
    }
}
