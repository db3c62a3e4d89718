"""What the PyTorch references for `kiln bench train` share: the command-line options of a run, and the timed
training steps (uniform random tokens, bf16 autocast over fp32 weights, fused AdamW with decay on the matrices,
gradient clipping, torch.compile), printed as `kiln bench train` prints them: a line for people, then one JSON
object with tokens_per_s, step_ms (median) and peak_memory_bytes (GPU only).
"""

import argparse
import json
import statistics
import time

import torch


def parser(doc):
    """An argument parser described by the first line of a script's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def add_run_options(p, batch, block_size, vocab):
    """The options every reference takes, with its model's defaults for the shapes."""
    p.add_argument("--device", default="cuda")
    p.add_argument("--block-size", type=int, default=block_size)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=1337)


def run(args, model, loss_of, versions=None):
    """Trains `model` for args.warmup then args.steps steps, timing the latter. `loss_of(inputs, targets)` is the
    mean cross-entropy of a batch; it is what torch.compile compiles. `versions` names libraries beside torch in the
    result."""
    cuda = args.device.startswith("cuda")
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda,
    )
    step_loss = loss_of if args.no_compile else torch.compile(loss_of)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def step():
        x = torch.randint(args.vocab, (args.batch, args.block_size + 1), generator=gen).to(args.device)
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
            loss = step_loss(x[:, :-1], x[:, 1:])
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
        **(versions or {}),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(args.batch * args.block_size / step_s, 1),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    print(f"median step {step_s * 1e3:.2f} ms, {result['tokens_per_s']:.0f} tokens/s")
    print(json.dumps(result))
