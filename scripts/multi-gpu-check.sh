#!/usr/bin/env bash
# Data-parallel checks for a machine with two or more NVIDIA GPUs. Builds nothing: it runs target/release/kiln
# (build it with `cargo build --release`) or else the `kiln` on PATH.
#
#     bash scripts/multi-gpu-check.sh
#
# 1. Equivalence: the built-in quickstart model trains a few steps with the same global batch on one GPU, on two,
#    on all of them, with ZeRO-1, and as one process per GPU (kiln launch). The losses of every step must match the
#    one-GPU run within a tolerance, and the final checkpoints' weights are compared too.
# 2. Scaling: GPT-2 124M (configs/bench-gpt2-124m.toml, B=32 × T=1024 per GPU, random tokens) on 1, 2, 4, 8 ...
#    GPUs, one process per GPU. `kiln bench train` drives a single GPU, so this uses `kiln train` for STEPS steps
#    and takes the median tokens/s of metrics.jsonl after the first SKIP steps. Efficiency = tok/s(N) / (N × tok/s(1)).
#    docs/scaling.md predicts these numbers; `python3 scripts/scaling_model.py --model 124m --step-ms MS --gpus N`
#    recomputes its prediction from the one-GPU step measured here.
#
# Settings (environment): OUT (logs; default ./multi-gpu-check-out), PRECISION for the equivalence runs (fp32, the
# sharper test, or bf16), TOL (largest |loss difference| accepted; default 1e-3 in fp32, 3e-2 in bf16), EQ_STEPS
# (40), STEPS (30) and SKIP (10) for the scaling runs, MICRO (32: lower it on GPUs with less than ~24 GB), ZERO
# (0 or 1 for the scaling runs), MODE (launch: one process per GPU; threads: one process, --gpus), PORT (29511).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${OUT:-multi-gpu-check-out}
mkdir -p "$out"
if [ -x target/release/kiln ]; then
  kiln=$PWD/target/release/kiln
elif command -v kiln > /dev/null; then
  kiln=$(command -v kiln)
else
  echo "no kiln: build it with 'cargo build --release' or put kiln on PATH" >&2
  exit 2
fi
ngpu=$( (nvidia-smi -L 2> /dev/null || true) | wc -l)
if [ "$ngpu" -lt 2 ]; then
  echo "this check needs at least 2 GPUs; nvidia-smi lists $ngpu" >&2
  exit 2
fi
export KILN_CACHE_DIR=${KILN_CACHE_DIR:-/tmp/kiln-kernel-cache}
precision=${PRECISION:-fp32}
if [ "$precision" = fp32 ]; then tol=${TOL:-1e-3}; else tol=${TOL:-3e-2}; fi
eq_steps=${EQ_STEPS:-40}
steps=${STEPS:-30}
skip=${SKIP:-10}
micro=${MICRO:-32}
zero=${ZERO:-0}
mode=${MODE:-launch}
port=${PORT:-29511}
results=()

# run NAME TIMEOUT_S COMMAND...: runs it with its output in $out/NAME.log; records PASS/FAIL, seconds and exit code.
# Returns the command's exit code, so callers can skip what depends on a failed run.
run() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS rc=0
  echo "== $name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1 || rc=$?
  tail -n 5 "$out/$name.log"
  results+=("$(printf '%-24s %-4s %4ss  exit %s' "$name" "$([ $rc = 0 ] && echo PASS || echo FAIL)" $((SECONDS - start)) $rc)")
  return $rc
}

# The next rendezvous port: each launch gets its own, so a socket of the previous one in TIME_WAIT is never in the way.
next_port() {
  port=$((port + 1))
}

{
  echo "kiln: $kiln"
  "$kiln" --version || true
  nvidia-smi -L
  nvidia-smi topo -m || true
} > "$out/machine.log" 2>&1
cat "$out/machine.log"

# ---- 1. Equivalence -------------------------------------------------------------------------------------------
# The quickstart model (2 layers, 128 wide, 13-token sums). The global batch is 16 × lcm(2, ngpu) sequences, so
# that 1, 2 and ngpu ranks all split it evenly (each rank accumulates the rest).
lcm=$ngpu
[ $((ngpu % 2)) = 0 ] || lcm=$((2 * ngpu))
eq=(--backend cuda
  --set train.micro_batch=16 --set "train.total_batch_tokens=$((16 * 13 * lcm))"
  --set "train.max_steps=$eq_steps" --set optim.warmup_steps=10
  --set train.eval_every=0 --set train.eval_steps=1 --set train.log_every=10
  --set "train.checkpoint_every=$eq_steps" --set "train.precision=$precision")
rm -rf "$out/eq" "$out"/compare-*.log

# compare REFERENCE CANDIDATE: every step's loss and the final checkpoint's weights (F32 safetensors, read here
# without numpy). Fails when a loss differs by more than $tol.
compare() {
  python3 - "$out/eq/$1" "$out/eq/$2" "$tol" "$eq_steps" << 'PY'
import array, json, struct, sys
ref, cand, tol, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])

def losses(d):
    return {j["step"]: j["loss"] for j in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in j}

def weights(d):
    with open(f"{d}/checkpoints/step_{steps:08d}/model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "F32":
            continue
        a, b = t["data_offsets"]
        out[name] = array.array("f", data[a:b])
    return out

a, b = losses(ref), losses(cand)
if sorted(a) != sorted(b) or len(a) != steps:
    print(f"steps differ: {len(a)} in {ref}, {len(b)} in {cand}")
    raise SystemExit(1)
worst = max(abs(a[s] - b[s]) for s in a)
wa, wb = weights(ref), weights(cand)
wdiff = max(max(abs(x - y) for x, y in zip(wa[k], wb[k])) for k in wa)
ok = worst <= tol
print(f"final loss {a[steps]:.6f} vs {b[steps]:.6f}; max |loss diff| over {steps} steps {worst:.2e} "
      f"(tolerance {tol:g}); max |weight diff| {wdiff:.2e}; {'OK' if ok else 'TOO FAR APART'}")
raise SystemExit(0 if ok else 1)
PY
}
export -f compare
export out tol eq_steps

eq_runs=()
if run eq-1gpu 600 "$kiln" train "${eq[@]}" --gpus 0 --set "train.out_dir=$out/eq/1gpu"; then
  run eq-2gpu 600 "$kiln" train "${eq[@]}" --gpus 0,1 --set "train.out_dir=$out/eq/2gpu" && eq_runs+=(2gpu)
  if [ "$ngpu" -gt 2 ]; then
    run eq-all 600 "$kiln" train "${eq[@]}" --gpus all --set "train.out_dir=$out/eq/all" && eq_runs+=(all)
  fi
  run eq-2gpu-zero1 600 "$kiln" train "${eq[@]}" --gpus 0,1 --set dist.zero=1 --set "train.out_dir=$out/eq/2gpu-zero1" &&
    eq_runs+=(2gpu-zero1)
  next_port
  run eq-2proc 600 "$kiln" launch --nproc-per-node 2 --master-port "$port" -- \
    train "${eq[@]}" --set "train.out_dir=$out/eq/2proc" && eq_runs+=(2proc)
  for r in "${eq_runs[@]}"; do
    run "compare-1gpu-$r" 60 bash -c "compare 1gpu $r" || true
  done
  if [[ " ${eq_runs[*]} " == *" 2gpu-zero1 "* && " ${eq_runs[*]} " == *" 2gpu "* ]]; then
    run compare-2gpu-zero1 60 bash -c "compare 2gpu 2gpu-zero1" || true
  fi
fi

# ---- 2. Scaling -----------------------------------------------------------------------------------------------
counts=()
for n in 1 2 4 8 16; do
  if [ "$n" -le "$ngpu" ]; then counts+=("$n"); fi
done
[[ " ${counts[*]} " == *" $ngpu "* ]] || counts+=("$ngpu")
for n in "${counts[@]}"; do
  scale=(--config configs/bench-gpt2-124m.toml --backend cuda
    --set "train.micro_batch=$micro" --set "train.total_batch_tokens=$((micro * 1024 * n))"
    --set "train.max_steps=$steps" --set train.log_every=10 --set train.eval_steps=1
    --set "dist.zero=$zero" --set "train.out_dir=$out/scale/$n")
  rm -rf "$out/scale/$n"
  if [ "$mode" = threads ]; then
    run "scale-$n" 900 "$kiln" train "${scale[@]}" --gpus "$(seq -s, 0 $((n - 1)))" || true
  else
    next_port
    run "scale-$n" 900 "$kiln" launch --nproc-per-node "$n" --master-port "$port" -- train "${scale[@]}" || true
  fi
done

echo
echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $ngpu GPUs, logs in $out)"
printf '%s\n' "${results[@]}"
for log in "$out"/compare-*.log; do
  if [ -f "$log" ]; then
    echo "$(basename "$log" .log): $(tail -n 1 "$log")"
  fi
done
echo
echo "GPT-2 124M, B=$micro × T=1024 per GPU, ZeRO $zero, $mode; median of steps $((skip + 1))..$steps"
python3 - "$out/scale" "$skip" "${counts[@]}" << 'PY'
import json, os, statistics, sys
root, skip, counts = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
rates = {}
for n in counts:
    path = os.path.join(root, str(n), "metrics.jsonl")
    if os.path.exists(path):
        lines = [json.loads(l) for l in open(path)]
        kept = [j for j in lines if j["step"] > skip and "step_ms" in j]
        if kept:
            rates[n] = (statistics.median(j["tokens_per_s"] for j in kept), statistics.median(j["step_ms"] for j in kept))
print(f"{'GPUs':>4} {'tokens/s':>12} {'per GPU':>10} {'step ms':>9} {'efficiency':>10}")
for n in counts:
    if n not in rates:
        print(f"{n:>4} {'failed':>12}")
        continue
    tok, ms = rates[n]
    eff = f"{tok / (n * rates[1][0]) * 100:.1f}%" if 1 in rates else "?"
    print(f"{n:>4} {tok:>12,.0f} {tok / n:>10,.0f} {ms:>9.1f} {eff:>10}")
PY
# Exit 1 when any run or comparison failed, so that a caller (CI, a batch job) sees it.
for r in "${results[@]}"; do
  if [[ $r == *" FAIL "* ]]; then exit 1; fi
done
