// AdamW with decoupled weight decay, one thread per parameter:
// g = scale·grad, m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², p ← p − lr·(m·bc1 / (√(v·bc2) + ε) + wd·p),
// with bias corrections bc1 = 1/(1−β₁ᵗ) and bc2 = 1/(1−β₂ᵗ) computed on the host.
//
// In bf16 the fp32 master copy is updated and rounded into the bf16 parameters in the same pass; in fp32 there
// is no master copy (master is null) and the parameters are updated directly.
extern "C" __global__ void adamw(floatX* params, float* master, const float* grads, float* m, float* v, long n,
                                 float lr, float beta1, float beta2, float eps, float weight_decay, float bc1,
                                 float bc2, float grad_scale) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float g = grads[i] * grad_scale;
    float mi = beta1 * m[i] + (1.0f - beta1) * g;
    float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
    m[i] = mi;
    v[i] = vi;
    float p = master ? master[i] : to_f32(params[i]);
    p -= lr * (mi * bc1 / (sqrtf(vi * bc2) + eps) + weight_decay * p);
    if (master) master[i] = p;
    params[i] = to_x(p);
}
