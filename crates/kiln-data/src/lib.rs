//! Training data.
//!
//! A [`Dataset`] turns `data.*` configuration into sequences of token ids: a text file, a directory of token
//! shards written by [`prepare`] (llm.c's format), the synthetic addition task, or uniform random ids for
//! benchmarks (`synthetic:random` in GPT-2's vocabulary, `synthetic:random:N` in one of N ids). Every training
//! sequence is a pure function of `(seed, step, row)`: there is no loader state to save or restore, a resumed run
//! sees exactly the data it would have seen, and data-parallel ranks can split any global batch by row without
//! coordinating.

mod addition;
pub mod codec;
pub mod hf;
pub mod prepare;
pub mod shards;
mod tokenizer;

pub use addition::Addition;
pub use tokenizer::CharTokenizer;

use kiln_core::config::DataConfig;
use kiln_core::{Error, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The name of the built-in corpus in `data.train = "synthetic:addition"`.
pub const SYNTHETIC_PREFIX: &str = "synthetic:";

pub struct Dataset {
    pub tokenizer: CharTokenizer,
    source: Source,
}

enum Source {
    Text {
        train: Vec<u32>,
        val: Vec<u32>,
    },
    Addition(Addition),
    /// Uniform random token ids: throughput does not depend on the text, so benchmarks need none.
    Random {
        vocab: usize,
    },
    /// Token shards written by `kiln prepare` (or llm.c's scripts), memory-mapped.
    Shards {
        train: Vec<shards::Shard>,
        val: Vec<shards::Shard>,
        vocab: usize,
        tokenizer: String,
        /// The dataset's `tokenizer.json`, for a Hugging Face tokenizer.
        hf: Option<std::sync::Arc<hf::HfTokenizer>>,
    },
}

/// The vocabulary of `synthetic:random`: GPT-2's, so that benchmarks match GPT-2's shapes.
pub const RANDOM_VOCAB: usize = 50257;

/// The vocabulary `n` of `synthetic:random:N` (`train` names the corpus in errors), for benchmarks of models with
/// other tokenizers: at least one id, and every id below [`kiln_core::backend::IGNORE_TARGET`], so any `u32`.
fn random_vocab(train: &str, n: &str) -> Result<usize> {
    n.parse::<u32>().ok().filter(|&v| v >= 1).map(|v| v as usize).ok_or_else(|| {
        Error::data(
            train,
            format!("\"{n}\" is not a vocabulary size: synthetic:random:N takes a whole number from 1 to {}", u32::MAX),
        )
    })
}

/// A seed for one sequence, from the run's seed and the sequence's coordinates (SplitMix64 finalisers, so that
/// neighbouring coordinates give unrelated streams).
fn sequence_seed(seed: u64, stream: u64, step: u64, row: u64) -> u64 {
    let mut h = seed;
    for x in [stream, step, row] {
        h = mix(h ^ mix(x.wrapping_add(0x9E37_79B9_7F4A_7C15)));
    }
    h
}

pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const TRAIN_STREAM: u64 = 1;
const VAL_STREAM: u64 = 2;

impl Dataset {
    /// Opens the corpus `data` names. Sequences will be `time` tokens long.
    pub fn open(data: &DataConfig, time: usize) -> Result<Dataset> {
        Dataset::open_splits(data, time, true)
    }

    /// [`Dataset::open`] for evaluation: training shards are not opened, and the training split of such a corpus
    /// is empty.
    pub fn open_validation(data: &DataConfig, time: usize) -> Result<Dataset> {
        Dataset::open_splits(data, time, false)
    }

    fn open_splits(data: &DataConfig, time: usize, with_train: bool) -> Result<Dataset> {
        if let Some(name) = data.train.strip_prefix(SYNTHETIC_PREFIX) {
            return match name {
                "addition" => {
                    if let Some(val) = &data.val {
                        return Err(Error::Usage(format!(
                            "data.val = \"{val}\": a synthetic corpus brings its own validation set; remove data.val"
                        )));
                    }
                    if time < addition::EXAMPLE_LEN {
                        return Err(Error::Usage(format!(
                            "model.block_size = {time}: synthetic:addition needs at least {} (one whole sum)",
                            addition::EXAMPLE_LEN
                        )));
                    }
                    let task = Addition::new();
                    Ok(Dataset { tokenizer: task.tokenizer(), source: Source::Addition(task) })
                }
                "random" => Ok(Dataset::random(RANDOM_VOCAB)),
                other => match other.strip_prefix("random:") {
                    Some(vocab) => Ok(Dataset::random(random_vocab(&data.train, vocab)?)),
                    None => Err(Error::data(
                        &data.train,
                        format!(
                            "no synthetic corpus named \"{other}\"; the built-in ones are synthetic:addition, \
                             synthetic:random and synthetic:random:N"
                        ),
                    )),
                },
            };
        }
        if Path::new(&data.train).is_dir() {
            return open_shards(Path::new(&data.train), time, with_train);
        }
        if data.train.ends_with(".bin") {
            return open_llmc_shards(&data.train, data.val.as_deref(), time, with_train);
        }
        let train_text = read_text(Path::new(&data.train))?;
        let (train_text, val_text) = match &data.val {
            Some(val) => (train_text, read_text(Path::new(val))?),
            None => {
                // Hold out the last 10%, cut at a character boundary.
                let mut cut = train_text.len() * 9 / 10;
                while !train_text.is_char_boundary(cut) {
                    cut -= 1;
                }
                let val = train_text[cut..].to_string();
                (train_text[..cut].to_string(), val)
            }
        };
        let tokenizer = CharTokenizer::from_text(&format!("{train_text}{val_text}"));
        let train = tokenizer.encode(&train_text)?;
        let val = tokenizer.encode(&val_text)?;
        let val_name = data.val.clone().unwrap_or_else(|| format!("{} (last 10%)", data.train));
        for (tokens, name) in [(&train, &data.train), (&val, &val_name)] {
            if tokens.len() <= time {
                return Err(Error::data(
                    name,
                    format!(
                        "{} characters, too few for one sequence of block_size {time} (+1 for the target)",
                        tokens.len()
                    ),
                ));
            }
        }
        Ok(Dataset { tokenizer, source: Source::Text { train, val } })
    }

    /// Uniform random ids below `vocab`.
    fn random(vocab: usize) -> Dataset {
        Dataset { tokenizer: CharTokenizer::from_chars(Vec::new()), source: Source::Random { vocab } }
    }

    pub fn vocab_size(&self) -> usize {
        match self.source {
            Source::Random { vocab } | Source::Shards { vocab, .. } => vocab,
            _ => self.tokenizer.vocab_size(),
        }
    }

    /// Training sequence `row` of optimizer step `step`: `inputs` and `targets` of equal length, targets shifted
    /// by one; positions that should not be learned carry
    /// [`kiln_core::backend::IGNORE_TARGET`]. Fails on a shard token outside the vocabulary (see
    /// [`shards::Shard::window`]).
    pub fn train_sequence(
        &self,
        seed: u64,
        step: u64,
        row: u64,
        inputs: &mut [u32],
        targets: &mut [u32],
    ) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(sequence_seed(seed, TRAIN_STREAM, step, row));
        self.sequence(&mut rng, false, inputs, targets)
    }

    /// A sequence of the training split, or with `held_out` of the validation split, drawn with `rng`.
    fn sequence(&self, rng: &mut ChaCha8Rng, held_out: bool, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        match &self.source {
            Source::Text { train, val } => random_window(if held_out { val } else { train }, rng, inputs, targets),
            Source::Addition(task) => task.sequence(rng, held_out, inputs, targets),
            Source::Random { vocab } => random(*vocab, rng, inputs, targets),
            Source::Shards { train, val, vocab, .. } => {
                return shard_window(if held_out { val } else { train }, *vocab, rng, inputs, targets);
            }
        }
        Ok(())
    }

    /// The whole validation split cut into consecutive windows of `time` inputs (each with its `time` targets,
    /// the next tokens), as `kiln eval` scores it: windows do not overlap and do not cross shard boundaries.
    /// Returns their number; `None` for corpora without a fixed split (synthetic ones).
    pub fn val_windows(&self, time: usize) -> Option<usize> {
        match &self.source {
            Source::Text { val, .. } => Some((val.len() - 1) / time),
            Source::Shards { val, .. } => Some(val.iter().map(|s| (s.len() - 1) / time).sum()),
            Source::Addition(_) | Source::Random { .. } => None,
        }
    }

    /// Window `index` of [`Dataset::val_windows`]. Fails on a shard token outside the vocabulary (see
    /// [`shards::Shard::window`]).
    pub fn val_window(&self, index: usize, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        let t = inputs.len();
        match &self.source {
            Source::Text { val, .. } => {
                window(val, index * t, inputs, targets);
                Ok(())
            }
            Source::Shards { val, vocab, .. } => {
                let mut index = index;
                for shard in val {
                    let here = (shard.len() - 1) / t;
                    if index < here {
                        return shard.window(index * t, *vocab, inputs, targets);
                    }
                    index -= here;
                }
                panic!("validation window {index} past the end of the split");
            }
            Source::Addition(_) | Source::Random { .. } => panic!("no fixed validation split"),
        }
    }

    /// Validation sequence `index`: the same for every evaluation of a run, so losses are comparable. Fails as
    /// [`Dataset::train_sequence`] does.
    pub fn val_sequence(&self, seed: u64, index: u64, inputs: &mut [u32], targets: &mut [u32]) -> Result<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(sequence_seed(seed, VAL_STREAM, 0, index));
        self.sequence(&mut rng, true, inputs, targets)
    }

    /// How to turn text into this corpus's token ids and back; `None` for random ids, which are no text.
    pub fn codec(&self) -> Option<codec::Codec> {
        match &self.source {
            Source::Text { .. } | Source::Addition(_) => {
                Some(codec::Codec::Char { chars: self.tokenizer.clone(), end_of_text: None })
            }
            Source::Shards { tokenizer, vocab, hf, .. } => match tokenizer.as_str() {
                "gpt2" => Some(codec::Codec::Gpt2),
                "hf" => hf.clone().map(codec::Codec::Hf),
                "byte" => Some(codec::Codec::Byte),
                "char" => {
                    Some(codec::Codec::Char { chars: self.tokenizer.clone(), end_of_text: Some(*vocab as u32 - 1) })
                }
                _ => None,
            },
            Source::Random { .. } => None,
        }
    }

    /// The synthetic task, when the corpus is one: it can also be scored by exact match.
    pub fn addition(&self) -> Option<&Addition> {
        match &self.source {
            Source::Addition(task) => Some(task),
            Source::Text { .. } | Source::Random { .. } | Source::Shards { .. } => None,
        }
    }
}

/// `inputs.len() + 1` uniform random ids, as a sequence and its shift.
fn random(vocab: usize, rng: &mut ChaCha8Rng, inputs: &mut [u32], targets: &mut [u32]) {
    let mut prev = rng.random_range(0..vocab as u32);
    for (x, y) in inputs.iter_mut().zip(targets.iter_mut()) {
        *x = prev;
        prev = rng.random_range(0..vocab as u32);
        *y = prev;
    }
}

/// A dataset directory: `meta.json` names the shards and the vocabulary. Every shard's header and size are checked
/// when the run starts; its tokens, as batches read them ([`shards::Shard::window`]).
fn open_shards(dir: &Path, time: usize, with_train: bool) -> Result<Dataset> {
    let meta_path = dir.join("meta.json");
    let text = std::fs::read_to_string(&meta_path).map_err(|e| {
        Error::data(&meta_path, format!("cannot read ({e}); is {} a directory written by kiln prepare?", dir.display()))
    })?;
    let meta: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::data(&meta_path, format!("not valid JSON: {e}")))?;
    let vocab = meta["vocab_size"].as_u64().ok_or_else(|| Error::data(&meta_path, "no vocab_size"))? as usize;
    let paths = |split: &str| -> Result<Vec<PathBuf>> {
        let names =
            meta[split].as_array().ok_or_else(|| Error::data(&meta_path, format!("no \"{split}\" shard list")))?;
        names
            .iter()
            .map(|n| {
                n.as_str()
                    .map(|n| dir.join(n))
                    .ok_or_else(|| Error::data(&meta_path, format!("a {split} shard name is not a string")))
            })
            .collect()
    };
    let (train_paths, train_split) = if with_train { (paths("train")?, Split::Train) } else { (vec![], Split::Unused) };
    let train = open_split(&train_paths, time, &meta_path, train_split)?;
    let val = open_split(&paths("val")?, time, &meta_path, Split::Validation)?;
    let tokenizer = meta["tokenizer"].as_str().unwrap_or_default().to_string();
    // A character vocabulary travels in meta.json; other tokenizers need no table here.
    let chars = CharTokenizer::from_chars(meta["chars"].as_str().unwrap_or_default().chars().collect());
    // A Hugging Face tokenizer travels as the tokenizer.json that kiln prepare copied beside the shards.
    let hf = match (tokenizer.as_str(), meta["end_of_text_token"].as_str()) {
        ("hf", Some(token)) => {
            let path = dir.join(codec::HF_TOKENIZER_FILE);
            Some(std::sync::Arc::new(hf::HfTokenizer::load(&path, hf::EndOfText::Token(token))?))
        }
        ("hf", None) => {
            return Err(Error::data(&meta_path, "a Hugging Face tokenizer's dataset names no end_of_text_token"));
        }
        _ => None,
    };
    // The vocabulary must be the tokenizer's, or a model would be sized for one and decode with the other.
    let tokenizer_vocab = match (tokenizer.as_str(), &hf) {
        ("gpt2", _) => prepare::Tokenization::Gpt2.vocab_size(),
        ("byte", _) => prepare::Tokenization::Byte.vocab_size(),
        // The characters and an end-of-text token.
        ("char", _) => chars.vocab_size() + 1,
        (_, Some(hf)) => hf.vocab_size(),
        (other, _) => {
            let message = format!("tokenizer \"{other}\": kiln prepare writes \"gpt2\", \"byte\", \"char\" or \"hf\"");
            return Err(Error::data(&meta_path, message));
        }
    };
    if tokenizer_vocab != vocab {
        let message = format!("vocab_size is {vocab}, but its {tokenizer} tokenizer has {tokenizer_vocab} tokens");
        return Err(Error::data(&meta_path, message));
    }
    Ok(Dataset { tokenizer: chars, source: Source::Shards { train, val, vocab, tokenizer, hf } })
}

/// Shards named directly, as llm.c's scripts write them (`tiny_shakespeare_train.bin`, or a pattern with one
/// `*` such as `fineweb_train_*.bin`): GPT-2 tokens, validation from `data.val`.
fn open_llmc_shards(train: &str, val: Option<&str>, time: usize, with_train: bool) -> Result<Dataset> {
    let val = val.ok_or_else(|| {
        Error::Usage(format!("data.train = \"{train}\" names llm.c shards: name the validation shards in data.val"))
    })?;
    let vocab = prepare::Tokenization::Gpt2.vocab_size();
    let (train_paths, train_split) =
        if with_train { (expand_pattern(train)?, Split::Train) } else { (vec![], Split::Unused) };
    let val_paths = expand_pattern(val)?;
    let (train, val) = (
        open_split(&train_paths, time, Path::new(train), train_split)?,
        open_split(&val_paths, time, Path::new(val), Split::Validation)?,
    );
    Ok(Dataset {
        tokenizer: CharTokenizer::from_chars(Vec::new()),
        source: Source::Shards { train, val, vocab, tokenizer: "gpt2".into(), hf: None },
    })
}

/// The files a path names: itself, or with one `*` in its file name, every match in its directory, sorted.
fn expand_pattern(pattern: &str) -> Result<Vec<PathBuf>> {
    let path = Path::new(pattern);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let Some((prefix, suffix)) = name.split_once('*') else { return Ok(vec![path.to_path_buf()]) };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::data(dir, format!("cannot list: {e}")))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Error::data(path, "no file matches"));
    }
    Ok(found)
}

/// Opens the shards of one split, checking each one's header and size; those too short for one sequence are left
/// out. Keeping none is an error unless the split is `unused` (the training split of
/// [`Dataset::open_validation`]).
fn open_split(paths: &[PathBuf], time: usize, what: &Path, split: Split) -> Result<Vec<shards::Shard>> {
    if split == Split::Unused {
        return Ok(Vec::new());
    }
    let mut opened = Vec::new();
    for path in paths {
        let shard = shards::Shard::open(path)?;
        if shard.len() > time {
            opened.push(shard);
        }
    }
    match (opened.is_empty(), paths.is_empty()) {
        (false, _) => Ok(opened),
        (true, true) if split == Split::Validation => Err(Error::data(
            what,
            "names no validation shards: prepare the corpus again, holding some out with --val-fraction",
        )),
        (true, true) => Err(Error::data(what, "names no training shards")),
        (true, false) => Err(Error::data(what, format!("no shard holds more than block_size = {time} tokens"))),
    }
}

/// Which split [`open_split`] opens.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Split {
    Train,
    Validation,
    /// The training split of a corpus opened for evaluation.
    Unused,
}

/// A random window of `inputs.len() + 1` consecutive tokens from one of `shards`, each window equally likely, every
/// token checked to be below `vocab`.
fn shard_window(
    shards: &[shards::Shard],
    vocab: usize,
    rng: &mut ChaCha8Rng,
    inputs: &mut [u32],
    targets: &mut [u32],
) -> Result<()> {
    let t = inputs.len();
    let windows: usize = shards.iter().map(|s| s.len() - t).sum();
    let mut pick = rng.random_range(0..windows);
    let shard = shards
        .iter()
        .find(|s| {
            let here = s.len() - t;
            if pick < here {
                true
            } else {
                pick -= here;
                false
            }
        })
        .expect("pick < total windows");
    shard.window(pick, vocab, inputs, targets)
}

/// A random window of `inputs.len() + 1` consecutive tokens.
fn random_window(tokens: &[u32], rng: &mut ChaCha8Rng, inputs: &mut [u32], targets: &mut [u32]) {
    window(tokens, rng.random_range(0..tokens.len() - inputs.len()), inputs, targets);
}

/// Why `path` cannot be read; for a missing file, where a relative path was looked for, and for one of
/// [`PUBLIC_CORPORA`], the command that downloads it.
fn cannot_read(path: &Path, error: &std::io::Error) -> String {
    let mut message = format!("cannot read: {error}");
    if error.kind() != std::io::ErrorKind::NotFound {
        return message;
    }
    if let (true, Ok(cwd)) = (path.is_relative(), std::env::current_dir()) {
        message += &format!(" (a relative path is read from the current directory, {})", cwd.display());
    }
    let name = path.file_name().and_then(|n| n.to_str());
    if let Some((_, url)) = PUBLIC_CORPORA.iter().find(|(corpus, _)| Some(*corpus) == name) {
        message += &format!("; download it with: curl --create-dirs -o {} {url}", path.display());
    }
    message
}

/// Tokens `start..start + inputs.len()` into `inputs`, and the token after each into `targets`.
fn window(tokens: &[u32], start: usize, inputs: &mut [u32], targets: &mut [u32]) {
    let t = inputs.len();
    inputs.copy_from_slice(&tokens[start..start + t]);
    targets.copy_from_slice(&tokens[start + 1..start + t + 1]);
}

/// Public corpora that kiln's own configurations train on, by file name, with where to download each: a missing copy
/// is then an error that says how to get it.
const PUBLIC_CORPORA: &[(&str, &str)] = &[(
    "tinyshakespeare.txt",
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
)];

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::data(path, cannot_read(path, &e)))?;
    if bytes.is_empty() {
        return Err(Error::data(path, "the file is empty"));
    }
    String::from_utf8(bytes).map_err(|e| {
        Error::data(
            path,
            format!("not UTF-8 text: invalid byte sequence at byte offset {}", e.utf8_error().valid_up_to()),
        )
    })
}
