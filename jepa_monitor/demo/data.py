"""The demo's data: scikit-learn's 8×8 digits (shipped in the package), splits, and injected junk.

The digits (1797 images, uint8 0..16, the UCI set bundled with scikit-learn) are stored in
``digits.npz`` beside this file, so nothing downloads and scikit-learn is not needed at run time.
Every random choice comes from a private ``torch.Generator``; the global RNG is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Dict, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

#: Row kinds in the training stream and the evaluation sets. 0 is clean data.
KINDS: Tuple[str, ...] = ("clean", "noise", "pixel_noise", "occluded", "permuted", "novel_class")
JUNK_KINDS: Tuple[str, ...] = ("noise", "pixel_noise", "occluded", "permuted")
KIND_INDEX: Dict[str, int] = {name: i for i, name in enumerate(KINDS)}

PIXEL_MAX = 16.0
# Pixel mean and standard deviation of the whole set in units of PIXEL_MAX, fixed so that
# normalisation does not depend on the split.
PIXEL_MEAN = 0.3053
PIXEL_STD = 0.3760


def load_digits() -> Tuple[torch.Tensor, torch.Tensor]:
    """The 1797 digits as (images uint8 (N, 8, 8) in 0..16, labels int64 (N,))."""
    with resources.files(__package__).joinpath("digits.npz").open("rb") as fh:
        data = np.load(fh)
        images, labels = data["images"], data["labels"]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Raw pixel images (..., 8, 8) in 0..16 to float32 (..., 1, 8, 8), roughly zero-mean unit-variance."""
    x = images.to(torch.float32) / PIXEL_MAX
    return ((x - PIXEL_MEAN) / PIXEL_STD).unsqueeze(-3)


@dataclass
class DigitSplits:
    """Disjoint splits of the digits, raw pixels (uint8 0..16) with labels.

    ``train``: the clean pool the training stream draws from (the novel class included, but the
    stream only shows those rows after it arrives). ``reference``: held-out digits of the training
    classes, the monitor's reference distribution. ``probe``: clean digits of all classes on which the
    linear probe is fitted. ``test``: clean digits of all classes, never trained on, for evaluation.
    """

    train: Tuple[torch.Tensor, torch.Tensor]
    reference: Tuple[torch.Tensor, torch.Tensor]
    probe: Tuple[torch.Tensor, torch.Tensor]
    test: Tuple[torch.Tensor, torch.Tensor]
    novel_class: int


def make_splits(
    *, novel_class: int = 9, fractions=(0.5, 0.15, 0.15), seed: int = 0
) -> DigitSplits:
    """Stratified random splits (train, reference, probe, rest = test) of the digits.

    The reference split excludes ``novel_class`` so that its arrival shows as drift.
    """
    images, labels = load_digits()
    gen = torch.Generator().manual_seed(seed)
    parts = ([], [], [], [])
    for c in range(10):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        cuts = np.cumsum([int(round(f * len(idx))) for f in fractions]).tolist()
        for part, chunk in zip(parts, np.split(idx.numpy(), cuts)):
            part.append(torch.from_numpy(chunk))
    train, reference, probe, test = (torch.cat(p).sort().values for p in parts)
    reference = reference[labels[reference] != novel_class]
    return DigitSplits(
        train=(images[train], labels[train]),
        reference=(images[reference], labels[reference]),
        probe=(images[probe], labels[probe]),
        test=(images[test], labels[test]),
        novel_class=novel_class,
    )


def corrupt(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Junk of the given kind in raw pixel units (float32 (N, 8, 8) in 0..16).

    ``noise``: i.i.d. uniform pixels, no digit at all. ``pixel_noise``: the digit plus Gaussian noise
    of standard deviation 6 (of 16), clipped. ``occluded``: a random 4×4 block (a quarter of the
    image) set to full intensity. ``permuted``: each image's pixels shuffled, which keeps its
    intensity histogram and destroys its shape.
    """
    x = images.to(torch.float32)
    n = x.shape[0]
    if kind == "noise":
        return torch.rand(x.shape, generator=generator) * PIXEL_MAX
    if kind == "pixel_noise":
        return (x + 6.0 * torch.randn(x.shape, generator=generator)).clamp(0.0, PIXEL_MAX)
    if kind == "occluded":
        out = x.clone()
        corners = torch.randint(0, 5, (n, 2), generator=generator)
        for i, (r, c) in enumerate(corners.tolist()):
            out[i, r : r + 4, c : c + 4] = PIXEL_MAX
        return out
    if kind == "permuted":
        flat = x.reshape(n, -1)
        order = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)
        return torch.gather(flat, 1, order).reshape(x.shape)
    raise ValueError(f"unknown junk kind {kind!r}; expected one of {JUNK_KINDS}.")


class DigitStream(Dataset):
    """The training stream: a fixed, pre-shuffled sequence of rows with junk mixed in.

    Rows are drawn with replacement from the clean training pool; each row is independently replaced
    by junk of each kind in ``JUNK_KINDS`` with probability ``junk_fraction`` / 4, the junk made from
    that row's digit (fresh noise every time). The novel class is absent from rows before
    ``arrival`` (a fraction of the stream) and present at its natural rate after it. Iterate it in
    order (``shuffle=False``): the order is the schedule.

    Items are ``{"x": float32 (1, 8, 8), "id": int, "kind": int}``; ``id`` is the row's position in
    the stream and ``kind`` indexes :data:`KINDS`. The whole stream is also available as tensors
    ``x``, ``ids``, ``kinds`` and ``labels``.
    """

    def __init__(
        self,
        splits: DigitSplits,
        length: int,
        *,
        junk_fraction: float = 0.16,
        arrival: float = 0.5,
        seed: int = 0,
    ):
        if length < 1:
            raise ValueError(f"length must be >= 1; got {length}.")
        if not 0.0 <= junk_fraction < 1.0:
            raise ValueError(f"junk_fraction must be in [0, 1); got {junk_fraction}.")
        gen = torch.Generator().manual_seed(seed + 1)
        images, labels = splits.train
        is_novel = labels == splits.novel_class
        pool_before = torch.nonzero(~is_novel).flatten()
        pool_after = torch.arange(len(labels))
        n_before = int(round(arrival * length))
        src = torch.cat([
            pool_before[torch.randint(len(pool_before), (n_before,), generator=gen)],
            pool_after[torch.randint(len(pool_after), (length - n_before,), generator=gen)],
        ])
        raw = images[src].to(torch.float32)
        kinds = torch.where(is_novel[src], KIND_INDEX["novel_class"], KIND_INDEX["clean"])
        which = torch.rand(length, generator=gen)
        per_kind = junk_fraction / len(JUNK_KINDS)
        for j, name in enumerate(JUNK_KINDS):
            rows = (which >= j * per_kind) & (which < (j + 1) * per_kind)
            if rows.any():
                raw[rows] = corrupt(raw[rows], name, gen)
                kinds[rows] = KIND_INDEX[name]
        self.x = normalise(raw)
        self.ids = torch.arange(length)
        self.kinds = kinds
        self.labels = labels[src]

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "id": int(self.ids[i]), "kind": int(self.kinds[i])}


def junk_eval_sets(images: torch.Tensor, *, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Normalised evaluation sets, one per junk kind, each made from every image of ``images``."""
    gen = torch.Generator().manual_seed(seed + 2)
    return {name: normalise(corrupt(images, name, gen)) for name in JUNK_KINDS}
