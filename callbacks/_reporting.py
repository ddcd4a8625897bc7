"""Where a monitor's results go: every logger's scalars, SummaryWriter histograms and images, the
per-sample export, and one-time warnings. A fault while writing (a full disk, a logger error) is a
warning, never the end of the training run.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from lightning.pytorch.utilities import rank_zero_warn

from jepa_monitor.batches import looks_like_images
from jepa_monitor.export import ScoreExporter, export_path
from jepa_monitor.diagnostics import is_trusted
from jepa_monitor.metrics import Measurement, MetricKeys, custom_scalars_layout, rank_deficiency_metrics

from ._options import Alerts, Outputs
from ._tensorboard import first_writer_dir, summary_writers, write_extremes, write_histograms

ALERT_MEANING = {"data_shift": "incoming rows differ from held-out rows scored with the same weights",
                 "model_change": "the held-out scores moved since the last evaluation"}


class Reporter:
    """Writes one monitor's results (global rank 0 writes; other ranks return at once)."""

    def __init__(self, keys: MetricKeys, tag: str, *, alerts: Alerts, outputs: Outputs) -> None:
        self.keys, self.tag, self.alert_options = keys, tag, alerts
        self.components, self.num_images, self.export = outputs.components, outputs.num_images, outputs.export
        self.exporter: Optional[ScoreExporter] = None
        self.warned: set = set()
        self.warnings_on: Dict[str, bool] = {}  # trust / agreement warnings: once per episode

    def start(self, trainer: Any, with_policy: bool) -> None:
        """At fit start: say when nothing will be logged, and lay out the custom scalars."""
        if not trainer.loggers:
            self.warn_once("nologger", f"{self.tag}: the Trainer has no logger; scores are exported to "
                           f"{trainer.default_root_dir} but not logged.")
        for writer in self.writers(trainer):
            writer.add_custom_scalars(custom_scalars_layout(self.keys, self.components, with_policy))

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            rank_zero_warn(message)

    def alerts(self, turned_on: Sequence[str], batch: int) -> None:
        """Warn for each alert that just turned on and is in ``Alerts.warn_on``."""
        a = self.alert_options
        for kind in turned_on:
            if kind in a.warn_on:
                rank_zero_warn(f"{self.tag}: {kind.replace('_', ' ')} alert at training batch {batch}: KS statistic of "
                               f"{a.component} > Alerts.threshold = {a.threshold} ({ALERT_MEANING[kind]}).")

    def trust(self, result: Any, batch: int) -> None:
        """Warn when trust is unknown (once), when it turns low, and when scores disagree sharply."""
        if math.isnan(result.trust):
            self.warn_once("trust-unknown", f"{self.tag}: trust is unknown at training batch {batch} ({result.weakest}); "
                           "the trust diagnostics need more embedded held-out rows than K. Give a larger held-out "
                           "set (Cadence(trust_rows='auto') uses 4·K rows).")
        low = not math.isnan(result.trust) and not is_trusted(result.trust)
        if low and not self.warnings_on.get("trust", False):
            rank_zero_warn(f"{self.tag}: trust {result.trust:.2f} at training batch {batch}: the held-out embeddings are "
                           f"far from N(0, I) (weakest diagnostic: {result.weakest}), so the scores cannot be read as "
                           "a density yet.")
        self.warnings_on["trust"] = low
        if result.disagreeing and not self.warnings_on.get("agreement", False):
            rank_zero_warn(f"{self.tag}: scores disagree sharply on the held-out set (Spearman < 0.1): "
                           f"{', '.join(result.disagreeing)}.")
        self.warnings_on["agreement"] = bool(result.disagreeing)

    def rank_deficiency(self, split: str, m: Measurement) -> Dict[str, float]:
        """The rank-deficiency scalars of ``m``; warns once when most rows share floored dimensions."""
        metrics, info = rank_deficiency_metrics(self.keys, split, m)
        if info.get("systematic"):
            rank_dim = int(m.rank_dim.max()) if m.num_rows else 0
            self.warn_once("rank", f"{self.tag}: {info['typical_floored']} of {rank_dim} singular values are floored on "
                           f"most {split} rows: the encoder has dead output dimensions (e.g. a LayerNorm gain near 0), "
                           "and the score sums the log singular values of the remaining rank.")
        return metrics

    @contextlib.contextmanager
    def guard(self, what: str, batch: int) -> Iterator[None]:
        """Statistics, logging and export after a measurement. No collective call may run inside,
        since only some ranks may fail."""
        try:
            yield
        except Exception as err:
            warnings.warn(f"{self.tag}: reporting the {what} at training batch {batch} failed "
                          f"({type(err).__name__}: {err}); those results are not logged, training continues.",
                          RuntimeWarning, stacklevel=3)

    def writers(self, trainer: Any) -> List[Any]:
        return summary_writers(trainer, self.warn_once)

    def log(self, trainer: Any, metrics: Dict[str, float]) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def scores(self, trainer: Any, split: str, scores: Dict[str, torch.Tensor], images: Optional[torch.Tensor]) -> None:
        """Histograms of each component and, for image inputs, the lowest/highest-scoring grids."""
        writers = self.writers(trainer)
        step = trainer.global_step
        write_histograms(writers, {self.keys.hist(split, c): scores[c] for c in self.components}, step)
        if images is not None and self.num_images > 0 and looks_like_images(images):
            write_extremes(writers, self.keys.image(split, "lowest"), self.keys.image(split, "highest"), images,
                           scores[self.alert_options.component], self.num_images, step)
        for writer in writers:
            writer.flush()

    def rows(self, trainer: Any, step: int, split: str, n: int, **columns: Any) -> None:
        """Per-sample rows to the export file (created on first use, see the monitor's docstring)."""
        if not self.export or not trainer.is_global_zero:
            return
        if self.exporter is None:
            log_dir = first_writer_dir(trainer) or trainer.default_root_dir
            self.exporter = ScoreExporter(export_path(log_dir, self.keys.name, self.export), self.export)
        self.exporter.write(step, split, n, **columns)

    def measurement(self, trainer: Any, split: str, m: Measurement, metrics: Dict[str, float], *,
                    images: Optional[torch.Tensor], sample_ids: Optional[List[str]]) -> None:
        """One measurement's scalars, histograms (and image grids) and export rows."""
        self.log(trainer, metrics)
        self.scores(trainer, split, m.scores, images)
        self.rows(trainer, trainer.global_step, split, m.num_rows, sample_ids=sample_ids, scores=m.scores,
                  n_floored=m.n_floored)

    def plan(self, trainer: Any, *, gap: int, share: float, rows: Tuple[int, int]) -> None:
        """A new plan within ``Cadence.pass_share``: the gap to the next held-out evaluation and the
        rows of the next evaluations."""
        self.log(trainer, {self.keys.time("heldout_gap"): float(gap),
                           self.keys.time("measurement_pass_share"): float(share),
                           self.keys.time("heldout_rows"): float(rows[0]),
                           self.keys.time("incoming_rows"): float(rows[1])})

    def curated_batch(self, trainer: Any, metrics: Dict[str, float], weight: torch.Tensor) -> None:
        self.log(trainer, metrics)
        write_histograms(self.writers(trainer), {self.keys.hist("policy", "weight"): weight}, trainer.global_step)

    def curated_rows(self, trainer: Any, per_rank: Sequence[List[Dict[str, Any]]]) -> None:
        """Every rank's buffered curated rows (``Curation.take_pending``) to the export file."""
        for rows in per_rank:
            for r in rows:
                self.rows(trainer, r["step"], "incoming", len(r["kept"]), sample_ids=r["ids"],
                          scores=r["scores"], kept=r["kept"], weight=r["weight"])

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
