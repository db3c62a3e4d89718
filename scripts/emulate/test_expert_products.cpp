// Runs kernels/expert_products.cu under the emulation against a double-precision reference, launched as
// crates/kiln-cuda/src/backend.rs launches them: the forward, the input gradient (both overwrite every row of a run
// and nothing else) and the weight gradient (added to what dW held), over dispatches with empty experts, runs of one
// row, runs longer than a tile, runs that make the grid's worst case exact, forty experts and no rows at all;
// widths that are multiples of 8, of the tiles or not, and depths of one to seven stages. The products take bf16
// and sum in fp32: the bf16 outputs are judged at 1e-2 (their rounding), dW at 1e-5.
#include "emu.h"
#include "mma_emu.h"
#include "expert_products_all.inc"

#include "check.h"

static void fill(Array<__nv_bfloat16>& a) {
    for (size_t i = 0; i < a.n; i++) a.p[i] = __nv_bfloat16(std::uniform_real_distribution<float>(-1, 1)(g_rng));
}

// max |got − want| / max |want| over what `got` holds.
template <typename T>
static double array_error(const Array<T>& got, const std::vector<double>& want) {
    double e = 0, scale = 1e-30;
    for (size_t i = 0; i < want.size(); i++) {
        if (!std::isfinite(got.at(i))) return INFINITY;
        e = std::max(e, std::fabs(got.at(i) - want[i]));
        scale = std::max(scale, std::fabs(want[i]));
    }
    return e / scale;
}

static void expect_within(const char* what, const std::string& where, double err, double tolerance) {
    char detail[32];
    std::snprintf(detail, sizeof detail, ": error %.2e", err);
    expect(err <= tolerance, what, where, detail);
}

// Expert e's run is `runs[e]` rows long; c_in and c_out multiples of 8.
static void run(const std::vector<unsigned>& runs, int c_in, int c_out) {
    const int E = (int)runs.size();
    std::vector<unsigned> bounds{0};
    for (unsigned n : runs) bounds.push_back(bounds.back() + n);
    const long rows = bounds.back();
    std::string where = "C" + std::to_string(c_in) + "→" + std::to_string(c_out) + " runs";
    for (unsigned n : runs) where += " " + std::to_string(n);

    Array<unsigned> offsets(E + 1);
    std::copy(bounds.begin(), bounds.end(), offsets.p);
    Array<__nv_bfloat16> inp(rows * c_in), weight((size_t)E * c_out * c_in), dout(rows * c_out);
    Array<__nv_bfloat16> out(rows * c_out), dinp(rows * c_in);
    Array<float> dweight((size_t)E * c_out * c_in);
    fill(inp), fill(weight), fill(dout);
    out.poison(), dinp.poison();
    std::vector<double> dweight_before(dweight.n);
    for (size_t i = 0; i < dweight.n; i++)
        dweight_before[i] = dweight.p[i] = std::uniform_real_distribution<float>(-1, 1)(g_rng);

    // The engine's grids: a block per tile of every run (the worst case's count) and of the columns.
    const auto tiles = [](long n, int tile) { return (unsigned)((n + tile - 1) / tile); };
    const unsigned row_tiles = tiles(rows, EXPERT_M) + E - 1;
    launch({row_tiles, tiles(c_out, EXPERT_N), 1}, EXPERT_THREADS, EXPERT_SHARED_BYTES, [&] {
        expert_forward_grouped(out.p, inp.p, weight.p, offsets.p, rows, E, c_in, c_out);
    });
    launch({row_tiles, tiles(c_in, EXPERT_N), 1}, EXPERT_THREADS, EXPERT_SHARED_BYTES, [&] {
        expert_backward_input_grouped(dinp.p, dout.p, weight.p, offsets.p, rows, E, c_in, c_out);
    });
    launch({(unsigned)E, tiles(c_in, EXPERT_N), tiles(c_out, EXPERT_M)}, EXPERT_THREADS, EXPERT_SHARED_BYTES, [&] {
        expert_backward_weight_grouped(dweight.p, dout.p, inp.p, offsets.p, rows, c_in, c_out);
    });

    std::vector<double> want_out(out.n), want_dinp(dinp.n), want_dweight = dweight_before;
    for (int e = 0; e < E; e++) {
        const size_t w = (size_t)e * c_out * c_in;
        for (long r = bounds[e]; r < bounds[e + 1]; r++) {
            for (int o = 0; o < c_out; o++) {
                double sum = 0;
                for (int i = 0; i < c_in; i++) sum += inp.at(r * c_in + i) * weight.at(w + (size_t)o * c_in + i);
                want_out[r * c_out + o] = sum;
            }
            for (int i = 0; i < c_in; i++) {
                double sum = 0;
                for (int o = 0; o < c_out; o++) sum += dout.at(r * c_out + o) * weight.at(w + (size_t)o * c_in + i);
                want_dinp[r * c_in + i] = sum;
            }
            for (int o = 0; o < c_out; o++)
                for (int i = 0; i < c_in; i++)
                    want_dweight[w + (size_t)o * c_in + i] += dout.at(r * c_out + o) * inp.at(r * c_in + i);
        }
    }
    expect_within("forward", where, array_error(out, want_out), 1e-2);
    expect_within("input gradient", where, array_error(dinp, want_dinp), 1e-2);
    expect_within("weight gradient", where, array_error(dweight, want_dweight), 1e-5);
}

int main() {
    emu_schedule_from_env();
    // Empty experts first, between and last; a run of one row; runs of one and two tiles and a part.
    run({0, 170, 1, 0, 129, 0}, 72, 40);
    // Three runs one row past a tile: the grid's ceil(rows / 128) + E − 1 blocks are all used.
    run({129, 129, 129}, 16, 8);
    // Depths of five and seven stages, widths past one column tile and less than a row tile.
    run({37, 0, 90}, 136, 200);
    run({5, 300}, 200, 136);
    // Depth and widths whole tiles (two stages exactly, no ragged column tile).
    run({64, 0, 64}, 64, 128);
    // Forty experts, many of them empty, and a dispatch of no rows at all.
    std::vector<unsigned> many(40);
    for (size_t e = 0; e < many.size(); e++) many[e] = e % 3 == 0 ? 0 : (unsigned)(e % 7);
    run(many, 24, 16);
    run({0, 0}, 8, 8);
    return finish("expert products");
}
