// RMS normalisation over the channels of each row (Llama's), optionally fused with the residual add before it.
//
// Forward: r = 1/√(mean(x²) + ε), y = x·r·w; r saved (fp32). No mean, no bias.
// Backward, with g = dy·w and n = x·r: dx += r·(g − n·mean(g·n)), dw += Σ_rows dy·n. It runs on layernorm.cu's
// backward kernels, which take a null mean for it (the formula is layer normalisation's with μ = 0 and no mean(g)).
//
// One warp per row; lane l handles the row's chunks l, l+32, ... (see Packed in common.cuh).

typedef Packed<floatX> RmsChunk;

// Normalises one row; lane `lane` of a warp handles its chunks.
__device__ __forceinline__ void rms_normalize_row(floatX* y, float* rstd, const floatX* x, const floatX* w, int C,
                                                  float eps, int lane) {
    float s = 0.0f;
    for (int c = lane * RmsChunk::size; c < C; c += 32 * RmsChunk::size) {
        const int count = min(RmsChunk::size, C - c);
        RmsChunk xs = RmsChunk::load(x + c, count);
#pragma unroll
        for (int k = 0; k < RmsChunk::size; k++) s += to_f32(xs.v[k]) * to_f32(xs.v[k]);
    }
    const float r = rsqrtf(warp_sum(s) / C + eps);
    for (int c = lane * RmsChunk::size; c < C; c += 32 * RmsChunk::size) {
        const int count = min(RmsChunk::size, C - c);
        RmsChunk xs = RmsChunk::load(x + c, count), ws = RmsChunk::load(w + c, count), ys;
#pragma unroll
        for (int k = 0; k < RmsChunk::size; k++) ys.v[k] = to_x(to_f32(xs.v[k]) * r * to_f32(ws.v[k]));
        ys.store(y + c, count);
    }
    if (lane == 0) *rstd = r;
}

extern "C" __global__ void rmsnorm_forward(floatX* out, float* rstd, const floatX* inp, const floatX* weight, int N,
                                           int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    long o = (long)row * C;
    rms_normalize_row(out + o, rstd + row, inp + o, weight, C, eps, threadIdx.x % 32);
}

// residual = a + b, then out = rmsnorm(residual).
extern "C" __global__ void residual_rmsnorm_forward(floatX* residual, floatX* out, float* rstd, const floatX* a,
                                                    const floatX* b, const floatX* weight, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    int lane = threadIdx.x % 32;
    long o = (long)row * C;
    residual_add_row(residual + o, a + o, b + o, C, lane);
    rms_normalize_row(out + o, rstd + row, residual + o, weight, C, eps, lane);
}
