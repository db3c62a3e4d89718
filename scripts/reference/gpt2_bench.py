"""PyTorch reference for `kiln bench train`: the same GPT-2 (the model of cpu_gpt.py), the same shapes, uniform
random GPT-2-vocabulary tokens, trained with torch.compile, SDPA attention, bf16 autocast and fused AdamW.

On the GPU machine, from the repository root:

    python3 scripts/reference/gpt2_bench.py            # GPT-2 124M, batch 32 x 1024, bf16, compiled

Smoke test on a CPU:

    python3 scripts/reference/gpt2_bench.py --device cpu --no-compile --n-layer 1 --n-embd 64 --n-head 2 \\
        --block-size 32 --batch 2 --steps 3 --warmup 1

The last line is one JSON object: tokens_per_s, step_ms (median), peak_memory_bytes (GPU only).
"""

import argparse
import json
import statistics
import time

import torch

from cpu_gpt import GPT


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--block-size", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    cuda = args.device.startswith("cuda")
    model = GPT(args.vocab, args.block_size, args.n_layer, args.n_head, args.n_embd).to(args.device)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )
    step_model = model if args.no_compile else torch.compile(model)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def step():
        x = torch.randint(args.vocab, (args.batch, args.block_size + 1), generator=gen).to(args.device)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    result = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(args.batch * args.block_size / step_s, 1),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    print(f"median step {step_s * 1e3:.2f} ms, {result['tokens_per_s']:.0f} tokens/s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
