"""Applying a curation :class:`~jepa_monitor.policies.Decision` to a training batch, in place.

A Lightning callback cannot hand ``training_step`` a new batch: only edits to the objects it already
holds get there. So rows are removed by replacing the values of a dict batch (or the items of a list
batch) with filtered copies, and weights are written into a dict batch under a new key.

What is edited (``mode="drop"``), recursively below a dict or list batch:

- every tensor whose first dimension is the batch size B (any other tensor is shared and left alone);
- every list or tuple of length B that is not a tuple/list of B-row tensors (per-sample ids,
  captions, per-image box tensors);
- nested dicts (edited in place), lists and tuples (rebuilt, namedtuples included).

What cannot be edited, with a one-time warning: a batch that is itself a tuple, a bare tensor or
another object (dataclass, custom class): its slots cannot be rebound from outside. Such a batch is
then reweighted instead (zero weight for dropped rows) when it holds a dict at its top level, else
it trains unfiltered. Immutable mappings nested inside a batch are left as they are.
Known ambiguity: a tensor that is not per-sample but whose first dimension happens to equal B (a
B×B matrix, a box list of B boxes) is filtered too.

``mode="reweight"`` writes ``decision.weight`` under ``weight_key`` into a dict batch, or into the
first dict at the top level of a list/tuple batch; other batches are left unweighted with a
one-time warning. A batch weight below 1 (the noisy-batch rule) is written the same way in drop mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any, Optional

import torch

MODES = ("drop", "reweight")
_warned: set = set()


class UneditableBatchWarning(UserWarning):
    """A curation decision could not be (fully) applied to a batch of this type."""


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UneditableBatchWarning, stacklevel=3)


def _lookup(batch: Any, key: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch if key in (0, None) else None
    if key is None:
        return None
    try:
        if isinstance(batch, Mapping) or isinstance(batch, (list, tuple)):
            value = batch[key]
        else:
            value = getattr(batch, key)
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return value if isinstance(value, torch.Tensor) else None


def _batch_tensor(v: Any, n: int) -> bool:
    return isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n


def _per_sample_sequence(v: Any, n: int) -> bool:
    is_namedtuple = isinstance(v, tuple) and hasattr(v, "_fields")
    return (isinstance(v, (list, tuple)) and not is_namedtuple and len(v) == n
            and not all(_batch_tensor(item, n) for item in v))


def _filtered(v: Any, index: torch.Tensor, rows: list, n: int) -> Any:
    """``v`` with only the kept rows; mutable mappings are edited in place, the rest rebuilt."""
    if _batch_tensor(v, n):
        return v[index.to(v.device)]
    if _per_sample_sequence(v, n):
        return type(v)(v[i] for i in rows)
    if isinstance(v, MutableMapping):
        for k in list(v.keys()):
            v[k] = _filtered(v[k], index, rows, n)
        return v
    if isinstance(v, tuple) and hasattr(v, "_fields"):
        return type(v)(*(_filtered(item, index, rows, n) for item in v))
    if isinstance(v, (list, tuple)):
        return type(v)(_filtered(item, index, rows, n) for item in v)
    return v


def _weight_target(batch: Any) -> Optional[MutableMapping]:
    if isinstance(batch, MutableMapping):
        return batch
    if isinstance(batch, (list, tuple)):
        for item in batch:
            if isinstance(item, MutableMapping):
                return item
    return None


def _write_weights(batch: Any, weight: torch.Tensor, weight_key: str, device: torch.device) -> bool:
    target = _weight_target(batch)
    if target is None:
        return False
    target[weight_key] = weight.detach().to(device=device, dtype=torch.float32)
    return True


def _no_weights(batch: Any, weight_key: str, why: str) -> None:
    _warn_once(("weights", type(batch).__name__),
               f"jepa-monitor curation: cannot write per-sample weights into a {type(batch).__name__} batch "
               f"({why}); use dict batches (e.g. a collate_fn returning a dict) so the weights reach "
               f"training_step under {weight_key!r}.")


def apply_decision(
    batch: Any,
    decision: Any,
    *,
    input_key: Any = 0,
    weight_key: str = "sample_weight",
    mode: str = "drop",
) -> int:
    """Edit ``batch`` in place as ``decision`` says; return the number of rows that will train.

    Args:
        batch: what the DataLoader yielded (after the transfer to the device).
        decision: a :class:`~jepa_monitor.policies.Decision` for this batch (``keep``, ``weight``,
            ``batch_weight``).
        input_key: where the input sits in the batch; its first dimension must equal the decision's.
        weight_key: the dict key weights are written under.
        mode: "drop" (remove rows with ``keep`` False) or "reweight" (write ``weight``).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")
    keep = decision.keep.detach().bool().reshape(-1)
    n = keep.numel()
    x = _lookup(batch, input_key)
    if x is not None and x.shape[0] != n:
        raise ValueError(
            f"the decision covers {n} rows but the batch input ({input_key=!r}) has {x.shape[0]}; "
            "apply a decision to the batch it was made for."
        )
    device = x.device if x is not None else keep.device
    weight = decision.weight.detach().reshape(-1)

    if mode == "reweight":
        if not _write_weights(batch, weight, weight_key, device):
            _no_weights(batch, weight_key, "reweighting needs a dict to carry the weights")
        return n

    kept = int(keep.sum())
    if kept == 0:
        raise ValueError("the decision keeps no row; a training batch must never be emptied (min_keep >= 1).")
    if kept < n:
        if isinstance(batch, (MutableMapping, list)):
            index = keep.nonzero().reshape(-1)
            rows = index.tolist()
            keys = list(batch.keys()) if isinstance(batch, MutableMapping) else range(len(batch))
            for k in keys:
                batch[k] = _filtered(batch[k], index, rows, n)
        else:
            why = f"rows cannot be removed from a {type(batch).__name__}, whose slots cannot be rebound"
            if _write_weights(batch, weight, weight_key, device):
                _warn_once(("drop", type(batch).__name__),
                           f"jepa-monitor curation: {why}; wrote zero weights for the dropped rows under "
                           f"{weight_key!r} instead, which only the model's loss can honour. Use dict or list batches.")
            else:
                _warn_once(("drop", type(batch).__name__),
                           f"jepa-monitor curation: {why}; this batch type trains unfiltered. Use dict or list batches.")
            return n
        weight = weight[keep.to(weight.device)]
    if float(decision.batch_weight) < 1.0 and not _write_weights(batch, weight, weight_key, device):
        _no_weights(batch, weight_key, "the noisy-batch rule gave the batch a weight below 1")
    return kept
