//! The learning rate at each step: linear warm-up from zero to `lr`, then `schedule` down to `min_lr` at the
//! last step.

use kiln_core::config::{OptimConfig, Schedule};

/// Learning rate for 0-based `step` of a run of `max_steps`.
pub fn learning_rate(o: &OptimConfig, step: u64, max_steps: u64) -> f32 {
    if step < o.warmup_steps {
        return o.lr * (step + 1) as f32 / o.warmup_steps as f32;
    }
    let decay_steps = max_steps.saturating_sub(o.warmup_steps).max(1);
    let progress = ((step - o.warmup_steps) as f32 / decay_steps as f32).min(1.0);
    let factor = match o.schedule {
        Schedule::Constant => return o.lr,
        Schedule::Linear => 1.0 - progress,
        Schedule::Cosine => 0.5 * (1.0 + (std::f32::consts::PI * progress).cos()),
    };
    o.min_lr + factor * (o.lr - o.min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optim(schedule: Schedule) -> OptimConfig {
        OptimConfig { lr: 1e-3, min_lr: 1e-4, warmup_steps: 10, schedule, ..OptimConfig::default() }
    }

    #[test]
    fn warmup_then_decay() {
        let o = optim(Schedule::Cosine);
        assert!((learning_rate(&o, 0, 110) - 1e-4).abs() < 1e-9);
        assert_eq!(learning_rate(&o, 9, 110), 1e-3);
        assert!((learning_rate(&o, 60, 110) - 5.5e-4).abs() < 1e-9);
        assert!((learning_rate(&o, 110, 110) - 1e-4).abs() < 1e-9);
        let l = optim(Schedule::Linear);
        assert!((learning_rate(&l, 35, 110) - (1e-4 + 0.75 * 9e-4)).abs() < 1e-9);
        let c = optim(Schedule::Constant);
        assert_eq!(learning_rate(&c, 100, 110), 1e-3);
    }
}
