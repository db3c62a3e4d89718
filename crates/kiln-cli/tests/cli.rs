//! The `kiln` binary as users run it: the quickstart end to end, and bad input ending in a message that names
//! the problem and exit code 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).env("RUST_LOG", "info").output().expect("kiln runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// Runs `kiln train` expecting a usage error: exit code 2 and every fragment in the message.
fn expect_usage_error(args: &[&str], fragments: &[&str]) {
    let out = kiln(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "exit code for {args:?}; stderr:\n{err}");
    for f in fragments {
        assert!(err.contains(f), "{args:?}: message should mention {f:?}:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

const SMALL_MODEL: &str = "[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n";

#[test]
fn quickstart_learns_to_add() {
    let out_dir = temp_dir("quickstart");
    let set_out = format!("train.out_dir={}", out_dir.display());
    let out = kiln(&["train", "--set", &set_out]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("exact match on held-out sums"), "{err}");
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1000);
    for key in ["step", "loss", "lr", "grad_norm", "step_ms", "tokens_per_s", "allocated_bytes"] {
        assert!(lines[0].get(key).is_some(), "metrics line lacks {key}: {}", lines[0]);
    }
    assert!(lines[249]["val_loss"].is_number());
    let last = &lines[999];
    assert_eq!(last["step"], 1000);
    let accuracy = last["exact_match"].as_f64().unwrap();
    assert!(accuracy >= 0.9, "exact match {accuracy} on held-out sums");
    // The saved configuration is the resolved one, and loads again.
    let saved = out_dir.join("config.toml");
    assert!(std::fs::read_to_string(&saved).unwrap().contains("out_dir"));
    let again = kiln(&["train", "--config", &saved.to_string_lossy(), "--set", "train.max_steps=1", "--set", &set_out]);
    assert!(again.status.success(), "{}", stderr(&again));
}

#[test]
fn trains_on_a_text_file() {
    let dir = temp_dir("text");
    let text: String = (0..400).map(|i| format!("line {i}: the quick brown fox jumps over the lazy dog\n")).collect();
    let data = write(&dir, "corpus.txt", &text);
    let config = write(
        &dir,
        "c.toml",
        &format!(
            "{SMALL_MODEL}[data]\ntrain = \"{data}\"\n[train]\nmax_steps = 20\nmicro_batch = 4\neval_every = 10\nout_dir = \"{}\"\n",
            dir.join("run").display()
        ),
    );
    let out = kiln(&["train", "--config", &config]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("val loss"), "{err}");
}

#[test]
fn config_errors_name_the_key_and_the_file() {
    let dir = temp_dir("config");
    let unknown = write(&dir, "unknown.toml", &format!("{SMALL_MODEL}micro_bach = 3\n[data]\ntrain = \"x\"\n"));
    expect_usage_error(&["train", "--config", &unknown], &["unknown.toml", "model.micro_bach", "unknown key"]);

    let wrong_type =
        write(&dir, "type.toml", &format!("{SMALL_MODEL}[data]\ntrain = \"x\"\n[train]\nmicro_batch = \"four\"\n"));
    expect_usage_error(&["train", "--config", &wrong_type], &["type.toml", "train.micro_batch"]);

    let indivisible = write(
        &dir,
        "heads.toml",
        "[model]\nn_layer = 1\nn_head = 3\nn_embd = 16\nblock_size = 8\n[data]\ntrain = \"x\"\n",
    );
    expect_usage_error(&["train", "--config", &indivisible], &["heads.toml", "model.n_embd", "divisible"]);

    expect_usage_error(&["train", "--set", "train.micro_batch=0"], &["--set", "train.micro_batch"]);
    expect_usage_error(&["train", "--set", "optim.lrr=1"], &["--set", "optim.lrr", "unknown key"]);
    // Paths and flags that cannot be what was meant.
    let file = write(&dir, "a-file", "");
    let inside = format!("train.out_dir={file}/run");
    expect_usage_error(&["train", "--backend", "cpu", "--set", &inside], &["train.out_dir", "is a file"]);
    expect_usage_error(
        &["train", "--backend", "cpu", "--rendezvous", "tcp://127.0.0.1:1"],
        &["--rendezvous", "launcher"],
    );
    expect_usage_error(&["info", "--threads", "100000"], &["--threads"]);
    expect_usage_error(&["train", "--config", "/no/such/config.toml"], &["/no/such/config.toml"]);
}

#[test]
fn data_errors_name_the_file() {
    let dir = temp_dir("data");
    let missing = dir.join("missing.txt");
    let set = format!("data.train={}", missing.display());
    expect_usage_error(&["train", "--set", &set], &["missing.txt", "cannot read"]);

    // The Tiny Shakespeare configurations, where their corpus has not been downloaded (the tests' directory has
    // no data/), say how to download it.
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/shakespeare-char.toml");
    expect_usage_error(
        &["train", "--backend", "cpu", "--config", config],
        &["data/tinyshakespeare.txt", "curl --create-dirs -o data/tinyshakespeare.txt https://"],
    );

    let binary = dir.join("binary.txt");
    std::fs::write(&binary, [b'a', b'b', 0xC3, 0x28, b'c']).unwrap();
    let set = format!("data.train={}", binary.display());
    expect_usage_error(&["train", "--set", &set], &["binary.txt", "byte offset 2"]);
}

#[test]
fn usage_errors() {
    expect_usage_error(&["train", "--backend", "tpu"], &["tpu"]);
    expect_usage_error(&["frobnicate"], &["frobnicate"]);
}

#[test]
fn cuda_without_a_driver_names_the_missing_library() {
    // Where the CUDA driver is installed this runs a few steps on the GPU instead; where it is not (CI), the
    // error must say which library is missing and how to go on, with exit code 1, not a panic.
    let out = kiln(&["train", "--backend", "cuda", "--set", "train.max_steps=3", "--set", "train.eval_steps=1"]);
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    if kiln_cuda::libraries::Library::Driver.is_present() {
        assert!(out.status.success(), "{err}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("libcuda.so") && err.contains("--backend cpu"), "{err}");
    }
}

#[test]
fn a_run_too_large_for_the_host_stops_before_allocating() {
    // 77B parameters: over a terabyte with their gradients and moments in f32.
    let huge = ["model.n_layer=96", "model.n_embd=8192", "model.n_head=64"].map(|s| ["--set", s]).concat();
    let started = std::time::Instant::now();
    let mut args = vec!["train", "--backend", "cpu"];
    args.extend(&huge);
    expect_usage_error(&args, &["does not fit", "nothing was allocated", "parameters", "total"]);
    let mut args = vec!["bench", "train", "--backend", "cpu", "--steps", "1"];
    args.extend(&huge);
    expect_usage_error(&args, &["does not fit"]);
    assert!(started.elapsed().as_secs() < 30, "took {:?}", started.elapsed());
}

const GPT2_124M: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/gpt2-124m.toml");

/// `kiln plan --json` for `args`, parsed.
fn plan_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["plan", "--json"];
    all.extend(args);
    let out = kiln(&all);
    assert!(out.status.success(), "{all:?}: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{all:?}: {e}"))
}

#[test]
fn plan_gives_each_component_and_whether_it_fits() {
    let gpt2 = ["--config", GPT2_124M, "--backend", "cuda", "--vocab", "50257"];
    let one = plan_json(&[&gpt2[..], &["--memory", "80GiB"]].concat());
    // GPT-2 124M at 32 × 1024 in bf16 allocates about 14.78 GiB (llm.c's layout with one projection buffer shared
    // by every block); the CUDA context comes on top.
    let gib = |v: &serde_json::Value| v.as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    let allocated = gib(&one["allocated_bytes"]);
    assert!((14.7..14.9).contains(&allocated), "{allocated} GiB allocated: {one}");
    assert!(gib(&one["total_bytes"]) > allocated && one["fits"] == true, "{one}");
    let names: Vec<&str> = one["components"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for part in ["parameters", "fp32 master weights", "gradients", "AdamW", "activations", "cuBLASLt", "context"] {
        assert!(names.iter().any(|n| n.contains(part)), "no {part} in {names:?}");
    }
    // Too small a device; then ZeRO stage 1 over 8 GPUs shares the master weights and moments.
    let small = plan_json(&[&gpt2[..], &["--memory", "8GiB"]].concat());
    assert_eq!(small["fits"], false, "{small}");
    let sharded = plan_json(&[&gpt2[..], &["--memory", "80GiB", "--gpus", "8", "--set", "dist.zero=1"]].concat());
    let saved = one["allocated_bytes"].as_u64().unwrap() - sharded["allocated_bytes"].as_u64().unwrap();
    let per_weight = saved as f64 / 124.4e6;
    assert!((10.0..11.0).contains(&per_weight), "ZeRO-1 on 8 saves {per_weight} bytes a weight (7/8 of 12)");
    // "auto" takes the largest micro-batch whose plan fits in 90% of the memory and divides the step.
    let auto = plan_json(&[&gpt2[..], &["--memory", "40GiB", "--set", "train.micro_batch=auto"]].concat());
    let mb = auto["micro_batch"].as_u64().unwrap();
    assert_eq!((mb, auto["accumulation"].as_u64().unwrap() * mb), (64, 512), "{auto}");
    assert!(gib(&auto["total_bytes"]) <= 36.0, "{auto}");
}

#[test]
fn a_model_the_engine_cannot_run_is_refused_by_its_plan() {
    // Heads of 256 channels: the CUDA engine's attention takes at most 128; the CPU engine takes any.
    let wide = ["--config", GPT2_124M, "--vocab", "50257", "--set", "model.n_head=3"];
    expect_usage_error(
        &[&["plan", "--backend", "cuda"], &wide[..]].concat(),
        &["heads of 256 channels", "model.head_dim", "cuda (bf16) engine's attention takes at most 128"],
    );
    plan_json(&[&["--backend", "cpu"], &wide[..]].concat());
}

#[test]
fn plan_without_the_data_asks_for_the_vocabulary() {
    expect_usage_error(&["plan", "--config", GPT2_124M], &["fineweb", "--vocab"]);
}

#[test]
fn info_lists_the_engines() {
    let out = kiln(&["info"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kiln ") && text.contains("cpu") && text.contains("threads"), "{text}");
    // Each CUDA library is reported as this process's loader finds it (the child inherits its environment):
    // found with its version where one is loaded (scripts/test.sh puts NVRTC on the path), not found where none is.
    use kiln_cuda::libraries::Library;
    for library in [Library::Driver, Library::Nvrtc, Library::Cublas, Library::CublasLt, Library::Nccl] {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(library.file_name()))
            .unwrap_or_else(|| panic!("no line for {}:\n{text}", library.file_name()));
        let status = line.split_whitespace().skip(1).collect::<Vec<_>>().join(" ");
        let expected = match (library.is_present(), library.version()) {
            (true, Some(version)) => format!("found, version {version}"),
            (true, None) => "found".to_string(),
            (false, _) => "not found".to_string(),
        };
        assert_eq!(status, expected, "{line}");
    }
}

#[test]
fn kernels_build_compiles_every_kernel_for_a_named_architecture() {
    // Needs NVRTC and the CUDA headers, which scripts/test.sh provides (see crates/kiln-cuda/tests/nvrtc.rs).
    let cache = temp_dir("kernel-cache");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["kernels", "build", "--arch", "sm_86"])
        .env("KILN_CACHE_DIR", &cache)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    for function in ["layernorm_backward", "classifier", "attention_forward", "adamw"] {
        assert!(text.contains(function), "{function} missing from:\n{text}");
    }
    assert!(text.contains("registers") && text.contains("compiled"), "{text}");
    assert!(!text.contains("cached"), "a fresh cache has nothing cached:\n{text}");
    expect_usage_error(&["kernels", "build", "--arch", "compute_90"], &["compute_90", "sm_90a"]);
}

#[test]
fn selftest_checks_the_cpu_engine() {
    let out = kiln(&["selftest", "--backend", "cpu"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    for check in [
        "PASS encoder_forward",
        "PASS attention_backward",
        "PASS rmsnorm_backward",
        "PASS rope inverse",
        "PASS swiglu_backward",
        "PASS gpt2 gradient h.1.mlp.fc.weight",
        "PASS llama gradient h.1.mlp.fc.weight",
        "PASS gpt2 training",
        "PASS llama training",
    ] {
        assert!(text.contains(check), "{check} missing from:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
}

/// `kiln bench train` on the CPU with a model small enough to take a moment, and `extra` arguments.
fn bench_train_tiny(extra: &[&str]) -> Output {
    bench_train_tiny_command(extra).output().expect("kiln runs")
}

/// What [`bench_train_tiny`] runs, without the kernels' switches of the environment that runs the tests.
fn bench_train_tiny_command(extra: &[&str]) -> Command {
    let mut args = vec!["bench", "train", "--backend", "cpu", "--steps", "3", "--warmup", "1"];
    for set in [
        "model.n_layer=1",
        "model.n_embd=32",
        "model.n_head=2",
        "model.block_size=16",
        "train.micro_batch=2",
        "train.total_batch_tokens=64",
    ] {
        args.extend(["--set", set]);
    }
    args.extend(extra);
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(args).env("RUST_LOG", "info").env_remove("KILN_FLASH_WGMMA").env_remove("KILN_EXPERT_PRODUCTS");
    command
}

#[test]
fn bench_train_reports_throughput_as_json() {
    let dir = temp_dir("bench-train-json");
    let report_path = dir.join("report.json").to_string_lossy().into_owned();
    let out = bench_train_tiny(&["--json", &report_path]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    // The line printed last is the same report.
    let printed: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(printed, report);
    for key in ["step_ms", "tokens_per_s", "tflops", "data_ms", "passes_ms", "optimizer_ms"] {
        assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }
    // A GPU's peak means nothing to the CPU engine: MFU only against a peak given.
    assert!(report["mfu"].is_null() && report["peak_tflops"].is_null(), "{report}");
    assert!(text.contains("no MFU (--peak-tflops"), "{text}");
    let with_peak = bench_train_tiny(&["--json", &report_path, "--peak-tflops", "0.5"]);
    assert!(with_peak.status.success(), "{}", stderr(&with_peak));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let (mfu, tflops) = (report["mfu"].as_f64().unwrap(), report["tflops"].as_f64().unwrap());
    assert!((mfu - tflops / 0.5).abs() <= 1e-12 * mfu && report["peak_tflops"] == 0.5, "{report}");
    assert!(report["queue_ms"].as_f64().unwrap() >= 0.0, "{report}");
    assert!(report["allocated_bytes"].as_u64().unwrap() > 0, "{report}");
    assert_eq!((report["micro_batch"].as_u64(), report["accumulation"].as_u64()), (Some(2), Some(2)));
    assert_eq!(report["backend"], "cpu");
    assert_eq!(report["kiln_version"], env!("CARGO_PKG_VERSION"));
    assert!(report["machine"]["cpu_threads"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["machine"]["gpu"].is_null(), "{report}");
    let switches = &report["machine"]["kernel_switches"];
    assert!(switches["KILN_FLASH_WGMMA"].is_null() && switches["KILN_EXPERT_PRODUCTS"].is_null(), "{report}");
    assert_eq!(report["config"]["model"]["n_embd"], 32);
    assert_eq!(report["config"]["train"]["total_batch_tokens"], 64);
    expect_usage_error(&["bench", "train", "--steps", "0"], &["--steps"]);
    // The kernels' switches in the environment are part of where a report was measured.
    let switched = bench_train_tiny_command(&["--json", &report_path]).env("KILN_EXPERT_PRODUCTS", "grouped").output();
    let switched = switched.expect("kiln runs");
    assert!(switched.status.success(), "{}", stderr(&switched));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["machine"]["kernel_switches"]["KILN_EXPERT_PRODUCTS"], "grouped", "{report}");
}

#[test]
fn bench_train_fails_only_when_slower_than_the_baseline() {
    let dir = temp_dir("bench-train-baseline");
    let baseline = |name: &str, tokens_per_s: f64| {
        write(&dir, name, &serde_json::json!({ "backend": "cpu", "tokens_per_s": tokens_per_s }).to_string())
    };
    let slower = baseline("slower.json", 1e-3);
    let out = bench_train_tiny(&["--baseline", &slower, "--tolerance", "0.05"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let faster = baseline("faster.json", 1e12);
    let out = bench_train_tiny(&["--baseline", &faster, "--tolerance", "10%"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    for fragment in ["faster.json", "tokens/s", "1000000000000.0000", "10.0%"] {
        assert!(err.contains(fragment), "message should mention {fragment:?}:\n{err}");
    }

    let corrupt = write(&dir, "corrupt.json", "{\"tokens_per_s\": ");
    expect_usage_error(
        &["bench", "train", "--backend", "cpu", "--baseline", &corrupt],
        &["corrupt.json", "not a report"],
    );
    // A rate of 0 would pass any run, and a negative one fail none.
    for rate in [0.0, -5.0] {
        let nothing = baseline("nothing.json", rate);
        expect_usage_error(
            &["bench", "train", "--backend", "cpu", "--baseline", &nothing],
            &["nothing.json", "above 0"],
        );
    }
    let missing = dir.join("missing.json").to_string_lossy().into_owned();
    expect_usage_error(&["bench", "train", "--backend", "cpu", "--baseline", &missing], &["missing.json"]);
    expect_usage_error(&["bench", "train", "--baseline", &slower, "--tolerance", "5"], &["--tolerance"]);
}

#[test]
fn resume_picks_the_newest_checkpoint_and_says_when_there_is_none() {
    let dir = temp_dir("resume");
    let set_out = format!("train.out_dir={}", dir.join("run").display());
    let small = [
        "--set",
        "model.n_embd=32",
        "--set",
        "model.n_head=2",
        "--set",
        "train.micro_batch=8",
        "--set",
        "train.total_batch_tokens=104",
        "--set",
        "train.eval_steps=1",
    ];
    let mut args = vec![
        "train",
        "--backend",
        "cpu",
        "--set",
        &set_out,
        "--set",
        "train.max_steps=4",
        "--set",
        "train.checkpoint_every=2",
    ];
    args.extend(small);
    let first = kiln(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(dir.join("run/checkpoints/step_00000004/model.safetensors").is_file());
    assert!(dir.join("run/checkpoints/step_00000004/config.json").is_file());
    // Continue the same run to step 6.
    let mut more = vec![
        "train",
        "--backend",
        "cpu",
        "--resume",
        "--set",
        &set_out,
        "--set",
        "train.max_steps=6",
        "--set",
        "train.checkpoint_every=2",
    ];
    more.extend(small);
    let second = kiln(&more);
    let err = stderr(&second);
    assert!(second.status.success(), "{err}");
    assert!(err.contains("resumed from") && err.contains("step_00000004") && err.contains("step      6/6"), "{err}");
    // A run already at its last step has nothing left to train: saying so beats "done" after no step, and it is
    // said before the tensors are read (here, a model file that cannot be).
    let done = more.iter().map(|a| if *a == "train.max_steps=6" { "train.max_steps=5" } else { a }).collect::<Vec<_>>();
    std::fs::write(dir.join("run/checkpoints/step_00000006/model.safetensors"), b"not safetensors").unwrap();
    expect_usage_error(&done, &["train.max_steps is 5", "step_00000006", "nothing is left to train"]);
    let empty = temp_dir("resume-empty");
    let set_empty = format!("train.out_dir={}", empty.display());
    expect_usage_error(&["train", "--backend", "cpu", "--resume", "--set", &set_empty], &["no complete checkpoint"]);
}

#[test]
fn prepare_then_train_on_the_shards() {
    let dir = temp_dir("prepare");
    let text: String = (0..300).map(|i| format!("Line {i}: to be, or not to be, that is the question.\n")).collect();
    let input = write(&dir, "corpus.txt", &text);
    let out = dir.join("shards");
    let out_s = out.to_string_lossy().into_owned();
    let prepared = kiln(&["prepare", "--input", &input, "--out", &out_s, "--val-fraction", "0.1"]);
    assert!(prepared.status.success(), "{}", stderr(&prepared));
    assert!(out.join("meta.json").is_file() && out.join("train_000000.bin").is_file());
    let set_data = format!("data.train={out_s}");
    let set_out = format!("train.out_dir={}", dir.join("run").display());
    let trained = kiln(&[
        "train",
        "--backend",
        "cpu",
        "--set",
        &set_data,
        "--set",
        &set_out,
        "--set",
        "model.n_layer=1",
        "--set",
        "model.n_head=2",
        "--set",
        "model.n_embd=32",
        "--set",
        "model.block_size=32",
        "--set",
        "train.micro_batch=2",
        "--set",
        "train.total_batch_tokens=64",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.checkpoint_every=3",
        "--set",
        "train.eval_steps=1",
    ]);
    let err = stderr(&trained);
    assert!(trained.status.success(), "{err}");
    assert!(err.contains("vocabulary 50257"), "{err}");
    expect_usage_error(&["prepare", "--input", "/no/such/input.txt", "--out", &out_s], &["/no/such/input.txt"]);
    let no_val = dir.join("no-val").to_string_lossy().into_owned();
    expect_usage_error(&["prepare", "--input", &input, "--out", &no_val, "--val-fraction", "0"], &["--val-fraction"]);

    // The checkpoint scores the validation split, and exports as a model-only directory.
    let ckpt = dir.join("run/checkpoints/step_00000003");
    let ckpt_s = ckpt.to_string_lossy().into_owned();
    let evaluated = kiln(&["eval", "--checkpoint", &ckpt_s, "--backend", "cpu"]);
    let text = String::from_utf8_lossy(&evaluated.stdout);
    assert!(
        evaluated.status.success() && text.contains("val loss") && text.contains("perplexity"),
        "{text}{}",
        stderr(&evaluated)
    );
    let export = dir.join("export").to_string_lossy().into_owned();
    // The export works in a directory of its own: a user's directory beside it stays.
    std::fs::create_dir_all(dir.join("export.tmp")).unwrap();
    std::fs::write(dir.join("export.tmp/keep.txt"), "mine").unwrap();
    // What a killed export to the same place left goes.
    std::fs::create_dir_all(dir.join(".export.tmp-export-4000000")).unwrap();
    assert!(kiln(&["export", "--checkpoint", &ckpt_s, "--out", &export]).status.success());
    assert!(!dir.join(".export.tmp-export-4000000").exists());
    assert!(dir.join("export/model.safetensors").is_file() && dir.join("export/config.json").is_file());
    assert!(dir.join("export/kiln_tokenizer.json").is_file(), "the export names its tokenizer (GPT-2's)");
    assert!(!dir.join("export/optimizer.safetensors").exists());
    assert!(dir.join("export.tmp/keep.txt").is_file(), "the export removed a directory of the user's");
    expect_usage_error(&["export", "--checkpoint", &ckpt_s, "--out", &export], &["exists"]);
    // A config.json that does not describe the weights beside it is refused, and nothing is written.
    let odd = dir.join("odd-checkpoint");
    std::fs::create_dir_all(&odd).unwrap();
    for file in ["model.safetensors", "kiln_tokenizer.json"] {
        std::fs::copy(ckpt.join(file), odd.join(file)).unwrap();
    }
    let config = std::fs::read_to_string(ckpt.join("config.json")).unwrap();
    std::fs::write(odd.join("config.json"), config.replace("\"n_embd\": 32", "\"n_embd\": 64")).unwrap();
    let odd_export = dir.join("odd-export").to_string_lossy().into_owned();
    let odd_s = odd.to_string_lossy().into_owned();
    expect_usage_error(&["export", "--checkpoint", &odd_s, "--out", &odd_export], &["config.json", "[50257, 64]"]);
    assert!(!Path::new(&odd_export).exists());

    // Sampling streams GPT-2 text, with and without the key/value cache, and the greedy text is the same.
    let greedy = |model: &str, cache: bool| {
        let mut args = vec![
            "sample",
            "--checkpoint",
            model,
            "--backend",
            "cpu",
            "--prompt",
            "To be",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
        ];
        if !cache {
            args.push("--no-kv-cache");
        }
        let out = kiln(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = greedy(&ckpt_s, true);
    assert!(text.starts_with("To be") && text.len() > "To be\n".len(), "{text:?}");
    assert_eq!(text, greedy(&ckpt_s, false));
    assert_eq!(text, greedy(&export, true), "the export samples as the checkpoint does");
    expect_usage_error(&["sample", "--checkpoint", "/no/such/checkpoint"], &["/no/such/checkpoint"]);
    // Options that pick no token, and a prompt longer than the context (block_size 32), are usage errors, before any
    // text is printed.
    for (option, value) in [("--temperature", "nan"), ("--temperature", "-1"), ("--top-k", "0"), ("--top-p", "1.5")] {
        let set = format!("{option}={value}");
        expect_usage_error(&["sample", "--checkpoint", &ckpt_s, "--backend", "cpu", &set], &[option]);
    }
    let long = "to be ".repeat(40);
    let out = kiln(&["sample", "--checkpoint", &ckpt_s, "--backend", "cpu", "--prompt", &long]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("longer than the model's context of 32") && out.stdout.is_empty());
}

#[test]
fn prepare_with_a_tokenizer_json_then_train() {
    let dir = temp_dir("prepare-hf");
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiln-data/tests/golden/hf_tokenizer");
    let path = |name: &str| golden.join(name).to_string_lossy().into_owned();
    let (input, tokenizer) = (path("long.txt"), path("tokenizer.json"));
    let out = dir.join("shards");
    let out_s = out.to_string_lossy().into_owned();
    let prepared = kiln(&["prepare", "--input", &input, "--tokenizer", &tokenizer, "--out", &out_s]);
    assert!(prepared.status.success(), "{}", stderr(&prepared));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!((meta["tokenizer"].as_str(), meta["vocab_size"].as_u64()), (Some("hf"), Some(657)));
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(&tokenizer).unwrap());
    let set_data = format!("data.train={out_s}");
    let set_out = format!("train.out_dir={}", dir.join("run").display());
    let mut args = vec!["train", "--backend", "cpu", "--set", &set_data, "--set", &set_out];
    for set in [
        "model.arch=llama",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "train.micro_batch=2",
        "train.checkpoint_every=1",
    ] {
        args.extend(["--set", set]);
    }
    args.extend(["--set", "train.total_batch_tokens=64", "--set", "train.max_steps=1", "--set", "train.eval_steps=1"]);
    let trained = kiln(&args);
    let err = stderr(&trained);
    assert!(trained.status.success() && err.contains("vocabulary 657"), "{err}");

    // The checkpoint carries the tokenizer, and so does its export: each is all sample and eval need.
    let ckpt = dir.join("run/checkpoints/step_00000001");
    let export = dir.join("export");
    let (ckpt_s, export_s) = (ckpt.to_string_lossy().into_owned(), export.to_string_lossy().into_owned());
    let exported = kiln(&["export", "--checkpoint", &ckpt_s, "--out", &export_s]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    for model in [&ckpt_s, &export_s] {
        let dir = Path::new(model);
        assert_eq!(std::fs::read(dir.join("tokenizer.json")).unwrap(), std::fs::read(&tokenizer).unwrap());
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["eos_token_id"], meta["end_of_text"], "{model}");
        let sampled =
            kiln(&["sample", "--checkpoint", model, "--backend", "cpu", "--prompt", "The", "--max-new-tokens", "5"]);
        let text = String::from_utf8_lossy(&sampled.stdout);
        assert!(sampled.status.success() && text.starts_with("The"), "{text}{}", stderr(&sampled));
    }
    let evaluated =
        kiln(&["eval", "--checkpoint", &export_s, "--data", &out_s, "--block-size", "16", "--backend", "cpu"]);
    let text = String::from_utf8_lossy(&evaluated.stdout);
    assert!(evaluated.status.success() && text.contains("val loss"), "{text}{}", stderr(&evaluated));
    expect_usage_error(&["eval", "--checkpoint", &export_s, "--backend", "cpu"], &["--data"]);

    let prepare = |tokenizer: &str, more: &[&str], fragments: &[&str]| {
        let args = [&["prepare", "--input", &input, "--tokenizer", tokenizer, "--out", &out_s][..], more].concat();
        expect_usage_error(&args, fragments);
    };
    prepare("/no/such/tokenizer.json", &[], &["/no/such/tokenizer.json", "cannot read"]);
    prepare(&input.replace("long.txt", "documents.jsonl"), &[], &["documents.jsonl", "not a valid tokenizer.json"]);
    prepare("gpt3", &[], &["gpt3", "tokenizer.json"]);
    prepare("gpt2", &["--eos-token", "</s>"], &["--eos-token"]);
    prepare(&tokenizer, &["--eos-token", "<nope>"], &["tokenizer.json", "<nope>"]);
}

#[test]
fn ranks_as_threads_split_each_step_and_train_like_one_rank() {
    let dir = temp_dir("ranks");
    let run = |ranks: &str, micro_batch: &str, out: &str| {
        let out_dir = format!("train.out_dir={}", dir.join(out).display());
        let mb = format!("train.micro_batch={micro_batch}");
        let args = ["train", "--backend", "cpu", "--ranks", ranks, "--set", &mb, "--set", "train.max_steps=5"];
        // A step of 128 sequences of the quickstart's 13 tokens, whatever the micro-batch.
        let args = [&args[..], &["--set", "train.total_batch_tokens=1664"]].concat();
        let output = kiln(&[&args[..], &["--set", &out_dir, "--set", "train.eval_steps=1"]].concat());
        assert!(output.status.success(), "{}", stderr(&output));
        let metrics = std::fs::read_to_string(dir.join(out).join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let losses: Vec<f64> = lines.iter().map(|l| l["loss"].as_f64().unwrap()).collect();
        // Each rank's own time in each step, in a job of several.
        let rank_times: Vec<usize> =
            lines.iter().map(|l| l["rank_step_ms"].as_array().map_or(0, |times| times.len())).collect();
        let timed = lines.iter().flat_map(|l| l["rank_step_ms"].as_array().into_iter().flatten());
        assert!(timed.clone().all(|ms| ms.as_f64().is_some_and(|ms| ms > 0.0)), "{metrics}");
        (losses, rank_times, stderr(&output))
    };
    // One rank of 128 sequences, or two of 64 each.
    let (one, no_times, _) = run("1", "128", "one");
    let (two, times, log) = run("2", "64", "two");
    assert_eq!((no_times, times), (vec![0; 5], vec![2; 5]));
    assert!(log.contains("× 2 ranks"), "the log names the world size:\n{log}");
    assert!(log.contains("| ranks "), "the log lines give the ranks' times:\n{log}");
    assert_eq!(one.len(), 5);
    for (a, b) in one.iter().zip(&two) {
        assert!((a - b).abs() < 1e-5, "{one:?} vs {two:?}");
    }
    // The quickstart's step, one micro-batch of 128 sequences, does not split over 3 ranks of 128.
    expect_usage_error(&["train", "--backend", "cpu", "--ranks", "3"], &["train.total_batch_tokens", "3 ranks"]);
}

#[test]
fn a_launched_job_on_the_cpu_engine_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--backend", "cpu"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--ranks N"), "{}", stderr(&out));
    expect_usage_error(&["train", "--backend", "cpu", "--gpus", "0"], &["--gpus needs the CUDA engine"]);
    expect_usage_error(&["train", "--backend", "cuda", "--ranks", "2"], &["--backend cpu"]);
}

/// `kiln bench attention` on the CPU at one small grouped-query shape, with `extra` arguments.
fn bench_attention_tiny(extra: &[&str]) -> Output {
    let mut args = vec!["bench", "attention", "--backend", "cpu", "--batch", "2", "--heads", "4", "--kv-heads", "2"];
    args.extend(["--seq", "45", "--head-dim", "32", "--causal", "--reps", "3", "--warmup", "1"]);
    args.extend(extra);
    kiln(&args)
}

#[test]
fn bench_attention_reports_each_pass_as_json() {
    let dir = temp_dir("bench-attention");
    let report_path = dir.join("report.json").to_string_lossy().into_owned();
    let out = bench_attention_tiny(&["--json", &report_path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(stdout.lines().last().unwrap()).unwrap(), report);
    assert_eq!(report["backend"], "cpu");
    assert!(report["machine"]["cpu_threads"].as_u64().unwrap() >= 1, "{report}");
    let shape = &report["shapes"][0];
    assert_eq!(shape["shape"], "B2 H4/2kv T45 D32 causal");
    for key in ["forward_ms", "forward_tflops", "forward_backward_ms", "forward_backward_tflops"] {
        assert!(shape[key].as_f64().unwrap() > 0.0, "{key} in {report}");
    }

    // Baselines matched by shape: far slower passes, far faster fails, one without the shape is an input error.
    let baseline = |name: &str, shape: &str, tflops: f64| {
        let entry = serde_json::json!({ "shape": shape, "forward_backward_tflops": tflops });
        write(&dir, name, &serde_json::json!({ "shapes": [entry] }).to_string())
    };
    let slower = baseline("slower.json", "B2 H4/2kv T45 D32 causal", 1e-9);
    assert!(bench_attention_tiny(&["--baseline", &slower]).status.success());
    let faster = baseline("faster.json", "B2 H4/2kv T45 D32 causal", 1e6);
    let out = bench_attention_tiny(&["--baseline", &faster]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("B2 H4/2kv T45 D32 causal forward+backward TFLOP/s"), "{}", stderr(&out));
    let other = baseline("other.json", "B2 H4 T45 D32", 1e-9);
    let out = bench_attention_tiny(&["--baseline", &other]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("other.json: the baseline has no shape B2 H4/2kv T45 D32 causal"),
        "{}",
        stderr(&out)
    );

    let bad = kiln(&["bench", "attention", "--backend", "cpu", "--heads", "4", "--kv-heads", "3", "--reps", "1"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("key/value heads"), "{}", stderr(&bad));

    // A sliding window, named in the shape; it needs --causal, and at least one key.
    let out = bench_attention_tiny(&["--window", "9", "--json", &report_path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(report["shapes"][0]["shape"], "B2 H4/2kv T45 D32 causal window 9");
    for bad in [&["bench", "attention", "--backend", "cpu", "--window", "9"][..], &["--window", "0"]] {
        let out = if bad.len() > 2 { kiln(bad) } else { bench_attention_tiny(bad) };
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
}

/// `kiln bench allreduce` over two CPU ranks from 1 KiB to 64 KiB, with `extra` arguments.
fn bench_allreduce_tiny(extra: &[&str]) -> Output {
    let mut args = vec!["bench", "allreduce", "--backend", "cpu", "--ranks", "2", "--min-bytes", "1K"];
    args.extend(["--max-bytes", "64K", "--iters", "3"]);
    args.extend(extra);
    kiln(&args)
}

#[test]
fn bench_allreduce_reports_each_size_as_json() {
    let dir = temp_dir("bench-allreduce");
    let report_path = dir.join("report.json").to_string_lossy().into_owned();
    let out = bench_allreduce_tiny(&["--json", &report_path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("busbw") && stdout.contains("# Avg bus bandwidth"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(stdout.lines().last().unwrap()).unwrap(), report);
    assert_eq!((report["backend"].as_str(), report["ranks"].as_u64()), (Some("cpu"), Some(2)));
    let sizes = report["sizes"].as_array().unwrap();
    let bytes: Vec<u64> = sizes.iter().map(|s| s["bytes"].as_u64().unwrap()).collect();
    assert_eq!(bytes, [1, 2, 4, 8, 16, 32, 64].map(|k| k << 10));
    for size in sizes {
        for key in ["time_us", "algbw_gbps", "busbw_gbps"] {
            assert!(size[key].as_f64().unwrap() > 0.0, "{key} in {size}");
        }
        // Two ranks: the bus bandwidth is the algorithm bandwidth (× 2(n−1)/n = 1).
        assert_eq!(size["algbw_gbps"], size["busbw_gbps"]);
    }
    assert!(report["average_busbw_gbps"].as_f64().unwrap() > 0.0, "{report}");

    // Baselines compared size by size: far slower passes, far faster fails naming the size, one without a size
    // measured here is an input error.
    let baseline = |name: &str, sizes: &[u64], busbw: f64| {
        let entries: Vec<_> = sizes.iter().map(|b| serde_json::json!({ "bytes": b, "busbw_gbps": busbw })).collect();
        write(&dir, name, &serde_json::json!({ "ranks": 2, "sizes": entries }).to_string())
    };
    let slower = baseline("slower.json", &bytes, 1e-9);
    let out = bench_allreduce_tiny(&["--baseline", &slower]);
    assert!(out.status.success(), "{}", stderr(&out));
    let faster = baseline("faster.json", &bytes, 1e6);
    let out = bench_allreduce_tiny(&["--baseline", &faster, "--tolerance", "10%"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("65536 B busbw GB/s"), "{}", stderr(&out));
    let short = baseline("short.json", &bytes[..3], 1e-9);
    expect_usage_error(&["bench", "allreduce", "--backend", "cpu", "--baseline", &short], &["short.json", "no size"]);

    expect_usage_error(&["bench", "allreduce", "--backend", "cpu", "--max-bytes", "6"], &["multiple of 4"]);
    expect_usage_error(
        &["bench", "allreduce", "--backend", "cpu", "--min-bytes", "8K", "--max-bytes", "4K"],
        &["above --max-bytes"],
    );
    // Far more than any host has: refused before anything is allocated.
    expect_usage_error(
        &["bench", "allreduce", "--backend", "cpu", "--ranks", "2", "--max-bytes", "4096G"],
        &["--max-bytes", "host memory"],
    );
}
