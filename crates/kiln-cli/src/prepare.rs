//! `kiln prepare`: tokenise text into shards (llm.c's .bin format) that `data.train = "DIR"` trains on.

use crate::log;
use kiln_core::{Error, Result};
use kiln_data::hf::{EndOfText, HfTokenizer};
use kiln_data::prepare::{PrepareOptions, Tokenization};
use std::path::PathBuf;
use std::sync::Arc;

/// The arguments of `kiln prepare`.
#[derive(clap::Args)]
pub struct Args {
    /// Text files, directories of them, or JSON Lines files (repeatable).
    #[arg(long = "input", required = true)]
    inputs: Vec<PathBuf>,
    /// gpt2 (GPT-2's BPE, embedded), byte (raw UTF-8 bytes), char (one token per character of the input), or
    /// the path of a Hugging Face tokenizer.json (a value with a path separator or ending in .json).
    #[arg(long, value_name = "gpt2|byte|char|PATH", default_value = "gpt2", value_parser = parse_tokenizer)]
    tokenizer: TokenizerChoice,
    /// With a tokenizer.json: the token put before each document (default: the first of <|endoftext|>,
    /// <|end_of_text|>, </s>, <eos>, <|im_end|> among its special tokens).
    #[arg(long, value_name = "TOKEN")]
    eos_token: Option<String>,
    /// The output directory.
    #[arg(long)]
    out: PathBuf,
    /// The fraction of the input (the last part, by bytes) held out for validation.
    #[arg(long, default_value_t = 0.01)]
    val_fraction: f64,
    /// Tokens per shard file.
    #[arg(long, default_value_t = 100_000_000)]
    shard_tokens: usize,
    /// The field of a JSON Lines object that holds the text.
    #[arg(long, default_value = "text")]
    text_field: String,
    /// Replace invalid UTF-8 and report how much, instead of stopping at it.
    #[arg(long)]
    lossy: bool,
}

/// `--tokenizer`: a built-in tokenizer, or the path of a tokenizer.json.
#[derive(Clone)]
enum TokenizerChoice {
    Gpt2,
    Byte,
    Char,
    HfFile(PathBuf),
}

/// `--tokenizer`: a built-in tokenizer's name, or a path.
fn parse_tokenizer(value: &str) -> std::result::Result<TokenizerChoice, String> {
    match value {
        "gpt2" => Ok(TokenizerChoice::Gpt2),
        "byte" => Ok(TokenizerChoice::Byte),
        "char" => Ok(TokenizerChoice::Char),
        path if path.chars().any(std::path::is_separator) || path.ends_with(".json") => {
            Ok(TokenizerChoice::HfFile(PathBuf::from(path)))
        }
        other => Err(format!(
            "\"{other}\" is not gpt2, byte or char; a tokenizer.json is named by a path (with a / or ending in .json)"
        )),
    }
}

/// The tokenizer `kiln prepare` uses: a built-in one, or a tokenizer.json with its end-of-text token.
fn tokenization(choice: TokenizerChoice, eos_token: Option<&str>) -> Result<Tokenization> {
    Ok(match (choice, eos_token) {
        (TokenizerChoice::HfFile(path), eos_token) => {
            let hf = HfTokenizer::load(&path, eos_token.map_or(EndOfText::Find, EndOfText::Token))?;
            tracing::info!(
                "{}: {} tokens, end-of-text {:?} = {}; documents tokenised {}",
                path.display(),
                hf.vocab_size(),
                hf.end_of_text_token(),
                hf.end_of_text(),
                if hf.tokenises_in_blocks() {
                    "in blocks"
                } else {
                    "whole (its pipeline is not known to split alike at block cuts)"
                }
            );
            Tokenization::Hf(Arc::new(hf))
        }
        (_, Some(_)) => {
            return Err(Error::Usage(
                "--eos-token goes with --tokenizer PATH/tokenizer.json; gpt2, byte and char have their own".into(),
            ));
        }
        (TokenizerChoice::Gpt2, None) => Tokenization::Gpt2,
        (TokenizerChoice::Byte, None) => Tokenization::Byte,
        (TokenizerChoice::Char, None) => Tokenization::Char(None),
    })
}

/// Tokenises the inputs into shards, showing progress on a terminal through `bar`, and logs what it wrote and how
/// fast.
pub fn run(args: Args, bar: log::ProgressSlot) -> Result<()> {
    // The library takes 0 (its tests compare whole tokenisations); a dataset without validation shards is one that
    // neither kiln train nor kiln eval can use.
    if args.val_fraction <= 0.0 {
        return Err(Error::Usage(format!(
            "--val-fraction {} must be above 0: training validates on the held-out split, and kiln eval scores it",
            args.val_fraction
        )));
    }
    let options = PrepareOptions {
        tokenizer: tokenization(args.tokenizer, args.eos_token.as_deref())?,
        inputs: args.inputs,
        out: args.out,
        val_fraction: args.val_fraction,
        shard_tokens: args.shard_tokens,
        text_field: args.text_field,
        lossy: args.lossy,
        block_bytes: kiln_data::prepare::BLOCK_BYTES,
    };
    let started = std::time::Instant::now();
    let progress = bar.start_bytes();
    let summary = kiln_data::prepare::prepare(&options, |bytes, tokens| {
        if let Some(p) = &progress {
            p.set_position(bytes);
            p.set_message(format!("{tokens} tokens"));
        }
    });
    bar.finish();
    let summary = summary?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        "{} train and {} validation tokens in {} shards under {}",
        summary.train_tokens,
        summary.val_tokens,
        summary.shards.len(),
        options.out.display()
    );
    tracing::info!(
        "{:.1} MB/s of text, {:.0} tokens/s ({:.1} s)",
        summary.bytes as f64 / 1e6 / seconds,
        (summary.train_tokens + summary.val_tokens) as f64 / seconds,
        seconds
    );
    if summary.replaced > 0 {
        tracing::warn!("replaced {} invalid UTF-8 sequences", summary.replaced);
    }
    Ok(())
}
