//! GGUF files (llama.cpp's model format), read through a memory map and written in one pass.
//!
//! Format (ggml's `docs/gguf.md` and `gguf.h`), all little-endian:
//! - `"GGUF"`, version u32 (2 or 3 here; 1 had 32-bit counts), tensor count u64, KV count u64;
//! - KV pairs: key string, value type u32, value. A string is a u64 length then UTF-8 bytes; an
//!   array is an element type u32, a u64 count, then the elements;
//! - tensor infos: name string, n_dims u32 (at most 4), dims u64 each (innermost first), ggml type
//!   u32, data offset u64 (relative to the data section, a multiple of the alignment);
//! - padding to `general.alignment` (default 32), then the data section.
//!
//! Every count, length and offset is checked against the file before anything is allocated or
//! read, so a lying header is an error, never a giant allocation or an out-of-bounds read.

use crate::error::{Error, Result};
use crate::formats::digest::Digest;
use crate::kernels::quant::ggml::{self, GgmlType};
use memmap2::Mmap;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: usize = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: usize = 4;
/// Arrays of arrays are legal; nesting deeper than this is not a model file.
const MAX_NESTING: usize = 4;

/// A metadata value type (gguf.h `enum gguf_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    Str,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    fn from_u32(v: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match v {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => Str,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    fn to_u32(self) -> u32 {
        use ValueType::*;
        match self {
            U8 => 0,
            I8 => 1,
            U16 => 2,
            I16 => 3,
            U32 => 4,
            I32 => 5,
            F32 => 6,
            Bool => 7,
            Str => 8,
            Array => 9,
            U64 => 10,
            I64 => 11,
            F64 => 12,
        }
    }

    /// Bytes of a fixed-size value; `None` for strings and arrays.
    fn size(self) -> Option<usize> {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => Some(1),
            U16 | I16 => Some(2),
            U32 | I32 | F32 => Some(4),
            U64 | I64 | F64 => Some(8),
            Str | Array => None,
        }
    }
}

/// A metadata value. Strings and arrays stay in the map: `Gguf` decodes them on request.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    /// Byte range of a string (checked to be UTF-8 by the parser, and again by `Gguf::str`).
    Str(Range<usize>),
    /// `len` elements of type `elem`, stored in the byte range `data`.
    Array {
        elem: ValueType,
        len: usize,
        data: Range<usize>,
    },
}

impl Value {
    /// An integer value of any integer type, if it is one and is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A number of any numeric type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
}

/// One metadata entry; `raw` is the byte range of the value as stored (after its type), so that
/// a writer can copy it unchanged.
#[derive(Clone, Debug)]
pub struct Kv {
    pub key: String,
    pub ty: ValueType,
    pub value: Value,
    raw: Range<usize>,
}

/// One tensor's info; `data` is its absolute byte range in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF lists them, innermost (contiguous) first.
    pub dims: Vec<usize>,
    /// The ggml type, or the raw id of a type this crate does not read (an error on use).
    pub ty: std::result::Result<GgmlType, u32>,
    pub data: Range<usize>,
}

impl TensorInfo {
    /// The shape outermost first, as PyTorch and safetensors write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A GGUF file, mapped.
pub struct Gguf {
    pub path: PathBuf,
    pub map: Arc<Mmap>,
    pub version: u32,
    pub alignment: usize,
    /// In file order.
    pub kvs: Vec<Kv>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    kv_index: HashMap<String, usize>,
    tensor_index: HashMap<String, usize>,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; a model file modified while mapped is outside the
        // contract (as for every mmap-based loader).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (version, alignment, kvs, tensors) = parse(&map).map_err(|msg| Error::format(path, msg))?;
        let kv_index = kvs.iter().enumerate().map(|(i, kv)| (kv.key.clone(), i)).collect();
        let tensor_index = tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(Gguf {
            path: path.to_path_buf(),
            map: Arc::new(map),
            version,
            alignment,
            kvs,
            tensors,
            kv_index,
            tensor_index,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv_index.get(key).map(|&i| &self.kvs[i].value)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The bytes of a tensor (its range was checked at open).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.data.clone()]
    }

    /// The string `v`, if it is one.
    pub fn str<'a>(&'a self, v: &Value) -> Option<&'a str> {
        match v {
            // `parse` validated its ranges; a `Value` may come from elsewhere, so check again.
            Value::Str(r) => std::str::from_utf8(self.map.get(r.clone())?).ok(),
            _ => None,
        }
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(|v| self.str(v))
    }

    /// The elements of an array of strings.
    pub fn strings(&self, v: &Value) -> Option<Vec<&str>> {
        let Value::Array { elem: ValueType::Str, len, data } = v else { return None };
        let mut c = Cursor { buf: &self.map[..data.end], pos: data.start };
        let mut out = Vec::with_capacity((*len).min(data.len() / 8));
        for _ in 0..*len {
            let r = c.string().ok()?;
            out.push(self.str(&Value::Str(r))?);
        }
        Some(out)
    }

    /// The elements of a numeric array, converted to f64 (exact for every type but 64-bit ints
    /// above 2^53, which no tokenizer field holds).
    pub fn numbers(&self, v: &Value) -> Option<Vec<f64>> {
        let Value::Array { elem, len, data } = v else { return None };
        elem.size()?;
        let mut c = Cursor { buf: &self.map[..data.end], pos: data.start };
        (0..*len).map(|_| c.scalar(*elem).ok().and_then(|v| v.as_f64())).collect()
    }

    /// Tells the OS the bytes `range` (absolute) are no longer needed, expanded to whole pages;
    /// a later read faults them back in from the file.
    pub fn release(&self, range: Range<usize>) {
        #[cfg(unix)]
        if range.start < range.end && range.end <= self.map.len() {
            // SAFETY: the map is read-only and backed by the file: dropped pages read back the
            // same bytes, so no reference into the map observes a change.
            let _ = unsafe {
                self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
            };
        }
        #[cfg(not(unix))]
        let _ = range;
    }
}

/// A bounds-checked reader over the file's bytes; errors are messages for `Error::format`.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

type Msg<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Msg<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {} but the file ends at {} (truncated?)",
                self.pos,
                self.buf.len()
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Msg<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn u32(&mut self) -> Msg<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Msg<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A length or count that must fit the rest of the file at `min_size` bytes per item.
    fn count(&mut self, what: &str, min_size: usize) -> Msg<usize> {
        let n = self.u64()?;
        match usize::try_from(n) {
            Ok(n) if n.checked_mul(min_size).is_some_and(|b| b <= self.remaining()) => Ok(n),
            _ => Err(format!("{what} {n} does not fit in the {} bytes left in the file", self.remaining())),
        }
    }

    /// A string's byte range, checked to be UTF-8.
    fn string(&mut self) -> Msg<Range<usize>> {
        let n = self.count("string length", 1)?;
        let start = self.pos;
        let bytes = self.take(n)?;
        std::str::from_utf8(bytes).map_err(|e| format!("string at offset {start} is not UTF-8: {e}"))?;
        Ok(start..start + n)
    }

    fn scalar(&mut self, ty: ValueType) -> Msg<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>()?[0]),
            ValueType::I8 => Value::I8(self.array::<1>()?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
            ValueType::Bool => match self.array::<1>()?[0] {
                b @ (0 | 1) => Value::Bool(b == 1),
                b => return Err(format!("bool value {b} at offset {}", self.pos - 1)),
            },
            ValueType::Str => Value::Str(self.string()?),
            ValueType::Array => unreachable!("arrays are read by `value`"),
        })
    }

    fn value_type(&mut self) -> Msg<ValueType> {
        let t = self.u32()?;
        ValueType::from_u32(t).ok_or_else(|| format!("unknown metadata value type {t} at offset {}", self.pos - 4))
    }

    fn value(&mut self, ty: ValueType, depth: usize) -> Msg<Value> {
        if ty != ValueType::Array {
            return self.scalar(ty);
        }
        if depth >= MAX_NESTING {
            return Err(format!("arrays nested more than {MAX_NESTING} deep"));
        }
        let elem = self.value_type()?;
        // Every element takes at least one byte (a string or array at least 8): the count is
        // checked against the file before anything is read.
        let len = self.count("array length", elem.size().unwrap_or(8))?;
        let start = self.pos;
        match elem.size() {
            Some(size) => {
                self.take(len * size)?;
            }
            None => {
                for _ in 0..len {
                    self.value(elem, depth + 1)?;
                }
            }
        }
        Ok(Value::Array { elem, len, data: start..self.pos })
    }
}

type Parsed = (u32, usize, Vec<Kv>, Vec<TensorInfo>);

fn parse(buf: &[u8]) -> Msg<Parsed> {
    let mut c = Cursor { buf, pos: 0 };
    if buf.len() < 4 || &buf[..4] != MAGIC {
        return Err("not a GGUF file (no \"GGUF\" magic)".into());
    }
    c.pos = 4;
    let version = c.u32()?;
    match version {
        2 | 3 => {}
        1 => return Err("GGUF version 1 is not supported (re-convert the model with a recent llama.cpp)".into()),
        v if v.swap_bytes() <= 3 => return Err("big-endian GGUF files are not supported".into()),
        v => return Err(format!("unknown GGUF version {v}")),
    }
    // A tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes, a KV pair at least 8 + 4 + 1.
    let n_tensors = c.count("tensor count", 32)?;
    let n_kv = c.count("metadata count", 13)?;

    // Capacities are not taken from the file's counts: a count is only checked against the
    // file's size, and an item in memory is larger than its smallest encoding.
    let mut kvs: Vec<Kv> = Vec::new();
    let mut keys = HashSet::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        // SAFETY: `string` validated the range as UTF-8.
        let key = unsafe { std::str::from_utf8_unchecked(&buf[key]) }.to_string();
        let ty = c.value_type().map_err(|e| format!("{key}: {e}"))?;
        let start = c.pos;
        let value = c.value(ty, 0).map_err(|e| format!("metadata {key}: {e}"))?;
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key {key} appears twice"));
        }
        kvs.push(Kv { key, ty, value, raw: start..c.pos });
    }
    let alignment = match kvs.iter().find(|kv| kv.key == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(kv) => match kv.value {
            Value::U32(a) if a.is_power_of_two() && a <= 1 << 16 => a as usize,
            ref v => return Err(format!("general.alignment must be a u32 power of two, got {v:?}")),
        },
    };

    let mut infos = Vec::new();
    for _ in 0..n_tensors {
        let name = c.string()?;
        // SAFETY: as for keys.
        let name = unsafe { std::str::from_utf8_unchecked(&buf[name]) }.to_string();
        let n_dims = c.u32()? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let d = c.u64()?;
            dims.push(usize::try_from(d).map_err(|_| format!("tensor {name}: dimension {d} is too large"))?);
        }
        let raw_ty = c.u32()?;
        let offset = c.u64()?;
        infos.push((name, dims, raw_ty, offset));
    }
    let data_start = c.pos.next_multiple_of(alignment);
    if data_start > buf.len() && n_tensors > 0 {
        return Err(format!("the data section would start at {data_start}, past the end of the file"));
    }

    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(infos.len());
    let mut names = HashSet::new();
    for (name, dims, raw_ty, offset) in infos {
        let ty = GgmlType::from_u32(raw_ty).ok_or(raw_ty);
        let offset = usize::try_from(offset).map_err(|_| format!("tensor {name}: offset {offset} is too large"))?;
        if offset % alignment != 0 {
            return Err(format!("tensor {name}: offset {offset} is not a multiple of the alignment {alignment}"));
        }
        let start = data_start.checked_add(offset).filter(|&s| s <= buf.len());
        let start = start.ok_or_else(|| format!("tensor {name}: offset {offset} is past the end of the file"))?;
        let end = match ty {
            Ok(t) => {
                let row = t.row_bytes(dims[0]).ok_or_else(|| {
                    format!("tensor {name}: a row of {} values is not whole {} blocks", dims[0], t.name())
                })?;
                let bytes = dims[1..].iter().try_fold(row, |acc, &d| acc.checked_mul(d));
                let end = bytes.and_then(|b| start.checked_add(b));
                end.filter(|&e| e <= buf.len()).ok_or_else(|| {
                    format!("tensor {name}: dims {dims:?} of {} run past the end of the file (truncated?)", t.name())
                })?
            }
            // Its size is unknown; using it is an error (see `Checkpoint`).
            Err(_) => start,
        };
        if !names.insert(name.clone()) {
            return Err(format!("tensor {name} appears twice"));
        }
        tensors.push(TensorInfo { name, dims, ty, data: start..end });
    }
    Ok((version, alignment, kvs, tensors))
}

/// A description of a tensor's type for error messages: its name, or its raw id.
pub fn type_description(ty: std::result::Result<GgmlType, u32>) -> String {
    match ty {
        Ok(t) => t.name().to_string(),
        Err(id) => match ggml::type_name(id) {
            Some(name) => format!("{name} (ggml type {id})"),
            None => format!("unknown ggml type {id}"),
        },
    }
}

/// Writes a GGUF v3 file: metadata and tensor infos are declared first, then `write` streams
/// every tensor's bytes in declaration order.
pub struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    keys: HashSet<String>,
    tensors: Vec<(String, Vec<usize>, GgmlType, usize)>,
    /// The key of the digest array `write` appends (see `formats::integrity`), if asked for.
    digests: Option<String>,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::new()
    }
}

impl Writer {
    pub fn new() -> Writer {
        Writer { kv: Vec::new(), n_kv: 0, keys: HashSet::new(), tensors: Vec::new(), digests: None }
    }

    /// Asks `write` to append, as the last metadata entry `key`, an array of U64 digests
    /// ([`Digest`]): of the header (everything before the tensor data, this array's values read
    /// as zeros), then of each tensor's bytes in order. Their values are written once the data
    /// is, which is why `write` needs to seek.
    pub fn digests(&mut self, key: &str) {
        self.digests = Some(key.to_string());
    }

    fn key(&mut self, key: &str, ty: ValueType) {
        assert!(self.keys.insert(key.to_string()), "GGUF key {key} written twice");
        self.n_kv += 1;
        put_str(&mut self.kv, key);
        self.kv.extend_from_slice(&ty.to_u32().to_le_bytes());
    }

    pub fn u32(&mut self, key: &str, v: u32) {
        self.key(key, ValueType::U32);
        self.kv.extend_from_slice(&v.to_le_bytes());
    }

    pub fn f32(&mut self, key: &str, v: f32) {
        self.key(key, ValueType::F32);
        self.kv.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bool(&mut self, key: &str, v: bool) {
        self.key(key, ValueType::Bool);
        self.kv.push(v as u8);
    }

    pub fn str(&mut self, key: &str, v: &str) {
        self.key(key, ValueType::Str);
        put_str(&mut self.kv, v);
    }

    fn array_head(&mut self, key: &str, elem: ValueType, len: usize) {
        self.key(key, ValueType::Array);
        self.kv.extend_from_slice(&elem.to_u32().to_le_bytes());
        self.kv.extend_from_slice(&(len as u64).to_le_bytes());
    }

    pub fn strings<S: AsRef<str>>(&mut self, key: &str, v: &[S]) {
        self.array_head(key, ValueType::Str, v.len());
        for s in v {
            put_str(&mut self.kv, s.as_ref());
        }
    }

    pub fn f32s(&mut self, key: &str, v: &[f32]) {
        self.array_head(key, ValueType::F32, v.len());
        v.iter().for_each(|x| self.kv.extend_from_slice(&x.to_le_bytes()));
    }

    pub fn i32s(&mut self, key: &str, v: &[i32]) {
        self.array_head(key, ValueType::I32, v.len());
        v.iter().for_each(|x| self.kv.extend_from_slice(&x.to_le_bytes()));
    }

    /// Copies one entry of another GGUF file unchanged.
    pub fn copy(&mut self, src: &Gguf, kv: &Kv) {
        self.key(&kv.key, kv.ty);
        self.kv.extend_from_slice(&src.map[kv.raw.clone()]);
    }

    /// Declares a tensor of `dims` (innermost first) and type `ty`.
    pub fn tensor(&mut self, name: &str, dims: &[usize], ty: GgmlType) {
        let bytes = ty.row_bytes(dims[0]).expect("whole blocks") * dims[1..].iter().product::<usize>();
        self.tensors.push((name.to_string(), dims.to_vec(), ty, bytes));
    }

    /// Writes the file to `out`; `data(i, sink)` must write exactly the bytes of tensor `i`.
    pub fn write<W: Write + Seek>(
        mut self,
        out: &mut W,
        mut data: impl FnMut(usize, &mut dyn Write) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let start = out.stream_position()?;
        let digest_values = self.digests.take().map(|key| {
            self.array_head(&key, ValueType::U64, self.tensors.len() + 1);
            let at = self.kv.len();
            self.kv.resize(at + 8 * (self.tensors.len() + 1), 0);
            at
        });
        let align = DEFAULT_ALIGNMENT;
        let mut head = Vec::with_capacity(self.kv.len() + 64 * self.tensors.len() + 64);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&self.n_kv.to_le_bytes());
        head.extend_from_slice(&self.kv);
        let mut offset = 0usize;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut head, name);
            head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|&d| head.extend_from_slice(&(d as u64).to_le_bytes()));
            head.extend_from_slice(&ty.to_u32().to_le_bytes());
            head.extend_from_slice(&(offset as u64).to_le_bytes());
            offset = (offset + bytes).next_multiple_of(align);
        }
        head.resize(head.len().next_multiple_of(align), 0);
        out.write_all(&head)?;
        let mut digests = vec![Digest::of(&head)];
        for (i, (name, _, _, bytes)) in self.tensors.iter().enumerate() {
            let mut sink = Counted { inner: &mut *out, n: 0, digest: Digest::default() };
            data(i, &mut sink)?;
            if sink.n != *bytes {
                return Err(std::io::Error::other(format!("tensor {name}: wrote {} bytes, declared {bytes}", sink.n)));
            }
            digests.push(sink.digest.finish());
            out.write_all(&[0u8; DEFAULT_ALIGNMENT][..bytes.next_multiple_of(align) - bytes])?;
        }
        if let Some(at) = digest_values {
            // The values' place in the file: after magic, version and the two counts.
            let end = out.stream_position()?;
            out.seek(SeekFrom::Start(start + 24 + at as u64))?;
            digests.iter().try_for_each(|d| out.write_all(&d.to_le_bytes()))?;
            out.seek(SeekFrom::Start(end))?;
        }
        Ok(())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A writer that counts and digests the bytes passed through.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
    digest: Digest,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n;
        self.digest.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small valid file: two KV pairs (a string array among them) and one F32 tensor.
    fn sample() -> Vec<u8> {
        let mut w = Writer::new();
        w.str("general.architecture", "gemma3");
        w.strings("tokenizer.ggml.tokens", &["a", "b", "▁c"]);
        w.f32s("tokenizer.ggml.scores", &[0.0, -1.0, -2.0]);
        w.bool("flag", true);
        w.tensor("t", &[3, 2], GgmlType::F32);
        let mut out = std::io::Cursor::new(Vec::new());
        w.write(&mut out, |_, s| {
            for i in 0..6 {
                s.write_all(&(i as f32).to_le_bytes())?;
            }
            Ok(())
        })
        .unwrap();
        out.into_inner()
    }

    fn parse_err(buf: &[u8]) -> String {
        parse(buf).expect_err("should fail")
    }

    #[test]
    fn round_trip() {
        let buf = sample();
        let (version, alignment, kvs, tensors) = parse(&buf).unwrap();
        assert_eq!((version, alignment, kvs.len(), tensors.len()), (3, 32, 4, 1));
        assert_eq!(tensors[0].dims, vec![3, 2]);
        assert_eq!(tensors[0].shape(), vec![2, 3]);
        assert_eq!(tensors[0].ty, Ok(GgmlType::F32));
        assert_eq!(tensors[0].data.start % 32, 0);
        assert_eq!(tensors[0].data.len(), 24);
        assert_eq!(&buf[tensors[0].data.start + 4..tensors[0].data.start + 8], &1f32.to_le_bytes());
        assert_eq!(kvs[3].value, Value::Bool(true));
        let dir = std::env::temp_dir().join(format!("gemma_rs_gguf_{}", std::process::id()));
        std::fs::write(&dir, &buf).unwrap();
        let g = Gguf::open(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(g.get_str("general.architecture"), Some("gemma3"));
        assert_eq!(g.strings(g.get("tokenizer.ggml.tokens").unwrap()).unwrap(), vec!["a", "b", "▁c"]);
        assert_eq!(g.numbers(g.get("tokenizer.ggml.scores").unwrap()).unwrap(), vec![0.0, -1.0, -2.0]);
        // Copying every entry reproduces the metadata bytes.
        let mut w = Writer::new();
        g.kvs.iter().for_each(|kv| w.copy(&g, kv));
        w.tensor("t", &[3, 2], GgmlType::F32);
        let mut out = std::io::Cursor::new(Vec::new());
        w.write(&mut out, |_, s| s.write_all(g.bytes(&g.tensors[0]))).unwrap();
        assert_eq!(out.into_inner(), buf);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let buf = sample();
        let data_start = parse(&buf).unwrap().3[0].data.start;
        for n in 0..buf.len() {
            if n >= data_start + 24 {
                continue;
            }
            let r = parse(&buf[..n]);
            assert!(r.is_err(), "truncated at {n} of {} parsed", buf.len());
        }
    }

    /// Offsets of fields in `sample()`: magic 0, version 4, n_tensors 8, n_kv 16, first key 24.
    #[test]
    fn lying_headers_are_errors() {
        let buf = sample();
        let with = |at: usize, bytes: &[u8]| {
            let mut b = buf.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        assert!(parse_err(&with(0, b"GGUX")).contains("magic"));
        assert!(parse_err(&with(4, &1u32.to_le_bytes())).contains("version 1"));
        assert!(parse_err(&with(4, &3u32.to_be_bytes())).contains("big-endian"));
        assert!(parse_err(&with(8, &u64::MAX.to_le_bytes())).contains("tensor count"));
        assert!(parse_err(&with(16, &(1u64 << 40).to_le_bytes())).contains("metadata count"));
        assert!(parse_err(&with(24, &u64::MAX.to_le_bytes())).contains("string length"));
        // The first value's type (after the 20-byte key "general.architecture").
        let ty_at = 24 + 8 + 20;
        assert!(parse_err(&with(ty_at, &99u32.to_le_bytes())).contains("unknown metadata value type 99"));
        // Its string length.
        assert!(parse_err(&with(ty_at + 4, &(1u64 << 62).to_le_bytes())).contains("string length"));
        // Non-UTF-8 in the string "gemma3".
        assert!(parse_err(&with(ty_at + 12, &[0xFF])).contains("UTF-8"));
        // The array: key "tokenizer.ggml.tokens" (21 bytes), type, elem type, count.
        let arr = ty_at + 4 + 8 + 6;
        let count_at = arr + 8 + 21 + 4 + 4;
        assert!(parse_err(&with(count_at, &u64::MAX.to_le_bytes())).contains("array length"));
        assert!(parse_err(&with(count_at - 4, &77u32.to_le_bytes())).contains("value type 77"));
    }

    fn tensor_field(buf: &[u8]) -> usize {
        // The tensor info is the last thing before the padding: name "t", n_dims, 2 dims, type, offset.
        let (_, _, kvs, _) = parse(buf).unwrap();
        kvs.last().unwrap().raw.end
    }

    #[test]
    fn lying_tensor_infos_are_errors() {
        let buf = sample();
        let info = tensor_field(&buf);
        let (n_dims, dim0, ty, off) = (info + 9, info + 13, info + 29, info + 33);
        let with = |at: usize, bytes: &[u8]| {
            let mut b = buf.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            b
        };
        assert!(parse_err(&with(n_dims, &9u32.to_le_bytes())).contains("dimensions"));
        assert!(parse_err(&with(dim0, &(1u64 << 40).to_le_bytes())).contains("past the end"));
        // Dims whose product overflows.
        let mut b = with(dim0, &(1u64 << 33).to_le_bytes());
        b[dim0 + 8..dim0 + 16].copy_from_slice(&(1u64 << 33).to_le_bytes());
        assert!(parse_err(&b).contains("past the end"));
        assert!(parse_err(&with(off, &64u64.to_le_bytes())).contains("past the end"));
        assert!(parse_err(&with(off, &3u64.to_le_bytes())).contains("alignment"));
        assert!(parse_err(&with(off, &u64::MAX.to_le_bytes())).contains("offset"));
        // A Q8_0 row of 3 values is not whole blocks.
        assert!(parse_err(&with(ty, &8u32.to_le_bytes())).contains("blocks"));
        // An unknown type parses (its use is the error), named in messages.
        let (.., tensors) = parse(&with(ty, &23u32.to_le_bytes())).unwrap();
        assert_eq!(tensors[0].ty, Err(23));
        assert_eq!(type_description(tensors[0].ty), "IQ4_XS (ggml type 23)");
        assert_eq!(type_description(Err(1000)), "unknown ggml type 1000");
    }
}
