"""Golden files for kiln's Llama-style support, made with Hugging Face transformers.

Builds tiny LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, SmolLM3ForCausalLM, MistralForCausalLM,
MixtralForCausalLM and Qwen3MoeForCausalLM models (fp32, CPU, eager attention), saves each one as a Hugging Face
checkpoint directory, and next to it `golden.safetensors` with a fixed batch and what transformers computes for it:

    input_ids  int64 [B, T]       random token ids
    targets    int64 [B, T]       random next-token targets
    logits     f32   [B, T, V]    the model's logits for input_ids (eval mode)
    loss       f32   [1]          mean cross-entropy of logits against targets over all B·T positions
    aux_loss   f32   [1]          with output_router_logits, the load-balancing loss (before its coefficient)
    grad.<name> f32               d (loss + router_aux_loss_coef · aux_loss) / d parameter, for every tensor of the
                                  checkpoint (a mixture's experts as the checkpoint stores them, one by one)

The cases cover the checkpoint variants kiln has to read: tied embeddings with the legacy transformers-4 config keys
(rope_theta, rope_scaling); untied bf16 weights with the transformers-5 `rope_parameters`; Llama-3 RoPE scaling in a
sharded checkpoint; Llama with biases on every linear layer (attention_bias, mlp_bias); Qwen2, whose query/key/value
projections alone have biases; Qwen3, with QK-norm and heads wider than hidden_size / num_attention_heads
(and attention_bias on); SmolLM3, whose second layer has no rotary embedding (NoPE); Mistral without a
sliding window; Mistral and Qwen2 with sliding windows shorter than the batch; and mixtures of experts: Mixtral
(weights normalised, trained with its load-balancing loss) and Qwen3-MoE (weights not normalised, experts as wide as
moe_intermediate_size, which differs from intermediate_size). Rust tests in crates/kiln-train/tests/ load these
files.

Needs torch, transformers and safetensors (CPU is enough). From the repository root:

    python3 -m pip install torch transformers safetensors
    python3 scripts/reference/llama_golden.py [--out crates/kiln-train/tests/golden]

It is deterministic: running it again rewrites the same files (for the same torch and transformers versions).
"""

import argparse
import json
import math
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

B, T = 2, 9
VOCAB = 67

# Shared by every case. head_dim = 48 / 4 = 12, and 4 query heads share 2 key/value heads (GQA).
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    # Much larger than a real model's 0.02, so that logits (std ~1) and gradients are far from trivial and a
    # wrong op shows up as a large error rather than hiding under tiny values.
    initializer_range=0.2,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)

LLAMA3_SCALING = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)

CASES = {
    "tied_theta1e4": dict(seed=1, tie=True, rope=dict(rope_type="default", rope_theta=10000.0)),
    "untied_theta5e5_bf16": dict(seed=2, tie=False, rope=dict(rope_type="default", rope_theta=500000.0), bf16=True),
    "llama3_scaling_sharded": dict(seed=3, tie=False, rope=LLAMA3_SCALING, shard="80KB"),
    "biases_untied": dict(seed=4, tie=False, rope=dict(rope_type="default", rope_theta=10000.0), biases=True),
    "qwen2_tied": dict(seed=5, tie=True, rope=dict(rope_type="default", rope_theta=1000000.0), family="qwen2"),
    "mistral_untied": dict(seed=6, tie=False, rope=dict(rope_type="default", rope_theta=1000000.0), family="mistral"),
    "qwen3_tied": dict(seed=7, tie=True, rope=dict(rope_type="default", rope_theta=1000000.0), family="qwen3"),
    "smollm3_untied": dict(seed=8, tie=False, rope=dict(rope_type="default", rope_theta=2000000.0), family="smollm3"),
    # Sliding windows shorter than the batch's 9 positions, over every layer.
    "mistral_window_untied": dict(
        seed=9, tie=False, rope=dict(rope_type="default", rope_theta=10000.0), family="mistral", window=4
    ),
    "qwen2_window_tied": dict(
        seed=10, tie=True, rope=dict(rope_type="default", rope_theta=1000000.0), family="qwen2", window=3
    ),
    # Four experts, two a token.
    "mixtral_untied": dict(seed=11, tie=False, rope=dict(rope_type="default", rope_theta=1000000.0), family="mixtral"),
    "qwen3_moe_tied": dict(seed=13, tie=True, rope=dict(rope_type="default", rope_theta=10000.0), family="qwen3_moe"),
}

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
}

# Mixtral's load-balancing coefficient: far above its default 0.001, so that a wrong gradient of that loss shows.
MIXTRAL_AUX = 0.05


def family(case):
    return FAMILIES[case.get("family", "llama")]


def check_llama3_bands(rope, head_dim):
    # The Llama-3 rule sorts RoPE frequencies into three bands by wavelength: shorter than
    # original_max / high_freq_factor stay as they are, longer than original_max / low_freq_factor are divided
    # by `factor`, and those in between are interpolated. The case is only useful if it has all three.
    # theta 5e5, head_dim 12: wavelengths 6.3 (high), 56 (medium), 499, 4443, ... (low); the bands are 16 and 64.
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    wavelen = 2 * math.pi / inv_freq
    old = rope["original_max_position_embeddings"]
    high = (wavelen < old / rope["high_freq_factor"]).sum().item()
    low = (wavelen > old / rope["low_freq_factor"]).sum().item()
    medium = len(wavelen) - high - low
    assert high >= 1 and medium >= 1 and low >= 1, (high, medium, low)
    return high, medium, low


def build(case):
    config_class, model_class = family(case)
    base = dict(BASE)
    if case.get("family") == "qwen2":
        # Qwen2 has biases on q, k and v whatever the config says, and no keys for them. Its sliding window, where
        # the case has one, covers the layers from max_window_layers on: all of them.
        del base["attention_bias"], base["mlp_bias"]
        if case.get("window"):
            base.update(use_sliding_window=True, sliding_window=case["window"], max_window_layers=0)
    elif case.get("family") == "mistral":
        # Mistral has no biases and no keys for them; its sliding window (4096 unless told) is the case's, or turned
        # off, as in Mistral 7B v0.2 and later.
        del base["attention_bias"], base["mlp_bias"]
        base["sliding_window"] = case.get("window")
    elif case.get("family") == "qwen3":
        # Qwen3's QK-norm, with heads of 16 over a hidden size of 48 (attention 64 wide), and its attention_bias on,
        # so that the biases are added before the heads are normalised. It has no mlp_bias.
        del base["mlp_bias"]
        base.update(head_dim=16, attention_bias=True)
    elif case.get("family") == "mixtral":
        # No biases and no keys for them; trained with the load-balancing loss.
        del base["attention_bias"], base["mlp_bias"]
        base.update(
            num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=MIXTRAL_AUX
        )
    elif case.get("family") == "qwen3_moe":
        # Qwen3's QK-norm and wide heads; experts moe_intermediate_size (80) wide, where intermediate_size (which
        # only MLP-only layers would use) is not; weights not normalised (norm_topk_prob).
        del base["mlp_bias"]
        base.update(
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            intermediate_size=56,
            moe_intermediate_size=80,
        )
    elif case.get("family") == "smollm3":
        # Every second layer without a rotary embedding: of two, the second (no_rope_layers [1, 0]).
        base.update(no_rope_layer_interval=2)
    elif case.get("biases"):
        base.update(attention_bias=True, mlp_bias=True)
    config = config_class(
        **base,
        tie_word_embeddings=case["tie"],
        rope_parameters=dict(case["rope"]),
        attn_implementation="eager",
    )
    torch.manual_seed(case["seed"])
    model = model_class(config)
    # transformers starts every RMSNorm weight at 1 and every bias at 0, which would let a norm that ignores its
    # weight, or a bias left out, pass. Spread them instead.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    if case.get("bf16"):
        # Round every weight to bf16 so that the bf16 checkpoint holds exactly the weights the goldens used.
        # Parameters only: model.to(bfloat16) would also round the RoPE inv_freq buffer, which a reloaded
        # model recomputes in fp32.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).float())
    return model.eval()


def checkpoint_tensors(name, value, mixtral):
    """(name, value) as the checkpoint stores the parameter `name` of named_parameters(): transformers 5 holds a
    mixture's experts stacked (gate_up_proj [E, 2I, C], down_proj [E, C, I]) and saves them one by one."""
    layer, _, rest = name.partition(".mlp.")
    if rest not in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
        return [(name, value)]
    module, (gate, up, down) = ("block_sparse_moe", ("w1", "w3", "w2")) if mixtral else ("mlp", PROJECTIONS)
    if rest == "gate.weight":
        return [(f"{layer}.{module}.gate.weight", value)]
    if rest == "experts.down_proj":
        return [(f"{layer}.{module}.experts.{e}.{down}.weight", m) for e, m in enumerate(value)]
    half = value.shape[1] // 2
    return [
        (f"{layer}.{module}.experts.{e}.{which}.weight", part)
        for e, m in enumerate(value)
        for which, part in ((gate, m[:half]), (up, m[half:]))
    ]


PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def golden(model, seed):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    targets = torch.randint(0, VOCAB, (B, T), generator=gen)
    model.zero_grad(set_to_none=True)
    output = model(input_ids=input_ids)
    logits = output.logits.float()
    # Our own cross-entropy on the logits, not the model's `labels=` loss, which would shift the targets by one.
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    out = {
        "input_ids": input_ids,
        "targets": targets,
        "logits": logits.detach(),
        "loss": loss.detach().reshape(1),
    }
    objective = loss
    if getattr(model.config, "output_router_logits", False):
        # The load-balancing loss over every layer's routing, which transformers adds to `labels=`'s loss.
        objective = loss + model.config.router_aux_loss_coef * output.aux_loss
        out["aux_loss"] = output.aux_loss.detach().float().reshape(1)
    objective.backward()
    # named_parameters() lists a tied tensor once (as model.embed_tokens.weight); its .grad is the sum over both uses.
    mixtral = isinstance(model, MixtralForCausalLM)
    for name, p in model.named_parameters():
        for stored, grad in checkpoint_tensors(name, p.grad.detach().float(), mixtral):
            out[f"grad.{stored}"] = grad
    return {k: v.contiguous() for k, v in out.items()}


def to_legacy_config(path):
    # transformers 5 writes `rope_parameters` and `dtype`; checkpoints made with transformers 4 have rope_theta
    # and rope_scaling at the top level and `torch_dtype` instead. This case keeps the old spelling so kiln is
    # tested on both.
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    assert rope == {"rope_type": "default", "rope_theta": 10000.0}, rope
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def run_case(name, case, root):
    out_dir = os.path.join(root, name)
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):  # no stale shards from an earlier run
        os.remove(os.path.join(out_dir, f))

    model = build(case)
    if case["rope"]["rope_type"] == "llama3":
        bands = check_llama3_bands(case["rope"], model.config.head_dim)
        print(f"{name}: llama3 rope bands high/medium/low = {bands}")
    g = golden(model, case["seed"])

    save_model = model.to(torch.bfloat16) if case.get("bf16") else model
    save_model.save_pretrained(out_dir, max_shard_size=case.get("shard", "50GB"))
    if name == "tied_theta1e4":
        to_legacy_config(os.path.join(out_dir, "config.json"))
    save_file(g, os.path.join(out_dir, "golden.safetensors"))

    # Reload what we wrote, the way a user would, and check it reproduces the goldens.
    model_class = family(case)[1]
    reloaded = model_class.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters == case["rope"], reloaded.config.rope_parameters
    assert reloaded.config.tie_word_embeddings == case["tie"]
    g2 = load_file(os.path.join(out_dir, "golden.safetensors"))
    with torch.no_grad():
        logits = reloaded(input_ids=g2["input_ids"]).logits.float()
    err = (logits - g2["logits"]).abs().max().item()
    assert err <= 1e-6, f"{name}: reloaded logits differ by {err}"
    if case.get("window"):
        # The window must matter: without it, the same weights give other logits.
        unwindowed = build(dict(case, window=None))
        unwindowed.load_state_dict(model.state_dict())
        with torch.no_grad():
            change = (unwindowed(input_ids=g2["input_ids"]).logits.float() - g2["logits"]).abs().max().item()
        assert change > 1e-2, f"{name}: the sliding window changes the logits by {change} only"
        print(f"{name}: without its sliding window the logits differ by {change:.3f}")
    if case.get("family") in ("mixtral", "qwen3_moe"):
        # Every gradient names a tensor of the checkpoint, and every weight of it has one (a tied head excepted).
        with safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as f:
            stored = set(f.keys()) - ({"lm_head.weight"} if case["tie"] else set())
        assert stored == {k[len("grad.") :] for k in g if k.startswith("grad.")}, name
        # Every expert of every layer gets tokens, so that every expert's gradient is checked.
        idle = [k for k, v in g.items() if ".experts." in k and v.abs().max() == 0]
        assert not idle, f"{name}: experts without tokens: {idle}"
    if case.get("family") == "mixtral":
        # The balancing loss must matter: without it, the routers' gradients differ.
        plain = build(case)
        plain.config.output_router_logits = False
        plain.load_state_dict(model.state_dict())
        g_plain = golden(plain, case["seed"])
        change = max((g[k] - g_plain[k]).abs().max().item() for k in g if k.endswith(".gate.weight"))
        assert change > 1e-3, f"{name}: the balancing loss changes the routers' gradients by {change} only"
        print(f"{name}: balancing loss {g['aux_loss'].item():.6f}; it changes the routers' gradients by {change:.4f}")
    if case.get("shard"):
        assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
        assert sum(f.endswith(".safetensors") and f.startswith("model-") for f in os.listdir(out_dir)) >= 2

    grads = [v for k, v in g.items() if k.startswith("grad.")]
    sizes = ", ".join(f"{f} {os.path.getsize(os.path.join(out_dir, f))}" for f in sorted(os.listdir(out_dir)))
    print(
        f"{name}: loss {g['loss'].item():.6f}  logits std {g['logits'].std().item():.4f}  "
        f"max |grad| {max(v.abs().max().item() for v in grads):.4g}  reload err {err:.1e}"
    )
    print(f"  files (bytes): {sizes}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="crates/kiln-train/tests/golden")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one thread: the same reduction order, so the same bits, on every run
    import transformers

    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name, case in CASES.items():
        run_case(name, case, args.out)


if __name__ == "__main__":
    main()
