//! Hugging Face tokenizers: any `tokenizer.json`, read with the `tokenizers` crate, which is the library inside
//! the Python `tokenizers` package. A document's ids are the ones Python's
//! `Tokenizer.encode(document, add_special_tokens=False)` gives with the same version of the library: the
//! post-processor's special tokens are left out (`kiln prepare` adds its own end-of-text token), and so are the
//! truncation and padding a `tokenizer.json` may carry for a model's inputs, which a corpus must not get.
//!
//! `kiln prepare` cuts a long document into blocks only when the tokenizer gives the blocks the ids of the whole
//! ([`HfTokenizer::tokenises_in_blocks`]); otherwise it encodes each document whole, still in parallel across
//! documents, which holds each text file in memory at once, with the library's working state of about 150 bytes
//! per byte of text.

use kiln_core::{Error, Result};
use std::path::{Path, PathBuf};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::split::SplitPattern;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

/// The names an end-of-text token goes by, in the order they are looked for among a tokenizer's special tokens
/// (a `tokenizer.json` does not say which token ends a document; `tokenizer_config.json` does, elsewhere).
pub const END_OF_TEXT_NAMES: [&str; 5] = ["<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>"];

/// The regexes of `Split` pre-tokenizers known to split at every `prepare::safe_cut` point: Llama 3's and Qwen2's,
/// as their `tokenizer.json` files write them. Both match whitespace only in runs of it, as the optional first
/// character of a piece, or as the newlines that end a run of punctuation, and look ahead only after whitespace.
const CUT_SAFE_SPLIT_PATTERNS: [&str; 2] = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];

/// Which token of a tokenizer ends a document.
#[derive(Clone, Copy, Debug)]
pub enum EndOfText<'a> {
    /// The first of [`END_OF_TEXT_NAMES`] that is one of its special tokens.
    Find,
    /// This token (`--eos-token`).
    Token(&'a str),
    /// The token of this id (a transformers `config.json`'s `eos_token_id`).
    Id(u32),
}

/// The names a beginning-of-text token goes by, in the order they are looked for among a tokenizer's special tokens.
const BEGIN_OF_TEXT_NAMES: [&str; 4] = ["<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"];

/// A `tokenizer.json`, with the end-of-text token that separates documents.
pub struct HfTokenizer {
    path: PathBuf,
    /// The file as read: `kiln prepare` copies it into the dataset, so the dataset names exactly the tokenizer
    /// that made it.
    json: Vec<u8>,
    tokenizer: Tokenizer,
    end_of_text: u32,
    end_of_text_token: String,
    vocab_size: usize,
    in_blocks: bool,
}

impl HfTokenizer {
    /// Reads the `tokenizer.json` at `path`, with the end-of-text token `end_of_text` names.
    pub fn load(path: &Path, end_of_text: EndOfText) -> Result<HfTokenizer> {
        let json = std::fs::read(path).map_err(|e| Error::data(path, format!("cannot read: {e}")))?;
        let mut tokenizer =
            Tokenizer::from_bytes(&json).map_err(|e| Error::data(path, format!("not a valid tokenizer.json: {e}")))?;
        // Truncation and padding are for a model's inputs: a corpus keeps every token, and no more.
        tokenizer.with_truncation(None).expect("turning truncation off checks nothing");
        tokenizer.with_padding(None);
        let (end_of_text_token, end_of_text) = match end_of_text {
            EndOfText::Token(token) => {
                let id = tokenizer.token_to_id(token).ok_or_else(|| {
                    Error::Usage(format!("--eos-token {token:?}: {} has no such token", path.display()))
                })?;
                (token.to_string(), id)
            }
            EndOfText::Id(id) => {
                let token = tokenizer
                    .id_to_token(id)
                    .ok_or_else(|| Error::data(path, format!("no token of id {id}, the model's end of text")))?;
                (token, id)
            }
            EndOfText::Find => {
                let special = tokenizer.get_added_tokens_decoder();
                END_OF_TEXT_NAMES
                    .iter()
                    .find_map(|name| {
                        special
                            .iter()
                            .find(|(_, t)| t.special && t.content == *name)
                            .map(|(&id, _)| (name.to_string(), id))
                    })
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "{}: none of its special tokens is an end-of-text token ({}); name one with --eos-token",
                            path.display(),
                            END_OF_TEXT_NAMES.join(", ")
                        ))
                    })?
            }
        };
        // Ids are normally 0..get_vocab_size(true), but a tokenizer.json may leave gaps, and the vocabulary of the
        // shards (and of the model) must hold the largest id.
        let past_largest = tokenizer.get_vocab(true).into_values().max().map_or(0, |id| id as usize + 1);
        let vocab_size = tokenizer.get_vocab_size(true).max(past_largest);
        let in_blocks = cuts_are_exact(&tokenizer);
        Ok(HfTokenizer {
            path: path.to_path_buf(),
            json,
            tokenizer,
            end_of_text,
            end_of_text_token,
            vocab_size,
            in_blocks,
        })
    }

    /// The file as it was read.
    pub fn json(&self) -> &[u8] {
        &self.json
    }

    /// Every id, added tokens included, is below this.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn end_of_text(&self) -> u32 {
        self.end_of_text
    }

    pub fn end_of_text_token(&self) -> &str {
        &self.end_of_text_token
    }

    /// Whether a document may be encoded in blocks cut at `prepare::safe_cut` points: true only when every step
    /// of this tokenizer is one [`cuts_are_exact`] knows gives a cut text the ids of the whole.
    pub fn tokenises_in_blocks(&self) -> bool {
        self.in_blocks
    }

    /// The first of [`BEGIN_OF_TEXT_NAMES`] that is one of this tokenizer's special tokens, if any.
    pub fn begin_of_text(&self) -> Option<u32> {
        let special = self.tokenizer.get_added_tokens_decoder();
        BEGIN_OF_TEXT_NAMES
            .iter()
            .find_map(|name| special.iter().find(|(_, t)| t.special && t.content == *name).map(|(&id, _)| id))
    }

    /// The ids of a prompt as transformers' tokenizer gives them to a model: with the post-processor's special tokens
    /// (Llama 3's `<|begin_of_text|>`, say), which a corpus's documents are encoded without.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, true)
            .map_err(|e| Error::Usage(format!("cannot tokenise the prompt with {}: {e}", self.path.display())))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included (as Python's `decode(ids, skip_special_tokens=False)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Invalid(format!("cannot decode with {}: {e}", self.path.display())))
    }

    /// The ids of `text` without the post-processor's special tokens. Special tokens written in the text are
    /// recognised, as Python's `encode` does. `file` names the input in an error.
    pub fn encode(&self, text: &str, file: &Path) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| Error::data(file, format!("cannot tokenise with {}: {e}", self.path.display())))?;
        Ok(encoding.get_ids().to_vec())
    }
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size)
            .field("end_of_text", &self.end_of_text)
            .field("end_of_text_token", &self.end_of_text_token)
            .field("in_blocks", &self.in_blocks)
            .finish()
    }
}

/// Whether `tokenizer` gives a text cut at a `prepare::safe_cut` point the ids of the whole. The model encodes
/// each piece of the pre-tokenizer's split by itself, and the post-processor is not used, so the steps before the
/// model decide. Anything not known to be safe is refused, which costs memory, never exactness: for example
/// normalizers and pre-tokenizers that add to the start of the text (`Prepend`, Metaspace's `prepend_scheme`,
/// ByteLevel's `add_prefix_space`), strip it (`Strip`), rewrite it by pattern (`Replace`, SentencePiece's
/// `Precompiled`), or no pre-tokenizer at all (then the model sees the whole text as one piece).
fn cuts_are_exact(tokenizer: &Tokenizer) -> bool {
    // Added tokens are found in the raw text first. One without whitespace cannot span a cut, which always has
    // whitespace on one side; one that absorbs the whitespace beside it (lstrip, rstrip) could take it across.
    let added_tokens_keep_cuts = tokenizer
        .get_added_tokens_decoder()
        .values()
        .all(|t| !t.lstrip && !t.rstrip && !t.content.contains(char::is_whitespace));
    added_tokens_keep_cuts
        && tokenizer.get_normalizer().is_none_or(normalizer_keeps_cuts)
        && tokenizer.get_pre_tokenizer().is_some_and(pre_tokenizer_splits_at_cuts)
}

/// Normalizers after which a cut still has the whitespace and non-whitespace characters it had. Lowercasing works
/// on one character at a time. Canonical normalization (NFC, NFD) never works across a newline or a space (both
/// are stable code points: they neither reorder nor compose with their neighbours), and never turns a
/// non-whitespace character into whitespace. NFKC and NFKD can: U+00A8 (diaeresis) becomes a space and U+0308.
fn normalizer_keeps_cuts(normalizer: &NormalizerWrapper) -> bool {
    match normalizer {
        NormalizerWrapper::NFC(_) | NormalizerWrapper::NFD(_) | NormalizerWrapper::Lowercase(_) => true,
        NormalizerWrapper::Sequence(sequence) => sequence.as_ref().iter().all(normalizer_keeps_cuts),
        _ => false,
    }
}

/// Pre-tokenizers that split at every `prepare::safe_cut` point and treat the text on either side as if it
/// stood alone: GPT-2's byte-level regex without a space added in front of the text, or a split by one of
/// [`CUT_SAFE_SPLIT_PATTERNS`] followed by the byte-level step, which then works on each piece by itself.
fn pre_tokenizer_splits_at_cuts(pre_tokenizer: &PreTokenizerWrapper) -> bool {
    match pre_tokenizer {
        PreTokenizerWrapper::ByteLevel(byte_level) => byte_level.use_regex && !byte_level.add_prefix_space,
        PreTokenizerWrapper::Sequence(sequence) => match sequence.as_ref() {
            [PreTokenizerWrapper::Split(split), PreTokenizerWrapper::ByteLevel(_)] => {
                matches!(&split.pattern, SplitPattern::Regex(p) if CUT_SAFE_SPLIT_PATTERNS.contains(&p.as_str()))
                    && split.behavior == SplitDelimiterBehavior::Isolated
                    && !split.invert
            }
            _ => false,
        },
        _ => false,
    }
}
