//! A compact tokenizer for Gemma 3's `tokenizer.json`, giving the same ids and text as Hugging Face
//! `tokenizers` (0.23) with a fraction of its memory: about 14 MB of tables for Gemma 3, where the
//! `tokenizers` crate holds 100+ MB.
//!
//! `tokenizer.json` is HF's serialized tokenizer: `added_tokens` (strings matched before anything
//! else), a `normalizer`, a `pre_tokenizer`, a `model` (here BPE: `vocab` string → id and ranked
//! `merges`), a `post_processor` (here a template adding `<bos>`) and a `decoder`. This module
//! implements the subset Gemma 3 uses and rejects the rest at load time:
//! - added tokens without `lstrip`/`rstrip`/`single_word`/`normalized`, matched on the raw text,
//!   leftmost and then longest (HF's `AddedVocabulary`);
//! - normalizers `Replace` (string pattern) and `Sequence`s of them;
//! - pre-tokenizer `Split` on a string pattern, any behaviour, or none;
//! - model `BPE` with `byte_fallback`, `fuse_unk`, `ignore_merges` and `unk_token`, merged exactly
//!   as HF's `Word::merge_all` does (a heap by rank then position, stale entries skipped);
//! - post-processor `TemplateProcessing` of one special token then `$A`;
//! - decoders `Replace`, then `ByteFallback`, then `Fuse`, in that order.
//!
//! Deliberate differences: `decode` fails on an id without a token (HF drops it), and files that
//! HF loads with a warning or an arbitrary choice are rejected: a token or an id listed twice in
//! the vocabulary, an added token declared with an id other than the one HF would give it, an
//! `unk_token` missing from the vocabulary (HF fails only when encoding needs it).
//!
//! Loading streams the JSON (see `json.rs`) into flat tables (see `tables.rs`); `load.rs` checks
//! the file and builds them. `gguf.rs` builds the same tables from a GGUF file's vocabulary.

mod gguf;
mod json;
mod load;
mod tables;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use crate::error::{Error, Result};
use crate::formats::digest::Digest;
pub use gguf::{GgufVocab, OwnedGgufVocab};
use tables::{AddedTrie, Merges, Vocab, SPECIAL};

/// A tokenizer loaded from a `tokenizer.json` or a GGUF vocabulary.
pub struct Tokenizer {
    vocab: Vocab,
    merges: MergeRule,
    added: AddedTrie,
    /// The normalizer: string replacements applied in order.
    normalizer: Vec<Replace>,
    pre_tokenizer: Option<Split>,
    bpe: BpeOptions,
    decoder: Decoder,
    bos_id: Option<u32>,
}

/// A literal string replacement (HF `Replace` normalizer or decoder with a `String` pattern).
struct Replace {
    pattern: String,
    content: String,
}

impl Replace {
    fn apply<'s>(&self, s: Cow<'s, str>) -> Cow<'s, str> {
        if s.contains(self.pattern.as_str()) {
            Cow::Owned(s.replace(self.pattern.as_str(), &self.content))
        } else {
            s
        }
    }
}

/// HF's `Split` pre-tokenizer on a string pattern.
struct Split {
    pattern: String,
    behavior: SplitBehavior,
    invert: bool,
}

#[derive(Clone, Copy)]
enum SplitBehavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

/// How BPE decides whether two adjacent symbols merge, and which merge goes first.
enum MergeRule {
    /// `tokenizer.json`'s ranked merges.
    Table(Merges),
    /// SentencePiece style, for GGUF vocabularies: two symbols merge when their concatenation
    /// is a token; a lower merged id goes first, and among the splits of one token the longer
    /// left part. That is the order of the merges transformers derives for Gemma (see
    /// `gguf.rs`), found by one vocabulary lookup instead of a 515 k-entry (8 MB) table.
    ByVocab,
}

struct BpeOptions {
    unk_id: Option<u32>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
    /// The id of the `<0xXX>` token of each byte, `None` if absent.
    byte_ids: [Option<u32>; 256],
}

struct Decoder {
    /// `Replace` steps, applied to each token.
    replaces: Vec<Replace>,
    /// A `ByteFallback` step follows them.
    byte_fallback: bool,
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Tokenizer::from_json(&bytes, path)
    }

    /// Parses the contents of a `tokenizer.json`; `path` only names it in errors.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Tokenizer> {
        load::load(bytes, path)
    }

    /// The ids of `text`, with the BOS id first if `add_bos`
    /// (HF: `encode(text, add_special_tokens)`).
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            ids.extend(self.bos_id);
        }
        // Added tokens first, on the raw text: at each position the longest one that starts there.
        // Tokens are whole UTF-8 strings, so matches start and end on char boundaries.
        let bytes = text.as_bytes();
        let (mut segment, mut i) = (0, 0);
        while i < bytes.len() {
            match self.added.longest_prefix(&bytes[i..]) {
                Some((id, len)) => {
                    self.encode_segment(&text[segment..i], &mut ids);
                    ids.push(id);
                    i += len;
                    segment = i;
                }
                None => i += 1,
            }
        }
        self.encode_segment(&text[segment..], &mut ids);
        ids
    }

    /// Text between added tokens: normalize, pre-tokenize, then BPE each piece.
    fn encode_segment(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized = self.normalizer.iter().fold(Cow::Borrowed(text), |s, r| r.apply(s));
        match &self.pre_tokenizer {
            None => self.encode_word(&normalized, ids),
            Some(split) => {
                for piece in split.pieces(&normalized) {
                    self.encode_word(&normalized[piece], ids);
                }
            }
        }
    }

    /// HF `BPE::tokenize` of one word: a symbol per char (or per byte with byte fallback, or unk),
    /// then the merges.
    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        let bpe = &self.bpe;
        if bpe.ignore_merges {
            if let Some(id) = self.vocab.model_id(word.as_bytes()) {
                ids.push(id);
                return;
            }
        }
        let start = ids.len();
        // An unknown char waiting to be emitted; with fuse_unk a run of them becomes one unk.
        // Like HF, a byte-fallback char does not emit a pending unk, so it lands after the bytes.
        let mut pending_unk = false;
        let mut buf = [0; 4];
        for c in word.chars() {
            let c = c.encode_utf8(&mut buf).as_bytes();
            if let Some(id) = self.vocab.model_id(c) {
                if pending_unk {
                    ids.extend(bpe.unk_id);
                    pending_unk = false;
                }
                ids.push(id);
            } else if bpe.byte_fallback && c.iter().all(|&b| bpe.byte_ids[b as usize].is_some()) {
                ids.extend(c.iter().filter_map(|&b| bpe.byte_ids[b as usize]));
            } else if let Some(unk) = bpe.unk_id {
                if pending_unk && !bpe.fuse_unk {
                    ids.push(unk);
                }
                pending_unk = true;
            }
        }
        if pending_unk {
            ids.extend(bpe.unk_id);
        }
        self.merge(ids, start);
    }

    /// Applies the merges to the symbols `ids[start..]` in place, exactly as HF's
    /// `Word::merge_all`: a min-heap of candidate merges ordered by (rank, position), lowest rank
    /// first and leftmost on ties. An entry is stale, and skipped, when its left symbol is gone
    /// or last, or when the pair now at its position does not merge into the same id.
    fn merge(&self, ids: &mut Vec<u32>, start: usize) {
        const NONE: usize = usize::MAX;
        #[derive(Clone, Copy)]
        struct Symbol {
            id: u32,
            prev: usize,
            next: usize,
            alive: bool,
        }
        let n = ids.len() - start;
        if n < 2 {
            return;
        }
        let mut symbols: Vec<Symbol> = (0..n)
            .map(|i| Symbol {
                id: ids[start + i],
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
                alive: true,
            })
            .collect();
        let mut heap = BinaryHeap::with_capacity(n);
        let mut buf = Vec::new();
        for (pos, pair) in symbols.windows(2).enumerate() {
            if let Some((rank, new_id)) = self.pair(pair[0].id, pair[1].id, &mut buf) {
                heap.push(Reverse((rank, pos, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = heap.pop() {
            let left = symbols[pos];
            if !left.alive || left.next == NONE {
                continue;
            }
            let right = symbols[left.next];
            if self.pair(left.id, right.id, &mut buf).map(|m| m.1) != Some(new_id) {
                continue;
            }
            symbols[pos].id = new_id;
            symbols[pos].next = right.next;
            symbols[left.next].alive = false;
            if right.next != NONE {
                symbols[right.next].prev = pos;
                if let Some((rank, id)) = self.pair(new_id, symbols[right.next].id, &mut buf) {
                    heap.push(Reverse((rank, pos, id)));
                }
            }
            if left.prev != NONE {
                if let Some((rank, id)) = self.pair(symbols[left.prev].id, new_id, &mut buf) {
                    heap.push(Reverse((rank, left.prev, id)));
                }
            }
        }
        // Merging keeps the left symbol, so index order is text order.
        ids.truncate(start);
        ids.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }

    /// (rank, merged id) when symbols `left` and `right` merge; lower ranks merge first.
    /// `buf` is scratch space.
    fn pair(&self, left: u32, right: u32, buf: &mut Vec<u8>) -> Option<(u64, u32)> {
        match &self.merges {
            MergeRule::Table(m) => m.get(left, right).map(|(rank, id)| (u64::from(rank), id)),
            MergeRule::ByVocab => {
                let (a, b) = (self.vocab.get(left)?, self.vocab.get(right)?);
                buf.clear();
                buf.extend_from_slice(a.as_bytes());
                buf.extend_from_slice(b.as_bytes());
                let id = self.vocab.find(buf)?;
                // Longer left parts first: a rank that falls as `a` grows.
                Some((u64::from(id) << 32 | u64::from(u32::MAX - a.len() as u32), id))
            }
        }
    }

    /// The text of `ids` (HF: `decode(ids, skip_special_tokens)`). Unlike HF, which drops them,
    /// ids without a token are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| self.vocab.get(id).is_none()) {
            return Err(Error::InvalidArgument(format!(
                "token id {id} is not in the vocabulary (size {})",
                self.vocab_size()
            )));
        }
        let mut stream = StreamDecoder::new(skip_special_tokens);
        let mut text = String::new();
        for &id in ids {
            stream.push_into(self, id, &mut text);
        }
        stream.flush_into(&mut text);
        Ok(text)
    }

    /// Max id + 1 over the vocabulary and the added tokens.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.find(token.as_bytes())
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.vocab.get(id)
    }

    /// The bytes `id` adds to a decoded text (HF's decoder chain for one token: `Replace`
    /// steps; a byte-fallback token is its one byte, which may be part of a UTF-8 character),
    /// special tokens included; `None` for an id without a token. The token trie of
    /// constrained decoding is built from these.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.vocab.get(id)?;
        let token = self.decoder.replaces.iter().fold(Cow::Borrowed(token), |s, r| r.apply(s));
        match byte_token(&token).filter(|_| self.decoder.byte_fallback) {
            Some(byte) => Some(vec![byte]),
            None => Some(token.into_owned().into_bytes()),
        }
    }

    /// Whether `id` is a byte-fallback token (`<0xXX>`, decoded as that one byte).
    pub fn is_byte_token(&self, id: u32) -> bool {
        self.decoder.byte_fallback && self.vocab.get(id).is_some_and(|t| byte_token(t).is_some())
    }

    /// The id `encode(_, true)` puts first: the post-processor's special token, else `<bos>`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// Whether `id` is an added token marked special (what `skip_special_tokens` drops).
    pub fn is_special(&self, id: u32) -> bool {
        self.vocab.flags(id) & SPECIAL != 0
    }

    /// Feeds what decides the ids of a text into `d`: every token's string and flags, and the
    /// id put first. (The merge rules follow from the vocabulary for GGUF vocabularies; a
    /// `tokenizer.json` whose merges alone differ is not told apart.)
    pub fn digest(&self, d: &mut Digest) {
        d.u64(self.vocab.len() as u64);
        for id in 0..self.vocab.len() as u32 {
            d.field(self.vocab.get(id).unwrap_or("").as_bytes());
            d.update(&[self.vocab.flags(id)]);
        }
        d.u64(self.bos_id.map_or(u64::MAX, u64::from));
    }

    /// Heap bytes held by this tokenizer (capacities of its buffers).
    pub fn memory_bytes(&self) -> usize {
        let strings = |rs: &[Replace]| rs.iter().map(|r| r.pattern.capacity() + r.content.capacity()).sum::<usize>();
        self.vocab.heap_bytes()
            + match &self.merges {
                MergeRule::Table(m) => m.heap_bytes(),
                MergeRule::ByVocab => 0,
            }
            + self.added.heap_bytes()
            + strings(&self.normalizer)
            + self.normalizer.capacity() * std::mem::size_of::<Replace>()
            + self.pre_tokenizer.as_ref().map_or(0, |s| s.pattern.capacity())
            + strings(&self.decoder.replaces)
            + self.decoder.replaces.capacity() * std::mem::size_of::<Replace>()
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field(
                "merges",
                &match &self.merges {
                    MergeRule::Table(m) => m.len(),
                    MergeRule::ByVocab => 0,
                },
            )
            .field("bos_id", &self.bos_id)
            .field("memory_bytes", &self.memory_bytes())
            .finish_non_exhaustive()
    }
}

impl Split {
    /// The byte ranges of the pieces HF's `Split` cuts `s` into (empty pieces dropped).
    fn pieces(&self, s: &str) -> Vec<Range<usize>> {
        // Alternating runs of text, each flagged "is a match" (flipped by `invert`).
        let mut runs = Vec::new();
        let mut prev = 0;
        for (start, m) in s.match_indices(self.pattern.as_str()) {
            if start > prev {
                runs.push((prev..start, self.invert));
            }
            runs.push((start..start + m.len(), !self.invert));
            prev = start + m.len();
        }
        if prev < s.len() {
            runs.push((prev..s.len(), self.invert));
        }
        let mut pieces: Vec<Range<usize>> = Vec::with_capacity(runs.len());
        let mut prev_match = false;
        match self.behavior {
            SplitBehavior::Removed => pieces.extend(runs.into_iter().filter(|r| !r.1).map(|r| r.0)),
            SplitBehavior::Isolated => pieces.extend(runs.into_iter().map(|r| r.0)),
            SplitBehavior::MergedWithPrevious => {
                for (run, is_match) in runs {
                    match pieces.last_mut() {
                        Some(last) if is_match && !prev_match => last.end = run.end,
                        _ => pieces.push(run),
                    }
                    prev_match = is_match;
                }
            }
            SplitBehavior::MergedWithNext => {
                for (run, is_match) in runs.into_iter().rev() {
                    match pieces.last_mut() {
                        Some(last) if is_match && !prev_match => last.start = run.start,
                        _ => pieces.push(run),
                    }
                    prev_match = is_match;
                }
                pieces.reverse();
            }
            SplitBehavior::Contiguous => {
                for (run, is_match) in runs {
                    match pieces.last_mut() {
                        Some(last) if is_match == prev_match => last.end = run.end,
                        _ => pieces.push(run),
                    }
                    prev_match = is_match;
                }
            }
        }
        pieces
    }
}

/// Incremental decoding for generation: push ids one at a time and get the text that is final.
/// A run of byte tokens (`<0xXX>`) is held back until a non-byte token or [`finish`] decides
/// whether it is valid UTF-8, so no character is ever split, and the pushes plus `finish`
/// concatenate to exactly `decode(ids, skip_special_tokens)`.
///
/// [`finish`]: StreamDecoder::finish
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    skip_special_tokens: bool,
    /// The open run of byte-fallback bytes.
    bytes: Vec<u8>,
}

impl StreamDecoder {
    pub fn new(skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder { skip_special_tokens, bytes: Vec::new() }
    }

    /// The text that `id` makes final (often empty while a byte run is open). An id without a
    /// token yields nothing, as in HF's decode.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        let mut text = String::new();
        self.push_into(tok, id, &mut text);
        text
    }

    /// The text still held back. The decoder is then empty, ready for a new sequence.
    pub fn finish(&mut self) -> String {
        let mut text = String::new();
        self.flush_into(&mut text);
        text
    }

    /// Like `push`, appending to `out`. HF's decoder chain for one token: `Replace` steps, then
    /// `ByteFallback` (a run of byte tokens becomes its bytes if they are valid UTF-8, else one
    /// U+FFFD per byte), then `Fuse`.
    pub fn push_into(&mut self, tok: &Tokenizer, id: u32, out: &mut String) {
        let Some(token) = tok.vocab.get(id) else {
            return;
        };
        if self.skip_special_tokens && tok.is_special(id) {
            return;
        }
        let token = tok.decoder.replaces.iter().fold(Cow::Borrowed(token), |s, r| r.apply(s));
        if tok.decoder.byte_fallback {
            if let Some(byte) = byte_token(&token) {
                self.bytes.push(byte);
                return;
            }
        }
        self.flush_into(out);
        out.push_str(&token);
    }

    /// Like `finish`, appending to `out`.
    pub fn flush_into(&mut self, out: &mut String) {
        match std::str::from_utf8(&self.bytes) {
            Ok(s) => out.push_str(s),
            Err(_) => out.extend(std::iter::repeat_n('\u{FFFD}', self.bytes.len())),
        }
        self.bytes.clear();
    }
}

/// The byte of a `<0xXX>` token, recognized as HF's `ByteFallback` does: six bytes, `<0x`, two
/// chars that `u8::from_str_radix(_, 16)` accepts (so lowercase and `+A` too), `>`.
fn byte_token(token: &str) -> Option<u8> {
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        u8::from_str_radix(token.get(3..5)?, 16).ok()
    } else {
        None
    }
}
