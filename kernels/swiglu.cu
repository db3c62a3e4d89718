// SwiGLU, the gated MLP nonlinearity of Llama-style models, on the output of one fused gate-and-up product.
//
// Each input row is [gate | up], 2·F channels. Forward: y = silu(gate)·up, silu(x) = x·σ(x), σ(x) = 1/(1 + e^−x).
// Backward: dgate = dy·up·silu'(gate), silu'(x) = σ(x)·(1 + x·(1 − σ(x))), and dup = dy·silu(gate).
//
// Threads take chunks of a row of F outputs (see Packed in common.cuh) in grid-stride loops: any grid covers the
// data, and a chunk never straddles two rows, so gate and up are found from the chunk's row.

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Chunk j of the rows' outputs (chunks of a row each): its row, first channel and size, and its gate and up values.
template <typename P>
struct GatedChunk {
    long row;
    int c, count;
    P gate, up;

    __device__ GatedChunk(const floatX* inp, long j, int chunks, int F) {
        row = j / chunks;
        c = j % chunks * P::size;
        count = min(P::size, F - c);
        const floatX* g = inp + row * 2 * F + c;
        gate = P::load(g, count);
        up = P::load(g + F, count);
    }
};

extern "C" __global__ void swiglu_forward(floatX* out, const floatX* inp, long rows, int F) {
    typedef Packed<floatX> P;
    const int chunks = (F + P::size - 1) / P::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < rows * chunks; j += (long)gridDim.x * blockDim.x) {
        const GatedChunk<P> h(inp, j, chunks, F);
        P y;
#pragma unroll
        for (int k = 0; k < P::size; k++) {
            const float x = to_f32(h.gate.v[k]);
            y.v[k] = to_x(x * sigmoid(x) * to_f32(h.up.v[k]));
        }
        y.store(out + h.row * F + h.c, h.count);
    }
}

extern "C" __global__ void swiglu_backward(floatX* dinp, const floatX* dout, const floatX* inp, long rows, int F) {
    typedef Packed<floatX> P;
    const int chunks = (F + P::size - 1) / P::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < rows * chunks; j += (long)gridDim.x * blockDim.x) {
        const GatedChunk<P> h(inp, j, chunks, F);
        P dy = P::load(dout + h.row * F + h.c, h.count), dg, du;
#pragma unroll
        for (int k = 0; k < P::size; k++) {
            const float x = to_f32(h.gate.v[k]), s = sigmoid(x), d = to_f32(dy.v[k]);
            dg.v[k] = to_x(d * to_f32(h.up.v[k]) * s * (1.0f + x * (1.0f - s)));
            du.v[k] = to_x(d * x * s);
        }
        floatX* dgate = dinp + h.row * 2 * F + h.c;
        dg.store(dgate, h.count);
        du.store(dgate + F, h.count);
    }
}
