"""Exact JEPA-SCORE on a ViT: seconds per image for every way of scoring, and what 224 px costs.

    python benchmarks/bench_vit.py                      # ViT-tiny shape at 32 px, CPU (~3 min)
    python benchmarks/bench_vit.py --quick              # one image, one round (~1 min)
    python benchmarks/bench_vit.py --device cuda --config tiny32 s16_224 b16_224
    python benchmarks/bench_vit.py --big                # the 224 px configs on CPU (hours: don't)
    python benchmarks/bench_vit.py --loop               # the monitor's time share in a CPU training loop (~2 min)

The encoder: a patch-embedding convolution, a CLS token and learned positions, pre-norm
transformer blocks through ``F.scaled_dot_product_attention`` (MLP ratio 4, GELU), a final
LayerNorm; the embedding is the CLS token (``--pool first``, default) or the token mean
(``--pool mean``). Random init (scoring cost does not depend on the weights). Configurations:

- ``tiny32``: ViT-Ti width at 32 px: patch 4 (64 tokens + CLS), width K = 192, 3 heads, 4 blocks
  (ViT-Ti has 12; 4 keeps the CPU run short). D = 3·32·32 = 3072.
- ``s16_224``: ViT-S/16 at 224 px: 196 tokens + CLS, K = 384, 6 heads, 12 blocks. D = 150528.
- ``b16_224``: ViT-B/16 at 224 px: K = 768, 12 heads, 12 blocks. D = 150528.
  The 224 px configurations run only on a GPU (or with ``--big``).

Per configuration, seconds per image (median over interleaved rounds, each candidate once per
round, in turn, after a warm-up round) of:
- floor: one forward pass plus K input-only backward passes (``autograd.grad`` of
  ``f(x).sum(0)[k]`` in a loop), measured directly: nothing any exact method can beat.
- exact (loop): ``jepa_monitor.score_samples(encoder, x, vectorize=None)``.
- exact (batched): the same with ``vectorize=W`` rows per vmapped backward (W = 16 on CPU, 64 on
  GPU), and with ``vectorize="auto"`` (the decision it cached is printed).
- SLQ: ``score_samples(..., method="slq")`` at its defaults (8 probes, 24 Lanczos steps).

FLOPs of one forward and one input-only backward pass per image are counted with
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (2 FLOPs per multiply-add; matmul,
convolution and attention only). Printed first (no measurement needed): the projected seconds to
score 128 held-out images with ViT-S/16 and ViT-B/16 at 224 px at assumed FP32 rates, for the rows
the memory budget lets one image hold (see ``projection``). Then one row per configuration as it
finishes, with the achieved FLOP rate of the floor and 128 × the fastest measured exact s/image.

``--loop`` (instead of the above): the monitor's time share at its default budget in a Lightning
training loop on CPU. The encoder is the ViT-Ti width at 32 px (patch 4, 64 tokens + CLS, K = 192,
3 heads) with ``--loop-depth`` blocks (default 1: one held-out evaluation of 128 images at 4 blocks
takes ~4 minutes on one CPU core; a block more or less scales a training step and an evaluation
alike), embedding = the CLS token. Data: the 8×8 digits upscaled to 32 px (bilinear, 3 channels);
training on the demo's training split, the rest (872 images) is the held-out set. Loss: two views
(random shift of up to 2 px, ±20 % contrast, pixel noise 0.1), LeJEPA (invariance + SIGReg), AdamW,
batch ``--loop-batch`` (64), ``--loop-steps`` (40) steps. Three fits, same seed, same batches:
without the monitor, with ``JEPAScoreMonitor(encoder="encoder", heldout=..., input_key=0)`` at its
defaults (budget 0.05, 128 held-out rows scored, 4·K = 768 embedded for trust, 16 incoming rows
after each held-out evaluation), without again. Printed: the wall time of each fit, the monitor's
logged ``time/*`` metrics (the last values logged, and at which batch), its own share at the end of
fit, the share measured from outside (wall seconds inside the monitor's hooks, fit start apart) and
the planned ``heldout_gap`` (read from ``monitor.schedule`` when it was never logged).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jepa_monitor import score_samples
from jepa_monitor.jacobian import cached_vectorize_decisions, describe_mode, plan_rows

DEFAULT_BUDGET = 256 * 2**20  # score_samples' default memory_bytes

CONFIGS: Dict[str, dict] = {
    "tiny32": dict(img=32, patch=4, dim=192, depth=4, heads=3),
    "s16_224": dict(img=224, patch=16, dim=384, depth=12, heads=6),
    "b16_224": dict(img=224, patch=16, dim=768, depth=12, heads=12),
}
NAMES = {"tiny32": "ViT-Ti width, 4 blocks, 32 px", "s16_224": "ViT-S/16, 224 px", "b16_224": "ViT-B/16, 224 px"}


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        q, k, v = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        t = t + self.proj(a)
        return t + self.mlp(self.norm2(t))


class ViT(nn.Module):
    """(B, 3, H, W) -> (B, 1 + tokens, K) normalised tokens; pool with "first" (CLS) or "mean"."""

    def __init__(self, img: int, patch: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (img // patch) ** 2
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.norm(self.blocks(t))


def pool_tokens(t: torch.Tensor, pool: str) -> torch.Tensor:
    return t[:, 0] if pool == "first" else t.mean(1)


def build(name: str, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ViT(**CONFIGS[name]).to(device).eval()


def flops_per_image(name: str, pool: str) -> tuple:
    """(forward FLOPs, one input-only backward pass's FLOPs) for one image, counted on meta."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = ViT(**cfg)
        x = torch.empty(1, 3, cfg["img"], cfg["img"], requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        z = pool_tokens(model(x), pool)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(z[:, 0].sum(), x, retain_graph=True)
    return forward, counter.get_total_flops()


def floor(model: nn.Module, x: torch.Tensor, pool: str) -> None:
    leaf = x.detach().clone().requires_grad_(True)
    z = pool_tokens(model(leaf), pool).sum(0)
    for k in range(z.shape[0]):
        torch.autograd.grad(z[k], leaf, retain_graph=True)


def interleaved(fns: Dict[str, Callable[[], None]], repeats: int, device: torch.device) -> Dict[str, float]:
    """Median seconds per candidate over ``repeats`` rounds of one call each, after a warm-up round."""
    times: Dict[str, list] = {name: [] for name in fns}
    for rnd in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if rnd:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, args, device: torch.device) -> dict:
    model = build(name, device)
    cfg = CONFIGS[name]
    x = torch.randn(args.images, 3, cfg["img"], cfg["img"], generator=torch.Generator().manual_seed(1)).to(device)
    k_dim, d_dim = cfg["dim"], 3 * cfg["img"] ** 2
    width = args.width or (16 if device.type == "cpu" else 64)
    opts = dict(pool=args.pool, memory_bytes=args.budget)
    scores = {}

    def scorer(key: str, **extra) -> Callable[[], None]:
        def run() -> None:
            scores[key] = score_samples(model, x, **opts, **extra).jepa_score
        return run

    fns = {"floor": lambda: floor(model, x, args.pool), "loop": scorer("loop", vectorize=None),
           "batched": scorer("batched", vectorize=width), "auto": scorer("auto", vectorize="auto")}
    if not args.no_slq:
        fns["slq"] = scorer("slq", method="slq")
    t = interleaved(fns, args.repeats, device)
    f_fwd, f_bwd = flops_per_image(name, args.pool)
    decision = cached_vectorize_decisions(model)
    agree = max(float((scores[k] - scores["loop"]).abs().max()) for k in ("batched", "auto"))
    plan = plan_rows(1, k_dim, d_dim, args.budget, width)
    return dict(
        name=name, k=k_dim, d=d_dim, b=args.images, width=width, t=t, f_fwd=f_fwd, f_bwd=f_bwd,
        auto=sorted(decision.values()), agree=agree, plan=plan,
        rate=(f_fwd + k_dim * f_bwd) * args.images / t["floor"],
        spearman=_spearman(scores.get("slq"), scores["loop"]),
    )


def _spearman(a: Optional[torch.Tensor], b: torch.Tensor) -> float:
    if a is None or a.numel() < 3:
        return float("nan")
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def measured_header(out) -> None:
    print("| config | K | D | B | floor s/img | exact loop s/img | exact batched s/img (W) | exact auto s/img (choice) "
          "| SLQ s/img | loop/floor | loop/batched | max abs diff vs loop (nats) | GFLOP fwd / bwd per img "
          "| floor TFLOP/s | 128 images, fastest exact (s) |", file=out)
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", file=out, flush=True)


def measured_row(r: dict, out) -> None:
    t, b = r["t"], r["b"]
    auto = ",".join(describe_mode(m) for m in r["auto"]) or "?"
    slq = f"{t['slq'] / b:.3g}" if "slq" in t else "-"
    fastest = min(t["loop"], t["batched"], t["auto"]) / b
    print(f"| {NAMES[r['name']]} | {r['k']} | {r['d']} | {b} | {t['floor'] / b:.3g} | {t['loop'] / b:.3g} | "
          f"{t['batched'] / b:.3g} ({r['width']}) | {t['auto'] / b:.3g} ({auto}) | {slq} | "
          f"{t['loop'] / t['floor']:.2f} | {t['loop'] / t['batched']:.2f} | {r['agree']:.1e} | "
          f"{r['f_fwd'] / 1e9:.3g} / {r['f_bwd'] / 1e9:.3g} | {r['rate'] / 1e12:.3g} | {128 * fastest:.0f} |", file=out, flush=True)


def projection(pool: str, budgets: tuple, rates: Dict[str, float], out, images: int = 128) -> None:
    """Seconds to score ``images`` held-out images at 224 px, from FLOPs at given FP32 rates.

    Per image: forward FLOPs + R × one input-only backward's FLOPs, R = K (the floor: all rows
    fit) or R = the row-VJPs ``plan_rows`` needs to keep one image's Jacobian rows within the
    budget (rows recomputed group by group). The scorer disables TF32, so the rate is plain FP32.
    Overheads beyond FLOPs (kernel launches at micro-batch 1, the float64 Gram and logdet) are
    not modelled: multiply by the measured exact/floor ratio where a GPU run gives one.
    """
    cols = dict(rates)
    print(f"\nProjected seconds to score {images} images (pool={pool}), FLOPs / rate:", file=out)
    print("| encoder | K | TFLOP/img floor | rows budget | row-VJPs R | R/K | TFLOP/img | "
          + " | ".join(f"s @ {c} ({v / 1e12:.3g} TFLOP/s)" for c, v in cols.items()) + " |", file=out)
    print("|---|---|---|---|---|---|---|" + "---|" * len(cols), file=out)
    for name in ("s16_224", "b16_224"):
        cfg = CONFIGS[name]
        k, d = cfg["dim"], 3 * cfg["img"] ** 2
        f_fwd, f_bwd = flops_per_image(name, pool)
        for budget in budgets:
            plan = plan_rows(1, k, d, budget, 64)
            per_image = f_fwd + plan.vjp_rows * f_bwd
            label = "unbounded" if budget is None else f"{budget / 2**20:.0f} MiB"
            print(f"| {NAMES[name]} | {k} | {(f_fwd + k * f_bwd) / 1e12:.3g} | {label} | {plan.vjp_rows} | "
                  f"{plan.vjp_rows / k:.2f} | {per_image / 1e12:.3g} | "
                  + " | ".join(f"{images * per_image / v:.0f}" for v in cols.values()) + " |", file=out, flush=True)


# ---------------------------------------------------------------------------------- --loop
def monitor_loop(args) -> None:
    """The monitor's measured time share at its default budget in a CPU Lightning training loop."""
    import os
    import tempfile
    import warnings

    import lightning.pytorch as pl
    from lightning.pytorch.loggers import Logger
    from torch.utils.data import DataLoader, TensorDataset

    from jepa_monitor.callbacks import JEPAScoreMonitor
    from jepa_monitor.demo.data import make_splits, normalise
    from jepa_monitor.demo.model import lejepa_loss, sigreg_directions

    import logging

    warnings.filterwarnings("ignore")  # dataloader-worker and logger advice from Lightning
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    cfg = dict(CONFIGS["tiny32"], depth=args.loop_depth)
    k_dim = cfg["dim"]

    def upscale(images: torch.Tensor) -> torch.Tensor:
        x = normalise(images)  # (N, 1, 8, 8)
        return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()

    splits = make_splits(seed=0)
    train_x = upscale(splits.train[0])
    heldout = torch.cat([upscale(splits.reference[0]), upscale(splits.probe[0]), upscale(splits.test[0])])

    class Cls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.vit = ViT(**cfg)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(x)[:, 0]

    class SSL(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = Cls()
            self.gen = torch.Generator().manual_seed(1)

        def view(self, x: torch.Tensor) -> torch.Tensor:
            dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=self.gen))
            scale = 1.0 + 0.2 * (2 * torch.rand(x.shape[0], 1, 1, 1, generator=self.gen) - 1)
            return torch.roll(x, (dy, dx), dims=(2, 3)) * scale + 0.1 * torch.randn(x.shape, generator=self.gen)

        def training_step(self, batch, batch_idx):
            x = batch[0]
            z1, z2 = self.encoder(self.view(x)), self.encoder(self.view(x))
            return lejepa_loss(z1, z2, sigreg_directions(k_dim, self.gen))[0]

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-4)

    class Scalars(Logger):
        def __init__(self) -> None:
            super().__init__()
            self.rows = []

        @property
        def name(self):
            return "scalars"

        @property
        def version(self):
            return 0

        def log_hyperparams(self, params, *a, **kw):
            pass

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

    class HookTimed(JEPAScoreMonitor):
        """The monitor at its defaults; the wall seconds inside its hooks are counted from outside."""

        seconds = {"fit_start": 0.0, "batches": 0.0}

    def timed(name: str, bucket: str):
        def hook(self, *a, **kw):
            start = time.perf_counter()
            try:
                return getattr(JEPAScoreMonitor, name)(self, *a, **kw)
            finally:
                self.seconds[bucket] += time.perf_counter() - start
        return hook

    HookTimed.on_fit_start = timed("on_fit_start", "fit_start")
    HookTimed.on_train_batch_start = timed("on_train_batch_start", "batches")
    HookTimed.on_train_batch_end = timed("on_train_batch_end", "batches")

    class EndShare(pl.Callback):
        """The monitor's own share when fit ends (its metrics are logged only at evaluations)."""

        def __init__(self, monitor) -> None:
            self.monitor, self.share = monitor, None

        def on_train_end(self, trainer, pl_module) -> None:
            clock = getattr(self.monitor, "clock", None)
            if clock is not None and hasattr(clock, "share"):
                self.share = clock.share()
            elif getattr(self.monitor, "_t0", None) is not None:  # older accounting
                m = self.monitor
                wall = time.perf_counter() - m._t0 - m._burst
                self.share = (m._seconds_run - m._burst) / wall if wall > 0 else 0.0

    def fit(with_monitor: bool) -> dict:
        module = SSL()
        loader = DataLoader(TensorDataset(train_x), batch_size=args.loop_batch, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(2))
        logger = Scalars()
        callbacks, monitor = [], None
        if with_monitor:
            monitor = HookTimed(encoder="encoder", heldout=heldout, input_key=0)
            monitor.seconds = {"fit_start": 0.0, "batches": 0.0}
            callbacks = [monitor, EndShare(monitor)]
        with tempfile.TemporaryDirectory() as root:
            trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.loop_steps, logger=logger,
                                 callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, log_every_n_steps=10, default_root_dir=root)
            start = time.perf_counter()
            trainer.fit(module, loader)
            wall = time.perf_counter() - start
        return dict(wall=wall, logger=logger, monitor=monitor, end=callbacks[1].share if callbacks else None)

    print(f"Monitor share in a CPU training loop: torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"ViT-Ti width at 32 px, {args.loop_depth} block(s), K={k_dim}, D={3 * 32 * 32}; batch {args.loop_batch}, "
          f"{args.loop_steps} steps; {heldout.shape[0]} held-out images; JEPAScoreMonitor defaults (budget 0.05); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    runs = {}
    for label, flag in (("without", False), ("with", True), ("without again", False)):
        runs[label] = fit(flag)
        print(f"  fit {label} the monitor: {runs[label]['wall']:.1f} s", flush=True)
    r = runs["with"]
    monitor, seconds = r["monitor"], r["monitor"].seconds
    logged: Dict[str, tuple] = {}
    for step, metrics in r["logger"].rows:
        for key, value in metrics.items():
            if "/time/" in key:
                logged[key.split("/time/")[1]] = (value, step)
    history = [(h.get("batch"), h.get("split")) for h in monitor.history]
    without = statistics.mean([runs["without"]["wall"], runs["without again"]["wall"]])
    # The fit-start burst: the held-out evaluation in on_fit_start and the incoming rows scored with it
    # at batch 0 (inside the first batch hook), reported together as time/fit_start_seconds.
    burst = logged.get("fit_start_seconds", (float("nan"),))[0]
    after = r["wall"] - burst
    hooks_after = seconds["batches"] - (burst - seconds["fit_start"])
    print(f"\nEvaluations (batch, split): {history}")
    print("Last logged time/* metrics (value @ global step): "
          + ", ".join(f"{k} {v:.3g} @ {s}" for k, (v, s) in sorted(logged.items())))
    gap = logged.get("heldout_gap", (None,))[0]
    print(f"heldout_gap: {'logged ' + str(gap) if gap is not None else 'never logged'}; planned gap "
          f"{monitor.schedule.gap} batches (next held-out evaluation at batch {monitor.schedule.next_heldout}, "
          f"run length {args.loop_steps})")
    print("| fit without (s) | fit with (s) | fit_start_seconds (burst) | with − burst (s) | overhead after the burst "
          "| monitor's share at fit end | hooks' share after the burst (outside) | last logged share |")
    print("|---|---|---|---|---|---|---|---|")
    last_share = logged.get("share", (float("nan"), None))
    print(f"| {without:.1f} ({runs['without']['wall']:.1f}, {runs['without again']['wall']:.1f}) | {r['wall']:.1f} "
          f"| {burst:.1f} | {after:.1f} | {(after - without) / after:.3f} | "
          f"{r['end'] if r['end'] is None else format(r['end'], '.3f')} | {hooks_after / after:.3f} "
          f"| {last_share[0]:.3f} (step {last_share[1]}) |")
    print(f"(fit start inside the monitor's hook: {seconds['fit_start']:.1f} s; batch hooks: {seconds['batches']:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} / {os.getloadavg()[1]:.1f} at the end)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", nargs="+", choices=list(CONFIGS), default=None,
                        help="default: tiny32 on CPU; tiny32 s16_224 b16_224 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="images per call (default 2 on CPU, 4 on GPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="one image, one timed round")
    parser.add_argument("--big", action="store_true", help="allow the 224 px configs on CPU")
    parser.add_argument("--pool", choices=["first", "mean"], default="first")
    parser.add_argument("--width", type=int, default=0, help="rows per batched backward (default 16 CPU / 64 GPU)")
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET, help="memory_bytes in bytes (default 256 MiB)")
    parser.add_argument("--no-slq", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", help="also append the tables to this file")
    parser.add_argument("--loop", action="store_true", help="only the monitor's time share in a CPU training loop")
    parser.add_argument("--loop-steps", type=int, default=40)
    parser.add_argument("--loop-batch", type=int, default=64)
    parser.add_argument("--loop-depth", type=int, default=1, help="blocks of the ViT in --loop (ViT-Ti: 12)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.loop:
        return monitor_loop(args)
    configs = args.config or (["tiny32"] if device.type == "cpu" else list(CONFIGS))
    if device.type == "cpu" and not args.big and any(c != "tiny32" for c in configs):
        sys.exit("the 224 px configurations take hours on a CPU: run them on a GPU, or pass --big")
    args.images = args.images or (1 if args.quick else (2 if device.type == "cpu" else 4))
    args.repeats = args.repeats or (1 if args.quick else 3)
    header = (f"torch {torch.__version__}, device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {torch.get_num_threads()} thread(s)")
              + f", pool={args.pool}, memory_bytes={args.budget / 2**20:.0f} MiB, median of {args.repeats} "
              f"interleaved round(s) after a warm-up")
    rates = {"A100 FP32 ~15": 15e12, "H100/H200 FP32 ~40": 40e12}
    # The projection needs no measurement: it comes first, so a run stopped at a time limit keeps it
    # and every configuration measured so far (rows are printed as they finish).
    projection(args.pool, (None, DEFAULT_BUDGET, 64 * 2**20), rates, sys.stdout)
    print(f"\nMeasured: {header}", flush=True)
    measured_header(sys.stdout)
    results = []
    for name in configs:
        began = time.perf_counter()
        results.append(measure(name, args, device))
        measured_row(results[-1], sys.stdout)
        print(f"  {name} done after {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    plans = [f"{NAMES[r['name']]}: {r['plan']}" for r in results]
    print("\nRow plans at this budget (one image per micro-batch):\n" + "\n".join(plans))
    if args.markdown:
        with open(args.markdown, "a") as out:
            projection(args.pool, (None, DEFAULT_BUDGET, 64 * 2**20), rates, out)
            print(f"\nMeasured: {header}", file=out)
            measured_header(out)
            for r in results:
                measured_row(r, out)


if __name__ == "__main__":
    main()
