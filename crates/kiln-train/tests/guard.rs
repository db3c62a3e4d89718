//! The guard on every update, end to end on the CPU engine: a spike is skipped, spikes in a row roll back to a
//! checkpoint and pass over the data that caused them, and what follows is exactly the run that skipped the same
//! steps; trouble that outlasts the rollbacks ends the run; a resumed run decides as the original did; the ranks of a
//! data-parallel job decide alike and roll back together, at every ZeRO stage.
//!
//! Spikes are injected: the guard is shown a loss of 1000 for chosen data positions, which stay bad when their step
//! comes again after a rollback, as a bad batch would.

use kiln_core::{Config, Error};
use kiln_cpu::CpuBackend;
use kiln_train::checkpoint;
use kiln_train::{Hooks, Summary, Trainer};
use serde_json::Value;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A small model on the quickstart's addition data, checkpointed every 3 steps, judged against the last 4 updates.
const BASE: &[&str] = &[
    "model.n_embd=32",
    "model.n_head=2",
    "train.micro_batch=8",
    "train.max_steps=16",
    "optim.warmup_steps=2",
    "train.eval_every=0",
    "train.eval_steps=1",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=3",
    "train.guard.window=4",
    "train.guard.max_skips=3",
    "train.guard.max_rollbacks=1",
];

fn config(name: &str, extra: &[&str]) -> (Config, PathBuf) {
    let dir = std::env::temp_dir().join(format!("kiln-guard-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut all: Vec<String> = BASE.iter().chain(extra).map(|s| s.to_string()).collect();
    all.push(format!("train.out_dir={}", dir.display()));
    (Config::load(None, &all).unwrap(), dir)
}

/// A trainer whose guard sees a loss of 1000 at the data positions in `bad`.
fn trainer(config: &Config, bad: Range<u64>) -> Trainer<CpuBackend<f32>> {
    let mut trainer = Trainer::new(config, CpuBackend::<f32>::new()).unwrap();
    trainer.inject_faults(Box::new(move |position, loss, _| {
        if bad.contains(&position) {
            *loss = 1000.0;
        }
    }));
    trainer
}

fn run(trainer: &mut Trainer<CpuBackend<f32>>) -> Summary {
    trainer.run(&mut Hooks::default(), true).unwrap()
}

fn metrics(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn events<'a>(lines: &'a [Value], kind: &str) -> Vec<&'a Value> {
    lines.iter().filter(|l| l["event"] == kind).collect()
}

/// The reference for a run that skipped steps: a copy of the checkpoint `from` in a new run directory, as if it had
/// been written at `step` with `data_skipped` batches passed over, resumed without faults.
fn resumed_as(config: &Config, from: &Path, name: &str, step: u64, data_skipped: u64) -> Summary {
    let (_, dir) = self::config(name, &[]);
    let mut reference = config.clone();
    reference.train.out_dir = dir.display().to_string();
    let to = checkpoint::step_dir(&dir.join("checkpoints"), step);
    std::fs::create_dir_all(&to).unwrap();
    for file in std::fs::read_dir(from).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
    }
    let state_path = to.join("state.json");
    let mut state: Value = serde_json::from_slice(&std::fs::read(&state_path).unwrap()).unwrap();
    state["step"] = step.into();
    state["guard"]["data_skipped"] = data_skipped.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let mut trainer = Trainer::new(&reference, CpuBackend::<f32>::new()).unwrap();
    trainer.resume(&to).unwrap();
    run(&mut trainer)
}

fn checkpoint_of(dir: &Path, step: u64) -> PathBuf {
    checkpoint::step_dir(&dir.join("checkpoints"), step)
}

fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    checkpoint::list(&dir.join("checkpoints")).into_iter().map(|(step, _)| step).collect()
}

#[test]
fn a_spike_is_skipped_and_the_run_goes_on_as_one_that_skipped_its_step() {
    let (cfg, dir) = config("skip", &["train.checkpoint_every=1", "train.keep_checkpoints=100"]);
    // Step 5 (data position 4) spikes.
    let summary = run(&mut trainer(&cfg, 4..5));
    assert_eq!((summary.skipped.as_slice(), summary.rollbacks.as_slice()), (&[5][..], &[][..]));
    assert_eq!(summary.losses.len(), 16);
    assert_eq!(summary.losses[4], 1000.0);
    let lines = metrics(&dir);
    let skips = events(&lines, "skip");
    assert_eq!(skips.len(), 1);
    assert_eq!(skips[0]["step"], 5);
    assert!(skips[0]["why"].as_str().unwrap().contains("loss 1000.0000 is a spike"), "{}", skips[0]);
    // No checkpoint is written while steps fail.
    assert!(!checkpoint_steps(&dir).contains(&5));

    // A run that skipped step 5: the weights and moments of step 4, at step 5.
    let reference = resumed_as(&cfg, &checkpoint_of(&dir, 4), "skip-reference", 5, 0);
    assert_eq!(reference.losses, summary.losses[5..], "after the skip, the run is the one that skipped step 5");
}

/// Steps 8, 9 and 10 (data positions 7 to 9) spike: the third skip in a row rolls back to the checkpoint of step 6,
/// the newest from before them, and the data of steps 7 to 10 is passed over.
const SPIKES: Range<u64> = 7..10;

#[test]
fn spikes_in_a_row_roll_back_past_their_data_and_the_run_goes_on_as_one_that_skipped_it() {
    let (cfg, dir) = config("rollback", &["train.keep_checkpoints=100"]);
    let summary = run(&mut trainer(&cfg, SPIKES));
    assert_eq!(summary.skipped, [8, 9, 10]);
    assert_eq!(summary.rollbacks, [(10, 6)]);
    assert_eq!((summary.first_step, summary.losses.len()), (0, 16));
    assert!(summary.losses.iter().all(|&l| l < 1000.0), "the spikes' steps were undone: {:?}", summary.losses);

    let lines = metrics(&dir);
    assert_eq!(events(&lines, "skip").iter().map(|l| l["step"].as_u64().unwrap()).collect::<Vec<_>>(), [8, 9, 10]);
    let rollbacks = events(&lines, "rollback");
    assert_eq!(rollbacks.len(), 1);
    let r = rollbacks[0];
    assert_eq!((r["step"].as_u64(), r["to_step"].as_u64(), r["data_skipped"].as_u64()), (Some(10), Some(6), Some(4)));
    assert!(r["why"].as_str().unwrap().contains("3 steps in a row have failed"), "{r}");
    // Steps 7 to 10 were logged twice, before and after the rollback.
    let steps: Vec<u64> = lines.iter().filter(|l| l["event"].is_null()).map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=7).chain(7..=16).collect::<Vec<_>>());

    // The run after the rollback is the one resumed at step 6 with the data of 4 steps passed over.
    let reference = resumed_as(&cfg, &checkpoint_of(&dir, 6), "rollback-reference", 6, 4);
    assert_eq!(reference.losses, summary.losses[6..]);
}

#[test]
fn trouble_that_outlasts_the_rollbacks_ends_the_run() {
    // Every step from the 8th on spikes: one rollback (train.guard.max_rollbacks), then the run stops.
    let (cfg, dir) = config("stop", &[]);
    let Err(Error::Diverged(message)) = trainer(&cfg, 7..u64::MAX).run(&mut Hooks::default(), true) else {
        panic!("the run did not stop")
    };
    assert!(message.contains("after 1 rollback (train.guard.max_rollbacks)"), "{message}");
    assert_eq!(Error::Diverged(message).exit_code(), 1);
    assert_eq!(events(&metrics(&dir), "rollback").len(), 1);

    // Without a checkpoint to go back to, the first rollback is already impossible.
    let (cfg, _) = config("stop-no-checkpoint", &["train.checkpoint_every=0"]);
    let Err(Error::Diverged(message)) = trainer(&cfg, SPIKES).run(&mut Hooks::default(), true) else {
        panic!("the run did not stop")
    };
    assert!(message.contains("set train.checkpoint_every"), "{message}");

    // Nor can a run that writes no checkpoints roll back (to another run's, say).
    let (cfg, _) = config("stop-no-outputs", &[]);
    let Err(Error::Diverged(message)) = trainer(&cfg, SPIKES).run(&mut Hooks::default(), false) else {
        panic!("the run did not stop")
    };
    assert!(message.contains("this run writes no checkpoints to roll back to"), "{message}");
}

#[test]
fn a_resumed_run_makes_the_guards_decisions_again() {
    let (cfg, dir) = config("resume", &[]);
    let whole = run(&mut trainer(&cfg, SPIKES));

    // Interrupted after step 9, between two skips: its checkpoint is written, with the guard's count of failures,
    // and the checkpoint a rollback would return to is kept beside it, though only one is kept otherwise.
    let (interrupted_cfg, interrupted_dir) = config("resume-interrupted", &["train.keep_checkpoints=1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let on_step = Box::new(move |step| flag.store(step == 8, Ordering::Relaxed));
    let mut hooks = Hooks { stop, on_step: Some(on_step) };
    let first = trainer(&interrupted_cfg, SPIKES).run(&mut hooks, true);
    assert!(matches!(first, Err(Error::Interrupted)), "{first:?}");
    assert_eq!(checkpoint_steps(&interrupted_dir), [6, 9]);

    let mut resumed = trainer(&interrupted_cfg, SPIKES);
    resumed.resume(&checkpoint_of(&interrupted_dir, 9)).unwrap();
    let rest = run(&mut resumed);
    assert_eq!((rest.skipped.as_slice(), rest.rollbacks.as_slice()), (&[10][..], &[(10, 6)][..]));
    assert_eq!(rest.first_step, 6);
    assert_eq!(rest.losses, whole.losses[6..], "the resumed run rolled back as the whole one did");
    assert_eq!(checkpoint_steps(&interrupted_dir), [16]);
    let resumes = events(&metrics(&interrupted_dir), "resume").len();
    assert_eq!(resumes, 1);
    assert_eq!(metrics(&dir).len() + 1, metrics(&interrupted_dir).len());
}

#[test]
fn with_nothing_failing_the_guard_changes_nothing_and_off_a_non_finite_loss_ends_the_run() {
    let (on, _) = config("quiet-on", &["train.max_steps=30"]);
    let (off, _) = config("quiet-off", &["train.max_steps=30", "train.guard.enabled=false"]);
    let (a, b) = (run(&mut trainer(&on, 0..0)), run(&mut trainer(&off, 0..0)));
    assert!(a.skipped.is_empty(), "a healthy run had steps skipped: {:?}", a.skipped);
    assert_eq!(a.losses, b.losses);

    let mut nan = Trainer::new(&off, CpuBackend::<f32>::new()).unwrap();
    nan.inject_faults(Box::new(|position, loss, _| {
        if position == 3 {
            *loss = f32::NAN;
        }
    }));
    let Err(Error::Diverged(message)) = nan.run(&mut Hooks::default(), false) else { panic!("a NaN loss went on") };
    assert!(message.contains("the loss became NaN at step 4"), "{message}");
    // On, the same step is skipped.
    let mut skipped = Trainer::new(&on, CpuBackend::<f32>::new()).unwrap();
    skipped.inject_faults(Box::new(|position, loss, _| {
        if position == 3 {
            *loss = f32::NAN;
        }
    }));
    assert_eq!(run(&mut skipped).skipped, [4]);
}

#[test]
fn ranks_decide_alike_and_roll_back_together_at_every_zero_stage() {
    let (one_cfg, _) = config("ranks-one", &["train.micro_batch=8"]);
    let one = run(&mut trainer(&one_cfg, SPIKES));
    for zero in 0..=3 {
        let name = format!("ranks-zero{zero}");
        let (cfg, _) =
            config(&name, &["train.micro_batch=4", "train.total_batch_tokens=104", &format!("dist.zero={zero}")]);
        let comms = kiln_train::threads::group(2, std::time::Duration::from_secs(60));
        let summaries: Vec<Summary> = std::thread::scope(|s| {
            let ranks: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    let cfg = &cfg;
                    s.spawn(move || {
                        let mut t = Trainer::with_comm(cfg, CpuBackend::<f32>::new(), Box::new(comm)).unwrap();
                        t.inject_faults(Box::new(|position, loss, _| {
                            if SPIKES.contains(&position) {
                                *loss = 1000.0;
                            }
                        }));
                        run(&mut t)
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for summary in &summaries {
            assert_eq!((summary.skipped.as_slice(), summary.rollbacks.as_slice()), (&[8, 9, 10][..], &[(10, 6)][..]));
            assert_eq!(summary.losses.len(), one.losses.len());
            for (a, b) in summary.losses.iter().zip(&one.losses) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "ZeRO stage {zero}: {:?} against one rank's {:?}",
                    summary.losses,
                    one.losses
                );
            }
        }
    }
}
