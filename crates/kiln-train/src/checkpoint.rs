//! Checkpoints: everything a run needs to continue exactly, in a directory per step.
//!
//! `out_dir/checkpoints/step_00000100/` holds
//! - the weights as transformers names and lays them out (see [`kiln_model::hf`]): `model.safetensors`, or for a
//!   large model shards and `model.safetensors.index.json`, fp32, with `config.json` beside them, so the directory
//!   loads as a `GPT2LMHeadModel`, `LlamaForCausalLM` or `Qwen2ForCausalLM`;
//! - `optimizer.safetensors`: AdamW's moments, `m.NAME` and `v.NAME` for each kiln parameter `NAME`, so that a
//!   layout that changes can never pair moments with the wrong weights (and without the padding a data-parallel
//!   job adds, so that a checkpoint loads at any number of ranks);
//! - `state.json`: the step, the guard's state ([`crate::guard`]) and the resolved configuration. Sequences are a
//!   function of seed and data position, which is the step plus the data the guard's rollbacks passed over, and
//!   nothing else is random, so that is the whole state.
//!
//! Everything is written and read one tensor at a time ([`crate::tensor_files`]): no whole-model copy on the host.
//! A checkpoint is written into a temporary directory that is flushed to disk and renamed into place when complete
//! ([`durable::publish`]), so a crash mid-write, even a power loss, leaves the previous checkpoints intact and no
//! half-written directory that looks complete.

use crate::guard::GuardState;
use crate::tensor_files::{self, Entry, TensorFiles};
use kiln_core::config::ModelConfig;
use kiln_core::{Backend, Config, Error, Result, durable};
use kiln_data::codec::{Codec, HF_TOKENIZER_FILE, TOKENIZER_FILE};
use kiln_model::hf::{self, HfTensor, SpecialTokens};
use kiln_model::{Model, ModelSpec};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

const STEP_PREFIX: &str = "step_";

/// The size at which the weights are split into shards, as transformers' `save_pretrained` splits them.
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Which values a checkpoint's writer asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Params,
    /// AdamW's first moment.
    M,
    /// AdamW's second moment.
    V,
}

/// Where a run stands, besides its tensors: `state.json` holds this and the configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: u64,
    /// Absent from checkpoints written before the guard was: a guard that has seen nothing yet.
    #[serde(default)]
    pub guard: GuardState,
}

/// Fills the values of `source` at elements `range` of the flat parameter vector.
pub type Fetch<'a> = dyn FnMut(Source, Range<usize>, &mut Vec<f32>) -> Result<()> + 'a;

/// Takes the values of `source` at elements `range` of the flat parameter vector, as a checkpoint is read.
pub type Restore<'a, B> = dyn FnMut(&mut B, Source, Range<usize>, &[f32]) -> Result<()> + 'a;

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

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value).expect("plain JSON")).map_err(io(path))
}

/// Writes `model`'s weights into `dir` as transformers saves them (fp32, sharded past `max_shard_bytes`), with
/// `config.json`. `fetch(Source::Params, ..)` supplies the values; see [`tensor_files::write`] for `write`.
pub fn write_model(
    dir: &Path,
    model: &Model,
    tokens: SpecialTokens,
    max_shard_bytes: usize,
    write: bool,
    fetch: &mut Fetch,
) -> Result<()> {
    let tensors = hf::tensors(&model.spec, &model.layout);
    let entries: Vec<Entry> = tensors.iter().map(|t| Entry { name: t.name.clone(), shape: t.shape.clone() }).collect();
    let mut kiln = Vec::new();
    tensor_files::write(dir, "model", &entries, max_shard_bytes, write, &mut |i, values| {
        fetch(Source::Params, tensors[i].elements.clone(), &mut kiln)?;
        *values = tensors[i].from_kiln(&kiln);
        Ok(())
    })?;
    if write {
        write_json(&dir.join("config.json"), &hf::config_json(&model.spec, tokens))?;
    }
    Ok(())
}

/// Writes the checkpoint of `progress` under `root`, with the tokenizer `codec` where the data has one, then deletes
/// all but the newest `keep`, and, while the guard counts failing steps, the one its rollback would return to. Every
/// rank of a job calls it, and `fetch` is called in the same order on each (a ZeRO rank gathers each tensor from all of
/// them); only the rank with `write` set touches the filesystem. Returns the checkpoint's directory.
#[allow(clippy::too_many_arguments)]
pub fn save(
    root: &Path,
    progress: &Progress,
    config: &Config,
    model: &Model,
    codec: Option<&Codec>,
    keep: usize,
    write: bool,
    fetch: &mut Fetch,
) -> Result<PathBuf> {
    let step = progress.step;
    let final_dir = step_dir(root, step);
    let tmp = root.join(format!(".tmp-{STEP_PREFIX}{step:08}-{}", std::process::id()));
    if write {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    }
    let published = write_files(&tmp, progress, config, model, codec, write, fetch).and_then(|()| {
        if write {
            let _ = std::fs::remove_dir_all(&final_dir);
            durable::publish(&tmp, &final_dir)?;
        }
        Ok(())
    });
    if published.is_err() && write {
        // A write that failed (on a full disk, say) takes its partial directory with it instead of leaving it there.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    published?;
    if write {
        let all = list(root);
        let guard = &progress.guard;
        let rollback_target =
            (guard.failed_in_a_row > 0).then(|| all.iter().rev().find(|(s, _)| *s <= guard.good_until)).flatten();
        for (step, old) in all.iter().take(all.len().saturating_sub(keep)) {
            if rollback_target.is_none_or(|(target, _)| target != step) {
                std::fs::remove_dir_all(old).map_err(io(old))?;
            }
        }
    }
    Ok(final_dir)
}

/// Writes the files of the checkpoint of `progress` into `dir` (see [`save`]; on a rank without `write`, only
/// fetches).
fn write_files(
    dir: &Path,
    progress: &Progress,
    config: &Config,
    model: &Model,
    codec: Option<&Codec>,
    write: bool,
    fetch: &mut Fetch,
) -> Result<()> {
    // config.json's beginning of text is the tokenizer's own where it has one, else its end of text, as GPT-2's is.
    let eos = codec.and_then(Codec::end_of_text);
    let bos = codec.and_then(Codec::begin_of_text).or(eos);
    write_model(dir, model, SpecialTokens { bos, eos }, MAX_SHARD_BYTES, write, fetch)?;
    if let (Some(codec), true) = (codec, write) {
        codec.save(dir)?;
    }

    let moments: Vec<(Source, &kiln_model::ParamInfo)> =
        [Source::M, Source::V].into_iter().flat_map(|s| model.layout.iter().map(move |p| (s, p))).collect();
    let entries: Vec<Entry> =
        moments.iter().map(|(s, p)| Entry { name: moment_name(*s, &p.name), shape: p.shape.clone() }).collect();
    tensor_files::write(dir, "optimizer", &entries, usize::MAX, write, &mut |i, values| {
        let (source, p) = moments[i];
        fetch(source, p.offset..p.offset + p.len(), values)
    })?;
    if write {
        let mut state = serde_json::to_value(progress).expect("plain numbers");
        state["config"] = config.to_toml_string().into();
        write_json(&dir.join("state.json"), &state)?;
    }
    Ok(())
}

fn moment_name(source: Source, param: &str) -> String {
    match source {
        Source::M => format!("m.{param}"),
        Source::V => format!("v.{param}"),
        Source::Params => unreachable!("moments only"),
    }
}

/// The name `files` hold `t` under: its own, or for GPT-2 also without the `transformer.` prefix that
/// `GPT2LMHeadModel` adds (`GPT2Model` saves without it).
fn hf_name<'a>(files: &TensorFiles, t: &'a HfTensor) -> Option<&'a str> {
    [Some(t.name.as_str()), t.name.strip_prefix("transformer.")]
        .into_iter()
        .flatten()
        .find(|n| files.shape(n).is_some())
}

/// `t`'s shape and values in `files` (see [`hf_name`]).
fn read_hf(files: &TensorFiles, t: &HfTensor) -> Result<Option<(Vec<usize>, Vec<f32>)>> {
    match hf_name(files, t) {
        Some(name) => files.read(name),
        None => Ok(None),
    }
}

/// Where weights read from files go: `put(backend, elements, values)` for each range of the flat parameter layout.
/// [`into_params`] puts them into a model's parameters; a ZeRO stage 3 trainer, into each rank's share.
pub type Put<'a, B> = dyn FnMut(&mut B, Range<usize>, &[f32]) -> Result<()> + 'a;

/// Puts weights into `model`'s parameters, which hold them all in place.
pub fn into_params<B: Backend + ?Sized>(model: &Model) -> impl FnMut(&mut B, Range<usize>, &[f32]) -> Result<()> {
    let params = model.params;
    move |backend, range, values| backend.upload(params.slice(range.start, range.len()), values)
}

/// Loads the model files in `dir` (a kiln checkpoint, an export, or a directory written by transformers: one
/// `model.safetensors` or shards with an index; F32, BF16 or F16), one tensor at a time, handing each to `put`.
/// Every tensor's presence and shape is checked, and a mismatch names the tensor and the file.
pub fn load_weights<B: Backend + ?Sized>(dir: &Path, model: &Model, backend: &mut B, put: &mut Put<B>) -> Result<()> {
    let files = TensorFiles::open(dir, "model")?;
    for t in hf::tensors(&model.spec, &model.layout) {
        let (shape, values) = read_hf(&files, &t)?
            .ok_or_else(|| Error::data(dir, format!("no tensor {} in {}", t.name, files.describe())))?;
        // GPT-2's learned positions may be more than the run uses: it takes the first block_size.
        let more_positions = t.name.ends_with("wpe.weight")
            && shape.len() == t.shape.len()
            && shape[0] >= t.shape[0]
            && shape[1..] == t.shape[1..];
        let fits = shape == t.shape || more_positions;
        if !fits {
            let path = files.path_of(&t.name).unwrap_or(dir);
            return Err(Error::data(
                path,
                format!(
                    "tensor {} is {shape:?}; this model needs {:?} (a checkpoint of another model shape?)",
                    t.name, t.shape
                ),
            ));
        }
        let values = t.to_kiln(&values[..t.len()]);
        put(backend, t.elements.start..t.elements.start + t.len(), &values)?;
    }
    Ok(())
}

/// Writes the model of the checkpoint (or Hugging Face directory) `from` into the new directory `to`, in fp32,
/// sharded past `max_shard_bytes`, with its `config.json` and tokenizer: what transformers'
/// `from_pretrained` reads, and all `kiln sample` needs. The
/// directory appears whole or not at all. Returns the model files written.
pub fn export(from: &Path, to: &Path, max_shard_bytes: usize) -> Result<Vec<PathBuf>> {
    if to.exists() {
        return Err(Error::Usage(format!("{} exists; choose a new directory", to.display())));
    }
    let files = TensorFiles::open(from, "model")?;
    check_model_files(from, &files)?;
    let names = files.names();
    let mut entries = Vec::with_capacity(names.len());
    for name in &names {
        entries.push(Entry { name: name.clone(), shape: files.shape(name).expect("a name the files listed") });
    }
    // A name of this process's own beside `to`, so that nothing of the user's is ever in the way of it; what an
    // export to `to` that was killed left there goes first.
    let (parent, name) = (to.parent().unwrap_or(Path::new("")), to.file_name().unwrap_or_default());
    let prefix = format!(".{}.tmp-export-", name.to_string_lossy());
    let listed = std::fs::read_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent });
    for left in listed.into_iter().flatten().flatten() {
        if left.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(left.path());
        }
    }
    let tmp = parent.join(format!("{prefix}{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let published = tensor_files::write(&tmp, "model", &entries, max_shard_bytes, true, &mut |i, values| {
        *values = files.read(&entries[i].name)?.expect("a name the files listed").1;
        Ok(())
    })
    .and_then(|written| {
        // config.json, and the tokenizer where the model has one.
        for file in ["config.json", TOKENIZER_FILE, HF_TOKENIZER_FILE] {
            let path = from.join(file);
            if file == "config.json" || path.exists() {
                std::fs::copy(&path, tmp.join(file)).map_err(|e| Error::data(&path, format!("cannot copy: {e}")))?;
            }
        }
        durable::publish(&tmp, to)?;
        Ok(written)
    });
    let written = published.inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&tmp);
    })?;
    Ok(written.iter().map(|p| to.join(p.file_name().expect("a file"))).collect())
}

/// Fails unless `files` in `dir` hold every tensor of the model `dir/config.json` describes, each of its shape: an
/// export must load.
fn check_model_files(dir: &Path, files: &TensorFiles) -> Result<()> {
    let (config, vocab) = ModelConfig::from_hf_dir(dir)?;
    let spec = ModelSpec::new(&config, vocab);
    spec.check_size(1)?;
    for t in hf::tensors(&spec, &spec.params()) {
        let name = hf_name(files, &t)
            .ok_or_else(|| Error::data(dir, format!("no tensor {} in {}", t.name, files.describe())))?;
        let shape = files.shape(name).expect("found above");
        if shape != t.shape {
            let path = files.path_of(name).unwrap_or(dir);
            let message =
                format!("tensor {name} is {shape:?}; {} says {:?}", dir.join("config.json").display(), t.shape);
            return Err(Error::data(path, message));
        }
    }
    Ok(())
}

/// The configuration a checkpoint was trained with (from `state.json`), with `overrides` applied, and without the
/// `model.init` its run started from (see [`Config::from_saved`]).
pub fn config(dir: &Path, overrides: &[String]) -> Result<Config> {
    let (state, state_path) = read_state(dir)?;
    let text = json_field(&state, "config", &state_path)?
        .as_str()
        .ok_or_else(|| Error::data(&state_path, "\"config\" is not a string"))?;
    Config::from_saved(text, &state_path.display().to_string(), overrides)
}

fn read_state(dir: &Path) -> Result<(serde_json::Value, PathBuf)> {
    let path = dir.join("state.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::data(&path, format!("cannot read: {e}")))?;
    let state = serde_json::from_slice(&bytes).map_err(|e| Error::data(&path, format!("not valid JSON: {e}")))?;
    Ok((state, path))
}

/// Where the run of the checkpoint in `dir` stood, read without its tensors.
pub fn progress(dir: &Path) -> Result<Progress> {
    let (state, state_path) = read_state(dir)?;
    Progress::deserialize(&state).map_err(|e| Error::data(&state_path, e.to_string()))
}

/// Loads the checkpoint in `dir`, for `model`, and returns where its run stood: hands the weights and then AdamW's
/// moments to `restore(source, elements, values)` one parameter tensor at a time. Every tensor's presence and shape is
/// checked, and a mismatch names the tensor and the file.
pub fn load<B: Backend + ?Sized>(
    dir: &Path,
    model: &Model,
    backend: &mut B,
    restore: &mut Restore<B>,
) -> Result<Progress> {
    let found = progress(dir)?;
    load_weights(dir, model, backend, &mut |b, range, values| restore(b, Source::Params, range, values))?;
    let files = TensorFiles::open(dir, "optimizer")?;
    for source in [Source::M, Source::V] {
        for p in &model.layout {
            let name = moment_name(source, &p.name);
            let path = dir.join("optimizer.safetensors");
            let (shape, values) = files.read(&name)?.ok_or_else(|| {
                Error::data(&path, format!("no tensor {name} (a checkpoint of another model, or of an older kiln?)"))
            })?;
            if shape != p.shape {
                return Err(Error::data(
                    &path,
                    format!("tensor {name} is {shape:?}; this model's {} is {:?}", p.name, p.shape),
                ));
            }
            restore(backend, source, p.offset..p.offset + p.len(), &values)?;
        }
    }
    Ok(found)
}
