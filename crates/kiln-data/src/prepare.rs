//! `kiln prepare`: text in, token shards out.
//!
//! Inputs are text files, directories of them (recursively, in name order) and JSON Lines files (`.jsonl`) whose
//! objects carry the text in a field. Every document is preceded by an end-of-text token. The text is read in
//! blocks of about a megabyte, cut only where the tokenizer's pre-tokenizer splits the text the same way whether
//! or not it goes on (`safe_cut`), so blocks tokenise exactly as the whole would, and a batch of blocks is
//! tokenised in parallel while the next is read: memory stays bounded however large the input. (A Hugging Face
//! tokenizer not known to split alike at those cuts gets each document whole instead; see [`crate::hf`].) The
//! last `val_fraction` of the input bytes becomes the validation split; the document that straddles that point
//! is tokenised as two texts, one in each split. Shards are written as they fill; `meta.json`, written last, is
//! what makes the directory a dataset, so an interrupted run leaves nothing that looks complete. A Hugging Face
//! tokenizer's `tokenizer.json` is copied next to it. Every file is on disk before the next is published
//! ([`durable`]), so not even a power loss leaves a `meta.json` naming a shard that is not.

use crate::codec::HF_TOKENIZER_FILE;
use crate::hf::HfTokenizer;
use crate::{CharTokenizer, shards};
use kiln_core::{Error, Result, durable};
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The tokenizers `kiln prepare` can use.
#[derive(Clone, Debug)]
pub enum Tokenization {
    /// GPT-2's byte-level BPE (tiktoken's r50k_base, embedded): 50,257 tokens, end-of-text 50256.
    Gpt2,
    /// Raw UTF-8 bytes: ids 0–255, end-of-text 256.
    Byte,
    /// One token per character of the input's character set (found by a first pass), end-of-text after them.
    Char(Option<CharTokenizer>),
    /// A Hugging Face `tokenizer.json`, copied into the dataset; end-of-text is one of its special tokens.
    Hf(Arc<HfTokenizer>),
}

impl Tokenization {
    pub fn name(&self) -> &'static str {
        match self {
            Tokenization::Gpt2 => "gpt2",
            Tokenization::Byte => "byte",
            Tokenization::Char(_) => "char",
            Tokenization::Hf(_) => "hf",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenization::Gpt2 => 50257,
            Tokenization::Byte => 257,
            Tokenization::Char(chars) => chars.as_ref().map_or(0, CharTokenizer::vocab_size) + 1,
            Tokenization::Hf(hf) => hf.vocab_size(),
        }
    }

    pub fn end_of_text(&self) -> u32 {
        match self {
            Tokenization::Hf(hf) => hf.end_of_text(),
            Tokenization::Gpt2 | Tokenization::Byte | Tokenization::Char(_) => self.vocab_size() as u32 - 1,
        }
    }

    /// Whether a document may be encoded in blocks cut at [`safe_cut`] points rather than whole.
    fn tokenises_in_blocks(&self) -> bool {
        match self {
            Tokenization::Hf(hf) => hf.tokenises_in_blocks(),
            Tokenization::Gpt2 | Tokenization::Byte | Tokenization::Char(_) => true,
        }
    }

    /// The ids of `text`, a piece of `file`.
    fn encode(&self, text: &str, file: &Path) -> Result<Vec<u32>> {
        Ok(match self {
            Tokenization::Gpt2 => GPT2.with(|bpe| bpe.encode_ordinary(text)),
            Tokenization::Byte => text.bytes().map(u32::from).collect(),
            Tokenization::Char(chars) => {
                let chars = chars.as_ref().expect("the character set is found before encoding");
                text.chars().map(|c| chars.id(c).expect("every character was collected")).collect()
            }
            Tokenization::Hf(hf) if hf.tokenises_in_blocks() => {
                let mut ids = Vec::new();
                for piece in pieces(text, HF_PIECE_BYTES) {
                    ids.extend(hf.encode(piece, file)?);
                }
                ids
            }
            Tokenization::Hf(hf) => hf.encode(text, file)?,
        })
    }
}

/// Bytes of text a Hugging Face tokenizer encodes at a time where the text may be cut. The library keeps about
/// 150 bytes of working state (alignment tables, token strings) per byte it encodes at once: 150 MiB per thread
/// for a whole block.
const HF_PIECE_BYTES: usize = 64 << 10;

/// `text` cut at [`safe_cut`] points into pieces of at most `max` bytes, or longer where no safe point comes
/// sooner.
fn pieces(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = max.min(rest.len());
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let cut = if end == rest.len() { end } else { safe_cut(&rest[..end]).unwrap_or(rest.len()) };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
}

thread_local! {
    /// One encoder per thread: threads sharing one contend for its regex scratch space (a third of the time).
    static GPT2: tiktoken_rs::CoreBPE = tiktoken_rs::r50k_base().expect("the embedded GPT-2 ranks parse");
}

pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub tokenizer: Tokenization,
    pub out: PathBuf,
    pub val_fraction: f64,
    pub shard_tokens: usize,
    /// The field of a JSON Lines object that holds the text.
    pub text_field: String,
    /// Replace invalid UTF-8 (and count it) instead of failing.
    pub lossy: bool,
    /// Bytes read from a text file at a time: [`BLOCK_BYTES`], except in tests that need a small text to span
    /// many blocks.
    pub block_bytes: usize,
}

#[derive(Debug, Default)]
pub struct PrepareSummary {
    pub bytes: u64,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub shards: Vec<PathBuf>,
    /// Invalid UTF-8 sequences replaced (with `lossy`).
    pub replaced: u64,
}

/// Bytes per block read from a text file: large enough that the blocks of a batch keep every thread busy for
/// much longer than it takes to read them.
pub const BLOCK_BYTES: usize = 1 << 20;
/// Blocks tokenised in parallel at a time.
const BATCH: usize = 16;

/// A piece of text to tokenise: which input file it comes from, whether its document starts with it, and where
/// in the whole input it lies.
struct Chunk {
    text: String,
    file: usize,
    starts_document: bool,
    offset: u64,
}

fn expand(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|e| Error::data(input, format!("cannot read: {e}")))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
                .map_err(|e| Error::data(input, format!("cannot list: {e}")))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            files.extend(expand(&entries)?);
        } else {
            files.push(input.clone());
        }
    }
    Ok(files)
}

fn is_json_lines(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("jsonl") | Some("json"))
}

/// Where a block of text may be cut so that its two parts tokenise exactly as the whole does: the last position
/// that is just after a newline with a non-whitespace character on each side, or just before a space that has a
/// non-whitespace character before it and an ASCII letter after it.
///
/// GPT-2's pre-tokenizer splits text with `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
/// and encodes each piece alone (the Llama 3 and Qwen2 patterns `hf` accepts work alike). Whitespace is matched
/// only in runs of whitespace, as the optional first character of a piece, or (Llama 3, Qwen2) as the newlines
/// that end a run of punctuation; nothing looks behind, or ahead by more than the one character after a run of
/// whitespace. So no piece spans either kind of cut, and the pieces on each side do not depend on the other side.
/// Other newlines are not safe: at the end of a block "\n\n", " \n" and "\r\n" are one piece each, while
/// before a word they are two ("\n" "\n"), because `\s+(?!\S)` leaves the last whitespace character to the word.
fn safe_cut(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let visible = |c: Option<char>| c.is_some_and(|c| !c.is_whitespace());
    (1..bytes.len()).rev().find(|&i| {
        let after_line =
            bytes[i - 1] == b'\n' && visible(text[..i - 1].chars().next_back()) && visible(text[i..].chars().next());
        let before_word = bytes[i] == b' '
            && bytes.get(i + 1).is_some_and(u8::is_ascii_alphabetic)
            && visible(text[..i].chars().next_back());
        after_line || before_word
    })
}

/// Decodes `bytes` (which start `offset` bytes into `path`): fails on invalid UTF-8, or with `lossy` replaces each
/// invalid sequence with U+FFFD and counts it. Returns the text and the bytes used: a sequence cut by the end of
/// a block (not the `last`) is left for the next one.
fn decode(
    bytes: &[u8],
    path: &Path,
    offset: u64,
    lossy: bool,
    replaced: &mut u64,
    last: bool,
) -> Result<(String, usize)> {
    let mut text = String::with_capacity(bytes.len());
    let mut used = 0;
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        used += chunk.valid().len();
        let bad = chunk.invalid();
        if bad.is_empty() {
            continue;
        }
        let cut_by_block = !last && used + bad.len() == bytes.len() && bad.len() < 4;
        if cut_by_block {
            break;
        }
        if !lossy {
            return Err(Error::data(
                path,
                format!(
                    "not UTF-8 text: invalid byte sequence at byte offset {} (use --lossy to replace it)",
                    offset + used as u64
                ),
            ));
        }
        text.push('\u{FFFD}');
        *replaced += 1;
        used += bad.len();
    }
    Ok((text, used))
}

/// Collects shard tokens and writes a shard each time `shard_tokens` are full.
struct ShardWriter {
    split: &'static str,
    dir: PathBuf,
    vocab: usize,
    capacity: usize,
    tokens: Vec<u32>,
    written: Vec<PathBuf>,
    total: u64,
}

impl ShardWriter {
    fn push(&mut self, tokens: &[u32]) -> Result<()> {
        for piece in tokens.chunks(self.capacity) {
            let room = self.capacity - self.tokens.len();
            let (now, later) = piece.split_at(piece.len().min(room));
            self.tokens.extend_from_slice(now);
            if self.tokens.len() == self.capacity {
                self.flush()?;
            }
            self.tokens.extend_from_slice(later);
        }
        self.total += tokens.len() as u64;
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let path = self.dir.join(format!("{}_{:06}.bin", self.split, self.written.len()));
        shards::write(&path, &self.tokens, self.vocab)?;
        self.written.push(path);
        self.tokens.clear();
        Ok(())
    }
}

/// Tokenises the inputs into shards in `options.out`. `progress(bytes, tokens)` is called after each batch.
pub fn prepare(options: &PrepareOptions, mut progress: impl FnMut(u64, u64)) -> Result<PrepareSummary> {
    if options.inputs.is_empty() {
        return Err(Error::Usage("no input: name files or directories with --input".into()));
    }
    if !(0.0..1.0).contains(&options.val_fraction) {
        return Err(Error::Usage(format!("--val-fraction {} must be at least 0 and below 1", options.val_fraction)));
    }
    if options.shard_tokens == 0 {
        return Err(Error::Usage("--shard-tokens must be at least 1".into()));
    }
    if options.block_bytes == 0 {
        return Err(Error::Usage("the block size must be at least 1 byte".into()));
    }
    let files = expand(&options.inputs)?;
    let sizes: Vec<u64> = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).collect();
    let total: u64 = sizes.iter().sum();
    if total == 0 {
        return Err(Error::data(&options.inputs[0], "the input is empty"));
    }
    let val_cut = ((1.0 - options.val_fraction) * total as f64) as u64;
    let out = &options.out;
    durable::create_dir(out, "--out")?;
    let meta_path = out.join("meta.json");
    let _ = std::fs::remove_file(&meta_path);
    // A character vocabulary is the input's character set: one pass to find it before the pass that encodes.
    let tok = match &options.tokenizer {
        Tokenization::Char(_) => {
            let mut set = std::collections::BTreeSet::new();
            read_chunks(&files, &sizes, options, val_cut, &mut 0, &mut |chunk, _| {
                set.extend(chunk.text.chars());
                Ok(())
            })?;
            Tokenization::Char(Some(CharTokenizer::from_chars(set.into_iter().collect())))
        }
        other => other.clone(),
    };
    let tok = &tok;
    let writer = |split| ShardWriter {
        split,
        dir: out.clone(),
        vocab: tok.vocab_size(),
        capacity: options.shard_tokens,
        tokens: Vec::new(),
        written: Vec::new(),
        total: 0,
    };
    let (mut train, mut val) = (writer("train"), writer("val"));
    let mut summary = PrepareSummary { bytes: total, ..Default::default() };
    let mut batch: Vec<Chunk> = Vec::new();

    let (mut train_total, mut val_total) = (0u64, 0u64);
    let mut run_batch = |batch: &mut Vec<Chunk>, done_bytes: u64| -> Result<()> {
        let encoded: Vec<(Vec<u32>, bool)> = batch
            .par_iter()
            .map(|c| {
                let mut ids = Vec::with_capacity(c.text.len() / 3 + 1);
                if c.starts_document {
                    ids.push(tok.end_of_text());
                }
                ids.extend(tok.encode(&c.text, &files[c.file])?);
                Ok((ids, c.offset >= val_cut))
            })
            .collect::<Result<_>>()?;
        for (ids, is_val) in encoded {
            if is_val {
                val.push(&ids)?
            } else {
                train.push(&ids)?
            };
        }
        batch.clear();
        (train_total, val_total) = (train.total, val.total);
        progress(done_bytes, train.total + val.total);
        Ok(())
    };
    let mut batch_bytes = 0usize;

    read_chunks(&files, &sizes, options, val_cut, &mut summary.replaced, &mut |chunk, done| {
        batch_bytes += chunk.text.len();
        batch.push(chunk);
        if batch_bytes >= BATCH * options.block_bytes || batch.len() >= 1024 {
            run_batch(&mut batch, done)?;
            batch_bytes = 0;
        }
        Ok(())
    })?;
    run_batch(&mut batch, total)?;
    (summary.train_tokens, summary.val_tokens) = (train_total, val_total);
    train.flush()?;
    val.flush()?;
    if train.written.is_empty() {
        return Err(Error::data(
            &options.inputs[0],
            "no training tokens: the input is too small for the validation fraction",
        ));
    }
    // JSON Lines documents are not split at the cut: one that starts before it is all training.
    if val.written.is_empty() && options.val_fraction > 0.0 {
        return Err(Error::Usage(format!(
            "no validation tokens: no document starts in the last {}% of the input; raise --val-fraction",
            options.val_fraction * 100.0
        )));
    }
    let names = |w: &ShardWriter| {
        w.written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>()
    };
    let mut meta = serde_json::json!({
        "format": "llm.c shards",
        "tokenizer": tok.name(),
        "vocab_size": tok.vocab_size(),
        "end_of_text": tok.end_of_text(),
        "train": names(&train),
        "val": names(&val),
        "train_tokens": train.total,
        "val_tokens": val.total,
    });
    if let Tokenization::Char(Some(chars)) = tok {
        meta["chars"] = serde_json::Value::String(chars.decode(&(0..chars.vocab_size() as u32).collect::<Vec<_>>()));
    }
    if let Tokenization::Hf(hf) = tok {
        meta["end_of_text_token"] = serde_json::Value::String(hf.end_of_text_token().to_string());
        let copy = out.join(HF_TOKENIZER_FILE);
        durable::write(&copy, hf.json())?;
    }
    durable::write(&meta_path, serde_json::to_string_pretty(&meta).expect("plain JSON").as_bytes())?;
    summary.shards = train.written.iter().chain(&val.written).cloned().collect();
    Ok(summary)
}

/// Reads every input file as chunks of text, in order, handing each to `emit` with the input bytes read so far:
/// a JSON Lines file gives one chunk per object, a text file one per block (cut at a safe point, and exactly at
/// `val_cut`).
fn read_chunks(
    files: &[PathBuf],
    sizes: &[u64],
    options: &PrepareOptions,
    val_cut: u64,
    replaced: &mut u64,
    emit: &mut dyn FnMut(Chunk, u64) -> Result<()>,
) -> Result<()> {
    let mut offset = 0u64;
    for (index, (file, size)) in files.iter().zip(sizes).enumerate() {
        let handle = std::fs::File::open(file).map_err(|e| Error::data(file, format!("cannot read: {e}")))?;
        if is_json_lines(file) {
            for (n, line) in BufReader::new(handle).split(b'\n').enumerate() {
                let line = line.map_err(|e| Error::data(file, format!("cannot read: {e}")))?;
                let line_offset = offset;
                offset += line.len() as u64 + 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let (text, _) = decode(&line, file, line_offset, options.lossy, replaced, true)?;
                let value: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::data(file, format!("line {}: not a JSON object: {e}", n + 1)))?;
                let text = value.get(&options.text_field).and_then(|v| v.as_str()).ok_or_else(|| {
                    Error::data(
                        file,
                        format!(
                            "line {}: no string field \"{}\" (choose one with --text-field)",
                            n + 1,
                            options.text_field
                        ),
                    )
                })?;
                emit(
                    Chunk { text: text.to_string(), file: index, starts_document: true, offset: line_offset },
                    offset,
                )?;
            }
        } else {
            let block_bytes = options.block_bytes;
            let mut reader = BufReader::with_capacity(block_bytes, handle);
            let mut pending: Vec<u8> = Vec::new();
            let mut carried = String::new();
            let mut file_offset = 0u64;
            // Input bytes of this file already handed out in chunks.
            let mut chunked = 0u64;
            let mut first = true;
            let mut block = vec![0u8; block_bytes];
            let mut read = 0u64;
            loop {
                // Reads stop at the validation cut, so that a chunk ends exactly there.
                let to_cut = val_cut.saturating_sub(offset + read);
                let want = if to_cut > 0 { block_bytes.min(to_cut as usize) } else { block_bytes };
                let n = reader.read(&mut block[..want]).map_err(|e| Error::data(file, format!("cannot read: {e}")))?;
                read += n as u64;
                let last = n == 0;
                let at_cut = to_cut > 0 && offset + read == val_cut;
                pending.extend_from_slice(&block[..n]);
                let (text, used) = decode(&pending, file, file_offset, options.lossy, replaced, last)?;
                pending.drain(..used);
                file_offset += used as u64;
                carried.push_str(&text);
                let cut = if last || at_cut {
                    Some(carried.len())
                } else if options.tokenizer.tokenises_in_blocks() {
                    safe_cut(&carried)
                } else {
                    None
                };
                if let Some(cut) = cut.filter(|&c| c > 0) {
                    let rest = carried.split_off(cut);
                    let text = std::mem::replace(&mut carried, rest);
                    let len = text.len() as u64;
                    let chunk = Chunk { text, file: index, starts_document: first, offset: offset + chunked };
                    emit(chunk, offset + file_offset)?;
                    // Chunk offsets count input bytes: never past what was read (replacement characters are longer
                    // than the bytes they replace), and the chunk after the cut starts at it even when a character
                    // straddling the cut was left pending for the next block.
                    chunked = if at_cut { read } else { (chunked + len).min(read) };
                    first = false;
                }
                if last {
                    break;
                }
            }
            if first {
                // An empty file is a document with no text.
                emit(Chunk { text: String::new(), file: index, starts_document: true, offset }, offset)?;
            }
            offset += size;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::EndOfText;

    #[test]
    fn pieces_of_a_block_tokenise_as_the_whole() {
        let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tokenizer");
        let text = std::fs::read_to_string(golden.join("long.txt")).unwrap();
        let hf = HfTokenizer::load(&golden.join("tokenizer.json"), EndOfText::Find).unwrap();
        let cut: Vec<&str> = pieces(&text, 256).collect();
        assert_eq!(cut.concat(), text);
        assert!(cut.len() > 90 && cut.iter().all(|p| p.len() <= 256), "{} pieces", cut.len());
        let file = Path::new("long.txt");
        let by_piece: Vec<u32> = cut.iter().flat_map(|p| hf.encode(p, file).unwrap()).collect();
        assert!(by_piece == hf.encode(&text, file).unwrap());
    }
}
