// Runs the training step's kernels that are not a layer's under the emulation against a double-precision reference: the
// sums (kernels/reduce.cu: a vector's sum and sum of squares, from fp32 and from the working precision), AdamW
// (kernels/adamw.cu, on an fp32 master copy in bf16 and on the parameters themselves in fp32), the classifier's fused
// softmax cross-entropy and its gradient (kernels/classifier.cu, with padded columns and an ignored row), a matrix's
// column sums (reduce.cu), GELU and its derivative (kernels/gelu.cu) and the fp32 add (kernels/add.cu), for lengths
// that are and are not whole 16-byte chunks. Launched as the engine launches them (crates/kiln-cuda/src/backend.rs:
// reduce, adamw, classifier, gelu_forward, matmul_backward, attention_backward, add). Built twice, with and without
// KILN_BF16.
#include "emu.h"
#define __shared__ static  // one block at a time: a function's statics are its block's shared memory
#include "step_all.inc"

#include "check.h"

// REDUCE_BLOCKS of crates/kiln-cuda/src/memory.rs: the blocks of partial sums, 512 threads each.
static const unsigned REDUCE_BLOCKS = 256;

static std::vector<float> random_f32(size_t n, float scale = 1) {
    std::vector<float> v(n);
    for (auto& x : v) x = std::uniform_real_distribution<float>(-scale, scale)(g_rng);
    return v;
}

// |got − want| over the sum of the magnitudes summed: a sum that cancels is judged by what it added up.
static double sum_error(float got, double want, double magnitude) {
    return std::isfinite(got) ? std::fabs(got - want) / std::max(magnitude, 1e-30) : INFINITY;
}

// The sum (or with `squares` the sum of squares) of x, as CudaBackend::reduce computes it.
template <typename T>
static float reduce(const std::vector<T>& x, int squares) {
    auto partials = poisoned<float>(REDUCE_BLOCKS), total = poisoned<float>(1);
    launch({REDUCE_BLOCKS, 1, 1}, 512, 0, [&] {
        if constexpr (std::is_same_v<T, float>)
            reduce_partials(partials.data(), x.data(), (long)x.size(), squares);
        else
            reduce_partials_x(partials.data(), x.data(), (long)x.size(), squares);
    });
    launch({1, 1, 1}, 256, 0, [&] { reduce_final(total.data(), partials.data(), (int)REDUCE_BLOCKS); });
    return total[0];
}

template <typename T>
static void check_sums(const char* what, const std::vector<T>& x) {
    const std::string where = "n " + std::to_string(x.size());
    for (int squares : {0, 1}) {
        double want = 0, magnitude = 0;
        for (const T& v : x) {
            const double d = to_f32(v);
            want += squares ? d * d : d;
            magnitude += squares ? d * d : std::fabs(d);
        }
        check(std::string(what) + (squares ? " squares" : " sum"), where, sum_error(reduce(x, squares), want, magnitude));
    }
}

static void run_sums(size_t n) {
    check_sums("reduce fp32", random_f32(n));
    check_sums("reduce x", random_x(n));
}

// One AdamW step on n parameters, as CudaBackend::adamw launches it: on an fp32 master copy where the build is
// bf16, on the parameters themselves in fp32.
static void run_adamw(size_t n, bool clipped) {
    const std::string where = "n " + std::to_string(n) + (clipped ? " clipped" : "");
    // A gradient norm of 2.5 clipped to 1.25 (a scale of one half), or a norm of 0.5 left as it is.
    const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, wd = 0.1f, clip = 1.25f;
    const float norm = clipped ? 2.5f : 0.5f, grad_scale = clipped ? clip / norm : 1.0f, values[3] = {lr, 7.0f, norm};
    const int t = 7;
    const double bc1 = 1 / (1 - std::pow((double)beta1, t)), bc2 = 1 / (1 - std::pow((double)beta2, t));
    const bool has_master = sizeof(floatX) == 2;
    auto master = random_f32(n), grads = random_f32(n), m = random_f32(n, 0.1f), v = random_f32(n, 0.01f);
    for (auto& x : v) x = std::fabs(x);
    std::vector<floatX> params(n);
    for (size_t i = 0; i < n; i++) params[i] = to_x(master[i]);
    if (!has_master)
        for (size_t i = 0; i < n; i++) master[i] = to_f32(params[i]);
    std::vector<double> want_p(n), want_m(n), want_v(n);
    for (size_t i = 0; i < n; i++) {
        const double g = (double)grads[i] * grad_scale;
        want_m[i] = beta1 * (double)m[i] + (1 - beta1) * g;
        want_v[i] = beta2 * (double)v[i] + (1 - beta2) * g * g;
        const double p = master[i];
        want_p[i] = p - lr * (want_m[i] * bc1 / (std::sqrt(want_v[i] * bc2) + eps) + wd * p);
    }
    float* master_ptr = has_master ? master.data() : nullptr;
    launch({elementwise_blocks(n), 1, 1}, 256, 0, [&] {
        adamw(params.data(), master_ptr, grads.data(), m.data(), v.data(), (long)n, values, beta1, beta2, eps, wd,
              clip);
    });
    check("adamw m", where, error(m, want_m));
    check("adamw v", where, error(v, want_v));
    check("adamw params", where, error(params, want_p));
    if (has_master) check("adamw master", where, error(master, want_p));
}

// The classifier on `rows` rows of V logits padded to Vp, the second row's target ignored, as
// CudaBackend::classifier launches it: a block of 512 threads per row. With dloss, the logits become the gradient.
static void run_classifier(int rows, int V, int Vp, bool write_grad) {
    char where[48];
    std::snprintf(where, sizeof where, "rows %d V %d/%d%s", rows, V, Vp, write_grad ? " grad" : "");
    auto logits = random_x((size_t)rows * Vp, 4);
    std::vector<unsigned> targets(rows);
    for (int r = 0; r < rows; r++) targets[r] = r == 1 ? IGNORE_TARGET : (unsigned)(g_rng() % V);
    // The losses add up: they start from the earlier micro-batches' sums.
    auto losses = random_f32(rows, 1);
    for (auto& l : losses) l = std::fabs(l);
    const float dloss = 1.0f / 37;
    std::vector<double> want_loss(rows), want_grad((size_t)rows * Vp);
    for (int r = 0; r < rows; r++) {
        const floatX* z = &logits[(size_t)r * Vp];
        double max = -INFINITY, sum = 0;
        for (int i = 0; i < V; i++) max = std::max(max, (double)to_f32(z[i]));
        for (int i = 0; i < V; i++) sum += std::exp(to_f32(z[i]) - max);
        const double lse = max + std::log(sum);
        const bool ignored = targets[r] == IGNORE_TARGET;
        want_loss[r] = losses[r] + (ignored ? 0 : lse - to_f32(z[targets[r]]));
        for (int i = 0; i < V && !ignored; i++)
            want_grad[(size_t)r * Vp + i] = (std::exp(to_f32(z[i]) - lse) - (i == (int)targets[r])) * dloss;
    }
    launch({(unsigned)rows, 1, 1}, 512, 0, [&] {
        classifier(logits.data(), losses.data(), targets.data(), V, Vp, write_grad ? &dloss : nullptr);
    });
    check("classifier loss", where, error(losses, want_loss));
    if (write_grad) check("classifier gradient", where, error(logits, want_grad));
}

static double gelu_reference(double x) {
    return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
}

// gelu_forward and gelu_backward, as CudaBackend launches them (elementwise), against GELU and its derivative by
// central differences of the reference.
static void run_gelu(size_t n) {
    const std::string where = "n " + std::to_string(n);
    auto pre = random_x(n, 5), d = random_x(n);
    auto out = poisoned<floatX>(n);
    std::vector<double> want_out(n), want_d(n);
    // gelu' lies between −0.13 and 1.13: the backward is judged against the gradient it scales, which a single
    // element where gelu' is near zero would otherwise leave no size to be judged by.
    double incoming = 0;
    for (size_t i = 0; i < n; i++) incoming = std::max(incoming, (double)std::fabs(to_f32(d[i])));
    for (size_t i = 0; i < n; i++) {
        const double x = to_f32(pre[i]), h = 1e-5;
        want_out[i] = gelu_reference(x);
        want_d[i] = to_f32(d[i]) * (gelu_reference(x + h) - gelu_reference(x - h)) / (2 * h);
    }
    launch({elementwise_blocks(n), 1, 1}, 256, 0, [&] { gelu_forward(out.data(), pre.data(), (long)n); });
    launch({elementwise_blocks(n), 1, 1}, 256, 0, [&] { gelu_backward(d.data(), pre.data(), (long)n); });
    check("gelu forward", where, error(out, want_out));
    check("gelu backward", where, error(d, want_d, incoming));
}

// column_sums and column_sums_x, as the engine launches them (one block of 32 × 16 threads per 32 columns): sums +=
// the column sums of a (rows × C) matrix of fp32 or of the working precision.
template <typename T>
static void run_column_sums(int rows, int C) {
    std::vector<T> m((size_t)rows * C);
    for (auto& x : m) {
        const float v = std::uniform_real_distribution<float>(-1, 1)(g_rng);
        if constexpr (std::is_same_v<T, float>) x = v;
        else x = to_x(v);
    }
    auto sums = random_f32(C);
    std::vector<double> want(sums.begin(), sums.end());
    for (size_t i = 0; i < m.size(); i++) want[i % C] += to_f32(m[i]);
    launch({grid_blocks(C, COLUMN_SUM_LANES), 1, 1}, COLUMN_SUM_LANES * COLUMN_SUM_ROWS, 0, [&] {
        if constexpr (std::is_same_v<T, float>) column_sums(sums.data(), m.data(), rows, C);
        else column_sums_x(sums.data(), m.data(), rows, C);
    });
    const char* name = std::is_same_v<T, float> ? "column_sums" : "column_sums_x";
    check(name, std::to_string(rows) + " × " + std::to_string(C), error(sums, want));
}

// add_f32, as CudaBackend::add launches it: a thread per element in blocks of 256.
static void run_add(size_t n) {
    auto dst = random_f32(n), src = random_f32(n);
    std::vector<double> want(n);
    for (size_t i = 0; i < n; i++) want[i] = (double)dst[i] + src[i];
    launch({grid_blocks(n, 256), 1, 1}, 256, 0, [&] { add_f32(dst.data(), src.data(), (long)n); });
    check("add_f32", "n " + std::to_string(n), error(dst, want));
}

int main() {
    emu_schedule_from_env();
    for (size_t n : {1, 7, 4099, 300001}) run_sums(n);
    for (size_t n : {1, 5, 1003})
        for (bool clipped : {false, true}) run_adamw(n, clipped);
    for (bool write_grad : {false, true})
        for (auto [V, Vp] : {std::pair{5, 5}, {7, 64}, {1000, 1024}}) run_classifier(3, V, Vp, write_grad);
    for (size_t n : {1, 9, 1000}) run_gelu(n);
    for (auto [rows, C] : {std::pair{1, 1}, {37, 43}, {1030, 70}}) {
        run_column_sums<float>(rows, C);
        run_column_sums<floatX>(rows, C);
    }
    for (size_t n : {1, 300}) run_add(n);
    return finish("step");
}
