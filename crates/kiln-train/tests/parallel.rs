//! Data-parallel training with ranks as threads on the CPU engine: N ranks train to the weights of one rank with
//! an N times larger batch, ZeRO stage 1 to the weights of plain data parallelism, ZeRO stages 2 and 3 to those of
//! one rank, a run resumes at another number of ranks and ZeRO stage, a failing rank stops the others promptly,
//! and ranks whose steps are replayed graphs, collectives included, train exactly as ranks that run them.

use kiln_core::{Backend, Communicator, Config, Error, Tensor};
use kiln_cpu::CpuBackend;
use kiln_train::{Hooks, Summary, checkpoint, threads};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A small model on the addition data (13 tokens per sequence) with clipping active, writing a checkpoint after
/// its last step. Each step is 24 sequences.
fn config(out_dir: &Path, extra: &[String]) -> Config {
    let mut all: Vec<String> = [
        "model.n_embd=32",
        "model.n_head=2",
        "train.total_batch_tokens=312",
        "train.max_steps=6",
        "train.checkpoint_every=6",
        "train.eval_steps=1",
        "optim.warmup_steps=2",
        "optim.grad_clip=0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    all.push(format!("train.out_dir={}", out_dir.display()));
    all.extend(extra.iter().cloned());
    Config::load(None, &all).unwrap()
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-parallel-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn train(config: &Config, ranks: usize) -> kiln_core::Result<Summary> {
    threads::train(config, ranks, |_| Ok(CpuBackend::<f32>::new()), None, &mut Hooks::default(), true)
}

/// Continues from `checkpoint` to `train.max_steps` on `ranks` ranks.
fn resume(config: &Config, ranks: usize, checkpoint: &Path) -> Summary {
    threads::train(config, ranks, |_| Ok(CpuBackend::<f32>::new()), Some(checkpoint), &mut Hooks::default(), true)
        .unwrap()
}

/// Every weight of the newest checkpoint under `out_dir`, in file order.
fn final_weights(out_dir: &Path) -> Vec<f32> {
    let (_, dir) = checkpoint::list(&out_dir.join("checkpoints")).pop().expect("a checkpoint");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = file.names();
    names.sort();
    names
        .into_iter()
        .flat_map(|name| {
            let data = file.tensor(name).unwrap().data().to_vec();
            data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<_>>()
        })
        .collect()
}

/// The largest difference between two runs' weights. After six AdamW steps at lr 3e-3 a weight has moved by up to
/// about 0.02; the ranks sum the same per-sequence gradients in another order, so the runs may differ by rounding,
/// amplified where AdamW divides a tiny gradient by its tiny running scale, but by far less than 1e-4.
fn assert_same_weights(a: &Path, b: &Path) {
    let (x, y) = (final_weights(a), final_weights(b));
    assert_eq!(x.len(), y.len());
    let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "weights differ by up to {worst}");
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn n_ranks_match_one_rank_with_an_n_times_larger_micro_batch() {
    for ranks in [2, 3, 4] {
        // 24 sequences per step: 2 accumulation steps of 12 / ranks sequences on each rank, against 2 of 12 on one.
        let mb = 12 / ranks;
        let one_dir = out_dir(&format!("one-{ranks}"));
        let one = train(&config(&one_dir, &["train.micro_batch=12".into()]), 1).unwrap();
        let many_dir = out_dir(&format!("many-{ranks}"));
        let many = train(&config(&many_dir, &[format!("train.micro_batch={mb}")]), ranks).unwrap();
        assert_eq!(many.losses.len(), 6);
        assert_close(&one.losses, &many.losses);
        assert_same_weights(&one_dir, &many_dir);
    }
}

#[test]
fn zero_stage_1_matches_plain_data_parallelism() {
    // Buckets of 10 kB, so that each rank's pieces cut through blocks and decay runs; for both families (a
    // Llama-style model's untied LM head lies after its final norm, the last tensor the backward pass finishes).
    let llama = ["model.arch=llama", "model.n_kv_head=1"].map(str::to_string);
    for (name, family) in [("", &[][..]), ("-llama", &llama[..])] {
        zero_stage_1_matches_plain_data_parallelism_for(name, family);
    }
}

fn zero_stage_1_matches_plain_data_parallelism_for(name: &str, family: &[String]) {
    let mut small_buckets = vec!["train.micro_batch=4".to_string(), "dist.bucket_mb=0.01".to_string()];
    small_buckets.extend_from_slice(family);
    let plain_dir = out_dir(&format!("plain{name}"));
    let plain = train(&config(&plain_dir, &small_buckets), 3).unwrap();
    let zero_dir = out_dir(&format!("zero{name}"));
    let mut zero_config = small_buckets.to_vec();
    zero_config.push("dist.zero=1".into());
    let zero = train(&config(&zero_dir, &zero_config), 3).unwrap();
    assert_close(&plain.losses, &zero.losses);
    assert_same_weights(&plain_dir, &zero_dir);
    // The moments were gathered from the ranks' pieces into the whole: the optimizer files agree too.
    let moments = |dir: &Path| {
        let (_, ckpt) = checkpoint::list(&dir.join("checkpoints")).pop().unwrap();
        let bytes = std::fs::read(ckpt.join("optimizer.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        // Every parameter's m and then v, in name order.
        let mut names = file.names();
        names.sort();
        assert!(names.len() > 2 && names.iter().all(|n| n.starts_with("m.") || n.starts_with("v.")), "{names:?}");
        names
            .into_iter()
            .map(|name| {
                let data = file.tensor(name).unwrap().data().to_vec();
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    for (plain, zero) in moments(&plain_dir).iter().zip(&moments(&zero_dir)) {
        let worst = plain.iter().zip(zero).map(|(p, z)| (p - z).abs()).fold(0.0f32, f32::max);
        let largest = plain.iter().fold(0.0f32, |m, p| m.max(p.abs()));
        assert!(worst <= 1e-4 * largest, "moments differ by up to {worst} (largest {largest})");
    }
}

/// Asserts that two runs' losses agree within `1e-5` relative.
fn assert_relatively_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{a:?} vs {b:?}");
    }
}

#[test]
fn ranks_replaying_graphs_train_exactly_as_ranks_running_their_steps() {
    // Each stage's collectives inside the graphs: plain data parallelism's all-reduce after an accumulating graph,
    // stage 1's reduce-scatter and its gathers in the optimizer's graph, stage 2's reductions into the shares of
    // every micro-batch, stage 3's gathers of each block in the passes.
    for (ranks, stage) in [(2, 0), (2, 1), (4, 2), (2, 3)] {
        let run = |graphs: bool| {
            let dir = out_dir(&format!("graphs-{ranks}-{stage}-{graphs}"));
            let extra = [
                format!("train.micro_batch={}", 6 / ranks),
                format!("dist.zero={stage}"),
                format!("train.graphs={graphs}"),
            ];
            let summary = train(&config(&dir, &extra), ranks).unwrap();
            (summary, final_weights(&dir))
        };
        let ((direct, direct_weights), (replayed, replayed_weights)) = (run(false), run(true));
        assert!(!direct.replayed_graphs && replayed.replayed_graphs, "{ranks} ranks, stage {stage}");
        assert_eq!(replayed.losses, direct.losses, "{ranks} ranks, stage {stage}");
        assert!(replayed_weights == direct_weights, "{ranks} ranks, stage {stage}: the weights differ");
    }
}

/// A thread rank's communicator, except that it refuses to have its all-reduces captured where `refuses`.
struct CaptureRefused {
    inner: threads::ThreadComm,
    refuses: bool,
}

impl Communicator<CpuBackend<f32>> for CaptureRefused {
    fn rank(&self) -> usize {
        Communicator::<CpuBackend<f32>>::rank(&self.inner)
    }
    fn world(&self) -> usize {
        Communicator::<CpuBackend<f32>>::world(&self.inner)
    }
    fn all_reduce_host(&mut self, b: &mut CpuBackend<f32>, values: &mut [f64]) -> kiln_core::Result<()> {
        self.inner.all_reduce_host(b, values)
    }
    fn all_reduce(&mut self, b: &mut CpuBackend<f32>, t: Tensor) -> kiln_core::Result<()> {
        if self.refuses && b.capturing() {
            return Err(Error::Invalid("this rank's all-reduce cannot be captured".into()));
        }
        self.inner.all_reduce(b, t)
    }
    fn reduce_scatter(&mut self, b: &mut CpuBackend<f32>, t: Tensor, into: Tensor) -> kiln_core::Result<()> {
        self.inner.reduce_scatter(b, t, into)
    }
    fn all_gather(&mut self, b: &mut CpuBackend<f32>, t: Tensor, from: Tensor) -> kiln_core::Result<()> {
        self.inner.all_gather(b, t, from)
    }
    fn wait(&mut self, b: &mut CpuBackend<f32>) -> kiln_core::Result<()> {
        self.inner.wait(b)
    }
    fn capturable(&self) -> bool {
        true
    }
}

#[test]
fn a_capture_that_fails_on_one_rank_stops_every_rank() {
    let config = config(&out_dir("capture-refused"), &["train.micro_batch=6".into(), "train.graphs=true".into()]);
    let comms =
        std::sync::Mutex::new(threads::group(2, Duration::from_secs(10)).into_iter().map(Some).collect::<Vec<_>>());
    let started = Instant::now();
    let err = threads::train_ranks(
        &config,
        2,
        |rank, _| {
            let inner = comms.lock().unwrap()[rank].take().unwrap();
            let comm = CaptureRefused { inner, refuses: rank == 1 };
            Ok((CpuBackend::<f32>::new(), Box::new(comm) as Box<dyn Communicator<CpuBackend<f32>>>))
        },
        None,
        &mut Hooks::default(),
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    // Whichever rank's error came first: rank 1's own, or rank 0's report of it.
    let own = err.contains("rank 1 stops: capturing a step's work failed (this rank's all-reduce cannot be captured");
    assert!(own || err.contains("rank 0 stops: 1 of the ranks could not"), "{err}");
    assert!(err.contains("set train.graphs = false"), "{err}");
}

#[test]
fn zero_stages_2_and_3_train_like_one_rank() {
    // 12 steps of 24 sequences: one rank in 2 micro-batches of 12, and 2 and 4 ranks of ZeRO stages 2 and 3 in 2
    // micro-batches each, so that every micro-batch's gradients are reduced into the ranks' shares (with block
    // recomputation at stage 3, which runs each block's forward pass again on the weights gathered for its backward;
    // and with fused bias gradients, whose sums of a block's gradients are taken while the block after it runs).
    let llama = ["model.arch=llama", "model.n_kv_head=1"].map(str::to_string);
    for (name, family) in [("", &[][..]), ("-llama", &llama[..])] {
        let steps = ["train.max_steps=12".to_string(), "train.checkpoint_every=12".into()];
        let with = |extra: &[String]| [&steps[..], family, extra].concat();
        let one_dir = out_dir(&format!("stages-one{name}"));
        let one = train(&config(&one_dir, &with(&["train.micro_batch=12".into()])), 1).unwrap();
        for (stage, recompute, fused) in
            [(2, "none", false), (3, "none", false), (3, "block", false), (3, "none", true)]
        {
            for ranks in [2, 4] {
                let dir = out_dir(&format!("stage{stage}-{recompute}-{fused}-{ranks}{name}"));
                let extra = [
                    format!("train.micro_batch={}", 12 / ranks),
                    format!("dist.zero={stage}"),
                    format!("train.recompute={recompute}"),
                    format!("train.fuse_bias_gradients={fused}"),
                ];
                let many = train(&config(&dir, &with(&extra)), ranks).unwrap();
                assert_eq!(many.losses.len(), 12);
                assert_relatively_close(&one.losses, &many.losses);
                assert_same_weights(&one_dir, &dir);
            }
        }
    }
}

#[test]
fn checkpoints_of_zero_stage_3_and_of_one_rank_resume_as_each_other() {
    // 4 ranks at stage 3 against 1 rank at stage 0, each resumed from the other's step-3 checkpoint; then stage 2
    // from stage 3's.
    let every = "train.checkpoint_every=3".to_string();
    let stage_3 = ["train.micro_batch=3".to_string(), "dist.zero=3".into(), every.clone()];
    let stage_2 = ["train.micro_batch=6".to_string(), "dist.zero=2".into(), every.clone()];
    let stage_0 = ["train.micro_batch=12".to_string(), every];
    let (four_dir, one_dir) = (out_dir("stage3-four-ranks"), out_dir("stage0-one-rank"));
    let four = train(&config(&four_dir, &stage_3), 4).unwrap();
    let one = train(&config(&one_dir, &stage_0), 1).unwrap();
    assert_relatively_close(&four.losses, &one.losses);
    let resumes =
        [(&four_dir, &stage_0[..], 1, &four), (&one_dir, &stage_3[..], 4, &one), (&four_dir, &stage_2[..], 2, &four)];
    for (from, extra, ranks, full) in resumes {
        let again = out_dir(&format!("stage-resume-{ranks}"));
        let step_3 = checkpoint::step_dir(&from.join("checkpoints"), 3);
        let rest = resume(&config(&again, extra), ranks, &step_3);
        assert_relatively_close(&rest.losses, &full.losses[3..]);
        assert_same_weights(from, &again);
    }
}

#[test]
fn a_run_resumes_at_another_number_of_ranks() {
    let dir = out_dir("resume-2");
    let extra = ["train.micro_batch=4".to_string(), "train.checkpoint_every=3".into(), "dist.zero=1".into()];
    let full = train(&config(&dir, &extra), 2).unwrap();
    let step_3 = checkpoint::step_dir(&dir.join("checkpoints"), 3);
    for ranks in [1, 3] {
        let again = out_dir(&format!("resume-{ranks}"));
        let mut resumed_config = config(&again, &extra);
        resumed_config.dist.zero = (ranks % 2) as u8;
        let rest = resume(&resumed_config, ranks, &step_3);
        assert_close(&rest.losses, &full.losses[3..]);
        assert_same_weights(&dir, &again);
    }
}

#[test]
fn a_failing_rank_stops_every_rank_promptly() {
    let config = config(&out_dir("failing"), &["train.micro_batch=4".into()]);
    let started = Instant::now();
    let err = threads::train(
        &config,
        3,
        |rank| match rank {
            2 => Err(Error::Invalid("rank 2 could not start its engine".into())),
            _ => Ok(CpuBackend::<f32>::new()),
        },
        None,
        &mut Hooks::default(),
        false,
    )
    .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    assert!(err.to_string().contains("rank 2 could not start"), "the first failure is reported: {err}");
}

#[test]
fn every_rank_stops_after_the_step_on_which_one_asked() {
    let config = config(&out_dir("stop"), &["train.micro_batch=4".into()]);
    let mut hooks = Hooks::default();
    hooks.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = threads::train(&config, 3, |_| Ok(CpuBackend::<f32>::new()), None, &mut hooks, false).unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err}");
}

#[test]
fn ranks_that_find_different_checkpoints_refuse_to_continue() {
    let dir = out_dir("disagree");
    let extra =
        ["train.micro_batch=4".to_string(), "train.checkpoint_every=2".into(), "train.keep_checkpoints=3".into()];
    let whole = config(&dir, &extra);
    train(&whole, 1).unwrap();
    let root = dir.join("checkpoints");
    // Rank 0 finds the step-4 checkpoint, rank 1 the step-2 one (as with an out_dir on each node's own disk); and
    // the same where rank 0's is past train.max_steps, which must not let it stop alone.
    let past_the_end = config(&dir, &[&extra[..], &["train.max_steps=3".to_string()]].concat());
    for config in [&whole, &past_the_end] {
        resume_from_different_checkpoints(config, &root);
    }
}

fn resume_from_different_checkpoints(config: &Config, root: &Path) {
    let comms = threads::group(2, Duration::from_secs(10));
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .zip([4, 2])
            .map(|(comm, step)| {
                s.spawn(move || {
                    let mut trainer =
                        kiln_train::Trainer::with_comm(config, CpuBackend::<f32>::new(), Box::new(comm)).unwrap();
                    trainer.resume(&checkpoint::step_dir(root, step)).unwrap_err().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in errors {
        assert!(e.contains("different checkpoints") && e.contains("rank 1 at step 2"), "{e}");
    }
}
