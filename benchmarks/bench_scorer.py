"""Cost of the scorer, measured side by side in one run on the same model and batch.

    python benchmarks/bench_scorer.py [--quick] [--threads N] [--device cuda]
    python benchmarks/bench_scorer.py --rows [--quick]     # only the loop vs batched table
    python benchmarks/bench_scorer.py --bounded [--quick]  # only the memory-bounded rows table

For an MLP, a small CNN and a small ViT (patch embedding + 2 blocks through
``scaled_dot_product_attention``, mean-pooled), prints one table:
- exact / floor: ``score_samples`` (exact) over the floor = one forward + K input-only VJPs
  (a bare ``autograd.grad`` loop over ``f(x).sum(0)[k]``, nothing else). Target <= 1.2. Shown for the
  default micro-batch sizing ("auto") and for ``batch_size=B`` (one chunk).
- paper / ours: the paper's listing (``autograd.functional.jacobian`` of ``lambda x: f(x).sum(0)``,
  then ``svdvals`` of the (B, K, D) Jacobian) over ours. Target > 1.
- peak memory: the increase of resident memory while scoring, sampled every 0.5 ms in a fresh
  child process per cell, for the floor, ours (``memory_bytes`` = 8 MiB, which bounds the Jacobian
  chunk, not the activations) and the paper's listing.
- slq vs exact at K = 256 and 1024: exact time / SLQ time (default options: 8 probes, 24 steps)
  and Spearman of the two scores.
Then loop vs batched Jacobian rows (``score_samples(..., vectorize=None | 16 | 64 | "auto")``, one
micro-batch) on the demo encoder, a demo-sized MLP and the three models above, at 16 rows (the
curation gate's size) and a full batch; memory-bounded rows (``embedding_and_gram`` with budgets of
a half and a quarter of the unbounded rows: time, recomputed rows, score difference); then SLQ
against exact as the Jacobian gets ill-conditioned (Spearman, mean bias). ``--device cuda`` runs the models on the GPU (peak memory is then
``torch.cuda.max_memory_allocated`` over the call instead of resident memory).

Timings are medians of interleaved repeats (each candidate runs once per round, in turn), so load
from other processes hits all candidates alike. Single-threaded by default: on a shared 2-core
machine, OpenMP threads that spin-wait for a busy core cost 100x on small ops.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from jepa_monitor import score_samples
from jepa_monitor.jacobian import cached_vectorize_decisions, describe_mode

IMAGE = (3, 32, 32)
DEVICE = torch.device("cpu")  # set by --device


class MLP(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        d = IMAGE[0] * IMAGE[1] * IMAGE[2]
        width = max(512, k)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, k))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32 * 8 * 8, k)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t):
        b, n, c = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        t = t + self.proj(a)
        return t + self.mlp(self.norm2(t))


class ViT(nn.Module):
    """Patch 4 → 64 tokens of width 64, 2 blocks, a per-token head, mean pooling.

    The head acts per token before pooling so that K = 1024 is not capped at rank 64 by the
    pooled width.
    """

    def __init__(self, k: int, dim: int = 64):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.pos = nn.Parameter(0.02 * torch.randn(1, 64, dim))
        self.blocks = nn.Sequential(Block(dim, 4), Block(dim, 4))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, k), nn.GELU(), nn.Linear(k, k))

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.blocks(t)).mean(1)


MODELS = {"mlp": MLP, "cnn": CNN, "vit": ViT}


def build(name: str, k: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name](k).eval().to(DEVICE)


def batch(n: int, seed: int = 1, shape: tuple = IMAGE) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def floor(model, x):
    leaf = x.detach().clone().requires_grad_(True)
    z = model(leaf).sum(0)
    for k in range(z.shape[0]):
        torch.autograd.grad(z[k], leaf, retain_graph=True)


def paper_listing(model, x):
    jac = torch.autograd.functional.jacobian(lambda v: model(v).sum(0), x)  # (K, B, ...)
    jac = jac.flatten(2).transpose(0, 1)
    return torch.linalg.svdvals(jac).clamp_min(1e-6).log().sum(1)


def interleaved(fns: dict, repeats: int, warmup: bool = True) -> dict:
    """Median seconds per candidate over rounds of one call each, in turn (after a warm-up round)."""
    times = {name: [] for name in fns}
    for rnd in range(repeats + int(warmup)):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            if rnd or not warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def child_memory(args) -> None:
    """Peak RSS increase (MiB) over one scoring call, in this fresh process.

    A thread samples the resident set size every 0.5 ms (torch ops release the GIL), so the peak of
    anything that lives longer than that is caught; glibc returns large freed blocks to the OS at
    once, so RSS follows what is live.
    """
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    model, x = build(args.model, args.k), batch(args.batch)
    with torch.no_grad():
        model(x[:1])
    if DEVICE.type == "cuda":
        _sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        before = torch.cuda.memory_allocated(DEVICE)
        _run_child(args, model, x)
        _sync()
        print(json.dumps({"increase_mib": (torch.cuda.max_memory_allocated(DEVICE) - before) / 2**20}))
        return
    before = _rss_mib()
    peak, stop = [before], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    _run_child(args, model, x)
    stop.set()
    sampler.join()
    print(json.dumps({"increase_mib": peak[0] - before}))


def _run_child(args, model, x) -> None:
    if args.child == "exact":
        score_samples(model, x, memory_bytes=args.budget)
    elif args.child == "floor":
        floor(model, x)
    else:
        paper_listing(model, x)


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def memory(model: str, k: int, b: int, what: str, budget: int, threads: int) -> str:
    cmd = [sys.executable, __file__, "--child", what, "--model", model, "--k", str(k), "--batch", str(b),
           "--budget", str(budget), "--threads", str(threads), "--device", str(DEVICE)]
    out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    return f"{out['increase_mib']:.0f}"


def saturated_mlp(gain: float) -> nn.Module:
    """96 → 128 → 64 tanh MLP; a larger first-layer gain saturates more tanh units, sample by
    sample, which drives some singular values of J towards 0 (ill-conditioned, sample-dependent)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(96, 128), nn.Tanh(), nn.Linear(128, 64)).eval()
    with torch.no_grad():
        net[0].weight.mul_(gain)
    return net


def conditioning_table(settings: tuple) -> None:
    """Where SLQ ranks like the exact score: Spearman (and mean bias, nats) against conditioning."""
    x = torch.randn(48, 96, generator=torch.Generator().manual_seed(2))
    print("\nSLQ vs exact against the conditioning of J (96 -> 128 -> 64 tanh MLP, B=48); "
          "cells: Spearman / mean bias in nats, for (probes, Lanczos steps):")
    print("| first-layer gain | median cond(J) | exact score std | " + " | ".join(f"{p}, {m}" for p, m in settings) + " |")
    print("|---|---|---|" + "---|" * len(settings))
    for gain in (0.5, 1.0, 3.0, 10.0, 30.0):
        net = saturated_mlp(gain)
        exact = score_samples(net, x).jepa_score
        conds = [torch.linalg.cond(torch.autograd.functional.jacobian(lambda v: net(v[None])[0], row)) for row in x[:8]]
        rhos = []
        for p, m in settings:
            approx = score_samples(net, x, method="slq", approx_options=dict(num_probes=p, lanczos_steps=m)).jepa_score
            rho = scipy.stats.spearmanr(exact.numpy(), approx.numpy()).statistic
            rhos.append(f"{rho:.3f} / {float((approx - exact).mean()):+.2f}")
        print(f"| {gain:g} | {statistics.median(float(c) for c in conds):.3g} | {float(exact.std()):.2f} | "
              + " | ".join(rhos) + " |")


def breakdown(ks: tuple, b: int = 6) -> None:
    """Where the exact path's time goes, stage by stage, on one micro-batch of ``b`` samples."""
    from jepa_monitor._guards import scoring_context
    from jepa_monitor.jacobian import embedding_and_jacobian
    from jepa_monitor.logdet import gram, half_logdet

    print(f"\nExact path, stage by stage (seconds, B={b}, median of 3 interleaved):")
    print("| model | K | floor | Jacobian rows | float64 Gram | half_logdet | rows on eigvalsh path |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        for k in ks:
            model, x = build(name, k), batch(b)
            with scoring_context(model, x.device):
                _, jac = embedding_and_jacobian(model, x)
                g = gram(jac)
                t = interleaved({
                    "floor": lambda: floor(model, x),
                    "rows": lambda: embedding_and_jacobian(model, x),
                    "gram": lambda: gram(jac),
                    "logdet": lambda: half_logdet(g),
                }, 3)
            trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)
            eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
            # half_logdet's fast path needs Cholesky of G - rel²·trace·I to succeed.
            slow = int((torch.linalg.cholesky_ex(g - 1e-12 * trace[:, None, None] * eye)[1] != 0).sum())
            print(f"| {name} | {k} | {t['floor']:.3f} | {t['rows']:.3f} | {t['gram']:.3f} | {t['logdet']:.3f} | {slow}/{b} |")


def sweep(k: int = 256, b: int = 24) -> None:
    """SLQ settings on the benchmark models: probe noise or Lanczos bias?"""
    settings = ((8, 24), (32, 24), (8, 64))
    print(f"\nSLQ settings on the benchmark models (K={k}, B={b}); cells: Spearman / mean bias in nats, "
          "for (probes, Lanczos steps):")
    print("| model | exact score std | " + " | ".join(f"{p}, {m}" for p, m in settings) + " |")
    print("|---|---|" + "---|" * len(settings))
    for name in MODELS:
        model, x = build(name, k), batch(b, seed=2)
        exact = score_samples(model, x).jepa_score
        cells = []
        for p, m in settings:
            approx = score_samples(model, x, method="slq", approx_options=dict(num_probes=p, lanczos_steps=m)).jepa_score
            rho = scipy.stats.spearmanr(exact.cpu().numpy(), approx.cpu().numpy()).statistic
            cells.append(f"{rho:.3f} / {float((approx - exact).mean()):+.2f}")
        print(f"| {name} | {float(exact.std()):.2f} | " + " | ".join(cells) + " |")


class DemoSizedMLP(nn.Module):
    """The demo encoder's shape as an MLP: 8×8 input (D = 64) -> 64 -> 64 -> K = 16, GELU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))

    def forward(self, x):
        return self.net(x)


def _device_name() -> str:
    return f"CUDA ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else "CPU"


def rows_table(quick: bool, repeats: int) -> None:
    """Loop vs batched vs replicated Jacobian rows through ``score_samples``, one micro-batch
    (``batch_size=B``).

    Candidates, interleaved in one process: ``vectorize=None`` (one backward per row), 16 and 64
    rows per vmapped backward, ``"replicated"`` (16 rows per forward + backward over the repeated
    samples; 64 on a GPU) and ``"auto"`` (measured once per model and micro-batch size class in the
    warm-up round, then cached; the choice is printed). Ratios are loop time / candidate time (> 1:
    faster than the loop). The demo encoders are also run at B = 1 and 4: the curation gate scores
    a few rows at a time.
    """
    from jepa_monitor.demo.model import DigitEncoder

    def demo():
        torch.manual_seed(0)
        return DigitEncoder().eval().to(DEVICE)

    def demo_mlp():
        torch.manual_seed(0)
        return DemoSizedMLP().eval().to(DEVICE)

    full = 64 if quick else 128
    cases = [("demo DigitEncoder", demo, (1, 8, 8), (1, 4, 16, full)), ("demo-sized MLP", demo_mlp, (1, 8, 8), (1, 4, 16, full))]
    for name in MODELS:
        cases.append((f"{name} (K=64)", lambda name=name: build(name, 64), IMAGE, (16,) if quick else (16, 64)))
    print(f"\nLoop vs batched Jacobian rows ({_device_name()}, {torch.get_num_threads()} thread(s), one micro-batch, "
          f"median of {repeats} interleaved repeats; ratio = loop time / candidate time):")
    print("| model | K | D | B | loop s | W=16 s | W=64 s | replicated s | auto s (choice) | loop/W=16 | loop/W=64 "
          "| loop/replicated | loop/auto | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, make, shape, sizes in cases:
        for b in sizes:
            model, x = make(), batch(b, seed=3, shape=shape)
            scores = {}

            def run(key, vectorize, model=model, x=x, b=b):
                scores[key] = score_samples(model, x, batch_size=b, vectorize=vectorize).jepa_score

            k = model(x[:1]).shape[1]
            fns = {"loop": lambda: run("loop", None), "16": lambda: run("16", 16)}
            if k > 16:
                fns["64"] = lambda: run("64", 64)
            fns["replicated"] = lambda: run("replicated", "replicated")
            fns["auto"] = lambda: run("auto", "auto")
            t = interleaved(fns, repeats)
            choice = ",".join(describe_mode(m) for m in cached_vectorize_decisions(model).values()) or "?"
            ref = scores["loop"].double()
            diff = max(float(((scores[c].double() - ref).abs() / ref.abs().clamp_min(1e-12)).max()) for c in fns)
            w64 = f"{t['64']:.4f}" if "64" in t else "-"
            r64 = f"{t['loop'] / t['64']:.2f}" if "64" in t else "-"
            print(f"| {name} | {k} | {x[0].numel()} | {b} | {t['loop']:.4f} | {t['16']:.4f} | {w64} | {t['replicated']:.4f} "
                  f"| {t['auto']:.4f} ({choice}) | {t['loop'] / t['16']:.2f} | {r64} | {t['loop'] / t['replicated']:.2f} "
                  f"| {t['loop'] / t['auto']:.2f} | {diff:.1e} |", flush=True)


def bounded_table(quick: bool, repeats: int) -> None:
    """Memory-bounded Jacobian rows: ``embedding_and_gram`` under budgets of a half and a quarter of
    what the unbounded call holds (``full_jacobian_bytes``), against the unbounded call: time,
    recomputed rows (the plan) and the score difference. Loop rows (``vectorize=None``), one
    micro-batch of B samples."""
    from jepa_monitor._guards import scoring_context
    from jepa_monitor.jacobian import embedding_and_gram, full_jacobian_bytes, plan_rows
    from jepa_monitor.logdet import half_logdet

    k, b = (128, 4) if quick else (256, 4)
    d = IMAGE[0] * IMAGE[1] * IMAGE[2]
    full = full_jacobian_bytes(b, k, d)
    budgets = {"unbounded": None, "unbounded bytes / 2": full // 2, "unbounded bytes / 4": full // 4}
    print(f"\nMemory-bounded Jacobian rows ({_device_name()}, K={k}, B={b}, D={d}, loop rows, median of {repeats} "
          f"interleaved repeats; unbounded rows: float32 + float64 column chunk + Gram = {full / 2**20:.1f} MiB):")
    print("| model | memory_bytes | held rows | groups | row-VJPs / K | planned MiB | s | s / unbounded | max abs score diff (nats) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        model, x = build(name, k), batch(b, seed=4)
        grams = {}

        def run(label, budget, model=model, x=x):
            with scoring_context(model, x.device):
                grams[label] = embedding_and_gram(model, x, memory_bytes=budget)[1]

        t = interleaved({label: (lambda label=label, budget=budget: run(label, budget)) for label, budget in budgets.items()}, repeats)
        ref = half_logdet(grams["unbounded"])[0]
        for label, budget in budgets.items():
            plan = plan_rows(b, k, d, budget)
            diff = float((half_logdet(grams[label])[0] - ref).abs().max())
            mib = "-" if budget is None else f"{budget / 2**20:.2f}"
            print(f"| {name} | {label} ({mib} MiB) | {plan.held} | {plan.groups} | {plan.vjp_rows / k:.2f} | "
                  f"{plan.planned_bytes / 2**20:.2f} | {t[label]:.3f} | {t[label] / t['unbounded']:.2f} | {diff:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats (~2 min)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep", action="store_true",
                        help="only print SLQ accuracy for three settings on the benchmark models at K = 256 (~5 min)")
    parser.add_argument("--breakdown", action="store_true",
                        help="only print the exact path's time stage by stage at K = 64 and 1024 (~10 min on a busy 2-core machine)")
    parser.add_argument("--rows", action="store_true",
                        help="only print the loop vs batched Jacobian rows table (~2 min on CPU, ~40 s with --quick)")
    parser.add_argument("--bounded", action="store_true",
                        help="only print the memory-bounded rows table (~2 min on CPU, ~1 min with --quick)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--child", choices=["exact", "floor", "paper"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(args)
        return

    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.rows:
        rows_table(args.quick, 3 if args.quick else 5)
        return
    if args.bounded:
        bounded_table(args.quick, 3)
        return
    if args.breakdown:
        breakdown((64, 1024))
        return
    if args.sweep:
        sweep()
        return
    k_small, b, repeats = 64, (8 if args.quick else 16), (3 if args.quick else 5)
    # The K = 64 rounds have warmed every code path up; the large-K rounds are too costly to repeat.
    b_approx, repeats_approx = (16 if args.quick else 24), 1
    k_big = (256,) if args.quick else (256, 1024)
    budget = 8 * 2**20
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {_device_name()}, input {IMAGE}, "
          f"B={b} at K={k_small}, B={b_approx} for slq vs exact, memory_bytes={budget // 2**20} MiB, "
          f"median of {repeats} interleaved repeats (large K: one run each)")
    header = ("model", "floor s", "exact/floor auto", "exact/floor B", "paper/ours", "peak MiB floor",
              "peak MiB exact", "peak MiB paper", *[f"K={k}: exact/slq, rho" for k in k_big])
    rows, began = [], time.perf_counter()
    for name in MODELS:
        model, x = build(name, k_small), batch(b)
        t = interleaved({
            "floor": lambda: floor(model, x),
            "auto": lambda: score_samples(model, x),
            "one_chunk": lambda: score_samples(model, x, batch_size=b),
            "paper": lambda: paper_listing(model, x),
        }, repeats)
        row = [name, f"{t['floor']:.3f}", f"{t['auto'] / t['floor']:.2f}", f"{t['one_chunk'] / t['floor']:.2f}",
               f"{t['paper'] / t['auto']:.2f}", memory(name, k_small, b, "floor", budget, args.threads),
               memory(name, k_small, b, "exact", budget, args.threads),
               memory(name, k_small, b, "paper", budget, args.threads)]
        for k in k_big:
            model_k, xa = build(name, k), batch(b_approx, seed=2)
            scores = {}

            def run(method, model_k=model_k, xa=xa):
                scores[method] = score_samples(model_k, xa, method=method).jepa_score

            t = interleaved({"exact": lambda: run("exact"), "slq": lambda: run("slq")}, repeats_approx, warmup=False)
            rho = scipy.stats.spearmanr(scores["exact"].cpu().numpy(), scores["slq"].cpu().numpy()).statistic
            row.append(f"{t['exact'] / t['slq']:.2f}, {rho:.2f}")
        rows.append(row)
        print(f"  {name} done after {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    rows_table(args.quick, repeats)
    bounded_table(args.quick, 3)
    conditioning_table(((8, 24),) if args.quick else ((8, 24), (32, 24), (8, 64)))


if __name__ == "__main__":
    main()
