"""Exact input Jacobians of an encoder, one micro-batch at a time, reduced to Grams at once.

The cost floor is one forward pass plus K input-only vector-Jacobian products. Each VJP is taken
on ``z[:, k].sum()``, which yields every sample's k-th Jacobian row in one backward pass; that is
valid because scoring runs in eval mode, where samples do not interact. Materialising the whole
(B, K, D) Jacobian is what exhausts memory, so each micro-batch is reduced to its (n, n) Gram before
the next one starts.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, List, Optional

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


def _vjp_rows_loop(z: torch.Tensor, leaf: torch.Tensor, out: torch.Tensor) -> None:
    for k in range(z.shape[1]):
        (g,) = torch.autograd.grad(z[:, k].sum(), leaf, retain_graph=True, allow_unused=True)
        if g is None:
            # z carries a graph (through the parameters) that never reaches the input.
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        out[:, k] = g.reshape(out.shape[0], -1)


def _vjp_rows_batched(z: torch.Tensor, leaf: torch.Tensor, out: torch.Tensor, rows: int) -> None:
    b, k_dim = z.shape
    eye = torch.eye(k_dim, dtype=z.dtype, device=z.device)
    for start in range(0, k_dim, rows):
        stop = min(start + rows, k_dim)
        grad_out = eye[start:stop, None, :].expand(stop - start, b, k_dim)
        (g,) = torch.autograd.grad(
            z, leaf, grad_outputs=grad_out, retain_graph=True, is_grads_batched=True, allow_unused=True
        )
        if g is None:
            raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
        out[:, start:stop] = g.reshape(stop - start, b, -1).transpose(0, 1)


def differentiable_forward(
    encoder: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    output: OutputSelector,
    pool: Pooling,
    input_module: Optional[nn.Module],
):
    """(leaf, z): the tensor to differentiate against and the (b, K) embedding built from it."""
    with differentiation_point(x, input_module) as holder:
        if input_module is None:
            raw = encoder(holder[0])
        else:
            # Inference tensors (ids fetched under inference_mode) cannot be saved for backward.
            raw = encoder(x.clone() if x.is_inference() else x)
            if not holder:
                raise ValueError(
                    f"input_module {type(input_module).__name__} was not called during the encoder's "
                    "forward pass; pass the module whose output the encoder actually consumes."
                )
    z = embed(raw, output, pool, x.shape[0])
    if not z.requires_grad:
        raise NotDifferentiableError(_NOT_DIFFERENTIABLE)
    return holder[0], z


def embedding_and_jacobian(
    encoder: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    *,
    output: OutputSelector = None,
    pool: Pooling = "mean",
    input_module: Optional[nn.Module] = None,
    vectorize: Optional[int] = None,
):
    """(z (b, K) detached, J (b, K, D)) for one micro-batch. Call inside ``scoring_context``.

    ``vectorize`` = number of Jacobian rows per batched backward pass (``is_grads_batched``); None
    or 0 loops over rows, which measured fastest on CPU. A batching failure (no vmap rule for an
    op, e.g. attention on CPU) falls back to the loop.
    """
    leaf, z = differentiable_forward(encoder, x, output=output, pool=pool, input_module=input_module)
    b, k_dim = z.shape
    jac = torch.empty(b, k_dim, leaf[0].numel(), dtype=z.dtype, device=z.device)
    if vectorize:
        try:
            _vjp_rows_batched(z, leaf, jac, vectorize)
        except NotDifferentiableError:
            raise
        except RuntimeError:
            _vjp_rows_loop(z, leaf, jac)
    else:
        _vjp_rows_loop(z, leaf, jac)
    return z.detach(), jac
