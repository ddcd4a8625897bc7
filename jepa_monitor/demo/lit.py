"""The demo's LightningModule: the LeJEPA objective of :mod:`.model` on dict batches.

Lightning is imported here because the demo is an application; the core never imports it.
"""

from __future__ import annotations

from typing import List

import lightning as L
import torch

from .data import KIND_INDEX
from .model import DigitEncoder, augment, lejepa_loss, sigreg_directions

CLEAN, NOVEL = KIND_INDEX["clean"], KIND_INDEX["novel_class"]


class DigitJEPA(L.LightningModule):
    """Trains :class:`DigitEncoder` on batches ``{"x": (B, 1, 8, 8), "id": (B,), ...}``.

    When a curation policy writes ``batch["sample_weight"]`` the per-sample invariance term is
    averaged with those weights. The ids of every row that reaches ``training_step`` are recorded in
    ``seen_ids``, so what a policy dropped can be counted afterwards.

    Logged keys (per step): ``train/loss``, ``train/invariance``, ``train/sigreg``; with a ``kind``
    entry in the batch, ``data/junk_fraction`` and ``data/novel_class_fraction`` of the rows that
    reached the training step (after any curation), which shows when the novel class arrives.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 16,
        lr: float = 5e-3,
        sigreg_weight: float = 0.05,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = DigitEncoder(embed_dim=embed_dim)
        self._views = torch.Generator().manual_seed(seed + 10)
        self._directions = torch.Generator().manual_seed(seed + 11)
        self.seen_ids: List[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x = batch["x"]
        z1 = self.encoder(augment(x, self._views))
        z2 = self.encoder(augment(x, self._views))
        dirs = sigreg_directions(z1.shape[1], self._directions, device=x.device)
        # The two-line change that makes a model use Reweight: read the weights, weight the loss.
        weight = batch.get("sample_weight")
        loss, invariance, sigreg = lejepa_loss(
            z1, z2, dirs, sigreg_weight=self.hparams.sigreg_weight, sample_weight=weight
        )
        if "id" in batch:
            self.seen_ids.append(batch["id"].detach().cpu())
        metrics = {"train/loss": loss, "train/invariance": invariance, "train/sigreg": sigreg}
        if "kind" in batch:
            kind = batch["kind"]
            metrics["data/junk_fraction"] = ((kind != CLEAN) & (kind != NOVEL)).float().mean()
            metrics["data/novel_class_fraction"] = (kind == NOVEL).float().mean()
        self.log_dict(metrics, batch_size=x.shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.encoder.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
