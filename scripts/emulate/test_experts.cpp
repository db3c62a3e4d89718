// Runs kernels/experts.cu under the emulation against a double-precision reference, launched as
// crates/kiln-cuda/src/backend.rs launches them: routing (softmax, top-k, normalised or not) and the dispatch (a block
// per expert, with and without the load-balancing gradient, its probability sums and, but for one token, its terms),
// routing's backward, the gather, the combine (weighted, and unweighted and accumulating as the gather's backward) and
// the combine's backward. The choices and the dispatch must equal the reference's exactly; reals are judged normwise.
// Cases: 1 to 300 tokens (more slots and rows than moe_place has threads), 2 to 70 experts (more than a warp's lanes),
// 1 to 8 choices, widths 5 and 48; and NaN logits.
// Built twice, with and without KILN_BF16.
#define __shared__ static  // one block at a time: a function's statics are its block's shared memory
#include "emu.h"
#include "experts_all.inc"

#include "check.h"

static unsigned warp_blocks(size_t n) { return grid_blocks(n * 32, 256); }

static void run(int rows, int E, int k, bool normalize, bool balance, int width) {
    char where[64];
    std::snprintf(where, sizeof where, "rows %d E%d k%d%s%s C%d", rows, E, k, normalize ? " normalised" : "",
                  balance ? " balanced" : "", width);
    const size_t dense = (size_t)rows * E, slots = (size_t)rows * k;
    // Logits from −4 to 4; in bf16 some tie, which both sides give to the lower expert.
    const auto logits = random_x(dense, 4);
    auto probs = poisoned<float>(dense), weights = poisoned<float>(slots);
    auto chosen = poisoned<unsigned>(slots), order = poisoned<unsigned>(slots), place = poisoned<unsigned>(slots);
    auto offsets = poisoned<unsigned>(E + 1);
    std::vector<float> gradient(E), sums(E), terms(E), dloss{0.37f};
    for (auto* v : {&gradient, &sums, &terms})
        for (auto& x : *v) x = std::uniform_real_distribution<float>(-1, 1)(g_rng);
    const std::vector<float> gradient_before = gradient, sums_before = sums, terms_before = terms;
    const bool with_terms = balance && rows > 1;
    const float scale = 0.013f;
    launch({warp_blocks(rows), 1, 1}, 256, 0, [&] {
        moe_route(probs.data(), weights.data(), chosen.data(), logits.data(), (long)rows, E, k, normalize);
    });
    launch({(unsigned)E, 1, 1}, MOE_PLACE_THREADS, 0, [&] {
        moe_place(order.data(), place.data(), offsets.data(), balance ? gradient.data() : nullptr,
                  balance ? sums.data() : nullptr, with_terms ? terms.data() : nullptr, dloss.data(), scale,
                  probs.data(), chosen.data(), (long)rows, k, E);
    });

    // The reference: softmax in double, choices by probability (a tie to the lower expert), a stable sort by expert.
    std::vector<double> want_probs(dense), want_weights(slots);
    std::vector<unsigned> want_chosen(slots);
    for (int t = 0; t < rows; t++) {
        double m = -INFINITY, total = 0;
        for (int e = 0; e < E; e++) m = std::max(m, (double)to_f32(logits[t * E + e]));
        for (int e = 0; e < E; e++) total += std::exp(to_f32(logits[t * E + e]) - m);
        for (int e = 0; e < E; e++) want_probs[t * E + e] = std::exp(to_f32(logits[t * E + e]) - m) / total;
        double sum = 0;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                const bool taken = std::find(&want_chosen[t * k], &want_chosen[t * k + j], (unsigned)e) !=
                                   &want_chosen[t * k + j];
                if (!taken && (best < 0 || want_probs[t * E + e] > want_probs[t * E + best])) best = e;
            }
            want_chosen[t * k + j] = best;
            want_weights[t * k + j] = want_probs[t * E + best];
            sum += want_weights[t * k + j];
        }
        if (normalize)
            for (int j = 0; j < k; j++) want_weights[t * k + j] /= sum;
    }
    std::vector<unsigned> want_order(slots), want_place(slots), want_offsets(E + 1, 0);
    for (size_t s = 0; s < slots; s++) want_offsets[want_chosen[s] + 1]++;
    for (int e = 0; e < E; e++) want_offsets[e + 1] += want_offsets[e];
    {
        std::vector<unsigned> cursor(want_offsets.begin(), want_offsets.end() - 1);
        for (size_t s = 0; s < slots; s++) {
            want_order[cursor[want_chosen[s]]] = s;
            want_place[s] = cursor[want_chosen[s]]++;
        }
    }
    std::vector<double> want_gradient(E), want_sums(E), want_terms(E);
    for (int e = 0; e < E; e++) {
        const double count = want_offsets[e + 1] - want_offsets[e];
        want_gradient[e] = gradient_before[e] + (balance ? (double)dloss[0] * scale * count : 0.0);
        want_sums[e] = sums_before[e];
        for (int t = 0; t < rows && balance; t++) want_sums[e] += want_probs[t * E + e];
        want_terms[e] = terms_before[e] + (with_terms ? want_gradient[e] * want_sums[e] : 0.0);
    }
    check("route probs", where, error(probs, want_probs));
    check("route weights", where, error(weights, want_weights));
    expect(chosen == want_chosen, "route chosen", where);
    expect(order == want_order && place == want_place && offsets == want_offsets, "dispatch", where);
    check("balance gradient", where, error(gradient, want_gradient));
    check("balance probability sums", where, error(sums, want_sums));
    check("balance terms", where, error(terms, want_terms));
    if (chosen != want_chosen) return;  // the rest would be judged against another dispatch

    // Routing's backward, from random weight gradients (and a random balance).
    std::vector<float> dweights(slots), bal(E);
    for (auto& v : dweights) v = std::uniform_real_distribution<float>(-1, 1)(g_rng);
    for (auto& v : bal) v = std::uniform_real_distribution<float>(-1, 1)(g_rng);
    auto dlogits = poisoned<floatX>(dense);
    launch({warp_blocks(rows), 1, 1}, 256, 0, [&] {
        moe_route_backward(dlogits.data(), dweights.data(), probs.data(), weights.data(), chosen.data(),
                           balance ? bal.data() : nullptr, (long)rows, E, k, normalize);
    });
    std::vector<double> want_dlogits(dense);
    for (int t = 0; t < rows; t++) {
        std::vector<double> dp(E, 0.0);
        for (int e = 0; e < E; e++) dp[e] = balance ? bal[e] : 0.0;
        double shift = 0, sum = 1;
        if (normalize) {
            sum = 0;
            for (int j = 0; j < k; j++) {
                sum += probs[t * E + chosen[t * k + j]];
                shift += (double)dweights[t * k + j] * weights[t * k + j];
            }
        }
        for (int j = 0; j < k; j++) dp[chosen[t * k + j]] += (dweights[t * k + j] - shift) / sum;
        double mean = 0;
        for (int e = 0; e < E; e++) mean += probs[t * E + e] * dp[e];
        for (int e = 0; e < E; e++) want_dlogits[t * E + e] = probs[t * E + e] * (dp[e] - mean);
    }
    check("route backward", where, error(dlogits, want_dlogits));

    // Gather, combine (weighted; unweighted onto what the output held) and the combine's backward.
    const auto inp = random_x((size_t)rows * width), expert_out = random_x(slots * width);
    const auto dout = random_x((size_t)rows * width), held = random_x((size_t)rows * width);
    auto dispatched = poisoned<floatX>(slots * width), combined = poisoned<floatX>((size_t)rows * width);
    auto summed = held;
    auto dexpert_out = poisoned<floatX>(slots * width);
    auto dw = poisoned<float>(slots);
    const long n_slots = slots;
    launch({elementwise_blocks(slots * width), 1, 1}, 256, 0,
           [&] { moe_gather(dispatched.data(), inp.data(), order.data(), n_slots, width, k); });
    launch({elementwise_blocks((size_t)rows * width), 1, 1}, 256, 0, [&] {
        moe_combine(combined.data(), expert_out.data(), weights.data(), place.data(), (long)rows, width, k, 0);
    });
    launch({elementwise_blocks((size_t)rows * width), 1, 1}, 256, 0, [&] {
        moe_combine(summed.data(), expert_out.data(), nullptr, place.data(), (long)rows, width, k, 1);
    });
    launch({elementwise_blocks(slots * width), 1, 1}, 256, 0, [&] {
        moe_combine_backward_rows(dexpert_out.data(), dout.data(), weights.data(), order.data(), n_slots, width, k);
    });
    launch({warp_blocks(slots), 1, 1}, 256, 0, [&] {
        moe_combine_backward_weights(dw.data(), dout.data(), expert_out.data(), place.data(), n_slots, width, k);
    });
    std::vector<double> want_dispatched(slots * width), want_combined((size_t)rows * width),
        want_summed((size_t)rows * width), want_dexpert_out(slots * width), want_dw(slots, 0.0);
    for (size_t s = 0; s < slots; s++) {
        const size_t t = s / k, p = want_place[s];
        for (int c = 0; c < width; c++) {
            const double e = to_f32(expert_out[p * width + c]), dy = to_f32(dout[t * width + c]);
            want_dispatched[p * width + c] = to_f32(inp[t * width + c]);
            want_combined[t * width + c] += weights[s] * e;
            want_summed[t * width + c] += e;
            want_dexpert_out[p * width + c] = weights[s] * dy;
            want_dw[s] += dy * e;
        }
    }
    for (size_t i = 0; i < want_summed.size(); i++) want_summed[i] += to_f32(held[i]);
    check("gather", where, error(dispatched, want_dispatched));
    check("combine", where, error(combined, want_combined));
    check("combine unweighted, added", where, error(summed, want_summed));
    check("combine backward rows", where, error(dexpert_out, want_dexpert_out));
    check("combine backward weights", where, error(dw, want_dw));
}

// A diverged step's router: NaN logits, so NaN probabilities. Each token must still go to experts that exist (the
// lowest, as the CPU engine chooses), so that the dispatch holds every slot and the step can finish for the guard to
// see its loss: with fewer experts than a warp's lanes too, where lanes without any offer nothing.
static void nan_logits(int E, int k) {
    char where[32];
    std::snprintf(where, sizeof where, "E%d k%d", E, k);
    const int rows = 3;
    const size_t slots = (size_t)rows * k;
    const std::vector<floatX> logits((size_t)rows * E, to_x(std::nanf("")));
    auto probs = poisoned<float>((size_t)rows * E), weights = poisoned<float>(slots);
    auto chosen = poisoned<unsigned>(slots), order = poisoned<unsigned>(slots), place = poisoned<unsigned>(slots);
    auto offsets = poisoned<unsigned>(E + 1);
    launch({warp_blocks(rows), 1, 1}, 256, 0, [&] {
        moe_route(probs.data(), weights.data(), chosen.data(), logits.data(), (long)rows, E, k, 1);
    });
    launch({(unsigned)E, 1, 1}, MOE_PLACE_THREADS, 0, [&] {
        moe_place(order.data(), place.data(), offsets.data(), nullptr, nullptr, nullptr, nullptr, 0.0f, probs.data(),
                  chosen.data(), (long)rows, k, E);
    });
    bool lowest = true;
    for (size_t s = 0; s < slots; s++) lowest &= chosen[s] == s % k;
    expect(lowest, "NaN logits: lowest experts", where);
    expect(offsets[0] == 0 && offsets[E] == slots, "NaN logits: every slot placed", where);
}

int main() {
    emu_schedule_from_env();
    for (auto [E, k] : {std::pair{8, 2}, {40, 3}}) nan_logits(E, k);
    for (int rows : {1, 37, 300})
        for (auto [E, k] : {std::pair{2, 1}, {4, 2}, {8, 2}, {70, 8}})
            for (bool normalize : {false, true}) run(rows, E, k, normalize, !normalize, rows == 37 ? 5 : 48);
    return finish("experts");
}
