// AdamW with decoupled weight decay, per parameter:
// g = scale·grad, m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p − lr·(m·bc1 / (√(v·bc2) + ε) + wd·p),
// with bias corrections bc1 = 1/(1−β₁ᵗ) and bc2 = 1/(1−β₂ᵗ). What changes from step to step is read from device
// memory, so that a captured graph takes each step's: values = {lr, t, ‖grad‖}; the clipping scale is
// clip/‖grad‖ when clip > 0 and ‖grad‖ > clip, otherwise 1.
//
// In bf16 the fp32 master copy is updated and rounded into the bf16 parameters in the same pass; in fp32 there
// is no master copy (master is null) and the parameters are updated directly.
//
// Threads take chunks of 4 parameters (16 bytes of each fp32 array; see Packed in common.cuh) in a grid-stride
// loop: any grid covers the data.
extern "C" __global__ void adamw(floatX* params, float* master, const float* grads, float* m, float* v, long n,
                                 const float* values, float beta1, float beta2, float eps, float weight_decay,
                                 float clip) {
    const float lr = values[0], t = values[1], norm = values[2];
    const float bc1 = 1.0f / (1.0f - powf(beta1, t)), bc2 = 1.0f / (1.0f - powf(beta2, t));
    const float grad_scale = clip > 0.0f && norm > clip ? clip / norm : 1.0f;
    typedef Packed<float> F;
    typedef Packed<floatX, F::size> X;
    for (long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * F::size; i < n;
         i += (long)gridDim.x * blockDim.x * F::size) {
        const int count = min((long)F::size, n - i);
        F g = F::load(grads + i, count), ms = F::load(m + i, count), vs = F::load(v + i, count), ps;
        X xs;
        if (master) {
            ps = F::load(master + i, count);
        } else {
            xs = X::load(params + i, count);
#pragma unroll
            for (int k = 0; k < F::size; k++) ps.v[k] = to_f32(xs.v[k]);
        }
#pragma unroll
        for (int k = 0; k < F::size; k++) {
            float gk = g.v[k] * grad_scale;
            ms.v[k] = beta1 * ms.v[k] + (1.0f - beta1) * gk;
            vs.v[k] = beta2 * vs.v[k] + (1.0f - beta2) * gk * gk;
            ps.v[k] -= lr * (ms.v[k] * bc1 / (sqrtf(vs.v[k] * bc2) + eps) + weight_decay * ps.v[k]);
            xs.v[k] = to_x(ps.v[k]);
        }
        ms.store(m + i, count);
        vs.store(v + i, count);
        if (master) ps.store(master + i, count);
        xs.store(params + i, count);
    }
}
