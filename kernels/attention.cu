// Causal multi-head self-attention, exact and unfused: the simple, correct version that the fused
// flash-attention kernel replaces.
//
// For one head, with s = 1/√HS: forward S_tj = s·q_t·k_j (j ≤ t), P = softmax_rows(S), o_t = Σ_j P_tj v_j, saving
// lse_t = log Σ_j exp(S_tj). Backward, recomputing P_tj = exp(S_tj − lse_t), with D_t = dO_t·o_t:
// dS_tj = P_tj (dO_t·v_j − D_t), dq_t = s Σ_j dS_tj k_j, dk_j = s Σ_t≥j dS_tj q_t, dv_j = Σ_t≥j P_tj dO_t.
//
// Layouts: qkv (B, T, 3C) with queries, keys and values each C = NH·HS wide; out (B, T, C); lse (B, NH, T).
// One warp per (batch, head, row); lane l holds elements MAX_PER_LANE·l to MAX_PER_LANE·(l+1) − 1 of a row, moved
// as one access where they are all there and aligned (see Packed in common.cuh), so HS ≤ 32·MAX_PER_LANE.
// Every dot product is a warp reduction; nothing is atomic, so results are deterministic.

#define MAX_PER_LANE 4

typedef Packed<floatX, MAX_PER_LANE> RowChunk;

struct Row {
    float v[MAX_PER_LANE];
};

// How many of lane `lane`'s elements lie inside a row of HS.
__device__ __forceinline__ int row_count(int HS, int lane) {
    return max(0, min(MAX_PER_LANE, HS - lane * MAX_PER_LANE));
}

__device__ __forceinline__ Row load_row(const floatX* p, int HS, int lane, float scale) {
    RowChunk x = RowChunk::load(p + lane * MAX_PER_LANE, row_count(HS, lane));
    Row r;
    for (int k = 0; k < MAX_PER_LANE; k++) r.v[k] = to_f32(x.v[k]) * scale;
    return r;
}

__device__ __forceinline__ float dot(const Row& a, const Row& b) {
    float s = 0.0f;
    for (int k = 0; k < MAX_PER_LANE; k++) s += a.v[k] * b.v[k];
    return warp_sum(s);
}

__device__ __forceinline__ void store_row(floatX* p, const Row& r, int HS, int lane) {
    RowChunk x;
    for (int k = 0; k < MAX_PER_LANE; k++) x.v[k] = to_x(r.v[k]);
    x.store(p + lane * MAX_PER_LANE, row_count(HS, lane));
}

// Which (b, h, row) this warp handles, or false past the end.
__device__ __forceinline__ bool warp_task(int B, int NH, int T, int* b, int* h, int* row) {
    long task = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (task >= (long)B * NH * T) return false;
    *row = task % T;
    *h = (task / T) % NH;
    *b = task / ((long)T * NH);
    return true;
}

// Softmax-weighted sum of the values of rows 0..=last for query q (already scaled), by the online softmax;
// returns the row's output and sets *lse to the log-sum-exp of its scores.
__device__ __forceinline__ Row attend(const Row& q, const floatX* base, int C, int last, int HS, int lane, float* lse) {
    Row acc = {};
    float m = NEG_INF, l = 0.0f;
    for (int j = 0; j <= last; j++) {
        float s = dot(q, load_row(base + (long)j * 3 * C + C, HS, lane, 1.0f));
        float m_new = fmaxf(m, s);
        float correction = expf(m - m_new), p = expf(s - m_new);
        Row v = load_row(base + (long)j * 3 * C + 2 * C, HS, lane, 1.0f);
        for (int k = 0; k < MAX_PER_LANE; k++) acc.v[k] = acc.v[k] * correction + p * v.v[k];
        l = l * correction + p;
        m = m_new;
    }
    for (int k = 0; k < MAX_PER_LANE; k++) acc.v[k] /= l;
    *lse = m + logf(l);
    return acc;
}

extern "C" __global__ void attention_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH,
                                             int HS) {
    int b, h, t;
    if (!warp_task(B, NH, T, &b, &h, &t)) return;
    const int lane = threadIdx.x % 32, C = NH * HS;
    const floatX* base = qkv + (long)b * T * 3 * C + h * HS;
    Row q = load_row(base + (long)t * 3 * C, HS, lane, rsqrtf((float)HS));
    float row_lse;
    Row o = attend(q, base, C, t, HS, lane, &row_lse);
    store_row(out + ((long)b * T + t) * C + h * HS, o, HS, lane);
    if (lane == 0) lse[((long)b * NH + h) * T + t] = row_lse;
}

// dq for each query row (one warp per (b, h, t)).
extern "C" __global__ void attention_backward_dq(floatX* dqkv, const floatX* dout, const floatX* qkv,
                                                 const floatX* out, const float* lse, int B, int T, int NH, int HS) {
    int b, h, t;
    if (!warp_task(B, NH, T, &b, &h, &t)) return;
    const int lane = threadIdx.x % 32, C = NH * HS;
    const float scale = rsqrtf((float)HS);
    const floatX* base = qkv + (long)b * T * 3 * C + h * HS;
    const long o = ((long)b * T + t) * C + h * HS;
    Row q = load_row(base + (long)t * 3 * C, HS, lane, scale);
    Row d_o = load_row(dout + o, HS, lane, 1.0f);
    float row_d = dot(d_o, load_row(out + o, HS, lane, 1.0f));
    float l = lse[((long)b * NH + h) * T + t];
    Row dq = {};
    for (int j = 0; j <= t; j++) {
        Row k = load_row(base + (long)j * 3 * C + C, HS, lane, 1.0f);
        float p = expf(dot(q, k) - l);
        float ds = p * (dot(d_o, load_row(base + (long)j * 3 * C + 2 * C, HS, lane, 1.0f)) - row_d);
        for (int x = 0; x < MAX_PER_LANE; x++) dq.v[x] += ds * scale * k.v[x];
    }
    store_row(dqkv + (long)b * T * 3 * C + (long)t * 3 * C + h * HS, dq, HS, lane);
}

// dk and dv for each key row (one warp per (b, h, j)).
extern "C" __global__ void attention_backward_dkv(floatX* dqkv, const floatX* dout, const floatX* qkv,
                                                  const floatX* out, const float* lse, int B, int T, int NH, int HS) {
    int b, h, j;
    if (!warp_task(B, NH, T, &b, &h, &j)) return;
    const int lane = threadIdx.x % 32, C = NH * HS;
    const float scale = rsqrtf((float)HS);
    const floatX* base = qkv + (long)b * T * 3 * C + h * HS;
    Row k = load_row(base + (long)j * 3 * C + C, HS, lane, 1.0f);
    Row v = load_row(base + (long)j * 3 * C + 2 * C, HS, lane, 1.0f);
    Row dk = {}, dv = {};
    for (int t = j; t < T; t++) {
        const long o = ((long)b * T + t) * C + h * HS;
        Row q = load_row(base + (long)t * 3 * C, HS, lane, scale);
        Row d_o = load_row(dout + o, HS, lane, 1.0f);
        float row_d = dot(d_o, load_row(out + o, HS, lane, 1.0f));
        float p = expf(dot(q, k) - lse[((long)b * NH + h) * T + t]);
        float ds = p * (dot(d_o, v) - row_d);
        for (int x = 0; x < MAX_PER_LANE; x++) {
            dk.v[x] += ds * q.v[x];  // q is already scaled by s
            dv.v[x] += p * d_o.v[x];
        }
    }
    floatX* row = dqkv + (long)b * T * 3 * C + (long)j * 3 * C + h * HS;
    store_row(row + C, dk, HS, lane);
    store_row(row + 2 * C, dv, HS, lane);
}

// Decoding with the key/value cache: the query of row `pos` of one sequence's qkv against rows 0..=pos, one warp
// per head; out holds the C outputs of that position.
extern "C" __global__ void attention_decode(floatX* out, const floatX* qkv, int pos, int NH, int HS) {
    const int h = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (h >= NH) return;
    const int lane = threadIdx.x % 32, C = NH * HS;
    const floatX* base = qkv + h * HS;
    Row q = load_row(base + (long)pos * 3 * C, HS, lane, rsqrtf((float)HS));
    float unused_lse;
    store_row(out + h * HS, attend(q, base, C, pos, HS, lane, &unused_lse), HS, lane);
}
