// Runs kernels/rope.cu under the emulation against a double-precision reference: the rotation of the query and key
// heads of a packed qkv activation (values untouched) and its inverse, the backward pass, for sequences that start
// past position 0 (a decoded token's rows), grouped-query attention, and head dimensions of odd and even halves.
// The table holds more positions than the rows need, so that reading sin θ from the wrong place shows. Launched as
// the engine launches it (crates/kiln-cuda/src/backend.rs, rope). Built twice, with and without KILN_BF16.
#include "emu.h"
#include "rope_all.inc"

#include "check.h"

struct Shape {
    int B, T, first_pos, heads, kv_heads, head_dim;
};

// As backend.rs's rope launches it: a thread per rotated pair, blocks of 256 threads.
static void launch_rope(std::vector<floatX>& qkv, const std::vector<float>& table, const Shape& s, bool inverse) {
    const long rows = (long)s.B * s.T;
    const int positions = (int)(table.size() / s.head_dim);
    const size_t pairs = (size_t)rows * (s.heads + s.kv_heads) * s.head_dim / 2;
    launch({grid_blocks(pairs, 256), 1, 1}, 256, 0, [&] {
        rope(qkv.data(), table.data(), rows, s.T, s.first_pos, positions, s.heads, s.kv_heads, s.head_dim,
             inverse ? -1.0f : 1.0f);
    });
}

// `qkv` with its query and key heads rotated by θ (by −θ when `inverse`), in double precision.
static std::vector<double> reference(const std::vector<floatX>& qkv, const std::vector<float>& table, const Shape& s,
                                     bool inverse) {
    const int half = s.head_dim / 2, width = (s.heads + 2 * s.kv_heads) * s.head_dim;
    const size_t sin_at = table.size() / 2;
    std::vector<double> x(qkv.size());
    for (size_t i = 0; i < qkv.size(); i++) x[i] = to_f32(qkv[i]);
    for (int row = 0; row < s.B * s.T; row++) {
        const int p = s.first_pos + row % s.T;
        for (int head = 0; head < s.heads + s.kv_heads; head++) {
            double* h = &x[(size_t)row * width + (size_t)head * s.head_dim];
            for (int i = 0; i < half; i++) {
                const double cos = table[(size_t)p * half + i], sin = table[sin_at + (size_t)p * half + i];
                const double sign = inverse ? -1 : 1, x1 = h[i], x2 = h[i + half];
                h[i] = x1 * cos - x2 * sign * sin;
                h[i + half] = x2 * cos + x1 * sign * sin;
            }
        }
    }
    return x;
}

static void run(const Shape& s) {
    char where[80];
    std::snprintf(where, sizeof where, "B%d T%d from %d, heads %d/%d, D%d", s.B, s.T, s.first_pos, s.heads,
                  s.kv_heads, s.head_dim);
    // The model's table: cos θ for every (position, pair), then sin θ, with θ = p·10000^(−2i/D), two spare positions.
    const int half = s.head_dim / 2, positions = s.first_pos + s.T + 2;
    std::vector<float> table((size_t)positions * s.head_dim);
    for (int p = 0; p < positions; p++)
        for (int i = 0; i < half; i++) {
            const double theta = p * std::pow(10000.0, -2.0 * i / s.head_dim);
            table[(size_t)p * half + i] = (float)std::cos(theta);
            table[((size_t)positions + p) * half + i] = (float)std::sin(theta);
        }
    auto qkv = random_x((size_t)s.B * s.T * (s.heads + 2 * s.kv_heads) * s.head_dim);
    const std::vector<double> want = reference(qkv, table, s, false);
    launch_rope(qkv, table, s, false);
    check("rope", where, error(qkv, want));
    // The inverse of what the forward wrote (in bf16, the rounded rotation is not exactly invertible).
    const std::vector<double> want_inverse = reference(qkv, table, s, true);
    launch_rope(qkv, table, s, true);
    check("rope inverse", where, error(qkv, want_inverse));
}

int main() {
    emu_schedule_from_env();
    for (int head_dim : {2, 12, 64})
        for (Shape s : {Shape{1, 1, 0, 1, 1, 0}, Shape{2, 5, 3, 4, 2, 0}, Shape{3, 17, 100, 4, 1, 0},
                        Shape{1, 33, 7, 6, 6, 0}}) {
            s.head_dim = head_dim;
            run(s);
        }
    return finish("rope");
}
