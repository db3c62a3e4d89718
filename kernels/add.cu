// dst += src in fp32. Two uses: a matrix product's bias gradient, which cuBLASLt's epilogue writes to scratch
// because it overwrites its output while gradients add up over micro-batches; and a ZeRO stage 2 rank's reduced
// piece of a block's gradients, added into the share of the gradients it keeps.

// dst[i] += src[i], in a grid-stride loop: any grid covers the data.
extern "C" __global__ void add_f32(float* dst, const float* src, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        dst[i] += src[i];
    }
}
