//! `kiln prepare` with a Hugging Face `tokenizer.json`: the ids the Python library gives, whether documents are
//! cut into blocks or kept whole; the vocabulary, end-of-text token and copy of the tokenizer in the dataset;
//! wide vocabularies; and files that are no usable tokenizer.

mod common;

use common::{data_error, dir, options, ragged, read_split, run};
use kiln_core::config::DataConfig;
use kiln_core::{Error, Result};
use kiln_data::Dataset;
use kiln_data::hf::{EndOfText, HfTokenizer};
use kiln_data::prepare::Tokenization;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file written by scripts/reference/hf_tokenizer_golden.py.
fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tokenizer").join(name)
}

fn meta(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap()
}

fn hf(path: &Path) -> Tokenization {
    Tokenization::Hf(Arc::new(HfTokenizer::load(path, EndOfText::Find).unwrap()))
}

#[test]
fn ids_match_the_python_library_across_blocks() {
    let tokenizer = HfTokenizer::load(&golden("tokenizer.json"), EndOfText::Find).unwrap();
    assert!(tokenizer.tokenises_in_blocks(), "a GPT-2-style byte-level BPE is cut into blocks");
    assert_eq!((tokenizer.vocab_size(), tokenizer.end_of_text()), (657, 656));
    let d = dir("hf-golden");
    let out = d.join("out");
    let inputs = ["long.txt", "short.txt", "documents.jsonl"].map(golden).to_vec();
    let mut o = options(inputs, &out, Tokenization::Hf(Arc::new(tokenizer)), 0.0, 3_000);
    o.block_bytes = 1024;
    assert!(std::fs::metadata(golden("long.txt")).unwrap().len() > 20 * 1024, "the long document spans 20 blocks");
    let summary = run(&o).unwrap();

    // Every document after the end-of-text token, encoded by Python with add_special_tokens=False (the golden
    // tokenizer's post-processor would put <|endoftext|> in front of each).
    let want: Vec<u32> = std::fs::read(golden("ids.u32"))
        .unwrap()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let got = read_split(&out, "train");
    let first_difference = got.iter().zip(&want).position(|(g, w)| g != w);
    assert_eq!((got.len(), first_difference), (want.len(), None), "ids differ from the Python library's");
    assert_eq!(summary.train_tokens as usize, want.len());
    assert!(summary.shards.len() > 1, "3,000-token shards: several expected");

    let meta = meta(&out);
    assert_eq!(meta["tokenizer"], "hf");
    assert_eq!(meta["vocab_size"], 657);
    assert_eq!(meta["end_of_text"], 656);
    assert_eq!(meta["end_of_text_token"], "<|endoftext|>");
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(golden("tokenizer.json")).unwrap());
}

/// The golden tokenizer with its normalizer and pre-tokenizer replaced, saved as `d/name.json`.
fn variant(d: &Path, name: &str, normalizer: Value, pre_tokenizer: Value) -> PathBuf {
    let mut spec: Value = serde_json::from_slice(&std::fs::read(golden("tokenizer.json")).unwrap()).unwrap();
    spec["normalizer"] = normalizer;
    spec["pre_tokenizer"] = pre_tokenizer;
    let path = d.join(format!("{name}.json"));
    std::fs::write(&path, spec.to_string()).unwrap();
    path
}

fn split_then_bytes(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
    ]})
}

fn byte_level(add_prefix_space: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true})
}

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[test]
fn known_pipelines_are_cut_into_blocks_and_the_rest_kept_whole() {
    let d = dir("hf-pipelines");
    let text = ragged(4_000, 3);
    std::fs::write(d.join("t.txt"), &text).unwrap();
    let metaspace = json!({"type": "Sequence", "pretokenizers": [
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": true},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
    ]});
    let lowercase = json!({"type": "Sequence", "normalizers": [{"type": "NFD"}, {"type": "Lowercase"}]});
    // (name, normalizer, pre-tokenizer, whether blocks are exact)
    let pipelines = [
        ("llama3", Value::Null, split_then_bytes(LLAMA3_SPLIT), true),
        ("qwen2", json!({"type": "NFC"}), split_then_bytes(QWEN2_SPLIT), true),
        ("lowercase", lowercase, byte_level(false), true),
        ("prefix-space", Value::Null, byte_level(true), false),
        ("metaspace", Value::Null, metaspace, false),
        ("nfkc", json!({"type": "NFKC"}), byte_level(false), false),
        ("no-pre-tokenizer", Value::Null, Value::Null, false),
    ];
    for (name, normalizer, pre_tokenizer, in_blocks) in pipelines {
        let path = variant(&d, name, normalizer, pre_tokenizer);
        let library = tokenizers::Tokenizer::from_file(&path).unwrap();
        let ids = |text: &str| library.encode(text, false).unwrap().get_ids().to_vec();
        let tokenizer = HfTokenizer::load(&path, EndOfText::Find).unwrap();
        assert_eq!(tokenizer.tokenises_in_blocks(), in_blocks, "{name}");
        let out = d.join(format!("out-{name}"));
        let mut o = options(vec![d.join("t.txt")], &out, Tokenization::Hf(Arc::new(tokenizer)), 0.0, 1 << 30);
        o.block_bytes = 64;
        run(&o).unwrap();
        let mut want = vec![656];
        want.extend(ids(&text));
        assert!(read_split(&out, "train") == want, "{name}: ids differ from the whole document's");
        if name == "prefix-space" || name == "metaspace" {
            // Why these are kept whole: the second half of a cut text would gain a space in front.
            assert_ne!(ids("one\ntwo"), [ids("one\n"), ids("two")].concat(), "{name}");
        }
    }
}

/// A word-level tokenizer.json of `words` words `w0`, `w1`, ... (split at whitespace) and the added tokens
/// `special`, which follow them.
fn word_level(d: &Path, name: &str, words: u32, special: &[&str]) -> PathBuf {
    let mut vocab: serde_json::Map<String, Value> = (0..words).map(|i| (format!("w{i}"), json!(i))).collect();
    vocab.insert("[UNK]".into(), json!(words));
    let added: Vec<Value> = special
        .iter()
        .zip(words + 1..)
        .map(|(content, id)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let spec = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    let path = d.join(format!("{name}.json"));
    std::fs::write(&path, spec.to_string()).unwrap();
    path
}

#[test]
fn a_vocabulary_past_65536_writes_uint32_shards_that_load() {
    let d = dir("hf-wide");
    let path = word_level(&d, "wide", 70_000, &["</s>"]);
    // Two documents of 7-byte words, 420 and 140 bytes: the validation quarter is exactly the second.
    let words = |range: std::ops::Range<u32>| -> Vec<u32> { range.map(|i| 10_000 + i * 1_733 % 60_000).collect() };
    let (first, second) = (words(0..60), words(60..80));
    for (name, ids) in [("a.txt", &first), ("b.txt", &second)] {
        std::fs::write(d.join(name), ids.iter().map(|i| format!("w{i} ")).collect::<String>()).unwrap();
    }
    let out = d.join("out");
    run(&options(vec![d.join("a.txt"), d.join("b.txt")], &out, hf(&path), 0.25, 1 << 20)).unwrap();
    let meta = meta(&out);
    assert_eq!((meta["vocab_size"].as_u64(), meta["end_of_text"].as_u64()), (Some(70_002), Some(70_001)));
    assert_eq!(meta["end_of_text_token"], "</s>");
    assert_eq!(read_split(&out, "train"), [&[70_001][..], &first].concat());
    assert_eq!(read_split(&out, "val"), [&[70_001][..], &second].concat());
    assert!(first.iter().any(|&i| i > 65_535));
    let bytes = std::fs::read(out.join("train_000000.bin")).unwrap();
    let int = |i: usize| i32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!((int(0), int(1)), (20240801, 7), "uint32 shard header");
    let cfg = DataConfig { train: out.to_string_lossy().into(), val: None };
    assert_eq!(Dataset::open(&cfg, 8).unwrap().vocab_size(), 70_002);
}

fn usage_error<T>(r: Result<T>) -> String {
    match r {
        Err(e @ Error::Usage(_)) => {
            assert_eq!(e.exit_code(), 2);
            e.to_string()
        }
        Err(e) => panic!("expected a usage error, got {e:?}"),
        Ok(_) => panic!("expected a usage error"),
    }
}

#[test]
fn unusable_tokenizer_files_are_named() {
    let d = dir("hf-bad");
    let missing = d.join("missing/tokenizer.json");
    let msg = data_error(HfTokenizer::load(&missing, EndOfText::Find));
    assert!(msg.contains("missing/tokenizer.json") && msg.contains("cannot read"), "{msg}");
    for (name, text) in [("truncated.json", "{\"version\": \"1.0\", \"model\": {"), ("other.json", "{\"vocab\": []}")] {
        std::fs::write(d.join(name), text).unwrap();
        let msg = data_error(HfTokenizer::load(&d.join(name), EndOfText::Find));
        assert!(msg.contains(name) && msg.contains("not a valid tokenizer.json"), "{msg}");
    }
    // Without an end-of-text token there is nothing to put between documents, unless one is named.
    let plain = word_level(&d, "plain", 10, &["<pad>"]);
    let msg = usage_error(HfTokenizer::load(&plain, EndOfText::Find));
    assert!(msg.contains("plain.json") && msg.contains("<|endoftext|>") && msg.contains("--eos-token"), "{msg}");
    let named = HfTokenizer::load(&plain, EndOfText::Token("<pad>")).unwrap();
    assert_eq!((named.end_of_text(), named.end_of_text_token()), (11, "<pad>"));
    let msg = usage_error(HfTokenizer::load(&plain, EndOfText::Token("<eos>")));
    assert!(msg.contains("plain.json") && msg.contains("\"<eos>\""), "{msg}");
    // The first of the known names wins, whatever the order of the tokens.
    let both = word_level(&d, "both", 10, &["<|im_end|>", "</s>"]);
    assert_eq!(HfTokenizer::load(&both, EndOfText::Find).unwrap().end_of_text_token(), "</s>");
}
