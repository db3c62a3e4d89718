//! Training configuration: TOML sections `[model]`, `[data]`, `[train]`, `[optim]`, `[dist]`, overridable key by key.
//!
//! [`Config::load`] reads a config in five steps: the TOML text is parsed into a table; each
//! `--set section.key=value` override is written into that table; with `model.init = "hf:DIR"`, the `[model]` keys
//! not given are filled in from `DIR/config.json`; the table is deserialized into a [`Config`], which rejects unknown
//! keys and values of the wrong type; and the values are checked against each other (and those given against
//! `config.json`). Only `[model]` and `data.train` are
//! required: every other key has a default, and `configs/quickstart.toml` (built into the binary as [`QUICKSTART`])
//! writes every key out. Each problem is an [`Error::Config`] that names the dotted key (`train.micro_batch`) and
//! where its value came from: the file, or `--set` for a key an override set.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod hf;

/// What a config's text is: a file the user wrote, or the built-in [`QUICKSTART`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Base {
    File,
    Quickstart,
}

/// The quickstart config, used when no config file is given.
pub const QUICKSTART: &str = include_str!("../../../configs/quickstart.toml");

/// How errors in [`QUICKSTART`] name their source.
const QUICKSTART_SOURCE: &str = "configs/quickstart.toml (built in)";

/// How errors name the source of a key set by an override.
const SET_SOURCE: &str = "--set";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub dist: DistConfig,
}

/// The family of a model: which normalisation, positions and MLP its blocks use (see `kiln_model::ModelSpec`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2: layer norm, learned positions, a GELU MLP, biases, the LM head tied to the token embedding.
    #[default]
    Gpt2,
    /// Llama-style: RMS norm, rotary positions, a SwiGLU MLP, grouped-query attention, no biases unless told
    /// (Qwen2 has them on the query/key/value projection).
    Llama,
}

/// The most blocks a model may have: hundreds more than any trained so far, and few enough that a model's per-block
/// tables stay small.
const MAX_LAYERS: usize = 1 << 16;
/// The most experts a block's MLP may have: far more than any model has, and within the engines' 32-bit indices.
const MAX_EXPERTS: usize = 1 << 16;

/// The most tokens a step may take: a thousand times the largest batches trained with, and few enough that the
/// step's token ids, which the host holds, stay within its memory.
const MAX_BATCH_TOKENS: usize = 1 << 30;

/// The most updates the guard may remember.
const MAX_GUARD_WINDOW: usize = 1_000_000;

/// Qwen2's biased layers: the query, key and value projections alone, which LlamaConfig cannot say (its
/// `attention_bias` covers the output projection too), so such a model is a `Qwen2ForCausalLM` to transformers.
pub const QWEN2_BIASES: [LinearGroup; 1] = [LinearGroup::Qkv];

/// Llama's `attention_bias`: attention's four projections.
pub const ATTENTION_BIASES: [LinearGroup; 2] = [LinearGroup::Qkv, LinearGroup::Proj];

/// The sets of biased layers of transformers' Llama-style models, and whose they are.
const LLAMA_BIASES: [(&[LinearGroup], &str); 5] = [
    (&[], "Llama"),
    (&QWEN2_BIASES, "Qwen2"),
    (&ATTENTION_BIASES, "Llama with attention_bias"),
    (&[LinearGroup::Mlp], "Llama with mlp_bias"),
    (&LinearGroup::ALL, "Llama with both"),
];

/// A group of linear layers that may have biases (`model.biases`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearGroup {
    /// Attention's query, key and value projections.
    Qkv,
    /// Attention's output projection.
    Proj,
    /// Every layer of the MLP.
    Mlp,
}

impl LinearGroup {
    pub const ALL: [LinearGroup; 3] = [LinearGroup::Qkv, LinearGroup::Proj, LinearGroup::Mlp];

    /// A set as TOML writes it: `["qkv", "proj"]`.
    pub fn list(set: &[LinearGroup]) -> String {
        let names: Vec<_> = set.iter().map(|l| format!("\"{}\"", l.name())).collect();
        format!("[{}]", names.join(", "))
    }

    pub fn name(self) -> &'static str {
        match self {
            LinearGroup::Qkv => "qkv",
            LinearGroup::Proj => "proj",
            LinearGroup::Mlp => "mlp",
        }
    }
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        }
    }
}

/// A block's MLP as a mixture of experts (see [`ModelConfig::experts`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Experts {
    pub count: usize,
    /// The experts each token goes to.
    pub per_token: usize,
    /// Whether a token's weights are divided by their sum.
    pub normalize: bool,
    /// α of the load-balancing loss.
    pub aux_loss: f64,
}

/// Llama 3's rescaling of rotary frequencies for contexts longer than the model was first trained on: wavelengths
/// shorter than `original_max_position_embeddings / high_freq_factor` are kept, those longer than
/// `original_max_position_embeddings / low_freq_factor` are divided by `factor`, and those between are interpolated.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    #[serde(rename = "type")]
    pub kind: RopeScalingKind,
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingKind {
    Llama3,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub arch: Arch,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest sequence the model sees (for GPT-2, the number of learned positions).
    pub block_size: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`); [`ModelConfig::resolve`] fills in the
    /// defaults of this and the keys below it that the family has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<usize>,
    /// Channels of each attention head (Llama-style models): `n_embd / n_head` unless set. Qwen3 and Mistral NeMo
    /// set it wider, so that attention is wider than the residual stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Width of the MLP's hidden layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ffn_dim: Option<usize>,
    /// ε of every normalisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub norm_eps: Option<f64>,
    /// Whether the LM head is the token embedding (transposed) or a matrix of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
    /// Base of the rotary frequencies (rotary positions only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Whether each query and key head is RMS-normalised, with a weight of its own for queries and for keys, before
    /// the rotation (Qwen3's QK-norm; Llama-style models only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<bool>,
    /// Every this-many-th block (the 4th, 8th, … for 4) has no rotary embedding: its attention sees no positions
    /// but the causal mask's (SmolLM3's NoPE layers; Llama-style models only). Unset, every block rotates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nope_interval: Option<usize>,
    /// Each query sees only itself and the `sliding_window − 1` positions before it, in every block (the
    /// sliding-window attention of Mistral 7B v0.1 and of Qwen2 and Qwen3 with `use_sliding_window`; Llama-style
    /// models only). Unset, each sees every earlier position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Experts in each block's MLP, SwiGLU MLPs of width `ffn_dim` of which a router picks `experts_per_token` for
    /// each token (a mixture of experts: Mixtral, Qwen3-MoE; Llama-style models only). Unset, one MLP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<usize>,
    /// The experts each token goes to: 2 unless set (Mixtral's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts_per_token: Option<usize>,
    /// Whether a token's experts are weighted by their probabilities divided by their sum (Mixtral; Qwen3-MoE's
    /// `norm_topk_prob`) rather than by the probabilities themselves: true unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize_expert_weights: Option<bool>,
    /// α of the load-balancing loss that training adds to its objective (Mixtral's `router_aux_loss_coef`, which
    /// transformers adds where `output_router_logits`): 0.01 unless set, as Switch Transformer and OLMoE train.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_aux_loss: Option<f64>,
    /// The linear layers that have biases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biases: Option<Vec<LinearGroup>>,
    /// Initial weights: absent for a fresh random model, `hf:DIR` for a directory saved by transformers or kiln
    /// (whose `config.json` also gives the model's keys), `llmc:FILE` for llm.c's `gpt2_124M.bin` format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
    /// The GPU's attention kernel: `fused` (flash attention, in bf16) or `unfused` (the simple kernels, kept for
    /// comparison; fp32 runs always use them). The CPU engine has one implementation.
    #[serde(default)]
    pub attention: AttentionKernel,
}

impl ModelConfig {
    /// Key/value heads: as many as query heads unless set.
    pub fn n_kv_head(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// Channels of each attention head: `n_embd / n_head` unless set (0 for no heads, which is refused).
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd.checked_div(self.n_head).unwrap_or(0))
    }

    /// Whether query and key heads are normalised: only where set.
    pub fn qk_norm(&self) -> bool {
        self.qk_norm.unwrap_or(false)
    }

    /// The MLP's width: GPT-2's 4·n_embd; for a SwiGLU MLP (three matrices instead of two) 8/3·n_embd rounded up to
    /// a multiple of 64, about the same number of weights, as Llama sizes it.
    pub fn ffn_dim(&self) -> usize {
        // Saturating: a width past any machine's is refused as such (ModelSpec::check_size), not wrapped around.
        self.ffn_dim.unwrap_or(match self.arch {
            Arch::Gpt2 => self.n_embd.saturating_mul(4),
            Arch::Llama => self.n_embd.saturating_mul(8).div_ceil(3).saturating_add(63) / 64 * 64,
        })
    }

    pub fn norm_eps(&self) -> f64 {
        self.norm_eps.unwrap_or(1e-5)
    }

    /// GPT-2 ties its LM head to the token embedding; Llama-style models (like transformers' LlamaConfig) do not
    /// unless told.
    pub fn tie_embeddings(&self) -> bool {
        self.tie_embeddings.unwrap_or(self.arch == Arch::Gpt2)
    }

    /// The experts of each block's MLP, if it is a mixture of them.
    pub fn experts(&self) -> Option<Experts> {
        self.experts.map(|count| Experts {
            count,
            per_token: self.experts_per_token.unwrap_or(2),
            normalize: self.normalize_expert_weights.unwrap_or(true),
            aux_loss: self.router_aux_loss.unwrap_or(0.01),
        })
    }

    /// The linear layers with biases, in [`LinearGroup`]'s order: all of GPT-2's; none of Llama's unless set.
    pub fn biases(&self) -> Vec<LinearGroup> {
        let mut biases = self.biases.clone().unwrap_or(match self.arch {
            Arch::Gpt2 => LinearGroup::ALL.to_vec(),
            Arch::Llama => Vec::new(),
        });
        biases.sort();
        biases
    }

    /// The base of the rotary frequencies, for a family with rotary positions: Llama 2's 10,000 unless set.
    pub fn rope_theta(&self) -> Option<f64> {
        match self.arch {
            Arch::Gpt2 => None,
            Arch::Llama => Some(self.rope_theta.unwrap_or(10_000.0)),
        }
    }

    /// The model of a Hugging Face directory (a kiln checkpoint or export, or one written by transformers) as its
    /// `config.json` describes it, resolved, and its vocabulary size.
    pub fn from_hf_dir(dir: &Path) -> Result<(ModelConfig, usize)> {
        let path = dir.join("config.json");
        let (table, vocab) = hf::model_table(&path)?;
        Ok((ModelConfig::from_hf_table(table, &path)?, vocab))
    }

    /// The model of [`hf::model_table`]'s `table` from the `config.json` at `path`, checked and resolved.
    fn from_hf_table(table: toml::Table, path: &Path) -> Result<ModelConfig> {
        let mut model: ModelConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e| Error::data(path, format!("does not describe a model kiln can build: {e}")))?;
        if let Some((key, message)) = model.problem() {
            return Err(Error::data(path, format!("{key} (as kiln reads this file): {message}")));
        }
        model.resolve();
        Ok(model)
    }

    /// Writes every key's default into the config, so that a saved config states the whole model.
    fn resolve(&mut self) {
        self.n_kv_head = Some(self.n_kv_head());
        // GPT-2's configs have neither key: its heads always split n_embd, and it has no QK-norm (validation refused
        // any other value, so clearing an equal one or `false` changes nothing).
        (self.head_dim, self.qk_norm) = match self.arch {
            Arch::Gpt2 => (None, None),
            Arch::Llama => (Some(self.head_dim()), Some(self.qk_norm())),
        };
        self.ffn_dim = Some(self.ffn_dim());
        self.norm_eps = Some(self.norm_eps());
        self.tie_embeddings = Some(self.tie_embeddings());
        self.rope_theta = self.rope_theta();
        self.biases = Some(self.biases());
        if let Some(e) = self.experts() {
            self.experts_per_token = Some(e.per_token);
            self.normalize_expert_weights = Some(e.normalize);
            self.router_aux_loss = Some(e.aux_loss);
        }
    }

    /// Fails unless the keys set here agree with `theirs`, the model of the Hugging Face `config.json` at `path`
    /// that `model.init` reads. The keys that may differ are `block_size`, the longest sequence trained on (any with
    /// rotary positions, at most the learned positions with GPT-2's), and `router_aux_loss`, a setting of training
    /// rather than of the model.
    fn check_agrees(&self, theirs: &ModelConfig, path: &Path, source_of: &impl Fn(&str) -> String) -> Result<()> {
        let config_error = |key: String, message: String| Error::config(source_of(&key), key, message);
        if self.arch == Arch::Gpt2 && self.block_size > theirs.block_size {
            let message = format!(
                "{} is more than the {} learned positions of {}",
                self.block_size,
                theirs.block_size,
                path.display()
            );
            return Err(config_error("model.block_size".into(), message));
        }
        let (ours, theirs) = (toml::Table::try_from(self), toml::Table::try_from(theirs));
        let (ours, theirs) = (ours.expect("a ModelConfig serializes"), theirs.expect("a ModelConfig serializes"));
        for (key, value) in &theirs {
            if !["block_size", "router_aux_loss"].contains(&key.as_str()) && ours.get(key) != Some(value) {
                let mine = ours.get(key).map_or("not set".to_string(), |v| v.to_string());
                let message = format!("is {mine} but {} says {value}", path.display());
                return Err(config_error(format!("model.{key}"), message));
            }
        }
        if let Some(key) =
            ours.keys().find(|k| !theirs.contains_key(*k) && !["init", "attention"].contains(&k.as_str()))
        {
            let message = format!("is set, but {} has no such setting", path.display());
            return Err(config_error(format!("model.{key}"), message));
        }
        Ok(())
    }

    /// The first problem with the model's keys, as `(key, message)`: a value out of range, or one the family does not
    /// have or cannot take.
    fn problem(&self) -> Option<(&'static str, String)> {
        let m = self;
        // A zero divisor is reported by its own check, which comes first.
        let divides = |n: usize, d: usize| n.checked_rem(d).is_none_or(|r| r == 0);
        let checks = [
            (
                (1..=MAX_LAYERS).contains(&m.n_layer),
                "model.n_layer",
                format!("must be at least 1 and at most {MAX_LAYERS}"),
            ),
            (m.n_head >= 1, "model.n_head", "must be at least 1".to_string()),
            (m.n_embd >= 1, "model.n_embd", "must be at least 1".to_string()),
            (
                m.head_dim.is_some() || divides(m.n_embd, m.n_head),
                "model.n_embd",
                format!(
                    "must be divisible by model.n_head (= {}){}",
                    m.n_head,
                    if m.arch == Arch::Llama { " unless model.head_dim is set" } else { "" }
                ),
            ),
            (m.head_dim.is_none_or(|d| d >= 1), "model.head_dim", "must be at least 1".to_string()),
            (m.nope_interval.is_none_or(|k| k >= 1), "model.nope_interval", "must be at least 1".to_string()),
            (m.sliding_window.is_none_or(|w| w >= 1), "model.sliding_window", "must be at least 1".to_string()),
            (m.block_size >= 1, "model.block_size", "must be at least 1".to_string()),
            (
                m.experts.is_none_or(|e| (1..=MAX_EXPERTS).contains(&e)),
                "model.experts",
                format!("must be at least 1 and at most {MAX_EXPERTS}"),
            ),
            (
                m.experts_per_token != Some(0) && m.experts().is_none_or(|e| e.per_token <= e.count),
                "model.experts_per_token",
                format!("must be at least 1 and at most model.experts (= {}); 2 unless set", m.experts.unwrap_or(0)),
            ),
            (
                m.router_aux_loss.is_none_or(|a| a.is_finite() && a >= 0.0),
                "model.router_aux_loss",
                "must be a finite number, 0 or above".to_string(),
            ),
            (
                m.n_kv_head() >= 1 && divides(m.n_head, m.n_kv_head()),
                "model.n_kv_head",
                format!("must be at least 1 and divide model.n_head (= {})", m.n_head),
            ),
            (m.ffn_dim() >= 1, "model.ffn_dim", "must be at least 1".to_string()),
            (
                m.norm_eps().is_finite() && m.norm_eps() > 0.0,
                "model.norm_eps",
                "must be a finite number above 0".to_string(),
            ),
            (
                m.rope_theta.is_none_or(|t| t.is_finite() && t > 1.0),
                "model.rope_theta",
                "must be a finite number above 1".to_string(),
            ),
            (
                m.rope_scaling.is_none_or(|r| {
                    r.factor.is_finite()
                        && r.factor >= 1.0
                        && r.low_freq_factor.is_finite()
                        && r.low_freq_factor > 0.0
                        && r.high_freq_factor.is_finite()
                        && r.high_freq_factor > r.low_freq_factor
                        && r.original_max_position_embeddings >= 1
                }),
                "model.rope_scaling",
                "needs factor ≥ 1, 0 < low_freq_factor < high_freq_factor and original_max_position_embeddings ≥ 1"
                    .to_string(),
            ),
            (m.biases().windows(2).all(|w| w[0] != w[1]), "model.biases", "names a group twice".to_string()),
        ];
        checks
            .into_iter()
            .find(|(ok, _, _)| !ok)
            .map(|(_, key, message)| (key, message))
            .or_else(|| self.family_problem())
    }

    /// Keys that the family does not have, or values it cannot take, as `(key, message)`.
    fn family_problem(&self) -> Option<(&'static str, String)> {
        let learned = "GPT-2 learns its positions; rotary positions are model.arch = \"llama\"'s";
        // A setting of experts where there are none.
        let expert_setting = [
            ("model.experts_per_token", self.experts_per_token.is_some()),
            ("model.normalize_expert_weights", self.normalize_expert_weights.is_some()),
            ("model.router_aux_loss", self.router_aux_loss.is_some()),
        ]
        .into_iter()
        .find(|&(_, set)| set && self.experts.is_none())
        .map(|(key, _)| key);
        match self.arch {
            Arch::Gpt2 if self.rope_theta.is_some() => Some(("model.rope_theta", format!("does not apply: {learned}"))),
            Arch::Gpt2 if self.rope_scaling.is_some() => {
                Some(("model.rope_scaling", format!("does not apply: {learned}")))
            }
            Arch::Gpt2 if self.n_kv_head.is_some_and(|k| k != self.n_head) => Some((
                "model.n_kv_head",
                format!("must equal model.n_head (= {}): GPT-2 has no grouped-query attention", self.n_head),
            )),
            Arch::Gpt2 if self.head_dim.is_some_and(|d| d.checked_mul(self.n_head) != Some(self.n_embd)) => {
                Some(("model.head_dim", "does not apply: GPT-2's heads split model.n_embd between them".to_string()))
            }
            Arch::Gpt2 if self.qk_norm() => {
                Some(("model.qk_norm", "does not apply: GPT-2 has no QK-norm; Llama-style models may".to_string()))
            }
            Arch::Gpt2 if self.nope_interval.is_some() => {
                Some(("model.nope_interval", format!("does not apply: {learned}")))
            }
            Arch::Gpt2 if self.sliding_window.is_some() => Some((
                "model.sliding_window",
                "does not apply: GPT-2 attends to every earlier position; Llama-style models may have a window"
                    .to_string(),
            )),
            _ if expert_setting.is_some() => expert_setting
                .map(|key| (key, "needs model.experts: it is a setting of a mixture of experts".to_string())),
            Arch::Gpt2 if self.experts.is_some() => {
                Some(("model.experts", "does not apply: GPT-2 has one MLP; Llama-style models may have experts".into()))
            }
            Arch::Gpt2 if self.biases() != LinearGroup::ALL => Some((
                "model.biases",
                "must be [\"qkv\", \"proj\", \"mlp\"]: GPT-2 has biases on every linear layer".to_string(),
            )),
            // Only sets that a Hugging Face model has, so that every model can be exported.
            Arch::Llama if !LLAMA_BIASES.iter().any(|(set, _)| *set == self.biases()) => Some((
                "model.biases",
                format!(
                    "transformers has no Llama-style model with biases on {}; it has {}",
                    LinearGroup::list(&self.biases()),
                    LLAMA_BIASES
                        .iter()
                        .map(|(set, who)| format!("{} ({who})", LinearGroup::list(set)))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            // Qwen3, the transformers class with QK-norm, has Llama's attention_bias and no MLP biases.
            Arch::Llama if self.qk_norm() && ![&[][..], &ATTENTION_BIASES].contains(&&self.biases()[..]) => Some((
                "model.biases",
                format!(
                    "must be [] or {} with model.qk_norm: transformers' Qwen3 has biases on attention's four \
                     projections or nowhere",
                    LinearGroup::list(&ATTENTION_BIASES)
                ),
            )),
            // SmolLM3, the transformers class with NoPE layers, has Llama's biases and no QK-norm.
            Arch::Llama if self.nope_interval.is_some() && self.qk_norm() => Some((
                "model.nope_interval",
                "cannot go with model.qk_norm: no transformers class has both NoPE layers (SmolLM3) and QK-norm \
                 (Qwen3)"
                    .to_string(),
            )),
            Arch::Llama if self.nope_interval.is_some() && self.biases() == QWEN2_BIASES => Some((
                "model.biases",
                "cannot be [\"qkv\"] with model.nope_interval: transformers' SmolLM3 has biases on attention's four \
                 projections (attention_bias), on the MLP's (mlp_bias), on both or nowhere"
                    .to_string(),
            )),
            // The transformers classes whose every layer may have a sliding window: Mistral (no biases), Qwen2 and
            // Qwen3. SmolLM3 slides its NoPE layers only.
            Arch::Llama if self.sliding_window.is_some() && self.nope_interval.is_some() => Some((
                "model.sliding_window",
                "cannot go with model.nope_interval: transformers' SmolLM3 slides the window over its NoPE layers \
                 only, and kiln's window covers every block"
                    .to_string(),
            )),
            Arch::Llama
                if self.sliding_window.is_some()
                    && !self.qk_norm()
                    && ![&[][..], &QWEN2_BIASES].contains(&&self.biases()[..]) =>
            {
                Some((
                    "model.sliding_window",
                    format!(
                        "cannot go with model.biases = {}: transformers' models with a sliding window have no biases \
                         (Mistral), biases on q, k and v (Qwen2) or QK-norm (Qwen3)",
                        LinearGroup::list(&self.biases())
                    ),
                ))
            }
            // The transformers classes with experts: Mixtral (no biases, a sliding window or none) and Qwen3-MoE
            // (QK-norm, attention's biases or none, no window).
            Arch::Llama
                if self.experts.is_some()
                    && (self.nope_interval.is_some()
                        || (self.qk_norm() && self.sliding_window.is_some())
                        || ![&[][..], if self.qk_norm() { &ATTENTION_BIASES } else { &[] }]
                            .contains(&&self.biases()[..])) =>
            {
                Some((
                    "model.experts",
                    "transformers' models with experts are Mixtral (no biases, no QK-norm) and Qwen3-MoE (QK-norm, \
                     biases on attention's four projections or nowhere, no sliding window); neither has NoPE layers"
                        .to_string(),
                ))
            }
            Arch::Llama
                if self.experts.is_some() && !self.qk_norm() && self.normalize_expert_weights == Some(false) =>
            {
                Some((
                    "model.normalize_expert_weights",
                    "must be true without model.qk_norm: transformers' Mixtral always divides a token's weights by \
                     their sum (Qwen3-MoE, with QK-norm, may not)"
                        .to_string(),
                ))
            }
            Arch::Llama if self.head_dim() % 2 != 0 => Some((
                if self.head_dim.is_some() { "model.head_dim" } else { "model.n_embd" },
                format!(
                    "must give an even head dimension (model.head_dim, n_embd / n_head unless set, is {}): rotary \
                     positions rotate pairs of channels",
                    self.head_dim()
                ),
            )),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKernel {
    #[default]
    Fused,
    Unfused,
}

impl std::str::FromStr for AttentionKernel {
    type Err = String;

    /// The config's spelling, for command lines.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fused" => Ok(AttentionKernel::Fused),
            "unfused" => Ok(AttentionKernel::Unfused),
            _ => Err(format!("{s:?} is not an attention kernel: fused or unfused")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A text file, or `synthetic:NAME` for a built-in generated corpus.
    pub train: String,
    /// Validation text; when absent the last 10% of `train` is held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per forward/backward pass, or the largest number that fits the memory.
    pub micro_batch: MicroBatch,
    /// Tokens per optimizer step; gradient accumulation makes up the difference from one micro-batch. Absent means
    /// one micro-batch per step; [`Config::total_batch_tokens`] resolves it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_batch_tokens: Option<usize>,
    pub max_steps: u64,
    /// Evaluate every this many steps (and after the last); 0 evaluates only after the last.
    pub eval_every: u64,
    /// Micro-batches per evaluation.
    pub eval_steps: usize,
    pub log_every: u64,
    pub seed: u64,
    pub out_dir: String,
    /// Storage precision on the GPU: bf16 (fp32 master weights and accumulation) or fp32 throughout. The CPU
    /// engine always computes in f32.
    pub precision: Precision,
    /// Write a checkpoint every this many steps (and after the last); 0 writes none.
    pub checkpoint_every: u64,
    /// Checkpoints kept; older ones are deleted once a newer one is complete.
    pub keep_checkpoints: usize,
    /// Every result reproducible bit for bit, run to run (the default). `false` lets the GPU's fused attention add
    /// its query gradients with atomics, which is faster but rounds in a varying order; everything else is
    /// deterministic either way.
    pub deterministic: bool,
    /// Which activations the backward pass computes again instead of keeping them from the forward pass: less
    /// memory for more arithmetic.
    pub recompute: Recompute,
    /// Capture a micro-batch's forward and backward passes and the optimizer's update as graphs once, and replay them
    /// every step after, on engines that can (the GPU), with the collectives of ranks that can capture them (one GPU
    /// a process): a launch each instead of hundreds. Off until a GPU has measured it.
    pub graphs: bool,
    /// Take the bias gradients of the linear layers from the operations that produce the gradients they sum (the
    /// norms' backward passes, GELU's derivative in a product's epilogue, attention's backward kernels) instead of
    /// reading those gradients again. Off until a GPU has measured it.
    pub fuse_bias_gradients: bool,
    /// The check of every update before it is applied: `[train.guard]`.
    pub guard: GuardConfig,
}

/// `[train.guard]`: before the optimizer applies a step, its loss and global gradient norm are checked against a
/// robust running estimate. A step that fails is skipped (its update and its data); after `max_skips` in a row the
/// run rolls back to its last checkpoint from before them and skips the data between; after `max_rollbacks` it stops
/// with an error. Off, a non-finite loss ends the run after its update and a finite spike goes unnoticed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuardConfig {
    pub enabled: bool,
    /// The running estimate is the median and the median absolute deviation (MAD) of the loss and of the gradient
    /// norm over the last `window` applied updates; spikes are looked for once it has that many.
    pub window: usize,
    /// A loss more than this many robust standard deviations (1.4826 × MAD) above the median is a spike; 0 turns
    /// the check off. A non-finite loss or norm always fails.
    pub loss_threshold: f64,
    /// The same for the gradient norm; off by default, since a norm can surge in healthy training (when a model
    /// learns something new: the quickstart's does) and clipping bounds the update anyway.
    pub norm_threshold: f64,
    /// Skips in a row after which the run rolls back.
    pub max_skips: u32,
    /// Rollbacks after which a run that still fails stops.
    pub max_rollbacks: u32,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            enabled: true,
            window: 100,
            loss_threshold: 6.0,
            norm_threshold: 0.0,
            max_skips: 5,
            max_rollbacks: 3,
        }
    }
}

/// `train.micro_batch`: a number of sequences, or `"auto"`, the largest number that fits the memory (with a margin)
/// and divides `train.total_batch_tokens` between the ranks; the trainer resolves it before it allocates anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MicroBatch {
    Auto,
    Sequences(usize),
}

impl Serialize for MicroBatch {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            MicroBatch::Auto => serializer.serialize_str("auto"),
            MicroBatch::Sequences(n) => serializer.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MicroBatch;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number of sequences, or \"auto\"")
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> std::result::Result<MicroBatch, E> {
                usize::try_from(n)
                    .map(MicroBatch::Sequences)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> std::result::Result<MicroBatch, E> {
                usize::try_from(n)
                    .map(MicroBatch::Sequences)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(n), &self))
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<MicroBatch, E> {
                match s {
                    "auto" => Ok(MicroBatch::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(s), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Storage precision of a GPU run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Bf16,
    Fp32,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::Fp32, Precision::Bf16];

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// The config's spelling, for command lines.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("{s:?} is not a precision: bf16 or fp32"))
    }
}

/// Activation recomputation, llm.c's trade of arithmetic for memory: an activation that can be computed again from
/// ones that are kept lives in one buffer that every block shares, and the backward pass writes it again before it
/// reads it. The values recomputed are the forward pass's (bit for bit on the CPU engine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Every block keeps all its activations.
    #[default]
    None,
    /// The norms' outputs are recomputed from their inputs, and the MLP's hidden layer from its pre-activation: each
    /// from what its own backward pass keeps anyway, by one pass over the rows. With QK-norm, so are the normalised
    /// (and rotated) queries and keys, with the values beside them.
    Elementwise,
    /// Each block keeps only its input (the residual stream entering it); the backward pass of a block first runs its
    /// forward pass again from there.
    Block,
}

impl Recompute {
    /// From the least memory saved to the most.
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Elementwise, Recompute::Block];

    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Elementwise => "elementwise",
            Recompute::Block => "block",
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            micro_batch: MicroBatch::Sequences(16),
            total_batch_tokens: None,
            max_steps: 1000,
            eval_every: 100,
            eval_steps: 20,
            log_every: 10,
            seed: 1337,
            out_dir: "runs/kiln".to_string(),
            precision: Precision::Bf16,
            checkpoint_every: 0,
            keep_checkpoints: 2,
            deterministic: true,
            recompute: Recompute::None,
            graphs: false,
            fuse_bias_gradients: false,
            guard: GuardConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Cosine,
    Linear,
    Constant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f32,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            lr: 6e-4,
            min_lr: 6e-5,
            warmup_steps: 100,
            schedule: Schedule::Cosine,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
        }
    }
}

/// Data-parallel training: how gradients are combined across ranks. The number of ranks comes from the command
/// line or the launcher, not from here, so one config runs at any world size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    /// ZeRO stage: 0 keeps the whole optimizer state on every rank; 1 shards the AdamW moments (each rank updates
    /// its own piece of the weights, then the pieces are gathered).
    pub zero: u8,
    /// Gradients are reduced in buckets of about this many megabytes, each started as soon as the backward pass
    /// has finished the layers it covers.
    pub bucket_mb: f64,
    /// A rank that waits this long for the others in one collective gives up with an error.
    pub timeout_s: u64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig { zero: 0, bucket_mb: 25.0, timeout_s: 600 }
    }
}

impl Config {
    /// Reads the config file at `path` (the built-in [`QUICKSTART`] when `None`) and applies `overrides`, each
    /// `section.key=value`.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config> {
        match path {
            None => Config::parse(QUICKSTART, QUICKSTART_SOURCE, overrides, Base::Quickstart),
            Some(path) => {
                let source = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::config(&source, "", format!("cannot read the file: {e}")))?;
                Config::from_toml_str(&text, &source, overrides)
            }
        }
    }

    /// Parses `text` (errors name it `source`), applies `overrides` and checks the result. The returned config has
    /// `train.total_batch_tokens` resolved, so that [`Config::to_toml_string`] writes it.
    pub fn from_toml_str(text: &str, source: &str, overrides: &[String]) -> Result<Config> {
        Config::parse(text, source, overrides, Base::File)
    }

    /// [`Config::from_toml_str`] of a file the user wrote, or of the built-in quickstart.
    fn parse(text: &str, source: &str, overrides: &[String], base: Base) -> Result<Config> {
        let mut table: toml::Table = text.parse().map_err(|e| syntax_error(text, source, &e))?;
        let overridden = apply_overrides(&mut table, overrides)?;
        // The quickstart's model is the quickstart's own: a model from Hugging Face brings its shape, and only the
        // [model] keys the user set stay to be checked against it.
        if base == Base::Quickstart && hf_init_config(&table).is_some() {
            if let Some(model) = table.get_mut("model").and_then(|m| m.as_table_mut()) {
                model.retain(|key, _| overridden.contains(&format!("model.{key}")));
            }
        }
        // A key inside a value that --set gave (model.rope_scaling.type of --set model.rope_scaling={...}) is --set's.
        let set_here =
            |key: &str| key.match_indices('.').map(|(i, _)| &key[..i]).chain([key]).any(|k| overridden.contains(k));
        let source_of = |key: &str| if set_here(key) { SET_SOURCE } else { source }.to_string();
        // A model read from Hugging Face brings its shape: config.json fills in the [model] keys not given.
        let hf = hf_init_config(&table).map(|path| hf::model_table(&path).map(|(t, _)| (path, t))).transpose()?;
        // Its own problems first, so that they name config.json rather than the keys it fills in here.
        let their_model =
            hf.as_ref().map(|(path, theirs)| ModelConfig::from_hf_table(theirs.clone(), path)).transpose()?;
        // What the user's file and --set give, before config.json fills in the rest.
        let given = dotted_keys(&table);
        if let (Some((path, theirs)), Some(model)) = (&hf, table.get_mut("model").and_then(|m| m.as_table_mut())) {
            // The family first: every other key's meaning depends on it.
            if let Some(arch) = model.get("arch").filter(|a| Some(*a) != theirs.get("arch")) {
                let message = format!("is {arch} but {} says {}", path.display(), theirs["arch"]);
                return Err(Error::config(source_of("model.arch"), "model.arch", message));
            }
            // A rotary model's context (max_position_embeddings: 131,072 for Llama 3.2) is no length to train at.
            if theirs.get("arch").and_then(|a| a.as_str()) == Some("llama") && !model.contains_key("block_size") {
                let message = format!(
                    "missing; {} gives a context of {} tokens, which is no default for the sequences trained on: set \
                     the length to train at",
                    path.display(),
                    theirs["block_size"]
                );
                return Err(Error::config(source, "model.block_size", message));
            }
            for (key, value) in theirs {
                model.entry(key).or_insert_with(|| value.clone());
            }
        }

        let mut config: Config = serde_path_to_error::deserialize(table).map_err(|e| {
            let (key, message) = describe_serde_error(&e);
            Error::config(source_of(&key), key, message)
        })?;
        // A problem with a key the user did not give (a default, or config.json's) is blamed on --set when --set gave
        // a key its message names.
        let blame = |key: &str, message: &str| {
            let mut named = message
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .map(|word| word.trim_end_matches('.'));
            let from_set = set_here(key) || (!given.contains(key) && named.any(|word| overridden.contains(word)));
            if from_set { SET_SOURCE } else { source }.to_string()
        };
        config.validate(&blame)?;
        config.model.resolve();
        if let (Some((path, _)), Some(theirs)) = (&hf, &their_model) {
            config.model.check_agrees(theirs, path, &source_of)?;
        }
        config.train.total_batch_tokens = Some(config.total_batch_tokens());
        Ok(config)
    }

    /// A config a run saved ([`Config::to_toml_string`]), for using the model it trained: every key but `model.init`,
    /// whose weights the run's checkpoints replace (its directory need not exist any more).
    pub fn from_saved(text: &str, source: &str, overrides: &[String]) -> Result<Config> {
        let mut table: toml::Table = text.parse().map_err(|e| syntax_error(text, source, &e))?;
        if let Some(model) = table.get_mut("model").and_then(|m| m.as_table_mut()) {
            model.remove("init");
        }
        Config::from_toml_str(&table.to_string(), source, overrides)
    }

    /// Tokens per optimizer step. (A config with `train.micro_batch = "auto"` must give it: validation says so.)
    pub fn total_batch_tokens(&self) -> usize {
        self.train.total_batch_tokens.unwrap_or(match self.train.micro_batch {
            MicroBatch::Sequences(n) => n * self.model.block_size,
            MicroBatch::Auto => 0,
        })
    }

    /// Micro-batches of `micro_batch` sequences whose gradients are summed into each optimizer step, on each of
    /// `world` ranks: the step's batch is split between them.
    pub fn accumulation_steps(&self, micro_batch: usize, world: usize) -> Result<usize> {
        let per_step = micro_batch * self.model.block_size * world;
        let total = self.total_batch_tokens();
        if per_step == 0 || total % per_step != 0 {
            return Err(Error::Usage(format!(
                "train.total_batch_tokens (= {total}) must be a multiple of train.micro_batch × model.block_size × \
                 ranks (= {micro_batch} × {} × {world} = {per_step}) to split each step between {world} ranks; \
                 --set train.total_batch_tokens={per_step} gives each rank one micro-batch a step",
                self.model.block_size
            )));
        }
        Ok(total / per_step)
    }

    /// The config as TOML with every key written (`data.val` only when set, as TOML has no null), for saving next
    /// to a run; [`Config::from_toml_str`] reads it back to an equal config.
    pub fn to_toml_string(&self) -> String {
        let mut resolved = self.clone();
        resolved.train.total_batch_tokens = Some(self.total_batch_tokens());
        // Strings, numbers and enums in plain structs always serialize, so a failure here is a bug.
        toml::to_string(&resolved).expect("a Config always serializes to TOML")
    }

    /// Checks the values against their ranges and each other; the first problem becomes an error naming its key and
    /// `blame(key, message)`.
    fn validate(&self, blame: &impl Fn(&str, &str) -> String) -> Result<()> {
        if let Some((key, message)) = self.model.problem() {
            return Err(Error::config(blame(key, &message), key, message));
        }
        let (m, d, t, o) = (&self.model, &self.data, &self.train, &self.optim);
        let sequences = match t.micro_batch {
            MicroBatch::Sequences(n) => Some(n),
            MicroBatch::Auto => None,
        };
        // "auto" is resolved against the memory later; only a number can be checked here.
        let per_micro_batch = sequences.map_or(Some(1), |n| n.checked_mul(m.block_size));
        // A zero divisor (or an overflowing one, as 0) is reported by its own check, which comes first.
        let divides = |n: usize, d: usize| n.checked_rem(d).is_none_or(|r| r == 0);
        let checks = [
            (
                m.init.as_deref().is_none_or(|i| {
                    i.strip_prefix("hf:").or_else(|| i.strip_prefix("llmc:")).is_some_and(|path| !path.is_empty())
                }),
                "model.init",
                "must be hf:DIR or llmc:FILE".to_string(),
            ),
            (!d.train.is_empty(), "data.train", "must not be empty".to_string()),
            (d.val.as_ref().is_none_or(|v| !v.is_empty()), "data.val", "must not be empty when set".to_string()),
            (sequences != Some(0), "train.micro_batch", "must be at least 1".to_string()),
            (
                sequences.is_some() || t.total_batch_tokens.is_some(),
                "train.micro_batch",
                "= \"auto\" needs train.total_batch_tokens: the batch of each step, which the micro-batches chosen \
                 make up"
                    .to_string(),
            ),
            (
                per_micro_batch.is_some(),
                "train.micro_batch",
                "is too large: train.micro_batch * model.block_size overflows".to_string(),
            ),
            (
                t.total_batch_tokens
                    .or(sequences.and(per_micro_batch))
                    .is_none_or(|n| (1..=MAX_BATCH_TOKENS).contains(&n)),
                "train.total_batch_tokens",
                format!(
                    "must be at least 1 and at most {MAX_BATCH_TOKENS} (2^30); unset, it is train.micro_batch × \
                     model.block_size"
                ),
            ),
            (
                sequences.is_none() || t.total_batch_tokens.is_none_or(|n| divides(n, per_micro_batch.unwrap_or(0))),
                "train.total_batch_tokens",
                format!(
                    "must be a multiple of train.micro_batch * model.block_size (= {})",
                    per_micro_batch.unwrap_or(0)
                ),
            ),
            (t.max_steps >= 1, "train.max_steps", "must be at least 1".to_string()),
            (t.eval_steps >= 1, "train.eval_steps", "must be at least 1".to_string()),
            (t.log_every >= 1, "train.log_every", "must be at least 1".to_string()),
            (t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1".to_string()),
            (!t.out_dir.is_empty(), "train.out_dir", "must not be empty".to_string()),
            (o.lr.is_finite() && o.lr > 0.0, "optim.lr", "must be a finite number above 0".to_string()),
            (
                o.min_lr.is_finite() && o.min_lr >= 0.0 && o.min_lr <= o.lr,
                "optim.min_lr",
                format!("must be finite and between 0 and optim.lr (= {})", o.lr),
            ),
            (
                o.weight_decay.is_finite() && o.weight_decay >= 0.0,
                "optim.weight_decay",
                "must be a finite number, 0 or above".to_string(),
            ),
            ((0.0..1.0).contains(&o.beta1), "optim.beta1", "must be at least 0 and below 1".to_string()),
            ((0.0..1.0).contains(&o.beta2), "optim.beta2", "must be at least 0 and below 1".to_string()),
            (o.eps.is_finite() && o.eps > 0.0, "optim.eps", "must be a finite number above 0".to_string()),
            (
                o.grad_clip.is_finite() && o.grad_clip >= 0.0,
                "optim.grad_clip",
                "must be a finite number, 0 or above (0 disables clipping)".to_string(),
            ),
            (self.dist.zero <= 3, "dist.zero", "must be 0, 1, 2 or 3 (ZeRO stage)".to_string()),
            (
                self.dist.bucket_mb.is_finite() && self.dist.bucket_mb > 0.0,
                "dist.bucket_mb",
                "must be a finite number above 0".to_string(),
            ),
            (self.dist.timeout_s >= 1, "dist.timeout_s", "must be at least 1".to_string()),
            (
                (1..=MAX_GUARD_WINDOW).contains(&t.guard.window),
                "train.guard.window",
                format!("must be at least 1 and at most {MAX_GUARD_WINDOW}"),
            ),
            (
                t.guard.loss_threshold.is_finite() && t.guard.loss_threshold >= 0.0,
                "train.guard.loss_threshold",
                "must be a finite number, 0 or above (0 turns the check off)".to_string(),
            ),
            (
                t.guard.norm_threshold.is_finite() && t.guard.norm_threshold >= 0.0,
                "train.guard.norm_threshold",
                "must be a finite number, 0 or above (0 turns the check off)".to_string(),
            ),
            (t.guard.max_skips >= 1, "train.guard.max_skips", "must be at least 1".to_string()),
        ];
        match checks.into_iter().find(|(ok, _, _)| !ok) {
            Some((_, key, message)) => Err(Error::config(blame(key, &message), key, message)),
            None => Ok(()),
        }
    }
}

/// `DIR/config.json` of a `model.init = "hf:DIR"`, if the table has one.
fn hf_init_config(table: &toml::Table) -> Option<std::path::PathBuf> {
    let init = table.get("model")?.get("init")?.as_str()?;
    // An empty directory is model.init's problem, which validation reports.
    Some(Path::new(init.strip_prefix("hf:").filter(|dir| !dir.is_empty())?).join("config.json"))
}

/// Turns a TOML syntax error into a one-line message with the line and column, rather than toml's multi-line
/// rendering with a source excerpt.
fn syntax_error(text: &str, source: &str, error: &toml::de::Error) -> Error {
    let position = error.span().and_then(|span| text.get(..span.start)).map(|before| {
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!(" at line {line}, column {column}")
    });
    Error::config(source, "", format!("invalid TOML{}: {}", position.unwrap_or_default(), error.message()))
}

/// Every `section.key` and `section.table.key` that `table` gives.
fn dotted_keys(table: &toml::Table) -> HashSet<String> {
    let mut keys = HashSet::new();
    for (section, value) in table {
        for (key, value) in value.as_table().into_iter().flatten() {
            keys.insert(format!("{section}.{key}"));
            keys.extend(value.as_table().into_iter().flatten().map(|(inner, _)| format!("{section}.{key}.{inner}")));
        }
    }
    keys
}

/// Writes each `section.key=value` override (`section.table.key=value` for a key of a table in a section, as
/// `train.guard.enabled`) into `table`. Returns the dotted keys the overrides set, and the sections and tables they
/// created, so that errors about them can name `--set` as their source.
fn apply_overrides(table: &mut toml::Table, overrides: &[String]) -> Result<HashSet<String>> {
    let mut overridden = HashSet::new();
    for raw in overrides {
        let (path, value) = parse_override(raw)?;
        let (key, tables) = path.split_last().expect("a section and a key");
        let mut into = &mut *table;
        for (depth, name) in tables.iter().enumerate() {
            let dotted = tables[..=depth].join(".");
            if !into.contains_key(*name) {
                overridden.insert(dotted.clone());
            }
            let value = into.entry(*name).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            into = value.as_table_mut().ok_or_else(|| {
                let what = if depth == 0 { "section" } else { "table" };
                Error::config(SET_SOURCE, path.join("."), format!("cannot set a key in {dotted}: it is not a {what}"))
            })?;
        }
        into.insert(key.to_string(), value);
        overridden.insert(path.join("."));
    }
    Ok(overridden)
}

/// Splits `section.key=value` (or `section.table.key=value`) into the dotted path's names and the value. The value
/// is read as a TOML value (`3`, `1e-3`, `true`, `"text"`); anything that is not one is taken as a bare string, so
/// that `data.train=input.txt` needs no quotes.
fn parse_override(raw: &str) -> Result<(Vec<&str>, toml::Value)> {
    let malformed = || Error::config(SET_SOURCE, raw, "expected section.key=value, like train.max_steps=200");
    let (path, value) = raw.split_once('=').ok_or_else(malformed)?;
    let path: Vec<&str> = path.split('.').map(str::trim).collect();
    if path.len() < 2 || path.iter().any(|name| name.is_empty()) {
        return Err(malformed());
    }
    let value = value.trim();
    let value = value.parse::<toml::Value>().unwrap_or_else(|_| toml::Value::String(value.to_string()));
    Ok((path, value))
}

/// The dotted key and a message for a deserialization error. For an unknown key the path already ends at the key,
/// but for a missing one it stops at the parent, with the key's name only in serde's message.
fn describe_serde_error(error: &serde_path_to_error::Error<toml::de::Error>) -> (String, String) {
    let depth = error.path().iter().count();
    // The empty path displays as ".".
    let path = if depth == 0 { String::new() } else { error.path().to_string() };
    let message = error.inner().message();

    if let Some((_, expected)) = message.strip_prefix("unknown field `").and_then(|rest| rest.split_once('`')) {
        let what = if depth == 1 { "section" } else { "key" };
        // serde lists the known names as "expected one of `a`, `b`"; drop its backticks.
        let expected = expected.trim_start_matches(", ").replace('`', "");
        return (path, format!("unknown {what}; {expected}"));
    }
    if let Some((name, _)) = message.strip_prefix("missing field `").and_then(|rest| rest.split_once('`')) {
        return match depth {
            0 => (name.to_string(), "missing; this section is required".to_string()),
            _ => (format!("{path}.{name}"), "missing; this key is required".to_string()),
        };
    }
    // serde names the Rust types; say what they are in TOML.
    let mut message = [
        ("expected usize", "expected an integer, 0 or above"),
        ("expected u64", "expected an integer, 0 or above"),
        ("expected u32", "expected an integer from 0 to 4294967295"),
        ("expected u8", "expected an integer from 0 to 255"),
        ("expected f32", "expected a number"),
        ("expected f64", "expected a number"),
    ]
    .iter()
    .fold(message.to_string(), |m, (rust, toml)| m.replace(rust, toml));
    if let Some(at) = message.find("expected struct ") {
        message.replace_range(at.., "expected a table");
    }
    (path, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str =
        "[model]\nn_layer = 2\nn_head = 4\nn_embd = 128\nblock_size = 64\n\n[data]\ntrain = \"t.txt\"\n";

    fn set(overrides: &[&str]) -> Vec<String> {
        overrides.iter().map(|s| s.to_string()).collect()
    }

    /// The error's source, key and message; panics if it is not a config error.
    fn config_error(result: Result<Config>) -> (String, String, String) {
        match result {
            Err(Error::Config { source, key, message }) => (source, key, message),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn quickstart_loads() {
        let config = Config::load(None, &[]).unwrap();
        assert_eq!(config.model.n_layer, 2);
        assert_eq!(config.data.train, "synthetic:addition");
        assert_eq!(config.accumulation_steps(128, 1).unwrap(), 1);
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let config = Config::from_toml_str(MINIMAL, "minimal.toml", &[]).unwrap();
        assert_eq!(config.model.arch, Arch::Gpt2);
        assert_eq!(config.data.val, None);
        assert_eq!(config.train.micro_batch, MicroBatch::Sequences(16));
        assert_eq!(config.total_batch_tokens(), 16 * 64);
        assert_eq!(config.train.max_steps, 1000);
        assert_eq!(config.train.out_dir, "runs/kiln");
        assert_eq!(config.optim.lr, 6e-4);
        assert_eq!(config.optim.schedule, Schedule::Cosine);
        assert_eq!(config.optim.eps, 1e-8);
    }

    #[test]
    fn accumulation_steps_divide_the_total_batch() {
        let config = Config::from_toml_str(
            MINIMAL,
            "minimal.toml",
            &set(&["train.total_batch_tokens=4096", "train.micro_batch=8"]),
        )
        .unwrap();
        assert_eq!(config.total_batch_tokens(), 4096);
        assert_eq!(config.accumulation_steps(8, 1).unwrap(), 8);
        assert_eq!(config.accumulation_steps(8, 4).unwrap(), 2);
        assert!(matches!(config.accumulation_steps(8, 3), Err(Error::Usage(m)) if m.contains("ranks")));
    }

    #[test]
    fn round_trips_through_toml() {
        let overrides = set(&["data.val=v.txt", "optim.schedule=\"linear\"", "optim.lr=3e-4", "train.seed=7"]);
        for config in
            [Config::load(None, &[]).unwrap(), Config::from_toml_str(MINIMAL, "minimal.toml", &overrides).unwrap()]
        {
            let text = config.to_toml_string();
            assert_eq!(Config::from_toml_str(&text, "saved.toml", &[]).unwrap(), config, "{text}");
        }
    }

    #[test]
    fn to_toml_string_resolves_total_batch_tokens() {
        let mut config = Config::from_toml_str(MINIMAL, "minimal.toml", &[]).unwrap();
        config.train.total_batch_tokens = None;
        assert!(config.to_toml_string().contains("total_batch_tokens = 1024"));
    }

    #[test]
    fn unknown_key_in_file() {
        let text = format!("{MINIMAL}\n[train]\nmicro_bach = 8\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!(source, "my.toml");
        assert_eq!(key, "train.micro_bach");
        assert!(message.starts_with("unknown key; expected one of micro_batch, total_batch_tokens"), "{message}");
        let display = Error::config(source, key, message).to_string();
        assert!(display.starts_with("my.toml: train.micro_bach: unknown key"), "{display}");
    }

    #[test]
    fn unknown_section_in_file() {
        let text = format!("{MINIMAL}\n[optimizer]\nlr = 1e-3\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "optimizer"));
        assert!(message.contains("unknown section; expected one of model, data, train, optim"), "{message}");
    }

    #[test]
    fn missing_required_key() {
        let text = MINIMAL.replace("n_embd = 128\n", "");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "model.n_embd"));
        assert!(message.contains("required"), "{message}");
    }

    #[test]
    fn missing_section() {
        let (source, key, message) = config_error(Config::from_toml_str("[data]\ntrain = \"t.txt\"\n", "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "model"));
        assert!(message.contains("section is required"), "{message}");
    }

    #[test]
    fn wrong_type() {
        let text = format!("{MINIMAL}\n[train]\nmicro_batch = \"x\"\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "train.micro_batch"));
        assert_eq!(message, "invalid value: string \"x\", expected a whole number of sequences, or \"auto\"");
    }

    #[test]
    fn unknown_enum_value() {
        let (_, key, message) =
            config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&["optim.schedule=cosin"])));
        assert_eq!(key, "optim.schedule");
        assert!(message.contains("cosine"), "{message}");
    }

    #[test]
    fn n_embd_not_divisible_by_n_head() {
        let text = MINIMAL.replace("n_embd = 128", "n_embd = 130");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "model.n_embd"));
        assert!(message.contains("must be divisible by model.n_head (= 4)"), "{message}");
    }

    #[test]
    fn zero_micro_batch() {
        let text = format!("{MINIMAL}\n[train]\nmicro_batch = 0\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "train.micro_batch"));
        assert!(message.contains("at least 1"), "{message}");
    }

    #[test]
    fn micro_batch_auto_reads_and_writes_back_and_needs_the_step_batch() {
        let text = format!("{MINIMAL}\n[train]\nmicro_batch = \"auto\"\ntotal_batch_tokens = 1000\n");
        let config = Config::from_toml_str(&text, "my.toml", &[]).unwrap();
        assert_eq!(config.train.micro_batch, MicroBatch::Auto);
        let again = Config::from_toml_str(&config.to_toml_string(), "saved.toml", &[]).unwrap();
        assert_eq!(again, config);
        let set_auto = set(&["train.micro_batch=auto", "train.total_batch_tokens=4096"]);
        assert_eq!(Config::load(None, &set_auto).unwrap().train.micro_batch, MicroBatch::Auto);
        let text = format!("{MINIMAL}\n[train]\nmicro_batch = \"auto\"\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "train.micro_batch"));
        assert!(message.contains("needs train.total_batch_tokens"), "{message}");
    }

    #[test]
    fn total_batch_tokens_not_a_multiple() {
        let text = format!("{MINIMAL}\n[train]\nmicro_batch = 4\ntotal_batch_tokens = 1000\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "train.total_batch_tokens"));
        assert!(message.contains("(= 256)"), "{message}");
    }

    #[test]
    fn recompute_levels() {
        assert_eq!(Config::from_toml_str(MINIMAL, "my.toml", &[]).unwrap().train.recompute, Recompute::None);
        for (value, level) in [("elementwise", Recompute::Elementwise), ("block", Recompute::Block)] {
            let config = Config::from_toml_str(MINIMAL, "my.toml", &set(&[&format!("train.recompute={value}")]));
            let config = config.unwrap();
            assert_eq!(config.train.recompute, level);
            assert!(config.to_toml_string().contains(&format!("recompute = \"{value}\"")));
        }
        let text = format!("{MINIMAL}\n[train]\nrecompute = \"all\"\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "train.recompute"));
        assert!(message.contains("none") && message.contains("elementwise") && message.contains("block"), "{message}");
    }

    #[test]
    fn non_finite_float() {
        let (_, key, _) = config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&["optim.lr=inf"])));
        assert_eq!(key, "optim.lr");
        let (_, key, _) = config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&["optim.beta2=nan"])));
        assert_eq!(key, "optim.beta2");
    }

    #[test]
    fn missing_file() {
        let path = Path::new("/nonexistent/kiln.toml");
        let (source, key, message) = config_error(Config::load(Some(path), &[]));
        assert_eq!((source.as_str(), key.as_str()), ("/nonexistent/kiln.toml", ""));
        assert!(message.starts_with("cannot read the file: "), "{message}");
        let display = Error::config(source, key, message).to_string();
        assert!(display.starts_with("/nonexistent/kiln.toml: cannot read the file: "), "{display}");
    }

    #[test]
    fn toml_syntax_error() {
        let text = "[model]\nn_layer = = 2\n";
        let (source, key, message) = config_error(Config::from_toml_str(text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", ""));
        assert!(message.starts_with("invalid TOML at line 2, column "), "{message}");
    }

    #[test]
    fn override_changes_a_value() {
        let config =
            Config::load(None, &set(&["train.max_steps=200", "optim.lr=1e-3", "model . n_layer = 3"])).unwrap();
        assert_eq!(config.train.max_steps, 200);
        assert_eq!(config.optim.lr, 1e-3);
        assert_eq!(config.model.n_layer, 3);
    }

    #[test]
    fn override_with_a_bare_string() {
        let config = Config::load(None, &set(&["data.train=input.txt", "data.val=\"v.txt\""])).unwrap();
        assert_eq!(config.data.train, "input.txt");
        assert_eq!(config.data.val.as_deref(), Some("v.txt"));
    }

    #[test]
    fn override_of_an_unknown_key() {
        let (source, key, message) = config_error(Config::load(None, &set(&["train.max_step=5"])));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "train.max_step"));
        assert!(message.contains("unknown key"), "{message}");
    }

    #[test]
    fn override_of_a_key_in_a_table_of_a_section() {
        let config = Config::load(None, &set(&["train.guard.enabled=false", "train.guard.window=7"])).unwrap();
        assert_eq!((config.train.guard.enabled, config.train.guard.window), (false, 7));
        assert_eq!(config.train.guard.max_skips, GuardConfig::default().max_skips);
        let (source, key, message) = config_error(Config::load(None, &set(&["train.guard.windw=7"])));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "train.guard.windw"));
        assert!(message.contains("unknown key; expected one of enabled, window"), "{message}");
        let (source, key, message) = config_error(Config::load(None, &set(&["train.max_steps.x=1"])));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "train.max_steps.x"));
        assert!(message.contains("train.max_steps: it is not a table"), "{message}");
    }

    #[test]
    fn a_problem_with_a_default_names_the_command_line_where_it_gave_the_other_key() {
        // --set gives a number of experts that the default experts a token (2) exceeds; the file, or --set, giving
        // the experts a token makes the problem theirs.
        let llama = MINIMAL.replacen("[model]\n", "[model]\narch = \"llama\"\n", 1);
        let per_token_in_file = llama.replacen("[data]", "experts_per_token = 2\n\n[data]", 1);
        let experts_in_file = llama.replacen("[data]", "experts = 1\n\n[data]", 1);
        for (text, overrides, source) in [
            (&llama, &["model.experts=1"][..], "--set"),
            (&per_token_in_file, &["model.experts=1"], "my.toml"),
            (&llama, &["model.experts=1", "model.experts_per_token=2"], "--set"),
            (&experts_in_file, &[], "my.toml"),
        ] {
            let (got_source, key, message) = config_error(Config::from_toml_str(text, "my.toml", &set(overrides)));
            assert_eq!((got_source.as_str(), key.as_str()), (source, "model.experts_per_token"), "{message}");
        }
    }

    #[test]
    fn a_typo_in_a_table_of_a_section_names_the_key_and_the_file() {
        let text = format!("{MINIMAL}\n[train.guard]\nmax_skip = 2\n");
        let (source, key, message) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "train.guard.max_skip"));
        assert!(message.contains("max_skips"), "{message}");
        let text = format!("{MINIMAL}\n[train.guard]\nwindow = 0\n");
        let (source, key, _) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "train.guard.window"));
    }

    #[test]
    fn override_of_an_unknown_section() {
        let (source, key, message) = config_error(Config::load(None, &set(&["optimizer.lr=1"])));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "optimizer"));
        assert!(message.contains("unknown section"), "{message}");
    }

    #[test]
    fn override_producing_an_invalid_value() {
        let (source, key, _) = config_error(Config::load(None, &set(&["model.n_head=3"])));
        // The bad key is model.n_embd, which the file set; the override only made it indivisible.
        assert_eq!((source.as_str(), key.as_str()), (QUICKSTART_SOURCE, "model.n_embd"));
        let (source, key, _) = config_error(Config::load(None, &set(&["train.micro_batch=0"])));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "train.micro_batch"));
        let (source, key, message) = config_error(Config::load(None, &set(&["train.micro_batch=x"])));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "train.micro_batch"));
        assert!(message.contains("string"), "{message}");
    }

    /// The README's tables of config keys (rows starting `` | `section.key` ``, later keys of a row sharing the
    /// first one's section) name exactly the keys a config has: a new key must be documented, and a documented one
    /// must exist.
    #[test]
    fn the_readme_documents_every_config_key() {
        let readme = include_str!("../../../README.md");
        use std::collections::BTreeSet;
        let mut documented = BTreeSet::new();
        for row in readme.lines().filter(|l| l.starts_with("| `")) {
            let keys = row.split('|').nth(1).expect("a first cell");
            let mut section = "";
            for key in keys.split(',').map(|k| k.trim().trim_matches('`')) {
                let name = match key.rsplit_once('.') {
                    Some((s, name)) => {
                        section = s;
                        name
                    }
                    None => key,
                };
                documented.insert(format!("{section}.{name}"));
            }
        }
        // Every optional key set, so that each one is serialized.
        let all = set(&[
            "model.arch=llama",
            "model.rope_scaling={ type = \"llama3\", factor = 8.0, low_freq_factor = 1.0, high_freq_factor = 4.0, \
             original_max_position_embeddings = 64 }",
            "model.init=\"llmc:x\"",
            "model.nope_interval=4",
            "data.val=\"v.txt\"",
            "train.total_batch_tokens=3328",
        ]);
        let config = Config::load(None, &all).unwrap();
        let table = toml::Table::try_from(&config).unwrap();
        // A table inside a section (`train.guard`) is documented key by key, unless it is one key's value
        // (`model.rope_scaling`), documented whole.
        fn keys_of(prefix: &str, table: &toml::Table, documented: &BTreeSet<String>, keys: &mut BTreeSet<String>) {
            for (name, value) in table {
                let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                match value.as_table() {
                    Some(inner) if prefix.is_empty() || !documented.contains(&key) => {
                        keys_of(&key, inner, documented, keys)
                    }
                    _ => {
                        keys.insert(key);
                    }
                }
            }
        }
        let mut keys = BTreeSet::new();
        keys_of("", &table, &documented, &mut keys);
        // model.sliding_window cannot go with model.nope_interval, nor model.experts (whose settings the config
        // states once it is set): more configs set them.
        for more in ["model.sliding_window=16", "model.experts=4"] {
            let config = Config::load(None, &set(&["model.arch=llama", more])).unwrap();
            keys_of("", &toml::Table::try_from(&config).unwrap(), &documented, &mut keys);
        }
        assert_eq!(documented, keys);
    }

    #[test]
    fn each_family_fills_in_its_own_defaults() {
        let gpt2 = Config::from_toml_str(MINIMAL, "my.toml", &[]).unwrap().model;
        assert_eq!(
            (gpt2.n_kv_head, gpt2.ffn_dim, gpt2.norm_eps, gpt2.tie_embeddings, gpt2.rope_theta),
            (Some(4), Some(512), Some(1e-5), Some(true), None)
        );
        let llama = Config::from_toml_str(MINIMAL, "my.toml", &set(&["model.arch=llama"])).unwrap().model;
        // 8/3 · 128 = 341.3, up to a multiple of 64.
        assert_eq!(
            (llama.n_kv_head, llama.ffn_dim, llama.tie_embeddings, llama.rope_theta),
            (Some(4), Some(384), Some(false), Some(10_000.0))
        );
        assert_eq!((gpt2.biases(), llama.biases()), (LinearGroup::ALL.to_vec(), vec![]));
        // GPT-2's saved configs keep neither key; a Llama's state both.
        assert_eq!((gpt2.head_dim, gpt2.qk_norm, llama.head_dim, llama.qk_norm), (None, None, Some(32), Some(false)));
        let stated = set(&["model.head_dim=32", "model.qk_norm=false"]);
        let stated = Config::from_toml_str(MINIMAL, "my.toml", &stated).unwrap().model;
        assert_eq!((stated.head_dim, stated.qk_norm), (None, None), "GPT-2's own values, said, are not kept");
        // Written out in one order, whatever order they were given in.
        let qwen = set(&["model.arch=llama", "model.biases=[\"proj\", \"qkv\"]"]);
        let biases = Config::from_toml_str(MINIMAL, "my.toml", &qwen).unwrap().model.biases;
        assert_eq!(biases, Some(vec![LinearGroup::Qkv, LinearGroup::Proj]));
        let text = Config::from_toml_str(MINIMAL, "my.toml", &set(&["model.arch=llama", "model.n_kv_head=2"]))
            .unwrap()
            .to_toml_string();
        assert!(text.contains("n_kv_head = 2") && text.contains("rope_theta = 10000.0"), "{text}");
    }

    #[test]
    fn keys_a_family_does_not_have_are_errors() {
        let (source, key, message) =
            config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&["model.rope_theta=500000"])));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "model.rope_theta"));
        assert!(message.contains("GPT-2 learns its positions"), "{message}");
        let text = MINIMAL.replace("[model]\n", "[model]\nn_kv_head = 2\n");
        let (source, key, _) = config_error(Config::from_toml_str(&text, "my.toml", &[]));
        assert_eq!((source.as_str(), key.as_str()), ("my.toml", "model.n_kv_head"));
        let llama = |more: &[&str]| {
            let mut all = vec!["model.arch=llama"];
            all.extend(more);
            config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&all))).1
        };
        assert_eq!(llama(&["model.n_kv_head=3"]), "model.n_kv_head");
        // Sizes past any real run's, which would overflow or exhaust the host before a plan could say so.
        for (huge, key) in [
            ("model.n_layer=100000000000", "model.n_layer"),
            ("train.total_batch_tokens=13000000000000", "train.total_batch_tokens"),
            ("train.guard.window=9223372036854775807", "train.guard.window"),
            ("model.init=hf:", "model.init"),
            ("model.init=llmc:", "model.init"),
        ] {
            assert_eq!(config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&[huge]))).1, key);
        }
        // The cap holds for the step a micro-batch makes when total_batch_tokens is unset, so that the saved config,
        // which states it, reads back.
        let big_steps = set(&["model.block_size=1048576", "train.micro_batch=2048"]);
        assert_eq!(config_error(Config::from_toml_str(MINIMAL, "my.toml", &big_steps)).1, "train.total_batch_tokens");
        // Types said as TOML has them, not as Rust does; a key inside a table that --set gave is --set's.
        for (wrong, said) in [("dist.zero=256", "an integer from 0 to 255"), ("train.guard=1", "expected a table")] {
            let message = config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&[wrong]))).2;
            assert!(message.contains(said), "{wrong}: {message}");
        }
        let (source, key, _) = config_error(Config::from_toml_str(
            MINIMAL,
            "my.toml",
            &set(&["model.arch=llama", "model.rope_scaling={ factor = 8.0 }"]),
        ));
        assert_eq!((source.as_str(), key.as_str()), ("--set", "model.rope_scaling.type"));
        // Biases: GPT-2 has them everywhere; Llama-style models only where a Hugging Face class has them.
        let (_, key, message) = config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&["model.biases=[]"])));
        assert_eq!(key, "model.biases");
        assert!(message.contains("GPT-2 has biases on every linear layer"), "{message}");
        for odd in ["[\"proj\"]", "[\"qkv\", \"mlp\"]", "[\"qkv\", \"qkv\"]", "[\"attn\"]"] {
            let key = llama(&[&format!("model.biases={odd}")]);
            assert!(key.starts_with("model.biases"), "{odd}: {key}");
        }
        let (_, _, message) = config_error(Config::from_toml_str(
            MINIMAL,
            "my.toml",
            &set(&["model.arch=llama", "model.biases=[\"mlp\", \"proj\"]"]),
        ));
        assert!(message.contains("[\"proj\", \"mlp\"]") && message.contains("[\"qkv\"] (Qwen2)"), "{message}");
        assert_eq!(llama(&["model.n_head=8", "model.n_embd=40"]), "model.n_embd");
        // Heads of their own width (Qwen3's), even for the rotation; QK-norm with the biases Qwen3 can have.
        assert_eq!(llama(&["model.head_dim=3"]), "model.head_dim");
        assert_eq!(llama(&["model.head_dim=0"]), "model.head_dim");
        assert_eq!(llama(&["model.qk_norm=true", "model.biases=[\"qkv\"]"]), "model.biases");
        let gpt2 = |more: &str| config_error(Config::from_toml_str(MINIMAL, "my.toml", &set(&[more]))).1;
        assert_eq!(gpt2("model.head_dim=64"), "model.head_dim");
        assert_eq!(gpt2("model.qk_norm=true"), "model.qk_norm");
        assert_eq!(gpt2("model.nope_interval=4"), "model.nope_interval");
        // NoPE layers (SmolLM3's): with the biases and norms that class has.
        assert_eq!(llama(&["model.nope_interval=0"]), "model.nope_interval");
        assert_eq!(llama(&["model.nope_interval=4", "model.qk_norm=true"]), "model.nope_interval");
        assert_eq!(llama(&["model.nope_interval=4", "model.biases=[\"qkv\"]"]), "model.biases");
        // Sliding windows: over every block, for the classes that have one there.
        assert_eq!(gpt2("model.sliding_window=16"), "model.sliding_window");
        assert_eq!(llama(&["model.sliding_window=0"]), "model.sliding_window");
        assert_eq!(llama(&["model.sliding_window=16", "model.nope_interval=4"]), "model.sliding_window");
        assert_eq!(llama(&["model.sliding_window=16", "model.biases=[\"mlp\"]"]), "model.sliding_window");
        for fine in [&["model.biases=[\"qkv\"]"][..], &["model.qk_norm=true", "model.biases=[\"qkv\", \"proj\"]"], &[]]
        {
            let config = [&["model.arch=llama", "model.sliding_window=16"][..], fine].concat();
            let model = Config::from_toml_str(MINIMAL, "my.toml", &set(&config)).unwrap().model;
            assert_eq!(model.sliding_window, Some(16), "{fine:?}");
        }
        // Experts: Mixtral's (no biases, weights normalised, a window or none) and Qwen3-MoE's (QK-norm, no window).
        assert_eq!(gpt2("model.experts=8"), "model.experts");
        assert_eq!(gpt2("model.router_aux_loss=0.01"), "model.router_aux_loss");
        for (wrong, key) in [
            (&["model.experts=0"][..], "model.experts"),
            (&["model.experts=8", "model.experts_per_token=9"], "model.experts_per_token"),
            (&["model.experts=8", "model.experts_per_token=0"], "model.experts_per_token"),
            // The default of 2 experts a token, with fewer experts.
            (&["model.experts=1"], "model.experts_per_token"),
            (&["model.experts=8", "model.router_aux_loss=-1"], "model.router_aux_loss"),
            (&["model.experts_per_token=2"], "model.experts_per_token"),
            (&["model.router_aux_loss=0.01"], "model.router_aux_loss"),
            (&["model.normalize_expert_weights=true"], "model.normalize_expert_weights"),
            (&["model.experts=8", "model.normalize_expert_weights=false"], "model.normalize_expert_weights"),
            (&["model.experts=8", "model.biases=[\"mlp\"]"], "model.experts"),
            (&["model.experts=8", "model.biases=[\"qkv\"]"], "model.experts"),
            (&["model.experts=8", "model.nope_interval=4"], "model.experts"),
            (&["model.experts=8", "model.qk_norm=true", "model.sliding_window=16"], "model.experts"),
        ] {
            assert_eq!(llama(wrong), key, "{wrong:?}");
        }
        for fine in [
            &["model.sliding_window=16"][..],
            &["model.qk_norm=true", "model.biases=[\"qkv\", \"proj\"]", "model.normalize_expert_weights=false"],
        ] {
            let config = [&["model.arch=llama", "model.experts=8"][..], fine].concat();
            let experts = Config::from_toml_str(MINIMAL, "my.toml", &set(&config)).unwrap().model.experts();
            let normalize = !fine.contains(&"model.normalize_expert_weights=false");
            assert_eq!(experts, Some(Experts { count: 8, per_token: 2, normalize, aux_loss: 0.01 }), "{fine:?}");
        }
        let qwen3 = ["model.arch=llama", "model.n_embd=30", "model.head_dim=16", "model.qk_norm=true"];
        let qwen3 = Config::from_toml_str(MINIMAL, "my.toml", &set(&qwen3)).unwrap().model;
        assert_eq!((qwen3.head_dim(), qwen3.qk_norm()), (16, true));
        assert_eq!(llama(&["model.rope_theta=0.5"]), "model.rope_theta");
        assert_eq!(llama(&["model.norm_eps=0"]), "model.norm_eps");
        assert_eq!(
            llama(&[
                "model.rope_scaling={ type = \"llama3\", factor = 0.5, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_position_embeddings = 64 }"
            ]),
            "model.rope_scaling"
        );
        assert_eq!(
            llama(&[
                "model.rope_scaling={ type = \"yarn\", factor = 2.0, low_freq_factor = 1.0, high_freq_factor = 4.0, original_max_position_embeddings = 64 }"
            ]),
            "model.rope_scaling.type"
        );
    }

    #[test]
    fn a_saved_config_is_read_without_the_weights_it_started_from() {
        let saved = Config::load(None, &set(&["model.init=llmc:/gone/model.bin"])).unwrap().to_toml_string();
        let read = Config::from_saved(&saved, "state.json", &[]).unwrap();
        assert_eq!(read.model.init, None);
        assert_eq!(read.model.n_embd, Config::load(None, &[]).unwrap().model.n_embd);
    }

    #[test]
    fn malformed_override() {
        for raw in ["max_steps=5", "train.max_steps", "a..c=1", ".x=1", "train.=1"] {
            let (source, key, _) = config_error(Config::load(None, &set(&[raw])));
            assert_eq!((source.as_str(), key.as_str()), ("--set", raw));
        }
    }
}
