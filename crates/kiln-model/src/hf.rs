//! The Hugging Face side of a model: the names, shapes and layouts `transformers` gives its weights
//! (`GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM`), and its `config.json`.
//!
//! kiln fuses some of transformers' tensors: one `[q; k; v]` product where Llama has `q_proj`, `k_proj` and
//! `v_proj`, one `[gate; up]` product where it has `gate_proj` and `up_proj`. Each Hugging Face tensor is therefore
//! a range of whole rows of one kiln parameter ([`HfTensor`]); GPT-2's `Conv1D` weights are those rows transposed.
//! The embedding and an untied LM head are stored without kiln's padded rows. Rotary embedding uses Hugging Face's
//! rotate-half pairing in both, so no weight is permuted.

use crate::params::ParamInfo;
use crate::spec::{Biases, Mlp, ModelSpec, Positions};
use kiln_core::NormKind;
use kiln_core::config::{Arch, QWEN2_BIASES};
use std::ops::Range;

/// One tensor of a Hugging Face checkpoint and where its values live in kiln's flat parameter vector.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTensor {
    /// transformers' name: `model.layers.3.self_attn.k_proj.weight`, `transformer.h.3.attn.c_attn.weight`.
    pub name: String,
    /// Its shape in the checkpoint.
    pub shape: Vec<usize>,
    /// The kiln parameter (an index into the layout) it is part of.
    pub param: usize,
    /// The elements of the flat parameter vector it covers: whole rows of that parameter.
    pub elements: Range<usize>,
    /// Stored transposed (GPT-2's `Conv1D` weights): element `(j, i)` of the checkpoint's tensor is row `i`,
    /// column `j` of kiln's.
    pub transposed: bool,
}

impl HfTensor {
    pub fn len(&self) -> usize {
        self.elements.len()
    }

    pub fn is_empty(&self) -> bool {
        self.elements.is_empty()
    }

    /// The checkpoint's values (row-major, in [`HfTensor::shape`]) of kiln's `values` (the elements of
    /// [`HfTensor::elements`]).
    pub fn from_kiln(&self, values: &[f32]) -> Vec<f32> {
        // kiln's rows are the checkpoint's columns.
        self.relaid(values, self.shape[1..].iter().product())
    }

    /// kiln's values of the checkpoint's `values`: the inverse of [`HfTensor::from_kiln`].
    pub fn to_kiln(&self, values: &[f32]) -> Vec<f32> {
        self.relaid(values, self.shape[0])
    }

    /// `values`, a row-major matrix of `rows` rows, transposed if this tensor is stored transposed.
    fn relaid(&self, values: &[f32], rows: usize) -> Vec<f32> {
        if !self.transposed {
            return values.to_vec();
        }
        let cols = values.len() / rows.max(1);
        (0..values.len()).map(|i| values[(i % rows) * cols + i / rows]).collect()
    }
}

/// transformers' class of a model of `spec`'s family.
pub fn architecture(spec: &ModelSpec) -> &'static str {
    match spec.arch {
        Arch::Gpt2 => "GPT2LMHeadModel",
        Arch::Llama if spec.experts.is_some() && spec.qk_norm => "Qwen3MoeForCausalLM",
        Arch::Llama if spec.experts.is_some() => "MixtralForCausalLM",
        Arch::Llama if spec.qk_norm => "Qwen3ForCausalLM",
        Arch::Llama if spec.nope_interval.is_some() => "SmolLM3ForCausalLM",
        Arch::Llama if is_qwen2(spec) => "Qwen2ForCausalLM",
        Arch::Llama if spec.sliding_window.is_some() => "MistralForCausalLM",
        Arch::Llama => "LlamaForCausalLM",
    }
}

/// Whether a Llama-style model is a Qwen2 to transformers (see [`QWEN2_BIASES`]). The weights' names are the same.
fn is_qwen2(spec: &ModelSpec) -> bool {
    spec.biases == Biases::of(&QWEN2_BIASES)
}

/// Every Hugging Face tensor of a model, in the order of kiln's layout.
pub fn tensors(spec: &ModelSpec, layout: &[ParamInfo]) -> Vec<HfTensor> {
    let mut out = Vec::new();
    for (index, p) in layout.iter().enumerate() {
        let row = p.shape.get(1).copied().unwrap_or(1);
        // (name, first row, rows) of each Hugging Face tensor this parameter holds.
        let parts: Vec<(String, usize, usize)> = match spec.arch {
            Arch::Gpt2 => vec![(gpt2_name(&p.name), 0, p.shape[0])],
            Arch::Llama => llama_parts(spec, &p.name, p.shape[0]),
        };
        for (name, first, rows) in parts {
            let rows = if ModelSpec::has_vocab_rows(&p.name) { spec.vocab } else { rows };
            let transposed =
                spec.arch == Arch::Gpt2 && p.shape.len() == 2 && !ModelSpec::has_vocab_rows(&p.name) && p.name != "wpe";
            let shape = match (transposed, p.shape.len()) {
                (true, _) => vec![row, rows],
                (false, 1) => vec![rows],
                (false, _) => vec![rows, row],
            };
            let start = p.offset + first * row;
            out.push(HfTensor { name, shape, param: index, elements: start..start + rows * row, transposed });
        }
    }
    out
}

/// GPT2LMHeadModel's name of a kiln parameter (kiln's names are GPT-2's, with the fused qkv and MLP renamed).
fn gpt2_name(name: &str) -> String {
    const RENAMED: [(&str, &str); 4] = [
        ("attn.qkv.", "attn.c_attn."),
        ("attn.proj.", "attn.c_proj."),
        ("mlp.fc.", "mlp.c_fc."),
        ("mlp.proj.", "mlp.c_proj."),
    ];
    match name {
        "lm_head" => "lm_head.weight".into(),
        "wte" | "wpe" => format!("transformer.{name}.weight"),
        _ => format!("transformer.{}", RENAMED.iter().fold(name.to_string(), |n, (kiln, hf)| n.replacen(kiln, hf, 1))),
    }
}

/// LlamaForCausalLM's tensors of a kiln parameter of `rows` rows, as (name, first row, rows).
fn llama_parts(spec: &ModelSpec, name: &str, rows: usize) -> Vec<(String, usize, usize)> {
    let whole = |hf: String| vec![(hf, 0, rows)];
    match name {
        "wte" => return whole("model.embed_tokens.weight".into()),
        "ln_f.weight" => return whole("model.norm.weight".into()),
        "lm_head" => return whole("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("h.").expect("Llama's parameters are wte, the blocks', ln_f and lm_head");
    let (layer, tail) = rest.split_once('.').expect("block parameters are h.<i>.<name>");
    let at = |module: &str, kind: &str| format!("model.layers.{layer}.{module}.{kind}");
    let (kind, stem) = if let Some(stem) = tail.strip_suffix(".weight") {
        ("weight", stem)
    } else {
        ("bias", tail.strip_suffix(".bias").expect("parameters are weights or biases"))
    };
    let (hd, f) = (spec.head_dim, spec.ffn_dim);
    let (q, kv) = (spec.n_head * hd, spec.n_kv_head * hd);
    if let Some(experts) = spec.experts {
        // Mixtral's experts are block_sparse_moe's w1 (gate), w3 (up) and w2 (down); Qwen3-MoE's the mlp's
        // gate_proj, up_proj and down_proj, as Llama's MLP. Either's router is its gate.
        let (moe, [gate, up, down]) = match spec.qk_norm {
            false => ("block_sparse_moe", ["w1", "w3", "w2"]),
            true => ("mlp", ["gate_proj", "up_proj", "down_proj"]),
        };
        let expert = |e: usize, name: &str| at(&format!("{moe}.experts.{e}.{name}"), kind);
        let c = spec.n_embd;
        match stem {
            "mlp.router" => return whole(at(&format!("{moe}.gate"), kind)),
            "mlp.fc" => {
                let halves = |e| [(expert(e, gate), 2 * e * f, f), (expert(e, up), (2 * e + 1) * f, f)];
                return (0..experts.count).flat_map(halves).collect();
            }
            "mlp.proj" => return (0..experts.count).map(|e| (expert(e, down), e * c, c)).collect(),
            _ => {}
        }
    }
    match stem {
        "ln_1" => whole(at("input_layernorm", kind)),
        "ln_2" => whole(at("post_attention_layernorm", kind)),
        "attn.qkv" => vec![
            (at("self_attn.q_proj", kind), 0, q),
            (at("self_attn.k_proj", kind), q, kv),
            (at("self_attn.v_proj", kind), q + kv, kv),
        ],
        "attn.qk_norm" => vec![(at("self_attn.q_norm", kind), 0, hd), (at("self_attn.k_norm", kind), hd, hd)],
        "attn.proj" => whole(at("self_attn.o_proj", kind)),
        "mlp.fc" => vec![(at("mlp.gate_proj", kind), 0, f), (at("mlp.up_proj", kind), f, f)],
        "mlp.proj" => whole(at("mlp.down_proj", kind)),
        other => panic!("no Llama tensor for kiln's {other}"),
    }
}

/// The token ids a `config.json` names: beginning and end of text, where the tokenizer has them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// transformers' `config.json` of a model of `spec`, complete enough that `from_pretrained` needs nothing else.
pub fn config_json(spec: &ModelSpec, tokens: SpecialTokens) -> serde_json::Value {
    let mut config = match spec.arch {
        Arch::Gpt2 => serde_json::json!({
            "model_type": "gpt2",
            "n_positions": spec.block_size,
            "n_ctx": spec.block_size,
            "n_embd": spec.n_embd,
            "n_layer": spec.n_layer,
            "n_head": spec.n_head,
            "n_inner": spec.ffn_dim,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": spec.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }),
        Arch::Llama => {
            let Positions::Rotary { theta, scaling } = spec.positions else {
                unreachable!("Llama-style models have rotary positions")
            };
            let mut rope = serde_json::json!({ "rope_type": "default", "rope_theta": theta });
            if let Some(s) = scaling {
                rope = serde_json::json!({
                    "rope_type": "llama3",
                    "rope_theta": theta,
                    "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor,
                    "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings,
                });
            }
            debug_assert!(spec.norm == NormKind::Rms && spec.mlp == Mlp::SwiGlu);
            let mut config = serde_json::json!({
                "model_type": "llama",
                "hidden_size": spec.n_embd,
                "intermediate_size": spec.ffn_dim,
                "num_hidden_layers": spec.n_layer,
                "num_attention_heads": spec.n_head,
                "num_key_value_heads": spec.n_kv_head,
                "head_dim": spec.head_dim,
                "max_position_embeddings": spec.block_size,
                "rms_norm_eps": spec.norm_eps,
                "hidden_act": "silu",
                "attention_bias": spec.biases.qkv,
                "mlp_bias": spec.biases.mlp,
                "attention_dropout": 0.0,
                // Both spellings: transformers 5 reads rope_parameters, 4.x rope_theta and rope_scaling (which holds
                // no theta).
                "rope_theta": theta,
                "rope_scaling": match scaling {
                    Some(_) => {
                        let mut v4 = rope.clone();
                        v4.as_object_mut().expect("an object").remove("rope_theta");
                        v4
                    }
                    None => serde_json::Value::Null,
                },
                "rope_parameters": rope,
            });
            // Qwen2, Qwen3 and SmolLM3 are Llama but for their biases, QK-norm or NoPE layers, which their model
            // types say, Mistral but for its sliding window (which kiln's config allows only where one of these
            // classes has it), and Mixtral and Qwen3-MoE are Mistral and Qwen3 with experts.
            let fields = config.as_object_mut().expect("an object");
            let model_type = match spec.nope_interval {
                _ if spec.experts.is_some() && spec.qk_norm => "qwen3_moe",
                _ if spec.experts.is_some() => "mixtral",
                _ if spec.qk_norm => "qwen3",
                Some(interval) => {
                    let rotates: Vec<_> = (0..spec.n_layer).map(|l| u8::from(spec.rotates(l))).collect();
                    fields.insert("no_rope_layer_interval".into(), interval.into());
                    fields.insert("no_rope_layers".into(), rotates.into());
                    "smollm3"
                }
                None if is_qwen2(spec) => "qwen2",
                None if spec.sliding_window.is_some() => "mistral",
                None => "llama",
            };
            let window = spec.sliding_window.map_or(serde_json::Value::Null, Into::into);
            if model_type != "llama" {
                fields.insert("model_type".into(), model_type.into());
                fields.insert("use_sliding_window".into(), spec.sliding_window.is_some().into());
                fields.insert("sliding_window".into(), window);
            }
            // Mistral has no biases; Qwen's have keys of their own: q, k and v's none (Qwen2), attention's
            // attention_bias (Qwen3). Qwen's window covers the layers from max_window_layers on: all or none.
            if model_type == "mistral" || model_type == "mixtral" {
                fields.remove("attention_bias");
                fields.remove("mlp_bias");
                fields.remove("use_sliding_window");
            }
            if let Some(experts) = spec.experts {
                fields.remove("mlp_bias");
                fields.insert("num_local_experts".into(), experts.count.into());
                fields.insert("num_experts_per_tok".into(), experts.per_token.into());
                // transformers adds the balancing loss only where told to return the routers' logits.
                fields.insert("output_router_logits".into(), (experts.aux_loss > 0.0).into());
                fields.insert("router_aux_loss_coef".into(), experts.aux_loss.into());
            }
            if model_type == "qwen3_moe" {
                // Qwen3-MoE's experts are moe_intermediate_size wide; intermediate_size is its plain MLPs', which
                // no block has.
                fields.insert("moe_intermediate_size".into(), spec.ffn_dim.into());
                fields.insert("num_experts".into(), spec.mlps().into());
                fields.insert("norm_topk_prob".into(), spec.experts.is_some_and(|e| e.normalize).into());
                fields.insert("decoder_sparse_step".into(), 1.into());
                fields.insert("mlp_only_layers".into(), serde_json::json!([]));
            }
            if model_type == "qwen2" || model_type == "qwen3" {
                fields.remove("mlp_bias");
                let first_sliding = if spec.sliding_window.is_some() { 0 } else { spec.n_layer };
                fields.insert("max_window_layers".into(), first_sliding.into());
            }
            if model_type == "qwen2" {
                fields.remove("attention_bias");
            }
            config
        }
    };
    let fields = config.as_object_mut().expect("an object");
    fields.insert("architectures".into(), serde_json::json!([architecture(spec)]));
    fields.insert("vocab_size".into(), spec.vocab.into());
    fields.insert("tie_word_embeddings".into(), spec.tie_embeddings.into());
    fields.insert("torch_dtype".into(), "float32".into());
    fields.insert("bos_token_id".into(), tokens.bos.into());
    fields.insert("eos_token_id".into(), tokens.eos.into());
    // No padding token: kiln packs sequences and never pads. Said outright, since some classes have a default of
    // their own (SmolLM3Config's 128004, past a small vocabulary, which transformers then refuses).
    fields.insert("pad_token_id".into(), serde_json::Value::Null);
    config
}
