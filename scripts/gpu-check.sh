#!/usr/bin/env bash
# The one script run on a lent GPU machine (see ../shared/GPU.md): build kiln here with `cargo build --release`,
# then run it there through the device tool with carry ["target/release/kiln"] and this command:
#     bash scripts/gpu-check.sh
# Every step's full log is appended to $OUT/steps.log (or ./gpu-check-out when OUT is unset) as it finishes, since
# only 8 files come back from $OUT; a short table comes last.
# The steps run in order of importance, each within its own time limit and all within GPU_CHECK_BUDGET_S (default
# 540 s, to end inside a 600 s device call): a step that would start with too little time left is skipped.
# ONLY="NAME ..." runs just the named steps (e.g. ONLY="dp-equivalence dp-overlap" for a second call).
# A lease of about 15 minutes holds two such calls. What the open issues still need a GPU to show, grouped so that
# each group's comparisons share a call (kiln beside PyTorch, a switch beside the default); the attention kernels
# alone, beside cuDNN, if a call must be short (issue 18):
#   ONLY="info selftest-bf16-specialised bench-attention bench-attention-specialised
#     bench-attention-specialised-atomic bench-attention-atomic bench-attention-reference"
#   speed (issues 15, 18): ONLY="info selftest-fp32 selftest-bf16 bench-kiln graphs-exact bench-kiln-graphs
#     bench-kiln-fused-bias bench-pytorch bench-llama bench-llama-pytorch bench-qwen3"
#   mixtures of experts (issue 15): ONLY="info selftest-fp32 selftest-bf16 moe bench-llama-124m bench-moe-124m"
#   and their grouped products beside the per-expert ones (issue 15): ONLY="info selftest-bf16-grouped moe-grouped
#     bench-moe-124m bench-moe-124m-grouped bench-moe-124m-grouped-graphs"
#   memory and attention (issues 15, 16, 18): ONLY="plan-gpt2 plan-gpt2-fused plan-llama recompute bench-attention
#     bench-attention-window bench-attention-reference selftest-bf16-pipelined bench-attention-pipelined
#     selftest-bf16-specialised bench-attention-specialised bench-attention-specialised-atomic bench-attention-atomic
#     resume-exact"
#   ranks (issues 16, 17, 18): ONLY="dp-equivalence dp-failure-graphs dp-stages allreduce rank-times bench-kiln
#     bench-kiln-unguarded"
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check-out}
logs=/tmp/kiln-gpu-check
mkdir -p "$out" "$logs"
kiln=./target/release/kiln
export KILN_CACHE_DIR=/tmp/kiln-kernel-cache
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-540}))
results=()

# step NAME TIMEOUT_S COMMAND...: runs it with its output in $logs/NAME.log and records PASS/FAIL and seconds.
step() {
  local name=$1 limit=$2
  shift 2
  [[ -n ${ONLY:-} && " $ONLY " != *" $name "* ]] && return
  local left=$((deadline - SECONDS - 5))
  if ((left < 20)); then
    results+=("$(printf '%-22s SKIP (out of time)' "$name")")
    return
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$logs/$name.log"
  { echo "===== $name: $* (exit $rc, $((SECONDS - start)) s)"; cat "$logs/$name.log"; } >> "$out/steps.log"
  results+=("$(printf '%-22s %-4s %4ss  exit %s' "$name" "$([ $rc = 0 ] && echo PASS || echo FAIL)" $((SECONDS - start)) $rc)")
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
step info 30 "$kiln" info
step kernels 120 "$kiln" kernels build
# One process per precision: a fault ends the CUDA context, and with it every later check of that process.
selftest_failed=()
for precision in fp32 bf16; do
  step selftest-$precision 120 "$kiln" selftest --backend cuda --precision $precision || selftest_failed+=($precision)
done
step quickstart-bf16 90 "$kiln" train --backend cuda --set train.out_dir=/tmp/kiln-quickstart
# Exact resume on the GPU: six steps straight, against three steps then a resume from the step-3 checkpoint.
resume_check() {
  local run=(--backend cuda --set train.max_steps=6 --set train.checkpoint_every=3 --set train.eval_steps=1 --set train.log_every=1)
  rm -rf /tmp/kiln-resume && "$kiln" train "${run[@]}" --set train.out_dir=/tmp/kiln-resume/a &&
    "$kiln" train "${run[@]}" --set train.out_dir=/tmp/kiln-resume/b --resume /tmp/kiln-resume/a/checkpoints/step_00000003 &&
    python3 - <<'PY'
import json
# Lines that mark events (the resume) carry no loss.
loss = lambda d: {j["step"]: j["loss"] for j in map(json.loads, open(f"/tmp/kiln-resume/{d}/metrics.jsonl")) if "loss" in j}
a, b = loss("a"), loss("b")
same = all(a[s] == b[s] for s in (4, 5, 6))
print("straight:", [a[s] for s in (4, 5, 6)], "resumed:", [b[s] for s in (4, 5, 6)], "bit-identical" if same else "DIFFERENT")
raise SystemExit(0 if same else 1)
PY
}
# train.graphs: the passes and the optimizer captured as CUDA graphs (from the second step) must train exactly as
# without them.
graphs_check() {
  local run=(--backend cuda --set train.max_steps=8 --set train.eval_steps=1 --set train.log_every=1)
  rm -rf /tmp/kiln-graphs && "$kiln" train "${run[@]}" --set train.out_dir=/tmp/kiln-graphs/off &&
    "$kiln" train "${run[@]}" --set train.out_dir=/tmp/kiln-graphs/on --set train.graphs=true 2>&1 |
    tee /dev/stderr | grep -q "train.graphs" && { echo "the capture failed"; return 1; }
  python3 - <<'PY'
import json
loss = lambda d: [j["loss"] for j in map(json.loads, open(f"/tmp/kiln-graphs/{d}/metrics.jsonl")) if "loss" in j]
off, on = loss("off"), loss("on")
print("without graphs:", off, "\nwith graphs:   ", on, "\nbit-identical" if on == off else "\nDIFFERENT")
raise SystemExit(0 if on == off and len(on) == 8 else 1)
PY
}
# A mixture of experts on the GPU: the quickstart's Llama with 4 experts, 2 a token (kernels/experts.cu), its
# experts' products run as $KILN_EXPERT_PRODUCTS says: per-expert (each on cuBLASLt, the default) or grouped
# (kernels/expert_products.cu). 30 steps with train.recompute none and block must give bit-identical losses (every
# recomputed operation is deterministic, routing included), the loss must fall (on the CPU engine: 2.554 to 1.814),
# and with train.graphs the run must train as without: per expert, warning that it goes on without graphs (routing
# is read back to the host); grouped, captured (no warning).
moe_check() {
  local products=${KILN_EXPERT_PRODUCTS:-per-expert} dir=/tmp/kiln-moe-${KILN_EXPERT_PRODUCTS:-per-expert}
  local run=(--backend cuda --set model.arch=llama --set model.n_kv_head=2 --set model.experts=4
    --set model.experts_per_token=2 --set train.max_steps=30 --set train.eval_steps=1 --set train.log_every=10)
  rm -rf "$dir"
  for level in none block; do
    "$kiln" train "${run[@]}" --set train.recompute=$level --set train.out_dir=$dir/$level || return 1
  done
  # (No pipes for what must fail the step: `timeout bash -c` runs the function without this script's pipefail.)
  "$kiln" train "${run[@]}" --set train.graphs=true --set train.out_dir=$dir/graphs > $dir.graphs.log 2>&1
  local rc=$?
  cat $dir.graphs.log
  ((rc == 0)) || return 1
  if [ "$products" = grouped ]; then
    grep -q "without graphs" $dir.graphs.log && { echo "the grouped products were not captured"; return 1; }
  else
    grep -q "without graphs" $dir.graphs.log || { echo "no warning that the run went on without graphs"; return 1; }
  fi
  MOE_DIR=$dir python3 - <<'PY'
import json, os
d = os.environ["MOE_DIR"]
field = lambda r, f: [j[f] for j in map(json.loads, open(f"{d}/{r}/metrics.jsonl")) if "loss" in j]
plain, block, graphs = field("none", "loss"), field("block", "loss"), field("graphs", "loss")
print("recompute none: ", plain, "\nrecompute block:", block, "\ntrain.graphs:   ", graphs)
same, falls = plain == block == graphs and len(plain) == 30, plain[-1] < plain[0] - 0.5
print("bit-identical" if same else "DIFFERENT", "; the loss falls" if falls else "; the loss does NOT fall")
# The balancing loss (2 when the 4 experts share the tokens evenly, up to 4 as routing collapses): the same in each.
aux = [field(r, "aux_loss") for r in ("none", "block", "graphs")]
print("aux_loss:", aux[0])
balanced = aux[0] == aux[1] == aux[2] and all(1.5 < a < 4 for a in aux[0])
print("aux_loss bit-identical and in (1.5, 4)" if balanced else "aux_loss DIFFERENT or out of (1.5, 4)")
raise SystemExit(0 if same and falls and balanced else 1)
PY
}
# The grouped products' self-test in bf16: every case as in selftest-bf16, and the model with experts captured into
# graphs (its "training with graphs" check run, not SKIP).
selftest_grouped() {
  KILN_EXPERT_PRODUCTS=grouped "$kiln" selftest --backend cuda --precision bf16 > /tmp/kiln-selftest-grouped.log 2>&1
  local rc=$?
  cat /tmp/kiln-selftest-grouped.log
  ((rc == 0)) && ! grep -q "^SKIP llama with experts training with graphs" /tmp/kiln-selftest-grouped.log
}
# `timeout` runs commands, not shell functions: hand it a bash that has the function.
export kiln
export -f resume_check graphs_check moe_check selftest_grouped
step bench-kiln 120 "$kiln" bench train --backend cuda --steps 10 --warmup 2
step graphs-exact 90 bash -c graphs_check
step moe 120 bash -c moe_check
step selftest-bf16-grouped 120 bash -c selftest_grouped
step moe-grouped 120 env KILN_EXPERT_PRODUCTS=grouped bash -c moe_check
# The benchmark's GPT-2 124M shape (12 × 768, 32 × 1024 tokens a step) as a Llama, dense and with 4 experts, 2 a
# token, each as wide as the dense MLP (65,536 dispatched rows a layer).
llama=(--set model.arch=llama --set model.n_kv_head=4)
step bench-llama-124m 120 "$kiln" bench train --backend cuda --steps 10 --warmup 2 "${llama[@]}"
moe=(--set model.experts=4 --set model.experts_per_token=2)
step bench-moe-124m 120 "$kiln" bench train --backend cuda --steps 10 --warmup 2 "${llama[@]}" "${moe[@]}"
step bench-moe-124m-grouped 120 env KILN_EXPERT_PRODUCTS=grouped "$kiln" bench train --backend cuda --steps 10 \
  --warmup 2 "${llama[@]}" "${moe[@]}"
step bench-moe-124m-grouped-graphs 120 env KILN_EXPERT_PRODUCTS=grouped "$kiln" bench train --backend cuda \
  --steps 10 --warmup 2 "${llama[@]}" "${moe[@]}" --set train.graphs=true
step bench-kiln-graphs 120 "$kiln" bench train --backend cuda --steps 10 --warmup 2 --set train.graphs=true
# train.fuse_bias_gradients: the selftest's "(fused bias gradients)" checks say whether it is right; this, beside
# bench-kiln, whether it is faster.
step bench-kiln-fused-bias 120 "$kiln" bench train --backend cuda --steps 10 --warmup 2 \
  --set train.fuse_bias_gradients=true
# The memory plan against the run: `kiln plan`'s allocated part must equal what the engine counts after the steps
# (exactly), and its total the device memory the process takes (nvidia-smi's peak above the idle reading), within 3%.
plan_check() {
  local config=$1 plan=/tmp/kiln-plan.json peak=/tmp/kiln-plan-peak
  local sets=("${@:2}")
  "$kiln" plan --backend cuda --json --config "$config" "${sets[@]}" > $plan || return 1
  local idle
  idle=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  ( while sleep 0.2; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; done ) > $peak &
  local sampler=$!
  "$kiln" bench train --backend cuda --config "$config" "${sets[@]}" --steps 3 --warmup 1 \
    > /tmp/kiln-plan-bench.log 2>&1
  local rc=$?
  kill $sampler
  tail -n 1 /tmp/kiln-plan-bench.log
  ((rc == 0)) || return 1
  python3 - "$plan" "$peak" "$idle" <<'PY'
import json, sys
plan = json.load(open(sys.argv[1]))
bench = json.loads(open("/tmp/kiln-plan-bench.log").read().strip().splitlines()[-1])
peak_mib = max(int(x) for x in open(sys.argv[2]).read().split()) - int(sys.argv[3])
measured, total = peak_mib * 2**20, plan["total_bytes"]
exact = bench["allocated_bytes"] == plan["allocated_bytes"]
close = abs(measured - total) <= 0.03 * total
print(f"allocated: plan {plan['allocated_bytes']} run {bench['allocated_bytes']} ({'equal' if exact else 'DIFFERENT'}); "
      f"device: plan {total / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB ({(measured / total - 1) * 100:+.1f}%)")
raise SystemExit(0 if exact and close else 1)
PY
}
export -f plan_check
# Recomputation in bf16 on the quickstart (GPT-2) and its Llama: 30 steps each with train.recompute none, elementwise
# and block. The Llama's losses must be bit-identical (every recomputed operation is a kiln kernel, deterministic);
# GPT-2's GELU comes from cuBLASLt's epilogue in fp32 before rounding, but is recomputed from the rounded bf16
# input, so its last bits may differ: reported, within 1e-2.
recompute_check() {
  local run=(--backend cuda --set train.max_steps=30 --set train.eval_steps=1 --set train.log_every=10)
  rm -rf /tmp/kiln-recompute
  for family in gpt2 llama; do
    local arch=()
    [[ $family == llama ]] && arch=(--set model.arch=llama --set model.n_kv_head=2)
    for level in none elementwise block; do
      "$kiln" train "${run[@]}" "${arch[@]}" --set train.recompute=$level \
        --set train.out_dir=/tmp/kiln-recompute/$family-$level > /tmp/kiln-recompute-$family-$level.log 2>&1 || return 1
    done
  done
  python3 - <<'PY'
import json
loss = lambda d: [j["loss"] for j in map(json.loads, open(f"/tmp/kiln-recompute/{d}/metrics.jsonl")) if "loss" in j]
ok = True
for family, tol in (("gpt2", 1e-2), ("llama", 0.0)):
    for level in ("elementwise", "block"):
        a, b = loss(f"{family}-none"), loss(f"{family}-{level}")
        d = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        good = len(a) == len(b) == 30 and d <= tol
        ok &= good
        print(f"{family} {level:11s} vs none: max relative loss difference {d:.2e}", "ok" if good else "DIFFERENT")
raise SystemExit(0 if ok else 1)
PY
}
export -f recompute_check
step recompute 150 bash -c recompute_check
step plan-gpt2 90 bash -c "plan_check configs/bench-gpt2-124m.toml"
# With fused bias gradients the kernels' working memory holds the attention's partial sums of dqkv.
step plan-gpt2-fused 90 bash -c "plan_check configs/bench-gpt2-124m.toml --set train.fuse_bias_gradients=true"
step plan-llama 150 bash -c "plan_check configs/llama-3.2-1b.toml"
# Llama 3.2 1B's shape (bf16, 8 × 2048 tokens a step; the config says why that batch), beside PyTorch's below.
step bench-llama 150 "$kiln" bench train --backend cuda --config configs/llama-3.2-1b.toml --steps 10 --warmup 2
step bench-attention 120 "$kiln" bench attention --backend cuda --suite
# A sliding window of 1024 over 4096 positions (issue 15), 44% of causal T4096 D128's FLOPs (suite row 3): the
# default kernels skip the products of the tiles outside it but still load them (the pipelined and specialised forms
# mask them and add zeros). Far above 44% of row 3's time: narrowing the blocks' loops to the window is next.
step bench-attention-window 60 "$kiln" bench attention --backend cuda --batch 8 --heads 16 --seq 4096 \
  --head-dim 128 --causal --window 1024
# On sm_90a the fused kernels at head dimensions 64 and 128 run on wgmma by default; KILN_FLASH_WGMMA=none keeps
# them on mma.sync, as on every other architecture: their self-test, then the same benchmarks on the same machine.
mma=(env KILN_FLASH_WGMMA=none)
step selftest-bf16-mma 120 "${mma[@]}" "$kiln" selftest --backend cuda --precision bf16 || selftest_failed+=(bf16-mma)
step bench-attention-mma 120 "${mma[@]}" "$kiln" bench attention --backend cuda --suite
step bench-kiln-mma 90 "${mma[@]}" "$kiln" bench train --backend cuda --steps 10 --warmup 2
# The forward on wgmma pipelined inside each warpgroup (KILN_FLASH_WGMMA=pipelined,backward; the CPU emulation found
# it bit-identical to the default forward): its self-test, then the attention suite and the GPT-2 step beside the
# default ones above. Not the default until these show it faster.
pipelined=(env KILN_FLASH_WGMMA=pipelined,backward)
step selftest-bf16-pipelined 120 "${pipelined[@]}" "$kiln" selftest --backend cuda --precision bf16 ||
  selftest_failed+=(bf16-pipelined)
step bench-attention-pipelined 120 "${pipelined[@]}" "$kiln" bench attention --backend cuda --suite
step bench-kiln-pipelined 90 "${pipelined[@]}" "$kiln" bench train --backend cuda --steps 10 --warmup 2
# The forward, dq and dkv kernels warp-specialised (KILN_FLASH_WGMMA=specialised,backward): a loading warpgroup with
# tensor copies and mbarriers, two computing ones. The CPU emulation found them bit-identical to the defaults; here
# their self-test (which must not fault: tensor maps, mbarrier parities and setmaxnreg are what the emulation reads
# from the PTX ISA, not what it ran), then the same benchmarks. Not the default until these show them faster.
specialised=(env KILN_FLASH_WGMMA=specialised,backward)
step selftest-bf16-specialised 120 "${specialised[@]}" "$kiln" selftest --backend cuda --precision bf16 ||
  selftest_failed+=(bf16-specialised)
step bench-attention-specialised 120 "${specialised[@]}" "$kiln" bench attention --backend cuda --suite
# With atomic dQ the specialised dkv kernel adds dQ by tensor reductions (its self-test is in
# selftest-bf16-specialised), beside bench-attention-atomic's wgmma kernel with vector atomics.
step bench-attention-specialised-atomic 120 "${specialised[@]}" "$kiln" bench attention --backend cuda --suite \
  --atomic-dq
step bench-kiln-specialised 90 "${specialised[@]}" "$kiln" bench train --backend cuda --steps 10 --warmup 2
step resume-exact 90 bash -c resume_check
# Where a training step's time goes: every kernel of two steps, timed by Nsight Compute.
step profile 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  "$kiln" bench train --backend cuda --steps 1 --warmup 1
# What limits the fused attention kernels (tensor pipe, shared memory, stalls, occupancy) at GPT-2's shape and at
# head dimension 128: one forward and one backward each, under Nsight Compute's sections.
profile_attention() {
  local shape
  for shape in "--batch 32 --heads 12 --seq 1024 --head-dim 64" "--batch 8 --heads 16 --seq 4096 --head-dim 128"; do
    ncu --clock-control none --kernel-name "regex:flash_attention_(forward|backward)" --launch-count 4 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats \
      "$kiln" bench attention --backend cuda $shape --causal --reps 1 --warmup 0 || return 1
  done
}
export -f profile_attention
step profile-attention 150 bash -c profile_attention
# A failed self-test again under compute-sanitizer, which names the kernel and the address of a bad access.
for failed in "${selftest_failed[@]}"; do
  run=()
  [[ $failed == *-mma ]] && run=("${mma[@]}")
  [[ $failed == *-pipelined ]] && run=("${pipelined[@]}")
  [[ $failed == *-specialised ]] && run=("${specialised[@]}")
  step sanitize-$failed 120 "${run[@]}" compute-sanitizer --tool memcheck --print-limit 10 \
    "$kiln" selftest --backend cuda --precision ${failed%-*}
done

# Data parallel on the one GPU: N processes, each claiming its own NCCL host (see ../shared/GPU.md), so NCCL joins
# them over its socket transport on loopback as if they were separate nodes. dp_run NAME RANKS ARGS... trains
# with the global batch split over RANKS processes; rank 0 writes /tmp/kiln-dp/NAME.
dp_run() {
  local name=$1 n=$2 port=$((29600 + RANDOM % 1000)) pids=() r failed=0
  shift 2
  mkdir -p /tmp/kiln-dp
  for ((r = 0; r < n; r++)); do
    RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      NCCL_HOSTID=sim-host-$r NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 \
      "$kiln" train --backend cuda --gpus 0 --set "train.out_dir=/tmp/kiln-dp/$name" "$@" \
      > "/tmp/kiln-dp/$name.rank$r.log" 2>&1 &
    pids+=($!)
  done
  for r in "${!pids[@]}"; do wait "${pids[$r]}" || { failed=1; echo "$name: rank $r failed"; }; done
  tail -n 4 "/tmp/kiln-dp/$name.rank0.log"
  return $failed
}
# Equivalence: 1, 2 and 4 ranks (and ZeRO-1 on 2; ZeRO-2 and ZeRO-3 on 2, with two micro-batches a step, and on 4,
# stage 3 there with block recomputation) train the quickstart model in fp32 on the same 96 sequences per step; the
# losses of every step and the final weights must agree. Then ZeRO-1 in bf16, where each rank keeps the
# fp32 master weights of its pieces only, against plain data parallelism in bf16 (no clipping, so that the norm's
# summation order cannot matter): the same sums of the same gradients (a + b, two ranks), so bit-identical losses
# and weights; and two bf16 ranks resuming from that ZeRO-1 checkpoint (they compare their bf16 weights first).
# With train.graphs, the steps (collectives included) replayed as CUDA graphs must repeat the runs without them bit
# for bit, and no rank may warn that its capture failed.
dp_equivalence() {
  local common=(--set train.max_steps=20 --set train.total_batch_tokens=1248 --set train.checkpoint_every=20
    --set train.eval_every=0 --set train.eval_steps=1 --set train.log_every=5)
  local fp32=("${common[@]}" --set train.precision=fp32) bf16=("${common[@]}" --set optim.grad_clip=0)
  rm -rf /tmp/kiln-dp
  dp_run one 1 "${fp32[@]}" --set train.micro_batch=96 &&
    dp_run two 2 "${fp32[@]}" --set train.micro_batch=48 &&
    dp_run four 4 "${fp32[@]}" --set train.micro_batch=24 &&
    dp_run two-zero1 2 "${fp32[@]}" --set train.micro_batch=48 --set dist.zero=1 --set dist.bucket_mb=0.05 &&
    dp_run two-zero2 2 "${fp32[@]}" --set train.micro_batch=24 --set dist.zero=2 &&
    dp_run four-zero2 4 "${fp32[@]}" --set train.micro_batch=24 --set dist.zero=2 &&
    dp_run two-zero3 2 "${fp32[@]}" --set train.micro_batch=24 --set dist.zero=3 &&
    dp_run four-zero3 4 "${fp32[@]}" --set train.micro_batch=24 --set dist.zero=3 --set train.recompute=block &&
    dp_run bf16-two 2 "${bf16[@]}" --set train.micro_batch=48 &&
    dp_run bf16-two-zero1 2 "${bf16[@]}" --set train.micro_batch=48 --set dist.zero=1 --set dist.bucket_mb=0.05 &&
    dp_run bf16-resume 2 "${bf16[@]}" --set train.micro_batch=48 --set dist.zero=1 --set train.max_steps=22 \
      --resume /tmp/kiln-dp/bf16-two-zero1/checkpoints/step_00000020 &&
    dp_run two-graphs 2 "${fp32[@]}" --set train.micro_batch=48 --set train.graphs=true &&
    dp_run two-zero1-graphs 2 "${fp32[@]}" --set train.micro_batch=48 --set dist.zero=1 --set dist.bucket_mb=0.05 \
      --set train.graphs=true &&
    dp_run two-zero3-graphs 2 "${fp32[@]}" --set train.micro_batch=24 --set dist.zero=3 --set train.graphs=true &&
    ! grep -H "train.graphs" /tmp/kiln-dp/*-graphs.rank*.log &&
    grep -H "GiB allocated" /tmp/kiln-dp/bf16-two.rank0.log /tmp/kiln-dp/bf16-two-zero1.rank0.log &&
    python3 - <<'PY'
import json, struct
def losses(name):
    return [j["loss"] for j in map(json.loads, open(f"/tmp/kiln-dp/{name}/metrics.jsonl")) if "loss" in j]
def weights(name):
    raw = open(f"/tmp/kiln-dp/{name}/checkpoints/step_00000020/model.safetensors", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = []
    for key in sorted(k for k in header if k != "__metadata__"):
        a, b = header[key]["data_offsets"]
        out += struct.unpack(f"<{(b - a) // 4}f", data[a:b])
    return out
ok = True
# (base, run, tolerance): fp32 sums in other orders, then the bf16 pair that must agree bit for bit.
for base, name, tol in (("one", "two", 1e-4), ("one", "four", 1e-4), ("one", "two-zero1", 1e-4),
                        ("one", "two-zero2", 1e-4), ("one", "four-zero2", 1e-4), ("one", "two-zero3", 1e-4),
                        ("one", "four-zero3", 1e-4),
                        ("bf16-two", "bf16-two-zero1", 0.0), ("two", "two-graphs", 0.0),
                        ("two-zero1", "two-zero1-graphs", 0.0), ("two-zero3", "two-zero3-graphs", 0.0)):
    (base_l, base_w), (l, w) = (losses(base), weights(base)), (losses(name), weights(name))
    dl = max(abs(x - y) for x, y in zip(base_l, l))
    dw = max(abs(x - y) for x, y in zip(base_w, w))
    good = len(l) == len(base_l) == 20 and len(w) == len(base_w) and dl <= tol and dw <= tol
    ok &= good
    print(f"{name:14s} vs {base:8s}: max loss difference {dl:.2e}, max weight difference {dw:.2e}", "ok" if good else "DIFFERENT")
raise SystemExit(0 if ok else 1)
PY
}
# Overlap: GPT-2 124M, 2 ranks of batch 4: the gradient's all-reduce in 25 MB buckets started during the backward
# pass, against one bucket after it; the difference is what the overlap hides. Loopback sockets are slow, so this
# shows the mechanism, not NVLink speeds.
dp_overlap() {
  local common=(--config configs/bench-gpt2-124m.toml --set train.max_steps=8 --set train.micro_batch=4
    --set train.total_batch_tokens=8192 --set train.log_every=1)
  dp_run gpt2-one 1 "${common[@]}" --set train.micro_batch=8 &&
    dp_run gpt2-buckets 2 "${common[@]}" --set dist.bucket_mb=25 &&
    dp_run gpt2-one-bucket 2 "${common[@]}" --set dist.bucket_mb=100000 &&
    dp_run gpt2-zero1 2 "${common[@]}" --set dist.bucket_mb=25 --set dist.zero=1 &&
    grep -H "GiB allocated" /tmp/kiln-dp/gpt2-buckets.rank0.log /tmp/kiln-dp/gpt2-zero1.rank0.log &&
    python3 - <<'PY'
import json, statistics
def step_ms(name):
    steps = [j for j in map(json.loads, open(f"/tmp/kiln-dp/{name}/metrics.jsonl")) if "step_ms" in j]
    return statistics.median(j["step_ms"] for j in steps[3:])
one, buckets, single, zero = (step_ms(n) for n in ("gpt2-one", "gpt2-buckets", "gpt2-one-bucket", "gpt2-zero1"))
print(f"median step: 1 rank (batch 8) {one:.1f} ms; 2 ranks (batch 4 each, sharing the GPU): 25 MB buckets {buckets:.1f} ms, one bucket after backward {single:.1f} ms")
print(f"all-reduce of the whole gradient, exposed: about {single - one:.1f} ms; hidden by overlapping it with backward: {single - buckets:.1f} ms")
print(f"ZeRO-1 on 2 ranks (reduce-scatter in 25 MB buckets, then all-gather): median step {zero:.1f} ms")
PY
}
# A rank killed mid-training: the other must exit non-zero promptly, by NCCL's error or at worst dist.timeout_s.
# dp_failure NAME ARGS...: the two ranks train with ARGS too (with train.graphs, rank 1 dies while the other's
# replayed graph waits in a collective, and the abort must not wait for the graphs).
dp_failure() {
  local name=$1 port=$((29600 + RANDOM % 1000)) pids=() r waited=0 rc start
  shift
  mkdir -p /tmp/kiln-dp
  for r in 0 1; do
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      NCCL_HOSTID=sim-host-$r NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 \
      "$kiln" train --backend cuda --gpus 0 --set train.out_dir=/tmp/kiln-dp/$name --set train.max_steps=1000000 \
      --set train.total_batch_tokens=3328 --set train.log_every=100 --set dist.timeout_s=30 "$@" \
      > "/tmp/kiln-dp/$name.rank$r.log" 2>&1 &
    pids+=($!)
  done
  until grep -q "step " /tmp/kiln-dp/$name.rank0.log || ((waited >= 60)); do sleep 1; waited=$((waited + 1)); done
  if ! grep -q "step " /tmp/kiln-dp/$name.rank0.log; then
    echo "the two ranks never started training:"
    tail -n 5 /tmp/kiln-dp/$name.rank*.log
    kill -9 "${pids[@]}"
    return 1
  fi
  kill -9 "${pids[1]}"
  start=$SECONDS
  wait "${pids[0]}"
  rc=$?
  tail -n 3 /tmp/kiln-dp/$name.rank0.log
  echo "rank 1 killed while training; rank 0 exited with code $rc after $((SECONDS - start)) s"
  ((rc != 0 && SECONDS - start < 40))
}
# A rank that fails while joining NCCL's communicator (rank 1 is given a network interface that does not exist):
# the other, already waiting in the (non-blocking) initialisation, must exit non-zero promptly too.
dp_init_failure() {
  local port=$((29600 + RANDOM % 1000)) pids=() r rc=() start=$SECONDS
  mkdir -p /tmp/kiln-dp
  for r in 0 1; do
    local ifname=lo
    ((r == 1)) && ifname=kiln-no-such-interface
    RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      NCCL_HOSTID=sim-host-$r NCCL_SOCKET_IFNAME=$ifname NCCL_IB_DISABLE=1 \
      "$kiln" train --backend cuda --gpus 0 --set train.out_dir=/tmp/kiln-dp/init-failure --set train.max_steps=5 \
      --set dist.timeout_s=60 > "/tmp/kiln-dp/init-failure.rank$r.log" 2>&1 &
    pids+=($!)
  done
  for r in 0 1; do wait "${pids[$r]}"; rc+=($?); done
  tail -n 2 /tmp/kiln-dp/init-failure.rank*.log
  echo "rank 1 failed while joining; exit codes ${rc[*]} after $((SECONDS - start)) s"
  ((rc[0] != 0 && rc[1] != 0 && SECONDS - start < 45))
}
# NCCL's bus bandwidth on the one GPU over loopback sockets (NCCL_HOSTID as dp_run): 2 and 4 processes, 1 MiB to
# 1 GiB, each process a 1 GiB buffer; rank 0 prints nccl-tests' table and writes /tmp/kiln-dp/allreduce-N.json.
allreduce() {
  local n r
  mkdir -p /tmp/kiln-dp
  for n in 2 4; do
    local port=$((29600 + RANDOM % 1000)) pids=() failed=0
    for ((r = 0; r < n; r++)); do
      RANK=$r WORLD_SIZE=$n LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
        NCCL_HOSTID=sim-host-$r NCCL_SOCKET_IFNAME=lo NCCL_IB_DISABLE=1 \
        "$kiln" bench allreduce --backend cuda --gpus 0 --iters 10 --json "/tmp/kiln-dp/allreduce-$n.json" \
        > "/tmp/kiln-dp/allreduce-$n.rank$r.log" 2>&1 &
      pids+=($!)
    done
    for r in "${!pids[@]}"; do wait "${pids[$r]}" || { failed=1; echo "allreduce on $n: rank $r failed"; }; done
    head -n -1 "/tmp/kiln-dp/allreduce-$n.rank0.log"
    ((failed == 0)) || { tail -n 5 /tmp/kiln-dp/allreduce-$n.rank*.log; return 1; }
  done
}
# Stragglers by device time: 2 ranks on the one GPU; every metrics line must give both ranks' device time for the
# step's passes, and the log lines the fastest and the slowest.
rank_times() {
  rm -rf /tmp/kiln-dp/rank-times
  dp_run rank-times 2 --set train.max_steps=10 --set train.total_batch_tokens=3328 --set train.log_every=1 &&
    grep -h "| ranks" /tmp/kiln-dp/rank-times.rank0.log | tail -n 3 &&
    python3 - <<'PY'
import json
steps = [j for j in map(json.loads, open("/tmp/kiln-dp/rank-times/metrics.jsonl")) if "loss" in j]
times = [j.get("rank_step_ms") for j in steps]
print("rank_step_ms:", times[-3:], "step_ms:", [round(j["step_ms"], 2) for j in steps[-3:]])
good = len(steps) == 10 and all(t and len(t) == 2 and min(t) > 0 for t in times)
raise SystemExit(0 if good else 1)
PY
}
export -f dp_run dp_equivalence dp_overlap dp_failure dp_init_failure allreduce rank_times
step dp-equivalence 300 bash -c dp_equivalence
step allreduce 150 bash -c allreduce
step rank-times 90 bash -c rank_times
# The guard's cost on the GPT-2 124M step: bench-kiln ran with it (the default); the same without.
step bench-kiln-unguarded 120 "$kiln" bench train --backend cuda --steps 10 --warmup 2 --set train.guard.enabled=false
step dp-failure 90 bash -c "dp_failure failure"
step dp-failure-graphs 90 bash -c "dp_failure failure-graphs --set train.graphs=true"
step dp-init-failure 90 bash -c dp_init_failure
# train.deterministic = false: the fused attention's backward adds dQ with atomics instead of recomputing it.
step bench-attention-atomic 120 "$kiln" bench attention --backend cuda --suite --atomic-dq
step bench-kiln-atomic 90 "$kiln" bench train --backend cuda --steps 10 --warmup 2 --set train.deterministic=false
step bench-kiln-unfused 90 "$kiln" bench train --backend cuda --steps 5 --warmup 1 --set model.attention=unfused
# ZeRO stage 3 beside stage 1: GPT-2 124M, 4 ranks on the one GPU, batch 4 each (loopback sockets: the step times
# show what stage 3's gathers cost over the same transport, not NVLink's). Each rank's device memory is reported
# beside its plan.
dp_stages() {
  local common=(--config configs/bench-gpt2-124m.toml --set train.max_steps=6 --set train.micro_batch=4
    --set train.total_batch_tokens=16384 --set train.log_every=1 --set train.eval_every=0 --set train.eval_steps=1)
  rm -rf /tmp/kiln-dp/stage*
  local stage
  for stage in 1 3; do
    "$kiln" plan --backend cuda --gpus 4 --json "${common[@]}" --set dist.zero=$stage > /tmp/kiln-dp/plan-stage$stage.json
    ( while sleep 0.5; do nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits; done ) \
      > /tmp/kiln-dp/memory-stage$stage.log &
    local sampler=$!
    dp_run stage$stage 4 "${common[@]}" --set dist.zero=$stage
    local rc=$?
    kill $sampler
    ((rc == 0)) || return 1
    grep -h "step      6" /tmp/kiln-dp/stage$stage.rank0.log
  done
  python3 - <<'PY'
import json, collections
for stage in (1, 3):
    plan = json.load(open(f"/tmp/kiln-dp/plan-stage{stage}.json"))
    peak = collections.defaultdict(int)
    for line in open(f"/tmp/kiln-dp/memory-stage{stage}.log"):
        pid, used = (int(x) for x in line.split(","))
        peak[pid] = max(peak[pid], used)
    per_rank = plan["total_bytes"] / 2**30
    print(f"stage {stage}: plan {per_rank:.2f} GiB a rank; measured", ", ".join(f"{v / 1024:.2f}" for v in peak.values()), "GiB")
PY
}
export -f dp_stages
step dp-stages 240 bash -c dp_stages
step dp-overlap 150 bash -c dp_overlap
step bench-pytorch 200 python3 scripts/reference/gpt2_bench.py --steps 10 --warmup 3
# transformers' LlamaForCausalLM of the same shape and batch as bench-llama, compiled.
step bench-llama-pytorch 240 python3 scripts/reference/llama_bench.py --steps 10 --warmup 3
# FlashAttention-2 and cuDNN through PyTorch's SDPA on this card, for the suite of bench-attention.
step bench-attention-reference 120 python3 scripts/reference/attention_bench.py
# Last, as it is worth only the time left: Qwen3-0.6B's shape, so that QK-norm's kernels and heads wider than
# n_embd / n_head run at a real size.
step bench-qwen3 150 "$kiln" bench train --backend cuda --config configs/qwen3-0.6b.toml --steps 10 --warmup 2

echo
echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1))"
grep -h "exact match" "$logs/quickstart-bf16.log" 2>/dev/null
grep -hE "^[0-9]+ passed, [0-9]+ failed" "$logs"/selftest-*.log 2>/dev/null
grep -hE " vs .*max loss difference|GiB allocated" "$logs/dp-equivalence.log" 2>/dev/null
grep -hE "exposed|ZeRO-1 on 2|GiB allocated" "$logs/dp-overlap.log" 2>/dev/null
grep -h "rank 1 killed" "$logs/dp-failure.log" 2>/dev/null
grep -h "rank 1 failed while joining" "$logs/dp-init-failure.log" 2>/dev/null
grep -h "Avg bus bandwidth\|over [0-9]* ranks" "$logs/allreduce.log" 2>/dev/null
# GPT-2 124M, B=32, T=1024, bf16, tokens/s. Anchors measured on an H100 (see docs/benchmarks.md): llm.c without
# cuDNN 283,000; PyTorch torch.compile 478,000.
grep -h "TFLOP/s" "$logs/bench-attention.log" 2>/dev/null
echo "on mma.sync (KILN_FLASH_WGMMA=none):"
grep -h "TFLOP/s" "$logs/bench-attention-mma.log" 2>/dev/null
echo "PyTorch SDPA on this card (FlashAttention-2, cuDNN):"
grep -h "TFLOP/s" "$logs/bench-attention-reference.log" 2>/dev/null
echo "with dQ added atomically (train.deterministic = false):"
grep -h "TFLOP/s" "$logs/bench-attention-atomic.log" 2>/dev/null
echo "the same, warp-specialised (KILN_FLASH_WGMMA=specialised,backward; dQ by tensor reductions):"
grep -h "TFLOP/s" "$logs/bench-attention-specialised-atomic.log" 2>/dev/null
# tokens_per_s NAME: the tokens/s in the JSON line that step NAME's kiln or PyTorch benchmark printed last, or ?.
tokens_per_s() {
  local t
  t=$(tail -n 1 "$logs/$1.log" 2>/dev/null | sed -n 's/.*"tokens_per_s": \{0,1\}\([0-9.]*\).*/\1/p')
  echo "${t:-?}"
}
# kiln_vs_pytorch WHAT KILN_STEP PYTORCH_STEP: both throughputs and their ratio.
kiln_vs_pytorch() {
  local k t
  k=$(tokens_per_s "$2") t=$(tokens_per_s "$3")
  echo "$1 tokens/s: kiln $k, pytorch $t"
  [ "$k" != "?" ] && [ "$t" != "?" ] && awk -v k="$k" -v t="$t" 'BEGIN { printf "kiln / pytorch: %.2f\n", k / t }'
}
echo "gpt2-124m tokens/s with train.graphs: $(tokens_per_s bench-kiln-graphs)"
echo "gpt2-124m tokens/s with train.fuse_bias_gradients: $(tokens_per_s bench-kiln-fused-bias)"
echo "gpt2-124m tokens/s with dQ added atomically: $(tokens_per_s bench-kiln-atomic)"
echo "gpt2-124m tokens/s with the fused attention on mma.sync: $(tokens_per_s bench-kiln-mma)"
echo "gpt2-124m tokens/s with the unfused attention kernels: $(tokens_per_s bench-kiln-unfused)"
kiln_vs_pytorch "gpt2-124m (anchors llm.c 283000 / torch.compile 478000)" bench-kiln bench-pytorch
kiln_vs_pytorch "llama-3.2-1b shape, 8 x 2048" bench-llama bench-llama-pytorch
printf '%s\n' "${results[@]}"
