"""Reading and editing whatever a DataLoader yields: the one place that knows batch layouts.

Pure torch (no Lightning import), so the callback, the CLI and the tests share it.

Addressing (``input_key`` / ``id_key``, type :data:`Key`)
-------------------------------------------------------------
- ``None`` or ``0`` on a bare tensor batch: the batch itself (``None`` on any other batch: the batch).
- an int or str: a top-level index (lists/tuples), key (mappings) or attribute (other objects).
- a dotted path ``"views.0.image"``: parts are looked up one level at a time; a part made of digits
  indexes a list/tuple (and, failing a string key, matches an int dict key). The whole string is
  tried as a top-level key first, so a dict key that itself contains a dot still wins.
- a tuple path ``("views", 0, "image")`` or ``(0, 0)``: the same walk, without string splitting.
- a callable ``batch -> value``, for layouts no path describes.

Real layouts, all addressable: stable-pretraining ``{"views": [{"image", "label", "sample_idx"}, ...]}``
(``"views.0.image"``, ids ``"views.0.sample_idx"``); lightly ``[views, targets, filenames]`` from the
default collate, or the tuple ``(views, targets, filenames)`` from ``MultiViewCollate``
(``(0, 0)`` or ``"0.0"``, ids ``2``). A key that does not resolve raises an error naming the part
that failed and listing the tensors the batch holds (:func:`describe`), so the fix can be copied.

Editing (:func:`apply_decision`)
--------------------------------
A Lightning callback cannot hand ``training_step`` a new batch: only edits to the objects it
already holds get there. ``mode="drop"`` therefore removes rows by rebinding slots of mutable
containers (dict values, list items) and by slicing lists in place (``lst[:] = kept``). It edits,
recursively and consistently:

- every tensor whose first dimension is the batch size B (others are shared and left alone);
- every list/tuple of length B that is not a set of views (per-sample ids, captions, per-image box
  tensors, per-sample dicts); a list or tuple whose items all hold B-row tensors is a set of views
  (``[view1, view2]``, ``[{"image": ...}, {"image": ...}]``) and is descended into instead;
- nested dicts (in place), lists (in place) and tuples (rebuilt, namedtuples included).

A slot that cannot be rebound: an item of a tuple that is the batch itself (or of a tuple inside such
a tuple), a value of a read-only mapping, the batch itself when it is a bare tensor. A tuple batch
whose per-sample fields all sit in mutable containers (``(views_list, targets_list, names_list)``)
is edited in place. If any per-sample field cannot be reached that way (``(views, targets_tensor,
names)``), **nothing** is edited (a batch with 60-row views and 64-row targets is worse than an
unfiltered one): the dropped rows are reported as ``not_applied``, zero weights are written for them
into the batch's weight dict when there is one (which only a loss that reads them honours), and an
:class:`UneditableBatchWarning` names the fix once. The same holds for bare-tensor batches and for
other objects (dataclasses, custom classes), whose fields are not looked into.

Weights (``mode="reweight"``, and a ``batch_weight`` below 1 in drop mode) are written under
``weight_key`` into a predictable place: the batch itself when it is a dict, else the first dict at
the top level of a list/tuple batch; never deeper (not ``views[0]``). Without one, no weights are
written and a warning says so once.

Known ambiguity: a tensor that is not per-sample but whose first dimension happens to equal B (a
B×B matrix, a box list of B boxes) is filtered too.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, Union

import torch

Key = Union[None, int, str, Tuple[Union[int, str], ...], Callable[[Any], Any]]
Path = Tuple[Union[int, str], ...]

MODES = ("drop", "reweight")
FIX = "return a list or dict from the collate_fn, or use Reweight with a dict batch"
_MISSING = object()
_INT = re.compile(r"-?\d+")
_warned: set = set()


class BatchKeyError(KeyError):
    """A key or path that does not resolve in a batch; ``str()`` is the plain message (KeyError's
    own ``str()`` would wrap it in quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UneditableBatchWarning(UserWarning):
    """A curation decision could not be (fully) applied to a batch of this type."""


@dataclass
class BatchEdit:
    """What :func:`apply_decision` did to one batch.

    Attributes:
        rows: rows the training step sees after the edit.
        removed: rows removed from the batch.
        not_applied: rows the decision dropped that stay in the batch because it cannot be edited
            (even when zero weights were written for them: only a loss that reads them honours them).
        weights_written: whether a weight tensor was written under ``weight_key``.
        reason: why rows were not removed (or weights not written), with the fix; None when all went.
    """

    rows: int
    removed: int
    not_applied: int
    weights_written: bool
    reason: Optional[str] = None


# ------------------------------------------------------------------------------------ reading
def _fmt_path(path: Path) -> str:
    return ".".join(str(p) for p in path) if path else "the batch"


def _as_int(part: Union[int, str]) -> Optional[int]:
    if isinstance(part, bool):
        return None
    if isinstance(part, int):
        return part
    return int(part) if _INT.fullmatch(part) else None


def _step(obj: Any, part: Union[int, str], where: str) -> Tuple[Any, str]:
    """``obj[part]`` (or its attribute), or ``(_MISSING, why)`` saying which part failed."""
    if isinstance(obj, Mapping):
        if part in obj:
            return obj[part], ""
        alt = _as_int(part) if isinstance(part, str) else str(part)
        if alt is not None and alt in obj:
            return obj[alt], ""
        return _MISSING, f"{part!r} is not a key of {where} (keys: {list(obj.keys())[:20]})"
    if isinstance(obj, torch.Tensor):
        return _MISSING, f"{where} is a tensor of shape {tuple(obj.shape)}; the path ends there, before {part!r}"
    if isinstance(obj, (list, tuple)):
        i = _as_int(part)
        if i is None:
            if isinstance(part, str) and part in getattr(obj, "_fields", ()):  # namedtuple field
                return getattr(obj, part), ""
            return _MISSING, f"{part!r} is not an index of {where}, a {type(obj).__name__} of {len(obj)} items"
        if -len(obj) <= i < len(obj):
            return obj[i], ""
        return _MISSING, f"index {i} is past the end of {where}, a {type(obj).__name__} of {len(obj)} items"
    if isinstance(part, str) and not part.startswith("_") and hasattr(obj, part):
        return getattr(obj, part), ""
    return _MISSING, f"{part!r} cannot be looked up in {where}, a {type(obj).__name__}"


def _walk(batch: Any, parts: Path) -> Tuple[Any, str]:
    value = batch
    for depth, part in enumerate(parts):
        value, why = _step(value, part, _fmt_path(parts[:depth]))
        if value is _MISSING:
            return _MISSING, why
    return value, ""


def _locate(batch: Any, key: Key) -> Tuple[Any, Optional[Tuple[type, str, Optional[BaseException]]]]:
    """(value, None), or (_MISSING, (exception type, why, cause)). Builds no batch description, so
    tolerant callers (apply_decision's row check) pay nothing for a key that does not resolve."""
    if callable(key) and not isinstance(key, (str, int, tuple)):
        try:
            return key(batch), None
        except Exception as err:  # noqa: BLE001 - re-raised by the caller with the batch's fields
            return _MISSING, (ValueError, f"raised {type(err).__name__}: {err}", err)
    if isinstance(batch, torch.Tensor):
        if key is None or (isinstance(key, int) and not isinstance(key, bool) and key == 0):
            return batch, None
        return _MISSING, (BatchKeyError, f"the batch is a bare tensor of shape {tuple(batch.shape)}, so nothing "
                          "can be looked up in it; pass 0 (or None)", None)
    if key is None:
        return batch, None
    if isinstance(key, tuple):
        bad = [p for p in key if isinstance(p, bool) or not isinstance(p, (int, str))]
        if bad:
            return _MISSING, (TypeError, f"path parts must be ints or strs, not {type(bad[0]).__name__}", None)
        value, why = _walk(batch, key)
    elif isinstance(key, (int, str)) and not isinstance(key, bool):
        # The whole key first: a top-level key that contains a dot must win over the dotted path.
        value, why = _step(batch, key, "the batch")
        if value is _MISSING and isinstance(key, str) and "." in key:
            value, why = _walk(batch, tuple(key.split(".")))
    else:
        return _MISSING, (TypeError, f"a {type(key).__name__} is not a key; pass a key, an index, a dotted "
                          "path such as 'views.0.image', a tuple path or a callable batch -> value", None)
    return (value, None) if value is not _MISSING else (_MISSING, (BatchKeyError, why, None))


def _label(key: Key, param: str) -> str:
    if callable(key) and not isinstance(key, (str, int, tuple)):
        return f"{param} callable {getattr(key, '__name__', type(key).__name__)}"
    return f"{param}={key!r}"


def _fields_hint(batch: Any) -> str:
    items = describe(batch)
    if not items:
        return f"This {type(batch).__name__} batch holds no tensors or lists that could be looked up."
    lists = any(" of " in item for item in items)  # "2 (list of 64 str)" entries
    return ("Tensors and lists" if lists else "Tensors") + " in this batch: " + ", ".join(items) + "."


def _resolve(batch: Any, key: Key, param: str) -> Any:
    value, err = _locate(batch, key)
    if err is None:
        return value
    kind, why, cause = err
    sep = " " if cause is not None else ": "  # "input_key callable f raised ...", "input_key='a': 'a' is not ..."
    raise kind(f"{_label(key, param)}{sep}{why}. {_fields_hint(batch)}") from cause


def describe(batch: Any, max_items: int = 40) -> List[str]:
    """The addressable leaves of ``batch``, each as the path to pass and its size.

    Tensors read ``"views.0.image (64, 3, 32, 32)"``; flat lists/tuples of plain values (ids, file
    names) read ``"2 (list of 64 str)"``; a bare tensor batch reads ``"<batch> (64, 3)"``. At most
    ``max_items`` entries, then ``"..."``.
    """
    out: List[str] = []

    def add(entry: str) -> bool:
        if len(out) >= max_items:
            out.append("...")
            return False
        out.append(entry)
        return True

    def walk(v: Any, path: Path, depth: int) -> bool:
        """False once full (stop walking)."""
        name = _fmt_path(path) if path else "<batch>"
        if isinstance(v, torch.Tensor):
            return add(f"{name} {tuple(v.shape)}")
        if depth > 16:  # batches are shallow trees; this only guards against cycles
            return True
        if isinstance(v, Mapping):
            children: Iterable = v.items()
        elif isinstance(v, (list, tuple)):
            scalars = (str, bytes, int, float, bool)
            if v and all(isinstance(item, scalars) for item in v):
                kinds = {type(item).__name__ for item in v}
                kind = kinds.pop() if len(kinds) == 1 else "mixed"
                return add(f"{name} ({type(v).__name__} of {len(v)} {kind})")
            children = enumerate(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            children = ((f.name, getattr(v, f.name)) for f in dataclasses.fields(v))
        else:
            return True
        for k, item in children:
            if not walk(item, path + (k,), depth + 1):
                return False
        return True

    walk(batch, (), 0)
    return out


def get_input(batch: Any, key: Key, param: str = "input_key") -> torch.Tensor:
    """The encoder input that ``key`` selects: a tensor with at least one row."""
    x = _resolve(batch, key, param)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{_label(key, param)} selects a {type(x).__name__}, not a tensor; point {param} at the input "
            f"tensor of the encoder. {_fields_hint(batch)}"
        )
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"{_label(key, param)} selects a tensor of shape {tuple(x.shape)}, which has no rows.")
    return x


def get_ids(batch: Any, key: Key, n: int, param: str = "id_key") -> Optional[List[str]]:
    """The ``n`` sample ids that ``key`` selects, as strings; None when ``key`` is None."""
    if key is None:
        return None
    ids = _resolve(batch, key, param)
    if isinstance(ids, torch.Tensor):
        if ids.ndim == 0:
            raise TypeError(f"{_label(key, param)} selects a 0-d tensor, not one id per row. {_fields_hint(batch)}")
        ids = ids.reshape(-1).tolist()  # (B,) or (B, 1)
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(
            f"{_label(key, param)} selects a {type(ids).__name__}, not one id per row; point {param} at a "
            f"per-sample tensor or list. {_fields_hint(batch)}"
        )
    ids = [str(i.item() if isinstance(i, torch.Tensor) and i.numel() == 1 else i) for i in ids]
    if len(ids) != n:
        raise ValueError(
            f"{_label(key, param)} holds {len(ids)} ids for a batch of {n} rows; point {param} at a "
            f"per-sample field with {n} entries. {_fields_hint(batch)}"
        )
    return ids


def looks_like_images(x: Any) -> bool:
    """A float (B, C, H, W) tensor with 1 or 3 channels."""
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3) and x.is_floating_point()


# ------------------------------------------------------------------------------------ editing
def _warn_once(key: tuple, message: str, stacklevel: int = 3) -> None:
    # stacklevel points at whoever called apply_decision (the callback), not at this module.
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UneditableBatchWarning, stacklevel=stacklevel)


def is_per_sample(v: Any, n: int) -> bool:
    """``v`` holds one entry per row of an n-row batch: a tensor whose first dimension is n. The one
    test every slicer uses (micro-batches, curation's edits, rank-synchronous padding). Known
    ambiguity: a shared tensor whose first dimension happens to equal n counts too."""
    return isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == n


def _holds_rows(v: Any, n: int, depth: int = 0) -> bool:
    """Whether ``v`` is, or contains, a B-row tensor (a view of the batch, not one sample)."""
    if is_per_sample(v, n):
        return True
    if depth > 16:
        return False
    if isinstance(v, Mapping):
        return any(_holds_rows(item, n, depth + 1) for item in v.values())
    if isinstance(v, (list, tuple)):
        return any(_holds_rows(item, n, depth + 1) for item in v)
    return False


def _per_sample_sequence(v: Any, n: int) -> bool:
    # A list of B views (each B rows) is not per-sample, even when there happen to be B views.
    is_namedtuple = isinstance(v, tuple) and hasattr(v, "_fields")
    return (isinstance(v, (list, tuple)) and not is_namedtuple and len(v) == n
            and not all(_holds_rows(item, n) for item in v))


def _blocker(v: Any, n: int, path: Path, rebindable: bool, holder: str = "") -> Optional[Tuple[Path, str, str]]:
    """The first per-sample field under ``v`` that cannot be edited: (path, what it is, its holder's type).

    ``rebindable``: whether whoever holds ``v`` can replace it (a dict value, a list item, an item
    of a tuple that is itself rebuilt)."""
    if is_per_sample(v, n):
        return None if rebindable else (path, f"a tensor of shape {tuple(v.shape)}", holder)
    if _per_sample_sequence(v, n):
        # A list can be sliced in place; a tuple must be rebuilt, so its holder must rebind it.
        return None if rebindable or isinstance(v, list) else (path, f"a {type(v).__name__} of {n} items", holder)
    if isinstance(v, MutableMapping):
        children: Iterable = ((k, item, True) for k, item in v.items())
    elif isinstance(v, list):
        children = ((i, item, True) for i, item in enumerate(v))
    elif isinstance(v, tuple):
        children = ((i, item, rebindable) for i, item in enumerate(v))
    elif isinstance(v, Mapping):
        children = ((k, item, False) for k, item in v.items())
    else:
        return None  # objects are not looked into
    for k, item, can in children:
        found = _blocker(item, n, path + (k,), can, type(v).__name__)
        if found is not None:
            return found
    return None


class _Editor:
    """Removes the dropped rows from a tree already checked by :func:`_blocker`."""

    def __init__(self, keep: torch.Tensor, n: int):
        self.index = keep.nonzero().reshape(-1)
        self.rows = self.index.tolist()
        self.n = n
        # id -> (object, result): a tensor or list referenced twice is filtered once, and an alias
        # stays an alias; holding the object keeps its id from being reused during the edit.
        self.memo: dict = {}

    def __call__(self, v: Any) -> Any:
        hit = self.memo.get(id(v))
        if hit is not None and hit[0] is v:
            return hit[1]
        result = self._edit(v)
        self.memo[id(v)] = (v, result)
        return result

    def _edit(self, v: Any) -> Any:
        n = self.n
        if is_per_sample(v, n):
            return v[self.index.to(v.device)]
        if _per_sample_sequence(v, n):
            kept = [v[i] for i in self.rows]
            if isinstance(v, list):
                v[:] = kept
                return v
            return type(v)(kept)
        if isinstance(v, MutableMapping):
            for k in list(v.keys()):
                new = self(v[k])
                if new is not v[k]:
                    v[k] = new
            return v
        if isinstance(v, list):
            for i, item in enumerate(v):
                new = self(item)
                if new is not item:
                    v[i] = new
            return v
        if isinstance(v, tuple):
            items = [self(item) for item in v]
            if all(a is b for a, b in zip(items, v)):
                return v
            return type(v)(*items) if hasattr(v, "_fields") else type(v)(items)
        if isinstance(v, Mapping):
            for item in v.values():
                self(item)  # mutable containers inside are edited in place; _blocker vetted the rest
        return v


def _uneditable(batch: Any, n: int) -> Optional[str]:
    """Why the rows cannot all be removed from ``batch`` (with the fix), or None when they can."""
    kind = type(batch).__name__
    if isinstance(batch, torch.Tensor):
        return f"a bare {kind} batch cannot be edited in place, so no row was removed; {FIX}"
    if not isinstance(batch, (Mapping, list, tuple)):
        return (f"a {kind} batch cannot be edited in place (its fields are not looked into), so no row was "
                f"removed; {FIX}")
    if not _holds_rows(batch, n):
        return (f"no tensor in this {kind} batch has the decision's {n} rows, so no row was removed; "
                f"keep per-sample tensors in dicts, lists or tuples; {FIX}")
    found = _blocker(batch, n, (), False)
    if found is None:
        return None
    path, what, holder = found
    head = f"a {kind} batch cannot be edited in place" if isinstance(batch, tuple) else \
        f"this {kind} batch cannot be fully edited in place"
    held = f"the {holder} batch itself" if len(path) == 1 else f"a {holder}"
    return (f"{head}: its per-sample field {_fmt_path(path)} ({what}) is held by {held}, whose items cannot "
            f"be rebound, so no row was removed (a half-edited batch would be worse); {FIX}")


def _weight_target(batch: Any) -> Optional[MutableMapping]:
    # Predictable on purpose: the batch dict, else the first dict at the top level; never deeper.
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


def _no_weights(batch: Any, weight_key: str, why: str) -> str:
    reason = (f"cannot write per-sample weights into a {type(batch).__name__} batch with no dict at its top "
              f"level ({why}); return a dict (or a list/tuple holding a dict) from the collate_fn so the "
              f"weights reach training_step under {weight_key!r}")
    _warn_once(("weights", type(batch).__name__), f"jepa-monitor curation: {reason}.", stacklevel=4)
    return reason


def apply_decision(
    batch: Any,
    decision: Any,
    *,
    input_key: Key = 0,
    weight_key: str = "sample_weight",
    mode: str = "drop",
) -> BatchEdit:
    """Edit ``batch`` in place as ``decision`` says (see the module docstring for what can be edited).

    Args:
        batch: what the DataLoader yielded (after the transfer to the device).
        decision: a :class:`~jepa_monitor.policies.Decision` for this batch (``keep``, ``weight``,
            ``batch_weight``).
        input_key: where the input sits in the batch; when it resolves, its first dimension must equal
            the decision's and its device is where weights go.
        weight_key: the dict key weights are written under.
        mode: "drop" (remove rows with ``keep`` False) or "reweight" (write ``weight``).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}.")
    keep = decision.keep.detach().bool().reshape(-1)
    n = keep.numel()
    x, _ = _locate(batch, input_key)
    x = x if isinstance(x, torch.Tensor) else None
    if x is not None and (x.ndim < 1 or x.shape[0] != n):
        raise ValueError(
            f"the decision covers {n} rows but the batch input ({_label(input_key, 'input_key')}) has "
            f"shape {tuple(x.shape)}; apply a decision to the batch it was made for."
        )
    device = x.device if x is not None else keep.device
    weight = decision.weight.detach().reshape(-1)

    if mode == "reweight":
        if _write_weights(batch, weight, weight_key, device):
            return BatchEdit(n, 0, 0, True)
        return BatchEdit(n, 0, 0, False, _no_weights(batch, weight_key, "reweighting needs a dict to carry them"))

    kept = int(keep.sum())
    if kept == 0:
        raise ValueError("the decision keeps no row; a training batch must never be emptied (min_keep >= 1).")
    dropped = n - kept
    if dropped:
        reason = _uneditable(batch, n)
        if reason is not None:
            written = _write_weights(batch, weight, weight_key, device)
            then = (f"Zero weights for the dropped rows were written under {weight_key!r} instead; only a loss "
                    "that reads them honours them" if written else "Meanwhile batches like this train unfiltered")
            _warn_once(("drop", type(batch).__name__), f"jepa-monitor curation: {reason}. {then}.")
            return BatchEdit(n, 0, dropped, written, reason)
        editor = _Editor(keep, n)
        if editor(batch) is not batch:  # only a slot-less top level could be replaced; _uneditable excludes it
            raise RuntimeError("internal error: the batch itself would have to be replaced to drop rows.")
        weight = weight[keep.to(weight.device)]
    written, reason = False, None
    if float(decision.batch_weight) < 1.0:
        written = _write_weights(batch, weight, weight_key, device)
        if not written:
            reason = _no_weights(batch, weight_key, "the noisy-batch rule gave the batch a weight below 1")
    return BatchEdit(kept, dropped, 0, written, reason)
