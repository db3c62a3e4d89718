//! A run's memory before it starts: each rank's, by component, from the allocation code the run itself uses.
//!
//! [`MemoryPlan::new`] runs the trainer's allocation ([`crate::Allocated::new`]) against
//! [`Counting`](kiln_core::memory::Counting), a backend that only counts, in the storage of the engine that will
//! run, and adds what that engine says it takes beyond its allocations. The trainer checks the plan against the
//! memory free before it allocates anything, and resolves `train.micro_batch = "auto"` with it.

use crate::Allocated;
use kiln_core::config::{MicroBatch, Recompute};
use kiln_core::memory::{Component, Counting, MemoryModel, describe_bytes};
use kiln_core::{Config, Error, Result, Role};
use kiln_model::ModelSpec;

/// The share of the memory `train.micro_batch = "auto"` leaves free: for the allocator's fragmentation, and for
/// what the plan can only estimate (the CUDA context, NCCL's buffers).
pub const AUTO_MARGIN: f64 = 0.10;

/// One rank's memory, by component.
#[derive(Clone, Debug, PartialEq)]
pub struct RankPlan {
    pub rank: usize,
    pub components: Vec<Component>,
}

impl RankPlan {
    pub fn total_bytes(&self) -> u64 {
        self.components.iter().map(|c| c.bytes).sum()
    }

    /// The part the engine counts in its allocated bytes (what `metrics.jsonl` records as `allocated_bytes`).
    pub fn allocated_bytes(&self) -> u64 {
        self.components.iter().filter(|c| c.allocated).map(|c| c.bytes).sum()
    }
}

/// The memory of every rank of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub engine: String,
    pub world: usize,
    pub micro_batch: usize,
    pub accumulation: usize,
    /// Whether the ranks share one memory (the CPU engine's threads) rather than having a device each.
    pub shared_by_ranks: bool,
    pub ranks: Vec<RankPlan>,
}

impl MemoryPlan {
    /// The plan of training `spec` as `config` says, in micro-batches of `micro_batch` sequences, on `world` ranks
    /// of the engine that `memory` describes.
    pub fn new(
        config: &Config,
        spec: ModelSpec,
        micro_batch: usize,
        world: usize,
        memory: &dyn MemoryModel,
    ) -> Result<MemoryPlan> {
        spec.check_size(micro_batch)?;
        spec.check_engine(memory)?;
        let accumulation = config.accumulation_steps(micro_batch, world)?;
        let overheads = memory.overheads(&spec.step_shapes(micro_batch, config.train.fuse_bias_gradients), world);
        let ranks = (0..world)
            .map(|rank| {
                let mut counting = Counting::new(memory.storage());
                let allocated = Allocated::new(&mut counting, config, spec, micro_batch, world, rank)?;
                let storage = memory.storage();
                let kinds = allocated.model.activation_kinds();
                let kinds = kinds.iter().map(|&(name, role, elements)| (name, (elements * storage.bytes(role)) as u64));
                let mut components: Vec<Component> = [
                    ("parameters", counting.bytes_of(Role::Param)),
                    ("fp32 master weights", counting.master_bytes()),
                    ("gradients (fp32)", counting.bytes_of(Role::Grad)),
                    ("AdamW moments (fp32)", counting.bytes_of(Role::OptState)),
                    (
                        "the step's loss scale, AdamW's values and the sums read back",
                        (allocated.values.elements() * storage.bytes(Role::Stat)) as u64,
                    ),
                ]
                .into_iter()
                .chain(kinds)
                .filter(|&(_, bytes)| bytes > 0)
                .map(|(name, bytes)| Component::allocated(name, bytes))
                .collect();
                components.extend(overheads.iter().cloned());
                Ok(RankPlan { rank, components })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MemoryPlan {
            engine: memory.engine(),
            world,
            micro_batch,
            accumulation,
            shared_by_ranks: memory.shared_by_ranks(),
            ranks,
        })
    }

    /// What one memory must hold: every rank's when they share it, otherwise the largest rank's (each has a
    /// device of its own).
    pub fn needed_bytes(&self) -> u64 {
        let totals = self.ranks.iter().map(RankPlan::total_bytes);
        if self.shared_by_ranks { totals.sum() } else { totals.max().unwrap_or(0) }
    }

    /// Whether the ranks' plans differ (under ZeRO each updates its own pieces).
    fn ranks_differ(&self) -> bool {
        self.ranks.windows(2).any(|w| w[0].components != w[1].components)
    }

    /// A usage error, naming the plan's numbers and ending with `advice` (what would fit: [`describe_fixes`]), unless
    /// the plan fits `capacity` bytes. The advice is asked for only then.
    pub fn check_fits(&self, capacity: u64, advice: impl FnOnce() -> String) -> Result<()> {
        if self.needed_bytes() <= capacity {
            return Ok(());
        }
        Err(Error::Usage(format!(
            "the run does not fit: it needs {}{}, and {} are free; nothing was allocated.\n{}{}",
            describe_bytes(self.needed_bytes()),
            self.where_needed(),
            describe_bytes(capacity),
            self.describe(),
            advice(),
        )))
    }

    fn where_needed(&self) -> &'static str {
        match (self.shared_by_ranks, self.world) {
            (_, 1) => "",
            (true, _) => " for all ranks together",
            (false, _) => " on each device",
        }
    }

    /// A table for people: each component of a rank (of each, when they differ) and the totals.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "memory plan: {}, {} rank{}, micro-batch {} × {} accumulation step{}\n",
            self.engine,
            self.world,
            if self.world == 1 { "" } else { "s" },
            self.micro_batch,
            self.accumulation,
            if self.accumulation == 1 { "" } else { "s" },
        );
        let shown = if self.ranks_differ() { &self.ranks[..] } else { &self.ranks[..1] };
        for rank in shown {
            if self.world > 1 {
                let which = if self.ranks_differ() { format!("rank {}", rank.rank) } else { "each rank".into() };
                out += &format!("  {which}:\n");
            }
            for c in &rank.components {
                out += &format!("    {:>12}  {}\n", describe_bytes(c.bytes), c.name);
            }
            out += &format!("    {:>12}  total\n", describe_bytes(rank.total_bytes()));
        }
        if self.world > 1 {
            out += &format!("  {} needed{}\n", describe_bytes(self.needed_bytes()), self.where_needed());
        }
        out
    }

    /// The plan as one JSON object: `total_bytes` (what one memory must hold, as [`Self::needed_bytes`]),
    /// `allocated_bytes` and `components` of rank 0, and every rank's under `ranks` when they differ; with
    /// `capacity`, the bytes it was checked against and whether it fits.
    pub fn to_json(&self, capacity: Option<u64>) -> serde_json::Value {
        let rank_json = |r: &RankPlan| {
            serde_json::json!({
                "rank": r.rank,
                "total_bytes": r.total_bytes(),
                "allocated_bytes": r.allocated_bytes(),
                "components": r.components.iter().map(|c| serde_json::json!({
                    "name": c.name, "bytes": c.bytes, "allocated": c.allocated,
                })).collect::<Vec<_>>(),
            })
        };
        let mut plan = serde_json::json!({
            "engine": self.engine,
            "world": self.world,
            "micro_batch": self.micro_batch,
            "accumulation": self.accumulation,
            "shared_by_ranks": self.shared_by_ranks,
            "total_bytes": self.needed_bytes(),
            "allocated_bytes": self.ranks[0].allocated_bytes(),
            "components": rank_json(&self.ranks[0])["components"].clone(),
        });
        if self.ranks_differ() {
            plan["ranks"] = self.ranks.iter().map(rank_json).collect();
        }
        if let Some(capacity) = capacity {
            plan["capacity_bytes"] = capacity.into();
            plan["fits"] = (self.needed_bytes() <= capacity).into();
        }
        plan
    }
}

/// Settings that would make a run fit where it does not: a recomputation level, a ZeRO stage and a micro-batch,
/// with the plan's need and the accumulation that makes up the step's batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Fix {
    /// `--set` assignments, of the settings that differ from the run's.
    pub settings: Vec<String>,
    pub micro_batch: usize,
    pub accumulation: usize,
    /// As a plan's `total_bytes` (see [`MemoryPlan::needed_bytes`]).
    #[serde(rename = "total_bytes")]
    pub needed_bytes: u64,
}

/// The most fixes [`fixes`] gives.
const MOST_FIXES: usize = 4;

/// For each recomputation level and (with several ranks) ZeRO stage no lower than the run's, the largest micro-batch
/// that divides each rank's share of `train.total_batch_tokens` and whose plan fits `capacity`, and the run's own
/// micro-batch where it fits too; those that change the fewest settings first, then those that accumulate least.
/// At most [`MOST_FIXES`], none that is the run itself.
pub fn fixes(config: &Config, spec: ModelSpec, world: usize, memory: &dyn MemoryModel, capacity: u64) -> Vec<Fix> {
    let (recompute, zero) = (config.train.recompute, config.dist.zero);
    let levels = Recompute::ALL.into_iter().skip_while(|&level| level != recompute);
    let stages = if world > 1 { zero..=3 } else { zero..=zero };
    let configured = match config.train.micro_batch {
        MicroBatch::Sequences(n) => Some(n),
        MicroBatch::Auto => None,
    };
    let per_rank = config.total_batch_tokens() / config.model.block_size.max(1) / world.max(1);
    let mut found = Vec::new();
    for level in levels {
        for stage in stages.clone() {
            let mut changed = config.clone();
            (changed.train.recompute, changed.dist.zero) = (level, stage);
            let sizes: Vec<usize> = divisors(per_rank)
                .into_iter()
                .filter(|&m| changed.accumulation_steps(m, world).is_ok() && spec.check_size(m).is_ok())
                .collect();
            // The need grows with the micro-batch: the sizes that fit are a prefix.
            let plan = |m| MemoryPlan::new(&changed, spec, m, world, memory).ok();
            let fitting = sizes.partition_point(|&m| plan(m).is_some_and(|p| p.needed_bytes() <= capacity));
            // The largest micro-batch that fits, and the run's own where it fits too (one setting fewer).
            let largest = fitting.checked_sub(1).map(|k| sizes[k]);
            let own = configured.filter(|m| sizes[..fitting].contains(m) && Some(*m) != largest);
            for plan in [largest, own].into_iter().flatten().filter_map(plan) {
                let settings: Vec<String> = [
                    (level != recompute).then(|| format!("train.recompute={}", level.name())),
                    (stage != zero).then(|| format!("dist.zero={stage}")),
                    (Some(plan.micro_batch) != configured).then(|| format!("train.micro_batch={}", plan.micro_batch)),
                    // Said with a new micro-batch, which would otherwise set the step's batch where it is unset.
                    (Some(plan.micro_batch) != configured)
                        .then(|| format!("train.total_batch_tokens={}", config.total_batch_tokens())),
                ]
                .into_iter()
                .flatten()
                .collect();
                // Nothing changed is the run itself, which fits: not a fix.
                if !settings.is_empty() {
                    let (micro_batch, accumulation) = (plan.micro_batch, plan.accumulation);
                    found.push(Fix { settings, micro_batch, accumulation, needed_bytes: plan.needed_bytes() });
                }
            }
        }
    }
    found.sort_by_key(|f| (f.settings.len(), f.accumulation, f.needed_bytes));
    found.truncate(MOST_FIXES);
    found
}

/// `fixes` as lines for people, or how else a run could fit when there are none.
pub fn describe_fixes(fixes: &[Fix]) -> String {
    if fixes.is_empty() {
        return "no setting of train.micro_batch, train.recompute or dist.zero fits it here: a smaller model would, \
                or on GPUs more of them with dist.zero = 3\n"
            .into();
    }
    let mut out = String::from("it would fit with (train.total_batch_tokens kept):\n");
    for fix in fixes {
        let line = fix.settings.iter().map(|s| format!("--set {s}")).collect::<Vec<_>>().join(" ");
        out += &format!(
            "  {line}: {} (micro-batch {} × {} accumulation step{})\n",
            describe_bytes(fix.needed_bytes),
            fix.micro_batch,
            fix.accumulation,
            if fix.accumulation == 1 { "" } else { "s" }
        );
    }
    out
}

/// The divisors of `n`, in increasing order.
fn divisors(n: usize) -> Vec<usize> {
    let small: Vec<usize> = (1..).take_while(|d| d * d <= n).filter(|d| n % d == 0).collect();
    let large = small.iter().rev().map(|d| n / d).filter(|&d| d * d != n);
    small.iter().copied().chain(large).collect()
}

/// The micro-batch `config` trains with: its number, or for `"auto"` the largest number of sequences that divides
/// each rank's share of `train.total_batch_tokens` and whose plan fits `capacity` less [`AUTO_MARGIN`].
pub fn micro_batch(
    config: &Config,
    spec: ModelSpec,
    world: usize,
    memory: &dyn MemoryModel,
    capacity: Option<u64>,
) -> Result<usize> {
    if let MicroBatch::Sequences(n) = config.train.micro_batch {
        return Ok(n);
    }
    let capacity = capacity.ok_or_else(|| {
        Error::Usage(format!(
            "train.micro_batch = \"auto\" needs the memory free, which {} does not report: give a number (or, to \
             plan, --memory SIZE)",
            memory.engine()
        ))
    })?;
    let budget = (capacity as f64 * (1.0 - AUTO_MARGIN)) as u64;
    let per_rank = config.total_batch_tokens() / config.model.block_size / world.max(1);
    // A model too large for one sequence is too large whatever the batch; past that, a micro-batch too large to lay
    // out is one that does not fit.
    spec.check_size(1)?;
    let mut smallest = None;
    for sequences in divisors(per_rank).into_iter().rev() {
        if config.accumulation_steps(sequences, world).is_err() || spec.check_size(sequences).is_err() {
            continue;
        }
        let plan = MemoryPlan::new(config, spec, sequences, world, memory)?;
        if plan.needed_bytes() <= budget {
            tracing::info!(
                "train.micro_batch = \"auto\": {sequences} sequences ({} of the {} free, keeping {:.0}% free), {} \
                 accumulation steps",
                describe_bytes(plan.needed_bytes()),
                describe_bytes(capacity),
                AUTO_MARGIN * 100.0,
                plan.accumulation
            );
            return Ok(sequences);
        }
        smallest = Some(plan);
    }
    Err(match smallest {
        Some(plan) => Error::Usage(format!(
            "train.micro_batch = \"auto\": not even one sequence fits in {} (the free {} less {:.0}%)\n{}{}",
            describe_bytes(budget),
            describe_bytes(capacity),
            AUTO_MARGIN * 100.0,
            plan.describe(),
            describe_fixes(&fixes(config, spec, world, memory, budget)),
        )),
        None => Error::Usage(format!(
            "train.micro_batch = \"auto\": train.total_batch_tokens (= {}) gives no whole number of sequences of {} \
             tokens to each of {world} ranks",
            config.total_batch_tokens(),
            config.model.block_size
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::divisors;

    #[test]
    fn divisors_in_order() {
        assert_eq!(divisors(1), [1]);
        assert_eq!(divisors(12), [1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(16), [1, 2, 4, 8, 16]);
        assert_eq!(divisors(97), [1, 97]);
    }
}
