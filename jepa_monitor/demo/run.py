"""``jepa-monitor demo``: train on digits with junk mixed in, monitor and curate, print what was caught.

One run trains :class:`~.lit.DigitJEPA` on a :class:`~.data.DigitStream` with
:class:`~jepa_monitor.callbacks.JEPAScoreMonitor` and a ``Drop`` policy attached, logging to
TensorBoard under ``<logdir>/digits/filtered``; a second run on the same stream without the policy
(``<logdir>/digits/unfiltered``) gives the linear-probe comparison. Then every score is evaluated on
test digits never trained on against each kind of junk made from them. The monitor and the policy
run with the library's defaults (count-paced curation: the same seed curates the same rows).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from ..evaluation import fit_baselines, ood_metrics, score_columns
from ..reading import fit_reading, log_prior
from ..functional import score_samples
from .data import JUNK_KINDS, KINDS, DigitSplits, DigitStream, junk_eval_sets, make_splits, normalise
from .probe import probe_accuracy

#: The demo table's columns: JEPA-SCORE; log_density read through N(0, I) (the paper) and through the
#: Gaussian fitted to the reference embeddings (the monitor's default reading); the kNN and
#: Mahalanobis baselines, fitted on the reference.
EVAL_SCORES = ("jepa_score", "iso_density", "fit_density", "knn", "mahalanobis")
QUARTERS = 4
OUTLIER_KINDS = JUNK_KINDS + ("novel_class",)


class DemoError(Exception):
    """A user error in the demo's options: the message says what is wrong and the fix."""


@dataclass
class DemoConfig:
    logdir: str = "jepa_monitor_demo"
    steps: int = 2000
    batch_size: int = 128
    device: str = "auto"
    filter: bool = True
    compare: bool = True
    quantile: float = 0.05
    seed: int = 0
    progress: bool = True
    threads: Optional[int] = None
    pass_share: Optional[float] = 0.2  # the policy's default


@dataclass
class DemoResult:
    auroc: Dict[str, Dict[str, float]]
    dropped: Dict[str, float]
    probe: Dict[str, float]
    seconds: Dict[str, float]
    logdir: str
    config: DemoConfig
    counts: Dict[str, int] = field(default_factory=dict)
    alerts: List[str] = field(default_factory=list)
    policy_counts: Dict[str, float] = field(default_factory=dict)
    #: Per quarter of the run: (junk share of the rows that reached training, junk share of the stream).
    quarters: List[tuple] = field(default_factory=list)
    first_drop: Optional[int] = None  # the first batch the policy removed a row from


@dataclass
class TrainedRun:
    """One training run of the demo: the trained module, its wall seconds (``trainer.fit``), the
    monitor's warnings, and the seconds the monitor spent curating (deciding, refreshing)."""

    module: torch.nn.Module
    seconds: float
    alerts: List[str]
    curation_seconds: float


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto.")
    if device not in ("cpu", "cuda"):
        raise DemoError(f"--device {device!r} is not one of auto, cpu, cuda.")
    return device


def make_policy(quantile: float, pass_share: Optional[float] = 0.2):
    """The curation policy of the filtered run: ``Drop`` with its defaults, rows below the held-out
    ``quantile`` (acting once trust has passed), its Jacobian rows paced to ``pass_share``."""
    from ..policies import Drop

    return Drop(quantile=quantile, pass_share=pass_share)


def train(
    config: DemoConfig,
    splits: DigitSplits,
    stream: DigitStream,
    *,
    device: str,
    policy=None,
    version: str,
) -> TrainedRun:
    """One training run with the monitor attached."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..callbacks import Cadence, JEPAScoreMonitor
    from .lit import DigitJEPA

    reference = normalise(splits.reference[0])
    monitor = JEPAScoreMonitor(
        encoder="encoder",
        heldout=reference,
        input_key="x",
        id_key="id",
        policy=policy,
        cadence=Cadence(seed=config.seed),
    )
    torch.manual_seed(config.seed)
    module = DigitJEPA(seed=config.seed)
    trainer = L.Trainer(
        max_steps=config.steps,
        accelerator=device,
        devices=1,
        logger=TensorBoardLogger(config.logdir, name="digits", version=version),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=config.progress,
        log_every_n_steps=max(1, config.steps // 100),
    )
    loader = DataLoader(stream, batch_size=config.batch_size, shuffle=False)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_lightning()
        trainer.fit(module, loader)
    alerts = []
    for w in caught:
        if "JEPAScoreMonitor" in str(w.message):
            alerts.append(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return TrainedRun(module, time.perf_counter() - start, alerts, monitor.clock.curation)


def _quiet_lightning() -> None:
    """Lightning's advice that does not apply to an in-memory 8×8 data set."""
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def group_alerts(messages: List[str]) -> List[str]:
    """One line per kind of monitor warning: how many, and the first one (numbers vary, text not)."""
    groups: Dict[str, List[str]] = {}
    for m in messages:
        groups.setdefault(re.sub(r"-?\d[\d.e+-]*", "#", m), []).append(m)
    return [f"{len(ms):>4} x {ms[0]}" for ms in groups.values()]


def junk_share_by_quarter(stream: DigitStream, seen_ids: List[torch.Tensor], batch_size: int,
                          steps: int) -> List[tuple]:
    """Per quarter of the run's batches: (share of junk among the rows that reached training_step,
    share of junk among the stream's rows of those batches, i.e. what an unfiltered run trains on)."""
    junk = torch.tensor([KINDS[int(k)] in JUNK_KINDS for k in stream.kinds])
    out = []
    for q in range(QUARTERS):
        lo, hi = q * steps // QUARTERS, (q + 1) * steps // QUARTERS
        seen = torch.cat(seen_ids[lo:hi]) if seen_ids[lo:hi] else torch.zeros(0, dtype=torch.long)
        stream_rows = junk[lo * batch_size: hi * batch_size]
        out.append((float(junk[seen].double().mean()) if seen.numel() else float("nan"),
                    float(stream_rows.double().mean()) if stream_rows.numel() else float("nan")))
    return out


def first_drop(seen_ids: List[torch.Tensor], batch_size: int, n_rows: int) -> Optional[int]:
    """The first batch that reached training with fewer rows than the stream gave it, None if none."""
    for b, ids in enumerate(seen_ids):
        if ids.numel() < min(batch_size, n_rows - b * batch_size):
            return b
    return None


def dropped_by_kind(stream: DigitStream, seen_ids: List[torch.Tensor], n_rows: int) -> Dict[str, float]:
    """Fraction of the first ``n_rows`` stream rows of each kind that never reached training_step."""
    seen = torch.zeros(len(stream), dtype=torch.bool)
    if seen_ids:
        seen[torch.cat(seen_ids)] = True
    kinds = stream.kinds[:n_rows]
    out = {}
    for i, name in enumerate(KINDS):
        rows = kinds == i
        out[name] = float((~seen[:n_rows][rows]).to(torch.float64).mean()) if rows.any() else float("nan")
    return out


@torch.no_grad()
def _features(encoder, images: torch.Tensor, device: str) -> torch.Tensor:
    return encoder.features(normalise(images).to(device)).cpu()


def evaluate_auroc(encoder, splits: DigitSplits, device: str, *, seed: int) -> Dict[str, Dict[str, float]]:
    """AUROC of every score in ``EVAL_SCORES`` for clean test digits of the training classes
    (inliers) against each outlier kind; baselines and the fitted Gaussian come from the reference split."""
    images, labels = splits.test
    novel = labels == splits.novel_class
    outliers = junk_eval_sets(images[~novel], seed=seed)
    outliers["novel_class"] = normalise(images[novel])
    reference = score_samples(encoder, normalise(splits.reference[0]).to(device))
    baselines = fit_baselines(reference.embedding)
    gaussian = fit_reading(reference.embedding)

    def columns(x: torch.Tensor) -> Dict[str, torch.Tensor]:
        s = score_samples(encoder, x.to(device))
        cols = score_columns(s, baselines)
        cols["iso_density"] = cols.pop("log_density")
        cols["fit_density"] = (s.jepa_score.double() + log_prior(s.embedding, gaussian).to(s.jepa_score.device)).float()
        return cols

    inliers = columns(normalise(images[~novel]))
    table = {}
    for kind, x in outliers.items():
        cols = columns(x)
        table[kind] = {s: float(ood_metrics(inliers[s], cols[s])["auroc"]) for s in EVAL_SCORES}
    return table


def evaluate_probe(encoder, splits: DigitSplits, device: str) -> float:
    """Linear-probe accuracy on the clean test digits (all ten classes), fitted on the probe split."""
    train_f = _features(encoder, splits.probe[0], device)
    test_f = _features(encoder, splits.test[0], device)
    return probe_accuracy(train_f, splits.probe[1], test_f, splits.test[1])


def run_demo(config: DemoConfig) -> DemoResult:
    """Both runs, the evaluation and the result (printing is :func:`format_summary`'s job)."""
    if config.steps < 1:
        raise DemoError(f"--steps must be at least 1; got {config.steps}.")
    if config.pass_share is not None and not config.pass_share > 0:
        raise DemoError(f"--pass-share must be a positive share or 'none'; got {config.pass_share}.")
    if config.batch_size < 2:
        raise DemoError(f"--batch-size must be at least 2 (SIGReg is a batch statistic); got {config.batch_size}.")
    device = resolve_device(config.device)
    if config.threads is not None:
        if config.threads < 1:
            raise DemoError(f"--threads must be at least 1; got {config.threads}.")
        torch.set_num_threads(config.threads)
    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    Path(config.logdir).mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    splits = make_splits(seed=config.seed)
    n_rows = config.steps * config.batch_size
    stream = DigitStream(splits, n_rows, seed=config.seed)
    seconds: Dict[str, float] = {}
    probe: Dict[str, float] = {}

    policy = make_policy(config.quantile, config.pass_share) if config.filter else None
    version = "filtered" if config.filter else "unfiltered"
    run = train(config, splits, stream, device=device, policy=policy, version=version)
    module, seconds[version], alerts = run.module, run.seconds, run.alerts
    if config.filter:
        seconds["curation"] = run.curation_seconds
    encoder = module.encoder.to(device).eval()
    dropped = dropped_by_kind(stream, module.seen_ids, n_rows)
    quarters = junk_share_by_quarter(stream, module.seen_ids, config.batch_size, config.steps)
    dropped_first = first_drop(module.seen_ids, config.batch_size, n_rows)
    probe[version] = evaluate_probe(encoder, splits, device)
    t = time.perf_counter()
    auroc = evaluate_auroc(encoder, splits, device, seed=config.seed)
    seconds["evaluation"] = time.perf_counter() - t

    if config.filter and config.compare:
        plain = train(config, splits, stream, device=device, version="unfiltered")
        seconds["unfiltered"] = plain.seconds
        probe["unfiltered"] = evaluate_probe(plain.module.encoder.to(device).eval(), splits, device)
    seconds["total"] = time.perf_counter() - t0
    counts = {name: int((stream.kinds == i).sum()) for i, name in enumerate(KINDS)}
    return DemoResult(auroc, dropped, probe, seconds, str(Path(config.logdir) / "digits"), config, counts,
                      group_alerts(alerts), dict(policy.counts) if policy is not None else {}, quarters,
                      dropped_first)


def format_summary(result: DemoResult) -> str:
    """The summary table the demo prints."""
    cfg = result.config
    lines = [
        f"jepa-monitor demo: {cfg.steps} steps x {cfg.batch_size} rows, "
        f"novel class arrives at step {cfg.steps // 2}, pass_share={cfg.pass_share}",
        "",
        "AUROC, clean test digits vs each kind (1.0 = perfectly separated, 0.5 = chance);",
        "iso_density / fit_density: log_density read through N(0, I) / through the reference's Gaussian:",
        f"  {'kind':<12}" + "".join(f"{s:>13}" for s in EVAL_SCORES) + f"{'dropped':>10}{'rows':>9}",
    ]
    for kind in OUTLIER_KINDS:
        row = result.auroc[kind]
        drop = result.dropped.get(kind, float("nan"))
        lines.append(
            f"  {kind:<12}" + "".join(f"{row[s]:>13.3f}" for s in EVAL_SCORES)
            + f"{drop:>10.1%}{result.counts.get(kind, 0):>9}"
        )
    lines.append(
        f"  {'clean':<12}" + "".join(f"{'':>13}" for _ in EVAL_SCORES)
        + f"{result.dropped.get('clean', float('nan')):>10.1%}{result.counts.get('clean', 0):>9}"
    )
    if not cfg.filter:
        lines.append("  (no policy: --no-filter; 'dropped' is 0 by construction)")
    c = result.policy_counts
    if c.get("rows_seen"):
        lines.append(f"  Decided rows: {int(c['rows_scored'])} with their Jacobian, {int(c['rows_gated'])} exactly from the "
                     f"embedding, {int(c['rows_estimated'])} from an estimate (pass_share={cfg.pass_share}); "
                     f"{int(c['rows_seen'] - c['rows_scored'] - c['rows_gated'] - c['rows_estimated'])} while the "
                     "policy was inactive (warm-up)")
    if cfg.filter and result.quarters:
        first = "never" if result.first_drop is None else f"at batch {result.first_drop}"
        lines += ["", f"Junk share of the rows that reached training, per quarter (policy first dropped a row {first}):"]
        lines.append("  " + "".join(f"{f'Q{q + 1}':>17}" for q in range(len(result.quarters))))
        lines.append("  " + "".join(f"{f'{kept:.1%} of {stream:.1%}':>17}" for kept, stream in result.quarters))
    lines += ["", "Linear-probe accuracy on clean test digits (ridge on frozen features):"]
    for version, acc in result.probe.items():
        lines.append(f"  {version:<12}{acc:>8.3f}")
    if result.alerts:
        lines += ["", f"Monitor warnings during the {'filtered' if cfg.filter else 'unfiltered'} run (count x first):"]
        lines += [f"  {a}" for a in result.alerts]
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())]
    if "filtered" in result.seconds and "unfiltered" in result.seconds:
        ratio = result.seconds["filtered"] / max(result.seconds["unfiltered"], 1e-9)
        lines.append(f"Filtered / unfiltered training wall time: {ratio:.2f} (the cost of curating every batch; "
                     "target <= 1.25)")
    if "curation" in result.seconds and "filtered" in result.seconds:
        c, f = result.seconds["curation"], result.seconds["filtered"]
        lines.append(f"Curation's own seconds in the filtered run: {c:.1f}; 1 + curation / rest of that run = "
                     f"{1 + c / max(f - c, 1e-9):.2f} (one run: no run-to-run speed noise; the training that "
                     "dropped rows save is not credited)")
    lines.append(f"TensorBoard: tensorboard --logdir {result.logdir}")
    return "\n".join(lines)


def main(config: Optional[DemoConfig] = None) -> DemoResult:
    config = config or DemoConfig()
    result = run_demo(config)
    print(format_summary(result))
    return result
