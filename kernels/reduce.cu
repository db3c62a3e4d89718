// Sums over a whole vector (the loss, the squared gradient norm; a parameter tensor in its working precision),
// deterministic: a fixed grid of blocks each reduces a fixed stride of the input into partials[block], then one block
// adds the partials in order, in fp32. And sums of a matrix's columns (bias gradients), deterministic too.

// squares != 0 sums x², otherwise x. Each thread reads chunks of 16 bytes (see Packed in common.cuh).
template <typename T>
__device__ __forceinline__ void reduce_partials_of(float* partials, const T* x, long n, int squares) {
    typedef Packed<T> P;
    __shared__ float scratch[32];
    float s = 0.0f;
    for (long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * P::size; i < n;
         i += (long)gridDim.x * blockDim.x * P::size) {
        const int count = min((long)P::size, n - i);
        P xs = P::load(x + i, count);
#pragma unroll
        for (int k = 0; k < P::size; k++) {
            float v = to_f32(xs.v[k]);
            if (k < count) s += squares ? v * v : v;
        }
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

extern "C" __global__ void reduce_partials(float* partials, const float* x, long n, int squares) {
    reduce_partials_of(partials, x, n, squares);
}

// The same over the working precision's elements (bf16 in a bf16 build: parameters, activations).
extern "C" __global__ void reduce_partials_x(float* partials, const floatX* x, long n, int squares) {
    reduce_partials_of(partials, x, n, squares);
}

// One block: out[0] = Σ partials[0..count).
extern "C" __global__ void reduce_final(float* out, const float* partials, int count) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partials[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = s;
}

// sums[c] += Σ_rows m[row][c] over a (rows × C) matrix, in column_sum's order (common.cuh), a block of its shape
// taking COLUMN_SUM_LANES columns.
template <typename T>
__device__ __forceinline__ void add_column_sums(float* sums, const T* m, long rows, int C) {
    __shared__ float scratch[COLUMN_SUM_ROWS * COLUMN_SUM_LANES];
    const float s = column_sum(m, rows, C, scratch);
    const int c = blockIdx.x * COLUMN_SUM_LANES + threadIdx.x;
    if (threadIdx.x < COLUMN_SUM_LANES && c < C) sums[c] += s;
}

// Of fp32 partial sums (the fused attention's, of dqkv).
extern "C" __global__ void __launch_bounds__(COLUMN_SUM_LANES * COLUMN_SUM_ROWS)
    column_sums(float* sums, const float* m, long rows, int C) {
    add_column_sums(sums, m, rows, C);
}

// Of a matrix in the working precision (a gradient, where no kernel before summed it).
extern "C" __global__ void __launch_bounds__(COLUMN_SUM_LANES * COLUMN_SUM_ROWS)
    column_sums_x(float* sums, const floatX* m, long rows, int C) {
    add_column_sums(sums, m, rows, C);
}
