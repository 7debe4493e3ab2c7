//! A small pull reader over JSON text: the caller walks objects and arrays with closures and takes
//! scalars as it meets them, so a 33 MB tokenizer.json is read without building a DOM. Strings
//! without escapes are borrowed from the input. Values can be skipped and their byte range kept,
//! to be read later with [`Reader::at`]. Every malformation is an `Error::Format`, never a panic.

use std::borrow::Cow;
use std::fmt::Display;
use std::path::Path;

use crate::error::{Error, Result};

/// Containers nested deeper than this are rejected, so skipping stays within the stack.
const MAX_DEPTH: u32 = 128;

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], path: &'a Path) -> Self {
        Reader { buf, pos: 0, path }
    }

    /// A reader over the same text, starting at byte `pos` (from [`Reader::pos`]).
    pub fn at(&self, pos: usize) -> Self {
        Reader { buf: self.buf, pos, path: self.path }
    }

    /// The offset of the next value, past any whitespace.
    pub fn pos(&mut self) -> usize {
        self.skip_ws();
        self.pos
    }

    pub fn error(&self, msg: impl Display) -> Error {
        Error::format(self.path, format!("{msg} (at byte {})", self.pos))
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.buf.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.buf.get(self.pos).copied()
    }

    fn expect(&mut self, byte: u8) -> Result<()> {
        if self.peek() == Some(byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(&format!("'{}'", byte as char)))
        }
    }

    fn unexpected(&self, expected: &str) -> Error {
        match self.buf.get(self.pos) {
            None => self.error(format!("unexpected end of JSON, expected {expected}")),
            Some(&b) if b.is_ascii_graphic() => self.error(format!("expected {expected}, found '{}'", b as char)),
            Some(&b) => self.error(format!("expected {expected}, found byte 0x{b:02x}")),
        }
    }

    fn literal(&mut self, word: &str) -> bool {
        self.skip_ws();
        if self.buf[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    /// Whether a string comes next.
    pub fn is_str(&mut self) -> bool {
        self.peek() == Some(b'"')
    }

    /// Consumes a `null` if one comes next.
    pub fn null(&mut self) -> bool {
        self.literal("null")
    }

    pub fn bool(&mut self) -> Result<bool> {
        if self.literal("true") {
            Ok(true)
        } else if self.literal("false") {
            Ok(false)
        } else {
            Err(self.unexpected("true or false"))
        }
    }

    /// A non-negative integer that fits in u32.
    pub fn u32(&mut self) -> Result<u32> {
        self.skip_ws();
        let start = self.pos;
        let mut value: u64 = 0;
        while let Some(&b @ b'0'..=b'9') = self.buf.get(self.pos) {
            value = value * 10 + u64::from(b - b'0');
            if value > u64::from(u32::MAX) {
                return Err(self.error("integer out of range"));
            }
            self.pos += 1;
        }
        let digits = self.pos - start;
        let leading_zero = digits > 1 && self.buf[start] == b'0';
        let more = matches!(self.buf.get(self.pos), Some(b'.' | b'e' | b'E'));
        if digits == 0 || leading_zero || more {
            self.pos = start;
            return Err(self.unexpected("a non-negative integer"));
        }
        Ok(value as u32)
    }

    /// A string, borrowed from the input when it has no escapes.
    pub fn str(&mut self) -> Result<Cow<'a, str>> {
        self.expect(b'"')?;
        let start = self.pos;
        loop {
            match self.buf.get(self.pos) {
                Some(b'"') => {
                    let s = self.utf8(&self.buf[start..self.pos], start)?;
                    self.pos += 1;
                    return Ok(Cow::Borrowed(s));
                }
                Some(b'\\') => break,
                Some(&b) if b >= 0x20 => self.pos += 1,
                _ => return Err(self.bad_string_byte()),
            }
        }
        let mut out = self.buf[start..self.pos].to_vec();
        loop {
            match self.buf.get(self.pos) {
                Some(b'"') => {
                    self.pos += 1;
                    return String::from_utf8(out)
                        .map(Cow::Owned)
                        .map_err(|_| Error::format(self.path, format!("invalid UTF-8 in the string at byte {start}")));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    self.escape(&mut out)?;
                }
                Some(&b) if b >= 0x20 => {
                    out.push(b);
                    self.pos += 1;
                }
                _ => return Err(self.bad_string_byte()),
            }
        }
    }

    fn utf8(&self, bytes: &'a [u8], start: usize) -> Result<&'a str> {
        std::str::from_utf8(bytes)
            .map_err(|_| Error::format(self.path, format!("invalid UTF-8 in the string at byte {start}")))
    }

    fn bad_string_byte(&self) -> Error {
        match self.buf.get(self.pos) {
            None => self.error("unterminated string"),
            Some(_) => self.error("control character in a string"),
        }
    }

    /// One escape sequence, the backslash already consumed.
    fn escape(&mut self, out: &mut Vec<u8>) -> Result<()> {
        let c = match self.buf.get(self.pos) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                self.pos += 1;
                let hi = self.hex4()?;
                let code = match hi {
                    0xD800..=0xDBFF => {
                        if !self.buf[self.pos..].starts_with(b"\\u") {
                            return Err(self.error("unpaired surrogate in a \\u escape"));
                        }
                        self.pos += 2;
                        let lo = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&lo) {
                            return Err(self.error("unpaired surrogate in a \\u escape"));
                        }
                        0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                    }
                    0xDC00..=0xDFFF => return Err(self.error("unpaired surrogate in a \\u escape")),
                    _ => hi,
                };
                let c = char::from_u32(code).ok_or_else(|| self.error("invalid \\u escape"))?;
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                return Ok(());
            }
            _ => return Err(self.error("invalid escape in a string")),
        };
        self.pos += 1;
        out.push(c as u8);
        Ok(())
    }

    fn hex4(&mut self) -> Result<u32> {
        let digits = self.buf.get(self.pos..self.pos + 4).ok_or_else(|| self.error("truncated \\u escape"))?;
        let mut v = 0;
        for &d in digits {
            let x = (d as char).to_digit(16).ok_or_else(|| self.error("invalid \\u escape"))?;
            v = v * 16 + x;
        }
        self.pos += 4;
        Ok(v)
    }

    /// Walks an object, calling `f` with each key; `f` must consume the value.
    pub fn object(&mut self, mut f: impl FnMut(&mut Self, Cow<'a, str>) -> Result<()>) -> Result<()> {
        self.expect(b'{')?;
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            let key = self.str()?;
            self.expect(b':')?;
            f(self, key)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.unexpected("',' or '}'")),
            }
        }
    }

    /// Walks an array, calling `f` for each element; `f` must consume it.
    pub fn array(&mut self, mut f: impl FnMut(&mut Self) -> Result<()>) -> Result<()> {
        self.expect(b'[')?;
        if self.peek() == Some(b']') {
            self.pos += 1;
            return Ok(());
        }
        loop {
            f(self)?;
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(());
                }
                _ => return Err(self.unexpected("',' or ']'")),
            }
        }
    }

    /// Checks and skips one value of any type.
    pub fn skip(&mut self) -> Result<()> {
        self.skip_nested(0)
    }

    fn skip_nested(&mut self, depth: u32) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(self.error("JSON nested too deeply"));
        }
        match self.peek() {
            Some(b'{') => self.object(|r, _| r.skip_nested(depth + 1)),
            Some(b'[') => self.array(|r| r.skip_nested(depth + 1)),
            Some(b'"') => self.skip_str(),
            Some(b'-' | b'0'..=b'9') => self.skip_number(),
            _ if self.null() || self.literal("true") || self.literal("false") => Ok(()),
            _ => Err(self.unexpected("a JSON value")),
        }
    }

    /// Like [`Reader::str`] but without building the string.
    fn skip_str(&mut self) -> Result<()> {
        self.expect(b'"')?;
        let start = self.pos;
        loop {
            match self.buf.get(self.pos) {
                Some(b'"') => break,
                Some(b'\\') => {
                    self.pos += 1;
                    self.escape(&mut Vec::new())?;
                }
                Some(&b) if b >= 0x20 => self.pos += 1,
                _ => return Err(self.bad_string_byte()),
            }
        }
        self.utf8(&self.buf[start..self.pos], start)?;
        self.pos += 1;
        Ok(())
    }

    fn skip_number(&mut self) -> Result<()> {
        let digits = |r: &mut Self| {
            let start = r.pos;
            while let Some(b'0'..=b'9') = r.buf.get(r.pos) {
                r.pos += 1;
            }
            r.pos > start
        };
        if self.buf.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let int_start = self.pos;
        let ok = digits(self) && (self.buf[int_start] != b'0' || self.pos == int_start + 1);
        if !ok {
            return Err(self.error("invalid number"));
        }
        if self.buf.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if !digits(self) {
                return Err(self.error("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.buf.get(self.pos) {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.buf.get(self.pos) {
                self.pos += 1;
            }
            if !digits(self) {
                return Err(self.error("invalid number"));
            }
        }
        Ok(())
    }

    /// Fails unless only whitespace is left.
    pub fn end(&mut self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(self.error("trailing characters after the JSON value")),
        }
    }
}
