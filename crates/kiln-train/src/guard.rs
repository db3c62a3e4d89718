//! The guard on every update (`[train.guard]`): the step's loss and global gradient norm are judged before the
//! optimizer applies the step.
//!
//! A step fails when its loss or norm is not finite, or is a spike: more than `threshold` robust standard deviations
//! above the median of the last `window` applied updates (the robust deviation is 1.4826 × the median absolute
//! deviation, which equals the standard deviation for normal noise, and is not moved by the spikes it looks for; it is
//! taken as at least 0.01 for the loss, in nats, since a loss that has come near zero varies by more than its tiny MAD
//! says, and at least 1% of the median for the norm, whose scale is the model's).
//! A failed step is skipped: its update is not applied, and its data is not trained on. After `max_skips` failures in a
//! row the trainer rolls back to its newest checkpoint from before them and passes over the data from that checkpoint
//! to the last failure, which PaLM found to cure spikes that skipping alone does not; after `max_rollbacks`
//! rollbacks, a run that fails again stops.
//!
//! Every decision is a function of the loss and norm the ranks agree on and of the [`GuardState`], which checkpoints
//! keep: every rank decides the same, and a resumed run decides as the original did.

use kiln_core::config::GuardConfig;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// What the guard remembers between steps. Fields added later read as their defaults from older checkpoints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuardState {
    /// `(loss, gradient norm)` of the last applied updates, oldest first: at most `window` of them.
    pub recent: VecDeque<(f32, f32)>,
    /// Steps failed in a row, up to the last one judged.
    pub failed_in_a_row: u32,
    /// The step count before the first of them: where the weights were last good.
    pub good_until: u64,
    /// Rollbacks so far.
    pub rollbacks: u32,
    /// Batches of data passed over by rollbacks: step `s` (counted from 0) trains on the data of position
    /// `s + data_skipped`.
    pub data_skipped: u64,
}

/// What to do with a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Apply,
    /// Leave the update out, for the reason given.
    Skip(String),
    /// Leave the update out, and roll back to a checkpoint from before step `good_until + 1`.
    RollBack {
        why: String,
        good_until: u64,
    },
    /// Leave the update out and end the run: it has rolled back as often as it may.
    Stop(String),
}

impl Verdict {
    /// Whether the step's update is applied.
    pub fn applies(&self) -> bool {
        *self == Verdict::Apply
    }
}

/// Judges each step against the recent ones; see the module's documentation.
pub struct Guard {
    config: GuardConfig,
    pub state: GuardState,
    /// The window's values of one check, reused every step (the step's host work allocates nothing).
    scratch: Vec<f64>,
}

/// Standard deviations per median absolute deviation, for normally distributed values.
const DEVIATIONS_PER_MAD: f64 = 1.4826;

/// The least robust deviation of the loss, in nats.
const LEAST_LOSS_DEVIATION: f64 = 0.01;

/// The least robust deviation of the gradient norm, relative to its median.
const LEAST_RELATIVE_NORM_DEVIATION: f64 = 0.01;

impl Guard {
    pub fn new(config: &GuardConfig) -> Self {
        Guard { config: config.clone(), state: GuardState::default(), scratch: Vec::with_capacity(config.window) }
    }

    /// Judges the step that follows `steps_done` steps, with the loss and gradient norm the ranks agree on, and
    /// remembers it. With the guard off, every step applies.
    pub fn judge(&mut self, steps_done: u64, loss: f32, grad_norm: f32) -> Verdict {
        if !self.config.enabled {
            return Verdict::Apply;
        }
        let Some(why) = self.failure(loss, grad_norm) else {
            let s = &mut self.state;
            s.recent.push_back((loss, grad_norm));
            while s.recent.len() > self.config.window {
                s.recent.pop_front();
            }
            s.failed_in_a_row = 0;
            return Verdict::Apply;
        };
        let s = &mut self.state;
        if s.failed_in_a_row == 0 {
            s.good_until = steps_done;
        }
        s.failed_in_a_row += 1;
        if s.failed_in_a_row < self.config.max_skips {
            return Verdict::Skip(why);
        }
        let why = format!("{why}; {} steps in a row have failed", s.failed_in_a_row);
        if s.rollbacks >= self.config.max_rollbacks {
            return Verdict::Stop(format!(
                "{why}, after {} rollback{} (train.guard.max_rollbacks)",
                s.rollbacks,
                if s.rollbacks == 1 { "" } else { "s" }
            ));
        }
        Verdict::RollBack { why, good_until: s.good_until }
    }

    /// Why a step with this loss and norm fails, if it does.
    fn failure(&mut self, loss: f32, grad_norm: f32) -> Option<String> {
        if !loss.is_finite() || !grad_norm.is_finite() {
            return Some(format!("the loss is {loss} and the gradient norm {grad_norm}"));
        }
        if self.state.recent.len() < self.config.window {
            return None;
        }
        // Each check: what it judges, its value, its threshold, where it is in `recent`, and its least deviation for
        // a median.
        type Check = (&'static str, f32, f64, fn(&(f32, f32)) -> f32, fn(f64) -> f64);
        let checks: [Check; 2] = [
            ("loss", loss, self.config.loss_threshold, |recent| recent.0, |_| LEAST_LOSS_DEVIATION),
            (
                "gradient norm",
                grad_norm,
                self.config.norm_threshold,
                |recent| recent.1,
                |median| LEAST_RELATIVE_NORM_DEVIATION * median,
            ),
        ];
        let (recent, scratch) = (&self.state.recent, &mut self.scratch);
        checks.into_iter().filter(|check| check.2 > 0.0).find_map(|(name, value, threshold, pick, least)| {
            scratch.clear();
            scratch.extend(recent.iter().map(|r| f64::from(pick(r))));
            let (median, mad) = median_and_mad(scratch);
            let deviation = (DEVIATIONS_PER_MAD * mad).max(least(median));
            let value = f64::from(value);
            (value > median + threshold * deviation).then(|| {
                format!(
                    "the {name} {value:.4} is a spike: {:.1} robust deviations above the median {median:.4} of the last \
                     {} updates (train.guard threshold {threshold})",
                    (value - median) / deviation,
                    self.config.window
                )
            })
        })
    }

    /// Returns to `state`, a checkpoint's, after a rollback to it from step `steps_done`: the statistics are the
    /// checkpoint's, the rollbacks one more than so far, and the data from the checkpoint's step to `steps_done` is
    /// passed over.
    pub fn rolled_back(&mut self, state: GuardState, checkpoint_step: u64, steps_done: u64) {
        let (rollbacks, data_skipped) = (self.state.rollbacks + 1, self.state.data_skipped);
        self.state = GuardState {
            failed_in_a_row: 0,
            rollbacks,
            data_skipped: data_skipped + (steps_done - checkpoint_step),
            ..state
        };
    }
}

/// The median of `values` and their median absolute deviation from it (`values` ends up holding the deviations).
fn median_and_mad(values: &mut [f64]) -> (f64, f64) {
    let median = median(values);
    values.iter_mut().for_each(|v| *v = (*v - median).abs());
    (median, self::median(values))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(window: usize, max_skips: u32, max_rollbacks: u32) -> Guard {
        Guard::new(&GuardConfig { window, max_skips, max_rollbacks, ..GuardConfig::default() })
    }

    #[test]
    fn median_and_mad_are_not_moved_by_an_outlier() {
        // Deviations 2, 1, 0, 1, 97: their median is 1.
        assert_eq!(median_and_mad(&mut [1.0, 2.0, 3.0, 4.0, 100.0]), (3.0, 1.0));
        assert_eq!(median_and_mad(&mut [4.0, 1.0, 2.0, 3.0]), (2.5, 1.0));
    }

    #[test]
    fn a_loss_near_zero_or_a_steady_norm_is_judged_against_the_least_deviation() {
        let mut g = Guard::new(&GuardConfig { window: 3, norm_threshold: 10.0, ..GuardConfig::default() });
        for _ in 0..3 {
            assert!(g.judge(0, 0.001, 2.0).applies());
        }
        // 6 × 0.01 above the median: not a spike, just above it is.
        assert!(g.judge(0, 0.06, 2.0).applies());
        assert!(!g.judge(0, 0.062, 2.0).applies());
        // 10 × 1% of the norm's median.
        assert!(g.judge(0, 0.001, 2.19).applies());
        assert!(!g.judge(0, 0.001, 2.21).applies());
    }

    #[test]
    fn spikes_are_judged_once_the_window_is_full() {
        let mut g = guard(4, 5, 0);
        // Before the window is full only non-finite values fail.
        assert!(g.judge(0, 1e6, 1.0).applies());
        for (i, loss) in [3.0, 3.1, 2.9].into_iter().enumerate() {
            assert!(g.judge(i as u64 + 1, loss, 1.0).applies());
        }
        // The window is now 1e6, 3.0, 3.1, 2.9: median 3.05, MAD 0.1.
        assert!(g.judge(4, 3.5, 1.0).applies());
        let Verdict::Skip(why) = g.judge(5, 9.0, 1.0) else { panic!("a spike applied") };
        assert!(why.contains("loss 9.0000 is a spike"), "{why}");
        assert!(matches!(g.judge(6, f32::NAN, 1.0), Verdict::Skip(_)));
        assert!(matches!(g.judge(7, 3.0, f32::INFINITY), Verdict::Skip(_)));
        // A skipped step leaves the window as it was, and an applied one ends the run of failures.
        assert_eq!(g.state.recent.len(), 4);
        assert_eq!((g.state.failed_in_a_row, g.state.good_until), (3, 5));
        assert!(g.judge(8, 3.0, 1.0).applies());
        assert_eq!(g.state.failed_in_a_row, 0);
    }

    #[test]
    fn failures_in_a_row_roll_back_then_stop() {
        let mut g = guard(1, 2, 1);
        assert!(g.judge(0, 1.0, 1.0).applies());
        let checkpoint = g.state.clone();
        assert!(matches!(g.judge(1, f32::NAN, 1.0), Verdict::Skip(_)));
        let Verdict::RollBack { good_until, .. } = g.judge(2, f32::NAN, 1.0) else { panic!("no rollback") };
        assert_eq!(good_until, 1);
        g.rolled_back(checkpoint, 1, 3);
        assert_eq!((g.state.rollbacks, g.state.data_skipped, g.state.failed_in_a_row), (1, 2, 0));
        assert!(matches!(g.judge(1, f32::NAN, 1.0), Verdict::Skip(_)));
        let Verdict::Stop(why) = g.judge(2, f32::NAN, 1.0) else { panic!("no stop") };
        assert!(why.contains("after 1 rollback (train.guard.max_rollbacks)"), "{why}");
    }

    #[test]
    fn off_applies_everything() {
        let mut g = Guard::new(&GuardConfig { enabled: false, ..GuardConfig::default() });
        assert!(g.judge(0, f32::NAN, f32::NAN).applies());
        assert_eq!(g.state, GuardState::default());
    }
}
