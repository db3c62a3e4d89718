// Tensor-core building blocks for sm_80 and later, as inline PTX: asynchronous copies from global to shared memory,
// ldmatrix, and mma.sync.m16n8k16 (bf16 operands, fp32 accumulators). The compiler puts this text after common.cuh
// in front of each kernel file; flash_attention.cu uses it.
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

// Bytes of dynamic shared memory this launch was given.
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
    unsigned bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(bytes));
    return bytes;
}
