//! Unit tests on small hand-made tokenizer.json files (expected ids and text checked against HF
//! `tokenizers` 0.23), plus the real Gemma 3 file of tests/fixtures.

use std::path::Path;

use crate::testing::read_text;

use serde_json::{json, Value};

use super::*;

const GEMMA_DECODER: &str = r#"{"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"}]}"#;

/// A tokenizer.json whose vocabulary is `tokens` (id = index) with `merges` as "a b" strings.
fn file(tokens: &[&str], merges: &[&str]) -> Value {
    let vocab: serde_json::Map<String, Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.to_string(), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null,
        "decoder": serde_json::from_str::<Value>(GEMMA_DECODER).unwrap(),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": merges,
        }
    })
}

fn added(id: u32, content: &str, special: bool) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": special})
}

fn load(v: &Value) -> Tokenizer {
    Tokenizer::from_json(v.to_string().as_bytes(), Path::new("test.json")).unwrap()
}

fn load_err(text: &str) -> String {
    match Tokenizer::from_json(text.as_bytes(), Path::new("bad.json")) {
        Err(e @ Error::Format { .. }) => e.to_string(),
        Err(e) => panic!("expected a format error, got {e:?}"),
        Ok(_) => panic!("expected an error for {text}"),
    }
}

const ABCD: &[&str] = &["a", "b", "c", "ab", "bc", "abc", "d", "cd", "bcd", "abcd"];

#[test]
fn merges_apply_lowest_rank_first() {
    assert_eq!(load(&file(ABCD, &["b c", "a b"])).encode("abc", false), [0, 4]);
    assert_eq!(load(&file(ABCD, &["a b", "b c"])).encode("abc", false), [3, 2]);
    assert_eq!(load(&file(ABCD, &["b c", "a b", "a bc"])).encode("abc", false), [5]);
    assert_eq!(load(&file(ABCD, &["a b", "b c", "ab c"])).encode("abc", false), [5]);
}

#[test]
fn merge_ties_go_leftmost() {
    let tok = load(&file(&["a", "aa", "aaa"], &["a a"]));
    assert_eq!(tok.encode("aaa", false), [1, 0]);
    assert_eq!(tok.encode("aaaaa", false), [1, 1, 0]);
    // After "a a" at 0 and 2, the entry (aa, a) at 0 is stale: the pair there is now (aa, aa).
    let tok = load(&file(&["a", "aa", "aaa"], &["a a", "aa a"]));
    assert_eq!(tok.encode("aaa", false), [2]);
    assert_eq!(tok.encode("aaaaa", false), [1, 2]);
}

#[test]
fn stale_heap_entries_are_skipped() {
    // "b c" merges first; the queued (a, b) at 0 now sees (a, bc) and (c, d) lost its left symbol.
    let tok = load(&file(ABCD, &["b c", "a b", "c d", "a bc", "bc d"]));
    assert_eq!(tok.encode("abcd", false), [5, 6]);
    assert_eq!(tok.encode("abcdabcd", false), [5, 6, 5, 6]);
}

#[test]
fn a_pair_listed_twice_keeps_its_last_rank() {
    let tok = load(&file(ABCD, &["b c", "a b", "b c"]));
    assert_eq!(tok.encode("abc", false), [3, 2]);
}

#[test]
fn merges_as_pairs_and_before_vocab_and_type_last() {
    let text = r#"{"decoder": {"type": "Fuse"}, "model": {"merges": [["a", "b"], ["ab", "c"]],
        "vocab": {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4}, "type": "BPE"}}"#;
    let tok = Tokenizer::from_json(text.as_bytes(), Path::new("t.json")).unwrap();
    assert_eq!(tok.encode("abcab", false), [4, 3]);
    assert_eq!(tok.bos_id(), None);
}

#[test]
fn long_words_merge() {
    let tok = load(&file(&["a", "aa", "aaaa"], &["a a", "aa aa"]));
    let ids = tok.encode(&"a".repeat(10_001), false);
    assert_eq!(ids.len(), 2500 + 1);
    assert_eq!(tok.decode(&ids, false).unwrap(), "a".repeat(10_001));
}

#[test]
fn byte_fallback_and_fused_unk() {
    let vocab = ["<unk>", "a", "<0xC3>", "<0xA9>", "b"];
    let mut f = file(&vocab, &[]);
    f["model"]["unk_token"] = json!("<unk>");
    f["model"]["byte_fallback"] = json!(true);
    f["model"]["fuse_unk"] = json!(true);
    let tok = load(&f);
    // 'x' has no token and '😀' lacks byte tokens: unk. As in HF, a pending unk is emitted after
    // the byte-fallback tokens that follow it.
    assert_eq!(tok.encode("xéa", false), [2, 3, 0, 1]);
    assert_eq!(tok.encode("xyéb", false), [2, 3, 0, 4]);
    assert_eq!(tok.encode("axxéxa", false), [1, 2, 3, 0, 1]);
    assert_eq!(tok.encode("😀", false), [0]);
    f["model"]["fuse_unk"] = json!(false);
    let tok = load(&f);
    assert_eq!(tok.encode("xyéb", false), [0, 2, 3, 0, 4]);
    assert_eq!(tok.encode("axxéxa", false), [1, 0, 2, 3, 0, 0, 1]);
}

#[test]
fn added_tokens_match_leftmost_then_longest() {
    let mut f = file(&["a", "b", "c", "d", "z", "ab", "abc", "bcd", "x"], &[]);
    f["added_tokens"] =
        json!([added(5, "ab", true), added(6, "abc", true), added(7, "bcd", true), added(8, "x", false)]);
    let tok = load(&f);
    assert_eq!(tok.encode("abcd", false), [6, 3]);
    assert_eq!(tok.encode("zbcdab", false), [4, 7, 5]);
    assert_eq!(tok.encode("xabx", false), [8, 5, 8]);
    assert_eq!(tok.encode("zabcdx", false), [4, 6, 3, 8]);
    assert_eq!(tok.decode(&[4, 7, 5], false).unwrap(), "zbcdab");
    assert_eq!(tok.decode(&[4, 7, 5], true).unwrap(), "z");
    assert_eq!(tok.decode(&[8, 5, 8], true).unwrap(), "xx");
    assert!(tok.is_special(5) && !tok.is_special(8) && !tok.is_special(0));
}

#[test]
fn added_tokens_outside_the_vocab_get_the_next_ids() {
    let mut f = file(&["a", "b"], &[]);
    f["added_tokens"] = json!([added(2, "<s>", true), added(0, "a", true), added(3, "<t>", false)]);
    let tok = load(&f);
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.encode("<s>a<t>b", false), [2, 0, 3, 1]);
    assert_eq!(tok.token_to_id("<t>"), Some(3));
    assert_eq!(tok.id_to_token(2), Some("<s>"));
    f["added_tokens"] = json!([added(7, "<s>", true)]);
    assert!(load_err(&f.to_string()).contains("declared with id 7 but gets id 2"));
}

/// Gemma's layout in miniature: " " → "▁", Split on " ", a `<bos>` template, byte fallback.
fn gemma_like() -> Tokenizer {
    let vocab =
        ["<unk>", "<bos>", "▁", "a", "b", "▁a", "<0xC3>", "<0xA9>", "<0xE2>", "<0x82>", "<0xAC>", "<start>", "\n"];
    let mut f = file(&vocab, &["▁ a"]);
    f["added_tokens"] =
        json!([added(0, "<unk>", true), added(1, "<bos>", true), added(11, "<start>", true), added(12, "\n", false)]);
    f["model"]["unk_token"] = json!("<unk>");
    f["model"]["byte_fallback"] = json!(true);
    f["model"]["fuse_unk"] = json!(true);
    f["normalizer"] = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    f["pre_tokenizer"] = json!({"type": "Split", "pattern": {"String": " "},
        "behavior": "MergedWithPrevious", "invert": false});
    f["post_processor"] = json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [1], "tokens": ["<bos>"]}}});
    load(&f)
}

#[test]
fn gemma_like_pipeline() {
    let tok = gemma_like();
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.encode("a b", true), [1, 3, 2, 4]);
    assert_eq!(tok.encode(" a\n<start>é€x", true), [1, 5, 12, 11, 6, 7, 8, 9, 10, 0]);
    assert_eq!(tok.encode("", true), [1]);
    assert_eq!(tok.encode("", false), Vec::<u32>::new());
    let ids = [1, 5, 12, 11, 6, 7, 8, 9, 10, 0];
    assert_eq!(tok.decode(&ids, false).unwrap(), "<bos> a\n<start>é€<unk>");
    assert_eq!(tok.decode(&ids, true).unwrap(), " a\né€");
}

#[test]
fn byte_runs_decode_whole_or_as_replacement_chars() {
    let tok = gemma_like();
    let cases: &[(&[u32], &str, &str)] = &[
        (&[6, 7], "é", "é"),
        (&[6, 3], "\u{FFFD}a", "\u{FFFD}a"),
        (&[8, 9, 10, 8], "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}", "\u{FFFD}\u{FFFD}\u{FFFD}\u{FFFD}"),
        (&[9, 6, 7], "\u{FFFD}\u{FFFD}\u{FFFD}", "\u{FFFD}\u{FFFD}\u{FFFD}"),
        // A skipped special token does not end a byte run.
        (&[6, 11, 7], "\u{FFFD}<start>\u{FFFD}", "é"),
        (&[7], "\u{FFFD}", "\u{FFFD}"),
    ];
    for &(ids, with, without) in cases {
        assert_eq!(tok.decode(ids, false).unwrap(), with, "{ids:?}");
        assert_eq!(tok.decode(ids, true).unwrap(), without, "{ids:?}");
    }
}

#[test]
fn byte_tokens_are_recognized_as_hf_does() {
    let tok = load(&file(&["<0x41>", "<0x+A>", "<0xc3>", "<0xA9>", "x", "<0x4G>", "▁", "<0x-1>"], &[]));
    assert_eq!(tok.decode(&[1, 0], false).unwrap(), "\nA");
    assert_eq!(tok.decode(&[2, 3], false).unwrap(), "é");
    assert_eq!(tok.decode(&[5, 6, 0, 7], false).unwrap(), "<0x4G> A<0x-1>");
}

#[test]
fn stream_decoder_equals_decode() {
    let tok = gemma_like();
    let mut state = 12345u64;
    for _ in 0..500 {
        let ids: Vec<u32> = (0..20)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) % tok.vocab_size() as u64) as u32
            })
            .collect();
        for skip in [false, true] {
            let mut stream = StreamDecoder::new(skip);
            let mut text: String = ids.iter().map(|&id| stream.push(&tok, id)).collect();
            text += &stream.finish();
            assert_eq!(text, tok.decode(&ids, skip).unwrap(), "{ids:?}");
        }
    }
    // A character made of byte tokens comes out whole, once complete.
    let mut stream = StreamDecoder::default();
    assert_eq!(stream.push(&tok, 8), "");
    assert_eq!(stream.push(&tok, 9), "");
    assert_eq!(stream.push(&tok, 10), "");
    assert_eq!(stream.push(&tok, 3), "€a");
    assert_eq!(stream.finish(), "");
}

#[test]
fn decode_rejects_unknown_ids() {
    let tok = gemma_like();
    match tok.decode(&[3, 13], false) {
        Err(Error::InvalidArgument(msg)) => {
            assert!(msg.contains("13") && msg.contains("13)"), "{msg}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn split_behaviors_match_hf() {
    let cases = [
        ("Removed", false, vec![0, 1, 0, 1]),
        ("Removed", true, vec![2; 6]),
        ("Isolated", false, vec![2, 2, 0, 2, 1, 2, 2, 0, 1, 2]),
        ("MergedWithPrevious", false, vec![2, 2, 0, 2, 1, 2, 2, 0, 1, 2]),
        ("MergedWithNext", true, vec![2, 2, 0, 2, 1, 2, 2, 0, 1, 2]),
        ("Contiguous", false, vec![2, 2, 0, 2, 1, 2, 2, 0, 1, 2]),
    ];
    for (behavior, invert, ids) in cases {
        let mut f = file(&["a", "b", " ", "-"], &[]);
        f["pre_tokenizer"] = json!({"type": "Split", "pattern": {"String": " "},
            "behavior": behavior, "invert": invert});
        assert_eq!(load(&f).encode("  a b  ab ", false), ids, "{behavior} {invert}");
    }
    let split = |behavior, invert| Split { pattern: " ".into(), behavior, invert };
    let pieces = |s: &Split| -> Vec<&str> { s.pieces("  a b  ab ").into_iter().map(|r| &"  a b  ab "[r]).collect() };
    use SplitBehavior::*;
    assert_eq!(pieces(&split(MergedWithPrevious, false)), [" ", " ", "a ", "b ", " ", "ab "]);
    assert_eq!(pieces(&split(MergedWithPrevious, true)), [" ", " a", " b", " ", " ab", " "]);
    assert_eq!(pieces(&split(MergedWithNext, false)), [" ", " a", " b", " ", " ab", " "]);
    assert_eq!(pieces(&split(Contiguous, true)), ["  ", "a", " ", "b", "  ", "ab", " "]);
    assert_eq!(pieces(&split(Removed, false)), ["a", "b", "ab"]);
}

#[test]
fn malformed_or_unsupported_files_are_format_errors() {
    let good = file(&["a", "b", "ab"], &["a b"]).to_string();
    assert!(load_err("").contains("unexpected end"));
    assert!(load_err(&good[..good.len() / 2]).contains("(at byte"));
    assert!(load_err(&format!("{good} x")).contains("trailing"));
    assert!(load_err("[1, 2]").contains("expected '{'"));
    assert!(load_err(&"[".repeat(100_000)).contains("expected '{'"));
    assert!(load_err(&format!("{{\"x\": {}}}", "[".repeat(100_000))).contains("nested too deeply"));
    assert!(load_err(r#"{"x": "\ud800"}"#).contains("surrogate"));
    assert!(load_err(r#"{"x": "\q"}"#).contains("invalid escape"));
    assert!(load_err("{\"x\": \"\u{1}\"}").contains("control character"));
    assert!(load_err(r#"{"x": 01}"#).contains("invalid number"));
    let bad_utf8 = [&b"{\"x\": \""[..], &[0xff], b"\"}"].concat();
    assert!(matches!(Tokenizer::from_json(&bad_utf8, Path::new("b")), Err(Error::Format { .. })));
    assert!(load_err(r#"{"decoder": {"type": "Fuse"}}"#).contains("no \"model\""));

    let with = |edit: &dyn Fn(&mut Value)| {
        let mut f = file(&["a", "b", "ab"], &["a b"]);
        edit(&mut f);
        load_err(&f.to_string())
    };
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|f| f["model"]["type"] = json!("WordPiece")), "model type \"WordPiece\""),
        (Box::new(|f| f["model"]["merges"] = json!(["a c"])), "token \"c\" is not in the vocabulary"),
        (Box::new(|f| f["model"]["merges"] = json!(["b a"])), "token \"ba\" is not in the vocabulary"),
        (Box::new(|f| f["model"]["merges"] = json!(["a  b"])), "not two tokens"),
        (Box::new(|f| f["model"]["merges"] = json!([["a", "b", "c"]])), "not a pair"),
        (Box::new(|f| f["model"]["merges"] = json!(["a b", ["a", "b"]])), "mix"),
        (Box::new(|f| f["model"]["vocab"]["c"] = json!(0)), "id 0 to two tokens"),
        (Box::new(|f| f["model"]["vocab"]["c"] = json!(-1)), "non-negative integer"),
        (Box::new(|f| f["model"]["vocab"]["c"] = json!(1u64 << 40)), "out of range"),
        (Box::new(|f| f["model"]["vocab"]["c"] = json!(1u64 << 30)), "too large"),
        (Box::new(|f| f["model"]["unk_token"] = json!("<unk>")), "unk_token"),
        (Box::new(|f| f["model"]["dropout"] = json!(0.1)), "dropout"),
        (Box::new(|f| f["model"]["continuing_subword_prefix"] = json!("##")), "continuing_subword_prefix"),
        (Box::new(|f| f["model"].as_object_mut().unwrap().remove("merges").map(drop).unwrap()), "no \"merges\""),
        (Box::new(|f| f["truncation"] = json!({"max_length": 5})), "truncation"),
        (Box::new(|f| f["normalizer"] = json!({"type": "NFKC"})), "normalizer \"NFKC\""),
        (
            Box::new(|f| f["normalizer"] = json!({"type": "Replace", "pattern": {"Regex": " +"}, "content": "▁"})),
            "pattern \"Regex\"",
        ),
        (Box::new(|f| f["pre_tokenizer"] = json!({"type": "ByteLevel"})), "pre-tokenizer \"ByteLevel\""),
        (Box::new(|f| f["post_processor"] = json!({"type": "BertProcessing"})), "post-processor"),
        (Box::new(|f| f["decoder"] = json!(null)), "no \"decoder\""),
        (Box::new(|f| f["decoder"] = json!({"type": "Metaspace"})), "decoder \"Metaspace\""),
        (
            Box::new(|f| {
                f["decoder"] = json!({"type": "Sequence",
                        "decoders": [{"type": "Fuse"}, {"type": "ByteFallback"}]})
            }),
            "decoder steps",
        ),
        (Box::new(|f| f["added_tokens"] = json!([{"id": 0, "content": "a"}])), "no \"special\""),
        (
            Box::new(|f| {
                f["added_tokens"] = json!([added(0, "a", true)]);
                f["added_tokens"][0]["lstrip"] = json!(true);
            }),
            "\"lstrip\": true",
        ),
        (Box::new(|f| f["added_tokens"] = json!([added(0, "a", true), added(0, "a", false)])), "listed twice"),
        (Box::new(|f| f["added_tokens"] = json!([added(2, "a", true)])), "declared with id 2 but gets id 0"),
        (Box::new(|f| f["added_tokens"] = json!([added(3, "", true)])), "empty"),
    ];
    for (edit, expected) in cases {
        let msg = with(&*edit);
        assert!(msg.contains(expected), "{msg:?} should contain {expected:?}");
        assert!(msg.starts_with("bad.json: "), "{msg}");
    }
}

#[test]
fn missing_file_is_not_found() {
    let err = Tokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
}

/// The real Gemma 3 tokenizer against the fixture's reference ids and text (from transformers).
#[test]
fn gemma3_reference_cases() {
    let tok = crate::testing::gemma3_tokenizer();
    assert_eq!(tok.vocab_size(), 262_144);
    assert_eq!(tok.bos_id(), Some(2));
    assert_eq!(tok.token_to_id("<start_of_turn>"), Some(105));
    assert!(tok.is_special(105) && !tok.is_special(107));
    let reference: Value = serde_json::from_str(&read_text("gemma-3-270m/reference-f32.json")).unwrap();
    let cases = reference["tokenizer"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true), ids, "{text:?}");
        assert_eq!(tok.decode(&ids, true).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
    }
}

// ---- GGUF vocabularies (gguf.rs) ----

/// The Gemma 3 fixture tokenizer.json, loaded once, and the same rebuilt through its GGUF
/// vocabulary.
fn gemma3_pair() -> &'static (Tokenizer, Tokenizer) {
    static PAIR: std::sync::OnceLock<(Tokenizer, Tokenizer)> = std::sync::OnceLock::new();
    PAIR.get_or_init(|| {
        let json = crate::testing::gemma3_tokenizer();
        let gguf = Tokenizer::from_gguf_vocab(&json.to_gguf_vocab().as_vocab(), Path::new("gemma.gguf")).unwrap();
        (json, gguf)
    })
}

/// A GGUF vocabulary from (token, type) pairs, with `<bos>` = 2 and `<unk>` = 3.
fn gguf_vocab<'a>(tokens: &[(&'a str, i32)]) -> GgufVocab<'a> {
    GgufVocab {
        tokens: tokens.iter().map(|t| t.0).collect(),
        scores: None,
        token_types: tokens.iter().map(|t| t.1).collect(),
        bos_id: Some(2),
        eos_id: Some(1),
        unk_id: Some(3),
        pad_id: Some(0),
        add_bos: true,
    }
}

const SMALL_GGUF: &[(&str, i32)] = &[
    ("<pad>", 3),
    ("<eos>", 3),
    ("<bos>", 3),
    ("<unk>", 3),
    ("a", 1),
    ("b", 1),
    ("ab", 1),
    ("  ", 4),
    ("▁", 1),
    ("▁a", 1),
    ("<0xC3>", 6),
    ("<0xA9>", 6),
    ("<start>", 3),
    ("\n", 4),
    ("abab", 1),
    ("   ", 4),
];

fn gguf_err(v: &GgufVocab) -> String {
    match Tokenizer::from_gguf_vocab(v, Path::new("v.gguf")) {
        Err(e @ Error::Format { .. }) => e.to_string(),
        Err(e) => panic!("expected a format error, got {e:?}"),
        Ok(_) => panic!("expected an error for {v:?}"),
    }
}

#[test]
fn gguf_vocab_builds_gemma_style_tables() {
    let tok = Tokenizer::from_gguf_vocab(&gguf_vocab(SMALL_GGUF), Path::new("v.gguf")).unwrap();
    assert_eq!(tok.vocab_size(), SMALL_GGUF.len());
    assert_eq!(tok.bos_id(), Some(2));
    // Space runs are respelled with ▁ and stay plain vocabulary.
    assert_eq!(tok.token_to_id("▁▁"), Some(7));
    assert_eq!(tok.id_to_token(15), Some("▁▁▁"));
    assert_eq!(tok.token_to_id("  "), None);
    assert_eq!(tok.vocab.flags(7), tables::PRESENT | tables::MODEL);
    // Merges by the merged token's id, then longest left part first: the table transformers
    // would write, and the order in which the tokenizer merges without one.
    let table = super::gguf::gemma_merges(&tok.vocab, tok.vocab_size() as u32);
    let m = |a, b| table.get(a, b);
    assert_eq!(m(4, 5), Some((0, 6)));
    assert_eq!(m(8, 8), Some((1, 7)));
    assert_eq!(m(8, 4), Some((2, 9)));
    assert_eq!(m(6, 6), Some((3, 14)));
    assert_eq!(m(7, 8), Some((4, 15)));
    assert_eq!(m(8, 7), Some((5, 15)));
    assert_eq!(table.len(), 6);
    assert_same_merge_order(&tok, &table);
    // Control tokens are special added tokens, user-defined ones plain added tokens.
    assert!(tok.is_special(12) && tok.is_special(2) && !tok.is_special(13) && !tok.is_special(7));
    // The Split on " " sees no space after the normalizer, so "abab▁a" is one word.
    assert_eq!(tok.encode("<start>abab a\né", true), [2, 12, 14, 9, 13, 10, 11]);
    assert_eq!(tok.encode("x", false), [3]);
    assert_eq!(tok.decode(&[2, 12, 14, 9, 7, 13, 10, 11], false).unwrap(), "<bos><start>abab a  \né");
    assert_eq!(tok.decode(&[2, 12, 14, 9, 7, 13, 10, 11], true).unwrap(), "abab a  \né");

    // Back to GGUF: the same strings and types; scores in Gemma's convention.
    let back = tok.to_gguf_vocab();
    assert_eq!(back.tokens, SMALL_GGUF.iter().map(|t| t.0).collect::<Vec<_>>());
    assert_eq!(back.token_types, SMALL_GGUF.iter().map(|t| t.1).collect::<Vec<_>>());
    let normal = [(4, 0.0), (5, -1.0), (6, -2.0), (8, -3.0), (9, -4.0), (14, -5.0)];
    for (id, &score) in back.scores.iter().enumerate() {
        let expected = match SMALL_GGUF[id].1 {
            3 | 4 => -1000.0,
            6 => 0.0,
            _ => normal.iter().find(|n| n.0 == id).unwrap().1,
        };
        assert_eq!(score, expected, "{id}");
    }
    assert_eq!(
        (back.bos_id, back.unk_id, back.eos_id, back.pad_id, back.add_bos),
        (Some(2), Some(3), None, None, true)
    );
}

#[test]
fn to_gguf_vocab_types_unk_and_gaps() {
    // A tokenizer.json with an unk that is not an added token and an id without a token.
    let mut f = file(&["<unk>", "a", "<0x41>", "▁▁", "▁"], &[]);
    for (token, id) in [("z", 6), ("<s>", 7), ("<t>", 8)] {
        f["model"]["vocab"][token] = json!(id);
    }
    f["model"]["unk_token"] = json!("<unk>");
    f["added_tokens"] = json!([added(7, "<s>", true), added(8, "<t>", false)]);
    let v = load(&f).to_gguf_vocab();
    assert_eq!(v.tokens, ["<unk>", "a", "<0x41>", "  ", "▁", "<gguf_gap_5>", "z", "<s>", "<t>"]);
    assert_eq!(v.token_types, [2, 1, 6, 4, 1, 5, 1, 3, 4]);
    assert_eq!(v.scores, [0.0, 0.0, 0.0, -1000.0, -1.0, 0.0, -2.0, -1000.0, -1000.0]);
    assert_eq!((v.bos_id, v.unk_id, v.add_bos), (None, Some(0), false));
}

#[test]
fn malformed_gguf_vocabs_are_format_errors() {
    type Edit = Box<dyn Fn(&mut GgufVocab)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|v| v.tokens.clear()), "tokenizer.ggml.tokens is empty"),
        (Box::new(|v| v.token_types.truncate(15)), "16 entries but tokenizer.ggml.token_type has 15"),
        (Box::new(|v| v.scores = Some(vec![0.0; 3])), "tokenizer.ggml.scores has 3"),
        (Box::new(|v| v.tokens[5] = "a"), "token \"a\" appears twice, with ids 4 and 5"),
        (Box::new(|v| v.tokens[7] = "▁▁▁"), "token \"▁▁▁\" appears twice, with ids 7 and 15"),
        (Box::new(|v| v.unk_id = Some(16)), "tokenizer.ggml.unknown_token_id 16 is out of range (16 tokens)"),
        (Box::new(|v| v.unk_id = None), "tokenizer.ggml.unknown_token_id is missing"),
        (Box::new(|v| v.bos_id = None), "tokenizer.ggml.bos_token_id is missing"),
        (Box::new(|v| v.bos_id = Some(u32::MAX)), "bos_token_id 4294967295 is out of range"),
        (Box::new(|v| v.eos_id = Some(99)), "tokenizer.ggml.eos_token_id 99 is out of range"),
        (Box::new(|v| v.pad_id = Some(16)), "tokenizer.ggml.padding_token_id 16 is out of range"),
        (Box::new(|v| v.tokens[12] = ""), "token 12 is empty but has type 3"),
    ];
    for (edit, expected) in cases {
        let mut v = gguf_vocab(SMALL_GGUF);
        edit(&mut v);
        let msg = gguf_err(&v);
        assert!(msg.contains(expected), "{msg:?} should contain {expected:?}");
        assert!(msg.starts_with("v.gguf: "), "{msg}");
    }
}

/// Gemma 3's tokenizer.json → GGUF vocabulary → tokenizer: the same tables.
#[test]
fn gemma3_gguf_vocab_gives_the_same_tables() {
    let (json, gguf) = gemma3_pair();
    assert_eq!(gguf.vocab_size(), 262_144);
    assert_eq!(gguf.vocab_size(), json.vocab_size());
    for id in 0..json.vocab_size() as u32 {
        assert_eq!(gguf.id_to_token(id), json.id_to_token(id), "{id}");
        assert_eq!(gguf.vocab.flags(id), json.vocab.flags(id), "{id}");
    }
    // The merges transformers derives from the vocabulary are tokenizer.json's, and the GGUF
    // tokenizer (which keeps no table) merges every one of them, in the same order.
    let derived = super::gguf::gemma_merges(&gguf.vocab, gguf.vocab_size() as u32);
    let MergeRule::Table(table) = &json.merges else { panic!("tokenizer.json has a table") };
    assert_eq!(derived.len(), table.len());
    assert!(&derived == table, "the merges differ");
    assert_same_merge_order(gguf, table);
    assert_eq!(gguf.bos_id, json.bos_id);
    assert_eq!(gguf.bpe.unk_id, json.bpe.unk_id);
    assert_eq!(gguf.bpe.byte_ids, json.bpe.byte_ids);
    // The same tables but the merges (16 bytes each), which the GGUF tokenizer does not keep.
    assert!((json.memory_bytes() - gguf.memory_bytes()).abs_diff(16 * table.len()) < 1024);
    // And back: to_gguf_vocab of both agrees.
    assert!(gguf.to_gguf_vocab() == json.to_gguf_vocab());
}

/// The same ids and text from both, on the reference cases, the Apache license and odd strings.
#[test]
fn gemma3_gguf_vocab_encodes_and_decodes_the_same() {
    let (json, gguf) = gemma3_pair();
    let reference: Value = serde_json::from_str(&read_text("gemma-3-270m/reference-f32.json")).unwrap();
    let apache = read_text("text/apache-2.0.txt");
    let mut texts: Vec<String> = Vec::new();
    for case in reference["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(gguf.encode(text, true), ids, "{text:?}");
        assert_eq!(gguf.decode(&ids, true).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
        texts.push(text.into());
    }
    texts.push(apache);
    for s in [
        "",
        " ",
        "    four spaces,  two, then\t\ttabs\t \n\n\n newlines \r\n\r\n",
        &" ".repeat(40),
        &"\t".repeat(40),
        &"\n".repeat(40),
        "emoji 🚀🔥👍🏽🧑‍🧑‍🧒 flags 🇫🇷🇯🇵",
        "byte fallback: \u{E000}\u{10FFFD}\u{1F}\u{7F} 𓀀𓀁 ꙮ",
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n<end_of_turn><eos>",
        "<unused40><unused46><unused6241><bos><pad><unk><mask>[multimodal]<start_of_image>",
        "<start_of_turn <unused40 <unused99999> <0x41> <0xZZ>",
        "text with ▁ in it ▁▁ and ▁▁▁▁ x▁y",
        "naïve café façade — déjà vu 東京は日本の首都です。",
        "def f(x):\n\treturn x  # comment\n\n\n\n",
    ] {
        texts.push(s.into());
    }
    for text in &texts {
        for add_bos in [false, true] {
            let ids = json.encode(text, add_bos);
            assert_eq!(gguf.encode(text, add_bos), ids, "{text:?}");
            for skip in [false, true] {
                assert_eq!(gguf.decode(&ids, skip).unwrap(), json.decode(&ids, skip).unwrap(), "{text:?}");
            }
        }
    }
    let all: Vec<u32> = (0..json.vocab_size() as u32).step_by(7).collect();
    assert_eq!(gguf.decode(&all, false).unwrap(), json.decode(&all, false).unwrap());
}

/// FunctionGemma is Gemma 3 with `<unused40>`..`<unused46>` renamed: renamed in the GGUF
/// vocabulary, its prompt encodes to the ids llama.cpp gives with the official GGUF.
#[test]
fn functiongemma_renamed_gguf_vocab() {
    let (json, _) = gemma3_pair();
    let read = |name: &str| -> Value { serde_json::from_str(&read_text(&format!("functiongemma/{name}"))).unwrap() };
    let (special, prompt) = (read("special-tokens.json"), read("prompt-tokens.json"));
    let owned = json.to_gguf_vocab();
    let mut v = owned.as_vocab();
    let renamed = special["tokens"].as_object().unwrap();
    assert_eq!(renamed.len(), 7);
    for (id, token) in renamed {
        let id: usize = id.parse().unwrap();
        assert_eq!(v.tokens[id], format!("<unused{}>", id - 6));
        assert_eq!(v.token_types[id], 3);
        v.tokens[id] = token.as_str().unwrap();
    }
    let tok = Tokenizer::from_gguf_vocab(&v, Path::new("functiongemma.gguf")).unwrap();
    let ids: Vec<u32> = prompt["ids_with_bos"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids.len(), 85);
    let text = prompt["prompt"].as_str().unwrap();
    assert_eq!(tok.encode(text, true), ids);
    assert_eq!(tok.decode(&ids[1..], false).unwrap(), text);
    assert_eq!(tok.token_to_id("<start_function_call>"), Some(48));
    assert!(tok.is_special(52) && tok.token_to_id("<unused40>").is_none());
    // The unrenamed tokenizer does not see the control tokens.
    assert_ne!(json.encode(text, true), ids);
}

/// `tok` merges exactly the pairs of `table`, into the same tokens, ranked in the same order.
fn assert_same_merge_order(tok: &Tokenizer, table: &tables::Merges) {
    let mut buf = Vec::new();
    let mut by_rank: Vec<(u32, u64)> = Vec::with_capacity(table.len());
    for m in table.iter() {
        let (left, right) = ((m.pair >> 32) as u32, m.pair as u32);
        let (rank, id) = tok.pair(left, right, &mut buf).expect("a table merge merges");
        assert_eq!(id, m.new_id);
        by_rank.push((m.rank, rank));
    }
    by_rank.sort_unstable();
    assert!(by_rank.windows(2).all(|w| w[0].1 < w[1].1), "the merge order differs");
}
