//! The run's files: `config.toml` (the resolved configuration) and `metrics.jsonl` (one JSON object per line).
//!
//! Schema of a `metrics.jsonl` line: `step` (1-based), `loss` (mean training loss of the step: the cross-entropy
//! alone), `aux_loss` (with experts and a balancing loss: transformers' `aux_loss`, before its coefficient, the mean
//! over the step's rows of every rank; the objective adds `model.router_aux_loss` times it), `lr`, `grad_norm`
//! (global norm before clipping), `step_ms`, `tokens` (the batches of the steps so far, skipped ones included: step ×
//! tokens per step), `tokens_per_s`, `tflops` (the job's model arithmetic per second: 6 per parameter and token plus
//! attention's), `mfu` (`tflops` over the peak of all the job's devices, where the engine knows it), `allocated_bytes`
//! (what the engine holds, rank 0's: the same count `kiln plan` predicts as its allocated part), `rank_step_ms` (in a
//! job of several ranks, each rank's own work in the step's passes, in ms: its device's time for them on a GPU, its
//! time outside collectives on the CPU); steps that evaluate add `val_loss`; the last step of a synthetic-addition run
//! adds `exact_match` (fraction of held-out sums answered exactly). A step whose update the guard skipped adds
//! `"event": "skip"` and `why`. Two kinds of line mark what happened to the run rather than a step: `{"step", "event":
//! "rollback", "to_step", "why", "rollbacks", "data_skipped"}` after the step that rolled back to the checkpoint of
//! `to_step` (the steps after it come again), and `{"step", "event": "resume", "from"}` when a run resumed at `step`
//! from the checkpoint `from`. A resumed run continues the same file.

use kiln_core::{Config, Error, Result, durable};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`, as the trainer writes it and `kiln report` reads it. Every field but `step` is
/// optional, so that lines written before a field existed read, and fields this version does not know are ignored:
/// the schema grows.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct StepRecord {
    pub step: u64,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub event: Option<Event>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tflops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mfu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_step_ms: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f32>,
}

/// What happened at a step besides training, as the module's documentation describes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    Skip {
        why: String,
    },
    Rollback {
        to_step: u64,
        why: String,
        rollbacks: u32,
        data_skipped: u64,
    },
    Resume {
        from: String,
    },
    /// Read from a file another version wrote: an event this one does not know (it never writes it).
    #[serde(other)]
    Other,
}

pub struct Metrics {
    path: PathBuf,
    file: BufWriter<File>,
}

impl Metrics {
    /// Creates `dir` and saves the resolved configuration there. A fresh run (`from_step` 0) starts a new
    /// `metrics.jsonl`; a resumed one keeps the lines up to `from_step`'s (the steps after it run again).
    pub fn create(dir: &Path, config: &Config, from_step: u64) -> Result<Self> {
        durable::create_dir(dir, "train.out_dir")?;
        durable::write(&dir.join("config.toml"), config.to_toml_string().as_bytes())?;
        let path = dir.join("metrics.jsonl");
        let kept = match (from_step, std::fs::read_to_string(&path)) {
            (0, _) | (_, Err(_)) => String::new(),
            (_, Ok(text)) => history_until(&text, from_step),
        };
        durable::write(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Metrics { path, file: BufWriter::new(file) })
    }

    /// Appends one line and flushes it, so that a crash loses nothing already reported.
    pub fn append(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record)
            .map_err(|e| Error::Invalid(format!("a line of {}: {e}", self.path.display())))?;
        writeln!(self.file, "{line}").and_then(|_| self.file.flush()).map_err(|e| Error::io(&self.path, e))
    }
}

/// The lines of a `metrics.jsonl` up to the last line of step `step`, rollbacks before it and the steps they undid
/// included; or, when no line has that step (a file of another run), those of steps up to it.
fn history_until(text: &str, step: u64) -> String {
    // A line's step, and whether it is a step's own line (a skipped one too) rather than an event's.
    let fields = |line: &str| {
        let v = serde_json::from_str::<serde_json::Value>(line).ok();
        v.map(|v| (v["step"].as_u64(), v["event"].is_null() || v["event"] == "skip"))
    };
    let lines: Vec<&str> = text.lines().collect();
    let kept: Vec<&str> = match lines.iter().rposition(|l| fields(l) == Some((Some(step), true))) {
        Some(last) => lines[..=last].to_vec(),
        None => lines.into_iter().filter(|l| fields(l).and_then(|f| f.0).is_some_and(|s| s <= step)).collect(),
    };
    kept.iter().map(|line| format!("{line}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_keeps_the_history_up_to_its_step_rollbacks_included() {
        let line = |step: u64, loss: f32| format!("{{\"step\":{step},\"loss\":{loss}}}");
        let rollback = r#"{"step":4,"event":"rollback","to_step":2}"#.to_string();
        // JSON has no NaN: a skipped step's non-finite loss is null.
        let skipped = r#"{"step":3,"event":"skip","why":"NaN","loss":null}"#.to_string();
        let history = [line(1, 5.0), line(2, 4.0), line(3, 3.0), line(4, 9.0), rollback, skipped];
        let text = [&history[..], &[line(4, 3.4)]].concat().join("\n");
        assert_eq!(history_until(&text, 3).lines().collect::<Vec<_>>(), history);
        // A step never written: the lines up to it.
        assert_eq!(history_until(&[line(1, 5.0), line(3, 3.0)].join("\n"), 2), format!("{}\n", line(1, 5.0)));
    }
}
