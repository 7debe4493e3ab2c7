//! Safetensors checkpoints through memory maps: one `model.safetensors` or a sharded
//! `model.safetensors.index.json`.
//!
//! Format (huggingface/safetensors): an 8-byte little-endian header length `n`, `n` bytes of JSON
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data;
//! offsets are relative to the end of the header. Every entry is checked against the file before
//! any tensor is read, so a lying header is an error, never an out-of-bounds read.

use crate::error::{Error, Result};
use crate::kernels::half::{bf16_to_f32, f16_to_f32};
use memmap2::Mmap;
use serde_json::Value;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    BF16,
    /// Any other dtype (I64, U8, …): listed, readable as bytes, not usable as a weight.
    Other(usize),
}

impl Dtype {
    fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "F64" | "I64" | "U64" => Dtype::Other(8),
            "I32" | "U32" => Dtype::Other(4),
            "I16" | "U16" => Dtype::Other(2),
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Dtype::Other(1),
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::Other(n) => n,
        }
    }
}

/// One tensor's place in a mapped file.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// A borrowed tensor: raw little-endian bytes straight from the map.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    /// The values widened to f32 (F32, F16 and BF16 only).
    pub fn to_f32(&self, path: &Path) -> Result<Vec<f32>> {
        let d = self.data;
        Ok(match self.dtype {
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => d.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            Dtype::F16 => d.chunks_exact(2).map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            Dtype::Other(_) => {
                return Err(Error::format(path, format!("tensor {} has a dtype that is not a float", self.name)))
            }
        })
    }
}

/// All tensors of a checkpoint, mapped.
pub struct SafeTensors {
    files: Vec<(PathBuf, Mmap)>,
    entries: HashMap<String, Entry>,
}

impl SafeTensors {
    /// Opens `dir/model.safetensors`, or the shards listed by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<SafeTensors> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if single.exists() {
            return SafeTensors::open_files(&[single]);
        }
        if !index.exists() {
            return Err(Error::format(dir, "no model.safetensors or model.safetensors.index.json here"));
        }
        let bytes = std::fs::read(&index).map_err(|e| Error::io(&index, e))?;
        let json: Value =
            serde_json::from_slice(&bytes).map_err(|e| Error::format(&index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::format(&index, "no \"weight_map\" object"))?;
        let mut shards: Vec<PathBuf> = Vec::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\') && *f != ".." && !f.is_empty())
                .ok_or_else(|| Error::format(&index, format!("bad shard file name for {name}")))?;
            let path = dir.join(file);
            if !shards.contains(&path) {
                shards.push(path);
            }
        }
        shards.sort();
        SafeTensors::open_files(&shards)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<SafeTensors> {
        let mut st = SafeTensors { files: Vec::new(), entries: HashMap::new() };
        for path in paths {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a checkpoint modified while mapped is outside the
            // contract (as for every mmap-based loader).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let idx = st.files.len();
            for (name, entry) in parse_header(path, &map, idx)? {
                if st.entries.insert(name.clone(), entry).is_some() {
                    return Err(Error::format(path, format!("tensor {name} appears in two shards")));
                }
            }
            st.files.push((path.clone(), map));
        }
        Ok(st)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The tensor `name`, or `Error::MissingTensor`.
    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, e) = self.entries.get_key_value(name).ok_or_else(|| {
            // One file names itself; shards name their directory.
            let path = match &self.files[..] {
                [(one, _)] => one.clone(),
                [(first, _), ..] => first.parent().map(Path::to_path_buf).unwrap_or_default(),
                [] => PathBuf::new(),
            };
            Error::MissingTensor { path, name: name.to_string() }
        })?;
        Ok(TensorView { name: key, dtype: e.dtype, shape: &e.shape, data: &self.files[e.file].1[e.start..e.end] })
    }

    /// The absolute byte offset of tensor `name` in its file.
    pub fn offset_of(&self, name: &str) -> Option<usize> {
        self.entries.get(name).map(|e| e.start)
    }

    /// Tells the OS that the pages of tensor `name` are no longer needed, once it was copied out,
    /// so that loading never holds the whole file resident next to the copy. A later read of the
    /// tensor faults the pages back in from the file.
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            self.release_bytes(name, 0..e.end - e.start);
        }
    }

    /// As `release`, for the bytes `range` of tensor `name` only, expanded to whole pages (a
    /// neighbour's page dropped with them is read back from the file when next touched).
    pub fn release_bytes(&self, name: &str, range: std::ops::Range<usize>) {
        #[cfg(unix)]
        if let Some(e) = self.entries.get(name) {
            let (start, end) = (e.start + range.start, (e.start + range.end).min(e.end));
            if start >= end {
                return;
            }
            // SAFETY: the map is read-only and backed by the file: dropped pages read back the
            // same bytes, so no reference into the map observes a change.
            let _ = unsafe {
                self.files[e.file].1.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
        #[cfg(not(unix))]
        let _ = (name, range);
    }

    /// The file holding `name` (for error messages).
    pub fn path_of(&self, name: &str) -> &Path {
        match self.entries.get(name) {
            Some(e) => &self.files[e.file].0,
            None => self.files.first().map(|f| f.0.as_path()).unwrap_or(Path::new("")),
        }
    }
}

/// Reads and checks the header of one safetensors file.
fn parse_header(path: &Path, map: &[u8], file: usize) -> Result<Vec<(String, Entry)>> {
    let bad = |msg: String| Error::format(path, msg);
    if map.len() < 8 {
        return Err(bad(format!("file is {} bytes, too short for a safetensors header", map.len())));
    }
    let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    let data_start = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= map.len())
        .ok_or_else(|| bad(format!("header length {n} runs past the end of the file ({} bytes)", map.len())))?;
    let header: Value =
        serde_json::from_slice(&map[8..data_start]).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_len = map.len() - data_start;
    let mut out = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_str = info.get("dtype").and_then(Value::as_str).unwrap_or("");
        let dtype =
            Dtype::parse(dtype_str).ok_or_else(|| bad(format!("tensor {name} has unknown dtype {dtype_str:?}")))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| bad(format!("tensor {name} has no valid shape")))?;
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .filter(|o: &Vec<usize>| o.len() == 2)
            .ok_or_else(|| bad(format!("tensor {name} has no valid data_offsets")))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end || end > data_len {
            return Err(bad(format!(
                "tensor {name}: data_offsets [{begin}, {end}] outside the {data_len} data bytes (file truncated?)"
            )));
        }
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {name}: shape {shape:?} overflows")))?;
        if bytes != end - begin {
            return Err(bad(format!(
                "tensor {name}: shape {shape:?} of {dtype_str} needs {bytes} bytes, data_offsets give {}",
                end - begin
            )));
        }
        out.push((name.clone(), Entry { file, dtype, shape, start: data_start + begin, end: data_start + end }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_header(header: &str, data: &[u8]) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn header_is_checked_against_the_file() {
        let p = Path::new("x.safetensors");
        let ok = file_with_header(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, &[0; 8]);
        assert_eq!(parse_header(p, &ok, 0).unwrap().len(), 1);
        let truncated = &ok[..ok.len() - 1];
        assert!(parse_header(p, truncated, 0).is_err());
        let wrong_shape = file_with_header(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, &[0; 8]);
        assert!(parse_header(p, &wrong_shape, 0).is_err());
        let overflow =
            file_with_header(r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#, &[0; 8]);
        assert!(parse_header(p, &overflow, 0).is_err());
        let mut long = ok.clone();
        long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_header(p, &long, 0).is_err());
        assert!(parse_header(p, &[1, 2, 3], 0).is_err());
        let not_json = file_with_header("{nope", &[]);
        assert!(parse_header(p, &not_json, 0).is_err());
    }
}
