//! Checkpoints: everything a run needs to continue exactly, in a directory per step.
//!
//! `out_dir/checkpoints/step_00000100/` holds
//! - `model.safetensors`: the weights in Hugging Face GPT-2's names and layout (`transformer.h.0.attn.c_attn.weight`,
//!   linear weights stored `(in, out)` as GPT-2's Conv1D keeps them, `wte` without the padded rows), and
//!   `config.json` beside it, so the directory loads as a `GPT2LMHeadModel`;
//! - `optimizer.safetensors`: AdamW's moments `m` and `v`, flat, in kiln's parameter layout (without the padding a
//!   data-parallel job adds, so that a checkpoint loads at any number of ranks);
//! - `state.json`: the step and the resolved configuration. The data position is the step itself (sequences
//!   are a function of seed and step) and nothing else is random, so that is the whole state.
//!
//! A checkpoint is written into a temporary directory that is renamed into place when complete, so a crash
//! mid-write leaves the previous checkpoints intact and no half-written directory that looks complete.

use kiln_core::{Backend, Config, Error, Result};
use kiln_model::{Model, ModelSpec, ParamInfo};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::path::{Path, PathBuf};

const STEP_PREFIX: &str = "step_";

/// The Hugging Face name of a kiln parameter, and whether its matrix is stored transposed there.
fn hf_name(name: &str) -> (String, bool) {
    let (prefix, rest) = match name.strip_prefix("h.") {
        Some(rest) => {
            let (layer, tail) = rest.split_once('.').expect("block parameters are h.<i>.<name>");
            (format!("transformer.h.{layer}."), tail)
        }
        None => ("transformer.".to_string(), name),
    };
    let (hf, transposed) = match rest {
        "wte" | "wpe" => (format!("{rest}.weight"), false),
        "attn.qkv.weight" => ("attn.c_attn.weight".into(), true),
        "attn.qkv.bias" => ("attn.c_attn.bias".into(), false),
        "attn.proj.weight" => ("attn.c_proj.weight".into(), true),
        "attn.proj.bias" => ("attn.c_proj.bias".into(), false),
        "mlp.fc.weight" => ("mlp.c_fc.weight".into(), true),
        "mlp.fc.bias" => ("mlp.c_fc.bias".into(), false),
        "mlp.proj.weight" => ("mlp.c_proj.weight".into(), true),
        "mlp.proj.bias" => ("mlp.c_proj.bias".into(), false),
        other => (other.to_string(), false),
    };
    (format!("{prefix}{hf}"), transposed)
}

/// Rows of a parameter that are saved: `wte` without its padded rows, everything else whole.
fn saved_shape(p: &ParamInfo, shape: &ModelSpec) -> Vec<usize> {
    match (p.name.as_str(), hf_name(&p.name).1) {
        ("wte", _) => vec![shape.vocab, shape.n_embd],
        (_, true) => vec![p.shape[1], p.shape[0]],
        _ => p.shape.clone(),
    }
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Where a run's checkpoints go: `out_dir/checkpoints`.
pub fn root(config: &Config) -> PathBuf {
    PathBuf::from(&config.train.out_dir).join("checkpoints")
}

/// The directory of the checkpoint of `step` under `root`.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("{STEP_PREFIX}{step:08}"))
}

/// Complete checkpoints under `root`, oldest first (temporary directories of unfinished writes are not).
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else { return Vec::new() };
    let mut found: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(STEP_PREFIX)?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    found.sort();
    found
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

fn json_field<'a>(v: &'a serde_json::Value, key: &str, file: &Path) -> Result<&'a serde_json::Value> {
    v.get(key).ok_or_else(|| Error::data(file, format!("no \"{key}\" field")))
}

/// Loads `dir/model.safetensors` (Hugging Face GPT-2 names, with or without the `transformer.` prefix that
/// `GPT2LMHeadModel` adds) into `model`'s parameters.
pub fn load_weights<B: Backend + ?Sized>(dir: &Path, model: &Model, backend: &mut B) -> Result<()> {
    let model_path = dir.join("model.safetensors");
    let bytes = read_file(&model_path)?;
    let file = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::data(&model_path, format!("not a safetensors file: {e}")))?;
    let shape = model.spec;
    let mut params = vec![0.0f32; model.params.len];
    for p in &model.layout {
        let (name, transposed) = hf_name(&p.name);
        let want = saved_shape(p, &shape);
        let bare = name.strip_prefix("transformer.").unwrap_or(&name);
        let t = file
            .tensor(&name)
            .or_else(|_| file.tensor(bare))
            .map_err(|_| Error::data(&model_path, format!("no tensor {name}")))?;
        if t.dtype() != Dtype::F32 || t.shape() != want.as_slice() {
            return Err(Error::data(
                &model_path,
                format!(
                    "tensor {name} is {:?} {:?}; this model needs F32 {want:?} (a checkpoint of another model.spec?)",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        let values = from_le_bytes(t.data());
        let dst = &mut params[p.offset..p.offset + p.len()];
        if transposed {
            let (rows, cols) = (p.shape[0], p.shape[1]);
            for (i, d) in dst.iter_mut().enumerate() {
                *d = values[(i % cols) * rows + i / cols];
            }
        } else {
            dst[..values.len()].copy_from_slice(&values);
        }
    }
    backend.upload(model.params, &params)
}

/// The configuration a checkpoint was trained with (from `state.json`), with `overrides` applied.
pub fn config(dir: &Path, overrides: &[String]) -> Result<Config> {
    let (state, state_path) = read_state(dir)?;
    let text = json_field(&state, "config", &state_path)?
        .as_str()
        .ok_or_else(|| Error::data(&state_path, "\"config\" is not a string"))?;
    Config::from_toml_str(text, &state_path.display().to_string(), overrides)
}

/// Writes the checkpoint of `step` under `root` (the weights `params` and AdamW moments of `model`, in its layout),
/// then deletes all but the newest `keep`.
pub fn save(
    root: &Path,
    step: u64,
    config: &Config,
    model: &Model,
    params: &[f32],
    moments: (&[f32], &[f32]),
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let final_dir = step_dir(root, step);
    let tmp = root.join(format!(".tmp-{STEP_PREFIX}{step:08}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    let shape = model.spec;
    let mut weights: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for p in &model.layout {
        let (name, transposed) = hf_name(&p.name);
        let values = &params[p.offset..p.offset + p.len()];
        let saved = saved_shape(p, &shape);
        let data: Vec<f32> = if transposed {
            let (rows, cols) = (p.shape[0], p.shape[1]);
            (0..cols * rows).map(|i| values[(i % rows) * cols + i / rows]).collect()
        } else {
            values[..saved.iter().product::<usize>()].to_vec()
        };
        weights.push((name, saved, le_bytes(&data)));
    }
    write_safetensors(&tmp.join("model.safetensors"), &weights)?;

    let (m, v) = moments;
    let moment_tensors: Vec<_> =
        [("m", m), ("v", v)].iter().map(|(name, host)| (name.to_string(), vec![host.len()], le_bytes(host))).collect();
    write_safetensors(&tmp.join("optimizer.safetensors"), &moment_tensors)?;

    let hf_config = serde_json::json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": shape.vocab,
        "n_positions": shape.block_size,
        "n_ctx": shape.block_size,
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": true,
    });
    let state = serde_json::json!({ "step": step, "config": config.to_toml_string() });
    for (file, value) in [("config.json", hf_config), ("state.json", state)] {
        let path = tmp.join(file);
        std::fs::write(&path, serde_json::to_string_pretty(&value).expect("plain JSON")).map_err(io(&path))?;
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;

    let all = list(root);
    for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(final_dir)
}

fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) -> Result<()> {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), data).expect("the shape matches the data");
            (name.clone(), view)
        })
        .collect();
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::data(path, format!("cannot serialise: {e}")))?;
    std::fs::write(path, bytes).map_err(io(path))
}

fn read_state(dir: &Path) -> Result<(serde_json::Value, PathBuf)> {
    let path = dir.join("state.json");
    let state =
        serde_json::from_slice(&read_file(&path)?).map_err(|e| Error::data(&path, format!("not valid JSON: {e}")))?;
    Ok((state, path))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::data(path, format!("cannot read: {e}")))
}

/// Loads the checkpoint in `dir` into `model`'s parameters; returns its step and the AdamW moments `m` and `v`
/// of every parameter. Every tensor's presence and shape is checked, and a mismatch names the tensor and the file.
pub fn load<B: Backend + ?Sized>(dir: &Path, model: &Model, backend: &mut B) -> Result<(u64, [Vec<f32>; 2])> {
    let (state, state_path) = read_state(dir)?;
    let step = json_field(&state, "step", &state_path)?
        .as_u64()
        .ok_or_else(|| Error::data(&state_path, "\"step\" is not a whole number"))?;
    load_weights(dir, model, backend)?;

    let opt_path = dir.join("optimizer.safetensors");
    let bytes = read_file(&opt_path)?;
    let file =
        SafeTensors::deserialize(&bytes).map_err(|e| Error::data(&opt_path, format!("not a safetensors file: {e}")))?;
    let n = model.spec.num_params();
    let moment = |name: &str| {
        let view = file.tensor(name).map_err(|_| Error::data(&opt_path, format!("no tensor {name}")))?;
        if view.dtype() != Dtype::F32 || view.shape() != [n] {
            return Err(Error::data(
                &opt_path,
                format!("tensor {name} is {:?} {:?}; expected F32 [{n}]", view.dtype(), view.shape()),
            ));
        }
        Ok(from_le_bytes(view.data()))
    };
    Ok((step, [moment("m")?, moment("v")?]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names() {
        assert_eq!(hf_name("wte"), ("transformer.wte.weight".into(), false));
        assert_eq!(hf_name("h.3.attn.qkv.weight"), ("transformer.h.3.attn.c_attn.weight".into(), true));
        assert_eq!(hf_name("h.11.mlp.proj.bias"), ("transformer.h.11.mlp.c_proj.bias".into(), false));
        assert_eq!(hf_name("h.0.ln_2.weight"), ("transformer.h.0.ln_2.weight".into(), false));
        assert_eq!(hf_name("ln_f.bias"), ("transformer.ln_f.bias".into(), false));
    }
}
