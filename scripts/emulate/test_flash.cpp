// Runs kernels/flash_attention.cu under the emulation (emu.h, mma_emu.h) and compares the forward (O, lse) and the
// backward (dQ, dK, dV) with a double-precision reference, for every head dimension, several sequence lengths
// (shorter than, equal to and not multiples of the tiles), causal or not, sliding windows (shorter than a tile and
// across tiles), and grouped-query attention. The backward
// runs twice: the deterministic kernels, then the dkv kernel that adds dQ atomically and dq_store (dQa, dKa, dVa),
// whose dK and dV must be those of the first, bit for bit. The deterministic kernels also write the partial column
// sums of dqkv (a bias gradient), which must add up to the sums of dqkv as stored.
#include "emu.h"
#include "mma_emu.h"
#include "flash_all.inc"

#include <map>

static std::mt19937 rng(7);
static float uni() { return std::uniform_real_distribution<float>(-1, 1)(rng); }

// What the engine reads from the compiled module (FLASH_ATTENTION's launch table): queries per forward block, then
// the shared memory of the forward, dq, dkv and dkv_dq kernels, then their threads a block.
static const unsigned* launch_table(int D) {
    switch (D) {
        case 32: return flash_attention_launch_d32;
        case 64: return flash_attention_launch_d64;
        case 96: return flash_attention_launch_d96;
        case 128: return flash_attention_launch_d128;
    }
    emu_fail("no kernels for this head dimension");
}

// Built as sm_90a (__CUDA_ARCH_FEAT_SM90_ALL), the kernel file also has every kernel on wgmma for some head
// dimensions, with their own launch table (laid out as flash_attention_launch_dD); the engine runs them instead of
// the mma.sync ones unless KILN_FLASH_WGMMA says otherwise. And the forward on wgmma comes pipelined too. All are
// tested: the pipelined forward followed by the backward on wgmma.
static bool has_wgmma_kernels(int D) {
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    return D == 64 || D == 128;
#else
    (void)D;
    return false;
#endif
}

struct Shape {
    int B, T, NH, KVH, D;
    int window;  // the kernels' argument: 0 not causal, T causal, less a sliding window
    bool wgmma;      // the kernels on wgmma
    bool pipelined;  // and the forward's pipelined form (flash_attention_launch_wgmma_pipelined_dD)
    bool specialised;  // or its warp-specialised form (flash_attention_launch_wgmma_specialised_dD)
};

static int failures = 0;
static std::map<std::string, double> worst;

static void report(const char* what, const Shape& s, double err, double tol) {
    bool ok = err <= tol;  // false for NaN
    worst[what] = std::max(worst[what], err);
    if (!ok) failures++;
    if (!ok || std::getenv("VERBOSE"))
        std::printf("%s %-4s B%d T%d H%d/%d D%d %s%s: error %.2e\n", ok ? "ok  " : "FAIL", what, s.B, s.T, s.NH,
                    s.KVH, s.D,
                    s.window == 0       ? "full"
                    : s.window == s.T ? "causal"
                                        : ("window " + std::to_string(s.window)).c_str(),
                    s.specialised ? " (wgmma, specialised)"
                    : s.pipelined ? " (wgmma, pipelined)"
                    : s.wgmma     ? " (wgmma)"
                                  : "",
                    err);
}

// max |got − want| / max |want| over the selected elements.
template <typename G, typename W>
static double normwise(size_t n, G got, W want) {
    double e = 0, m = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double g = got(i), w = want(i);
        if (!std::isfinite(g)) return INFINITY;
        e = std::max(e, std::fabs(g - w));
        m = std::max(m, std::fabs(w));
    }
    return e / m;
}

static void run(const Shape& s) {
    const int B = s.B, T = s.T, NH = s.NH, KVH = s.KVH, D = s.D, W = (NH + 2 * KVH) * D, C = NH * D;
    const unsigned* tiles = launch_table(D);  // as the engine reads them
    Array<__nv_bfloat16> qkv((size_t)B * T * W), out((size_t)B * T * C), dout((size_t)B * T * C),
        dqkv((size_t)B * T * W);
    Array<float> lse((size_t)B * NH * T), row_dot((size_t)B * NH * T), dq_sum((size_t)B * T * C);
    // One row of partial column sums for each 16 rows of each 64-row tile of each sequence.
    const size_t partial_rows = (size_t)B * ((T + 63) / 64) * 4;
    Array<float> bias_partials(partial_rows * W);
    Array<__nv_bfloat16> dqkv_atomic((size_t)B * T * W);
    for (size_t i = 0; i < qkv.n; i++) qkv.p[i] = uni();
    for (size_t i = 0; i < dout.n; i++) dout.p[i] = uni();
    out.poison(), lse.poison(), dqkv.poison(), row_dot.poison(), dqkv_atomic.poison(), bias_partials.poison();
    std::fill(dq_sum.p, dq_sum.p + dq_sum.n, 0.0f);

#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    if (s.wgmma) tiles = D == 64 ? flash_attention_launch_wgmma_d64 : flash_attention_launch_wgmma_d128;
#endif
    // The forward's shared memory and threads, from its own table when pipelined or specialised.
    unsigned forward_shared = tiles[1], forward_threads = tiles[5];
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    if (s.pipelined) {
        const unsigned* p =
            D == 64 ? flash_attention_launch_wgmma_pipelined_d64 : flash_attention_launch_wgmma_pipelined_d128;
        forward_shared = p[0], forward_threads = p[1];
    }
    // The specialised kernels' table: threads a block, the forward's shared memory and keys a tile, the dq kernel's
    // shared memory, queries a block and rows a tile (of both backward kernels), the dkv kernel's shared memory and
    // keys a block (also the dkv kernel's with atomic dQ), and the shared memory of that one.
    const unsigned* specialised =
        D == 64 ? flash_attention_launch_wgmma_specialised_d64 : flash_attention_launch_wgmma_specialised_d128;
    if (s.specialised) forward_shared = specialised[1], forward_threads = specialised[0];
    // Their tensor maps, as the engine encodes them: qkv as (W elements, T rows, B sequences), dout as (NH·D, T, B),
    // boxes of 128 bytes by a tile's rows; and dQ's fp32 sums as (NH·D, T, B), boxes of 16 rows.
    const auto tensor_map = [&](void* base, unsigned element_bytes, unsigned long long width, unsigned rows) {
        return TensorMap{static_cast<unsigned char*>(base),
                         {width, (unsigned long long)T, (unsigned long long)B},
                         {width * element_bytes, (unsigned long long)T * width * element_bytes},
                         {128 / element_bytes, rows, 1},
                         element_bytes};
    };
    const TensorMap q_map = tensor_map(qkv.p, 2, W, tiles[0]), kv_map = tensor_map(qkv.p, 2, W, specialised[2]),
                    backward_qkv_map = tensor_map(qkv.p, 2, W, specialised[5]),
                    backward_dout_map = tensor_map(dout.p, 2, (unsigned long long)C, specialised[5]),
                    dq_map = tensor_map(dq_sum.p, 4, (unsigned long long)C, 16);
#endif
    const unsigned fwd_grid = (T + tiles[0] - 1) / tiles[0], bwd_grid = (T + 63) / 64;
#define DISPATCH(NAME, ...)                                             \
    switch (D) {                                                        \
        case 32: NAME##_d32(__VA_ARGS__); break;                        \
        case 64: NAME##_d64(__VA_ARGS__); break;                        \
        case 96: NAME##_d96(__VA_ARGS__); break;                        \
        case 128: NAME##_d128(__VA_ARGS__); break;                      \
    }
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
#define DISPATCH_WGMMA(NAME, ...)                                       \
    if (s.wgmma) {                                                      \
        if (D == 64) NAME##_wgmma_d64(__VA_ARGS__);                     \
        else NAME##_wgmma_d128(__VA_ARGS__);                            \
        return;                                                         \
    }
#define DISPATCH_SPECIALISED(NAME, ...)                                 \
    if (s.specialised) {                                                \
        if (D == 64) NAME##_wgmma_specialised_d64(__VA_ARGS__);         \
        else NAME##_wgmma_specialised_d128(__VA_ARGS__);                \
        return;                                                         \
    }
#define DISPATCH_PIPELINED(NAME, ...)                                   \
    if (s.pipelined) {                                                  \
        if (D == 64) NAME##_wgmma_pipelined_d64(__VA_ARGS__);           \
        else NAME##_wgmma_pipelined_d128(__VA_ARGS__);                  \
        return;                                                         \
    }
#else
#define DISPATCH_WGMMA(NAME, ...)
#define DISPATCH_PIPELINED(NAME, ...)
#define DISPATCH_SPECIALISED(NAME, ...)
#endif
    launch({fwd_grid, (unsigned)NH, (unsigned)B}, forward_threads, forward_shared, [&] {
        DISPATCH_SPECIALISED(flash_attention_forward, out.p, lse.p, q_map, kv_map, T, NH, KVH, s.window)
        DISPATCH_PIPELINED(flash_attention_forward, out.p, lse.p, qkv.p, T, NH, KVH, s.window)
        DISPATCH_WGMMA(flash_attention_forward, out.p, lse.p, qkv.p, T, NH, KVH, s.window)
        DISPATCH(flash_attention_forward, out.p, lse.p, qkv.p, T, NH, KVH, s.window)
    });
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    // The pipelined and specialised forwards reorder only when each product is waited for and who loads the tiles,
    // not the arithmetic: their output and lse are the unpipelined one's, bit for bit.
    if (s.pipelined || s.specialised) {
        Array<__nv_bfloat16> unpipelined_out(out.n);
        Array<float> unpipelined_lse(lse.n);
        unpipelined_out.poison(), unpipelined_lse.poison();
        launch({fwd_grid, (unsigned)NH, (unsigned)B}, tiles[5], tiles[1], [&] {
            auto* forward = D == 64 ? flash_attention_forward_wgmma_d64 : flash_attention_forward_wgmma_d128;
            forward(unpipelined_out.p, unpipelined_lse.p, qkv.p, T, NH, KVH, s.window);
        });
        const bool same = std::memcmp(out.p, unpipelined_out.p, out.n * 2) == 0 &&
                          std::memcmp(lse.p, unpipelined_lse.p, lse.n * 4) == 0;
        report("O lse as unpipelined", s, same ? 0 : 1, 0);
    }
#endif
    const size_t rows = (size_t)B * T * NH;
    launch({(unsigned)((rows * 8 + 255) / 256), 1, 1}, 256, 0,
           [&] { flash_attention_row_dot(row_dot.p, dout.p, out.p, B, T, NH, D); });
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    if (s.specialised) {
        const unsigned dkv_grid = (T + specialised[7] - 1) / specialised[7];
        launch({dkv_grid, (unsigned)KVH, (unsigned)B}, specialised[0], specialised[6], [&] {
            auto* dkv = D == 64 ? flash_attention_backward_dkv_wgmma_specialised_d64
                                : flash_attention_backward_dkv_wgmma_specialised_d128;
            dkv(dqkv.p, bias_partials.p, backward_qkv_map, backward_dout_map, lse.p, row_dot.p, T, NH, KVH, s.window);
        });
        const unsigned dq_grid = (T + specialised[4] - 1) / specialised[4];
        launch({dq_grid, (unsigned)NH, (unsigned)B}, specialised[0], specialised[3], [&] {
            auto* dq = D == 64 ? flash_attention_backward_dq_wgmma_specialised_d64
                               : flash_attention_backward_dq_wgmma_specialised_d128;
            dq(dqkv.p, bias_partials.p, backward_qkv_map, backward_dout_map, lse.p, row_dot.p, T, NH, KVH, s.window);
        });
        // They run the wgmma kernels' arithmetic: dQ, dK, dV and their column sums are those kernels' bit for bit.
        Array<__nv_bfloat16> plain_dqkv(dqkv.n);
        Array<float> plain_partials(bias_partials.n);
        plain_dqkv.poison(), plain_partials.poison();
        launch({bwd_grid, (unsigned)KVH, (unsigned)B}, tiles[7], tiles[3], [&] {
            auto* dkv = D == 64 ? flash_attention_backward_dkv_wgmma_d64 : flash_attention_backward_dkv_wgmma_d128;
            dkv(plain_dqkv.p, plain_partials.p, dout.p, qkv.p, lse.p, row_dot.p, T, NH, KVH, s.window);
        });
        launch({bwd_grid, (unsigned)NH, (unsigned)B}, tiles[6], tiles[2], [&] {
            auto* dq = D == 64 ? flash_attention_backward_dq_wgmma_d64 : flash_attention_backward_dq_wgmma_d128;
            dq(plain_dqkv.p, plain_partials.p, dout.p, qkv.p, lse.p, row_dot.p, T, NH, KVH, s.window);
        });
        const bool same = std::memcmp(dqkv.p, plain_dqkv.p, dqkv.n * 2) == 0 &&
                          std::memcmp(bias_partials.p, plain_partials.p, bias_partials.n * 4) == 0;
        report("dQKV as wgmma", s, same ? 0 : 1, 0);
    }
#endif
    if (!s.specialised) {
        launch({bwd_grid, (unsigned)KVH, (unsigned)B}, tiles[7], tiles[3], [&] {
            DISPATCH_WGMMA(flash_attention_backward_dkv, dqkv.p, bias_partials.p, dout.p, qkv.p, lse.p, row_dot.p, T,
                           NH, KVH, s.window)
            DISPATCH(flash_attention_backward_dkv, dqkv.p, bias_partials.p, dout.p, qkv.p, lse.p, row_dot.p, T, NH,
                     KVH, s.window)
        });
        launch({bwd_grid, (unsigned)NH, (unsigned)B}, tiles[6], tiles[2], [&] {
            DISPATCH_WGMMA(flash_attention_backward_dq, dqkv.p, bias_partials.p, dout.p, qkv.p, lse.p, row_dot.p, T,
                           NH, KVH, s.window)
            DISPATCH(flash_attention_backward_dq, dqkv.p, bias_partials.p, dout.p, qkv.p, lse.p, row_dot.p, T, NH,
                     KVH, s.window)
        });
    }
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    // The specialised dkv kernel with atomic dQ (tensor reductions): launched as the one without, with its own shared
    // memory (the table's last word).
    if (s.specialised) {
        const unsigned dkv_grid = (T + specialised[7] - 1) / specialised[7];
        launch({dkv_grid, (unsigned)KVH, (unsigned)B}, specialised[0], specialised[8], [&] {
            auto* dkv_dq = D == 64 ? flash_attention_backward_dkv_dq_wgmma_specialised_d64
                                   : flash_attention_backward_dkv_dq_wgmma_specialised_d128;
            dkv_dq(dqkv_atomic.p, backward_qkv_map, backward_dout_map, dq_map, lse.p, row_dot.p, T, NH, KVH,
                   s.window);
        });
    } else
#endif
    launch({bwd_grid, (unsigned)KVH, (unsigned)B}, tiles[8], tiles[4], [&] {
        DISPATCH_WGMMA(flash_attention_backward_dkv_dq, dqkv_atomic.p, dq_sum.p, dout.p, qkv.p, lse.p, row_dot.p, T, NH,
                       KVH, s.window)
        DISPATCH(flash_attention_backward_dkv_dq, dqkv_atomic.p, dq_sum.p, dout.p, qkv.p, lse.p, row_dot.p, T, NH, KVH,
                 s.window)
    });
    launch({(unsigned)((dq_sum.n / 8 + 255) / 256), 1, 1}, 256, 0, [&] {
        flash_attention_dq_store(dqkv_atomic.p, dq_sum.p, (long)B * T, NH, KVH, D, 1.0f / std::sqrt((float)D));
    });

    // Reference, in double, from the same bf16 inputs.
    const double scale = 1 / std::sqrt((double)D);
    std::vector<double> o_ref(out.n), lse_ref(lse.n), dqkv_ref(dqkv.n, 0.0), dot_check(lse.n);
    auto x = [&](int b, int t, int col) { return qkv.at(((size_t)b * T + t) * W + col); };
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const int g = h / (NH / KVH), qc = h * D, kc = (NH + g) * D, vc = (NH + KVH + g) * D;
            std::vector<double> S((size_t)T * T), P((size_t)T * T);
            for (int i = 0; i < T; i++) {
                const int first = s.window ? std::max(0, i + 1 - s.window) : 0, seen = s.window ? i + 1 : T;
                double m = -INFINITY;
                for (int j = first; j < seen; j++) {
                    double d = 0;
                    for (int c = 0; c < D; c++) d += x(b, i, qc + c) * x(b, j, kc + c);
                    S[(size_t)i * T + j] = d * scale;
                    m = std::max(m, d * scale);
                }
                double l = 0;
                for (int j = first; j < seen; j++) l += std::exp(S[(size_t)i * T + j] - m);
                lse_ref[((size_t)b * NH + h) * T + i] = m + std::log(l);
                for (int j = first; j < seen; j++) P[(size_t)i * T + j] = std::exp(S[(size_t)i * T + j] - m) / l;
                for (int c = 0; c < D; c++) {
                    double acc = 0;
                    for (int j = first; j < seen; j++) acc += P[(size_t)i * T + j] * x(b, j, vc + c);
                    o_ref[((size_t)b * T + i) * C + qc + c] = acc;
                }
            }
            // Backward: D_i = dO_i·O_i, dP = dO·Vᵀ, dS = P∘(dP − D), dQ = s dS K, dK = s dSᵀ Q, dV = Pᵀ dO.
            for (int i = 0; i < T; i++) {
                double Di = 0;
                for (int c = 0; c < D; c++)
                    Di += dout.at(((size_t)b * T + i) * C + qc + c) * o_ref[((size_t)b * T + i) * C + qc + c];
                double kern = 0;
                for (int c = 0; c < D; c++)
                    kern += dout.at(((size_t)b * T + i) * C + qc + c) * out.at(((size_t)b * T + i) * C + qc + c);
                dot_check[((size_t)b * NH + h) * T + i] = kern;
                for (int j = 0; j < T; j++) {
                    const double p = P[(size_t)i * T + j];
                    if (p == 0) continue;
                    double dp = 0;
                    for (int c = 0; c < D; c++) dp += dout.at(((size_t)b * T + i) * C + qc + c) * x(b, j, vc + c);
                    const double ds = p * (dp - Di);
                    for (int c = 0; c < D; c++) {
                        dqkv_ref[((size_t)b * T + i) * W + qc + c] += scale * ds * x(b, j, kc + c);
                        dqkv_ref[((size_t)b * T + j) * W + kc + c] += scale * ds * x(b, i, qc + c);
                        dqkv_ref[((size_t)b * T + j) * W + vc + c] += p * dout.at(((size_t)b * T + i) * C + qc + c);
                    }
                }
            }
        }

    report("O", s, normwise(out.n, [&](size_t i) { return out.at(i); }, [&](size_t i) { return o_ref[i]; }), 1e-2);
    report("lse", s, normwise(lse.n, [&](size_t i) { return lse.at(i); }, [&](size_t i) { return lse_ref[i]; }), 1e-3);
    report("Di", s, normwise(lse.n, [&](size_t i) { return row_dot.at(i); }, [&](size_t i) { return dot_check[i]; }),
           1e-5);
    // dQ, dK, dV: the columns of qkv's three parts.
    const int parts[4] = {0, C, C + KVH * D, W};
    const char* names[3] = {"dQ", "dK", "dV"};
    // Each part relative to the largest gradient in all of dqkv, as the self-test measures dqkv: with T = 1 the exact
    // dQ and dK are zero (one key: P = 1, O = V, so dS = dO·V − dO·O = 0), and only rounding noise remains.
    double dqkv_max = 1e-30;
    for (double v : dqkv_ref) dqkv_max = std::max(dqkv_max, std::fabs(v));
    for (const auto* got : {&dqkv, &dqkv_atomic})
        for (int part = 0; part < 3; part++) {
            double e = 0;
            for (size_t r = 0; r < (size_t)B * T; r++)
                for (int c = parts[part]; c < parts[part + 1]; c++) {
                    double g = got->at(r * W + c);
                    e = std::isfinite(g) ? std::max(e, std::fabs(g - dqkv_ref[r * W + c])) : INFINITY;
                }
            report((std::string(names[part]) + (got == &dqkv ? "" : "a")).c_str(), s, e / dqkv_max, 1e-2);
        }
    bool same = true;
    for (size_t r = 0; r < (size_t)B * T; r++)
        same &= std::memcmp(dqkv.p + r * W + C, dqkv_atomic.p + r * W + C, 2 * KVH * D * 2) == 0;
    report("dK dV identical", s, same ? 0 : 1, 0);
    // The partials (every one written: a poisoned one would make its column NaN) add up to dqkv's column sums, as
    // stored; the error is relative to the sum of the magnitudes a column adds up.
    std::vector<double> got_sums(W, 0.0), want_sums(W, 0.0), magnitude(W, 1e-30);
    for (size_t i = 0; i < bias_partials.n; i++) got_sums[i % W] += bias_partials.p[i];
    for (size_t i = 0; i < dqkv.n; i++) want_sums[i % W] += dqkv.at(i), magnitude[i % W] += std::fabs(dqkv.at(i));
    double bias_error = 0;
    for (int c = 0; c < W; c++) {
        const double e = std::fabs(got_sums[c] - want_sums[c]) / magnitude[c];
        bias_error = std::isfinite(got_sums[c]) ? std::max(bias_error, e) : INFINITY;
    }
    report("dbias", s, bias_error, 1e-6);
}

int main(int argc, char** argv) {
    emu_schedule_from_env();
    std::vector<int> dims = {32, 64, 96, 128}, lengths = {1, 17, 64, 77, 130};
    if (argc > 1) dims = {std::atoi(argv[1])};
    if (argc > 2) lengths = {std::atoi(argv[2])};
    // A third argument runs one set of kernels only: mma, wgmma, pipelined or specialised.
    const char* kernel_names[] = {"mma", "wgmma", "pipelined", "specialised"};
    const std::string only = argc > 3 ? argv[3] : "";
    if (!only.empty() && std::find(std::begin(kernel_names), std::end(kernel_names), only) == std::end(kernel_names))
        emu_fail("no set of kernels named " + only + " (mma, wgmma, pipelined or specialised)");
    int cases = 0;
    for (int D : dims)
        for (int T : lengths)
            // Not causal, causal, and (with 2 key/value heads only: the masks do not depend on the grouping) a sliding
            // window of 2/5 of the sequence and 3 more: from T = 130 on, some tiles lie wholly outside a block's
            // windows.
            for (int window : {0, T, T * 2 / 5 + 3})
                for (int kvh : {4, 2, 1})
                    for (int kernels = 0; kernels < 4; kernels++) {
                        const bool wgmma = kernels > 0, pipelined = kernels == 2, specialised = kernels == 3;
                        if (wgmma && !has_wgmma_kernels(D)) continue;
                        if (!only.empty() && only != kernel_names[kernels]) continue;
                        if (window != 0 && window != T && (window >= T || kvh != 2)) continue;
                        run({2, T, 4, kvh, D, window, wgmma, pipelined, specialised});
                        cases++;
                    }
    for (auto& [what, e] : worst) std::printf("largest error %-4s %.2e\n", what.c_str(), e);
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures != 0;
}
