// RMS normalisation over the channels of each row (Llama's), optionally fused with the residual add before it.
//
// Forward: r = 1/√(mean(x²) + ε), y = x·r·w; r saved (fp32). No mean, no bias.
// Backward, with g = dy·w and n = x·r: dx += r·(g − n·mean(g·n)), dw += Σ_rows dy·n. It runs on layernorm.cu's
// backward kernels, which take a null mean for it (the formula is layer normalisation's with μ = 0 and no mean(g)).
//
// One warp per row; lane l handles the row's chunks l, l+32, ... (see Packed in common.cuh).
//
// QK-norm (Qwen3's) is this normalisation of each query and key head of a packed qkv row, `head_dim` channels each,
// with one weight for the query heads (weight[0, head_dim)) and one for the key heads (weight[head_dim, 2·head_dim)),
// before the rotary embedding. Forward: one warp per head, value heads copied. Backward, in place on dqkv:
// dx = r·(g − n·mean(g·n)) with g = dy·w, n = x·r, and the two weights' gradients summed as layernorm_backward sums
// dw: by warp in shared memory, by block into partials, then column_sums (reduce.cu) over the blocks in order.

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

// Rows are `rows` packed qkv rows of heads + 2·kv_heads heads; rstd gets heads + kv_heads values a row.
extern "C" __global__ void qk_norm_forward(floatX* out, float* rstd, const floatX* inp, const floatX* weight, long rows,
                                           int heads, int kv_heads, int head_dim, float eps) {
    const long head_row = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32, all = heads + 2 * kv_heads, normed = heads + kv_heads;
    if (head_row >= rows * all) return;
    const long row = head_row / all, o = head_row * head_dim;
    const int head = head_row % all;
    if (head < normed) {
        const floatX* w = weight + (head < heads ? 0 : head_dim);
        rms_normalize_row(out + o, rstd + row * normed + head, inp + o, w, head_dim, eps, lane);
    } else {
        for (int c = lane * RmsChunk::size; c < head_dim; c += 32 * RmsChunk::size) {
            const int count = min(RmsChunk::size, head_dim - c);
            RmsChunk::load(inp + o + c, count).store(out + o + c, count);
        }
    }
}

// Each block takes rows_per_block rows, its warps their normalised heads in turn. Dynamic shared memory: 2 × padded
// floats a warp (the query weight's sums, then the key weight's), padded = head_dim rounded up to a whole chunk;
// partials gets 2·head_dim floats a block, the query weight's first.
extern "C" __global__ void qk_norm_backward(floatX* dqkv, float* partials, const floatX* inp, const floatX* weight,
                                            const float* rstd, long rows, int heads, int kv_heads, int head_dim,
                                            int rows_per_block) {
    extern __shared__ float shared[];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    const int normed = heads + kv_heads, all = heads + 2 * kv_heads;
    const int padded = (head_dim + RmsChunk::size - 1) / RmsChunk::size * RmsChunk::size;
    float* sdw = shared + warp * 2 * padded;
    // Each lane owns the channels of its chunks, here and below, until the block synchronises.
    for (int c = lane * RmsChunk::size; c < head_dim; c += 32 * RmsChunk::size)
        for (int k = 0; k < RmsChunk::size; k++) sdw[c + k] = sdw[padded + c + k] = 0.0f;
    const long first = (long)blockIdx.x * rows_per_block, last = min(first + rows_per_block, rows);
    for (long j = first * normed + warp; j < last * normed; j += warps) {
        const long row = j / normed;
        const int head = j % normed;
        const bool key = head >= heads;
        const long o = (row * all + head) * head_dim;
        const floatX* w = weight + (key ? head_dim : 0);
        float* dw = sdw + (key ? padded : 0);
        const float rs = rstd[j];
        float gn = 0.0f;
        for (int c = lane * RmsChunk::size; c < head_dim; c += 32 * RmsChunk::size) {
            const int count = min(RmsChunk::size, head_dim - c);
            RmsChunk dy = RmsChunk::load(dqkv + o + c, count), xs = RmsChunk::load(inp + o + c, count),
                     ws = RmsChunk::load(w + c, count);
#pragma unroll
            for (int k = 0; k < RmsChunk::size; k++) gn += to_f32(dy.v[k]) * to_f32(ws.v[k]) * (to_f32(xs.v[k]) * rs);
        }
        const float gn_mean = warp_sum(gn) / head_dim;
        for (int c = lane * RmsChunk::size; c < head_dim; c += 32 * RmsChunk::size) {
            const int count = min(RmsChunk::size, head_dim - c);
            RmsChunk dy = RmsChunk::load(dqkv + o + c, count), xs = RmsChunk::load(inp + o + c, count),
                     ws = RmsChunk::load(w + c, count), dx;
#pragma unroll
            for (int k = 0; k < RmsChunk::size; k++) {
                const float d = to_f32(dy.v[k]), n = to_f32(xs.v[k]) * rs;
                dx.v[k] = to_x(rs * (d * to_f32(ws.v[k]) - n * gn_mean));
                if (k < count) dw[c + k] += d * n;
            }
            dx.store(dqkv + o + c, count);
        }
    }
    __syncthreads();
    float* out = partials + (long)blockIdx.x * 2 * head_dim;
    for (int c = threadIdx.x; c < 2 * head_dim; c += blockDim.x) {
        const int slot = c / head_dim * padded + c % head_dim;
        float s = 0.0f;
        for (int w = 0; w < warps; w++) s += shared[w * 2 * padded + slot];
        out[c] = s;
    }
}
