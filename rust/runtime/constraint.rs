//! Constrained decoding: at each step only the tokens that keep the output inside a language (one
//! JSON document valid for a JSON Schema, or the text of a Lark grammar) may be chosen; the others'
//! logits become -inf before the sampler sees them, so temperature, top-k and top-p choose among
//! valid tokens only.
//!
//! The engine is llguidance (Microsoft's, MIT): a token trie built once per model from the
//! vocabulary's decoded bytes, and per generation an Earley parser over lazily built lexer
//! automata that walks the trie to compute each step's mask. Special tokens sit in the trie as
//! `0xFF` followed by their text (toktrie's `SPECIAL_TOKEN_MARKER`), which is how a Lark grammar's
//! `<name>` means that special token and never the same text spelled in ordinary tokens.

use crate::error::{Error, Result};
use crate::text::tokenizer::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// What a generation's output must match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grammar {
    /// A JSON Schema, as JSON text: the output is one JSON document valid for it. Separators are
    /// `", "` and `": "` and no other whitespace is allowed (flexible whitespace lets a small model
    /// loop on newlines) unless the schema's `x-guidance` options say otherwise.
    JsonSchema(String),
    /// A grammar in llguidance's Lark dialect (`start` is the top rule; `<name>` is the special
    /// token `name`, `%json {...}` a nested JSON Schema; rule attributes such as `max_tokens`).
    Lark(String),
}

/// The vocabulary as the constraint engine sees it: the token trie and the parser factory that
/// every [`Constraint`] of a model starts from. Built once per model, on its first constrained
/// generation (a fraction of a second for 262,144 tokens).
pub struct Vocabulary {
    factory: ParserFactory,
}

/// The tokens of up to 16 characters without `<`, quotes, backslashes or control characters: a
/// string's body (JSON's, or a tool call's, which excludes texts starting with `<`) usually allows
/// all of them, and llguidance then sets them at once instead of walking them in the trie. One
/// slice costs 15 MiB of the trie's ~65; measured by bench/constraint_mask.rs on a JSON answer,
/// masks take ~50 us/token with it and ~700 without. llguidance's own JSON slices allow `<`, which a
/// tool string's body does not always allow, so they never apply there.
const SLICE: &str = r#"[^<"\\\x00-\x1F\x7F]{1,16}"#;

/// llguidance's view of a tokenizer: the trie, and a tokenization of bytes (used by the engine
/// for forced tokens, which gemma_rs does not take; greedy over the trie is enough there).
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

impl Vocabulary {
    /// The trie of `tok`'s tokens, ending at any of `eos` (the model's end-of-sequence ids).
    pub fn new(tok: &Tokenizer, eos: &[u32]) -> Result<Vocabulary> {
        let n = tok.vocab_size();
        let mut words: Vec<Vec<u8>> = (0..n as u32).map(|id| trie_bytes(tok, id)).collect();
        // A byte-fallback token whose byte is also an ordinary token ("x" and <0x78>) is left
        // out: the trie would offer one of the two, and the model writes the ordinary one.
        let ordinary: std::collections::HashSet<u8> = (0..n as u32)
            .filter(|&id| !tok.is_byte_token(id) && words[id as usize].len() == 1)
            .map(|id| words[id as usize][0])
            .collect();
        for id in 0..n as u32 {
            if tok.is_byte_token(id) && words[id as usize].first().is_some_and(|b| ordinary.contains(b)) {
                words[id as usize].clear();
            }
        }
        let eos: Vec<u32> = eos.iter().copied().filter(|&e| (e as usize) < n).collect();
        let Some(&first) = eos.first() else {
            return Err(Error::InvalidArgument(
                "constrained decoding needs an end-of-sequence id in the vocabulary".into(),
            ));
        };
        let info = TokRxInfo { tok_bos: tok.bos_id(), ..TokRxInfo::new(n as u32, first) };
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(Env { trie });
        let slices = [SLICE.to_string()];
        let mut factory = ParserFactory::new(&env, Default::default(), &slices)
            .map_err(|e| Error::Internal(format!("llguidance: {e}")))?;
        factory.quiet();
        Ok(Vocabulary { factory })
    }
}

/// A token's bytes in the trie: a special token as the marker and its text, a byte that can never
/// be part of valid UTF-8 (so never of text a grammar matches) as nothing, i.e. never allowed.
fn trie_bytes(tok: &Tokenizer, id: u32) -> Vec<u8> {
    match tok.token_bytes(id) {
        None => Vec::new(),
        Some(text) if tok.is_special(id) => [&[TokTrie::SPECIAL_TOKEN_MARKER][..], &text].concat(),
        Some(b) if b.len() == 1 && matches!(b[0], 0xC0 | 0xC1 | 0xF5..=0xFF) => Vec::new(),
        Some(b) => b,
    }
}

/// One generation's constraint: which tokens may come next, given those already consumed.
pub struct Constraint {
    matcher: Matcher,
    /// The first step's mask, computed by `new` to check the language is not empty.
    first: Option<SimpleVob>,
}

impl Constraint {
    /// Compiles `grammar`. A malformed or unsupported schema or grammar, or one that matches no
    /// text at all, is an `InvalidArgument` naming the problem.
    pub fn new(vocab: &Vocabulary, grammar: &Grammar) -> Result<Constraint> {
        let top = match grammar {
            Grammar::JsonSchema(text) => {
                let mut schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| Error::InvalidArgument(format!("json_schema is not valid JSON: {e}")))?;
                if let Some(obj) = schema.as_object_mut() {
                    let opts = obj.entry("x-guidance").or_insert_with(|| serde_json::json!({}));
                    if let Some(opts) = opts.as_object_mut() {
                        let defaults = [
                            ("whitespace_flexible", false.into()),
                            ("item_separator", ", ".into()),
                            ("key_separator", ": ".into()),
                        ];
                        for (k, v) in defaults {
                            opts.entry(k).or_insert(v);
                        }
                    }
                } else if !schema.is_boolean() {
                    return Err(Error::InvalidArgument("json_schema must be a JSON object (or a boolean)".into()));
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
        };
        let what = match grammar {
            Grammar::JsonSchema(_) => "the JSON schema",
            Grammar::Lark(_) => "the grammar",
        };
        let mut matcher = Matcher::new(vocab.factory.create_parser(top));
        if let Some(e) = matcher.get_error() {
            return Err(Error::InvalidArgument(format!("{what} cannot be used: {e}")));
        }
        let first =
            matcher.compute_mask().map_err(|e| Error::InvalidArgument(format!("{what} cannot be used: {e}")))?;
        if first.is_zero() {
            return Err(Error::InvalidArgument(format!("{what} matches no text")));
        }
        Ok(Constraint { matcher, first: Some(first) })
    }

    /// Sets the logits of the tokens that may not come next to -inf (ids beyond the vocabulary
    /// too). End-of-sequence ids stay allowed exactly when the output so far is complete.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let mask = match self.first.take() {
            Some(first) => first,
            None => self.matcher.compute_mask().map_err(|e| Error::Internal(format!("constraint: {e}")))?,
        };
        if mask.is_zero() {
            return Err(Error::Internal("constraint: no token may follow".into()));
        }
        apply(&mask, logits);
        Ok(())
    }

    /// Advances past `token`, which `mask` allowed.
    pub fn consume(&mut self, token: u32) -> Result<()> {
        self.matcher.consume_token(token).map_err(|e| Error::Internal(format!("constraint: {e}")))
    }

    /// Whether the output is complete and nothing but an end-of-sequence id may follow.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}

/// -inf at every id whose bit in `mask` is clear, a 32-id word at a time.
fn apply(mask: &SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    let mut chunks = logits.chunks_mut(32);
    for (&w, chunk) in words.iter().zip(&mut chunks) {
        match w {
            u32::MAX => {}
            0 => chunk.fill(f32::NEG_INFINITY),
            _ => {
                for (i, l) in chunk.iter_mut().enumerate() {
                    if w >> i & 1 == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
    }
    for chunk in chunks {
        chunk.fill(f32::NEG_INFINITY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::sampler::Rng;
    use crate::testing::gemma3_tokenizer;
    use std::sync::OnceLock;

    /// Gemma 3's tokenizer and its vocabulary (ends: `<eos>` 1, `<end_of_turn>` 106), built once.
    fn gemma3() -> &'static (Tokenizer, Vocabulary) {
        static V: OnceLock<(Tokenizer, Vocabulary)> = OnceLock::new();
        V.get_or_init(|| {
            let tok = gemma3_tokenizer();
            let vocab = Vocabulary::new(&tok, &[1, 106]).unwrap();
            (tok, vocab)
        })
    }

    fn allowed(c: &mut Constraint, n: usize) -> Vec<u32> {
        let mut logits = vec![0f32; n];
        c.mask(&mut logits).unwrap();
        (0..n as u32).filter(|&i| logits[i as usize].is_finite()).collect()
    }

    /// Random logits through the mask, a token drawn uniformly among the allowed ones, until
    /// the constraint is finished or an end id is drawn: the text, and whether it ended.
    fn run(grammar: &Grammar, seed: u64, max_tokens: usize) -> (String, bool) {
        let (tok, vocab) = gemma3();
        let mut c = Constraint::new(vocab, grammar).unwrap();
        let mut rng = Rng::new(seed);
        let mut ids = Vec::new();
        for _ in 0..max_tokens {
            let ok = allowed(&mut c, tok.vocab_size());
            let t = ok[(rng.next_u64() % ok.len() as u64) as usize];
            if t == 1 || t == 106 {
                return (tok.decode(&ids, false).unwrap(), true);
            }
            c.consume(t).unwrap();
            ids.push(t);
            if c.is_finished() {
                return (tok.decode(&ids, false).unwrap(), true);
            }
        }
        (tok.decode(&ids, false).unwrap(), false)
    }

    #[test]
    fn random_choices_under_a_json_schema_give_valid_documents() {
        let schema = r#"{"type": "object", "properties": {
            "n": {"type": "integer", "minimum": -5, "maximum": 300},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
            "required": ["n", "unit", "ok", "tags"], "additionalProperties": false}"#;
        for seed in 0..20 {
            let (text, ended) = run(&Grammar::JsonSchema(schema.into()), seed, 400);
            assert!(ended, "seed {seed}: {text:?}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            // serde_json reads -0 as a float: an integer all the same.
            let n = v["n"].as_f64().unwrap_or_else(|| panic!("{text}"));
            assert!(n.fract() == 0.0 && (-5.0..=300.0).contains(&n), "{text}");
            assert!(["celsius", "fahrenheit"].contains(&v["unit"].as_str().unwrap()), "{text}");
            assert!(v["ok"].is_boolean(), "{text}");
            let tags = v["tags"].as_array().unwrap();
            assert!(tags.len() <= 3 && tags.iter().all(|t| t.as_str().unwrap().chars().count() <= 6), "{text}");
            assert_eq!(v.as_object().unwrap().len(), 4, "{text}");
        }
    }

    #[test]
    fn a_special_token_in_lark_is_that_token_and_quoted_text_is_ordinary_tokens() {
        let (tok, vocab) = gemma3();
        let start_of_turn = tok.token_to_id("<start_of_turn>").unwrap();
        let mut c = Constraint::new(vocab, &Grammar::Lark("start: <start_of_turn> \"x\"".into())).unwrap();
        assert_eq!(allowed(&mut c, tok.vocab_size()), [start_of_turn]);
        c.consume(start_of_turn).unwrap();
        assert_eq!(allowed(&mut c, tok.vocab_size()), [tok.token_to_id("x").unwrap()]);
        // The same text in quotes is spelled in ordinary tokens: the special token is not one.
        let mut c = Constraint::new(vocab, &Grammar::Lark("start: \"<start_of_turn>\"".into())).unwrap();
        let first = allowed(&mut c, tok.vocab_size());
        assert!(!first.contains(&start_of_turn) && first.contains(&tok.token_to_id("<").unwrap()));
        let (text, ended) = run(&Grammar::Lark("start: \"<start_of_turn>\"".into()), 3, 50);
        assert!(ended && text == "<start_of_turn>", "{text:?}");
    }

    #[test]
    fn end_ids_are_allowed_exactly_when_the_output_is_complete() {
        let (tok, vocab) = gemma3();
        let mut c = Constraint::new(vocab, &Grammar::Lark("start: \"a\"+".into())).unwrap();
        assert!(!allowed(&mut c, tok.vocab_size()).contains(&1));
        c.consume(tok.token_to_id("a").unwrap()).unwrap();
        let next = allowed(&mut c, tok.vocab_size());
        assert!(next.contains(&1) && next.contains(&106) && !c.is_finished());
        // A language with one string is finished at its end.
        let mut c = Constraint::new(vocab, &Grammar::Lark("start: \"a\"".into())).unwrap();
        c.consume(tok.token_to_id("a").unwrap()).unwrap();
        assert!(c.is_finished());
    }

    #[test]
    fn bad_schemas_and_grammars_are_refused_before_generation_saying_why() {
        let (_, vocab) = gemma3();
        let refused = |g: Grammar| match Constraint::new(vocab, &g) {
            Err(Error::InvalidArgument(m)) => m,
            Err(e) => panic!("{g:?}: {e}"),
            Ok(_) => panic!("{g:?} accepted"),
        };
        assert!(refused(Grammar::JsonSchema("{\"type\": ".into())).contains("not valid JSON"));
        assert!(refused(Grammar::JsonSchema("[1]".into())).contains("must be a JSON object"));
        let m = refused(Grammar::JsonSchema(r#"{"type": "integer", "minimum": 5, "maximum": 2}"#.into()));
        assert!(m.starts_with("the JSON schema cannot be used"), "{m}");
        let m = refused(Grammar::JsonSchema(r#"{"type": "strin"}"#.into()));
        assert!(m.contains("strin"), "{m}");
        let m = refused(Grammar::Lark("start: foo".into()));
        assert!(m.contains("foo"), "{m}");
        let m = refused(Grammar::Lark("start: <no_such_token>".into()));
        assert!(m.contains("no_such_token"), "{m}");
        let m = refused(Grammar::Lark("start: A\nA: \"a\" & \"b\"".into()));
        assert!(m.contains("matches no text") || m.contains("cannot be used"), "{m}");
    }

    #[test]
    fn apply_clears_exactly_the_unset_bits() {
        let mut mask = SimpleVob::alloc(70);
        for t in [0, 31, 32, 65] {
            mask.allow_token(t);
        }
        let mut logits = vec![1.0f32; 100];
        apply(&mask, &mut logits);
        let kept: Vec<usize> = (0..100).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, [0, 31, 32, 65]);
    }
}
