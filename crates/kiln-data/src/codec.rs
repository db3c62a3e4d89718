//! Text to token ids and back, for prompts and samples: whichever tokenizer the training data used.

use crate::CharTokenizer;
use kiln_core::{Error, Result};

pub enum Codec {
    /// One token per character (text files, the synthetic addition task, `kiln prepare --tokenizer char`, which
    /// adds an end-of-text token after the characters).
    Char { chars: CharTokenizer, end_of_text: Option<u32> },
    /// GPT-2's BPE; end-of-text is 50256.
    Gpt2,
    /// Raw bytes; end-of-text is 256.
    Byte,
}

impl Codec {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Codec::Char { chars, .. } => chars.encode(text),
            Codec::Gpt2 => Ok(tiktoken_rs::r50k_base_singleton().encode_ordinary(text)),
            Codec::Byte => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// The bytes of `ids` (BPE tokens can end inside a UTF-8 character, so text is assembled by the caller).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match self {
            Codec::Char { chars, end_of_text } => Ok(chars
                .decode(&ids.iter().copied().filter(|&i| Some(i) != *end_of_text).collect::<Vec<_>>())
                .into_bytes()),
            Codec::Gpt2 => tiktoken_rs::r50k_base_singleton()
                .decode_bytes(ids)
                .map_err(|e| Error::Invalid(format!("cannot decode GPT-2 tokens: {e:?}"))),
            Codec::Byte => Ok(ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect()),
        }
    }

    /// The token that ends a document, where the tokenizer has one.
    pub fn end_of_text(&self) -> Option<u32> {
        match self {
            Codec::Char { end_of_text, .. } => *end_of_text,
            Codec::Gpt2 => Some(50256),
            Codec::Byte => Some(256),
        }
    }
}
