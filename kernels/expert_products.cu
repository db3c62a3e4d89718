// The experts' linear layers over their runs of the dispatched rows (experts.cu's dispatch) as grouped products on
// tensor cores (mma.cuh: cp.async, ldmatrix, mma.sync.m16n8k16; bf16 operands, fp32 sums), each block finding its
// expert's run in `offsets` on the device. Nothing is read back to the host and nothing waits, so one launch covers
// every expert and a step with experts can be captured into a CUDA graph; the engine's other way runs cuBLASLt once
// per expert, with the runs' lengths read back after routing. Bf16 only; an fp32 engine takes the other way.
//
// Expert e owns the dispatched rows [offsets[e], offsets[e+1]) and the weight W_e (c_out × c_in, row-major; the
// experts' matrices stacked one after another). For each row r of its run:
//     forward:          out[r] = W_e · inp[r]           (out = inp · W_eᵀ over the run, overwritten)
//     input gradient:   dinp[r] = W_eᵀ · dout[r]        (dinp = dout · W_e over the run, overwritten)
//     weight gradient:  dW_e += Σ_r dout[r] ⊗ inp[r]    (dW_e += doutᵀ · inp over the run, fp32)
// Each is C = A · B computed in tiles of C of EXPERT_M × EXPERT_N, summed over the depth in steps of EXPERT_K, with
// its operands stored as they lie in memory, by x (m or n) or by k:
//     forward:          A = inp's rows (x = row, k = c_in),   B = W_e by x (n = c_out, k = c_in)
//     input gradient:   A = dout's rows (x = row, k = c_out), B = W_e by k (k = c_out, n = c_in)
//     weight gradient:  A = dout by k (k = row, m = c_out),   B = inp by k (k = row, n = c_in)
// An operand stored by x is a row-major A (ldmatrix) or a B stored (n, k) (ldmatrix); stored by k, ldmatrix.trans
// reads it as either fragment (the layouts are stated in mma.cuh).
//
// Work split: EXPERT_THREADS = 4 warps a block, each owning 32 of the tile's rows and all 64 of its columns (2 × 8
// accumulator tiles of 16 × 8: every A fragment feeds 8 products, every B fragment 2). The row products give a block
// one tile of a run's rows: blockIdx.x counts the tiles of every expert's run in expert order (the grid has enough
// for the worst case, ceil(rows / EXPERT_M) + experts − 1; the blocks past the last tile return), blockIdx.y the
// column tiles. The weight gradient gives a block one tile of one expert's dW_e (blockIdx.x the expert) and walks
// its run's rows: every element of dW has one writer, so nothing is atomic and the sums are deterministic.
//
// Operands move from global to shared memory in 16-byte cp.async copies (8 elements), two stages deep: the next
// depth step's copies are issued before the current one is computed. Rows past a run's end and columns past a
// matrix's width arrive as zeros. So c_in and c_out must be multiples of 8 and every bf16 operand 16-byte aligned:
// the engine checks both and takes its other way otherwise. Shared-memory rows are padded by 8 elements, which makes
// each row's stride an odd number of 16-byte units (5, 9 or 17): the 8 rows an ldmatrix reads fall in 8 different
// groups of banks.

#define EXPERT_M 128
#define EXPERT_N 64
#define EXPERT_K 32
#define EXPERT_THREADS 128
// The dynamic shared memory of every launch: two stages of the largest pair of tiles,
// the forward's A (128 × 40) and B (64 × 40).
#define EXPERT_SHARED_BYTES (2 * (EXPERT_M + EXPERT_N) * (EXPERT_K + 8) * 2)

// What the engine reads from the compiled module to launch these kernels: the tile's rows and columns (the grids),
// the threads of a block and its dynamic shared memory.
extern "C" __constant__ unsigned expert_products_launch[4] = {EXPERT_M, EXPERT_N, EXPERT_THREADS,
                                                              EXPERT_SHARED_BYTES};

extern __shared__ __align__(16) unsigned char expert_shared[];

// Shared-memory shape of one stage of an operand with X_TILE rows or columns of x, stored by x or by k.
template <int X_TILE, bool BY_K>
struct OperandTile {
    static constexpr int ROWS = BY_K ? EXPERT_K : X_TILE;
    static constexpr int COLS = BY_K ? X_TILE : EXPERT_K;
    static constexpr int STRIDE = COLS + 8;  // elements
    static constexpr unsigned BYTES = ROWS * STRIDE * 2;

    // Queues the copies of x in [x0, x0 + X_TILE) and k in [k0, k0 + EXPERT_K) of the operand at g (element (x, k)
    // at g[x·ld + k] by x, g[k·ld + x] by k) into the tile at `smem`, zeros where x ≥ x_end or k ≥ k_end.
    __device__ __forceinline__ static void load(unsigned smem, const __nv_bfloat16* g, long ld, long x0, long x_end,
                                                long k0, long k_end) {
        constexpr int CHUNKS_PER_ROW = COLS / 8;
        for (int i = threadIdx.x; i < ROWS * CHUNKS_PER_ROW; i += EXPERT_THREADS) {
            const int row = i / CHUNKS_PER_ROW, col = i % CHUNKS_PER_ROW * 8;
            const long x = x0 + (BY_K ? col : row), k = k0 + (BY_K ? row : col);
            const bool valid = x < x_end && k < k_end;
            // An address that is never read but must be aligned: the operand's start.
            const __nv_bfloat16* src = valid ? g + (BY_K ? k * ld + x : x * ld + k) : g;
            cp_async_16(smem + (row * STRIDE + col) * 2, src, valid);
        }
    }

    // The four 8 × 8 matrices of a fragment: this lane's matrix (lane / 8) starts at x and k in the tile.
    __device__ __forceinline__ static void fragment(unsigned r[4], unsigned tile, int x, int k) {
        const int row = threadIdx.x % 8;
        if (BY_K) {
            ldmatrix_x4_trans(r, tile + ((k + row) * STRIDE + x) * 2);
        } else {
            ldmatrix_x4(r, tile + ((x + row) * STRIDE + k) * 2);
        }
    }
};

// acc += A · B over k in [k_begin, k_end) for the block's tile of C at (m0, n0): A's x in [m0, m_end), B's in
// [n0, n_end). Warp w's accumulators are C's rows 32w to 32w + 31, in acc[m tile][n tile] (mma.cuh's layout).
template <bool A_BY_K, bool B_BY_K>
__device__ __forceinline__ void expert_product(float acc[2][8][4], const __nv_bfloat16* a, long lda, long m0,
                                               long m_end, const __nv_bfloat16* b, long ldb, long n0, long n_end,
                                               long k_begin, long k_end) {
    typedef OperandTile<EXPERT_M, A_BY_K> TileA;
    typedef OperandTile<EXPERT_N, B_BY_K> TileB;
    static_assert(2 * (TileA::BYTES + TileB::BYTES) <= EXPERT_SHARED_BYTES, "two stages fit the launch's memory");
    const unsigned base = shared_address(expert_shared);
    const int warp = threadIdx.x / 32, quarter = threadIdx.x % 32 / 8;
    auto load = [&](int stage, long k0) {
        const unsigned at = base + stage * (TileA::BYTES + TileB::BYTES);
        TileA::load(at, a, lda, m0, m_end, k0, k_end);
        TileB::load(at + TileA::BYTES, b, ldb, n0, n_end, k0, k_end);
    };
    const long steps = (k_end - k_begin + EXPERT_K - 1) / EXPERT_K;
    load(0, k_begin);
    cp_async_commit();
    for (long step = 0; step < steps; step++) {
        if (step + 1 < steps) load((step + 1) % 2, k_begin + (step + 1) * EXPERT_K);
        cp_async_commit();  // empty after the last step, so that one wait fits every step
        cp_async_wait<1>();
        __syncthreads();
        const unsigned tile_a = base + step % 2 * (TileA::BYTES + TileB::BYTES), tile_b = tile_a + TileA::BYTES;
        for (int k = 0; k < EXPERT_K; k += 16) {
            // A's matrices in order: rows 0–7 and 8–15 at k, then at k + 8; B's: k then k + 8 for columns 0–7,
            // then for 8–15 (two neighbouring B fragments).
            unsigned af[2][4];
            for (int mt = 0; mt < 2; mt++)
                TileA::fragment(af[mt], tile_a, warp * 32 + mt * 16 + quarter % 2 * 8, k + quarter / 2 * 8);
            for (int np = 0; np < 4; np++) {
                unsigned bf[4];
                TileB::fragment(bf, tile_b, np * 16 + quarter / 2 * 8, k + quarter % 2 * 8);
                for (int mt = 0; mt < 2; mt++) {
                    mma_16816(acc[mt][2 * np], af[mt], bf[0], bf[1]);
                    mma_16816(acc[mt][2 * np + 1], af[mt], bf[2], bf[3]);
                }
            }
        }
        __syncthreads();  // before the next step's copies overwrite this stage
    }
    cp_async_wait<0>();  // the last, empty group: no thread leaves with copies outstanding
}

// Calls store(row, column, a, b) for each pair of neighbouring results (columns column and column + 1) of the block's
// tile at (m0, n0) that lies inside m_end × n_end, from warp w's accumulators (rows 32w to 32w + 31). n_end is even,
// so a pair's second column is inside when its first is.
template <typename Store>
__device__ __forceinline__ void each_result(const float acc[2][8][4], long m0, long m_end, long n0, long n_end,
                                            Store store) {
    const int warp = threadIdx.x / 32, g = threadIdx.x % 32 / 4, c = threadIdx.x % 4;
    for (int mt = 0; mt < 2; mt++)
        for (int half = 0; half < 2; half++) {
            const long m = m0 + warp * 32 + mt * 16 + half * 8 + g;
            if (m >= m_end) continue;
            for (int nt = 0; nt < 8; nt++) {
                const long n = n0 + nt * 8 + 2 * c;
                if (n < n_end) store(m, n, acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
            }
        }
}

// Expert e's run of the dispatched rows, [*first, *end), clamped to the rows so that a bad dispatch cannot send a
// block past them.
__device__ __forceinline__ void expert_run(const unsigned* offsets, int e, long rows, long* first, long* end) {
    *first = min((long)offsets[e], rows);
    *end = max(*first, min((long)offsets[e + 1], rows));
}

// The forward and the input gradient: out[r] = Σ_k in[r][k]·B_e[k][·] for the block's tile of a run, with B_e W_e
// stored by x (the forward) or by k (the input gradient); `depth` and `width` are in's and out's row lengths.
template <bool B_BY_K>
__device__ __forceinline__ void expert_rows(__nv_bfloat16* out, const __nv_bfloat16* in, const __nv_bfloat16* weight,
                                            const unsigned* offsets, long rows, int experts, int depth, int width) {
    if (blockDim.x != EXPERT_THREADS) __trap();  // the tiles are split between exactly four warps
    // Which expert's run, and which of its tiles, this block's blockIdx.x names.
    long tile = blockIdx.x, first = 0, end = 0;
    int e = 0;
    for (; e < experts; e++) {
        expert_run(offsets, e, rows, &first, &end);
        const long tiles = (end - first + EXPERT_M - 1) / EXPERT_M;
        if (tile < tiles) break;
        tile -= tiles;
    }
    if (e == experts) return;
    const long m0 = first + tile * EXPERT_M, n0 = (long)blockIdx.y * EXPERT_N;
    const __nv_bfloat16* w = weight + (long)e * depth * width;
    float acc[2][8][4] = {};
    expert_product<false, B_BY_K>(acc, in, depth, m0, end, w, B_BY_K ? width : depth, n0, width, 0, depth);
    each_result(acc, m0, end, n0, width, [&](long r, long col, float a, float b) {
        *reinterpret_cast<unsigned*>(out + r * width + col) = pack_bf16(a, b);
    });
}

extern "C" __global__ void __launch_bounds__(EXPERT_THREADS)
    expert_forward_grouped(__nv_bfloat16* out, const __nv_bfloat16* inp, const __nv_bfloat16* weight,
                           const unsigned* offsets, long rows, int experts, int c_in, int c_out) {
    expert_rows<false>(out, inp, weight, offsets, rows, experts, c_in, c_out);
}

extern "C" __global__ void __launch_bounds__(EXPERT_THREADS)
    expert_backward_input_grouped(__nv_bfloat16* dinp, const __nv_bfloat16* dout, const __nv_bfloat16* weight,
                                  const unsigned* offsets, long rows, int experts, int c_in, int c_out) {
    expert_rows<true>(dinp, dout, weight, offsets, rows, experts, c_out, c_in);
}

// dW_e += doutᵀ · inp over expert blockIdx.x's run, for the block's tile of c_out (blockIdx.z) × c_in (blockIdx.y).
extern "C" __global__ void __launch_bounds__(EXPERT_THREADS)
    expert_backward_weight_grouped(float* dweight, const __nv_bfloat16* dout, const __nv_bfloat16* inp,
                                   const unsigned* offsets, long rows, int c_in, int c_out) {
    if (blockDim.x != EXPERT_THREADS) __trap();
    long first, end;
    expert_run(offsets, blockIdx.x, rows, &first, &end);
    if (first == end) return;
    const long m0 = (long)blockIdx.z * EXPERT_M, n0 = (long)blockIdx.y * EXPERT_N;
    float acc[2][8][4] = {};
    expert_product<true, true>(acc, dout, c_out, m0, c_out, inp, c_in, n0, c_in, first, end);
    float* dw = dweight + (long)blockIdx.x * c_out * c_in;
    each_result(acc, m0, c_out, n0, c_in, [&](long m, long n, float a, float b) {
        dw[m * c_in + n] += a;
        dw[m * c_in + n + 1] += b;
    });
}
