#!/usr/bin/env bash
# The project's tests. Besides Rust they need NVRTC and the CUDA headers, to compile every kernel (no GPU needed):
# on first use this installs pip's nvidia-cuda-nvrtc and nvidia-cuda-runtime wheels into target/cuda-wheels,
# pinned to 13.0.88, the NVRTC of the GPU machine the kernels are checked on. Then the attention, normalisation,
# rotary, SwiGLU and embedding kernels, and the step's sums, AdamW, classifier, GELU and add, run under the CPU
# emulation of CUDA against a double-precision reference
# (scripts/emulate/README.md; needs g++ with AddressSanitizer). Arguments go to cargo test and select tests: with
# any, the emulation is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=$PWD/target/cuda-wheels
cu13=$wheels/nvidia/cu13
if [ ! -f "$cu13/lib/libnvrtc.so.13" ] || [ ! -f "$cu13/include/cuda_bf16.h" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$wheels" \
    nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.88
fi
export LD_LIBRARY_PATH=$cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_HOME=$cu13
cargo test --release --workspace "$@"
if [ $# -eq 0 ]; then
  scripts/emulate/run.sh
fi
