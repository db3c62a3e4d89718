// The bias gradient of a matrix product, added into the accumulated one: cuBLASLt's bias-gradient epilogue writes
// it (fp32) to scratch, because the epilogue overwrites its output while gradients add up over micro-batches.

// dbias[c] += grad[c], one thread per channel.
extern "C" __global__ void bias_grad_accumulate(float* dbias, const float* grad, int n) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < n) dbias[c] += grad[c];
}
