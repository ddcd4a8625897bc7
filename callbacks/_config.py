"""The monitor's configuration: its arguments checked before training starts, and the encoder,
Scorer and held-out rows they name."""

from __future__ import annotations

from typing import Any, Mapping, Union

import torch
from torch import nn

from jepa_monitor.batches import Key, get_ids, get_input

from jepa_monitor.policies import POLICY_MEMBERS, Policy
from jepa_monitor.scorer import Scorer

from ._options import Alerts, Cadence, Outputs
from ._heldout import HeldoutSet, load_heldout, side_inputs, trim_for_trust

#: Most held-out rows read for the embedding-only trust diagnostics when ``Cadence.trust_rows="auto"``.
MAX_TRUST_ROWS = 4096


def check_arguments(*, heldout: Any, encoder: Any, policy: Any, scorer: Any, cadence: Any, alerts: Any,
                    outputs: Any, max_failures: int) -> None:
    """Raise naming the first bad argument (the grouped options check their own fields)."""
    if heldout is None:
        raise ValueError("JEPAScoreMonitor needs heldout=<DataLoader or tensor of held-out samples>.")
    if policy is not None and not isinstance(policy, Policy):
        missing = [m for m in POLICY_MEMBERS if m not in dir(policy)]
        raise TypeError(f"policy={type(policy).__name__} does not implement jepa_monitor.policies.Policy "
                        f"(missing: {', '.join(missing)}).")
    if not (isinstance(encoder, str) or callable(encoder)):
        raise TypeError("encoder must be a dotted attribute path on the LightningModule or a callable module -> encoder.")
    if not isinstance(scorer, Scorer) or scorer.encoder is not None:
        raise TypeError("scorer must be a Scorer template without an encoder, e.g. Scorer(vectorize=0, "
                        "input_module='embed_tokens'): the monitor binds the module's encoder (its encoder= argument) "
                        f"at every measurement; got {'a Scorer with an encoder' if isinstance(scorer, Scorer) else type(scorer).__name__}.")
    if scorer.prior is not None or scorer.sketch is not None:
        raise ValueError("scorer: leave prior and sketch unset in the monitor's Scorer template: the monitor's "
                         "reading= argument sets the prior, and the policy chooses its sketch (sketch_rows).")
    for name, value, kind in (("cadence", cadence, Cadence), ("alerts", alerts, Alerts), ("outputs", outputs, Outputs)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a jepa_monitor.callbacks.{kind.__name__}(...); got {type(value).__name__}.")
    if not isinstance(max_failures, int) or max_failures < 1:
        raise ValueError(f"max_failures must be a positive integer; got {max_failures!r}.")


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


def build_scorer(pl_module: Any, encoder: Any, template: Scorer) -> Scorer:
    """The Scorer of the module's current encoder (a dotted path or ``module -> encoder``) with the
    options of ``template`` (its ``input_module`` may be a dotted path on the module)."""
    enc = resolve_attribute(pl_module, encoder, "encoder") if isinstance(encoder, str) else encoder(pl_module)
    # Never differentiate through a DDP/DataParallel wrapper: its forward syncs buffers and
    # registers gradient hooks meant for the training step.
    while isinstance(enc, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        enc = enc.module
    if not callable(enc):
        raise TypeError(f"encoder={encoder!r} resolved to a {type(enc).__name__}, which is not callable.")
    module = template.input_module
    if isinstance(module, str):
        module = resolve_attribute(pl_module, module, "Scorer.input_module")
    return template.replace(encoder=enc, input_module=module)


def check_input_dtype(x: torch.Tensor, where: str, template: Scorer) -> None:
    if not x.is_floating_point() and template.input_module is None:
        raise TypeError(f"{where} has dtype {x.dtype}, which cannot carry gradients; for token ids pass "
                        "scorer=Scorer(input_module='<dotted path of the embedding layer>').")


def check_batch(batch: Any, *, input_key: Key, id_key: Key, side_keys: dict, template: Scorer) -> None:
    """Everything the monitor reads from a training batch is there (raises naming what is not)."""
    x = get_input(batch, input_key)
    get_ids(batch, id_key, x.shape[0])
    side_inputs(batch, side_keys)
    check_input_dtype(x, f"input_key={input_key!r}", template)


def read_heldout(source: Any, scorer: Any, device: Any, *, input_key: Key, id_key: Key, side_keys: Mapping[str, Key],
                 template: Scorer, jacobian_rows: int, trust_rows: Union[int, str]) -> HeldoutSet:
    """The held-out rows the monitor uses: ``jacobian_rows`` to score and ``trust_rows`` to embed
    (``"auto"``: 4·K, at most :data:`MAX_TRUST_ROWS`; K is known after one forward pass of ``scorer``)."""
    auto = trust_rows == "auto"
    data = load_heldout(source, input_key=input_key, id_key=id_key, side_keys=side_keys,
                        max_rows=max(jacobian_rows, MAX_TRUST_ROWS if auto else trust_rows))
    check_input_dtype(data.x, "the held-out input", template)
    if auto and data.num_rows > jacobian_rows:
        x, side = data.rows(torch.arange(1), device)
        data = trim_for_trust(data, scorer.embed(x, **side).shape[1], jacobian_rows)
    return data
