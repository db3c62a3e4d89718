// Bias (and GELU) after a matrix product, and the bias gradient: what a fused GEMM epilogue would do, as
// separate passes until the matrix products move to cuBLASLt's epilogues.

// x[r, c] += bias[c]; then, when out is not null, out = gelu(x) (x keeps the pre-activation). One thread per
// element of the (rows, cols) matrix.
extern "C" __global__ void bias_act(floatX* x, floatX* out, const floatX* bias, long rows, int cols) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    float v = to_f32(x[i]) + (bias ? to_f32(bias[i % cols]) : 0.0f);
    x[i] = to_x(v);
    if (out) out[i] = to_x(gelu(to_f32(x[i])));
}

// dbias[c] += Σ_r dout[r, c]: one thread per column, rows in order (deterministic; neighbouring threads read
// neighbouring addresses).
extern "C" __global__ void bias_grad(float* dbias, const floatX* dout, long rows, int cols) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (long r = 0; r < rows; r++) s += to_f32(dout[r * cols + c]);
    dbias[c] += s;
}
