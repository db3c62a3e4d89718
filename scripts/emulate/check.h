// What the tests of the normalisation, rotary, SwiGLU, embedding and the step's other kernels share: random inputs,
// the engine's launch shapes, the normwise error against a double-precision reference, and the count of failed
// checks. Include it after the kernel file, which defines floatX, to_x and to_f32.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

inline int g_failures = 0;
inline std::mt19937 g_rng(3);

// n values drawn uniformly from (−scale, scale), rounded to floatX.
inline std::vector<floatX> random_x(size_t n, float scale = 1) {
    std::vector<floatX> v(n);
    for (auto& x : v) x = to_x(std::uniform_real_distribution<float>(-scale, scale)(g_rng));
    return v;
}

// n copies of NaN (all bits set, in fp32 and in bf16), so that anything a kernel leaves unwritten shows.
template <typename T>
std::vector<T> poisoned(size_t n) {
    std::vector<T> v(n);
    std::memset(static_cast<void*>(v.data()), 0xff, n * sizeof(T));
    return v;
}

// The launch shapes of crates/kiln-cuda/src/backend.rs: `grid(n, block)` gives n threads in blocks of `block`
// (at least one block); `elementwise(n)` one thread per 8 elements in blocks of 256.
inline unsigned grid_blocks(size_t n, unsigned block) { return (unsigned)std::max<size_t>(1, (n + block - 1) / block); }
inline unsigned elementwise_blocks(size_t n) { return grid_blocks((n + 7) / 8, 256); }

// max |got − want| / max |want|, as the self-test measures, or relative to `least_scale` where that is larger;
// infinite when anything got is not finite.
template <typename G>
double error(const std::vector<G>& got, const std::vector<double>& want, double least_scale = 1e-30) {
    double e = 0, scale = least_scale;
    for (size_t i = 0; i < want.size(); i++) {
        const double g = to_f32(got[i]);
        if (!std::isfinite(g)) return INFINITY;
        e = std::max(e, std::fabs(g - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
    }
    return e / scale;
}

// One check of `what` in case `where`: failed ones are counted and printed, passed ones too when VERBOSE is set.
inline void expect(bool ok, const std::string& what, const std::string& where, const std::string& detail = "") {
    if (!ok) g_failures++;
    if (!ok || std::getenv("VERBOSE"))
        std::printf("%s %-22s %s%s\n", ok ? "ok  " : "FAIL", what.c_str(), where.c_str(), detail.c_str());
}

// A result within the emulation's tolerance for this precision (EMU_TOL) of the reference.
inline void check(const std::string& what, const std::string& where, double err) {
    char detail[32];
    std::snprintf(detail, sizeof detail, ": error %.2e", err);
    expect(err <= EMU_TOL, what, where, detail);
}

// The last line, and the exit status.
inline int finish(const char* test) {
    std::printf("%s (%s): %s\n", test, sizeof(floatX) == 2 ? "bf16" : "fp32", g_failures ? "FAILED" : "all passed");
    return g_failures ? 1 : 0;
}
