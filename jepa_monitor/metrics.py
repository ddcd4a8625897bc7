"""From scored rows to named metrics, pure torch (no Lightning).

The callback (:mod:`jepa_monitor.callbacks.monitor`) schedules, gathers and logs; every number it
logs is computed here, and every key it logs is built by :class:`MetricKeys`, which the
custom-scalars layout and the history use too, so a key is spelled in one place.

Two questions are kept apart (an encoder in training changes its scores everywhere, so a single
"drift" statistic would alert on clean data):

- **data shift** — are the incoming rows unlike the held-out rows *under the same weights*? The
  incoming rows are compared with held-out scores taken at the same training batch (KS statistic,
  ``shift_ks``). This is what alerts, by default.
- **model change** — did the encoder's reading of the fixed held-out set move? Held-out scores are
  compared with the previous evaluation (``change_ks``) and with an anchor (``drift_ks``): the
  first evaluation, re-anchored once when trust is first reached, so the anchor is an encoder that
  can be read as a density. Logged, and alerting only when asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .baselines import KNNScore, MahalanobisScore
from .diagnostics import REPORT_KEYS, disagreement, gaussianity_report, is_trusted, score_agreement, trust_score
from .diagnostics import rank_deficiency as _rank_deficiency
from .diagnostics import weakest_diagnostic
from .sample_scores import COMPONENTS, SampleScores
from .statistics import ks_statistic, summarize, wasserstein_1

SPLITS = ("heldout", "incoming", "validate", "test")
SUMMARY_STATS = ("mean", "std", "p1", "p5", "p50", "p95")
ALERTS = ("data_shift", "model_change")
#: Fewest finite rows on which the trust diagnostics are attempted at all.
MIN_TRUST_ROWS = 8


class MetricKeys:
    """Every key a monitor named ``name`` logs: ``keys("heldout", "log_density", "p50")`` ->
    ``"<name>/heldout/log_density/p50"``. The helpers name the families of keys."""

    def __init__(self, name: str) -> None:
        if not name or "/" in name:
            raise ValueError(f"name={name!r} must be a non-empty string without '/'.")
        self.name = name

    def __call__(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def stat(self, split: str, component: str, stat: str) -> str:
        return self(split, component, stat)

    def alert(self, kind: str) -> str:
        split = "incoming" if kind == "data_shift" else "heldout"
        return self(split, f"{kind}_alert")

    def trust(self, what: str) -> str:
        return self("trust", what)

    def time(self, what: str) -> str:
        return self("time", what)

    def policy(self, what: str) -> str:
        return self("policy", what)

    def hist(self, split: str, what: str) -> str:
        return self("hist", split, what)

    def image(self, split: str, end: str) -> str:
        return self("images", f"{split}_{end}")

    def pattern(self, *parts: str) -> str:
        """A regular expression over keys, for the custom-scalars layout."""
        return "/".join((self.name, *parts))


# ---------------------------------------------------------------------------------- scored rows
_N_META = 6  # jepa_score, log_prior, log_density, n_floored, rank_dim, row index


@dataclass
class Measurement:
    """One scoring pass over rows, gathered from every rank: the components (float32), the floor
    counts, the row indices (into the held-out set or the batch) and the embeddings."""

    scores: Dict[str, torch.Tensor]
    n_floored: torch.Tensor
    rank_dim: torch.Tensor
    index: torch.Tensor
    embedding: torch.Tensor
    seconds: float = 0.0

    @staticmethod
    def pack(s: SampleScores, index: torch.Tensor) -> torch.Tensor:
        """(n, 6 + K) float64 rows, one row per sample: what the ranks exchange."""
        n = s.jepa_score.shape[0]
        meta = [s.jepa_score, s.log_prior, s.log_density, s.n_floored,
                torch.full((n,), float(s.rank_dim if n else 0)), index]
        cols = [c.detach().double().cpu() for c in meta]
        return torch.cat([torch.stack(cols, dim=1), s.embedding.double().cpu()], dim=1)

    @classmethod
    def unpack(cls, rows: torch.Tensor, seconds: float = 0.0) -> "Measurement":
        return cls(
            scores={c: rows[:, i].to(torch.float32) for i, c in enumerate(COMPONENTS)},
            n_floored=rows[:, 3].long(),
            rank_dim=rows[:, 4].long(),
            index=rows[:, 5].long(),
            embedding=rows[:, _N_META:].to(torch.float32),
            seconds=seconds,
        )

    def sorted_by_index(self) -> "Measurement":
        order = torch.argsort(self.index)
        return Measurement({c: v[order] for c, v in self.scores.items()}, self.n_floored[order],
                           self.rank_dim[order], self.index[order], self.embedding[order], self.seconds)

    @property
    def num_rows(self) -> int:
        return int(self.index.numel())


# ---------------------------------------------------------------------------------- metrics
def summary_metrics(keys: MetricKeys, split: str, m: Measurement, components: Sequence[str]) -> Dict[str, float]:
    """Rows, non-finite rows, floored fraction and the summary of each component."""
    n = m.num_rows
    finite = torch.stack([torch.isfinite(m.scores[c]) for c in COMPONENTS]).all(0)
    total = float(m.rank_dim.sum())
    out = {
        keys(split, "num_samples"): float(n),
        keys(split, "nonfinite"): float(n - int(finite.sum())),
        keys(split, "floored_fraction"): float(m.n_floored.sum()) / total if total else 0.0,
    }
    for c in components:
        for stat, value in summarize(m.scores[c]).items():
            if stat in SUMMARY_STATS:
                out[keys.stat(split, c, stat)] = float(value)
    return out


def distance_metrics(keys: MetricKeys, split: str, scores: Mapping[str, torch.Tensor],
                     other: Mapping[str, torch.Tensor], prefix: str, components: Sequence[str]) -> Dict[str, float]:
    """``<prefix>_ks`` (two-sample Kolmogorov–Smirnov, in [0, 1]) and ``<prefix>_w1``
    (Wasserstein-1, nats) of each component against ``other``."""
    out = {}
    for c in components:
        out[keys.stat(split, c, f"{prefix}_ks")] = float(ks_statistic(scores[c], other[c]))
        out[keys.stat(split, c, f"{prefix}_w1")] = float(wasserstein_1(scores[c], other[c]))
    return out


def rank_deficiency_metrics(keys: MetricKeys, split: str, m: Measurement) -> Tuple[Dict[str, float], Dict[str, Any]]:
    """``<split>/systematic_floored``: the n_floored found on most rows (0 when none is systematic)."""
    if m.num_rows == 0:
        return {}, {"systematic": False}
    info = _rank_deficiency(m.n_floored, m.rank_dim)
    return {keys(split, "systematic_floored"): float(info["typical_floored"] if info["systematic"] else 0)}, info


@dataclass
class TrustResult:
    metrics: Dict[str, float]
    trust: float  # NaN: unknown
    weakest: str
    disagreeing: List[str]


def trust_metrics(keys: MetricKeys, embedding: torch.Tensor, scores: Optional[Mapping[str, torch.Tensor]] = None,
                  reading: str = "isotropic") -> TrustResult:
    """Can the held-out scores be read as a density? The Gaussianity report of ``embedding`` (all the
    embedded held-out rows, many more than the Jacobian-scored ones) and, when ``scores`` of the
    first rows are given, the Spearman agreement of jepa_score, log_density, Mahalanobis and kNN on
    half of them (the two baselines fitted on the other half). ``trust`` is NaN when it cannot be
    told (too few rows: N <= K, see :func:`jepa_monitor.diagnostics.trust_score`); ``reading``
    ("isotropic" or "fitted") is the reading the trust judges."""
    z = embedding[torch.isfinite(embedding).all(1)]
    if z.shape[0] < MIN_TRUST_ROWS:
        return TrustResult({keys.trust("score"): math.nan}, math.nan, f"unknown (only {z.shape[0]} finite rows)", [])
    report = gaussianity_report(z)
    trust = float(trust_score(report, reading))
    metrics = {keys.trust(k): float(report[k]) for k in REPORT_KEYS}
    metrics[keys.trust("score")] = trust
    disagreeing: List[str] = []
    if scores is not None:
        n = scores["jepa_score"].shape[0]
        zs = embedding[:n]
        finite = torch.isfinite(zs).all(1) & torch.isfinite(scores["jepa_score"])
        rows = finite.nonzero().reshape(-1)
        if rows.numel() >= MIN_TRUST_ROWS:
            fit, held = rows[0::2], rows[1::2]
            agreement = score_agreement({
                "jepa_score": scores["jepa_score"][held],
                "log_density": scores["log_density"][held],
                "mahalanobis": MahalanobisScore(shrinkage="ledoit_wolf").fit(zs[fit]).score(zs[held]),
                "knn": KNNScore(k=min(5, fit.numel())).fit(zs[fit]).score(zs[held]),
            })
            metrics.update({keys.trust(f"agreement/{pair}"): float(rho) for pair, rho in agreement.items()})
            disagreeing = disagreement(agreement)
    return TrustResult(metrics, trust, weakest_diagnostic(report, reading), disagreeing)


def alert(ks: Optional[float], threshold: float) -> Optional[bool]:
    """On when the KS statistic exceeds ``threshold``; None when there is nothing to compare."""
    if ks is None or ks != ks:
        return None
    return bool(ks > threshold)


def history_entry(keys: MetricKeys, batch: int, step: int, split: str, component: str,
                  metrics: Mapping[str, float]) -> Dict[str, Any]:
    """One row of the monitor's history: mean, and the KS/W1 that matter for the split: ``shift_ks``,
    ``shift_w1`` for incoming rows (data shift against same-batch held-out scores), ``drift_ks``,
    ``drift_w1`` for held-out rows (model change against the anchor)."""
    key = "shift" if split == "incoming" else "drift"
    return {
        "batch": batch,
        "step": step,
        "split": split,
        "mean": metrics.get(keys.stat(split, component, "mean")),
        f"{key}_ks": metrics.get(keys.stat(split, component, f"{key}_ks")),
        f"{key}_w1": metrics.get(keys.stat(split, component, f"{key}_w1")),
    }


def custom_scalars_layout(keys: MetricKeys, components: Iterable[str], with_policy: bool) -> Dict[str, Any]:
    """TensorBoard's custom-scalars layout: one category per monitor, charts of quantiles, distances,
    alerts, floored fraction, time, trust and curation."""
    charts: Dict[str, Any] = {}
    for c in components:
        for split, label in (("heldout", "held-out"), ("incoming", "incoming")):
            charts[f"{c}: {label} quantiles"] = ["Margin", [keys.stat(split, c, s) for s in ("p50", "p5", "p95")]]
    charts["data shift: incoming vs same-batch held-out (KS)"] = ["Multiline", [keys.pattern("incoming", ".*", "shift_ks")]]
    charts["model change: held-out vs anchor (KS)"] = ["Multiline", [keys.pattern("heldout", ".*", "drift_ks")]]
    charts["model change: held-out vs previous (KS)"] = ["Multiline", [keys.pattern("heldout", ".*", "change_ks")]]
    charts["alerts"] = ["Multiline", [keys.pattern(".*", ".*_alert")]]
    charts["floored singular values"] = ["Multiline", [keys.pattern(".*", "floored_fraction")]]
    charts["monitor time"] = ["Multiline", [keys.pattern("time", ".*share")]]
    charts["trust"] = ["Multiline", [keys.pattern("trust", "score")]]
    if with_policy:
        charts["curation"] = ["Multiline", [keys.pattern("policy", "(fraction_dropped|mean_weight|batch_weight)")]]
    return {f"jepa-monitor {keys.name}": charts}


class ScoreTracker:
    """What held-out and incoming scores are compared with, and which alerts are on.

    Holds the anchor (first held-out scores, replaced once by the first evaluation whose trust
    passed), the latest held-out scores with the batch they were taken at, and the on/off state of
    each alert. :meth:`heldout` and :meth:`incoming` turn a :class:`Measurement` into metrics and
    say which alerts just turned on.
    """

    def __init__(self, keys: MetricKeys, *, components: Sequence[str], alert_component: str, threshold: float) -> None:
        self.keys, self.alert_component, self.threshold = keys, alert_component, threshold
        self.components = tuple(components)
        # distances of the logged components and of the one the alerts read
        self.distance_components = tuple(dict.fromkeys((*components, alert_component)))
        self.anchor: Optional[Dict[str, torch.Tensor]] = None
        self.anchor_trusted = False
        self.latest: Optional[Dict[str, torch.Tensor]] = None
        self.latest_batch = -1
        self.alerts: Dict[str, bool] = {}

    def _alert(self, kind: str, ks: Optional[float]) -> Tuple[Dict[str, float], List[str]]:
        on = alert(ks, self.threshold)
        if on is None:
            return {}, []
        turned_on = [kind] if on and not self.alerts.get(kind, False) else []
        self.alerts[kind] = on
        return {self.keys.alert(kind): float(on)}, turned_on

    def heldout(self, split: str, m: Measurement, batch: int, trust: Optional[float] = None,
                ) -> Tuple[Dict[str, float], List[str]]:
        """Summary and model-change metrics of a held-out (or validate/test) measurement."""
        k = self.keys
        metrics = summary_metrics(k, split, m, self.components)
        turned_on: List[str] = []
        if split == "heldout":
            if self.anchor is None or (not self.anchor_trusted and is_trusted(trust)):
                self.anchor, self.anchor_trusted = dict(m.scores), is_trusted(trust)
            if self.latest is not None:
                metrics.update(distance_metrics(k, split, m.scores, self.latest, "change", self.distance_components))
                extra, turned_on = self._alert("model_change", metrics[k.stat(split, self.alert_component, "change_ks")])
                metrics.update(extra)
            self.latest, self.latest_batch = dict(m.scores), batch
        if self.anchor is not None:
            metrics.update(distance_metrics(k, split, m.scores, self.anchor, "drift", self.distance_components))
        return metrics, turned_on

    def incoming(self, m: Measurement, batch: int) -> Tuple[Dict[str, float], List[str]]:
        """Summary of incoming rows and, when held-out scores of the same batch (the same weights)
        exist, the data-shift metrics."""
        k = self.keys
        metrics = summary_metrics(k, "incoming", m, self.components)
        if self.latest is None or self.latest_batch != batch:
            return metrics, []
        metrics.update(distance_metrics(k, "incoming", m.scores, self.latest, "shift", self.distance_components))
        extra, turned_on = self._alert("data_shift", metrics[k.stat("incoming", self.alert_component, "shift_ks")])
        metrics.update(extra)
        return metrics, turned_on

    def state_dict(self) -> Dict[str, Any]:
        return {"anchor": self.anchor, "anchor_trusted": self.anchor_trusted, "latest": self.latest,
                "latest_batch": self.latest_batch, "alerts": dict(self.alerts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.anchor, self.anchor_trusted = state["anchor"], bool(state["anchor_trusted"])
        self.latest, self.latest_batch = state["latest"], int(state["latest_batch"])
        self.alerts = dict(state["alerts"])
