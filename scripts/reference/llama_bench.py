"""PyTorch reference for `kiln bench train --config configs/llama-3.2-1b.toml`: transformers' LlamaForCausalLM built
from a LlamaConfig of Llama 3.2 1B's shape (random weights: nothing is downloaded), SDPA attention, uniform random
tokens of Llama 3's vocabulary, trained with torch.compile, bf16 autocast and fused AdamW (train_bench.py), at
kiln's batch: 8 sequences of 2048 tokens, one micro-batch a step.

On the GPU machine, from the repository root:

    python3 scripts/reference/llama_bench.py           # Llama 3.2 1B's shape, batch 8 x 2048, bf16, compiled

Smoke test on a CPU:

    python3 scripts/reference/llama_bench.py --device cpu --no-compile --n-layer 1 --n-embd 64 --n-head 4 \\
        --n-kv-head 2 --ffn-dim 96 --vocab 512 --block-size 32 --batch 2 --steps 3 --warmup 1

The last line is one JSON object: tokens_per_s, step_ms (median), peak_memory_bytes (GPU only).
"""

import math

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import train_bench

# Llama 3.2's rotary scaling (its config.json's rope_scaling), as configs/llama-3.2-1b.toml gives it to kiln.
ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def llama3_frequencies(head_dim, theta):
    """The rotary frequencies under Llama 3's scaling, in float64: wavelengths shorter than original/high are kept,
    those longer than original/low divided by factor, those between interpolated."""
    s = ROPE_SCALING
    old, low, high = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    out = []
    for i in range(head_dim // 2):
        freq = theta ** (-2 * i / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            out.append(freq)
        elif wavelength > old / low:
            out.append(freq / s["factor"])
        else:
            smooth = (old / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / s["factor"] + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def check_model(model, args):
    """That transformers built the model kiln trains: SDPA attention and Llama 3's scaled rotary frequencies. Both
    are read back from the model, since LlamaConfig's keyword arguments have changed between versions."""
    attention = model.config._attn_implementation
    if attention != "sdpa":
        raise SystemExit(f"attention implementation {attention!r}, not sdpa")
    found = [b for name, b in model.named_buffers() if name.endswith("inv_freq")]
    want = llama3_frequencies(args.n_embd // args.n_head, args.rope_theta)
    if not found or not all(torch.allclose(f.double().cpu(), want, rtol=1e-5, atol=0) for f in found):
        raise SystemExit(f"the model's rotary frequencies are not Llama 3's scaled ones: {found[:1]}")


def main():
    p = train_bench.parser(__doc__)
    p.add_argument("--n-layer", type=int, default=16)
    p.add_argument("--n-head", type=int, default=32)
    p.add_argument("--n-kv-head", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=2048)
    p.add_argument("--ffn-dim", type=int, default=8192)
    p.add_argument("--rope-theta", type=float, default=500000.0)
    train_bench.add_run_options(p, batch=8, block_size=2048, vocab=128256)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.n_embd,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layer,
        num_attention_heads=args.n_head,
        num_key_value_heads=args.n_kv_head,
        max_position_embeddings=131072,  # Llama 3.2's; only the rotary scaling reads it
        rms_norm_eps=1e-5,
        rope_theta=args.rope_theta,
        rope_scaling=ROPE_SCALING,
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    # Built on the device it trains on: the 1.2B weights are not initialised on the host and then copied.
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    model.train()
    check_model(model, args)

    def loss_of(inputs, targets):
        # Every position predicts the next token, as kiln's loss counts them (autocast computes it in fp32).
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    train_bench.run(args, model, loss_of, versions={"transformers": transformers.__version__})


if __name__ == "__main__":
    main()
