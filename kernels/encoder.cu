// Token and position embeddings.
//
// Forward: out[b,t,:] = wte[tok[b,t],:] + wpe[t,:].
// Backward: dwte[tok[b,t],:] += dout[b,t,:] and dwpe[t,:] += dout[b,t,:], summed over (b, t). The weight
// gradients are fp32, and both sums run in a fixed order, without atomics, so they are deterministic: dwpe by one
// thread per (t, chunk of channels) over the batch, dwte by one thread per channel over every position (a token
// can appear anywhere in the batch).
//
// Rows are cut into chunks (see Packed in common.cuh), which threads take in grid-stride loops: any grid covers
// the data.

// A chunk of a row of out per thread and iteration.
extern "C" __global__ void encoder_forward(floatX* out, const unsigned* tokens, const floatX* wte, const floatX* wpe,
                                           int B, int T, int C) {
    typedef Packed<floatX> P;
    const int chunks = (C + P::size - 1) / P::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < (long)B * T * chunks;
         j += (long)gridDim.x * blockDim.x) {
        const long row = j / chunks;
        const int c = j % chunks * P::size, count = min(P::size, C - c), t = row % T;
        P e = P::load(wte + (long)tokens[row] * C + c, count), p = P::load(wpe + (long)t * C + c, count), o;
#pragma unroll
        for (int k = 0; k < P::size; k++) o.v[k] = to_x(to_f32(e.v[k]) + to_f32(p.v[k]));
        o.store(out + row * C + c, count);
    }
}

// A chunk of 4 channels of dwpe (16 bytes of fp32) per thread and iteration: a deterministic sum over the batch.
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const floatX* dout, int B, int T, int C) {
    typedef Packed<float> G;
    typedef Packed<floatX, G::size> D;
    const int chunks = (C + G::size - 1) / G::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < (long)T * chunks;
         j += (long)gridDim.x * blockDim.x) {
        const int t = j / chunks, c = j % chunks * G::size, count = min(G::size, C - c);
        float acc[G::size] = {};
        for (int b = 0; b < B; b++) {
            D d = D::load(dout + ((long)b * T + t) * C + c, count);
#pragma unroll
            for (int k = 0; k < G::size; k++) acc[k] += to_f32(d.v[k]);
        }
        G g = G::load(dwpe + (long)t * C + c, count);
#pragma unroll
        for (int k = 0; k < G::size; k++) g.v[k] += acc[k];
        g.store(dwpe + (long)t * C + c, count);
    }
}

// One thread per channel, over every position in order: neighbouring threads update neighbouring addresses.
// Scalar on purpose: its time is the serial walk over the positions, one dependent access after another, which
// wider accesses would not shorten.
extern "C" __global__ void encoder_backward_wte(float* dwte, const floatX* dout, const unsigned* tokens, int B, int T,
                                               int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (long row = 0; row < (long)B * T; row++) dwte[(long)tokens[row] * C + c] += to_f32(dout[row * C + c]);
}
