"""What only TensorBoard can show: histograms, image grids and the custom-scalars layout.

``LightningModule.log`` takes scalars only, so these go to the ``SummaryWriter`` of every
``TensorBoardLogger`` directly, on global rank 0 only (on other ranks ``experiment`` is a stand-in).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch


def tensorboard_writers(trainer: Any) -> List[Any]:
    from lightning.pytorch.loggers import TensorBoardLogger

    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


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


def custom_scalars_layout(name: str, components: Sequence[str], with_policy: bool) -> Dict[str, Any]:
    """One category per monitor; charts group a component's quantiles, the drift distances and time."""
    charts: Dict[str, Any] = {}
    for comp in components:
        charts[f"{comp}: held-out quantiles"] = ["Margin", [f"{name}/heldout/{comp}/p50", f"{name}/heldout/{comp}/p5", f"{name}/heldout/{comp}/p95"]]
        charts[f"{comp}: incoming quantiles"] = ["Margin", [f"{name}/incoming/{comp}/p50", f"{name}/incoming/{comp}/p5", f"{name}/incoming/{comp}/p95"]]
    charts["drift: KS vs reference"] = ["Multiline", [rf"{name}/(heldout|incoming)/.*/drift_ks"]]
    charts["drift: Wasserstein-1 vs reference"] = ["Multiline", [rf"{name}/(heldout|incoming)/.*/drift_w1"]]
    charts["incoming vs current held-out (KS)"] = ["Multiline", [rf"{name}/incoming/.*/shift_ks"]]
    charts["alerts"] = ["Multiline", [rf"{name}/.*/drift_alert"]]
    charts["floored singular values"] = ["Multiline", [rf"{name}/.*/floored_fraction"]]
    charts["scoring time share"] = ["Multiline", [rf"{name}/time/share"]]
    charts["trust"] = ["Multiline", [rf"{name}/trust/.*"]]
    if with_policy:
        charts["curation"] = ["Multiline", [rf"{name}/policy/(fraction_dropped|mean_weight|batch_weight)"]]
    return {f"jepa-monitor {name}": charts}
