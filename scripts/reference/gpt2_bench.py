"""PyTorch reference for `kiln bench train`: the same GPT-2 (the model of cpu_gpt.py), the same shapes, uniform
random GPT-2-vocabulary tokens, trained with torch.compile, SDPA attention, bf16 autocast and fused AdamW.

On the GPU machine, from the repository root:

    python3 scripts/reference/gpt2_bench.py            # GPT-2 124M, batch 32 x 1024, bf16, compiled

Smoke test on a CPU:

    python3 scripts/reference/gpt2_bench.py --device cpu --no-compile --n-layer 1 --n-embd 64 --n-head 2 \\
        --block-size 32 --batch 2 --steps 3 --warmup 1

The last line is one JSON object: tokens_per_s, step_ms (median), peak_memory_bytes (GPU only).
"""

import torch

import train_bench
from cpu_gpt import GPT


def main():
    p = train_bench.parser(__doc__)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    train_bench.add_run_options(p, batch=32, block_size=1024, vocab=50257)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = GPT(args.vocab, args.block_size, args.n_layer, args.n_head, args.n_embd).to(args.device)
    train_bench.run(args, model, model)


if __name__ == "__main__":
    main()
