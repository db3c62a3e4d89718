//! `train.graphs` on the CPU engine, which captures as a GPU does (an operation called while capturing is recorded
//! with its operands; a replay runs the recorded operations again on the tensors as they are then): a run whose
//! passes are replayed graphs trains exactly as one that runs them, with gradient accumulation, ZeRO stages 1 and 2
//! on one rank, and either model family. Where capturing fails, the run goes on without graphs and trains the same.
//! (That a replay takes each step's loss scale, which these runs keep constant, is kiln-cpu's tests/graphs.rs.)

use kiln_core::Config;
use kiln_cpu::CpuBackend;
use kiln_train::Trainer;

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
    let cases: [&[&str]; 5] = [
        &[],
        // Two micro-batches a step: one graph accumulates, the other reduces.
        &["train.micro_batch=4", "train.total_batch_tokens=104"],
        &["dist.zero=1"],
        &["dist.zero=2", "train.micro_batch=4", "train.total_batch_tokens=104"],
        &["model.arch=llama", "model.n_kv_head=1", "train.recompute=block"],
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
