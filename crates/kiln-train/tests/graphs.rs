//! `train.graphs` on the CPU engine, which captures as a GPU does (an operation called while capturing is recorded
//! with its operands; a replay runs the recorded operations again on the tensors as they are then): a run whose
//! passes are replayed graphs trains exactly as one that runs them, with gradient accumulation, ZeRO stages 1 and 2
//! on one rank, fused bias gradients, either model family and a mixture of experts (accumulating, and recomputed
//! by block and elementwise), and evaluation, checkpoints and resuming work between replays. Where capturing fails,
//! the run goes on without graphs and trains the same.
//! (That a replay takes each step's loss scale, which these runs keep constant, is kiln-cpu's tests/graphs.rs.)

use kiln_core::Config;
use kiln_cpu::CpuBackend;
use kiln_train::{Hooks, Trainer, checkpoint};
use std::path::Path;

/// A small model on the quickstart's addition data.
const SMALL: &[&str] = &[
    "model.n_embd=32",
    "model.n_head=2",
    "train.micro_batch=8",
    "train.max_steps=8",
    "optim.warmup_steps=2",
    "train.eval_every=0",
];

/// Each step's loss and gradient norm, and whether the passes were replayed graphs after the steps.
fn train(extra: &[&str], graphs: bool) -> (Vec<(f32, f32)>, bool) {
    let mut overrides: Vec<String> = SMALL.iter().chain(extra).map(|s| s.to_string()).collect();
    overrides.push(format!("train.graphs={graphs}"));
    let config = Config::load(None, &overrides).unwrap();
    let mut trainer = Trainer::new(&config, CpuBackend::<f32>::new()).unwrap();
    let steps = (0..8).map(|_| trainer.train_step().map(|s| (s.loss, s.grad_norm)).unwrap()).collect();
    (steps, trainer.replays_graphs())
}

#[test]
fn replayed_graphs_train_exactly_as_the_passes_run_directly() {
    const EXPERTS: [&str; 3] = ["model.arch=llama", "model.experts=4", "model.router_aux_loss=0.05"];
    let experts_accumulating = [&EXPERTS[..], &["train.micro_batch=4", "train.total_batch_tokens=104"]].concat();
    let experts_block = [&EXPERTS[..], &["train.recompute=block"]].concat();
    let experts_elementwise = [&EXPERTS[..], &["train.recompute=elementwise"]].concat();
    let cases: [&[&str]; 9] = [
        &[],
        &["train.fuse_bias_gradients=true"],
        // Two micro-batches a step: one graph accumulates, the other reduces.
        &["train.micro_batch=4", "train.total_batch_tokens=104"],
        &["dist.zero=1"],
        &["dist.zero=2", "train.micro_batch=4", "train.total_batch_tokens=104"],
        &["model.arch=llama", "model.n_kv_head=1", "train.recompute=block"],
        // Experts: routing, the balance's gradient zeroed and added to in the passes, and the recomputed routing.
        &experts_accumulating,
        &experts_block,
        &experts_elementwise,
    ];
    for extra in cases {
        let (direct, replayed) = train(extra, false);
        assert!(!replayed, "{extra:?}: graphs replayed without train.graphs");
        let (graphs, replayed) = train(extra, true);
        assert!(replayed, "{extra:?}: no graph was replayed");
        assert_eq!(graphs, direct, "{extra:?}");
        // The steps differ from one another, so the equality above compares steps that each used their own data.
        assert!(direct.windows(2).all(|w| w[0] != w[1]), "{extra:?}: {direct:?}");
    }
}

#[test]
fn a_capture_that_fails_leaves_the_run_going_without_graphs() {
    // ZeRO stage 3 on one rank gathers its weights through the host, which a capture refuses.
    let (direct, _) = train(&["dist.zero=3"], false);
    let (graphs, replayed) = train(&["dist.zero=3"], true);
    assert!(!replayed);
    assert_eq!(graphs, direct);
}

#[test]
fn evaluation_checkpoints_and_resuming_work_between_replays() {
    let dir = std::env::temp_dir().join(format!("kiln-graphs-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = |name: &str, graphs: bool, resume: Option<&Path>| {
        let mut overrides: Vec<String> = SMALL.iter().map(|s| s.to_string()).collect();
        overrides.extend(
            ["train.eval_every=3", "train.eval_steps=2", "train.checkpoint_every=4"].into_iter().map(String::from),
        );
        overrides.push(format!("train.graphs={graphs}"));
        overrides.push(format!("train.out_dir={}", dir.join(name).display()));
        let config = Config::load(None, &overrides).unwrap();
        let mut trainer = Trainer::new(&config, CpuBackend::<f32>::new()).unwrap();
        if let Some(checkpoint) = resume {
            trainer.resume(checkpoint).unwrap();
        }
        let summary = trainer.run(&mut Hooks::default(), true).unwrap();
        assert_eq!(trainer.replays_graphs(), graphs);
        summary
    };
    let direct = run("direct", false, None);
    let graphs = run("graphs", true, None);
    assert_eq!(
        (&graphs.losses, graphs.val_loss, graphs.exact_match),
        (&direct.losses, direct.val_loss, direct.exact_match)
    );
    let resumed = run("resumed", true, Some(&checkpoint::step_dir(&dir.join("graphs/checkpoints"), 4)));
    assert_eq!(resumed.losses, direct.losses[4..]);
    assert_eq!(resumed.val_loss, direct.val_loss);
    std::fs::remove_dir_all(&dir).unwrap();
}
