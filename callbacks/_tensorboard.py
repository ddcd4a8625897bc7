"""What only a SummaryWriter can show: histograms, image grids and the custom-scalars layout.

``log_metrics`` takes scalars only, so these go to the writer behind each logger directly, on
global rank 0 only (elsewhere ``experiment`` is a stand-in). A writer is recognised by the class of
the logger's ``experiment`` (torch's or tensorboardX's ``SummaryWriter``), not by the logger's: the
``lightning.pytorch`` and ``pytorch_lightning`` namespaces each have their own ``TensorBoardLogger``
class, and both hand out the same writer classes.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch



def _writer_classes() -> tuple:
    from torch.utils.tensorboard import SummaryWriter

    classes = [SummaryWriter]
    try:
        import tensorboardX
    except ImportError:  # optional: Lightning's loggers use it only when tensorboard is absent
        pass
    else:
        classes.append(tensorboardX.SummaryWriter)
    return tuple(classes)


def _writer_of(logger: Any) -> Optional[Any]:
    try:
        experiment = logger.experiment
    except Exception:  # a logger that cannot start its backend here is not a writer
        return None
    return experiment if isinstance(experiment, _writer_classes()) else None


def summary_writers(trainer: Any, warn_once: Optional[Callable[[str, str], None]] = None) -> List[Any]:
    """The SummaryWriter of every logger that has one (global rank 0; [] elsewhere). Loggers without
    one get a one-time warning through ``warn_once(key, message)``."""
    if not trainer.is_global_zero:
        return []
    writers = []
    for logger in trainer.loggers:
        writer = _writer_of(logger)
        if writer is not None:
            writers.append(writer)
        elif warn_once is not None:
            name = type(logger).__name__
            warn_once(f"no-writer-{name}", f"jepa-monitor: the {name} cannot take histograms, images or a "
                      "custom-scalars layout; it receives the scalars only (add a TensorBoardLogger for the rest).")
    return writers


def first_writer_dir(trainer: Any) -> Optional[str]:
    """Log dir of the first logger with a SummaryWriter (where the export goes), else None."""
    for logger in trainer.loggers:
        if _writer_of(logger) is not None and logger.log_dir:
            return logger.log_dir
    return None


def image_grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """(k, C, H, W) images with C in {1, 3} -> one (3, H + 2·pad, k·(W + pad) + pad) row in [0, 1].

    Each image is min-max scaled on its own: inputs are usually normalised, and a shared scale
    would hide a dark image next to a bright outlier.
    """
    x = images.detach().to(torch.float32).cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(1).values.reshape(-1, 1, 1, 1)
    hi = flat.max(1).values.reshape(-1, 1, 1, 1)
    x = ((x - lo) / (hi - lo).clamp_min(1e-12)).nan_to_num(0.0)
    k, _, h, w = x.shape
    grid = torch.ones(3, h + 2 * pad, k * (w + pad) + pad)
    for i in range(k):
        left = pad + i * (w + pad)
        grid[:, pad : pad + h, left : left + w] = x[i]
    return grid


def write_histograms(writers: Sequence[Any], tags_and_values: Mapping[str, torch.Tensor], step: int) -> None:
    for writer in writers:
        for tag, values in tags_and_values.items():
            v = values[torch.isfinite(values)]
            if v.numel():
                writer.add_histogram(tag, v.numpy(), step)


def write_extremes(writers: Sequence[Any], low_tag: str, high_tag: str, images: torch.Tensor,
                   scores: torch.Tensor, k: int, step: int) -> None:
    """The ``k`` lowest- and highest-scoring images (finite scores only) as two grids."""
    finite = torch.isfinite(scores).nonzero().reshape(-1)
    k = min(k, finite.numel())
    if not k:
        return
    order = finite[torch.argsort(scores[finite])]
    low, high = image_grid(images[order[:k]]), image_grid(images[order[-k:].flip(0)])
    for writer in writers:
        writer.add_image(low_tag, low, step)
        writer.add_image(high_tag, high, step)
