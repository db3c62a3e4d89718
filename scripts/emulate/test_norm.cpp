// Runs kernels/layernorm.cu and kernels/rmsnorm.cu under the emulation against a double-precision reference: each
// normalisation's forward, plain and after a residual add, and its backward with the blockwise sums of dweight (and
// dbias) — RMS normalisation's on layernorm.cu's kernels with a null mean and dbias —, without and with the column sums
// of dinp (a projection's bias gradient), for widths that are and are not whole 16-byte chunks and for ε = 1e-5 and
// 0.25. Launched as the engine launches them (crates/kiln-cuda/src/backend.rs, norm_forward and norm_backward). Also
// QK-norm (rmsnorm.cu's qk_norm_forward and qk_norm_backward, then reduce.cu's column_sums), as qk_norm_forward and
// qk_norm_backward launch them. Built twice, with and without KILN_BF16.
#include "emu.h"
#define __shared__ static  // one block at a time: a function's statics are its block's shared memory
#include "norm_all.inc"

#include "check.h"

enum class Kind { Layer, Rms };

// What a normalisation's forward pass should give, in double precision.
struct Forward {
    std::vector<double> out, mean, rstd;
};

// Layer normalisation of the rows of `x` (N × C, as stored), or RMS normalisation (μ = 0, no bias).
static Forward reference_forward(Kind kind, const std::vector<double>& x, const std::vector<floatX>& w,
                                 const std::vector<floatX>& bias, int N, int C, double eps) {
    Forward f{std::vector<double>((size_t)N * C), std::vector<double>(N), std::vector<double>(N)};
    for (int n = 0; n < N; n++) {
        const double* row = &x[(size_t)n * C];
        double mu = 0, var = 0;
        if (kind == Kind::Layer)
            for (int c = 0; c < C; c++) mu += row[c] / C;
        for (int c = 0; c < C; c++) var += (row[c] - mu) * (row[c] - mu) / C;
        const double rs = 1 / std::sqrt(var + eps);
        f.mean[n] = mu, f.rstd[n] = rs;
        for (int c = 0; c < C; c++)
            f.out[(size_t)n * C + c] = (row[c] - mu) * rs * to_f32(w[c]) + (kind == Kind::Layer ? to_f32(bias[c]) : 0);
    }
    return f;
}

// As norm_forward launches them: a warp per row, blocks of 256 threads. With `residual`, residual = inp + other is
// written first and normalised.
static void launch_forward(Kind kind, floatX* residual, floatX* out, float* mean, float* rstd, const floatX* inp,
                           const floatX* other, const floatX* w, const floatX* b, int N, int C, float eps) {
    launch({grid_blocks((size_t)N * 32, 256), 1, 1}, 256, 0, [&] {
        if (kind == Kind::Layer && residual)
            residual_layernorm_forward(residual, out, mean, rstd, inp, other, w, b, N, C, eps);
        else if (kind == Kind::Layer)
            layernorm_forward(out, mean, rstd, inp, w, b, N, C, eps);
        else if (residual)
            residual_rmsnorm_forward(residual, out, rstd, inp, other, w, N, C, eps);
        else
            rmsnorm_forward(out, rstd, inp, w, N, C, eps);
    });
}

// As norm_backward launches them: 32 rows a block, as many warps (up to 4) as have shared memory in 48 KiB, then the
// sum of the blocks' partial dweight, dbias and (when dinp_sums is given) dinp. `mean` and `dbias` are null for RMS
// normalisation.
static void launch_backward(floatX* dinp, float* dweight, float* dbias, float* dinp_sums, const floatX* dout,
                            const floatX* inp, const floatX* w, const float* mean, const float* rstd, int N, int C) {
    const int sums = dinp_sums ? 3 : 2, rows_per_block = 32, warp_bytes = sums * ((C + 7) / 8 * 8) * 4;
    const int warps = std::clamp(48 * 1024 / warp_bytes, 1, 4), blocks = (N + rows_per_block - 1) / rows_per_block;
    std::vector<float> partials = poisoned<float>((size_t)blocks * sums * C);
    launch({(unsigned)blocks, 1, 1}, warps * 32, (size_t)warps * warp_bytes, [&] {
        layernorm_backward(dinp, partials.data(), dout, inp, w, mean, rstd, N, C, rows_per_block, dinp_sums != nullptr);
    });
    launch({grid_blocks(sums * C, COLUMN_SUM_LANES), 1, 1}, COLUMN_SUM_LANES * COLUMN_SUM_ROWS, 0,
           [&] { layernorm_backward_sum(dweight, dbias, dinp_sums, partials.data(), blocks, C); });
}

static std::vector<double> as_double(const std::vector<floatX>& v) {
    std::vector<double> d(v.size());
    for (size_t i = 0; i < v.size(); i++) d[i] = to_f32(v[i]);
    return d;
}

static void run(Kind kind, int N, int C, float eps) {
    const bool layer = kind == Kind::Layer;
    char where[64];
    std::snprintf(where, sizeof where, "%s N%d C%d eps%g", layer ? "layer" : "rms", N, C, eps);
    const size_t n = (size_t)N * C;
    auto a = random_x(n), b = random_x(n), w = random_x(C), bias = layer ? random_x(C) : std::vector<floatX>();
    auto dout = random_x(n), dinp = random_x(n);
    auto mean = poisoned<float>(N), rstd = poisoned<float>(N);
    auto stats_error = [&](const Forward& want) {
        if (layer) check("mean", where, error(mean, want.mean));
        check("rstd", where, error(rstd, want.rstd));
    };

    // Plain: out = norm(a).
    auto out = poisoned<floatX>(n);
    launch_forward(kind, nullptr, out.data(), layer ? mean.data() : nullptr, rstd.data(), a.data(), nullptr,
                   w.data(), layer ? bias.data() : nullptr, N, C, eps);
    Forward want = reference_forward(kind, as_double(a), w, bias, N, C, eps);
    check("forward", where, error(out, want.out));
    stats_error(want);

    // Fused: residual = a + b, out = norm(residual), and the backward pass from the residual as stored.
    auto residual = poisoned<floatX>(n);
    out = poisoned<floatX>(n), mean = poisoned<float>(N), rstd = poisoned<float>(N);
    launch_forward(kind, residual.data(), out.data(), layer ? mean.data() : nullptr, rstd.data(), a.data(), b.data(),
                   w.data(), layer ? bias.data() : nullptr, N, C, eps);
    std::vector<double> want_res(n);
    for (size_t i = 0; i < n; i++) want_res[i] = to_f32(to_x(to_f32(a[i]) + to_f32(b[i])));
    want = reference_forward(kind, want_res, w, bias, N, C, eps);
    check("residual", where, error(residual, want_res));
    check("residual forward", where, error(out, want.out));
    stats_error(want);

    // dinp, dweight and dbias accumulate: they start from values of their own.
    std::vector<float> dw(C, 0.5f), db(layer ? C : 0, -0.25f);
    std::vector<double> want_dinp = as_double(dinp), want_dw(C, 0.5), want_db(C, -0.25);
    for (int r = 0; r < N; r++) {
        // With g = dy·w and the normalised row x̂: dx += σ⁻¹·(g − mean(g) − x̂·mean(g·x̂)), no mean(g) for RMS.
        double g_mean = 0, gx_mean = 0;
        const double mu = want.mean[r], rs = want.rstd[r];
        for (int c = 0; c < C; c++) {
            const size_t i = (size_t)r * C + c;
            const double xhat = (want_res[i] - mu) * rs, dy = to_f32(dout[i]), g = dy * to_f32(w[c]);
            g_mean += layer ? g / C : 0, gx_mean += g * xhat / C;
            want_dw[c] += dy * xhat, want_db[c] += dy;
        }
        for (int c = 0; c < C; c++) {
            const size_t i = (size_t)r * C + c;
            const double xhat = (want_res[i] - mu) * rs, g = to_f32(dout[i]) * to_f32(w[c]);
            want_dinp[i] += rs * (g - g_mean - xhat * gx_mean);
        }
    }
    // Once as it is, once also summing dinp's columns, from the same starting values.
    auto dinp_summed = dinp;
    std::vector<float> dw_summed = dw, db_summed = db, dinp_sums = poisoned<float>(C);
    launch_backward(dinp.data(), dw.data(), layer ? db.data() : nullptr, nullptr, dout.data(), residual.data(),
                    w.data(), layer ? mean.data() : nullptr, rstd.data(), N, C);
    launch_backward(dinp_summed.data(), dw_summed.data(), layer ? db_summed.data() : nullptr, dinp_sums.data(),
                    dout.data(), residual.data(), w.data(), layer ? mean.data() : nullptr, rstd.data(), N, C);
    check("dinp", where, error(dinp, want_dinp));
    check("dweight", where, error(dw, want_dw));
    if (layer) check("dbias", where, error(db, want_db));
    // Summing changes nothing else, and sums the values stored.
    check("dinp (summed)", where, error(dinp_summed, as_double(dinp)));
    check("dweight (summed)", where, error(dw_summed, std::vector<double>(dw.begin(), dw.end())));
    if (layer) check("dbias (summed)", where, error(db_summed, std::vector<double>(db.begin(), db.end())));
    std::vector<double> want_sums(C, 0.0);
    for (size_t i = 0; i < n; i++) want_sums[i % C] += to_f32(dinp_summed[i]);
    check("dinp's column sums", where, error(dinp_sums, want_sums));
}

// QK-norm of `rows` packed qkv rows of heads + 2·kv_heads heads of head_dim: the query and key heads normalised with
// the two halves of w, the value heads copied; then its backward in place, dweight accumulating from 0.5.
static void run_qk(int rows, int heads, int kv_heads, int head_dim, float eps) {
    char where[80];
    std::snprintf(where, sizeof where, "qk rows%d H%d/%dkv D%d eps%g", rows, heads, kv_heads, head_dim, eps);
    const int all = heads + 2 * kv_heads, normed = heads + kv_heads;
    const size_t n = (size_t)rows * all * head_dim;
    auto inp = random_x(n), w = random_x(2 * head_dim), dqkv = random_x(n), out = poisoned<floatX>(n);
    auto rstd = poisoned<float>((size_t)rows * normed);
    launch({grid_blocks(n * 32 / head_dim, 256), 1, 1}, 256, 0, [&] {
        qk_norm_forward(out.data(), rstd.data(), inp.data(), w.data(), rows, heads, kv_heads, head_dim, eps);
    });
    std::vector<double> want_out(n), want_rstd((size_t)rows * normed), want_dqkv = as_double(dqkv);
    std::vector<double> want_dw(2 * head_dim, 0.5);
    for (size_t h = 0; h < (size_t)rows * all; h++) {
        const size_t o = h * head_dim;
        const int head = h % all, half = head < heads ? 0 : head_dim;
        if (head >= normed) {
            for (int c = 0; c < head_dim; c++) want_out[o + c] = to_f32(inp[o + c]);
            continue;
        }
        double ss = 0, gn = 0;
        for (int c = 0; c < head_dim; c++) ss += (double)to_f32(inp[o + c]) * to_f32(inp[o + c]) / head_dim;
        const double r = 1 / std::sqrt(ss + eps);
        want_rstd[h / all * normed + head] = r;
        for (int c = 0; c < head_dim; c++) {
            const double x = to_f32(inp[o + c]) * r, dy = to_f32(dqkv[o + c]), wc = to_f32(w[half + c]);
            want_out[o + c] = x * wc;
            gn += dy * wc * x / head_dim;
            want_dw[half + c] += dy * x;
        }
        for (int c = 0; c < head_dim; c++) {
            const double x = to_f32(inp[o + c]) * r, g = to_f32(dqkv[o + c]) * to_f32(w[half + c]);
            want_dqkv[o + c] = r * (g - x * gn);
        }
    }
    check("qk forward", where, error(out, want_out));
    check("qk rstd", where, error(rstd, want_rstd));
    // As qk_norm_backward launches them: 8 warps, 32 rows a block, then the blocks' partial sums in order.
    const int warps = 8, rows_per_block = 32, padded = (head_dim + 7) / 8 * 8;
    const int blocks = (rows + rows_per_block - 1) / rows_per_block;
    std::vector<float> partials = poisoned<float>((size_t)blocks * 2 * head_dim), dw(2 * head_dim, 0.5f);
    launch({(unsigned)blocks, 1, 1}, warps * 32, (size_t)warps * 2 * padded * 4, [&] {
        qk_norm_backward(dqkv.data(), partials.data(), inp.data(), w.data(), rstd.data(), rows, heads, kv_heads,
                         head_dim, rows_per_block);
    });
    launch({grid_blocks(2 * head_dim, COLUMN_SUM_LANES), 1, 1}, COLUMN_SUM_LANES * COLUMN_SUM_ROWS, 0,
           [&] { column_sums(dw.data(), partials.data(), blocks, 2 * head_dim); });
    check("qk dinp", where, error(dqkv, want_dqkv));
    check("qk dweight", where, error(dw, want_dw));
}

int main() {
    emu_schedule_from_env();
    // GPT-2's and Llama's ε on the larger problems, a large one (which a kernel ignoring ε would fail) on the smaller.
    for (Kind kind : {Kind::Layer, Kind::Rms})
        for (int N : {1, 37, 100, 1030})
            for (int C : {3, 20, 48, 770}) run(kind, N, C, N < 64 ? 0.25f : 1e-5f);
    // Wider than 48 KiB of shared memory holds for one warp's three sums (the engine allows the kernel more).
    for (Kind kind : {Kind::Layer, Kind::Rms}) run(kind, 37, 4100, 1e-5f);
    // Heads of whole chunks and not (12), Qwen3's 128, several blocks of rows; grouped-query attention.
    for (int rows : {1, 37, 70})
        for (int head_dim : {12, 64, 128}) {
            run_qk(rows, 3, 3, head_dim, rows < 64 ? 0.25f : 1e-6f);
            run_qk(rows, 4, 2, head_dim, 1e-6f);
        }
    return finish("norm");
}
