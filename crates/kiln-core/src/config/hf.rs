//! The `[model]` keys of a Hugging Face `config.json` (`GPT2LMHeadModel`, `LlamaForCausalLM`,
//! `Qwen2ForCausalLM`, `Qwen3ForCausalLM`, `SmolLM3ForCausalLM`, `MistralForCausalLM`, `MixtralForCausalLM`,
//! `Qwen3MoeForCausalLM`), for `model.init = "hf:DIR"`: a model read from Hugging Face takes its shape from
//! there. An optional key the file leaves out takes its class's default. A sliding window of attention is read
//! where it covers every layer: kiln's `model.sliding_window` covers every block.
//!
//! Both spellings of the rotary settings are read: transformers 4's `rope_theta` and `rope_scaling`, and
//! transformers 5's `rope_parameters`, which holds both.

use super::{ATTENTION_BIASES, LinearGroup, QWEN2_BIASES};
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// The `[model]` table a `config.json` describes (every key but `init` and `attention`), and its vocabulary size.
pub(super) fn model_table(path: &Path) -> Result<(toml::Table, usize)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::data(path, format!("cannot read: {e}")))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| Error::data(path, format!("not valid JSON: {e}")))?;
    let fields = Fields { json: &json, path };
    let vocab = fields.required_count("vocab_size")? as usize;
    let table = match fields.string("model_type")? {
        "gpt2" => gpt2(&fields),
        "llama" => llama(&fields),
        "qwen2" => qwen2(&fields),
        "qwen3" => qwen3(&fields),
        "smollm3" => smollm3(&fields),
        "mistral" => mistral(&fields),
        "mixtral" => mixtral(&fields),
        "qwen3_moe" => qwen3_moe(&fields),
        other => Err(Error::data(
            path,
            format!(
                "model_type \"{other}\": kiln reads GPT-2 (\"gpt2\") and Llama-style (\"llama\", \"qwen2\", \
                 \"qwen3\", \"smollm3\", \"mistral\", \"mixtral\", \"qwen3_moe\") models"
            ),
        )),
    }?;
    Ok((table, vocab))
}

/// The fields of one `config.json`, read with errors that name the field and the file.
struct Fields<'a> {
    json: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn error(&self, key: &str, what: &str) -> Error {
        Error::data(self.path, format!("\"{key}\": {what}"))
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.get(key).and_then(Value::as_str).ok_or_else(|| self.error(key, "missing, or not a string"))
    }

    fn count(&self, key: &str) -> Result<Option<i64>> {
        self.get(key)
            .map(|v| v.as_i64().filter(|&n| n > 0).ok_or_else(|| self.error(key, "not a whole number above 0")))
            .transpose()
    }

    fn required_count(&self, key: &str) -> Result<i64> {
        self.count(key)?.ok_or_else(|| self.error(key, "missing"))
    }

    fn number(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.error(key, "not a number"))).transpose()
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| self.error(key, "not true or false"))).transpose()
    }

    /// Fails unless `key` is absent or one of `allowed`, saying that kiln supports only those.
    fn only(&self, key: &str, allowed: &[Value]) -> Result<()> {
        match self.get(key) {
            Some(v) if !allowed.contains(v) => Err(self.error(key, &format!("{v}: kiln supports only {allowed:?}"))),
            _ => Ok(()),
        }
    }
}

fn table(entries: impl IntoIterator<Item = (&'static str, Option<toml::Value>)>) -> toml::Table {
    entries.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect()
}

fn gpt2(f: &Fields) -> Result<toml::Table> {
    f.only("activation_function", &["gelu_new".into(), "gelu_pytorch_tanh".into()])?;
    Ok(table([
        ("arch", Some("gpt2".into())),
        ("n_layer", Some(f.required_count("n_layer")?.into())),
        ("n_head", Some(f.required_count("n_head")?.into())),
        ("n_embd", Some(f.required_count("n_embd")?.into())),
        ("block_size", Some(f.required_count("n_positions")?.into())),
        ("ffn_dim", f.count("n_inner")?.map(Into::into)),
        ("norm_eps", f.number("layer_norm_epsilon")?.map(Into::into)),
        ("tie_embeddings", Some(f.flag("tie_word_embeddings")?.unwrap_or(true).into())),
    ]))
}

/// Llama: biases nowhere, or on attention's four projections (`attention_bias`), or on the MLP's (`mlp_bias`).
fn llama(f: &Fields) -> Result<toml::Table> {
    rotary(f, Family { biases: &llama_biases(f)?, ..LLAMA })
}

/// The biased layer groups of Llama's `attention_bias` and `mlp_bias`.
fn llama_biases(f: &Fields) -> Result<Vec<LinearGroup>> {
    let mut biases = Vec::new();
    if f.flag("attention_bias")?.unwrap_or(false) {
        biases.extend(ATTENTION_BIASES);
    }
    if f.flag("mlp_bias")?.unwrap_or(false) {
        biases.push(LinearGroup::Mlp);
    }
    Ok(biases)
}

/// Qwen2 is Llama with biases on the query, key and value projections, and a sliding window (see [`qwen_window`]).
fn qwen2(f: &Fields) -> Result<toml::Table> {
    rotary(f, Family { biases: &QWEN2_BIASES, kv_heads: Some(32), window: qwen_window(f)?, ..LLAMA })
}

/// Qwen3 is Llama with QK-norm, and biases on attention's four projections where `attention_bias` says so; its
/// sliding window is Qwen2's.
fn qwen3(f: &Fields) -> Result<toml::Table> {
    let biases = if f.flag("attention_bias")?.unwrap_or(false) { &ATTENTION_BIASES[..] } else { &[] };
    let window = qwen_window(f)?;
    rotary(f, Family { biases, qk_norm: true, kv_heads: Some(32), head_dim: Some(128), window, ..LLAMA })
}

/// Qwen2's and Qwen3's sliding window: off unless `use_sliding_window` (off in every released model), and then
/// `sliding_window` keys (4096 unless said; null turns it off) over the layers that `layer_types` lists as
/// `"sliding_attention"`, by default those from `max_window_layers` (28 unless said) on. kiln's window covers every
/// block or none, so the layers must be all of them or none.
fn qwen_window(f: &Fields) -> Result<Option<i64>> {
    if !f.flag("use_sliding_window")?.unwrap_or(false) {
        return Ok(None);
    }
    let window = match f.json.get("sliding_window") {
        None => 4096,
        Some(Value::Null) => return Ok(None),
        Some(_) => f.required_count("sliding_window")?,
    };
    let layers = f.required_count("num_hidden_layers")?;
    let (sliding, field) = match f.get("layer_types") {
        Some(types) => {
            let kinds = types.as_array().and_then(|t| {
                t.iter()
                    .map(|l| match l.as_str()? {
                        "sliding_attention" => Some(true),
                        "full_attention" => Some(false),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            });
            let kinds = kinds.filter(|k| k.len() as i64 == layers);
            let message = format!("not a list of \"full_attention\" and \"sliding_attention\", one a layer ({layers})");
            (kinds.ok_or_else(|| f.error("layer_types", &message))?, "layer_types")
        }
        None => {
            let first = match f.get("max_window_layers") {
                None => 28,
                Some(v) => v.as_i64().ok_or_else(|| f.error("max_window_layers", "not a whole number"))?,
            };
            ((0..layers).map(|l| l >= first).collect(), "max_window_layers")
        }
    };
    match sliding.iter().filter(|&&s| s).count() {
        0 => Ok(None),
        n if n == sliding.len() => Ok(Some(window)),
        n => Err(f.error(
            field,
            &format!(
                "slides the window over {n} of {} layers: kiln's sliding window covers every block or none",
                sliding.len()
            ),
        )),
    }
}

/// SmolLM3 is Llama whose every `no_rope_layer_interval`-th layer (default 4) has no rotary embedding; its
/// `no_rope_layers` (1 for a layer that rotates) must say the same, as SmolLM3Config writes it. Its sliding window
/// must be off and its `layer_types` all full attention: SmolLM3 slides the window over its NoPE layers only, and
/// kiln's window covers every block (transformers masks the layers listed as sliding by `sliding_window` even when
/// `use_sliding_window` is false).
fn smollm3(f: &Fields) -> Result<toml::Table> {
    f.only("use_sliding_window", &[false.into()])?;
    let full = Value::from("full_attention");
    if let Some(types) = f.get("layer_types").filter(|t| !t.as_array().is_some_and(|t| t.iter().all(|l| *l == full))) {
        let message = format!("{types}: kiln's sliding window covers every block, not SmolLM3's NoPE layers only");
        return Err(f.error("layer_types", &message));
    }
    let layers = f.required_count("num_hidden_layers")?;
    let interval = f.count("no_rope_layer_interval")?.unwrap_or(4);
    let expected: Vec<Value> = (0..layers).map(|i| Value::from(i64::from((i + 1) % interval != 0))).collect();
    if let Some(listed) = f.get("no_rope_layers").filter(|l| l.as_array() != Some(&expected)) {
        let message = format!(
            "{listed}: kiln's NoPE layers are every no_rope_layer_interval-th ({interval}), which is {}",
            Value::from(expected)
        );
        return Err(f.error("no_rope_layers", &message));
    }
    let family =
        Family { biases: &llama_biases(f)?, kv_heads: Some(4), tie_embeddings: true, rope_theta: 2e6, ..LLAMA };
    let mut table = rotary(f, family)?;
    table.insert("nope_interval".into(), interval.into());
    Ok(table)
}

/// Mistral is Llama without biases (and with 8 key/value heads unless told), but for a sliding window of attention
/// over every layer: MistralConfig's default of 4096 keys (Mistral 7B v0.1's), or none where it is null (from v0.2
/// on).
fn mistral(f: &Fields) -> Result<toml::Table> {
    let window = match f.json.get("sliding_window") {
        None => Some(4096),
        Some(Value::Null) => None,
        Some(_) => Some(f.required_count("sliding_window")?),
    };
    rotary(f, Family { kv_heads: Some(8), window, ..LLAMA })
}

/// Mixtral is Mistral with a mixture of experts in every block (see [`experts`]), whose weights it always
/// normalises, and no sliding window unless `sliding_window` sets one.
fn mixtral(f: &Fields) -> Result<toml::Table> {
    // Noise transformers multiplies into the experts' input while training: kiln has none.
    if f.number("router_jitter_noise")?.is_some_and(|noise| noise != 0.0) {
        return Err(f.error("router_jitter_noise", "kiln supports only 0"));
    }
    let window = f.count("sliding_window")?;
    let mut table = rotary(f, Family { kv_heads: Some(8), rope_theta: 1e6, norm_eps: 1e-5, window, ..LLAMA })?;
    let count = f.count("num_local_experts")?.unwrap_or(8);
    experts(f, &mut table, count, 2, true)?;
    Ok(table)
}

/// Qwen3-MoE is Qwen3 with a mixture of experts, `moe_intermediate_size` wide, in every block (kiln has no blocks
/// with a plain MLP among them: `decoder_sparse_step` must be 1 and `mlp_only_layers` empty) and no sliding window.
fn qwen3_moe(f: &Fields) -> Result<toml::Table> {
    f.only("use_sliding_window", &[false.into()])?;
    f.only("decoder_sparse_step", &[1.into()])?;
    f.only("mlp_only_layers", &[Value::Array(Vec::new())])?;
    let biases = if f.flag("attention_bias")?.unwrap_or(false) { &ATTENTION_BIASES[..] } else { &[] };
    let ffn_dim = ("moe_intermediate_size", Some(768));
    let mut table = rotary(f, Family { biases, qk_norm: true, kv_heads: Some(4), ffn_dim, ..LLAMA })?;
    // transformers 5 writes the experts' count as num_local_experts, 4 as num_experts.
    let count = f.count("num_local_experts")?.or(f.count("num_experts")?).unwrap_or(128);
    let normalize = f.flag("norm_topk_prob")?.unwrap_or(false);
    experts(f, &mut table, count, 8, normalize)?;
    Ok(table)
}

/// The keys of a mixture of experts: `count` of them, `num_experts_per_tok` (`per_token` unless said) a token, and
/// the load-balancing loss's coefficient `router_aux_loss_coef` (0.001 unless said) where transformers trains with
/// it (`output_router_logits`), otherwise 0.
fn experts(f: &Fields, table: &mut toml::Table, count: i64, per_token: i64, normalize: bool) -> Result<()> {
    let aux_loss = match f.flag("output_router_logits")?.unwrap_or(false) {
        true => f.number("router_aux_loss_coef")?.unwrap_or(0.001),
        false => 0.0,
    };
    table.insert("experts".into(), count.into());
    table.insert("experts_per_token".into(), f.count("num_experts_per_tok")?.unwrap_or(per_token).into());
    table.insert("normalize_expert_weights".into(), normalize.into());
    table.insert("router_aux_loss".into(), aux_loss.into());
    Ok(())
}

/// What a Llama-style family is beyond Llama, and what its class takes for the keys a config.json leaves out where
/// that is not LlamaConfig's default.
struct Family<'a> {
    biases: &'a [LinearGroup],
    qk_norm: bool,
    /// `num_key_value_heads`; none: as many as query heads.
    kv_heads: Option<i64>,
    /// `head_dim`; none: `hidden_size / num_attention_heads`.
    head_dim: Option<i64>,
    tie_embeddings: bool,
    rope_theta: f64,
    /// `rms_norm_eps`.
    norm_eps: f64,
    /// The field of the MLP's width and its default (none: required): `intermediate_size`, or a mixture's
    /// experts' own.
    ffn_dim: (&'static str, Option<i64>),
    /// The sliding window over every layer, if it has one.
    window: Option<i64>,
}

const LLAMA: Family<'static> = Family {
    biases: &[],
    qk_norm: false,
    kv_heads: None,
    head_dim: None,
    tie_embeddings: false,
    rope_theta: 10_000.0,
    // LlamaConfig's own default ε.
    norm_eps: 1e-6,
    ffn_dim: ("intermediate_size", None),
    window: None,
};

/// The `[model]` table of a Llama-style model of `family`.
fn rotary(f: &Fields, family: Family) -> Result<toml::Table> {
    f.only("hidden_act", &["silu".into()])?;
    // transformers 5 keeps the rotary settings in rope_parameters; 4 in rope_theta and rope_scaling.
    let rope = f.get("rope_parameters").or_else(|| f.get("rope_scaling"));
    let rope_field = if f.get("rope_parameters").is_some() { "rope_parameters" } else { "rope_scaling" };
    if rope.is_some_and(|r| !r.is_object()) {
        return Err(f.error(rope_field, "not an object"));
    }
    let theta = match rope.and_then(|r| r.get("rope_theta")) {
        Some(t) => Some(t.as_f64().ok_or_else(|| f.error(rope_field, "rope_theta is not a number"))?),
        None => f.number("rope_theta")?,
    };
    let scaling = rope.map(|r| rope_scaling(f, rope_field, r)).transpose()?.flatten();
    Ok(table([
        ("arch", Some("llama".into())),
        ("n_layer", Some(f.required_count("num_hidden_layers")?.into())),
        ("n_head", Some(f.required_count("num_attention_heads")?.into())),
        ("n_embd", Some(f.required_count("hidden_size")?.into())),
        ("head_dim", f.count("head_dim")?.or(family.head_dim).map(Into::into)),
        ("block_size", Some(f.required_count("max_position_embeddings")?.into())),
        ("n_kv_head", f.count("num_key_value_heads")?.or(family.kv_heads).map(Into::into)),
        (
            "ffn_dim",
            Some(
                f.count(family.ffn_dim.0)?
                    .or(family.ffn_dim.1)
                    .ok_or_else(|| f.error(family.ffn_dim.0, "missing"))?
                    .into(),
            ),
        ),
        ("norm_eps", Some(f.number("rms_norm_eps")?.unwrap_or(family.norm_eps).into())),
        ("tie_embeddings", Some(f.flag("tie_word_embeddings")?.unwrap_or(family.tie_embeddings).into())),
        ("rope_theta", Some(theta.unwrap_or(family.rope_theta).into())),
        ("rope_scaling", scaling.map(toml::Value::Table)),
        ("biases", Some(family.biases.iter().map(|b| toml::Value::from(b.name())).collect::<Vec<_>>().into())),
        ("qk_norm", Some(family.qk_norm.into())),
        ("sliding_window", family.window.map(Into::into)),
    ]))
}

/// `model.rope_scaling` of a rotary settings object: none for the default rotation, a table for Llama 3's.
fn rope_scaling(f: &Fields, field: &str, rope: &Value) -> Result<Option<toml::Table>> {
    let kind = match rope.get("rope_type").or_else(|| rope.get("type")) {
        None => "default",
        Some(kind) => kind.as_str().ok_or_else(|| f.error(field, "rope_type is not a string"))?,
    };
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let number = |key: &str| {
                rope.get(key)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| f.error(field, &format!("{key} missing or not a number")))
            };
            let context = rope
                .get("original_max_position_embeddings")
                .and_then(Value::as_i64)
                .ok_or_else(|| f.error(field, "original_max_position_embeddings missing or not a whole number"))?;
            Ok(Some(table([
                ("type", Some("llama3".into())),
                ("factor", Some(number("factor")?.into())),
                ("low_freq_factor", Some(number("low_freq_factor")?.into())),
                ("high_freq_factor", Some(number("high_freq_factor")?.into())),
                ("original_max_position_embeddings", Some(context.into())),
            ])))
        }
        other => Err(f.error(field, &format!("rope type \"{other}\": kiln supports \"default\" and \"llama3\""))),
    }
}
