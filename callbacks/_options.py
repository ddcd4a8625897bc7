"""The monitor's grouped options: when and how much it scores, which alerts, what it writes.

Small frozen dataclasses, checked when built (an error names the field), so a monitor's signature
stays short and LightningCLI shows every field (``cadence: {every_n_batches: 100}`` in YAML).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

from jepa_monitor.export import FORMATS
from jepa_monitor.metrics import ALERTS
from jepa_monitor.sample_scores import COMPONENTS


def _positive(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the monitor scores and how many rows.

    Args:
        every_n_batches: a held-out evaluation every this many training batches (the callback's own
            count, so gradient accumulation does not change it); None: spaced by ``pass_share``.
        pass_share: the share of training's backward passes (one per training row) the monitor's
            evaluations may cost (a Jacobian-scored row costs K, an embedded row one); None: no
            limit (then ``every_n_batches`` is needed).
        heldout_rows: held-out rows scored with the Jacobian at each evaluation (at most; with a
            ``pass_share``, fewer, down to 64, when all of them would space evaluations more than
            1000 batches apart).
        trust_rows: held-out rows embedded (one forward pass each) for the trust diagnostics and the
            fitted reading; ``"auto"``: 4·K (at most 4096), as far as the held-out set allows.
        incoming_every_n_batches: ``"auto"`` (rows of the training batch right after each held-out
            evaluation: the same weights, which the data-shift test needs), every this many
            batches, or None (never).
        incoming_rows: rows of the training batch scored (at most; ``pass_share`` may take fewer, down to 8).
        seed: seed of the private generator that picks the incoming rows.
    """

    every_n_batches: Optional[int] = None
    pass_share: Optional[float] = 0.05
    heldout_rows: int = 128
    trust_rows: Union[int, str] = "auto"
    incoming_every_n_batches: Union[int, str, None] = "auto"
    incoming_rows: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.every_n_batches is not None:
            _positive("Cadence.every_n_batches", self.every_n_batches)
        if self.pass_share is not None and not (isinstance(self.pass_share, (int, float)) and 0 < self.pass_share < 1):
            raise ValueError(f"Cadence.pass_share must be a share of training's backward passes in (0, 1), e.g. 0.05, or None; got {self.pass_share!r}.")
        if self.pass_share is None and self.every_n_batches is None:
            raise ValueError("Cadence needs every_n_batches when pass_share is None (nothing would say when to score).")
        _positive("Cadence.heldout_rows", self.heldout_rows)
        _positive("Cadence.incoming_rows", self.incoming_rows)
        if self.trust_rows != "auto" and not (isinstance(self.trust_rows, int) and self.trust_rows >= 0):
            raise ValueError(f"Cadence.trust_rows must be 'auto' or a number of rows; got {self.trust_rows!r}.")
        if self.incoming_every_n_batches not in (None, "auto"):
            _positive("Cadence.incoming_every_n_batches (or 'auto', None)", self.incoming_every_n_batches)


@dataclasses.dataclass(frozen=True)
class Alerts:
    """Which alerts warn, on which component, at which Kolmogorov–Smirnov level.

    Args:
        warn_on: the alerts that warn when they turn on: ``"data_shift"`` (incoming rows unlike held-out
            rows scored with the same weights) and/or ``"model_change"`` (the held-out scores moved
            since the previous evaluation). Both are always logged.
        component: the score component the alerts test.
        threshold: the KS statistic above which an alert is on.
    """

    warn_on: Tuple[str, ...] = ("data_shift",)
    component: str = "log_density"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        warn_on = (self.warn_on,) if isinstance(self.warn_on, str) else tuple(self.warn_on)
        object.__setattr__(self, "warn_on", warn_on)
        if any(a not in ALERTS for a in warn_on):
            raise ValueError(f"Alerts.warn_on={warn_on!r}: choose from {ALERTS}.")
        if self.component not in COMPONENTS:
            raise ValueError(f"Alerts.component={self.component!r} is not one of {COMPONENTS}.")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"Alerts.threshold={self.threshold!r} must be a KS level in (0, 1].")


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What the monitor writes besides its scalars.

    Args:
        components: the score components logged (summaries, histograms, distances); one name or several.
        num_images: held-out samples per image grid of the least/most probable rows (0: none).
        export: per-sample scores: ``True``/``"csv"``, ``"parquet"`` (needs pyarrow) or False.
    """

    components: Tuple[str, ...] = COMPONENTS
    num_images: int = 8
    export: Union[bool, str] = True

    def __post_init__(self) -> None:
        components = (self.components,) if isinstance(self.components, str) else tuple(self.components)
        object.__setattr__(self, "components", components)
        if not self.components or any(c not in COMPONENTS for c in self.components):
            raise ValueError(f"Outputs.components={self.components!r}: choose one or more of {COMPONENTS}.")
        if not isinstance(self.num_images, int) or self.num_images < 0:
            raise ValueError(f"Outputs.num_images must be a number of images >= 0; got {self.num_images!r}.")
        export = "csv" if self.export is True else self.export
        if export not in (False, *FORMATS):
            raise ValueError(f"Outputs.export={self.export!r}: use True/'csv', 'parquet' or False.")
        if export == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ModuleNotFoundError as err:
                raise ModuleNotFoundError("Outputs(export='parquet') needs pyarrow: pip install pyarrow, "
                                          "or use export='csv'.") from err
        object.__setattr__(self, "export", export)
