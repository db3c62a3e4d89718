// Rotary position embedding of the queries and keys of a packed qkv activation, in place.
//
// A qkv row is heads query heads, then kv_heads key heads, then kv_heads value heads, head_dim channels each; the
// queries and keys are rotated. Within a head, channel i < head_dim/2 pairs with i + head_dim/2 (Hugging Face's
// rotate-half), and row t of a sequence, at position p = first_pos + t, turns the pair (x₁, x₂) into
//   (x₁·cos θ − x₂·sin θ, x₂·cos θ + x₁·sin θ),   θ = p·freq[i],
// with cos θ and sin θ read from the model's fp32 table: cos for every (position, i), then sin likewise. The
// backward pass is the inverse rotation (sign = −1 negates sin θ): the rotation is orthogonal.
//
// One thread per pair and iteration of a grid-stride loop: any grid covers the data. Neighbouring threads take
// neighbouring pairs of a head, so their loads and stores of x₁ (and of x₂) are contiguous.

extern "C" __global__ void rope(floatX* qkv, const float* table, long rows, int T, int first_pos, int positions,
                                int heads, int kv_heads, int head_dim, float sign) {
    const int half = head_dim / 2, rotated = heads + kv_heads;
    const long width = (long)(heads + 2 * kv_heads) * head_dim, pairs = rows * rotated * half;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < pairs; j += (long)gridDim.x * blockDim.x) {
        const int i = j % half, head = j / half % rotated;
        const long row = j / half / rotated;
        const long p = first_pos + row % T;
        const float c = table[p * half + i], s = sign * table[((long)positions + p) * half + i];
        floatX* x = qkv + row * width + (long)head * head_dim;
        const float x1 = to_f32(x[i]), x2 = to_f32(x[i + half]);
        x[i] = to_x(x1 * c - x2 * s);
        x[i + half] = to_x(x2 * c + x1 * s);
    }
}
