// GELU after a matrix product whose output is too narrow for cuBLASLt's GELU epilogues (their auxiliary matrix,
// GELU's input, needs a leading dimension divisible by 8): the product writes pre, then these kernels apply GELU
// or its derivative (see common.cuh for the formulas), and sum the derivative's output into a bias gradient as the
// DGELU_BGRAD epilogue would. The elementwise threads take chunks (see Packed in common.cuh) in grid-stride loops:
// any grid covers the data.

// out = gelu(pre).
extern "C" __global__ void gelu_forward(floatX* out, const floatX* pre, long n) {
    typedef Packed<floatX> P;
    for (long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * P::size; i < n;
         i += (long)gridDim.x * blockDim.x * P::size) {
        const int count = min((long)P::size, n - i);
        P x = P::load(pre + i, count), y;
#pragma unroll
        for (int k = 0; k < P::size; k++) y.v[k] = to_x(gelu(to_f32(x.v[k])));
        y.store(out + i, count);
    }
}

// d = d · gelu'(pre), in place: the gradient of GELU's output becomes that of its input.
extern "C" __global__ void gelu_backward(floatX* d, const floatX* pre, long n) {
    typedef Packed<floatX> P;
    for (long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * P::size; i < n;
         i += (long)gridDim.x * blockDim.x * P::size) {
        const int count = min((long)P::size, n - i);
        P x = P::load(pre + i, count), g = P::load(d + i, count);
#pragma unroll
        for (int k = 0; k < P::size; k++) g.v[k] = to_x(to_f32(g.v[k]) * gelu_grad(to_f32(x.v[k])));
        g.store(d + i, count);
    }
}

#define BIAS_GRAD_LANES 32
#define BIAS_GRAD_ROWS 16

// dbias[c] += Σ_rows d[row][c] over a (rows × C) matrix, in a fixed order: a block of BIAS_GRAD_LANES ×
// BIAS_GRAD_ROWS threads takes BIAS_GRAD_LANES neighbouring columns; thread row r sums rows r, r + BIAS_GRAD_ROWS,
// ... in turn, and the first row adds the rows' sums in row order.
extern "C" __global__ void __launch_bounds__(BIAS_GRAD_LANES * BIAS_GRAD_ROWS)
    gelu_bias_gradient(float* dbias, const floatX* d, long rows, int C) {
    __shared__ float sums[BIAS_GRAD_ROWS][BIAS_GRAD_LANES];
    const int lane = threadIdx.x % BIAS_GRAD_LANES, r = threadIdx.x / BIAS_GRAD_LANES;
    const int c = blockIdx.x * BIAS_GRAD_LANES + lane;
    float s = 0.0f;
    if (c < C)
        for (long row = r; row < rows; row += BIAS_GRAD_ROWS) s += to_f32(d[row * C + c]);
    sums[r][lane] = s;
    __syncthreads();
    if (r > 0 || c >= C) return;
    for (int k = 1; k < BIAS_GRAD_ROWS; k++) s += sums[k][lane];
    dbias[c] += s;
}
