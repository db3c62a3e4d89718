//! One token per character: the vocabulary is the sorted set of characters of the corpus.

use kiln_core::{Error, Result};
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct CharTokenizer {
    chars: Vec<char>,
    ids: HashMap<char, u32>,
}

impl CharTokenizer {
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::from_chars(chars)
    }

    /// A tokenizer whose ids are the positions of `chars` (which must be distinct).
    pub fn from_chars(chars: Vec<char>) -> Self {
        let ids = chars.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        CharTokenizer { chars, ids }
    }

    pub fn vocab_size(&self) -> usize {
        self.chars.len()
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.chars()
            .map(|c| self.id(c).ok_or_else(|| Error::Usage(format!("character {c:?} is not in the vocabulary"))))
            .collect()
    }

    pub fn id(&self, c: char) -> Option<u32> {
        self.ids.get(&c).copied()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter().map(|&i| self.chars.get(i as usize).copied().unwrap_or('\u{FFFD}')).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = CharTokenizer::from_text("hello, world");
        assert_eq!(t.vocab_size(), 9);
        let ids = t.encode("world hello").unwrap();
        assert_eq!(t.decode(&ids), "world hello");
        assert!(t.encode("x").is_err());
    }
}
