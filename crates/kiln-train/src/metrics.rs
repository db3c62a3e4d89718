//! The run's files: `config.toml` (the resolved configuration) and `metrics.jsonl` (one JSON object per step).
//!
//! Schema of a `metrics.jsonl` line: `step` (1-based), `loss` (mean training loss of the step), `lr`,
//! `grad_norm` (global norm before clipping), `step_ms`, `tokens_per_s`, `allocated_bytes` (what the engine holds,
//! rank 0's: the same count `kiln plan` predicts as its allocated part); steps that evaluate add `val_loss`;
//! the last step of a synthetic-addition run adds `exact_match` (fraction of held-out sums answered exactly).
//! A resumed run continues the same file.

use kiln_core::{Config, Error, Result, durable};
use serde::Serialize;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub step_ms: f64,
    pub tokens_per_s: f64,
    pub allocated_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f32>,
}

pub struct Metrics {
    path: PathBuf,
    file: BufWriter<File>,
}

impl Metrics {
    /// Creates `dir` and saves the resolved configuration there. A fresh run (`from_step` 0) starts a new
    /// `metrics.jsonl`; a resumed one keeps the lines up to `from_step` (the steps after it run again).
    pub fn create(dir: &Path, config: &Config, from_step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        durable::write(&dir.join("config.toml"), config.to_toml_string().as_bytes())?;
        let path = dir.join("metrics.jsonl");
        let kept: String = match (from_step, std::fs::read_to_string(&path)) {
            (0, _) | (_, Err(_)) => String::new(),
            (_, Ok(text)) => text
                .lines()
                .filter(|line| {
                    let step = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["step"].as_u64());
                    step.is_some_and(|s| s <= from_step)
                })
                .map(|line| format!("{line}\n"))
                .collect(),
        };
        durable::write(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Metrics { path, file: BufWriter::new(file) })
    }

    /// Appends one line and flushes it, so that a crash loses nothing already reported.
    pub fn append(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record).expect("a record of plain numbers serialises");
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}
