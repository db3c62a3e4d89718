// Layer normalisation over the channels of each row, optionally fused with the residual add before it.
//
// Forward: μ = mean(x), σ⁻¹ = 1/√(mean((x−μ)²) + ε), n = (x−μ)·σ⁻¹, y = n·w + b; μ and σ⁻¹ saved (fp32).
// Backward, with g = dy·w: dx += σ⁻¹·(g − mean(g) − n·mean(g·n)), dw += Σ_rows dy·n, db += Σ_rows dy.
//
// The backward kernels serve RMS normalisation too (rmsnorm.cu): given no mean they take μ = 0 and drop the mean(g)
// term, which is RMS normalisation's gradient, dx += r·(g − n·mean(g·n)) with n = x·r, and they write no db.
//
// One warp per row; lane l handles the row's chunks l, l+32, ... (see Packed in common.cuh). The backward pass
// gives each block rows_per_block rows; each warp sums its rows' share of dw and db (and when asked, of dx) in
// shared memory, the block adds its warps' sums in order into partials[block], and a second kernel adds the blocks'
// partials in order: no atomics, so the result is deterministic.

typedef Packed<floatX> LnChunk;

// Normalises one row; lane `lane` of a warp handles its chunks.
__device__ __forceinline__ void normalize_row(floatX* y, float* mean, float* rstd, const floatX* x, const floatX* w,
                                              const floatX* b, int C, float eps, int lane) {
    float s = 0.0f;
    for (int c = lane * LnChunk::size; c < C; c += 32 * LnChunk::size) {
        const int count = min(LnChunk::size, C - c);
        LnChunk xs = LnChunk::load(x + c, count);
#pragma unroll
        for (int k = 0; k < LnChunk::size; k++)
            if (k < count) s += to_f32(xs.v[k]);
    }
    float mu = warp_sum(s) / C;
    float v = 0.0f;
    for (int c = lane * LnChunk::size; c < C; c += 32 * LnChunk::size) {
        const int count = min(LnChunk::size, C - c);
        LnChunk xs = LnChunk::load(x + c, count);
#pragma unroll
        for (int k = 0; k < LnChunk::size; k++) {
            float d = to_f32(xs.v[k]) - mu;
            if (k < count) v += d * d;
        }
    }
    float rs = rsqrtf(warp_sum(v) / C + eps);
    for (int c = lane * LnChunk::size; c < C; c += 32 * LnChunk::size) {
        const int count = min(LnChunk::size, C - c);
        LnChunk xs = LnChunk::load(x + c, count), ws = LnChunk::load(w + c, count), bs = LnChunk::load(b + c, count);
        LnChunk ys;
#pragma unroll
        for (int k = 0; k < LnChunk::size; k++)
            ys.v[k] = to_x((to_f32(xs.v[k]) - mu) * rs * to_f32(ws.v[k]) + to_f32(bs.v[k]));
        ys.store(y + c, count);
    }
    if (lane == 0) {
        *mean = mu;
        *rstd = rs;
    }
}

extern "C" __global__ void layernorm_forward(floatX* out, float* mean, float* rstd, const floatX* inp,
                                             const floatX* weight, const floatX* bias, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    long o = (long)row * C;
    normalize_row(out + o, mean + row, rstd + row, inp + o, weight, bias, C, eps, threadIdx.x % 32);
}

// residual = a + b, then out = layernorm(residual).
extern "C" __global__ void residual_layernorm_forward(floatX* residual, floatX* out, float* mean, float* rstd,
                                                      const floatX* a, const floatX* b, const floatX* weight,
                                                      const floatX* bias, int N, int C, float eps) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    int lane = threadIdx.x % 32;
    long o = (long)row * C;
    residual_add_row(residual + o, a + o, b + o, C, lane);
    normalize_row(out + o, mean + row, rstd + row, residual + o, weight, bias, C, eps, lane);
}

// Where a warp's running sum for `channel` sits among its shared floats: chunk-major within each position of a chunk,
// so that the 32 lanes, each adding to the same position of its own chunk, touch 32 consecutive floats (32 banks)
// instead of floats LnChunk::size apart (an LnChunk::size-way bank conflict).
__device__ __forceinline__ int ln_slot(int channel, int chunks) {
    return channel % LnChunk::size * chunks + channel / LnChunk::size;
}

// With sum_dinp, the sums of dinp's columns after the add too: dinp is the residual stream's gradient, and its column
// sums are the bias gradient of the projection whose output the residual add took (Σ_rows dx, the values stored).
//
// Dynamic shared memory: `sums` × padded floats per warp (dw's sums, db's, then with sum_dinp dx's), padded = C
// rounded up to a whole chunk, sums = 3 with sum_dinp and 2 without. partials holds sums·C floats per block in that
// order, each in channel order. A null mean is RMS normalisation.
extern "C" __global__ void layernorm_backward(floatX* dinp, float* partials, const floatX* dout, const floatX* inp,
                                              const floatX* weight, const float* mean, const float* rstd, int N, int C,
                                              int rows_per_block, int sum_dinp) {
    extern __shared__ float shared[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int chunks = (C + LnChunk::size - 1) / LnChunk::size, padded = chunks * LnChunk::size;
    const int sums = sum_dinp ? 3 : 2;
    float* sdw = shared + warp * sums * padded;
    float* sdb = sdw + padded;
    float* sdx = sdb + padded;
    // Each lane owns the channels of its chunks, here and below: no other thread touches them until the block
    // synchronises.
    for (int c = lane * LnChunk::size; c < C; c += 32 * LnChunk::size)
        for (int k = 0; k < LnChunk::size; k++)
            for (int s = 0; s < sums; s++) sdw[s * padded + ln_slot(c + k, chunks)] = 0.0f;
    const int first = blockIdx.x * rows_per_block;
    for (int row = first + warp; row < min(first + rows_per_block, N); row += warps) {
        long o = (long)row * C;
        float mu = mean ? mean[row] : 0.0f, rs = rstd[row];
        float g_sum = 0.0f, gn_sum = 0.0f;
        for (int c = lane * LnChunk::size; c < C; c += 32 * LnChunk::size) {
            const int count = min(LnChunk::size, C - c);
            LnChunk dy = LnChunk::load(dout + o + c, count), xs = LnChunk::load(inp + o + c, count),
                    ws = LnChunk::load(weight + c, count);
#pragma unroll
            for (int k = 0; k < LnChunk::size; k++) {
                float g = to_f32(dy.v[k]) * to_f32(ws.v[k]);
                if (k < count) {
                    g_sum += g;
                    gn_sum += g * (to_f32(xs.v[k]) - mu) * rs;
                }
            }
        }
        float g_mean = warp_sum(g_sum) / C, gn_mean = warp_sum(gn_sum) / C;
        if (!mean) g_mean = 0.0f;
        for (int c = lane * LnChunk::size; c < C; c += 32 * LnChunk::size) {
            const int count = min(LnChunk::size, C - c);
            LnChunk dy = LnChunk::load(dout + o + c, count), xs = LnChunk::load(inp + o + c, count),
                    ws = LnChunk::load(weight + c, count), dx = LnChunk::load(dinp + o + c, count);
#pragma unroll
            for (int k = 0; k < LnChunk::size; k++) {
                float d = to_f32(dy.v[k]);
                float n = (to_f32(xs.v[k]) - mu) * rs;
                float g = d * to_f32(ws.v[k]);
                dx.v[k] = to_x(to_f32(dx.v[k]) + rs * (g - g_mean - n * gn_mean));
                if (k < count) {
                    sdw[ln_slot(c + k, chunks)] += d * n;
                    sdb[ln_slot(c + k, chunks)] += d;
                    if (sum_dinp) sdx[ln_slot(c + k, chunks)] += to_f32(dx.v[k]);
                }
            }
            dx.store(dinp + o + c, count);
        }
    }
    __syncthreads();
    float* out = partials + (long)blockIdx.x * sums * C;
    for (int c = threadIdx.x; c < sums * C; c += blockDim.x) {
        const int slot = c / C * padded + ln_slot(c % C, chunks);
        float s = 0.0f;
        for (int w = 0; w < warps; w++) s += shared[w * sums * padded + slot];
        out[c] = s;
    }
}

// dweight[c] += Σ_blocks partials[block][c], the same for dbias, and with a dinp_sums (written, not added to) the
// same for dx, in column_sum's fixed order (common.cuh), a block of its shape taking COLUMN_SUM_LANES of the sums·C
// channels. RMS normalisation has no bias: a null dbias.
extern "C" __global__ void __launch_bounds__(COLUMN_SUM_LANES * COLUMN_SUM_ROWS)
    layernorm_backward_sum(float* dweight, float* dbias, float* dinp_sums, const float* partials, int blocks, int C) {
    __shared__ float scratch[COLUMN_SUM_ROWS * COLUMN_SUM_LANES];
    const int width = (dinp_sums ? 3 : 2) * C, c = blockIdx.x * COLUMN_SUM_LANES + threadIdx.x;
    const float s = column_sum(partials, blocks, width, scratch);
    if (threadIdx.x >= COLUMN_SUM_LANES || c >= width) return;
    if (c < C) dweight[c] += s;
    else if (c < 2 * C) { if (dbias) dbias[c - C] += s; }
    else dinp_sums[c - 2 * C] = s;
}
