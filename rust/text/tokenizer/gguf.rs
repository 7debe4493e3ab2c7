//! GGUF's SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`) ⇄ [`Tokenizer`].
//!
//! A GGUF file carries no `tokenizer.json`: only the tokens by id, their scores and their types
//! (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and the special ids.
//! [`Tokenizer::from_gguf_vocab`] rebuilds the tokenizer that transformers builds from that
//! metadata for Gemma (its GGUF → `tokenizer.json` conversion), so ids and text are exactly
//! those of HF `tokenizers` on that file:
//! - tokens made only of whitespace and containing a space (Python's `" " in t and not t.strip()`;
//!   for Gemma the 30 runs of 2 to 31 spaces) are respelled as as many `▁` and stay plain BPE
//!   vocabulary;
//! - the BPE merges are every split of a token into two tokens of the vocabulary, ranked by the
//!   merged token's id, and within one token longest left part first (transformers generates them
//!   with score = -id, sorts each token's splits by the ids of their parts, then sorts all of them,
//!   stably, by (score, left length, right length) descending, which leaves exactly that order).
//!   No table is built: SentencePiece-style, two adjacent symbols merge when their concatenation
//!   is a token, and that token's id and the left part's length give the rank
//!   (`MergeRule::ByVocab`), which saves Gemma 3's 515 k-entry table (8 MB) and its build time;
//! - control tokens (type 3) are special added tokens, user-defined ones (type 4) plain added
//!   tokens, except the respelled space runs;
//! - normalizer `" "` → `"▁"`, pre-tokenizer `Split(" ", MergedWithPrevious)`, BPE with `unk`,
//!   `fuse_unk` and `byte_fallback`, `<bos>` first, decoder `"▁"` → `" "`, `ByteFallback`, `Fuse`.
//!
//! The merge order follows the vocabulary positions, not the stored scores: that is what gives
//! `tokenizer.json`'s ranks. (Gemma 3's GGUF scores agree on the order of the normal tokens, whose
//! score is minus their id plus 494, or plus 463 from id 236 743 on; control and user-defined
//! tokens have -1000 and byte tokens 0.)
//!
//! [`Tokenizer::to_gguf_vocab`] goes the other way, for writing a GGUF from a `tokenizer.json`.

use std::borrow::Cow;
use std::path::Path;

use super::load::{add_tokens, byte_ids, AddedToken, MAX_ID_SPACE};
#[cfg(test)]
use super::tables::{Merge, Merges};
use super::tables::{Vocab, ADDED, MODEL, SPECIAL};
use super::{BpeOptions, Decoder, MergeRule, Replace, Split, SplitBehavior, Tokenizer};
use crate::error::{Error, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The score Gemma's GGUF gives control and user-defined tokens.
const ADDED_SCORE: f32 = -1000.0;

/// SentencePiece's word-boundary mark, which `tokenizer.json` uses for spaces.
const SPACE_MARK: char = '▁';

/// A SentencePiece-style vocabulary as GGUF stores it (`tokenizer.ggml.*`), strings as stored
/// (space runs with spaces).
#[derive(Clone, Debug)]
pub struct GgufVocab<'a> {
    /// `tokenizer.ggml.tokens`: the string of each id.
    pub tokens: Vec<&'a str>,
    /// `tokenizer.ggml.scores`: checked for length only (the merge order comes from the ids).
    pub scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.token_type`: 3 (control) and 4 (user-defined) make added tokens.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.bos_token_id`: required, the id `encode(_, true)` puts first.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`: checked, not used by the tokenizer.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id`: required, BPE's `unk_token`.
    pub unk_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`: checked, not used by the tokenizer.
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: not kept (`encode` takes `add_bos` per call); gemma_rs
    /// adds BOS to text prompts whatever the file says, and Gemma's files all say true.
    pub add_bos: bool,
}

/// The same, owned: what [`Tokenizer::to_gguf_vocab`] gives for writing a GGUF.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedGgufVocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    pub add_bos: bool,
}

impl OwnedGgufVocab {
    /// A borrowed view, e.g. to build a [`Tokenizer`] back from it.
    pub fn as_vocab(&self) -> GgufVocab<'_> {
        GgufVocab {
            tokens: self.tokens.iter().map(String::as_str).collect(),
            scores: Some(self.scores.clone()),
            token_types: self.token_types.clone(),
            bos_id: self.bos_id,
            eos_id: self.eos_id,
            unk_id: self.unk_id,
            pad_id: self.pad_id,
            add_bos: self.add_bos,
        }
    }
}

/// Python's `str.isspace()`, which `str.strip()` uses: Unicode `White_Space` plus U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1C}'..='\u{1F}').contains(&c)
}

/// Whether GGUF's `token` is a space run that `tokenizer.json` spells with `▁`: transformers'
/// test `" " in token and not token.strip()`.
fn is_space_run(token: &str) -> bool {
    token.contains(' ') && token.chars().all(is_py_space)
}

impl Tokenizer {
    /// The tokenizer transformers builds from a GGUF vocabulary (see the module doc): the same
    /// ids and text as its `tokenizer.json`. Token `i` gets id `i`. `path` names the file in errors.
    pub fn from_gguf_vocab(v: &GgufVocab, path: &Path) -> Result<Tokenizer> {
        let bad = |msg: String| Error::format(path, msg);
        let n = v.tokens.len();
        if n == 0 {
            return Err(bad("tokenizer.ggml.tokens is empty".into()));
        }
        if n > MAX_ID_SPACE as usize {
            return Err(bad(format!("tokenizer.ggml.tokens has {n} tokens, more than the limit {MAX_ID_SPACE}")));
        }
        if v.token_types.len() != n {
            return Err(bad(format!(
                "tokenizer.ggml.tokens has {n} entries but tokenizer.ggml.token_type has {}",
                v.token_types.len()
            )));
        }
        if let Some(scores) = &v.scores {
            if scores.len() != n {
                return Err(bad(format!(
                    "tokenizer.ggml.tokens has {n} entries but tokenizer.ggml.scores has {}",
                    scores.len()
                )));
            }
        }
        let id = |key: &str, id: Option<u32>, required: bool| -> Result<Option<u32>> {
            match id {
                None if required => Err(bad(format!("tokenizer.ggml.{key} is missing"))),
                Some(id) if id as usize >= n => {
                    Err(bad(format!("tokenizer.ggml.{key} {id} is out of range ({n} tokens)")))
                }
                id => Ok(id),
            }
        };
        let bos_id = id("bos_token_id", v.bos_id, true)?;
        let unk_id = id("unknown_token_id", v.unk_id, true)?;
        id("eos_token_id", v.eos_id, false)?;
        id("padding_token_id", v.pad_id, false)?;

        // The BPE vocabulary: the tokens in id order, space runs respelled.
        let mut text = String::with_capacity(v.tokens.iter().map(|t| t.len()).sum());
        let mut entries = Vec::with_capacity(n);
        let mut added = Vec::new();
        for (i, (&token, &ty)) in v.tokens.iter().zip(&v.token_types).enumerate() {
            let i = i as u32;
            if is_space_run(token) {
                text.extend(std::iter::repeat_n(SPACE_MARK, token.chars().count()));
            } else {
                text.push_str(token);
                if ty == CONTROL || ty == USER_DEFINED {
                    if token.is_empty() {
                        return Err(bad(format!("token {i} is empty but has type {ty} (an added token)")));
                    }
                    added.push(AddedToken { id: i, content: Cow::Borrowed(token), special: ty == CONTROL });
                }
            }
            let end = u32::try_from(text.len()).map_err(|_| bad("the token strings exceed 4 GiB".into()))?;
            entries.push((i, end));
        }
        let mut vocab =
            Vocab::from_model(&text, &entries, 0).map_err(|e| bad(format!("tokenizer.ggml.tokens: {e}")))?;
        drop((text, entries));
        let trie = add_tokens(&mut vocab, n, &added).map_err(bad)?;
        drop(added);
        let byte_ids = byte_ids(&vocab);
        Ok(Tokenizer {
            vocab,
            merges: MergeRule::ByVocab,
            added: trie,
            normalizer: vec![Replace { pattern: " ".into(), content: SPACE_MARK.into() }],
            pre_tokenizer: Some(Split {
                pattern: " ".into(),
                behavior: SplitBehavior::MergedWithPrevious,
                invert: false,
            }),
            bpe: BpeOptions { unk_id, fuse_unk: true, byte_fallback: true, ignore_merges: false, byte_ids },
            decoder: Decoder {
                replaces: vec![Replace { pattern: SPACE_MARK.into(), content: " ".into() }],
                byte_fallback: true,
            },
            bos_id,
        })
    }

    /// The vocabulary as a GGUF stores it, for writing one:
    /// - `tokens` by id, with runs of two or more `▁` that are plain vocabulary (not added tokens)
    ///   spelled with spaces again, as Gemma's GGUF files store its whitespace pieces (a single
    ///   `▁` stays: it is SentencePiece's word-boundary piece); an id without a token (the
    ///   vocabulary has a gap) gets a placeholder `<gguf_gap_ID>` of type 5 (unused);
    /// - `token_types`: 3 for special added tokens, 4 for other added tokens and space runs, 6 for
    ///   the `<0xXX>` byte tokens, 2 for the unk token unless it is an added token, 1 otherwise;
    /// - `scores`, Gemma's convention: -1000 for types 3 and 4, 0 for types 2, 5 and 6, and for
    ///   normal tokens minus their index among the normal tokens (0, -1, -2, ...), decreasing with
    ///   the id. llama.cpp's SPM tokenizer merges by this score (highest first), so this keeps the
    ///   vocabulary-position order the BPE merges follow;
    /// - `bos_id` and `unk_id` from the tokenizer, `add_bos` when it has a BOS id; `eos_id` and
    ///   `pad_id` are `None`, for the caller to set (`tokenizer.json` does not know them).
    ///
    /// For Gemma 3's `tokenizer.json` this gives exactly the tokens and types of its published
    /// GGUF (gemma-3-270m Q4_K_M); the scores there are 31 lower for the normal tokens from id
    /// 236 743 (`▁`) on, where that file's scores skip 31 values, in the same order.
    ///
    /// Converting back with [`Tokenizer::from_gguf_vocab`] gives the same tokenizer when the
    /// `tokenizer.json` is one transformers made from a GGUF (as Gemma 3's is); added tokens absent
    /// from the BPE vocabulary become part of it.
    pub fn to_gguf_vocab(&self) -> OwnedGgufVocab {
        let n = self.vocab.len();
        let mut is_byte = vec![false; n];
        for &id in self.bpe.byte_ids.iter().flatten() {
            is_byte[id as usize] = true;
        }
        let mut tokens = Vec::with_capacity(n);
        let mut token_types = Vec::with_capacity(n);
        let mut scores = Vec::with_capacity(n);
        let mut normal_rank = 0u32;
        for id in 0..n as u32 {
            let flags = self.vocab.flags(id);
            let Some(token) = self.vocab.get(id) else {
                let mut gap = format!("<gguf_gap_{id}>");
                while self.vocab.find(gap.as_bytes()).is_some() {
                    gap.push('_');
                }
                tokens.push(gap);
                token_types.push(UNUSED);
                scores.push(0.0);
                continue;
            };
            let space_run = flags & (MODEL | ADDED) == MODEL
                && token.len() > SPACE_MARK.len_utf8()
                && token.chars().all(|c| c == SPACE_MARK);
            let ty = if flags & ADDED != 0 {
                if flags & SPECIAL != 0 {
                    CONTROL
                } else {
                    USER_DEFINED
                }
            } else if space_run {
                USER_DEFINED
            } else if is_byte[id as usize] {
                BYTE
            } else if self.bpe.unk_id == Some(id) {
                UNKNOWN
            } else {
                NORMAL
            };
            tokens.push(if space_run { " ".repeat(token.chars().count()) } else { token.to_owned() });
            scores.push(match ty {
                CONTROL | USER_DEFINED => ADDED_SCORE,
                NORMAL => {
                    normal_rank += 1;
                    -((normal_rank - 1) as f32)
                }
                _ => 0.0,
            });
            token_types.push(ty);
        }
        OwnedGgufVocab {
            tokens,
            scores,
            token_types,
            bos_id: self.bos_id,
            eos_id: None,
            unk_id: self.bpe.unk_id,
            pad_id: None,
            add_bos: self.bos_id.is_some(),
        }
    }
}

/// The BPE merges transformers makes of a SentencePiece vocabulary: for each token by id, its
/// splits into two tokens of the vocabulary, longest left part first; the rank is the position
/// in that order. `MergeRule::ByVocab` merges in this order without the table; the tests check
/// that the table equals Gemma 3's `tokenizer.json` merges.
#[cfg(test)]
pub(super) fn gemma_merges(vocab: &Vocab, n: u32) -> Merges {
    let mut merges = Vec::new();
    for new_id in 0..n {
        let t = vocab.get(new_id).unwrap_or_default();
        for (k, _) in t.char_indices().rev().take_while(|&(k, _)| k > 0) {
            let (a, b) = (vocab.find(&t.as_bytes()[..k]), vocab.find(&t.as_bytes()[k..]));
            if let (Some(a), Some(b)) = (a, b) {
                let rank = merges.len() as u32;
                merges.push(Merge { pair: u64::from(a) << 32 | u64::from(b), rank, new_id });
            }
        }
    }
    Merges::new(merges)
}
