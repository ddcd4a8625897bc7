"""Curation: catch rate against cost, with the policy's reference built as the monitor builds it.

For each encoder (``--encoders``, default ``demo`` (K = 16) and ``vit192p`` (K = 192), built and
trained by ``bench_curation.py``'s functions), the held-out reference is read exactly the way
``JEPAScoreMonitor`` reads it at its defaults (``callbacks/monitor.py`` ``_score_heldout`` /
``_read_through_fit``, ``callbacks/_heldout.py`` ``trim_for_trust``):

- reference digits: bench_curation's reference split (242 digits of the training classes);
  K = 16: every row scored exactly; K = 192: the first 128 (``Cadence.heldout_rows``) scored exactly
  and up to 4·K rows embedded (one forward pass; all 242 here, 4·K = 768 is more than there are);
- the Gaussian of the reading fitted on every embedded row (``reading.fit_reading``), the scored
  rows' prior cross-fitted (``reading.cross_fitted_log_prior``), ``log_density = jepa_score + prior``;
- the policy's reference: those three columns, ``embedding`` = every embedded row, and for a policy
  whose ``sketch_rows(K)`` is not None, ``sketch_score`` = the scored rows' sketched jepa_score
  (``Scorer(...).sketched(m).score``), from which the policy fits the sketch's level.

Then a stream of incoming batches (the demo's ``DigitStream``: clean training digits of the
reference classes, each row replaced with probability 0.16 by junk of one of the four demo kinds,
made by ``jepa_monitor.demo.data.corrupt``; batch 128 at K = 16, 64 at K = 192) is decided by every
configuration with one ``Scorer(encoder, prior=<the fitted Gaussian>)``:

- exact every row: ``Drop(warmup=0, gate=False, sketch=None)``, the yardstick;
- gate, all exact: ``Drop(warmup=0, max_jacobian_rows=None, sketch=None)`` (every undecided row exact);
- default: ``Drop(warmup=0)`` (max_jacobian_rows 16, sketch "auto": exact rows up to K = 64, 24
  directions at K = 192);
- default, sketch=None: the same with exact Jacobian rows;
- default, paced: ``Drop(warmup=0)`` with ``max_scored`` from a ``CurationPacer(0.2)`` (the
  policy's ``pass_share``), passes per row = the sketch's directions or K, as the monitor
  paces (``callbacks/_curation.py``: ``max_rows`` before the decision, ``spent`` after);
- default, sketch=None, paced: the same with exact rows (K passes per row);
- embedding only: ``score_key`` "log_prior" (the fitted prior), "mahalanobis", "knn".

``warmup=0``: the default warm-up waits for trust, which is not what this measures.

Per configuration: the fraction of rows dropped per junk kind and of clean rows; agreement with the
exact configuration (fraction of rows with the same keep decision); Jacobian rows per batch; cost in
backward passes of one sample per batch (Jacobian rows × passes per row; the embedding's forward
pass is not counted) and that as a multiple of the batch's rows (a training batch costs at least
one backward pass per row); and seconds per batch as a ratio to one training step of the same
encoder on the same batch (bench_curation's step: two augmented views, LeJEPA loss, AdamW),
medians over the batches, the training step and every configuration interleaved on each batch (the
order rotated from batch to batch). **The seconds depend on the machine and its load**; every other
column is a count and is the same on any machine for the same seed.

    python benchmarks/bench_catch.py                       # demo + vit192p: 166-328 s on a shared 2-core VM (load 2.6-8.1)
    python benchmarks/bench_catch.py --encoders demo --batches 64
    python benchmarks/bench_catch.py --encoders vit192p --batches-large 24 --seed 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from jepa_monitor import Scorer
from jepa_monitor.callbacks._pacing import CurationPacer  # the monitor's pacer (imports Lightning: a few seconds)
from jepa_monitor.demo.data import JUNK_KINDS, KINDS, DigitStream, make_splits, normalise
from jepa_monitor.diagnostics import trust_rows
from jepa_monitor.policies import Drop
from jepa_monitor.reading import FOLDS, cross_fitted_log_prior, fit_reading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_curation import LARGE_REFERENCE_ROWS, SPECS, make_step, train_encoder, upscale  # noqa: E402

JUNK_FRACTION = 0.16
CURATION_BUDGET = 0.2  # the policies' default pass_share
EXACT = "exact every row"
PACED = ("default, paced", "default, sketch=None, paced")


def configurations() -> Dict[str, Drop]:
    return {
        EXACT: Drop(warmup=0, gate=False, sketch=None),
        "gate, all exact": Drop(warmup=0, max_jacobian_rows=None, sketch=None),
        "default": Drop(warmup=0),
        "default, sketch=None": Drop(warmup=0, sketch=None),
        "default, paced": Drop(warmup=0),
        "default, sketch=None, paced": Drop(warmup=0, sketch=None),
        "log_prior (fitted)": Drop(warmup=0, score_key="log_prior"),
        "mahalanobis": Drop(warmup=0, score_key="mahalanobis"),
        "knn": Drop(warmup=0, score_key="knn"),
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (no ties expected: continuous scores)."""
    ra = torch.argsort(torch.argsort(a.double())).double()
    rb = torch.argsort(torch.argsort(b.double())).double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def monitor_reference(encoder, reference_x: torch.Tensor, k_scored: Optional[int]):
    """The reference the monitor builds at its defaults: (columns, fitted Gaussian, scored rows, embedded rows,
    K, ½·logdet Σ of each cross-fitting fold's Gaussian)."""
    base = Scorer(encoder)
    with torch.no_grad():
        k = base.embed(reference_x[:1]).shape[1]
    scored = reference_x.shape[0] if k_scored is None else min(k_scored, reference_x.shape[0])
    embedded = min(reference_x.shape[0], max(scored, trust_rows(k)))  # trim_for_trust
    s = base.score(reference_x[:scored])
    z = s.embedding
    if embedded > scored:  # HeldoutSet.embed_rest: one forward pass of the other rows
        z = torch.cat([z, base.embed(reference_x[scored:embedded]).float().cpu()])
    fitted = fit_reading(z)
    prior = cross_fitted_log_prior(z, scored)
    fold = torch.arange(z.shape[0]) % FOLDS  # cross_fit's folds: what each reference row's prior was read through
    fold_logdets = [fit_reading(z[fold != f]).half_logdet for f in range(FOLDS)]
    density = s.jepa_score.double() + prior
    columns = {"jepa_score": s.jepa_score, "log_prior": prior.float(), "log_density": density.float(), "embedding": z}
    return columns, fitted, scored, embedded, k, fold_logdets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="demo,vit192p", help=f"comma-separated, from {', '.join(SPECS)}")
    parser.add_argument("--steps", type=int, default=300, help="training steps of a K=16 encoder")
    parser.add_argument("--steps-large", type=int, default=100, help="training steps of a K=192 encoder")
    parser.add_argument("--batches", type=int, default=48, help="stream batches (K=16, 128 rows each)")
    parser.add_argument("--batches-large", type=int, default=8, help="stream batches (K=192, 64 rows each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 gives steadier ratios)")
    parser.add_argument("--vectorize", default="none", choices=["none", "auto"],
                        help="the Scorer's vectorize (none: its CPU default, the row loop; the monitor's curation "
                             "switches to auto)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kinds = [k for k in args.encoders.split(",") if k]
    for kind in kinds:
        if kind not in SPECS:
            parser.error(f"unknown encoder {kind!r}; choose from {list(SPECS)}")
    vectorize = None if args.vectorize == "none" else "auto"
    began = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), seed {args.seed}, encoders {kinds}, "
          f"steps {args.steps} (K=16) / {args.steps_large} (K=192), batches {args.batches} x 128 rows (K=16) / "
          f"{args.batches_large} x 64 rows (K=192), junk fraction {JUNK_FRACTION} (4 kinds), Scorer vectorize="
          f"{vectorize}, load average {os.getloadavg()[0]:.1f} at start")
    print("policies: Drop(quantile=0.05, min_keep=2, max_drop_fraction=0.5, warmup=0); default max_jacobian_rows=16, "
          f"gate_margin=0.1, sketch='auto' (exact up to K=64, max(16, K//8) directions above); pacing: "
          f"CurationPacer({CURATION_BUDGET}) (burst 4 batches), passes per row = sketch directions or K")

    splits = make_splits(seed=args.seed)
    train_x = normalise(splits.train[0])
    for kind in kinds:
        spec = SPECS[kind]
        prep = upscale if spec.upscale else (lambda x: x)
        large = spec.k > 16
        steps = args.steps_large if large else args.steps
        n_batches = args.batches_large if large else args.batches
        batch = 64 if large else 128
        start = time.perf_counter()
        encoder = train_encoder(kind, train_x, steps, args.seed)
        trained = time.perf_counter() - start
        reference_x = prep(normalise(splits.reference[0]))
        columns, fitted, n_scored, n_embedded, k, fold_logdets = monitor_reference(
            encoder, reference_x, LARGE_REFERENCE_ROWS if large else None)
        scorer = Scorer(encoder, prior=fitted, vectorize=vectorize)
        configs = configurations()
        sketch_scores: Dict[int, torch.Tensor] = {}
        for policy in configs.values():
            reference = dict(columns)
            m = policy.sketch_rows(k)
            if m is not None:
                if m not in sketch_scores:
                    sketch_scores[m] = Scorer(encoder, prior=fitted).sketched(m).score(reference_x[:n_scored]).jepa_score
                reference["sketch_score"] = sketch_scores[m]
            policy.calibrate(reference, batch=0)
        default = configs["default"]
        ref_std = {c: float(columns[c].double().std()) for c in ("jepa_score", "log_prior", "log_density")}
        print(f"\n[{kind}] {spec.label}: trained {steps} steps in {trained:.0f} s; reference: {n_scored} rows scored "
              f"exactly, {n_embedded} embedded (Gaussian fitted on them, scored rows' prior cross-fitted); std (nats) "
              + ", ".join(f"{c} {v:.1f}" for c, v in ref_std.items())
              + f"; threshold (log_density 5%-quantile) {default.threshold:.1f}; gate's Jacobian range "
              f"[{default.jacobian_range[0]:.1f}, {default.jacobian_range[1]:.1f}], center {default.jacobian_center:.1f}"
              + (f"; sketch {default.sketch_dim} directions, level exact = {default.sketch_level[0]:.3f} * sketched "
                 f"+ {default.sketch_level[1]:.1f}" if default.sketch_level is not None else "; sketch: none (K <= 64)"),
              flush=True)
        for m, sketched in sketch_scores.items():
            print(f"[{kind}] reference rows, sketched ({m} directions) against exact jepa_score: Spearman "
                  f"{spearman(sketched, columns['jepa_score']):.2f} over {n_scored} rows", flush=True)
        print(f"[{kind}] ½·logdet Σ of the fitted Gaussian: {fitted.half_logdet:.1f} (all {n_embedded} rows; incoming rows "
              f"are read through it); of the {FOLDS} cross-fitting folds' Gaussians (the reference rows' prior): "
              + ", ".join(f"{v:.1f}" for v in fold_logdets), flush=True)

        stream = DigitStream(splits, n_batches * batch, junk_fraction=JUNK_FRACTION, arrival=1.0, seed=args.seed)
        counts = {name: int((stream.kinds == KINDS.index(name)).sum()) for name in ("clean", *JUNK_KINDS)}
        print(f"[{kind}] stream: {n_batches} batches x {batch} rows; rows per kind: "
              + ", ".join(f"{n} {c}" for n, c in counts.items()), flush=True)
        step = make_step(copy.deepcopy(encoder), kind, torch.Generator().manual_seed(args.seed + 1))
        pacers = {name: CurationPacer(CURATION_BUDGET) for name in PACED}
        passes = {name: (p.sketch_rows(k) or k) for name, p in configs.items()}
        keeps: Dict[str, List[torch.Tensor]] = {name: [] for name in configs}
        scores: Dict[str, List[torch.Tensor]] = {name: [] for name in configs}
        times: Dict[str, List[float]] = {name: [] for name in ["train step", *configs]}
        rows_scored: Dict[str, int] = dict.fromkeys(configs, 0)
        order = ["train step", *configs]
        for b in range(n_batches):
            x8 = stream.x[b * batch:(b + 1) * batch]
            x = prep(x8)
            for name in order[b % len(order):] + order[:b % len(order)]:  # rotated: no config always first
                t = time.perf_counter()
                if name == "train step":
                    step(x8)
                    times[name].append(time.perf_counter() - t)
                    continue
                policy = configs[name]
                pacer = pacers.get(name)
                cap = None if pacer is None else pacer.max_rows(batch, passes[name])
                d = policy.decide_batch(scorer, x, batch=b, max_scored=cap)
                if pacer is not None and d.active:
                    pacer.spent(batch, int(d.n_scored), passes[name])
                times[name].append(time.perf_counter() - t)
                keeps[name].append(d.keep.cpu())
                scores[name].append(d.scores.cpu())
                rows_scored[name] += int(d.n_scored)
        step_s = statistics.median(times["train step"])
        exact_keep = torch.cat(keeps[EXACT])
        kinds_of = stream.kinds
        print(f"\n[{kind}] {spec.label}, {steps} steps, seed {args.seed}: fraction dropped per kind, agreement with "
              f"'{EXACT}', cost per batch of {batch} rows (medians over {n_batches} batches; train step "
              f"{step_s * 1e3:.1f} ms; ms and x step are machine-dependent: median, and mean over batches / median "
              f"train step, which shows what a paced configuration spends on its burst batches)")
        head = (f"{'configuration':<28}" + "".join(f"{n[:11]:>12}" for n in JUNK_KINDS) + f"{'clean':>8}{'agree':>8}"
                f"{'Jac rows':>10}{'passes':>9}{'x rows':>8}{'est rows':>10}{'outside':>9}{'ms':>10}{'x step':>8}")
        print(head)
        print(f"{'':<28}" + "".join(f"{'(n=' + str(counts[n]) + ')':>12}" for n in JUNK_KINDS)
              + f"{'(n=' + str(counts['clean']) + ')':>8}{'':>8}{'/batch':>10}{'/batch':>9}{'':>8}{'/batch':>10}"
              f"{'gate':>9}{'median':>10}{'median':>8}{'mean':>8}")
        for name, policy in configs.items():
            keep = torch.cat(keeps[name])
            dropped = {n: float((~keep[kinds_of == KINDS.index(n)]).float().mean()) for n in ("clean", *JUNK_KINDS)}
            agree = float((keep == exact_keep).float().mean())
            jac = rows_scored[name] / n_batches
            cost = jac * passes[name]
            est = policy.counts["rows_estimated"] / n_batches
            outside = int(policy.counts["rows_outside_gate"])
            ms = statistics.median(times[name]) * 1e3
            mean_ratio = statistics.mean(times[name]) / step_s
            print(f"{name:<28}" + "".join(f"{dropped[n]:>12.3f}" for n in JUNK_KINDS) + f"{dropped['clean']:>8.3f}"
                  f"{agree:>8.3f}{jac:>10.2f}{cost:>9.0f}{cost / batch:>8.2f}{est:>10.2f}{outside:>9d}"
                  f"{ms:>10.1f}{ms / (step_s * 1e3):>8.2f}{mean_ratio:>8.2f}")
        exact_scores = torch.cat(scores[EXACT]).double()
        checks = []
        for name, policy in configs.items():
            if name == EXACT or policy.score_key != "log_density":
                continue
            got = torch.cat(scores[name]).double()
            rows = torch.isfinite(got) & torch.isfinite(exact_scores)
            if int(rows.sum()) >= 3:
                err = (got[rows] - exact_scores[rows]).abs()
                checks.append(f"{name}: {int(rows.sum())} rows, Spearman {spearman(got[rows], exact_scores[rows]):.2f}, "
                              f"median |error| {float(err.median()):.1f} nats")
        print(f"[{kind}] '{EXACT}' drops {float((~exact_keep).float().mean()):.3f} of all rows: keeping every row "
              f"(no curation) would agree with it on {float(exact_keep.float().mean()):.3f}")
        print(f"[{kind}] log_density of the rows a configuration scored with the Jacobian, against '{EXACT}' on the same "
              "rows: " + "; ".join(checks))
        print(f"[{kind}] passes per Jacobian row: " + ", ".join(
            f"{n} {passes[n]}" for n in configs if configs[n].score_key == "log_density")
              + f"; 'outside gate': scored rows whose Jacobian term fell outside the gate's range (total); "
              f"done in {time.perf_counter() - start:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\ntotal {time.perf_counter() - began:.0f} s, load average {os.getloadavg()[0]:.1f} (1 min) / "
          f"{os.getloadavg()[1]:.1f} (5 min) at the end")


if __name__ == "__main__":
    main()
