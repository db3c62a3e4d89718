// Fused attention (FlashAttention-2's algorithm): bf16 in and out, fp32 arithmetic, on tensor cores through
// mma.cuh (ldmatrix, mma.sync.m16n8k16, cp.async) for sm_80 and later. The math is attention.cu's, but no T×T
// matrix is ever stored. The engine runs these kernels in bf16 for head dimensions 32, 64, 96 and 128.
//
// For query head h of one sequence, reading key/value head g = h / (NH/KVH), with s = 1/√D: query i sees key j when
// j < T and, if causal (window > 0), i − window < j ≤ i: the kernels take `window`, 0 for attention that is not
// causal, T for causal attention, shorter for a sliding window. Under a window the blocks still load every tile up to
// the diagonal; in flash_forward, flash_backward_dq and flash_backward_dkv a warp (or warpgroup) skips the products
// of a tile wholly outside its queries' windows (keys_unseen), and the pipelined and warp-specialised forms mask
// such tiles and add their zeros. Scores are kept in base 2, x_ij = log2(e)·s·q_i·k_j, so that each exponential is one
// ex2: exp(s·q_i·k_j − a) = 2^(x_ij − log2(e)·a).
//
// Forward, one block per BR queries, visiting the keys and values in tiles of BC, with running row maxima m and
// sums l (m = −∞, l = 0, O = 0 at first):
//     x = log2(e)·s·Q·Kᵀ (−∞ where unseen),  m' = max(m, rowmax x),  P = 2^(x − m'),
//     l ← 2^(m − m')·l + rowsum P,  O ← 2^(m − m')·O + P·V,  m ← m';
// at the end O ← O/l and lse = ln 2·(m + log2 l) = ln Σ_j exp(s·q_i·k_j), the natural log the CPU engine keeps.
//
// Backward, recomputing P_ij = 2^(x_ij − log2(e)·lse_i) tile by tile, with D_i = dO_i·O_i (flash_attention_row_dot):
//     dV_j = Σ_i P_ij dO_i,  dP_ij = dO_i·V_j,  dS_ij = P_ij (dP_ij − D_i),
//     dK_j = s Σ_i dS_ij Q_i,  dQ_i = s Σ_j dS_ij K_j,
// where a key/value head sums i over every query head of its group. Two kernels, so that every output has a single
// writer and nothing is atomic (results are deterministic): flash_attention_backward_dkv owns 64 keys of head g and
// visits the query tiles of each query head of g's group in a fixed order; flash_attention_backward_dq owns 64
// queries of head h and visits the key tiles. The second recomputes S and dP: the price of determinism.
// Without it (train.deterministic = false), flash_attention_backward_dkv_dq also adds each tile's dS·K into an fp32
// dQ with atomic adds, as FlashAttention-2 does, and flash_attention_dq_store rounds that sum into dqkv: no
// recomputation, but the order of the additions, and so the last bits of dQ, vary from run to run.
//
// The deterministic kernels can also sum the columns of what they write, for the bias gradient of the product that
// made qkv (Σ_rows dqkv): each warp writes the sums of its 16 rows, as stored, into partials (B, G, W) with G = 4
// per 64-row tile, and column_sums (reduce.cu) adds those up, so that dqkv is never read again for its sums.
//
// Layouts as attention.cu's: qkv (B, T, (NH + 2·KVH)·D), out and dout (B, T, NH·D), lse and D (B, NH, T). A head's
// rows are read where they lie, W = (NH + 2·KVH)·D elements apart, in 16-byte cp.async chunks (no transposing
// pass), and results go out in 16-byte stores staged through shared memory: the engine checks that qkv, out, dout
// and dqkv are 16-byte aligned (D is a multiple of 8, so every row then is).
//
// Work split: a block has 4 warps; each warp owns 16·M consecutive rows of the block's resident operand (queries in
// the forward and dq kernels, keys in dkv) and all of the streamed tile's columns, so a row's softmax statistics
// and accumulators never leave its warp: a row's four lanes (mma's accumulator layout) combine maxima and sums with
// two shuffles, and no two warps write the same output. (A dkv kernel with two roles has 8 warps, two per 16 keys:
// one adds to their dV, the other to their dK.) Tiles are streamed through two shared-memory stages: the copies of
// tile j+1 are issued before tile j is computed, so they overlap it. Only the tiles that reach past the end of the
// sequence or (causal) across the diagonal or a window's start compare positions to mask scores; the others, most
// of a long sequence's, take a copy of the elementwise step without the comparisons (scale_scores, row_probabilities
// and column_probabilities, each with MASKED true or false).
//
// Shared memory: rows padded to D + 8 elements. The stride is then an odd number of 16-byte units (D/8 + 1), so the
// eight 16-byte rows an ldmatrix reads at the same column fall in eight different groups of four banks: no
// conflicts. The 16-byte copies into a tile are conflict-free as well for D = 64 and 128 (eight neighbouring lanes
// fill 128 contiguous bytes); for D = 32 and 96 one 16-byte unit in eight is shared by two lanes of a quarter-warp
// (a two-way conflict on a small part of the copies only).
//
// Tile shapes (FLASH_ATTENTION at the end of the file), set by the 255 registers of a thread: ptxas must not spill
// (the compile test fails on any spill, sm_80 and sm_90a). Registers per thread on sm_90a, where the tiles differ from
// sm_80's at D = 128 (sm_80's in brackets):
//   D     forward BR × BC          dq 64 × BC          dkv 64 × BR, roles         dkv_dq (same tiles)
//   32    128 × 64  (168)          64 × 64  (135)      64 × 64, 1  (173)          (190)
//   64    128 × 64  (232)          64 × 64  (168)      64 × 64, 1  (167)          (174)
//   96    128 × 32  (215)          64 × 64  (177)      64 × 32, 1  (165)          (212)
//   128   128 × 64 [32]  (255)     64 × 32  (165)      64 × 64 [32], 2  (168)     (205)
// Forward: each warp holds 32 queries (M = 2 tiles of 16), so every K and V fragment read from shared memory feeds
// two mma: shared-memory traffic per mma is what limits mma.sync on H100, and one tile per warp would nearly double
// it. O (D/2·M floats per thread) and the scores (BC/2·M) live in registers; Q's fragments are read again from the
// resident Q tile for each key tile rather than kept (a fifth to a third more shared-memory reads, for 16 to 64
// registers). That leaves BC = 64 for D ≤ 64 and for D = 128 on sm_90 (FlashAttention-2's 128 × 64 there), and 32
// for D = 96 (64 spills) and for D = 128 on sm_80 (64 spills 60 bytes). The backward kernels never hold S and dP
// together: S becomes P, rounded to bf16 as the A fragments of a product (BC/4 registers), before dP is computed,
// and dS = P∘(dP − D) takes that rounded P (dS itself is rounded to bf16 for its product anyway). So the dq kernel
// holds dQ (D/2 floats per thread), then S (BC/2), or P and dP: BC = 64, and 32 for D = 128 (64 spills). At D = 128
// on sm_90 it asks for three blocks a multiprocessor, which H100's 228 KiB of shared memory holds (70 KiB each), and
// gets them in 168 registers (183 left to itself); A100's 164 KiB hold two anyway. The dkv kernel with one role (a
// warp per 16 keys) holds dK and dV (D floats), then Sᵀ (BR/2), or Pᵀ and dPᵀ: BR = 64, and 32 for D = 96 (64
// spills). At D = 32 it asks for two blocks a multiprocessor: left to itself, ptxas squeezes it into 128 registers,
// for four, and spills. At D = 128 one role would leave room for 16 queries a tile only (32 spill), which
// makes each tile's shared-memory reads 0.75 ldmatrix per mma and a barrier per 64 mma a warp; with two roles (two
// warps per 16 keys, flash_backward_dkv) each warp holds one of dK and dV, and the tiles grow to 64 queries on sm_90
// (0.6 ldmatrix per mma, a barrier per 128 mma) and 32 on sm_80, whose sm_86 and sm_89 give a block 99 KiB (64 would
// take 111 KiB). The atomic-dQ form (dkv_dq) has the same tiles: the dQ product comes after dK's, and its accumulators
// (at most 32 floats; see add_dq) fit in the place of dPᵀ; dS goes to shared memory straight from the A fragments
// the dK product takes. The engine reads each head dimension's launch shape from the compiled module
// (FLASH_ATTENTION's flash_attention_launch_dD), so it follows these choices; each kernel checks its block size and
// shared memory and traps if a launch disagrees.

// On sm_90a, at D = 64 and 128, every kernel also has a form on Hopper's warpgroup products (wgmma, see mma.cuh;
// FLASH_ATTENTION_WGMMA), which the engine runs there unless KILN_FLASH_WGMMA says otherwise. The algorithm, the work
// of each warp and the elementwise steps are the same; the products differ (add_abt and add_ab, WGMMA true; add_dq). A
// warpgroup of 4 warps computes its 64 rows' product together (the 4 warps of a dq block, or of a dkv role; the forward
// has two warpgroups of 64 queries), reading shared memory itself. A 64-row product reads each element of its shared
// operand once for 64 rows, where mma.sync read it once for 16 (32 in the forward, M = 2): the shared-memory traffic
// per product that limits mma.sync on H100 falls by half or more, and no ldmatrix is issued. Tiles are stored unpadded
// in wgmma's 128-byte swizzle (swizzled_at); each warp stages its output in padded rows of its own in a region the loop
// is done with. A warpgroup skips a tile only when all its 64 rows have nothing to add. Each product is waited for
// before its result is read: a warpgroup's elementwise steps do not overlap its own products, as FlashAttention-3
// arranges; other warpgroups fill the gaps. (The forward's pipelined form, flash_forward_pipelined, does overlap them,
// as FlashAttention-3 also does; the engine runs it only when KILN_FLASH_WGMMA asks, until a GPU has timed it; so do
// the warp-specialised forms of the forward, dq and dkv kernels (this one also with atomic dQ), whose tiles come by
// tensor copies from a warpgroup of their own, and which overlap them too.) Forward tiles: at D = 64, 64 keys in 112
// registers, two blocks a multiprocessor (48 KiB of shared memory each); at D = 128, 128 keys in 226 registers, one
// block (160 KiB). The backward keeps the mma.sync kernels' tiles (64 × 64), whose wgmma forms take 149 (dq), 162 (dkv)
// and 168 (dkv_dq) registers at D = 64. At D = 128 the dq kernel takes 168; the dkv kernel has one role, not mma.sync's
// two: a warpgroup holds both dK and dV (246 registers, 255 for dkv_dq) and two blocks of one warpgroup share a
// multiprocessor (99 KiB of shared memory each). Two roles (168 registers, 8 warps in one block) left the tensor cores
// idle while a role waited at the Pᵀ handover barrier: on an H200 their backward took 5.7 ms at B8 H16 T4096 causal,
// one role's 4.6 ms. The warp-specialised dkv kernel's warpgroups get 232 registers, so at D = 128 it keeps the two
// roles, pipelined across steps so that a role's products run while it computes, or waits for, what its next ones need
// (flash_backward_dkv_specialised).

#define FLASH_THREADS 128
#define FLASH_WARP_ROWS 16
#define FLASH_LOG2E 1.4426950408889634f
#define FLASH_LN2 0.6931471805599453f

typedef __nv_bfloat16 bf16;

extern __shared__ __align__(16) unsigned char flash_shared[];

// Shared tiles are named by their 32-bit shared-memory address (see mma.cuh); element (r, c) of a padded tile of D
// columns lies at(r, c) bytes further.
template <int D>
__device__ __forceinline__ constexpr unsigned at(int r, int c) {
    return (unsigned)(r * (D + 8) + c) * 2;
}

// Element (r, c) of a tile of ROWS rows in wgmma's 128-byte swizzle (see mma.cuh): column blocks of 64 elements,
// ROWS rows of 128 bytes each, the 16-byte chunks of row r permuted by r % 8. The 16-byte copies into such a tile
// and wgmma's reads of it are free of bank conflicts.
template <int ROWS>
__device__ __forceinline__ constexpr unsigned swizzled_at(int r, int c) {
    return (unsigned)((c / 64 * ROWS + r) * 128 + ((c % 64 / 8) ^ (r % 8)) * 16 + c % 8 * 2);
}

// Element (r, c) of a tile of ROWS rows of D elements, padded (at) or SWIZZLED (swizzled_at), and the bytes of such a
// tile of `rows` rows.
template <int D, int ROWS, bool SWIZZLED>
__device__ __forceinline__ constexpr unsigned tile_at(int r, int c) {
    return SWIZZLED ? swizzled_at<ROWS>(r, c) : at<D>(r, c);
}
template <int D, bool SWIZZLED>
__device__ __forceinline__ constexpr unsigned tile_bytes(int rows) {
    return SWIZZLED ? (unsigned)(rows * D * 2) : at<D>(rows, 0);
}

// Copies ROWS rows of D elements (row r at src + r·stride) into a padded (or SWIZZLED) shared tile, in 16-byte
// chunks spread over the block's THREADS; rows from `valid_rows` on are zero-filled without being read.
template <int ROWS, int D, int THREADS = FLASH_THREADS, bool SWIZZLED = false>
__device__ __forceinline__ void load_tile(unsigned tile, const bf16* src, long stride, int valid_rows) {
    constexpr int PER_ROW = D / 8, CHUNKS = ROWS * PER_ROW;
#pragma unroll
    for (int k = 0; k < (CHUNKS + THREADS - 1) / THREADS; k++) {
        const int i = threadIdx.x + k * THREADS;
        if (CHUNKS % THREADS == 0 || i < CHUNKS) {
            const int r = i / PER_ROW, c = i % PER_ROW * 8;
            const bool valid = r < valid_rows;
            cp_async_16(tile + tile_at<D, ROWS, SWIZZLED>(r, c), src + (valid ? r : 0) * stride + c, valid);
        }
    }
}

// Copies ROWS per-row statistics (fp32) into shared memory, zero from `valid_rows` on.
template <int ROWS, int THREADS = FLASH_THREADS>
__device__ __forceinline__ void load_stats(unsigned dst, const float* src, int valid_rows) {
    for (int r = threadIdx.x; r < ROWS; r += THREADS)
        cp_async_4(dst + 4 * r, src + (r < valid_rows ? r : 0), r < valid_rows);
}

// This lane's ldmatrix_x4 row address, relative to the 16×16 block at (0, 0) of a padded tile, for the matrices in
// the order (rows 0–7, cols 0–7), (rows 8–15, cols 0–7), (rows 0–7, cols 8–15), (rows 8–15, cols 8–15): the four
// registers are the block's A fragment; with .trans, for a tile stored (k, n), they are the B fragments of the
// n-tiles at columns 0–7 (registers 0, 1) and 8–15 (registers 2, 3). Other blocks are a constant at<D>() away.
template <int D>
__device__ __forceinline__ unsigned a_fragment_lane(int lane) {
    return at<D>(lane % 8 + lane / 8 % 2 * 8, lane / 16 * 8);
}

// As a_fragment_lane, for a tile stored (n, k) read as B: the fragments of the n-tiles at rows 0–7 (registers 0, 1)
// and 8–15 (registers 2, 3), for k = columns 0–15.
template <int D>
__device__ __forceinline__ unsigned b_fragment_lane(int lane) {
    return at<D>(lane % 8 + lane / 16 * 8, lane / 8 % 2 * 8);
}

// The A fragment of columns 16k to 16k + 15 of a warp's 16-row accumulator (see mma.cuh), rounded to bf16.
template <int N>
__device__ __forceinline__ void accumulator_to_a(unsigned a[4], const float (&acc)[N][4], int k) {
    a[0] = pack_bf16(acc[2 * k][0], acc[2 * k][1]);
    a[1] = pack_bf16(acc[2 * k][2], acc[2 * k][3]);
    a[2] = pack_bf16(acc[2 * k + 1][0], acc[2 * k + 1][1]);
    a[3] = pack_bf16(acc[2 * k + 1][2], acc[2 * k + 1][3]);
}

// A warp's 16 × N probabilities, held as accumulator tiles, as the A fragments of the P·V product that takes them.
template <int N>
__device__ __forceinline__ void scores_to_a(unsigned (&p)[N / 16][4], const float (&x)[N / 8][4]) {
#pragma unroll
    for (int kb = 0; kb < N / 16; kb++) accumulator_to_a(p[kb], x, kb);
}

// Element e of accumulator tile 2k + t as accumulator_to_a rounded it into `a`, back as a float.
__device__ __forceinline__ float a_to_accumulator(const unsigned a[4], int t, int e) {
    const unsigned v = a[2 * t + e / 2];
    return __uint_as_float(e % 2 ? v & 0xffff0000u : v << 16);
}

// Row and column, within a 16×8 accumulator tile, of this lane's element e (0–3).
__device__ __forceinline__ int acc_row(int lane, int e) { return lane / 4 + e / 2 * 8; }
__device__ __forceinline__ int acc_col(int lane, int e) { return lane % 4 * 2 + e % 2; }

// Whether a tile of `keys` keys from k0 holds one that some of the `rows` queries from row0 do not see (past the end
// of the sequence or, causal, past a query or before its window): only such a tile needs the MASKED copy of an
// elementwise step.
__device__ __forceinline__ bool keys_need_mask(int k0, int keys, int row0, int rows, int T, int window) {
    return k0 + keys > T || (window && (k0 + keys - 1 > row0 || k0 < row0 + rows - window));
}

// Whether no query of the `rows` from row0 sees any of the `keys` keys from k0 (causal: all past the queries, or all
// before their windows): a warp or warpgroup then skips the tile, whose probabilities would all be 0. Skipping adds
// nothing the visit would not: the results are the same bit for bit.
__device__ __forceinline__ bool keys_unseen(int k0, int keys, int row0, int rows, int window) {
    return window && (k0 > row0 + rows - 1 || k0 + keys - 1 < row0 - window + 1);
}

// The first and the last key query `row` sees, counted from this lane's first column of the key tile at k0: the
// bounds the MASKED copies compare each score's column against.
__device__ __forceinline__ int first_visible_key(int row, int k0, int window, int lane) {
    return (window ? max(0, row - window + 1) : 0) - k0 - acc_col(lane, 0);
}
__device__ __forceinline__ int last_visible_key(int row, int k0, int T, int window, int lane) {
    return (window ? min(row, T - 1) : T - 1) - k0 - acc_col(lane, 0);
}

// Maximum and sum over the four lanes that hold one accumulator row.
__device__ __forceinline__ float row_max4(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float row_sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Stops a launch whose block size or dynamic shared memory is not what the kernel's tiles need.
__device__ __forceinline__ void check_launch(unsigned shared_bytes, unsigned threads = FLASH_THREADS) {
    if (blockDim.x != threads || dynamic_shared_bytes() < shared_bytes) __trap();
}

// Dynamic shared memory of each kernel, as it lays its tiles out (see each kernel's comment). The engine reads these
// numbers from the compiled module (FLASH_ATTENTION's launch table), so the two cannot disagree.
// The forward's threads a block: 4 warps on mma.sync, 2 warpgroups on wgmma.
template <bool WGMMA>
__device__ constexpr int forward_threads() {
    return WGMMA ? 2 * FLASH_THREADS : FLASH_THREADS;
}
template <int D, int BR, int BC, bool WGMMA>
__device__ constexpr unsigned forward_shared_bytes() {
    return tile_bytes<D, WGMMA>(BR + 4 * BC);
}
template <int D, int BC, bool WGMMA>
__device__ constexpr unsigned dq_shared_bytes() {
    return tile_bytes<D, WGMMA>(2 * 4 * FLASH_WARP_ROWS + 4 * BC);
}
template <int D, int BR, int ROLES, bool ATOMIC_DQ, bool WGMMA>
__device__ constexpr unsigned dkv_shared_bytes() {
    constexpr int BC = 4 * FLASH_WARP_ROWS;
    return tile_bytes<D, WGMMA>(2 * BC + 4 * BR) + 4 * BR * 4 + (ATOMIC_DQ ? tile_bytes<BR, WGMMA>(BC) : 0) +
           (ROLES == 2 ? BR * 128 : 0);
}

// Writes a warp's 16 × D fp32 accumulator, times `scale`, to rows 0–15 of a global matrix (`stride` apart; rows
// from `valid_rows` on skipped), staging it in 16 rows of a padded shared tile that only this warp uses, so that
// the global stores are 16 bytes wide. With `column_sums`, also writes there the sums of the D columns over the
// valid rows as stored (bf16): zeros when none is valid.
template <int D>
__device__ __forceinline__ void store_rows(bf16* dst, long stride, int valid_rows, const float (&acc)[D / 8][4],
                                          float scale, unsigned staging, int lane, float* column_sums = nullptr) {
    constexpr int PER_ROW = D / 8;
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        st_shared_32(staging + at<D>(acc_row(lane, 0), n * 8 + acc_col(lane, 0)),
                     pack_bf16(acc[n][0] * scale, acc[n][1] * scale));
        st_shared_32(staging + at<D>(acc_row(lane, 2), n * 8 + acc_col(lane, 2)),
                     pack_bf16(acc[n][2] * scale, acc[n][3] * scale));
    }
    __syncwarp();
#pragma unroll
    for (int k = 0; k < FLASH_WARP_ROWS * PER_ROW / 32; k++) {
        const int i = lane + k * 32, r = i / PER_ROW, c = i % PER_ROW * 8;
        if (r < valid_rows) *reinterpret_cast<int4*>(dst + r * stride + c) = ld_shared_128(staging + at<D>(r, c));
    }
    if (!column_sums) return;
    // A lane takes two neighbouring columns (one 32-bit word of a row) and adds the rows in order.
    const int rows = min(valid_rows, FLASH_WARP_ROWS);
    for (int c = 2 * lane; c < D; c += 64) {
        float lo = 0.0f, hi = 0.0f;
        for (int r = 0; r < rows; r++) {
            const unsigned pair = __float_as_uint(ld_shared_f32(staging + at<D>(r, c)));
            lo += __uint_as_float(pair << 16);
            hi += __uint_as_float(pair & 0xffff0000u);
        }
        column_sums[c] = lo, column_sums[c + 1] = hi;
    }
}

// Where a backward kernel's warp puts the column sums of its 16 rows from row0 (a multiple of 16) of sequence b (T
// rows), from column col0 of qkv's W: partials is (B, G, W) with G = 4 per 64 rows of the sequence, rounded up (see
// the top of the file). Null without partials, and for a warp whose rows start past the last such group (a block of
// 128 rows may reach past it; none of those rows is in the sequence).
__device__ __forceinline__ float* bias_partials_at(float* partials, int b, int row0, int T, int W, int col0) {
    const int groups = (T + 63) / 64 * 4;
    if (!partials || row0 / FLASH_WARP_ROWS >= groups) return nullptr;
    return partials + ((long)b * groups + row0 / FLASH_WARP_ROWS) * W + col0;
}

// Issues acc (a warpgroup's 64 rows × N) += A·Bᵀ on wgmma, summed over D, as add_abt computes it, and commits it as
// one group: acc may be read, and the tiles overwritten, only after a wgmma_wait that completes the group (then
// wgmma_settle(acc)).
template <int D, int N, int A_ROWS>
__device__ __forceinline__ void issue_abt_wgmma(float (&acc)[N / 8][4], unsigned a_tile, int a_first,
                                                unsigned b_tile) {
    static_assert(D % 64 == 0 && N % 64 == 0, "wgmma tiles are made of 64-column blocks");
#pragma unroll
    for (int n = 0; n < N / 64; n++) wgmma_settle(&acc[n * 8]);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < D / 16; kb++) {
        const unsigned long long a =
            wgmma_descriptor(a_tile + swizzled_at<A_ROWS>(a_first / 64 * 64, kb * 16), 16, 1024);
#pragma unroll
        for (int n = 0; n < N / 64; n++)
            wgmma_64x64_ss<false, false>(&acc[n * 8], a,
                                         wgmma_descriptor(b_tile + swizzled_at<N>(n * 64, kb * 16), 16, 1024));
    }
    wgmma_commit();
}

// Issues acc (a warpgroup's 64 rows × D) += A·B on wgmma, summed over K, as add_ab computes it, and commits it as one
// group (see issue_abt_wgmma). The descriptor gives 1024 as both offsets: a 64-column product never uses the one
// between blocks of 64 columns, so either reading of which offset steps over 8 rows of an MN-major operand finds 1024
// there.
template <int D, int K>
__device__ __forceinline__ void issue_ab_wgmma(float (&acc)[D / 8][4], const unsigned (&a)[K / 16][4],
                                               unsigned b_tile) {
    static_assert(D % 64 == 0 && K % 64 == 0, "wgmma tiles are made of 64-column blocks");
#pragma unroll
    for (int n = 0; n < D / 64; n++) wgmma_settle(&acc[n * 8]);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < K / 16; kb++)
#pragma unroll
        for (int n = 0; n < D / 64; n++) {
            const unsigned long long b = wgmma_descriptor(b_tile + swizzled_at<K>(kb * 16, n * 64), 1024, 1024);
            wgmma_64x64_rs_mn(&acc[n * 8], a[kb], b);
        }
    wgmma_commit();
}

// After the wgmma_wait that completed acc's products: its registers may be read.
template <int N>
__device__ __forceinline__ void settle_wgmma(float (&acc)[N / 8][4]) {
#pragma unroll
    for (int n = 0; n < N / 64; n++) wgmma_settle(&acc[n * 8]);
}

// acc (this warp's 16 rows × N) += A·Bᵀ, summed over D: A from the tile at a_tile (A_ROWS rows), B the N rows of
// the tile at b_tile (S = Q·Kᵀ in the forward and dq kernels, dP = dO·Vᵀ in dq, Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ in dkv).
// On mma.sync, A is the warp's own 16 rows from a_first, and both operands are read as fragments by ldmatrix from
// padded tiles. On wgmma (WGMMA), the warpgroup computes its 64 rows together (from a_first rounded down to 64) from
// swizzled tiles, and the products are waited for before this returns.
template <int D, int N, int A_ROWS, bool WGMMA>
__device__ __forceinline__ void add_abt(float (&acc)[N / 8][4], unsigned a_tile, int a_first, unsigned b_tile,
                                        int lane) {
    if constexpr (WGMMA) {
        issue_abt_wgmma<D, N, A_ROWS>(acc, a_tile, a_first, b_tile);
        wgmma_wait<0>();
        settle_wgmma<N>(acc);
    } else {
        const unsigned a = a_tile + at<D>(a_first, 0) + a_fragment_lane<D>(lane), b = b_tile + b_fragment_lane<D>(lane);
#pragma unroll
        for (int kb = 0; kb < D / 16; kb++) {
            unsigned af[4];
            ldmatrix_x4(af, a + at<D>(0, kb * 16));
#pragma unroll
            for (int n = 0; n < N / 16; n++) {
                unsigned bf[4];
                ldmatrix_x4(bf, b + at<D>(n * 16, kb * 16));
                mma_16816(acc[2 * n], af, bf[0], bf[1]);
                mma_16816(acc[2 * n + 1], af, bf[2], bf[3]);
            }
        }
    }
}

// acc (this warp's 16 rows × D) += A·B, summed over K: A (16 × K, the warp's rows) given as bf16 A fragments, B the
// K rows of the tile at b_tile (O += P·V in the forward, dQ += dS·K in dq, dV += Pᵀ·dO and dK += dSᵀ·Q in dkv). On
// mma.sync B is read transposed by ldmatrix from a padded tile; on wgmma (WGMMA) it is read by the warpgroup's
// products from a swizzled tile, MN-major (issue_ab_wgmma), and the products are waited for before this returns.
template <int D, int K, bool WGMMA>
__device__ __forceinline__ void add_ab(float (&acc)[D / 8][4], const unsigned (&a)[K / 16][4], unsigned b_tile,
                                       int lane) {
    if constexpr (WGMMA) {
        issue_ab_wgmma<D, K>(acc, a, b_tile);
        wgmma_wait<0>();
        settle_wgmma<D>(acc);
    } else {
        const unsigned b = b_tile + a_fragment_lane<D>(lane);
#pragma unroll
        for (int kb = 0; kb < K / 16; kb++) {
#pragma unroll
            for (int n = 0; n < D / 16; n++) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, b + at<D>(kb * 16, n * 16));
                mma_16816(acc[2 * n], a[kb], bf[0], bf[1]);
                mma_16816(acc[2 * n + 1], a[kb], bf[2], bf[3]);
            }
        }
    }
}

// ---- forward ------------------------------------------------------------------------------------------------------

// x ← x·s in log2 units (see the top), and each row's maximum. With MASKED, keys a row does not see become −∞: those
// before `first` or past `last`, the row's first and last visible keys counted from this lane's first column of the
// tile. Only a tile that reaches past the sequence or (causal) past the warp's first query or before its last one's
// window needs it; the others, most of a long sequence's, skip the per-element comparisons.
template <int M, int BC, bool MASKED>
__device__ __forceinline__ void scale_scores(float (&x)[M][BC / 8][4], float (&row_max)[M][2],
                                             const int (&first)[M][2], const int (&last)[M][2], float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < M; mt++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float tile_max = NEG_INF;
#pragma unroll
            for (int n = 0; n < BC / 8; n++) {
#pragma unroll
                for (int e = 2 * half; e < 2 * half + 2; e++) {
                    float v = x[mt][n][e] * scale_log2;
                    const int c = n * 8 + e % 2;
                    if (MASKED && (c < first[mt][half] || c > last[mt][half])) v = NEG_INF;
                    x[mt][n][e] = v;
                    tile_max = fmaxf(tile_max, v);
                }
            }
            row_max[mt][half] = row_max4(tile_max);
        }
    }
}

// The online-softmax update of a warp's 16·M queries (row0 the first) for one tile of BC keys from k0, whose scores
// Q·Kᵀ are in x (mma's accumulator layout), but for O: x becomes P = 2^(x − m'), m and l are brought up to date, and
// `correction` gets the factor each row of O is to be multiplied by (rescale_rows). Returns whether any row of this
// lane has a new maximum.
template <int M, int BC>
__device__ __forceinline__ bool softmax_scores(float (&x)[M][BC / 8][4], float (&m)[M][2], float (&l)[M][2],
                                               float (&correction)[M][2], int k0, int row0, int T, int window,
                                               float scale_log2, int lane) {
    float row_max[M][2];
    if (keys_need_mask(k0, BC, row0, 16 * M, T, window)) {
        int first[M][2], last[M][2];
#pragma unroll
        for (int mt = 0; mt < M; mt++)
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const int row = row0 + mt * 16 + acc_row(lane, 2 * half);
                first[mt][half] = first_visible_key(row, k0, window, lane);
                last[mt][half] = last_visible_key(row, k0, T, window, lane);
            }
        scale_scores<M, BC, true>(x, row_max, first, last, scale_log2);
    } else {
        scale_scores<M, BC, false>(x, row_max, {}, {}, scale_log2);
    }
    bool rescale = false;
#pragma unroll
    for (int mt = 0; mt < M; mt++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const float old_max = m[mt][half], new_max = fmaxf(old_max, row_max[mt][half]);
            // A row that has seen no key yet stays at −∞; subtracting 0 then keeps its terms 0 rather than NaN.
            const float base = new_max == NEG_INF ? 0.0f : new_max;
            // An unchanged maximum leaves the row's sums as they are: exactly, whatever ex2 makes of 0.
            correction[mt][half] = new_max == old_max ? 1.0f : exp2_ftz(old_max - base);
            rescale |= new_max != old_max;
            m[mt][half] = new_max;
            float sum = 0.0f;
#pragma unroll
            for (int n = 0; n < BC / 8; n++) {
#pragma unroll
                for (int e = 2 * half; e < 2 * half + 2; e++) {
                    x[mt][n][e] = exp2_ftz(x[mt][n][e] - base);
                    sum += x[mt][n][e];
                }
            }
            // This lane's part of the row sum: the four parts are added once, at the end.
            l[mt][half] = l[mt][half] * correction[mt][half] + sum;
        }
    }
    return rescale;
}

// O's part of the online-softmax update: each row times its correction (softmax_scores). O is rescaled only when a
// row of the warp has a new maximum (`rescale` in some lane), which past the first tiles of a row is rare: the branch
// is the same for the whole warp, which then skips D/2·M multiplications a lane.
template <int D, int M>
__device__ __forceinline__ void rescale_rows(float (&o)[M][D / 8][4], const float (&correction)[M][2], bool rescale) {
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
        for (int mt = 0; mt < M; mt++) {
#pragma unroll
            for (int n = 0; n < D / 8; n++) {
                o[mt][n][0] *= correction[mt][0], o[mt][n][1] *= correction[mt][0];
                o[mt][n][2] *= correction[mt][1], o[mt][n][3] *= correction[mt][1];
            }
        }
    }
}

// The whole online-softmax update but for O's P·V, which the caller adds: softmax_scores, then rescale_rows.
template <int D, int M, int BC>
__device__ __forceinline__ void softmax_tile(float (&x)[M][BC / 8][4], float (&o)[M][D / 8][4], float (&m)[M][2],
                                             float (&l)[M][2], int k0, int row0, int T, int window, float scale_log2,
                                             int lane) {
    float correction[M][2];
    const bool rescale = softmax_scores<M, BC>(x, m, l, correction, k0, row0, T, window, scale_log2, lane);
    rescale_rows<D, M>(o, correction, rescale);
}

// One tile of BC keys for a warp's 16·M queries (row0 the first), on mma.sync: the online-softmax update of o, m, l.
// `q_lane` (the warp's first query row), `k_lane` and `v_lane` are shared addresses plus this lane's ldmatrix
// offsets. Q's fragments are read again for every tile rather than kept: registers are the scarcer resource (see the
// top).
template <int D, int M, int BC>
__device__ __forceinline__ void forward_tile(float (&o)[M][D / 8][4], float (&m)[M][2], float (&l)[M][2],
                                             unsigned q_lane, unsigned k_lane, unsigned v_lane, int k0, int row0,
                                             int T, int window, float scale_log2, int lane) {
    float x[M][BC / 8][4] = {};
#pragma unroll
    for (int kb = 0; kb < D / 16; kb++) {
        unsigned q[M][4];
#pragma unroll
        for (int mt = 0; mt < M; mt++) ldmatrix_x4(q[mt], q_lane + at<D>(mt * 16, kb * 16));
#pragma unroll
        for (int n = 0; n < BC / 16; n++) {
            unsigned k[4];
            ldmatrix_x4(k, k_lane + at<D>(n * 16, kb * 16));
#pragma unroll
            for (int mt = 0; mt < M; mt++) {
                mma_16816(x[mt][2 * n], q[mt], k[0], k[1]);
                mma_16816(x[mt][2 * n + 1], q[mt], k[2], k[3]);
            }
        }
    }
    softmax_tile<D, M, BC>(x, o, m, l, k0, row0, T, window, scale_log2, lane);
    // O += P·V, P straight from the score registers.
#pragma unroll
    for (int kb = 0; kb < BC / 16; kb++) {
        unsigned p[M][4];
#pragma unroll
        for (int mt = 0; mt < M; mt++) accumulator_to_a(p[mt], x[mt], kb);
#pragma unroll
        for (int n = 0; n < D / 16; n++) {
            unsigned v[4];
            ldmatrix_x4_trans(v, v_lane + at<D>(kb * 16, n * 16));
#pragma unroll
            for (int mt = 0; mt < M; mt++) {
                mma_16816(o[mt][2 * n], p[mt], v[0], v[1]);
                mma_16816(o[mt][2 * n + 1], p[mt], v[2], v[3]);
            }
        }
    }
}

// One tile of BC keys for a warpgroup's 64 queries on wgmma (sm_90a): as forward_tile, each warp keeping its own 16
// rows' o, m and l (row0 its first, `first` in the Q tile). S = Q·Kᵀ and O += P·V are the warpgroup's products
// (add_abt, add_ab), P going from the score registers to the second as A fragments. Each is waited for at once: the
// softmax needs all of S, and the other warpgroup's products fill the gaps.
template <int D, int BR, int BC>
__device__ __forceinline__ void forward_tile_wgmma(float (&o)[1][D / 8][4], float (&m)[1][2], float (&l)[1][2],
                                                   unsigned q_tile, int first, unsigned k_tile, unsigned v_tile, int k0,
                                                   int row0, int T, int window, float scale_log2, int lane) {
    float x[1][BC / 8][4] = {};
    add_abt<D, BC, BR, true>(x[0], q_tile, first, k_tile, lane);
    softmax_tile<D, 1, BC>(x, o, m, l, k0, row0, T, window, scale_log2, lane);
    unsigned p[BC / 16][4];
    scores_to_a<BC>(p, x[0]);
    add_ab<D, BC, true>(o[0], p, v_tile, lane);
}

// The end of a forward for a warp's 16·M queries (row0 the first): each row's O divided by its sum l, written to out
// through 16·M padded rows of shared memory from `staging` that only this warp uses, and its log-sum-exp to lse.
template <int D, int M>
__device__ __forceinline__ void store_forward(bf16* out, float* lse, float (&o)[M][D / 8][4], const float (&m)[M][2],
                                              const float (&l)[M][2], unsigned staging, int b, int h, int row0, int T,
                                              int NH, int lane) {
#pragma unroll
    for (int mt = 0; mt < M; mt++) {
        float inverse[2];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const float sum = row_sum4(l[mt][half]);
            inverse[half] = sum > 0.0f ? 1.0f / sum : 0.0f;
            const int row = row0 + mt * 16 + acc_row(lane, 2 * half);
            if (lane % 4 == 0 && row < T) lse[((long)b * NH + h) * T + row] = (m[mt][half] + log2f(sum)) * FLASH_LN2;
        }
#pragma unroll
        for (int n = 0; n < D / 8; n++) {
            o[mt][n][0] *= inverse[0], o[mt][n][1] *= inverse[0];
            o[mt][n][2] *= inverse[1], o[mt][n][3] *= inverse[1];
        }
        const int row = row0 + mt * 16;
        store_rows<D>(out + ((long)b * T + row) * NH * D + h * D, (long)NH * D, T - row, o[mt], 1.0f,
                      staging + at<D>(mt * 16, 0), lane);
    }
}

// What a forward block of BR queries works on: its sequence's rows (W elements each), its first query, its key/value
// group's keys and values, and how many tiles of BC keys it takes. Causal query tiles further down see more keys:
// they go first, so that the short ones fill the tail. Its Q tile and the first tile of keys and values are loaded
// (one cp.async group) into q_tile, k_tile and v_tile.
struct ForwardBlock {
    int W, q0, tiles;
    const bf16 *keys, *values;
};
template <int D, int BR, int BC, int THREADS, bool WGMMA>
__device__ __forceinline__ ForwardBlock start_forward(unsigned q_tile, unsigned k_tile, unsigned v_tile,
                                                      const bf16* qkv, int T, int NH, int KVH, int window) {
    const int h = blockIdx.y, b = blockIdx.z, g = h / (NH / KVH), W = (NH + 2 * KVH) * D;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;
    const bf16* seq = qkv + (long)b * T * W;
    const ForwardBlock block{W, q0, ((window ? min(T, q0 + BR) : T) + BC - 1) / BC, seq + (NH + g) * D,
                             seq + (NH + KVH + g) * D};
    load_tile<BR, D, THREADS, WGMMA>(q_tile, seq + (long)q0 * W + h * D, W, T - q0);
    load_tile<BC, D, THREADS, WGMMA>(k_tile, block.keys, W, T);
    load_tile<BC, D, THREADS, WGMMA>(v_tile, block.values, W, T);
    cp_async_commit();
    return block;
}

// Grid (query tiles, NH, B); shared memory: Q (BR rows), then two stages of K and of V (BC rows each). On mma.sync
// (WGMMA false) a block is 4 warps of 16·M queries each and its tiles are padded; on wgmma, 2 warpgroups of 64
// queries (M = 1 a warp) and its tiles swizzled. A warp (a warpgroup on wgmma) whose queries are all past the end,
// or (causal) all before a tile's keys or all past their windows, skips that tile.
template <int D, int M, int BC, bool WGMMA>
__device__ __forceinline__ void flash_forward(bf16* out, float* lse, const bf16* qkv, int T, int NH, int KVH,
                                              int window) {
    static_assert(!WGMMA || M == 1, "a wgmma warp holds 16 queries");
    constexpr int THREADS = forward_threads<WGMMA>(), BR = THREADS / 32 * FLASH_WARP_ROWS * M;
    constexpr int GROUP_ROWS = WGMMA ? 64 : FLASH_WARP_ROWS * M;  // the queries that take a tile together
    check_launch(forward_shared_bytes<D, BR, BC, WGMMA>(), THREADS);
    const unsigned q_tile = shared_address(flash_shared), k_tiles = q_tile + tile_bytes<D, WGMMA>(BR),
                   v_tiles = k_tiles + tile_bytes<D, WGMMA>(2 * BC);
    if (WGMMA && q_tile % 1024 != 0) __trap();  // the swizzle's atoms must be aligned (mma.cuh)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, h = blockIdx.y, b = blockIdx.z;
    const auto [W, q0, tiles, keys, values] =
        start_forward<D, BR, BC, THREADS, WGMMA>(q_tile, k_tiles, v_tiles, qkv, T, NH, KVH, window);

    const int first = warp * FLASH_WARP_ROWS * M, row0 = q0 + first;  // this warp's first query, in tile and sequence
    const int group_first = first / GROUP_ROWS * GROUP_ROWS, group_row0 = q0 + group_first;
    float o[M][D / 8][4] = {}, m[M][2], l[M][2];
#pragma unroll
    for (int mt = 0; mt < M; mt++) m[mt][0] = m[mt][1] = NEG_INF, l[mt][0] = l[mt][1] = 0.0f;
    const float scale_log2 = rsqrtf((float)D) * FLASH_LOG2E;
    for (int j = 0; j < tiles; j++) {
        if (j + 1 < tiles) {
            const int next = (j + 1) * BC;
            const unsigned stage = (j + 1) % 2 * tile_bytes<D, WGMMA>(BC);
            load_tile<BC, D, THREADS, WGMMA>(k_tiles + stage, keys + (long)next * W, W, T - next);
            load_tile<BC, D, THREADS, WGMMA>(v_tiles + stage, values + (long)next * W, W, T - next);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (WGMMA) fence_proxy_async();
        __syncthreads();
        const int k0 = j * BC;
        const unsigned stage = j % 2 * tile_bytes<D, WGMMA>(BC);
        if (group_row0 < T && !keys_unseen(k0, BC, group_row0, GROUP_ROWS, window)) {
            if constexpr (WGMMA)
                forward_tile_wgmma<D, BR, BC>(o, m, l, q_tile, first, k_tiles + stage, v_tiles + stage, k0, row0, T,
                                              window, scale_log2, lane);
            else
                forward_tile<D, M, BC>(o, m, l, q_tile + at<D>(first, 0) + a_fragment_lane<D>(lane),
                                       k_tiles + stage + b_fragment_lane<D>(lane),
                                       v_tiles + stage + a_fragment_lane<D>(lane), k0, row0, T, window, scale_log2,
                                       lane);
        }
        __syncthreads();  // before the next iteration's copies overwrite this stage
    }

    // Each warp stages its output in rows only it uses: its own rows of the padded Q tile; on wgmma, where Q's rows
    // are swizzled, 16 padded rows of its own in the K and V stages, which the loop is done with.
    static_assert(!WGMMA || THREADS / 32 * at<D>(FLASH_WARP_ROWS, 0) <= tile_bytes<D, WGMMA>(4 * BC),
                  "the staging rows fit in the K and V stages");
    const unsigned staging = WGMMA ? k_tiles + warp * at<D>(FLASH_WARP_ROWS, 0) : q_tile + at<D>(first, 0);
    store_forward<D, M>(out, lse, o, m, l, staging, b, h, row0, T, NH, lane);
}

// The forward on wgmma with each warpgroup's products pipelined, FlashAttention-3's overlap inside a warpgroup: for
// each tile j, the warpgroup issues S_j = Q·K_jᵀ and then the previous tile's O += P_{j−1}·V_{j−1}, waits for S_j
// alone, and computes the softmax of S_j while the tensor cores still work on P_{j−1}·V_{j−1}; only then does it wait
// for O, which it rescales. The last tile a warpgroup takes adds its P·V at once. The arithmetic is the unpipelined
// forward's, in the same order, on the same tiles: the results are the same bit for bit. P_{j−1} stays in registers
// as the next product's A fragments (BC/4 of them) beside S_j (BC/2 floats) and O (D/2): at D = 128 and 128 keys a
// tile, 238 registers (226 unpipelined), without spills. (Until 2026-12-06 a product was waited for on a path other
// than its issue's, and ptxas serialised them all: its C7518, which the compile test now refuses.) V_{j−1} is read
// while tile j+1 is loaded, so V has three stages, K two: at D = 128, 192 KiB of shared memory. Grid and block as
// flash_forward's on wgmma; shared memory: Q (BR rows), two stages of K and three of V (BC rows each).
template <int D, int BC>
__device__ constexpr unsigned pipelined_forward_shared_bytes() {
    return tile_bytes<D, true>(2 * 64 + 5 * BC);
}
template <int D, int BC>
__device__ __forceinline__ void flash_forward_pipelined(bf16* out, float* lse, const bf16* qkv, int T, int NH, int KVH,
                                                        int window) {
    constexpr int THREADS = forward_threads<true>(), BR = 2 * 64;
    check_launch(pipelined_forward_shared_bytes<D, BC>(), THREADS);
    const unsigned q_tile = shared_address(flash_shared), k_tiles = q_tile + tile_bytes<D, true>(BR),
                   v_tiles = k_tiles + tile_bytes<D, true>(2 * BC);
    if (q_tile % 1024 != 0) __trap();  // the swizzle's atoms must be aligned (mma.cuh)
    const auto k_stage = [=](int j) { return k_tiles + j % 2 * tile_bytes<D, true>(BC); };
    const auto v_stage = [=](int j) { return v_tiles + j % 3 * tile_bytes<D, true>(BC); };
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, h = blockIdx.y, b = blockIdx.z;
    const auto [W, q0, tiles, keys, values] =
        start_forward<D, BR, BC, THREADS, true>(q_tile, k_stage(0), v_stage(0), qkv, T, NH, KVH, window);

    const int first = warp * FLASH_WARP_ROWS, row0 = q0 + first;  // this warp's first query, in tile and sequence
    const int group_row0 = q0 + first / 64 * 64;                   // its warpgroup's
    // The warpgroup takes tiles up to its last (causal: the last that reaches its queries).
    const int group_tiles = window ? min(tiles, (group_row0 + 64 + BC - 1) / BC) : tiles;
    float o[1][D / 8][4] = {}, m[1][2] = {{NEG_INF, NEG_INF}}, l[1][2] = {};
    unsigned p[BC / 16][4];  // P of the tile whose O += P·V is still to be issued
    const float scale_log2 = rsqrtf((float)D) * FLASH_LOG2E;
    for (int j = 0; j < tiles; j++) {
        // Tile j has landed, and every warpgroup is done with tile j − 1's K and tile j − 2's V, whose stages the
        // copies of tile j + 1 take.
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (j + 1 < tiles) {
            const int next = (j + 1) * BC;
            load_tile<BC, D, THREADS, true>(k_stage(j + 1), keys + (long)next * W, W, T - next);
            load_tile<BC, D, THREADS, true>(v_stage(j + 1), values + (long)next * W, W, T - next);
            cp_async_commit();
        }
        if (group_row0 >= T || j >= group_tiles) continue;
        // Each branch waits for the products it issues: ptxas serialises wgmma whose results cross divergent paths
        // (its C7518), which would undo the overlap.
        float x[1][BC / 8][4] = {}, correction[1][2];
        bool rescale;
        if (j == 0) {
            issue_abt_wgmma<D, BC, BR>(x[0], q_tile, first, k_stage(j));
            wgmma_wait<0>();
            settle_wgmma<BC>(x[0]);
            rescale = softmax_scores<1, BC>(x, m, l, correction, j * BC, row0, T, window, scale_log2, lane);
        } else {
            issue_abt_wgmma<D, BC, BR>(x[0], q_tile, first, k_stage(j));
            issue_ab_wgmma<D, BC>(o[0], p, v_stage(j - 1));
            wgmma_wait<1>();
            settle_wgmma<BC>(x[0]);
            rescale = softmax_scores<1, BC>(x, m, l, correction, j * BC, row0, T, window, scale_log2, lane);
            wgmma_wait<0>();
            settle_wgmma<D>(o[0]);
        }
        rescale_rows<D, 1>(o, correction, rescale);
        scores_to_a<BC>(p, x[0]);
        if (j + 1 == group_tiles) {
            issue_ab_wgmma<D, BC>(o[0], p, v_stage(j));
            wgmma_wait<0>();
            settle_wgmma<D>(o[0]);
        }
    }
    __syncthreads();  // every warpgroup is done with the K and V stages, where the output is staged

    // Each warp stages its output in 16 padded rows of its own in the K and V stages.
    static_assert(THREADS / 32 * at<D>(FLASH_WARP_ROWS, 0) <= tile_bytes<D, true>(5 * BC), "the staging rows fit");
    store_forward<D, 1>(out, lse, o, m, l, k_tiles + warp * at<D>(FLASH_WARP_ROWS, 0), b, h, row0, T, NH, lane);
}

// ---- warp-specialised kernels (sm_90a) ----------------------------------------------------------------------------
//
// FlashAttention-3's arrangement: a block of three warpgroups, of which the first only loads (one thread issuing tensor
// copies, the others leave at once, or in the dkv kernel one warp, and the warpgroup gives its registers to the other
// two with setmaxnreg) and the other two compute on the tiles the first hands them. The block's resident tiles (Q in
// the forward; Q and dO in dq; K and V in dkv) land once; two streamed tiles (K and V; Q and dO in dkv) move through
// two stages each (three in the dq kernel and the two-role dkv kernel, which hold a step's tiles into the next), each
// stage with a "full" mbarrier (the copies of its tile have landed) and an "empty" one (all 256 computing threads are
// done with it), so loading never waits for a block-wide barrier, and K_j can land while V_{j−1} is still read. Each
// computing warpgroup takes every step of the block, waiting for its tiles and handing them back even when it has
// nothing to add, so that the phases of the empty barriers count steps. Tiles come as tensor maps of qkv (and dout),
// made by the engine's tensor_map: (W elements, T rows, B sequences), boxes of 64 elements by a tile's rows, in the
// 128-byte swizzle.
#define SPECIALISED_STAGES 2
#define SPECIALISED_COMPUTING (2 * 128)
// The streamed tiles: of the forward and the dq kernel, and of the dkv kernel.
#define STREAM_K 0
#define STREAM_V 1
#define STREAM_Q 0
#define STREAM_DOUT 1

// Shared memory: RESIDENT rows of resident tiles, STAGES stages of each of the two streamed tiles (BC rows each),
// then the mbarriers (the resident tiles' full one, and a full and an empty one for each stage).
template <int D, int BC, int RESIDENT, int STAGES = SPECIALISED_STAGES>
__device__ constexpr unsigned specialised_shared_bytes() {
    return tile_bytes<D, true>(RESIDENT + 2 * STAGES * BC) + 8 * (1 + 4 * STAGES);
}

// Where a warp-specialised block's tiles and mbarriers lie, and which stage and barriers of streamed tile t step j
// takes.
template <int D, int BC, int RESIDENT, int STAGES_ = SPECIALISED_STAGES>
struct SpecialisedBlock {
    static constexpr int STAGES = STAGES_;
    unsigned resident, stages, resident_full, barriers;
    __device__ SpecialisedBlock(unsigned base)
        : resident(base), stages(base + tile_bytes<D, true>(RESIDENT)),
          resident_full(stages + tile_bytes<D, true>(2 * STAGES * BC)), barriers(resident_full + 8) {}
    __device__ unsigned stage(int t, int j) const {
        return stages + (t * STAGES + j % STAGES) * tile_bytes<D, true>(BC);
    }
    __device__ unsigned full(int t, int j) const { return barriers + 8 * (t * STAGES + j % STAGES); }
    __device__ unsigned empty(int t, int j) const { return barriers + 8 * ((2 + t) * STAGES + j % STAGES); }
    // The parity of the phase of a stage's barriers that step j's use of the stage completes.
    __device__ unsigned parity(int j) const { return j / STAGES % 2; }
};

// Copies ROWS rows of D elements from (col, row) of sequence b of `map` into a swizzled tile, in boxes of 64 columns,
// completing on mbarrier `bar`.
template <int ROWS, int D>
__device__ __forceinline__ void tma_load_tile(unsigned tile, const TensorMap& map, unsigned bar, int col, int row,
                                              int b) {
#pragma unroll
    for (int c = 0; c < D; c += 64) tma_load_3d(tile + swizzled_at<ROWS>(0, c), map, bar, col + c, row, b);
}

// Streamed tile t of step j, BC rows from (col, row) of sequence b of `map`, once the computing warpgroups have
// handed its stage back (the wait for the phase before, which returns at once for a stage's first step).
template <int D, int BC, int RESIDENT, int STAGES>
__device__ __forceinline__ void load_stage(const SpecialisedBlock<D, BC, RESIDENT, STAGES>& f, int t, int j,
                                           const TensorMap& map, int col, int row, int b) {
    mbarrier_wait(f.empty(t, j), f.parity(j) ^ 1);
    mbarrier_arrive_expect_tx(f.full(t, j), BC * D * 2);
    tma_load_tile<BC, D>(f.stage(t, j), map, f.full(t, j), col, row, b);
}

// The loading thread's stream in the forward and dq kernels: K_j and V_j for every tile j.
template <int D, int BC, int RESIDENT, int STAGES>
__device__ __forceinline__ void load_key_value_tiles(const SpecialisedBlock<D, BC, RESIDENT, STAGES>& f,
                                                     const TensorMap& kv_map, int k_col, int v_col, int b, int tiles) {
    for (int j = 0; j < tiles; j++) {
        load_stage(f, STREAM_K, j, kv_map, k_col, j * BC, b);
        load_stage(f, STREAM_V, j, kv_map, v_col, j * BC, b);
    }
}

// The registers a thread of a warp-specialised block has at launch: what __launch_bounds__(3 · 128, 1) leaves ptxas
// (the 64K of the multiprocessor over 384 threads, in multiples of 8), which ptxas then uses whole. setmaxnreg moves
// registers between the warpgroups within the block's 384 · 168 only: an increase waits for what the others gave up.
#define SPECIALISED_LAUNCH_REGISTERS (65536 / (3 * 128) / 8 * 8)

// Sets the block's mbarriers up and splits it into its roles: the loading warpgroup gives its registers away, down to
// LOADING, its first LOADERS threads run `load`, and it returns false; the computing warpgroups take the registers
// given up (as many as fit in multiples of 8) and return true. Each of the loading threads arrives at the full
// barriers of the first streamed tile (one of them with the bytes to expect); one arrives at the others'.
template <int LOADERS, int LOADING, int D, int BC, int RESIDENT, int STAGES, typename Load>
__device__ __forceinline__ bool specialised_roles(const SpecialisedBlock<D, BC, RESIDENT, STAGES>& f, Load load) {
    constexpr int COMPUTING = (3 * 128 * SPECIALISED_LAUNCH_REGISTERS - 128 * LOADING) / 256 / 8 * 8;
    static_assert(COMPUTING <= 256, "setmaxnreg gives a thread at most 256 registers");
    if (f.resident % 1024 != 0) __trap();  // the swizzle's atoms must be aligned (mma.cuh)
    if (threadIdx.x == 0) {
        mbarrier_init(f.resident_full, 1);
        for (int s = 0; s < STAGES; s++) {
            mbarrier_init(f.full(0, s), LOADERS), mbarrier_init(f.full(1, s), 1);
            mbarrier_init(f.empty(0, s), SPECIALISED_COMPUTING), mbarrier_init(f.empty(1, s), SPECIALISED_COMPUTING);
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the last barrier of the whole block
    if (threadIdx.x < 128) {
        setmaxnreg_dec<LOADING>();
        if (threadIdx.x < LOADERS) load();
        return false;
    }
    setmaxnreg_inc<COMPUTING>();
    return true;
}

// A computing warpgroup with nothing to add to tile j hands its stages back, in the order of their phases: V_j only
// once it has landed.
template <int D, int BC, int RESIDENT>
__device__ __forceinline__ void pass_tile(const SpecialisedBlock<D, BC, RESIDENT>& f, int j) {
    mbarrier_arrive(f.empty(STREAM_K, j));
    mbarrier_wait(f.full(STREAM_V, j), f.parity(j));
    mbarrier_arrive(f.empty(STREAM_V, j));
}

// The forward warp-specialised: each computing warpgroup takes 64 queries as flash_forward_pipelined's warpgroups
// do, and the two take turns at issuing their products (ping-pong, two named barriers), so that one's softmax runs
// while the other's products keep the tensor cores busy. The arithmetic is flash_forward_pipelined's, in the same
// order: the results are the same bit for bit. Grid as flash_forward's on wgmma; Q (the resident tile, BR rows)
// from q_map, K and V from kv_map (boxes of BR and BC rows).
template <int D, int BC>
__device__ __forceinline__ void flash_forward_specialised(bf16* out, float* lse, const TensorMap& q_map,
                                                          const TensorMap& kv_map, int T, int NH, int KVH,
                                                          int window) {
    constexpr int BR = 2 * 64, COMPUTING = SPECIALISED_COMPUTING;
    check_launch(specialised_shared_bytes<D, BC, BR>(), 3 * 128);
    const SpecialisedBlock<D, BC, BR> f(shared_address(flash_shared));
    const int h = blockIdx.y, b = blockIdx.z, g = h / (NH / KVH);
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR, tiles = ((window ? min(T, q0 + BR) : T) + BC - 1) / BC;
    const bool computing = specialised_roles<1, 24>(f, [&] {
        mbarrier_arrive_expect_tx(f.resident_full, BR * D * 2);
        tma_load_tile<BR, D>(f.resident, q_map, f.resident_full, h * D, q0, b);
        load_key_value_tiles(f, kv_map, (NH + g) * D, (NH + KVH + g) * D, b, tiles);
    });
    if (!computing) return;

    // Warpgroup c of the two computing ones; named barriers 1 + c give it its turn at the tensor cores, 3 gathers both.
    const int c = threadIdx.x / 128 - 1, warp = threadIdx.x / 32 - 4, lane = threadIdx.x % 32;
    const int first = warp * FLASH_WARP_ROWS, row0 = q0 + first, group_row0 = q0 + 64 * c;
    const unsigned my_turn = 1 + c, their_turn = 2 - c;
    const int group_tiles = group_row0 >= T ? 0 : window ? min(tiles, (group_row0 + 64 + BC - 1) / BC) : tiles;
    if (c == 1) named_barrier_arrive(their_turn, COMPUTING);  // the first warpgroup issues first
    // Its turn at the tensor cores for tile j, and the other's once its products for the tile are issued (unless the
    // other has had its last: the second warpgroup gives the first one more).
    const auto take_turn = [&] { named_barrier_sync(my_turn, COMPUTING); };
    const auto give_turn = [&](int j) {
        if (c == 0 || j + 1 < tiles) named_barrier_arrive(their_turn, COMPUTING);
    };
    mbarrier_wait(f.resident_full, 0);
    float o[1][D / 8][4] = {}, m[1][2] = {{NEG_INF, NEG_INF}}, l[1][2] = {};
    const float scale_log2 = rsqrtf((float)D) * FLASH_LOG2E;
    // Each product is waited for in the step that issues it, and no branch is taken with one in flight: ptxas
    // serialises wgmma whose results cross divergent paths (its C7518), which would undo the overlap. So the first
    // tile (S_0 alone), the steady tiles (S_j beside P_{j−1}·V_{j−1}) and the last P·V are steps of their own.
    if (group_tiles > 0) {
        unsigned p[BC / 16][4];  // P of the tile whose O += P·V is still to be issued
        float correction[1][2];
        {
            mbarrier_wait(f.full(STREAM_K, 0), f.parity(0));
            take_turn();
            float x[1][BC / 8][4] = {};
            issue_abt_wgmma<D, BC, BR>(x[0], f.resident, first, f.stage(STREAM_K, 0));
            give_turn(0);
            wgmma_wait<0>();
            settle_wgmma<BC>(x[0]);
            mbarrier_arrive(f.empty(STREAM_K, 0));
            const bool rescale = softmax_scores<1, BC>(x, m, l, correction, 0, row0, T, window, scale_log2, lane);
            rescale_rows<D, 1>(o, correction, rescale);
            scores_to_a<BC>(p, x[0]);
        }
        for (int j = 1; j < group_tiles; j++) {
            mbarrier_wait(f.full(STREAM_K, j), f.parity(j));
            take_turn();
            float x[1][BC / 8][4] = {};
            issue_abt_wgmma<D, BC, BR>(x[0], f.resident, first, f.stage(STREAM_K, j));
            mbarrier_wait(f.full(STREAM_V, j - 1), f.parity(j - 1));
            issue_ab_wgmma<D, BC>(o[0], p, f.stage(STREAM_V, j - 1));
            give_turn(j);
            wgmma_wait<1>();
            settle_wgmma<BC>(x[0]);
            mbarrier_arrive(f.empty(STREAM_K, j));
            const bool rescale =
                softmax_scores<1, BC>(x, m, l, correction, j * BC, row0, T, window, scale_log2, lane);
            wgmma_wait<0>();
            settle_wgmma<D>(o[0]);
            mbarrier_arrive(f.empty(STREAM_V, j - 1));
            rescale_rows<D, 1>(o, correction, rescale);
            scores_to_a<BC>(p, x[0]);
        }
        const int last = group_tiles - 1;
        mbarrier_wait(f.full(STREAM_V, last), f.parity(last));
        issue_ab_wgmma<D, BC>(o[0], p, f.stage(STREAM_V, last));
        wgmma_wait<0>();
        settle_wgmma<D>(o[0]);
        mbarrier_arrive(f.empty(STREAM_V, last));
    }
    for (int j = group_tiles; j < tiles; j++) {  // the tiles it has nothing to add to
        mbarrier_wait(f.full(STREAM_K, j), f.parity(j));
        take_turn();
        give_turn(j);
        pass_tile(f, j);
    }
    named_barrier_sync(3, COMPUTING);  // both warpgroups are done with the K and V stages, where the output is staged

    // Each warp stages its output in 16 padded rows of its own in the K and V stages.
    static_assert(8 * at<D>(FLASH_WARP_ROWS, 0) <= tile_bytes<D, true>(2 * SPECIALISED_STAGES * BC),
                  "the staging rows fit");
    store_forward<D, 1>(out, lse, o, m, l, f.stages + warp * at<D>(FLASH_WARP_ROWS, 0), b, h, row0, T, NH, lane);
}

// ---- backward -----------------------------------------------------------------------------------------------------

// D_i = dO_i·O_i for every row i of every head, into (B, NH, T) as lse is laid out: eight lanes per row, 16-byte
// loads, rows taken in out's order (b, t, h).
extern "C" __global__ void flash_attention_row_dot(float* row_dot, const bf16* dout, const bf16* out, int B, int T,
                                                   int NH, int D) {
    const long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / 8, rows = (long)B * T * NH;
    const int part = threadIdx.x % 8;
    float sum = 0.0f;
    if (row < rows) {
        for (int c = part * 8; c < D; c += 64) {
            const int4 x = *reinterpret_cast<const int4*>(dout + row * D + c);
            const int4 y = *reinterpret_cast<const int4*>(out + row * D + c);
            const bf16* xs = reinterpret_cast<const bf16*>(&x);
            const bf16* ys = reinterpret_cast<const bf16*>(&y);
#pragma unroll
            for (int k = 0; k < 8; k++) sum += __bfloat162float(xs[k]) * __bfloat162float(ys[k]);
        }
    }
    // Every lane takes part in the shuffles, including those past the end.
    sum += __shfl_xor_sync(0xffffffffu, sum, 4);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (row < rows && part == 0) {
        const long bt = row / NH;
        row_dot[(bt / T * NH + row % NH) * T + bt % T] = sum;
    }
}

// P = 2^(x·s − log2(e)·lse) for a warp's 16 rows of scores (lse_log2 = log2(e)·lse of its two rows a lane). With
// MASKED, keys before `first` or past `last`, a row's first and last visible keys counted from this lane's first
// column, get 0; only tiles that reach past the sequence or (causal) the warp's first query or before its last one's
// window need it.
template <int BC, bool MASKED>
__device__ __forceinline__ void row_probabilities(float (&s)[BC / 8][4], const float (&lse_log2)[2],
                                                  const int (&first)[2], const int (&last)[2], float scale_log2) {
#pragma unroll
    for (int n = 0; n < BC / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const float x = exp2_ftz(s[n][e] * scale_log2 - lse_log2[e / 2]);
            const int c = n * 8 + e % 2;
            s[n][e] = MASKED && (c < first[e / 2] || c > last[e / 2]) ? 0.0f : x;
        }
    }
}

// P from the scores S = Q·Kᵀ (s) of a warp's 16 queries (row0 the first) and a tile of BC keys (k0 the first), as
// the bf16 A fragments that dS takes; 0 where unseen.
template <int BC>
__device__ __forceinline__ void scores_to_p(unsigned (&p)[BC / 16][4], float (&s)[BC / 8][4],
                                            const float (&lse_log2)[2], int k0, int row0, int T, int window,
                                            float scale_log2, int lane) {
    if (keys_need_mask(k0, BC, row0, FLASH_WARP_ROWS, T, window)) {
        int first[2], last[2];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = row0 + acc_row(lane, 2 * half);
            first[half] = first_visible_key(row, k0, window, lane);
            last[half] = last_visible_key(row, k0, T, window, lane);
        }
        row_probabilities<BC, true>(s, lse_log2, first, last, scale_log2);
    } else {
        row_probabilities<BC, false>(s, lse_log2, {}, {}, scale_log2);
    }
    scores_to_a<BC>(p, s);
}

// dS = P∘(dP − D) in place of dP, for a dq kernel's warp (D of this lane's two rows).
template <int BC>
__device__ __forceinline__ void ds_of(float (&dp)[BC / 8][4], const unsigned (&p)[BC / 16][4],
                                      const float (&row_dot)[2]) {
#pragma unroll
    for (int n = 0; n < BC / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dp[n][e] = a_to_accumulator(p[n / 2], n % 2, e) * (dp[n][e] - row_dot[e / 2]);
}

// One tile of BC keys for a warp's 16 queries (row0 the first; `first` in the Q and dO tiles): dQ += dS·K
// (unscaled). Q's and dO's fragments are read again for each tile, as in the forward. As in the dkv kernel, S
// becomes P rounded to bf16 before dP is used, and dS = P∘(dP − D) uses that P: the two kernels compute the same dS.
template <int D, int BC, bool WGMMA>
__device__ __forceinline__ void dq_tile(float (&dq)[D / 8][4], unsigned q_tile, unsigned do_tile, int first,
                                        const float (&lse_log2)[2], const float (&row_dot)[2], unsigned k_tile,
                                        unsigned v_tile, int k0, int row0, int T, int window, float scale_log2,
                                        int lane) {
    constexpr int BR = 4 * FLASH_WARP_ROWS;
    unsigned p[BC / 16][4];
    {
        float s[BC / 8][4] = {};
        add_abt<D, BC, BR, WGMMA>(s, q_tile, first, k_tile, lane);
        scores_to_p<BC>(p, s, lse_log2, k0, row0, T, window, scale_log2, lane);
    }
    float dp[BC / 8][4] = {};
    add_abt<D, BC, BR, WGMMA>(dp, do_tile, first, v_tile, lane);
    ds_of<BC>(dp, p, row_dot);
    unsigned ds[BC / 16][4];
    scores_to_a<BC>(ds, dp);
    add_ab<D, BC, WGMMA>(dq, ds, k_tile, lane);
}

// The statistics of this lane's two rows of a dq kernel's warp (row0 the first), from a head's lse and D (T each):
// log2(e)·lse and D, zero past the end.
__device__ __forceinline__ void row_statistics(float (&lse_log2)[2], float (&dot)[2], const float* lse,
                                               const float* row_dot, int row0, int T, int lane) {
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = row0 + acc_row(lane, 2 * half);
        lse_log2[half] = row < T ? lse[row] * FLASH_LOG2E : 0.0f;
        dot[half] = row < T ? row_dot[row] : 0.0f;
    }
}

// Grid (query tiles of 64, NH, B); shared memory: Q and dO (64 rows each), then two stages of K and of V (BC rows).
// On wgmma (WGMMA) the block's 4 warps are one warpgroup, the tiles are swizzled, and a tile is skipped only when
// all 64 queries have nothing to add.
template <int D, int BC, bool WGMMA>
__device__ __forceinline__ void flash_backward_dq(bf16* dqkv, float* bias_partials, const bf16* dout, const bf16* qkv,
                                                  const float* lse, const float* row_dot, int T, int NH, int KVH,
                                                  int window) {
    constexpr int BR = 4 * FLASH_WARP_ROWS, GROUP_ROWS = WGMMA ? BR : FLASH_WARP_ROWS;
    check_launch(dq_shared_bytes<D, BC, WGMMA>());
    const unsigned q_tile = shared_address(flash_shared), do_tile = q_tile + tile_bytes<D, WGMMA>(BR),
                   k_tiles = do_tile + tile_bytes<D, WGMMA>(BR), v_tiles = k_tiles + tile_bytes<D, WGMMA>(2 * BC);
    if (WGMMA && q_tile % 1024 != 0) __trap();  // the swizzle's atoms must be aligned (mma.cuh)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.y, b = blockIdx.z, g = h / (NH / KVH), W = (NH + 2 * KVH) * D;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR;  // longest first, as in the forward
    const bf16* seq = qkv + (long)b * T * W;
    const bf16* keys = seq + (NH + g) * D;
    const bf16* values = seq + (NH + KVH + g) * D;
    const int tiles = ((window ? min(T, q0 + BR) : T) + BC - 1) / BC;

    load_tile<BR, D, FLASH_THREADS, WGMMA>(q_tile, seq + (long)q0 * W + h * D, W, T - q0);
    load_tile<BR, D, FLASH_THREADS, WGMMA>(do_tile, dout + ((long)b * T + q0) * NH * D + h * D, (long)NH * D, T - q0);
    load_tile<BC, D, FLASH_THREADS, WGMMA>(k_tiles, keys, W, T);
    load_tile<BC, D, FLASH_THREADS, WGMMA>(v_tiles, values, W, T);
    cp_async_commit();

    const int first = warp * FLASH_WARP_ROWS, row0 = q0 + first;
    const int group_row0 = q0 + first / GROUP_ROWS * GROUP_ROWS;
    float lse_log2[2], dot[2];
    row_statistics(lse_log2, dot, lse + ((long)b * NH + h) * T, row_dot + ((long)b * NH + h) * T, row0, T, lane);

    float dq[D / 8][4] = {};
    const float scale_log2 = rsqrtf((float)D) * FLASH_LOG2E;
    for (int j = 0; j < tiles; j++) {
        if (j + 1 < tiles) {
            const int next = (j + 1) * BC;
            const unsigned stage = (j + 1) % 2 * tile_bytes<D, WGMMA>(BC);
            load_tile<BC, D, FLASH_THREADS, WGMMA>(k_tiles + stage, keys + (long)next * W, W, T - next);
            load_tile<BC, D, FLASH_THREADS, WGMMA>(v_tiles + stage, values + (long)next * W, W, T - next);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (WGMMA) fence_proxy_async();
        __syncthreads();
        const int k0 = j * BC;
        const unsigned stage = j % 2 * tile_bytes<D, WGMMA>(BC);
        if (group_row0 < T && !keys_unseen(k0, BC, group_row0, GROUP_ROWS, window))
            dq_tile<D, BC, WGMMA>(dq, q_tile, do_tile, first, lse_log2, dot, k_tiles + stage, v_tiles + stage, k0,
                                  row0, T, window, scale_log2, lane);
        __syncthreads();
    }
    // The warp's own rows of the padded Q tile stage dQ; on wgmma, 16 padded rows of its own in the K and V stages.
    static_assert(!WGMMA || 4 * at<D>(FLASH_WARP_ROWS, 0) <= tile_bytes<D, WGMMA>(4 * BC), "staging fits");
    const unsigned staging = WGMMA ? k_tiles + warp * at<D>(FLASH_WARP_ROWS, 0) : q_tile + at<D>(first, 0);
    store_rows<D>(dqkv + ((long)b * T + row0) * W + h * D, W, T - row0, dq, rsqrtf((float)D), staging, lane,
                  bias_partials_at(bias_partials, b, row0, T, W, h * D));
}

// The dq kernel warp-specialised (see the warp-specialised kernels above): each computing warpgroup owns 64 queries,
// with Q and dO tiles of its own, and takes every tile of K and V as flash_backward_dq's warpgroup does, with the same
// products and sums, so the results are that kernel's bit for bit; the two share the streamed tiles, which halves their
// loads a query. Its tiles are pipelined: tile j + 1's S = Q·Kᵀ and dP = dO·Vᵀ are issued before tile j's dQ += dS·K,
// and P and dS of tile j + 1 are computed while the products after each run. K_j is so held until tile j's dQ is added,
// in the step that issues tile j + 1's S: with two stages, tile j + 2's K could be loaded only then, just before it is
// needed, so there are three. A warpgroup computes even a tile it has nothing to add to (keys all after its queries, or
// queries all past the end): P is 0 where unseen and rows past the end are not stored, so it adds exact zeros, and a
// branch around products in flight is what ptxas serialises (C7518). Grid (query tiles of 128, NH, B); Q, K and V from
// qkv_map, dO from dout_map ((NH·D elements, T rows, B sequences)), all in boxes of 64 rows.
// Shared memory: Q of each warpgroup, then dO of each (the resident tiles, 64 rows each), then the stages.
#define SPECIALISED_DQ_STAGES 3  // the streamed tiles' stages, which the launch table also needs
template <int D, int BC>
__device__ __forceinline__ void flash_backward_dq_specialised(bf16* dqkv, float* bias_partials,
                                                              const TensorMap& qkv_map, const TensorMap& dout_map,
                                                              const float* lse, const float* row_dot, int T, int NH,
                                                              int KVH, int window) {
    static_assert(BC == 64, "Q, K and V come in boxes of the same rows");
    constexpr int BR = 2 * 64, RESIDENT = 4 * 64, STAGES = SPECIALISED_DQ_STAGES;
    check_launch(specialised_shared_bytes<D, BC, RESIDENT, STAGES>(), 3 * 128);
    const SpecialisedBlock<D, BC, RESIDENT, STAGES> f(shared_address(flash_shared));
    const int h = blockIdx.y, b = blockIdx.z, g = h / (NH / KVH), W = (NH + 2 * KVH) * D;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * BR, tiles = ((window ? min(T, q0 + BR) : T) + BC - 1) / BC;
    const auto q_tile = [&](int c) { return f.resident + c * tile_bytes<D, true>(64); };
    const auto do_tile = [&](int c) { return f.resident + (2 + c) * tile_bytes<D, true>(64); };
    const bool computing = specialised_roles<1, 24>(f, [&] {
        mbarrier_arrive_expect_tx(f.resident_full, RESIDENT * D * 2);
        for (int c = 0; c < 2; c++) {
            tma_load_tile<64, D>(q_tile(c), qkv_map, f.resident_full, h * D, q0 + 64 * c, b);
            tma_load_tile<64, D>(do_tile(c), dout_map, f.resident_full, h * D, q0 + 64 * c, b);
        }
        load_key_value_tiles(f, qkv_map, (NH + g) * D, (NH + KVH + g) * D, b, tiles);
    });
    if (!computing) return;

    const int c = threadIdx.x / 128 - 1, warp = threadIdx.x / 32 - 4, lane = threadIdx.x % 32;
    const int first = warp % 4 * FLASH_WARP_ROWS, group_row0 = q0 + 64 * c, row0 = group_row0 + first;
    float lse_log2[2], dot[2];
    row_statistics(lse_log2, dot, lse + ((long)b * NH + h) * T, row_dot + ((long)b * NH + h) * T, row0, T, lane);
    mbarrier_wait(f.resident_full, 0);
    float dq[D / 8][4] = {};
    const float scale_log2 = rsqrtf((float)D) * FLASH_LOG2E;
    // Tile j's S and dP, once K_j and V_j have landed (both waited for before either is issued: a wait is a loop,
    // and ptxas serialises products in flight across a branch); dP's zeros are set before S's products, since set
    // among them they make ptxas wait for S (C7517).
    const auto issue_scores = [&](float (&s)[BC / 8][4], float (&dp)[BC / 8][4], int j) {
        mbarrier_wait(f.full(STREAM_K, j), f.parity(j));
        mbarrier_wait(f.full(STREAM_V, j), f.parity(j));
        settle_wgmma<BC>(dp);
        issue_abt_wgmma<D, BC, 64>(s, q_tile(c), first, f.stage(STREAM_K, j));  // S = Q·Kᵀ
        issue_abt_wgmma<D, BC, 64>(dp, do_tile(c), first, f.stage(STREAM_V, j));  // dP = dO·Vᵀ
    };
    // Tile j's S, waited for, becomes P; then dP, waited for, becomes dS in place, and V_j is handed back. Each runs
    // while the products issued after the one it waits for do.
    const auto probabilities = [&](unsigned (&p)[BC / 16][4], float (&s)[BC / 8][4], int j) {
        settle_wgmma<BC>(s);
        scores_to_p<BC>(p, s, lse_log2, j * BC, row0, T, window, scale_log2, lane);
    };
    const auto ds_in_place = [&](float (&dp)[BC / 8][4], const unsigned (&p)[BC / 16][4], int j) {
        settle_wgmma<BC>(dp);
        mbarrier_arrive(f.empty(STREAM_V, j));
        ds_of<BC>(dp, p, dot);
    };
    unsigned ds[BC / 16][4];  // dS of tile j, the A operand of dQ += dS·K_j: written only once no product reads it
    {
        float s[BC / 8][4] = {}, dp[BC / 8][4] = {};
        unsigned p[BC / 16][4];
        issue_scores(s, dp, 0);
        wgmma_wait<1>();
        probabilities(p, s, 0);
        wgmma_wait<0>();
        ds_in_place(dp, p, 0);
        scores_to_a<BC>(ds, dp);
    }
    for (int j = 0; j + 1 < tiles; j++) {
        float s[BC / 8][4] = {}, dp[BC / 8][4] = {};
        unsigned p[BC / 16][4];
        issue_scores(s, dp, j + 1);
        issue_ab_wgmma<D, BC>(dq, ds, f.stage(STREAM_K, j));  // dQ += dS·K_j
        wgmma_wait<2>();
        probabilities(p, s, j + 1);
        wgmma_wait<1>();
        ds_in_place(dp, p, j + 1);
        wgmma_wait<0>();
        settle_wgmma<D>(dq);
        mbarrier_arrive(f.empty(STREAM_K, j));
        scores_to_a<BC>(ds, dp);
    }
    issue_ab_wgmma<D, BC>(dq, ds, f.stage(STREAM_K, tiles - 1));
    wgmma_wait<0>();
    settle_wgmma<D>(dq);
    mbarrier_arrive(f.empty(STREAM_K, tiles - 1));
    named_barrier_sync(3, SPECIALISED_COMPUTING);  // both warpgroups are done with the stages, where dQ is staged

    static_assert(8 * at<D>(FLASH_WARP_ROWS, 0) <= tile_bytes<D, true>(2 * STAGES * BC), "staging fits");
    store_rows<D>(dqkv + ((long)b * T + row0) * W + h * D, W, T - row0, dq, rsqrtf((float)D),
                  f.stages + warp * at<D>(FLASH_WARP_ROWS, 0), lane,
                  bias_partials_at(bias_partials, b, row0, T, W, h * D));
}

// The dkv kernel's steps for a warp's 16 keys (j0 the first) and a tile of BR queries (i0 the first), in two halves
// that (unless pipelined, see dkv_step) never hold Sᵀ and dPᵀ (BR/2 floats a lane each) together. First Sᵀ = K·Qᵀ
// becomes Pᵀ, rounded to the bf16 A fragments (BR/4 registers) that dV += Pᵀ·dO takes; then dPᵀ = V·dOᵀ and dSᵀ =
// Pᵀ∘(dPᵀ − D) from that same rounded Pᵀ, as the A fragments that dK += dSᵀ·Q takes (dS is rounded to bf16 for its
// product in any case).

// Pᵀ = 2^(x·s − log2(e)·lse) for a warp's 16 keys (rows) and a tile of BR queries (columns, lse of each in
// lse_tile). With MASKED, a key's queries outside [first, last], counted from this lane's first column, get 0.
template <int BR, bool MASKED>
__device__ __forceinline__ void column_probabilities(float (&s)[BR / 8][4], unsigned lse_tile, const int (&first)[2],
                                                     const int (&last)[2], float scale_log2, int lane) {
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int c = n * 8 + e % 2;
            const float lse = ld_shared_f32(lse_tile + 4 * (c + acc_col(lane, 0)));
            const float x = exp2_ftz(s[n][e] * scale_log2 - lse * FLASH_LOG2E);
            s[n][e] = MASKED && (c < first[e / 2] || c > last[e / 2]) ? 0.0f : x;
        }
    }
}

// Pᵀ, in place of the scores Sᵀ = K·Qᵀ (s) of the warp's keys (j0 the first) and a tile of BR queries (i0 the
// first): keys are the rows, queries the columns; 0 where unseen.
template <int BR>
__device__ __forceinline__ void transposed_probabilities_of(float (&s)[BR / 8][4], unsigned lse_tile, int i0, int j0,
                                                            int T, int window, float scale_log2, int lane) {
    if (i0 + BR > T || j0 + FLASH_WARP_ROWS > T ||
        (window && (i0 < j0 + FLASH_WARP_ROWS - 1 || i0 + BR - 1 > j0 + window - 1))) {
        // A key's visible queries, counted from this lane's first column: from the key itself (causal) to the end
        // of its window or of the sequence; none for a key past the end.
        int first[2], last[2];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int key = j0 + acc_row(lane, 2 * half), col0 = i0 + acc_col(lane, 0);
            first[half] = window ? key - col0 : -BR;
            last[half] = key < T ? (window ? min(T - 1, key + window - 1) : T - 1) - col0 : -BR;
        }
        column_probabilities<BR, true>(s, lse_tile, first, last, scale_log2, lane);
    } else {
        column_probabilities<BR, false>(s, lse_tile, {}, {}, scale_log2, lane);
    }
}
// And as the A fragments of the product that takes them.
template <int BR>
__device__ __forceinline__ void scores_to_transposed_p(unsigned (&p)[BR / 16][4], float (&s)[BR / 8][4],
                                                       unsigned lse_tile, int i0, int j0, int T, int window,
                                                       float scale_log2, int lane) {
    transposed_probabilities_of<BR>(s, lse_tile, i0, j0, T, window, scale_log2, lane);
    scores_to_a<BR>(p, s);
}

// Pᵀ for the warp's keys (from `first` of the K tile of 64 rows).
template <int D, int BR, bool WGMMA>
__device__ __forceinline__ void transposed_probabilities(unsigned (&p)[BR / 16][4], unsigned k_tile, int first,
                                                         unsigned q_tile, unsigned lse_tile, int i0, int j0, int T,
                                                         int window, float scale_log2, int lane) {
    float s[BR / 8][4] = {};
    add_abt<D, BR, 4 * FLASH_WARP_ROWS, WGMMA>(s, k_tile, first, q_tile, lane);
    scores_to_transposed_p<BR>(p, s, lse_tile, i0, j0, T, window, scale_log2, lane);
}

// dSᵀ = Pᵀ∘(dPᵀ − D), in place of dPᵀ.
template <int BR>
__device__ __forceinline__ void transposed_ds_of(float (&dp)[BR / 8][4], const unsigned (&p)[BR / 16][4],
                                                 unsigned dot_tile, int lane) {
#pragma unroll
    for (int n = 0; n < BR / 8; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int col = n * 8 + acc_col(lane, e);
            dp[n][e] = a_to_accumulator(p[n / 2], n % 2, e) * (dp[n][e] - ld_shared_f32(dot_tile + 4 * col));
        }
    }
}
// Stores a warp's dSᵀ (bf16 A fragments) in its 16 rows, from ds_rows, of a dS tile (64 keys × BR queries; padded,
// or SWIZZLED for wgmma: the warp's first row is a multiple of 8, so its rows are swizzled as the tile's first 16
// are), for the products of dQ: each A fragment's four 16-bit pairs where they lie in their 16 × 16 block.
template <int BR, bool SWIZZLED>
__device__ __forceinline__ void store_ds_rows(unsigned ds_rows, const unsigned (&ds)[BR / 16][4], int lane) {
#pragma unroll
    for (int kb = 0; kb < BR / 16; kb++)
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const int r = acc_row(lane, 0) + k % 2 * 8, c = kb * 16 + k / 2 * 8 + acc_col(lane, 0);
            st_shared_32(ds_rows + tile_at<BR, 4 * FLASH_WARP_ROWS, SWIZZLED>(r, c), ds[kb][k]);
        }
}
// And as bf16 A fragments; with ATOMIC_DQ also stored in the warp's rows of the block's dS tile, for add_dq.
template <int BR, bool ATOMIC_DQ, bool SWIZZLED>
__device__ __forceinline__ void transposed_ds(unsigned (&ds)[BR / 16][4], float (&dp)[BR / 8][4],
                                              const unsigned (&p)[BR / 16][4], unsigned dot_tile, unsigned ds_rows,
                                              int lane) {
    transposed_ds_of<BR>(dp, p, dot_tile, lane);
#pragma unroll
    for (int kb = 0; kb < BR / 16; kb++) accumulator_to_a(ds[kb], dp, kb);
    if (ATOMIC_DQ) store_ds_rows<BR, SWIZZLED>(ds_rows, ds, lane);
}

// Adds a warp's 16 × DN accumulator (rows from row0, columns from n0) to the fp32 sums at dq (row r at dq + r·stride;
// rows from `valid_rows` on skipped) with atomics, 16 bytes at a time: lanes l and l ^ 1 hold columns 4k, 4k + 1 and
// 4k + 2, 4k + 3 (k = l % 4 / 2) of rows g and g + 8 (mma's accumulator layout), so they trade a pair by a shuffle,
// and the even lane adds row g's four columns, the odd lane row g + 8's.
template <int DN>
__device__ __forceinline__ void atomic_add_rows(float* dq, long stride, int valid_rows, const float (&acc)[DN / 8][4],
                                                int row0, int n0, int lane) {
    const bool odd = lane % 2;
    const int r = row0 + acc_row(lane, 0) + (odd ? 8 : 0);
    float* const sums = dq + r * stride + n0 + lane % 4 / 2 * 4;
#pragma unroll
    for (int n = 0; n < DN / 8; n++) {
        const float got0 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][0] : acc[n][2], 1);
        const float got1 = __shfl_xor_sync(0xffffffffu, odd ? acc[n][1] : acc[n][3], 1);
        if (r < valid_rows) {
            if (odd) red_add_v4(sums + n * 8, got0, got1, acc[n][2], acc[n][3]);
            else red_add_v4(sums + n * 8, acc[n][0], acc[n][1], got0, got1);
        }
    }
}

// Issues acc (this warp's 16 queries × 64 columns of dQ from n0) += dS·K over the BC keys of the dS tile (keys ×
// queries, as transposed_ds stores it, swizzled) and the K tile, as one commit group: both operands MN-major, dS's
// queries and K's columns lying along the stored rows.
template <int BC>
__device__ __forceinline__ void issue_dq_wgmma(float (&acc)[8][4], unsigned ds_tile, unsigned k_tile, int n0) {
    wgmma_settle(acc);
    wgmma_fence();
#pragma unroll
    for (int kb = 0; kb < BC / 16; kb++)
        wgmma_64x64_ss<true, true>(acc, wgmma_descriptor(ds_tile + swizzled_at<BC>(kb * 16, 0), 1024, 1024),
                                   wgmma_descriptor(k_tile + swizzled_at<BC>(kb * 16, n0), 1024, 1024));
    wgmma_commit();
}

// dQ_i += dS_ij·K_j (unscaled) for the BR queries of a tile (rows from `valid_rows` on skipped; row r at
// dq + r·stride) and the block's 64 keys, from the dS tile (keys × queries, as transposed_ds stores it) and the K
// tile, added to the fp32 sums in global memory with atomics. The block's WARPS split the BR × D product into 16-row
// tiles and column groups of DN: each warp holds 16 × DN sums (DN/2 floats a lane, at most 32). On mma.sync the dS
// fragments are read transposed (ldmatrix .trans of the stored (keys, queries) blocks gives A = dS), and the product
// is split BR/16 row tiles by D·(BR/16)/WARPS columns. On wgmma (BR = 64) the warpgroups take D's columns 64 at a
// time, in turn (issue_dq_wgmma).
template <int D, int BR, int WARPS, bool WGMMA>
__device__ __forceinline__ void add_dq(float* dq, long stride, int valid_rows, unsigned ds_tile, unsigned k_tile,
                                       int warp, int lane) {
    constexpr int BC = 4 * FLASH_WARP_ROWS, ROW_TILES = BR / 16;
    if constexpr (WGMMA) {
        static_assert(BR == 64 && D % 64 == 0 && WARPS % 4 == 0, "add_dq on wgmma: 64 × 64 blocks of dQ");
        for (int n0 = warp / 4 * 64; n0 < D; n0 += WARPS / 4 * 64) {
            float acc[8][4] = {};
            issue_dq_wgmma<BC>(acc, ds_tile, k_tile, n0);
            wgmma_wait<0>();
            wgmma_settle(acc);
            atomic_add_rows<64>(dq, stride, valid_rows, acc, warp % 4 * 16, n0, lane);
        }
    } else {
        constexpr int DN = D * ROW_TILES / WARPS;
        static_assert(WARPS % ROW_TILES == 0 && DN % 16 == 0 && DN <= 64, "add_dq: no even split of dQ's tile");
        const int mt = warp % ROW_TILES, n0 = warp / ROW_TILES * DN;
        const unsigned ds_lane = ds_tile + b_fragment_lane<BR>(lane) + at<BR>(0, mt * 16),
                       k_lane = k_tile + a_fragment_lane<D>(lane) + at<D>(0, n0);
        float acc[DN / 8][4] = {};
#pragma unroll
        for (int kb = 0; kb < BC / 16; kb++) {
            unsigned ds[4];
            ldmatrix_x4_trans(ds, ds_lane + at<BR>(kb * 16, 0));
#pragma unroll
            for (int n = 0; n < DN / 16; n++) {
                unsigned k[4];
                ldmatrix_x4_trans(k, k_lane + at<D>(kb * 16, n * 16));
                mma_16816(acc[2 * n], ds, k[0], k[1]);
                mma_16816(acc[2 * n + 1], ds, k[2], k[3]);
            }
        }
        atomic_add_rows<DN>(dq, stride, valid_rows, acc, mt * 16, n0, lane);
    }
}

// The tiles of one step of a dkv kernel: K and V (the 64 keys), Q and dO (the step's BR queries) and their lse and
// D; with atomic dQ the warp's rows of the dS tile, and with two roles this lane's place in the Pᵀ exchange.
struct DkvStep {
    unsigned k, v, q, dout, lse, dot, ds_rows, p_lane;
};

// With two roles, role 0 hands Pᵀ to role 1 through shared memory, each lane its 16 bytes of each 16 × 16 block kb at
// p_lane + 512·kb.
template <int BR>
__device__ __forceinline__ void put_transposed_p(unsigned p_lane, const unsigned (&p)[BR / 16][4]) {
#pragma unroll
    for (int kb = 0; kb < BR / 16; kb++)
        st_shared_128(p_lane + kb * 512, make_int4(p[kb][0], p[kb][1], p[kb][2], p[kb][3]));
}
template <int BR>
__device__ __forceinline__ void take_transposed_p(unsigned (&p)[BR / 16][4], unsigned p_lane) {
#pragma unroll
    for (int kb = 0; kb < BR / 16; kb++) {
        const int4 v = ld_shared_128(p_lane + kb * 512);
        p[kb][0] = v.x, p[kb][1] = v.y, p[kb][2] = v.z, p[kb][3] = v.w;
    }
}

// A warp's part of one step of a dkv kernel: for its 16 keys (from `first` of the K and V tiles, j0 in the sequence)
// and the queries from q0, adds to acc (one role: dV and dK; two: role 0 dV, role 1 dK), unless `live` is false
// (keys all past the end, or, causal, all after the queries: nothing to add). With two roles, both call
// hand_over(), which must order role 0's stores of Pᵀ before role 1's loads. PIPELINED (one role, on wgmma) issues
// Sᵀ and dPᵀ together and computes Pᵀ while dPᵀ's products run, then dV's and dK's together (not dSᵀ beside dV's:
// Pᵀ, which dSᵀ reads, is dV's A operand, whose registers no thread may touch until its product is waited for); the
// products and their sums are the same, so are the results. It computes a step that is not live too, whose Pᵀ and
// dSᵀ are all 0 (every query unseen), so that it adds exact zeros: products in flight inside a branch are what
// ptxas serialises (C7518). With ATOMIC_DQ, PIPELINED calls hand_over() once this warp's rows of dSᵀ are stored and
// before dV's and dK's products are issued: it issues dQ's product (once the warpgroup's rows are all there), which
// the wait for those two completes.
template <int D, int BR, int ROLES, bool ATOMIC_DQ, bool WGMMA, bool PIPELINED, typename HandOver>
__device__ __forceinline__ void dkv_step(float (&acc)[3 - ROLES][D / 8][4], const DkvStep& t, bool live, int role,
                                         int first, int q0, int j0, int T, int window, float scale_log2, int lane,
                                         HandOver hand_over) {
    constexpr int BC = 4 * FLASH_WARP_ROWS;
    static_assert(!PIPELINED || (ROLES == 1 && WGMMA), "pipelined: one role, on wgmma");
    unsigned p[BR / 16][4], ds[BR / 16][4];
    float dp[BR / 8][4] = {};
    if constexpr (PIPELINED) {
        float s[BR / 8][4] = {};
        settle_wgmma<BR>(dp);  // its zeros set before S's products: set among them, ptxas waits for S (C7517)
        issue_abt_wgmma<D, BR, BC>(s, t.k, first, t.q);  // Sᵀ = K·Qᵀ
        issue_abt_wgmma<D, BR, BC>(dp, t.v, first, t.dout);  // dPᵀ = V·dOᵀ
        wgmma_wait<1>();
        settle_wgmma<BR>(s);
        scores_to_transposed_p<BR>(p, s, t.lse, q0, j0, T, window, scale_log2, lane);
        wgmma_wait<0>();
        settle_wgmma<BR>(dp);
        transposed_ds<BR, ATOMIC_DQ, WGMMA>(ds, dp, p, t.dot, t.ds_rows, lane);
        if constexpr (ATOMIC_DQ) hand_over();
        issue_ab_wgmma<D, BR>(acc[0], p, t.dout);  // dV += Pᵀ·dO
        issue_ab_wgmma<D, BR>(acc[1], ds, t.q);  // dK += dSᵀ·Q
        wgmma_wait<0>();
        settle_wgmma<D>(acc[0]);
        settle_wgmma<D>(acc[1]);
    } else if constexpr (ROLES == 1) {
        if (live) {
            transposed_probabilities<D, BR, WGMMA>(p, t.k, first, t.q, t.lse, q0, j0, T, window, scale_log2, lane);
            add_ab<D, BR, WGMMA>(acc[0], p, t.dout, lane);
            add_abt<D, BR, BC, WGMMA>(dp, t.v, first, t.dout, lane);  // dPᵀ = V·dOᵀ
            transposed_ds<BR, ATOMIC_DQ, WGMMA>(ds, dp, p, t.dot, t.ds_rows, lane);
            add_ab<D, BR, WGMMA>(acc[1], ds, t.q, lane);
        }
    } else {
        if (live && role == 0) {
            transposed_probabilities<D, BR, WGMMA>(p, t.k, first, t.q, t.lse, q0, j0, T, window, scale_log2, lane);
            put_transposed_p<BR>(t.p_lane, p);
        } else if (live) {
            add_abt<D, BR, BC, WGMMA>(dp, t.v, first, t.dout, lane);  // dPᵀ = V·dOᵀ
        }
        hand_over();
        if (live && role == 0) {
            add_ab<D, BR, WGMMA>(acc[0], p, t.dout, lane);
        } else if (live) {
            take_transposed_p<BR>(p, t.p_lane);
            transposed_ds<BR, ATOMIC_DQ, WGMMA>(ds, dp, p, t.dot, t.ds_rows, lane);
            add_ab<D, BR, WGMMA>(acc[0], ds, t.q, lane);
        }
    }
}

// Writes a warp's accumulators of its 16 keys from j0 of sequence b (one role: dV, then dK; two: role 0's dV or
// role 1's dK) into the key and value columns of group g in dqkv, accumulator r staged at staging(r, dk), with their
// column sums into bias_partials.
template <int D, int ROLES, typename Staging>
__device__ __forceinline__ void store_dkv(bf16* dqkv, float* bias_partials, const float (&acc)[3 - ROLES][D / 8][4],
                                          int role, int b, int g, int j0, int T, int NH, int KVH, int lane,
                                          Staging staging) {
    const int W = (NH + 2 * KVH) * D;
    bf16* rows = dqkv + ((long)b * T + j0) * W;
#pragma unroll
    for (int r = 0; r < 3 - ROLES; r++) {
        const bool dk = ROLES == 1 ? r == 1 : role == 1;
        const int column = (dk ? NH + g : NH + KVH + g) * D;
        store_rows<D>(rows + column, W, T - j0, acc[r], dk ? rsqrtf((float)D) : 1.0f, staging(r, dk), lane,
                      bias_partials_at(bias_partials, b, j0, T, W, column));
    }
}

// Grid (key tiles of 64, KVH, B), ROLES × 4 warps a block. Shared memory: K and V (64 rows each), two stages of Q
// and of dO (BR rows each), then two stages of lse and of D (BR floats each), with ATOMIC_DQ the dS tile (64 keys ×
// BR queries), and with two roles the Pᵀ exchange (4 × BR/16 × 32 lanes × 16 bytes). The block visits, for each
// query head of its group in order, the query tiles that can see its keys; with ATOMIC_DQ it adds each tile's dQ
// into dq_sum ((B, T, NH·D) fp32, zeroed by the caller).
// With one role a warp owns 16 keys and does both halves of each tile, holding dK and dV (D floats a lane). With
// two, warps w and w + 4 share 16 keys: w computes Pᵀ, hands it over through shared memory and adds to dV; w + 4
// computes dPᵀ meanwhile, then dSᵀ and adds to dK. Each holds one accumulator (D/2 floats), which leaves room for
// longer query tiles at large D, and the mma work stays even: one product over D and one over BR each.
// On wgmma (WGMMA) each role's 4 warps are a warpgroup that takes all 64 keys together, the tiles (and the dS tile)
// are swizzled, and a tile is skipped only when all 64 keys have nothing to add.
template <int D, int BR, int ROLES, bool ATOMIC_DQ, bool WGMMA>
__device__ __forceinline__ void flash_backward_dkv(bf16* dqkv, float* bias_partials, float* dq_sum, const bf16* dout,
                                                   const bf16* qkv, const float* lse, const float* row_dot, int T,
                                                   int NH, int KVH, int window) {
    constexpr int BC = 4 * FLASH_WARP_ROWS, THREADS = ROLES * FLASH_THREADS, ACCUMULATORS = 3 - ROLES;
    constexpr int GROUP_ROWS = WGMMA ? BC : FLASH_WARP_ROWS;
    static_assert(ROLES == 1 || ROLES == 2, "one or two roles");
    check_launch(dkv_shared_bytes<D, BR, ROLES, ATOMIC_DQ, WGMMA>(), THREADS);
    const unsigned k_tile = shared_address(flash_shared), v_tile = k_tile + tile_bytes<D, WGMMA>(BC),
                   q_tiles = v_tile + tile_bytes<D, WGMMA>(BC), do_tiles = q_tiles + tile_bytes<D, WGMMA>(2 * BR),
                   lse_tiles = do_tiles + tile_bytes<D, WGMMA>(2 * BR), dot_tiles = lse_tiles + 2 * BR * 4,
                   ds_tile = dot_tiles + 2 * BR * 4,
                   p_exchange = ds_tile + (ATOMIC_DQ ? tile_bytes<BR, WGMMA>(BC) : 0);
    // The swizzle's atoms must be aligned (mma.cuh).
    if (WGMMA && (k_tile % 1024 != 0 || (ATOMIC_DQ && ds_tile % 1024 != 0))) __trap();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, role = warp / 4;
    const int g = blockIdx.y, b = blockIdx.z, group = NH / KVH, W = (NH + 2 * KVH) * D;
    const int kv0 = blockIdx.x * BC;  // causal: the first key tiles have the most queries, and go first
    const bf16* seq = qkv + (long)b * T * W;
    const int first_tile = window ? kv0 / BR : 0, per_head = (T + BR - 1) / BR - first_tile;
    const int steps = group * per_head;

    // Step i: query tile first_tile + i % per_head of query head g·group + i / per_head.
    auto load_step = [&](int i, int stage) {
        const int h = g * group + i / per_head, q0 = (first_tile + i % per_head) * BR;
        const long stats = ((long)b * NH + h) * T + q0;
        const unsigned offset = stage * tile_bytes<D, WGMMA>(BR);
        load_tile<BR, D, THREADS, WGMMA>(q_tiles + offset, seq + (long)q0 * W + h * D, W, T - q0);
        load_tile<BR, D, THREADS, WGMMA>(do_tiles + offset, dout + ((long)b * T + q0) * NH * D + h * D, (long)NH * D,
                                         T - q0);
        load_stats<BR, THREADS>(lse_tiles + stage * BR * 4, lse + stats, T - q0);
        load_stats<BR, THREADS>(dot_tiles + stage * BR * 4, row_dot + stats, T - q0);
    };
    load_tile<BC, D, THREADS, WGMMA>(k_tile, seq + (long)kv0 * W + (NH + g) * D, W, T - kv0);
    load_tile<BC, D, THREADS, WGMMA>(v_tile, seq + (long)kv0 * W + (NH + KVH + g) * D, W, T - kv0);
    load_step(0, 0);
    cp_async_commit();

    const int first = warp % 4 * FLASH_WARP_ROWS, j0 = kv0 + first;  // this warp's first key, in tile and sequence
    const int group_j0 = kv0 + first / GROUP_ROWS * GROUP_ROWS;
    const unsigned ds_rows = ds_tile + tile_at<BR, BC, WGMMA>(first, 0);
    // This lane's 16 bytes of the warp pair's Pᵀ fragments, block kb 512 bytes further for each kb.
    const unsigned p_lane = p_exchange + (warp % 4 * (BR / 16) * 32 + lane) * 16;
    // One role: dV, dK. Two: dV (role 0) or dK (role 1).
    float acc[ACCUMULATORS][D / 8][4] = {};
    const float scale_log2 = rsqrtf((float)D) * FLASH_LOG2E;
    for (int i = 0; i < steps; i++) {
        if (i + 1 < steps) {
            load_step(i + 1, (i + 1) % 2);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        if (WGMMA) fence_proxy_async();
        __syncthreads();
        const int q0 = (first_tile + i % per_head) * BR, stage = i % 2;
        const DkvStep t{k_tile, v_tile, q_tiles + stage * tile_bytes<D, WGMMA>(BR),
                        do_tiles + stage * tile_bytes<D, WGMMA>(BR), lse_tiles + stage * BR * 4,
                        dot_tiles + stage * BR * 4, ds_rows, p_lane};
        // Keys all past the end, or (causal) all after this tile's queries or all before their windows, have nothing
        // to add (and their rows of dS are zero).
        const bool live = group_j0 < T && !keys_unseen(group_j0, GROUP_ROWS, q0, BR, window);
        dkv_step<D, BR, ROLES, ATOMIC_DQ, WGMMA, false>(acc, t, live, role, first, q0, j0, T, window, scale_log2,
                                                        lane, [] { __syncthreads(); });
        if (ATOMIC_DQ) {
            if (!live && role == ROLES - 1) {
                for (int k = lane; k < FLASH_WARP_ROWS * BR / 2; k += 32)
                    st_shared_32(ds_rows + tile_at<BR, BC, WGMMA>(k / (BR / 2), k % (BR / 2) * 2), 0u);
            }
            if (WGMMA) fence_proxy_async();
            __syncthreads();  // every warp's rows of dS are in place
            const int h = g * group + i / per_head;
            add_dq<D, BR, 4 * ROLES, WGMMA>(dq_sum + ((long)b * T + q0) * NH * D + h * D, (long)NH * D, T - q0,
                                            ds_tile, k_tile, warp, lane);
        }
        __syncthreads();
    }
    // The key rows of the K and V tiles, which the loop is done with, stage dK and dV: with one role a warp's own
    // rows of both; with two, role 0 its rows of V and role 1 its rows of K. On wgmma, where those rows are
    // swizzled, 16 padded rows of its own per accumulator in the Q and dO stages.
    static_assert(!WGMMA || THREADS / 32 * ACCUMULATORS * at<D>(FLASH_WARP_ROWS, 0) <= tile_bytes<D, WGMMA>(4 * BR),
                  "staging fits");
    store_dkv<D, ROLES>(dqkv, bias_partials, acc, role, b, g, j0, T, NH, KVH, lane, [&](int r, bool dk) {
        return WGMMA ? q_tiles + (warp * ACCUMULATORS + r) * at<D>(FLASH_WARP_ROWS, 0)
                     : (dk ? k_tile : v_tile) + at<D>(first, 0);
    });
}

// The dkv kernel warp-specialised, for the deterministic backward (dQ from the dq kernel). With one role each
// computing warpgroup takes 64 keys of its own (128 a block) and both halves of every step, pipelined. With two, the
// warpgroups are flash_backward_dkv's two roles on 64 keys, each pipelined across steps: a step's first product
// (role 0 Sᵀ = K·Qᵀ, role 1 dPᵀ = V·dOᵀ) is issued for step i + 1 before the second for step i (dV += Pᵀ·dO, or
// dK += dSᵀ·Q), so that role 0's Pᵀ and role 1's dSᵀ of step i + 1 are computed while the second runs. A role so holds
// step i's stages into step i + 1, hence three stages: with two, step i + 2's copies could start only once step i's
// stages were handed back, just before they are needed. Pᵀ goes from role 0 to role 1 through a buffer and a named
// barrier (1 + i % 3) of its step's stage: role 0 writes step i + 1's in its step i once that stage has landed, which
// (unless it is the stage's first use) is once both roles have handed back step i − 2's, after role 1 took its Pᵀ.
// Two buffers would not do: step 2's stage is a first use, and role 0 would write over step 0's Pᵀ unread.
// The steps and their arithmetic are flash_backward_dkv's on wgmma (a step may have nothing to add: its Pᵀ is all 0):
// dK and dV are that kernel's bit for bit. Grid (key tiles of 64 · (3 − ROLES), KVH, B); K and V (the resident tiles)
// and Q from qkv_map, dO from dout_map, all in boxes of 64 rows; the loading warp's lanes copy each step's lse and D
// beside its Q. Shared memory: as SpecialisedBlock lays it out, then (16-byte aligned) the Pᵀ buffers with two roles,
// then lse and D of each stage.
// With ATOMIC_DQ, each step also adds its part of dQ into dQ's sums (dq_map: (B, T, NH·D) fp32, zeroed by the caller),
// as flash_backward_dkv's dkv_dq kernel does: dSᵀ is stored in a tile, dQ = dS·K issued beside the step's products,
// and the result added by tensor reductions (reduce_dq_tile) instead of atomics a lane; then come the dS tiles and
// the dQ staging (specialised_dkv_shared_bytes). Without it, dq_map is unused.
template <int ROLES>
__device__ constexpr int specialised_dkv_stages() {
    return ROLES == 2 ? 3 : SPECIALISED_STAGES;
}
template <int D, int ROLES>
__device__ constexpr unsigned specialised_dkv_exchange() {
    return (specialised_shared_bytes<D, 64, 2 * (3 - ROLES) * 64, specialised_dkv_stages<ROLES>()>() + 15) / 16 * 16;
}
template <int ROLES>
__device__ constexpr unsigned specialised_dkv_exchange_bytes() {
    return ROLES == 2 ? specialised_dkv_stages<ROLES>() * 64 * 128 : 0;
}
template <int D, int ROLES>
__device__ constexpr unsigned specialised_dkv_stats_end() {
    return specialised_dkv_exchange<D, ROLES>() + specialised_dkv_exchange_bytes<ROLES>() +
           specialised_dkv_stages<ROLES>() * 2 * 64 * 4;
}
// With atomic dQ, then two dS tiles (64 keys × 64 queries, swizzled, so 1024-byte aligned) of each computing
// warpgroup with one role, of the two roles together with two, then each computing warp's 16 rows of dQ on their way
// to the tensor reductions (64 floats a row, as two boxes of 32 in the 128-byte swizzle).
template <int D, int ROLES>
__device__ constexpr unsigned specialised_dkv_ds_tiles() {
    return (specialised_dkv_stats_end<D, ROLES>() + 1023) / 1024 * 1024;
}
template <int D, int ROLES, bool ATOMIC_DQ>
__device__ constexpr unsigned specialised_dkv_shared_bytes() {
    return ATOMIC_DQ ? specialised_dkv_ds_tiles<D, ROLES>() + 2 * (3 - ROLES) * tile_bytes<64, true>(64) +
                           8 * FLASH_WARP_ROWS * 64 * 4
                     : specialised_dkv_stats_end<D, ROLES>();
}

// Adds a warp's 16 rows × 64 columns of dQ (a wgmma accumulator) to dQ's fp32 sums, at (col, row, b) of dq_map (boxes
// of 32 columns by 16 rows; rows past the end are left out), by two tensor reductions that lane 0 issues: the warp
// stages its rows at `staging` (4 KiB, 1024-byte aligned) as the two boxes, in the 128-byte swizzle. The warp stages
// rows again only once lane 0's last reductions have read them (bulk_wait, then __syncwarp); the caller waits for
// every reduction to complete before the block exits.
__device__ __forceinline__ void reduce_dq_tile(const TensorMap& dq_map, int col, int row, int b,
                                               const float (&acc)[8][4], unsigned staging, int lane) {
    if (lane == 0) bulk_wait<0, true>();
    __syncwarp();
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int half = 0; half < 2; half++) {
            // A float is two of a swizzled tile's 16-bit columns; each box is a 64-column block of such a tile.
            const unsigned at = swizzled_at<FLASH_WARP_ROWS>(acc_row(lane, 2 * half), 2 * (n * 8 + acc_col(lane, 0)));
            st_shared_f32x2(staging + at, acc[n][2 * half], acc[n][2 * half + 1]);
        }
    fence_proxy_async();
    __syncwarp();
    if (lane == 0) {
        tma_reduce_add_3d(dq_map, col, row, b, staging);
        tma_reduce_add_3d(dq_map, col + 32, row, b, staging + FLASH_WARP_ROWS * 128);
        bulk_commit();
    }
}

template <int D, int ROLES, bool ATOMIC_DQ>
__device__ __forceinline__ void flash_backward_dkv_specialised(bf16* dqkv, float* bias_partials,
                                                               const TensorMap& qkv_map, const TensorMap& dout_map,
                                                               const TensorMap& dq_map, const float* lse,
                                                               const float* row_dot, int T, int NH, int KVH,
                                                               int window) {
    constexpr int BR = 64, BC = 64, KEYS = (3 - ROLES) * BC, ACCUMULATORS = 3 - ROLES;
    constexpr int STAGES = specialised_dkv_stages<ROLES>();
    static_assert(ROLES == 1 || ROLES == 2, "one or two roles");
    static_assert(!ATOMIC_DQ || D == 64 * ROLES, "atomic dQ: 64 columns of dQ a warpgroup");
    check_launch(specialised_dkv_shared_bytes<D, ROLES, ATOMIC_DQ>(), 3 * 128);
    const SpecialisedBlock<D, BR, 2 * KEYS, STAGES> f(shared_address(flash_shared));
    const unsigned p_exchange = shared_address(flash_shared) + specialised_dkv_exchange<D, ROLES>(),
                   stats = p_exchange + specialised_dkv_exchange_bytes<ROLES>();
    // Key tile c of the block (64 rows) and its values; lse and D of step i's stage.
    const auto k_tile = [&](int c) { return f.resident + c * tile_bytes<D, true>(BC); };
    const auto v_tile = [&](int c) { return f.resident + (KEYS / BC + c) * tile_bytes<D, true>(BC); };
    const auto lse_tile = [&](int i) { return stats + i % STAGES * 2 * BR * 4; };
    const auto dot_tile = [&](int i) { return lse_tile(i) + BR * 4; };
    const int g = blockIdx.y, b = blockIdx.z, group = NH / KVH;
    const int kv0 = blockIdx.x * KEYS;  // causal: the first key tiles have the most queries, and go first
    const int first_tile = window ? kv0 / BR : 0, per_head = (T + BR - 1) / BR - first_tile;
    const int steps = group * per_head;
    // Step i: query tile first_tile + i % per_head of query head g·group + i / per_head.
    const auto head = [&](int i) { return g * group + i / per_head; };
    const auto query0 = [&](int i) { return (first_tile + i % per_head) * BR; };
    // The loading warp's copies of the statistics need more than 24 registers (ptxas spills at 24), so 40; the
    // computing warpgroups get 232.
    const bool computing = specialised_roles<32, 40>(f, [&] {
        const int lane = threadIdx.x;
        if (lane == 0) {
            mbarrier_arrive_expect_tx(f.resident_full, 2 * KEYS * D * 2);
            for (int c = 0; c < KEYS / BC; c++) {
                tma_load_tile<BC, D>(k_tile(c), qkv_map, f.resident_full, (NH + g) * D, kv0 + c * BC, b);
                tma_load_tile<BC, D>(v_tile(c), qkv_map, f.resident_full, (NH + KVH + g) * D, kv0 + c * BC, b);
            }
        }
        for (int i = 0; i < steps; i++) {
            const int h = head(i), q0 = query0(i);
            const long row = ((long)b * NH + h) * T + q0;
            mbarrier_wait(f.empty(STREAM_Q, i), f.parity(i) ^ 1);
            for (int r = lane; r < BR; r += 32) {  // zero past the end, as load_stats
                const bool valid = q0 + r < T;
                st_shared_32(lse_tile(i) + 4 * r, __float_as_uint(valid ? lse[row + r] : 0.0f));
                st_shared_32(dot_tile(i) + 4 * r, __float_as_uint(valid ? row_dot[row + r] : 0.0f));
            }
            if (lane != 0) {
                mbarrier_arrive(f.full(STREAM_Q, i));
                continue;
            }
            mbarrier_arrive_expect_tx(f.full(STREAM_Q, i), BR * D * 2);
            tma_load_tile<BR, D>(f.stage(STREAM_Q, i), qkv_map, f.full(STREAM_Q, i), h * D, q0, b);
            load_stage(f, STREAM_DOUT, i, dout_map, h * D, q0, b);
        }
    });
    if (!computing) return;

    // Warpgroup c of the two computing ones: its role, and which 64 of the block's keys it takes.
    const int c = threadIdx.x / 128 - 1, warp = threadIdx.x / 32 - 4, lane = threadIdx.x % 32;
    const int role = ROLES == 2 ? c : 0, keys = ROLES == 2 ? 0 : c;
    const int first = warp % 4 * FLASH_WARP_ROWS, group_j0 = kv0 + keys * BC, j0 = group_j0 + first;
    float acc[ACCUMULATORS][D / 8][4] = {};
    const float scale_log2 = rsqrtf((float)D) * FLASH_LOG2E;
    const auto hand_back = [&](int i) {
        mbarrier_arrive(f.empty(STREAM_Q, i));
        mbarrier_arrive(f.empty(STREAM_DOUT, i));
    };
    const auto live = [&](int i) { return group_j0 < T && !(window && query0(i) + BR - 1 < group_j0); };
    // With atomic dQ: step i's dS tile (each warpgroup's own with one role, both roles' with two), and this warp's
    // rows of dQ staged for the tensor reductions; dQ of step i for the warp's 16 queries (one role: from the
    // warpgroup's 64 keys; two: role 0 its first 64 columns, role 1 its last), added to dQ's sums once it is complete,
    // unless the step has nothing to add (then dS, so dQ, is all 0) or the warp's rows all lie past the sequence.
    const unsigned ds_tiles = shared_address(flash_shared) + specialised_dkv_ds_tiles<D, ROLES>();
    const auto ds_tile = [&](int i) { return ds_tiles + (2 * keys + i % 2) * tile_bytes<BR, true>(BC); };
    const unsigned dq_staging = ds_tiles + 2 * (3 - ROLES) * tile_bytes<BR, true>(BC) + warp * FLASH_WARP_ROWS * 64 * 4;
    const auto add_dq = [&](float (&dq)[8][4], int i) {
        settle_wgmma<64>(dq);
        if (live(i) && query0(i) + first < T)
            reduce_dq_tile(dq_map, head(i) * D + 64 * role, query0(i) + first, b, dq, dq_staging, lane);
    };
    mbarrier_wait(f.resident_full, 0);
    if constexpr (ROLES == 1) {
        for (int i = 0; i < steps; i++) {
            const int q0 = query0(i);
            mbarrier_wait(f.full(STREAM_Q, i), f.parity(i));
            mbarrier_wait(f.full(STREAM_DOUT, i), f.parity(i));
            const DkvStep t{k_tile(keys), v_tile(keys), f.stage(STREAM_Q, i), f.stage(STREAM_DOUT, i),
                            lse_tile(i), dot_tile(i), ds_tile(i) + tile_at<BR, BC, true>(first, 0), 0};
            float dq[8][4] = {};
            // dQ's product once the warpgroup's 4 warps have stored their rows of dSᵀ (named barrier 1 + c). Two
            // tiles: the one stored two steps before was read by that step's product, which every warp waited for
            // before it reached this barrier in the step between.
            const auto issue_dq = [&] {
                fence_proxy_async();
                named_barrier_sync(1 + c, 128);
                issue_dq_wgmma<BC>(dq, ds_tile(i), k_tile(keys), 0);
            };
            dkv_step<D, BR, ROLES, ATOMIC_DQ, true, true>(acc, t, live(i), role, first, q0, j0, T, window,
                                                          scale_log2, lane, issue_dq);
            hand_back(i);
            if constexpr (ATOMIC_DQ) add_dq(dq, i);
        }
    } else {
        // The stream and the A operand of a step's first product, and the stream of its second's B operand.
        const int first_stream = role == 0 ? STREAM_Q : STREAM_DOUT;
        const int second_stream = role == 0 ? STREAM_DOUT : STREAM_Q;
        const unsigned first_a = role == 0 ? k_tile(0) : v_tile(0);
        // This lane's 16 bytes of the warp pair's Pᵀ fragments in step i's buffer, block kb 512 bytes further.
        const auto p_lane = [&](int i) {
            return p_exchange + i % STAGES * BR * 128 + (warp % 4 * (BR / 16) * 32 + lane) * 16;
        };
        // Step i's products, their stages waited for before either is issued: ptxas serialises products in flight
        // across a branch (C7518), and a wait is a loop.
        const auto landed = [&](int stream, int i) { mbarrier_wait(f.full(stream, i), f.parity(i)); };
        const auto issue_first = [&](float (&x)[BR / 8][4], int i) {
            issue_abt_wgmma<D, BR, BC>(x, first_a, first, f.stage(first_stream, i));
        };
        const auto issue_second = [&](const unsigned (&a)[BR / 16][4], int i) {
            issue_ab_wgmma<D, BR>(acc[0], a, f.stage(second_stream, i));
        };
        // Step i's first product (waited for), as far as it goes in fp32: role 0 Pᵀ, which it hands over at once
        // (rounded into registers of their own); role 1, once Pᵀ is handed over, dSᵀ = Pᵀ∘(dPᵀ − D). This runs while
        // step i − 1's second product does: its A operand (scores_to_a of this, afterwards) is not written until
        // that is done, as no thread may write it before.
        const auto finish_first = [&](float (&x)[BR / 8][4], int i) {
            settle_wgmma<BR>(x);
            unsigned p[BR / 16][4];
            if (role == 0) {
                transposed_probabilities_of<BR>(x, lse_tile(i), query0(i), j0, T, window, scale_log2, lane);
                scores_to_a<BR>(p, x);
                put_transposed_p<BR>(p_lane(i), p);
                named_barrier_arrive(1 + i % STAGES, SPECIALISED_COMPUTING);
            } else {
                named_barrier_sync(1 + i % STAGES, SPECIALISED_COMPUTING);
                take_transposed_p<BR>(p, p_lane(i));
                transposed_ds_of<BR>(x, p, dot_tile(i), lane);
            }
        };
        // With atomic dQ, role 1 hands step i's dSᵀ (rounded: the A operand of its dK product) to both roles' dQ
        // products through the step's dS tile, arriving at named barrier 5 + i % 2, where role 0 waits; role 1 waits
        // for its own 4 warps at 7. The barrier and its count are chosen by role, not by a branch (C7518). Two tiles:
        // role 1 stores step i + 1's once it has taken step i + 1's Pᵀ, which role 0 hands over after the wait that
        // completed its product reading step i − 1's.
        const auto share_ds = [&](const unsigned (&ds)[BR / 16][4], int i) {
            if (role == 1) {
                store_ds_rows<BR, true>(ds_tile(i) + tile_at<BR, BC, true>(first, 0), ds, lane);
                fence_proxy_async();
                named_barrier_arrive(5 + i % 2, SPECIALISED_COMPUTING);
            }
        };
        const auto issue_dq = [&](float (&dq)[8][4], int i) {
            named_barrier_sync(role == 0 ? 5 + i % 2 : 7, role == 0 ? SPECIALISED_COMPUTING : 128);
            issue_dq_wgmma<BC>(dq, ds_tile(i), k_tile(0), 64 * role);
        };
        unsigned a[BR / 16][4];
        {
            float x[BR / 8][4] = {};
            landed(first_stream, 0);
            issue_first(x, 0);
            wgmma_wait<0>();
            finish_first(x, 0);
            scores_to_a<BR>(a, x);
            if constexpr (ATOMIC_DQ) share_ds(a, 0);
        }
        // With atomic dQ, step i's dQ product is issued between the first and the second, and waited for before
        // the second.
        for (int i = 0; i + 1 < steps; i++) {
            float x[BR / 8][4] = {}, dq[8][4] = {};
            landed(first_stream, i + 1);
            landed(second_stream, i);
            issue_first(x, i + 1);
            if constexpr (ATOMIC_DQ) issue_dq(dq, i);
            issue_second(a, i);
            wgmma_wait<ATOMIC_DQ ? 2 : 1>();
            finish_first(x, i + 1);
            if constexpr (ATOMIC_DQ) {
                wgmma_wait<1>();
                add_dq(dq, i);
            }
            wgmma_wait<0>();
            settle_wgmma<D>(acc[0]);
            hand_back(i);
            scores_to_a<BR>(a, x);
            if constexpr (ATOMIC_DQ) share_ds(a, i + 1);
        }
        float dq[8][4] = {};
        landed(second_stream, steps - 1);
        if constexpr (ATOMIC_DQ) issue_dq(dq, steps - 1);
        issue_second(a, steps - 1);
        if constexpr (ATOMIC_DQ) {
            wgmma_wait<1>();
            add_dq(dq, steps - 1);
        }
        wgmma_wait<0>();
        settle_wgmma<D>(acc[0]);
        hand_back(steps - 1);
    }
    if (ATOMIC_DQ && lane == 0) bulk_wait<0, false>();
    // Both warpgroups are done with the tiles, where dK and dV are staged.
    named_barrier_sync(1 + STAGES, SPECIALISED_COMPUTING);

    // Each warp stages each accumulator in 16 padded rows of its own, from the resident tiles on.
    static_assert(8 * ACCUMULATORS * at<D>(FLASH_WARP_ROWS, 0) <= tile_bytes<D, true>(2 * KEYS + 2 * STAGES * BR),
                  "staging fits");
    store_dkv<D, ROLES>(dqkv, bias_partials, acc, role, b, g, j0, T, NH, KVH, lane, [&](int r, bool) {
        return f.resident + (warp * ACCUMULATORS + r) * at<D>(FLASH_WARP_ROWS, 0);
    });
}

// dQ = s·(the fp32 sums of flash_attention_backward_dkv_dq), rounded into the query columns of dqkv: 8 elements a
// thread, two 16-byte loads and a 16-byte store (NH·D is a multiple of 8, so a group never straddles rows).
extern "C" __global__ void flash_attention_dq_store(bf16* dqkv, const float* dq_sum, long rows, int NH, int KVH,
                                                   int D, float scale) {
    const long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8, C = (long)NH * D;
    if (i >= rows * C) return;
    const float4 lo = *reinterpret_cast<const float4*>(dq_sum + i);
    const float4 hi = *reinterpret_cast<const float4*>(dq_sum + i + 4);
    int4 packed;
    packed.x = (int)pack_bf16(lo.x * scale, lo.y * scale);
    packed.y = (int)pack_bf16(lo.z * scale, lo.w * scale);
    packed.z = (int)pack_bf16(hi.x * scale, hi.y * scale);
    packed.w = (int)pack_bf16(hi.z * scale, hi.w * scale);
    *reinterpret_cast<int4*>(dqkv + i / C * (NH + 2 * KVH) * D + i % C) = packed;
}

// ---- entry points -------------------------------------------------------------------------------------------------

// The forward, dq, dkv and dkv_dq kernels of head dimension D: on mma.sync, or with WGMMA true on wgmma (SUFFIX
// _wgmma).
#define FLASH_KERNELS(D, SUFFIX, WGMMA, FORWARD_M, FORWARD_BC, FORWARD_MIN_BLOCKS, DQ_BC, DKV_BR, DKV_ROLES,           \
                      DQ_MIN_BLOCKS, DKV_MIN_BLOCKS)                                                                   \
    extern "C" __global__ void __launch_bounds__(forward_threads<WGMMA>(), FORWARD_MIN_BLOCKS)                         \
        flash_attention_forward##SUFFIX##_d##D(bf16* out, float* lse, const bf16* qkv, int T, int NH, int KVH,         \
                                               int window) {                                                           \
        flash_forward<D, FORWARD_M, FORWARD_BC, WGMMA>(out, lse, qkv, T, NH, KVH, window);                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(FLASH_THREADS, DQ_MIN_BLOCKS)                                         \
        flash_attention_backward_dq##SUFFIX##_d##D(bf16* dqkv, float* bias_partials, const bf16* dout,                 \
                                                   const bf16* qkv, const float* lse, const float* row_dot, int T,     \
                                                   int NH, int KVH, int window) {                                      \
        flash_backward_dq<D, DQ_BC, WGMMA>(dqkv, bias_partials, dout, qkv, lse, row_dot, T, NH, KVH, window);          \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(DKV_ROLES * FLASH_THREADS, DKV_MIN_BLOCKS)                            \
        flash_attention_backward_dkv##SUFFIX##_d##D(bf16* dqkv, float* bias_partials, const bf16* dout,                \
                                                    const bf16* qkv, const float* lse, const float* row_dot, int T,    \
                                                    int NH, int KVH, int window) {                                     \
        flash_backward_dkv<D, DKV_BR, DKV_ROLES, false, WGMMA>(dqkv, bias_partials, nullptr, dout, qkv, lse, row_dot,  \
                                                               T, NH, KVH, window);                                    \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(DKV_ROLES * FLASH_THREADS, DKV_MIN_BLOCKS)                            \
        flash_attention_backward_dkv_dq##SUFFIX##_d##D(bf16* dqkv, float* dq_sum, const bf16* dout, const bf16* qkv,   \
                                                       const float* lse, const float* row_dot, int T, int NH,          \
                                                       int KVH, int window) {                                          \
        flash_backward_dkv<D, DKV_BR, DKV_ROLES, true, WGMMA>(dqkv, nullptr, dq_sum, dout, qkv, lse, row_dot, T, NH,   \
                                                              KVH, window);                                            \
    }

// Per head dimension D: the forward's m16 tiles per warp (M) and keys per tile, the dq kernel's keys per tile, the
// dkv kernel's queries per tile and roles (1 or 2, see flash_backward_dkv), and the blocks per multiprocessor the dq
// and the dkv kernels ask ptxas for (0: its own choice). Reasons at the top of the file. Besides the kernels,
// flash_attention_launch_dD tells the engine how to launch them: queries per forward block, then the forward's,
// dq's, dkv's and dkv_dq's dynamic shared memory, then their threads a block.
#define FLASH_ATTENTION(D, FORWARD_M, FORWARD_BC, DQ_BC, DKV_BR, DKV_ROLES, DQ_MIN_BLOCKS, DKV_MIN_BLOCKS)             \
    extern "C" __constant__ unsigned flash_attention_launch_d##D[9] = {                                                \
        4 * FLASH_WARP_ROWS * FORWARD_M,                                                                               \
        forward_shared_bytes<D, 4 * FLASH_WARP_ROWS * FORWARD_M, FORWARD_BC, false>(),                                 \
        dq_shared_bytes<D, DQ_BC, false>(),                                                                            \
        dkv_shared_bytes<D, DKV_BR, DKV_ROLES, false, false>(),                                                        \
        dkv_shared_bytes<D, DKV_BR, DKV_ROLES, true, false>(),                                                         \
        FLASH_THREADS,                                                                                                 \
        FLASH_THREADS,                                                                                                 \
        DKV_ROLES * FLASH_THREADS,                                                                                     \
        DKV_ROLES * FLASH_THREADS};                                                                                    \
    FLASH_KERNELS(D, , false, FORWARD_M, FORWARD_BC, 0, DQ_BC, DKV_BR, DKV_ROLES, DQ_MIN_BLOCKS, DKV_MIN_BLOCKS)

// On sm_90a, at head dimensions 64 and 128, every kernel also comes on wgmma, with its own launch shapes in
// flash_attention_launch_wgmma_dD, laid out as flash_attention_launch_dD. The parameters are FLASH_ATTENTION's, but
// for the forward's blocks per multiprocessor; the tiles of a wgmma product are multiples of 64. The engine runs
// these kernels in place of the others unless KILN_FLASH_WGMMA says otherwise.
#define FLASH_ATTENTION_WGMMA(D, FORWARD_BC, FORWARD_MIN_BLOCKS, DQ_BC, DKV_BR, DKV_ROLES, DQ_MIN_BLOCKS,              \
                              DKV_MIN_BLOCKS)                                                                          \
    extern "C" __constant__ unsigned flash_attention_launch_wgmma_d##D[9] = {                                          \
        2 * 64,                                                                                                        \
        forward_shared_bytes<D, 2 * 64, FORWARD_BC, true>(),                                                           \
        dq_shared_bytes<D, DQ_BC, true>(),                                                                             \
        dkv_shared_bytes<D, DKV_BR, DKV_ROLES, false, true>(),                                                         \
        dkv_shared_bytes<D, DKV_BR, DKV_ROLES, true, true>(),                                                          \
        forward_threads<true>(),                                                                                       \
        FLASH_THREADS,                                                                                                 \
        DKV_ROLES * FLASH_THREADS,                                                                                     \
        DKV_ROLES * FLASH_THREADS};                                                                                    \
    FLASH_KERNELS(D, _wgmma, true, 1, FORWARD_BC, FORWARD_MIN_BLOCKS, DQ_BC, DKV_BR, DKV_ROLES, DQ_MIN_BLOCKS,         \
                  DKV_MIN_BLOCKS)

FLASH_ATTENTION(32, 2, 64, 64, 64, 1, 0, 2)
FLASH_ATTENTION(64, 2, 64, 64, 64, 1, 0, 0)
FLASH_ATTENTION(96, 2, 32, 64, 32, 1, 0, 0)
#if __CUDA_ARCH__ >= 900
FLASH_ATTENTION(128, 2, 64, 32, 64, 2, 3, 0)
#else
FLASH_ATTENTION(128, 2, 32, 32, 32, 2, 0, 0)
#endif
// On sm_90a, at head dimensions 64 and 128, the forward on wgmma also comes pipelined (flash_forward_pipelined),
// with BC keys a tile and blocks a multiprocessor MIN_BLOCKS, and its dynamic shared memory and threads a block in
// flash_attention_launch_wgmma_pipelined_dD. The engine runs it only when KILN_FLASH_WGMMA asks for it.
#define FLASH_FORWARD_PIPELINED(D, BC, MIN_BLOCKS)                                                                     \
    extern "C" __constant__ unsigned flash_attention_launch_wgmma_pipelined_d##D[2] = {                                \
        pipelined_forward_shared_bytes<D, BC>(), forward_threads<true>()};                                             \
    extern "C" __global__ void __launch_bounds__(forward_threads<true>(), MIN_BLOCKS)                                  \
        flash_attention_forward_wgmma_pipelined_d##D(bf16* out, float* lse, const bf16* qkv, int T, int NH, int KVH,   \
                                                     int window) {                                                     \
        flash_forward_pipelined<D, BC>(out, lse, qkv, T, NH, KVH, window);                                             \
    }

// And warp-specialised, the forward (flash_forward_specialised, BC keys a tile), the dq kernel
// (flash_backward_dq_specialised) and the dkv kernel (flash_backward_dkv_specialised, DKV_ROLES roles), without and
// with atomic dQ, with what a launch needs in flash_attention_launch_wgmma_specialised_dD: threads a block (all
// four), the forward's dynamic shared memory and keys a tile, the dq kernel's dynamic shared memory, queries a block
// and rows a tile (of Q, K, V and dO alike, in the backward kernels), the dkv kernel's dynamic shared memory and
// keys a block (both forms), then the shared memory of the dkv kernel with atomic dQ; the engine's tensor maps take
// their boxes from these. The engine runs them only when KILN_FLASH_WGMMA asks for them.
// The dkv kernel takes two roles at D = 128, where one warpgroup holding both dK and dV would need more registers
// than setmaxnreg leaves it (232).
#define FLASH_SPECIALISED(D, BC, DKV_ROLES)                                                                            \
    extern "C" __constant__ unsigned flash_attention_launch_wgmma_specialised_d##D[9] = {                              \
        3 * 128,                                                                                                       \
        specialised_shared_bytes<D, BC, 2 * 64>(),                                                                     \
        BC,                                                                                                            \
        specialised_shared_bytes<D, 64, 4 * 64, SPECIALISED_DQ_STAGES>(),                                              \
        2 * 64,                                                                                                        \
        64,                                                                                                            \
        specialised_dkv_shared_bytes<D, DKV_ROLES, false>(),                                                           \
        (3 - DKV_ROLES) * 64,                                                                                          \
        specialised_dkv_shared_bytes<D, DKV_ROLES, true>()};                                                           \
    extern "C" __global__ void __launch_bounds__(3 * 128, 1) flash_attention_forward_wgmma_specialised_d##D(           \
        bf16* out, float* lse, const __grid_constant__ TensorMap q_map, const __grid_constant__ TensorMap kv_map,      \
        int T, int NH, int KVH, int window) {                                                                          \
        flash_forward_specialised<D, BC>(out, lse, q_map, kv_map, T, NH, KVH, window);                                 \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(3 * 128, 1) flash_attention_backward_dq_wgmma_specialised_d##D(       \
        bf16* dqkv, float* bias_partials, const __grid_constant__ TensorMap qkv_map,                                   \
        const __grid_constant__ TensorMap dout_map, const float* lse, const float* row_dot, int T, int NH, int KVH,    \
        int window) {                                                                                                  \
        flash_backward_dq_specialised<D, 64>(dqkv, bias_partials, qkv_map, dout_map, lse, row_dot, T, NH, KVH,         \
                                             window);                                                                  \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(3 * 128, 1) flash_attention_backward_dkv_wgmma_specialised_d##D(      \
        bf16* dqkv, float* bias_partials, const __grid_constant__ TensorMap qkv_map,                                   \
        const __grid_constant__ TensorMap dout_map, const float* lse, const float* row_dot, int T, int NH, int KVH,    \
        int window) {                                                                                                  \
        flash_backward_dkv_specialised<D, DKV_ROLES, false>(dqkv, bias_partials, qkv_map, dout_map, dout_map, lse,     \
                                                            row_dot, T, NH, KVH, window);                              \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(3 * 128, 1) flash_attention_backward_dkv_dq_wgmma_specialised_d##D(   \
        bf16* dqkv, const __grid_constant__ TensorMap qkv_map, const __grid_constant__ TensorMap dout_map,             \
        const __grid_constant__ TensorMap dq_map, const float* lse, const float* row_dot, int T, int NH, int KVH,      \
        int window) {                                                                                                  \
        flash_backward_dkv_specialised<D, DKV_ROLES, true>(dqkv, nullptr, qkv_map, dout_map, dq_map, lse, row_dot, T,  \
                                                           NH, KVH, window);                                           \
    }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
FLASH_ATTENTION_WGMMA(64, 64, 2, 64, 64, 1, 0, 0)
FLASH_ATTENTION_WGMMA(128, 128, 1, 64, 64, 1, 0, 2)
FLASH_FORWARD_PIPELINED(64, 64, 2)
FLASH_FORWARD_PIPELINED(128, 128, 1)
FLASH_SPECIALISED(64, 64, 1)
FLASH_SPECIALISED(128, 128, 2)
#endif
