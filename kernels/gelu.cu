// GELU where it is not fused into a matrix product's epilogue (see common.cuh for the formula).

extern "C" __global__ void gelu_forward(floatX* out, const floatX* inp, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = to_x(gelu(to_f32(inp[i])));
}

// dinp = dout · gelu'(pre), in place over dout.
extern "C" __global__ void gelu_backward(floatX* d, const floatX* pre, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = to_x(to_f32(d[i]) * gelu_grad(to_f32(pre[i])));
}
