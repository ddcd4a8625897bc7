"""Reproduce the trust-indicator claims of docs/trust.md ("What the rules catch, and what they
miss"); the output and its reading are in BENCHMARKS.md ("Trust calibration").

    python benchmarks/trust_calibration.py                 # 300 null draws per cell, 20 per failure
    python benchmarks/trust_calibration.py --draws 50      # quicker
    python benchmarks/trust_calibration.py --parts 56      # the fitted reading only

Six parts, every setting printed with the output. Parts 1-4 judge the paper's isotropic reading,
N(0, I) (``reading="isotropic"``); parts 5-6 the monitor's default reading through the Gaussian
N(μ, Σ) fitted to the held-out embeddings (``reading="fitted"``: only the shape diagnostics,
``FITTED_TRUST_KEYS``, are scored, and a collapse to one point reads 0):

1. Null calibration: exact N(0, I_K) samples (float32, as an encoder returns them) for
   N in {256, 512, 1024} and K from 1 to 128, and K = 256, 384 at N = 4K; per cell the minimum
   trust over the draws (the claim: exactly Gaussian embeddings read trusted), the number of draws
   below 0.9 and of NaN.
2. The Laplace blind spot: iid Laplace coordinates (unit variance) are non-Gaussian, but at large K
   every whitened 1-D projection is Gaussian by the central limit theorem; trust range per K.
3. The mean-shift blind spot: ‖μ‖ = 3 along a random direction; the spurious linear term zᵀμ has
   a spread of 3 nats against √(K/2) for the Gaussian term, so the shift matters less as K grows
   (by design); per K the fraction of draws detected (trust < 0.5).
4. Constructed failures with the weakest diagnostic named, at (N, K) = (512, 16), (1024, 256),
   (1536, 384), and the too-few-rows case (N = K, "unknown").
5. Null calibration of the fitted reading: exact Gaussian embeddings N(μ, Σ) (float32) with a
   random offset (‖μ‖/√K = 0.5) and a random anisotropic covariance (random rotation, eigenvalues
   log-uniform from 0.03 to 4, both ends included) on the grid of part 1; per cell the minimum
   fitted trust (the claim: reads trusted) next to the maximum isotropic trust (reads untrusted).
6. Side by side, isotropic vs fitted trust on constructed cases at the sizes of part 4 and at
   (N, K) = (512, 4): Gaussians that are offset, stretched or shrunk (isotropic fails, fitted
   passes), non-Gaussian shapes (a mixture of separated clusters, multivariate-t tails, a thin
   shell, an L2-normalised output: both should fail, the weakest diagnostic named), and collapsed
   or low-rank embeddings; then what a missed cluster mixture costs the fitted prior term
   (Spearman with the true log-density, AUROC against rows from the gap between the clusters).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jepa_monitor.evaluation import ood_metrics  # noqa: E402
from jepa_monitor.reading import fit_reading, log_prior  # noqa: E402
from jepa_monitor.statistics import spearman  # noqa: E402
from jepa_monitor.diagnostics import (  # noqa: E402
    FITTED_TRUST_KEYS,
    TRUST_KEYS,
    TRUST_THRESHOLD,
    gaussianity_report,
    trust_rows,
    trust_score,
    weakest_diagnostic,
)

NULL_N = (256, 512, 1024)
NULL_K = (1, 2, 4, 8, 16, 32, 64, 128)
WIDE_K = (256, 384)  # at N = trust_rows(K) = 4K


def _gen(*parts: int) -> torch.Generator:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + int(p)) % (2**62)
    return torch.Generator().manual_seed(seed)


def _verdict(z: torch.Tensor):
    report = gaussianity_report(z)
    return trust_score(report), weakest_diagnostic(report), report


def null_calibration(draws: int, seed: int) -> None:
    print(f"\n## 1. Null calibration: exact N(0, I_K), float32, {draws} draws per cell; minimum trust per cell")
    print("   (below-0.9 = draws with trust < 0.9, nan = draws with no verdict; weakest = culprit at the minimum)")
    cells = [(n, k) for n in NULL_N for k in NULL_K] + [(trust_rows(k), k) for k in WIDE_K]
    overall = math.inf
    header = f"{'N':>6} {'K':>5} {'gamma':>6} {'min trust':>10} {'below 0.9':>10} {'nan':>4}  weakest at min"
    print(header)
    for n, k in cells:
        g = _gen(seed, 1, n, k)
        lowest, low_name, below, nans = math.inf, "none", 0, 0
        for _ in range(draws):
            t, name, _ = _verdict(torch.randn(n, k, generator=g))
            if math.isnan(t):
                nans += 1
                continue
            below += t < 0.9
            if t < lowest:
                lowest, low_name = t, name
        overall = min(overall, lowest)
        print(f"{n:>6} {k:>5} {k / (n - 1):>6.3f} {lowest:>10.4f} {below:>10d} {nans:>4d}  {low_name}")
    print(f"   minimum over all {len(cells)} cells: {overall:.4f}")


def _laplace(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, k, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs()) / math.sqrt(2.0)).float()  # Laplace, variance 1


def _summary(values, names) -> str:
    finite = [v for v in values if not math.isnan(v)]
    low = sum(v < TRUST_THRESHOLD for v in finite)
    common = Counter(names).most_common(2)
    rng = f"{min(finite):.3f}-{max(finite):.3f}" if finite else "n/a"
    return (f"{rng:>13} {sorted(finite)[len(finite) // 2] if finite else math.nan:>7.3f} "
            f"{low:>4d}/{len(values):<4d} {', '.join(f'{a} ({b})' for a, b in common)}")


def laplace_blind_spot(draws: int, seed: int) -> None:
    print(f"\n## 2. Laplace blind spot: iid Laplace coordinates (unit variance), {draws} draws per cell")
    print(f"{'N':>6} {'K':>5} {'trust range':>13} {'median':>7} {'<0.5':>9} weakest (count)")
    for n, k in [(512, 1), (512, 2), (512, 4), (512, 16), (512, 64), (512, 128), (1024, 256), (1536, 384)]:
        g = _gen(seed, 2, n, k)
        out = [_verdict(_laplace(n, k, g))[:2] for _ in range(draws)]
        print(f"{n:>6} {k:>5} {_summary([t for t, _ in out], [w for _, w in out])}")


def mean_shift_blind_spot(draws: int, seed: int, norm: float = 3.0) -> None:
    print(f"\n## 3. Mean-shift blind spot: N(mu, I_K) with |mu| = {norm:g} along a random direction, "
          f"{draws} draws per cell")
    print(f"{'N':>6} {'K':>5} {'trust range':>13} {'median':>7} {'<0.5':>9} weakest (count)")
    all_detected = []
    for n, k in [(512, k) for k in NULL_K] + [(trust_rows(k), k) for k in WIDE_K]:
        g = _gen(seed, 3, n, k)
        out = []
        for _ in range(draws):
            d = torch.randn(k, generator=g)
            out.append(_verdict(torch.randn(n, k, generator=g) + norm * d / d.norm())[:2])
        trusts = [t for t, _ in out]
        all_detected.append((k, all(t < TRUST_THRESHOLD for t in trusts)))
        print(f"{n:>6} {k:>5} {_summary(trusts, [w for _, w in out])}")
    missed = [k for k, ok in all_detected if not ok]
    print(f"   detected in every draw for K <= {max([k for k, ok in all_detected if ok], default=0)}; "
          f"missed in some draw from K = {min(missed) if missed else 'never'}")


def _student_t(n, k, g, nu=3.0):
    chi2 = 2.0 * torch._standard_gamma(torch.full((n, 1), nu / 2, dtype=torch.float64), generator=g)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) / (chi2 / nu).sqrt()
    return (z * math.sqrt((nu - 2) / nu)).float()


def _minilm_like(n, k, g):
    """Scale 0.27, offset mean, power-law spectrum (effective rank ≈ 0.12 at K = 384), 3 dead dims:
    the pattern measured on all-MiniLM-L6-v2."""
    q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    spectrum = torch.arange(1, k + 1, dtype=torch.float64) ** -0.6
    z = (torch.randn(n, k, generator=g, dtype=torch.float64) * spectrum) @ q.T
    mu = torch.randn(k, generator=g, dtype=torch.float64)
    z = z / z.pow(2).sum(1).mean().sqrt() * 0.2 * math.sqrt(k) + mu / mu.norm() * 0.18 * math.sqrt(k)
    z[:, :3] = 0.0
    return z.float()


FAILURES = {
    "collapse (rank 1)": lambda n, k, g: torch.randn(n, 1, generator=g) * torch.ones(k) / math.sqrt(k),
    "collapse (constant)": lambda n, k, g: torch.full((n, k), 0.3),
    "shifted mean (0.75/coord)": lambda n, k, g: torch.randn(n, k, generator=g) + 0.75,
    "stretched axis (x10)": lambda n, k, g: torch.randn(n, k, generator=g) * torch.tensor([10.0] + [1.0] * (k - 1)),
    "heavy tails (multivariate t3)": _student_t,
    "L2-normalised": lambda n, k, g: torch.nn.functional.normalize(torch.randn(n, k, generator=g), dim=1),
    "low rank (K/4)": lambda n, k, g: torch.randn(n, max(k // 4, 1), generator=g)
    @ (torch.randn(max(k // 4, 1), k, generator=g) / math.sqrt(max(k // 4, 1))),
    "MiniLM-like (scale 0.27, 3 dead dims)": _minilm_like,
    "N(0, I) with N = K rows": "few",
}


def constructed_failures(draws: int, seed: int) -> None:
    print(f"\n## 4. Constructed failures, {draws} draws per cell: trust range, median, draws < 0.5, weakest named")
    print(f"{'case':<38} {'N':>5} {'K':>4} {'trust range':>13} {'median':>7} {'<0.5':>9} weakest (count)")
    for index, (name, make) in enumerate(FAILURES.items()):
        for n, k in [(512, 16), (1024, 256), (1536, 384)]:
            if make == "few":
                n, make_fn = k, (lambda n_, k_, g_: torch.randn(n_, k_, generator=g_))
            else:
                make_fn = make
            g = _gen(seed, 4, n, k, index)
            out = [_verdict(make_fn(n, k, g))[:2] for _ in range(draws)]
            print(f"{name:<38} {n:>5} {k:>4} {_summary([t for t, _ in out], [w for _, w in out])}")
    g = _gen(seed, 5)
    for n in (60, 200, 800):
        t, w, r = _verdict(_minilm_like(n, 384, g))
        print(f"{'MiniLM-like (scale 0.27, 3 dead dims)':<38} {n:>5} {384:>4} trust {t:.3f}  weakest: {w}  "
              f"(norm_mean {r['norm_mean']:.2f}, effective_rank {r['effective_rank']:.3f})")


# ---------------------------------------------------------------- the fitted reading (parts 5-6)
FITTED_EIG = (0.03, 4.0)  # eigenvalue range of the random anisotropic covariance
FITTED_OFFSET = 0.5  # RMS mean offset per coordinate


def _rotation(k: int, g: torch.Generator) -> torch.Tensor:
    """A Haar-random orthogonal (K, K) matrix, float64."""
    q, r = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _anisotropic(n: int, k: int, g: torch.Generator, eig=FITTED_EIG, offset=FITTED_OFFSET) -> torch.Tensor:
    """Exact N(μ, Σ) rows, float32: Σ = Q diag(λ) Qᵀ, λ log-uniform in ``eig`` (both ends included
    when K >= 2), Q random; μ random with ‖μ‖/√K = ``offset``."""
    lo, hi = math.log(eig[0]), math.log(eig[1])
    if k == 1:
        lam = torch.tensor([math.exp(lo + (hi - lo) * torch.rand(1, generator=g, dtype=torch.float64).item())])
    else:
        u = torch.rand(k, generator=g, dtype=torch.float64)
        u[0], u[1] = 0.0, 1.0
        lam = torch.exp(lo + (hi - lo) * u)
    q = _rotation(k, g)
    mu = torch.randn(k, generator=g, dtype=torch.float64)
    mu = mu / mu.norm() * offset * math.sqrt(k)
    z = (torch.randn(n, k, generator=g, dtype=torch.float64) * lam.sqrt()) @ q.T + mu
    return z.float()


def _both(z: torch.Tensor):
    """(isotropic trust, isotropic weakest, fitted trust, fitted weakest) of one sample."""
    report = gaussianity_report(z)
    return (trust_score(report), weakest_diagnostic(report),
            trust_score(report, reading="fitted"), weakest_diagnostic(report, reading="fitted"))


def fitted_null_calibration(draws: int, seed: int) -> None:
    print(f"\n## 5. Null calibration of the fitted reading: exact N(mu, Sigma), float32, {draws} draws per cell")
    print(f"   (mu random, |mu|/sqrt(K) = {FITTED_OFFSET}; Sigma = Q diag(lambda) Q^T, Q random, lambda log-uniform in "
          f"[{FITTED_EIG[0]}, {FITTED_EIG[1]}] with both ends present for K >= 2)")
    print("   fitted: min trust, draws < 0.9, nan, weakest at min | isotropic: max trust over the same draws")
    cells = [(n, k) for n in NULL_N for k in NULL_K] + [(trust_rows(k), k) for k in WIDE_K]
    overall, iso_overall = math.inf, -math.inf
    print(f"{'N':>6} {'K':>5} {'gamma':>6} {'min fitted':>11} {'below 0.9':>10} {'nan':>4}  "
          f"{'weakest at min':<20} {'max isotropic':>13}")
    for n, k in cells:
        g = _gen(seed, 6, n, k)
        lowest, low_name, below, nans, iso_max = math.inf, "none", 0, 0, -math.inf
        for _ in range(draws):
            ti, _, tf, name = _both(_anisotropic(n, k, g))
            if not math.isnan(ti):
                iso_max = max(iso_max, ti)
            if math.isnan(tf):
                nans += 1
                continue
            below += tf < 0.9
            if tf < lowest:
                lowest, low_name = tf, name
        overall = min(overall, lowest)
        iso_overall = max(iso_overall, iso_max)
        print(f"{n:>6} {k:>5} {k / (n - 1):>6.3f} {lowest:>11.4f} {below:>10d} {nans:>4d}  {low_name:<20} "
              f"{iso_max:>13.4f}")
    print(f"   minimum fitted trust over all {len(cells)} cells: {overall:.4f}; "
          f"maximum isotropic trust: {iso_overall:.4f}")


def _mixture_centres(k, g, clusters=4, separation=8.0):
    """(clusters, K) centres at pairwise distance ``separation``: a regular simplex in a random
    subspace, or evenly spaced on a random line when K < clusters."""
    basis = _rotation(k, g)
    if k < clusters:
        steps = torch.linspace(-1, 1, clusters, dtype=torch.float64)[:, None] * (clusters - 1) / 2
        return steps * separation * basis[:, :1].T
    simplex = torch.eye(clusters, dtype=torch.float64) - 1.0 / clusters  # pairwise distance √2
    return simplex @ basis[:, :clusters].T * separation / math.sqrt(2.0)


def _mixture_rows(n, centres, g):
    label = torch.randint(0, centres.shape[0], (n,), generator=g)
    return torch.randn(n, centres.shape[1], generator=g, dtype=torch.float64) + centres[label]


def _mixture(n, k, g, clusters=4, separation=8.0):
    """Equal-weight mixture of ``clusters`` N(c_j, I) clusters 8 apart: separated modes."""
    return _mixture_rows(n, _mixture_centres(k, g, clusters, separation), g).float()


def mixture_cost(seed: int, n_eval: int = 2000, n_between: int = 500) -> None:
    """What a trusted mixture costs: fit the reading on N rows of the mixture of part 6, then on
    fresh rows the Spearman correlation of each prior term with the true log-density, and the AUROC
    of the fitted prior for inliers against rows N(mean of the centres, I) in the empty middle."""
    print("   mixture (4 clusters, 8 sd apart), one draw per size: Spearman(prior term, true log p) on "
          f"{n_eval} fresh rows, fitted | isotropic; AUROC of the fitted prior, inliers vs {n_between} rows "
          "N(centre of the clusters, I) where there is no data (< 0.5: the gap reads more typical)")
    for n, k in SIDE_BY_SIDE_SIZES:
        g = _gen(seed, 8, n, k)
        centres = _mixture_centres(k, g)
        gaussian = fit_reading(_mixture_rows(n, centres, g).float())
        z = _mixture_rows(n_eval, centres, g).float()
        true = torch.logsumexp(-0.5 * (z.double()[:, None, :] - centres[None]).pow(2).sum(-1), 1)
        gap = (torch.randn(n_between, k, generator=g, dtype=torch.float64) + centres.mean(0)).float()
        fitted = log_prior(z, gaussian)
        auroc = ood_metrics(fitted, log_prior(gap, gaussian))["auroc"]
        print(f"   N={n:>5} K={k:>4}: Spearman fitted {float(spearman(fitted, true)):.3f} | isotropic "
              f"{float(spearman(log_prior(z), true)):.3f}; AUROC inliers vs gap {float(auroc):.3f}")


def _shell(n, k, g, spread=0.2):
    """Points near the sphere of radius √K, with ``spread`` times the radial spread of N(0, I_K)
    (whose norms have a relative spread of about 1/√(2K)): a thin shell. A Gaussian is itself a
    shell at large K; what sets this one apart is only how concentrated the norms are."""
    u = torch.nn.functional.normalize(torch.randn(n, k, generator=g, dtype=torch.float64), dim=1)
    r = math.sqrt(k) * (1.0 + spread / math.sqrt(2 * k) * torch.randn(n, 1, generator=g, dtype=torch.float64))
    return (u * r).float()


SIDE_BY_SIDE_SIZES = ((512, 4), (512, 16), (1024, 256), (1536, 384))
SIDE_BY_SIDE = {
    "N(0, I) (control)": lambda n, k, g: torch.randn(n, k, generator=g),
    "offset (0.75/coord)": lambda n, k, g: torch.randn(n, k, generator=g) + 0.75,
    "stretched axis (x10)": FAILURES["stretched axis (x10)"],
    "shrunk (x0.3 overall)": lambda n, k, g: 0.3 * torch.randn(n, k, generator=g),
    "shrunk half the axes (x0.1)": lambda n, k, g: torch.randn(n, k, generator=g)
    * torch.tensor([0.1] * (k // 2) + [1.0] * (k - k // 2)),
    "anisotropic (eig 0.03-4, offset 0.5)": _anisotropic,
    "mixture (4 clusters, 8 sd apart)": _mixture,
    "heavy tails (multivariate t3)": _student_t,
    "thin shell (radial spread x0.2)": _shell,
    "L2-normalised": FAILURES["L2-normalised"],
    "collapse (constant)": FAILURES["collapse (constant)"],
    "collapse (rank 1)": FAILURES["collapse (rank 1)"],
    "low rank (K/4)": FAILURES["low rank (K/4)"],
    "MiniLM-like (scale 0.27, 3 dead dims)": _minilm_like,
}


def side_by_side(draws: int, seed: int) -> None:
    print(f"\n## 6. Isotropic vs fitted trust, {draws} draws per cell: median trust, draws < 0.5, weakest named "
          "(most common)")
    print(f"{'case':<38} {'N':>5} {'K':>4} | {'iso med':>7} {'<0.5':>6} {'iso weakest':<22} | "
          f"{'fit min':>7} {'fit med':>7} {'<0.5':>6} fitted weakest (count)")
    for index, (name, make) in enumerate(SIDE_BY_SIDE.items()):
        for n, k in SIDE_BY_SIDE_SIZES:
            g = _gen(seed, 7, n, k, index)
            out = [_both(make(n, k, g)) for _ in range(draws)]
            iso = [o[0] for o in out]
            fit = [o[2] for o in out]
            iso_w = Counter(o[1] for o in out).most_common(1)[0][0]
            fit_w = ", ".join(f"{a} ({b})" for a, b in Counter(o[3] for o in out).most_common(2))

            def med(v):
                f = sorted(x for x in v if not math.isnan(x))
                return f[len(f) // 2] if f else math.nan

            low_i = sum(x < TRUST_THRESHOLD for x in iso if not math.isnan(x))
            low_f = sum(x < TRUST_THRESHOLD for x in fit if not math.isnan(x))
            fmin = min((x for x in fit if not math.isnan(x)), default=math.nan)
            print(f"{name:<38} {n:>5} {k:>4} | {med(iso):>7.3f} {low_i:>3d}/{draws:<2d} {iso_w:<22} | "
                  f"{fmin:>7.3f} {med(fit):>7.3f} {low_f:>3d}/{draws:<2d} {fit_w}")
    mixture_cost(seed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=300, help="null draws per (N, K) cell (default 300)")
    ap.add_argument("--fail-draws", type=int, default=20, help="draws per blind-spot / failure cell (default 20)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="123456", help="which parts to run, e.g. 56 (default all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"config: draws={args.draws} fail_draws={args.fail_draws} seed={args.seed} threads={args.threads} "
          f"parts={args.parts} torch={torch.__version__} scored={','.join(TRUST_KEYS)} "
          f"scored_fitted={','.join(FITTED_TRUST_KEYS)} "
          f"threshold={TRUST_THRESHOLD}")
    start = time.perf_counter()
    if "1" in args.parts:
        null_calibration(args.draws, args.seed)
    if "2" in args.parts:
        laplace_blind_spot(args.fail_draws, args.seed)
    if "3" in args.parts:
        mean_shift_blind_spot(args.fail_draws, args.seed)
    if "4" in args.parts:
        constructed_failures(args.fail_draws, args.seed)
    if "5" in args.parts:
        fitted_null_calibration(args.draws, args.seed)
    if "6" in args.parts:
        side_by_side(args.fail_draws, args.seed)
    print(f"\nelapsed {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
