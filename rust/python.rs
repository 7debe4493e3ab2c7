//! The Python binding, the only module that knows PyO3: convert arguments, release the GIL,
//! map errors. The typed, documented API is python/gemma_rs/__init__.py.

use crate::error::Error;
use crate::kernels::quant::{self, BlockQ8_0, QK8_0};
use crate::kernels::threads::Threads;
use crate::model::memory::Memory;
use crate::model::schema::{all_tensors, WeightType};
use crate::runtime::generate::{Completion, GenerateParams, Generation};
use crate::runtime::sampler::SamplingParams;
use crate::runtime::{Cancel, LoadOptions, Model as Engine};
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyKeyboardInterrupt, PyMemoryError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString};
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

/// A positive integer argument, or None.
fn positive(name: &str, v: Option<i64>) -> PyResult<Option<usize>> {
    match v {
        Some(n) if n <= 0 => Err(value_error(format!("{name} must be a positive integer, got {n}"))),
        Some(n) => Ok(Some(n as usize)),
        None => Ok(None),
    }
}

/// `LoadOptions` from Python arguments: positive integers or None.
fn load_options(
    max_inference_len: Option<i64>,
    weights: &str,
    threads: Option<i64>,
    memory_limit: Option<i64>,
) -> PyResult<LoadOptions> {
    Ok(LoadOptions {
        max_inference_len: positive("max_inference_len", max_inference_len)?,
        weights: WeightType::parse(weights)?,
        threads: positive("threads", threads)?,
        memory_limit: positive("memory_limit", memory_limit)?,
    })
}

#[pyfunction]
#[pyo3(signature = (path, max_inference_len, weights, threads, memory_limit, progress=None))]
fn load(
    py: Python<'_>,
    path: PathBuf,
    max_inference_len: Option<i64>,
    weights: &str,
    threads: Option<i64>,
    memory_limit: Option<i64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<Model> {
    let opts = load_options(max_inference_len, weights, threads, memory_limit)?;
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
    Ok(Model { engine: Arc::new(engine?) })
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
#[pyo3(signature = (path, max_inference_len, weights, threads))]
fn memory_plan<'py>(
    py: Python<'py>,
    path: PathBuf,
    max_inference_len: Option<i64>,
    weights: &str,
    threads: Option<i64>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = load_options(max_inference_len, weights, threads, None)?;
    let plan = compute(py, || crate::runtime::memory_plan(&path, &opts))?;
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
    threads: Option<i64>,
    progress: Option<Py<PyAny>>,
) -> PyResult<(u64, usize)> {
    let weights = WeightType::parse(weights)?;
    let threads = Threads::new(Threads::count_for(positive("threads", threads)?)?);
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
/// type, shape, bytes)], "vocab", "chat_template", "eos_token_ids"}` (the tensors a Gemma 3
/// model uses, in load order; `vocab` is the tokenizer's size, or None without one).
#[pyfunction]
fn inspect<'py>(py: Python<'py>, path: PathBuf) -> PyResult<Bound<'py, PyDict>> {
    use crate::formats::checkpoint::{Checkpoint, Source};
    type Row = (String, &'static str, Vec<usize>, usize);
    let (format, config, tensors, vocab, template, eos) = compute(py, || {
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
        Ok((format, ck.config.raw.to_string(), tensors, vocab, ck.chat_template.is_some(), ck.eos_token_ids))
    })?;
    let d = PyDict::new(py);
    d.set_item("format", format)?;
    d.set_item("config_json", config)?;
    d.set_item("tensors", tensors)?;
    d.set_item("vocab", vocab)?;
    d.set_item("chat_template", template)?;
    d.set_item("eos_token_ids", eos)?;
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
    d.set_item("kernels", quant::Kernel::available().iter().map(|k| k.name).collect::<Vec<_>>())?;
    d.set_item("kernel", quant::Kernel::best().name)?;
    Ok(d)
}

/// `x (n, cols) · wᵀ` as little-endian f32 bytes `(n, rows)`, with the Q8_0 kernel named `kernel`
/// on this thread: `w` is `rows` rows of Q8_0 blocks, `x` little-endian f32 values. For tests
/// that compare the kernels of this CPU with the scalar one.
#[pyfunction]
fn _q8_0_matmul<'py>(py: Python<'py>, kernel: &str, w: &[u8], rows: usize, x: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    use crate::kernels::ops::{matmul_q8_0_with, Activations, QuantBuf};
    let k = quant::Kernel::named(kernel)
        .ok_or_else(|| value_error(format!("kernel {kernel:?} is not available on this CPU")))?;
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
    let xf: Vec<f32> = x.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let n = xf.len() / cols;
    let mut buf = QuantBuf::new(xf.len());
    let acts = Activations::quantized(&xf, n, cols, &mut buf, &Threads::new(1));
    let mut out = vec![0f32; n * rows];
    // SAFETY: `k` comes from `Kernel::named`, which lists only the kernels this CPU runs.
    unsafe { matmul_q8_0_with(k, &mut out, &acts, &blocks, rows) };
    let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok(PyBytes::new(py, &bytes))
}

/// GGUF tensor data of ggml type `type_name` ("Q4_K", "F16", ...; a whole number of blocks)
/// dequantized as the loader reads it: little-endian f32 values, for tests against gguf-py.
#[pyfunction]
fn _dequantize<'py>(py: Python<'py>, type_name: &str, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
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
}

/// A prompt as given: text (tokenized later, without the GIL) or token ids.
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl Prompt {
    fn start(self, engine: Arc<Engine>, params: GenerateParams) -> crate::Result<Generation> {
        let ids = match self {
            Prompt::Text(text) => engine.tokenize(&text, true)?,
            Prompt::Ids(ids) => ids,
        };
        Generation::new(engine, ids, params)
    }
}

/// What `complete` and `stream` take: the attributes of the facade's `_Request`.
#[derive(FromPyObject)]
struct Request<'py> {
    prompt: Bound<'py, PyAny>,
    max_new_tokens: i64,
    temperature: f32,
    top_k: i64,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    seed: Option<u64>,
    stop: Option<Bound<'py, PyAny>>,
    /// The caller wants text, not only token ids.
    text: bool,
}

impl Request<'_> {
    fn parse(self) -> PyResult<(Prompt, GenerateParams)> {
        let non_negative =
            |name: &str, v: i64| u64::try_from(v).map_err(|_| value_error(format!("{name} must be >= 0, got {v}")));
        let max_new_tokens = non_negative("max_new_tokens", self.max_new_tokens)? as usize;
        let top_k = non_negative("top_k", self.top_k)? as usize;
        let seed = self.seed;
        let prompt = &self.prompt;
        let prompt = match prompt.cast::<PyString>() {
            Ok(s) => Prompt::Text(s.to_cow()?.into_owned()),
            Err(_) if prompt.is_instance_of::<PyList>() || prompt.hasattr("__len__")? => Prompt::Ids(ids_from(prompt)?),
            Err(_) => {
                return Err(PyTypeError::new_err(format!(
                    "prompt must be a str or a list of token ids, got {}",
                    type_name(prompt)
                )))
            }
        };
        let stop: Vec<String> = match &self.stop {
            None => Vec::new(),
            Some(s) => match s.cast::<PyString>() {
                Ok(one) => vec![one.to_cow()?.into_owned()],
                Err(_) => s.extract().map_err(|_| {
                    PyTypeError::new_err(format!("stop must be a str or a list of str, got {}", type_name(s)))
                })?,
            },
        };
        let Request { temperature, top_p, min_p, repetition_penalty, text, .. } = self;
        let sampling = SamplingParams { temperature, top_k, top_p, min_p, repetition_penalty, seed };
        Ok((prompt, GenerateParams { max_new_tokens, sampling, stop, text }))
    }
}

fn completion_dict<'py>(py: Python<'py>, c: &Completion) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("text", &c.text)?;
    d.set_item("token_ids", &c.token_ids)?;
    d.set_item("finish_reason", c.finish_reason.as_str())?;
    d.set_item("prompt_tokens", c.prompt_tokens)?;
    d.set_item("reused_tokens", c.reused_tokens)?;
    d.set_item("prefill_seconds", c.prefill_seconds)?;
    d.set_item("decode_seconds", c.decode_seconds)?;
    Ok(d)
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
    fn complete<'py>(&self, py: Python<'py>, request: Request<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (prompt, params) = request.parse()?;
        let engine = Arc::clone(&self.engine);
        let completion = compute_cancellable(py, move |cancel| prompt.start(engine, params)?.run(cancel))?;
        completion_dict(py, &completion)
    }

    fn stream(&self, py: Python<'_>, request: Request<'_>) -> PyResult<Stream> {
        let (prompt, params) = request.parse()?;
        let engine = Arc::clone(&self.engine);
        let generation = compute(py, move || prompt.start(engine, params))?;
        Ok(Stream { generation: Mutex::new(generation) })
    }

    /// Forgets the cached sequence (waits for a call in progress on another thread).
    fn reset(&self, py: Python<'_>) -> PyResult<()> {
        compute(py, || {
            self.engine.reset();
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
        let out = f32_bytearray(py, ids.len() * vocab, |out, cancel| self.engine.logits(&ids, out, cancel))?;
        Ok((out, ids.len(), vocab))
    }

    /// A bytearray of float32 log-probabilities, `len(ids) - 1` of them.
    fn logprobs<'py>(&self, py: Python<'py>, ids: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyByteArray>> {
        let ids = ids_from(ids)?;
        let lp = compute_cancellable(py, |cancel| self.engine.logprobs(&ids, cancel))?;
        f32_bytearray(py, lp.len(), |out, _| {
            out.copy_from_slice(&lp);
            Ok(())
        })
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

/// An iterator of text pieces; each `__next__` generates one token without the GIL.
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

    /// The finished generation as `complete` returns it; `None` until the iterator is exhausted.
    fn completion<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        // Waits for a `__next__` of another thread without the GIL, which that one may need.
        let c = py.detach(|| self.generation.lock().unwrap_or_else(|e| e.into_inner()).completion());
        c.map(|c| completion_dict(py, &c)).transpose()
    }
}

#[pymodule]
fn _gemma_rs(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GemmaError", m.py().get_type::<GemmaError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(pack, m)?)?;
    m.add_function(wrap_pyfunction!(memory_plan, m)?)?;
    m.add_function(wrap_pyfunction!(render_template, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_q8_0, m)?)?;
    m.add_function(wrap_pyfunction!(_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_features, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(_q8_0_matmul, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<Stream>()?;
    Ok(())
}
