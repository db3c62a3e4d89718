// Runs the token embedding's backward kernels of kernels/encoder.cu under the emulation: encoder_sort_rows must
// sort the positions by token stably (as std::stable_sort does), for one and several radix passes and for fewer and
// more positions than the sort has threads; encoder_backward_wte must then add each token's rows in position order,
// so its fp32 result equals a serial walk over the positions exactly.
#include "emu.h"
#define __shared__ static  // one block at a time: a function's statics are its block's shared memory
#include "encoder_all.inc"

#include <algorithm>
#include <numeric>
#include <random>

static int failures = 0;

static void check(bool ok, const char* what, int n, int vocab, int C) {
    if (!ok) failures++;
    if (!ok || std::getenv("VERBOSE")) std::printf("%s %s n%d vocab%d C%d\n", ok ? "ok  " : "FAIL", what, n, vocab, C);
}

static void run(int n, int vocab, int C, std::mt19937& rng) {
    // Tokens with repeats and runs, as text has: a few frequent tokens among rare ones.
    std::vector<unsigned> tokens(n);
    for (auto& t : tokens) t = rng() % 4 == 0 ? rng() % std::min(vocab, 5) : rng() % vocab;
    const int bits = 32 - __builtin_clz(std::max(vocab, 2) - 1);
    const int passes = (bits + SORT_BITS - 1) / SORT_BITS;
    std::vector<unsigned> keys(n, ~0u), rows(n, ~0u), spare_keys(n, ~0u), spare_rows(n, ~0u);
    launch({1, 1, 1}, SORT_THREADS, 0, [&] {
        encoder_sort_rows(keys.data(), rows.data(), spare_keys.data(), spare_rows.data(), tokens.data(), n, passes);
    });
    std::vector<unsigned> want(n);
    std::iota(want.begin(), want.end(), 0u);
    std::stable_sort(want.begin(), want.end(), [&](unsigned a, unsigned b) { return tokens[a] < tokens[b]; });
    bool sorted = rows == want;
    for (int p = 0; p < n; p++) sorted &= keys[p] == tokens[want[p]];
    check(sorted, "encoder_sort_rows", n, vocab, C);

    std::vector<float> dout((size_t)n * C), dwte((size_t)vocab * C);
    std::uniform_real_distribution<float> uni(-1, 1);
    for (auto& x : dout) x = to_x(uni(rng));
    for (auto& x : dwte) x = uni(rng);
    std::vector<float> serial = dwte;
    for (int p = 0; p < n; p++)
        for (int c = 0; c < C; c++) serial[(size_t)tokens[p] * C + c] += to_f32(to_x(dout[(size_t)p * C + c]));
    std::vector<floatX> dout_x(dout.size());
    for (size_t i = 0; i < dout.size(); i++) dout_x[i] = to_x(dout[i]);
    const int chunks = (C + 3) / 4;
    launch({(unsigned)std::max(1, std::min(64, n * chunks / 256)), 1, 1}, 256, 0,
           [&] { encoder_backward_wte(dwte.data(), dout_x.data(), keys.data(), rows.data(), n, C); });
    check(dwte == serial, "encoder_backward_wte equals the serial sum", n, vocab, C);
}

int main() {
    std::mt19937 rng(5);
    for (int n : {1, 111, 512, 650, 5000})
        for (int vocab : {1, 67, 300, 70000})
            for (int C : {3, 20}) run(n, vocab, C, rng);
    std::printf("%s\n", failures ? "encoder: FAILED" : "encoder: all passed");
    return failures ? 1 : 0;
}
