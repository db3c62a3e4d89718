#!/usr/bin/env bash
# Builds and runs the CPU emulation of the kernels (see README.md): the fused attention kernels against a
# double-precision reference for every head dimension (and with sm_90's tiles where they differ), and the unfused
# ones in fp32 and bf16. Arguments go to the fused test: `run.sh 64 77` runs only head dimension 64 at length 77.
# EMU_SEED=n reorders the emulated threads; EMU_LAG=n makes warpgroup n lag (emu.h).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/target/emulate
mkdir -p "$out"
# The kernel files made host-compilable: common.cuh without its CUDA include, then the kernel file, whose dynamic
# shared memory becomes the emulated block's (mma.cuh is replaced by mma_emu.h).
common() { grep -v '#include <cuda_bf16.h>' "$root/kernels/common.cuh"; }
{
  common
  sed 's/^extern __shared__ __align__(16) unsigned char flash_shared\[\];/#define flash_shared (emu_shared_base())/' \
    "$root/kernels/flash_attention.cu"
} > "$out/flash_all.inc"
{ common; cat "$root/kernels/attention.cu"; } > "$out/unfused_all.inc"
{ common; cat "$root/kernels/encoder.cu"; } > "$out/encoder_all.inc"
# RMS normalisation's backward runs on layer normalisation's kernels, and QK-norm's partial sums are added by
# reduce.cu's column sums: one file holds all three.
{
  common
  sed 's/^    extern __shared__ float shared\[\];/    float* shared = reinterpret_cast<float*>(g_block->smem.data());/' \
    "$root"/kernels/{layernorm,rmsnorm,reduce}.cu
} > "$out/norm_all.inc"
{ common; cat "$root/kernels/rope.cu"; } > "$out/rope_all.inc"
{ common; cat "$root/kernels/swiglu.cu"; } > "$out/swiglu_all.inc"
{ common; cat "$root/kernels/experts.cu"; } > "$out/experts_all.inc"
{
  common
  sed 's/^extern __shared__ __align__(16) unsigned char expert_shared\[\];/#define expert_shared (emu_shared_base())/' \
    "$root/kernels/expert_products.cu"
} > "$out/expert_products_all.inc"
# The step's kernels that are not a layer's, in one file: sums, AdamW, the classifier, GELU, add.
{ common; cat "$root"/kernels/{reduce,adamw,classifier,gelu,add}.cu; } > "$out/step_all.inc"
# -Wno-psabi: GCC notes how it passes the 64-byte-aligned tensor maps, which is no fault of the code.
flags=(-std=c++20 -O2 -g -fsanitize=address -Wall -Wno-unused-function -Wno-unknown-pragmas -Wno-psabi
  -I"$here" -I"$out")
g++ "${flags[@]}" -o "$out/test_flash" "$here/test_flash.cpp"
# The kernel file picks some tiles by architecture (__CUDA_ARCH__, undefined here: sm_80's choice); sm_90a's too,
# with the forward on wgmma.
g++ "${flags[@]}" -D__CUDA_ARCH__=900 -D__CUDA_ARCH_FEAT_SM90_ALL -o "$out/test_flash_sm90" "$here/test_flash.cpp"
# The emulation's own synchronisation (mbarriers, tensor copies, named barriers) on a small pipeline, and its faults.
g++ "${flags[@]}" -o "$out/test_sync" "$here/test_sync.cpp"
g++ "${flags[@]}" -o "$out/test_unfused_fp32" "$here/test_unfused.cpp"
g++ "${flags[@]}" -DKILN_BF16 -o "$out/test_unfused_bf16" "$here/test_unfused.cpp"
quiet=(-Wno-strict-aliasing -Wno-maybe-uninitialized)
# The experts' grouped products are bf16 kernels only.
g++ "${flags[@]}" "${quiet[@]}" -DKILN_BF16 -o "$out/test_expert_products" "$here/test_expert_products.cpp"
# The normalisation, rotary, SwiGLU, embedding and mixture-of-experts kernels, and the step's others, each in fp32
# and in bf16.
small=(encoder norm rope swiglu experts step)
for test in "${small[@]}"; do
  g++ "${flags[@]}" "${quiet[@]}" -o "$out/test_${test}_fp32" "$here/test_$test.cpp"
  g++ "${flags[@]}" "${quiet[@]}" -DKILN_BF16 -o "$out/test_${test}_bf16" "$here/test_$test.cpp"
done
"$out/test_flash" "$@"
if [ $# -eq 0 ]; then
  "$out/test_flash_sm90" 64
  "$out/test_flash_sm90" 128
  # At D = 128 a forward tile is 128 keys: 300 take three, so that the stages of the pipelined and the specialised
  # forward are used again.
  "$out/test_flash_sm90" 128 300 pipelined
  "$out/test_flash_sm90" 128 300 specialised
  # At D = 64, 300 queries make five steps of each dkv block, so that the atomic-dQ kernel's dS tiles and dQ rows are
  # used again.
  "$out/test_flash_sm90" 64 300 specialised
  # And with each warpgroup in turn lagging as far behind the others as their synchronisation allows, which a
  # hand-over that relies on the warpgroups keeping pace does not survive.
  for lagging in 0 1 2; do
    EMU_LAG=$lagging "$out/test_flash_sm90" 128 77 specialised
    EMU_LAG=$lagging "$out/test_flash_sm90" 64 130 specialised
  done
  "$out/test_sync"
  "$out/test_unfused_fp32"
  "$out/test_unfused_bf16"
  "$out/test_expert_products"
  for test in "${small[@]}"; do
    "$out/test_${test}_fp32"
    "$out/test_${test}_bf16"
  done
fi
