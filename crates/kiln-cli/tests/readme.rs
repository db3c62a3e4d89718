//! The README's commands run as written. Every line of its ```sh blocks that runs `kiln` is run here, on the CPU,
//! in a directory holding only what a fresh clone has beside the binary (`configs/`) and the inputs the README
//! tells the reader to bring, made small here: `my.txt`, `corpus/` and `data/tinyshakespeare.txt`. Training
//! commands get a few steps instead of thousands. Each must exit with 0.

use std::path::{Path, PathBuf};
use std::process::Command;

const README: &str = include_str!("../../../README.md");

/// The README's `kiln` commands this test does not run, by a fragment of the line, each with why. A fragment that
/// matches no command fails the test, so the list cannot outlive what it skips. The first fragment a line holds is the one counted as used.
const SKIPPED: &[(&str, &str)] = &[
    ("srun", "needs a SLURM cluster with GPUs"),
    ("--gpus", "needs GPUs"),
    ("kiln launch", "starts one process per GPU"),
    ("torchrun", "starts one process per GPU, under PyTorch's launcher"),
    ("mpirun", "starts one process per GPU, under Open MPI"),
    ("path/to/SmolLM-135M", "needs SmolLM-135M, downloaded from Hugging Face"),
    ("runs/x/checkpoints/step_00001000", "needs the checkpoint of a 1000-step run"),
];

/// Added to every `kiln train`: a later `--set` of the same key wins, so these replace the README's step counts.
const FEW_STEPS: &[&str] = &["--set", "train.max_steps=3", "--set", "train.eval_steps=1"];

/// The lines of the README's ```sh blocks, without comments, continuation-only lines left out.
fn sh_lines(markdown: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut in_sh = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_sh = !in_sh && line == "```sh";
            continue;
        }
        if in_sh {
            let command = without_comment(line).trim();
            if !command.is_empty() {
                lines.push(command.to_string());
            }
        }
    }
    lines
}

/// `line` up to a `#` that starts a shell comment: one after whitespace, outside quotes.
fn without_comment(line: &str) -> &str {
    let mut quoted = false;
    let mut after_space = true;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted && after_space => return &line[..i],
            _ => {}
        }
        after_space = c.is_whitespace();
    }
    line
}

/// Shell words: split at whitespace, double quotes grouping (all the README's commands need).
fn words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.get_or_insert_with(String::new);
            }
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    assert!(!quoted, "unbalanced quotes in {command:?}");
    words.extend(word);
    words
}

/// The arguments `kiln` gets from a README line, when the line runs `kiln` itself (`cargo run --release --` runs it
/// too, after building it).
fn kiln_arguments(words: &[String]) -> Option<&[String]> {
    match words {
        [kiln, rest @ ..] if kiln == "kiln" => Some(rest),
        [cargo, run, release, dashes, rest @ ..]
            if [cargo, run, release, dashes] == ["cargo", "run", "--release", "--"] =>
        {
            Some(rest)
        }
        _ => None,
    }
}

/// Deterministic English-like text of `words` words, for a corpus the README asks the reader to bring.
fn text(words: usize, seed: u64) -> String {
    const VOCABULARY: [&str; 16] = [
        "the", "king", "shall", "speak", "to", "his", "lords", "and", "they", "will", "hear", "him", "now", "fair",
        "night", "comes",
    ];
    let mut state = seed;
    let mut text = String::new();
    for i in 0..words {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        text += VOCABULARY[(state >> 60) as usize];
        text += if i % 12 == 11 { ".\n" } else { " " };
    }
    text
}

/// A directory standing for the repository root: the shipped configurations, and small stand-ins for the inputs
/// the README has the reader bring.
fn fresh_clone() -> PathBuf {
    let root = std::env::temp_dir().join(format!("kiln-readme-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("corpus")).unwrap();
    std::fs::create_dir_all(root.join("data")).unwrap();
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        std::fs::create_dir_all(root.join("configs")).unwrap();
        std::fs::copy(&path, root.join("configs").join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(root.join("my.txt"), text(20_000, 1)).unwrap();
    std::fs::write(root.join("data/tinyshakespeare.txt"), text(20_000, 2)).unwrap();
    std::fs::write(root.join("corpus/one.txt"), text(10_000, 3)).unwrap();
    std::fs::write(root.join("corpus/two.txt"), text(10_000, 4)).unwrap();
    root
}

#[test]
fn every_kiln_command_in_the_readme_runs_as_written() {
    let root = fresh_clone();
    let mut skips_used = vec![false; SKIPPED.len()];
    let mut ran = Vec::new();
    for line in sh_lines(README) {
        if let Some(skip) = SKIPPED.iter().position(|(fragment, _)| line.contains(fragment)) {
            skips_used[skip] = true;
            continue;
        }
        let words = words(&line);
        let Some(arguments) = kiln_arguments(&words) else {
            assert!(!words.iter().any(|w| w == "kiln"), "a README command neither run nor skipped: {line}");
            continue;
        };
        let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
        command.args(arguments).current_dir(&root);
        if arguments.first().map(String::as_str) == Some("train") {
            command.args(FEW_STEPS);
        }
        let out = command.output().expect("kiln runs");
        assert!(out.status.success(), "{line}\nexit {:?}\n{}", out.status.code(), String::from_utf8_lossy(&out.stderr));
        ran.push(line);
    }
    for ((fragment, reason), used) in SKIPPED.iter().zip(skips_used) {
        assert!(used, "the skip of {fragment:?} ({reason}) matches no README command");
    }
    // The README's quickstart, Tiny Shakespeare, own-text, `kiln prepare` and CPU-ranks commands, at least.
    assert!(ran.len() >= 7, "only these README commands ran: {ran:#?}");
    std::fs::remove_dir_all(&root).unwrap();
}
