"""Where a monitor's results go: every logger's scalars, SummaryWriter histograms and images, the
per-sample export, and one-time warnings. A fault while writing (a full disk, a logger error) is a
warning, never the end of the training run.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn

from jepa_monitor.batches import looks_like_images
from jepa_monitor.export import ScoreExporter, export_path
from jepa_monitor.monitoring import MetricKeys

from ._tensorboard import first_writer_dir, summary_writers, write_extremes, write_histograms


class Reporter:
    """Writes one monitor's results (global rank 0 writes; other ranks return at once)."""

    def __init__(self, keys: MetricKeys, tag: str, *, components: Sequence[str], image_component: str,
                 num_images: int, export: Any) -> None:
        self.keys, self.tag, self.components = keys, tag, tuple(components)
        self.image_component, self.num_images, self.export = image_component, num_images, export
        self.exporter: Optional[ScoreExporter] = None
        self.warned: set = set()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            rank_zero_warn(message)

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
                           scores[self.image_component], self.num_images, step)
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

    def close(self) -> None:
        if self.exporter is not None:
            self.exporter.close()
