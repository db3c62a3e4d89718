//! The training loop, over any [`Backend`].
//!
//! One optimizer step: draw the step's sequences (a function of seed and data position, which is the step unless the
//! guard has passed over data), run forward and backward over each micro-batch with gradients accumulating, take the
//! global gradient norm, let the [`guard`] judge the loss and the norm (from the host numbers the step reads anyway),
//! and unless it skips the step, clip and apply AdamW with the scheduled learning rate, decaying only the weight
//! matrices and embeddings. After too many skips in a row the guard rolls the run back to a checkpoint. Every
//! `eval_every` steps the validation loss is measured on the same held-out sequences each time. The caller sees
//! progress through [`Hooks`] and the results through [`Summary`]; the trainer logs with `tracing` and appends one JSON
//! object per step to `out_dir/metrics.jsonl`. Around the loop: [`checkpoint`]s for exact resume and Hugging Face
//! interchange, written and read a tensor at a time ([`tensor_files`]), weights from llm.c's files ([`llmc`]), and,
//! apart from training, a model read from any such directory for sampling and scoring ([`inference`]).
//!
//! Data parallelism is part of every step, through a [`Communicator`] (a job of one rank has one that does
//! nothing): each rank draws its own rows of the global batch ([`parallel`]), the last micro-batch's backward pass
//! starts reducing each bucket of gradients as soon as it is complete, and the host numbers every rank must agree on
//! (the batch's target count, the loss, the gradient norm, whether to stop) are summed across ranks. With ZeRO
//! stage 1 each rank keeps the AdamW moments of its own piece of every bucket, updates that piece, and the pieces
//! are then gathered. Stage 2 makes each block a bucket, reduced every micro-batch into the rank's share of the
//! gradients, with no whole gradient vector kept; stage 3 shards the weights too, gathering each block's into a
//! buffer as a pass reaches it. Before anything is allocated the memory [`plan`] is checked against the memory free.
//! Only rank 0 logs and writes files; it evaluates alone, except under stage 3, where every rank takes part.

pub mod checkpoint;
pub mod guard;
pub mod inference;
pub mod llmc;
pub mod metrics;
pub mod parallel;
pub mod plan;
pub mod schedule;
pub mod tensor_files;
pub mod threads;

use checkpoint::{Progress, Source};
use guard::{Guard, Verdict};
use kiln_core::comm::{Solo, piece};
use kiln_core::config::MicroBatch;
use kiln_core::{AdamWStep, Backend, Communicator, Config, Error, Graph, Result, Role, Tensor};
use kiln_data::{Addition, Dataset};
use kiln_model::params::decay_runs;
use kiln_model::params::initial_weights;
use kiln_model::{Blocks, Model, ModelSpec, Moment, Pass, TrainingMemory, generate};
use metrics::{Event, Metrics, StepRecord};
use parallel::{BucketCursor, Buckets, Stragglers};
use plan::MemoryPlan;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How a run reports back while it goes.
#[derive(Default)]
pub struct Hooks {
    /// Set (by a Ctrl-C handler, say) to end the run after the current step.
    pub stop: Arc<AtomicBool>,
    /// Called after every step with the number of steps done.
    pub on_step: Option<Box<dyn FnMut(u64)>>,
}

/// What a finished run measured.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub steps: u64,
    /// The step the run started from: a resumed run's checkpoint, or an earlier one a rollback returned to.
    pub first_step: u64,
    /// Training loss of every step after `first_step`, skipped ones included, as the run ended: a rollback drops
    /// those of the steps it undid.
    pub losses: Vec<f32>,
    /// With experts and a balancing loss, its value (transformers' `aux_loss`) at the same steps as `losses`.
    pub aux_losses: Vec<f32>,
    /// The steps (counted from 1) whose updates the guard skipped, in the order it did.
    pub skipped: Vec<u64>,
    /// The guard's rollbacks: `(step, checkpoint step)` for each.
    pub rollbacks: Vec<(u64, u64)>,
    pub val_loss: Option<f32>,
    /// For the synthetic addition task: the fraction of held-out sums answered exactly.
    pub exact_match: Option<f32>,
    /// A few held-out prompts with the model's completions.
    pub samples: Vec<Sample>,
    /// Median training throughput over the run's steps.
    pub tokens_per_s: f64,
    /// Whether the steps' passes ran as replays of captured graphs at the end (`train.graphs`).
    pub replayed_graphs: bool,
}

impl Summary {
    /// Forgets the losses of the steps after the first `kept` from `first_step`.
    fn keep_steps(&mut self, kept: usize) {
        self.losses.truncate(kept);
        self.aux_losses.truncate(kept);
    }
}

/// A held-out prompt, the model's greedy completion, and whether it was exactly right.
#[derive(Clone, Debug)]
pub struct Sample {
    pub prompt: String,
    pub completion: String,
    pub correct: bool,
}

/// Held-out sums scored at the end of a synthetic-addition run.
const EXACT_MATCH_PROBLEMS: usize = 1000;
/// Where the ranks' compute times start in `Trainer::agreed`.
const RANK_TIMES: usize = 4;
const SAMPLES_SHOWN: usize = 5;

pub struct Trainer<B: Backend> {
    config: Config,
    backend: B,
    comm: Box<dyn Communicator<B>>,
    model: Model,
    data: Dataset,
    /// AdamW moments of the parameters this rank updates: all of them, or under ZeRO its pieces, one
    /// after the other.
    m: Tensor,
    v: Tensor,
    /// What this rank updates, as `(offset in the parameters, offset in m and v, length)`.
    owned: Vec<(usize, usize, usize)>,
    /// `owned` cut where weight decay starts or stops: `(offset in the parameters, offset in m and v, length,
    /// decay)`, one AdamW call each.
    updates: Vec<(usize, usize, usize, bool)>,
    buckets: Buckets,
    /// The ZeRO stage: 0 to 3.
    zero: u8,
    /// Under ZeRO stages 2 and 3, where the rank keeps its share of the gradients.
    share: Option<GradientShare>,
    /// Under ZeRO stage 3, where the rank keeps its share of the weights.
    weights: Option<WeightShare>,
    /// Sequences per micro-batch (`train.micro_batch`, resolved when it is "auto").
    micro_batch: usize,
    /// The memory plan the run was checked against, shown when the engine runs out of memory after all.
    plan: MemoryPlan,
    /// See [`StepValues`], and where the host reads the sums into.
    values: StepValues,
    sums: Vec<f32>,
    graphs: Graphs,
    /// The host numbers summed across ranks after each step: loss, squared norm of the owned gradient pieces,
    /// "stop", the experts' balancing loss (see [`StepValues`]), then from [`RANK_TIMES`] on every rank's compute
    /// time (each rank fills its own entry).
    agreed: Vec<f64>,
    /// Set before each step when the user asked to stop; every rank stops after a step on which any rank asked.
    stop_requested: bool,
    stragglers: Stragglers,
    accumulation: usize,
    /// One step's token ids and targets, `accumulation × micro_batch × block_size` each: filled on the host,
    /// uploaded one micro-batch at a time.
    inputs: Vec<u32>,
    targets: Vec<u32>,
    step: u64,
    /// See [`Trainer::set_profile`].
    profile: bool,
    guard: Guard,
    /// The checkpoint this trainer resumed from, if it did.
    resumed_from: Option<PathBuf>,
    /// See [`Trainer::inject_faults`].
    faults: Option<Fault>,
}

/// Changes what the guard sees of a step: called with the step's data position, loss and gradient norm.
pub type Fault = Box<dyn FnMut(u64, &mut f32, &mut f32)>;

/// What one optimizer step measured.
#[derive(Clone, Debug)]
pub struct StepStats {
    pub loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    /// With experts and a balancing loss: transformers' `aux_loss`, the balancing loss before its coefficient, as
    /// the mean over the step's rows of each pass's (perfectly balanced experts give `experts_per_token`).
    pub aux_loss: Option<f32>,
    pub lr: f32,
    /// Drawing the step's sequences on the host.
    pub data_ms: f64,
    /// Forward and backward passes over every micro-batch, and reading back the loss.
    pub passes_ms: f64,
    /// The part of `passes_ms` the host spent queueing the passes' work, before it waited for the device: near
    /// `passes_ms`, the step is bound by launching kernels rather than by running them.
    pub queue_ms: f64,
    /// Gradient norm, clipping and AdamW.
    pub optimizer_ms: f64,
    /// Whether any rank asked to stop after this step.
    pub stop: bool,
    /// The guard's verdict on the step: unless it is [`Verdict::Apply`], the update was left out.
    pub verdict: Verdict,
}

impl<B: Backend> Trainer<B> {
    /// Opens the data and builds the model on `backend` for a job of one rank: every buffer a step needs is
    /// allocated here.
    pub fn new(config: &Config, backend: B) -> Result<Self> {
        Trainer::with_comm(config, backend, Box::new(Solo))
    }

    /// [`Trainer::new`] for one rank of a data-parallel job whose ranks talk through `comm`. Every rank builds
    /// the same initial weights from the seed.
    pub fn with_comm(config: &Config, mut backend: B, mut comm: Box<dyn Communicator<B>>) -> Result<Self> {
        let t = config.model.block_size;
        let data = Dataset::open(&config.data, t)?;
        let shape = ModelSpec::new(&config.model, vocabulary(config, data.vocab_size())?);
        // Before any size is worked out from the shape (every rank refuses the same one alike).
        shape.check_size(1)?;
        let (rank, world) = (comm.rank(), comm.world());
        // Nothing is allocated before the plan says that it fits.
        let memory = backend.memory_model();
        let fused = config.train.fuse_bias_gradients;
        let capacity = capacity(&mut backend, comm.as_mut(), memory.as_ref(), &shape, fused)?;
        let mut config = config.clone();
        let mb = plan::micro_batch(&config, shape, world, memory.as_ref(), capacity)?;
        config.train.micro_batch = MicroBatch::Sequences(mb);
        let plan = MemoryPlan::new(&config, shape, mb, world, memory.as_ref())?;
        if let Some(capacity) = capacity {
            // Every rank refuses; rank 0, which speaks for the job, works out what would fit.
            plan.check_fits(capacity, || match rank {
                0 => plan::describe_fixes(&plan::fixes(&config, shape, world, memory.as_ref(), capacity)),
                _ => "rank 0 names the settings that would fit\n".into(),
            })?;
        }
        let Allocated { model, m, v, owned, updates, buckets, share, weights, values } =
            Allocated::new(&mut backend, &config, shape, mb, world, rank).map_err(|e| with_plan(e, &plan))?;
        let weight_share = weights.as_ref().map(|w| w.share);
        let put =
            &mut |b: &mut B, range, values: &[f32]| put_weights(b, &owned, weight_share, model.params, range, values);
        match config.model.init.as_deref().map(|i| i.split_once(':')) {
            None => {
                let len = model.units.last().map_or(0, |u| u.end);
                put(&mut backend, 0..len, &initial_weights(&shape, &model.layout, len, config.train.seed))?
            }
            Some(Some(("hf", dir))) => checkpoint::load_weights(Path::new(dir), &model, &mut backend, put)?,
            Some(Some(("llmc", file))) => llmc::load(Path::new(file), &model, &mut backend, put)?,
            Some(_) => return Err(Error::Usage("model.init must be hf:DIR or llmc:FILE".into())),
        }
        let accumulation = plan.accumulation;
        let tokens_per_step = accumulation * mb * t;
        let guard = Guard::new(&config.train.guard);
        if config.train.graphs && !comm.capturable() && rank == 0 {
            tracing::warn!(
                "train.graphs: the collectives of these {world} ranks cannot be captured (NCCL's are, with one GPU a \
                 process, as `kiln launch` starts them); they go without graphs"
            );
        }
        let graphs = Graphs::new(config.train.graphs && comm.capturable());
        let mut trainer = Trainer {
            plan,
            sums: vec![0.0; values.sums.len],
            values,
            graphs,
            zero: config.dist.zero,
            share,
            weights,
            micro_batch: mb,
            config,
            backend,
            comm,
            model,
            data,
            m,
            v,
            owned,
            updates,
            buckets,
            agreed: vec![0.0; RANK_TIMES + world],
            stop_requested: false,
            stragglers: Stragglers::new(world),
            accumulation,
            inputs: vec![0; tokens_per_step],
            targets: vec![0; tokens_per_step],
            step: 0,
            profile: false,
            guard,
            resumed_from: None,
            faults: None,
        };
        trainer.gather_resident()?;
        Ok(trainer)
    }

    /// Under ZeRO stage 3, gathers the weights that stay whole through a step (the embeddings, the final norm and
    /// the LM head) from the ranks' shares: after the weights are set and after each update.
    fn gather_resident(&mut self) -> Result<()> {
        gather_resident(&mut self.backend, self.comm.as_mut(), self.weights.as_ref())
    }

    /// Where this run's checkpoints go: `out_dir/checkpoints`.
    pub fn checkpoint_root(&self) -> PathBuf {
        checkpoint::root(&self.config)
    }

    /// Writes a checkpoint of the current step (see [`checkpoint`]) and returns its directory. Every rank must
    /// call it (under ZeRO the weights and moments are gathered from all of them); only rank 0 writes.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let root = self.checkpoint_root();
        let (config, model, codec) = (self.config.clone(), &self.model, self.data.codec());
        let write = self.comm.rank() == 0;
        let (backend, comm) = (&mut self.backend, &mut self.comm);
        let gather = Gather { owned: &self.owned, zero: self.zero > 0, lead: write };
        // Under ZeRO stage 3 the weights are each rank's share, packed as the moments are.
        let (params, packed) = self.weights.as_ref().map_or((model.params, false), |w| (w.share, true));
        let (m, v) = (self.m, self.v);
        let progress = Progress { step: self.step, guard: self.guard.state.clone() };
        checkpoint::save(
            &root,
            &progress,
            &config,
            model,
            codec.as_ref(),
            config.train.keep_checkpoints,
            write,
            &mut |source, range, out| match source {
                Source::Params => gather.range(backend, comm.as_mut(), params, range, packed, out),
                Source::M => gather.range(backend, comm.as_mut(), m, range, true, out),
                Source::V => gather.range(backend, comm.as_mut(), v, range, true, out),
            },
        )
    }

    /// Fails on every rank unless all ranks resume at the same `step` and, with `loaded`, with the same weights:
    /// each process finds the checkpoint it resumes from by itself, and an `out_dir` that is not shared between
    /// nodes could hand them different ones, which the collectives would never notice.
    fn check_ranks_agree(&mut self, step: u64, loaded: bool) -> Result<()> {
        if self.comm.world() == 1 {
            return Ok(());
        }
        let weights = if loaded { self.backend.sum(self.model.params)? as f64 } else { 0.0 };
        let mine = [step as f64, weights];
        let seen = self.comm.gather_host(&mut self.backend, &mine)?;
        match seen.chunks(2).position(|other| other != &seen[..2]) {
            None => Ok(()),
            Some(other) => Err(Error::Usage(format!(
                "the ranks resumed from different checkpoints: rank 0 at step {} and rank {other} at step {} (or with \
                 other weights); every rank must see the same out_dir/checkpoints (a shared filesystem)",
                seen[0],
                seen[2 * other]
            ))),
        }
    }

    /// Continues from the checkpoint in `dir`: weights, optimizer moments, step and the guard's state. The run then
    /// goes on as the one that wrote it would have, at any number of ranks (each rank takes the moments of what it
    /// updates): with the same data and the same decisions of the guard, and on one rank bit for bit.
    pub fn resume(&mut self, dir: &Path) -> Result<u64> {
        // Before the tensors are read (they may be many GB), and with every rank's step: ranks must not split here.
        let (at, max_steps) = (checkpoint::progress(dir)?.step, self.config.train.max_steps);
        self.check_ranks_agree(at, false)?;
        if at > max_steps {
            return Err(Error::Usage(format!(
                "train.max_steps is {max_steps}, but {} is at step {at}: nothing is left to train; raise \
                 train.max_steps to go on",
                dir.display(),
            )));
        }
        let progress = self.load_checkpoint(dir)?;
        self.guard.state = progress.guard;
        self.resumed_from = Some(dir.to_path_buf());
        if self.comm.rank() == 0 {
            tracing::info!("resumed from {} at step {}", dir.display(), self.step);
        }
        Ok(self.step)
    }

    /// Loads the weights, moments and step of the checkpoint in `dir`, and returns where its run stood.
    fn load_checkpoint(&mut self, dir: &Path) -> Result<Progress> {
        let (owned, m, v, params) = (&self.owned, self.m, self.v, self.model.params);
        let share = self.weights.as_ref().map(|w| w.share);
        // Each tensor's moments go to the pieces of it this rank updates, where they sit in m and v.
        let progress =
            checkpoint::load(
                dir,
                &self.model,
                &mut self.backend,
                &mut |backend, source, range, values| match source {
                    Source::M => put_pieces(backend, owned, m, range, values),
                    Source::V => put_pieces(backend, owned, v, range, values),
                    Source::Params => put_weights(backend, owned, share, params, range, values),
                },
            )?;
        self.step = progress.step;
        self.gather_resident()?;
        self.check_ranks_agree(self.step, true)?;
        Ok(progress)
    }

    /// The guard's rollback from the current step, which failed as the last of too many in a row: back to the newest
    /// checkpoint from no later than `good_until` (the step count before the first of those failures), whose newer
    /// ones are deleted as the run's abandoned future, and past the data from there to here. Returns the
    /// checkpoint's step. Every rank finds the checkpoint itself, and all must find the same one before any loads it.
    fn roll_back(&mut self, good_until: u64) -> Result<u64> {
        let root = self.checkpoint_root();
        let found = checkpoint::list(&root).into_iter().rev().find(|(step, _)| *step <= good_until);
        // Every rank's find: one more than the step, so that 0 says "none".
        let mine = found.as_ref().map_or(0.0, |(step, _)| *step as f64 + 1.0);
        let seen = self.comm.gather_host(&mut self.backend, &[mine])?;
        let (to, dir) = match found {
            Some(found) if seen.iter().all(|&s| s == seen[0]) => found,
            _ if seen.iter().all(|&s| s == 0.0) => {
                return Err(Error::Diverged(format!(
                    "the guard would roll back to a checkpoint from step {good_until} or earlier, but {} has none \
                     (set train.checkpoint_every to keep some)",
                    root.display()
                )));
            }
            _ => {
                return Err(Error::Diverged(format!(
                    "the guard would roll back, but the ranks find different checkpoints in {} (steps {:?}, 0 for \
                     none): every rank must see the same out_dir/checkpoints (a shared filesystem)",
                    root.display(),
                    seen.iter().map(|&s| (s as u64).saturating_sub(1)).collect::<Vec<_>>()
                )));
            }
        };
        let from = self.step;
        let progress = self.load_checkpoint(&dir)?;
        self.guard.rolled_back(progress.guard, to, from);
        if self.comm.rank() == 0 {
            for (_, newer) in checkpoint::list(&root).into_iter().filter(|(step, _)| *step > to) {
                std::fs::remove_dir_all(&newer).map_err(|e| Error::io(&newer, e))?;
            }
        }
        Ok(to)
    }

    /// Makes each step wait for the device before it returns, so that [`StepStats::optimizer_ms`] is the
    /// optimizer's time rather than its launch time (for benchmarks: it costs a synchronisation per step).
    pub fn set_profile(&mut self, on: bool) {
        self.profile = on;
    }

    /// For tests of the guard: `fault` may change the loss and gradient norm the guard sees of each step, given the
    /// step's data position (a bad batch stays bad when its step is run again after a rollback).
    #[doc(hidden)]
    pub fn inject_faults(&mut self, fault: Fault) {
        self.faults = Some(fault);
    }

    /// Each rank's own work in the last step's passes, in ms, rank by rank: on a device, the device's time for them;
    /// on the host, the time outside collectives.
    pub fn rank_step_ms(&self) -> &[f64] {
        &self.agreed[RANK_TIMES..]
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Whether the steps' passes run as replays of captured graphs (`train.graphs`): from the second step on, unless
    /// capturing failed.
    pub fn replays_graphs(&self) -> bool {
        self.graphs.captured.iter().any(Option::is_some)
    }

    /// Sequences per micro-batch, as `train.micro_batch` gave it or as "auto" resolved it.
    pub fn micro_batch(&self) -> usize {
        self.micro_batch
    }

    /// Micro-batches per optimizer step on each rank.
    pub fn accumulation_steps(&self) -> usize {
        self.accumulation
    }

    /// Runs from the current step to `train.max_steps`, writing `out_dir` if `write_outputs` (on rank 0).
    pub fn run(&mut self, hooks: &mut Hooks, write_outputs: bool) -> Result<Summary> {
        let cfg = self.config.clone();
        let train = &cfg.train;
        let (world, lead) = (self.comm.world(), self.comm.rank() == 0);
        let mut metrics = if write_outputs && lead {
            Some(Metrics::create(&PathBuf::from(&train.out_dir), &cfg, self.step)?)
        } else {
            None
        };
        let shape = self.model.spec;
        // Only rank 0 speaks: the other ranks' messages would repeat it.
        let _quiet = (!lead).then(|| tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default()));
        // Heads' width where it is not n_embd / n_head, and the variants a family's usual description leaves out.
        let heads = match shape.head_dim * shape.n_head == shape.n_embd {
            true => format!("{} heads", shape.n_head),
            false => format!("{} heads of {}", shape.n_head, shape.head_dim),
        };
        let variants: String = [
            shape.qk_norm.then(|| ", QK-norm".to_string()),
            shape.nope_interval.map(|k| format!(", NoPE every {k} blocks")),
            shape.sliding_window.map(|w| format!(", a sliding window of {w}")),
            shape.experts.map(|e| {
                let active = shape.num_active_params() as f64 / 1e6;
                format!(", {} of {} experts a token ({active:.2}M parameters active)", e.per_token, e.count)
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        tracing::info!(
            "model: {}, {} layers, {heads} ({} key/value){variants}, {} wide, {} positions, vocabulary {} (padded to \
             {}); {:.2}M parameters",
            shape.arch.name(),
            shape.n_layer,
            shape.n_kv_head,
            shape.n_embd,
            shape.block_size,
            shape.vocab,
            shape.padded_vocab,
            shape.num_counted_params() as f64 / 1e6
        );
        tracing::info!(
            "batch: {} tokens per step = {} sequences × {} tokens × {} accumulation steps × {world} rank{}; backend \
             {}, {:.2} GiB allocated{} before the first step (kernels' working memory comes on top in it){}",
            cfg.total_batch_tokens(),
            self.micro_batch,
            cfg.model.block_size,
            self.accumulation,
            if world == 1 { "" } else { "s" },
            self.backend.name(),
            self.backend.allocated_bytes() as f64 / (1u64 << 30) as f64,
            if world == 1 { "" } else { " per rank" },
            if self.zero > 0 { format!("; ZeRO stage {}", self.zero) } else { String::new() }
        );
        if let (Some(m), Some(dir)) = (&mut metrics, &self.resumed_from) {
            m.append(&StepRecord {
                step: self.step,
                event: Some(Event::Resume { from: dir.display().to_string() }),
                ..Default::default()
            })?;
        }
        let mut summary = Summary { first_step: self.step, ..Summary::default() };
        let mut step_times = Vec::new();
        let flops_per_token = shape.flops_per_token(cfg.model.block_size);
        while self.step < train.max_steps {
            let started = Instant::now();
            self.stop_requested = hooks.stop.load(Ordering::Relaxed);
            let StepStats { loss, grad_norm, aux_loss, lr, stop, verdict, .. } = self.train_step()?;
            let seconds = started.elapsed().as_secs_f64();
            step_times.push(seconds);
            let step = self.step;
            summary.losses.push(loss);
            summary.aux_losses.extend(aux_loss);
            if !loss.is_finite() && verdict.applies() {
                return Err(Error::Diverged(format!(
                    "the loss became {loss} at step {step} (train.guard.enabled = true skips such steps instead)"
                )));
            }
            let tokens_per_s = cfg.total_batch_tokens() as f64 / seconds;
            let tflops = tokens_per_s * flops_per_token / 1e12;
            let last = step == train.max_steps;
            if step == 1 || step % train.log_every == 0 || last {
                tracing::info!(
                    "step {step:>6}/{} | loss {loss:.4}{} | lr {lr:.2e} | norm {grad_norm:.3} | {:.1} ms | \
                     {tokens_per_s:.0} tok/s{}",
                    train.max_steps,
                    aux_loss.map_or(String::new(), |aux| format!(" | aux {aux:.4}")),
                    seconds * 1e3,
                    describe_ranks(self.rank_step_ms())
                );
            }
            let mut record = StepRecord {
                step,
                loss: Some(loss),
                aux_loss,
                lr: Some(lr),
                grad_norm: Some(grad_norm),
                step_ms: Some(seconds * 1e3),
                tokens: Some(step * cfg.total_batch_tokens() as u64),
                tokens_per_s: Some(tokens_per_s),
                tflops: Some(tflops),
                // The job's arithmetic over the peak of all its GPUs.
                mfu: self.backend.peak_tflops().map(|peak| tflops / (peak * world as f64)),
                rank_step_ms: (world > 1).then(|| self.rank_step_ms().to_vec()),
                allocated_bytes: Some(self.backend.allocated_bytes()),
                ..Default::default()
            };
            if let Verdict::Skip(why) | Verdict::RollBack { why, .. } | Verdict::Stop(why) = &verdict {
                tracing::warn!("step {step:>6}/{} | update skipped: {why}", train.max_steps);
                summary.skipped.push(step);
                record.event = Some(Event::Skip { why: why.clone() });
            }
            // Under ZeRO stage 3 every rank takes part in evaluating: each gathers the weights with the others.
            let evaluates = lead || self.weights.is_some();
            if evaluates && (last || (train.eval_every > 0 && step % train.eval_every == 0)) {
                let val = self.validation_loss()?;
                tracing::info!("step {step:>6}/{} | val loss {val:.4}", train.max_steps);
                record.val_loss = Some(val);
                summary.val_loss = Some(val);
            }
            if evaluates && last && self.data.addition().is_some() {
                let (accuracy, samples) = self.exact_match()?;
                record.exact_match = Some(accuracy);
                summary.exact_match = Some(accuracy);
                summary.samples = samples;
            }
            if let Some(m) = &mut metrics {
                m.append(&record)?;
            }
            match verdict {
                Verdict::Stop(why) => return Err(Error::Diverged(format!("step {step}: {why}; stopping"))),
                Verdict::RollBack { why, .. } if !write_outputs => {
                    return Err(Error::Diverged(format!(
                        "step {step}: {why}, and this run writes no checkpoints to roll back to; stopping"
                    )));
                }
                Verdict::RollBack { why, good_until } => {
                    let to = self.roll_back(good_until)?;
                    let state = &self.guard.state;
                    tracing::warn!(
                        "step {step:>6}/{} | {why}: rolled back to the checkpoint of step {to}, passing over the data of \
                         steps {}..={step} (rollback {} of at most {})",
                        train.max_steps,
                        to + 1,
                        state.rollbacks,
                        train.guard.max_rollbacks
                    );
                    summary.rollbacks.push((step, to));
                    if to < summary.first_step {
                        summary.keep_steps(0);
                        summary.first_step = to;
                    }
                    summary.keep_steps((to - summary.first_step) as usize);
                    if let Some(m) = &mut metrics {
                        let rollback = Event::Rollback {
                            to_step: to,
                            why,
                            rollbacks: state.rollbacks,
                            data_skipped: state.data_skipped,
                        };
                        m.append(&StepRecord { step, event: Some(rollback), ..Default::default() })?;
                    }
                }
                Verdict::Skip(_) | Verdict::Apply => {}
            }
            if let Some(f) = &mut hooks.on_step {
                f(self.step);
            }
            let interrupted = stop && !last;
            let every = train.checkpoint_every;
            // Not while steps are failing: the checkpoint a rollback returns to comes from before them (and is kept
            // whatever else is written then). After a rollback, only on an interrupt: of the step returned to.
            let failing = self.guard.state.failed_in_a_row > 0;
            let on_schedule = || self.step == step && ((step % every == 0 && !failing) || last);
            let due = every > 0 && (on_schedule() || interrupted);
            if write_outputs && due {
                let dir = self.save_checkpoint()?;
                tracing::info!("step {step:>6}/{} | checkpoint {}", train.max_steps, dir.display());
            }
            if interrupted {
                tracing::warn!("interrupted after step {step}");
                return Err(Error::Interrupted);
            }
        }
        summary.steps = self.step;
        summary.replayed_graphs = self.replays_graphs();
        step_times.sort_by(f64::total_cmp);
        if let Some(median) = step_times.get(step_times.len() / 2) {
            summary.tokens_per_s = cfg.total_batch_tokens() as f64 / median;
        }
        Ok(summary)
    }

    /// One optimizer step; returns the mean training loss, the gradient norm before clipping, the learning rate
    /// used, and where the time went. Every rank of a job takes every step together. Should the engine run out of
    /// memory (its working memory grows in the first step), the error shows the plan.
    pub fn train_step(&mut self) -> Result<StepStats> {
        self.take_step().map_err(|e| with_plan(e, &self.plan))
    }

    fn take_step(&mut self) -> Result<StepStats> {
        let started = Instant::now();
        let cfg = &self.config;
        let (mb, t, accumulation) = (self.micro_batch, cfg.model.block_size, self.accumulation);
        let rank = self.comm.rank();
        let position = self.step + self.guard.state.data_skipped;
        for micro in 0..accumulation {
            for row in 0..mb {
                let global = parallel::global_row(rank, micro, row, accumulation, mb);
                let range = (micro * mb + row) * t..(micro * mb + row + 1) * t;
                self.data.train_sequence(
                    cfg.train.seed,
                    position,
                    global,
                    &mut self.inputs[range.clone()],
                    &mut self.targets[range],
                )?;
            }
        }
        // The loss is the mean over every counted target of the whole step (all ranks), so each micro-batch's
        // gradient is scaled by one over the step's count, known before the first micro-batch runs. Summing the
        // ranks' gradients then gives the step's mean gradient.
        let mut counted = [self.targets.iter().filter(|&&y| y != kiln_core::backend::IGNORE_TARGET).count() as f64];
        let b = &mut self.backend;
        self.comm.all_reduce_host(b, &mut counted)?;
        if counted[0] == 0.0 {
            return Err(Error::Invalid(format!(
                "step {} has no targets to learn from; is block_size too small for the data?",
                self.step
            )));
        }
        let dloss = (1.0 / counted[0]) as f32;
        let data_done = Instant::now();
        // From here to the passes' end, the time this rank waits for the others (see below).
        self.comm.waited();

        let values = self.values;
        b.upload(values.dloss, &[dloss])?;
        b.zero(self.model.losses)?;
        if let Some(terms) = self.model.balance_terms {
            b.zero(terms)?;
        }
        // Alternating gradients are zeroed by the backward pass as it goes; the share adds up the micro-batches.
        match &self.share {
            Some(share) => b.zero(share.share)?,
            None => b.zero(self.model.grads)?,
        }
        let per_micro = mb * t;
        let (model, comm, buckets, zero, share) = (&self.model, &mut self.comm, &self.buckets, self.zero, &self.share);
        let comm = comm.as_mut();
        let weights = &self.weights;
        // One micro-batch's passes, on the batch loaded: with `reduce`, each bucket of gradients is reduced as soon
        // as it is final (under ZeRO stage 2, a bucket's piece is added into the share once its reduction is over:
        // when the next bucket is ready, and after the last).
        let passes = |b: &mut B, comm: &mut dyn Communicator<B>, reduce: bool| -> Result<()> {
            model.forward_with(b, mb, t, Pass::Train { dloss: values.dloss }, &mut |b, moment| {
                gather_blocks(b, comm, weights.as_ref(), model.spec.n_layer, moment)
            })?;
            if !reduce {
                return model.backward(b, mb, t);
            }
            let mut cursor = BucketCursor::default();
            let mut received: Option<(Tensor, Tensor)> = None;
            let add_received = |b: &mut B, comm: &mut dyn Communicator<B>, received: &mut Option<_>| {
                if let Some((piece, into)) = received.take() {
                    comm.order(b)?;
                    b.add(into, piece)?;
                }
                Ok::<_, Error>(())
            };
            model.backward_with(b, mb, t, &mut |b, moment| {
                let Moment::Ready(ready_from) = moment else {
                    return gather_blocks(b, comm, weights.as_ref(), model.spec.n_layer, moment);
                };
                for i in cursor.advance(buckets, ready_from) {
                    let bucket = &buckets.ranges[i];
                    let grads = || model.grads.slice(bucket.start, bucket.len());
                    match (share, zero) {
                        (Some(share), _) => {
                            add_received(b, comm, &mut received)?;
                            let (grads, into) = share.buckets[i];
                            // Free to reuse: this reduction comes after the work queued so far, the last add too.
                            let piece = share.received.slice(0, into.len);
                            comm.reduce_scatter(b, grads, piece)?;
                            received = Some((piece, into));
                        }
                        (None, 1) => comm.reduce_scatter(b, grads(), piece(grads(), comm.world(), rank))?,
                        (None, _) => comm.all_reduce(b, grads())?,
                    }
                }
                Ok(())
            })?;
            add_received(b, comm, &mut received)?;
            Ok(())
        };
        b.time_from_here()?;
        for micro in 0..accumulation {
            let range = micro * per_micro..(micro + 1) * per_micro;
            model.load_batch(b, &self.inputs[range.clone()], Some(&self.targets[range]))?;
            // Gradients accumulate over micro-batches and are reduced after the last, except under ZeRO stages 2
            // and 3, which keep no whole gradient vector: there every micro-batch's are reduced, into the rank's
            // share.
            let reduce = micro + 1 == accumulation || share.is_some();
            let kind = if reduce { Kind::ReducingPasses } else { Kind::Passes };
            self.graphs.run(b, comm, kind, &mut |b, comm| passes(b, comm, reduce))?;
        }
        b.time_to_here()?;
        let queued = Instant::now();
        comm.wait(b)?;
        // The loss, and the squared norm of the gradients this rank sums: under ZeRO each rank holds the reduced
        // gradients of its pieces only, and the norm is the sum of the ranks' parts; otherwise every rank holds all of
        // them, and rank 0's sum is the one all take, so that every rank judges the same norm (the guard's verdict
        // must not split them) whatever order another's sum took. With experts, the balancing loss's terms too (each
        // rank's passes', summed across ranks below). They are read back in one copy, which waits for the passes and
        // the reduction.
        let sums = values.sums;
        b.sum_into(model.losses, false, sums.slice(0, 1))?;
        if let (Some(terms), Some(slot)) = (model.balance_terms, values.balance_slot()) {
            b.sum_into(terms, false, sums.slice(slot, 1))?;
        }
        match share {
            Some(share) => b.sum_into(share.share, true, sums.slice(1, 1))?,
            None if zero == 1 => {
                for (part, &(start, _, len)) in self.owned.iter().enumerate() {
                    b.sum_into(model.grads.slice(start, len), true, sums.slice(1 + part, 1))?;
                }
            }
            None if rank == 0 => b.sum_into(model.grads, true, sums.slice(1, 1))?,
            None => {}
        }
        b.download(sums, &mut self.sums)?;
        let passes_done = Instant::now();
        let waited = comm.waited();
        let local_loss = self.sums[0];
        let balancing = values.balance_slot().map(|slot| self.sums[slot]);
        let parts = &self.sums[1..values.balance_slot().unwrap_or(self.sums.len())];
        let squares: f64 = parts.iter().map(|&part| f64::from(part)).sum();
        let agreed = &mut self.agreed;
        agreed.fill(0.0);
        agreed[0] = local_loss as f64;
        agreed[1] = squares;
        agreed[2] = f64::from(u8::from(self.stop_requested));
        agreed[3] = balancing.map_or(0.0, f64::from);
        // A rank's own work: on a device, the time its passes took there (two events around them, read after the loss
        // was, so without waiting again; under ZeRO stages 2 and 3 the passes also wait for the collectives they
        // depend on); on the host, the time it did not spend waiting for the others in collectives (which the
        // communicator counts, inside replayed graphs too).
        agreed[RANK_TIMES + rank] = match b.timed_ms()? {
            Some(ms) => ms,
            None => ((passes_done - data_done).saturating_sub(waited)).as_secs_f64() * 1e3,
        };
        comm.all_reduce_host(b, agreed)?;
        let mut loss = agreed[0] as f32 * dloss;
        // The square root in f64 of an f32, rounded to f32, is the f32 square root.
        let mut grad_norm = agreed[1].sqrt() as f32;
        // The terms are the coefficient times each pass's aux_loss, weighted by its rows times dloss, one over the
        // step's counted targets (see kiln_core::experts::Balance); the weights made to sum to 1 over every row of
        // the step.
        let rows = (accumulation * mb * t * comm.world()) as f64;
        let aux_loss =
            balancing.zip(model.spec.experts).map(|(_, e)| (agreed[3] / f64::from(dloss) / rows / e.aux_loss) as f32);
        if let Some(fault) = &mut self.faults {
            fault(position, &mut loss, &mut grad_norm);
        }
        // Every rank judges the same numbers the same way, so all take the same branch below.
        let verdict = self.guard.judge(self.step, loss, grad_norm);

        let o = &cfg.optim;
        let lr = schedule::learning_rate(o, self.step, cfg.train.max_steps);
        if verdict.applies() {
            if self.step >= AdamWStep::MAX_STEP {
                return Err(Error::Invalid(format!("AdamW counts at most {} steps", AdamWStep::MAX_STEP)));
            }
            // The engine clips, from the norm (see AdamWStep).
            b.upload(values.adamw, &AdamWStep::values_of(lr, self.step + 1, grad_norm))?;
            let (updates, m, v) = (&self.updates, self.m, self.v);
            let mut optimizer = |b: &mut B, comm: &mut dyn Communicator<B>| -> Result<()> {
                for &(offset, local, len, decay) in updates {
                    let step = AdamWStep {
                        beta1: o.beta1,
                        beta2: o.beta2,
                        eps: o.eps,
                        weight_decay: if decay { o.weight_decay } else { 0.0 },
                        grad_clip: o.grad_clip,
                        values: values.adamw,
                    };
                    let moment = |t: Tensor| t.slice(local, len);
                    let grads = match share {
                        Some(share) => moment(share.share),
                        None => model.grads.slice(offset, len),
                    };
                    let params = match weights {
                        Some(weights) => moment(weights.share),
                        None => model.params.slice(offset, len),
                    };
                    b.adamw(params, grads, moment(m), moment(v), &step)?;
                }
                if zero > 0 && weights.is_none() {
                    for bucket in &buckets.ranges {
                        let params = model.params.slice(bucket.start, bucket.len());
                        comm.all_gather(b, params, piece(params, comm.world(), rank))?;
                    }
                }
                gather_resident(b, comm, weights.as_ref())
            };
            self.graphs.run(b, comm, Kind::Optimizer, &mut optimizer)?;
            // The gathers are waited for here, by the host, whether they ran or were replayed (a graph's waits order
            // the engine's work only).
            if zero > 0 {
                comm.wait(b)?;
            }
        }
        if self.profile {
            b.synchronize()?;
        }
        let done = Instant::now();
        if rank == 0 && comm.world() > 1 {
            if let Some((slow, ms, median)) = self.stragglers.observe(&self.agreed[RANK_TIMES..]) {
                tracing::warn!(
                    "rank {slow} is a straggler: its own work in a step (its device's time for the passes, or on the \
                     CPU its time outside waiting for the others) takes {ms:.1} ms, against a median of {median:.1} ms \
                     over the ranks"
                );
            }
        }
        self.step += 1;
        self.graphs.steps_run += 1;
        let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1e3;
        Ok(StepStats {
            loss,
            grad_norm,
            aux_loss,
            lr,
            data_ms: ms(started, data_done),
            passes_ms: ms(data_done, passes_done),
            queue_ms: ms(data_done, queued),
            optimizer_ms: ms(passes_done, done),
            stop: self.agreed[2] > 0.0,
            verdict,
        })
    }

    /// Mean loss over `eval_steps` micro-batches of held-out sequences (the same ones at every evaluation).
    pub fn validation_loss(&mut self) -> Result<f32> {
        let cfg = &self.config;
        let (mb, t) = (self.micro_batch, cfg.model.block_size);
        let b = &mut self.backend;
        b.zero(self.model.losses)?;
        let mut counted = 0;
        let (inputs, targets) = (&mut self.inputs[..mb * t], &mut self.targets[..mb * t]);
        for i in 0..cfg.train.eval_steps {
            for row in 0..mb {
                let range = row * t..(row + 1) * t;
                self.data.val_sequence(
                    cfg.train.seed,
                    (i * mb + row) as u64,
                    &mut inputs[range.clone()],
                    &mut targets[range],
                )?;
            }
            counted += targets.iter().filter(|&&y| y != kiln_core::backend::IGNORE_TARGET).count();
            self.model.load_batch(b, inputs, Some(targets))?;
            let (comm, weights, layers) = (self.comm.as_mut(), self.weights.as_ref(), self.model.spec.n_layer);
            self.model
                .forward_with(b, mb, t, Pass::Loss, &mut |b, moment| gather_blocks(b, comm, weights, layers, moment))?;
        }
        // Under ZeRO stage 3 the passes gathered weights: the host watches those collectives before the read waits.
        if self.weights.is_some() {
            self.comm.wait(b)?;
        }
        Ok(b.sum(self.model.losses)? / counted.max(1) as f32)
    }

    /// Greedy answers to held-out sums of the synthetic addition task: the fraction exactly right, and a few
    /// examples.
    pub fn exact_match(&mut self) -> Result<(f32, Vec<Sample>)> {
        let task = self.data.addition().ok_or_else(|| Error::Invalid("exact match needs synthetic:addition".into()))?;
        let problems = task.problems(self.config.train.seed, EXACT_MATCH_PROBLEMS);
        let tok = &self.data.tokenizer;
        let prompts = problems.iter().map(|(p, _)| tok.encode(p)).collect::<Result<Vec<_>>>()?;
        let (comm, weights, layers) = (self.comm.as_mut(), self.weights.as_ref(), self.model.spec.n_layer);
        let completions =
            generate::greedy(&self.model, &mut self.backend, &prompts, task.answer_len(), &mut |b, moment| {
                gather_blocks(b, comm, weights, layers, moment)?;
                // Under ZeRO stage 3 the host watches the last gather before the logits' read waits for it.
                if weights.is_some() && moment == Moment::Forward(layers - 1) {
                    comm.wait(b)?;
                }
                Ok(())
            })?;
        let mut right = 0;
        let mut samples = Vec::new();
        for ((prompt, expected), seq) in problems.iter().zip(&completions) {
            let completion = tok.decode(&seq[prompt.len()..]);
            let correct = completion == *expected;
            right += usize::from(correct);
            if samples.len() < SAMPLES_SHOWN {
                samples.push(Sample { prompt: prompt.clone(), completion, correct });
            }
        }
        Ok((right as f32 / problems.len() as f32, samples))
    }
}

/// For a log line of a job of several ranks: the fastest and the slowest rank's own work in the step.
fn describe_ranks(rank_step_ms: &[f64]) -> String {
    if rank_step_ms.len() < 2 {
        return String::new();
    }
    let by_time = |a: &(usize, &f64), b: &(usize, &f64)| a.1.total_cmp(b.1);
    let fastest = rank_step_ms.iter().enumerate().min_by(by_time).expect("ranks");
    let slowest = rank_step_ms.iter().enumerate().max_by(by_time).expect("ranks");
    format!(" | ranks {:.1} ms (rank {}) to {:.1} ms (rank {})", fastest.1, fastest.0, slowest.1, slowest.0)
}

/// The vocabulary a run's model has, for data of `data_vocab` tokens: the data's, or the vocabulary of a model read
/// from Hugging Face (an embedding may have rows past its tokenizer's).
pub fn vocabulary(config: &Config, data_vocab: usize) -> Result<usize> {
    let Some(dir) = config.model.init.as_deref().and_then(|i| i.strip_prefix("hf:")) else {
        return Ok(data_vocab);
    };
    let (_, vocab) = kiln_core::config::ModelConfig::from_hf_dir(Path::new(dir))?;
    if data_vocab > vocab {
        return Err(Error::Usage(format!(
            "the data's vocabulary of {data_vocab} tokens is larger than the {vocab} of {dir}"
        )));
    }
    Ok(vocab)
}

/// What one rank of a training job allocates, in the order it allocates it: the model (parameters, gradients,
/// activations), the AdamW moments of what the rank updates, and under ZeRO stage 2 its share of the gradients. The
/// trainer and its memory plan ([`plan`]) both allocate through this, so that the plan is the run's to the byte.
/// The weights are left at zero.
struct Allocated {
    values: StepValues,
    model: Model,
    m: Tensor,
    v: Tensor,
    owned: Vec<(usize, usize, usize)>,
    updates: Vec<(usize, usize, usize, bool)>,
    buckets: Buckets,
    share: Option<GradientShare>,
    weights: Option<WeightShare>,
}

/// `error`, with the memory plan's table when it says that memory ran out.
fn with_plan(error: Error, plan: &MemoryPlan) -> Error {
    match error {
        Error::OutOfMemory { backend, message } => {
            Error::OutOfMemory { backend, message: format!("{message}\n{}", plan.describe()) }
        }
        other => other,
    }
}

/// A step's numbers on the device, read by the work they feed when it runs (so that a graph of that work takes each
/// step's): the loss scale that the classifier reads; AdamW's [`AdamWStep::values`]; and the sums that the host reads
/// back in one copy after the passes: the loss, then the squared gradient norm of each part this rank sums, then
/// with experts and a balancing loss, the sum of its terms (see `Model::balance_terms`).
#[derive(Clone, Copy)]
struct StepValues {
    dloss: Tensor,
    adamw: Tensor,
    sums: Tensor,
    /// Whether `sums` ends with the balancing loss's.
    balanced: bool,
}

impl StepValues {
    fn elements(&self) -> usize {
        self.dloss.len + self.adamw.len + self.sums.len
    }

    /// Where in `sums` the balancing loss's terms are summed, where the model has them.
    fn balance_slot(&self) -> Option<usize> {
        self.balanced.then(|| self.sums.len - 1)
    }
}

/// The kinds of work of a step that are captured as graphs (`train.graphs`): a micro-batch's passes; its passes
/// that reduce the gradients as they go; the optimizer's update (with, under ZeRO, the gathers of the weights).
#[derive(Clone, Copy)]
enum Kind {
    Passes,
    ReducingPasses,
    Optimizer,
}

/// The graphs of a step, one for each [`Kind`], each captured the first time its kind runs after the trainer's first
/// step (which allocates the engine's working memory), then replayed.
struct Graphs {
    /// Whether to capture: asked for, with a communicator that can be captured, and no capture has failed.
    wanted: bool,
    captured: [Option<Graph>; 3],
    steps_run: u64,
}

impl Graphs {
    fn new(wanted: bool) -> Self {
        Graphs { wanted, captured: [None; 3], steps_run: 0 }
    }

    /// Runs `work` of `kind`, whose collectives go through `comm`: by replaying its graph, by capturing one and
    /// replaying it, or as it is. Where capturing fails, a run of one rank goes on without graphs; a job of several
    /// stops, every rank with an error (NCCL requires every rank to capture the same collectives, or none).
    fn run<B: Backend>(
        &mut self,
        b: &mut B,
        comm: &mut dyn Communicator<B>,
        kind: Kind,
        work: &mut dyn FnMut(&mut B, &mut dyn Communicator<B>) -> Result<()>,
    ) -> Result<()> {
        let kind = kind as usize;
        if let Some(graph) = self.captured[kind] {
            return b.replay(graph);
        }
        if !self.wanted || self.steps_run == 0 {
            return work(b, comm);
        }
        let captured = match b.begin_capture() {
            Ok(false) => Err(format!("{} cannot capture graphs", b.name())),
            // A capture ends with the engine's work ordered after every collective of it: the streams it took in
            // are joined again (and the host could not wait inside it).
            Ok(true) => match work(b, comm).and_then(|()| comm.order(b)) {
                Ok(()) => b.end_capture().map_err(|e| format!("ending the capture failed ({e})")),
                Err(e) => {
                    // Joined, so that the capture can end; then every rank still learns of the failure below.
                    let _ = comm.order(b);
                    let abandoned = b.abandon_capture().err().map(|a| format!("; ending it: {a}")).unwrap_or_default();
                    Err(format!("capturing a step's work failed ({e}{abandoned})"))
                }
            },
            Err(e) => Err(format!("starting a capture failed ({e})")),
        };
        // Even where every rank failed alike, a rank may have captured collectives before its failure, which NCCL
        // holds as captured: only a capture without any is known to leave the ranks free to go on without graphs.
        if comm.world() > 1 {
            let mut failed = [f64::from(u8::from(captured.is_err()))];
            comm.all_reduce_host(b, &mut failed)?;
            if failed[0] > 0.0 {
                let why = captured.err().unwrap_or_else(|| format!("{} of the ranks could not", failed[0]));
                return Err(Error::backend(
                    b.name(),
                    format!(
                        "train.graphs: rank {} stops: {why}; every rank must capture its step, or none \
                         (set train.graphs = false)",
                        comm.rank()
                    ),
                ));
            }
        }
        match captured {
            Ok(graph) => {
                self.captured[kind] = Some(graph);
                b.replay(graph)
            }
            Err(why) => {
                tracing::warn!("train.graphs: {why}; the run goes on without graphs");
                self.wanted = false;
                work(b, comm)
            }
        }
    }
}

/// ZeRO stage 3's weights: the rank's share of them (fp32 master and working copy, as the engine keeps parameters),
/// packed like the moments, and for each unit of the model its gathered buffer and its part of the share.
struct WeightShare {
    share: Tensor,
    units: Vec<(Tensor, Tensor)>,
}

/// ZeRO stage 2's gradients: the rank's share of the reduced gradients, packed like the moments, and the piece that
/// reductions deliver into, one bucket after another, before each is added to the share.
struct GradientShare {
    share: Tensor,
    received: Tensor,
    /// Each bucket's gradients in the model and its part of `share`.
    buckets: Vec<(Tensor, Tensor)>,
}

impl Allocated {
    fn new<B: Backend + ?Sized>(
        backend: &mut B,
        config: &Config,
        spec: ModelSpec,
        micro_batch: usize,
        world: usize,
        rank: usize,
    ) -> Result<Self> {
        let zero = config.dist.zero;
        let blocks = match zero {
            0 | 1 => Blocks::InPlace,
            2 => Blocks::AlternatingGradients,
            _ => Blocks::AlternatingWeightsAndGradients,
        };
        let (multiple, recompute) = (parallel::padding_multiple(world), config.train.recompute);
        let (_, units, len) = Model::layout(&spec, multiple, blocks);
        // Stages 2 and 3 reduce each unit (block) of the model as the backward pass finishes it; the others, buckets
        // of about dist.bucket_mb of the flat gradient vector (fp32 on every engine).
        let buckets = match zero {
            0 | 1 => Buckets::new(len, world, rank, (config.dist.bucket_mb * 1e6 / 4.0) as usize),
            _ => Buckets::from_ranges(units.iter().rev().cloned().collect(), world, rank),
        };
        let pieces: Vec<_> = match zero {
            0 => std::iter::once(0..spec.num_params()).collect(),
            _ => buckets.owned_pieces().collect(),
        };
        // Stages 1 and 2 keep the rank's share of the fp32 master weights, where the engine keeps them, as of the
        // moments below; stage 3's weights are a share of their own.
        let master_pieces = (zero == 1 || zero == 2).then(|| pieces.clone());
        let memory = TrainingMemory { multiple, recompute, blocks, master_pieces };
        let mut model = Model::for_training(backend, spec, micro_batch, memory)?;
        model.fuse_bias_gradients(config.train.fuse_bias_gradients);
        let mut owned = Vec::new();
        let mut local = 0;
        for piece in pieces.iter().rev() {
            owned.push((piece.start, local, piece.len()));
            local += piece.len();
        }
        let mut updates = Vec::new();
        for (offset, len, decay) in decay_runs(&model.layout) {
            for &(start, local, n) in &owned {
                let (from, to) = (offset.max(start), (offset + len).min(start + n));
                if from < to {
                    updates.push((from, local + from - start, to - from, decay));
                }
            }
        }
        let m = backend.alloc(local, Role::OptState)?;
        let v = backend.alloc(local, Role::OptState)?;
        let local_of = |piece: &Range<usize>| owned.iter().find(|o| o.0 == piece.start).map(|o| o.1);
        let share = if zero >= 2 {
            let share = backend.alloc(local, Role::Grad)?;
            let largest = pieces.iter().map(|p| p.len()).max().unwrap_or(0);
            let received = backend.alloc(largest, Role::Grad)?;
            let buckets = buckets
                .ranges
                .iter()
                .zip(&pieces)
                .map(|(bucket, piece)| {
                    let unit = model.units.iter().position(|u| u == bucket).expect("these buckets are units");
                    let local = local_of(piece).expect("every piece is owned");
                    (model.unit_gradients(unit), share.slice(local, piece.len()))
                })
                .collect();
            Some(GradientShare { share, received, buckets })
        } else {
            None
        };
        let weights = if zero == 3 {
            let share = backend.alloc(local, Role::Param)?;
            let units = (0..model.units.len())
                .map(|u| {
                    let piece =
                        pieces.iter().find(|p| model.units[u].contains(&p.start)).expect("a piece of every unit");
                    let local = local_of(piece).expect("every piece is owned");
                    (model.unit_parameters(u), share.slice(local, piece.len()))
                })
                .collect();
            Some(WeightShare { share, units })
        } else {
            None
        };
        // The squared norm is summed in one part per owned piece under ZeRO stage 1, in one otherwise.
        let parts = if zero == 1 { owned.len() } else { 1 };
        let balanced = model.balance_terms.is_some();
        let sum_slots = 1 + parts + usize::from(balanced);
        let values = backend.alloc(4 + sum_slots, Role::Stat)?;
        let (dloss, adamw, sums) = (values.slice(0, 1), values.slice(1, 3), values.slice(4, sum_slots));
        let values = StepValues { dloss, adamw, sums, balanced };
        Ok(Allocated { model, m, v, owned, updates, buckets, share, weights, values })
    }
}

/// The memory a rank can plan with, as every rank agrees on it (the least any of them has, so that all choose the
/// same micro-batch and the same fit): what is free where it allocates, plus what the engine has already taken that
/// the plan counts (its own allocations so far and, on a device, its context and communication buffers). `None`
/// when any rank cannot tell.
fn capacity<B: Backend>(
    backend: &mut B,
    comm: &mut dyn Communicator<B>,
    memory: &dyn kiln_core::memory::MemoryModel,
    spec: &ModelSpec,
    fused_bias_gradients: bool,
) -> Result<Option<u64>> {
    let taken_outside: u64 = match memory.outside_exists_at_start() {
        true => {
            let step = spec.step_shapes(1, fused_bias_gradients);
            memory.overheads(&step, comm.world()).iter().filter(|c| !c.allocated).map(|c| c.bytes).sum()
        }
        false => 0,
    };
    // Every rank's, one more than the bytes so that 0 can say "unknown".
    let mine = backend.free_bytes().map_or(0.0, |free| (free + backend.allocated_bytes() + taken_outside) as f64 + 1.0);
    let seen = comm.gather_host(backend, &[mine])?;
    Ok(seen.iter().all(|&s| s > 0.0).then(|| seen.iter().fold(f64::MAX, |a, &b| a.min(b)) as u64 - 1))
}

/// Writes `values`, elements `range` of the flat parameter layout, into `packed` where this rank keeps them: its
/// pieces (`owned`, as in [`Trainer::owned`]), one after another. The moments are kept so, and under ZeRO stage 3
/// the weights.
fn put_pieces<B: Backend + ?Sized>(
    backend: &mut B,
    owned: &[(usize, usize, usize)],
    packed: Tensor,
    range: Range<usize>,
    values: &[f32],
) -> Result<()> {
    for &(start, local_start, len) in owned {
        let (from, to) = (range.start.max(start), range.end.min(start + len));
        if from < to {
            let local = packed.slice(local_start + from - start, to - from);
            backend.upload(local, &values[from - range.start..to - range.start])?;
        }
    }
    Ok(())
}

/// Writes weights `values`, elements `range` of the flat parameter layout, where this rank keeps them: under ZeRO
/// stage 3 into its `share` of them (see [`put_pieces`]), otherwise into `params` in place.
fn put_weights<B: Backend + ?Sized>(
    backend: &mut B,
    owned: &[(usize, usize, usize)],
    share: Option<Tensor>,
    params: Tensor,
    range: Range<usize>,
    values: &[f32],
) -> Result<()> {
    match share {
        Some(share) => put_pieces(backend, owned, share, range, values),
        None => backend.upload(params.slice(range.start, range.len()), values),
    }
}

/// ZeRO stage 3's part of a pass (nothing under the other stages): each block's weights are gathered into their
/// buffer before the pass reads them, the next block's while this one runs. Block `l` shares its buffer with block
/// `l ± 2`, which the pass has finished with when `l`'s gather is issued (a communicator's operations wait for the
/// work queued before them).
fn gather_blocks<B: Backend>(
    b: &mut B,
    comm: &mut dyn Communicator<B>,
    weights: Option<&WeightShare>,
    layers: usize,
    moment: Moment,
) -> Result<()> {
    let Some(weights) = weights else { return Ok(()) };
    let gather = |b: &mut B, comm: &mut dyn Communicator<B>, l: usize| {
        let (whole, part) = weights.units[1 + l];
        comm.all_gather(b, whole, part)
    };
    let (l, first, next) = match moment {
        Moment::Forward(l) => (l, l == 0, (l + 1 < layers).then_some(l + 1)),
        Moment::Backward(l) => (l, l + 1 == layers, l.checked_sub(1)),
        Moment::Ready(_) => return Ok(()),
    };
    // The first block of a pass has had no gather issued ahead of it. The block waits for its weights only: the
    // reductions of the gradients of the block before it run on while it computes. (Block l's gradient buffer, which
    // block l + 2's reduction reads, is safe: the passes add each reduced bucket, one a unit, after a full order.)
    if first {
        gather(b, comm, l)?;
    }
    comm.order_gathers(b)?;
    if let Some(next) = next {
        gather(b, comm, next)?;
    }
    Ok(())
}

/// Under ZeRO stage 3, gathers the weights that stay whole through a step (the embeddings, the final norm and the
/// LM head) from the ranks' shares, and waits for them.
fn gather_resident<B: Backend>(b: &mut B, comm: &mut dyn Communicator<B>, weights: Option<&WeightShare>) -> Result<()> {
    let Some(weights) = weights else { return Ok(()) };
    for &(whole, part) in [weights.units.first(), weights.units.last()].into_iter().flatten() {
        comm.all_gather(b, whole, part)?;
    }
    comm.wait(b)
}

/// Elements a checkpoint gathers from the ranks at a time (32 MB of f64 on the host).
const GATHER_CHUNK: usize = 1 << 22;

/// Gathers ranges of a tensor of the flat parameter layout (the parameters, or a moment) onto rank 0, for
/// checkpoints: under ZeRO a rank holds current values only in its own pieces (one after another, `packed`, in the
/// moments and under stage 3 in the weights' share; in place in the parameters of stages 1 and 2, whose other
/// entries hold the gathered working copy), so each piece comes from its owner; otherwise rank 0 holds it all.
struct Gather<'a> {
    /// What this rank updates, as in [`Trainer::owned`].
    owned: &'a [(usize, usize, usize)],
    zero: bool,
    lead: bool,
}

impl Gather<'_> {
    fn range<B: Backend>(
        &self,
        backend: &mut B,
        comm: &mut dyn Communicator<B>,
        t: Tensor,
        range: std::ops::Range<usize>,
        packed: bool,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        out.clear();
        out.resize(range.len(), 0.0);
        if !self.zero {
            return if self.lead { backend.download(t.slice(range.start, range.len()), out) } else { Ok(()) };
        }
        // Each rank fills only its pieces and leaves zeros elsewhere, so the sum is the whole, exactly. A chunk at a
        // time, so that the host holds the tensor once (in `out`) and not again in f64.
        let mut whole = Vec::new();
        let mut part = Vec::new();
        for chunk_start in range.clone().step_by(GATHER_CHUNK) {
            let chunk = chunk_start..range.end.min(chunk_start + GATHER_CHUNK);
            whole.clear();
            whole.resize(chunk.len(), 0.0f64);
            for &(start, local_start, len) in self.owned {
                let (from, to) = (chunk.start.max(start), chunk.end.min(start + len));
                if from < to {
                    part.resize(to - from, 0.0);
                    let at = if packed { local_start + from - start } else { from };
                    backend.download(t.slice(at, to - from), &mut part)?;
                    let into = &mut whole[from - chunk.start..to - chunk.start];
                    into.iter_mut().zip(&part).for_each(|(w, &x)| *w = x as f64);
                }
            }
            comm.all_reduce_host(backend, &mut whole)?;
            let into = &mut out[chunk.start - range.start..chunk.end - range.start];
            into.iter_mut().zip(&whole).for_each(|(o, &w)| *o = w as f32);
        }
        Ok(())
    }
}

/// Renders a completion of the addition task for people: `482+937=9141\n` reads `482+937 = 1419`.
pub fn describe_sum(prompt: &str, completion: &str) -> String {
    let question = prompt.trim_end_matches('=');
    match Addition::read_answer(completion) {
        Some(sum) => format!("{question} = {sum}"),
        None => format!("{question} = {completion:?} (malformed)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_memory_shows_the_plan_and_other_errors_do_not() {
        let config = Config::load(None, &[]).unwrap();
        let spec = ModelSpec::new(&config.model, 13);
        let plan = MemoryPlan::new(&config, spec, 4, 1, &kiln_cpu::CpuMemory::<f32>::new()).unwrap();
        let table = plan.describe();
        let oom = Error::OutOfMemory { backend: "cuda:0".into(), message: "alloc: cannot allocate 512.0 MiB".into() };
        let shown = with_plan(oom, &plan);
        assert!(matches!(shown, Error::OutOfMemory { .. }) && shown.exit_code() == 2);
        assert_eq!(shown.to_string(), format!("cuda:0: alloc: cannot allocate 512.0 MiB\n{table}"));
        let other = with_plan(Error::backend("cuda:0", "launch failed"), &plan);
        assert_eq!(other.to_string(), "cuda:0: launch failed");
    }

    #[test]
    fn the_logged_balancing_loss_is_the_mean_of_each_passs_aux_loss() {
        // Two micro-batches of 4 additions (13 tokens, the prompt's targets ignored); the step is skipped, so that
        // the weights stay those the passes ran with.
        let experts =
            ["model.arch=llama", "model.experts=4", "model.experts_per_token=2", "model.router_aux_loss=0.03"];
        let mut set: Vec<String> = experts.iter().map(|s| s.to_string()).collect();
        set.extend(
            ["model.n_embd=32", "model.n_head=2", "train.micro_batch=4", "train.total_batch_tokens=104"]
                .map(str::to_string),
        );
        set.push("train.guard.enabled=true".into());
        let config = Config::load(None, &set).unwrap();
        let mut trainer = Trainer::new(&config, kiln_cpu::CpuBackend::<f32>::new()).unwrap();
        trainer.inject_faults(Box::new(|_, loss, _| *loss = f32::NAN));
        let stats = trainer.train_step().unwrap();
        assert!(matches!(stats.verdict, Verdict::Skip(_)));
        let logged = stats.aux_loss.expect("a balancing loss is logged");

        let counted = trainer.targets.iter().filter(|&&y| y != kiln_core::backend::IGNORE_TARGET).count();
        assert!(counted < trainer.targets.len(), "some targets are ignored, so that the step's weights are not 1/rows");
        let (model, b) = (&trainer.model, &mut trainer.backend);
        let (terms, per_pass) = (model.balance_terms.unwrap(), 4 * 13);
        let dloss = b.scalar(1.0 / per_pass as f32).unwrap();
        let mut passes = Vec::new();
        for pass in 0..2 {
            let range = pass * per_pass..(pass + 1) * per_pass;
            model.load_batch(b, &trainer.inputs[range.clone()], Some(&trainer.targets[range])).unwrap();
            b.zero(terms).unwrap();
            model.forward(b, 4, 13, Pass::Train { dloss }).unwrap();
            passes.push(b.sum(terms).unwrap() / 0.03);
        }
        let mean = (passes[0] + passes[1]) / 2.0;
        assert!(passes[0] != passes[1] && passes.iter().all(|&aux| aux > 1.0), "{passes:?}");
        assert!((logged - mean).abs() < 1e-5 * mean, "logged {logged}, the passes' mean {mean} ({passes:?})");
    }
}
