"""Curation: what filtering every batch costs next to a training step, and which junk it catches.

1. Cost, at K = 16 and K = 192 side by side. On batches of the demo's digit stream (batch 128, 10%
   shifted junk), each curation configuration's ``decide_batch`` is timed against one training step
   of the same encoder (two augmented views, LeJEPA loss, AdamW), alternating; the ratio of medians
   is printed per encoder, one column group each. Configurations: exact scores for every row
   (``gate=False``), the two-stage gate with every undecided row exact (``max_jacobian_rows=None``), the
   default ``Drop(warmup=0)`` / ``Reweight(warmup=0)`` (gate, ``max_jacobian_rows=16``), the gate capped at
   ``--budgets`` Jacobian rows per batch, the prior alone (``score_key="log_prior"``, no Jacobian)
   and the default on a cadence (``every_n_batches=4``). ``warmup=0``: the default warm-up waits for
   trust, which is not what this measures. The last column of each group is the fraction of rows
   whose keep/drop differs from exact scoring of every row (Reweight: mean |weight error|).
   The configurations whose cost does not depend on the round (exact every row, the gate with
   every undecided row exact) are timed once per batch, in the first round; the others every round.
2. Catch rates (the K = 16 encoder only; ``--catch-all`` for every encoder). The fraction of each
   kind of junk whose score falls below the reference 5%-quantile (what ``Drop(quantile=0.05)``
   drops), for log_density, log_prior and jepa_score, next to the rate on clean test digits.

Encoders (``--encoders``, default ``demo,vit192``):
- ``demo`` (K = 16): the demo's DigitEncoder (two 3×3 convolutions, projector to 16) on 8×8 digits
  (D = 64), trained ``--steps`` LeJEPA steps (the demo's augmentations, invariance + SIGReg).
- ``mlp`` (K = 16): the stand-in MLP 64→128→128→16, trained with view noise + SIGReg.
- ``vit192`` (K = 192): a ViT-tiny-like encoder (``bench_vit.ViT``: patch-embedding convolution,
  CLS token, pre-norm SDPA blocks): the digits upscaled to 32 px (bilinear, 3 channels, D = 3072),
  patch 8 (16 tokens + CLS), width 192, 3 heads, 1 block (ViT-Ti has 12: one keeps the CPU run
  short; the Jacobian costs K backward passes of whatever the depth), embedding = the CLS token;
  trained ``--steps-large`` LeJEPA steps on views made at 8×8 and upscaled. A final LayerNorm
  fixes the embedding's norm up to its gain and bias, so the Gaussian prior term -½‖z‖² barely
  varies between rows and the gate's cheap stage sees almost nothing (measured: std 0.2 nats).
- ``vit192p`` (K = 192): the same with a LeJEPA-style projector (Linear-GELU-Linear, 192 wide) on
  the CLS token; the projector output is the embedding (as the demo scores its projector).
- ``mlp192`` (K = 192): an MLP 64→256→256→192 on the flattened 8×8 digits (K > D = 64: the score
  is over the 64 singular values of J), trained as ``mlp``.
K = 16 encoders calibrate on all 242 reference digits, K = 192 encoders on the first 128 (the
monitor's default ``Cadence.heldout_rows``).

    python benchmarks/bench_curation.py                             # ~3.5 min on 2 busy CPU cores
    python benchmarks/bench_curation.py --encoders demo --steps 100 --repeats 5
    python benchmarks/bench_curation.py --encoders demo,mlp192 --batches 4
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from jepa_monitor import Scorer, score_samples
from jepa_monitor.demo.data import JUNK_KINDS, corrupt, make_splits, normalise
from jepa_monitor.demo.model import DigitEncoder, augment, lejepa_loss, sigreg_directions
from jepa_monitor.epps_pulley import epps_pulley, random_directions
from jepa_monitor.policies import Drop, Reweight

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vit import ViT  # noqa: E402  (the ViT of benchmarks/bench_vit.py)

BATCH = 128
LARGE_REFERENCE_ROWS = 128  # the monitor's default Cadence.heldout_rows


@dataclass(frozen=True)
class Spec:
    k: int
    label: str
    views: str  # "demo": the demo's augmentations; "noise": Gaussian view noise
    upscale: bool  # inputs are the digits upscaled to 3×32×32


SPECS: Dict[str, Spec] = {
    "demo": Spec(16, "demo DigitEncoder, K=16, D=64", "demo", False),
    "mlp": Spec(16, "MLP 64-128-128-16, K=16, D=64", "noise", False),
    "vit192": Spec(192, "ViT-tiny-like 1 block, K=192, D=3072", "demo", True),
    "vit192p": Spec(192, "ViT-tiny-like 1 block + projector, K=192, D=3072", "demo", True),
    "mlp192": Spec(192, "MLP 64-256-256-192, K=192, D=64", "noise", False),
}


def upscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 8, 8) normalised digits -> (B, 3, 32, 32), bilinear."""
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1).contiguous()


class Flat(nn.Module):
    """An MLP on flattened 8×8 inputs: 64 → hidden → hidden → k."""

    def __init__(self, k: int = 16, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, k))

    def forward(self, x):
        return self.net(x)


class ClsViT(nn.Module):
    """bench_vit's ViT at 32 px, patch 8, width 192, 3 heads, 1 block; the embedding is the CLS token
    (after the final LayerNorm) or, with ``projector``, a LeJEPA-style MLP head on it (192-192-192)."""

    def __init__(self, depth: int = 1, projector: bool = False):
        super().__init__()
        self.vit = ViT(img=32, patch=8, dim=192, depth=depth, heads=3)
        self.head = nn.Sequential(nn.Linear(192, 192), nn.GELU(), nn.Linear(192, 192)) if projector else nn.Identity()

    def forward(self, x):
        return self.head(self.vit(x)[:, 0])


def build(kind: str) -> nn.Module:
    if kind == "demo":
        return DigitEncoder(embed_dim=16)
    if kind == "mlp":
        return Flat(16, 128)
    if kind == "mlp192":
        return Flat(192, 256)
    return ClsViT(projector=kind == "vit192p")


def make_step(encoder: nn.Module, kind: str, gen: torch.Generator) -> Callable[[torch.Tensor], None]:
    """One training step of ``encoder`` on a batch of 8×8 digits (B, 1, 8, 8), as the demo (or the
    stand-in) trains it; ``vit192`` sees the views upscaled."""
    spec = SPECS[kind]
    opt = torch.optim.AdamW(encoder.parameters(), lr=2e-3 if spec.k == 16 else 1e-3, weight_decay=1e-4)

    def step(x: torch.Tensor) -> None:
        encoder.train()
        if spec.views == "demo":
            v1, v2 = augment(x, gen), augment(x, gen)
            if spec.upscale:
                v1, v2 = upscale(v1), upscale(v2)
            z1, z2 = encoder(v1), encoder(v2)
            loss = lejepa_loss(z1, z2, sigreg_directions(spec.k, gen))[0]
        else:
            z1 = encoder(x + 0.1 * torch.randn(x.shape, generator=gen))
            z2 = encoder(x + 0.1 * torch.randn(x.shape, generator=gen))
            dirs = random_directions(spec.k, 64, generator=gen)
            sigreg = 0.5 * (epps_pulley(z1, dirs) + epps_pulley(z2, dirs))
            loss = (z1 - z2).pow(2).sum(-1).mean() + 0.5 * sigreg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_encoder(kind: str, x: torch.Tensor, steps: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = build(kind)
    gen = torch.Generator().manual_seed(seed + 1)
    step = make_step(encoder, kind, gen)
    for _ in range(steps):
        step(x[torch.randint(x.shape[0], (BATCH,), generator=gen)])
    return encoder.eval()


def junk_sets(images: torch.Tensor, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    clean = normalise(images)
    sets = {name: normalise(corrupt(images, name, gen)) for name in JUNK_KINDS}
    sets["gaussian_noise_0.5"] = clean + 0.5 * torch.randn(clean.shape, generator=gen)
    sets["shifted_cluster_+3"] = clean + 3.0
    return sets


def catch_table(encoder, reference_x, clean_x, sets, label: str) -> None:
    ref = score_samples(encoder, reference_x)
    clean = score_samples(encoder, clean_x)
    scored = {name: score_samples(encoder, x) for name, x in sets.items()}
    keys = ("log_density", "log_prior", "jepa_score")
    print(f"\nFraction below the reference 5%-quantile ({label}; {reference_x.shape[0]} reference rows)")
    print(f"{'set':<22}" + "".join(f"{k:>13}" for k in keys))
    thresholds = {k: torch.quantile(getattr(ref, k).double(), 0.05) for k in keys}
    for name, s in [("clean test digits", clean), *scored.items()]:
        print(f"{name:<22}" + "".join(f"{float((getattr(s, k).double() < thresholds[k]).float().mean()):>13.3f}" for k in keys))


class Replay:
    """A scorer that returns given log-density scores: the exact Reweight decision from the scores
    the exact Drop already computed (the same K backward passes per row; only the rule differs)."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def __call__(self, x: torch.Tensor):  # a plain callable rows -> scores: no cheap stage, every row exact
        assert x.shape[0] == self.scores.shape[0]
        return type("Scores", (), {"log_density": self.scores, "jepa_score": self.scores})()


#: Timed once per batch (first round): their cost does not change from round to round.
ONCE = ("Drop, exact every row", "Drop, gate, all exact", "Reweight, gate, all exact")
REPLAYED = "Reweight, exact every row"


def policies(budgets: List[int]) -> Dict[str, object]:
    # warmup=0: the trust warm-up is not what this measures (the policies act on every batch here).
    return {
        "Drop, exact every row": Drop(warmup=0, gate=False),
        "Drop, gate, all exact": Drop(warmup=0, max_jacobian_rows=None),
        "Drop(warmup=0) default (b=16)": Drop(warmup=0),
        **{f"Drop, gate, budget {b}": Drop(warmup=0, max_jacobian_rows=b) for b in budgets},
        "Drop, prior only": Drop(warmup=0, score_key="log_prior"),
        "Drop(warmup=0), every 4th": Drop(warmup=0, every_n_batches=4),
        REPLAYED: Reweight(warmup=0, gate=False),
        "Reweight(warmup=0) default (b=16)": Reweight(warmup=0),
        "Reweight, gate, all exact": Reweight(warmup=0, max_jacobian_rows=None),
    }


def cost_table(encoder, kind, stream_x, reference, repeats, n_batches, seed, budgets) -> dict:
    """Per configuration: (ms per batch, × train step, fraction of rows with a Jacobian, vs exact)."""
    spec = SPECS[kind]
    score_fn = Scorer(encoder)  # score + embed: the gate's cheap stage needs the embedding
    configs = policies(budgets)
    for policy in configs.values():
        policy.calibrate(reference)
    gen = torch.Generator().manual_seed(seed)
    step = make_step(copy.deepcopy(encoder), kind, torch.Generator().manual_seed(seed + 1))
    times: Dict[str, list] = {name: [] for name in ["train step", *configs]}
    differ = dict.fromkeys(configs, 0.0)
    raw = [stream_x[torch.randint(stream_x.shape[0], (BATCH,), generator=gen)] for _ in range(n_batches)]
    scored = [upscale(x) if spec.upscale else x for x in raw]  # what the encoder (and curation) sees
    exact: Dict[tuple, object] = {}
    for r in range(repeats):
        for b, (x8, x) in enumerate(zip(raw, scored)):
            t = time.perf_counter()
            step(x8)
            times["train step"].append(time.perf_counter() - t)
            for name, policy in configs.items():
                if name in ONCE and r:
                    continue
                if name == REPLAYED:
                    if not r:
                        exact[("reweight", b)] = policy.decide_batch(Replay(exact[("drop", b)].scores), x, batch=0)
                    continue
                t = time.perf_counter()
                d = policy.decide_batch(score_fn, x, batch=r * n_batches + b)
                times[name].append(time.perf_counter() - t)
                ref = exact.setdefault((policy.mode, b), d)  # the first of each mode scores every row
                differ[name] += float((d.keep != ref.keep).sum() if policy.mode == "drop" else (d.weight - ref.weight).abs().sum())
    times[REPLAYED] = times["Drop, exact every row"]
    step_ms = statistics.median(times["train step"]) * 1e3
    rows = {"train step": (step_ms, 1.0, None, None)}
    for name, policy in configs.items():
        agg = statistics.mean if policy.every_n_batches > 1 else statistics.median
        ms = agg(times[name]) * 1e3
        frac = policy.counts["rows_scored"] / max(1, policy.counts["rows_seen"])
        n_rows = (1 if name in ONCE or name == REPLAYED else repeats) * n_batches * BATCH
        rows[name] = (ms, ms / step_ms, frac, differ[name] / n_rows)
    return {"rows": rows, "steps": len(times["train step"]), "batches": n_batches, "repeats": repeats}


def print_side_by_side(results: Dict[str, dict]) -> None:
    names = list(next(iter(results.values()))["rows"])
    width = max(38, *(len(r["label"]) for r in results.values()))
    print(f"\nCost per batch of {BATCH} rows, side by side (medians; the cadence row: mean over all batches; "
          f"{', '.join(ONCE)}: timed once per batch; {REPLAYED}: the same scores as Drop's, so its time)")
    print("cells: ms per batch | x train step | fraction of rows with a Jacobian | vs exact (Drop: fraction of rows "
          "kept/dropped unlike exact scoring; Reweight: mean |weight error|)")
    head = "".join(f" | {results[k]['label']:<{width}}" for k in results)
    print(f"{'configuration':<34}{head}".rstrip())
    sub = "".join(f" | {'ms':>9}{'x step':>8}{'Jac rows':>10}{'vs exact':>10}" + " " * (width - 37) for _ in results)
    print(f"{'':<34}{sub}".rstrip())
    for name in names:
        line = f"{name:<34}"
        for k, res in results.items():
            ms, ratio, frac, diff = res["rows"][name]
            cells = f"{ms:>9.1f}{ratio:>8.2f}" + (f"{frac:>10.2f}{diff:>10.3f}" if frac is not None else " " * 20)
            line += f" | {cells}" + " " * (width - 37)
        print(line.rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="demo,vit192",
                        help=f"comma-separated, side by side: {', '.join(SPECS)} (K=16: demo, mlp; K=192: the others)")
    parser.add_argument("--encoder", choices=list(SPECS), help="one encoder only (same as --encoders NAME)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of a K=16 encoder before measuring")
    parser.add_argument("--steps-large", type=int, default=100, help="training steps of a K=192 encoder")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds over the batches")
    parser.add_argument("--batches", type=int, default=4, help="distinct stream batches per round (K=16)")
    parser.add_argument("--batches-large", type=int, default=2, help="distinct stream batches per round (K=192)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives steadier ratios)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", default="8,32", help="comma-separated extra max_jacobian_rows values to time")
    parser.add_argument("--catch-all", action="store_true", help="the catch table for every encoder (K=192: minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = [args.encoder] if args.encoder else [k for k in args.encoders.split(",") if k]
    for k in kinds:
        if k not in SPECS:
            parser.error(f"unknown encoder {k!r}; choose from {list(SPECS)}")
    budgets = [int(b) for b in args.budgets.split(",") if b]
    began = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), seed {args.seed}, batch {BATCH}, "
          f"{args.repeats} round(s), budgets {budgets}, load average {os.getloadavg()[0]:.1f} at start")

    splits = make_splits(seed=args.seed)
    train_x = normalise(splits.train[0])
    gen = torch.Generator().manual_seed(args.seed + 3)
    stream_x = train_x.clone()
    junk = torch.rand(stream_x.shape[0], generator=gen) < 0.1
    stream_x[junk] += 3.0  # 10% of the stream from a far-shifted cluster
    results: Dict[str, dict] = {}
    for kind in kinds:
        spec = SPECS[kind]
        prep = upscale if spec.upscale else (lambda x: x)
        steps = args.steps if spec.k == 16 else args.steps_large
        start = time.perf_counter()
        encoder = train_encoder(kind, train_x, steps, args.seed)
        reference_x = prep(normalise(splits.reference[0]))
        if spec.k > 16:
            reference_x = reference_x[:LARGE_REFERENCE_ROWS]
        s = score_samples(encoder, reference_x)
        reference = {"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density}
        spread = {k: float(v.std()) for k, v in reference.items()}
        corr = float(torch.corrcoef(torch.stack([s.log_prior, s.jepa_score]))[0, 1])
        n_batches = args.batches if spec.k == 16 else args.batches_large
        print(f"\n[{kind}] {spec.label}: trained {steps} steps; {reference_x.shape[0]} reference rows; "
              f"{n_batches} batches x {args.repeats} rounds. Reference std (nats): "
              + ", ".join(f"{k} {v:.1f}" for k, v in spread.items()) + f"; corr(log_prior, jepa_score) = {corr:.2f}",
              flush=True)
        res = cost_table(encoder, kind, stream_x, reference, args.repeats, n_batches, args.seed, budgets)
        res["label"] = f"{spec.label}, {steps} steps"
        results[kind] = res
        print(f"[{kind}] done in {time.perf_counter() - start:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
        if spec.k == 16 and kind == kinds[0] or args.catch_all:
            images, labels = splits.test
            known = images[labels != splits.novel_class]
            sets = {"novel class (unseen)": normalise(images[labels == splits.novel_class]), **junk_sets(known, args.seed)}
            sets = {k: prep(v) for k, v in sets.items()}
            catch_table(encoder, reference_x, prep(normalise(known)), sets, spec.label)
    print_side_by_side(results)
    print(f"\ntotal {time.perf_counter() - began:.0f} s, load average {os.getloadavg()[0]:.1f} "
          f"(1 min) / {os.getloadavg()[1]:.1f} (5 min) at the end")


if __name__ == "__main__":
    main()
