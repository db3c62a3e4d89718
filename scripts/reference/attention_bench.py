"""PyTorch reference for `kiln bench attention --suite`: the same five shapes (bf16, B·H·T·D, causal or not)
through scaled_dot_product_attention, once with the FlashAttention-2 backend and once with cuDNN's, so that kiln's
fused kernel can be compared with both on the card at hand.

On the GPU machine, from the repository root:

    python3 scripts/reference/attention_bench.py

FLOP convention (FlashAttention papers): forward = 4·B·H·T²·D, halved when causal; forward+backward = 3.5 × that.
Times are medians of --reps runs after --warmup, each timed with CUDA events. One JSON object per shape and backend.
"""

import argparse
import json
import statistics

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

# (B, H, T, D, causal): the suite of kiln's `bench attention` (crates/kiln-cli/src/attention_bench.rs).
SUITE = [
    (32, 12, 1024, 64, True),
    (16, 32, 2048, 64, True),
    (8, 16, 4096, 128, True),
    (8, 16, 4096, 128, False),
    (2, 16, 16384, 128, True),
]
BACKENDS = {"flash2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def median_ms(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for b, h, t, d, causal in SUITE:
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16)
        flop = 4 * b * h * t * t * d / (2 if causal else 1)
        shape = f"B{b} H{h} T{t} D{d}" + (" causal" if causal else "")
        for name, backend in BACKENDS.items():
            with sdpa_kernel(backend):
                forward = lambda: scaled_dot_product_attention(q, k, v, is_causal=causal)
                forward_backward = lambda: torch.autograd.grad(forward(), (q, k, v), grad)
                fwd, fwd_bwd = median_ms(forward, args.reps, args.warmup), median_ms(forward_backward, args.reps, args.warmup)
            row = {"shape": shape, "backend": name, "forward_ms": fwd, "forward_tflops": flop / fwd / 1e9,
                   "forward_backward_ms": fwd_bwd, "forward_backward_tflops": 3.5 * flop / fwd_bwd / 1e9}
            print(f"{shape:28s} {name:7s} forward {row['forward_tflops']:6.1f} TFLOP/s | "
                  f"forward+backward {row['forward_backward_tflops']:6.1f} TFLOP/s")
            print(json.dumps(row))


if __name__ == "__main__":
    main()
