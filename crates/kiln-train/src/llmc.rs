//! Weights in llm.c's model file format (`gpt2_124M.bin`, written by its train_gpt2.py).
//!
//! A header of 256 int32 — magic 20240326, version 3 (fp32 weights) or 5 (bf16), then max_seq_len, vocab_size,
//! num_layers, num_heads, channels, padded_vocab_size — followed by every parameter, grouped by kind across the
//! layers: wte (Vp×C), wpe (T×C), then for all layers ln1w, ln1b, qkvw (3C×C), qkvb, attprojw (C×C), attprojb,
//! ln2w, ln2b, fcw (4C×C), fcb, fcprojw (C×4C), fcprojb, and finally lnfw, lnfb. Linear weights are stored
//! (out, in), as kiln stores them.

use crate::checkpoint::Put;
use kiln_core::{Backend, Error, Result};
use kiln_model::{Model, ModelSpec};
use std::path::Path;

const MAGIC: i32 = 20240326;

/// The per-layer tensors in llm.c's order, by kiln's names.
const LAYER_KINDS: [&str; 12] = [
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
];

/// Loads an llm.c model file for `model`, checking every size against the model's, and hands the weights to `put`.
pub fn load<B: Backend + ?Sized>(path: &Path, model: &Model, backend: &mut B, put: &mut Put<B>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::data(path, format!("cannot read: {e}")))?;
    if bytes.len() < 1024 {
        return Err(Error::data(path, "too short for llm.c's 1024-byte header"));
    }
    let header: Vec<i32> =
        bytes[..1024].chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
    if header[0] != MAGIC {
        return Err(Error::data(
            path,
            format!("wrong magic number {}: not an llm.c model file (expected {MAGIC})", header[0]),
        ));
    }
    let bf16 = match header[1] {
        3 => false,
        5 => true,
        v => return Err(Error::data(path, format!("unsupported llm.c model version {v} (3: fp32, 5: bf16)"))),
    };
    let s = model.spec;
    if s != ModelSpec::gpt2(s.n_layer, s.n_head, s.n_embd, s.block_size, s.vocab) {
        return Err(Error::Usage(format!(
            "{}: llm.c's model files hold GPT-2, and this model is another ({:?}, {} key/value heads, MLP width {}, \
             {} LM head, norm ε {})",
            path.display(),
            s.arch,
            s.n_kv_head,
            s.ffn_dim,
            if s.tie_embeddings { "tied" } else { "untied" },
            s.norm_eps
        )));
    }
    let (max_t, vocab, layers, heads, c, padded) = (
        header[2] as usize,
        header[3] as usize,
        header[4] as usize,
        header[5] as usize,
        header[6] as usize,
        header[7] as usize,
    );
    for (what, file, ours) in [
        ("max_seq_len", max_t, s.block_size),
        ("vocab_size", vocab, s.vocab),
        ("num_layers", layers, s.n_layer),
        ("num_heads", heads, s.n_head),
        ("channels", c, s.n_embd),
    ] {
        if file != ours {
            return Err(Error::data(path, format!("{what} is {file}, the model's is {ours}")));
        }
    }
    if padded < vocab {
        return Err(Error::data(path, format!("padded_vocab_size {padded} is below vocab_size {vocab}")));
    }
    let width = if bf16 { 2 } else { 4 };
    let lens = |name: &str| model.layout.iter().find(|p| p.name == name).map(|p| p.len()).expect("a kiln parameter");
    let per_layer: usize = LAYER_KINDS.iter().map(|k| lens(&format!("h.0.{k}"))).sum();
    let want = padded * c + max_t * c + layers * per_layer + 2 * c;
    let held = (bytes.len() - 1024) / width;
    if held != want {
        return Err(Error::data(path, format!("holds {held} values; a model of this shape has {want}")));
    }
    let value = |i: usize| -> f32 {
        let at = 1024 + i * width;
        if bf16 {
            f32::from_bits((u16::from_le_bytes([bytes[at], bytes[at + 1]]) as u32) << 16)
        } else {
            f32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
        }
    };
    let len = model.units.last().map_or(0, |u| u.end);
    let mut params = vec![0.0f32; len];
    let mut next = 0usize;
    let mut take = |name: &str, len: usize, used: usize, params: &mut Vec<f32>| {
        let p = model.layout.iter().find(|p| p.name == name).expect("a kiln parameter");
        for i in 0..used {
            params[p.offset + i] = value(next + i);
        }
        next += len;
    };
    take("wte", padded * c, vocab * c, &mut params);
    take("wpe", max_t * c, max_t * c, &mut params);
    for kind in LAYER_KINDS {
        for l in 0..layers {
            let name = format!("h.{l}.{kind}");
            let len = lens(&name);
            take(&name, len, len, &mut params);
        }
    }
    take("ln_f.weight", c, c, &mut params);
    take("ln_f.bias", c, c, &mut params);
    put(backend, 0..len, &params)
}
