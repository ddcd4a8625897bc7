"""The monitor's configuration: its arguments checked before training starts, and the encoder,
Scorer and held-out rows they name."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from jepa_monitor.batches import Key, get_ids, get_input

from jepa_monitor.export import FORMATS
from jepa_monitor.metrics import ALERTS
from jepa_monitor.policies import POLICY_MEMBERS, Policy
from jepa_monitor.scorer import Scorer
from jepa_monitor.sample_scores import COMPONENTS

from ._heldout import HeldoutSet, load_heldout, side_inputs, trim_for_trust

#: Most held-out rows read for the embedding-only trust diagnostics when ``trust_samples="auto"``.
MAX_TRUST_SAMPLES = 4096


def check_arguments(*, heldout: Any, encoder: Any, policy: Any, every_n_steps: Optional[int], heldout_max_samples: int,
                    incoming_max_rows: int, max_failures: int, incoming_every_n_steps: Optional[int],
                    trust_samples: Any, components: Sequence[str], drift_component: str,
                    alert_on: Sequence[str], export: Any) -> Any:
    """Raise naming the first bad argument; returns ``export`` normalised (True -> "csv")."""
    if heldout is None:
        raise ValueError("JEPAScoreMonitor needs heldout=<DataLoader or tensor of held-out samples>.")
    if policy is not None and not isinstance(policy, Policy):
        missing = [m for m in POLICY_MEMBERS if not hasattr(policy, m)]
        raise TypeError(f"policy={type(policy).__name__} does not implement jepa_monitor.policies.Policy "
                        f"(missing: {', '.join(missing)}).")
    if not (isinstance(encoder, str) or callable(encoder)):
        raise TypeError("encoder must be a dotted attribute path on the LightningModule or a callable module -> encoder.")
    if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
        raise ValueError(f"every_n_steps must be a positive integer or None (spaced by the budget); got {every_n_steps!r}.")
    for label, value in (("heldout_max_samples", heldout_max_samples),
                         ("incoming_max_rows", incoming_max_rows), ("max_failures", max_failures)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer; got {value!r}.")
    if trust_samples != "auto" and not (isinstance(trust_samples, int) and trust_samples >= 0):
        raise ValueError(f"trust_samples must be 'auto' or a number of rows; got {trust_samples!r}.")
    if not components or any(c not in COMPONENTS for c in components):
        raise ValueError(f"components={tuple(components)!r}: choose one or more of {COMPONENTS}.")
    if drift_component not in COMPONENTS:
        raise ValueError(f"drift_component={drift_component!r} is not one of {COMPONENTS}.")
    if any(a not in ALERTS for a in alert_on):
        raise ValueError(f"alert_on={tuple(alert_on)!r}: choose from {ALERTS}.")
    export = "csv" if export is True else export
    if export not in (False, *FORMATS):
        raise ValueError(f"export={export!r}: use True/'csv', 'parquet' or False.")
    if export == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError("export='parquet' needs pyarrow: pip install pyarrow, or use export='csv'.") from err
    return export


def resolve_attribute(pl_module: Any, path: str, what: str) -> Any:
    """``pl_module.<dotted path>`` ("" is the module itself); the error lists the submodules there."""
    obj: Any = pl_module
    parts = [p for p in path.split(".") if p]
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            children = [n for n, _ in obj.named_children()] if hasattr(obj, "named_children") else []
            where = ".".join([type(pl_module).__name__, *parts[:i]])
            raise AttributeError(f"{what}={path!r}: {where} has no attribute {part!r} (its submodules: {children}). "
                                 f"Pass {what}=<dotted attribute path on the LightningModule> or a callable module -> encoder.")
        obj = getattr(obj, part)
    return obj


def build_scorer(pl_module: Any, encoder: Any, score_options: dict) -> Scorer:
    """The Scorer of the module's current encoder (a dotted path or ``module -> encoder``)."""
    enc = resolve_attribute(pl_module, encoder, "encoder") if isinstance(encoder, str) else encoder(pl_module)
    # Never differentiate through a DDP/DataParallel wrapper: its forward syncs buffers and
    # registers gradient hooks meant for the training step.
    while isinstance(enc, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        enc = enc.module
    if not callable(enc):
        raise TypeError(f"encoder={encoder!r} resolved to a {type(enc).__name__}, which is not callable.")
    options = dict(score_options)
    if isinstance(options.get("input_module"), str):
        options["input_module"] = resolve_attribute(pl_module, options["input_module"], "score_options['input_module']")
    return Scorer(enc, **options)


def check_input_dtype(x: torch.Tensor, where: str, score_options: dict) -> None:
    if not x.is_floating_point() and "input_module" not in score_options:
        raise TypeError(f"{where} has dtype {x.dtype}, which cannot carry gradients; for token ids pass "
                        "score_options={'input_module': '<dotted path of the embedding layer>'}.")


def check_batch(batch: Any, *, input_key: Key, id_key: Key, side_keys: dict, score_options: dict) -> None:
    """Everything the monitor reads from a training batch is there (raises naming what is not)."""
    x = get_input(batch, input_key)
    get_ids(batch, id_key, x.shape[0])
    side_inputs(batch, side_keys)
    check_input_dtype(x, f"input_key={input_key!r}", score_options)


def read_heldout(source: Any, scorer: Any, device: Any, *, input_key: Key, id_key: Key, side_keys: Mapping[str, Key],
                 score_options: dict, jacobian_rows: int, trust_samples: Union[int, str]) -> HeldoutSet:
    """The held-out rows the monitor uses: ``jacobian_rows`` to score and ``trust_samples`` to embed
    (``"auto"``: 4·K, at most :data:`MAX_TRUST_SAMPLES`; K is known after one forward pass of ``scorer``)."""
    auto = trust_samples == "auto"
    data = load_heldout(source, input_key=input_key, id_key=id_key, side_keys=side_keys,
                        max_rows=max(jacobian_rows, MAX_TRUST_SAMPLES if auto else trust_samples))
    check_input_dtype(data.x, "the held-out input", score_options)
    if auto and data.num_rows > jacobian_rows:
        x, side = data.rows(torch.arange(1), device)
        data = trim_for_trust(data, scorer.embed(x, **side).shape[1], jacobian_rows)
    return data
