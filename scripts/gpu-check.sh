#!/usr/bin/env bash
# The one script run on a lent GPU machine (see ../shared/GPU.md): build kiln here with `cargo build --release`,
# then run it there through the device tool with carry ["target/release/kiln"] and this command:
#     bash scripts/gpu-check.sh
# Each step's full log goes to $OUT (or ./gpu-check-out when OUT is unset); a short table comes last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
mkdir -p "$out"
kiln=./target/release/kiln
# Outside $OUT: only 8 files come back from it, and the logs are what matter.
export KILN_CACHE_DIR=/tmp/kiln-kernel-cache
results=()

# step NAME TIMEOUT_S COMMAND...: runs it with its output in $out/NAME.log and records PASS/FAIL and seconds.
step() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$out/$name.log"
  results+=("$(printf '%-22s %-4s %4ss  exit %s' "$name" "$([ $rc = 0 ] && echo PASS || echo FAIL)" $((SECONDS - start)) $rc)")
}

step info 60 "$kiln" info
step kernels 300 "$kiln" kernels build
step selftest 300 "$kiln" selftest --backend cuda
step quickstart-bf16 300 "$kiln" train --backend cuda --set "train.out_dir=$out/quickstart"
# Exact resume on the GPU: six steps straight, against three steps then a resume from the step-3 checkpoint.
resume_check() {
  local run=(--backend cuda --set train.max_steps=6 --set train.checkpoint_every=3 --set train.eval_steps=1 --set train.log_every=1)
  rm -rf /tmp/kiln-resume && "$kiln" train "${run[@]}" --set train.out_dir=/tmp/kiln-resume/a &&
    "$kiln" train "${run[@]}" --set train.out_dir=/tmp/kiln-resume/b --resume /tmp/kiln-resume/a/checkpoints/step_00000003 &&
    python3 - <<'PY'
import json
loss = lambda d: {j["step"]: j["loss"] for j in map(json.loads, open(f"/tmp/kiln-resume/{d}/metrics.jsonl"))}
a, b = loss("a"), loss("b")
same = all(a[s] == b[s] for s in (4, 5, 6))
print("straight:", [a[s] for s in (4, 5, 6)], "resumed:", [b[s] for s in (4, 5, 6)], "bit-identical" if same else "DIFFERENT")
raise SystemExit(0 if same else 1)
PY
}
# `timeout` runs commands, not shell functions: hand it a bash that has the function.
export kiln
export -f resume_check
step resume-exact 300 bash -c resume_check
step bench-kiln 300 "$kiln" bench train --backend cuda --steps 10 --warmup 2
step bench-pytorch 400 python3 scripts/reference/gpt2_bench.py --steps 10 --warmup 3

echo
echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
grep -h "exact match" "$out/quickstart-bf16.log" 2>/dev/null
grep -hE "^[0-9]+ passed, [0-9]+ failed" "$out/selftest.log" 2>/dev/null
# GPT-2 124M, B=32, T=1024, bf16, tokens/s. Anchors measured on an H100 (see docs/benchmarks.md): llm.c without
# cuDNN 283,000; PyTorch torch.compile 478,000.
k=$(tail -n 1 "$out/bench-kiln.log" 2>/dev/null | sed -n 's/.*"tokens_per_s":\([0-9.]*\).*/\1/p')
t=$(tail -n 1 "$out/bench-pytorch.log" 2>/dev/null | sed -n 's/.*"tokens_per_s": \([0-9.]*\).*/\1/p')
echo "gpt2-124m tokens/s: kiln ${k:-?}, pytorch ${t:-?}, anchors llm.c 283000 / torch.compile 478000"
[ -n "$k" ] && [ -n "$t" ] && awk -v k="$k" -v t="$t" 'BEGIN { printf "kiln / pytorch: %.2f\n", k / t }'
printf '%s\n' "${results[@]}"
