// Layer normalisation over the channels of each row, optionally fused with the residual add before it.
//
// Forward: μ = mean(x), σ⁻¹ = 1/√(mean((x−μ)²) + 1e-5), n = (x−μ)·σ⁻¹, y = n·w + b; μ and σ⁻¹ saved (fp32).
// Backward, with g = dy·w: dx += σ⁻¹·(g − mean(g) − n·mean(g·n)), dw += Σ_rows dy·n, db += Σ_rows dy.
//
// One warp per row. The backward pass gives each block ROWS_PER_BLOCK rows, accumulates its share of dw and db
// in shared memory, then adds it to the fp32 gradients with one atomic per channel.

#define LN_EPS 1e-5f

// Normalises one row that lane `lane` of a warp reads at x[lane], x[lane+32], ...
__device__ __forceinline__ void normalize_row(floatX* y, float* mean, float* rstd, const floatX* x, const floatX* w,
                                              const floatX* b, int C, int lane) {
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += to_f32(x[c]);
    float mu = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float d = to_f32(x[c]) - mu;
        v += d * d;
    }
    float rs = rsqrtf(warp_sum(v) / C + LN_EPS);
    for (int c = lane; c < C; c += 32) y[c] = to_x((to_f32(x[c]) - mu) * rs * to_f32(w[c]) + to_f32(b[c]));
    if (lane == 0) {
        *mean = mu;
        *rstd = rs;
    }
}

extern "C" __global__ void layernorm_forward(floatX* out, float* mean, float* rstd, const floatX* inp,
                                             const floatX* weight, const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    long o = (long)row * C;
    normalize_row(out + o, mean + row, rstd + row, inp + o, weight, bias, C, threadIdx.x % 32);
}

// residual = a + b, then out = layernorm(residual).
extern "C" __global__ void residual_layernorm_forward(floatX* residual, floatX* out, float* mean, float* rstd,
                                                      const floatX* a, const floatX* b, const floatX* weight,
                                                      const floatX* bias, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    int lane = threadIdx.x % 32;
    long o = (long)row * C;
    for (int c = lane; c < C; c += 32) residual[o + c] = to_x(to_f32(a[o + c]) + to_f32(b[o + c]));
    __syncwarp();
    normalize_row(out + o, mean + row, rstd + row, residual + o, weight, bias, C, lane);
}

// Dynamic shared memory: 2·C floats.
extern "C" __global__ void layernorm_backward(floatX* dinp, float* dweight, float* dbias, const floatX* dout,
                                              const floatX* inp, const floatX* weight, const float* mean,
                                              const float* rstd, int N, int C, int rows_per_block) {
    extern __shared__ float shared[];
    float* sdw = shared;
    float* sdb = shared + C;
    for (int c = threadIdx.x; c < 2 * C; c += blockDim.x) shared[c] = 0.0f;
    __syncthreads();
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int first = blockIdx.x * rows_per_block;
    for (int row = first + warp; row < min(first + rows_per_block, N); row += warps) {
        long o = (long)row * C;
        float mu = mean[row], rs = rstd[row];
        float g_sum = 0.0f, gn_sum = 0.0f;
        for (int c = lane; c < C; c += 32) {
            float g = to_f32(dout[o + c]) * to_f32(weight[c]);
            g_sum += g;
            gn_sum += g * (to_f32(inp[o + c]) - mu) * rs;
        }
        float g_mean = warp_sum(g_sum) / C, gn_mean = warp_sum(gn_sum) / C;
        for (int c = lane; c < C; c += 32) {
            float dy = to_f32(dout[o + c]);
            float n = (to_f32(inp[o + c]) - mu) * rs;
            float g = dy * to_f32(weight[c]);
            dinp[o + c] = to_x(to_f32(dinp[o + c]) + rs * (g - g_mean - n * gn_mean));
            atomicAdd(&sdw[c], dy * n);
            atomicAdd(&sdb[c], dy);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        atomicAdd(&dweight[c], sdw[c]);
        atomicAdd(&dbias[c], sdb[c]);
    }
}
