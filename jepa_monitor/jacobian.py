"""Exact input Jacobians of an encoder, one micro-batch at a time, reduced to Grams at once.

The cost floor is one forward pass plus K input-only vector-Jacobian products. Each VJP is taken
on ``z[:, k].sum()``, which yields every sample's k-th Jacobian row in one backward pass; that is
valid because scoring runs in eval mode, where samples do not interact. Rows come one backward
pass each (the loop), ``w`` at a time through one vmapped backward pass (``is_grads_batched``), or
``w`` at a time from one forward and one backward pass over a batch in which every sample is
repeated ``w`` times (replicated rows: plain batched kernels, no vmap; the same independence of
samples makes it exact). ``vectorize="auto"`` times the three once per (encoder, input shape,
device) and keeps the fastest.

Materialising the whole (B, K, D) Jacobian is what exhausts memory, so :func:`embedding_and_gram`
never holds more Jacobian rows than ``memory_bytes`` allows: the float64 Gram is accumulated from
row blocks (converted to float64 a column chunk at a time), and when even one micro-batch's K rows
do not fit (a ViT-B at 224 px has K·D·4 = 768·150528·4 bytes ≈ 0.46 GB of float32 rows per
sample), the K ≤ D Gram G = J Jᵀ is built block by block with the rows recomputed from the
retained forward graph (see :func:`plan_rows`).
"""

from __future__ import annotations

import contextlib
import math
import time
import types
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from .outputs import OutputSelector, Pooling, embed


class NotDifferentiableError(RuntimeError):
    """The encoder's output carries no gradient back to the input."""


@contextlib.contextmanager
def differentiation_point(x: torch.Tensor, input_module: Optional[nn.Module]) -> Iterator[List[torch.Tensor]]:
    """Yield a one-item list that will hold the leaf we differentiate against.

    Without ``input_module`` the leaf is a fresh copy of ``x`` (a copy also escapes inference
    tensors). With it, a forward hook swaps that module's output for a leaf: this is how token ids
    are scored through their embedding, and how any intermediate representation can be used.
    """
    holder: List[torch.Tensor] = []
    if input_module is None:
        holder.append(x.detach().clone().requires_grad_(True))
        yield holder
        return

    def hook(_module: nn.Module, _inputs: Any, out: Any) -> torch.Tensor:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            raise TypeError(
                f"input_module {type(_module).__name__} must return a floating-point tensor to "
                f"differentiate against; it returned {type(out).__name__}."
            )
        if holder:
            # A second call would make a second, independent leaf: the Jacobian with respect to
            # only one of them is not the encoder's Jacobian, so refuse instead of half-measuring.
            raise ValueError(
                f"input_module {type(_module).__name__} was called more than once in one forward "
                "pass; pass a module that the encoder calls exactly once (e.g. the token embedding)."
            )
        leaf = out.detach().clone().requires_grad_(True)
        holder.append(leaf)
        return leaf

    handle = input_module.register_forward_hook(hook)
    try:
        yield holder
    finally:
        handle.remove()


_NOT_DIFFERENTIABLE = (
    "the encoder's output does not depend on its input through autograd (does the encoder run "
    "under torch.no_grad(), call .detach(), or go through numpy?). JEPA-SCORE needs the input "
    "Jacobian: make the forward pass differentiable with respect to x, or pass input_module=<the "
    "first differentiable layer> when x holds ids."
)


Vectorize = Union[None, bool, int, str]

AUTO = "auto"
AUTO_WIDTH_CPU = 16
"""Rows per batched backward that ``vectorize="auto"`` tries on CPU."""
AUTO_WIDTH_ACCELERATOR = 64
"""Rows per batched backward that ``vectorize="auto"`` tries on an accelerator."""
COLUMN_CHUNKS = 4
"""The float32 rows are converted to float64 ``1/COLUMN_CHUNKS`` of their features at a time:
half the bytes of the float32 rows."""

_MAX_STREAM = 16  # rows streamed past a held group at a time
_AUTO_LOOP_ROWS = 8  # rows timed for the loop (per-row cost is steady)
_AUTO_ROUNDS = 2  # interleaved timing rounds at least; the minimum of each candidate is compared
_AUTO_MIN_SECONDS = 0.15  # ... and more rounds until the timed calls have taken this long
_AUTO_MAX_ROUNDS = 32
_AUTO_MARGIN = 0.9  # batched or replicated must be at least 10 % faster per row to replace the loop


def _vjp_rows_loop(z: torch.Tensor, leaf: torch.Tensor, out: torch.Tensor, start: int = 0) -> None:
    """Rows ``start .. start + out.shape[1]`` of every sample's Jacobian into ``out`` (b, r, D),
    one backward pass per row."""
    b = out.shape[0]
    for i in range(out.shape[1]):
        (g,) = torch.autograd.grad(z[:, start + i].sum(), leaf, retain_graph=True, allow_unused=True)
        if g is None:
            # z carries a graph (through the parameters) that never reaches the input.
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        out[:, i] = g.reshape(b, -1)


def _vjp_rows_batched(z: torch.Tensor, leaf: torch.Tensor, out: torch.Tensor, rows: int, start: int = 0) -> None:
    """As :func:`_vjp_rows_loop`, ``rows`` Jacobian rows per vmapped backward pass."""
    b, k_dim = z.shape
    count = out.shape[1]
    for i0 in range(0, count, rows):
        i1 = min(i0 + rows, count)
        w = i1 - i0
        onehot = z.new_zeros(w, k_dim)
        idx = torch.arange(w, device=z.device)
        onehot[idx, start + i0 + idx] = 1
        (g,) = torch.autograd.grad(
            z, leaf, grad_outputs=onehot[:, None, :].expand(w, b, k_dim), retain_graph=True,
            is_grads_batched=True, allow_unused=True,
        )
        if g is None:
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        out[:, i0:i1] = g.reshape(w, b, -1).transpose(0, 1)


Replicated = Callable[[int], Tuple[torch.Tensor, torch.Tensor]]
"""``w -> (leaf, z)``: a fresh forward pass over the micro-batch with every sample repeated ``w``
times in a row (``repeat_interleave``), side inputs alike: leaf (b·w, ...), z (b·w, K)."""


def _vjp_rows_replicated(forward: Replicated, out: torch.Tensor, rows: int, start: int = 0) -> None:
    """As :func:`_vjp_rows_loop`, ``rows`` Jacobian rows per forward + backward pass over the
    replicated batch: copy ``i`` of every sample receives the cotangent e_(start + i0 + i), so the
    input gradient of that copy is the sample's Jacobian row. No graph is retained."""
    b, count = out.shape[0], out.shape[1]
    for i0 in range(0, count, rows):
        w = min(rows, count - i0)
        leaf, z = forward(w)
        k_dim = z.shape[1]
        onehot = z.new_zeros(b, w, k_dim)
        idx = torch.arange(w, device=z.device)
        onehot[:, idx, start + i0 + idx] = 1
        (g,) = torch.autograd.grad(z, leaf, grad_outputs=onehot.reshape(b * w, k_dim), allow_unused=True)
        if g is None:
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        out[:, i0 : i0 + w] = g.reshape(b, w, -1)


def differentiable_forward(
    encoder: Callable[..., Any],
    x: torch.Tensor,
    *,
    output: OutputSelector,
    pool: Pooling,
    input_module: Optional[nn.Module],
    encoder_kwargs: Optional[Dict[str, Any]] = None,
):
    """(leaf, z): the tensor to differentiate against and the (b, K) embedding built from it.

    ``encoder_kwargs`` (e.g. a text encoder's ``attention_mask``, sliced to this micro-batch) are
    passed through as ``encoder(x, **encoder_kwargs)``; they are not differentiated against.
    """
    kwargs = encoder_kwargs or {}
    with differentiation_point(x, input_module) as holder:
        if input_module is None:
            raw = encoder(holder[0], **kwargs)
        else:
            # Inference tensors (ids fetched under inference_mode) cannot be saved for backward.
            raw = encoder(x.clone() if x.is_inference() else x, **kwargs)
            if not holder:
                raise ValueError(
                    f"input_module {type(input_module).__name__} was not called during the encoder's "
                    "forward pass; pass the module whose output the encoder actually consumes."
                )
    z = embed(raw, output, pool, x.shape[0])
    if not z.requires_grad:
        raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
    return holder[0], z


# ---------------------------------------------------------------------------------------------
# Loop, batched or replicated rows, and the cached "auto" decision between them


_AUTO_DECISIONS: "weakref.WeakKeyDictionary[Any, Dict[tuple, Mode]]" = weakref.WeakKeyDictionary()
_AUTO_DECISIONS_BY_ID: Dict[tuple, "Mode"] = {}  # encoders that cannot be weakly referenced


def _auto_identity(encoder: Any) -> Tuple[Any, Any]:
    """(object whose lifetime the decision follows, extra key part).

    A bound method ``model.encode`` is a new object at every access: it is keyed by its module and
    function. A closure made afresh for every call (``lambda v: model(v)``, a scorer's per-chunk
    wrapper) is keyed by the module it closes over (directly, or as the ``.encoder`` of an object
    it closes over) and its code. The decision only picks the faster of two ways to compute the
    same numbers, so a shared key can cost speed, never correctness.
    """
    owner, func = getattr(encoder, "__self__", None), getattr(encoder, "__func__", None)
    if owner is not None and func is not None:
        return owner, func
    if isinstance(encoder, types.FunctionType) and encoder.__closure__:
        for cell in encoder.__closure__:
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell
                continue
            inner = value if isinstance(value, nn.Module) else getattr(value, "encoder", None)
            if isinstance(inner, nn.Module) or isinstance(getattr(inner, "__self__", None), nn.Module):
                inner_owner, inner_extra = _auto_identity(inner)
                return inner_owner, (encoder.__code__, inner_extra)
    return encoder, None


def _cache_get(encoder: Any, key: tuple) -> Optional["Mode"]:
    owner, extra = _auto_identity(encoder)
    try:
        return _AUTO_DECISIONS.get(owner, {}).get((extra, *key))
    except TypeError:
        return _AUTO_DECISIONS_BY_ID.get((id(owner), extra, *key))


def _cache_put(encoder: Any, key: tuple, mode: "Mode") -> None:
    owner, extra = _auto_identity(encoder)
    try:
        _AUTO_DECISIONS.setdefault(owner, {})[(extra, *key)] = mode
    except TypeError:
        if len(_AUTO_DECISIONS_BY_ID) > 256:  # ids are reused after garbage collection: stay small
            _AUTO_DECISIONS_BY_ID.clear()
        _AUTO_DECISIONS_BY_ID[(id(owner), extra, *key)] = mode


def cached_vectorize_decisions(encoder: Any) -> Dict[tuple, "Mode"]:
    """The ``vectorize="auto"`` decisions cached for ``encoder`` (and any wrapper of it: bound
    methods, closures): {(micro-batch size class, per-sample input shape, K, device, dtype): mode},
    mode ``("loop", 0)``, ``("batched", w)`` or ``("replicated", w)`` (``w`` rows per pass)."""
    owner, _ = _auto_identity(encoder)
    try:
        found = dict(_AUTO_DECISIONS.get(owner, {}))
    except TypeError:
        found = {k[1:]: v for k, v in _AUTO_DECISIONS_BY_ID.items() if k[0] == id(owner)}
    # Every wrapper of the same module (a bound method, a closure) is listed under the module.
    return {k[1:]: v for k, v in found.items()}


def describe_mode(mode: "Mode") -> str:
    """``("loop", 0)`` -> "loop", ``("batched", 16)`` -> "batched 16", ``("replicated", 16)`` -> "replicated 16"."""
    kind, width = mode
    return kind if kind == "loop" else f"{kind} {width}"


def clear_vectorize_cache() -> None:
    """Forget every ``vectorize="auto"`` decision (the next micro-batch measures again)."""
    _AUTO_DECISIONS.clear()
    _AUTO_DECISIONS_BY_ID.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


Mode = Tuple[str, int]
"""How Jacobian rows are computed: ("loop", 0), ("batched", w) or ("replicated", w)."""
LOOP: Mode = ("loop", 0)
KINDS = ("loop", "batched", "replicated")


def _parse_vectorize(vectorize: Vectorize) -> Tuple[str, int]:
    """("loop" | "batched" | "replicated" | "auto", width); a width of 0 means "choose it"."""
    if vectorize is None or vectorize is False:
        return LOOP
    if vectorize is True or vectorize == AUTO:
        return AUTO, 0
    if vectorize == "replicated":
        return "replicated", 0
    if isinstance(vectorize, str):
        raise ValueError(f"vectorize={vectorize!r}: pass None (loop), an int (rows per batched backward), "
                         "'replicated' or 'auto'.")
    width = int(vectorize)
    if width < 0:
        raise ValueError(f"vectorize={vectorize!r}: the number of rows per batched backward must be >= 0.")
    return ("batched", width) if width >= 2 else LOOP


def auto_width(device: torch.device, k_dim: int, b: int, d_dim: int, memory_bytes: Optional[int]) -> int:
    """Rows per batched (or replicated) pass that ``vectorize="auto"`` weighs against the loop: 16
    on CPU, 64 on an accelerator, at most K, and (with a budget) at most what keeps the gradient
    block (width × b × D float32) within half the budget. Below 2 there is nothing to batch."""
    width = min(k_dim, AUTO_WIDTH_CPU if device.type == "cpu" else AUTO_WIDTH_ACCELERATOR)
    if memory_bytes is not None:
        width = min(width, memory_bytes // max(1, 2 * b * d_dim * 4))
    return width if width >= 2 else 0


def _size_class(b: int) -> int:
    """Micro-batch sizes that share an "auto" decision: 1, 2, 3-4, 5-8, ... (the curation gate
    scores a different number of rows every batch; per-row costs change slowly with b)."""
    return 1 << max(0, b - 1).bit_length()


class _Rows:
    """Fills Jacobian rows [k0, k0 + r) of every sample into a (b, r, D) buffer: the loop and
    batched rows use the one retained forward graph (``z``, ``leaf``), replicated rows call
    ``replicated``. A batching failure (an op without a vmap rule, a batch-size-dependent model)
    falls back to the loop, out of memory halves the width. With ``auto`` set, the first
    :meth:`fill` times the candidates and keeps (and caches) the fastest."""

    def __init__(self, z: torch.Tensor, leaf: torch.Tensor, mode: Mode = LOOP,
                 replicated: Optional[Replicated] = None, auto: Optional[tuple] = None, quiet: bool = False):
        self.z, self.leaf, self.replicated = z, leaf, replicated
        self.kind, self.width = mode if mode[1] >= 2 else LOOP
        if self.kind == "replicated" and replicated is None:
            self.kind, self.width = LOOP
        self._auto = auto  # (encoder, key) while a decision is pending
        # "auto" chose batching by timing it: vmap's per-op "performance drop" notice is no news.
        self._quiet = quiet or auto is not None

    @property
    def mode(self) -> Mode:
        return (self.kind, self.width)

    def fill(self, out: torch.Tensor, k0: int) -> None:
        done = self._decide(out, k0) if self._auto is not None else 0
        if done < out.shape[1]:
            self._fill(out[:, done:], k0 + done)

    def _run(self, kind: str, width: int, out: torch.Tensor, k0: int) -> None:
        if kind == "batched":
            _vjp_rows_batched(self.z, self.leaf, out, width, k0)
        elif kind == "replicated":
            _vjp_rows_replicated(self.replicated, out, width, k0)
        else:
            _vjp_rows_loop(self.z, self.leaf, out, k0)

    def _fill(self, out: torch.Tensor, k0: int) -> None:
        while self.kind != "loop":
            try:
                with warnings.catch_warnings():
                    if self._quiet:
                        warnings.simplefilter("ignore", UserWarning)
                    self._run(self.kind, self.width, out, k0)
                return
            except NotDifferentiableError:
                raise
            except torch.OutOfMemoryError:
                self.width = self.width // 2
                if self.width < 2:
                    self.kind, self.width = LOOP
                if self.z.device.type == "cuda":
                    torch.cuda.empty_cache()
            except (RuntimeError, NotImplementedError):
                self.kind, self.width = LOOP  # no batching rule for some op: the loop computes the same rows
        _vjp_rows_loop(self.z, self.leaf, out, k0)

    def _decide(self, out: torch.Tensor, k0: int) -> int:
        """Time the loop, batched and replicated rows on this block's first rows (its rows are kept:
        all compute the same numbers); returns how many leading rows of ``out`` are filled."""
        encoder, key = self._auto
        self._auto = None
        width = min(self.width, out.shape[1])
        device = self.z.device
        self.kind, self.width = LOOP
        if width < 2:
            _cache_put(encoder, key, LOOP)
            return 0
        first = out[:, :width]
        loop_rows = min(_AUTO_LOOP_ROWS, width)
        candidates = [("batched", width)] + ([("replicated", width)] if self.replicated is not None else [])
        working = []
        with warnings.catch_warnings():
            # vmap's "performance drop ... batching rule" notice: the timing below judges that.
            warnings.simplefilter("ignore", UserWarning)
            for kind, w in candidates:
                try:
                    self._run(kind, w, first, k0)  # warm-up (untimed); its rows are kept
                    working.append((kind, w))
                except NotDifferentiableError:
                    raise
                except (RuntimeError, NotImplementedError):  # out of memory included
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            if not working:
                _cache_put(encoder, key, LOOP)
                return 0
            best = {m: math.inf for m in working}
            t_loop, rounds, spent = math.inf, 0, 0.0
            # Small models take well under a millisecond per call, less than one time slice of a
            # busy machine: keep timing (minimum of each) until the candidates have had 150 ms.
            while rounds < _AUTO_ROUNDS or (spent < _AUTO_MIN_SECONDS and rounds < _AUTO_MAX_ROUNDS):
                t = _timed(lambda: _vjp_rows_loop(self.z, self.leaf, first[:, :loop_rows], k0), device)
                t_loop, spent = min(t_loop, t), spent + t
                for kind, w in working:
                    t = _timed(lambda: self._run(kind, w, first, k0), device)
                    best[(kind, w)], spent = min(best[(kind, w)], t), spent + t
                rounds += 1
        mode, t_best = min(best.items(), key=lambda item: item[1])
        if t_best / width < _AUTO_MARGIN * t_loop / loop_rows:
            self.kind, self.width = mode
        _cache_put(encoder, key, self.mode)
        return width


def _rows_for(encoder, z, leaf, vectorize: Vectorize, memory_bytes: Optional[int], cache_key: Any = None,
              replicated: Optional[Replicated] = None) -> _Rows:
    kind, width = _parse_vectorize(vectorize)
    encoder = encoder if cache_key is None else cache_key
    b, k_dim = z.shape
    d_dim = leaf[0].numel() if b else 0
    if kind == "replicated" or kind == AUTO:
        width = auto_width(z.device, k_dim, b, d_dim, memory_bytes)
    if kind != AUTO:
        return _Rows(z, leaf, (kind, width), replicated)
    key = (_size_class(b), tuple(leaf.shape[1:]), k_dim, str(z.device), z.dtype)
    cached = _cache_get(encoder, key)
    if cached is not None:
        return _Rows(z, leaf, cached, replicated, quiet=True)
    if width < 2:
        _cache_put(encoder, key, LOOP)
        return _Rows(z, leaf, LOOP)
    return _Rows(z, leaf, (AUTO, width), replicated, auto=(encoder, key))


def _replicator(encoder, x, *, output, pool, input_module, encoder_kwargs) -> Replicated:
    """The forward pass of replicated rows for one micro-batch (see :data:`Replicated`)."""
    b = x.shape[0]

    def forward(w: int) -> Tuple[torch.Tensor, torch.Tensor]:
        kwargs = {k: v.repeat_interleave(w, 0) if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == b else v
                  for k, v in (encoder_kwargs or {}).items()}
        return differentiable_forward(encoder, x.repeat_interleave(w, 0), output=output, pool=pool,
                                      input_module=input_module, encoder_kwargs=kwargs)

    return forward


# ---------------------------------------------------------------------------------------------
# Memory-bounded Gram


@dataclass(frozen=True)
class RowPlan:
    """How one micro-batch's Jacobian rows are held while its float64 Gram is accumulated.

    Attributes:
        held: K <= D: rows held at once in a group (K when the whole Jacobian fits the budget).
            K > D: 0 (nothing is held; every block is added to Jᵀ J as it comes).
        stream: rows computed at a time past the held group (0 when one group holds all K);
            K > D: rows per block.
        groups: K <= D: held groups, i.e. passes over the rows (1 when all K fit).
        column_chunk: K <= D: features converted to float64 at once; K > D: rows per float64 piece.
        vjp_rows: Jacobian rows computed in all (each is one VJP for all b samples): K when the
            rows fit, about K·(groups + 1)/2 when the rows are recomputed group by group.
        planned_bytes: float32 row buffers + the largest float64 pieces + the Gram, for b samples.
    """

    held: int
    stream: int
    groups: int
    column_chunk: int
    vjp_rows: int
    planned_bytes: int

    @property
    def chunked(self) -> bool:
        return self.groups > 1


def full_jacobian_bytes(b: int, k_dim: int, d_dim: int) -> int:
    """Bytes :func:`embedding_and_gram` holds for ``b`` samples when nothing is recomputed: the
    float32 rows (K·D·4, or one block when K > D), one float64 column chunk of them and the (n, n)
    float64 Gram, n = min(K, D). Activations kept for the backward passes are not counted. A
    ``memory_bytes`` at least this large means one pass of K VJPs."""
    n = min(k_dim, d_dim)
    if k_dim > d_dim:
        return b * ((4 + 8 // COLUMN_CHUNKS) * k_dim * d_dim + 8 * d_dim + 8 * n * n)
    return b * (k_dim * (4 * d_dim + 8 * math.ceil(d_dim / COLUMN_CHUNKS)) + 8 * n * n)


def plan_rows(b: int, k_dim: int, d_dim: int, memory_bytes: Optional[int], width: int = 0) -> RowPlan:
    """Row blocks that keep the Jacobian buffers of ``b`` samples within ``memory_bytes`` bytes.

    K <= D (G = J Jᵀ, K × K): when the K rows fit (:func:`full_jacobian_bytes`), they are held
    once and G is formed from them. Otherwise rows are held in groups of ``held``; for each group,
    the rows after it are streamed ``stream`` at a time and the cross blocks G[group, stream] =
    J_group J_streamᵀ are formed in float64 (the symmetric block mirrored). Rows are recomputed
    by VJPs on the one retained forward graph: with p = ceil(K / held) groups that is
    K·(p + 1)/2 row-VJPs in all (p = 2: 1.5 K; 3: 2 K), memory O((held + stream)·D + K²) per
    sample, and the Gram is the same float64 sum of float32 products as the unchunked one
    (equal to rounding, ~1e-16 relative).

    K > D (G = Jᵀ J, D × D): blocks of ``stream`` rows are added to G as they come: K VJPs,
    memory O(stream·D + D²).

    ``width`` (rows per batched backward, 0 for the loop) sets the stream block (at most 16). The
    budget is a floor of at least one held and one streamed row: a budget below that is exceeded.
    """
    n = min(k_dim, d_dim)
    gram_bytes = b * n * n * 8
    if k_dim > d_dim:
        per_row = b * (4 + 8 // COLUMN_CHUNKS) * d_dim
        fit = k_dim if memory_bytes is None else (memory_bytes - gram_bytes) // max(1, per_row)
        stream = int(max(1, min(k_dim, fit)))
        piece = math.ceil(stream / COLUMN_CHUNKS)
        planned = b * (4 * stream * d_dim + 8 * piece * d_dim) + gram_bytes
        return RowPlan(0, stream, 1, piece, k_dim, planned)
    chunk = math.ceil(d_dim / COLUMN_CHUNKS)
    per_row = b * (4 * d_dim + 8 * chunk)
    if memory_bytes is None or full_jacobian_bytes(b, k_dim, d_dim) <= memory_bytes:
        return RowPlan(k_dim, 0, 1, chunk, k_dim, k_dim * per_row + gram_bytes)
    fit = max(0, (memory_bytes - gram_bytes) // max(1, per_row))
    # A short stream leaves the most room to the held group, and the group count sets the cost:
    # ViT-B/16 at 224 px in 256 MiB needs 3 groups (1.9 K row-VJPs) with 16 streamed rows, 4
    # groups (2.2 K) with 64.
    stream = int(max(1, min(width if width >= 2 else 8, _MAX_STREAM, fit // 4, k_dim - 1)))
    held = int(max(1, min(fit - stream, k_dim - 1)))
    while held > 1 and (held + stream) * per_row + gram_bytes + b * held * stream * 8 > memory_bytes:
        held -= 1  # the float64 cross block (held × stream) is part of the budget too
    groups = math.ceil(k_dim / held)
    vjp_rows = sum(min(held, k_dim - g0) + (k_dim - min(g0 + held, k_dim)) for g0 in range(0, k_dim, held))
    planned = (held + stream) * per_row + gram_bytes + b * held * stream * 8
    return RowPlan(held, stream, groups, chunk, vjp_rows, planned)


def _gram64(a: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """a cᵀ (b, r, s) in float64 from float32 rows a (b, r, D), c (b, s, D), converting ``chunk``
    features at a time: never a whole float64 copy of the rows."""
    out = None
    for f0 in range(0, a.shape[-1], chunk):
        a64 = a[..., f0 : f0 + chunk].to(torch.float64)
        c64 = a64 if c is a else c[..., f0 : f0 + chunk].to(torch.float64)
        out = torch.bmm(a64, c64.mT) if out is None else out.baddbmm_(a64, c64.mT)
    return out


def _gram_from_rows(rows: _Rows, plan: RowPlan, b: int, k_dim: int, d_dim: int) -> torch.Tensor:
    z = rows.z
    n = min(k_dim, d_dim)
    if k_dim > d_dim:
        g = torch.zeros(b, n, n, dtype=torch.float64, device=z.device)
        buf = torch.empty(b, plan.stream, d_dim, dtype=z.dtype, device=z.device)
        for c0 in range(0, k_dim, plan.stream):
            block = buf[:, : min(plan.stream, k_dim - c0)]
            rows.fill(block, c0)
            for r0 in range(0, block.shape[1], plan.column_chunk):
                p64 = block[:, r0 : r0 + plan.column_chunk].to(torch.float64)
                g.baddbmm_(p64.mT, p64)
        return g
    held = torch.empty(b, plan.held, d_dim, dtype=z.dtype, device=z.device)
    if not plan.chunked:
        rows.fill(held, 0)
        return _gram64(held, held, plan.column_chunk)
    g = torch.empty(b, n, n, dtype=torch.float64, device=z.device)
    stream = torch.empty(b, plan.stream, d_dim, dtype=z.dtype, device=z.device)
    for g0 in range(0, k_dim, plan.held):
        g1 = min(g0 + plan.held, k_dim)
        h = held[:, : g1 - g0]
        rows.fill(h, g0)
        g[:, g0:g1, g0:g1] = _gram64(h, h, plan.column_chunk)
        for c0 in range(g1, k_dim, plan.stream):
            c1 = min(c0 + plan.stream, k_dim)
            s = stream[:, : c1 - c0]
            rows.fill(s, c0)
            cross = _gram64(h, s, plan.column_chunk)
            g[:, g0:g1, c0:c1] = cross
            g[:, c0:c1, g0:g1] = cross.mT
    return g


def embedding_and_gram(
    encoder: Callable[..., Any],
    x: torch.Tensor,
    *,
    output: OutputSelector = None,
    pool: Pooling = "mean",
    input_module: Optional[nn.Module] = None,
    vectorize: Vectorize = None,
    memory_bytes: Optional[int] = None,
    encoder_kwargs: Optional[Dict[str, Any]] = None,
    cache_key: Any = None,
):
    """(z (b, K) detached, G (b, n, n) float64, D) for one micro-batch; n = min(K, D). Call inside
    ``scoring_context``.

    G is ``logdet.gram`` of the float32 Jacobian (J Jᵀ if K <= D, else Jᵀ J), accumulated in
    float64 from row blocks converted a column chunk at a time, equal to it up to float64 rounding.
    One forward pass; the Jacobian rows are VJPs on its retained graph.

    Args:
        vectorize: None/0 loops over rows (one backward each); an int ``w`` >= 2 takes ``w`` rows
            per vmapped backward (``is_grads_batched``; a batching failure falls back to the loop,
            out of memory halves ``w``); ``"replicated"`` takes ``w`` rows (16 on CPU, 64 on an
            accelerator, within the budget) per forward + backward pass over the micro-batch with
            each sample repeated ``w`` times (per-sample ``encoder_kwargs`` repeated alike);
            ``"auto"`` times the three on the first micro-batch of each (encoder, size class,
            input shape, device) and keeps the fastest for every later call (see
            :func:`cached_vectorize_decisions`). The rows are the same numbers whichever is used
            (up to float32 rounding: kernels may sum in another order at another batch size).
        memory_bytes: bytes for the Jacobian rows, their float64 pieces and the Gram (not the
            activations). When b·K·D float32 rows do not fit, rows are held in groups and
            recomputed (:func:`plan_rows`: K·(p+1)/2 row-VJPs for p groups). None: no bound.
        encoder_kwargs: extra keyword tensors for the encoder, already sliced to this micro-batch
            (e.g. ``attention_mask``). ``pool`` here does not see the mask: for masked mean pooling
            go through :class:`jepa_monitor.Scorer`, which pools inside the function it passes.
        cache_key: the object whose identity the ``"auto"`` decision is cached under (weakly
            referenced), when ``encoder`` is a wrapper made afresh for every call (a closure):
            pass the model (or a long-lived scorer). Default: ``encoder`` itself.
    """
    leaf, z = differentiable_forward(
        encoder, x, output=output, pool=pool, input_module=input_module, encoder_kwargs=encoder_kwargs
    )
    b, k_dim = z.shape
    d_dim = math.prod(leaf.shape[1:])
    replicated = _replicator(encoder, x, output=output, pool=pool, input_module=input_module,
                             encoder_kwargs=encoder_kwargs)
    rows = _rows_for(encoder, z, leaf, vectorize, memory_bytes, cache_key, replicated)
    plan = plan_rows(b, k_dim, d_dim, memory_bytes, width=rows.width)
    g = _gram_from_rows(rows, plan, b, k_dim, d_dim)
    return z.detach(), g, d_dim


def embedding_and_jacobian(
    encoder: Callable[..., Any],
    x: torch.Tensor,
    *,
    output: OutputSelector = None,
    pool: Pooling = "mean",
    input_module: Optional[nn.Module] = None,
    vectorize: Vectorize = None,
    encoder_kwargs: Optional[Dict[str, Any]] = None,
    cache_key: Any = None,
):
    """(z (b, K) detached, J (b, K, D)) for one micro-batch, the whole Jacobian at once (no memory
    bound: prefer :func:`embedding_and_gram`). Call inside ``scoring_context``. ``vectorize`` and
    ``cache_key`` as in :func:`embedding_and_gram`."""
    leaf, z = differentiable_forward(
        encoder, x, output=output, pool=pool, input_module=input_module, encoder_kwargs=encoder_kwargs
    )
    b, k_dim = z.shape
    jac = torch.empty(b, k_dim, math.prod(leaf.shape[1:]), dtype=z.dtype, device=z.device)
    replicated = _replicator(encoder, x, output=output, pool=pool, input_module=input_module,
                             encoder_kwargs=encoder_kwargs)
    _rows_for(encoder, z, leaf, vectorize, None, cache_key, replicated).fill(jac, 0)
    return z.detach(), jac
