//! Text to token ids and back, for prompts and samples: whichever tokenizer the training data used, saved beside
//! every checkpoint and export so that a model directory is all `kiln sample` and `kiln eval` need.

use crate::CharTokenizer;
use crate::hf::{EndOfText, HfTokenizer};
use kiln_core::{Error, Result};
use std::path::Path;
use std::sync::Arc;

/// The file that names a model's tokenizer in a kiln directory (beside `tokenizer.json` for a Hugging Face one).
pub const TOKENIZER_FILE: &str = "kiln_tokenizer.json";
/// Where a Hugging Face tokenizer lives, in kiln's directories as in transformers'.
pub const HF_TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Clone)]
pub enum Codec {
    /// One token per character (text files, the synthetic addition task, `kiln prepare --tokenizer char`, which
    /// adds an end-of-text token after the characters).
    Char { chars: CharTokenizer, end_of_text: Option<u32> },
    /// GPT-2's BPE; end-of-text is 50256.
    Gpt2,
    /// Raw bytes; end-of-text is 256.
    Byte,
    /// A Hugging Face `tokenizer.json`.
    Hf(Arc<HfTokenizer>),
}

impl Codec {
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Codec::Char { chars, .. } => chars.encode(text),
            Codec::Gpt2 => Ok(tiktoken_rs::r50k_base_singleton().encode_ordinary(text)),
            Codec::Byte => Ok(text.bytes().map(u32::from).collect()),
            Codec::Hf(hf) => hf.encode_prompt(text),
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
            // The library decodes to text, replacing the bytes of a character that the last tokens have only begun;
            // those replacement characters are held back until the character is complete.
            Codec::Hf(hf) => Ok(hf.decode(ids)?.trim_end_matches('\u{FFFD}').as_bytes().to_vec()),
        }
    }

    /// The number of ids the tokenizer gives: one more than the largest.
    pub fn vocab_size(&self) -> usize {
        match self {
            Codec::Char { chars, end_of_text } => chars.vocab_size().max(end_of_text.map_or(0, |e| e as usize + 1)),
            Codec::Gpt2 => 50257,
            Codec::Byte => 257,
            Codec::Hf(hf) => hf.vocab_size(),
        }
    }

    /// The token that ends a document, where the tokenizer has one.
    pub fn end_of_text(&self) -> Option<u32> {
        match self {
            Codec::Char { end_of_text, .. } => *end_of_text,
            Codec::Gpt2 => Some(50256),
            Codec::Byte => Some(256),
            Codec::Hf(hf) => Some(hf.end_of_text()),
        }
    }

    /// The token that begins a document, where the tokenizer names one apart from its end of text.
    pub fn begin_of_text(&self) -> Option<u32> {
        match self {
            Codec::Hf(hf) => hf.begin_of_text(),
            Codec::Char { .. } | Codec::Gpt2 | Codec::Byte => None,
        }
    }

    /// Whether `other` is the same tokenizer: the same ids for the same text.
    pub fn same_as(&self, other: &Codec) -> bool {
        match (self, other) {
            (Codec::Char { chars: a, end_of_text: x }, Codec::Char { chars: b, end_of_text: y }) => {
                x == y
                    && a.vocab_size() == b.vocab_size()
                    && (0..a.vocab_size() as u32).all(|i| a.decode(&[i]) == b.decode(&[i]))
            }
            (Codec::Hf(a), Codec::Hf(b)) => a.json() == b.json() && a.end_of_text() == b.end_of_text(),
            (Codec::Gpt2, Codec::Gpt2) | (Codec::Byte, Codec::Byte) => true,
            _ => false,
        }
    }

    /// A short name for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::Char { .. } => "a character table",
            Codec::Gpt2 => "GPT-2's BPE",
            Codec::Byte => "bytes",
            Codec::Hf(_) => "a tokenizer.json",
        }
    }

    /// Writes the files from which [`Codec::load`] finds this tokenizer again into `dir`: [`TOKENIZER_FILE`], and
    /// for a Hugging Face tokenizer its `tokenizer.json` as it was read.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let description = match self {
            Codec::Char { chars, end_of_text } => serde_json::json!({
                "type": "char",
                "chars": chars.decode(&(0..chars.vocab_size() as u32).collect::<Vec<_>>()),
                "end_of_text": end_of_text,
            }),
            Codec::Gpt2 => serde_json::json!({ "type": "gpt2" }),
            Codec::Byte => serde_json::json!({ "type": "byte" }),
            Codec::Hf(hf) => {
                let path = dir.join(HF_TOKENIZER_FILE);
                std::fs::write(&path, hf.json()).map_err(|e| Error::io(&path, e))?;
                serde_json::json!({ "type": "hf", "end_of_text_token": hf.end_of_text_token() })
            }
        };
        let path = dir.join(TOKENIZER_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&description).expect("plain JSON"))
            .map_err(|e| Error::io(&path, e))
    }

    /// The tokenizer of the model directory `dir`: the one [`Codec::save`] wrote, or a `tokenizer.json` as
    /// transformers saves it (its end of text the `eos_token_id` of `config.json`, when that names one); `None`
    /// when `dir` has neither.
    pub fn load(dir: &Path) -> Result<Option<Codec>> {
        let path = dir.join(TOKENIZER_FILE);
        let hf_path = dir.join(HF_TOKENIZER_FILE);
        if !path.exists() {
            if !hf_path.exists() {
                return Ok(None);
            }
            let eos = eos_token_id(&dir.join("config.json"));
            let end_of_text = eos.map_or(EndOfText::Find, EndOfText::Id);
            return Ok(Some(Codec::Hf(Arc::new(HfTokenizer::load(&hf_path, end_of_text)?))));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::data(&path, format!("cannot read: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::data(&path, format!("not valid JSON: {e}")))?;
        let codec = match json["type"].as_str() {
            Some("char") => {
                let chars = json["chars"].as_str().ok_or_else(|| Error::data(&path, "no \"chars\" string"))?;
                let end_of_text = json["end_of_text"].as_u64().map(|id| id as u32);
                Codec::Char { chars: CharTokenizer::from_chars(chars.chars().collect()), end_of_text }
            }
            Some("gpt2") => Codec::Gpt2,
            Some("byte") => Codec::Byte,
            Some("hf") => {
                let token =
                    json["end_of_text_token"].as_str().ok_or_else(|| Error::data(&path, "no \"end_of_text_token\""))?;
                Codec::Hf(Arc::new(HfTokenizer::load(&hf_path, EndOfText::Token(token))?))
            }
            other => return Err(Error::data(&path, format!("\"type\" is {other:?}: not char, gpt2, byte or hf"))),
        };
        Ok(Some(codec))
    }
}

/// The `eos_token_id` of a transformers `config.json` (the first, where it lists several), if it has one.
fn eos_token_id(config: &Path) -> Option<u32> {
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(config).ok()?).ok()?;
    let eos = &json["eos_token_id"];
    eos.as_u64().or_else(|| eos.as_array()?.first()?.as_u64()).map(|id| id as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-codec-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn golden_tokenizer() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/hf_tokenizer/tokenizer.json")
    }

    #[test]
    fn every_tokenizer_is_found_again_where_it_was_saved() {
        let hf = HfTokenizer::load(&golden_tokenizer(), EndOfText::Find).unwrap();
        let codecs = [
            Codec::Char { chars: CharTokenizer::from_text("ab\nc "), end_of_text: Some(5) },
            Codec::Char { chars: CharTokenizer::from_text("xyz"), end_of_text: None },
            Codec::Gpt2,
            Codec::Byte,
            Codec::Hf(Arc::new(hf)),
        ];
        for (i, codec) in codecs.iter().enumerate() {
            let dir = temp(&format!("saved-{i}"));
            codec.save(&dir).unwrap();
            let again = Codec::load(&dir).unwrap().expect("a saved tokenizer");
            let text = if i == 1 { "zyx" } else { "a cab\n" };
            let ids = codec.encode(text).unwrap();
            assert_eq!(again.encode(text).unwrap(), ids, "tokenizer {i}");
            assert_eq!(again.end_of_text(), codec.end_of_text(), "tokenizer {i}");
            assert!(again.same_as(codec) && (i == 0 || !again.same_as(&codecs[0])), "tokenizer {i}");
            // A prompt gets the tokens the tokenizer's post-processor puts in front (this one's: its end of text,
            // as GPT-2's would); the text's own tokens decode back to it.
            let text_ids = match codec {
                Codec::Hf(hf) => {
                    assert_eq!(ids[0], hf.end_of_text());
                    ids[1..].to_vec()
                }
                _ => ids,
            };
            assert_eq!(again.decode_bytes(&text_ids).unwrap(), text.as_bytes(), "tokenizer {i}");
        }
        assert!(Codec::load(&temp("empty")).unwrap().is_none());
    }

    #[test]
    fn a_transformers_directory_ends_text_with_its_configs_eos_token() {
        let dir = temp("transformers");
        std::fs::copy(golden_tokenizer(), dir.join(HF_TOKENIZER_FILE)).unwrap();
        let found = Codec::load(&dir).unwrap().unwrap();
        let usual = found.end_of_text().unwrap();
        // config.json's eos_token_id decides, even where another token has a usual end-of-text name.
        std::fs::write(dir.join("config.json"), r#"{"eos_token_id": [3, 0]}"#).unwrap();
        let named = Codec::load(&dir).unwrap().unwrap();
        assert_eq!(named.end_of_text(), Some(3));
        assert_ne!(usual, 3);
    }
}
