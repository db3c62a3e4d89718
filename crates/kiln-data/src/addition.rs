//! The built-in corpus `synthetic:addition`: sums of two numbers from 0 to 999.
//!
//! Each example is 13 characters, `AAA+BBB=SSSS\n`: both operands zero-padded to three digits and the sum written
//! with its digits reversed, least significant first, zero-padded to four: 482 + 937 = 1419 is `482+937=9141\n`,
//! and 7 + 42 = 49 is `007+042=9400\n`. Reversing the sum lets the model emit each digit after the digits it
//! depends on (the carry travels from the least significant digit up), which is what makes the task learnable in
//! a couple of CPU minutes. Sequences are examples back to back; only the characters after `=` are targets.
//!
//! One pair in fifty, chosen by a fixed hash of the operands, is held out: those sums appear only in validation.

use crate::{CharTokenizer, mix};
use kiln_core::backend::IGNORE_TARGET;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

pub const ALPHABET: &str = "0123456789+=\n";
pub(crate) const EXAMPLE_LEN: usize = 13;
const PROMPT_LEN: usize = 8;
const HELD_OUT_ONE_IN: u64 = 50;

#[derive(Clone, Debug)]
pub struct Addition {
    tokenizer: CharTokenizer,
}

impl Default for Addition {
    fn default() -> Self {
        Self::new()
    }
}

impl Addition {
    pub fn new() -> Self {
        Addition { tokenizer: CharTokenizer::from_chars(ALPHABET.chars().collect()) }
    }

    pub fn tokenizer(&self) -> CharTokenizer {
        self.tokenizer.clone()
    }

    fn held_out(a: u32, b: u32) -> bool {
        mix(u64::from(a) * 1000 + u64::from(b) + 0x5EED) % HELD_OUT_ONE_IN == 0
    }

    /// A random pair from the training or the held-out set.
    fn pair(rng: &mut ChaCha8Rng, held_out: bool) -> (u32, u32) {
        loop {
            let (a, b) = (rng.random_range(0..1000), rng.random_range(0..1000));
            if Self::held_out(a, b) == held_out {
                return (a, b);
            }
        }
    }

    pub fn example(a: u32, b: u32) -> String {
        let sum: String = format!("{:04}", a + b).chars().rev().collect();
        format!("{a:03}+{b:03}={sum}\n")
    }

    /// Examples back to back, cut to `inputs.len() + 1` characters; targets only on answer characters.
    pub(crate) fn sequence(&self, rng: &mut ChaCha8Rng, held_out: bool, inputs: &mut [u32], targets: &mut [u32]) {
        let t = inputs.len();
        let mut text = String::with_capacity(t + EXAMPLE_LEN);
        while text.len() < t + 1 {
            let (a, b) = Self::pair(rng, held_out);
            text.push_str(&Self::example(a, b));
        }
        let ids = self.tokenizer.encode(&text[..t + 1]).expect("examples use only the alphabet");
        inputs.copy_from_slice(&ids[..t]);
        for (p, target) in targets.iter_mut().enumerate() {
            let is_answer = (p + 1) % EXAMPLE_LEN >= PROMPT_LEN;
            *target = if is_answer { ids[p + 1] } else { IGNORE_TARGET };
        }
    }

    /// `n` held-out problems for exact-match scoring, as (prompt, expected completion), e.g.
    /// (`"482+937="`, `"9141\n"`), drawn deterministically from `seed`.
    pub fn problems(&self, seed: u64, n: usize) -> Vec<(String, String)> {
        use rand::SeedableRng;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed ^ 0xADD));
        (0..n)
            .map(|_| {
                let (a, b) = Self::pair(&mut rng, true);
                let example = Self::example(a, b);
                (example[..PROMPT_LEN].to_string(), example[PROMPT_LEN..].to_string())
            })
            .collect()
    }

    /// Characters a completion takes: four digits and the newline.
    pub fn answer_len(&self) -> usize {
        EXAMPLE_LEN - PROMPT_LEN
    }

    /// The sum a completion encodes, if it is well formed (`"9141\n"` → 1419).
    pub fn read_answer(completion: &str) -> Option<u32> {
        let digits = completion.strip_suffix('\n')?;
        if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.chars().rev().collect::<String>().parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn format() {
        assert_eq!(Addition::example(482, 937), "482+937=9141\n");
        assert_eq!(Addition::example(7, 42), "007+042=9400\n");
        assert_eq!(Addition::read_answer("9141\n"), Some(1419));
        assert_eq!(Addition::read_answer("91a1\n"), None);
    }

    #[test]
    fn targets_are_the_answers_and_held_out_pairs_never_train() {
        let task = Addition::new();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut x, mut y) = (vec![0; 40], vec![0; 40]);
        for _ in 0..200 {
            task.sequence(&mut rng, false, &mut x, &mut y);
            let text = task.tokenizer.decode(&x);
            for ex in text.as_bytes().chunks(EXAMPLE_LEN).filter(|e| e.len() == EXAMPLE_LEN) {
                let ex = std::str::from_utf8(ex).unwrap();
                let (a, b): (u32, u32) = (ex[0..3].parse().unwrap(), ex[4..7].parse().unwrap());
                assert!(!Addition::held_out(a, b));
                assert_eq!(Addition::read_answer(&ex[8..]), Some(a + b));
            }
        }
        // Position 7 is '=', whose next character is the first answer digit.
        assert_eq!(y[6], IGNORE_TARGET);
        assert_eq!(y[7], x[8]);
        assert_eq!(y[11], task.tokenizer.id('\n').unwrap());
        assert_eq!(y[12], IGNORE_TARGET);
        let problems = task.problems(3, 50);
        assert!(problems.iter().all(|(p, _)| Addition::held_out(p[0..3].parse().unwrap(), p[4..7].parse().unwrap())));
    }
}
