"""PyTorch CPU reference for kiln's CPU training benchmark.

Trains a small character-level GPT-2 (nanoGPT-style architecture: learned
position embeddings, pre-LayerNorm blocks, causal self-attention, GELU(tanh)
MLP, LM head tied to the token embedding) on tiny Shakespeare with AdamW,
eager mode, on the CPU only. The model, data, optimizer and schedule match
kiln's CPU benchmark so that step time, tokens/s and validation loss are
directly comparable.

Run from the repository root:

    python3 scripts/reference/cpu_gpt.py --threads 2

Quick smoke test:

    python3 scripts/reference/cpu_gpt.py --steps 30 --eval-batches 5 --log-every 10

The last line has a fixed form for scripts to grep:

    RESULT torch=<version> threads=<n> median_step_ms=<x.xx> tokens_per_s=<int> val_loss=<x.xxxx> steps=<n>
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

VAL_SEED = 0  # fixed, so every evaluation sees the same validation windows


# ----------------------------------------------------------------------------- model

class SelfAttention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = SelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd):
        super().__init__()
        self.vocab_size = vocab_size
        padded_vocab = (vocab_size + 63) // 64 * 64
        self.wte = nn.Embedding(padded_vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.lm_head = nn.Linear(n_embd, padded_vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying

        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.startswith("ln") or ".ln_" in name:
                nn.init.ones_(p)  # LayerNorm weight
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
            else:
                nn.init.normal_(p, mean=0.0, std=0.02)  # Linear and Embedding weights

    def forward(self, idx, targets):
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        logits = logits[..., : self.vocab_size]  # padded entries never get probability
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1))


# ----------------------------------------------------------------------------- data

def get_batch(data, batch, block_size, gen):
    ix = torch.randint(len(data) - block_size, (batch,), generator=gen)
    w = data[ix[:, None] + torch.arange(block_size + 1)]  # windows of block_size+1 tokens
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model, val, args):
    model.eval()
    gen = torch.Generator().manual_seed(VAL_SEED)
    losses = [model(*get_batch(val, args.batch, args.block_size, gen)).item()
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def get_lr(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    span = args.steps - 1 - args.warmup
    ratio = (step - args.warmup) / span if span > 0 else 1.0  # 0 -> 1 at the last step
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


# ----------------------------------------------------------------------------- main

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/tinyshakespeare.txt")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--eps", type=float, default=1e-8)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-batches", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=0, help="0 = only at the end")
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # character-level data, first 90% train, last 10% val
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]

    model = GPT(len(chars), args.block_size, args.n_layer, args.n_head, args.n_embd)
    params = list(model.parameters())  # the tied weight appears once
    groups = [
        {"params": [q for q in params if q.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2),
                            eps=args.eps, fused=False)

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"vocab {len(chars)} (padded {model.wte.num_embeddings}), "
          f"params {sum(q.numel() for q in params):,}, train {len(train):,} / val {len(val):,} tokens")

    gen = torch.Generator().manual_seed(args.seed)
    step_times = []
    for step in range(args.steps):
        lr = get_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch(train, args.batch, args.block_size, gen)

        t0 = time.perf_counter()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        dt = time.perf_counter() - t0
        step_times.append(dt)

        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d} | loss {loss.item():.4f} | lr {lr:.2e} | {dt * 1000:.2f} ms")
        if args.eval_every > 0 and step > 0 and step % args.eval_every == 0:
            print(f"step {step:5d} | val_loss {evaluate(model, val, args):.4f}")

    val_loss = evaluate(model, val, args)
    timed = step_times[10:] if len(step_times) > 10 else step_times  # skip warm-up steps
    median, mean = statistics.median(timed), statistics.mean(timed)
    tokens = args.batch * args.block_size
    print(f"step time over {len(timed)} steps: median {median * 1000:.2f} ms, mean {mean * 1000:.2f} ms, "
          f"{tokens / median:.0f} tokens/s (median), {tokens / mean:.0f} tokens/s (mean)")
    print(f"RESULT torch={torch.__version__} threads={torch.get_num_threads()} "
          f"median_step_ms={median * 1000:.2f} tokens_per_s={int(tokens / median)} "
          f"val_loss={val_loss:.4f} steps={args.steps}")


if __name__ == "__main__":
    main()
