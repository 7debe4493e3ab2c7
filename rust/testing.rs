//! The test data in `tests/fixtures` (its README says where each file came from), for the unit
//! tests. The repository holds all of it, so a missing file is a failure, never a skip.

use crate::text::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `tests/fixtures` of this checkout.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The contents of `tests/fixtures/NAME` as text.
pub fn read_text(name: &str) -> String {
    let path = fixtures().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Gemma 3's `tokenizer.json` (kept xz-compressed: 33 MB → 3.5 MB), decompressed in memory once.
/// The xz stream's CRC checks the bytes.
pub fn gemma3_tokenizer_json() -> &'static [u8] {
    static JSON: OnceLock<Vec<u8>> = OnceLock::new();
    JSON.get_or_init(|| {
        let path = fixtures().join("gemma-3-270m/tokenizer.json.xz");
        let xz = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut json = Vec::with_capacity(34 << 20);
        lzma_rs::xz_decompress(&mut xz.as_slice(), &mut json).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        json
    })
}

/// Gemma 3's tokenizer, parsed from [`gemma3_tokenizer_json`].
pub fn gemma3_tokenizer() -> Tokenizer {
    Tokenizer::from_json(gemma3_tokenizer_json(), Path::new("tokenizer.json")).unwrap()
}
