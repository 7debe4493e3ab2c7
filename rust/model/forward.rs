//! The Gemma 3 forward pass (transformers' modeling_gemma3.py is the reference).
//!
//! `forward` runs a chunk of consecutive tokens through every layer, writing their keys and
//! values into the cache and leaving the final-normed hidden states in `Scratch::x`; `lm_head`
//! turns hidden states into logits with the tied embedding.

use crate::error::Result;
use crate::kernels::matrix::Matrix;
use crate::kernels::ops::{self, Activations, Values};
use crate::kernels::quant::gemm::{PackedQ8_0, QuantizedActs};
use crate::kernels::threads::{split_rows, Threads};
use crate::model::config::{Config, LayerType};
use crate::model::fast_head::{Choice, FastHead};
use crate::model::kv_cache::{KvCache, KvDtype};
use crate::model::schema::{Layer, LoadWeight, Outer, TensorName, WeightRef, WeightType};

/// Tokens per forward chunk: prefill runs as matrix × matrix on this many tokens at a time, so
/// the scratch buffers have a fixed size whatever the prompt length.
pub const CHUNK: usize = 128;

/// Prefill's attention: tokens that share each block of keys and values (their scores: a
/// `TOKEN_TILE × group × capacity` buffer per thread) ...
const TOKEN_TILE: usize = 4;
/// ... and keys per block (16 rows of a 256-wide head: 16 KiB of keys, then of values, in L1).
const KEY_BLOCK: usize = 16;

/// Gemma 3's weights and what the forward pass derives from the config once.
pub struct Transformer {
    pub config: Config,
    pub outer: Outer,
    pub layers: Vec<Layer>,
    pub weights: WeightType,
    /// The shadow of a tied Q8_0 head that decides greedy tokens reading fewer bytes
    /// (`fast_head`); None unless `with_fast_head` made one.
    pub fast_head: Option<FastHead>,
    /// `sqrt(hidden_size)` rounded to f32, the embedding multiplier.
    embed_scale: f32,
    /// `query_pre_attn_scalar ** -0.5`.
    attn_scale: f32,
    inv_freq_local: Vec<f32>,  // (head_dim / 2)
    inv_freq_global: Vec<f32>, // (head_dim / 2)
}

/// Activations of one chunk, sized at load; nothing here grows.
pub struct Scratch {
    pub x: Vec<f32>,       // (CHUNK, hidden) residual stream; final-normed after `forward`
    xb: Vec<f32>,          // (CHUNK, hidden) normed input / block output
    q: Vec<f32>,           // (CHUNK, heads * head_dim)
    k: Vec<f32>,           // (CHUNK, kv_dim)
    v: Vec<f32>,           // (CHUNK, kv_dim)
    att: Vec<f32>,         // (CHUNK, heads * head_dim)
    gate: Vec<f32>,        // (CHUNK, intermediate)
    up: Vec<f32>,          // (CHUNK, intermediate)
    cos: [Vec<f32>; 2],    // [local, global] × (CHUNK, head_dim / 2)
    sin: [Vec<f32>; 2],    // [local, global] × (CHUNK, head_dim / 2)
    scores: Vec<f32>,      // (threads, TOKEN_TILE, group, capacity) attention weights of a tile
    pub logits: Vec<f32>,  // (vocab)
    pub xq: QuantizedActs, // (CHUNK, max(hidden, q_dim, intermediate)) a matmul input, quantized
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
            scores: z(threads * TOKEN_TILE * Self::group(c) * capacity),
            logits: z(c.vocab_size),
            xq: QuantizedActs::with_capacity(CHUNK * Self::widest_input(c)),
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
            + threads * TOKEN_TILE * Self::group(c) * capacity
            + c.vocab_size;
        floats * 4 + QuantizedActs::bytes_for(CHUNK * Self::widest_input(c))
    }
}

/// One sequence's part of a `forward_segments` pass: `tokens` at positions `start..`, whose
/// keys and values go to (and whose queries read) `cache`.
pub struct Segment<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: &'a [u32],
    pub start: usize,
}

impl Transformer {
    /// The weights of a model of `config`, every tensor of the schema read through `from`.
    pub fn load(config: Config, from: &mut dyn LoadWeight, weights: WeightType) -> Result<Transformer> {
        let c = &config;
        let outer = Outer::load(from, c, None)?;
        let layers = (0..c.num_hidden_layers).map(|l| Layer::load(from, c, Some(l))).collect::<Result<Vec<_>>>()?;
        Ok(Transformer {
            outer,
            layers,
            weights,
            fast_head: None,
            embed_scale: (c.hidden_size as f64).sqrt() as f32,
            attn_scale: c.query_pre_attn_scalar.powf(-0.5) as f32,
            inv_freq_local: ops::rope_inv_freq(c.rope_local_base_freq, c.head_dim),
            inv_freq_global: ops::rope_inv_freq(c.rope_theta, c.head_dim),
            config,
        })
    }

    /// Every weight with its name, in `schema::all_tensors` order.
    pub fn tensors(&self) -> impl Iterator<Item = (TensorName, WeightRef<'_>)> {
        let outer = self.outer.tensors().map(|(spec, w)| (TensorName { spec, layer: None }, w));
        let blocks = self
            .layers
            .iter()
            .enumerate()
            .flat_map(|(l, layer)| layer.tensors().map(move |(spec, w)| (TensorName { spec, layer: Some(l) }, w)));
        outer.chain(blocks)
    }

    /// The first weight tensor holding a NaN or an infinity, with the element's index: a full
    /// scan, for the error path (tensors the file held in the wanted type are not checked at load).
    pub fn first_non_finite_weight(&self) -> Option<(String, usize)> {
        self.tensors().find_map(|(name, w)| w.first_non_finite().map(|i| (name.hf(), i)))
    }

    /// Bytes of all weights, owned or used in place from a mapped file (those become resident
    /// as file pages once read); `schema::weight_bytes` predicts it from the config.
    pub fn weight_bytes(&self) -> usize {
        self.tensors().map(|(_, w)| w.bytes()).sum::<usize>() + self.fast_head.as_ref().map_or(0, FastHead::bytes)
    }

    /// Builds the fast head's shadow when the tied head is held as Q8_0 (see `fast_head`).
    pub fn with_fast_head(&mut self, threads: &Threads) {
        if let Matrix::Q8_0(head) = &self.outer.embed_tokens {
            self.fast_head = FastHead::new(head, threads);
        }
    }

    /// The greedy token of `x` (one token) as the full lm_head's argmax would choose it, read
    /// from the fast head's shadow; None when there is none, the config soft-caps the logits
    /// (which may merge distinct logits into ties), or the shadow cannot decide (the caller then
    /// runs `lm_head`). `scores` (vocab floats) is scratch.
    pub fn greedy_token(&self, x: &Activations, scores: &mut [f32], threads: &Threads) -> Option<Choice> {
        let (fast, head, acts) = self.fast_parts(x)?;
        fast.argmax(head, acts, scores, threads)
    }

    /// The fast head, the Q8_0 head it shadows and `x`'s one quantized token, when the fast head
    /// may decide (see `greedy_token`).
    fn fast_parts<'a>(&'a self, x: &Activations<'a>) -> Option<(&'a FastHead, &'a PackedQ8_0, &'a QuantizedActs)> {
        let (fast, acts) = (self.fast_head.as_ref()?, x.quantized_parts()?);
        let Matrix::Q8_0(head) = &self.outer.embed_tokens else { return None };
        (self.config.final_logit_softcapping.is_none() && acts.n() == 1).then_some((fast, head, acts))
    }

    /// The lm_head's logits of `x` (one token) for the rows that can be among the `k` largest,
    /// −inf for the others, from the fast head's shadow (see `greedy_token` for when there is
    /// none); the rows rescored.
    pub fn top_k_logits(&self, x: &Activations, k: usize, logits: &mut [f32], threads: &Threads) -> Option<usize> {
        let (fast, head, acts) = self.fast_parts(x)?;
        fast.top_k(head, acts, k, logits, threads)
    }

    /// Runs `tokens` (at most `CHUNK`), at positions `start..start + tokens.len()`, through the
    /// model. Positions before `start` must already be in `cache`. Afterwards `s.x` holds the
    /// final-normed hidden state of each token, `(tokens.len(), hidden)`.
    pub fn forward(&self, s: &mut Scratch, cache: &mut KvCache, tokens: &[u32], start: usize, threads: &Threads) {
        self.forward_segments(s, &mut [Segment { cache, tokens, start }], threads);
    }

    /// `forward` of several sequences at once, each its own cache (at most `CHUNK` tokens in
    /// all): the matmuls read each weight once for all their tokens (batched decoding), and
    /// attention reads each segment's own cache. `s.x` then holds the segments' hidden states
    /// one after the other. Every token gets the bits `forward` of its segment alone gives.
    pub fn forward_segments(&self, s: &mut Scratch, segments: &mut [Segment<'_>], threads: &Threads) {
        let c = &self.config;
        let n: usize = segments.iter().map(|g| g.tokens.len()).sum();
        assert!(n <= CHUNK, "forward: more than CHUNK tokens");
        for g in segments.iter() {
            assert!(g.start + g.tokens.len() <= g.cache.positions(), "forward: segment out of range");
        }
        let (h, hd, half) = (c.hidden_size, c.head_dim, c.head_dim / 2);
        let (q_dim, kv_dim, inter) = (c.q_dim(), c.kv_dim(), c.intermediate_size);
        // Row `t` of the scratch: the token and its position.
        let at = || segments.iter().flat_map(|g| g.tokens.iter().enumerate().map(move |(i, &tok)| (tok, g.start + i)));

        // Embedding rows, scaled by sqrt(hidden_size).
        for (t, (tok, _)) in at().enumerate() {
            let row = &mut s.x[t * h..(t + 1) * h];
            self.outer.embed_tokens.row_to_f32(tok as usize, row);
            row.iter_mut().for_each(|v| *v *= self.embed_scale);
        }
        // RoPE angles of these positions, for both bases.
        for (b, inv_freq) in [&self.inv_freq_local, &self.inv_freq_global].into_iter().enumerate() {
            for (t, (_, pos)) in at().enumerate() {
                let r = t * half..(t + 1) * half;
                ops::rope_cos_sin(pos, inv_freq, &mut s.cos[b][r.clone()], &mut s.sin[b][r]);
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
            let mut row = 0;
            for g in segments.iter_mut() {
                let rows = row..row + g.tokens.len();
                for (t, pos) in rows.clone().zip(g.start..) {
                    g.cache.store(l, pos, &s.k[t * kv_dim..(t + 1) * kv_dim], &s.v[t * kv_dim..(t + 1) * kv_dim]);
                }
                let (q, att) = (&s.q[rows.start * q_dim..rows.end * q_dim], &mut s.att[rows.start * q_dim..]);
                self.attention(q, att, &mut s.scores, g.cache, l, g.start, threads);
                row = rows.end;
            }
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
            let up = &s.up;
            threads.for_rows_mut(&mut s.gate[..n * inter], 1, 64, n * inter * 16, |r, gate| {
                ops::gelu_tanh_mul(gate, &up[r]);
            });
            let gate = self.activations(&s.gate, n, inter, &mut s.xq, threads);
            ops::matmul(&mut s.xb, &gate, &layer.down_proj, 0..h, threads);
            norm_and_add(threads, &mut s.x, &mut s.xb, n, h, &layer.post_feedforward_layernorm, c.rms_norm_eps);
        }
        // The final norm.
        for t in 0..n {
            ops::rms_norm_inplace(&mut s.x[t * h..(t + 1) * h], &self.outer.norm, c.rms_norm_eps);
        }
    }

    /// Grouped-query attention of one segment's queries `q (n, q_dim)`, at positions `start..`,
    /// over `cache`'s keys and values, into `att`'s first `n` rows (`scores`: the scratch's).
    /// A query at position `p` sees keys `p - sliding_window < k <= p` on sliding layers and
    /// `k <= p` on global ones. No soft-cap on the scores: transformers' Gemma 3
    /// attention ignores `attn_logit_softcapping` (the tiny-mqa-softcap fixture sets it to 50 and
    /// its reference logits are those of uncapped scores).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &[f32],
        att: &mut [f32],
        scores: &mut [f32],
        cache: &KvCache,
        layer: usize,
        start: usize,
        threads: &Threads,
    ) {
        let n = q.len() / self.config.q_dim();
        // An f16 cache is widened a block at a time, which the tiled path does.
        if n >= 2 * TOKEN_TILE * threads.count() || cache.dtype() == KvDtype::F16 {
            return self.attention_tiled(q, att, scores, cache, layer, start, threads);
        }
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
        let items_per_token = heads / per_item;
        // Token `t` reads `min(start + t + 1, window)` keys: the threads get runs of items of
        // about equal work. Item `i` is token `i / items_per_token`, heads from `per_item * (i %
        // items_per_token)`, and its output the `i`-th `per_item * hd` values of `att`.
        let keys_of = |t: usize| (start + t + 1).min(window);
        let work = n * heads * keys_of(n - 1) * hd * 2;
        let ranges = threads.ranges_by_weight(n * items_per_token, work, |i| keys_of(i / items_per_token));
        let outs = split_rows(&mut att[..n * q_dim], per_item * hd, &ranges);
        let scores = scores.chunks_mut(per_item * capacity);
        assert!(scores.len() >= ranges.len(), "scores buffer sized for fewer threads");
        let parts = ranges.into_iter().zip(outs).zip(scores).collect();
        threads.run(parts, |_, ((items, out), scores_buf)| {
            for (item, out) in items.zip(out.chunks_exact_mut(per_item * hd)) {
                let (t, head0) = (item / items_per_token, item % items_per_token * per_item);
                let pos = start + t;
                let first = (pos + 1).saturating_sub(window);
                let len = pos - first + 1;
                let kv_off = (head0 / group) * hd;
                let qh = &q[t * q_dim + head0 * hd..t * q_dim + (head0 + per_item) * hd];
                let scores = &mut scores_buf[..per_item * len];
                let mut unused = Vec::new(); // an f32 cache: its own rows, no copy
                let keys = cache.keys(layer, first, pos, &mut unused);
                ops::attention_scores(scores, qh, keys, kv_dim, kv_off, self.attn_scale);
                for row in scores.chunks_exact_mut(len) {
                    ops::softmax(row);
                }
                let mut unused = Vec::new();
                let values = cache.values(layer, first, pos, &mut unused);
                ops::attention_values(out, scores, values, kv_dim, kv_off);
            }
        });
    }

    /// Prefill's attention: the same bits as `attention` (decode's), computed so that the
    /// `TOKEN_TILE` tokens of a tile share every block of `KEY_BLOCK` keys and values while it
    /// is in L1: per key/value group, the tile's scores block by block, a softmax per row, then
    /// the weighted values block by block, each sum continuing from the blocks before it in key
    /// order. Threads take runs of tiles of about equal key work.
    #[allow(clippy::too_many_arguments)]
    fn attention_tiled(
        &self,
        q: &[f32],
        att: &mut [f32],
        scores: &mut [f32],
        cache: &KvCache,
        layer: usize,
        start: usize,
        threads: &Threads,
    ) {
        let c = &self.config;
        let n = q.len() / c.q_dim();
        let (hd, kv_heads) = (c.head_dim, c.num_key_value_heads);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let group = c.num_attention_heads / kv_heads;
        let capacity = cache.positions();
        let window = match c.layer_types[layer] {
            LayerType::Sliding => c.sliding_window,
            LayerType::Global => usize::MAX,
        };
        // Token `t` attends to positions `first(t) ..= start + t`.
        let first = |t: usize| (start + t + 1).saturating_sub(window);
        let keys_of = |t: usize| start + t + 1 - first(t);
        let tiles = n.div_ceil(TOKEN_TILE);
        let tile_tokens = |i: usize| i * TOKEN_TILE..((i + 1) * TOKEN_TILE).min(n);
        let work = n * c.num_attention_heads * keys_of(n - 1) * hd * 2;
        let by_tile = threads.ranges_by_weight(tiles, work, |i| tile_tokens(i).map(keys_of).sum());
        let by_token: Vec<_> = by_tile.iter().map(|r| r.start * TOKEN_TILE..(r.end * TOKEN_TILE).min(n)).collect();
        let outs = split_rows(&mut att[..n * q_dim], q_dim, &by_token);
        let scores = scores.chunks_mut(TOKEN_TILE * group * capacity);
        assert!(scores.len() >= by_token.len(), "scores buffer sized for fewer threads");
        let scale = self.attn_scale;
        let parts = by_token.into_iter().zip(outs).zip(scores).collect();
        threads.run(parts, |_, ((tokens, out), buf)| {
            // A block of an f16 cache, widened (unused with f32).
            let mut widened = Vec::new();
            let t_start = tokens.start;
            for t0 in tokens.step_by(TOKEN_TILE) {
                let t1 = (t0 + TOKEN_TILE).min(t_start + out.len() / q_dim);
                // The keys any token of the tile reads, in blocks.
                let (lo, hi) = (first(t0), start + t1 - 1);
                let blocks = || (lo..=hi).step_by(KEY_BLOCK).map(|b| b..=(b + KEY_BLOCK - 1).min(hi));
                // Token t's part of block b: positions a ..= z, and its rows in `buf`.
                let part = |t: usize, b: &std::ops::RangeInclusive<usize>| {
                    let (a, z) = ((*b.start()).max(first(t)), (*b.end()).min(start + t));
                    (a <= z).then_some((a, z))
                };
                for g in 0..kv_heads {
                    let kv_off = g * hd;
                    for b in blocks() {
                        let block = cache.keys(layer, *b.start(), *b.end(), &mut widened);
                        for t in t0..t1 {
                            let Some((a, z)) = part(t, &b) else { continue };
                            let rows = &mut buf[(t - t0) * group * capacity + (a - first(t))..];
                            let qh = &q[t * q_dim + g * group * hd..t * q_dim + (g + 1) * group * hd];
                            let kr = sub_rows(block, a - b.start(), z + 1 - b.start(), kv_dim);
                            let keys = Values { rows: kr, stride: kv_dim, offset: kv_off };
                            ops::attention_scores_into(rows, capacity, group, qh, keys, scale);
                        }
                    }
                    for t in t0..t1 {
                        let rows = &mut buf[(t - t0) * group * capacity..];
                        for row in rows.chunks_mut(capacity).take(group) {
                            ops::softmax(&mut row[..keys_of(t)]);
                        }
                    }
                    for b in blocks() {
                        let block = cache.values(layer, *b.start(), *b.end(), &mut widened);
                        for t in t0..t1 {
                            let Some((a, z)) = part(t, &b) else { continue };
                            let o = &mut out[(t - t_start) * q_dim + g * group * hd..][..group * hd];
                            let p = &buf[(t - t0) * group * capacity + (a - first(t))..];
                            let vr = sub_rows(block, a - b.start(), z + 1 - b.start(), kv_dim);
                            let values = Values { rows: vr, stride: kv_dim, offset: kv_off };
                            ops::attention_values_into(o, group, p, capacity, values, a > first(t));
                        }
                    }
                }
            }
        });
    }

    /// `x (n, cols)` as this model's matmuls take it: quantized once into `buf` for Q8_0 weights.
    pub fn activations<'a>(
        &self,
        x: &'a [f32],
        n: usize,
        cols: usize,
        buf: &'a mut QuantizedActs,
        threads: &Threads,
    ) -> Activations<'a> {
        if self.weights.quantized() {
            Activations::quantized(x, n, cols, threads, buf)
        } else {
            Activations::f32(x, n, cols)
        }
    }

    /// Logits `(n, rows.len())` of the hidden states `x (n, hidden)` for vocabulary rows `rows`:
    /// the tied lm_head, then the final soft-cap when the config has one.
    pub fn lm_head(&self, out: &mut [f32], x: &Activations, rows: std::ops::Range<usize>, threads: &Threads) {
        let (n, m) = (x.n(), rows.len());
        ops::matmul(out, x, &self.outer.embed_tokens, rows, threads);
        if let Some(cap) = self.config.final_logit_softcapping {
            ops::softcap(&mut out[..n * m], cap);
        }
    }
}

/// Rows `i..j` (of `stride` floats) of two segments read as one sequence, as two segments.
fn sub_rows(r: [&[f32]; 2], i: usize, j: usize, stride: usize) -> [&[f32]; 2] {
    let n0 = r[0].len() / stride;
    let first = &r[0][i.min(n0) * stride..j.min(n0) * stride];
    let second = &r[1][(i.max(n0) - n0) * stride..(j.max(n0) - n0) * stride];
    [first, second]
}

/// Calls `f(t, row)` for each row `t` of `m (n, width)`, the rows split across threads.
fn rows(threads: &Threads, m: &mut [f32], n: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    threads.for_rows_mut(&mut m[..n * width], width, 1, n * width * 16, |ts, chunk| {
        for (t, row) in ts.zip(chunk.chunks_exact_mut(width)) {
            f(t, row);
        }
    });
}

/// The start of a block: `out = rms_norm(x) * w1`, row by row.
fn norm_into(threads: &Threads, out: &mut [f32], x: &[f32], n: usize, width: usize, w1: &[f32], eps: f32) {
    rows(threads, out, n, width, |t, out| ops::rms_norm(out, &x[t * width..(t + 1) * width], w1, eps));
}

/// The end of a block: `out` normed in place by `w1`, then added to the residual stream `x`.
fn norm_and_add(threads: &Threads, x: &mut [f32], out: &mut [f32], n: usize, width: usize, w1: &[f32], eps: f32) {
    let ranges = threads.ranges(n, 1, n * width * 16);
    let xs = split_rows(&mut x[..n * width], width, &ranges);
    let outs = split_rows(&mut out[..n * width], width, &ranges);
    threads.run(xs.into_iter().zip(outs).collect(), |_, (x, out)| {
        for (x, out) in x.chunks_exact_mut(width).zip(out.chunks_exact_mut(width)) {
            ops::rms_norm_inplace(out, w1, eps);
            x.iter_mut().zip(out.iter()).for_each(|(x, &o)| *x += o);
        }
    });
}
