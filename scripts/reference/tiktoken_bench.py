"""tiktoken's Python package on the same work as `kiln prepare` (GPT-2 BPE, ~1 MiB pieces cut after a newline, 2
threads), for the comparison in docs/benchmarks.md. tiktoken downloads its BPE file on first use; this loads the
copy that the tiktoken-rs crate ships instead, so it runs offline:

    python3 scripts/reference/tiktoken_bench.py ~/.cargo/registry/src/*/tiktoken-rs-0.12.1/assets/r50k_base.tiktoken FILE
"""
import time, sys, tiktoken
from tiktoken.load import load_tiktoken_bpe
ranks = load_tiktoken_bpe(sys.argv[1])
pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
enc = tiktoken.Encoding("r50k_local", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
text = open(sys.argv[2], encoding="utf-8").read()
# The same work split kiln makes: ~1 MiB pieces cut after a newline, tokenised on 2 threads.
pieces, start = [], 0
while start < len(text):
    end = min(len(text), start + (1 << 20))
    nl = text.rfind("\n", start, end) if end < len(text) else end
    end = nl + 1 if end < len(text) and nl > start else end
    pieces.append(text[start:end]); start = end
t = time.perf_counter()
out = enc.encode_ordinary_batch(pieces, num_threads=2)
s = time.perf_counter() - t
n = sum(len(o) for o in out)
print(f"tiktoken {tiktoken.__version__}, 2 threads: {len(text.encode())/1e6/s:.1f} MB/s, {n/s:.0f} tokens/s, {n} tokens, {s:.2f} s")
