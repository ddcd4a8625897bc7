"""The conditions under which a Jacobian of the encoder means what we say it means.

Every trap in this file silently changes the number without raising: train-mode BatchNorm couples
samples and dropout randomises f; ``torch.inference_mode`` (Lightning's default under validate/test)
turns every gradient into zeros; an active autocast or TF32 computes the Jacobian in reduced
precision; and any random draw or DataLoader iterator consumes the training run's global RNG.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator, List

import torch
from torch import nn


def _modules_of(encoder: object, depth: int = 0) -> List[nn.Module]:
    """The modules an encoder callable runs: the module itself, a bound method's owner
    (``model.encode``), and the modules a closure or ``functools.partial`` holds
    (``lambda x: model.backbone(x)[:, 0]``), followed two levels deep."""
    if isinstance(encoder, nn.Module):
        return [encoder]
    owner = getattr(encoder, "__self__", None)
    if isinstance(owner, nn.Module):
        return [owner]
    if depth >= 2:
        return []
    found: List[nn.Module] = []
    if isinstance(encoder, functools.partial):
        for part in (encoder.func, *encoder.args, *encoder.keywords.values()):
            found += _modules_of(part, depth + 1)
    for cell in getattr(encoder, "__closure__", None) or ():
        try:
            found += _modules_of(cell.cell_contents, depth + 1)
        except ValueError:  # an empty cell
            continue
    return found


@contextlib.contextmanager
def _eval_mode(encoder: object) -> Iterator[None]:
    modules = {id(m): m for m in _modules_of(encoder)}.values()
    # Remember each submodule's own flag: a model may deliberately keep parts in eval mode
    # (frozen teacher, frozen BatchNorm) and must get back exactly what it had.
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def _precision_switches() -> list:
    """The backends' ``fp32_precision`` settings (torch >= 2.9), root first.

    Root first because setting a parent propagates to its children; restoring in the same order
    puts every child back to its own value.
    """
    b = torch.backends
    candidates = [b, getattr(b, "cuda", None), getattr(b, "cudnn", None), getattr(b, "mkldnn", None)]
    for parent in (getattr(b, "cuda", None), getattr(b, "cudnn", None), getattr(b, "mkldnn", None)):
        for child in ("matmul", "conv", "rnn"):
            candidates.append(getattr(parent, child, None))
    return [c for c in candidates if c is not None and hasattr(c, "fp32_precision")]


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    switches = _precision_switches()
    if switches:
        # The per-backend API covers oneDNN on CPU too ("medium" there means bf16 matmuls). The
        # legacy getters raise once user code has mixed both APIs, so they are never read here.
        saved = [(s, s.fp32_precision) for s in switches]
        for s in switches:
            s.fp32_precision = "ieee"
        try:
            yield
        finally:
            for s, value in saved:
                s.fp32_precision = value
        return
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(_full_fp32_matmul())
        for device_type in {"cpu", device.type}:
            if device_type in ("cpu", "cuda") and (device_type == "cpu" or torch.cuda.is_available()):
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


@contextlib.contextmanager
def scoring_context(module: object, device: torch.device) -> Iterator[None]:
    """Eval mode (restored per submodule), gradients on, full precision, private RNG.

    Safe inside ``torch.inference_mode()`` and ``torch.no_grad()``; leaves the global RNG state,
    every submodule's ``.training`` flag and the TF32/autocast settings exactly as it found them.
    """
    rng_devices = [device] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.random.fork_rng(devices=rng_devices))
        stack.enter_context(_full_precision(device))
        stack.enter_context(_eval_mode(module))
        yield
