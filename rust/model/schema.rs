//! The tensors of a Gemma 3 model, each named once: its field in [`Outer`] or [`Layer`], its
//! Hugging Face name, its GGUF name (llama.cpp's `LLM_ARCH_GEMMA3` layout, src/llama-arch.cpp)
//! and its shape in terms of the config. Loading, listing, byte counts, NaN scans and `pack` all
//! walk these tables, so adding a tensor is one line in the [`tensors!`] invocations below.

use crate::error::{Error, Result};
use crate::kernels::matrix::Matrix;
use crate::kernels::ops;
use crate::kernels::quant::gemm::{PackedLowBit, PackedQ8_0};
use crate::kernels::quant::ggml::GgmlType;
use crate::model::config::Config;

/// A norm weight, `(n)`, stored as `1 + w` (Gemma's RMSNorm multiplies by `1 + weight`).
pub type Norm = Vec<f32>;

/// How the matmul weights are held in memory (norms are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    F32,
    Bf16,
    /// GGML Q8_0 blocks; a matrix whose rows are not whole blocks stays bf16.
    Q8_0,
    /// Each matrix in its file's type when the kernels multiply that type natively (GGUF's
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K and Q8_0), else as `Q8_0`: what llama.cpp does
    /// with a GGUF file; a Hugging Face checkpoint (f32, f16, bf16) loads as `Q8_0`.
    Stored,
    /// GGML Q4_0 blocks (the tied embedding / lm_head Q8_0, as llama.cpp's Q4_0 files keep their
    /// output matrix); quantized at load unless the file holds them.
    Q4_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, and Q6_K for `attn_v` and `ffn_down` of the first and last
    /// eighth of the layers and every third between; a matrix whose rows are not whole 256-value
    /// super-blocks takes Q5_0 for Q4_K and Q8_0 for Q6_K; the tied embedding Q8_0.
    Q4KM,
}

impl WeightType {
    pub fn parse(s: &str) -> Result<WeightType> {
        match s {
            "f32" => Ok(WeightType::F32),
            "bf16" => Ok(WeightType::Bf16),
            "q8_0" => Ok(WeightType::Q8_0),
            "stored" => Ok(WeightType::Stored),
            "q4_0" => Ok(WeightType::Q4_0),
            "q4_k_m" => Ok(WeightType::Q4KM),
            _ => Err(Error::InvalidArgument(format!(
                "weights must be \"stored\", \"q8_0\", \"q4_k_m\", \"q4_0\", \"bf16\" or \"f32\", got {s:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::Bf16 => "bf16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Stored => "stored",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q4KM => "q4_k_m",
        }
    }

    /// The ggml type the matrix `name` of a model of config `c`, stored as `stored`, is held
    /// (and packed) as.
    pub fn matrix_type(self, name: &TensorName, c: &Config, stored: GgmlType) -> GgmlType {
        let cols = name.shape(c)[1];
        let fits = |t: GgmlType| t.row_bytes(cols).is_some();
        let q8_0 = if fits(GgmlType::Q8_0) { GgmlType::Q8_0 } else { GgmlType::BF16 };
        let embedding = name.spec.gguf == "token_embd";
        let wanted = match self {
            WeightType::F32 => return GgmlType::F32,
            WeightType::Bf16 => return GgmlType::BF16,
            WeightType::Q8_0 => return q8_0,
            WeightType::Stored if stored.low_bit().is_some() && fits(stored) => return stored,
            WeightType::Stored => return q8_0,
            WeightType::Q4_0 | WeightType::Q4KM if embedding => return q8_0,
            WeightType::Q4_0 => GgmlType::Q4_0,
            WeightType::Q4KM => {
                // llama.cpp's `use_more_bits` (src/llama-quant.cpp).
                let (i, n) = (name.layer.unwrap_or(0), c.num_hidden_layers);
                let more = i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
                match name.spec.gguf {
                    "attn_v" | "ffn_down" if more => GgmlType::Q6_K,
                    _ => GgmlType::Q4_K,
                }
            }
        };
        match wanted {
            t if fits(t) => t,
            GgmlType::Q4_K if fits(GgmlType::Q5_0) => GgmlType::Q5_0,
            GgmlType::Q4_0 | GgmlType::Q4_K | GgmlType::Q6_K => q8_0,
            t => unreachable!("{t:?}"),
        }
    }

    /// Whether the matrices take activations quantized to 8 bits (all but f32 and bf16).
    pub fn quantized(self) -> bool {
        !matches!(self, WeightType::F32 | WeightType::Bf16)
    }
}

/// Whether a tensor is a norm weight (1-D, f32) or a matrix (2-D, in the load's weight type).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Norm,
    Matrix,
}

/// A dimension of a tensor, read from the config.
#[derive(Clone, Copy, Debug)]
pub enum Dim {
    Vocab,
    Hidden,
    /// `num_attention_heads * head_dim`.
    QDim,
    /// `num_key_value_heads * head_dim`.
    KvDim,
    Intermediate,
    HeadDim,
}

impl Dim {
    pub fn of(self, c: &Config) -> usize {
        match self {
            Dim::Vocab => c.vocab_size,
            Dim::Hidden => c.hidden_size,
            Dim::QDim => c.q_dim(),
            Dim::KvDim => c.kv_dim(),
            Dim::Intermediate => c.intermediate_size,
            Dim::HeadDim => c.head_dim,
        }
    }
}

/// One row of the tables below.
#[derive(Debug)]
pub struct TensorSpec {
    /// The field, and the Hugging Face name inside `model.` / `model.layers.{i}.`, without
    /// `.weight`.
    pub hf: &'static str,
    /// The GGUF name inside `blk.{i}.`, without `.weight`.
    pub gguf: &'static str,
    pub kind: Kind,
    /// Outermost dimension first.
    pub dims: &'static [Dim],
}

/// A tensor of a model: its spec and, for a block's tensor, the layer.
#[derive(Clone, Copy, Debug)]
pub struct TensorName {
    pub spec: &'static TensorSpec,
    pub layer: Option<usize>,
}

impl TensorName {
    /// The Hugging Face name without the `model.` prefix, e.g. `layers.3.mlp.up_proj.weight`.
    pub fn hf(&self) -> String {
        match self.layer {
            Some(l) => format!("layers.{l}.{}.weight", self.spec.hf),
            None => format!("{}.weight", self.spec.hf),
        }
    }

    /// The GGUF name, e.g. `blk.3.ffn_up.weight`.
    pub fn gguf(&self) -> String {
        match self.layer {
            Some(l) => format!("blk.{l}.{}.weight", self.spec.gguf),
            None => format!("{}.weight", self.spec.gguf),
        }
    }

    pub fn shape(&self, c: &Config) -> Vec<usize> {
        self.spec.dims.iter().map(|d| d.of(c)).collect()
    }

    /// Bytes this tensor, stored as `stored`, is held in when loaded with `weights`.
    pub fn bytes(&self, c: &Config, weights: WeightType, stored: GgmlType) -> usize {
        match (self.spec.kind, &self.shape(c)[..]) {
            (Kind::Norm, &[n]) => 4 * n,
            (Kind::Matrix, &[rows, cols]) => match weights.matrix_type(self, c, stored) {
                // Repacked for the GEMM kernels: their row groups' padding counts.
                GgmlType::Q8_0 => PackedQ8_0::bytes_for(rows, cols),
                ty if ty.low_bit().is_some() => PackedLowBit::bytes_for(ty, rows, cols),
                ty => rows * ty.row_bytes(cols).expect("whole blocks"),
            },
            (kind, shape) => unreachable!("a {kind:?} of shape {shape:?}"),
        }
    }
}

/// What reads the weights for [`Outer::load`] and [`Layer::load`] (a checkpoint on disk: see
/// `formats::convert`); the model knows nothing of files.
pub trait LoadWeight {
    /// The norm weight `name` of `n` values, as `1 + w`.
    fn norm(&mut self, name: &TensorName, n: usize) -> Result<Norm>;
    /// The matrix `name`, `(rows, cols)`, held as the load's weight type.
    fn matrix(&mut self, name: &TensorName, rows: usize, cols: usize) -> Result<Matrix>;
}

/// A loaded tensor, seen through its kind.
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    Norm(&'a [f32]),
    Matrix(&'a Matrix),
}

impl WeightRef<'_> {
    /// Bytes held, owned or mapped from a file.
    pub fn bytes(&self) -> usize {
        match self {
            WeightRef::Norm(v) => std::mem::size_of_val(*v),
            WeightRef::Matrix(m) => m.bytes(),
        }
    }

    /// The index of the first NaN or infinite value, if any.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            WeightRef::Norm(v) => ops::first_non_finite(v),
            WeightRef::Matrix(m) => m.first_non_finite(),
        }
    }
}

/// A field type of the tables: how it loads and how it is seen.
pub trait Weight: Sized {
    fn load(from: &mut dyn LoadWeight, name: &TensorName, shape: &[usize]) -> Result<Self>;
    fn as_ref(&self) -> WeightRef<'_>;
}

impl Weight for Norm {
    fn load(from: &mut dyn LoadWeight, name: &TensorName, shape: &[usize]) -> Result<Self> {
        from.norm(name, shape[0])
    }

    fn as_ref(&self) -> WeightRef<'_> {
        WeightRef::Norm(self)
    }
}

impl Weight for Matrix {
    fn load(from: &mut dyn LoadWeight, name: &TensorName, shape: &[usize]) -> Result<Self> {
        from.matrix(name, shape[0], shape[1])
    }

    fn as_ref(&self) -> WeightRef<'_> {
        WeightRef::Matrix(self)
    }
}

/// Declares a struct of tensors and its table: each field is `name: Norm | Matrix = "hf" /
/// "gguf" [dims]`, and the struct gets `SPECS` (the table, in field order), `load` and
/// `tensors` (every field with its spec).
macro_rules! tensors {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ident = $hf:literal / $gguf:literal [$($dim:ident),+] ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $name {
            /// The table: one row per field, in field order.
            pub const SPECS: &'static [TensorSpec] = &[
                $( TensorSpec { hf: $hf, gguf: $gguf, kind: Kind::$ty, dims: &[$(Dim::$dim),+] }, )*
            ];

            /// Loads every tensor through `from`, in table order (`layer` for a block's).
            pub fn load(from: &mut dyn LoadWeight, c: &Config, layer: Option<usize>) -> Result<Self> {
                let mut specs = Self::SPECS.iter();
                Ok($name {
                    $( $field: {
                        let name = TensorName { spec: specs.next().expect("a row per field"), layer };
                        <$ty as Weight>::load(from, &name, &name.shape(c))?
                    }, )*
                })
            }

            /// Every tensor with its row of the table.
            pub fn tensors(&self) -> impl Iterator<Item = (&'static TensorSpec, WeightRef<'_>)> {
                Self::SPECS.iter().zip([ $( Weight::as_ref(&self.$field) ),* ])
            }
        }
    };
}

tensors! {
    /// The tensors outside the blocks.
    pub struct Outer {
        /// `(vocab, hidden)`, also the lm_head (tied).
        embed_tokens: Matrix = "embed_tokens" / "token_embd" [Vocab, Hidden],
        /// `(hidden)`, the final norm.
        norm: Norm = "norm" / "output_norm" [Hidden],
    }
}

tensors! {
    /// The tensors of one block (`layers.{i}.` / `blk.{i}.`).
    pub struct Layer {
        input_layernorm: Norm = "input_layernorm" / "attn_norm" [Hidden],
        q_proj: Matrix = "self_attn.q_proj" / "attn_q" [QDim, Hidden],
        k_proj: Matrix = "self_attn.k_proj" / "attn_k" [KvDim, Hidden],
        v_proj: Matrix = "self_attn.v_proj" / "attn_v" [KvDim, Hidden],
        q_norm: Norm = "self_attn.q_norm" / "attn_q_norm" [HeadDim],
        k_norm: Norm = "self_attn.k_norm" / "attn_k_norm" [HeadDim],
        o_proj: Matrix = "self_attn.o_proj" / "attn_output" [Hidden, QDim],
        post_attention_layernorm: Norm = "post_attention_layernorm" / "post_attention_norm" [Hidden],
        pre_feedforward_layernorm: Norm = "pre_feedforward_layernorm" / "ffn_norm" [Hidden],
        gate_proj: Matrix = "mlp.gate_proj" / "ffn_gate" [Intermediate, Hidden],
        up_proj: Matrix = "mlp.up_proj" / "ffn_up" [Intermediate, Hidden],
        down_proj: Matrix = "mlp.down_proj" / "ffn_down" [Hidden, Intermediate],
        post_feedforward_layernorm: Norm = "post_feedforward_layernorm" / "post_ffw_norm" [Hidden],
    }
}

/// Every tensor of a model of config `c`, in the order files are written: the outer ones, then
/// each block's.
pub fn all_tensors(c: &Config) -> Vec<TensorName> {
    let outer = Outer::SPECS.iter().map(|spec| TensorName { spec, layer: None });
    let blocks =
        (0..c.num_hidden_layers).flat_map(|l| Layer::SPECS.iter().map(move |spec| TensorName { spec, layer: Some(l) }));
    outer.chain(blocks).collect()
}

/// The tied embedding / lm_head.
pub fn embedding() -> TensorName {
    TensorName { spec: &Outer::SPECS[0], layer: None }
}

/// Bytes the weights of a model of config `c` take when loaded with `weights`, each tensor
/// stored as `stored(name)`.
pub fn weight_bytes(c: &Config, weights: WeightType, stored: impl Fn(&TensorName) -> GgmlType) -> usize {
    all_tensors(c).iter().map(|t| t.bytes(c, weights, stored(t))).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_both_conventions() {
        let spec = &Layer::SPECS[10];
        assert_eq!((spec.hf, spec.gguf), ("mlp.up_proj", "ffn_up"));
        let t = TensorName { spec, layer: Some(3) };
        assert_eq!((t.hf(), t.gguf()), ("layers.3.mlp.up_proj.weight".into(), "blk.3.ffn_up.weight".into()));
        let e = TensorName { spec: &Outer::SPECS[0], layer: None };
        assert_eq!((e.hf(), e.gguf()), ("embed_tokens.weight".into(), "token_embd.weight".into()));
        // Every GGUF name is distinct, so a file's tensor maps back to one field.
        let mut gguf: Vec<&str> = Outer::SPECS.iter().chain(Layer::SPECS).map(|s| s.gguf).collect();
        gguf.sort_unstable();
        gguf.dedup();
        assert_eq!(gguf.len(), Outer::SPECS.len() + Layer::SPECS.len());
    }
}
