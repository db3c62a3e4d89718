// Shared by every kernel file: the compiler puts this text in front of each one (NVRTC sees no kernels/ folder).
//
// floatX is the storage type of parameters and activations: bf16 when compiled with -DKILN_BF16, fp32 otherwise.
// Arithmetic, statistics, gradients of weights, optimizer state and losses are always fp32.

#include <cuda_bf16.h>

// NVRTC has no <math.h>, so no INFINITY.
#define NEG_INF __int_as_float(0xff800000)

#ifdef KILN_BF16
typedef __nv_bfloat16 floatX;
#else
typedef float floatX;
#endif

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ floatX to_x(float x) {
#ifdef KILN_BF16
    return __float2bfloat16_rn(x);
#else
    return x;
#endif
}

// The integer vector type of each access width in bytes: a whole chunk (below) moves as one of these.
template <int BYTES>
struct Word;
template <>
struct Word<16> {
    typedef int4 type;
};
template <>
struct Word<8> {
    typedef int2 type;
};
template <>
struct Word<4> {
    typedef int type;
};

// A chunk of N neighbouring elements of T (16 bytes by default: the widest load or store a thread can issue), of
// which the first `count` lie inside the data. It moves with one access when it is whole (count == N) and its
// address is aligned to its size, element by element otherwise: any length and offset work, and aligned data of
// a suitable length (rows whose length is a multiple of N, say) gets the wide accesses. Elements from count on
// are zero after a load and left alone by a store.
template <typename T, int N = 16 / sizeof(T)>
struct alignas(N * sizeof(T)) Packed {
    static constexpr int size = N;
    typedef typename Word<N * sizeof(T)>::type Bits;
    T v[N];

    __device__ __forceinline__ static bool whole(const T* p, int count) {
        return count == N && reinterpret_cast<unsigned long long>(p) % sizeof(Packed) == 0;
    }
    __device__ __forceinline__ static Packed load(const T* p, int count) {
        Packed r;
        if (whole(p, count)) {
            *reinterpret_cast<Bits*>(r.v) = *reinterpret_cast<const Bits*>(p);
        } else {
#pragma unroll
            for (int k = 0; k < N; k++) r.v[k] = k < count ? p[k] : T(0.0f);
        }
        return r;
    }
    __device__ __forceinline__ void store(T* p, int count) const {
        if (whole(p, count)) {
            *reinterpret_cast<Bits*>(p) = *reinterpret_cast<const Bits*>(v);
        } else {
#pragma unroll
            for (int k = 0; k < N; k++)
                if (k < count) p[k] = v[k];
        }
    }
};

// Sum and max over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

#define COLUMN_SUM_LANES 32
#define COLUMN_SUM_ROWS 16

// Σ_rows m[row·C + c] in a fixed order, for column c = blockIdx.x·COLUMN_SUM_LANES + lane of a block of
// COLUMN_SUM_LANES × COLUMN_SUM_ROWS threads (neighbouring lanes, neighbouring columns; columns from C on take no
// part): thread row r sums rows r, r + COLUMN_SUM_ROWS, ... in turn, then the first row (threadIdx.x <
// COLUMN_SUM_LANES) adds the rows' sums in row order, and only it gets the result. Every thread of the block calls
// it. `scratch` holds COLUMN_SUM_ROWS × COLUMN_SUM_LANES floats of shared memory.
template <typename T>
__device__ __forceinline__ float column_sum(const T* m, long rows, int C, float* scratch) {
    const int lane = threadIdx.x % COLUMN_SUM_LANES, r = threadIdx.x / COLUMN_SUM_LANES;
    const int c = blockIdx.x * COLUMN_SUM_LANES + lane;
    float s = 0.0f;
    if (c < C)
        for (long row = r; row < rows; row += COLUMN_SUM_ROWS) s += to_f32(m[row * C + c]);
    scratch[r * COLUMN_SUM_LANES + lane] = s;
    __syncthreads();
    if (r == 0)
        for (int k = 1; k < COLUMN_SUM_ROWS; k++) s += scratch[k * COLUMN_SUM_LANES + lane];
    return s;
}

// Sum over a whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : NEG_INF;
    return warp_max(v);
}

// residual = a + b for one row of C channels, lane `lane` of a warp taking chunks lane, lane + 32, ...: the residual
// add that the normalisation kernels fuse in front of a norm (which then reads the row back, as stored).
__device__ __forceinline__ void residual_add_row(floatX* residual, const floatX* a, const floatX* b, int C, int lane) {
    typedef Packed<floatX> P;
    for (int c = lane * P::size; c < C; c += 32 * P::size) {
        const int count = min(P::size, C - c);
        P as = P::load(a + c, count), bs = P::load(b + c, count), rs;
#pragma unroll
        for (int k = 0; k < P::size; k++) rs.v[k] = to_x(to_f32(as.v[k]) + to_f32(bs.v[k]));
        rs.store(residual + c, count);
    }
    __syncwarp();
}

// GELU, tanh approximation: gelu(x) = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³).
#define GELU_SCALE 0.7978845608f
#define GELU_CUBE 0.044715f
__device__ __forceinline__ float gelu(float x) {
    float u = GELU_SCALE * x * (1.0f + GELU_CUBE * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
}
// gelu'(x) = ½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²).
__device__ __forceinline__ float gelu_grad(float x) {
    float u = GELU_SCALE * x * (1.0f + GELU_CUBE * x * x);
    float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_SCALE * (1.0f + 3.0f * GELU_CUBE * x * x);
}

#define IGNORE_TARGET 0xffffffffu
