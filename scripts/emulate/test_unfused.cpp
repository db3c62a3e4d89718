// Runs kernels/attention.cu (the unfused kernels) under the emulation and compares forward, backward and decoding
// with a double-precision reference: grouped-query, causal or not or with a sliding window, head dimensions 16 to
// 128. Built twice, with and
// without KILN_BF16.
#include "emu.h"
#include "unfused_all.inc"

#include <map>

static std::mt19937 rng(11);
static float uni() { return std::uniform_real_distribution<float>(-1, 1)(rng); }

static int failures = 0;
static std::map<std::string, double> worst;

struct Shape {
    int B, T, NH, KVH, D;
    int window;  // the kernels' argument: 0 not causal, T causal, less a sliding window
};

static void report(const char* what, const Shape& s, double err) {
    bool ok = err <= EMU_TOL;
    worst[what] = std::max(worst[what], err);
    if (!ok) failures++;
    if (!ok || std::getenv("VERBOSE"))
        std::printf("%s %-6s B%d T%d H%d/%d D%d %s: error %.2e\n", ok ? "ok  " : "FAIL", what, s.B, s.T, s.NH, s.KVH,
                    s.D, s.window == 0 ? "full" : s.window == s.T ? "causal" : "window", err);
}

// max |got − want| over `idx` / `scale`.
static double err_over(const std::vector<size_t>& idx, const std::function<double(size_t)>& got,
                       const std::vector<double>& want, double scale) {
    double e = 0;
    for (size_t i : idx) {
        double g = got(i);
        if (!std::isfinite(g)) return INFINITY;
        e = std::max(e, std::fabs(g - want[i]));
    }
    return e / std::max(scale, 1e-30);
}

static unsigned blocks(size_t warps) { return (unsigned)std::max<size_t>(1, (warps * 32 + 127) / 128); }

static void run(const Shape& s) {
    const int B = s.B, T = s.T, NH = s.NH, KVH = s.KVH, D = s.D, W = (NH + 2 * KVH) * D, C = NH * D;
    Array<floatX> qkv((size_t)B * T * W), out((size_t)B * T * C), dout((size_t)B * T * C), dqkv((size_t)B * T * W),
        dec(C);
    Array<float> lse((size_t)B * NH * T);
    for (size_t i = 0; i < qkv.n; i++) qkv.p[i] = to_x(uni());
    for (size_t i = 0; i < dout.n; i++) dout.p[i] = to_x(uni());
    out.poison(), lse.poison(), dqkv.poison(), dec.poison();
    launch({blocks((size_t)B * NH * T), 1, 1}, 128, 0,
           [&] { attention_forward(out.p, lse.p, qkv.p, B, T, NH, KVH, D, s.window); });
    launch({blocks((size_t)B * NH * T), 1, 1}, 128, 0,
           [&] { attention_backward_dq(dqkv.p, dout.p, qkv.p, out.p, lse.p, B, T, NH, KVH, D, s.window); });
    launch({blocks((size_t)B * KVH * T), 1, 1}, 128, 0,
           [&] { attention_backward_dkv(dqkv.p, dout.p, qkv.p, out.p, lse.p, B, T, NH, KVH, D, s.window); });
    // Decoding the last position of sequence 0 (a causal model's cache).
    if (s.window)
        launch({blocks(NH), 1, 1}, 128, 0, [&] { attention_decode(dec.p, qkv.p, T - 1, NH, KVH, D, s.window); });

    const double scale = 1 / std::sqrt((double)D);
    std::vector<double> o_ref(out.n), lse_ref(lse.n), dqkv_ref(dqkv.n, 0.0);
    auto x = [&](int b, int t, int col) { return qkv.at(((size_t)b * T + t) * W + col); };
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            const int g = h / (NH / KVH), qc = h * D, kc = (NH + g) * D, vc = (NH + KVH + g) * D;
            std::vector<double> P((size_t)T * T, 0.0);
            for (int i = 0; i < T; i++) {
                const int first = s.window ? std::max(0, i + 1 - s.window) : 0, seen = s.window ? i + 1 : T;
                std::vector<double> S(seen);
                double m = -INFINITY, l = 0;
                for (int j = first; j < seen; j++) {
                    double d = 0;
                    for (int c = 0; c < D; c++) d += x(b, i, qc + c) * x(b, j, kc + c);
                    S[j] = d * scale, m = std::max(m, S[j]);
                }
                for (int j = first; j < seen; j++) l += std::exp(S[j] - m);
                lse_ref[((size_t)b * NH + h) * T + i] = m + std::log(l);
                for (int j = first; j < seen; j++) P[(size_t)i * T + j] = std::exp(S[j] - m) / l;
                for (int c = 0; c < D; c++) {
                    double acc = 0;
                    for (int j = first; j < seen; j++) acc += P[(size_t)i * T + j] * x(b, j, vc + c);
                    o_ref[((size_t)b * T + i) * C + qc + c] = acc;
                }
            }
            for (int i = 0; i < T; i++) {
                const size_t oi = ((size_t)b * T + i) * C + qc;
                double Di = 0;
                for (int c = 0; c < D; c++) Di += dout.at(oi + c) * o_ref[oi + c];
                for (int j = 0; j < T; j++) {
                    const double p = P[(size_t)i * T + j];
                    if (p == 0) continue;
                    double dp = 0;
                    for (int c = 0; c < D; c++) dp += dout.at(oi + c) * x(b, j, vc + c);
                    const double ds = p * (dp - Di);
                    for (int c = 0; c < D; c++) {
                        dqkv_ref[((size_t)b * T + i) * W + qc + c] += scale * ds * x(b, j, kc + c);
                        dqkv_ref[((size_t)b * T + j) * W + kc + c] += scale * ds * x(b, i, qc + c);
                        dqkv_ref[((size_t)b * T + j) * W + vc + c] += p * dout.at(oi + c);
                    }
                }
            }
        }
    auto all = [](size_t n) {
        std::vector<size_t> v(n);
        for (size_t i = 0; i < n; i++) v[i] = i;
        return v;
    };
    auto maxabs = [](const std::vector<double>& v) {
        double m = 0;
        for (double x : v) m = std::max(m, std::fabs(x));
        return m;
    };
    report("O", s, err_over(all(out.n), [&](size_t i) { return out.at(i); }, o_ref, maxabs(o_ref)));
    report("lse", s, err_over(all(lse.n), [&](size_t i) { return lse.at(i); }, lse_ref, maxabs(lse_ref)));
    const int parts[4] = {0, C, C + KVH * D, W};
    const char* names[3] = {"dQ", "dK", "dV"};
    for (int part = 0; part < 3; part++) {
        std::vector<size_t> idx;
        for (size_t r = 0; r < (size_t)B * T; r++)
            for (int c = parts[part]; c < parts[part + 1]; c++) idx.push_back(r * W + c);
        report(names[part], s, err_over(idx, [&](size_t i) { return dqkv.at(i); }, dqkv_ref, maxabs(dqkv_ref)));
    }
    if (s.window) {
        std::vector<double> want(o_ref.begin() + (size_t)(T - 1) * C, o_ref.begin() + (size_t)T * C);
        report("decode", s, err_over(all(C), [&](size_t i) { return dec.at(i); }, want, maxabs(want)));
    }
}

int main() {
    int cases = 0;
    for (int D : {16, 32, 64, 96, 128})
        for (int T : {1, 17, 40})
            // Not causal, causal, and a sliding window of a third of the sequence and 1 more (when shorter).
            for (int window : {0, T, T / 3 + 1 < T ? T / 3 + 1 : -1})
                for (int kvh : {4, 2, 1}) {
                    if (window < 0) continue;
                    run({2, T, 4, kvh, D, window});
                    cases++;
                }
    for (auto& [what, e] : worst) std::printf("largest error %-6s %.2e\n", what.c_str(), e);
    std::printf("%d cases, %d failures\n", cases, failures);
    return failures != 0;
}
