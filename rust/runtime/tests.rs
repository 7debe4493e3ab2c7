//! Tests of a loaded model against transformers' logits (the tiny checkpoints of
//! tests/fixtures), of generation's limits and seeds, and of the sliding rings under prefix reuse.

use crate::kernels::threads::Threads;
use crate::model::forward::Scratch;
use crate::model::kv_cache::{KvCache, KvDtype};
use crate::model::schema::WeightType;
use crate::runtime::generate::{FinishReason, GenerateParams, Generation};
use crate::runtime::sampler::SamplingParams;
use crate::runtime::{never, LoadOptions, Model};
use crate::testing::fixtures;
use std::path::Path;
use std::sync::Arc;

/// transformers' `input_ids` (40 tokens) and `logits` (40 × vocab) for a tiny checkpoint.
fn reference(dir: &Path) -> (Vec<u32>, Vec<f32>) {
    let st = crate::formats::safetensors::SafeTensors::open_files(&[dir.join("reference.safetensors")]).unwrap();
    let ids = st.get("input_ids").unwrap().data.chunks_exact(8);
    let ids = ids.map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    let logits = st.get("logits").unwrap();
    (ids, logits.to_f32(dir).unwrap())
}

/// Options of a tiny model: its cap, weight type and threads, an f32 cache.
fn tiny_opts(max_inference_len: usize, weights: WeightType, threads: usize) -> LoadOptions {
    LoadOptions { max_inference_len: Some(max_inference_len), weights, threads: Some(threads), ..Default::default() }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn tiny_checkpoints_match_transformers_in_one_pass_and_token_by_token() {
    for name in ["tiny-gqa", "tiny-mqa-softcap"] {
        let dir = fixtures().join("tiny").join(name);
        let (ids, want) = reference(&dir);
        // bf16, Q8_0 and the low-bit types round the weights (all but bf16 the activations too),
        // an f16 cache the keys and values: close, not exact.
        let cases = [
            (WeightType::F32, KvDtype::F32, 1e-3),
            (WeightType::F32, KvDtype::F16, 0.05),
            (WeightType::Bf16, KvDtype::F32, 0.25),
            (WeightType::Q8_0, KvDtype::F32, 1.0),
            (WeightType::Q8_0, KvDtype::F16, 1.0),
            // The tiny models' 64-wide rows take Q5_0 for Q4_K and Q8_0 for Q6_K.
            (WeightType::Q4_0, KvDtype::F32, 5.0),
            (WeightType::Q4KM, KvDtype::F32, 2.5),
        ];
        for (weights, kv_dtype, tol) in cases {
            for threads in [1, 2] {
                let opts = LoadOptions { weights, kv_dtype, threads: Some(threads), ..Default::default() };
                let engine = Model::load(&dir, &opts).unwrap();
                let vocab = engine.config().vocab_size;
                let mut full = vec![0f32; ids.len() * vocab];
                engine.logits(&engine.slot, &ids, &mut full, &mut never).unwrap();
                let err = max_abs_diff(&full, &want);
                assert!(err < tol, "{name} {weights:?} {kv_dtype:?}: one pass off by {err}");

                // One token at a time through the KV cache: each call reuses all but the new token.
                let mut s = engine.session();
                s.tokens.clear();
                let mut stepped = vec![0f32; ids.len() * vocab];
                for i in 0..ids.len() {
                    let reused =
                        s.extend_to(&engine.transformer, &ids[..=i], &engine.threads, &mut never, |scratch, _, n| {
                            assert_eq!(n, 1);
                            let h = engine.transformer.config.hidden_size;
                            let x = engine.transformer.activations(&scratch.x, 1, h, &mut scratch.xq, &engine.threads);
                            engine.transformer.lm_head(
                                &mut stepped[i * vocab..(i + 1) * vocab],
                                &x,
                                0..vocab,
                                &engine.threads,
                            );
                        });
                    assert_eq!(reused.unwrap(), i);
                }
                // Same bits as the batched pass: a token's arithmetic does not depend on its batch.
                assert_eq!(stepped, full, "{name} {weights:?} {kv_dtype:?}: token-by-token differs from one pass");
            }
        }
    }
}

#[test]
fn generation_stops_at_the_cap_and_is_reproducible() {
    let dir = fixtures().join("tiny").join("tiny-gqa");
    let (ids, _) = reference(&dir);
    let opts = tiny_opts(12, WeightType::F32, 1);
    let engine = Arc::new(Model::load(&dir, &opts).unwrap());
    assert!(Generation::new(engine.clone(), ids[..13].to_vec(), GenerateParams::default()).is_err());
    // A prompt that fills the cap leaves no room to generate: an error that says so, not an
    // empty completion (with nothing to generate, it is fine).
    let one = GenerateParams { max_new_tokens: 1, ..Default::default() };
    let full = Generation::new(engine.clone(), ids[..12].to_vec(), one).err().unwrap();
    assert!(full.to_string().contains("leaves no room to generate"), "{full}");
    let none = Generation::new(engine.clone(), ids[..12].to_vec(), GenerateParams::default());
    assert!(none.unwrap().run(&mut never).unwrap().token_ids.is_empty());
    let params = GenerateParams { max_new_tokens: 100, ..Default::default() };
    let mut g = Generation::new(engine.clone(), ids[..9].to_vec(), params.clone()).unwrap();
    let c = g.run(&mut never).unwrap();
    assert_eq!((c.token_ids.len(), c.finish_reason), (3, FinishReason::Length));

    let sampled = |seed| {
        let sampling = SamplingParams {
            // The tiny random model's logits span tens: flatten them to see the seed at work.
            temperature: 30.0,
            seed: Some(seed),
            ..Default::default()
        };
        let mut g =
            Generation::new(engine.clone(), ids[..2].to_vec(), GenerateParams { sampling, ..params.clone() }).unwrap();
        g.run(&mut never).unwrap().token_ids
    };
    assert_eq!(sampled(5), sampled(5));
    assert_ne!(sampled(5), sampled(6));
}

/// 256 tokens through tiny-gqa (sliding window 8): its sliding layers keep rings of 135
/// slots, which wrap; the logits have the bits of a cache that keeps every position, in one
/// pass and token by token. Prefix reuse over a wrapped ring reuses what the rings still hold
/// and recomputes otherwise, with the bits of a fresh model either way.
#[test]
fn sliding_rings_give_the_bits_of_a_full_cache() {
    let dir = fixtures().join("tiny").join("tiny-gqa");
    let opts = tiny_opts(256, WeightType::F32, 2);
    let engine = Arc::new(Model::load(&dir, &opts).unwrap());
    let (m, c, threads) = (&engine.transformer, engine.config().clone(), &engine.threads);
    assert!(KvCache::capacities(&c, 256).contains(&135));
    let vocab = c.vocab_size;
    let ids: Vec<u32> = std::iter::once(2).chain((1..256).map(|i| (i * 37 % 500 + 5) as u32)).collect();
    let mut ring = vec![0f32; ids.len() * vocab];
    engine.logits(&engine.slot, &ids, &mut ring, &mut never).unwrap();

    let mut full = vec![0f32; ids.len() * vocab];
    let mut cache = KvCache::new(&vec![256; c.num_hidden_layers], c.kv_dim(), 256, KvDtype::F32);
    let mut s = Scratch::new(&c, 256, threads.count());
    for (t, &tok) in ids.iter().enumerate() {
        m.forward(&mut s, &mut cache, &[tok], t, threads);
        let x = m.activations(&s.x, 1, c.hidden_size, &mut s.xq, threads);
        m.lm_head(&mut full[t * vocab..(t + 1) * vocab], &x, 0..vocab, threads);
    }
    assert!(ring == full, "a ring changed the logits");

    let run = |engine: &Arc<Model>, prompt: &[u32]| {
        let params = GenerateParams { max_new_tokens: 4, ..Default::default() };
        Generation::new(engine.clone(), prompt.to_vec(), params).unwrap().run(&mut never).unwrap()
    };
    let fresh = |prompt: &[u32]| run(&Arc::new(Model::load(&dir, &opts).unwrap()), prompt);
    run(&engine, &ids[..200]); // the session now holds 203 positions
    let mut b = ids[..150].to_vec();
    b.extend_from_slice(&[7, 8, 9]);
    let got = run(&engine, &b);
    assert_eq!(got.reused_tokens, 150); // 150 + 135 >= 203 + 8: the rings hold what it reads
    assert_eq!(got.token_ids, fresh(&b).token_ids);
    run(&engine, &ids[..240]);
    let mut d = ids[..60].to_vec();
    d.extend_from_slice(&[7, 8, 9]);
    let got = run(&engine, &d);
    assert_eq!(got.reused_tokens, 0); // positions 53..59 were overwritten: recomputed
    assert_eq!(got.token_ids, fresh(&d).token_ids);

    // A shorter sequence after a longer one: the slots of positions 43..49 hold 178..184 of
    // the 200-token sequence even though the session holds only 104 tokens since.
    run(&engine, &ids[..200]);
    let mut e = ids[..100].to_vec();
    e.push(7);
    assert_eq!(run(&engine, &e).reused_tokens, 100);
    let mut f = ids[..50].to_vec();
    f.extend_from_slice(&[7, 8, 9]);
    let got = run(&engine, &f);
    assert_eq!(got.reused_tokens, 0);
    assert_eq!(got.token_ids, fresh(&f).token_ids);
}

/// `memory_plan` predicts the weights' bytes from the schema alone; a loaded model counts what it
/// holds. The two agree for every weight type, mapped in place or converted.
#[test]
fn planned_weight_bytes_are_the_loaded_ones() {
    let dir = fixtures().join("tiny").join("tiny-gqa");
    let all =
        [WeightType::F32, WeightType::Bf16, WeightType::Q8_0, WeightType::Stored, WeightType::Q4_0, WeightType::Q4KM];
    for weights in all {
        let opts = LoadOptions { weights, threads: Some(1), ..Default::default() };
        let m = Model::load(&dir, &opts).unwrap();
        let ck = crate::formats::checkpoint::Checkpoint::open(&dir).unwrap();
        assert_eq!(m.transformer.weight_bytes(), ck.weight_bytes(weights), "{weights:?}");
        assert_eq!(crate::runtime::memory_plan(&dir, &opts, 1).unwrap(), m.memory(), "{weights:?}");
    }
}

/// A state saved by one model continues in another process's model exactly as the first would
/// have: the same tokens, its prefix reused; the file holds the live rows only; and every
/// damaged, truncated, foreign or too long state is refused with its reason, leaving the
/// session empty.
#[test]
fn saved_state_continues_in_a_fresh_model_and_bad_files_are_refused() {
    use crate::error::Error;
    let dir = fixtures().join("tiny").join("tiny-gqa");
    let tmp = std::env::temp_dir().join(format!("gemma_rs-state-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let opts = tiny_opts(256, WeightType::F32, 2);
    let ids: Vec<u32> = std::iter::once(2).chain((1..150).map(|i| (i * 37 % 500 + 5) as u32)).collect();
    let mut prompt = ids.clone();
    prompt.extend_from_slice(&[7, 8, 9]);
    let run = |engine: &Arc<Model>, prompt: &[u32]| {
        let params = GenerateParams { max_new_tokens: 6, ..Default::default() };
        Generation::new(engine.clone(), prompt.to_vec(), params).unwrap().run(&mut never).unwrap()
    };
    let load = |opts: &LoadOptions| Arc::new(Model::load(&dir, opts).unwrap());
    let cold = run(&load(&opts), &prompt);

    let a = load(&opts);
    run(&a, &ids[..20]); // the session holds something else first
    let path = tmp.join("prefix.state");
    assert_eq!(a.save_state(&a.slot, &path, Some(&ids), &mut never).unwrap(), 150);
    // 7 layers (1 global: every position; 6 sliding: the window of 8), K and V of 64 floats.
    let c = a.config().clone();
    let rows: usize = KvCache::live_rows(&c, 150).iter().sum();
    assert_eq!(rows, 150 + 6 * 8);
    let bytes = std::fs::metadata(&path).unwrap().len() as usize;
    assert_eq!(bytes, 48 + 4 * 7 + 8 + 4 * 150 + rows * 2 * c.kv_dim() * 4 + 8);

    let b = load(&opts);
    assert_eq!(b.load_state(&b.slot, &path, &mut never).unwrap(), 150);
    let warm = run(&b, &prompt);
    assert_eq!(warm.reused_tokens, 150);
    assert_eq!(warm.token_ids, cold.token_ids);
    // Saving what the model holds (no prompt) after a generation, and again: the same file.
    let again = tmp.join("again.state");
    let b2 = load(&opts);
    b2.load_state(&b2.slot, &path, &mut never).unwrap();
    b2.save_state(&b2.slot, &again, None, &mut never).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&path).unwrap());

    let good = std::fs::read(&path).unwrap();
    let refused = |model: &Model, bytes: &[u8], why: &str| {
        let p = tmp.join("bad.state");
        std::fs::write(&p, bytes).unwrap();
        let before = model.session().tokens.clone();
        let damage = match model.load_state(&model.slot, &p, &mut never) {
            Err(e @ Error::Format { .. }) => {
                assert!(e.to_string().contains(why), "{why}: {e}");
                e.to_string().contains("checksum of its KV data")
            }
            other => panic!("{why}: {:?}", other.map(|_| ())),
        };
        // Refused by its header: the session is as it was; by its payload: empty.
        let after = &model.session().tokens;
        assert!(if damage { after.is_empty() } else { *after == before }, "{why}: the session");
    };
    refused(&b, &[], "empty");
    refused(&b, b"GGUF\x03\0\0\0 and more", "not a gemma_rs state file");
    refused(&b, &good[..30], "shorter than its header");
    refused(&b, &good[..good.len() - 1], "truncated");
    refused(&b, &good[..200], "truncated");
    for at in [60, 700, good.len() / 2, good.len() - 9] {
        let mut flipped = good.clone();
        flipped[at] ^= 0x10;
        refused(&b, &flipped, "damaged");
    }
    let mut header = good.clone();
    header[36] ^= 1; // a header byte without a meaning of its own: caught by the checksum
    refused(&b, &header, "header's checksum");
    // Another model, the same model loaded as another weight type, a cap too small.
    let other = Model::load(&fixtures().join("tiny").join("tiny-mqa-softcap"), &opts).unwrap();
    refused(&other, &good, "another model");
    refused(&load(&LoadOptions { weights: WeightType::Q8_0, ..opts.clone() }), &good, "another model");
    refused(&load(&LoadOptions { max_inference_len: Some(100), ..opts.clone() }), &good, "max_inference_len");
    assert!(matches!(b.load_state(&b.slot, &tmp.join("missing.state"), &mut never), Err(Error::NotFound(_))));
    // A model with nothing to save says so.
    assert!(matches!(
        {
            let m = load(&opts);
            m.save_state(&m.slot, &again, None, &mut never)
        },
        Err(Error::InvalidArgument(_))
    ));
    // The damaged attempts left nothing reused behind: the intact file still works.
    b.load_state(&b.slot, &path, &mut never).unwrap();
    assert_eq!(run(&b, &prompt).token_ids, cold.token_ids);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// An f16 cache's state holds halves (half the bytes of the f32 one) and continues exactly;
/// a model whose cache is of the other type refuses it, naming the type.
#[test]
fn an_f16_state_round_trips_and_an_f32_model_refuses_it() {
    let dir = fixtures().join("tiny").join("tiny-gqa");
    let tmp = std::env::temp_dir().join(format!("gemma_rs-f16-state-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let opts = |kv_dtype| LoadOptions { kv_dtype, ..tiny_opts(256, WeightType::F32, 2) };
    let ids: Vec<u32> = std::iter::once(2).chain((1..100).map(|i| (i * 41 % 500 + 5) as u32)).collect();
    let mut prompt = ids.clone();
    prompt.extend_from_slice(&[7, 8]);
    let run = |engine: &Arc<Model>| {
        let params = GenerateParams { max_new_tokens: 6, ..Default::default() };
        Generation::new(engine.clone(), prompt.clone(), params).unwrap().run(&mut never).unwrap()
    };
    let load = |t| Arc::new(Model::load(&dir, &opts(t)).unwrap());
    let (path16, path32) = (tmp.join("f16.state"), tmp.join("f32.state"));
    let a = load(KvDtype::F16);
    a.save_state(&a.slot, &path16, Some(&ids), &mut never).unwrap();
    let b = load(KvDtype::F32);
    b.save_state(&b.slot, &path32, Some(&ids), &mut never).unwrap();
    let (n16, n32) = (std::fs::metadata(&path16).unwrap().len(), std::fs::metadata(&path32).unwrap().len());
    let header = 48 + 4 * 7 + 8 + 4 * 100 + 8;
    assert_eq!(2 * (n16 - header), n32 - header);

    let cold = run(&load(KvDtype::F16));
    let warm = load(KvDtype::F16);
    warm.load_state(&warm.slot, &path16, &mut never).unwrap();
    let got = run(&warm);
    assert_eq!((got.reused_tokens, &got.token_ids), (100, &cold.token_ids));
    let err = b.load_state(&b.slot, &path16, &mut never).unwrap_err().to_string();
    assert!(err.contains("holds f16, this model's f32 (load it with kv_dtype=\"f16\")"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A packed file verifies; one flipped byte in any tensor (or in the header) is caught and the
/// damaged tensor named; a verified load refuses it; a file without digests cannot be verified;
/// pack refuses to write over its source.
#[test]
fn packed_files_verify_and_every_flipped_tensor_byte_is_caught() {
    use crate::formats::gguf::Gguf;
    use crate::formats::integrity::{verify_path, DIGESTS_KEY};
    let src = fixtures().join("tiny").join("tiny-gqa");
    let tmp = std::env::temp_dir().join(format!("gemma_rs_verify_{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let packed = tmp.join("packed.gguf");
    let threads = Threads::new(2);
    crate::formats::pack::pack(&src, &packed, WeightType::Q8_0, &threads, &mut |_, _| Ok(())).unwrap();
    let good = verify_path(&packed, &threads).unwrap();
    let g = Gguf::open(&packed).unwrap();
    assert_eq!(good.tensors, g.tensors.len());
    assert!(g.get(DIGESTS_KEY).is_some());
    let bytes = std::fs::read(&packed).unwrap();
    let opts = LoadOptions { verify: true, ..tiny_opts(16, WeightType::Q8_0, 1) };
    Model::load(&packed, &opts).unwrap();

    let damaged = tmp.join("damaged.gguf");
    for (i, t) in g.tensors.iter().enumerate() {
        let mut b = bytes.clone();
        let at = t.data.start + (i * 7919) % t.data.len();
        b[at] ^= 0x10;
        std::fs::write(&damaged, &b).unwrap();
        let e = verify_path(&damaged, &threads).unwrap_err().to_string();
        assert!(e.contains(&format!("tensor {} is damaged", t.name)), "{e}");
        if i == 0 {
            let e = Model::load(&damaged, &opts).err().unwrap().to_string();
            assert!(e.contains("is damaged"), "{e}");
        }
    }
    // A byte of the header: a token's text in the metadata.
    let mut b = bytes.clone();
    let at = bytes.windows(10).position(|w| w == b"gemma3.con").unwrap() + 7;
    b[at] = b'X';
    std::fs::write(&damaged, &b).unwrap();
    let e = verify_path(&damaged, &threads).unwrap_err().to_string();
    assert!(e.contains("header"), "{e}");
    // Files without digests: the source checkpoint (safetensors) and a GGUF of llama.cpp's.
    let e = verify_path(&src, &threads).unwrap_err().to_string();
    assert!(e.contains("no checksums"), "{e}");
    let e = pack_over(&packed, &packed);
    assert!(e.contains("the destination is the source"), "{e}");
    assert_eq!(std::fs::read(&packed).unwrap(), bytes, "the source is untouched");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn pack_over(src: &Path, dst: &Path) -> String {
    let threads = Threads::new(1);
    crate::formats::pack::pack(src, dst, WeightType::Q8_0, &threads, &mut |_, _| Ok(())).unwrap_err().to_string()
}

#[test]
fn batched_decoding_gives_each_generation_its_own_tokens() {
    use crate::runtime::batch::Batch;
    let dir = fixtures().join("tiny").join("tiny-gqa");
    let (ids, _) = reference(&dir);
    // A prompt of more than CHUNK tokens is prefilled a chunk a step beside the others' decoding.
    let long: Vec<u32> = ids.iter().cycle().take(200).copied().collect();
    let prompts: [&[u32]; 5] = [&ids[..5], &ids[3..30], &ids[..1], &long, &ids[10..12]];
    let sampling = |i: usize| match i % 2 {
        0 => SamplingParams::default(),
        _ => SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(i as u64), ..Default::default() },
    };
    let params = |i: usize| GenerateParams { max_new_tokens: 6 + 5 * i, sampling: sampling(i), ..Default::default() };
    for (weights, kv_dtype) in
        [(WeightType::F32, KvDtype::F32), (WeightType::Q8_0, KvDtype::F16), (WeightType::Q4KM, KvDtype::F32)]
    {
        for threads in [1, 2] {
            let opts = LoadOptions { weights, kv_dtype, threads: Some(threads), ..Default::default() };
            let model = Arc::new(Model::load(&dir, &opts).unwrap());
            let alone: Vec<_> = (0..prompts.len())
                .map(|i| {
                    let slot = Arc::new(model.new_slot());
                    let mut g = Generation::in_session(model.clone(), slot, prompts[i].to_vec(), params(i)).unwrap();
                    g.run(&mut never).unwrap().token_ids
                })
                .collect();
            let mut gens: Vec<_> = (0..prompts.len())
                .map(|i| {
                    let slot = Arc::new(model.new_slot());
                    Generation::in_session(model.clone(), slot, prompts[i].to_vec(), params(i)).unwrap()
                })
                .collect();
            let mut batch = Batch::new();
            let mut live: Vec<usize> = (0..prompts.len()).collect();
            while !live.is_empty() {
                let mut refs: Vec<&mut Generation> =
                    gens.iter_mut().enumerate().filter(|(i, _)| live.contains(i)).map(|(_, g)| g).collect();
                let steps = batch.step(&mut refs, &mut never).unwrap();
                let done: Vec<usize> =
                    live.iter().zip(steps).filter(|(_, r)| r.as_ref().unwrap().is_none()).map(|(&i, _)| i).collect();
                live.retain(|i| !done.contains(i));
            }
            for (i, g) in gens.iter().enumerate() {
                let c = g.completion().unwrap();
                assert_eq!(c.token_ids, alone[i], "{weights:?} {kv_dtype:?} threads {threads}: generation {i}");
                assert_eq!(c.token_ids.len(), params(i).max_new_tokens, "generation {i} ran to its length");
                assert_eq!((c.prompt_tokens, c.reused_tokens), (prompts[i].len(), 0), "generation {i}");
            }
        }
    }
}

#[test]
fn a_batch_refuses_two_generations_of_one_session() {
    use crate::runtime::batch::Batch;
    let dir = fixtures().join("tiny").join("tiny-gqa");
    let model = Arc::new(Model::load(&dir, &tiny_opts(64, WeightType::F32, 1)).unwrap());
    let params = GenerateParams { max_new_tokens: 2, ..Default::default() };
    let mut a = Generation::new(model.clone(), vec![1, 2], params.clone()).unwrap();
    let mut b = Generation::new(model.clone(), vec![1, 3], params).unwrap();
    let err = Batch::new().step(&mut [&mut a, &mut b], &mut never).err().unwrap();
    assert!(err.to_string().contains("own session"), "{err}");
}
