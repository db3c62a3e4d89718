//! Training end to end on the CPU engine: the quickstart learns, runs are deterministic, and gradient
//! accumulation is the same as one big batch.

use kiln_core::Config;
use kiln_cpu::CpuBackend;
use kiln_train::{Hooks, Summary, Trainer, checkpoint};

fn run(config: &Config) -> Summary {
    let mut trainer = Trainer::new(config, CpuBackend::<f32>::new()).unwrap();
    trainer.run(&mut Hooks::default(), false).unwrap()
}

fn config(overrides: &[&str]) -> Config {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    Config::load(None, &overrides).unwrap()
}

/// A small model on the quickstart's addition data, for tests that only need a few steps.
const SMALL: &[&str] = &[
    "model.n_embd=32",
    "model.n_head=2",
    "train.micro_batch=8",
    "train.total_batch_tokens=104",
    "train.max_steps=6",
    "optim.warmup_steps=2",
    "train.eval_steps=2",
];

#[test]
fn quickstart_loss_falls_below_bound() {
    // The quickstart's own model and data, 300 of its 1000 steps. The loss starts near ln 13 ≈ 2.56 (uniform over
    // the 13 characters). A model that has learned only the format (the newline, and a thousands digit that is
    // mostly 0 or 1) but guesses the other three digits sits near (3 · ln 10 + 0.5) / 5 ≈ 1.5; below 1.0 it is
    // computing digits of the sums.
    let summary = run(&config(&["train.max_steps=300", "train.eval_every=0"]));
    let first = summary.losses[0];
    let last = summary.losses[summary.losses.len() - 5..].iter().sum::<f32>() / 5.0;
    assert!((first - 13f32.ln()).abs() < 0.3, "initial loss {first}");
    assert!(last < 1.0, "loss after 300 steps: {last} (losses: {:?})", &summary.losses[..10]);
    assert!(summary.val_loss.unwrap() < 1.0);
}

#[test]
fn same_seed_gives_bit_identical_losses() {
    let a = run(&config(SMALL));
    let b = run(&config(SMALL));
    assert_eq!(a.losses, b.losses);
    assert_eq!(a.val_loss, b.val_loss);
    let mut other = SMALL.to_vec();
    other.push("train.seed=7");
    assert_ne!(a.losses, run(&config(&other)).losses);
}

#[test]
fn thread_count_does_not_change_results() {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| run(&config(SMALL)));
    let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap().install(|| run(&config(SMALL)));
    assert_eq!(one.losses, three.losses);
}

#[test]
fn accumulation_matches_one_big_batch() {
    // 4 micro-batches of 2 sequences against 1 of 8: the same sequences (a function of step and row), so the
    // same gradients up to rounding, with clipping active.
    let mut accumulated = SMALL.to_vec();
    accumulated.extend(["train.micro_batch=2", "optim.grad_clip=0.5"]);
    let mut whole = SMALL.to_vec();
    whole.push("optim.grad_clip=0.5");
    let (a, b) = (run(&config(&accumulated)), run(&config(&whole)));
    for (x, y) in a.losses.iter().zip(&b.losses) {
        assert!((x - y).abs() < 1e-5, "{:?} vs {:?}", a.losses, b.losses);
    }
}

#[test]
fn recomputing_activations_changes_no_loss() {
    // Two micro-batches a step; GPT-2 and Llama-style, whose MLPs recompute different nonlinearities.
    for family in [&[][..], SMALL_LLAMA] {
        let base = [SMALL, family, &["train.micro_batch=4"]].concat();
        let kept = run(&config(&base));
        for level in ["train.recompute=elementwise", "train.recompute=block"] {
            let recomputed = run(&config(&[&base[..], &[level]].concat()));
            assert_eq!(recomputed.losses, kept.losses, "{level} {family:?}");
            assert_eq!(recomputed.val_loss, kept.val_loss, "{level} {family:?}");
        }
    }
}

#[test]
fn fused_bias_gradients_train_as_the_separate_sums() {
    // With one micro-batch a step each bias gradient is the same values summed in the same order, fused or not: bit
    // for bit. ZeRO stage 2 (one rank) alternates the blocks' gradient buffers, which a sum added before its block's
    // buffer is cleared would be lost from. With two micro-batches a step the second's sum is added to the
    // first's whole rather than row by row: a rounding apart.
    let fused = |base: &[&'static str]| [base, &["train.fuse_bias_gradients=true"]].concat();
    for extra in [&[][..], &["dist.zero=2"], &["train.recompute=block"]] {
        let base = [SMALL, extra].concat();
        let (separate, together) = (run(&config(&base)), run(&config(&fused(&base))));
        assert_eq!(together.losses, separate.losses, "{extra:?}");
        assert_eq!(together.val_loss, separate.val_loss, "{extra:?}");
    }
    let base = [SMALL, &["train.micro_batch=4"]].concat();
    let (separate, together) = (run(&config(&base)), run(&config(&fused(&base))));
    assert_ne!(together.losses, separate.losses, "the sums are rounded differently");
    for (a, b) in together.losses.iter().zip(&separate.losses) {
        assert!((a - b).abs() < 1e-5, "{:?} vs {:?}", together.losses, separate.losses);
    }
}

fn out_dir(name: &str) -> String {
    let dir = std::env::temp_dir().join(format!("kiln-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.to_string_lossy().into_owned()
}

fn with(base: &[&str], extra: &[String]) -> Config {
    let mut all: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    all.extend(extra.iter().cloned());
    Config::load(None, &all).unwrap()
}

/// [`SMALL`] as a Llama-style model: grouped-query attention, an untied head, Llama 3's rotary scaling.
const SMALL_LLAMA: &[&str] = &[
    "model.arch=llama",
    "model.n_head=4",
    "model.n_kv_head=2",
    "model.rope_scaling={ type = \"llama3\", factor = 4.0, low_freq_factor = 1.0, high_freq_factor = 4.0, \
     original_max_position_embeddings = 8 }",
];

/// 4 experts, 2 a token, with a balancing loss.
const EXPERTS: &[&str] = &["model.experts=4", "model.experts_per_token=2", "model.router_aux_loss=0.02"];

#[test]
fn resuming_from_a_checkpoint_continues_bit_identically() {
    for (name, family) in
        [("resume", &[][..]), ("resume-llama", SMALL_LLAMA), ("resume-experts", &[SMALL_LLAMA, EXPERTS].concat())]
    {
        resuming_continues_bit_identically(name, &[SMALL, family].concat());
    }
}

/// Each line of a run's `metrics.jsonl`.
fn metrics_lines(dir: &str) -> Vec<serde_json::Value> {
    let metrics = std::fs::read_to_string(std::path::Path::new(dir).join("metrics.jsonl")).unwrap();
    metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn resuming_continues_bit_identically(name: &str, base: &[&str]) {
    let dir = out_dir(name);
    let extra = [format!("train.out_dir={dir}"), "train.checkpoint_every=3".into(), "optim.grad_clip=0.5".into()];
    let cfg = with(base, &extra);
    let full = Trainer::new(&cfg, CpuBackend::<f32>::new()).unwrap().run(&mut Hooks::default(), true).unwrap();
    assert_eq!(full.losses.len(), 6);
    // A model with experts logs its balancing loss at every step (near experts_per_token, 2, while routing is
    // even), and only such a model.
    let aux_losses = |lines: &[serde_json::Value]| -> Vec<f64> {
        lines.iter().filter(|l| l["event"].is_null()).filter_map(|l| l["aux_loss"].as_f64()).collect()
    };
    let full_aux = aux_losses(&metrics_lines(&dir));
    if cfg.model.experts().is_some() {
        assert!(full_aux.len() == 6 && full_aux.iter().all(|&aux| (1.5..4.0).contains(&aux)), "{full_aux:?}");
    } else {
        assert!(full_aux.is_empty(), "{full_aux:?}");
    }
    let root = std::path::Path::new(&dir).join("checkpoints");
    let steps: Vec<u64> = kiln_train::checkpoint::list(&root).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![3, 6]);
    let mut resumed = Trainer::new(&cfg, CpuBackend::<f32>::new()).unwrap();
    assert_eq!(resumed.resume(&kiln_train::checkpoint::step_dir(&root, 3)).unwrap(), 3);
    let rest = resumed.run(&mut Hooks::default(), true).unwrap();
    assert_eq!(rest.losses, full.losses[3..], "a resumed run must repeat the uninterrupted one exactly");
    // The metrics file holds each step once, and where the run resumed: the resumed run replaced what followed its
    // checkpoint, with the same balancing losses.
    let lines = metrics_lines(&dir);
    assert_eq!(aux_losses(&lines), full_aux);
    let steps: Vec<(u64, &str)> =
        lines.iter().map(|l| (l["step"].as_u64().unwrap(), l["event"].as_str().unwrap_or(""))).collect();
    assert_eq!(steps, [(1, ""), (2, ""), (3, ""), (3, "resume"), (4, ""), (5, ""), (6, "")]);
}

#[test]
fn old_checkpoints_are_pruned_and_unfinished_ones_ignored() {
    let dir = out_dir("prune");
    let extra = [format!("train.out_dir={dir}"), "train.checkpoint_every=1".into(), "train.keep_checkpoints=2".into()];
    Trainer::new(&with(SMALL, &extra), CpuBackend::<f32>::new()).unwrap().run(&mut Hooks::default(), true).unwrap();
    let root = std::path::Path::new(&dir).join("checkpoints");
    // A crash mid-write leaves a temporary directory behind; it is never taken for a checkpoint.
    std::fs::create_dir_all(root.join(".tmp-step_00000007-1")).unwrap();
    let steps: Vec<u64> = kiln_train::checkpoint::list(&root).into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![5, 6]);
}

/// Every file under `dir` with its contents, by path relative to `dir`, sorted.
fn files_under(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                files_under(&path).into_iter().map(|(inner, bytes)| (format!("{name}/{inner}"), bytes)).collect()
            } else {
                vec![(name, std::fs::read(&path).unwrap())]
            }
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_checkpoint_is_published_whole_and_a_failed_one_leaves_the_last_intact() {
    let dir = out_dir("failed-save");
    let extra = [format!("train.out_dir={dir}"), "train.checkpoint_every=6".into()];
    let cfg = with(SMALL, &extra);
    let mut trainer = Trainer::new(&cfg, CpuBackend::<f32>::new()).unwrap();
    trainer.run(&mut Hooks::default(), true).unwrap();
    let root = std::path::Path::new(&dir).join("checkpoints");
    let before = files_under(&root);
    let names: Vec<&str> = before.iter().map(|(name, _)| name.as_str()).collect();
    // Every file, and no temporary directory beside the checkpoint.
    assert_eq!(
        names,
        [
            "step_00000006/config.json",
            "step_00000006/kiln_tokenizer.json",
            "step_00000006/model.safetensors",
            "step_00000006/optimizer.safetensors",
            "step_00000006/state.json"
        ]
    );
    // A write that fails part-way, as on a full disk: the weights are written, then the moments cannot be.
    let progress = checkpoint::Progress { step: 7, ..Default::default() };
    let err =
        checkpoint::save(&root, &progress, &cfg, trainer.model(), None, 1, true, &mut |source, elements, values| {
            if source == checkpoint::Source::V {
                return Err(kiln_core::Error::io(
                    "optimizer.safetensors",
                    std::io::Error::other("no space left on device"),
                ));
            }
            *values = vec![0.0; elements.len()];
            Ok(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("no space left"), "{err}");
    assert!(files_under(&root) == before, "the last checkpoint must be untouched, and the failed one leave nothing");
}

#[test]
fn a_checkpoint_of_another_shape_is_refused_by_name() {
    let dir = out_dir("shape");
    let extra = [format!("train.out_dir={dir}"), "train.checkpoint_every=6".into()];
    Trainer::new(&with(SMALL, &extra), CpuBackend::<f32>::new()).unwrap().run(&mut Hooks::default(), true).unwrap();
    let wider = with(SMALL, &[extra[0].clone(), "model.n_embd=48".into()]);
    let mut trainer = Trainer::new(&wider, CpuBackend::<f32>::new()).unwrap();
    let err = trainer.resume(&std::path::Path::new(&dir).join("checkpoints/step_00000006")).unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("transformer.wte.weight") && msg.contains("[13, 48]"),
        "{msg}"
    );
}

#[test]
fn initialising_from_a_hugging_face_directory_gives_the_same_model() {
    let dir = out_dir("hf-init");
    let extra = [format!("train.out_dir={dir}"), "train.checkpoint_every=6".into()];
    Trainer::new(&with(SMALL, &extra), CpuBackend::<f32>::new()).unwrap().run(&mut Hooks::default(), true).unwrap();
    let ckpt = format!("{dir}/checkpoints/step_00000006");
    let mut resumed = Trainer::new(&with(SMALL, &extra), CpuBackend::<f32>::new()).unwrap();
    resumed.resume(std::path::Path::new(&ckpt)).unwrap();
    let mut initialised =
        Trainer::new(&with(SMALL, &[format!("model.init=hf:{ckpt}")]), CpuBackend::<f32>::new()).unwrap();
    assert_eq!(resumed.validation_loss().unwrap(), initialised.validation_loss().unwrap());
    // The directory's config.json is read with the config, so a missing one is a config-time error naming it.
    let all = ["model.init=hf:/no/such/dir".to_string()];
    let err = Config::load(None, &all).unwrap_err();
    assert!(err.to_string().contains("/no/such/dir/config.json"), "{err}");
}

#[test]
fn llmc_model_files_load_in_llmc_order() {
    use kiln_model::{Model, ModelSpec};
    let shape = ModelSpec::gpt2(2, 2, 8, 5, 11);
    let mut b = CpuBackend::<f32>::new();
    let source = Model::new(&mut b, shape, 1, 1).unwrap();
    for (i, v) in b.values_mut(source.params).unwrap().iter_mut().enumerate() {
        *v = i as f32 * 0.001;
    }
    // llm.c's file: header, then wte (all padded rows), wpe, each per-layer kind across layers, ln_f.
    let params = b.values_mut(source.params).unwrap().to_vec();
    let view = |name: &str| {
        let p = source.layout.iter().find(|p| p.name == name).unwrap();
        params[p.offset..p.offset + p.len()].to_vec()
    };
    let mut header = [0i32; 256];
    header[..8].copy_from_slice(&[20240326, 3, 5, 11, 2, 2, 8, 64]);
    let mut values: Vec<f32> = view("wte");
    values.extend(view("wpe"));
    for kind in [
        "ln_1.weight",
        "ln_1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.fc.weight",
        "mlp.fc.bias",
        "mlp.proj.weight",
        "mlp.proj.bias",
    ] {
        for l in 0..2 {
            values.extend(view(&format!("h.{l}.{kind}")));
        }
    }
    values.extend(view("ln_f.weight"));
    values.extend(view("ln_f.bias"));
    let dir = out_dir("llmc");
    std::fs::create_dir_all(&dir).unwrap();
    let path = std::path::Path::new(&dir).join("model.bin");
    let bytes: Vec<u8> =
        header.iter().flat_map(|h| h.to_le_bytes()).chain(values.iter().flat_map(|v| v.to_le_bytes())).collect();
    std::fs::write(&path, &bytes).unwrap();

    let target = Model::new(&mut b, shape, 1, 2).unwrap();
    kiln_train::llmc::load(&path, &target, &mut b, &mut checkpoint::into_params(&target)).unwrap();
    let loaded = b.values_mut(target.params).unwrap().to_vec();
    // Everything but wte's padded rows (which kiln keeps at zero) comes across.
    let used = shape.vocab * shape.n_embd;
    assert_eq!(loaded[..used], params[..used]);
    let wte_len = shape.padded_vocab * shape.n_embd;
    assert!(loaded[used..wte_len].iter().all(|&v| v == 0.0));
    assert_eq!(loaded[wte_len..], params[wte_len..]);

    let mut wrong = bytes.clone();
    wrong[8..12].copy_from_slice(&7i32.to_le_bytes());
    std::fs::write(&path, &wrong).unwrap();
    let err =
        kiln_train::llmc::load(&path, &target, &mut b, &mut checkpoint::into_params(&target)).unwrap_err().to_string();
    assert!(err.contains("model.bin") && err.contains("max_seq_len is 7"), "{err}");
}

/// Sentences from a small grammar, deterministic: text with structure at the level of characters, words and
/// sentences, for a character model to learn.
fn grammar_text(sentences: usize) -> String {
    let words: [&[&str]; 4] = [
        &["the", "a", "every", "no", "my", "your"],
        &["quick", "old", "pale", "gentle", "bold", "weary", "noble"],
        &["king", "horse", "sword", "queen", "river", "castle", "knight", "crown"],
        &["sees", "loves", "fears", "finds", "keeps", "seeks", "holds"],
    ];
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut pick = |list: &[&'static str]| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        list[(state % list.len() as u64) as usize]
    };
    let mut text = String::new();
    for i in 0..sentences {
        let (d1, a, n1, v, d2, n2) =
            (pick(words[0]), pick(words[1]), pick(words[2]), pick(words[3]), pick(words[0]), pick(words[2]));
        text.push_str(&format!("{d1} {a} {n1} {v} {d2} {n2}"));
        text.push_str(if i % 5 == 4 { ".\n" } else { ", " });
    }
    text
}

#[test]
fn a_llama_style_char_model_learns_no_worse_than_gpt2_of_the_same_width() {
    let dir = out_dir("grammar");
    std::fs::create_dir_all(&dir).unwrap();
    let data = std::path::Path::new(&dir).join("grammar.txt");
    std::fs::write(&data, grammar_text(6000)).unwrap();
    let base = [
        format!("data.train={}", data.display()),
        "model.n_layer=2".into(),
        "model.n_head=4".into(),
        "model.n_embd=64".into(),
        "model.block_size=64".into(),
        "train.micro_batch=8".into(),
        "train.total_batch_tokens=512".into(),
        "train.max_steps=200".into(),
        "train.eval_every=0".into(),
        "train.eval_steps=20".into(),
        "optim.lr=3e-3".into(),
        "optim.warmup_steps=20".into(),
    ];
    let loss = |family: &[&str]| {
        let mut all: Vec<String> = base.to_vec();
        all.extend(family.iter().map(|s| s.to_string()));
        run(&Config::load(None, &all).unwrap()).val_loss.unwrap()
    };
    let gpt2 = loss(&[]);
    let llama = loss(&["model.arch=llama", "model.n_kv_head=2"]);
    // Both learn the grammar's words (uniform over the 26 characters would be ln 26 ≈ 3.3).
    assert!(gpt2 < 1.6, "GPT-2: {gpt2}");
    assert!(llama <= gpt2, "Llama-style {llama} against GPT-2 {gpt2}");
}
