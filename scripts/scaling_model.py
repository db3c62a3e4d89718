#!/usr/bin/env python3
"""A model of kiln's data-parallel step time: every table of docs/scaling.md, from the parameters stated there.

Nothing here is measured. The inputs are published anchors and assumptions, each of which can be replaced by a
measured number:

    python3 scripts/scaling_model.py                       # every table of docs/scaling.md
    python3 scripts/scaling_model.py --model 124m --step-ms 104.2 --backward-ms 71.0 --busbw-gbs 340 --gpus 8

What it models (see docs/scaling.md for the reasoning):
- one step = forward + backward + optimizer of one micro-batch of `micro_batch x block_size` tokens per GPU
  (weak scaling: the global batch grows with the number of GPUs), `--accum` micro-batches per step;
- the backward pass is 2/3 of the single-GPU step; within it, the LM head, each block and the embeddings take
  shares proportional to their matrix FLOPs (the embedding backward is taken as free);
- the flat fp32 gradient vector is cut into buckets from its end, exactly as kiln-train's `Buckets::new` does; a
  bucket is ready when the backward pass has finished the layer holding its first element; buckets are reduced
  one after another on one communication stream; what is still running when the backward pass ends is exposed;
- collectives follow the alpha-beta model with NCCL's bus-bandwidth convention.

Standard library only.
"""

import argparse
import math
import sys

GB = 1e9
MB = 1e6

MODELS = {
    "124m": dict(name="GPT-2 124M", n_layer=12, n_head=12, n_embd=768, micro_batch=32),
    "1.5b": dict(name="GPT-2 1.5B", n_layer=48, n_head=25, n_embd=1600, micro_batch=8),
}
VOCAB, PADDED_VOCAB, BLOCK_SIZE = 50257, 50304, 1024
# Per-GPU compute rates of GPT-2 124M (tokens/s): kiln's first target and its goal. Other models run at the
# same MFU (the same FLOP/s), so their rate is scaled by the ratio of FLOPs per token.
RATES_124M = [("300k", 300_000.0), ("575k", 575_000.0)]
PIECE_ALIGN = 64  # kiln-train: every rank's piece of a bucket is a multiple of 64 elements
GATHER_BYTES = 2.0  # ZeRO-1 all-gathers the bf16 weights only, not the fp32 master
# Model state per parameter (bytes): bf16 weights, fp32 master, fp32 gradients, AdamW m and v. ZeRO-1 shards the
# master and the moments in memory: each rank holds them for its own pieces only.
BF16, MASTER, GRAD, MOMENTS = 2.0, 4.0, 4.0, 8.0


class Shape:
    def __init__(self, n_layer, n_head, n_embd, block_size=BLOCK_SIZE, **_):
        self.L, self.H, self.C, self.T = n_layer, n_head, n_embd, block_size
        c = n_embd
        self.wte = PADDED_VOCAB * c
        self.wpe = block_size * c
        self.block = 12 * c * c + 13 * c  # 4 matrices (3C, C, 4C, 4C rows of C), then 8 vectors
        self.lnf = 2 * c
        self.params = self.wte + self.wpe + self.L * self.block + self.lnf
        self.counted = self.params - (PADDED_VOCAB - VOCAB) * c - self.wpe

    def block_start(self, i):
        return self.wte + self.wpe + i * self.block

    def lnf_start(self):
        return self.block_start(self.L)

    def flops_per_token(self):
        # As kiln bench and the anchors count: 6 per parameter plus attention's 6*L*C*T.
        return 6.0 * self.counted + 6.0 * self.L * self.C * self.T

    def backward_shares(self):
        """(LM head share, one block's share) of the backward pass, by FLOPs; the embeddings take none."""
        head = 6.0 * PADDED_VOCAB * self.C
        block = 6.0 * 12 * self.C * self.C + 6.0 * self.C * self.T
        total = head + self.L * block
        return head / total, block / total


def buckets(length, world, bucket_elems):
    """kiln-train's Buckets::new: ranges cut from the end, each a multiple of world*64 elements."""
    unit = world * PIECE_ALIGN
    size = max(-(-bucket_elems // unit) * unit, unit)
    out, end = [], length
    while end > 0:
        start = max(end - size, 0)
        out.append((start, end))
        end = start
    return out


class Net:
    """Interconnect parameters (bytes/s and seconds)."""

    def __init__(self, a):
        self.nvlink = a.busbw_gbs * GB
        self.nvls = a.nvls_gbs * GB
        self.nic = a.nic_gbs * GB
        self.g = a.gpus_per_node
        self.a_intra = a.alpha_intra_us * 1e-6
        self.a_inter = a.alpha_inter_us * 1e-6
        self.hier_serial = a.hier_serial


def collective_s(kind, nbytes, n, algo, net):
    """Seconds for one collective of `nbytes` (the full buffer) over `n` GPUs.

    kind: "ar" (all-reduce), "rs" (reduce-scatter), "ag" (all-gather; nbytes = the gathered whole).
    algo: "ring", "hier" (two-level: NVLink inside a node, the GPU's own NIC between nodes), "nvls" (one node).
    """
    if n <= 1:
        return 0.0
    k = 2 if kind == "ar" else 1
    g = min(n, net.g)
    nodes = -(-n // g)
    if nodes == 1:
        bw = net.nvls if algo == "nvls" else net.nvlink
        return k * (n - 1) / n * nbytes / bw + k * (n - 1) * net.a_intra
    if algo == "ring":
        # One ring per NIC (NCCL's channels): a node's g NICs carry the inter-node hops side by side.
        bw = min(net.nvlink, g * net.nic)
        return k * (n - 1) / n * nbytes / bw + k * (n - 1) * net.a_inter
    # Hierarchical: reduce-scatter inside the node over NVLink, then each GPU reduces its 1/g of the data with
    # its peers on the other nodes over its own NIC, then all-gather inside the node.
    intra = k * (g - 1) / g * nbytes / net.nvlink
    inter = k * (nodes - 1) / nodes * (nbytes / g) / net.nic
    band = intra + inter if net.hier_serial else max(intra, inter)
    # All-reduce between nodes as a tree (2*log2 steps); reduce-scatter or all-gather as a ring of nodes.
    inter_steps = 2 * math.ceil(math.log2(nodes)) if kind == "ar" else nodes - 1
    return band + k * (g - 1) * net.a_intra + inter_steps * net.a_inter


def small_allreduce_s(n, net):
    """A few bytes: latency only, by the lowest-latency route (NCCL picks a tree or LL protocol for these)."""
    if n <= 1:
        return 0.0
    g = min(n, net.g)
    nodes = -(-n // g)
    return 2 * (g - 1) * net.a_intra + 2 * math.ceil(math.log2(nodes)) * net.a_inter if nodes > 1 else 2 * (n - 1) * net.a_intra


class Case:
    """Single-GPU timing of one model at one compute rate."""

    def __init__(self, shape, micro_batch, step_s, backward_s, label, a):
        self.shape, self.micro_batch, self.label = shape, micro_batch, label
        self.step_s = step_s  # one micro-batch step on one GPU, optimizer included
        self.backward_s = backward_s
        self.accum = a.accum
        # AdamW in bf16 mode reads grad, m, v, fp32 master and writes m, v, master and the bf16 copy: 30 bytes
        # per parameter; the gradient norm reads the gradient once more: 4. At the HBM rate measured on an H100.
        self.opt_s = shape.params * a.opt_bytes / (a.hbm_tbs * 1e12)

    def single(self):
        return self.accum * (self.step_s - self.opt_s) + self.opt_s


def simulate(case, n, bucket_mb, algo, zero, net, keep_timeline=False):
    """One step on n GPUs. Returns a dict of times in seconds (and the bucket timeline when asked)."""
    s = case.shape
    single = case.single()
    if n == 1:
        return dict(step=single, exposed=0.0, gather=0.0, sync=0.0, comm=0.0, opt_saved=0.0, timeline=[])
    unit = n * PIECE_ALIGN
    length = -(-s.params // unit) * unit
    elems = length if bucket_mb is None else int(bucket_mb * MB / 4.0)
    ranges = buckets(length, n, elems)
    head, block = s.backward_shares()
    tb = case.backward_s
    t_head = head * tb

    def ready(start):
        # The backward pass reports gradients final after ln_f, after each block (last to first), and after the
        # embeddings (the tied wte gradient is only complete then).
        if start >= s.lnf_start():
            return t_head
        if start >= s.block_start(0):
            i = (start - s.block_start(0)) // s.block
            return t_head + (s.L - i) * block * tb
        return tb

    kind = "rs" if zero else "ar"
    end, comm, timeline = 0.0, 0.0, []
    for lo, hi in ranges:
        r = ready(lo)
        t = collective_s(kind, 4.0 * (hi - lo), n, algo, net)
        begin = max(r, end)
        end = begin + t
        comm += t
        if keep_timeline:
            timeline.append((lo, hi, r, begin, end))
    exposed = max(0.0, end - tb)
    sync = 2 * small_allreduce_s(n, net)  # the step's target count, then loss / norm / stop flag
    gather, opt_saved = 0.0, 0.0
    if zero:
        # AdamW on this rank's pieces only; then every bucket's bf16 weights (2 bytes each) are gathered, after
        # the optimizer, with nothing to overlap. The fp32 master is not gathered: each rank holds it for the
        # pieces it updates only.
        opt_saved = case.opt_s * (1 - 1 / n)
        gather = sum(collective_s("ag", GATHER_BYTES * (hi - lo), n, algo, net) for lo, hi in ranges)
    step = single + exposed + sync + gather - opt_saved
    return dict(step=step, exposed=exposed, gather=gather, sync=sync, comm=comm, opt_saved=opt_saved,
                timeline=timeline, buckets=len(ranges))


def bucket_label(b):
    return "one" if b is None else f"{b:g} MB"


def buckets_phrase(b):
    return "one bucket" if b is None else f"{b:g} MB buckets"


def make_cases(key, a):
    m = MODELS[key]
    shape = Shape(**m)
    mb = a.micro_batch or m["micro_batch"]
    tokens = mb * shape.T
    cases = []
    if a.step_ms is not None:
        step = a.step_ms / 1e3
        bwd = (a.backward_ms / 1e3) if a.backward_ms is not None else step * 2 / 3
        cases.append(Case(shape, mb, step, bwd, f"{tokens / step:,.0f} tok/s (given)", a))
        return shape, cases
    ref = Shape(**MODELS["124m"]).flops_per_token()
    rates = [(f"{r:g}", r) for r in a.tok_s] if a.tok_s else RATES_124M
    for label, rate in rates:
        r = rate * ref / shape.flops_per_token()
        step = tokens / r
        bwd = (a.backward_ms / 1e3) if a.backward_ms is not None else step * 2 / 3
        name = f"{label} (124M-equivalent MFU, {r:,.0f} tok/s)" if key != "124m" else f"{r:,.0f} tok/s"
        cases.append(Case(shape, mb, step, bwd, name, a))
    return shape, cases


def fmt_ms(x):
    return f"{x * 1e3:.1f}" if x * 1e3 < 1000 else f"{x * 1e3:,.0f}"


def table(cases, gpus, bucket_list, algos, zero, net):
    head = "| GPUs | all-reduce | bucket |" if not zero else "| GPUs | reduce-scatter / all-gather | bucket |"
    sep = "|---|---|---|"
    for i, c in enumerate(cases):
        head += f" step ms ({chr(65 + i)}) | exposed ms ({chr(65 + i)}) |"
        if zero:
            head += f" gather ms ({chr(65 + i)}) |"
            sep += "---|"
        head += f" efficiency ({chr(65 + i)}) |"
        sep += "---|---|---|"
    lines = [head, sep]
    for n in gpus:
        node_algos = ["ring"] if n <= net.g else algos
        for algo in node_algos:
            for b in bucket_list:
                row = f"| {n} | {algo if n > net.g else 'ring (NVLink)'} | {bucket_label(b)} |"
                for c in cases:
                    r = simulate(c, n, b, algo, zero, net)
                    row += f" {fmt_ms(r['step'])} | {fmt_ms(r['exposed'])} |"
                    if zero:
                        row += f" {fmt_ms(r['gather'])} |"
                    row += f" {c.single() / r['step'] * 100:.1f}% |"
                lines.append(row)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["124m", "1.5b", "both"], default="both")
    p.add_argument("--micro-batch", type=int, help="sequences of 1024 tokens per GPU (default: 32 for 124M, 8 for 1.5B)")
    p.add_argument("--tok-s", type=float, nargs="+", help="GPT-2 124M single-GPU rates to model (default 300000 575000)")
    p.add_argument("--step-ms", type=float, help="measured single-GPU step (one micro-batch, optimizer included); replaces the rates")
    p.add_argument("--backward-ms", type=float, help="measured backward pass (default: 2/3 of the step)")
    p.add_argument("--busbw-gbs", type=float, default=370.0, help="NCCL all-reduce bus bandwidth inside a node (GB/s)")
    p.add_argument("--nvls-gbs", type=float, default=480.0, help="the same with NVLink SHARP, large messages (GB/s)")
    p.add_argument("--nic-gbs", type=float, default=45.0, help="achievable bandwidth of one GPU's 400 Gb/s NIC (GB/s)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--alpha-intra-us", type=float, default=5.0, help="latency per algorithm step inside a node")
    p.add_argument("--alpha-inter-us", type=float, default=15.0, help="latency per algorithm step between nodes")
    p.add_argument("--hbm-tbs", type=float, default=3.0, help="HBM bandwidth for the optimizer (TB/s, read + write)")
    p.add_argument("--opt-bytes", type=float, default=34.0, help="optimizer + norm bytes moved per parameter")
    p.add_argument("--hier-serial", action="store_true", help="hierarchical phases one after another, not pipelined")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (only the last one's backward overlaps)")
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--buckets", nargs="+", default=["25", "100", "one"], help="bucket sizes in MB, or 'one'")
    p.add_argument("--no-zero", action="store_true", help="skip the ZeRO-1 tables")
    a = p.parse_args(argv)
    if a.step_ms is not None and a.model == "both":
        p.error("--step-ms is one model's measured step: name the model with --model 124m or --model 1.5b")
    net = Net(a)
    bucket_list = [None if b == "one" else float(b) for b in a.buckets]
    keys = ["124m", "1.5b"] if a.model == "both" else [a.model]
    out = sys.stdout.write

    out("### Inputs\n\n")
    out(f"- NVLink all-reduce bus bandwidth {a.busbw_gbs:g} GB/s (NVLS {a.nvls_gbs:g}); one {a.nic_gbs:g} GB/s NIC "
        f"per GPU, {a.gpus_per_node} GPUs per node; latency {a.alpha_intra_us:g} us per step inside a node, "
        f"{a.alpha_inter_us:g} us between nodes; hierarchical phases "
        f"{'serial' if a.hier_serial else 'pipelined'}.\n")
    out(f"- Optimizer: {a.opt_bytes:g} bytes per parameter at {a.hbm_tbs:g} TB/s; {a.accum} micro-batch(es) per step.\n")
    all_cases = {}
    for key in keys:
        shape, cases = make_cases(key, a)
        all_cases[key] = (shape, cases)
        head, block = shape.backward_shares()
        out(f"- {MODELS[key]['name']}: {shape.params / 1e6:,.1f}M parameters in the flat vector "
            f"({4 * shape.params / MB:,.1f} MB of fp32 gradients; wte {shape.wte / 1e6:.1f}M = "
            f"{4 * shape.wte / MB:.1f} MB), {shape.flops_per_token() / 1e9:.3f} GFLOP/token, micro-batch "
            f"{cases[0].micro_batch} x {shape.T}; backward shares: LM head {head * 100:.1f}%, each block "
            f"{block * 100:.2f}%, embeddings 0; optimizer {cases[0].opt_s * 1e3:.2f} ms.\n")
        for i, c in enumerate(cases):
            out(f"  - ({chr(65 + i)}) {c.label}: single-GPU step {c.single() * 1e3:.1f} ms, backward "
                f"{c.backward_s * 1e3:.1f} ms\n")

    for key in keys:
        shape, cases = all_cases[key]
        name = MODELS[key]["name"]
        out(f"\n### {name}: all-reduce (ZeRO 0)\n\n")
        out(table(cases, a.gpus, bucket_list, ["ring", "hier"], False, net) + "\n")
        if not a.no_zero:
            out(f"\n### {name}: ZeRO-1 (reduce-scatter during backward, all-gather of {GATHER_BYTES:g} bytes/param "
                "after AdamW)\n\n")
            out(table(cases, a.gpus, bucket_list, ["ring", "hier"], True, net) + "\n")

    # One node: ring at the NVLink figure against NVLS's large-message figure (an upper bound for small buckets).
    if any(n == a.gpus_per_node for n in a.gpus):
        n = a.gpus_per_node
        out(f"\n### One node of {n}: ring ({a.busbw_gbs:g} GB/s) against NVLS ({a.nvls_gbs:g} GB/s, published for "
            "messages over 256 MB), exposed ms / efficiency\n\n")
        out("| model | rate | bucket | ring | NVLS |\n|---|---|---|---|---|\n")
        for key in keys:
            _, cases = all_cases[key]
            for i, c in enumerate(cases):
                for b in bucket_list:
                    cells = []
                    for algo in ("ring", "nvls"):
                        r = simulate(c, n, b, algo, False, net)
                        cells.append(f"{fmt_ms(r['exposed'])} / {c.single() / r['step'] * 100:.1f}%")
                    out(f"| {MODELS[key]['name']} | ({chr(65 + i)}) | {bucket_label(b)} | {cells[0]} | {cells[1]} |\n")

    # The bucket timeline behind one row, to show what is hidden and what is exposed.
    key = keys[0]
    shape, cases = all_cases[key]
    c = cases[-1]
    n = a.gpus[0]
    b = bucket_list[0]
    r = simulate(c, n, b, "ring", False, net, keep_timeline=True)
    out(f"\n### Timeline: {MODELS[key]['name']}, {n} GPUs, ring, {buckets_phrase(b)}, rate ({chr(64 + len(cases))})\n\n")
    out(f"Backward pass: 0 to {c.backward_s * 1e3:.1f} ms. Times in ms from the start of the backward pass.\n\n")
    out("| bucket | elements | MB | holds | ready | all-reduce start | end |\n|---|---|---|---|---|---|---|\n")
    for j, (lo, hi, ready, begin, end) in enumerate(r["timeline"]):
        out(f"| {j} | {lo:,}..{hi:,} | {4 * (hi - lo) / MB:.1f} | {describe(shape, lo, hi)} | {ready * 1e3:.1f} | "
            f"{begin * 1e3:.2f} | {end * 1e3:.2f} |\n")
    out(f"\nExposed after the backward pass: {r['exposed'] * 1e3:.2f} ms; two small all-reduces "
        f"{r['sync'] * 1e3:.2f} ms; step {r['step'] * 1e3:.1f} ms against {c.single() * 1e3:.1f} ms on one GPU "
        f"({c.single() / r['step'] * 100:.1f}%).\n")

    # Memory per GPU from kiln's own allocation sizes (crates/kiln-model/src/model.rs), not measured.
    out("\n### Memory per GPU (kiln's allocation formula; not measured; no CUDA context, cuBLAS or NCCL buffers)\n\n")
    out("| model | micro-batch | activations GiB | model state GiB, ZeRO 0 | total, ZeRO 0 | total, ZeRO-1 at 8 GPUs |"
        "\n|---|---|---|---|---|---|\n")
    for key in keys:
        shape = all_cases[key][0]
        mbs = [16, 32] if key == "124m" else [4, 8, 16]
        for mb in mbs:
            act = activation_bytes(shape, mb)
            state0 = (BF16 + MASTER + GRAD + MOMENTS) * shape.params  # 18 bytes per parameter
            state1 = (BF16 + GRAD + (MASTER + MOMENTS) / 8) * shape.params  # ZeRO-1 shards master, m and v
            gib = 2.0 ** 30
            out(f"| {MODELS[key]['name']} | {mb} | {act / gib:.1f} | {state0 / gib:.1f} | {(act + state0) / gib:.1f} | "
                f"{(act + state1) / gib:.1f} |\n")

    if "124m" in keys and a.gpus_per_node in a.gpus and a.step_ms is None:
        out("\n### Summary for docs/benchmarks.md: GPT-2 124M, 1 -> 8 GPUs, B=32, T=1024, ring over NVLink\n\n")
        _, cases = all_cases["124m"]
        for b in bucket_list:
            cells = []
            for c in cases:
                r = simulate(c, a.gpus_per_node, b, "ring", False, net)
                cells.append(f"{c.label}: {c.single() / r['step'] * 100:.1f}% (exposed {r['exposed'] * 1e3:.2f} ms)")
            out(f"- {buckets_phrase(b)}: " + "; ".join(cells) + "\n")


def describe(shape, lo, hi):
    """Which tensors a range of the flat vector covers, in words."""
    parts = []
    spans = [("wte", 0, shape.wte), ("wpe", shape.wte, shape.wte + shape.wpe)]
    for i in range(shape.L):
        spans.append((f"h.{i}", shape.block_start(i), shape.block_start(i) + shape.block))
    spans.append(("ln_f", shape.lnf_start(), shape.lnf_start() + shape.lnf))
    for name, a, b in spans:
        if a < hi and lo < b:
            parts.append(name)
    if hi > shape.params:
        parts.append("pad")
    return parts[0] if len(parts) == 1 else f"{parts[0]}..{parts[-1]}"


def activation_bytes(shape, mb):
    """crates/kiln-model/src/model.rs: activations (bf16), statistics (fp32), token ids and targets (u32)."""
    n = mb * shape.T
    c, L = shape.C, shape.L
    acts = L * n * c * 16 + 3 * n * c + n * PADDED_VOCAB + n * c * (1 + 1 + 3 + 4)
    stats = L * (4 * n + mb * shape.H * shape.T) + 3 * n
    return 2 * acts + 4 * stats + 4 * 2 * n


if __name__ == "__main__":
    main()
