//! `kiln prepare`'s shards: contents, format, the split, and bad input; and training data read back from them.

mod common;

use common::{data_error, dir, options, ragged, read_split, run};
use kiln_core::Error;
use kiln_core::config::DataConfig;
use kiln_data::prepare::Tokenization;
use kiln_data::{Dataset, shards};
use std::path::Path;

/// Generated prose: words, punctuation, blank lines, indentation, and non-ASCII characters.
fn prose(lines: usize, salt: usize) -> String {
    let words =
        ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog's", "café", "naïve", "1234", "—", "$5.00"];
    (0..lines)
        .map(|i| {
            let n = 3 + (i * 7 + salt) % 11;
            let line: Vec<&str> = (0..n).map(|j| words[(i * 31 + j * 17 + salt) % words.len()]).collect();
            let sep = if i % 9 == 0 {
                "\n\n"
            } else if i % 13 == 0 {
                "\n   "
            } else {
                "\n"
            };
            format!("{}{sep}", line.join(" "))
        })
        .collect()
}

#[test]
fn gpt2_shards_hold_each_document_after_an_end_of_text_token() {
    let d = dir("gpt2");
    // More than one read block (1 MiB), so the block cuts are exercised against whole-text tokenisation.
    let big = prose(60_000, 1);
    assert!(big.len() > 1 << 21);
    let small = prose(40, 2);
    std::fs::create_dir_all(d.join("docs")).unwrap();
    std::fs::write(d.join("docs/a.txt"), &big).unwrap();
    std::fs::write(d.join("docs/b.txt"), &small).unwrap();
    let jsonl = format!(
        "{}\n{}\n",
        serde_json::json!({"text": "first doc"}),
        serde_json::json!({"text": "second\ndoc", "id": 7})
    );
    std::fs::write(d.join("c.jsonl"), jsonl).unwrap();
    let out = d.join("out");
    let summary =
        run(&options(vec![d.join("docs"), d.join("c.jsonl")], &out, Tokenization::Gpt2, 0.0, 100_000)).unwrap();
    let bpe = tiktoken_rs::r50k_base().unwrap();
    let mut want = Vec::new();
    for text in [big.as_str(), small.as_str(), "first doc", "second\ndoc"] {
        want.push(50256);
        want.extend(bpe.encode_ordinary(text));
    }
    let got = read_split(&out, "train");
    assert_eq!(got.len(), want.len());
    assert!(got == want, "shards differ from whole-document tokenisation");
    assert_eq!(summary.train_tokens as usize, want.len());
    assert_eq!(summary.val_tokens, 0);
    assert!(summary.shards.len() > 1, "100,000-token shards: several expected");
    // llm.c's header: magic 20240520, version 1, the count, uint16 tokens.
    let bytes = std::fs::read(out.join("train_000000.bin")).unwrap();
    let int = |i: usize| i32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
    assert_eq!((int(0), int(1), int(2)), (20240520, 1, 100_000));
    assert_eq!(bytes.len(), 1024 + 2 * 100_000);
}

#[test]
fn blocks_cut_gpt2_tokens_nowhere() {
    // Blocks of 64 bytes put cuts next to every kind of whitespace: a cut after a blank line would give "\n\n"
    // (one GPT-2 token) where the whole text has "\n" "\n".
    let d = dir("ragged");
    let text = ragged(3_000, 1);
    std::fs::write(d.join("t.txt"), &text).unwrap();
    let out = d.join("out");
    let mut small_blocks = options(vec![d.join("t.txt")], &out, Tokenization::Gpt2, 0.0, 1 << 30);
    small_blocks.block_bytes = 64;
    run(&small_blocks).unwrap();
    let mut want = vec![50256];
    want.extend(tiktoken_rs::r50k_base().unwrap().encode_ordinary(&text));
    assert!(read_split(&out, "train") == want, "block-wise tokens differ from the whole text's");
}

#[test]
fn the_last_fraction_of_the_input_is_validation() {
    let d = dir("split");
    let text = prose(5_000, 3);
    std::fs::write(d.join("t.txt"), &text).unwrap();
    let out = d.join("out");
    let s = run(&options(vec![d.join("t.txt")], &out, Tokenization::Byte, 0.2, 1 << 30)).unwrap();
    // Bytes: each character byte is a token, plus the one end-of-text token that opens the document.
    assert_eq!(s.train_tokens + s.val_tokens, text.len() as u64 + 1);
    let val_share = s.val_tokens as f64 / text.len() as f64;
    assert!((val_share - 0.2).abs() < 0.01, "validation share {val_share}");
    let val = read_split(&out, "val");
    assert_eq!(val, text.as_bytes()[text.len() - val.len()..].iter().map(|&b| b as u32).collect::<Vec<_>>());
}

#[test]
fn shards_load_as_training_data() {
    let d = dir("load");
    std::fs::write(d.join("t.txt"), prose(3_000, 4)).unwrap();
    let out = d.join("out");
    run(&options(vec![d.join("t.txt")], &out, Tokenization::Gpt2, 0.1, 5_000)).unwrap();
    let cfg = DataConfig { train: out.to_string_lossy().into(), val: None };
    let data = Dataset::open(&cfg, 32).unwrap();
    assert_eq!(data.vocab_size(), 50257);
    let train = read_split(&out, "train");
    let (mut x, mut y) = (vec![0; 32], vec![0; 32]);
    for row in 0..20 {
        data.train_sequence(1, 0, row, &mut x, &mut y).unwrap();
        assert_eq!(x[1..], y[..31]);
        // Each window is a run of consecutive training tokens.
        assert!(train.windows(32).any(|w| w == x.as_slice()), "window not found in the training shards");
    }
    // An interrupted prepare (no meta.json) is not a dataset.
    std::fs::remove_file(out.join("meta.json")).unwrap();
    let err = Dataset::open(&cfg, 32).err().unwrap().to_string();
    assert!(err.contains("meta.json") && err.contains("kiln prepare"), "{err}");
}

#[test]
fn wide_vocabularies_use_uint32_shards() {
    let d = dir("wide");
    let path = d.join("w.bin");
    shards::write(&path, &[0, 70_000, 123_456], 200_000).unwrap();
    let shard = shards::Shard::open(&path).unwrap();
    assert_eq!((0..3).map(|i| shard.get(i)).collect::<Vec<_>>(), vec![0, 70_000, 123_456]);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(i32::from_le_bytes(bytes[0..4].try_into().unwrap()), 20240801);
    assert_eq!(i32::from_le_bytes(bytes[4..8].try_into().unwrap()), 7);
}

#[test]
fn bad_shards_and_bad_input_are_named() {
    let d = dir("bad");
    let good = d.join("good.bin");
    shards::write(&good, &[1, 2, 3, 4], 100).unwrap();
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[0] = 7;
    std::fs::write(d.join("magic.bin"), &bytes).unwrap();
    assert!(data_error(shards::Shard::open(&d.join("magic.bin"))).contains("wrong magic number"));
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(d.join("short.bin"), &bytes[..bytes.len() - 3]).unwrap();
    let msg = data_error(shards::Shard::open(&d.join("short.bin")));
    assert!(msg.contains("short.bin") && msg.contains("header says 4 tokens"), "{msg}");

    let out = d.join("out");
    let msg = data_error(run(&options(vec![d.join("missing.txt")], &out, Tokenization::Gpt2, 0.0, 100)));
    assert!(msg.contains("missing.txt"), "{msg}");
    std::fs::write(d.join("empty.txt"), "").unwrap();
    assert!(data_error(run(&options(vec![d.join("empty.txt")], &out, Tokenization::Gpt2, 0.0, 100))).contains("empty"));
    std::fs::write(d.join("latin1.txt"), b"caf\xe9 au lait, caf\xe9 noir").unwrap();
    let msg = data_error(run(&options(vec![d.join("latin1.txt")], &out, Tokenization::Gpt2, 0.0, 100)));
    assert!(msg.contains("latin1.txt") && msg.contains("byte offset 3"), "{msg}");
    assert!(!out.join("meta.json").exists(), "a failed prepare must not leave a complete-looking dataset");
    let mut lossy = options(vec![d.join("latin1.txt")], &out, Tokenization::Gpt2, 0.0, 100);
    lossy.lossy = true;
    assert_eq!(run(&lossy).unwrap().replaced, 2);
    std::fs::write(d.join("x.jsonl"), "{\"body\": \"no text field\"}\n").unwrap();
    let msg = data_error(run(&options(vec![d.join("x.jsonl")], &out, Tokenization::Gpt2, 0.0, 100)));
    assert!(msg.contains("line 1") && msg.contains("--text-field"), "{msg}");
    // Documents are not split at the validation cut: a few large ones can leave nothing to hold out.
    let docs: String = (0..3).map(|i| format!("{}\n", serde_json::json!({ "text": prose(2000, i) }))).collect();
    std::fs::write(d.join("few.jsonl"), docs).unwrap();
    match run(&options(vec![d.join("few.jsonl")], &out, Tokenization::Gpt2, 0.01, 1 << 20)) {
        Err(Error::Usage(msg)) => assert!(msg.contains("no document starts in the last 1%"), "{msg}"),
        other => panic!("expected a usage error, got {:?}", other.map(|s| s.val_tokens)),
    }
}

/// A dataset of byte-vocabulary (257) shards in `dir`, one per split, with `meta.json`.
fn byte_dataset(dir: &Path, train: &[u32], val: &[u32]) -> DataConfig {
    std::fs::create_dir_all(dir).unwrap();
    shards::write(&dir.join("train_000000.bin"), train, 300).unwrap();
    shards::write(&dir.join("val_000000.bin"), val, 300).unwrap();
    let meta = serde_json::json!({"tokenizer": "byte", "vocab_size": 257, "train": ["train_000000.bin"], "val": ["val_000000.bin"]});
    std::fs::write(dir.join("meta.json"), meta.to_string()).unwrap();
    DataConfig { train: dir.to_string_lossy().into(), val: None }
}

#[test]
fn token_ids_outside_the_vocabulary_are_found_when_read_not_at_open() {
    let d = dir("badvocab");
    let mut train = vec![5; 40];
    train[17] = 299;
    let cfg = byte_dataset(&d, &train, &[5, 300, 5, 5, 5, 5, 5, 5, 5, 5]);
    // Opening reads headers only, so a dataset of any size opens at once.
    let data = Dataset::open(&cfg, 4).unwrap();
    let (mut x, mut y) = (vec![0; 4], vec![0; 4]);
    let msg = data_error(data.val_window(0, &mut x, &mut y));
    assert!(msg.contains("val_000000.bin") && msg.contains("token id 300 at position 1"), "{msg}");
    // A training window fails exactly when it covers the bad token, and a window beside it is read whole.
    let (mut read, mut failed) = (0, 0);
    for row in 0..50 {
        match data.train_sequence(3, 0, row, &mut x, &mut y) {
            Ok(()) => {
                assert_eq!((x.clone(), y.clone()), (vec![5; 4], vec![5; 4]));
                read += 1;
            }
            Err(e) => {
                let msg = data_error::<()>(Err(e));
                assert!(msg.contains("train_000000.bin") && msg.contains("token id 299 at position 17"), "{msg}");
                failed += 1;
            }
        }
    }
    assert!(read > 0 && failed > 0, "{read} windows read, {failed} failed");
}

#[test]
fn a_shard_of_the_wrong_size_fails_at_open_by_name() {
    let d = dir("badsize");
    let cfg = byte_dataset(&d, &[5; 40], &[5; 10]);
    let path = d.join("train_000000.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend([0, 0]);
    std::fs::write(&path, bytes).unwrap();
    let msg = data_error(Dataset::open(&cfg, 4));
    assert!(msg.contains("train_000000.bin") && msg.contains("header says 40 tokens, the file holds 41"), "{msg}");
}

#[test]
fn char_shards_use_the_input_character_set_and_decode_back() {
    let d = dir("char");
    let text = prose(500, 5);
    std::fs::write(d.join("t.txt"), &text).unwrap();
    let out = d.join("out");
    run(&options(vec![d.join("t.txt")], &out, Tokenization::Char(None), 0.1, 1 << 30)).unwrap();
    let mut chars: Vec<char> = text.chars().collect();
    chars.sort_unstable();
    chars.dedup();
    let cfg = DataConfig { train: out.to_string_lossy().into(), val: None };
    let data = Dataset::open(&cfg, 16).unwrap();
    assert_eq!(data.vocab_size(), chars.len() + 1, "the characters and an end-of-text token");
    let codec = data.codec().unwrap();
    assert_eq!(codec.end_of_text(), Some(chars.len() as u32));
    let (train, val) = (read_split(&out, "train"), read_split(&out, "val"));
    assert_eq!(train[0], chars.len() as u32, "the document opens with end-of-text");
    // The cut falls where it should even though this text's multi-byte characters can straddle it.
    let share = val.len() as f64 / (train.len() + val.len()) as f64;
    assert!((share - 0.1).abs() < 0.01, "validation share {share}");
    let all: Vec<u32> = train.iter().chain(&val).copied().collect();
    assert_eq!(String::from_utf8(codec.decode_bytes(&all).unwrap()).unwrap(), text);
    assert_eq!(codec.encode("the fox").unwrap(), train_ids(&chars, "the fox"));
}

fn train_ids(chars: &[char], text: &str) -> Vec<u32> {
    text.chars().map(|c| chars.iter().position(|&x| x == c).unwrap() as u32).collect()
}

/// A shard as llm.c's `write_datafile` writes it: 256 int32 (magic 20240520, version 1, count), then uint16 ids.
fn llmc_shard(path: &Path, tokens: &[u16]) {
    let mut header = [0i32; 256];
    header[..3].copy_from_slice(&[20240520, 1, tokens.len() as i32]);
    let bytes: Vec<u8> =
        header.iter().flat_map(|h| h.to_le_bytes()).chain(tokens.iter().flat_map(|t| t.to_le_bytes())).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn shards_written_by_llmc_load_by_name_or_pattern() {
    let d = dir("llmc");
    let ids = |n: usize, salt: usize| -> Vec<u16> { (0..n).map(|i| ((i * 7919 + salt) % 50257) as u16).collect() };
    llmc_shard(&d.join("fineweb_train_000001.bin"), &ids(300, 1));
    llmc_shard(&d.join("fineweb_train_000002.bin"), &ids(200, 2));
    llmc_shard(&d.join("fineweb_val_000000.bin"), &ids(100, 3));
    let name = |n: &str| d.join(n).to_string_lossy().into_owned();
    let cfg = DataConfig { train: name("fineweb_train_*.bin"), val: Some(name("fineweb_val_000000.bin")) };
    let data = Dataset::open(&cfg, 16).unwrap();
    assert_eq!(data.vocab_size(), 50257);
    assert!(matches!(data.codec(), Some(kiln_data::codec::Codec::Gpt2)));
    let (mut x, mut y) = (vec![0; 16], vec![0; 16]);
    let all: Vec<u32> = ids(300, 1).into_iter().chain(ids(200, 2)).map(u32::from).collect();
    for row in 0..10 {
        data.train_sequence(5, 1, row, &mut x, &mut y).unwrap();
        assert!(all.windows(16).any(|w| w == x.as_slice()));
    }
    let no_val = DataConfig { val: None, ..cfg.clone() };
    assert!(Dataset::open(&no_val, 16).err().unwrap().to_string().contains("data.val"));
    let none = DataConfig { train: name("nothing_*.bin"), ..cfg };
    assert!(data_error(Dataset::open(&none, 16)).contains("no file matches"));
}

#[test]
fn a_meta_json_with_an_empty_split_or_another_tokenizer_s_vocabulary_is_refused_by_name() {
    let d = dir("badmeta");
    let cfg = byte_dataset(&d, &[5; 40], &[5; 10]);
    let meta_path = d.join("meta.json");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut changed = meta.clone();
        changed[key] = value;
        std::fs::write(&meta_path, changed.to_string()).unwrap();
    };
    // No validation shards (the library prepares such a dataset at a validation fraction of 0): nothing to sample.
    with("val", serde_json::json!([]));
    for open in [Dataset::open, Dataset::open_validation] {
        let msg = data_error(open(&cfg, 4));
        assert!(msg.contains("meta.json") && msg.contains("no validation shards"), "{msg}");
    }
    with("train", serde_json::json!([]));
    let msg = data_error(Dataset::open(&cfg, 4));
    assert!(msg.contains("meta.json") && msg.contains("no training shards"), "{msg}");
    // A vocabulary that is not the tokenizer's, and a tokenizer kiln does not know.
    with("vocab_size", serde_json::json!(19));
    let msg = data_error(Dataset::open(&cfg, 4));
    assert!(msg.contains("vocab_size is 19") && msg.contains("byte tokenizer has 257"), "{msg}");
    with("tokenizer", serde_json::json!("sentencepiece"));
    let msg = data_error(Dataset::open(&cfg, 4));
    assert!(msg.contains("meta.json") && msg.contains("\"sentencepiece\""), "{msg}");
}
