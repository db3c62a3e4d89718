// A mixture-of-experts MLP's routing, dispatch and combination (Mixtral's, Qwen3-MoE's); the experts' products run
// on cuBLASLt, one per expert's run of the dispatched rows, or grouped (expert_products.cu). The operands are
// described in crates/kiln-core/src/experts.rs.
//
// Route, one warp per token: p = softmax(logits) over the E experts (fp32, written to probs); the top_k largest p in
// turn, a tie to the lower expert (chosen, and their p as weights); normalised, each weight divided by their sum.
// Place: a stable counting sort of the slots s = t·top_k + j by expert: order[p] = s and place[s] = p, expert e's
// slots from offsets[e] on, in slot order. One block per expert counts, in one pass over the slots, those of lower
// experts (its run's start) and its own, each thread over a contiguous span of slots, then places its own in a
// second pass after an exclusive scan of the threads' counts: deterministic, and no atomics. The load-balancing
// loss's gradient adds dloss·scale·count_e to gradient[e]; the block also adds its expert's probabilities, summed
// over the rows, to sums[e] (each thread every 256th row, then block_sum), and on a pass's
// last routed layer adds gradient[e]·sums[e] to terms[e]: the loss's value, summed over e (see experts.rs).
// Route backward, one warp per token: g_j = dw_j, or normalised (dw_j − Σ_i dw_i·w_i)/Σ_i p_i over the choices;
// dp_e = balance_e + Σ_{j: chosen_j = e} g_j; dlogits_e = p_e·(dp_e − Σ_i p_i·dp_i).
// Gather: row p of the dispatched rows is token order[p] / top_k's. Combine: y_t (+)= Σ_j w_s·expert_out[place[s]]
// (w = 1 without weights: the gather's backward). Combine backward: dexpert_out[place[s]] = w_s·dy_t, and
// dw_s = dy_t · expert_out[place[s]], one warp per slot.
//
// The index operands come from moe_route, so they are in range; the kernels trust them (the CPU engine checks them).

#define MOE_PLACE_THREADS 256

// The best of the lane's experts e ≡ lane (mod 32) not among the row's first j choices: its probability and index
// (NEG_INF and E if none is left). Strictly greater keeps the lower expert on a tie; the first is taken whatever
// its value, so that a lane with experts left always offers one.
__device__ __forceinline__ float lane_best(const float* p, const unsigned* chosen, int j, int E, int lane, int* best) {
    float value = NEG_INF;
    *best = E;
    for (int e = lane; e < E; e += 32) {
        bool taken = false;
        for (int i = 0; i < j; i++) taken |= chosen[i] == (unsigned)e;
        if (!taken && (p[e] > value || *best == E)) {
            value = p[e];
            *best = e;
        }
    }
    return value;
}

extern "C" __global__ void moe_route(float* probs, float* weights, unsigned* chosen, const floatX* logits, long rows,
                                     int E, int k, int normalize) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (long row = (long)blockIdx.x * warps + threadIdx.x / 32; row < rows; row += (long)gridDim.x * warps) {
        const floatX* x = logits + row * E;
        float* p = probs + row * E;
        float m = NEG_INF;
        for (int e = lane; e < E; e += 32) m = fmaxf(m, to_f32(x[e]));
        m = warp_max(m);
        float total = 0.0f;
        for (int e = lane; e < E; e += 32) total += expf(to_f32(x[e]) - m);
        total = warp_sum(total);
        for (int e = lane; e < E; e += 32) p[e] = expf(to_f32(x[e]) - m) / total;
        __syncwarp();  // every lane reads the chosen experts' probabilities below
        unsigned* c = chosen + row * k;
        float* w = weights + row * k;
        float sum = 0.0f;
        for (int j = 0; j < k; j++) {
            int mine;
            const float value = lane_best(p, c, j, E, lane, &mine);
            const float top = warp_max(value);
            // The lowest expert holding the top probability (expert indices, below 2^24, are exact in a float). NaN
            // probabilities (a diverged step: then all are) are not below the top, so that every lane with an expert
            // left offers one and the lowest is chosen, as the CPU engine chooses: always an expert in range.
            const bool offers = mine < E && !(value < top);
            const int best = (int)-warp_max(offers ? -(float)mine : NEG_INF);
            const float chosen_p = p[best];
            if (lane == 0) {
                c[j] = best;
                w[j] = chosen_p;
            }
            sum += chosen_p;
            __syncwarp();  // choice j is seen by every lane before the next is made
        }
        if (normalize && lane == 0)
            for (int j = 0; j < k; j++) w[j] = w[j] / sum;
    }
}

extern "C" __global__ void moe_place(unsigned* order, unsigned* place, unsigned* offsets, float* gradient,
                                     float* sums, float* terms, const float* dloss, float scale, const float* probs,
                                     const unsigned* chosen, long rows, int k, int E) {
    __shared__ unsigned own[MOE_PLACE_THREADS], lower[MOE_PLACE_THREADS];
    __shared__ float scratch[32];
    if (blockDim.x != MOE_PLACE_THREADS) __trap();  // the scan covers the shared arrays exactly
    const unsigned e = blockIdx.x;
    const unsigned t = threadIdx.x;
    const long slots = rows * k, span = (slots + blockDim.x - 1) / blockDim.x, first = min(slots, t * span),
               last = min(slots, first + span);
    unsigned mine = 0, below = 0;
    for (long s = first; s < last; s++) {
        const unsigned c = chosen[s];
        mine += c == e;
        below += c < e;
    }
    own[t] = mine;
    lower[t] = below;
    // Inclusive scans of both counts over the threads (Hillis and Steele).
    for (unsigned step = 1; step < blockDim.x; step *= 2) {
        __syncthreads();
        const unsigned a = t >= step ? own[t - step] : 0, b = t >= step ? lower[t - step] : 0;
        __syncthreads();
        own[t] += a;
        lower[t] += b;
    }
    __syncthreads();
    const unsigned start = lower[blockDim.x - 1], count = own[blockDim.x - 1];
    unsigned p = start + own[t] - mine;
    for (long s = first; s < last; s++)
        if (chosen[s] == e) {
            order[p] = s;
            place[s] = p;
            p++;
        }
    if (t == 0) {
        offsets[e] = start;
        if (e == (unsigned)E - 1) offsets[E] = start + count;
    }
    if (!gradient) return;  // the same for every thread of the grid: no barrier below is skipped by some only
    // Neighbouring threads read neighbouring rows, which share cache sectors where the rows are short.
    float sum = 0.0f;
    for (long r = t; r < rows; r += blockDim.x) sum += probs[r * E + e];
    sum = block_sum(sum, scratch);
    if (t == 0) {
        const float g = gradient[e] + dloss[0] * scale * (float)count, s = sums[e] + sum;
        gradient[e] = g;
        sums[e] = s;
        if (terms) terms[e] += g * s;
    }
}

extern "C" __global__ void moe_route_backward(floatX* dlogits, const float* dweights, const float* probs,
                                              const float* weights, const unsigned* chosen, const float* balance,
                                              long rows, int E, int k, int normalize) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (long row = (long)blockIdx.x * warps + threadIdx.x / 32; row < rows; row += (long)gridDim.x * warps) {
        const float *p = probs + row * E, *dw = dweights + row * k, *w = weights + row * k;
        const unsigned* c = chosen + row * k;
        float shift = 0.0f, sum = 1.0f;
        if (normalize) {
            sum = 0.0f;
            for (int j = 0; j < k; j++) {
                sum += p[c[j]];
                shift += dw[j] * w[j];
            }
        }
        // dp_e, for each of the lane's experts in turn (computed twice: for the mean, then for the gradient).
        auto dp = [&](int e) {
            float d = balance ? balance[e] : 0.0f;
            for (int j = 0; j < k; j++)
                if (c[j] == (unsigned)e) d += (dw[j] - shift) / sum;
            return d;
        };
        float mean = 0.0f;
        for (int e = lane; e < E; e += 32) mean += p[e] * dp(e);
        mean = warp_sum(mean);
        for (int e = lane; e < E; e += 32) dlogits[row * E + e] = to_x(p[e] * (dp(e) - mean));
    }
}

extern "C" __global__ void moe_gather(floatX* out, const floatX* inp, const unsigned* order, long slots, int width,
                                      int k) {
    typedef Packed<floatX> P;
    const int chunks = (width + P::size - 1) / P::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < slots * chunks; j += (long)gridDim.x * blockDim.x) {
        const long p = j / chunks, token = order[p] / k;
        const int c = j % chunks * P::size, count = min(P::size, width - c);
        P::load(inp + token * width + c, count).store(out + p * width + c, count);
    }
}

extern "C" __global__ void moe_combine(floatX* out, const floatX* expert_out, const float* weights,
                                       const unsigned* place, long rows, int width, int k, int accumulate) {
    typedef Packed<floatX> P;
    const int chunks = (width + P::size - 1) / P::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < rows * chunks; j += (long)gridDim.x * blockDim.x) {
        const long t = j / chunks;
        const int c = j % chunks * P::size, count = min(P::size, width - c);
        float y[P::size] = {};
        if (accumulate) {
            const P previous = P::load(out + t * width + c, count);
#pragma unroll
            for (int i = 0; i < P::size; i++) y[i] = to_f32(previous.v[i]);
        }
        for (int choice = 0; choice < k; choice++) {
            const long s = t * k + choice;
            const float w = weights ? weights[s] : 1.0f;
            const P e = P::load(expert_out + place[s] * (long)width + c, count);
#pragma unroll
            for (int i = 0; i < P::size; i++) y[i] += w * to_f32(e.v[i]);
        }
        P result;
#pragma unroll
        for (int i = 0; i < P::size; i++) result.v[i] = to_x(y[i]);
        result.store(out + t * width + c, count);
    }
}

// dexpert_out[p] = w_s·dy_t for s = order[p], t = s / top_k: each dispatched row written once.
extern "C" __global__ void moe_combine_backward_rows(floatX* dexpert_out, const floatX* dout, const float* weights,
                                                     const unsigned* order, long slots, int width, int k) {
    typedef Packed<floatX> P;
    const int chunks = (width + P::size - 1) / P::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < slots * chunks; j += (long)gridDim.x * blockDim.x) {
        const long p = j / chunks, s = order[p];
        const int c = j % chunks * P::size, count = min(P::size, width - c);
        const float w = weights[s];
        const P dy = P::load(dout + s / k * width + c, count);
        P de;
#pragma unroll
        for (int i = 0; i < P::size; i++) de.v[i] = to_x(w * to_f32(dy.v[i]));
        de.store(dexpert_out + p * width + c, count);
    }
}

// dweights[s] = dy_t · expert_out[place[s]], one warp per slot.
extern "C" __global__ void moe_combine_backward_weights(float* dweights, const floatX* dout, const floatX* expert_out,
                                                        const unsigned* place, long slots, int width, int k) {
    typedef Packed<floatX> P;
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (long s = (long)blockIdx.x * warps + threadIdx.x / 32; s < slots; s += (long)gridDim.x * warps) {
        const floatX *dy = dout + s / k * width, *e = expert_out + place[s] * (long)width;
        float dot = 0.0f;
        for (int c = lane * P::size; c < width; c += 32 * P::size) {
            const int count = min(P::size, width - c);
            const P a = P::load(dy + c, count), b = P::load(e + c, count);
#pragma unroll
            for (int i = 0; i < P::size; i++) dot += to_f32(a.v[i]) * to_f32(b.v[i]);
        }
        dot = warp_sum(dot);
        if (lane == 0) dweights[s] = dot;
    }
}
