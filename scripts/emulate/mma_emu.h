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

inline unsigned dynamic_shared_bytes() { return (unsigned)g_block->smem.size(); }
