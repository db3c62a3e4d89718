// Token and position embeddings.
//
// Forward: out[b,t,:] = wte[tok[b,t],:] + wpe[t,:].
// Backward: dwte[tok[b,t],:] += dout[b,t,:] and dwpe[t,:] += dout[b,t,:], summed over (b, t). The weight
// gradients are fp32, and both sums run in a fixed order, without atomics, so they are deterministic: dwpe by one
// thread per (t, c) over the batch, dwte by one thread per channel over every position (a token can appear
// anywhere in the batch).

// One thread per output element.
extern "C" __global__ void encoder_forward(floatX* out, const unsigned* tokens, const floatX* wte, const floatX* wpe,
                                           int B, int T, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * T * C) return;
    int c = i % C;
    long row = i / C;
    int t = row % T;
    out[i] = to_x(to_f32(wte[(long)tokens[row] * C + c]) + to_f32(wpe[(long)t * C + c]));
}

// One thread per element of dwpe: a deterministic sum over the batch.
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const floatX* dout, int B, int T, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)T * C) return;
    float acc = 0.0f;
    for (int b = 0; b < B; b++) acc += to_f32(dout[(long)b * T * C + i]);
    dwpe[i] += acc;
}

// One thread per channel, over every position in order: neighbouring threads update neighbouring addresses.
extern "C" __global__ void encoder_backward_wte(float* dwte, const floatX* dout, const unsigned* tokens, int B, int T,
                                               int C) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (long row = 0; row < (long)B * T; row++) dwte[(long)tokens[row] * C + c] += to_f32(dout[row * C + c]);
}
