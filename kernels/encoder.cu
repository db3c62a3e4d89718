// Token and position embeddings.
//
// Forward: out[b,t,:] = wte[tok[b,t],:] + wpe[t,:], or without the wpe term when wpe is null (rotary positions).
// Backward: dwte[tok[b,t],:] += dout[b,t,:] and dwpe[t,:] += dout[b,t,:], summed over (b, t). The weight
// gradients are fp32, and both sums run in a fixed order, without atomics, so they are deterministic: dwpe by one
// thread per (t, chunk of channels) over the batch, dwte by one thread per (token, chunk of channels) over the
// positions holding that token, found by sorting the positions by token first.
//
// Rows are cut into chunks (see Packed in common.cuh), which threads take in grid-stride loops: any grid covers
// the data.

// A chunk of a row of out per thread and iteration.
extern "C" __global__ void encoder_forward(floatX* out, const unsigned* tokens, const floatX* wte, const floatX* wpe,
                                           int B, int T, int C) {
    typedef Packed<floatX> P;
    const int chunks = (C + P::size - 1) / P::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < (long)B * T * chunks;
         j += (long)gridDim.x * blockDim.x) {
        const long row = j / chunks;
        const int c = j % chunks * P::size, count = min(P::size, C - c), t = row % T;
        P e = P::load(wte + (long)tokens[row] * C + c, count), o, p = {};
        if (wpe) p = P::load(wpe + (long)t * C + c, count);
#pragma unroll
        for (int k = 0; k < P::size; k++) o.v[k] = to_x(to_f32(e.v[k]) + to_f32(p.v[k]));
        o.store(out + row * C + c, count);
    }
}

// A chunk of 4 channels of dwpe (16 bytes of fp32) per thread and iteration: a deterministic sum over the batch.
extern "C" __global__ void encoder_backward_wpe(float* dwpe, const floatX* dout, int B, int T, int C) {
    typedef Packed<float> G;
    typedef Packed<floatX, G::size> D;
    const int chunks = (C + G::size - 1) / G::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < (long)T * chunks;
         j += (long)gridDim.x * blockDim.x) {
        const int t = j / chunks, c = j % chunks * G::size, count = min(G::size, C - c);
        float acc[G::size] = {};
        for (int b = 0; b < B; b++) {
            D d = D::load(dout + ((long)b * T + t) * C + c, count);
#pragma unroll
            for (int k = 0; k < G::size; k++) acc[k] += to_f32(d.v[k]);
        }
        G g = G::load(dwpe + (long)t * C + c, count);
#pragma unroll
        for (int k = 0; k < G::size; k++) g.v[k] += acc[k];
        g.store(dwpe + (long)t * C + c, count);
    }
}

// The token embedding's gradient, in two kernels. dwte[v,:] gets dout's rows at the positions holding token v added
// one by one in the order of those positions, as a serial walk over the positions would, so the result is
// deterministic; but that walk gives only C threads. So encoder_sort_rows first puts the positions in token order
// (a stable sort), and encoder_backward_wte then gives each run of equal tokens and chunk of 4 channels a thread.

#define SORT_THREADS 512
#define SORT_BITS 4
#define SORT_DIGITS (1 << SORT_BITS)
#define SORT_BATCH 8

// A stable LSD radix sort of the pairs (tokens[p], p) by token, SORT_BITS bits a pass, by one block. Thread i takes
// the same contiguous share of the input in every pass. counts[d * SORT_THREADS + i] is how many of thread i's
// pairs have digit d; its exclusive prefix sum in that (digit-major) order is where thread i's first pair of digit d
// goes, so pairs of equal digits keep their order. The pairs ping-pong between (keys, rows) and (spare_keys,
// spare_rows), starting on the side that makes the last pass end in (keys, rows).
extern "C" __global__ void __launch_bounds__(SORT_THREADS)
    encoder_sort_rows(unsigned* keys, unsigned* rows, unsigned* spare_keys, unsigned* spare_rows,
                      const unsigned* tokens, int n, int passes) {
    __shared__ int counts[SORT_DIGITS * SORT_THREADS];
    __shared__ int totals[SORT_THREADS];
    const int i = threadIdx.x, share = (n + SORT_THREADS - 1) / SORT_THREADS;
    const int begin = min(n, i * share), end = min(n, begin + share);
    const unsigned *from_keys = tokens, *from_rows = nullptr;  // the first pass reads the tokens in position order
    bool to_spare = passes % 2 == 0;
    for (int pass = 0; pass < passes; pass++) {
        const int shift = pass * SORT_BITS;
        unsigned* to_keys = to_spare ? spare_keys : keys;
        unsigned* to_rows = to_spare ? spare_rows : rows;
        for (int d = 0; d < SORT_DIGITS; d++) counts[d * SORT_THREADS + i] = 0;
        for (int k0 = begin; k0 < end; k0 += SORT_BATCH) {
            unsigned batch_keys[SORT_BATCH];
#pragma unroll
            for (int u = 0; u < SORT_BATCH; u++) batch_keys[u] = from_keys[min(k0 + u, end - 1)];
#pragma unroll
            for (int u = 0; u < SORT_BATCH; u++)
                if (k0 + u < end) counts[(batch_keys[u] >> shift) % SORT_DIGITS * SORT_THREADS + i]++;
        }
        __syncthreads();
        // Exclusive scan of counts: each thread its SORT_DIGITS consecutive entries, then a scan of their sums.
        int sum = 0;
        for (int k = i * SORT_DIGITS; k < (i + 1) * SORT_DIGITS; k++) {
            const int c = counts[k];
            counts[k] = sum;
            sum += c;
        }
        totals[i] = sum;
        __syncthreads();
        for (int offset = 1; offset < SORT_THREADS; offset *= 2) {
            const int before = i >= offset ? totals[i - offset] : 0;
            __syncthreads();
            totals[i] += before;
            __syncthreads();
        }
        const int base = i > 0 ? totals[i - 1] : 0;
        for (int k = i * SORT_DIGITS; k < (i + 1) * SORT_DIGITS; k++) counts[k] += base;
        __syncthreads();
        // Here and above, SORT_BATCH pairs are loaded before any is used: the stores could alias the loads as far
        // as the compiler knows, so loads interleaved with them would each wait out a full memory latency.
        for (int k0 = begin; k0 < end; k0 += SORT_BATCH) {
            unsigned batch_keys[SORT_BATCH], batch_rows[SORT_BATCH];
#pragma unroll
            for (int u = 0; u < SORT_BATCH; u++) {
                const int k = min(k0 + u, end - 1);
                batch_keys[u] = from_keys[k];
                batch_rows[u] = from_rows ? from_rows[k] : k;
            }
#pragma unroll
            for (int u = 0; u < SORT_BATCH; u++) {
                if (k0 + u >= end) break;
                const int at = counts[(batch_keys[u] >> shift) % SORT_DIGITS * SORT_THREADS + i]++;
                to_keys[at] = batch_keys[u];
                to_rows[at] = batch_rows[u];
            }
        }
        // Makes this pass's writes to global memory visible to every thread of the block for the next.
        __syncthreads();
        from_keys = to_keys;
        from_rows = to_rows;
        to_spare = !to_spare;
    }
}

// A chunk of 4 channels (16 bytes of fp32) of one token's gradient row per thread and iteration: the thread at the
// first position of a run of equal tokens in sorted order walks the run; the others have nothing to do.
extern "C" __global__ void encoder_backward_wte(float* dwte, const floatX* dout, const unsigned* keys,
                                               const unsigned* rows, int n, int C) {
    typedef Packed<float> G;
    typedef Packed<floatX, G::size> D;
    const int chunks = (C + G::size - 1) / G::size;
    for (long j = (long)blockIdx.x * blockDim.x + threadIdx.x; j < (long)n * chunks;
         j += (long)gridDim.x * blockDim.x) {
        const int p = j / chunks, c = j % chunks * G::size, count = min(G::size, C - c);
        const unsigned token = keys[p];
        if (p > 0 && keys[p - 1] == token) continue;
        G g = G::load(dwte + (long)token * C + c, count);
        for (int q = p; q < n && keys[q] == token; q++) {
            D d = D::load(dout + (long)rows[q] * C + c, count);
#pragma unroll
            for (int k = 0; k < G::size; k++) g.v[k] += to_f32(d.v[k]);
        }
        g.store(dwte + (long)token * C + c, count);
    }
}
