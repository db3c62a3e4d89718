// Layer normalisation over the channels of each row, optionally fused with the residual add before it.
//
// Forward: μ = mean(x), σ⁻¹ = 1/√(mean((x−μ)²) + 1e-5), n = (x−μ)·σ⁻¹, y = n·w + b; μ and σ⁻¹ saved (fp32).
// Backward, with g = dy·w: dx += σ⁻¹·(g − mean(g) − n·mean(g·n)), dw += Σ_rows dy·n, db += Σ_rows dy.
//
// One warp per row. The backward pass gives each block rows_per_block rows; each warp sums its rows' share of
// dw and db in shared memory, the block adds its warps' sums in order into partials[block], and a second kernel
// adds the blocks' partials in order: no atomics, so the result is deterministic.

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

// Dynamic shared memory: 2·C floats per warp. partials holds 2·C floats per block (dw, then db).
extern "C" __global__ void layernorm_backward(floatX* dinp, float* partials, const floatX* dout, const floatX* inp,
                                              const floatX* weight, const float* mean, const float* rstd, int N, int C,
                                              int rows_per_block) {
    extern __shared__ float shared[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    float* sdw = shared + warp * 2 * C;
    float* sdb = sdw + C;
    for (int c = lane; c < C; c += 32) sdw[c] = sdb[c] = 0.0f;
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
            sdw[c] += dy * n;  // each lane owns its channels: no other thread touches them
            sdb[c] += dy;
        }
    }
    __syncthreads();
    float* out = partials + (long)blockIdx.x * 2 * C;
    for (int c = threadIdx.x; c < 2 * C; c += blockDim.x) {
        float s = 0.0f;
        for (int w = 0; w < warps; w++) s += shared[w * 2 * C + c];
        out[c] = s;
    }
}

// dweight[c] += Σ_blocks partials[block][c], and the same for dbias, blocks in order: one thread per channel.
extern "C" __global__ void layernorm_backward_sum(float* dweight, float* dbias, const float* partials, int blocks,
                                                  int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= 2 * C) return;
    float s = 0.0f;
    for (int b = 0; b < blocks; b++) s += partials[(long)b * 2 * C + c];
    if (c < C) dweight[c] += s; else dbias[c - C] += s;
}
