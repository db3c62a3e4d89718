//! Text corpora: the split, the vocabulary, and every kind of bad file.

use kiln_core::config::DataConfig;
use kiln_core::{Error, backend::IGNORE_TARGET};
use kiln_data::Dataset;
use std::path::{Path, PathBuf};

fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn config(train: &Path, val: Option<&PathBuf>) -> DataConfig {
    DataConfig { train: train.to_string_lossy().into(), val: val.map(|v| v.to_string_lossy().into()) }
}

fn data_error(result: Result<Dataset, Error>) -> String {
    match result {
        Err(e @ Error::Data { .. }) => {
            assert_eq!(e.exit_code(), 2);
            e.to_string()
        }
        Err(other) => panic!("expected a data error, got {other:?}"),
        Ok(_) => panic!("expected a data error"),
    }
}

#[test]
fn text_is_split_ninety_ten_and_windows_are_shifted_targets() {
    // 100 characters: 90 to train on, 10 held out; the held-out part has characters the training part lacks.
    let text = format!("{}{}", "ab".repeat(45), "xyzxyzxyzx");
    let path = temp_file("split.txt", text.as_bytes());
    let data = Dataset::open(&config(&path, None), 8).unwrap();
    assert_eq!(data.vocab_size(), 5);
    let (mut x, mut y) = (vec![0; 8], vec![0; 8]);
    for row in 0..20 {
        data.train_sequence(7, 3, row, &mut x, &mut y).unwrap();
        let s = data.tokenizer.decode(&x);
        assert!(s.chars().all(|c| c == 'a' || c == 'b'), "training window {s:?} reaches into the held-out 10%");
        assert_eq!(x[1..], y[..7]);
        assert!(!y.contains(&IGNORE_TARGET));
    }
    data.val_sequence(7, 0, &mut x, &mut y).unwrap();
    assert!(data.tokenizer.decode(&x).chars().all(|c| "xyz".contains(c)));
    // Same coordinates, same sequence; another step, (almost surely) another.
    let (mut x2, mut y2) = (vec![0; 8], vec![0; 8]);
    data.train_sequence(7, 3, 5, &mut x, &mut y).unwrap();
    data.train_sequence(7, 3, 5, &mut x2, &mut y2).unwrap();
    assert_eq!((x.clone(), y.clone()), (x2.clone(), y2.clone()));
}

#[test]
fn a_separate_validation_file_is_used_whole() {
    let train = temp_file("t.txt", "hello world, hello kiln".as_bytes());
    let val = temp_file("v.txt", "qqqqqqqqqqqq".as_bytes());
    let data = Dataset::open(&config(&train, Some(&val)), 4).unwrap();
    let (mut x, mut y) = (vec![0; 4], vec![0; 4]);
    data.val_sequence(1, 0, &mut x, &mut y).unwrap();
    assert_eq!(data.tokenizer.decode(&x), "qqqq");
}

#[test]
fn bad_files_are_named_with_the_problem() {
    let missing = std::env::temp_dir().join("kiln-no-such-file.txt");
    let msg = data_error(Dataset::open(&config(&missing, None), 4));
    assert!(msg.contains("kiln-no-such-file.txt") && msg.contains("cannot read"), "{msg}");
    assert!(!msg.contains("curl"), "only a known public corpus comes with a download command: {msg}");

    // A missing copy of a corpus kiln's configurations name says where the path was looked for and how to get it.
    let msg = data_error(Dataset::open(&config(Path::new("no-such-dir/tinyshakespeare.txt"), None), 4));
    let cwd = std::env::current_dir().unwrap();
    assert!(msg.contains(&format!("current directory, {}", cwd.display())), "{msg}");
    assert!(
        msg.contains(
            "curl --create-dirs -o no-such-dir/tinyshakespeare.txt https://raw.githubusercontent.com/karpathy/char-rnn/"
        ),
        "{msg}"
    );

    let empty = temp_file("empty.txt", b"");
    assert!(data_error(Dataset::open(&config(&empty, None), 4)).contains("empty"));

    let mut bytes = b"valid text then ".to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    let binary = temp_file("binary.txt", &bytes);
    let msg = data_error(Dataset::open(&config(&binary, None), 4));
    assert!(msg.contains("binary.txt") && msg.contains("byte offset 16"), "{msg}");

    let short = temp_file("short.txt", b"0123456789abcdefghij");
    let msg = data_error(Dataset::open(&config(&short, None), 64));
    assert!(msg.contains("too few for one sequence of block_size 64"), "{msg}");
}

#[test]
fn unknown_synthetic_corpus() {
    let cfg = DataConfig { train: "synthetic:multiplication".into(), val: None };
    let msg = data_error(Dataset::open(&cfg, 13));
    assert!(msg.contains("synthetic:addition"), "{msg}");
}

#[test]
fn random_corpus_takes_its_vocabulary_from_its_name() {
    let open = |train: &str| Dataset::open(&DataConfig { train: train.into(), val: None }, 64);
    assert_eq!(open("synthetic:random").unwrap().vocab_size(), 50257);
    // Llama 3's vocabulary: 8 × 64 ids drawn, and all of them below 128256 but not all below GPT-2's 50257.
    let data = open("synthetic:random:128256").unwrap();
    assert_eq!(data.vocab_size(), 128256);
    let (mut inputs, mut targets, mut seen) = (vec![0; 64], vec![0; 64], Vec::new());
    for row in 0..8 {
        data.train_sequence(1, 0, row, &mut inputs, &mut targets).unwrap();
        assert_eq!(inputs[1..], targets[..63]);
        seen.extend(inputs.iter().chain(&targets).copied());
    }
    assert!(seen.iter().all(|&t| t < 128256) && seen.iter().any(|&t| t >= 50257), "{seen:?}");
    for bad in ["0", "", "-3", "1e5", "50257 ", "4294967296"] {
        let msg = data_error(open(&format!("synthetic:random:{bad}")));
        assert!(msg.contains(&format!("\"{bad}\" is not a vocabulary size")), "{msg}");
    }
}
