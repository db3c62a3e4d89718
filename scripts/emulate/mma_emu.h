// Emulation of kernels/mma.cuh: the same functions, computed from the PTX ISA's definitions, with every
// shared-memory access checked by the shadow in emu.h.
#pragma once

inline unsigned char* emu_shared_base() { return g_block->smem.data(); }
inline unsigned shared_address(const void* p) {
    return (unsigned)(static_cast<const unsigned char*>(p) - emu_shared_base());
}

inline void emu_cp_async(unsigned smem, const void* gmem, bool valid, int bytes) {
    if (smem % bytes != 0 || reinterpret_cast<uintptr_t>(gmem) % bytes != 0) emu_fail("misaligned cp.async");
    if (valid) emu_check_global(gmem, bytes);
    emu_write(smem, bytes, true);
    g_block->fibers[emu_tid()].open_group.push_back(
        {smem, static_cast<const unsigned char*>(gmem), bytes, valid ? bytes : 0});
}
inline void cp_async_16(unsigned smem, const void* gmem, bool valid) { emu_cp_async(smem, gmem, valid, 16); }
inline void cp_async_4(unsigned smem, const void* gmem, bool valid) { emu_cp_async(smem, gmem, valid, 4); }
inline void cp_async_commit() {
    Fiber& f = g_block->fibers[emu_tid()];
    f.committed.push_back(std::move(f.open_group));
    f.open_group.clear();
}
template <int N>
inline void cp_async_wait() {
    Fiber& f = g_block->fibers[emu_tid()];
    while (f.committed.size() > (size_t)N) {
        for (const Copy& c : f.committed.front()) emu_complete(c);
        f.committed.erase(f.committed.begin());
    }
}

inline unsigned short emu_b16(unsigned addr) {
    unsigned short v;
    std::memcpy(&v, &g_block->smem[addr], 2);
    return v;
}

// ldmatrix .m8n8.x4 (.trans): lanes 8i..8i+7 give matrix i's row addresses; lane l gets, in register i, row l/4
// elements 2(l%4), 2(l%4)+1 of matrix i (transposed: column l/4, rows 2(l%4) and 2(l%4)+1).
inline void emu_ldmatrix(unsigned r[4], unsigned row, bool trans) {
    if (row % 16 != 0) emu_fail("misaligned ldmatrix row");
    emu_read(row, 16);
    const int lane = emu_lane();
    emu_slot(lane)[0] = row;
    emu_warp_barrier(trans ? "ldmatrix.trans" : "ldmatrix");
    const int g = lane / 4, c = lane % 4;
    for (int i = 0; i < 4; i++) {
        unsigned lo, hi;
        if (!trans) {
            unsigned a = emu_slot(i * 8 + g)[0];
            lo = emu_b16(a + 4 * c), hi = emu_b16(a + 4 * c + 2);
        } else {
            lo = emu_b16(emu_slot(i * 8 + 2 * c)[0] + 2 * g);
            hi = emu_b16(emu_slot(i * 8 + 2 * c + 1)[0] + 2 * g);
        }
        r[i] = lo | hi << 16;
    }
    emu_warp_barrier(trans ? "ldmatrix.trans done" : "ldmatrix done");
}
inline void ldmatrix_x4(unsigned r[4], unsigned row) { emu_ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(unsigned r[4], unsigned row) { emu_ldmatrix(r, row, true); }

inline float emu_bf16_half(unsigned reg, int half) {
    __nv_bfloat16 b;
    b.x = (unsigned short)(half ? reg >> 16 : reg & 0xffff);
    return __bfloat162float(b);
}

// mma.m16n8k16 bf16 → fp32, from the fragment layouts: with g = lane/4, c = lane%4,
// A[r][k]: lane (r%8)·4 + (k%8)/2, register (r ≥ 8) + 2(k ≥ 8), half k%2;
// B[k][n]: lane 4n + (k%8)/2, register (k ≥ 8), half k%2;  D[r][n]: lane (r%8)·4 + n/2, element 2(r ≥ 8) + n%2.
inline void mma_16816(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    const int lane = emu_lane();
    auto& s = emu_slot(lane);
    for (int i = 0; i < 4; i++) s[i] = a[i];
    s[4] = b0, s[5] = b1;
    emu_warp_barrier("mma");
    const int g = lane / 4, c = lane % 4;
    for (int e = 0; e < 4; e++) {
        const int r = g + (e >= 2 ? 8 : 0), n = 2 * c + e % 2;
        double sum = 0;
        for (int k = 0; k < 16; k++) {
            float av = emu_bf16_half(emu_slot((r % 8) * 4 + (k % 8) / 2)[(r >= 8) + 2 * (k >= 8)], k % 2);
            float bv = emu_bf16_half(emu_slot(4 * n + (k % 8) / 2)[4 + (k >= 8)], k % 2);
            sum += (double)av * bv;
        }
        d[e] = (float)(d[e] + sum);
    }
    emu_warp_barrier("mma done");
}

// Exact, then flushed to zero below the normal range, as ex2.approx.ftz flushes.
inline float exp2_ftz(float x) {
    const float y = std::exp2(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

inline unsigned pack_bf16(float lo, float hi) {
    return (unsigned)__nv_bfloat16(lo).x | (unsigned)__nv_bfloat16(hi).x << 16;
}

inline void st_shared_32(unsigned smem, unsigned v) {
    emu_write(smem, 4, false);
    std::memcpy(&g_block->smem[smem], &v, 4);
}
inline float ld_shared_f32(unsigned smem) {
    emu_read(smem, 4);
    float v;
    std::memcpy(&v, &g_block->smem[smem], 4);
    return v;
}
inline void st_shared_128(unsigned smem, int4 v) {
    if (smem % 16 != 0) emu_fail("misaligned 16-byte shared store");
    emu_write(smem, 16, false);
    std::memcpy(&g_block->smem[smem], &v, 16);
}
inline int4 ld_shared_128(unsigned smem) {
    if (smem % 16 != 0) emu_fail("misaligned 16-byte shared load");
    emu_read(smem, 16);
    int4 v;
    std::memcpy(&v, &g_block->smem[smem], 16);
    return v;
}
inline void red_add_v4(float* p, float a, float b, float c, float d) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu_fail("misaligned vector reduction");
    const float v[4] = {a, b, c, d};
    for (int k = 0; k < 4; k++) atomicAdd(p + k, v[k]);
}

inline unsigned dynamic_shared_bytes() { return (unsigned)g_block->smem.size(); }

// ---- warpgroup products (wgmma) -----------------------------------------------------------------------------------
// A product is recorded when issued and computed when its warpgroup waits for it, all at once for the 128 threads:
// a read of its accumulators before the wait finds them unchanged, as a write to them, or to the shared memory it
// reads, in between is reported. Operands in shared memory are found from the descriptor by the PTX ISA's canonical
// layouts for the 128-byte swizzle, written out here independently of the kernel's own layout function.

inline unsigned long long wgmma_descriptor(unsigned smem, unsigned leading_bytes, unsigned stride_bytes) {
    return (unsigned long long)((smem & 0x3ffff) >> 4) | (unsigned long long)(leading_bytes >> 4) << 16 |
           (unsigned long long)(stride_bytes >> 4) << 32 | 1ull << 62;
}

// The shared address of element (mn, k) of a 16-bit operand (k < 16) described by `desc`: K-major, row mn of the
// operand at 128 bytes (8 rows), then the stride byte offset (each 8 rows), its k along the row; MN-major, row k at
// 128 bytes (8 rows), then the stride byte offset, its mn along the row (64), then the leading byte offset. Then the
// swizzle: address bits 4–6 XOR bits 7–9.
inline unsigned emu_wgmma_address(unsigned long long desc, int mn, int k, bool mn_major) {
    const unsigned start = (unsigned)(desc & 0x3fff) << 4, leading = (unsigned)(desc >> 16 & 0x3fff) << 4,
                   stride = (unsigned)(desc >> 32 & 0x3fff) << 4;
    if (desc >> 62 != 1) emu_fail("wgmma descriptor: only the 128-byte swizzle is emulated");
    if ((desc >> 49 & 7) != 0) emu_fail("wgmma descriptor with a base offset");
    if (start % 16 != 0) emu_fail("wgmma descriptor: misaligned start");
    const unsigned a = mn_major ? start + (mn % 64) * 2 + (mn / 64) * leading + (k % 8) * 128 + (k / 8) * stride
                                : start + (mn % 8) * 128 + (mn / 8) * stride + k * 2;
    return a ^ ((a >> 7 & 7) << 4);
}

// One bf16 of an operand in shared memory, as the asynchronous proxy reads it: the word must have been written
// (and the copy completed) by a thread that executed fence.proxy.async afterwards.
inline float emu_wgmma_read(unsigned addr) {
    emu_read(addr & ~3u, 4);
    const ShadowWord& s = emu_word(addr & ~3u);
    if (s.w_thread >= 0 && g_block->fibers[s.w_thread].proxy_fences <= s.w_proxy_fences)
        emu_fail("wgmma reads a word written without fence.proxy.async after it: " + emu_where(addr));
    __nv_bfloat16 b;
    b.x = emu_b16(addr);
    return __bfloat162float(b);
}

inline void wgmma_fence() { g_block->fibers[emu_tid()].wgmma_fenced = true; }
inline void fence_proxy_async() { g_block->fibers[emu_tid()].proxy_fences++; }
inline void wgmma_commit() {
    Fiber& f = g_block->fibers[emu_tid()];
    f.wgmma_committed.push_back(std::move(f.wgmma_open));
    f.wgmma_open.clear();
}
inline void wgmma_settle(float (*)[4]) {}

inline void emu_wgmma_issue(float (*d)[4], const unsigned* a, unsigned long long a_desc, unsigned long long b_desc,
                            bool a_mn_major, bool b_mn_major) {
    Fiber& f = g_block->fibers[emu_tid()];
    if (!f.wgmma_fenced) emu_fail("wgmma issued without wgmma.fence since the last wait");
    if (blockDim.x % 128 != 0) emu_fail("wgmma in a block that is not whole warpgroups");
    Wgmma w{};
    w.d = d;
    std::memcpy(w.issued_d, d, sizeof w.issued_d);
    if (a) std::memcpy(w.a, a, sizeof w.a);
    w.a_in_registers = a != nullptr, w.a_mn_major = a_mn_major, w.b_mn_major = b_mn_major;
    w.a_desc = a_desc, w.b_desc = b_desc;
    f.wgmma_open.push_back(w);
}
template <bool A_MN, bool B_MN>
inline void wgmma_64x64_ss(float (*d)[4], unsigned long long a, unsigned long long b) {
    emu_wgmma_issue(d, nullptr, a, b, A_MN, B_MN);
}
inline void wgmma_64x64_rs_mn(float (*d)[4], const unsigned a[4], unsigned long long b) {
    emu_wgmma_issue(d, a, 0, b, false, true);
}

// Completes the oldest committed groups of every thread of this warpgroup but the newest `keep`: every thread must
// have issued the same products. Accumulator layout as mma's per warp, warp w of the group holding rows 16w–16w+15:
// element e of tile n of lane l is row 16w + l/4 + 8(e ≥ 2), column 8n + 2(l%4) + e%2; A from registers likewise,
// register (r%16 ≥ 8) + 2(k ≥ 8), half k%2, of lane (r%8)·4 + (k%8)/2.
inline void emu_wgmma_complete(size_t keep) {
    const unsigned base = emu_tid() / 128 * 128;
    auto& fibers = g_block->fibers;
    std::vector<Wgmma*> ops[128];
    for (unsigned t = 0; t < 128; t++) {
        Fiber& f = fibers[base + t];
        if (f.wgmma_committed.size() != fibers[base].wgmma_committed.size())
            emu_fail("threads of a warpgroup wait for different numbers of wgmma groups");
        for (size_t g = 0; g + keep < f.wgmma_committed.size(); g++)
            for (Wgmma& w : f.wgmma_committed[g]) ops[t].push_back(&w);
        if (ops[t].size() != ops[0].size()) emu_fail("threads of a warpgroup issued different wgmma");
    }
    for (unsigned t = 0; t < 128; t++)
        for (size_t i = 0; i < ops[t].size(); i++) {
            const Wgmma &w = *ops[t][i], &w0 = *ops[0][i];
            if (w.a_desc != w0.a_desc || w.b_desc != w0.b_desc || w.a_in_registers != w0.a_in_registers ||
                w.a_mn_major != w0.a_mn_major || w.b_mn_major != w0.b_mn_major)
                emu_fail("wgmma operands differ between the threads of a warpgroup");
            if (std::memcmp(w.d, w.issued_d, sizeof w.issued_d) != 0)
                emu_fail("accumulators of a wgmma in flight were written");
        }
    for (size_t i = 0; i < ops[0].size(); i++) {
        const Wgmma& w0 = *ops[0][i];
        float A[64][16], B[16][64];
        for (int r = 0; r < 64; r++)
            for (int k = 0; k < 16; k++) {
                if (w0.a_in_registers) {
                    const Wgmma& owner = *ops[r / 16 * 32 + (r % 8) * 4 + (k % 8) / 2][i];
                    A[r][k] = emu_bf16_half(owner.a[(r % 16 >= 8) + 2 * (k >= 8)], k % 2);
                } else {
                    A[r][k] = emu_wgmma_read(emu_wgmma_address(w0.a_desc, r, k, w0.a_mn_major));
                }
            }
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 64; n++) B[k][n] = emu_wgmma_read(emu_wgmma_address(w0.b_desc, n, k, w0.b_mn_major));
        for (unsigned t = 0; t < 128; t++) {
            const Wgmma& w = *ops[t][i];
            const int warp = t / 32, g = t % 32 / 4, c = t % 4;
            for (int n = 0; n < 8; n++)
                for (int e = 0; e < 4; e++) {
                    const int r = 16 * warp + g + 8 * (e / 2), col = 8 * n + 2 * c + e % 2;
                    double sum = 0;
                    for (int k = 0; k < 16; k++) sum += (double)A[r][k] * B[k][col];
                    w.d[n][e] = (float)(w.d[n][e] + sum);
                }
        }
    }
    for (unsigned t = 0; t < 128; t++) {
        auto& groups = fibers[base + t].wgmma_committed;
        groups.erase(groups.begin(), groups.end() - keep);
    }
}

// The first thread of the warpgroup past the barrier computes the group's products; the others find them done.
template <int N>
inline void wgmma_wait() {
    emu_group_barrier("wgmma.wait_group");
    Fiber& f = g_block->fibers[emu_tid()];
    if (f.wgmma_committed.size() > (size_t)N) emu_wgmma_complete(N);
    f.wgmma_fenced = false;
}
