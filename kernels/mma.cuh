// Tensor-core building blocks for sm_80 and later, as inline PTX: asynchronous copies from global to shared memory,
// ldmatrix, and mma.sync.m16n8k16 (bf16 operands, fp32 accumulators); for sm_90a, the warpgroup products (wgmma)
// and what warp specialisation needs (mbarriers, tensor copies, named barriers, setmaxnreg).
// The compiler puts this text after common.cuh in front of each kernel file; flash_attention.cu uses it.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). For lane l of a warp let
// g = l / 4 and c = l % 4. Each 32-bit register holds two bf16, the lower column (or row, for B) in the low half.
//   A (16×16, row-major), four registers: a0 = A[g][2c, 2c+1],   a1 = A[g+8][2c, 2c+1],
//                                         a2 = A[g][2c+8, 2c+9], a3 = A[g+8][2c+8, 2c+9]
//   B (16×8, k × n), two registers:       b0 = B[2c, 2c+1][g],   b1 = B[2c+8, 2c+9][g]
//   C and D (16×8, fp32), four floats:    c0, c1 = C[g][2c, 2c+1],  c2, c3 = C[g+8][2c, 2c+1]
// So the accumulators of two neighbouring 16×8 tiles (columns 0–7, then 8–15), rounded to bf16 in pairs (c0, c1),
// (c2, c3) of the first tile and then of the second, are exactly the A fragment of the 16×16 block they form: a
// product's result becomes the next product's left operand without leaving registers.
//
// ldmatrix.m8n8.x4 loads four 8×8 bf16 matrices; lanes 8i to 8i+7 give the addresses of matrix i's eight rows (16
// bytes each, 16-byte aligned), and lane l receives row g, elements 2c and 2c+1 of each matrix in register i. With
// .trans it receives column g, elements 2c and 2c+1, of each: the matrix transposed. An 8×8 block of a row-major
// matrix therefore loads as an A-fragment quarter, or, read from a matrix stored (n, k), as a B-fragment half;
// .trans reads a B-fragment half from a matrix stored (k, n).

// Shared memory is addressed by 32-bit offsets in the shared window (what ld.shared and friends take): a warp keeps
// one base address per tile and adds compile-time offsets, which ptxas folds into each instruction, instead of
// holding a 64-bit pointer per access in registers.
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// 16 bytes from global to shared memory, asynchronously and bypassing L1 (.cg); both addresses 16-byte aligned.
// With `valid` false nothing is read and the 16 bytes are zeroed (a source size of 0): rows past the end of a
// sequence arrive as zeros without a branch around the copy.
__device__ __forceinline__ void cp_async_16(unsigned smem, const void* gmem, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0)
                 : "memory");
}

// As cp_async_16 for one 4-byte word (.ca: the 4-byte form has no L1 bypass).
__device__ __forceinline__ void cp_async_4(unsigned smem, const void* gmem, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 4 : 0)
                 : "memory");
}

// Closes the group of copies this thread has issued since the last commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight (groups complete in order). Other
// threads' copies are visible only after a barrier that follows their own wait.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8×8 bf16 matrices from shared memory; `row` is this lane's row address (see above).
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], unsigned row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row)
                 : "memory");
}

// As ldmatrix_x4, each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], unsigned row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row)
                 : "memory");
}

// d += A·B for one 16×8×16 tile: A and B bf16 fragments, d fp32 (layouts above).
__device__ __forceinline__ void mma_16816(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 2^x as one MUFU.EX2 instruction: ex2.approx with subnormal results flushed to zero. exp2f compiles to
// ex2.approx.f32 without .ftz, which ptxas brackets with three more instructions (a compare and two multiplies) to
// get subnormal results right, and a softmax probability below 2^-126 adds nothing. In flash_attention.cu at head
// dimension 64 this takes 8 to 9% of the instructions out of the forward and dkv kernels and 24% out of dq (sm_90a
// SASS, counted with nvdisasm).
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two floats rounded to bf16 and packed into one register, `lo` in the low half.
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&v);
}

// Plain shared-memory accesses of the tensor-core kernels, by width (results staged on their way to global memory,
// per-row statistics).
__device__ __forceinline__ void st_shared_32(unsigned smem, unsigned v) {
    asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(smem), "r"(v) : "memory");
}
__device__ __forceinline__ float ld_shared_f32(unsigned smem) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(smem) : "memory");
    return v;
}
__device__ __forceinline__ void st_shared_f32x2(unsigned smem, float x, float y) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(smem), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_shared_128(unsigned smem, int4 v) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
}
__device__ __forceinline__ int4 ld_shared_128(unsigned smem) {
    int4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(smem)
                 : "memory");
    return v;
}

// Adds four floats to four consecutive fp32 in global memory (16-byte aligned), atomically each: one vector
// reduction on sm_90, four scalar ones before it.
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
    atomicAdd(p + 2, c);
    atomicAdd(p + 3, d);
#endif
}

// ---- warpgroup products (wgmma, sm_90a) --------------------------------------------------------------------------
//
// wgmma.mma_async multiplies 64 × 16 by 16 × N for the four warps of a warpgroup (128 threads) together. Warp w of
// the group holds rows 16w to 16w + 15 of A (when A comes from registers) and of the accumulator, in exactly
// mma.m16n8k16's layouts above: the accumulator of a 64 × 64 product is, per warp, eight 16×8 tiles (d[n][0..3] for
// columns 8n to 8n + 7), and accumulator_to_a-style packing turns it into A fragments. B, and A when it does not
// come from registers, are read from shared memory through a 64-bit descriptor. The product is asynchronous: it is
// issued after wgmma_fence (which orders earlier register writes before it), grouped by wgmma_commit, and its
// accumulators may be read, and its operands overwritten, only after wgmma_wait; until then neither may be touched.
// Shared memory written by ordinary stores or cp.async must be made visible to the product's (asynchronous) proxy
// with fence_proxy_async before the barrier that precedes the product.
//
// Shared-memory layout: the 128-byte swizzle. A tile of 16-bit elements is stored as column blocks of 64 elements;
// in a block, row r takes 128 bytes, and its 16-byte chunk c lies at chunk c ^ (r % 8). Eight rows make a 1024-byte
// atom, which must be 1024-byte aligned: the hardware swizzles the address bits, so the same XOR holds when a
// descriptor starts inside an atom. Read as the PTX ISA's canonical layouts:
//   K-major (the 16 k of a product along a row: Q and K for S = Q·Kᵀ): start at (row 8i, column 16k) of its block
//     (adding 32 bytes a k-step), rows 8 apart at the stride byte offset, 1024; the leading offset is unused.
//   MN-major (the 16 k down the rows: V for O = P·V, transposed B): start at row 16k, the 64 columns of a block
//     along a row, rows 8 apart at the stride byte offset, 1024; blocks of 64 columns at the leading byte offset.

// A shared-memory matrix descriptor for the 128-byte swizzle: address, leading and stride byte offsets in 16-byte
// units (14 bits each), swizzle mode 1 in bits 62–63.
__device__ __forceinline__ unsigned long long wgmma_descriptor(unsigned smem, unsigned leading_bytes,
                                                               unsigned stride_bytes) {
    return (unsigned long long)((smem & 0x3ffff) >> 4) | (unsigned long long)(leading_bytes >> 4) << 16 |
           (unsigned long long)(stride_bytes >> 4) << 32 | 1ull << 62;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N of this warpgroup's committed products are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's earlier shared-memory writes (stores, completed cp.async) visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The compiler sees a wgmma's accumulators as read and written when it is issued. This ties each of them to a
// volatile statement, which the compiler keeps in order with the wgmma ones: before wgmma_fence, so that no earlier
// write to an accumulator moves below the fence, and after wgmma_wait, so that no read moves above the wait.
__device__ __forceinline__ void wgmma_settle(float (*d)[4]) {
#pragma unroll
    for (int n = 0; n < 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) asm volatile("" : "+f"(d[n][e])::"memory");
}

#define WGMMA_ACCUMULATORS(d)                                                                                          \
    "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]),           \
        "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]),       \
        "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]),       \
        "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]),       \
        "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])

// d (64 × 64, fp32, the eight 16×8 tiles d[0..7] of this warp's rows) += A·B, A (64 × 16) and B (16 × 64) both
// from shared memory, each K-major or (A_MN, B_MN) MN-major. (The predicate p, always true, is wgmma's scale-d:
// whether d is added to.)
template <bool A_MN, bool B_MN>
__device__ __forceinline__ void wgmma_64x64_ss(float (*d)[4], unsigned long long a, unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.eq.u32 p, 0, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, %34, %35;\n}\n"
        : WGMMA_ACCUMULATORS(d)
        : "l"(a), "l"(b), "n"((int)A_MN), "n"((int)B_MN));
}

// As wgmma_64x64_ss with A from registers (this warp's A fragment of its 16 rows, as for mma_16816) and B MN-major
// (transposed: stored 16 × 64 with the 64 along a row).
__device__ __forceinline__ void wgmma_64x64_rs_mn(float (*d)[4], const unsigned a[4], unsigned long long b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.eq.u32 p, 0, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : WGMMA_ACCUMULATORS(d)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}

// Bytes of dynamic shared memory this launch was given.
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(bytes));
    return bytes;
}

// ---- warp specialisation (sm_90a) ---------------------------------------------------------------------------------
//
// A block whose warpgroups take roles (one loads tiles, the others compute on them) cannot meet at __syncthreads:
// they hand shared-memory stages over through mbarriers, and meet in subsets at named barriers.
//
// An mbarrier (8 bytes of shared memory) completes a phase when it has had `count` arrivals and, when an arrival
// announced transaction bytes (arrive_expect_tx), when that many bytes of tensor copies have landed on it. A thread
// waits for a phase by its parity: the first phase has parity 0; a wait for the parity of the phase before the
// current one returns at once. What the arriving threads wrote before arriving, and what the copies wrote, is
// visible to a thread once its wait returns.

// Initialises the mbarrier at `bar` (8-byte aligned) for `count` arrivals a phase; one thread does it, and a barrier
// of the block orders it before any use.
__device__ __forceinline__ void mbarrier_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Makes this thread's mbarrier initialisations visible to the tensor copies that complete on them.
__device__ __forceinline__ void fence_mbarrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// An arrival that also makes the phase wait for `bytes` more of tensor copies.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// A tensor map (CUtensorMap, made on the host by cuTensorMapEncodeTiled): 128 opaque bytes that the copy engine
// reads, passed to a kernel by value as a __grid_constant__ parameter.
struct __align__(64) TensorMap {
    unsigned long long opaque[16];
};

// The box of `map` at coordinates (c0, c1, c2), copied by the tensor memory accelerator into shared memory at `smem`
// (1024-byte aligned, laid out as the map's swizzle says), its bytes completing on the mbarrier at `bar`. Parts of
// the box outside the tensor arrive as zeros.
__device__ __forceinline__ void tma_load_3d(unsigned smem, const TensorMap& map, unsigned bar, int c0, int c1,
                                            int c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(smem),
        "l"(&map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}

// Adds the box of `map` (fp32) at coordinates (c0, c1, c2) from shared memory at `smem` (1024-byte aligned, laid out
// as the map's swizzle says) to the tensor in global memory, elementwise and atomically, by the tensor memory
// accelerator; parts of the box outside the tensor are left out. The thread goes on at once, and the reduction joins
// this thread's next bulk_commit group. Shared memory written by ordinary stores must be made visible to it first
// (fence_proxy_async), and must not be written again until bulk_wait says it was read.
__device__ __forceinline__ void tma_reduce_add_3d(const TensorMap& map, int c0, int c1, int c2, unsigned smem) {
    asm volatile(
        "cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3}], [%4];\n" ::"l"(&map),
        "r"(c0), "r"(c1), "r"(c2), "r"(smem)
        : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed bulk groups may still read their shared memory (READ), or may
// still be incomplete.
template <int N, bool READ>
__device__ __forceinline__ void bulk_wait() {
    if (READ) asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
    else asm volatile("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// Named barriers 1 to 15 (0 is __syncthreads'), for `count` threads, whole warps: sync waits until `count` threads
// have reached it, arrive counts this warp and goes on.
__device__ __forceinline__ void named_barrier_sync(unsigned id, unsigned count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(unsigned id, unsigned count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// A warpgroup gives registers back (dec) or takes more (inc), N a thread, every thread of it together.
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
