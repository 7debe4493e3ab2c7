//! The Gemma 3 forward pass (transformers' modeling_gemma3.py is the reference).
//!
//! `forward` runs a chunk of consecutive tokens through every layer, writing their keys and
//! values into the cache and leaving the final-normed hidden states in `Scratch::x`; `lm_head`
//! turns hidden states into logits with the tied embedding.

use crate::error::{Error, Result};
use crate::formats::checkpoint::{Source, Tensor};
use crate::kernels::half::f32_to_bf16;
use crate::kernels::matrix::Matrix;
use crate::kernels::ops::{self, Activations, QuantBuf};
use crate::kernels::quant::ggml::GgmlType;
use crate::kernels::quant::{self, BlockQ8_0, QK8_0};
use crate::kernels::threads::{SharedMut, Threads};
use crate::model::config::{Config, LayerType};
use crate::model::kv_cache::KvCache;

/// Tokens per forward chunk: prefill runs as matrix × matrix on this many tokens at a time, so
/// the scratch buffers have a fixed size whatever the prompt length.
pub const CHUNK: usize = 128;

/// How the matmul weights are held in memory (norms are always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightType {
    F32,
    Bf16,
    /// GGML Q8_0 blocks; a matrix whose rows are not whole blocks stays bf16.
    Q8_0,
}

impl WeightType {
    pub fn parse(s: &str) -> Result<WeightType> {
        match s {
            "f32" => Ok(WeightType::F32),
            "bf16" => Ok(WeightType::Bf16),
            "q8_0" => Ok(WeightType::Q8_0),
            _ => Err(Error::InvalidArgument(format!("weights must be \"q8_0\", \"bf16\" or \"f32\", got {s:?}"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::Bf16 => "bf16",
            WeightType::Q8_0 => "q8_0",
        }
    }
}

pub struct Layer {
    pub input_layernorm: Vec<f32>,            // (hidden) stored as 1 + w
    pub q_proj: Matrix,                       // (heads * head_dim, hidden)
    pub k_proj: Matrix,                       // (kv_heads * head_dim, hidden)
    pub v_proj: Matrix,                       // (kv_heads * head_dim, hidden)
    pub q_norm: Vec<f32>,                     // (head_dim) stored as 1 + w
    pub k_norm: Vec<f32>,                     // (head_dim) stored as 1 + w
    pub o_proj: Matrix,                       // (hidden, heads * head_dim)
    pub post_attention_layernorm: Vec<f32>,   // (hidden) stored as 1 + w
    pub pre_feedforward_layernorm: Vec<f32>,  // (hidden) stored as 1 + w
    pub gate_proj: Matrix,                    // (intermediate, hidden)
    pub up_proj: Matrix,                      // (intermediate, hidden)
    pub down_proj: Matrix,                    // (hidden, intermediate)
    pub post_feedforward_layernorm: Vec<f32>, // (hidden) stored as 1 + w
}

pub struct Model {
    pub config: Config,
    pub embed_tokens: Matrix, // (vocab, hidden), also the lm_head
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>, // (hidden) stored as 1 + w
    pub weights: WeightType,
    /// `sqrt(hidden_size)` rounded to f32, the embedding multiplier.
    embed_scale: f32,
    /// `query_pre_attn_scalar ** -0.5`.
    attn_scale: f32,
    inv_freq_local: Vec<f32>,  // (head_dim / 2)
    inv_freq_global: Vec<f32>, // (head_dim / 2)
}

/// Activations of one chunk, sized at load; nothing here grows.
pub struct Scratch {
    pub x: Vec<f32>,      // (CHUNK, hidden) residual stream; final-normed after `forward`
    xb: Vec<f32>,         // (CHUNK, hidden) normed input / block output
    q: Vec<f32>,          // (CHUNK, heads * head_dim)
    k: Vec<f32>,          // (CHUNK, kv_dim)
    v: Vec<f32>,          // (CHUNK, kv_dim)
    att: Vec<f32>,        // (CHUNK, heads * head_dim)
    gate: Vec<f32>,       // (CHUNK, intermediate)
    up: Vec<f32>,         // (CHUNK, intermediate)
    cos: [Vec<f32>; 2],   // [local, global] × (CHUNK, head_dim / 2)
    sin: [Vec<f32>; 2],   // [local, global] × (CHUNK, head_dim / 2)
    scores: Vec<f32>,     // (threads, group, capacity) attention weights of a group of heads
    pub logits: Vec<f32>, // (vocab)
    pub xq: QuantBuf,     // (CHUNK, max(hidden, q_dim, intermediate)) a matmul input, quantized
}

impl Scratch {
    pub fn new(c: &Config, capacity: usize, threads: usize) -> Scratch {
        let half = c.head_dim / 2;
        let z = |n: usize| vec![0f32; n];
        Scratch {
            x: z(CHUNK * c.hidden_size),
            xb: z(CHUNK * c.hidden_size),
            q: z(CHUNK * c.q_dim()),
            k: z(CHUNK * c.kv_dim()),
            v: z(CHUNK * c.kv_dim()),
            att: z(CHUNK * c.q_dim()),
            gate: z(CHUNK * c.intermediate_size),
            up: z(CHUNK * c.intermediate_size),
            cos: [z(CHUNK * half), z(CHUNK * half)],
            sin: [z(CHUNK * half), z(CHUNK * half)],
            scores: z(threads * Self::group(c) * capacity),
            logits: z(c.vocab_size),
            xq: QuantBuf::new(CHUNK * Self::widest_input(c)),
        }
    }

    /// Query heads per key/value head.
    fn group(c: &Config) -> usize {
        c.num_attention_heads / c.num_key_value_heads
    }

    /// The most columns a matmul input has.
    fn widest_input(c: &Config) -> usize {
        c.hidden_size.max(c.q_dim()).max(c.intermediate_size)
    }

    /// Bytes `Scratch::new` allocates.
    pub fn bytes_for(c: &Config, capacity: usize, threads: usize) -> usize {
        let floats = CHUNK * (2 * c.hidden_size + 2 * c.q_dim() + 2 * c.kv_dim() + 2 * c.intermediate_size)
            + 4 * CHUNK * (c.head_dim / 2)
            + threads * Self::group(c) * capacity
            + c.vocab_size;
        floats * 4 + QuantBuf::bytes_for(CHUNK * Self::widest_input(c))
    }
}

impl Model {
    /// Loads every weight from `src`, checking names and shapes against `config`.
    /// The weights of `config` from `src`; `progress(done, total)` is told the bytes of tensor
    /// data read after each tensor.
    pub fn load(
        config: Config,
        src: &Source,
        wtype: WeightType,
        threads: &Threads,
        progress: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<Model> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let mut total = 0u64;
        for (name, _) in Model::tensors(c) {
            total += src.tensor(&name)?.data.len() as u64;
        }
        let done = std::cell::Cell::new(0u64);
        let progress = std::cell::RefCell::new(progress);
        let advance = |bytes: u64| -> Result<()> {
            done.set(done.get() + bytes);
            (progress.borrow_mut())(done.get(), total)
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Matrix> {
            let t = checked(src, name, &[rows, cols])?;
            let before = done.get();
            let m = Self::matrix(src, &t, wtype, rows, cols, threads, &mut |b| advance(b))?;
            // Whatever was not reported slab by slab (a tensor used in place, or converted whole).
            let rest = t.data.len() as u64 - (done.get() - before);
            if rest > 0 {
                advance(rest)?;
            }
            Ok(m)
        };
        // Gemma's RMSNorm multiplies by (1 + weight): store the sum, computed in f32 (GGUF
        // files store the sum already).
        let norm = |name: &str, n: usize| -> Result<Vec<f32>> {
            let t = checked(src, name, &[n])?;
            let w = finite_f32(&t)?;
            advance(t.data.len() as u64)?;
            Ok(if src.norms_include_one() { w } else { w.into_iter().map(|w| 1.0 + w).collect() })
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = format!("layers.{i}.");
                Ok(Layer {
                    input_layernorm: norm(&format!("{p}input_layernorm.weight"), h)?,
                    q_proj: matrix(&format!("{p}self_attn.q_proj.weight"), c.q_dim(), h)?,
                    k_proj: matrix(&format!("{p}self_attn.k_proj.weight"), c.kv_dim(), h)?,
                    v_proj: matrix(&format!("{p}self_attn.v_proj.weight"), c.kv_dim(), h)?,
                    q_norm: norm(&format!("{p}self_attn.q_norm.weight"), hd)?,
                    k_norm: norm(&format!("{p}self_attn.k_norm.weight"), hd)?,
                    o_proj: matrix(&format!("{p}self_attn.o_proj.weight"), h, c.q_dim())?,
                    post_attention_layernorm: norm(&format!("{p}post_attention_layernorm.weight"), h)?,
                    pre_feedforward_layernorm: norm(&format!("{p}pre_feedforward_layernorm.weight"), h)?,
                    gate_proj: matrix(&format!("{p}mlp.gate_proj.weight"), c.intermediate_size, h)?,
                    up_proj: matrix(&format!("{p}mlp.up_proj.weight"), c.intermediate_size, h)?,
                    down_proj: matrix(&format!("{p}mlp.down_proj.weight"), h, c.intermediate_size)?,
                    post_feedforward_layernorm: norm(&format!("{p}post_feedforward_layernorm.weight"), h)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Model {
            embed_tokens: matrix("embed_tokens.weight", c.vocab_size, h)?,
            layers,
            norm: norm("norm.weight", h)?,
            weights: wtype,
            embed_scale: (h as f64).sqrt() as f32,
            attn_scale: c.query_pre_attn_scalar.powf(-0.5) as f32,
            inv_freq_local: ops::rope_inv_freq(c.rope_local_base_freq, hd),
            inv_freq_global: ops::rope_inv_freq(c.rope_theta, hd),
            config,
        })
    }

    /// The first weight tensor holding a NaN or an infinity, with the element's index: a full
    /// scan, for the error path (tensors used in place from a file are not checked at load).
    pub fn first_non_finite_weight(&self) -> Option<(String, usize)> {
        let vector = |v: &[f32]| v.iter().position(|x| !x.is_finite());
        if let Some(i) = self.embed_tokens.first_non_finite() {
            return Some(("embed_tokens.weight".into(), i));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let Layer {
                input_layernorm,
                q_proj,
                k_proj,
                v_proj,
                q_norm,
                k_norm,
                o_proj,
                post_attention_layernorm,
                pre_feedforward_layernorm,
                gate_proj,
                up_proj,
                down_proj,
                post_feedforward_layernorm,
            } = layer;
            let found = [
                ("input_layernorm", vector(input_layernorm)),
                ("self_attn.q_proj", q_proj.first_non_finite()),
                ("self_attn.k_proj", k_proj.first_non_finite()),
                ("self_attn.v_proj", v_proj.first_non_finite()),
                ("self_attn.q_norm", vector(q_norm)),
                ("self_attn.k_norm", vector(k_norm)),
                ("self_attn.o_proj", o_proj.first_non_finite()),
                ("post_attention_layernorm", vector(post_attention_layernorm)),
                ("pre_feedforward_layernorm", vector(pre_feedforward_layernorm)),
                ("mlp.gate_proj", gate_proj.first_non_finite()),
                ("mlp.up_proj", up_proj.first_non_finite()),
                ("mlp.down_proj", down_proj.first_non_finite()),
                ("post_feedforward_layernorm", vector(post_feedforward_layernorm)),
            ];
            if let Some((name, Some(i))) = found.into_iter().find(|(_, i)| i.is_some()) {
                return Some((format!("layers.{l}.{name}.weight"), i));
            }
        }
        vector(&self.norm).map(|i| ("norm.weight".into(), i))
    }

    /// One weight matrix: used in place from the map when the file already holds the wanted
    /// type, else converted (refused if it holds a NaN or an infinity) and its source pages
    /// released.
    fn matrix(
        src: &Source,
        t: &Tensor,
        wtype: WeightType,
        rows: usize,
        cols: usize,
        threads: &Threads,
        advanced: &mut dyn FnMut(u64) -> Result<()>,
    ) -> Result<Matrix> {
        // Used in place from the map when the file already holds the wanted type.
        let in_place = match (wtype, t.ty) {
            (WeightType::Q8_0, GgmlType::Q8_0) => src.in_place(t).map(|data| Matrix::Q8_0 { data, rows, cols }),
            (WeightType::F32, GgmlType::F32) => src.in_place(t).map(|data| Matrix::F32 { data, rows, cols }),
            (WeightType::Bf16, GgmlType::BF16) => src.in_place(t).map(|data| Matrix::Bf16 { data, rows, cols }),
            _ => None,
        };
        if let Some(m) = in_place {
            return Ok(m);
        }
        let m = match wtype {
            WeightType::F32 => Matrix::F32 { data: finite_f32(t)?.into(), rows, cols },
            WeightType::Q8_0 if cols.is_multiple_of(QK8_0) => {
                Matrix::Q8_0 { data: pack_q8_0(src, t, rows, cols, threads, advanced)?.into(), rows, cols }
            }
            WeightType::Bf16 | WeightType::Q8_0 => {
                let mut bits = Vec::with_capacity(rows * cols);
                for_slabs(t, rows, cols, |r0, x| {
                    bits.extend(x.iter().map(|&v| f32_to_bf16(v)));
                    advanced(t.byte_range(r0 * cols..r0 * cols + x.len()).len() as u64)
                })?;
                Matrix::Bf16 { data: bits.into(), rows, cols }
            }
        };
        src.release(t, 0..t.data.len());
        Ok(m)
    }

    /// Every weight tensor of a Gemma 3 model: (Hugging Face name without `model.`, shape).
    /// Norms are 1-D.
    pub fn tensors(c: &Config) -> Vec<(String, Vec<usize>)> {
        let (h, q, kv, inter, hd) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size, c.head_dim);
        let mut v = vec![("embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
        for l in 0..c.num_hidden_layers {
            let p = |what: &str, shape: &[usize]| (format!("layers.{l}.{what}.weight"), shape.to_vec());
            v.extend([
                p("input_layernorm", &[h]),
                p("self_attn.q_proj", &[q, h]),
                p("self_attn.k_proj", &[kv, h]),
                p("self_attn.v_proj", &[kv, h]),
                p("self_attn.q_norm", &[hd]),
                p("self_attn.k_norm", &[hd]),
                p("self_attn.o_proj", &[h, q]),
                p("post_attention_layernorm", &[h]),
                p("pre_feedforward_layernorm", &[h]),
                p("mlp.gate_proj", &[inter, h]),
                p("mlp.up_proj", &[inter, h]),
                p("mlp.down_proj", &[h, inter]),
                p("post_feedforward_layernorm", &[h]),
            ]);
        }
        v.push(("norm.weight".to_string(), vec![h]));
        v
    }

    /// Bytes `load` would hold for the weights of `src` as `wtype`, from names and shapes only.
    pub fn plan_weight_bytes(c: &Config, src: &Source, wtype: WeightType) -> Result<usize> {
        let mut total = 0;
        for (name, shape) in Model::tensors(c) {
            checked(src, &name, &shape)?;
            total += match (shape.as_slice(), wtype) {
                (&[n], _) => 4 * n,
                (&[rows, cols], WeightType::F32) => 4 * rows * cols,
                (&[rows, cols], WeightType::Q8_0) if cols.is_multiple_of(QK8_0) => {
                    rows * (cols / QK8_0) * std::mem::size_of::<BlockQ8_0>()
                }
                (&[rows, cols], WeightType::Bf16 | WeightType::Q8_0) => 2 * rows * cols,
                _ => unreachable!("weights are 1-D or 2-D"),
            };
        }
        Ok(total)
    }

    /// Positions each layer's KV cache holds for sequences of `max_len` tokens: all of them on a
    /// global layer; on a sliding one, the window plus `CHUNK - 1` (a chunk writes its keys
    /// before its first query reads the window behind it), as a ring.
    pub fn cache_capacities(c: &Config, max_len: usize) -> Vec<usize> {
        c.layer_types
            .iter()
            .map(|t| match t {
                LayerType::Global => max_len,
                LayerType::Sliding => max_len.min(c.sliding_window + CHUNK - 1),
            })
            .collect()
    }

    /// Bytes of all weights, owned or used in place from a mapped file (those become resident
    /// as file pages once read).
    pub fn weight_bytes(&self) -> usize {
        let norms = |l: &Layer| {
            4 * (l.input_layernorm.len()
                + l.q_norm.len()
                + l.k_norm.len()
                + l.post_attention_layernorm.len()
                + l.pre_feedforward_layernorm.len()
                + l.post_feedforward_layernorm.len())
        };
        let mats = |l: &Layer| {
            [&l.q_proj, &l.k_proj, &l.v_proj, &l.o_proj, &l.gate_proj, &l.up_proj, &l.down_proj]
                .iter()
                .map(|m| m.bytes())
                .sum::<usize>()
        };
        self.embed_tokens.bytes() + 4 * self.norm.len() + self.layers.iter().map(|l| norms(l) + mats(l)).sum::<usize>()
    }

    /// Runs `tokens` (at most `CHUNK`), at positions `start..start + tokens.len()`, through the
    /// model. Positions before `start` must already be in `cache`. Afterwards `s.x` holds the
    /// final-normed hidden state of each token, `(tokens.len(), hidden)`.
    pub fn forward(&self, s: &mut Scratch, cache: &mut KvCache, tokens: &[u32], start: usize, threads: &Threads) {
        let c = &self.config;
        let n = tokens.len();
        assert!(n <= CHUNK && start + n <= cache.positions(), "forward: chunk out of range");
        let (h, hd, half) = (c.hidden_size, c.head_dim, c.head_dim / 2);
        let (q_dim, kv_dim, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);

        // Embedding rows, scaled by sqrt(hidden_size).
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &mut s.x[t * h..(t + 1) * h];
            self.embed_tokens.row_to_f32(tok as usize, row);
            row.iter_mut().for_each(|v| *v *= self.embed_scale);
        }
        // RoPE angles of these positions, for both bases.
        for (b, inv_freq) in [&self.inv_freq_local, &self.inv_freq_global].into_iter().enumerate() {
            for t in 0..n {
                let r = t * half..(t + 1) * half;
                ops::rope_cos_sin(start + t, inv_freq, &mut s.cos[b][r.clone()], &mut s.sin[b][r]);
            }
        }

        for (l, layer) in self.layers.iter().enumerate() {
            let rope_table = match c.layer_types[l] {
                LayerType::Sliding => 0,
                LayerType::Global => 1,
            };
            // Attention block: input_layernorm → q/k/v → q_norm/k_norm → RoPE → attention → o_proj.
            norm_into(threads, &mut s.xb, &s.x, n, h, &layer.input_layernorm, c.rms_norm_eps);
            let xb = self.activations(&s.xb, n, h, &mut s.xq, threads);
            ops::matmul(&mut s.q, &xb, &layer.q_proj, 0..q_dim, threads);
            ops::matmul(&mut s.k, &xb, &layer.k_proj, 0..kv_dim, threads);
            ops::matmul(&mut s.v, &xb, &layer.v_proj, 0..kv_dim, threads);
            let (cos, sin) = (&s.cos[rope_table], &s.sin[rope_table]);
            for (m, norm, width) in [(&mut s.q, &layer.q_norm, q_dim), (&mut s.k, &layer.k_norm, kv_dim)] {
                rows(threads, m, n, width, |t, heads| {
                    for head in heads.chunks_exact_mut(hd) {
                        ops::rms_norm_inplace(head, norm, c.rms_norm_eps);
                        ops::rope(head, &cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                    }
                });
            }
            for t in 0..n {
                cache.store(l, start + t, &s.k[t * kv_dim..(t + 1) * kv_dim], &s.v[t * kv_dim..(t + 1) * kv_dim]);
            }
            self.attention(s, cache, l, n, start, threads);
            let att = self.activations(&s.att, n, q_dim, &mut s.xq, threads);
            ops::matmul(&mut s.xb, &att, &layer.o_proj, 0..h, threads);
            // post_attention_layernorm, then the residual.
            norm_and_add(threads, &mut s.x, &mut s.xb, n, h, &layer.post_attention_layernorm, c.rms_norm_eps);

            // MLP block: pre_feedforward_layernorm → down(gelu_tanh(gate(x)) * up(x)) →
            // post_feedforward_layernorm → residual.
            norm_into(threads, &mut s.xb, &s.x, n, h, &layer.pre_feedforward_layernorm, c.rms_norm_eps);
            let xb = self.activations(&s.xb, n, h, &mut s.xq, threads);
            ops::matmul(&mut s.gate, &xb, &layer.gate_proj, 0..inter, threads);
            ops::matmul(&mut s.up, &xb, &layer.up_proj, 0..inter, threads);
            let (gate, up) = (SharedMut::new(&mut s.gate[..n * inter]), &s.up);
            threads.for_ranges(n * inter, 64, n * inter * 16, |_, r| {
                // SAFETY: ranges are disjoint between threads and inside `n * inter`.
                ops::gelu_tanh_mul(unsafe { gate.slice(r.start, r.len()) }, &up[r]);
            });
            let gate = self.activations(&s.gate, n, inter, &mut s.xq, threads);
            ops::matmul(&mut s.xb, &gate, &layer.down_proj, 0..h, threads);
            norm_and_add(threads, &mut s.x, &mut s.xb, n, h, &layer.post_feedforward_layernorm, c.rms_norm_eps);
        }
        // The final norm.
        for t in 0..n {
            ops::rms_norm_inplace(&mut s.x[t * h..(t + 1) * h], &self.norm, c.rms_norm_eps);
        }
    }

    /// Grouped-query attention of the chunk's queries `s.q` over the cached keys and values,
    /// into `s.att`. A query at position `p` sees keys `p - sliding_window < k <= p` on sliding
    /// layers and `k <= p` on global ones. No soft-cap on the scores: transformers' Gemma 3
    /// attention ignores `attn_logit_softcapping` (the tiny-mqa-softcap fixture sets it to 50 and
    /// its reference logits are those of uncapped scores).
    fn attention(&self, s: &mut Scratch, cache: &KvCache, layer: usize, n: usize, start: usize, threads: &Threads) {
        let c = &self.config;
        let (hd, heads) = (c.head_dim, c.num_attention_heads);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let group = heads / c.num_key_value_heads;
        let capacity = cache.positions();
        let window = match c.layer_types[layer] {
            LayerType::Sliding => c.sliding_window,
            LayerType::Global => usize::MAX,
        };
        // One item is a token and `per_item` query heads of one key/value group: a whole group
        // shares each key and value load, unless that leaves too few items for the threads
        // (decoding). Either way each (token, head) gets the same bits.
        let per_item = if n * c.num_key_value_heads >= 2 * threads.count() { group } else { 1 };
        let att = SharedMut::new(&mut s.att);
        assert!(s.scores.len() >= threads.count() * per_item * capacity, "scores buffer sized for fewer threads");
        let scores_all = SharedMut::new(&mut s.scores);
        let q = &s.q;
        let work = n * heads * (start + n).min(window) * hd * 2;
        threads.for_ranges(n * heads / per_item, 1, work, |part, items| {
            // SAFETY: each part owns its own `per_item * capacity` slice of the scores buffer.
            let scores_buf = unsafe { scores_all.slice(part * per_item * capacity, per_item * capacity) };
            for item in items {
                // Items run over tokens zig-zag (first, last, second, second to last, …), so
                // that every contiguous share of them holds as many keys as another.
                let (k, group_of) = (item / (heads / per_item), item % (heads / per_item));
                let t = if k % 2 == 0 { k / 2 } else { n - 1 - k / 2 };
                let head0 = group_of * per_item;
                let pos = start + t;
                let first = (pos + 1).saturating_sub(window);
                let len = pos - first + 1;
                let kv_off = (head0 / group) * hd;
                let qh = &q[t * q_dim + head0 * hd..t * q_dim + (head0 + per_item) * hd];
                let scores = &mut scores_buf[..per_item * len];
                let keys = cache.keys(layer, first, pos);
                ops::attention_scores(scores, qh, keys, kv_dim, kv_off, self.attn_scale);
                for row in scores.chunks_exact_mut(len) {
                    ops::softmax(row);
                }
                // SAFETY: items are disjoint between parts, so are their output rows.
                let out = unsafe { att.slice(t * q_dim + head0 * hd, per_item * hd) };
                let values = cache.values(layer, first, pos);
                ops::attention_values(out, scores, values, kv_dim, kv_off);
            }
        });
    }

    /// `x (n, cols)` as this model's matmuls take it: quantized once into `buf` for Q8_0 weights.
    pub fn activations<'a>(
        &self,
        x: &'a [f32],
        n: usize,
        cols: usize,
        buf: &'a mut QuantBuf,
        threads: &Threads,
    ) -> Activations<'a> {
        match self.weights {
            WeightType::Q8_0 => Activations::quantized(x, n, cols, buf, threads),
            WeightType::F32 | WeightType::Bf16 => Activations::f32(x, n, cols),
        }
    }

    /// Logits `(n, rows.len())` of the hidden states `x (n, hidden)` for vocabulary rows `rows`:
    /// the tied lm_head, then the final soft-cap when the config has one.
    pub fn lm_head(&self, out: &mut [f32], x: &Activations, rows: std::ops::Range<usize>, threads: &Threads) {
        let (n, m) = (x.n(), rows.len());
        ops::matmul(out, x, &self.embed_tokens, rows, threads);
        if let Some(cap) = self.config.final_logit_softcapping {
            ops::softcap(&mut out[..n * m], cap);
        }
    }
}

/// Calls `f(t, row)` for each row `t` of `m (n, width)`, the rows split across threads.
fn rows(threads: &Threads, m: &mut [f32], n: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let shared = SharedMut::new(&mut m[..n * width]);
    threads.for_ranges(n, 1, n * width * 16, |_, ts| {
        for t in ts {
            // SAFETY: token ranges are disjoint between threads, and row `t` is inside `m`.
            f(t, unsafe { shared.slice(t * width, width) });
        }
    });
}

/// The start of a block: `out = rms_norm(x) * w1`, row by row.
fn norm_into(threads: &Threads, out: &mut [f32], x: &[f32], n: usize, width: usize, w1: &[f32], eps: f32) {
    rows(threads, out, n, width, |t, out| ops::rms_norm(out, &x[t * width..(t + 1) * width], w1, eps));
}

/// The end of a block: `out` normed in place by `w1`, then added to the residual stream `x`.
fn norm_and_add(threads: &Threads, x: &mut [f32], out: &mut [f32], n: usize, width: usize, w1: &[f32], eps: f32) {
    let x = SharedMut::new(&mut x[..n * width]);
    rows(threads, out, n, width, |t, out| {
        ops::rms_norm_inplace(out, w1, eps);
        // SAFETY: row `t` of `x` belongs to the thread that has row `t` of `out`.
        let x = unsafe { x.slice(t * width, width) };
        x.iter_mut().zip(out.iter()).for_each(|(x, &o)| *x += o);
    });
}

/// Source bytes converted per step (Q8_0 packing, bf16 conversion, `pack`): the most of a
/// tensor's source that is resident, and of its f32 copy, at a time.
const SLAB_BYTES: usize = 1 << 20;

/// The `(rows, cols)` tensor `t` as Q8_0 blocks, quantized from the map a slab of rows at a
/// time (dequantized first when the file holds another quantization); each slab's pages are
/// released once packed, so loading never holds the whole source tensor resident, nor any
/// full-precision copy of it.
/// `advanced(bytes)` is told the source bytes of each slab done.
pub fn pack_q8_0(
    src: &Source,
    t: &Tensor,
    rows: usize,
    cols: usize,
    threads: &Threads,
    advanced: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<Vec<BlockQ8_0>> {
    let per_row = cols / QK8_0;
    let mut out = vec![BlockQ8_0::default(); rows * per_row];
    for_slabs(t, rows, cols, |r0, x| {
        let n = x.len() / cols;
        quantize_rows(x, cols, &mut out[r0 * per_row..(r0 + n) * per_row], threads);
        let range = t.byte_range(r0 * cols..(r0 + n) * cols);
        let bytes = range.len() as u64;
        src.release(t, range);
        advanced(bytes)
    })?;
    check_q8_0_scales(t, &out)?;
    Ok(out)
}

/// Q8_0 blocks quantized from the finite values of `t`: a block whose values exceed what an f16
/// scale can hold (|x| > 65504 × 127) got an infinite scale; refused, naming the way out.
pub fn check_q8_0_scales(t: &Tensor, blocks: &[BlockQ8_0]) -> Result<()> {
    match blocks.iter().position(|b| b.d & 0x7C00 == 0x7C00) {
        None => Ok(()),
        Some(i) => Err(Error::format(
            t.path(),
            format!(
                "tensor {} has values too large for Q8_0 (block {i}: f16 scales hold at most \
                 65504 × 127); load it with weights=\"bf16\" or \"f32\"",
                t.name
            ),
        )),
    }
}

/// The rows of `x (n, cols)` quantized into `out` (`cols / 32` blocks a row), split across
/// threads.
pub fn quantize_rows(x: &[f32], cols: usize, out: &mut [BlockQ8_0], threads: &Threads) {
    let (n, per_row) = (x.len() / cols, cols / QK8_0);
    assert_eq!(out.len(), n * per_row, "quantize_rows: output length");
    let blocks = SharedMut::new(out);
    threads.for_ranges(n, 1, n * cols * 4, |_, r| {
        // SAFETY: row ranges are disjoint between threads and inside `out`.
        let blocks = unsafe { blocks.slice(r.start * per_row, r.len() * per_row) };
        quant::quantize_row_q8_0(&x[r.start * cols..r.end * cols], blocks);
    });
}

/// Calls `f(first_row, values)` for consecutive slabs of rows of `t (rows, cols)` read as f32,
/// about `SLAB_BYTES` of source each, and stops at its first error; a NaN or infinite value is
/// an error too (Q8_0 packing would silently turn a NaN into 0: the block's maximum skips it).
pub fn for_slabs(t: &Tensor, rows: usize, cols: usize, mut f: impl FnMut(usize, &[f32]) -> Result<()>) -> Result<()> {
    let row_bytes = t.byte_range(0..cols).len().max(1);
    let slab = (SLAB_BYTES / row_bytes).max(1);
    let mut buf = vec![0f32; slab.min(rows) * cols];
    for r0 in (0..rows).step_by(slab) {
        let r1 = (r0 + slab).min(rows);
        let x = &mut buf[..(r1 - r0) * cols];
        t.read_f32(r0 * cols, x);
        check_finite(t, r0 * cols, x)?;
        f(r0, x)?;
    }
    Ok(())
}

/// The whole tensor as f32, refused if it holds a NaN or an infinity.
pub fn finite_f32(t: &Tensor) -> Result<Vec<f32>> {
    let v = t.to_f32();
    check_finite(t, 0, &v)?;
    Ok(v)
}

/// `x`, values `first..` of `t`, must be finite.
fn check_finite(t: &Tensor, first: usize, x: &[f32]) -> Result<()> {
    if let Some(i) = ops::first_non_finite(x) {
        let i = first + i;
        let what = format!("tensor {} holds a NaN or infinite value (element {i})", t.name);
        return Err(Error::format(t.path(), what));
    }
    Ok(())
}

/// The tensor `name`, checked to be of `shape`.
fn checked<'a>(src: &'a Source, name: &str, shape: &[usize]) -> Result<Tensor<'a>> {
    let t = src.tensor(name)?;
    if t.shape != shape {
        let path = t.path().to_path_buf();
        return Err(Error::ShapeMismatch { path, name: t.name, expected: shape.to_vec(), found: t.shape });
    }
    Ok(t)
}
