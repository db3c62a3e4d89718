// Runs kernels/layernorm.cu under the emulation: the forward (plain and after a residual add) and the backward
// with its two-kernel sum of dweight and dbias, against a double-precision reference, for widths that are and are
// not whole 16-byte chunks, launched as the engine launches them (crates/kiln-cuda/src/backend.rs). Built twice,
// with and without KILN_BF16.
#include "emu.h"
#define __shared__ static  // one block at a time: a function's statics are its block's shared memory
#include "layernorm_all.inc"

#include <cmath>
#include <random>

static int failures = 0;
static std::mt19937 rng(3);

static std::vector<floatX> random_x(size_t n) {
    std::vector<floatX> v(n);
    for (auto& x : v) x = to_x(std::uniform_real_distribution<float>(-1, 1)(rng));
    return v;
}

// max |got − want| / max |want|.
template <typename G>
static double error(const std::vector<G>& got, const std::vector<double>& want) {
    double e = 0, scale = 1e-30;
    for (size_t i = 0; i < want.size(); i++) {
        e = std::max(e, std::fabs((double)to_f32(got[i]) - want[i]));
        if (!std::isfinite((double)to_f32(got[i]))) e = INFINITY;
        scale = std::max(scale, std::fabs(want[i]));
    }
    return e / scale;
}

static void check(const char* what, int N, int C, double err) {
    bool ok = err <= EMU_TOL;
    if (!ok) failures++;
    if (!ok || std::getenv("VERBOSE")) std::printf("%s %-9s N%d C%d: error %.2e\n", ok ? "ok  " : "FAIL", what, N, C, err);
}

static void run(int N, int C) {
    auto a = random_x((size_t)N * C), b = random_x((size_t)N * C), w = random_x(C), bias = random_x(C);
    auto dout = random_x((size_t)N * C), dinp = random_x((size_t)N * C);
    std::vector<floatX> residual((size_t)N * C), out((size_t)N * C);
    std::vector<float> mean(N, NAN), rstd(N, NAN), dw(C), db(C);
    for (int c = 0; c < C; c++) dw[c] = 0.5f, db[c] = -0.25f;
    const unsigned blocks4 = (N + 3) / 4;  // 4 warps of 32 a block, a row a warp
    launch({blocks4, 1, 1}, 128, 0, [&] {
        residual_layernorm_forward(residual.data(), out.data(), mean.data(), rstd.data(), a.data(), b.data(),
                                   w.data(), bias.data(), N, C);
    });
    std::vector<double> want_out((size_t)N * C), want_mean(N), want_rstd(N), want_res((size_t)N * C);
    std::vector<double> want_dinp((size_t)N * C), want_dw(C, 0.5), want_db(C, -0.25);
    for (int n = 0; n < N; n++) {
        double mu = 0, var = 0;
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)n * C + c;
            // The residual is stored in floatX, and normalised as stored.
            want_res[i] = to_f32(to_x(to_f32(a[i]) + to_f32(b[i])));
            mu += want_res[i] / C;
        }
        for (int c = 0; c < C; c++) var += std::pow(want_res[(size_t)n * C + c] - mu, 2) / C;
        double rs = 1 / std::sqrt(var + 1e-5);
        want_mean[n] = mu, want_rstd[n] = rs;
        double g_mean = 0, gn_mean = 0;
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)n * C + c;
            double norm = (want_res[i] - mu) * rs, g = to_f32(dout[i]) * to_f32(w[c]);
            want_out[i] = norm * to_f32(w[c]) + to_f32(bias[c]);
            g_mean += g / C, gn_mean += g * norm / C;
            want_dw[c] += to_f32(dout[i]) * norm, want_db[c] += to_f32(dout[i]);
        }
        for (int c = 0; c < C; c++) {
            size_t i = (size_t)n * C + c;
            double norm = (want_res[i] - mu) * rs, g = to_f32(dout[i]) * to_f32(w[c]);
            want_dinp[i] = to_f32(dinp[i]) + rs * (g - g_mean - norm * gn_mean);
        }
    }
    check("residual", N, C, error(residual, want_res));
    check("forward", N, C, error(out, want_out));
    check("mean", N, C, error(mean, want_mean));
    check("rstd", N, C, error(rstd, want_rstd));

    // As the engine launches it: 32 rows a block, 4 warps while their shared memory fits 48 KiB.
    const int rows_per_block = 32, padded = (C + 7) / 8 * 8;
    const int warps = std::clamp(48 * 1024 / (2 * padded * 4), 1, 4);
    const int blocks = (N + rows_per_block - 1) / rows_per_block;
    std::vector<float> partials((size_t)blocks * 2 * C, NAN);
    launch({(unsigned)blocks, 1, 1}, warps * 32, (size_t)warps * 2 * padded * 4, [&] {
        layernorm_backward(dinp.data(), partials.data(), dout.data(), residual.data(), w.data(), mean.data(),
                           rstd.data(), N, C, rows_per_block);
    });
    launch({(unsigned)((2 * C + 31) / 32), 1, 1}, LN_SUM_LANES * LN_SUM_ROWS, 0,
           [&] { layernorm_backward_sum(dw.data(), db.data(), partials.data(), blocks, C); });
    check("dinp", N, C, error(dinp, want_dinp));
    check("dweight", N, C, error(dw, want_dw));
    check("dbias", N, C, error(db, want_db));
}

int main() {
    for (int N : {1, 37, 100, 1030})
        for (int C : {3, 20, 48, 770}) run(N, C);
    std::printf("%s\n", failures ? "layernorm: FAILED" : "layernorm: all passed");
    return failures ? 1 : 0;
}
