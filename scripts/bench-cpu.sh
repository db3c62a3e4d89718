#!/usr/bin/env bash
# The CPU training benchmark of docs/benchmarks.md: kiln and the PyTorch reference (scripts/reference/cpu_gpt.py)
# train the same 4-layer, 128-wide character-level GPT on Tiny Shakespeare, alternately, ROUNDS times each, so
# that both see the same machine conditions. Prints each run's median tokens/s.
#
#   scripts/bench-cpu.sh [DATA] [STEPS] [ROUNDS]     defaults: data/tinyshakespeare.txt 500 3 (README: where to get it)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data/tinyshakespeare.txt}
steps=${2:-500}
rounds=${3:-3}
cargo build --release --quiet
for round in $(seq "$rounds"); do
  kiln=$(./target/release/kiln train --config configs/shakespeare-char.toml --set "data.train=$data" \
    --set "train.max_steps=$steps" --set train.eval_steps=1 --set train.out_dir=/tmp/kiln-bench-cpu 2>&1 |
    sed -n 's/.*median \([0-9]*\) tokens\/s.*/\1/p')
  torch=$(python3 scripts/reference/cpu_gpt.py --data "$data" --steps "$steps" --eval-batches 1 2>/dev/null |
    sed -n 's/^RESULT.* tokens_per_s=\([0-9]*\).*/\1/p')
  echo "round $round: kiln $kiln tokens/s, pytorch $torch tokens/s"
done
