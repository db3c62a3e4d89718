// Tests of the emulation itself on what warp-specialised kernels synchronise with: a producer thread loading tiles
// by tensor copies into two stages, handed to two consumer warps through "full" and "empty" mbarriers, and named
// barriers among the consumers. The correct kernel must pass and compute the right sums; each broken variant,
// run in a child process, must be stopped by the emulation with the error that names its fault.
#include "emu.h"
#include "mma_emu.h"

#include <sys/wait.h>
#include <unistd.h>

#include <initializer_list>

enum Fault { NONE, NO_FULL_WAIT, WRONG_PARITY, NO_EMPTY_WAIT, EARLY_RELEASE, NO_INIT_FENCE, NO_INIT_BARRIER, SHORT_TX,
             NO_NAMED_BARRIER, NAMED_COUNTS, NAMED_TWICE, TOO_MANY_REGISTERS };

constexpr int ROWS = 16, COLS = 64, STAGES = 2, CONSUMERS = 64, TOTAL_ROWS = 100;
constexpr int TILES = (TOTAL_ROWS + ROWS - 1) / ROWS;  // the last one partly past the end: zeros
constexpr unsigned STAGE_BYTES = ROWS * COLS * 2;

// A block of 96 threads: thread 0 loads; the 64 threads of warps 1 and 2 each sum 16 elements of one row of every
// tile (row (t / 4), columns 16 (t % 4) on), then exchange their sums through shared memory.
static void pipeline(float* sums, const TensorMap& map, Fault fault) {
    const auto stage = [](int j) { return (unsigned)(j % STAGES * STAGE_BYTES); };
    const auto full = [](int j) { return STAGES * STAGE_BYTES + 8 * (j % STAGES); };
    const auto empty = [](int j) { return STAGES * STAGE_BYTES + 8 * STAGES + 8 * (j % STAGES); };
    const auto parity = [](int j) { return (unsigned)(j / STAGES % 2); };
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) mbarrier_init(full(s), 1), mbarrier_init(empty(s), CONSUMERS);
        if (fault != NO_INIT_FENCE) fence_mbarrier_init();
    }
    if (fault != NO_INIT_BARRIER) __syncthreads();
    if (threadIdx.x < 32) {
        if (threadIdx.x != 0) return;
        for (int j = 0; j < TILES; j++) {
            if (fault != NO_EMPTY_WAIT) mbarrier_wait(empty(j), parity(j) ^ 1);
            mbarrier_arrive_expect_tx(full(j), fault == SHORT_TX ? STAGE_BYTES / 2 : STAGE_BYTES);
            tma_load_3d(stage(j), map, full(j), 0, j * ROWS, 0);
        }
        return;
    }
    const int t = threadIdx.x - 32, row = t / 4;
    float sum = 0;
    for (int j = 0; j < TILES; j++) {
        if (fault != NO_FULL_WAIT) mbarrier_wait(full(j), fault == WRONG_PARITY ? parity(j) ^ 1 : parity(j));
        if (fault == EARLY_RELEASE) mbarrier_arrive(empty(j));
        for (int c = t % 4 * 16; c < t % 4 * 16 + 16; c += 2) {
            // The 128-byte swizzle: the 16-byte chunk c / 8 of row r lies at chunk (c / 8) ^ (r % 8).
            const unsigned word = __float_as_uint(ld_shared_f32(stage(j) + row * 128 + ((c / 8) ^ row % 8) * 16 +
                                                                c % 8 * 2));
            sum += emu_bf16_half(word, 0) + emu_bf16_half(word, 1);
        }
        if (fault != EARLY_RELEASE) mbarrier_arrive(empty(j));
    }
    // Every consumer is done with the stages before any writes its sum over them, and has written before any reads.
    if (fault != NO_NAMED_BARRIER) named_barrier_sync(1, CONSUMERS);
    st_shared_32(4 * t, __float_as_uint(sum));
    if (fault == NAMED_TWICE && t < 32) named_barrier_arrive(2, CONSUMERS);
    named_barrier_sync(2, fault == NAMED_COUNTS && t < 32 ? 32 : CONSUMERS);
    sums[t] = ld_shared_f32(4 * (t ^ 32));  // the other warp's
}

// Three warpgroups moving their registers as the warp-specialised kernels do: the first gives up all but LOADING,
// the other two take COMPUTING each, of the 384 × 168 the block was launched with.
template <int LOADING, int COMPUTING>
static void registers() {
    if (threadIdx.x < 128) setmaxnreg_dec<LOADING>();
    else setmaxnreg_inc<COMPUTING>();
}

// Runs the kernel with `fault` (and the register moves, with too many for TOO_MANY_REGISTERS); returns what went
// wrong ("" when nothing did).
static std::string run(Fault fault) {
    launch({1, 1, 1}, 3 * 128, 0, fault == TOO_MANY_REGISTERS ? registers<32, 240> : registers<40, 232>);
    Array<__nv_bfloat16> matrix((size_t)TOTAL_ROWS * COLS);
    Array<float> sums(CONSUMERS);
    std::mt19937 rng(5);
    for (size_t i = 0; i < matrix.n; i++) matrix.p[i] = std::uniform_real_distribution<float>(-1, 1)(rng);
    sums.poison();
    const TensorMap map{reinterpret_cast<unsigned char*>(matrix.p),
                        {COLS, TOTAL_ROWS, 1},
                        {COLS * 2, (unsigned long long)TOTAL_ROWS * COLS * 2},
                        {64, ROWS, 1}};
    launch({1, 1, 1}, 32 + CONSUMERS, STAGES * STAGE_BYTES + 16 * STAGES, [&] { pipeline(sums.p, map, fault); });
    for (int t = 0; t < CONSUMERS; t++) {
        const int other = t ^ 32, row = other / 4;
        double want = 0;
        for (int r = row; r < TOTAL_ROWS; r += ROWS)
            for (int c = other % 4 * 16; c < other % 4 * 16 + 16; c++) want += matrix.at((size_t)r * COLS + c);
        if (!(std::fabs(sums.p[t] - want) <= 1e-4 * (1 + std::fabs(want))))
            return "wrong sum for consumer " + std::to_string(t) + ": " + std::to_string(sums.p[t]) + " against " +
                   std::to_string(want);
    }
    return "";
}

static int failures = 0;

// Runs the kernel with `fault` in a child process, whose error must contain one of `expected`.
static void expect(const char* name, Fault fault, std::initializer_list<const char*> expected) {
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) emu_fail("pipe");
    std::fflush(nullptr);
    const pid_t child = fork();
    if (child == 0) {
        dup2(pipe_fds[1], 2);
        const std::string wrong = run(fault);
        std::fprintf(stderr, "%s\n", wrong.empty() ? "ran without an error" : wrong.c_str());
        std::_Exit(wrong.empty() ? 0 : 1);
    }
    close(pipe_fds[1]);
    std::string log;
    char buffer[4096];
    for (ssize_t n; (n = read(pipe_fds[0], buffer, sizeof buffer)) > 0;) log.append(buffer, n);
    close(pipe_fds[0]);
    int status = 0;
    waitpid(child, &status, 0);
    bool named = false;
    for (const char* e : expected) named |= log.find(e) != std::string::npos;
    const bool ok = named && !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    failures += !ok;
    // The emulation's error line, or the child's own last line.
    size_t at = log.find("EMULATION ERROR");
    if (at == std::string::npos) at = log.rfind('\n', log.size() - 2) + 1;
    const std::string line = log.substr(at, log.find('\n', at) - at);
    std::printf("%s %-17s %s\n", ok ? "ok  " : "FAIL", name, line.c_str());
}

int main() {
    emu_schedule_from_env();
    const std::string correct = run(NONE);
    failures += !correct.empty();
    std::printf("%s %-17s %s\n", correct.empty() ? "ok  " : "FAIL", "correct", correct.c_str());
    // Which access the emulation finds unordered first depends on the order the threads run in (EMU_SEED): a
    // consumer that does not wait may read bytes before any copy has landed, or write its sum before they land.
    const std::initializer_list<const char*> unordered = {"nothing has written", "races with", "may still read",
                                                          "in flight"};
    expect("no full wait", NO_FULL_WAIT, unordered);
    expect("wrong parity", WRONG_PARITY, unordered);
    expect("no empty wait", NO_EMPTY_WAIT, {"races with a tensor copy", "may still read"});
    expect("early release", EARLY_RELEASE, {"may still read"});
    expect("no init fence", NO_INIT_FENCE, {"without fence.mbarrier_init"});
    expect("no init barrier", NO_INIT_BARRIER, {"initialis"});
    expect("short tx", SHORT_TX, {"deadlock"});
    expect("no named barrier", NO_NAMED_BARRIER, {"may still read", "races with"});
    expect("named counts", NAMED_COUNTS, {"different counts"});
    expect("named twice", NAMED_TWICE, {"reached twice"});
    expect("registers", TOO_MANY_REGISTERS, {"more than the 64512"});
    std::printf("%d failures\n", failures);
    return failures != 0;
}
