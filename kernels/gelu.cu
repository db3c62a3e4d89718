// The GELU backward pass after a matrix product (see common.cuh for the formula); its forward pass runs in
// bias.cu's bias_act, after the product that feeds it.

// dinp = dout · gelu'(pre), in place over dout.
extern "C" __global__ void gelu_backward(floatX* d, const floatX* pre, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = to_x(to_f32(d[i]) * gelu_grad(to_f32(pre[i])));
}
