"""The Scorer: one encoder and every option of how it is read, scoring samples exactly or fast.

Everything that differentiates the encoder goes through :class:`Scorer`: the public functions of
:mod:`jepa_monitor.functional`, the curation policies, the monitor callback and the CLI. Its two
operations are :meth:`Scorer.score` (the Jacobian: one forward plus K input-VJPs per sample) and
:meth:`Scorer.embed` (one gradient-free forward pass: the embedding, whose Gaussian prior term is the
cheap part of ``log_density``). Both read the encoder's output the same way (output selection,
token pooling, optional whitening), so the cheap stage of curation can never disagree with the
exact one about what the embedding is.

Side inputs (a text encoder's ``attention_mask``) are keyword tensors of :meth:`Scorer.score`: rows
are sliced with every micro-batch, passed to ``encoder(x, **side)``, and the mask under
``mask_key`` excludes padding from ``pool="mean"``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, ClassVar, Dict, Mapping, Optional, Protocol, Union, runtime_checkable

import torch
from torch import nn

from ._guards import scoring_context
from .batches import is_per_sample
from .approx import slq_chunk
from .jacobian import Vectorize, differentiation_point, embedding_and_gram, full_jacobian_bytes
from .logdet import PAPER_ABS_FLOOR, half_logdet
from .outputs import OutputSelector, Pooling, embed, select_output
from .progress import progress_bar
from .reading import log_prior
from .sample_scores import SampleScores
from .whitening import Whitening, whiten

METHODS = ("exact", "slq")
DEFAULT_MEMORY_BYTES = 256 * 2**20


def side_rows(side: Mapping[str, Any], n: int, rows: Any) -> Dict[str, Any]:
    """``rows`` (a slice or an index tensor) of every per-sample side input (first dimension n); the
    rest passes as is. Micro-batches and the curation gate both slice side inputs with this. Known
    ambiguity: a shared side tensor whose first dimension happens to equal n is sliced too."""
    out = {}
    for k, v in side.items():
        if is_per_sample(v, n):
            v = v[rows.to(v.device) if isinstance(rows, torch.Tensor) else rows]
        out[k] = v
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Scorer:
    """An encoder with every option of how its density score is taken.

    Args:
        encoder: an ``nn.Module`` or any callable from a batch tensor (plus side-input keywords) to
            embeddings. Modules are scored in eval mode and every submodule's ``.training`` flag is
            restored afterwards. None makes a *template*: the options alone, for
            ``JEPAScoreMonitor(scorer=...)``, which binds the module's encoder at every measurement
            (``template.replace(encoder=...)``); a template cannot score by itself.
        output: which part of a dict/tuple output is the embedding (key, index or callable).
        pool: for (B, T, K) token outputs: "mean" (masked by the side input ``mask_key`` when it is
            given), "first" (CLS), "flatten" or a callable.
        input_module: differentiate with respect to this submodule's output instead of ``x``
            (e.g. the token embedding of a language model, so integer ids can be scored). In a
            template, a dotted path on the LightningModule (``"backbone.embed_tokens"``), which the
            monitor resolves when it binds the encoder.
        whitening: a :class:`~jepa_monitor.whitening.Whitening` fitted on reference embeddings:
            score ``W(f(x) - μ)`` instead of f(x) (see :mod:`jepa_monitor.whitening`).
        prior: the Gaussian ``log_prior`` reads the embedding through: a fitted
            :class:`~jepa_monitor.whitening.Whitening` (``log N(z; μ, Σ)``, see
            :mod:`jepa_monitor.reading`), or None for the paper's N(0, I). ``jepa_score`` does not
            depend on it.
        sketch: score ``P∘f`` instead of f, P a fixed random m×K matrix with orthonormal rows
            (m = ``sketch``, drawn from a private generator seeded ``sketch_seed``): m input-VJPs
            per sample instead of K. Its level is not the exact score's (by Cauchy–Binet it leans on
            the largest singular values); a caller maps it onto the exact score with a line fitted on
            rows scored both ways (the curation policies do). ``log_prior`` and ``embedding`` stay
            those of f itself. None: exact.
        method: "exact" (K input-VJPs per sample) or "slq" (stochastic Lanczos quadrature; see
            :mod:`jepa_monitor.approx` for when it ranks well).
        paper: reproduce the paper's listing: singular values clipped at an absolute 1e-6.
        rel_floor: otherwise, singular values below ``rel_floor·σ_max`` are raised to it and
            counted in ``n_floored``.
        batch_size: micro-batch size; by default chosen so one micro-batch's Jacobian fits in
            ``memory_bytes`` bytes. Out of memory halves it and retries.
        memory_bytes: bytes one micro-batch's Jacobian rows and Gram may take (activations are not
            counted); when one sample's rows do not fit, rows are held in groups and recomputed.
        vectorize: how Jacobian rows are computed: 0 (the loop: one backward pass per row), an int
            ``w`` (``w`` rows per vmapped backward pass), ``"replicated"`` (``w`` rows per forward +
            backward pass over the samples repeated ``w`` times: plain batched kernels, no retained
            graph), ``"auto"`` (time the three once per encoder, input shape and micro-batch size
            class; keep the fastest), or None: ``"auto"`` on an accelerator and the loop on CPU
            (``python benchmarks/bench_scorer.py --rows`` compares the three on your machine).
        approx_options: keyword options of the approximate method.
        mask_key: the side input that marks real (1) and padding (0) tokens for ``pool="mean"``.
        progress: show a progress bar (rows, rows/s) while scoring.
    """

    encoder: Optional[Callable[..., Any]] = None
    output: OutputSelector = None
    pool: Pooling = "mean"
    input_module: Union[nn.Module, str, None] = None
    whitening: Optional[Whitening] = None
    method: str = "exact"
    paper: bool = False
    rel_floor: float = 1e-6
    batch_size: Optional[int] = None
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    vectorize: Vectorize = None
    approx_options: Optional[dict] = None
    mask_key: str = "attention_mask"
    progress: bool = False
    prior: Optional[Whitening] = None
    sketch: Optional[int] = None
    sketch_seed: int = 0
    #: A Scorer runs the passes each call needs; the monitor's rank-synchronous wrapper (sharded
    #: training) runs them on every rank alike, even for no row (policies call it then too).
    synchronized: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.encoder is not None and not callable(self.encoder):
            raise TypeError(f"encoder must be callable (an nn.Module or a function); got {type(self.encoder).__name__}.")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not one of {METHODS}.")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}.")
        if self.sketch is not None and not (isinstance(self.sketch, int) and self.sketch >= 1):
            raise ValueError(f"sketch must be a number of output directions >= 1, or None; got {self.sketch!r}.")
        if self.sketch is not None and self.method != "exact":
            raise ValueError("sketch is a variant of method='exact'.")

    def replace(self, **changes: Any) -> "Scorer":
        """A copy with some options changed, e.g. ``scorer.replace(whitening=w)``."""
        return dataclasses.replace(self, **changes)

    @property
    def is_template(self) -> bool:
        """Options without an encoder (or with ``input_module`` still a path): cannot score yet."""
        return self.encoder is None or isinstance(self.input_module, str)

    def _bound(self) -> None:
        if self.is_template:
            missing = "an encoder" if self.encoder is None else f"input_module={self.input_module!r} resolved to a module"
            raise ValueError(f"this Scorer is a template (it needs {missing}): bind one with "
                             "scorer.replace(encoder=..., input_module=...), or pass it to JEPAScoreMonitor(scorer=...).")

    def sketched(self, m: int) -> "Scorer":
        """This scorer with a sketch of ``m`` output directions (see ``sketch``)."""
        return self.replace(sketch=m)

    # ------------------------------------------------------------------ the embedding
    def _embedding(self, x: torch.Tensor, side: Dict[str, Any]) -> torch.Tensor:
        """(B, K) embedding of ``x`` as scored: output selected, tokens pooled, whitened."""
        raw = self.encoder(x, **side)
        mask = side.get(self.mask_key) if self.pool == "mean" else None
        if side and mask is None and self.pool == "mean" and select_output(raw, self.output).ndim == 3:
            warnings.warn(f"side inputs {sorted(side)} were given but none is named mask_key={self.mask_key!r}: "
                          "pool='mean' averages every token, padding included. Pass mask_key=<the keyword of the "
                          "attention mask>.", stacklevel=3)
        z = embed(raw, self.output, self.pool, x.shape[0], mask=mask)
        if self.whitening is not None:
            z = whiten(z, self.whitening)
        return z

    def embed(self, x: torch.Tensor, **side: Any) -> torch.Tensor:
        """f(x), detached (B, K) in the encoder's dtype, from one gradient-free forward pass under the same guards
        as scoring (a train-mode BatchNorm or dropout would give an embedding the Jacobian stage,
        which runs in eval mode, does not see)."""
        self._bound()
        _check_input(x, input_module=self.input_module, need_float=False)
        with scoring_context(self.encoder, x.device), torch.no_grad():
            return self._embedding(x, side).detach()

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """The prior term of embeddings ``z`` (B, K) as :meth:`score` reads it (under ``prior``),
        float64 (B,): with :meth:`embed`, the cheap part of ``log_density``."""
        return log_prior(z, self.prior)

    # ------------------------------------------------------------------ the score
    def score(self, x: torch.Tensor, **side: Any) -> SampleScores:
        """Score every sample of ``x`` (B, ...), all components at once.

        ``x``: images, token sequences of vectors, or tabular rows; floating point unless
        ``input_module`` is given. Each sample is flattened to D features. ``side``: keyword
        tensors passed on to the encoder (e.g. ``attention_mask=``), sliced with every micro-batch.
        """
        self._bound()
        x = _check_input(x, input_module=self.input_module, need_float=True)
        if side and self.method != "exact":
            raise ValueError(f"side inputs ({sorted(side)}) are supported by method='exact' only.")
        n, device = x.shape[0], x.device
        if n == 0:
            empty = torch.empty(0, dtype=torch.float32, device=device)
            return SampleScores(empty, empty, empty, empty.long(),
                                torch.empty(0, 0, dtype=torch.float32, device=device), 0, self.method)
        zs, ss, fs = [], [], []
        d_dim = 0
        bar = progress_bar(n, "jepa-monitor scoring") if self.progress else None
        try:
            with scoring_context(self.encoder, device):
                start, chunk = 0, self.batch_size
                while start < n:
                    if chunk is None:
                        chunk = self._first_micro_batch(x, side)
                    stop = min(start + chunk, n)
                    try:
                        z, s, floored, d_dim = self._chunk(x[start:stop], side_rows(side, n, slice(start, stop)))
                    except torch.OutOfMemoryError:
                        if stop - start == 1:
                            raise
                        chunk = max(1, (stop - start) // 2)
                        warnings.warn(f"out of memory while scoring; retrying with micro-batch {chunk}", stacklevel=2)
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        continue
                    zs.append(z)
                    ss.append(s)
                    fs.append(floored)
                    if bar is not None:
                        bar.update(stop - start)
                    start = stop
        finally:
            if bar is not None:
                bar.close()
        # The prior is taken from the embedding in the encoder's own precision: a float64 encoder
        # (e.g. an exact Gaussianizing map) must give log_density to float64 accuracy before rounding.
        z = torch.cat(zs)
        score64 = torch.cat(ss)
        prior64 = self.log_prior(z)
        return SampleScores(
            jepa_score=score64.to(torch.float32),
            log_prior=prior64.to(torch.float32),
            log_density=(score64 + prior64).to(torch.float32),
            n_floored=torch.cat(fs),
            embedding=z.detach().to(torch.float32),
            input_dim=d_dim,
            method=self.method,
        )

    def __call__(self, x: torch.Tensor, **side: Any) -> SampleScores:
        return self.score(x, **side)

    def _vectorize(self, x: torch.Tensor) -> Vectorize:
        if self.vectorize is None:
            return "auto" if x.device.type != "cpu" else None
        return self.vectorize

    def _floors(self):
        return (None, PAPER_ABS_FLOOR) if self.paper else (self.rel_floor, None)

    def _chunk(self, x: torch.Tensor, side: Dict[str, Any]):
        rel_floor, abs_floor = self._floors()

        def f(inp: torch.Tensor, **kw: Any) -> torch.Tensor:
            return self._embedding(inp, kw)

        if self.method == "exact":
            z_full = None
            if self.sketch is not None:
                with torch.no_grad():
                    z_full = f(x, **side).detach()
                p = sketch_matrix(z_full.shape[1], self.sketch, self.sketch_seed).to(z_full)

                def f(inp: torch.Tensor, **kw: Any) -> torch.Tensor:  # noqa: F811 - the sketched encoder
                    return self._embedding(inp, kw) @ p.T

            # Side inputs go as encoder_kwargs: replicated rows repeat them with the samples.
            z, g, d_dim = embedding_and_gram(f, x, input_module=self.input_module, vectorize=self._vectorize(x),
                                             memory_bytes=self.memory_bytes, encoder_kwargs=side,
                                             cache_key=self.encoder)
            s, floored = half_logdet(g, rel_floor=rel_floor, abs_floor=abs_floor)
            return (z if z_full is None else z_full), s, floored, d_dim
        return slq_chunk(lambda inp: f(inp, **side), x, input_module=self.input_module, rel_floor=rel_floor,
                         abs_floor=abs_floor, **(self.approx_options or {}))

    def _first_micro_batch(self, x: torch.Tensor, side: Dict[str, Any]) -> int:
        """Micro-batch size from one gradient-free forward pass of one sample (K and D are only known
        after a forward pass): fully scoring a first sample alone would cost a whole K-VJP loop."""
        with torch.no_grad(), differentiation_point(x[:1], self.input_module) as holder:
            z = self._embedding(holder[0] if self.input_module is None else x[:1], side_rows(side, x.shape[0], slice(0, 1)))
        if not holder:
            return 1  # the chunk path raises the explanatory error
        return micro_batch_size(z.shape[1], holder[0][0].numel(), self.memory_bytes)


_SKETCHES: Dict[tuple, torch.Tensor] = {}


def sketch_matrix(k: int, m: int, seed: int = 0) -> torch.Tensor:
    """A fixed m×K matrix with orthonormal rows (float64, CPU), the same for the same (K, m, seed):
    the first min(m, K) columns of the Q factor of a Gaussian K×m matrix from a private generator."""
    key = (int(k), int(m), int(seed))
    if key not in _SKETCHES:
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(k, min(m, k), generator=g, dtype=torch.float64))
        _SKETCHES[key] = q.T.contiguous()
    return _SKETCHES[key]


def micro_batch_size(k_dim: int, d_dim: int, memory_bytes: int) -> int:
    """Samples whose Jacobian rows and Gram fit ``memory_bytes`` bytes together (see
    :func:`jepa_monitor.jacobian.full_jacobian_bytes`); at least 1, whose rows are then chunked."""
    return max(1, memory_bytes // full_jacobian_bytes(1, k_dim, d_dim))


def _check_input(x: Any, *, input_module: Optional[nn.Module], need_float: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (batch, ...); got {type(x).__name__}.")
    if x.ndim < 2:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; it needs a batch dimension first, e.g. (batch, features). "
            "For a single sample use x.unsqueeze(0)."
        )
    if need_float and input_module is None and not x.is_floating_point():
        raise TypeError(
            f"x has dtype {x.dtype}, which cannot carry gradients. For token ids pass "
            "input_module=<the embedding layer>, and the score is taken with respect to the "
            "embedded tokens; otherwise convert x to a floating-point tensor."
        )
    return x


@runtime_checkable
class RowScorer(Protocol):
    """What a curation policy calls on a scorer: :class:`Scorer` and the monitor's rank-synchronous
    wrapper implement it. ``score`` takes the Jacobian of rows, ``embed`` is one forward pass,
    ``log_prior`` reads embeddings through the scorer's Gaussian, ``sketched(m)`` is the same scorer
    with a sketch of m output directions, ``synchronized`` says it must be called on every rank alike."""

    synchronized: bool

    def score(self, x: torch.Tensor, **side: Any) -> SampleScores: ...

    def embed(self, x: torch.Tensor, **side: Any) -> torch.Tensor: ...

    def log_prior(self, z: torch.Tensor) -> torch.Tensor: ...

    def sketched(self, m: int) -> "RowScorer": ...


def as_scorer(encoder: Any, **options: Any) -> Scorer:
    """``encoder`` as a :class:`Scorer`: a Scorer itself (with ``options`` applied on top), or a
    callable encoder wrapped with ``options``."""
    if isinstance(encoder, Scorer):
        return encoder.replace(**options) if options else encoder
    return Scorer(encoder, **options)
