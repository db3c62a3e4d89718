// A CPU emulation of the CUDA features kiln's attention kernels use, to test their indexing and synchronisation
// without a GPU. Each CUDA thread of a block is a fiber (its own stack), run cooperatively in one OS thread; a fiber
// switches only at a barrier, so every run is deterministic for a given scheduling seed, and the order in which
// runnable fibers go is shuffled. Warp collectives (shuffles, ldmatrix, mma) exchange each lane's operands through
// per-warp slots between two warp barriers, and compute each lane's result from the PTX ISA's fragment layouts.
// Asynchronous copies complete only when their thread waits for their group. Every access to dynamic shared memory
// is checked against a shadow of who last wrote and read each word, and when, by vector clocks: a thread's accesses
// are ordered after another's only through what synchronises them (block, warp and named barriers, mbarrier phases),
// so races, reads of copies in flight and writes over words another thread may still read show whatever the
// synchronisation (a block-wide barrier, or a producer and its consumers handing stages over by mbarrier).
#pragma once
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <new>
#include <random>
#include <string>
#include <sys/mman.h>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

[[noreturn]] inline void emu_fail(const std::string& why) {
    std::fprintf(stderr, "EMULATION ERROR: %s\n", why.c_str());
    std::abort();
}

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__

struct alignas(16) int4 {
    int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return int4{x, y, z, w}; }
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};

struct __nv_bfloat16 {
    unsigned short x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) {  // round to nearest even, as __float2bfloat16_rn (no NaN inputs here)
        unsigned u;
        std::memcpy(&u, &f, 4);
        u += 0x7fff + ((u >> 16) & 1);
        x = u >> 16;
    }
};
inline float __bfloat162float(__nv_bfloat16 b) {
    unsigned u = unsigned(b.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) { return __int_as_float(int(u)); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
[[noreturn]] inline void __trap() { emu_fail("__trap()"); }
// Fibers switch only at barriers, so nothing runs between the read and the write.
inline float atomicAdd(float* p, float v) {
    const float old = *p;
    *p = old + v;
    return old;
}

// ---- fibers and barriers ------------------------------------------------------------------------------------------

// emu_switch(&from_sp, to_sp): saves the callee-saved registers on the current stack, stores its pointer, and
// resumes the context whose stack pointer is to_sp (x86-64 System V). swapcontext would also save the signal mask,
// a system call per switch.
extern "C" void emu_switch(void** from_sp, void* to_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
)");

enum Wait { RUNNING, BLOCK_BARRIER, WARP_BARRIER, GROUP_BARRIER, NAMED_BARRIER, MBARRIER, DONE };

struct Copy {
    unsigned smem;
    const unsigned char* src;
    int bytes, valid_bytes;
};

// A warpgroup product (wgmma) in flight: its operands as issued and where its accumulators go.
struct Wgmma {
    float (*d)[4];
    unsigned a[4];                // this thread's A fragment, when A comes from registers, as issued
    const unsigned* a_registers;  // and where it lies (null: A from shared memory)
    bool a_mn_major, b_mn_major;
    unsigned long long a_desc, b_desc;
};

// A tensor reduction (cp.reduce.async.bulk.tensor ... .add, fp32) in flight: the shared memory it reads, with the
// bytes it held when issued, and for each float of them the sum in global memory it adds to (null: none). It is
// applied, and the bytes checked unchanged, at the wait.
struct BulkReduce {
    unsigned smem;
    std::vector<unsigned char> bytes;
    std::vector<float*> sums;
};

// Registers of a thread that products in flight read (A) or accumulate into. The PTX ISA makes any access to them
// before the wait undefined, so until then they hold NaN patterns and their true contents are kept here: a read
// shows in the result, a write as an error. users: the products in flight on them (one accumulator may be chained
// through several, one A fragment read by several).
struct HiddenRegisters {
    unsigned char* at;
    std::vector<unsigned char> truth;
    int users;
};

struct Fiber {
    void* sp = nullptr;
    Wait wait = RUNNING;
    const char* warp_op = nullptr;  // which warp (or warpgroup) collective it waits in (all lanes must agree)
    std::vector<Copy> open_group;
    std::vector<std::vector<Copy>> committed;
    bool wgmma_fenced = false;  // wgmma.fence since the last commit or wait
    std::vector<Wgmma> wgmma_open;
    std::vector<std::vector<Wgmma>> wgmma_committed;
    std::vector<HiddenRegisters> hidden;
    std::vector<BulkReduce> bulk_open;
    std::vector<std::vector<BulkReduce>> bulk_committed;
    int proxy_fences = 0;  // fence.proxy.async executed so far
    // Vector clock: clock[u] is the latest interval of thread u (or of mbarrier u − threads, see MBarrier) that this
    // thread's accesses are ordered after; clock[self] is its own current interval, which each release ends.
    std::vector<int> clock;
};

// An access: the thread (or mbarrier, for the tensor copies that complete on it) and its interval then.
struct Access {
    int thread;
    int interval;
};

// The reads of a word since its last write, none ordered after another (a later write must follow them all): a few
// in place, as most words have, more on the heap.
struct ReadSet {
    std::array<Access, 4> few;
    unsigned n = 0;
    std::vector<Access> more;
    template <typename F>
    void erase_if(F ordered) {
        unsigned kept = 0;
        for (unsigned i = 0; i < n; i++)
            if (!ordered(few[i])) few[kept++] = few[i];
        n = kept;
        std::erase_if(more, ordered);
    }
    void push_back(Access a) {
        if (n < few.size()) few[n++] = a;
        else more.push_back(a);
    }
    void clear() { n = 0, more.clear(); }
    template <typename F>
    void each(F f) const {
        for (unsigned i = 0; i < n; i++) f(few[i]);
        for (Access a : more) f(a);
    }
};

struct ShadowWord {
    int pending = -1;     // thread whose asynchronous copy to this word is in flight
    bool mbarrier = false;  // the word holds an mbarrier: only mbarrier operations may touch it
    Access write{-1, 0};
    bool async_write = false;  // written by the asynchronous proxy (a tensor copy), which wgmma reads without a fence
    int w_proxy_fences = 0;    // the writer's fence.proxy.async count when it wrote
    ReadSet reads;
};

// A named barrier (bar.sync / bar.arrive with an id from 1): the threads that have reached its current instance.
struct NamedBarrier {
    unsigned count = 0;  // threads expected, 0 when no instance is open
    std::vector<unsigned> arrived, waiting;
    std::vector<int> joined;  // the join of the arrived threads' clocks
};

// A tensor copy (TMA) that lands when its mbarrier's phase completes.
struct TensorCopy {
    unsigned smem;
    std::vector<unsigned char> bytes;
};

// An mbarrier in shared memory: a phase completes when `count` arrivals and the expected transaction bytes are in.
// Its phases act as a thread of the vector clocks (index threads + its number), whose interval is the number of
// phases completed: the tensor copies land as its writes, and a wait acquires the clocks of the phase's arrivals.
struct MBarrier {
    unsigned addr;
    Access init;
    bool init_fenced = false;  // fence.mbarrier_init after the initialisation: the copy engine sees it
    int count = 0, pending = 0;
    long tx = 0;
    int completed = 0;
    std::vector<int> joined;                   // the join of this phase's arrivals
    std::array<std::vector<int>, 2> released;  // what a wait for each parity acquires: the last such phase's
    std::vector<TensorCopy> copies;
};

struct Block {
    std::vector<Fiber> fibers;
    void* scheduler = nullptr;
    unsigned current = 0;
    unsigned threads = 0;
    std::vector<unsigned char> smem;  // dynamic shared memory
    std::vector<ShadowWord> shadow;         // one per 4-byte word
    // Warp collective exchange: per lane, up to 16 32-bit words in, 4 out.
    std::vector<std::array<unsigned, 16>> slots;
    std::array<NamedBarrier, 16> named;
    std::vector<MBarrier> mbarriers;
    std::vector<int> registers;  // per warpgroup, what its last setmaxnreg asked for (0: none yet)
};

// The most mbarriers a block may initialise (each is a column of every vector clock).
inline constexpr unsigned EMU_MAX_MBARRIERS = 32;

inline Block* g_block;
inline char* g_stacks;
inline size_t g_stack_size = 1 << 20;
inline unsigned g_stack_count;
inline std::mt19937 g_sched_rng(1);
// A warpgroup whose threads run only when no other thread can, or -1: it lags as far behind the others as their
// synchronisation lets it, which shows hand-overs that rely on it keeping pace (a named barrier reached twice, a
// buffer written again before it is read).
inline int g_lagging_warpgroup = -1;

// EMU_SEED=n reorders the emulated threads; EMU_LAG=n makes warpgroup n lag.
inline void emu_schedule_from_env() {
    if (const char* seed = std::getenv("EMU_SEED")) g_sched_rng.seed(std::atoi(seed));
    if (const char* lag = std::getenv("EMU_LAG")) g_lagging_warpgroup = std::atoi(lag);
}
inline std::vector<std::pair<const unsigned char*, const unsigned char*>> g_global_buffers;

inline unsigned emu_tid() { return g_block->current; }
inline unsigned emu_warp() { return g_block->current / 32; }

#ifdef EMU_ASAN
inline void* g_fake_stack;
inline const void* g_main_stack_bottom;
inline size_t g_main_stack_size;
#endif

inline size_t emu_clock_size() { return g_block->threads + EMU_MAX_MBARRIERS; }

inline void emu_join(std::vector<int>& into, const std::vector<int>& from) {
    for (size_t i = 0; i < from.size(); i++) into[i] = std::max(into[i], from[i]);
}

// Threads `members` pass a barrier together: each is ordered after everything every one of them did before it, and
// starts a new interval of its own.
inline void emu_sync(const std::vector<unsigned>& members) {
    static std::vector<int> joined;
    joined.assign(emu_clock_size(), 0);
    for (unsigned t : members) emu_join(joined, g_block->fibers[t].clock);
    for (unsigned t : members) {
        auto& clock = g_block->fibers[t].clock;
        clock = joined;
        clock[t]++;
    }
}

// Switch from the current fiber to the scheduler, waiting in `w`.
inline void emu_yield(Wait w, const char* op = nullptr) {
    Fiber& f = g_block->fibers[g_block->current];
    f.wait = w;
    f.warp_op = op;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(&g_fake_stack, g_main_stack_bottom, g_main_stack_size);
    emu_switch(&f.sp, g_block->scheduler);
    __sanitizer_finish_switch_fiber(g_fake_stack, nullptr, nullptr);
#else
    emu_switch(&f.sp, g_block->scheduler);
#endif
}

inline void __syncthreads() { emu_yield(BLOCK_BARRIER); }
inline void emu_warp_barrier(const char* op) { emu_yield(WARP_BARRIER, op); }
// A barrier of the 128 threads of a warpgroup (wgmma's collectives).
inline void emu_group_barrier(const char* op) { emu_yield(GROUP_BARRIER, op); }
inline void __syncwarp() {
    emu_warp_barrier("__syncwarp");
}

inline std::function<void()> g_kernel;
inline void emu_fiber_main() {
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_main_stack_bottom, &g_main_stack_size);
#endif
    g_kernel();
    Fiber& f = g_block->fibers[g_block->current];
    f.wait = DONE;
#ifdef EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, g_main_stack_bottom, g_main_stack_size);  // this stack is done
#endif
    emu_switch(&f.sp, g_block->scheduler);
    emu_fail("finished fiber resumed");
}

// A fresh stack whose first switch enters emu_fiber_main as if called (stack pointer ≡ 8 mod 16 at entry).
inline void* emu_new_stack(char* base, size_t size) {
#ifdef EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(base, size);  // frames of the previous block's fibers, which never returned
#endif
    uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                        // emu_fiber_main's return address (never used)
    *--sp = reinterpret_cast<void*>(&emu_fiber_main);       // where emu_switch's ret goes
    for (int i = 0; i < 6; i++) *--sp = nullptr;            // rbp, rbx, r12–r15
    return sp;
}

// Runs one block: all fibers until they finish, releasing barriers when every live participant waits in them.
inline void emu_run_block(Block& blk, unsigned threads) {
    g_block = &blk;
    blk.threads = threads;
    blk.fibers.assign(threads, Fiber());
    for (unsigned t = 0; t < threads; t++) {
        blk.fibers[t].clock.assign(emu_clock_size(), 0);
        blk.fibers[t].clock[t] = 1;
    }
    blk.slots.assign(threads, {});
    for (unsigned t = 0; t < threads; t++)
        blk.fibers[t].sp = emu_new_stack(g_stacks + (size_t)t * g_stack_size, g_stack_size);
    std::vector<unsigned> order(threads);
    for (unsigned t = 0; t < threads; t++) order[t] = t;
    // Runs every runnable thread (of the lagging warpgroup, or of the others) to its next barrier.
    const auto run = [&](bool lagging) {
        bool ran = false;
        std::shuffle(order.begin(), order.end(), g_sched_rng);
        for (unsigned t : order) {
            Fiber& f = blk.fibers[t];
            if (f.wait != RUNNING || ((int)t / 128 == g_lagging_warpgroup) != lagging) continue;
            blk.current = t;
            threadIdx = {t, 0, 0};
#ifdef EMU_ASAN
            void* save = nullptr;
            __sanitizer_start_switch_fiber(&save, g_stacks + (size_t)t * g_stack_size, g_stack_size);
            emu_switch(&blk.scheduler, f.sp);
            __sanitizer_finish_switch_fiber(save, &g_main_stack_bottom, &g_main_stack_size);
#else
            emu_switch(&blk.scheduler, f.sp);
#endif
            ran = true;
        }
        return ran;
    };
    for (;;) {
        if (run(false)) continue;
        bool all_done = true, released = false;
        unsigned live = 0, at_block = 0;
        for (auto& f : blk.fibers) {
            if (f.wait != DONE) all_done = false, live++;
            if (f.wait == BLOCK_BARRIER) at_block++;
        }
        if (all_done) break;
        if (at_block == live) {
            std::vector<unsigned> members;
            for (unsigned t = 0; t < threads; t++)
                if (blk.fibers[t].wait == BLOCK_BARRIER) blk.fibers[t].wait = RUNNING, members.push_back(t);
            emu_sync(members);
            released = true;
        } else {
            // Warps (32 threads) wait in WARP_BARRIER, warpgroups (128) in GROUP_BARRIER.
            for (auto [size, kind] : {std::pair{32u, WARP_BARRIER}, std::pair{128u, GROUP_BARRIER}}) {
                for (unsigned w = 0; w * size < threads; w++) {
                    unsigned lanes = 0, waiting = 0;
                    const char* op = nullptr;
                    for (unsigned t = w * size; t < std::min(threads, w * size + size); t++) {
                        Fiber& f = blk.fibers[t];
                        if (f.wait == DONE) continue;
                        lanes++;
                        if (f.wait == kind) {
                            if (op && std::strcmp(op, f.warp_op) != 0)
                                emu_fail("warp or warpgroup " + std::to_string(w) + " diverged: " + op + " vs " +
                                         f.warp_op);
                            op = f.warp_op;
                            waiting++;
                        }
                    }
                    if (lanes > 0 && waiting == lanes) {
                        if (lanes != size && threads % size == 0) emu_fail(std::string(op) + " with exited lanes");
                        std::vector<unsigned> members;
                        for (unsigned t = w * size; t < std::min(threads, w * size + size); t++)
                            if (blk.fibers[t].wait == kind) blk.fibers[t].wait = RUNNING, members.push_back(t);
                        // Of the warp collectives, only __syncwarp orders memory.
                        if (std::strcmp(op, "__syncwarp") == 0) emu_sync(members);
                        released = true;
                    }
                }
            }
        }
        if (!released && !run(true))
            emu_fail("deadlock: threads wait in different barriers (barrier in divergent code?), or for a named "
                     "barrier or an mbarrier phase that never completes");
    }
    for (unsigned id = 0; id < blk.named.size(); id++)
        if (blk.named[id].count != 0) emu_fail("block ended with named barrier " + std::to_string(id) + " incomplete");
    for (auto& b : blk.mbarriers)
        if (!b.copies.empty()) emu_fail("block ended with tensor copies in flight");
}

// Runs kernel() on every block of `grid`, `threads` threads each, with `shared_bytes` of dynamic shared memory.
inline void launch(dim3 grid, unsigned threads, size_t shared_bytes, std::function<void()> kernel) {
    if (g_stack_count < threads) {
        if (g_stacks) munmap(g_stacks, (size_t)g_stack_count * g_stack_size);
        g_stacks = (char*)mmap(nullptr, (size_t)threads * g_stack_size, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        g_stack_count = threads;
    }
    gridDim = grid;
    blockDim = {threads, 1, 1};
    g_kernel = std::move(kernel);
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                blockIdx = {x, y, z};
                Block blk;
                // Fresh shared memory holds garbage: NaN bit patterns, so a read of what nobody wrote shows.
                blk.smem.assign(shared_bytes, 0xff);
                blk.shadow.assign((shared_bytes + 3) / 4, ShadowWord());
                emu_run_block(blk, threads);
                for (auto& f : blk.fibers) {
                    if (!f.open_group.empty() || !f.committed.empty()) emu_fail("thread exited with copies in flight");
                    if (!f.wgmma_open.empty() || !f.wgmma_committed.empty())
                        emu_fail("thread exited with wgmma in flight");
                    if (!f.bulk_open.empty() || !f.bulk_committed.empty())
                        emu_fail("thread exited with bulk reductions not waited for");
                }
            }
}

// ---- shared-memory shadow -----------------------------------------------------------------------------------------

inline std::string emu_where(unsigned addr) {
    return "shared byte " + std::to_string(addr) + " (block " + std::to_string(blockIdx.x) + "," +
           std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ", thread " + std::to_string(emu_tid()) +
           ")";
}

inline ShadowWord& emu_word(unsigned addr) {
    if (addr % 4 != 0 || addr / 4 >= g_block->shadow.size())
        emu_fail("access outside shared memory: " + emu_where(addr));
    ShadowWord& s = g_block->shadow[addr / 4];
    if (s.mbarrier) emu_fail("plain access to an mbarrier: " + emu_where(addr));
    return s;
}

inline int emu_now() { return g_block->fibers[emu_tid()].clock[emu_tid()]; }

// Whether this thread's accesses from now on are ordered after an earlier access `a` (by any thread, or by the
// copies that completed on an mbarrier's phase).
inline bool emu_ordered(Access a) {
    return a.thread == (int)emu_tid() || g_block->fibers[emu_tid()].clock[a.thread] >= a.interval;
}

inline std::string emu_by(Access a) {
    const int threads = (int)g_block->threads;
    return a.thread < threads ? "thread " + std::to_string(a.thread)
                              : "a tensor copy on mbarrier " + std::to_string(a.thread - threads);
}

inline void emu_read(unsigned addr, unsigned bytes) {
    const Access now{(int)emu_tid(), emu_now()};
    for (unsigned a = addr; a < addr + bytes; a += 4) {
        ShadowWord& s = emu_word(a);
        if (s.pending >= 0) emu_fail("read of an asynchronous copy in flight: " + emu_where(a));
        if (s.write.thread < 0) emu_fail("read of a word nothing has written: " + emu_where(a));
        if (!emu_ordered(s.write)) emu_fail("read races with " + emu_by(s.write) + "'s write: " + emu_where(a));
        // Reads this one follows need not be kept: a write ordered after it is ordered after them.
        s.reads.erase_if(emu_ordered);
        s.reads.push_back(now);
    }
}

// Whether a write to the word (plain, a copy started, or a tensor copy issued) is ordered after its last write and
// its reads since.
inline void emu_check_write(ShadowWord& s, unsigned a) {
    if (s.pending >= 0) emu_fail("write over an asynchronous copy in flight: " + emu_where(a));
    s.reads.each([a](Access r) {
        if (!emu_ordered(r)) emu_fail("write over a word " + emu_by(r) + " may still read: " + emu_where(a));
    });
    if (s.write.thread >= 0 && !emu_ordered(s.write))
        emu_fail("write races with " + emu_by(s.write) + "'s write: " + emu_where(a));
}

// A write (plain, or the start of an asynchronous copy when `async`).
inline void emu_write(unsigned addr, unsigned bytes, bool async) {
    const int t = emu_tid();
    for (unsigned a = addr; a < addr + bytes; a += 4) {
        ShadowWord& s = emu_word(a);
        emu_check_write(s, a);
        if (async) {
            s.pending = t;
        } else {
            s.write = {t, emu_now()}, s.async_write = false, s.reads.clear();
            s.w_proxy_fences = g_block->fibers[t].proxy_fences;
        }
    }
}

inline void emu_complete(const Copy& c) {
    const int t = emu_tid();
    for (int i = 0; i < c.bytes; i++) g_block->smem[c.smem + i] = i < c.valid_bytes ? c.src[i] : 0;
    for (unsigned a = c.smem; a < c.smem + c.bytes; a += 4) {
        ShadowWord& s = emu_word(a);
        s.pending = -1, s.write = {t, emu_now()}, s.async_write = false, s.reads.clear();
        s.w_proxy_fences = g_block->fibers[t].proxy_fences;
    }
}

inline void emu_check_global(const void* p, size_t bytes) {
    auto* b = static_cast<const unsigned char*>(p);
    for (auto& [lo, hi] : g_global_buffers)
        if (b >= lo && b + bytes <= hi) return;
    emu_fail("global read outside every buffer");
}

// ---- the tests' device memory -------------------------------------------------------------------------------------

// A device array of exactly n elements (AddressSanitizer sees any access past it), registered as a global buffer
// that asynchronous copies may read.
template <typename T>
struct Array {
    T* p;
    size_t n;
    explicit Array(size_t n_) : n(n_) {
        p = static_cast<T*>(::operator new[](std::max<size_t>(n, 1) * sizeof(T), std::align_val_t(16)));
        auto* b = reinterpret_cast<unsigned char*>(p);
        g_global_buffers.push_back({b, b + n * sizeof(T)});
    }
    Array(const Array&) = delete;
    ~Array() {
        const unsigned char* b = reinterpret_cast<unsigned char*>(p);
        auto range = std::make_pair(b, b + n * sizeof(T));
        g_global_buffers.erase(std::find(g_global_buffers.begin(), g_global_buffers.end(), range));
        ::operator delete[](p, std::align_val_t(16));
    }
    void poison() { std::memset(p, 0xff, n * sizeof(T)); }  // NaN in bf16 and fp32
    double at(size_t i) const {
        if constexpr (std::is_same_v<T, float>) return p[i];
        else return __bfloat162float(p[i]);
    }
};

// What a kernel built in bf16 (KILN_BF16) or in fp32 may differ from a double-precision reference by, normwise.
#ifdef KILN_BF16
inline const double EMU_TOL = 1e-2;
#else
inline const double EMU_TOL = 1e-5;
#endif

// ---- warp collectives ---------------------------------------------------------------------------------------------

inline std::array<unsigned, 16>& emu_slot(int lane) { return g_block->slots[emu_warp() * 32 + lane]; }
inline int emu_lane() { return emu_tid() % 32; }

inline bool __any_sync(unsigned mask, bool predicate) {
    if (mask != 0xffffffffu) emu_fail("partial vote mask");
    emu_slot(emu_lane())[0] = predicate;
    emu_warp_barrier("vote");
    bool any = false;
    for (int lane = 0; lane < 32; lane++) any |= emu_slot(lane)[0] != 0;
    emu_warp_barrier("vote done");
    return any;
}
inline float __shfl_xor_sync(unsigned mask, float v, int offset) {
    if (mask != 0xffffffffu) emu_fail("partial shuffle mask");
    std::memcpy(&emu_slot(emu_lane())[0], &v, 4);
    emu_warp_barrier("shfl");
    float r;
    std::memcpy(&r, &emu_slot(emu_lane() ^ offset)[0], 4);
    emu_warp_barrier("shfl done");
    return r;
}
