//! State files: the KV cache of a token sequence, saved so that another process (or another
//! machine) continues from it without prefilling it again. The format's spec is
//! `docs/STATE_FORMAT.md`; this module is its one implementation.
//!
//! A file holds only the live cache: the rows the next token can read (a global layer every
//! position, a sliding layer the last `sliding_window`), never logits (the last token is
//! recomputed on restore). It is written to a temporary file beside the target, synced and
//! renamed over it, so a reader sees the old file or the new one, never a part.

use crate::error::{Error, Result};
use crate::formats::digest::Digest;
use crate::model::kv_cache::{KvCache, KvDtype, Row};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"GRSTATE\0";
pub const VERSION: u32 = 1;
/// The header's `kv dtype` of each cache type.
fn dtype_code(t: KvDtype) -> u32 {
    match t {
        KvDtype::F32 => 0,
        KvDtype::F16 => 1,
    }
}

fn dtype_of(code: u32) -> Option<KvDtype> {
    [KvDtype::F32, KvDtype::F16].into_iter().find(|&t| dtype_code(t) == code)
}
/// Bytes of the header before the per-layer row counts.
const FIXED: usize = 48;

/// What a state file's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub fingerprint: u64,
    pub kv_dtype: u32,
    pub kv_dim: usize,
    /// The sequence's token ids count; the cap a model needs to load it.
    pub tokens: usize,
    /// Rows each layer keeps: positions `tokens - rows[l] .. tokens`.
    pub rows: Vec<usize>,
}

impl Header {
    fn header_bytes(&self) -> usize {
        FIXED + 4 * self.rows.len() + 8
    }

    fn payload_bytes(&self) -> u64 {
        let size = dtype_of(self.kv_dtype).map_or(4, KvDtype::bytes) as u64;
        let row = 2 * self.kv_dim as u64 * size;
        4 * self.tokens as u64 + self.rows.iter().map(|&r| r as u64 * row).sum::<u64>()
    }

    /// Bytes of the whole file: header, payload, payload digest.
    pub fn file_bytes(&self) -> u64 {
        self.header_bytes() as u64 + self.payload_bytes() + 8
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.header_bytes());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.kv_dtype.to_le_bytes());
        b.extend_from_slice(&self.fingerprint.to_le_bytes());
        b.extend_from_slice(&(self.rows.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.kv_dim as u32).to_le_bytes());
        b.extend_from_slice(&(self.tokens as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&self.payload_bytes().to_le_bytes());
        for &r in &self.rows {
            b.extend_from_slice(&(r as u32).to_le_bytes());
        }
        let d = Digest::of(&b);
        b.extend_from_slice(&d.to_le_bytes());
        b
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes the state of `tokens` held by `cache` (`rows[l]` last positions of layer `l`) to
/// `path` atomically; returns the file's bytes.
pub fn save(path: &Path, fingerprint: u64, cache: &KvCache, tokens: &[u32], rows: &[usize]) -> Result<u64> {
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!("{} is a directory: give a file name", path.display())));
    }
    let n = tokens.len();
    let kv_dtype = dtype_code(cache.dtype());
    let header = Header { fingerprint, kv_dtype, kv_dim: cache.kv_dim(), tokens: n, rows: rows.to_vec() };
    for (l, &r) in rows.iter().enumerate() {
        if r > n || !cache.holds(l, n - r, n) {
            return Err(Error::Internal(format!("state: layer {l} does not hold the last {r} of {n} positions")));
        }
    }
    let tmp = temporary_beside(path);
    let write = || -> std::io::Result<()> {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(&header.encode())?;
        let mut d = Digest::default();
        let mut put = |w: &mut BufWriter<File>, bytes: &[u8]| {
            d.update(bytes);
            w.write_all(bytes)
        };
        for &t in tokens {
            put(&mut w, &t.to_le_bytes())?;
        }
        let mut row = Vec::with_capacity(2 * cache.kv_dim() * 4);
        for (l, &r) in rows.iter().enumerate() {
            for pos in n - r..n {
                row.clear();
                match cache.row(l, pos) {
                    Row::F32(k, v) => k.iter().chain(v).for_each(|x| row.extend_from_slice(&x.to_le_bytes())),
                    Row::F16(k, v) => k.iter().chain(v).for_each(|x| row.extend_from_slice(&x.to_le_bytes())),
                }
                put(&mut w, &row)?;
            }
        }
        w.write_all(&d.finish().to_le_bytes())?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })?;
    // The rename itself is durable once the directory is synced (not possible everywhere).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(header.file_bytes())
}

/// `dir/.name.PID.N.tmp`: unique among this process's writers and other processes'.
fn temporary_beside(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map_or_else(|| "state".into(), |n| n.to_string_lossy().into_owned());
    let tmp = format!(".{name}.{}.{}.tmp", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
    path.with_file_name(tmp)
}

/// What the loading model expects of a file.
pub struct Expect<'a> {
    pub fingerprint: u64,
    pub kv_dtype: KvDtype,
    pub kv_dim: usize,
    pub max_tokens: usize,
    pub vocab: usize,
    /// The rows each layer keeps for a sequence of `n` tokens.
    pub rows: &'a dyn Fn(usize) -> Vec<usize>,
}

/// Reads and checks the header of the state file `path`.
pub fn read_header(path: &Path, f: &mut impl Read, file_len: u64, want: &Expect) -> Result<Header> {
    let bad = |msg: String| Error::format(path, msg);
    if file_len == 0 {
        return Err(bad("not a gemma_rs state file: it is empty".into()));
    }
    let mut fixed = [0u8; FIXED];
    let got = read_up_to(f, &mut fixed).map_err(|e| Error::io(path, e))?;
    if got < MAGIC.len() || fixed[..MAGIC.len()] != MAGIC {
        return Err(bad("not a gemma_rs state file (its first bytes are not GRSTATE)".into()));
    }
    if got < FIXED {
        return Err(bad(format!("truncated state file: {file_len} bytes, shorter than its header")));
    }
    let version = u32_at(&fixed, 8);
    if version != VERSION {
        return Err(bad(format!("state format version {version}; this gemma_rs reads version {VERSION}")));
    }
    let layers = u32_at(&fixed, 24) as usize;
    if layers > 4096 {
        return Err(bad("damaged state file: the header's checksum does not match".into()));
    }
    let mut rest = vec![0u8; 4 * layers + 8];
    if read_up_to(f, &mut rest).map_err(|e| Error::io(path, e))? < rest.len() {
        return Err(bad(format!("truncated state file: {file_len} bytes, shorter than its header")));
    }
    let mut whole = fixed.to_vec();
    whole.extend_from_slice(&rest[..4 * layers]);
    if Digest::of(&whole) != u64_at(&rest, 4 * layers) {
        return Err(bad("damaged state file: the header's checksum does not match".into()));
    }
    let header = Header {
        fingerprint: u64_at(&fixed, 16),
        kv_dtype: u32_at(&fixed, 12),
        kv_dim: u32_at(&fixed, 28) as usize,
        tokens: u32_at(&fixed, 32) as usize,
        rows: (0..layers).map(|l| u32_at(&rest, 4 * l) as usize).collect(),
    };
    if header.fingerprint != want.fingerprint {
        return Err(bad(format!(
            "this state was saved from another model (fingerprint {:016x}; this model, as loaded, \
             is {:016x}): the weights, their type, the tokenizer or the chat template differ",
            header.fingerprint, want.fingerprint
        )));
    }
    if header.kv_dtype != dtype_code(want.kv_dtype) {
        let theirs = dtype_of(header.kv_dtype).map_or_else(|| format!("code {}", header.kv_dtype), |t| t.name().into());
        return Err(bad(format!(
            "the state's KV cache holds {theirs}, this model's {} (load it with kv_dtype=\"{theirs}\")",
            want.kv_dtype.name()
        )));
    }
    if header.tokens > want.max_tokens {
        return Err(bad(format!(
            "the state holds {} tokens, more than this model's max_inference_len ({}); load the \
             model with max_inference_len of at least {}",
            header.tokens,
            want.max_tokens,
            header.tokens + 1
        )));
    }
    if header.kv_dim != want.kv_dim
        || header.rows != (want.rows)(header.tokens)
        || u64_at(&fixed, 40) != header.payload_bytes()
    {
        return Err(bad("damaged state file: its layout does not match its model".into()));
    }
    if file_len != header.file_bytes() {
        return Err(bad(format!(
            "truncated or damaged state file: {file_len} bytes, its header says {}",
            header.file_bytes()
        )));
    }
    Ok(header)
}

/// Fills `buf` as far as the reader goes; returns the bytes read.
fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads the state file `path` into `cache` and returns its token ids. Once its header has
/// been checked, `overwriting()` is called before the first row is stored: from then on an
/// error leaves the cache's rows partly overwritten, and the caller must treat it as holding
/// nothing.
pub fn load(path: &Path, cache: &mut KvCache, want: &Expect, overwriting: impl FnOnce()) -> Result<Vec<u32>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::format(path, "is a directory, not a state file"));
    }
    let mut r = BufReader::with_capacity(1 << 20, file);
    let h = read_header(path, &mut r, meta.len(), want)?;
    overwriting();
    let io = |e| Error::io(path, e);
    let mut d = Digest::default();
    let mut ids = vec![0u8; 4 * h.tokens];
    r.read_exact(&mut ids).map_err(io)?;
    d.update(&ids);
    let ids: Vec<u32> = ids.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().expect("4"))).collect();
    let size = want.kv_dtype.bytes();
    let mut row = vec![0u8; 2 * h.kv_dim * size];
    let (mut k, mut v) = (vec![0f32; h.kv_dim], vec![0f32; h.kv_dim]);
    let (mut kh, mut vh) = (vec![0u16; h.kv_dim], vec![0u16; h.kv_dim]);
    for (l, &rows) in h.rows.iter().enumerate() {
        for pos in h.tokens - rows..h.tokens {
            r.read_exact(&mut row).map_err(io)?;
            d.update(&row);
            let (kb, vb) = row.split_at(h.kv_dim * size);
            match want.kv_dtype {
                KvDtype::F32 => {
                    for (x, b) in k.iter_mut().zip(kb.chunks_exact(4)).chain(v.iter_mut().zip(vb.chunks_exact(4))) {
                        *x = f32::from_le_bytes(b.try_into().expect("4"));
                    }
                    cache.store_row(l, pos, Row::F32(&k, &v));
                }
                KvDtype::F16 => {
                    for (x, b) in kh.iter_mut().zip(kb.chunks_exact(2)).chain(vh.iter_mut().zip(vb.chunks_exact(2))) {
                        *x = u16::from_le_bytes(b.try_into().expect("2"));
                    }
                    cache.store_row(l, pos, Row::F16(&kh, &vh));
                }
            }
        }
    }
    let mut tail = [0u8; 8];
    r.read_exact(&mut tail).map_err(io)?;
    if d.finish() != u64::from_le_bytes(tail) {
        return Err(Error::format(path, "damaged state file: the checksum of its KV data does not match"));
    }
    if let Some(&bad) = ids.iter().find(|&&t| t as usize >= want.vocab) {
        return Err(Error::format(path, format!("damaged state file: token id {bad} is outside the vocabulary")));
    }
    Ok(ids)
}
