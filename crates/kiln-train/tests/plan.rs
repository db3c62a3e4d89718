//! Memory plans against the CPU engine: the plan's allocated bytes are what each rank's engine allocates, to the
//! byte, for both model families, recomputation levels, ZeRO stages and 1–4 ranks; "auto" picks the largest micro-batch that fits.

use kiln_core::Config;
use kiln_core::config::MicroBatch;
use kiln_core::memory::MemoryModel;
use kiln_cpu::{CpuBackend, CpuMemory};
use kiln_data::Dataset;
use kiln_model::ModelSpec;
use kiln_train::plan::{self, AUTO_MARGIN, MemoryPlan};
use kiln_train::{Trainer, threads};
use std::time::Duration;

/// A small model on the addition data, 48 sequences a step, with `extra` keys.
fn config(extra: &[&str]) -> Config {
    let mut all: Vec<String> = [
        "model.n_embd=32",
        "model.n_head=4",
        "train.total_batch_tokens=624",
        "train.max_steps=2",
        "train.eval_steps=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = std::env::temp_dir().join(format!("kiln-plan-test-{}", std::process::id()));
    all.push(format!("train.out_dir={}", out.display()));
    all.extend(extra.iter().map(|s| s.to_string()));
    Config::load(None, &all).unwrap()
}

fn spec(config: &Config) -> ModelSpec {
    let data = Dataset::open(&config.data, config.model.block_size).unwrap();
    ModelSpec::new(&config.model, kiln_train::vocabulary(config, data.vocab_size()).unwrap())
}

const LLAMA: [&str; 2] = ["model.arch=llama", "model.n_kv_head=2"];

#[test]
fn the_plan_is_what_each_rank_of_the_cpu_engine_allocates() {
    // Qwen3's QK-norm (the product's output kept beside qkv) and heads wider than n_embd / n_head.
    let qwen3 = [LLAMA[0], LLAMA[1], "model.qk_norm=true", "model.head_dim=48"];
    let cases: [(&[&str], usize); 16] = [
        (&["train.micro_batch=8"], 1),
        (&["train.micro_batch=6", "dist.zero=3"], 2),
        (&[LLAMA[0], LLAMA[1], "train.micro_batch=3", "dist.zero=3", "train.recompute=elementwise"], 4),
        (&["train.micro_batch=6", "dist.zero=2"], 2),
        (&[LLAMA[0], LLAMA[1], "train.micro_batch=3", "dist.zero=2", "train.recompute=block"], 4),
        (&["train.micro_batch=8", "train.recompute=elementwise"], 1),
        (&[LLAMA[0], LLAMA[1], "train.micro_batch=4", "train.recompute=block", "dist.zero=1"], 2),
        (&[LLAMA[0], LLAMA[1], "train.micro_batch=8"], 1),
        (&["train.micro_batch=6"], 2),
        (&["train.micro_batch=4", "dist.zero=1"], 3),
        (&[LLAMA[0], LLAMA[1], "train.micro_batch=3", "dist.zero=1"], 4),
        (&[LLAMA[0], LLAMA[1], "train.micro_batch=6", "model.tie_embeddings=false"], 2),
        (&[LLAMA[0], LLAMA[1], "model.biases=[\"qkv\"]", "train.micro_batch=3", "dist.zero=2"], 2),
        (&[&qwen3[..], &["train.micro_batch=4"]].concat(), 1),
        (&[&qwen3[..], &["train.micro_batch=4", "train.recompute=elementwise"]].concat(), 1),
        (&[&qwen3[..], &["train.micro_batch=3", "dist.zero=3", "train.recompute=block"]].concat(), 2),
    ];
    for (extra, world) in cases {
        let config = config(extra);
        let MicroBatch::Sequences(mb) = config.train.micro_batch else { panic!("a number") };
        let plan = MemoryPlan::new(&config, spec(&config), mb, world, &CpuMemory::<f32>::new()).unwrap();
        assert_eq!(plan.ranks.len(), world);
        // Ranks are built together: under ZeRO stage 3 they gather the weights that every step keeps whole.
        let allocated: Vec<u64> = std::thread::scope(|s| {
            let ranks: Vec<_> = threads::group(world, Duration::from_secs(5))
                .into_iter()
                .map(|comm| {
                    let config = &config;
                    s.spawn(move || {
                        let trainer = Trainer::with_comm(config, CpuBackend::<f32>::new(), Box::new(comm)).unwrap();
                        kiln_core::Backend::allocated_bytes(trainer.backend())
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for (rank, bytes) in allocated.into_iter().enumerate() {
            assert_eq!(plan.ranks[rank].allocated_bytes(), bytes, "{extra:?} on {world} ranks, rank {rank}");
        }
        // The CPU engine's ranks share the host: the job needs every rank's memory.
        assert_eq!(plan.needed_bytes(), plan.ranks.iter().map(|r| r.total_bytes()).sum::<u64>());
    }
}

#[test]
fn a_step_allocates_nothing_beyond_the_plan() {
    let config = config(&["train.micro_batch=8"]);
    let plan = MemoryPlan::new(&config, spec(&config), 8, 1, &CpuMemory::<f32>::new()).unwrap();
    let mut trainer = Trainer::new(&config, CpuBackend::<f32>::new()).unwrap();
    trainer.train_step().unwrap();
    assert_eq!(kiln_core::Backend::allocated_bytes(trainer.backend()), plan.ranks[0].allocated_bytes());
}

#[test]
fn zero_stage_1_plans_each_rank_a_share_of_the_moments() {
    let memory = CpuMemory::<f32>::new();
    let plain = config(&["train.micro_batch=6"]);
    let zero = config(&["train.micro_batch=6", "dist.zero=1"]);
    let moments = |c: &Config| {
        let plan = MemoryPlan::new(c, spec(c), 6, 4, &memory).unwrap();
        plan.ranks[0].components.iter().find(|c| c.name.starts_with("AdamW")).unwrap().bytes
    };
    // A quarter, up to the padding of each rank's pieces.
    let (all, share) = (moments(&plain), moments(&zero));
    assert!(share * 4 >= all && share * 4 < all + 4 * 64 * 4 * 8, "{share} of {all}");
}

#[test]
fn zero_stage_2_keeps_a_share_of_the_gradients() {
    let memory = CpuMemory::<f32>::new();
    let gradients = |zero: &str| {
        let c = config(&["train.micro_batch=6", zero, "model.n_layer=24"]);
        let plan = MemoryPlan::new(&c, spec(&c), 6, 4, &memory).unwrap();
        plan.ranks[0].components.iter().find(|c| c.name.starts_with("gradients")).unwrap().bytes
    };
    let (whole, shared) = (gradients("dist.zero=1"), gradients("dist.zero=2"));
    // 24 blocks' gradients become two blocks' worth of buffers, the embeddings' and head's, and a quarter share.
    assert!(shared * 2 < whole, "stage 2 keeps {shared} bytes of gradients against stage 1's {whole}");
}

#[test]
fn auto_takes_the_largest_micro_batch_that_fits_and_divides_the_step() {
    let config = config(&["train.micro_batch=auto"]);
    let (spec, memory) = (spec(&config), CpuMemory::<f32>::new());
    let needed = |mb| MemoryPlan::new(&config, spec, mb, 2, &memory).unwrap().needed_bytes();
    // 48 sequences a step over 2 ranks: 24 each, which 12 divides and 16 does not.
    let room = |bytes: u64| Some((bytes as f64 / (1.0 - AUTO_MARGIN)) as u64 + 1);
    assert_eq!(plan::micro_batch(&config, spec, 2, &memory, room(needed(12))).unwrap(), 12);
    // Memory grows linearly with the micro-batch: room for 17 sequences takes 12, as 16 does not divide 24.
    let room_for_17 = room(needed(12) + (needed(24) - needed(12)) * 5 / 12);
    assert_eq!(plan::micro_batch(&config, spec, 2, &memory, room_for_17).unwrap(), 12);
    assert_eq!(plan::micro_batch(&config, spec, 2, &memory, room(needed(24))).unwrap(), 24);
    assert_eq!(plan::micro_batch(&config, spec, 2, &memory, room(needed(1))).unwrap(), 1);
    let error = plan::micro_batch(&config, spec, 2, &memory, Some(needed(1))).unwrap_err().to_string();
    assert!(error.contains("not even one sequence fits"), "{error}");
    assert!(memory.shared_by_ranks());
    let error = plan::micro_batch(&config, spec, 2, &memory, None).unwrap_err().to_string();
    assert!(error.contains("does not report"), "{error}");
}

#[test]
fn a_run_that_does_not_fit_names_the_plan() {
    let config = config(&["train.micro_batch=8"]);
    let plan = MemoryPlan::new(&config, spec(&config), 8, 1, &CpuMemory::<f32>::new()).unwrap();
    let total = plan.needed_bytes();
    let (spec, memory) = (spec(&config), CpuMemory::<f32>::new());
    let advice = |capacity| plan::describe_fixes(&plan::fixes(&config, spec, 1, &memory, capacity));
    assert!(plan.check_fits(total, || advice(total)).is_ok());
    let error = plan.check_fits(total - 1, || advice(total - 1)).unwrap_err();
    assert_eq!(error.exit_code(), 2);
    let message = error.to_string();
    assert!(message.contains("does not fit") && message.contains("activations"), "{message}");
    // And what would: the largest micro-batch below 8 that divides the step's 48 sequences, or recomputation.
    assert!(message.contains("--set train.micro_batch=6 --set train.total_batch_tokens=624:"), "{message}");
    assert!(message.contains("--set train.recompute=block:"), "{message}");
    let json = plan.to_json(Some(total - 1));
    assert_eq!((json["total_bytes"].as_u64(), json["fits"].as_bool()), (Some(total), Some(false)));
}

#[test]
fn a_run_that_does_not_fit_is_told_the_settings_that_would() {
    let memory = CpuMemory::<f32>::new();
    let run = config(&["train.micro_batch=12", "model.n_layer=4"]);
    let spec = spec(&run);
    let needed = |c: &Config, mb| MemoryPlan::new(c, spec, mb, 2, &memory).unwrap().needed_bytes();
    // Room for the run with whole-block recomputation, and no more.
    let block = config(&["train.micro_batch=12", "model.n_layer=4", "train.recompute=block"]);
    let capacity = needed(&block, 12);
    assert!(needed(&run, 12) > capacity);
    let fixes = plan::fixes(&run, spec, 2, &memory, capacity);
    assert!(!fixes.is_empty() && fixes.len() <= 4, "{fixes:?}");
    // The fewest changes first: recomputing whole blocks alone; then each fits when planned as it says.
    assert_eq!(fixes[0].settings, ["train.recompute=block"]);
    assert!(fixes.windows(2).all(|w| w[0].settings.len() <= w[1].settings.len()), "{fixes:?}");
    for fix in &fixes {
        let mut changed: Vec<&str> = vec!["train.micro_batch=12", "model.n_layer=4"];
        changed.extend(fix.settings.iter().map(String::as_str));
        let changed = config(&changed);
        assert_eq!(needed(&changed, fix.micro_batch), fix.needed_bytes, "{fix:?}");
        assert!(fix.needed_bytes <= capacity, "{fix:?}");
        // ZeRO stages are fixes with several ranks: two here.
        assert_eq!(fix.accumulation, 48 / 2 / fix.micro_batch, "{fix:?}");
    }
    assert!(fixes.iter().any(|f| f.settings.iter().any(|s| s.starts_with("dist.zero="))), "{fixes:?}");
    // Nothing fits in nothing.
    assert!(plan::fixes(&run, spec, 2, &memory, 1).is_empty());
    assert!(plan::describe_fixes(&[]).contains("smaller model"));
}
