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
inline void st_shared_f32x2(unsigned smem, float x, float y) {
    if (smem % 8 != 0) emu_fail("misaligned 8-byte shared store");
    emu_write(smem, 8, false);
    std::memcpy(&g_block->smem[smem], &x, 4);
    std::memcpy(&g_block->smem[smem + 4], &y, 4);
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

// A word of shared memory as the asynchronous proxy (`who`) reads it: it must have been written (and the copy
// completed) by a thread that executed fence.proxy.async afterwards.
inline void emu_async_read(unsigned addr, const char* who) {
    emu_read(addr & ~3u, 4);
    const ShadowWord& s = emu_word(addr & ~3u);
    if (s.write.thread >= 0 && !s.async_write && g_block->fibers[s.write.thread].proxy_fences <= s.w_proxy_fences)
        emu_fail(std::string(who) + " reads a word written without fence.proxy.async after it: " + emu_where(addr));
}

// One bf16 of an operand in shared memory, as wgmma reads it.
inline float emu_wgmma_read(unsigned addr) {
    emu_async_read(addr, "wgmma");
    __nv_bfloat16 b;
    b.x = emu_b16(addr);
    return __bfloat162float(b);
}

inline void wgmma_fence() { g_block->fibers[emu_tid()].wgmma_fenced = true; }
inline void fence_proxy_async() { g_block->fibers[emu_tid()].proxy_fences++; }
// A group's products are committed: registers written after it must be fenced again before the next product, as
// the PTX ISA asks between any register access and a product that uses the register.
inline void wgmma_commit() {
    Fiber& f = g_block->fibers[emu_tid()];
    f.wgmma_committed.push_back(std::move(f.wgmma_open));
    f.wgmma_open.clear();
    f.wgmma_fenced = false;
}
inline void wgmma_settle(float (*)[4]) {}

// What hidden registers hold: a signalling NaN as fp32 and as each bf16 of a pair, which x86 arithmetic makes quiet,
// so that even an update in place (x *= c, which keeps a quiet NaN as it is) changes it and shows as a write.
constexpr unsigned EMU_HIDDEN = 0xffa1ffa1u;

// Hides `bytes` of registers from `at` for a product in flight (see HiddenRegisters), or counts one more user of
// registers already hidden; returns their true contents.
inline const unsigned char* emu_hide(Fiber& f, const void* registers, size_t bytes) {
    unsigned char* at = static_cast<unsigned char*>(const_cast<void*>(registers));
    for (HiddenRegisters& h : f.hidden) {
        if (h.at == at && h.truth.size() == bytes) {
            h.users++;
            return h.truth.data();
        }
        if (at < h.at + h.truth.size() && h.at < at + bytes)
            emu_fail("wgmma registers partly overlap those of another product in flight");
    }
    f.hidden.push_back({at, std::vector<unsigned char>(bytes), 1});
    std::memcpy(f.hidden.back().truth.data(), at, bytes);
    for (size_t i = 0; i < bytes; i += 4) std::memcpy(at + i, &EMU_HIDDEN, 4);
    return f.hidden.back().truth.data();
}
inline HiddenRegisters& emu_hidden(Fiber& f, const void* at) {
    for (HiddenRegisters& h : f.hidden)
        if (h.at == at) return h;
    emu_fail("wgmma registers not hidden");
}
// Whether registers hidden from `at` were written since.
inline bool emu_hidden_written(Fiber& f, const void* at) {
    const HiddenRegisters& h = emu_hidden(f, at);
    for (size_t i = 0; i < h.truth.size(); i += 4)
        if (std::memcmp(h.at + i, &EMU_HIDDEN, 4) != 0) return true;
    return false;
}
// One product fewer on the registers from `at`: after the last, they hold their true contents again.
inline void emu_unhide(Fiber& f, const void* at) {
    HiddenRegisters& h = emu_hidden(f, at);
    if (--h.users > 0) return;
    std::memcpy(h.at, h.truth.data(), h.truth.size());
    f.hidden.erase(f.hidden.begin() + (&h - f.hidden.data()));
}

inline void emu_wgmma_issue(float (*d)[4], const unsigned* a, unsigned long long a_desc, unsigned long long b_desc,
                            bool a_mn_major, bool b_mn_major) {
    Fiber& f = g_block->fibers[emu_tid()];
    if (!f.wgmma_fenced) emu_fail("wgmma issued without wgmma.fence since the last commit or wait");
    if (blockDim.x % 128 != 0) emu_fail("wgmma in a block that is not whole warpgroups");
    Wgmma w{};
    w.d = d;
    emu_hide(f, d, 8 * sizeof *d);
    if (a) std::memcpy(w.a, emu_hide(f, a, sizeof w.a), sizeof w.a);
    w.a_registers = a;
    w.a_mn_major = a_mn_major, w.b_mn_major = b_mn_major;
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
            if (w.a_desc != w0.a_desc || w.b_desc != w0.b_desc || !w.a_registers != !w0.a_registers ||
                w.a_mn_major != w0.a_mn_major || w.b_mn_major != w0.b_mn_major)
                emu_fail("wgmma operands differ between the threads of a warpgroup");
            if (emu_hidden_written(fibers[base + t], w.d)) emu_fail("accumulators of a wgmma in flight were written");
            if (w.a_registers && emu_hidden_written(fibers[base + t], w.a_registers))
                emu_fail("A registers of a wgmma in flight were written");
        }
    for (size_t i = 0; i < ops[0].size(); i++) {
        const Wgmma& w0 = *ops[0][i];
        float A[64][16], B[16][64];
        for (int r = 0; r < 64; r++)
            for (int k = 0; k < 16; k++) {
                if (w0.a_registers) {
                    const Wgmma& owner = *ops[r / 16 * 32 + (r % 8) * 4 + (k % 8) / 2][i];
                    A[r][k] = emu_bf16_half(owner.a[(r % 16 >= 8) + 2 * (k >= 8)], k % 2);
                } else {
                    A[r][k] = emu_wgmma_read(emu_wgmma_address(w0.a_desc, r, k, w0.a_mn_major));
                }
            }
        for (int k = 0; k < 16; k++)
            for (int n = 0; n < 64; n++) B[k][n] = emu_wgmma_read(emu_wgmma_address(w0.b_desc, n, k, w0.b_mn_major));
        for (unsigned t = 0; t < 128; t++) {
            // Into the accumulators' true contents: the registers stay hidden until their last product completes.
            unsigned char* truth = emu_hidden(fibers[base + t], ops[t][i]->d).truth.data();
            float d[8][4];
            std::memcpy(d, truth, sizeof d);
            const int warp = t / 32, g = t % 32 / 4, c = t % 4;
            for (int n = 0; n < 8; n++)
                for (int e = 0; e < 4; e++) {
                    const int r = 16 * warp + g + 8 * (e / 2), col = 8 * n + 2 * c + e % 2;
                    double sum = 0;
                    for (int k = 0; k < 16; k++) sum += (double)A[r][k] * B[k][col];
                    d[n][e] = (float)(d[n][e] + sum);
                }
            std::memcpy(truth, d, sizeof d);
        }
    }
    for (unsigned t = 0; t < 128; t++) {
        Fiber& f = fibers[base + t];
        for (const Wgmma* w : ops[t]) {
            emu_unhide(f, w->d);
            if (w->a_registers) emu_unhide(f, w->a_registers);
        }
        f.wgmma_committed.erase(f.wgmma_committed.begin(), f.wgmma_committed.end() - keep);
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

// ---- warp specialisation (sm_90a): named barriers, mbarriers, tensor copies, setmaxnreg ----------------------------

// bar.sync (bar.arrive when !wait) on named barrier `id` of `count` threads: an instance completes when `count`
// threads, whole warps, have reached it; those that sync wait for it and are ordered after all of them, those that
// only arrive go on at once (their earlier accesses are ordered before the syncing threads' later ones).
inline void emu_named_barrier(unsigned id, unsigned count, bool wait) {
    if (id == 0 || id >= g_block->named.size()) emu_fail("named barrier id " + std::to_string(id) + " (1 to 15)");
    if (count == 0 || count % 32 != 0 || count > g_block->threads)
        emu_fail("named barrier of " + std::to_string(count) + " threads (whole warps of the block)");
    NamedBarrier& nb = g_block->named[id];
    if (nb.count == 0) nb.count = count, nb.joined.assign(emu_clock_size(), 0);
    if (nb.count != count) emu_fail("named barrier " + std::to_string(id) + " reached with different counts");
    const unsigned t = emu_tid();
    if (std::find(nb.arrived.begin(), nb.arrived.end(), t) != nb.arrived.end())
        emu_fail("named barrier " + std::to_string(id) + " reached twice by thread " + std::to_string(t) +
                 " before it completed");
    Fiber& f = g_block->fibers[t];
    emu_join(nb.joined, f.clock);
    f.clock[t]++;
    nb.arrived.push_back(t);
    if (wait) nb.waiting.push_back(t);
    if (nb.arrived.size() == count) {
        std::vector<unsigned> lanes(g_block->threads / 32 + 1, 0);
        for (unsigned a : nb.arrived) lanes[a / 32]++;
        for (unsigned l : lanes)
            if (l != 0 && l != 32) emu_fail("named barrier " + std::to_string(id) + " reached by part of a warp");
        for (unsigned w : nb.waiting) {
            emu_join(g_block->fibers[w].clock, nb.joined);
            if (w != t) g_block->fibers[w].wait = RUNNING;
        }
        nb = NamedBarrier();
    } else if (wait) {
        emu_yield(NAMED_BARRIER);
    }
}
inline void named_barrier_sync(unsigned id, unsigned count) { emu_named_barrier(id, count, true); }
inline void named_barrier_arrive(unsigned id, unsigned count) { emu_named_barrier(id, count, false); }

// The mbarrier at shared address `addr`, which this thread must be ordered after the initialisation of.
inline MBarrier& emu_mbarrier(unsigned addr) {
    for (MBarrier& b : g_block->mbarriers)
        if (b.addr == addr) {
            if (!emu_ordered(b.init))
                emu_fail("mbarrier used before its initialisation is visible: " + emu_where(addr));
            return b;
        }
    emu_fail("mbarrier never initialised: " + emu_where(addr));
}
inline int emu_mbarrier_index(const MBarrier& b) { return (int)(&b - g_block->mbarriers.data()); }

inline void mbarrier_init(unsigned addr, unsigned count) {
    if (addr % 8 != 0) emu_fail("misaligned mbarrier: " + emu_where(addr));
    if (count == 0) emu_fail("mbarrier expecting no arrivals: " + emu_where(addr));
    for (const MBarrier& b : g_block->mbarriers)
        if (b.addr == addr) emu_fail("mbarrier initialised twice: " + emu_where(addr));
    emu_write(addr, 8, false);  // ordered after whatever the bytes held before
    for (unsigned a = addr; a < addr + 8; a += 4) g_block->shadow[a / 4].mbarrier = true;
    if (g_block->mbarriers.size() == EMU_MAX_MBARRIERS) emu_fail("more mbarriers than the emulation keeps");
    // Never reallocated: a thread waiting for a phase holds a pointer to its barrier.
    if (g_block->mbarriers.empty()) g_block->mbarriers.reserve(EMU_MAX_MBARRIERS);
    MBarrier b;
    b.addr = addr, b.init = {(int)emu_tid(), emu_now()}, b.count = b.pending = (int)count;
    b.joined.assign(emu_clock_size(), 0);
    g_block->mbarriers.push_back(std::move(b));
}
// Orders this thread's mbarrier initialisations before the copy engine's use of them.
inline void fence_mbarrier_init() {
    for (MBarrier& b : g_block->mbarriers)
        if (b.init.thread == (int)emu_tid()) b.init_fenced = true;
}

// Completes the current phase of `b` if all its arrivals and bytes are in: the tensor copies land, as writes of the
// barrier's own clock column, and the threads waiting for the phase go on.
inline void emu_mbarrier_progress(MBarrier& b) {
    if (b.pending > 0 || b.tx != 0) return;
    const unsigned parity = b.completed % 2, column = g_block->threads + emu_mbarrier_index(b);
    b.completed++;
    b.joined[column] = b.completed;
    for (const TensorCopy& c : b.copies) {
        std::memcpy(&g_block->smem[c.smem], c.bytes.data(), c.bytes.size());
        for (unsigned a = c.smem; a < c.smem + c.bytes.size(); a += 4) {
            ShadowWord& s = g_block->shadow[a / 4];
            s.pending = -1, s.write = {(int)column, b.completed}, s.async_write = true, s.reads.clear();
        }
    }
    b.copies.clear();
    b.released[parity] = b.joined;
    b.joined.assign(emu_clock_size(), 0);
    b.pending = b.count;
    for (Fiber& f : g_block->fibers)
        if (f.wait == MBARRIER && f.warp_op == reinterpret_cast<const char*>(&b)) f.wait = RUNNING;
}

inline void emu_mbarrier_arrive(unsigned addr, long tx) {
    MBarrier& b = emu_mbarrier(addr);
    Fiber& f = g_block->fibers[emu_tid()];
    emu_join(b.joined, f.clock);
    f.clock[emu_tid()]++;
    if (--b.pending < 0) emu_fail("more arrivals on an mbarrier than its count: " + emu_where(addr));
    b.tx += tx;
    emu_mbarrier_progress(b);
}
inline void mbarrier_arrive(unsigned addr) { emu_mbarrier_arrive(addr, 0); }
inline void mbarrier_arrive_expect_tx(unsigned addr, unsigned bytes) { emu_mbarrier_arrive(addr, bytes); }

// Waits until the phase of parity `parity` has completed, as mbarrier.try_wait.parity: the current phase's parity
// is the number of phases completed mod 2, and a wait for the other one returns at once (the phase before it, or,
// before any, the one before the first).
inline void mbarrier_wait(unsigned addr, unsigned parity) {
    MBarrier* b = &emu_mbarrier(addr);
    while (b->completed % 2 == (int)parity) {
        emu_yield(MBARRIER, reinterpret_cast<const char*>(b));
        b = &emu_mbarrier(addr);
    }
    emu_join(g_block->fibers[emu_tid()].clock, b->released[parity]);
}

// A tensor map as the tests encode it (mirroring cuTensorMapEncodeTiled's arguments): a tensor of up to three
// dimensions of elements of `element_bytes` (bf16 or fp32), the first contiguous, in boxes of 128-byte rows laid out
// in the 128-byte swizzle.
struct alignas(64) TensorMap {
    unsigned char* base;
    unsigned long long dims[3];
    unsigned long long strides[2];  // bytes between steps of dimensions 1 and 2
    unsigned box[3];
    unsigned element_bytes = 2;
};

// Element e of row r of slice k of the box at (c0, c1, c2) of `map`, whose box lies at shared byte `smem` (1024-byte
// aligned): its byte there, as the 128-byte swizzle lays rows of 128 bytes out (mma.cuh), and its address in the
// tensor, or null where the box lies outside it.
inline unsigned char* emu_box_element(const TensorMap& map, unsigned smem, int c0, int c1, int c2, unsigned e,
                                      unsigned r, unsigned k, unsigned& at) {
    const unsigned row = k * map.box[1] + r, byte = e * map.element_bytes;
    at = smem + row * 128 + (byte / 16 ^ row % 8) * 16 + byte % 16;
    const long x = c0 + (long)e, y = c1 + (long)r, z = c2 + (long)k;
    if (x < 0 || y < 0 || z < 0 || x >= (long)map.dims[0] || y >= (long)map.dims[1] || z >= (long)map.dims[2])
        return nullptr;
    unsigned char* global = map.base + x * map.element_bytes + y * map.strides[0] + z * map.strides[1];
    emu_check_global(global, map.element_bytes);
    return global;
}

// What a box of `map` at shared byte `smem` must be: 1024-byte aligned, in rows of 128 bytes.
inline void emu_check_box(const TensorMap& map, unsigned smem, const char* what) {
    if (smem % 1024 != 0) emu_fail(std::string(what) + " at shared memory not 1024-byte aligned: " + emu_where(smem));
    if (map.box[0] * map.element_bytes != 128)
        emu_fail(std::string(what) + " whose rows are not 128 bytes (the swizzle's)");
}

// cp.async.bulk.tensor.3d with mbarrier completion: the box at (c0, c1, c2) of `map`, zeros where it lies outside the
// tensor, stored at `smem` (emu_box_element), its bytes counted against the mbarrier's transactions. It lands when
// the barrier's phase completes.
inline void tma_load_3d(unsigned smem, const TensorMap& map, unsigned bar, int c0, int c1, int c2) {
    MBarrier& b = emu_mbarrier(bar);
    if (!b.init_fenced) emu_fail("tensor copy on an mbarrier without fence.mbarrier_init: " + emu_where(bar));
    emu_check_box(map, smem, "tensor copy");
    const unsigned n = map.element_bytes;
    TensorCopy copy{smem, std::vector<unsigned char>((size_t)map.box[1] * map.box[2] * 128)};
    for (unsigned k = 0; k < map.box[2]; k++)
        for (unsigned r = 0; r < map.box[1]; r++)
            for (unsigned e = 0; e < map.box[0]; e++) {
                unsigned at;
                const unsigned char* src = emu_box_element(map, smem, c0, c1, c2, e, r, k, at);
                unsigned char* dst = &copy.bytes[at - smem];
                if (src) std::memcpy(dst, src, n);
                else std::memset(dst, 0, n);
            }
    emu_write(smem, (unsigned)copy.bytes.size(), true);
    b.tx -= (long)copy.bytes.size();
    b.copies.push_back(std::move(copy));
    emu_mbarrier_progress(b);
}

// cp.reduce.async.bulk.tensor.3d ... .add (fp32): the box at `smem` added to the box at (c0, c1, c2) of `map`, less
// what lies outside the tensor. The adds happen at the issuing thread's wait that completes the group, from the bytes
// read at the issue, which must still be there then (a write in between is an error).
inline void tma_reduce_add_3d(const TensorMap& map, int c0, int c1, int c2, unsigned smem) {
    emu_check_box(map, smem, "tensor reduction");
    if (map.element_bytes != 4) emu_fail("tensor reduction of other than fp32");
    const unsigned bytes = map.box[1] * map.box[2] * 128;
    for (unsigned a = smem; a < smem + bytes; a += 4) emu_async_read(a, "a tensor reduction");
    BulkReduce reduce{smem, std::vector<unsigned char>(&g_block->smem[smem], &g_block->smem[smem] + bytes),
                      std::vector<float*>(bytes / 4, nullptr)};
    for (unsigned k = 0; k < map.box[2]; k++)
        for (unsigned r = 0; r < map.box[1]; r++)
            for (unsigned e = 0; e < map.box[0]; e++) {
                unsigned at;
                unsigned char* sum = emu_box_element(map, smem, c0, c1, c2, e, r, k, at);
                reduce.sums[(at - smem) / 4] = reinterpret_cast<float*>(sum);
            }
    g_block->fibers[emu_tid()].bulk_open.push_back(std::move(reduce));
}
inline void bulk_commit() {
    Fiber& f = g_block->fibers[emu_tid()];
    f.bulk_committed.push_back(std::move(f.bulk_open));
    f.bulk_open.clear();
}
// The adds are applied at either wait, .read or not: a read of the sums in global memory after only a .read wait,
// which a GPU need not have completed, would pass here.
template <int N, bool READ>
inline void bulk_wait() {
    Fiber& f = g_block->fibers[emu_tid()];
    while (f.bulk_committed.size() > (size_t)N) {
        for (const BulkReduce& r : f.bulk_committed.front()) {
            if (std::memcmp(&g_block->smem[r.smem], r.bytes.data(), r.bytes.size()) != 0)
                emu_fail("shared memory of a bulk reduction written before its wait: " + emu_where(r.smem));
            for (size_t i = 0; i < r.sums.size(); i++) {
                float x;
                std::memcpy(&x, &r.bytes[4 * i], 4);
                if (r.sums[i]) *r.sums[i] += x;
            }
        }
        f.bulk_committed.erase(f.bulk_committed.begin());
    }
}

// setmaxnreg: the warpgroup, all of it, moves its register allocation (no effect here but the checks). The block's
// warpgroups share the registers it was launched with: as the kernel file reads ptxas, what __launch_bounds__(threads,
// 1) leaves a thread (64K over the threads, in multiples of 8), times the threads. Once every warpgroup has asked,
// they must fit in that together: an increase beyond what the others give up would wait for ever.
template <int N>
inline void emu_setmaxnreg() {
    static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg takes 24 to 256 registers, a multiple of 8");
    emu_group_barrier("setmaxnreg");
    std::vector<int>& asked = g_block->registers;
    asked.resize((g_block->threads + 127) / 128, 0);
    asked[emu_tid() / 128] = N;
    if (std::count(asked.begin(), asked.end(), 0) != 0) return;
    long total = 0;
    for (int n : asked) total += 128L * n;
    const long launched = (long)g_block->threads * (65536 / g_block->threads / 8 * 8);
    if (total > launched)
        emu_fail("setmaxnreg: the warpgroups ask for " + std::to_string(total) + " registers, more than the " +
                 std::to_string(launched) + " the block was launched with");
}
template <int N>
inline void setmaxnreg_inc() { emu_setmaxnreg<N>(); }
template <int N>
inline void setmaxnreg_dec() { emu_setmaxnreg<N>(); }
