//! What the tests of `kiln prepare` share: scratch directories, options, reading shards back, generated text.

use kiln_core::{Error, Result};
use kiln_data::prepare::{BLOCK_BYTES, PrepareOptions, PrepareSummary, Tokenization, prepare};
use kiln_data::shards;
use std::path::{Path, PathBuf};

pub fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-prepare-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn options(
    inputs: Vec<PathBuf>,
    out: &Path,
    tokenizer: Tokenization,
    val_fraction: f64,
    shard_tokens: usize,
) -> PrepareOptions {
    PrepareOptions {
        inputs,
        tokenizer,
        out: out.to_path_buf(),
        val_fraction,
        shard_tokens,
        text_field: "text".into(),
        lossy: false,
        block_bytes: BLOCK_BYTES,
    }
}

pub fn run(o: &PrepareOptions) -> Result<PrepareSummary> {
    prepare(o, |_, _| {})
}

pub fn read_split(out: &Path, split: &str) -> Vec<u32> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    let mut tokens = Vec::new();
    for name in meta[split].as_array().unwrap() {
        let shard = shards::Shard::open(&out.join(name.as_str().unwrap())).unwrap();
        tokens.extend((0..shard.len()).map(|i| shard.get(i)));
    }
    tokens
}

/// Generated text whose words are separated by every kind of whitespace a block cut must respect: blank lines,
/// trailing spaces, carriage returns, tabs, indentation and non-ASCII spaces.
pub fn ragged(words: usize, salt: usize) -> String {
    let vocabulary = ["the", "Quick", "fox's", "café", "naïve", "1234", "—", "$5.00", "(x)", "über", "日本語", "it'll"];
    let separators =
        [" ", " ", " ", "\n", "\n\n", " \n", "\r\n", "\t", "  ", "\n   ", ", ", ".\n", "\u{a0}", "\u{3000}", "\n\n\n"];
    (0..words)
        .map(|i| {
            let word = vocabulary[(i * 7 + salt) % vocabulary.len()];
            let separator = separators[(i * i + 3 * i + salt) % separators.len()];
            format!("{word}{separator}")
        })
        .collect()
}

pub fn data_error<T>(r: Result<T>) -> String {
    match r {
        Err(e @ Error::Data { .. }) => {
            assert_eq!(e.exit_code(), 2);
            e.to_string()
        }
        Err(e) => panic!("expected a data error, got {e:?}"),
        Ok(_) => panic!("expected a data error"),
    }
}
