// Runs kernels/swiglu.cu under the emulation against a double-precision reference: the forward and the backward
// (which overwrites dinp) for widths F that are and are not whole 16-byte chunks (with F odd, every other row starts
// off a chunk's alignment), launched as the engine launches them (crates/kiln-cuda/src/backend.rs, swiglu_forward
// and swiglu_backward). Built twice, with and without KILN_BF16.
#include "emu.h"
#include "swiglu_all.inc"

#include "check.h"

static void run(int rows, int F) {
    char where[32];
    std::snprintf(where, sizeof where, "rows %d F%d", rows, F);
    const size_t n = (size_t)rows * F;
    // Gates from −6 to 6: σ from near 0 to near 1.
    auto inp = random_x(2 * n, 6), dout = random_x(n);
    auto out = poisoned<floatX>(n), dinp = poisoned<floatX>(2 * n);
    launch({elementwise_blocks(n), 1, 1}, 256, 0, [&] { swiglu_forward(out.data(), inp.data(), (long)rows, F); });
    launch({elementwise_blocks(n), 1, 1}, 256, 0,
           [&] { swiglu_backward(dinp.data(), dout.data(), inp.data(), (long)rows, F); });

    std::vector<double> want_out(n), want_dinp(2 * n);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < F; c++) {
            const size_t gate = (size_t)r * 2 * F + c, up = gate + F, o = (size_t)r * F + c;
            const double x = to_f32(inp[gate]), u = to_f32(inp[up]), dy = to_f32(dout[o]);
            const double sigma = 1 / (1 + std::exp(-x)), silu = x * sigma;
            want_out[o] = silu * u;
            // d silu / dx = σ + x·σ·(1 − σ).
            want_dinp[gate] = dy * u * (sigma + x * sigma * (1 - sigma));
            want_dinp[up] = dy * silu;
        }
    check("swiglu forward", where, error(out, want_out));
    check("swiglu backward", where, error(dinp, want_dinp));
}

int main() {
    emu_schedule_from_env();
    for (int rows : {1, 3, 40})
        for (int F : {1, 3, 13, 64, 100, 1000}) run(rows, F);
    return finish("swiglu");
}
