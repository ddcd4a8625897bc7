"""Curation: what filtering every batch costs next to a training step, and which junk it catches.

1. Cost. On batches of the demo's digit stream (batch 128, K = 16), each curation configuration's
   ``decide_batch`` is timed against one training step of the same encoder (the demo's step: two
   augmented views, LeJEPA loss, AdamW), alternating, ``--repeats`` rounds; the ratio of medians is
   printed. Configurations: exact scores for every row (``gate=False``), the default two-stage gate
   (prior first, Jacobian only near the threshold) for Drop and Reweight, the prior alone
   (``score_key="log_prior"``, no Jacobian), the gate capped at ``--budgets`` Jacobian rows per
   batch (the rest decided from an estimate) and the gate on a cadence (every 4th batch). The last
   column is the fraction of rows whose keep/drop differs from exact scoring of every row.
2. Catch rates. The fraction of each kind of junk whose score falls below the reference 5%-quantile
   (what ``Drop(quantile=0.05)`` drops), for log_density, log_prior and jepa_score, next to the rate
   on clean test digits.

The encoder is the demo's DigitEncoder trained ``--steps`` LeJEPA steps on the clean digits
(``--encoder mlp``: the stand-in MLP 64→128→128→16 trained with view noise + SIGReg instead).

    python benchmarks/bench_curation.py                   # ~5 min on 2 busy CPU cores
    python benchmarks/bench_curation.py --steps 100 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from jepa_monitor import Scorer, score_samples
from jepa_monitor.demo.data import JUNK_KINDS, corrupt, make_splits, normalise
from jepa_monitor.demo.model import DigitEncoder, augment, lejepa_loss, sigreg_directions
from jepa_monitor.gaussianity import epps_pulley, random_directions
from jepa_monitor.policies import Drop, Reweight

BATCH = 128
K = 16


class Flat(nn.Module):
    """The stand-in encoder on flattened 8×8 inputs."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                                 nn.Linear(128, K))

    def forward(self, x):
        return self.net(x)


def make_step(encoder: nn.Module, kind: str, gen: torch.Generator):
    """One training step of ``encoder`` on a batch, as the demo (or the stand-in) trains it."""
    opt = torch.optim.AdamW(encoder.parameters(), lr=2e-3, weight_decay=1e-4)

    def step(x: torch.Tensor) -> None:
        encoder.train()
        if kind == "demo":
            z1, z2 = encoder(augment(x, gen)), encoder(augment(x, gen))
            loss = lejepa_loss(z1, z2, sigreg_directions(K, gen))[0]
        else:
            z1 = encoder(x + 0.1 * torch.randn(x.shape, generator=gen))
            z2 = encoder(x + 0.1 * torch.randn(x.shape, generator=gen))
            dirs = random_directions(K, 64, generator=gen)
            sigreg = 0.5 * (epps_pulley(z1, dirs) + epps_pulley(z2, dirs))
            loss = (z1 - z2).pow(2).sum(-1).mean() + 0.5 * sigreg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_encoder(kind: str, x: torch.Tensor, steps: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = DigitEncoder(embed_dim=K) if kind == "demo" else Flat()
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


def catch_table(encoder, reference_x, clean_x, sets) -> None:
    ref = score_samples(encoder, reference_x)
    clean = score_samples(encoder, clean_x)
    scored = {name: score_samples(encoder, x) for name, x in sets.items()}
    keys = ("log_density", "log_prior", "jepa_score")
    print(f"\nFraction below the reference 5%-quantile ({reference_x.shape[0]} reference rows)")
    print(f"{'set':<22}" + "".join(f"{k:>13}" for k in keys))
    thresholds = {k: torch.quantile(getattr(ref, k).double(), 0.05) for k in keys}
    for name, s in [("clean test digits", clean), *scored.items()]:
        print(f"{name:<22}" + "".join(f"{float((getattr(s, k).double() < thresholds[k]).float().mean()):>13.3f}" for k in keys))


def cost_table(encoder, kind, stream_x, reference, repeats, seed, budgets) -> None:
    score_fn = Scorer(encoder)  # score + embed: the gate's cheap stage needs the embedding
    # warmup=0: the trust warm-up is not what this measures (the policies act on every batch here).
    configs = {
        "Drop, exact every row": Drop(warmup=0, gate=False),
        "Drop, gate, all exact": Drop(warmup=0, gate_budget=None),
        "Drop(warmup=0) default (b=16)": Drop(warmup=0),
        **{f"Drop, gate, budget {b}": Drop(warmup=0, gate_budget=b) for b in budgets},
        "Drop, prior only": Drop(warmup=0, score_key="log_prior"),
        "Drop(warmup=0), every 4th batch": Drop(warmup=0, every_n_steps=4),
        "Reweight, exact every row": Reweight(warmup=0, gate=False),
        "Reweight(warmup=0) default (b=16)": Reweight(warmup=0),
        "Reweight, gate, all exact": Reweight(warmup=0, gate_budget=None),
    }
    for policy in configs.values():
        policy.calibrate(reference)
    gen = torch.Generator().manual_seed(seed)
    step = make_step(copy.deepcopy(encoder), kind, torch.Generator().manual_seed(seed + 1))
    times = {name: [] for name in ["train step", *configs]}
    differ = dict.fromkeys(configs, 0)
    batches = [stream_x[torch.randint(stream_x.shape[0], (BATCH,), generator=gen)] for _ in range(4)]
    for r in range(repeats):
        for b, x in enumerate(batches):
            t = time.perf_counter()
            step(x)
            times["train step"].append(time.perf_counter() - t)
            exact = {}
            for name, policy in configs.items():
                t = time.perf_counter()
                d = policy.decide_batch(score_fn, x, step=r * len(batches) + b)
                times[name].append(time.perf_counter() - t)
                ref = exact.setdefault(policy.mode, d)  # the first of each mode scores every row
                differ[name] += float((d.keep != ref.keep).sum() if policy.mode == "drop" else (d.weight - ref.weight).abs().sum())
    step_ms = statistics.median(times["train step"]) * 1e3
    n_rows = repeats * len(batches) * BATCH
    print(f"\nCost per batch of {BATCH} rows, K={K} ({kind} encoder, {repeats}x{len(batches)} batches, medians;"
          " cadence row: mean)")
    print("last column: Drop, fraction of rows kept/dropped unlike exact scoring; Reweight, mean |weight error|")
    print(f"{'configuration':<28}{'ms':>9}{'x step':>9}{'Jacobian rows':>15}{'vs exact':>10}")
    print(f"{'train step':<28}{step_ms:>9.1f}{1.0:>9.2f}")
    for name, policy in configs.items():
        agg = statistics.mean if policy.every_n_steps > 1 else statistics.median
        ms = agg(times[name]) * 1e3
        frac = policy.counts["rows_scored"] / max(1, policy.counts["rows"])
        print(f"{name:<28}{ms:>9.1f}{ms / step_ms:>9.2f}{frac:>15.2f}{differ[name] / n_rows:>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", choices=("demo", "mlp"), default="demo")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the encoder before measuring")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives steadier ratios)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", default="8,32", help="comma-separated extra gate_budget values to time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    splits = make_splits(seed=args.seed)
    train_x = normalise(splits.train[0])
    start = time.perf_counter()
    encoder = train_encoder(args.encoder, train_x, args.steps, args.seed)
    print(f"trained the {args.encoder} encoder for {args.steps} steps in {time.perf_counter() - start:.0f} s")

    reference_x = normalise(splits.reference[0])
    s = score_samples(encoder, reference_x)
    reference = {"jepa_score": s.jepa_score, "log_prior": s.log_prior, "log_density": s.log_density}
    spread = {k: float(v.std()) for k, v in reference.items()}
    print("reference std (nats): " + ", ".join(f"{k} {v:.1f}" for k, v in spread.items())
          + f"; corr(log_prior, jepa_score) = {float(torch.corrcoef(torch.stack([s.log_prior, s.jepa_score]))[0, 1]):.2f}")

    gen = torch.Generator().manual_seed(args.seed + 3)
    stream_x = train_x.clone()
    junk = torch.rand(stream_x.shape[0], generator=gen) < 0.1
    stream_x[junk] += 3.0  # 10% of the stream from a far-shifted cluster
    budgets = [int(b) for b in args.budgets.split(",") if b]
    cost_table(encoder, args.encoder, stream_x, reference, args.repeats, args.seed, budgets)

    images, labels = splits.test
    known = images[labels != splits.novel_class]
    sets = {"novel class (unseen)": normalise(images[labels == splits.novel_class]), **junk_sets(known, args.seed)}
    catch_table(encoder, reference_x, normalise(known), sets)


if __name__ == "__main__":
    main()
