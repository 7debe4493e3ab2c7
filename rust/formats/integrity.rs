//! Whether a model file is still the file that was written: `pack` stores a digest of the
//! header and of each tensor in the file's metadata, and [`verify`] recomputes them.
//!
//! Boards boot from SD cards and eMMC, where bytes flip: a damaged weight loads without any
//! complaint and the model babbles. The digests ([`Digest`]: 64 bits, not cryptographic; it
//! detects damage, not forgery) are the GGUF array `gemma_rs.digests` of U64: entry 0 covers
//! every byte before the tensor data with this array's own values read as zeros, entry `1 + i`
//! the bytes of tensor `i` in file order. llama.cpp ignores the key. Neither GGUF nor safetensors
//! defines a checksum of its own, so a file without the key cannot be verified.

use crate::error::{Error, Result};
use crate::formats::checkpoint::{Checkpoint, Source};
use crate::formats::digest::Digest;
use crate::formats::gguf::{Gguf, Value, ValueType};
use crate::kernels::threads::Threads;
use std::path::Path;
use std::sync::Mutex;

/// The metadata key of the digests (its values are filled in by `gguf::Writer::write`).
pub const DIGESTS_KEY: &str = "gemma_rs.digests";

/// What [`verify`] checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub tensors: usize,
    /// Bytes hashed: the header and every tensor.
    pub bytes: u64,
}

/// Verifies the model at `path` (a GGUF file, or a directory holding one). A file is checked
/// before its metadata is read as a model's, so that damage there is reported as damage.
pub fn verify_path(path: &Path, threads: &Threads) -> Result<Verified> {
    if std::fs::metadata(path).map_err(|e| Error::io(path, e))?.is_file() {
        return verify_gguf(&Gguf::open(path)?, threads);
    }
    verify(&Checkpoint::open(path)?, threads)
}

/// Verifies an opened checkpoint: a GGUF file with digests, or an error naming what is wrong
/// (no digests, the header, or the first damaged tensor).
pub fn verify(ck: &Checkpoint, threads: &Threads) -> Result<Verified> {
    match &ck.source {
        Source::Gguf(g) => verify_gguf(g, threads),
        Source::SafeTensors { .. } => Err(Error::format(
            &ck.path,
            "safetensors files carry no checksums, so there is nothing to verify; \
             `gemma-rs pack` writes a GGUF file that has them",
        )),
    }
}

fn verify_gguf(g: &Gguf, threads: &Threads) -> Result<Verified> {
    let path = &g.path;
    let Some(value) = g.get(DIGESTS_KEY) else {
        return Err(Error::format(
            path,
            format!(
                "no digests to verify against (no {DIGESTS_KEY} in its metadata: it was not \
                 written by `gemma-rs pack`); pack it to get a file that can be verified"
            ),
        ));
    };
    let (len, data) = match value {
        Value::Array { elem: ValueType::U64, len, data } => (*len, data.clone()),
        _ => return Err(Error::format(path, format!("damaged metadata: {DIGESTS_KEY} is not an array of U64"))),
    };
    if len != g.tensors.len() + 1 {
        return Err(Error::format(
            path,
            format!("damaged metadata: {len} digests for {} tensors and the header", g.tensors.len()),
        ));
    }
    let want: Vec<u64> =
        g.map[data.clone()].chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();

    // The header: every byte before the first tensor's, this array's values as zeros.
    let head_len = g.tensors.iter().map(|t| t.data.start).min().unwrap_or(g.map.len());
    let mut head = g.map[..head_len].to_vec();
    if data.end <= head_len {
        head[data].fill(0);
    }
    if Digest::of(&head) != want[0] {
        return Err(Error::format(
            path,
            "the header (metadata and tensor list) is damaged: it does not match the digest \
             written with it; copy the file again",
        ));
    }

    // The tensors, spread over the threads by size; the first damaged one in file order is named.
    let n = g.tensors.len();
    let sizes: Vec<usize> = g.tensors.iter().map(|t| t.data.len()).collect();
    let total: usize = sizes.iter().sum();
    let got = Mutex::new(vec![0u64; n]);
    let ranges = threads.ranges_by_weight(n, total / 16, |i| sizes[i]);
    threads.run(ranges, |_, range| {
        let part: Vec<u64> = range.clone().map(|i| Digest::of(g.bytes(&g.tensors[i]))).collect();
        got.lock().unwrap_or_else(|e| e.into_inner())[range].copy_from_slice(&part);
    });
    let got = got.into_inner().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = (0..n).find(|&i| got[i] != want[1 + i]) {
        let t = &g.tensors[i];
        return Err(Error::format(
            path,
            format!(
                "tensor {} is damaged: its {} bytes at offset {} do not match the digest written \
                 with them; copy the file again",
                t.name,
                t.data.len(),
                t.data.start
            ),
        ));
    }
    Ok(Verified { tensors: n, bytes: (head_len + total) as u64 })
}
