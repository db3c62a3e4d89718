// GELU after a matrix product whose output is too narrow for cuBLASLt's GELU epilogues (their auxiliary matrix,
// GELU's input, needs a leading dimension divisible by 8): the product writes pre, then these kernels apply GELU
// or its derivative (see common.cuh for the formulas); column_sums_x (reduce.cu) sums the derivative's output into a
// bias gradient where the DGELU_BGRAD epilogue would. Threads take chunks (see Packed in common.cuh) in grid-stride
// loops: any grid covers the data.

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
