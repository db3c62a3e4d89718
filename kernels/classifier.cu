// Softmax cross-entropy fused with its gradient, one block per row, never materialising probabilities.
//
// For logits z over the real vocabulary V (the padded columns up to Vp are excluded) and target y:
// loss = log Σ_i e^{z_i} − z_y, added to losses[row] (fp32). With a dloss (one fp32 value in device memory, so
// that a captured graph reads each step's), the logits are replaced in place by dloss·(softmax(z) − onehot(y)),
// and the padded columns by zero; with a null dloss they are left as they are. Rows whose target is IGNORE_TARGET
// add no loss and get a zero gradient.
//
// Thread t handles the row's chunks t, t + blockDim.x, ... (see Packed in common.cuh).
extern "C" __global__ void classifier(floatX* logits, float* losses, const unsigned* targets, int V, int Vp,
                                      const float* dloss) {
    typedef Packed<floatX> P;
    __shared__ float scratch[32];
    const long o = (long)blockIdx.x * Vp;
    const unsigned y = targets[blockIdx.x];
    // Online log-sum-exp: each thread keeps a running max and the sum of exponentials relative to it.
    float m = NEG_INF, s = 0.0f;
    for (int c = threadIdx.x * P::size; c < V; c += blockDim.x * P::size) {
        const int count = min(P::size, V - c);
        P zs = P::load(logits + o + c, count);
#pragma unroll
        for (int k = 0; k < P::size; k++) {
            if (k >= count) break;
            float z = to_f32(zs.v[k]);
            float m_new = fmaxf(m, z);
            s = s * expf(m - m_new) + expf(z - m_new);
            m = m_new;
        }
    }
    float row_max = block_max(m, scratch);
    float total = block_sum(s * expf(m - row_max), scratch);
    float lse = row_max + logf(total);
    const bool ignored = y == IGNORE_TARGET;
    if (threadIdx.x == 0 && !ignored) losses[blockIdx.x] += lse - to_f32(logits[o + y]);
    if (!dloss) return;
    const float scale = *dloss;
    __syncthreads();  // every thread has read logits[o + y] before any overwrites it
    for (int c = threadIdx.x * P::size; c < Vp; c += blockDim.x * P::size) {
        const int count = min(P::size, Vp - c);
        P zs = P::load(logits + o + c, count), gs;
#pragma unroll
        for (int k = 0; k < P::size; k++) {
            const int i = c + k;
            float g = 0.0f;
            if (!ignored && i < V) g = (expf(to_f32(zs.v[k]) - lse) - (i == (int)y ? 1.0f : 0.0f)) * scale;
            gs.v[k] = to_x(g);
        }
        gs.store(logits + o + c, count);
    }
}
