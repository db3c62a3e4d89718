// GELU after a matrix product whose output is too narrow for cuBLASLt's GELU epilogues (their auxiliary matrix,
// GELU's input, needs a leading dimension divisible by 8): the product writes pre, then these kernels apply GELU
// or its derivative (see common.cuh for the formulas). Grid-stride loops: any grid covers n.

// out = gelu(pre).
extern "C" __global__ void gelu_forward(floatX* out, const floatX* pre, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = to_x(gelu(to_f32(pre[i])));
}

// d = d · gelu'(pre), in place: the gradient of GELU's output becomes that of its input.
extern "C" __global__ void gelu_backward(floatX* d, const floatX* pre, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        d[i] = to_x(to_f32(d[i]) * gelu_grad(to_f32(pre[i])));
}
