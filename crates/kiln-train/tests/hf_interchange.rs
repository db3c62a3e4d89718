//! Models traded with Hugging Face, checked against transformers' own numbers and against themselves.
//!
//! Golden files (tests/golden/, made by scripts/reference/llama_golden.py with transformers): tiny
//! `LlamaForCausalLM` checkpoints (grouped-query attention 4:2; tied and untied heads; rope_theta 1e4 and 5e5;
//! Llama 3 scaling; fp32, bf16 and sharded files; transformers 4's and 5's config spellings; biases on every linear
//! layer), a `Qwen2ForCausalLM` (biases on q, k and v; theta 1e6) and a `MistralForCausalLM` (no sliding window),
//! each with a batch and
//! the logits, loss and every parameter's gradient transformers computed for it. kiln loads each through
//! `model.init = "hf:DIR"` alone, taking the shape from config.json, and must match them.

use kiln_core::config::{Experts, LinearGroup};
use kiln_core::{Backend, Config};
use kiln_cpu::CpuBackend;
use kiln_model::hf;
use kiln_model::{Model, ModelSpec, Pass};
use kiln_train::{Hooks, Trainer, checkpoint};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

fn golden_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(case)
}

/// A config whose model comes from `dir` alone, with `model_keys` added to `[model]`.
fn config_from(dir: &Path, model_keys: &str) -> kiln_core::Result<Config> {
    let text =
        format!("[model]\ninit = \"hf:{}\"\n{model_keys}\n[data]\ntrain = \"synthetic:addition\"\n", dir.display());
    Config::from_toml_str(&text, "test.toml", &[])
}

/// Normwise relative error: max |got − want| / max |want|.
fn error(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, &x| m.max((x as f64).abs()));
    got.iter().zip(want).fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs())) / scale
}

struct Golden {
    inputs: Vec<u32>,
    targets: Vec<u32>,
    shape: (usize, usize),
    logits: Vec<f32>,
    loss: f32,
    /// transformers' balancing loss before its coefficient, where the model has one.
    aux_loss: Option<f32>,
    file: Vec<u8>,
}

impl Golden {
    fn read(dir: &Path) -> Golden {
        let file = std::fs::read(dir.join("golden.safetensors")).unwrap();
        let t = SafeTensors::deserialize(&file).unwrap();
        let ids = |name: &str| {
            let v = t.tensor(name).unwrap();
            assert_eq!(v.dtype(), Dtype::I64);
            (
                v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect(),
                v.shape().to_vec(),
            )
        };
        let (inputs, shape): (Vec<u32>, Vec<usize>) = ids("input_ids");
        let (targets, _) = ids("targets");
        let floats = |name: &str| -> Vec<f32> {
            t.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let (logits, loss) = (floats("logits"), floats("loss")[0]);
        let aux_loss = t.tensor("aux_loss").is_ok().then(|| floats("aux_loss")[0]);
        Golden { inputs, targets, shape: (shape[0], shape[1]), logits, loss, aux_loss, file: file.clone() }
    }

    fn grad(&self, name: &str) -> Vec<f32> {
        let t = SafeTensors::deserialize(&self.file).unwrap();
        let v = t.tensor(&format!("grad.{name}")).unwrap_or_else(|_| panic!("no gradient of {name}"));
        v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

#[test]
fn llama_checkpoints_from_transformers_give_its_logits_loss_and_gradients() {
    // Each case, its biased layers, and its tensors: 9 a block (q, k, v, o, gate, up, down and two norms) and 2
    // more (the embedding and the final norm), an LM head when untied, the biases, and Qwen3's two QK-norms a block.
    let cases = [
        ("tied_theta1e4", &[][..], 20),
        ("untied_theta5e5_bf16", &[], 21),
        ("llama3_scaling_sharded", &[], 21),
        ("biases_untied", &LinearGroup::ALL, 21 + 2 * 7),
        ("qwen2_tied", &[LinearGroup::Qkv], 20 + 2 * 3),
        ("mistral_untied", &[], 21),
        ("qwen3_tied", &[LinearGroup::Qkv, LinearGroup::Proj], 20 + 2 * 4 + 2 * 2),
        ("smollm3_untied", &[], 21),
        ("mistral_window_untied", &[], 21),
        ("qwen2_window_tied", &[LinearGroup::Qkv], 20 + 2 * 3),
        // The MLP's three tensors become a router and three an expert: 4 experts, 2 a token.
        ("mixtral_untied", &[], 21 + 2 * (1 + 3 * 4 - 3)),
        ("qwen3_moe_tied", &[], 20 + 2 * (1 + 3 * 4 - 3) + 2 * 2),
    ];
    for (case, biases, tensor_count) in cases {
        let dir = golden_dir(case);
        let config = config_from(&dir, "block_size = 9").unwrap_or_else(|e| panic!("{case}: {e}"));
        let m = &config.model;
        assert_eq!((m.n_layer, m.n_head, m.n_kv_head, m.n_embd, m.ffn_dim), (2, 4, Some(2), 48, Some(80)), "{case}");
        assert_eq!(m.tie_embeddings, Some(case.contains("tied") && !case.contains("untied")), "{case}");
        assert_eq!(m.biases.as_deref(), Some(biases), "{case}");
        // Qwen3's heads are 16 wide, not 48 / 4.
        let qwen3 = case.starts_with("qwen3");
        assert_eq!((m.head_dim, m.qk_norm), (Some(if qwen3 { 16 } else { 12 }), Some(qwen3)), "{case}");
        // SmolLM3's second layer has no rotary embedding.
        assert_eq!(m.nope_interval, case.starts_with("smollm3").then_some(2), "{case}");
        // Mistral's window is 4 keys, Qwen2's 3.
        let window = [("mistral_window", 4), ("qwen2_window", 3)].into_iter().find(|(c, _)| case.starts_with(c));
        assert_eq!(m.sliding_window, window.map(|(_, w)| w), "{case}");
        // Mixtral normalises its experts' weights and trains with its balancing loss (coefficient 0.05); Qwen3-MoE
        // here does neither.
        let experts =
            [("mixtral", (true, 0.05)), ("qwen3_moe", (false, 0.0))].into_iter().find(|(c, _)| case.starts_with(c));
        let experts = experts.map(|(_, (normalize, aux_loss))| Experts { count: 4, per_token: 2, normalize, aux_loss });
        assert_eq!(m.experts(), experts, "{case}");
        let golden = Golden::read(&dir);
        let (batch, time) = golden.shape;
        let spec = ModelSpec::new(m, 67);
        let mut b = CpuBackend::<f32>::new();
        let model = Model::new(&mut b, spec, batch, 1).unwrap();
        checkpoint::load_weights(&dir, &model, &mut b, &mut checkpoint::into_params(&model)).unwrap();
        model.load_batch(&mut b, &golden.inputs, Some(&golden.targets)).unwrap();

        b.zero(model.losses).unwrap();
        model.forward(&mut b, batch, time, Pass::Loss).unwrap();
        let mut logits = vec![0.0f32; 67];
        let mut all = Vec::new();
        for row in 0..batch * time {
            model.logits_row(&mut b, row, &mut logits).unwrap();
            all.extend_from_slice(&logits);
        }
        let logits_error = error(&all, &golden.logits);
        assert!(logits_error < 1e-5, "{case}: logits differ by {logits_error:e} (normwise relative)");
        let n = (batch * time) as f32;
        let loss = b.sum(model.losses.slice(0, batch * time)).unwrap() / n;
        assert!(((loss - golden.loss) / golden.loss).abs() < 1e-4, "{case}: loss {loss} vs {}", golden.loss);

        b.zero(model.grads).unwrap();
        b.zero(model.losses).unwrap();
        let dloss = b.scalar(1.0 / n).unwrap();
        if let Some(terms) = model.balance_terms {
            b.zero(terms).unwrap();
        }
        model.forward(&mut b, batch, time, Pass::Train { dloss }).unwrap();
        // The balancing loss's terms sum to its coefficient times transformers' aux_loss (the pass's weight, dloss
        // times its rows, is 1 here).
        let coefficient = spec.experts.map_or(0.0, |e| e.aux_loss);
        let aux_loss = model.balance_terms.map(|terms| b.sum(terms).unwrap() / coefficient as f32);
        match (aux_loss, golden.aux_loss) {
            (Some(ours), Some(theirs)) => {
                assert!(((ours - theirs) / theirs).abs() < 1e-5, "{case}: aux_loss {ours} vs transformers' {theirs}")
            }
            (None, None) => {}
            other => panic!("{case}: aux_loss (ours, transformers') {other:?}"),
        }
        model.backward(&mut b, batch, time).unwrap();
        let mut grads = vec![0.0f32; model.grads.len];
        b.download(model.grads, &mut grads).unwrap();
        let tensors = hf::tensors(&spec, &model.layout);
        assert_eq!(tensors.len(), tensor_count, "{case}");
        for t in tensors {
            let ours = t.from_kiln(&grads[t.elements.clone()]);
            let e = error(&ours, &golden.grad(&t.name));
            assert!(e < 1e-4, "{case}: gradient of {} differs by {e:e}", t.name);
        }
    }
}

#[test]
fn model_keys_given_beside_a_hugging_face_model_must_agree_with_it() {
    let dir = golden_dir("llama3_scaling_sharded");
    // A rotary model's sequence length is the run's to choose.
    match config_from(&dir, "") {
        Err(kiln_core::Error::Config { key, message, .. }) => {
            assert_eq!(key, "model.block_size");
            assert!(message.contains("256 tokens"), "{message}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    // Without a config file, the built-in quickstart's own model gives way to the one read (as the README's
    // fine-tuning command has it); keys set beside it still must agree.
    let from_quickstart = |more: &str| {
        let mut overrides = vec![format!("model.init=hf:{}", dir.display()), "model.block_size=32".into()];
        overrides.extend(more.split_whitespace().map(str::to_string));
        Config::load(None, &overrides)
    };
    let model = from_quickstart("").unwrap().model;
    assert_eq!((model.arch.name(), model.n_layer, model.n_embd, model.block_size), ("llama", 2, 48, 32));
    match from_quickstart("model.n_layer=3") {
        Err(kiln_core::Error::Config { key, source, .. }) => {
            assert_eq!((key.as_str(), source.as_str()), ("model.n_layer", "--set"))
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    // Agreeing keys, and a shorter context, are fine.
    let config = config_from(&dir, "arch = \"llama\"\nn_layer = 2\nblock_size = 64\nrope_theta = 500000.0").unwrap();
    assert_eq!(config.model.block_size, 64);
    let scaling = config.model.rope_scaling.unwrap();
    assert_eq!((scaling.factor, scaling.original_max_position_embeddings), (8.0, 64));
    for (key, line) in [
        ("model.n_layer", "n_layer = 3"),
        ("model.arch", "arch = \"gpt2\""),
        ("model.n_kv_head", "n_kv_head = 4"),
        ("model.rope_theta", "rope_theta = 10000.0"),
        ("model.tie_embeddings", "tie_embeddings = true"),
    ] {
        match config_from(&dir, &format!("block_size = 64\n{line}")) {
            Err(kiln_core::Error::Config { key: k, message, .. }) => {
                assert_eq!(k, key, "{message}");
                assert!(message.contains("config.json says"), "{message}");
            }
            other => panic!("{line}: expected a config error, got {other:?}"),
        }
    }
    // A config.json of a model kiln does not build names what it cannot read.
    let odd = std::env::temp_dir().join(format!("kiln-hf-odd-{}", std::process::id()));
    std::fs::create_dir_all(&odd).unwrap();
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap().replace("\"silu\"", "\"gelu\"");
    std::fs::write(odd.join("config.json"), text).unwrap();
    let err = config_from(&odd, "block_size = 16").unwrap_err().to_string();
    assert!(err.contains("hidden_act") && err.contains("config.json"), "{err}");
    // Qwen2's and Qwen3's sliding window, read where it covers every layer or none: use_sliding_window turns it on,
    // layer_types (or without them, max_window_layers) says where.
    let full_types = "\"layer_types\": [\n    \"full_attention\",\n    \"full_attention\"\n  ],";
    for case in ["qwen2_tied", "qwen3_tied"] {
        let qwen = std::fs::read_to_string(golden_dir(case).join("config.json")).unwrap();
        for from in
            [full_types, "\"use_sliding_window\": false", "\"sliding_window\": null", "\"max_window_layers\": 28"]
        {
            assert!(qwen.contains(from), "{case}: {from}");
        }
        let window = |on: bool, types: &str, first: &str| {
            let json = qwen
                .replace("\"use_sliding_window\": false", &format!("\"use_sliding_window\": {on}"))
                .replace("\"sliding_window\": null", "\"sliding_window\": 5")
                .replace(full_types, types)
                .replace("\"max_window_layers\": 28", &format!("\"max_window_layers\": {first}"));
            std::fs::write(odd.join("config.json"), json).unwrap();
            config_from(&odd, "block_size = 16").map(|c| c.model.sliding_window).map_err(|e| e.to_string())
        };
        let sliding = "\"layer_types\": [\"sliding_attention\", \"sliding_attention\"],";
        let mixed = "\"layer_types\": [\"full_attention\", \"sliding_attention\"],";
        assert_eq!(window(true, full_types, "28"), Ok(None), "{case}");
        assert_eq!(window(true, sliding, "28"), Ok(Some(5)), "{case}");
        assert_eq!(window(false, sliding, "28"), Ok(None), "{case}");
        assert_eq!(window(true, "", "0"), Ok(Some(5)), "{case}");
        assert_eq!(window(true, "", "2"), Ok(None), "{case}");
        // A list of another length than the layers' is refused too, whatever it says.
        let short = "\"layer_types\": [\"sliding_attention\"],";
        for (types, first, field) in
            [(mixed, "28", "layer_types"), (short, "28", "layer_types"), ("", "1", "max_window_layers")]
        {
            let err = window(true, types, first).unwrap_err();
            assert!(err.contains(field) && err.contains("config.json"), "{case}: {err}");
        }
    }
    // SmolLM3's layers listed as sliding: transformers masks them by sliding_window whatever use_sliding_window says.
    let from = "\"layer_types\": [\n    \"full_attention\",\n    \"full_attention\"\n  ]";
    let smollm3 = std::fs::read_to_string(golden_dir("smollm3_untied").join("config.json")).unwrap();
    assert!(smollm3.contains(from), "{smollm3}");
    let sliding = smollm3.replace(from, "\"layer_types\": [\"full_attention\", \"sliding_attention\"]");
    std::fs::write(odd.join("config.json"), sliding).unwrap();
    let err = config_from(&odd, "block_size = 16").unwrap_err().to_string();
    assert!(err.contains("layer_types") && err.contains("config.json"), "{err}");
    // NoPE layers other than every no_rope_layer_interval-th.
    let from = "\"no_rope_layers\": [\n    1,\n    0\n  ]";
    assert!(smollm3.contains(from), "{smollm3}");
    std::fs::write(odd.join("config.json"), smollm3.replace(from, "\"no_rope_layers\": [0, 1]")).unwrap();
    let err = config_from(&odd, "block_size = 16").unwrap_err().to_string();
    assert!(err.contains("no_rope_layers") && err.contains("config.json"), "{err}");
    // Keys left out take the class's defaults, not Llama's: Qwen3's heads are 128 wide, SmolLM3 ties its embeddings
    // and has 4 key/value heads and theta 2e6.
    let qwen3 = std::fs::read_to_string(golden_dir("qwen3_tied").join("config.json")).unwrap();
    std::fs::write(odd.join("config.json"), qwen3.replace("\"head_dim\": 16,", "")).unwrap();
    assert_eq!(config_from(&odd, "block_size = 16").unwrap().model.head_dim, Some(128));
    let mut json: serde_json::Value = serde_json::from_str(&smollm3).unwrap();
    for key in ["tie_word_embeddings", "num_key_value_heads", "rope_parameters"] {
        json.as_object_mut().unwrap().remove(key);
    }
    std::fs::write(odd.join("config.json"), json.to_string()).unwrap();
    let m = config_from(&odd, "block_size = 16").unwrap().model;
    assert_eq!((m.tie_embeddings, m.n_kv_head, m.rope_theta), (Some(true), Some(4), Some(2e6)));
    // Mistral's key/value heads are 8 unless told (its 4 query heads then make no whole groups: refused, named).
    let mistral = std::fs::read_to_string(golden_dir("mistral_untied").join("config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&mistral).unwrap();
    json.as_object_mut().unwrap().remove("num_key_value_heads");
    std::fs::write(odd.join("config.json"), json.to_string()).unwrap();
    let err = config_from(&odd, "block_size = 16").unwrap_err().to_string();
    assert!(err.contains("model.n_kv_head") && err.contains("config.json"), "{err}");
    // Heads of an odd width, which the rotation cannot pair.
    let qwen3 = std::fs::read_to_string(golden_dir("qwen3_tied").join("config.json")).unwrap();
    std::fs::write(odd.join("config.json"), qwen3.replace("\"head_dim\": 16", "\"head_dim\": 15")).unwrap();
    let err = config_from(&odd, "block_size = 16").unwrap_err().to_string();
    assert!(err.contains("model.head_dim") && err.contains("config.json"), "{err}");
    // Mistral's sliding window: null turns it off; absent, it is MistralConfig's 4096.
    let mistral = std::fs::read_to_string(golden_dir("mistral_untied").join("config.json")).unwrap();
    for (to, want) in [
        ("\"sliding_window\": 64", Some(Some(64))),
        ("\"unused\": 0", Some(Some(4096))),
        ("\"sliding_window\": null", Some(None)),
        ("\"sliding_window\": 0", None),
    ] {
        std::fs::write(odd.join("config.json"), mistral.replace("\"sliding_window\": null", to)).unwrap();
        match config_from(&odd, "block_size = 16") {
            Err(e) => assert!(want.is_none() && e.to_string().contains("sliding_window"), "{to}: {e}"),
            Ok(config) => assert_eq!(Some(config.model.sliding_window), want, "{to}"),
        }
    }
    // Mixtures of experts: output_router_logits decides whether the balancing loss trains; Qwen3-MoE's count of
    // experts may be spelt as transformers 4 spells it; what kiln does not build (Mixtral's jitter, blocks with a
    // plain MLP, Qwen3-MoE's window) is refused with the field named.
    let moe = |case: &str, from: &str, to: &str| {
        let json = std::fs::read_to_string(golden_dir(case).join("config.json")).unwrap();
        assert!(json.contains(from), "{case}: {from}");
        std::fs::write(odd.join("config.json"), json.replace(from, to)).unwrap();
        config_from(&odd, "block_size = 16").map(|c| c.model.experts().unwrap()).map_err(|e| e.to_string())
    };
    let mixtral = Experts { count: 4, per_token: 2, normalize: true, aux_loss: 0.05 };
    let qwen3_moe = Experts { normalize: false, aux_loss: 0.0, ..mixtral };
    let logits = "\"output_router_logits\": true";
    assert_eq!(
        moe("mixtral_untied", logits, "\"output_router_logits\": false"),
        Ok(Experts { aux_loss: 0.0, ..mixtral })
    );
    let count = "\"num_local_experts\": 4";
    assert_eq!(moe("qwen3_moe_tied", count, "\"num_experts\": 4"), Ok(qwen3_moe));
    let normalize = "\"norm_topk_prob\": false";
    assert_eq!(
        moe("qwen3_moe_tied", normalize, "\"norm_topk_prob\": true"),
        Ok(Experts { normalize: true, ..qwen3_moe })
    );
    // A key config.json gives (2 experts a token) that one --set gives contradicts (1 expert) is --set's problem.
    let mixtral_dir = golden_dir("mixtral_untied");
    let overrides = [format!("model.init=hf:{}", mixtral_dir.display()), "model.block_size=16".into()];
    match Config::load(None, &[&overrides[..], &["model.experts=1".into()]].concat()) {
        Err(kiln_core::Error::Config { source, key, .. }) => {
            assert_eq!((source.as_str(), key.as_str()), ("--set", "model.experts_per_token"))
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    for (case, from, to, field) in [
        ("mixtral_untied", "\"router_jitter_noise\": 0.0", "\"router_jitter_noise\": 0.1", "router_jitter_noise"),
        ("mixtral_untied", "\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 5", "model.experts_per_token"),
        ("qwen3_moe_tied", "\"decoder_sparse_step\": 1", "\"decoder_sparse_step\": 2", "decoder_sparse_step"),
        ("qwen3_moe_tied", "\"mlp_only_layers\": []", "\"mlp_only_layers\": [1]", "mlp_only_layers"),
        ("qwen3_moe_tied", "\"use_sliding_window\": false", "\"use_sliding_window\": true", "use_sliding_window"),
    ] {
        let err = moe(case, from, to).unwrap_err();
        assert!(err.contains(field) && err.contains("config.json"), "{case}: {err}");
    }
    // Defaults of the classes': Mixtral's ε is 1e-5 (Llama's 1e-6); Qwen3-MoE needs no intermediate_size, which
    // its blocks with experts do not use.
    for (case, from, to, want) in [
        ("mixtral_untied", "\"rms_norm_eps\": 1e-05", "\"unused\": 0", (1e-5, 80)),
        ("qwen3_moe_tied", "\"intermediate_size\": 56", "\"unused\": 0", (1e-5, 80)),
        ("qwen3_moe_tied", "\"moe_intermediate_size\": 80", "\"unused\": 0", (1e-5, 768)),
    ] {
        moe(case, from, to).unwrap();
        let m = config_from(&odd, "block_size = 16").unwrap().model;
        assert_eq!((m.norm_eps.unwrap(), m.ffn_dim.unwrap()), want, "{case}: {from}");
    }
    // The balancing loss's coefficient is training's to choose; the experts are the model's.
    let mixtral_dir = golden_dir("mixtral_untied");
    let chosen = config_from(&mixtral_dir, "block_size = 16\nrouter_aux_loss = 0.3").unwrap();
    assert_eq!(chosen.model.experts(), Some(Experts { aux_loss: 0.3, ..mixtral }));
    match config_from(&mixtral_dir, "block_size = 16\nexperts = 8") {
        Err(kiln_core::Error::Config { key, message, .. }) => {
            assert_eq!(key, "model.experts", "{message}");
            assert!(message.contains("config.json says"), "{message}");
        }
        other => panic!("expected a config error, got {other:?}"),
    }
    // A value out of range in config.json is config.json's, not the keys it fills in; rotary settings of the
    // wrong type are refused, not taken for the default.
    let llama = std::fs::read_to_string(dir.join("config.json")).unwrap();
    for (key, from, to) in [
        ("model.n_kv_head", "\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
        ("rope_parameters", "\"rope_parameters\": {", "\"rope_parameters\": 5, \"unused\": {"),
    ] {
        assert!(llama.contains(from), "{from}");
        std::fs::write(odd.join("config.json"), llama.replacen(from, to, 1)).unwrap();
        let err = config_from(&odd, "block_size = 16").unwrap_err().to_string();
        assert!(err.contains(key) && err.starts_with(&odd.join("config.json").display().to_string()), "{err}");
    }
    let _ = std::fs::remove_dir_all(&odd);
}

/// The logits of a fixed batch from the model `config` describes with the weights of `dir`.
fn logits_of(dir: &Path, config: &Config, vocab: usize) -> Vec<f32> {
    let spec = ModelSpec::new(&config.model, vocab);
    let mut b = CpuBackend::<f32>::new();
    let (batch, time) = (2, config.model.block_size);
    let model = Model::new(&mut b, spec, batch, 1).unwrap();
    checkpoint::load_weights(dir, &model, &mut b, &mut checkpoint::into_params(&model)).unwrap();
    let ids: Vec<u32> = (0..batch * time).map(|i| (i * 5 % vocab) as u32).collect();
    model.load_batch(&mut b, &ids, None).unwrap();
    model.forward(&mut b, batch, time, Pass::Logits).unwrap();
    let mut row = vec![0.0f32; vocab];
    let mut all = Vec::new();
    for r in 0..batch * time {
        model.logits_row(&mut b, r, &mut row).unwrap();
        all.extend_from_slice(&row);
    }
    all
}

#[test]
fn trained_checkpoints_exported_in_shards_and_read_back_give_identical_logits() {
    let llama = "model.arch=llama model.n_head=4 model.n_kv_head=2 model.tie_embeddings=false";
    let qwen2 = format!("{llama} model.biases=[\"qkv\"]");
    let biased = format!("{llama} model.biases=[\"mlp\",\"qkv\",\"proj\"]");
    let qwen3 = format!("{llama} model.head_dim=16 model.qk_norm=true");
    let smollm3 = format!("{llama} model.nope_interval=2 model.biases=[\"qkv\",\"proj\"]");
    let mistral = format!("{llama} model.sliding_window=5");
    let qwen3_window = format!("{qwen3} model.sliding_window=4");
    let mixtral = format!("{llama} model.experts=4 model.router_aux_loss=0.02");
    let qwen3_moe = format!("{qwen3} model.experts=3 model.normalize_expert_weights=false");
    let cases = [
        ("gpt2", "", "GPT2LMHeadModel"),
        ("llama", llama, "LlamaForCausalLM"),
        ("qwen2", &qwen2, "Qwen2ForCausalLM"),
        ("llama-biases", &biased, "LlamaForCausalLM"),
        ("qwen3", &qwen3, "Qwen3ForCausalLM"),
        ("smollm3", &smollm3, "SmolLM3ForCausalLM"),
        ("mistral", &mistral, "MistralForCausalLM"),
        ("qwen3-window", &qwen3_window, "Qwen3ForCausalLM"),
        ("mixtral", &mixtral, "MixtralForCausalLM"),
        ("qwen3-moe", &qwen3_moe, "Qwen3MoeForCausalLM"),
    ];
    for (name, family, class) in cases {
        let out = std::env::temp_dir().join(format!("kiln-hf-round-trip-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let mut overrides: Vec<String> = family.split_whitespace().map(str::to_string).collect();
        overrides.extend(
            [
                "model.n_embd=32",
                "train.micro_batch=4",
                "train.total_batch_tokens=52",
                "train.max_steps=3",
                "train.checkpoint_every=3",
                "train.eval_every=0",
                "train.eval_steps=1",
            ]
            .map(str::to_string),
        );
        overrides.push(format!("train.out_dir={}", out.display()));
        let config = Config::load(None, &overrides).unwrap();
        let mut trainer = Trainer::new(&config, CpuBackend::<f32>::new()).unwrap();
        trainer.run(&mut Hooks::default(), true).unwrap();
        let vocab = trainer.model().spec.vocab;
        let ckpt = checkpoint::step_dir(&checkpoint::root(&config), 3);
        let export = out.join("export");
        // Shards of 20 kB: the model (about 40k weights) spans several.
        let files = checkpoint::export(&ckpt, &export, 20_000).unwrap();
        assert!(files.len() > 3, "{name}: {files:?}");
        assert!(export.join("model.safetensors.index.json").exists());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(export.join("config.json")).unwrap()).unwrap();
        assert_eq!(json["architectures"][0], class, "{name}");
        assert_eq!(json["vocab_size"], vocab);
        // Stated, not left to the class's default (SmolLM3Config's 128004 lies past this vocabulary).
        assert_eq!(json.get("pad_token_id"), Some(&serde_json::Value::Null), "{name}");
        // Read back through model.init alone: the shape comes from config.json.
        let mut from_export = overrides.clone();
        from_export.push(format!("model.init=hf:{}", export.display()));
        from_export.push(format!("model.block_size={}", config.model.block_size));
        let reread = Config::load(None, &from_export).unwrap();
        let expected = kiln_core::config::ModelConfig { init: reread.model.init.clone(), ..config.model.clone() };
        assert_eq!(reread.model, expected, "{name}: config.json states the whole model");
        let want = logits_of(&ckpt, &config, vocab);
        assert_eq!(logits_of(&export, &reread, vocab), want, "{name}");
        let _ = std::fs::remove_dir_all(&out);
    }
}
