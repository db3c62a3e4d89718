// Multi-head self-attention, exact and unfused: the simple, correct version that the fused flash-attention kernel
// (flash_attention.cu) replaces in bf16. It runs in both precisions; fp32 always uses it.
//
// For query head h, which reads key/value head g = h / (NH/KVH), with s = 1/√HS and the keys that row t sees,
// J(t) = 0..T−1 for window = 0, otherwise the last `window` of 0..=t (window ≥ T: causal, shorter: a sliding
// window): forward S_tj = s·q_t·k_j, P = softmax_rows(S), o_t = Σ_j∈J(t) P_tj v_j, saving
// lse_t = ln Σ_j∈J(t) exp(S_tj). Backward, recomputing P_tj = exp(S_tj − lse_t), with D_t = dO_t·o_t:
// dS_tj = P_tj (dO_t·v_j − D_t), dq_t = s Σ_j∈J(t) dS_tj k_j, and for key/value head g summed over the query heads
// h of its group: dk_j = s Σ_h Σ_{t: j∈J(t)} dS_tj q_t, dv_j = Σ_h Σ_{t: j∈J(t)} P_tj dO_t.
//
// Layouts: qkv (B, T, W) with W = (NH + 2·KVH)·HS: the NH query heads, then the KVH key heads, then the KVH value
// heads, HS columns each; out (B, T, NH·HS); lse (B, NH, T).
// One warp per (batch, head, row); lane l holds elements MAX_PER_LANE·l to MAX_PER_LANE·(l+1) − 1 of a row, moved
// as one access where they are all there and aligned (see Packed in common.cuh), so HS ≤ 32·MAX_PER_LANE.
// Every dot product is a warp reduction, and each key/value row sums its group's query heads in order in one warp:
// nothing is atomic, so results are deterministic.

#define MAX_PER_LANE 4

typedef Packed<floatX, MAX_PER_LANE> RowChunk;

struct Row {
    float v[MAX_PER_LANE];
};

// Where each head's columns lie in a row of qkv.
struct Heads {
    int NH, KVH, HS;
    __device__ __forceinline__ int width() const { return (NH + 2 * KVH) * HS; }
    __device__ __forceinline__ int group() const { return NH / KVH; }
    __device__ __forceinline__ int query(int h) const { return h * HS; }
    __device__ __forceinline__ int key(int g) const { return (NH + g) * HS; }
    __device__ __forceinline__ int value(int g) const { return (NH + KVH + g) * HS; }
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

// Which (b, head, row) this warp handles, among B × heads × T, or false past the end.
__device__ __forceinline__ bool warp_task(int B, int heads, int T, int* b, int* h, int* row) {
    long task = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (task >= (long)B * heads * T) return false;
    *row = task % T;
    *h = (task / T) % heads;
    *b = task / ((long)T * heads);
    return true;
}

// The first and the last key that query row t sees.
__device__ __forceinline__ int first_key(int t, int window) { return window ? max(0, t - window + 1) : 0; }
__device__ __forceinline__ int last_key(int t, int T, int window) { return window ? t : T - 1; }

// Softmax-weighted sum of the values of rows first..=last for query q (already scaled), by the online softmax; `keys`
// and `values` point at row 0's key and value head, rows `W` apart. Returns the row's output and sets *lse to the
// log-sum-exp of its scores.
__device__ __forceinline__ Row attend(const Row& q, const floatX* keys, const floatX* values, int W, int first,
                                      int last, int HS, int lane, float* lse) {
    Row acc = {};
    float m = NEG_INF, l = 0.0f;
    for (int j = first; j <= last; j++) {
        float s = dot(q, load_row(keys + (long)j * W, HS, lane, 1.0f));
        float m_new = fmaxf(m, s);
        float correction = expf(m - m_new), p = expf(s - m_new);
        Row v = load_row(values + (long)j * W, HS, lane, 1.0f);
        for (int k = 0; k < MAX_PER_LANE; k++) acc.v[k] = acc.v[k] * correction + p * v.v[k];
        l = l * correction + p;
        m = m_new;
    }
    for (int k = 0; k < MAX_PER_LANE; k++) acc.v[k] /= l;
    *lse = m + logf(l);
    return acc;
}

extern "C" __global__ void attention_forward(floatX* out, float* lse, const floatX* qkv, int B, int T, int NH, int KVH,
                                             int HS, int window) {
    int b, h, t;
    if (!warp_task(B, NH, T, &b, &h, &t)) return;
    const Heads heads = {NH, KVH, HS};
    const int lane = threadIdx.x % 32, W = heads.width(), g = h / heads.group();
    const floatX* rows = qkv + (long)b * T * W;
    Row q = load_row(rows + (long)t * W + heads.query(h), HS, lane, rsqrtf((float)HS));
    float row_lse;
    Row o = attend(q, rows + heads.key(g), rows + heads.value(g), W, first_key(t, window), last_key(t, T, window), HS,
                   lane, &row_lse);
    store_row(out + ((long)b * T + t) * NH * HS + h * HS, o, HS, lane);
    if (lane == 0) lse[((long)b * NH + h) * T + t] = row_lse;
}

// dq for each query row (one warp per (b, h, t)).
extern "C" __global__ void attention_backward_dq(floatX* dqkv, const floatX* dout, const floatX* qkv,
                                                 const floatX* out, const float* lse, int B, int T, int NH, int KVH,
                                                 int HS, int window) {
    int b, h, t;
    if (!warp_task(B, NH, T, &b, &h, &t)) return;
    const Heads heads = {NH, KVH, HS};
    const int lane = threadIdx.x % 32, W = heads.width(), g = h / heads.group();
    const float scale = rsqrtf((float)HS);
    const floatX* rows = qkv + (long)b * T * W;
    const long o = ((long)b * T + t) * NH * HS + h * HS;
    Row q = load_row(rows + (long)t * W + heads.query(h), HS, lane, scale);
    Row d_o = load_row(dout + o, HS, lane, 1.0f);
    float row_d = dot(d_o, load_row(out + o, HS, lane, 1.0f));
    float l = lse[((long)b * NH + h) * T + t];
    Row dq = {};
    for (int j = first_key(t, window); j <= last_key(t, T, window); j++) {
        Row k = load_row(rows + (long)j * W + heads.key(g), HS, lane, 1.0f);
        float p = expf(dot(q, k) - l);
        float ds = p * (dot(d_o, load_row(rows + (long)j * W + heads.value(g), HS, lane, 1.0f)) - row_d);
        for (int x = 0; x < MAX_PER_LANE; x++) dq.v[x] += ds * scale * k.v[x];
    }
    store_row(dqkv + (long)b * T * W + (long)t * W + heads.query(h), dq, HS, lane);
}

// dk and dv for each key/value row (one warp per (b, g, j)), summed over the query heads of group g in order.
extern "C" __global__ void attention_backward_dkv(floatX* dqkv, const floatX* dout, const floatX* qkv,
                                                  const floatX* out, const float* lse, int B, int T, int NH, int KVH,
                                                  int HS, int window) {
    int b, g, j;
    if (!warp_task(B, KVH, T, &b, &g, &j)) return;
    const Heads heads = {NH, KVH, HS};
    const int lane = threadIdx.x % 32, W = heads.width();
    const float scale = rsqrtf((float)HS);
    const floatX* rows = qkv + (long)b * T * W;
    Row k = load_row(rows + (long)j * W + heads.key(g), HS, lane, 1.0f);
    Row v = load_row(rows + (long)j * W + heads.value(g), HS, lane, 1.0f);
    Row dk = {}, dv = {};
    for (int h = g * heads.group(); h < (g + 1) * heads.group(); h++) {
        // The queries that see key j: from j to the window's end (window ≤ T), or all.
        for (int t = window ? j : 0; t < (window ? min(T, j + window) : T); t++) {
            const long o = ((long)b * T + t) * NH * HS + h * HS;
            Row q = load_row(rows + (long)t * W + heads.query(h), HS, lane, scale);
            Row d_o = load_row(dout + o, HS, lane, 1.0f);
            float row_d = dot(d_o, load_row(out + o, HS, lane, 1.0f));
            float p = expf(dot(q, k) - lse[((long)b * NH + h) * T + t]);
            float ds = p * (dot(d_o, v) - row_d);
            for (int x = 0; x < MAX_PER_LANE; x++) {
                dk.v[x] += ds * q.v[x];  // q is already scaled by s
                dv.v[x] += p * d_o.v[x];
            }
        }
    }
    floatX* row = dqkv + (long)b * T * W + (long)j * W;
    store_row(row + heads.key(g), dk, HS, lane);
    store_row(row + heads.value(g), dv, HS, lane);
}

// Decoding with the key/value cache: the query of row `pos` of one sequence's qkv against the rows it sees (the last
// `window` of 0..=pos, as above), one warp per query head; out holds the NH·HS outputs of that position.
extern "C" __global__ void attention_decode(floatX* out, const floatX* qkv, int pos, int NH, int KVH, int HS,
                                            int window) {
    const int h = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (h >= NH) return;
    const Heads heads = {NH, KVH, HS};
    const int lane = threadIdx.x % 32, W = heads.width(), g = h / heads.group();
    Row q = load_row(qkv + (long)pos * W + heads.query(h), HS, lane, rsqrtf((float)HS));
    float unused_lse;
    const Row o = attend(q, qkv + heads.key(g), qkv + heads.value(g), W, first_key(pos, window), pos, HS, lane,
                         &unused_lse);
    store_row(out + h * HS, o, HS, lane);
}
