"""Checks that a kiln checkpoint is a Hugging Face model: loads it with transformers' AutoModelForCausalLM (the class
its config.json names: GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, SmolLM3ForCausalLM,
MistralForCausalLM, MixtralForCausalLM, Qwen3MoeForCausalLM)
and prints the mean cross-entropy over a prepared dataset's validation shard, in the consecutive windows
`kiln eval` uses, to compare with `kiln eval --checkpoint DIR --data DATA`.

    python3 scripts/reference/hf_check.py --model CHECKPOINT_OR_EXPORT_DIR --data PREPARED_DIR --block-size 64
"""

import argparse
import json
import os

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def shard_tokens(path):
    raw = open(path, "rb").read()
    magic, version, count = np.frombuffer(raw[:12], dtype=np.int32)
    dtype = np.uint16 if magic == 20240520 else np.uint32
    tokens = np.frombuffer(raw[1024:], dtype=dtype).astype(np.int64)
    assert len(tokens) == count, f"{path}: header says {count} tokens, file holds {len(tokens)}"
    return tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--block-size", type=int, required=True)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    print(f"{type(model).__name__} from {args.model}")
    meta = json.load(open(os.path.join(args.data, "meta.json")))
    T, total, count = args.block_size, 0.0, 0
    for name in meta["val"]:
        tokens = shard_tokens(os.path.join(args.data, name))
        windows = (len(tokens) - 1) // T
        x = torch.tensor(np.stack([tokens[i * T:i * T + T] for i in range(windows)]))
        y = torch.tensor(np.stack([tokens[i * T + 1:i * T + T + 1] for i in range(windows)]))
        with torch.no_grad():
            for i in range(0, windows, args.batch):
                logits = model(x[i:i + args.batch]).logits
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), y[i:i + args.batch].reshape(-1), reduction="sum").item()
        count += windows * T
    print(f"transformers val loss {total / count:.4f} over {count} tokens")


if __name__ == "__main__":
    main()
