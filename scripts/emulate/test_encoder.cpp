// Runs kernels/encoder.cu under the emulation. The forward must add each token's embedding row and its position's
// row, or copy the token's row alone when there is no position table (a null wpe: rotary positions), bit for bit.
// The token embedding's backward: encoder_sort_rows must sort the positions by token stably (as std::stable_sort
// does), for one and several radix passes and for fewer and more positions than the sort has threads;
// encoder_backward_wte must then add each token's rows in position order, so its fp32 result equals a serial walk
// over the positions exactly. Launched as the engine launches them (crates/kiln-cuda/src/backend.rs). Built twice,
// with and without KILN_BF16.
#include "emu.h"
#define __shared__ static  // one block at a time: a function's statics are its block's shared memory
#include "encoder_all.inc"

#include "check.h"

#include <numeric>

static void run_forward(int B, int T, int C, int vocab, bool learned_positions) {
    char where[64];
    std::snprintf(where, sizeof where, "B%d T%d C%d vocab%d%s", B, T, C, vocab, learned_positions ? "" : " no wpe");
    std::vector<unsigned> tokens((size_t)B * T);
    for (auto& t : tokens) t = g_rng() % vocab;
    auto wte = random_x((size_t)vocab * C), wpe = random_x((size_t)T * C);
    auto out = poisoned<floatX>((size_t)B * T * C);
    const floatX* positions = learned_positions ? wpe.data() : nullptr;
    launch({elementwise_blocks((size_t)B * T * C), 1, 1}, 256, 0,
           [&] { encoder_forward(out.data(), tokens.data(), wte.data(), positions, B, T, C); });
    bool exact = true;
    for (int row = 0; row < B * T; row++)
        for (int c = 0; c < C; c++) {
            const float e = to_f32(wte[(size_t)tokens[row] * C + c]);
            const float want = learned_positions ? to_f32(to_x(e + to_f32(wpe[(size_t)(row % T) * C + c]))) : e;
            const float got = to_f32(out[(size_t)row * C + c]);
            exact &= std::memcmp(&got, &want, sizeof got) == 0;
        }
    expect(exact, "encoder_forward", where);
}

static void run_backward(int n, int vocab, int C) {
    char where[48];
    std::snprintf(where, sizeof where, "n%d vocab%d C%d", n, vocab, C);
    // Tokens with repeats and runs, as text has: a few frequent tokens among rare ones.
    std::vector<unsigned> tokens(n);
    for (auto& t : tokens) t = g_rng() % 4 == 0 ? g_rng() % std::min(vocab, 5) : g_rng() % vocab;
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
    expect(sorted, "encoder_sort_rows", where);

    std::vector<float> dout((size_t)n * C), dwte((size_t)vocab * C);
    std::uniform_real_distribution<float> uni(-1, 1);
    for (auto& x : dout) x = uni(g_rng);
    for (auto& x : dwte) x = uni(g_rng);
    std::vector<float> serial = dwte;
    for (int p = 0; p < n; p++)
        for (int c = 0; c < C; c++) serial[(size_t)tokens[p] * C + c] += to_f32(to_x(dout[(size_t)p * C + c]));
    std::vector<floatX> dout_x(dout.size());
    for (size_t i = 0; i < dout.size(); i++) dout_x[i] = to_x(dout[i]);
    const int chunks = (C + 3) / 4;
    launch({(unsigned)std::max(1, std::min(64, n * chunks / 256)), 1, 1}, 256, 0,
           [&] { encoder_backward_wte(dwte.data(), dout_x.data(), keys.data(), rows.data(), n, C); });
    expect(dwte == serial, "encoder_backward_wte", where, " (equals the serial sum)");
}

int main() {
    emu_schedule_from_env();
    for (int C : {3, 20, 64, 770})
        for (bool learned_positions : {true, false}) run_forward(2, 7, C, 11, learned_positions);
    for (int n : {1, 111, 512, 650, 5000})
        for (int vocab : {1, 67, 300, 70000})
            for (int C : {3, 20}) run_backward(n, vocab, C);
    return finish("encoder");
}
