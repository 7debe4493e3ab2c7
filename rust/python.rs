//! The Python binding, the only module that knows PyO3: convert arguments, release the GIL,
//! map errors. The typed, documented API is python/gemma_rs/__init__.py.

use crate::error::Error;
use crate::kernels::quant::gemm::Gemm;
use crate::kernels::quant::{self, BlockQ8_0, QK8_0};
use crate::kernels::threads::Threads;
use crate::model::kv_cache::KvDtype;
use crate::model::memory::Memory;
use crate::model::schema::{all_tensors, WeightType};
use crate::runtime::constraint::Grammar;
use crate::runtime::generate::{Completion, GenerateParams, Generation};
use crate::runtime::sampler::SamplingParams;
use crate::runtime::session::Slot;
use crate::runtime::{Cancel, LoadOptions, Model as Engine};
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyInt, PyList, PyString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pyo3::create_exception!(_gemma_rs, GemmaError, PyException, "A bad model file or an internal fault.");

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let msg = e.to_string();
        match e {
            Error::NotFound(_) => PyFileNotFoundError::new_err(msg),
            Error::InvalidArgument(_) => PyValueError::new_err(msg),
            Error::MemoryLimit(_) => PyMemoryError::new_err(msg),
            Error::Interrupted => PyKeyboardInterrupt::new_err(msg),
            _ => GemmaError::new_err(msg),
        }
    }
}

/// Runs `f` without the GIL; a panic becomes `GemmaError`, never a crash.
fn compute<T: Send>(py: Python<'_>, f: impl FnOnce() -> crate::Result<T> + Send) -> PyResult<T> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| Err(panic_error(p)))).map_err(PyErr::from)
}

/// A caught panic as `Error::Internal`, with its message.
fn panic_error(p: Box<dyn std::any::Any + Send>) -> Error {
    let what = p.downcast_ref::<String>().map(String::as_str).or_else(|| p.downcast_ref::<&str>().copied());
    Error::Internal(what.unwrap_or("panic").to_string())
}

/// A long job's progress, from a thread without the GIL: takes it, runs pending signal handlers
/// (Ctrl-C) and tells the caller's callback; an exception from either is kept in `raised` for
/// the caller to raise, and stops the job.
fn report(progress: &Option<Py<PyAny>>, done: u64, total: u64, raised: &mut Option<PyErr>) -> crate::Result<()> {
    Python::attach(|py| {
        let r = py.check_signals().and_then(|()| match progress {
            Some(f) => f.call1(py, (done, total)).map(drop),
            None => Ok(()),
        });
        r.map_err(|e| {
            *raised = Some(e);
            Error::Interrupted
        })
    })
}

/// Whether this is Python's main thread, the only one where signal handlers run.
fn on_main_thread(py: Python<'_>) -> PyResult<bool> {
    let threading = py.import("threading")?;
    let main = threading.call_method0("main_thread")?.getattr("ident")?;
    main.eq(threading.call_method0("get_ident")?)
}

/// `compute` for long calls that Ctrl-C must stop. Python runs signal handlers on its main
/// thread only, so there `f` runs on a scoped worker thread while the main thread, without
/// the GIL and without any of the model's locks, waits for it and every 20 ms runs the pending
/// handlers; when one raises (Ctrl-C's `KeyboardInterrupt`), the worker's `Cancel` says so, it
/// stops at its next token, prefill chunk or lock wait, and that exception is raised. The worker
/// never takes the GIL, so it cannot deadlock with a thread that holds the GIL and waits for the
/// model. On other threads `f` runs here, never cancelled.
fn compute_cancellable<T: Send>(py: Python<'_>, f: impl FnOnce(Cancel<'_>) -> crate::Result<T> + Send) -> PyResult<T> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    if !on_main_thread(py)? {
        return compute(py, || f(&mut crate::runtime::never));
    }
    let stop = AtomicBool::new(false);
    let mut raised: Option<PyErr> = None;
    let result = py.detach(|| {
        let waiter = std::thread::current();
        std::thread::scope(|s| {
            let worker = s.spawn(|| {
                let r = catch_unwind(AssertUnwindSafe(|| f(&mut || stop.load(Ordering::Relaxed))));
                waiter.unpark();
                r
            });
            while !worker.is_finished() {
                std::thread::park_timeout(Duration::from_millis(20));
                if raised.is_none() && !worker.is_finished() {
                    if let Err(e) = Python::attach(|py| py.check_signals()) {
                        raised = Some(e);
                        stop.store(true, Ordering::Relaxed);
                    }
                }
            }
            worker.join().unwrap_or_else(Err)
        })
    });
    if let Some(e) = raised {
        return Err(e);
    }
    result.unwrap_or_else(|p| Err(panic_error(p))).map_err(PyErr::from)
}

fn value_error(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// Token ids from a Python sequence of ints; negative ids are a `ValueError`.
fn ids_from(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err("expected a list of token ids, got str"));
    }
    let ids: Vec<i64> = obj
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("expected a list of int token ids, got {}", type_name(obj))))?;
    ids.into_iter()
        .map(|i| u32::try_from(i).map_err(|_| value_error(format!("token id {i} is outside the vocabulary"))))
        .collect()
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

// --- arguments: every type and range check of the Python API lives here or in the core ---------

/// `v` as a Python int: anything with `__index__` (numpy's integers too), never a bool.
fn index<'py>(name: &str, v: &Bound<'py, PyAny>, what: &str) -> PyResult<Bound<'py, PyInt>> {
    if v.is_instance_of::<PyBool>() || !v.hasattr("__index__")? {
        return Err(PyTypeError::new_err(format!("{name} must be {what}, got {}", type_name(v))));
    }
    Ok(v.call_method0("__index__")?.cast_into::<PyInt>()?)
}

/// A count: an int in `[0, 2**63)`.
fn count_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<usize> {
    let i = index(name, v, "an int")?;
    if i.lt(0)? {
        return Err(value_error(format!("{name} must be >= 0, got {i}")));
    }
    let n: i64 = i.extract().map_err(|_| value_error(format!("{name} must be below 2**63, got {i}")))?;
    Ok(n as usize)
}

/// A size: a positive int below 2**63, or None.
fn positive_arg(name: &str, v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<usize>> {
    let Some(v) = v.filter(|v| !v.is_none()) else { return Ok(None) };
    let i = index(name, v, "an int or None")?;
    match i.extract::<i64>() {
        Ok(n) if n > 0 => Ok(Some(n as usize)),
        Ok(n) => Err(value_error(format!("{name} must be a positive integer, got {n}"))),
        Err(_) if i.lt(0)? => Err(value_error(format!("{name} must be a positive integer, got {i}"))),
        Err(_) => Err(value_error(format!("{name} must be below 2**63, got {i}"))),
    }
}

/// A real number: anything with `__float__` or `__index__`, never a bool or a str.
fn number_arg(name: &str, v: &Bound<'_, PyAny>) -> PyResult<f32> {
    let real = v.hasattr("__float__")? || v.hasattr("__index__")?;
    if v.is_instance_of::<PyBool>() || v.is_instance_of::<PyString>() || !real {
        return Err(PyTypeError::new_err(format!("{name} must be a number, got {}", type_name(v))));
    }
    Ok(v.extract::<f64>()? as f32)
}

/// A seed: an int in `[0, 2**64)`, or None.
fn seed_arg(v: Option<&Bound<'_, PyAny>>) -> PyResult<Option<u64>> {
    let Some(v) = v.filter(|v| !v.is_none()) else { return Ok(None) };
    let i = index("seed", v, "an int")?;
    i.extract::<u64>().map(Some).map_err(|_| value_error(format!("seed must be in [0, 2**64), got {i}")))
}

/// `max_new_tokens` as `Model.complete` checks it (the CLI checks its flag with this too).
#[pyfunction]
fn check_max_new_tokens(max_new_tokens: &Bound<'_, PyAny>) -> PyResult<usize> {
    count_arg("max_new_tokens", max_new_tokens)
}

/// Checks `load`'s options as `load` does, without loading anything (the CLI checks its flags
/// with this before it looks for a model).
#[pyfunction]
#[pyo3(signature = (max_inference_len, weights, threads))]
fn check_load_options(
    max_inference_len: Option<&Bound<'_, PyAny>>,
    weights: &str,
    threads: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let opts = load_options(max_inference_len, weights, threads, None, "f32")?;
    Threads::count_for(opts.threads)?;
    Ok(())
}

/// `LoadOptions` from Python arguments.
fn load_options(
    max_inference_len: Option<&Bound<'_, PyAny>>,
    weights: &str,
    threads: Option<&Bound<'_, PyAny>>,
    memory_limit: Option<&Bound<'_, PyAny>>,
    kv_dtype: &str,
) -> PyResult<LoadOptions> {
    Ok(LoadOptions {
        max_inference_len: positive_arg("max_inference_len", max_inference_len)?,
        weights: WeightType::parse(weights)?,
        threads: positive_arg("threads", threads)?,
        memory_limit: positive_arg("memory_limit", memory_limit)?,
        kv_dtype: KvDtype::parse(kv_dtype)?,
        verify: false,
        fast_lm_head: false,
    })
}

/// The sampling options shared by `complete`, `generate`, `stream` and `chat`, checked once,
/// here: temperature (0 is greedy), top-k (0 keeps all), top-p, min-p, repetition penalty
/// (1 is none) and seed (None draws one).
#[pyclass(frozen, eq, get_all, module = "gemma_rs._gemma_rs", name = "Sampling")]
#[derive(Clone, Copy, PartialEq)]
struct Sampling {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    seed: Option<u64>,
}

impl Sampling {
    fn params(&self) -> SamplingParams {
        let Sampling { temperature, top_k, top_p, min_p, repetition_penalty, seed } = *self;
        SamplingParams { temperature, top_k, top_p, min_p, repetition_penalty, seed }
    }
}

#[pymethods]
impl Sampling {
    #[new]
    #[pyo3(
        signature = (*, temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None, seed=None),
        text_signature = "(*, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, seed=None)"
    )]
    fn new(
        temperature: Option<&Bound<'_, PyAny>>,
        top_k: Option<&Bound<'_, PyAny>>,
        top_p: Option<&Bound<'_, PyAny>>,
        min_p: Option<&Bound<'_, PyAny>>,
        repetition_penalty: Option<&Bound<'_, PyAny>>,
        seed: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Sampling> {
        let d = SamplingParams::default();
        let num = |name, v: Option<&Bound<'_, PyAny>>, default| v.map_or(Ok(default), |v| number_arg(name, v));
        let params = SamplingParams {
            temperature: num("temperature", temperature, d.temperature)?,
            top_k: top_k.map_or(Ok(d.top_k), |v| count_arg("top_k", v))?,
            top_p: num("top_p", top_p, d.top_p)?,
            min_p: num("min_p", min_p, d.min_p)?,
            repetition_penalty: num("repetition_penalty", repetition_penalty, d.repetition_penalty)?,
            seed: seed_arg(seed)?,
        };
        params.validate()?;
        let SamplingParams { temperature, top_k, top_p, min_p, repetition_penalty, seed } = params;
        Ok(Sampling { temperature, top_k, top_p, min_p, repetition_penalty, seed })
    }

    fn __repr__(&self) -> String {
        let p = self;
        let seed = p.seed.map_or("None".to_string(), |s| s.to_string());
        format!(
            "Sampling(temperature={}, top_k={}, top_p={}, min_p={}, repetition_penalty={}, seed={seed})",
            p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty
        )
    }
}

#[pyfunction]
#[pyo3(signature = (path, max_inference_len, weights, threads, memory_limit, kv_dtype="f32", progress=None, verify=false, fast_lm_head=false))]
#[allow(clippy::too_many_arguments)]
fn load(
    py: Python<'_>,
    path: PathBuf,
    max_inference_len: Option<&Bound<'_, PyAny>>,
    weights: &str,
    threads: Option<&Bound<'_, PyAny>>,
    memory_limit: Option<&Bound<'_, PyAny>>,
    kv_dtype: &str,
    progress: Option<Py<PyAny>>,
    verify: bool,
    fast_lm_head: bool,
) -> PyResult<Model> {
    let opts = LoadOptions {
        verify,
        fast_lm_head,
        ..load_options(max_inference_len, weights, threads, memory_limit, kv_dtype)?
    };
    let mut raised: Option<PyErr> = None;
    // Each slab of weights: on the main thread Ctrl-C is looked for (loading holds no lock of a
    // model's, so taking the GIL here is safe), and the caller's callback, if any, is told.
    let on_main = on_main_thread(py)?;
    let engine = compute(py, || {
        Engine::load_with_progress(&path, &opts, &mut |done, total| {
            if !on_main && progress.is_none() {
                return Ok(());
            }
            report(&progress, done, total, &mut raised)
        })
    });
    if let Some(e) = raised {
        return Err(e);
    }
    let engine = Arc::new(engine?);
    Ok(Model { slot: engine.slot.clone(), engine })
}

fn memory_dict<'py>(py: Python<'py>, m: &Memory) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("weights", m.weights)?;
    d.set_item("kv_cache", m.kv_cache)?;
    d.set_item("scratch", m.scratch)?;
    d.set_item("tokenizer", m.tokenizer)?;
    Ok(d)
}

/// The bytes a model would hold once loaded (`Model.memory`), without loading its weights.
#[pyfunction]
#[pyo3(signature = (path, max_inference_len, weights, threads, sessions, kv_dtype="f32", fast_lm_head=false))]
#[allow(clippy::too_many_arguments)]
fn memory_plan<'py>(
    py: Python<'py>,
    path: PathBuf,
    max_inference_len: Option<&Bound<'py, PyAny>>,
    weights: &str,
    threads: Option<&Bound<'py, PyAny>>,
    sessions: &Bound<'py, PyAny>,
    kv_dtype: &str,
    fast_lm_head: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = LoadOptions { fast_lm_head, ..load_options(max_inference_len, weights, threads, None, kv_dtype)? };
    let sessions = count_arg("sessions", sessions)?;
    let plan = compute(py, || crate::runtime::memory_plan(&path, &opts, sessions))?;
    memory_dict(py, &plan)
}

/// Writes `src` (a Hugging Face directory or a GGUF file) to `dst` as a GGUF file; returns
/// `(bytes written, tensors)`. `progress(done, total)` is called with source bytes as packing
/// advances; an exception it raises (or Ctrl-C) stops packing and removes the partial file.
#[pyfunction]
#[pyo3(signature = (src, dst, weights, threads, progress))]
fn pack(
    py: Python<'_>,
    src: PathBuf,
    dst: PathBuf,
    weights: &str,
    threads: Option<&Bound<'_, PyAny>>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(u64, usize)> {
    let weights = WeightType::parse(weights)?;
    let threads = Threads::new(Threads::count_for(positive_arg("threads", threads)?)?);
    let mut raised: Option<PyErr> = None;
    let report = compute(py, || {
        crate::formats::pack::pack(&src, &dst, weights, &threads, &mut |done, total| {
            report(&progress, done, total, &mut raised)
        })
    });
    if let Some(e) = raised {
        return Err(e);
    }
    let report = report?;
    Ok((report.bytes, report.tensors))
}

/// Checks the digests `pack` wrote into a GGUF file; returns `(tensors, bytes)` checked.
#[pyfunction]
#[pyo3(signature = (path, threads=None))]
fn verify(py: Python<'_>, path: PathBuf, threads: Option<&Bound<'_, PyAny>>) -> PyResult<(usize, u64)> {
    let threads = Threads::new(Threads::count_for(positive_arg("threads", threads)?)?);
    let v = compute(py, || crate::formats::integrity::verify_path(&path, &threads))?;
    Ok((v.tensors, v.bytes))
}

/// Renders a model's Jinja chat template with `context` (a JSON object: `messages`, `tools`,
/// `add_generation_prompt`, `bos_token`, ...), as transformers' `apply_chat_template` does.
#[pyfunction]
fn render_template(py: Python<'_>, template: &str, context: &str) -> PyResult<String> {
    let ctx: serde_json::Value =
        serde_json::from_str(context).map_err(|e| value_error(format!("template context is not JSON: {e}")))?;
    let template = template.to_string();
    compute(py, move || crate::text::chat_template::render(&template, &ctx))
}

/// GGML Q8_0 blocks of little-endian f32 values (a whole number of 32-value blocks), as the
/// loader packs weights: the bytes llama.cpp's `quantize_row_q8_0_ref` gives.
#[pyfunction]
fn quantize_q8_0<'py>(py: Python<'py>, values: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    if !values.len().is_multiple_of(4 * QK8_0) {
        return Err(value_error(format!("{} bytes is not a whole number of 32-float blocks", values.len())));
    }
    let x: Vec<f32> = values.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut blocks = vec![BlockQ8_0::default(); x.len() / QK8_0];
    quant::quantize_row_q8_0(&x, &mut blocks);
    Ok(PyBytes::new(py, BlockQ8_0::as_bytes(&blocks)))
}

/// A model's files without its weights: `{"format", "config_json", "tensors": [(name, ggml
/// type, shape, bytes)], "vocab", "chat_template", "eos_token_ids", "default_max_inference_len"}` (the tensors a
/// Gemma 3 model uses, in load order; `vocab` is the tokenizer's size, or None without one).
#[pyfunction]
fn inspect<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    use crate::formats::checkpoint::{Checkpoint, Source};
    type Row = (String, &'static str, Vec<usize>, usize);
    let (format, config, tensors, vocab, template, eos, cap) = compute(py, || {
        let ck = Checkpoint::open(&path)?;
        let format = match &ck.source {
            Source::Gguf(g) => format!("GGUF v{}", g.version),
            Source::SafeTensors { .. } => "safetensors".to_string(),
        };
        let tensors = all_tensors(&ck.config)
            .into_iter()
            .map(|name| {
                let t = ck.source.tensor(&name)?;
                Ok((t.name, t.ty.name(), t.shape, t.data.len()))
            })
            .collect::<crate::Result<Vec<Row>>>()?;
        let vocab = ck.tokenizer.as_ref().map(|t| t.vocab_size());
        let cap = crate::runtime::resolve_max_inference_len(&ck.config, None)?;
        Ok((format, ck.config.raw.to_string(), tensors, vocab, ck.chat_template.is_some(), ck.eos_token_ids, cap))
    })?;
    let d = PyDict::new(py);
    d.set_item("format", format)?;
    d.set_item("config_json", config)?;
    d.set_item("tensors", tensors)?;
    d.set_item("vocab", vocab)?;
    d.set_item("chat_template", template)?;
    d.set_item("eos_token_ids", eos)?;
    d.set_item("default_max_inference_len", cap)?;
    Ok(d)
}

/// What this CPU offers the Q8_0 kernels and which kernel runs: `{"arch", "features", "kernels",
/// "kernel"}` (kernels fastest first; `kernel` is the one every model uses, `GEMMA_RS_KERNEL`
/// permitting).
#[pyfunction]
fn cpu_features<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("arch", std::env::consts::ARCH)?;
    d.set_item("features", crate::kernels::cpu::names())?;
    d.set_item("kernels", Gemm::available().iter().map(|k| k.name).collect::<Vec<_>>())?;
    d.set_item("kernel", Gemm::best().name)?;
    let low_bit = crate::kernels::quant::gemm::lowbit::available();
    d.set_item("low_bit_kernels", low_bit.iter().map(|k| k.name).collect::<Vec<_>>())?;
    d.set_item("low_bit_kernel", crate::kernels::quant::gemm::lowbit::best().name)?;
    Ok(d)
}

/// `x (n, cols) · wᵀ` as little-endian f32 bytes `(n, rows)`, with the Q8_0 GEMM kernel named
/// `kernel` on this thread (the weights repacked for it): `w` is `rows` rows of Q8_0 blocks, `x` little-endian f32 values. For tests
/// that compare the kernels of this CPU with the scalar one.
#[pyfunction]
fn q8_0_matmul<'py>(py: Python<'py>, kernel: &str, w: &[u8], rows: usize, x: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    use crate::kernels::quant::gemm::{gemm, PackedQ8_0};
    let k =
        Gemm::named(kernel).ok_or_else(|| value_error(format!("kernel {kernel:?} is not available on this CPU")))?;
    let block = std::mem::size_of::<BlockQ8_0>();
    if rows == 0 || !w.len().is_multiple_of(rows * block) || !x.len().is_multiple_of(4) {
        return Err(value_error("weights are not `rows` rows of Q8_0 blocks, or x is not f32".into()));
    }
    let cols = w.len() / rows / block * QK8_0;
    if x.is_empty() || !(x.len() / 4).is_multiple_of(cols) {
        return Err(value_error(format!("x is not a whole number of {cols}-value rows")));
    }
    let blocks: Vec<BlockQ8_0> = w
        .chunks_exact(block)
        .map(|b| {
            let mut qs = [0i8; QK8_0];
            qs.iter_mut().zip(&b[2..]).for_each(|(q, &v)| *q = v as i8);
            BlockQ8_0 { d: u16::from_le_bytes([b[0], b[1]]), qs }
        })
        .collect();
    let acts = test_acts(x, cols);
    let mut out = vec![0f32; acts.n() * rows];
    gemm(&mut out, rows, &acts, &PackedQ8_0::for_kernel(k, &blocks, rows, cols), 0..rows);
    Ok(f32_bytes(py, &out))
}

/// Little-endian f32 `x`, `cols` per token, quantized as every matmul quantizes activations.
fn test_acts(x: &[u8], cols: usize) -> crate::kernels::quant::gemm::QuantizedActs {
    let xf: Vec<f32> = x.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let mut acts = crate::kernels::quant::gemm::QuantizedActs::new();
    acts.quantize(&xf, xf.len() / cols, cols);
    acts
}

fn f32_bytes<'py>(py: Python<'py>, v: &[f32]) -> Bound<'py, PyBytes> {
    let bytes: Vec<u8> = v.iter().flat_map(|v| v.to_le_bytes()).collect();
    PyBytes::new(py, &bytes)
}

/// `x (n, cols) · wᵀ` as little-endian f32 bytes `(n, rows)`, with the low-bit kernel named
/// `kernel` on this thread: `w` is `rows` rows of GGUF blocks of `type_name` ("Q4_0", "Q4_1",
/// "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K") kept in their bits. For tests against gguf-py.
#[pyfunction]
fn low_bit_matmul<'py>(
    py: Python<'py>,
    kernel: &str,
    type_name: &str,
    w: &[u8],
    rows: usize,
    x: &[u8],
) -> PyResult<Bound<'py, PyBytes>> {
    use crate::kernels::quant::gemm::{gemm, lowbit, PackedLowBit};
    use quant::ggml::GgmlType;
    let k = lowbit::available()
        .into_iter()
        .find(|k| k.name == kernel)
        .ok_or_else(|| value_error(format!("low-bit kernel {kernel:?} is not available on this CPU")))?;
    let t = GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == type_name && t.low_bit().is_some())
        .ok_or_else(|| value_error(format!("{type_name:?} is not a low-bit ggml type")))?;
    let (bv, bb) = (t.block_values(), t.block_bytes());
    if rows == 0 || !w.len().is_multiple_of(rows * bb) || !x.len().is_multiple_of(4) {
        return Err(value_error(format!("weights are not `rows` rows of {type_name} blocks, or x is not f32")));
    }
    let cols = w.len() / rows / bb * bv;
    if x.is_empty() || !(x.len() / 4).is_multiple_of(cols) {
        return Err(value_error(format!("x is not a whole number of {cols}-value rows")));
    }
    let acts = test_acts(x, cols);
    let mut out = vec![0f32; acts.n() * rows];
    gemm(&mut out, rows, &acts, &PackedLowBit::for_kernel(k, t, w, rows, cols), 0..rows);
    Ok(f32_bytes(py, &out))
}

/// GGUF tensor data of ggml type `type_name` ("Q4_K", "F16", ...; a whole number of blocks)
/// dequantized as the loader reads it: little-endian f32 values, for tests against gguf-py.
#[pyfunction]
fn dequantize<'py>(py: Python<'py>, type_name: &str, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    use quant::ggml::{self, GgmlType};
    let t = GgmlType::ALL
        .into_iter()
        .find(|t| t.name() == type_name)
        .ok_or_else(|| value_error(format!("unknown or unsupported ggml type {type_name:?}")))?;
    if !data.len().is_multiple_of(t.block_bytes()) {
        let bb = t.block_bytes();
        return Err(value_error(format!("{} bytes is not a whole number of {bb}-byte {type_name} blocks", data.len())));
    }
    let mut out = vec![0f32; data.len() / t.block_bytes() * t.block_values()];
    ggml::dequantize(t, data, &mut out);
    PyBytes::new_with(py, 4 * out.len(), |b| {
        for (b, v) in b.chunks_exact_mut(4).zip(&out) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    })
}

#[pyclass(frozen, module = "gemma_rs._gemma_rs")]
struct Model {
    engine: Arc<Engine>,
    /// The session its calls use: the engine's own, or one of `session()`'s.
    slot: Arc<Slot>,
}

/// A prompt as given: text (tokenized later, without the GIL) or token ids.
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    /// The ids: text is tokenized with BOS first, as `complete` does.
    fn ids(self, engine: &Engine) -> crate::Result<Vec<u32>> {
        match self {
            Prompt::Text(text) => engine.tokenize(&text, true),
            Prompt::Ids(ids) => Ok(ids),
        }
    }

    fn start(self, engine: Arc<Engine>, slot: Arc<Slot>, params: GenerateParams) -> crate::Result<Generation> {
        let ids = self.ids(&engine)?;
        Generation::in_session(engine, slot, ids, params)
    }
}

/// A prompt argument, checked: a non-empty str or a sequence of ids.
fn prompt_arg(prompt: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    Ok(match prompt.cast::<PyString>() {
        Ok(s) if s.to_cow()?.is_empty() => {
            return Err(value_error("the prompt is empty (to start from BOS alone, pass [its id])".into()))
        }
        Ok(s) => Prompt::Text(s.to_cow()?.into_owned()),
        Err(_) if prompt.is_instance_of::<PyBytes>() || prompt.is_instance_of::<PyByteArray>() => {
            return Err(PyTypeError::new_err("prompt must be a str or a list of token ids, got bytes (decode it)"))
        }
        Err(_) if prompt.is_instance_of::<PyList>() || prompt.hasattr("__len__")? => Prompt::Ids(ids_from(prompt)?),
        Err(_) => {
            return Err(PyTypeError::new_err(format!(
                "prompt must be a str or a list of token ids, got {}",
                type_name(prompt)
            )))
        }
    })
}

/// The constraint of a call: `json_schema` (JSON text) or `grammar` (Lark text), not both.
fn grammar_arg(json_schema: Option<String>, grammar: Option<String>) -> PyResult<Option<Grammar>> {
    match (json_schema, grammar) {
        (Some(_), Some(_)) => Err(value_error("pass json_schema or grammar, not both".into())),
        (Some(schema), None) => Ok(Some(Grammar::JsonSchema(schema))),
        (None, Some(lark)) => Ok(Some(Grammar::Lark(lark))),
        (None, None) => Ok(None),
    }
}

/// A prompt and the generation options, checked.
fn request(
    prompt: &Bound<'_, PyAny>,
    max_new_tokens: &Bound<'_, PyAny>,
    sampling: &Sampling,
    stop: Option<&Bound<'_, PyAny>>,
    text: bool,
    grammar: Option<Grammar>,
) -> PyResult<(Prompt, GenerateParams)> {
    let prompt = prompt_arg(prompt)?;
    let stop: Vec<String> = match stop.filter(|s| !s.is_none()) {
        None => Vec::new(),
        Some(s) => match s.cast::<PyString>() {
            Ok(one) => vec![one.to_cow()?.into_owned()],
            Err(_) => s.extract().map_err(|_| {
                PyTypeError::new_err(format!("stop must be a str or a list of str, got {}", type_name(s)))
            })?,
        },
    };
    let max_new_tokens = count_arg("max_new_tokens", max_new_tokens)?;
    Ok((prompt, GenerateParams { max_new_tokens, sampling: sampling.params(), stop, text, grammar }))
}

/// The result of `Model.complete`: the generated text and ids, why generation stopped, and how
/// long prefill and decoding took.
#[pyclass(frozen, eq, get_all, module = "gemma_rs._gemma_rs", name = "Completion")]
#[derive(Clone, PartialEq)]
struct PyCompletion {
    /// The generated text (cut before a stop string; without the end-of-sequence token).
    text: String,
    /// The new token ids (without the end-of-sequence id that ended them).
    token_ids: Vec<u32>,
    /// "eos" (an end-of-sequence id), "stop" (a stop string, or the end of a constraint's
    /// document) or "length" (`max_new_tokens` or `max_inference_len`).
    finish_reason: &'static str,
    prompt_tokens: usize,
    /// Prompt tokens served from the KV cache of the previous call (a shared prefix).
    reused_tokens: usize,
    /// Time from the call to the first new token's logits.
    prefill_seconds: f64,
    /// Time of the forward passes after the first new token.
    decode_seconds: f64,
    /// Time spent computing a constraint's token masks (part of the two above); 0 without one.
    constraint_seconds: f64,
    /// Greedy tokens chosen by the fast lm_head, tokens where it could not decide (the full head
    /// ran), and the rows it rescored in all (`load(fast_lm_head=...)`).
    fast_head_tokens: usize,
    fast_head_fallbacks: usize,
    fast_head_candidates: usize,
}

impl From<Completion> for PyCompletion {
    fn from(c: Completion) -> PyCompletion {
        PyCompletion {
            text: c.text,
            token_ids: c.token_ids,
            finish_reason: c.finish_reason.as_str(),
            prompt_tokens: c.prompt_tokens,
            reused_tokens: c.reused_tokens,
            prefill_seconds: c.prefill_seconds,
            decode_seconds: c.decode_seconds,
            constraint_seconds: c.constraint_seconds,
            fast_head_tokens: c.fast_head_tokens,
            fast_head_fallbacks: c.fast_head_fallbacks,
            fast_head_candidates: c.fast_head_candidates,
        }
    }
}

#[pymethods]
impl PyCompletion {
    fn __repr__(&self) -> String {
        format!(
            "Completion(text={:?}, token_ids=<{} ids>, finish_reason={:?}, prompt_tokens={}, reused_tokens={}, \
             prefill_seconds={:.3}, decode_seconds={:.3})",
            self.text,
            self.token_ids.len(),
            self.finish_reason,
            self.prompt_tokens,
            self.reused_tokens,
            self.prefill_seconds,
            self.decode_seconds
        )
    }
}

/// A bytearray of `n` native float32 values filled by `fill` without the GIL (the facade views
/// it as a numpy array without copying). Python raises `MemoryError` if it cannot be allocated.
fn f32_bytearray<'py>(
    py: Python<'py>,
    n: usize,
    fill: impl FnOnce(&mut [f32], Cancel<'_>) -> crate::Result<()> + Send,
) -> PyResult<Bound<'py, PyByteArray>> {
    let bytes = n.checked_mul(4).ok_or_else(|| value_error(format!("{n} floats do not fit in memory")))?;
    PyByteArray::new_with(py, bytes, |buf| {
        // SAFETY: every bit pattern is a valid f32, and `align_to_mut` checks the alignment
        // (CPython allocates bytearray storage aligned for any scalar type).
        let (head, floats, tail) = unsafe { buf.align_to_mut::<f32>() };
        if !head.is_empty() || !tail.is_empty() {
            return Err(GemmaError::new_err("internal error: unaligned bytearray"));
        }
        // No other Python code can see the bytearray yet, so it may be filled without the GIL.
        compute_cancellable(py, |cancel| fill(floats, cancel))
    })
}

#[pymethods]
impl Model {
    #[pyo3(signature = (prompt, max_new_tokens, sampling, stop, text, json_schema=None, grammar=None))]
    #[allow(clippy::too_many_arguments)]
    fn complete(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: &Bound<'_, PyAny>,
        sampling: &Sampling,
        stop: Option<&Bound<'_, PyAny>>,
        text: bool,
        json_schema: Option<String>,
        grammar: Option<String>,
    ) -> PyResult<PyCompletion> {
        let grammar = grammar_arg(json_schema, grammar)?;
        let (prompt, params) = request(prompt, max_new_tokens, sampling, stop, text, grammar)?;
        let (engine, slot) = (Arc::clone(&self.engine), Arc::clone(&self.slot));
        let completion = compute_cancellable(py, move |cancel| prompt.start(engine, slot, params)?.run(cancel))?;
        Ok(completion.into())
    }

    #[pyo3(signature = (prompt, max_new_tokens, sampling, stop, json_schema=None, grammar=None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: &Bound<'_, PyAny>,
        max_new_tokens: &Bound<'_, PyAny>,
        sampling: &Sampling,
        stop: Option<&Bound<'_, PyAny>>,
        json_schema: Option<String>,
        grammar: Option<String>,
    ) -> PyResult<Stream> {
        let grammar = grammar_arg(json_schema, grammar)?;
        let (prompt, params) = request(prompt, max_new_tokens, sampling, stop, true, grammar)?;
        let (engine, slot) = (Arc::clone(&self.engine), Arc::clone(&self.slot));
        let generation = compute(py, move || prompt.start(engine, slot, params))?;
        Ok(Stream { generation: Mutex::new(generation) })
    }

    /// Forgets the cached sequence (waits for a call in progress on another thread).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        compute(py, || {
            self.slot.lock().tokens.clear();
            Ok(())
        })
    }

    fn tokenize(&self, py: Python<'_>, text: &str, add_bos: bool) -> PyResult<Vec<u32>> {
        let text = text.to_string();
        compute(py, || self.engine.tokenize(&text, add_bos))
    }

    fn detokenize(&self, py: Python<'_>, ids: &Bound<'_, PyAny>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = ids_from(ids)?;
        compute(py, || self.engine.detokenize(&ids, skip_special_tokens))
    }

    /// `(bytearray of float32 logits, rows, vocab)`.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        ids: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyByteArray>, usize, usize)> {
        let ids = ids_from(ids)?;
        self.engine.check_sequence(&ids, "the sequence")?;
        let vocab = self.engine.config().vocab_size;
        let out =
            f32_bytearray(py, ids.len() * vocab, |out, cancel| self.engine.logits(&self.slot, &ids, out, cancel))?;
        Ok((out, ids.len(), vocab))
    }

    /// A bytearray of float32 log-probabilities, `len(ids) - 1` of them.
    fn logprobs<'py>(&self, py: Python<'py>, ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyByteArray>> {
        let ids = ids_from(ids)?;
        let lp = compute_cancellable(py, |cancel| self.engine.logprobs(&self.slot, &ids, cancel))?;
        f32_bytearray(py, lp.len(), |out, _| {
            out.copy_from_slice(&lp);
            Ok(())
        })
    }

    /// How many leading tokens of `ids` the session holds (their KV rows computed).
    fn held_prefix(&self, py: Python<'_>, ids: &Bound<'_, PyAny>) -> PyResult<usize> {
        let ids = ids_from(ids)?;
        compute(py, || Ok(self.slot.lock().tokens.iter().zip(&ids).take_while(|(a, b)| a == b).count()))
    }

    /// "f32" or "f16": how its KV caches hold keys and values.
    #[getter]
    fn kv_dtype(&self) -> &'static str {
        self.engine.kv_dtype.name()
    }

    /// The model's fingerprint (what state files carry), as 16 hex digits.
    #[getter]
    fn fingerprint(&self) -> String {
        format!("{:016x}", self.engine.fingerprint)
    }

    /// A new session over the same weights: its own KV cache and scratch, empty.
    fn session(&self, py: Python<'_>) -> PyResult<Model> {
        let engine = Arc::clone(&self.engine);
        let slot = compute(py, || Ok(Arc::new(engine.new_slot())))?;
        Ok(Model { engine, slot })
    }

    /// Writes the KV state of the tokens held (after prefilling `prompt`, if given) to `path`.
    #[pyo3(signature = (path, prompt=None))]
    fn save_state(&self, py: Python<'_>, path: PathBuf, prompt: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
        let prompt = prompt.filter(|p| !p.is_none()).map(prompt_arg).transpose()?;
        let (engine, slot) = (&self.engine, &self.slot);
        compute_cancellable(py, move |cancel| {
            let ids = prompt.map(|p| p.ids(engine)).transpose()?;
            engine.save_state(slot, &path, ids.as_deref(), cancel)
        })
    }

    /// Restores a state file written by `save_state`; returns its token count.
    fn load_state(&self, py: Python<'_>, path: PathBuf) -> PyResult<usize> {
        compute_cancellable(py, |cancel| self.engine.load_state(&self.slot, &path, cancel))
    }

    /// config.json as read, as a JSON string.
    #[getter]
    fn config_json(&self) -> String {
        self.engine.config().raw.to_string()
    }

    #[getter]
    fn max_inference_len(&self) -> usize {
        self.engine.max_inference_len
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.engine.config().vocab_size
    }

    #[getter]
    fn has_tokenizer(&self) -> bool {
        self.engine.tokenizer.is_some()
    }

    #[getter]
    fn eos_token_ids(&self) -> Vec<u32> {
        self.engine.eos_token_ids.clone()
    }

    #[getter]
    fn threads(&self) -> usize {
        self.engine.threads.count()
    }

    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.engine.chat_template.clone()
    }

    #[getter]
    fn memory<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        memory_dict(py, &self.engine.memory())
    }
}

/// Text pieces as they are generated, never splitting a UTF-8 character; each `__next__`
/// generates one token without the GIL. After exhaustion, `completion` holds the result.
#[pyclass(module = "gemma_rs._gemma_rs")]
struct Stream {
    generation: Mutex<Generation>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        // Skip empty pieces (a token that completes no character, or text held for a stop string).
        compute_cancellable(py, |cancel| {
            let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                match g.step(cancel)? {
                    Some(piece) if piece.is_empty() => continue,
                    other => return Ok(other),
                }
            }
        })
    }

    /// The finished generation, the `Completion` that `Model.complete` would have returned; a
    /// `RuntimeError` before the iterator is exhausted.
    #[getter]
    fn completion(&self, py: Python<'_>) -> PyResult<PyCompletion> {
        // Waits for a `__next__` of another thread without the GIL, which that one may need.
        let c = py.detach(|| self.generation.lock().unwrap_or_else(|e| e.into_inner()).completion());
        c.map(PyCompletion::from)
            .ok_or_else(|| PyRuntimeError::new_err("the stream is not finished: iterate it to the end first"))
    }
}

/// Steps several streams at once (`runtime::batch`), each in its own session of one model:
/// those that are decoding share one pass over the weights.
#[pyclass(module = "gemma_rs._gemma_rs")]
struct Batch {
    inner: Mutex<crate::runtime::batch::Batch>,
}

#[pymethods]
impl Batch {
    #[new]
    fn new() -> Batch {
        Batch { inner: Mutex::new(crate::runtime::batch::Batch::new()) }
    }

    /// One step of each stream: its new text (possibly empty), `None` once it is finished and
    /// all its text was returned, or the exception its step raised (the others still step).
    fn step(&self, py: Python<'_>, streams: Vec<PyRef<'_, Stream>>) -> PyResult<Vec<Py<PyAny>>> {
        let streams: Vec<&Stream> = streams.iter().map(|s| &**s).collect();
        for (i, s) in streams.iter().enumerate() {
            if streams[..i].iter().any(|o| std::ptr::eq(*o, *s)) {
                return Err(value_error("a stream appears twice in the batch".into()));
            }
        }
        let steps = compute(py, || {
            let mut batch = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            // Locked in address order (then the sessions, likewise), so that batches sharing
            // streams cannot deadlock.
            let mut order: Vec<usize> = (0..streams.len()).collect();
            order.sort_by_key(|&i| std::ptr::from_ref(streams[i]) as usize);
            let mut guards: Vec<_> = streams.iter().map(|_| None).collect();
            for i in order {
                guards[i] = Some(streams[i].generation.lock().unwrap_or_else(|e| e.into_inner()));
            }
            let mut gens: Vec<&mut Generation> =
                guards.iter_mut().map(|g| &mut **g.as_mut().expect("every stream locked")).collect();
            batch.step(&mut gens, &mut crate::runtime::never)
        })?;
        steps
            .into_iter()
            .map(|r| match r {
                Ok(Some(text)) => Ok(text.into_pyobject(py)?.into_any().unbind()),
                Ok(None) => Ok(py.None()),
                Err(e) => Ok(PyErr::from(e).into_value(py).into_any()),
            })
            .collect()
    }
}

#[pymodule]
fn _gemma_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GemmaError", m.py().get_type::<GemmaError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(memory_plan, m)?)?;
    m.add_function(wrap_pyfunction!(render_template, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(check_max_new_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(check_load_options, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<Stream>()?;
    m.add_class::<Batch>()?;
    m.add_class::<Sampling>()?;
    m.add_class::<PyCompletion>()?;
    // Kernels exposed for the tests alone (against gguf-py and between SIMD kernels).
    let testing = PyModule::new(m.py(), "_testing")?;
    testing.add_function(wrap_pyfunction!(quantize_q8_0, &testing)?)?;
    testing.add_function(wrap_pyfunction!(q8_0_matmul, &testing)?)?;
    testing.add_function(wrap_pyfunction!(low_bit_matmul, &testing)?)?;
    testing.add_function(wrap_pyfunction!(dequantize, &testing)?)?;
    m.add_submodule(&testing)?;
    Ok(())
}
