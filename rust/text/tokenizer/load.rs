//! `tokenizer.json` → [`Tokenizer`]: one streaming pass over the file, then the tables are built.
//! Anything the tokenizer does not implement is rejected here with a message naming it, so a file
//! that loads is tokenized as HF `tokenizers` would.
//!
//! The merges are read last (their byte offset is kept), since resolving them needs the vocabulary
//! and the file may list them first. Added tokens get ids the way HF's `AddedVocabulary` assigns
//! them, and a file whose declared ids disagree is rejected rather than silently renumbered.

use std::borrow::Cow;
use std::path::Path;

use super::json::Reader;
use super::tables::{AddedTrie, Merge, Merges, Vocab, ADDED, SPECIAL};
use super::{BpeOptions, Decoder, MergeRule, Replace, Split, SplitBehavior, Tokenizer};
use crate::error::{Error, Result};

/// Token ids must stay below this, which bounds the per-id tables a file can make us allocate.
pub(super) const MAX_ID_SPACE: u32 = 1 << 24;

/// The BPE model as read from the file, before its tables are built.
struct Model<'a> {
    /// The vocabulary's strings, concatenated in file order.
    text: String,
    /// Per vocabulary entry: (id, end of its string in `text`).
    entries: Vec<(u32, u32)>,
    /// Where the `merges` array starts.
    merges_at: usize,
    unk_token: Option<Cow<'a, str>>,
    fuse_unk: bool,
    byte_fallback: bool,
    ignore_merges: bool,
}

pub(super) struct AddedToken<'a> {
    pub id: u32,
    pub content: Cow<'a, str>,
    pub special: bool,
}

/// `TemplateProcessing.single`: an optional special token, then `$A`.
struct Template {
    bos: Option<String>,
    /// `special_tokens`: name → ids.
    special_tokens: Vec<(String, Vec<u32>)>,
}

/// One step of the decoder chain.
enum DecodeStep {
    Replace(Replace),
    ByteFallback,
    Fuse,
}

pub(super) fn load(bytes: &[u8], path: &Path) -> Result<Tokenizer> {
    let mut r = Reader::new(bytes, path);
    let mut model = None;
    let mut added = Vec::new();
    let mut normalizer = Vec::new();
    let mut pre_tokenizer = None;
    let mut template = None;
    let mut decoder = None;
    r.object(|r, key| {
        match &*key {
            "model" => model = Some(read_model(r)?),
            "added_tokens" => added = read_added_tokens(r)?,
            "normalizer" => {
                normalizer.clear();
                if !r.null() {
                    read_normalizer(r, &mut normalizer)?;
                }
            }
            "pre_tokenizer" => pre_tokenizer = if r.null() { None } else { Some(read_pre_tokenizer(r)?) },
            "post_processor" => template = if r.null() { None } else { Some(read_post_processor(r)?) },
            "decoder" => decoder = if r.null() { None } else { Some(read_decoder(r)?) },
            "truncation" | "padding" => {
                if !r.null() {
                    return Err(r.error(format!("\"{key}\" is not supported (must be null)")));
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    r.end()?;
    let bad = |msg: String| Error::format(path, msg);
    let model = model.ok_or_else(|| bad("no \"model\"".into()))?;
    let decoder = decoder
        .ok_or_else(|| bad("no \"decoder\": HF would join tokens with spaces, which is not supported".into()))?;

    let mut vocab = Vocab::from_model(&model.text, &model.entries, added.len()).map_err(bad)?;
    drop(model.text);
    let added = add_tokens(&mut vocab, model.entries.len(), &added).map_err(bad)?;
    drop(model.entries);
    let merges = read_merges(&mut r.at(model.merges_at), &vocab)?;

    let unk_id = match &model.unk_token {
        None => None,
        Some(unk) => Some(
            vocab.model_id(unk.as_bytes()).ok_or_else(|| bad(format!("unk_token {unk:?} is not in the vocabulary")))?,
        ),
    };
    let byte_ids = byte_ids(&vocab);
    let template_bos = match template {
        Some(t) => template_bos(t).map_err(bad)?,
        None => None,
    };
    let bos_id = match template_bos {
        Some(id) if vocab.get(id).is_none() => {
            return Err(bad(format!("the post-processor's BOS id {id} is not in the vocabulary")))
        }
        Some(id) => Some(id),
        None => vocab.find(b"<bos>"),
    };
    Ok(Tokenizer {
        vocab,
        merges: MergeRule::Table(merges),
        added,
        normalizer,
        pre_tokenizer,
        bpe: BpeOptions {
            unk_id,
            fuse_unk: model.fuse_unk,
            byte_fallback: model.byte_fallback,
            ignore_merges: model.ignore_merges,
            byte_ids,
        },
        decoder,
        bos_id,
    })
}

/// The id of the `<0xXX>` token of each byte, if the BPE vocabulary has it.
pub(super) fn byte_ids(vocab: &Vocab) -> [Option<u32>; 256] {
    std::array::from_fn(|b| vocab.model_id(format!("<0x{b:02X}>").as_bytes()))
}

/// Fails if `slot` was already set by an earlier occurrence of `key`.
fn once<T>(r: &Reader, slot: &Option<T>, key: &str) -> Result<()> {
    match slot {
        Some(_) => Err(r.error(format!("duplicate key \"{key}\""))),
        None => Ok(()),
    }
}

fn missing(r: &Reader, what: &str, key: &str) -> Error {
    r.error(format!("{what} has no \"{key}\""))
}

fn read_model<'a>(r: &mut Reader<'a>) -> Result<Model<'a>> {
    let mut ty = None;
    let mut vocab = None;
    let mut merges_at = None;
    let mut model = Model {
        text: String::new(),
        entries: Vec::new(),
        merges_at: 0,
        unk_token: None,
        fuse_unk: false,
        byte_fallback: false,
        ignore_merges: false,
    };
    r.object(|r, key| {
        match &*key {
            "type" => ty = Some(r.str()?),
            "vocab" => {
                once(r, &vocab, "vocab")?;
                vocab = Some(read_vocab(r)?);
            }
            "merges" => {
                once(r, &merges_at, "merges")?;
                merges_at = Some(r.pos());
                r.skip()?;
            }
            "unk_token" => model.unk_token = if r.null() { None } else { Some(r.str()?) },
            "fuse_unk" => model.fuse_unk = r.bool()?,
            "byte_fallback" => model.byte_fallback = r.bool()?,
            "ignore_merges" => model.ignore_merges = r.bool()?,
            "dropout" | "continuing_subword_prefix" | "end_of_word_suffix" => {
                if !r.null() {
                    return Err(r.error(format!("BPE option \"{key}\" is not supported (must be null)")));
                }
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    match ty.as_deref() {
        Some("BPE") => {}
        Some(other) => return Err(r.error(format!("model type {other:?} is not supported (only BPE)"))),
        None => return Err(missing(r, "the model", "type")),
    }
    (model.text, model.entries) = vocab.ok_or_else(|| missing(r, "the model", "vocab"))?;
    model.merges_at = merges_at.ok_or_else(|| missing(r, "the model", "merges"))?;
    Ok(model)
}

fn read_vocab(r: &mut Reader) -> Result<(String, Vec<(u32, u32)>)> {
    let mut text = String::new();
    let mut entries = Vec::new();
    r.object(|r, token| {
        let id = r.u32()?;
        if id >= MAX_ID_SPACE {
            return Err(r.error(format!("token id {id} is too large (limit {MAX_ID_SPACE})")));
        }
        text.push_str(&token);
        let end = u32::try_from(text.len()).map_err(|_| r.error("the token strings exceed 4 GiB"))?;
        entries.push((id, end));
        Ok(())
    })?;
    Ok((text, entries))
}

fn read_added_tokens<'a>(r: &mut Reader<'a>) -> Result<Vec<AddedToken<'a>>> {
    const FIELDS: [&str; 7] = ["id", "content", "special", "single_word", "lstrip", "rstrip", "normalized"];
    let mut tokens = Vec::new();
    r.array(|r| {
        let mut seen = [false; 7];
        let mut token = AddedToken { id: 0, content: Cow::Borrowed(""), special: false };
        r.object(|r, key| {
            let Some(field) = FIELDS.iter().position(|f| *f == key) else {
                return r.skip();
            };
            seen[field] = true;
            match field {
                0 => token.id = r.u32()?,
                1 => token.content = r.str()?,
                2 => token.special = r.bool()?,
                _ => {
                    if r.bool()? {
                        return Err(r.error(format!("added tokens with \"{key}\": true are not supported")));
                    }
                }
            }
            Ok(())
        })?;
        if let Some(field) = seen.iter().position(|s| !s) {
            return Err(missing(r, "an added token", FIELDS[field]));
        }
        if token.content.is_empty() {
            return Err(r.error("an added token is empty"));
        }
        tokens.push(token);
        Ok(())
    })?;
    Ok(tokens)
}

/// Gives the added tokens their ids as HF's `AddedVocabulary::add_tokens` does: a token of the
/// model keeps its id; another gets the next id past the model's vocabulary and the previous
/// added tokens. Returns the trie that matches them.
pub(super) fn add_tokens(
    vocab: &mut Vocab,
    model_len: usize,
    tokens: &[AddedToken],
) -> std::result::Result<AddedTrie, String> {
    let model_len = model_len as u32;
    let mut max_id: Option<u32> = None;
    for token in tokens {
        let content = &*token.content;
        let id = match vocab.model_id(content.as_bytes()) {
            Some(id) => id,
            None => {
                let id = match max_id {
                    Some(max) if max >= model_len || model_len == 0 => max + 1,
                    _ => model_len,
                };
                if id >= MAX_ID_SPACE {
                    return Err(format!("added token {content:?} would get id {id}, too large"));
                }
                vocab.push(id, content)?;
                id
            }
        };
        if id != token.id {
            return Err(format!(
                "added token {content:?} is declared with id {} but gets id {id} (its id in the \
                 vocabulary, or the next free one)",
                token.id
            ));
        }
        if vocab.flags(id) & ADDED != 0 {
            return Err(format!("added token {content:?} is listed twice"));
        }
        vocab.add_flags(id, if token.special { ADDED | SPECIAL } else { ADDED });
        max_id = max_id.max(Some(id));
    }
    let trie_tokens = tokens.iter().map(|t| (t.content.as_bytes(), t.id)).collect();
    Ok(AddedTrie::new(trie_tokens))
}

/// The `merges` array, as `["a", "b"]` pairs or `"a b"` strings; each merge's rank is its index.
fn read_merges(r: &mut Reader, vocab: &Vocab) -> Result<Merges> {
    let mut merges = Vec::new();
    let mut legacy = None;
    let mut joined = String::new();
    r.array(|r| {
        let rank = merges.len();
        let is_legacy = r.is_str();
        if *legacy.get_or_insert(is_legacy) != is_legacy {
            return Err(r.error("the merges mix \"a b\" strings and [\"a\", \"b\"] pairs"));
        }
        let (line, pair);
        let (left, right): (&str, &str) = if is_legacy {
            line = r.str()?;
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => (a, b),
                _ => return Err(r.error(format!("merge {rank} ({line:?}) is not two tokens separated by one space"))),
            }
        } else {
            let mut pair_of = [None, None];
            let mut n = 0;
            r.array(|r| {
                let s = r.str()?;
                if let Some(slot) = pair_of.get_mut(n) {
                    *slot = Some(s);
                }
                n += 1;
                Ok(())
            })?;
            pair = match pair_of {
                [Some(a), Some(b)] if n == 2 => (a, b),
                _ => return Err(r.error(format!("merge {rank} is not a pair of tokens"))),
            };
            (&pair.0, &pair.1)
        };
        let id = |token: &str| {
            vocab.model_id(token.as_bytes()).ok_or_else(|| {
                r.error(format!("merge {rank} ({left:?}, {right:?}): token {token:?} is not in the vocabulary"))
            })
        };
        joined.clear();
        joined.push_str(left);
        joined.push_str(right);
        let (a, b, new_id) = (id(left)?, id(right)?, id(&joined)?);
        let rank = u32::try_from(rank).map_err(|_| r.error("too many merges"))?;
        merges.push(Merge { pair: u64::from(a) << 32 | u64::from(b), rank, new_id });
        Ok(())
    })?;
    Ok(Merges::new(merges))
}

/// The `"type"` of the object that comes next, which is left unread (keys come in any order).
fn peek_type<'a>(r: &mut Reader<'a>, what: &str) -> Result<Cow<'a, str>> {
    let start = r.pos();
    let mut ty = None;
    r.object(|r, key| {
        if key == "type" {
            ty = Some(r.str()?);
            Ok(())
        } else {
            r.skip()
        }
    })?;
    *r = r.at(start);
    ty.ok_or_else(|| missing(r, what, "type"))
}

/// A `{"String": s}` pattern; regex patterns are not supported.
fn read_pattern(r: &mut Reader) -> Result<String> {
    let mut pattern = None;
    r.object(|r, key| {
        if key != "String" {
            return Err(r.error(format!("pattern {key:?} is not supported (only \"String\")")));
        }
        pattern = Some(r.str()?.into_owned());
        Ok(())
    })?;
    match pattern {
        Some(p) if !p.is_empty() => Ok(p),
        _ => Err(r.error("a pattern is empty")),
    }
}

/// A `Replace` normalizer or decoder, its type already checked.
fn read_replace(r: &mut Reader) -> Result<Replace> {
    let (mut pattern, mut content) = (None, None);
    r.object(|r, key| {
        match &*key {
            "pattern" => pattern = Some(read_pattern(r)?),
            "content" => content = Some(r.str()?.into_owned()),
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Replace {
        pattern: pattern.ok_or_else(|| missing(r, "Replace", "pattern"))?,
        content: content.ok_or_else(|| missing(r, "Replace", "content"))?,
    })
}

/// Reads the array under `key` of a `Sequence` object, calling `item` for each element.
fn read_sequence(r: &mut Reader, key: &str, mut item: impl FnMut(&mut Reader) -> Result<()>) -> Result<()> {
    let mut seen = false;
    r.object(|r, k| {
        if k == key {
            seen = true;
            r.array(&mut item)
        } else {
            r.skip()
        }
    })?;
    if seen {
        Ok(())
    } else {
        Err(missing(r, "Sequence", key))
    }
}

fn read_normalizer(r: &mut Reader, out: &mut Vec<Replace>) -> Result<()> {
    match &*peek_type(r, "the normalizer")? {
        "Replace" => out.push(read_replace(r)?),
        "Sequence" => read_sequence(r, "normalizers", |r| read_normalizer(r, out))?,
        other => return Err(r.error(format!("normalizer {other:?} is not supported"))),
    }
    Ok(())
}

fn read_pre_tokenizer(r: &mut Reader) -> Result<Split> {
    match &*peek_type(r, "the pre-tokenizer")? {
        "Split" => {}
        other => return Err(r.error(format!("pre-tokenizer {other:?} is not supported (only Split)"))),
    }
    let (mut pattern, mut behavior, mut invert) = (None, None, false);
    r.object(|r, key| {
        match &*key {
            "pattern" => pattern = Some(read_pattern(r)?),
            "invert" => invert = r.bool()?,
            "behavior" => {
                behavior = Some(match &*r.str()? {
                    "Removed" => SplitBehavior::Removed,
                    "Isolated" => SplitBehavior::Isolated,
                    "MergedWithPrevious" => SplitBehavior::MergedWithPrevious,
                    "MergedWithNext" => SplitBehavior::MergedWithNext,
                    "Contiguous" => SplitBehavior::Contiguous,
                    other => return Err(r.error(format!("unknown Split behavior {other:?}"))),
                })
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(Split {
        pattern: pattern.ok_or_else(|| missing(r, "Split", "pattern"))?,
        behavior: behavior.ok_or_else(|| missing(r, "Split", "behavior"))?,
        invert,
    })
}

fn read_post_processor(r: &mut Reader) -> Result<Template> {
    match &*peek_type(r, "the post-processor")? {
        "TemplateProcessing" => {}
        other => return Err(r.error(format!("post-processor {other:?} is not supported (only TemplateProcessing)"))),
    }
    let mut single = None;
    let mut special_tokens = Vec::new();
    r.object(|r, key| {
        match &*key {
            "single" => single = Some(read_template_single(r)?),
            "special_tokens" => {
                r.object(|r, name| {
                    let mut ids = Vec::new();
                    r.object(|r, key| {
                        if key != "ids" {
                            return r.skip();
                        }
                        r.array(|r| {
                            ids.push(r.u32()?);
                            Ok(())
                        })
                    })?;
                    special_tokens.push((name.into_owned(), ids));
                    Ok(())
                })?;
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    let bos = single.ok_or_else(|| missing(r, "TemplateProcessing", "single"))?;
    Ok(Template { bos, special_tokens })
}

/// `single` must be `[$A]` or `[special token, $A]`; returns the special token's name.
fn read_template_single(r: &mut Reader) -> Result<Option<String>> {
    let mut pieces = Vec::new();
    r.array(|r| {
        r.object(|r, kind| {
            let mut id = None;
            r.object(|r, key| {
                if key != "id" {
                    return r.skip();
                }
                id = Some(r.str()?.into_owned());
                Ok(())
            })?;
            pieces.push((kind.into_owned(), id.ok_or_else(|| missing(r, "a template piece", "id"))?));
            Ok(())
        })
    })?;
    match pieces.as_slice() {
        [(seq, a)] if seq == "Sequence" && a == "A" => Ok(None),
        [(special, name), (seq, a)] if special == "SpecialToken" && seq == "Sequence" && a == "A" => {
            Ok(Some(name.clone()))
        }
        _ => Err(r.error("TemplateProcessing \"single\" is not supported (only [$A] or [special token, $A])")),
    }
}

/// The id the template puts before the text, if any.
fn template_bos(t: Template) -> std::result::Result<Option<u32>, String> {
    let Some(name) = t.bos else { return Ok(None) };
    match t.special_tokens.iter().find(|(n, _)| *n == name) {
        Some((_, ids)) if ids.len() == 1 => Ok(Some(ids[0])),
        Some(_) => Err(format!("template special token {name:?} must have exactly one id")),
        None => Err(format!("template special token {name:?} is not in \"special_tokens\"")),
    }
}

/// The decoder: `Replace` steps, then `ByteFallback`, then `Fuse` (each optional), either alone
/// or as a `Sequence`.
fn read_decoder(r: &mut Reader) -> Result<Decoder> {
    let mut steps = Vec::new();
    read_decode_steps(r, &mut steps)?;
    let mut decoder = Decoder { replaces: Vec::new(), byte_fallback: false };
    // Replace* ByteFallback? Fuse?: Fuse last is a no-op (the result is joined anyway), and Replace
    // before ByteFallback acts per token, which is what the streaming decoder does.
    let mut stage = 0;
    for step in steps {
        stage = match (step, stage) {
            (DecodeStep::Replace(rep), 0) => {
                decoder.replaces.push(rep);
                0
            }
            (DecodeStep::ByteFallback, 0) => {
                decoder.byte_fallback = true;
                1
            }
            (DecodeStep::Fuse, 0 | 1) => 2,
            _ => return Err(r.error("decoder steps must be Replace, then ByteFallback, then Fuse")),
        };
    }
    Ok(decoder)
}

fn read_decode_steps(r: &mut Reader, steps: &mut Vec<DecodeStep>) -> Result<()> {
    let step = match &*peek_type(r, "the decoder")? {
        "Sequence" => return read_sequence(r, "decoders", |r| read_decode_steps(r, steps)),
        "Replace" => DecodeStep::Replace(read_replace(r)?),
        "ByteFallback" => DecodeStep::ByteFallback,
        "Fuse" => DecodeStep::Fuse,
        other => return Err(r.error(format!("decoder {other:?} is not supported"))),
    };
    if !matches!(step, DecodeStep::Replace(_)) {
        r.skip()?;
    }
    steps.push(step);
    Ok(())
}
