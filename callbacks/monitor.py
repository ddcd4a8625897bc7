"""JEPAScoreMonitor: the encoder's own density estimate of held-out and incoming data, during training.

The callback only schedules, gathers, logs and decides; every number comes from the pure functions
of the core (:func:`jepa_monitor.score_samples`, :mod:`jepa_monitor.statistics`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from jepa_monitor import score_samples
from jepa_monitor.baselines import KNNScore, MahalanobisScore
from jepa_monitor.diagnostics import (
    DISAGREEMENT_THRESHOLD,
    REPORT_KEYS,
    TRUST_THRESHOLD,
    disagreement,
    gaussianity_report,
    score_agreement,
    trust_score,
    weakest_diagnostic,
)
from jepa_monitor.export import FORMATS, ScoreExporter, export_path
from jepa_monitor.statistics import ks_statistic, summarize, wasserstein_1

from ._batch import Key, get_ids, get_input, looks_like_images
from ._distributed import gather_objects, gather_rows
from ._tensorboard import custom_scalars_layout, image_grid, tensorboard_writers

COMPONENTS = ("jepa_score", "log_prior", "log_density")


def _message(err: BaseException) -> str:
    # str(KeyError) wraps the message in quotes
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
# Packed row layout for gathering: the three components, n_floored, rank_dim, row index, embedding.
_N_META = 6


class JEPAScoreMonitor(Callback):
    r"""Scores held-out and incoming samples with JEPA-SCORE during training and logs their distribution.

    The held-out set is scored when fit starts (that first result is the **reference** distribution),
    every ``every_n_steps`` training batches (counted by the callback itself, so gradient accumulation
    does not change the cadence), and under ``trainer.validate()`` / ``trainer.test()``. A random
    subset of the current training batch (rows drawn from a private generator) is scored every
    ``incoming_every_n_steps`` batches. Scoring runs the encoder in eval mode with every module's
    mode restored, in full precision, without touching parameters, their gradients or the global RNG,
    so a monitored run trains exactly as an unmonitored one.

    **Logged metrics** (``<name>`` is the ``name`` argument, ``<split>`` one of ``heldout``,
    ``incoming``, ``validate``, ``test``, ``<c>`` each of ``components``). Scalars go to every logger
    of the trainer through ``log_metrics`` at ``trainer.global_step``:

    - ``<name>/<split>/<c>/mean``, ``.../std``, ``.../p1``, ``.../p5``, ``.../p50``, ``.../p95`` —
      summary of the finite scores (nats; higher = more probable).
    - ``<name>/<split>/<c>/drift_ks`` — two-sample Kolmogorov–Smirnov statistic against the reference
      (held-out scores at fit start), in [0, 1].
    - ``<name>/<split>/<c>/drift_w1`` — Wasserstein-1 distance to the reference, in nats.
    - ``<name>/incoming/<c>/shift_ks``, ``<name>/incoming/<c>/shift_w1`` — incoming batch against the
      latest held-out evaluation: same encoder state, so this isolates a change in the data.
    - ``<name>/<split>/drift_alert`` — 1 when the KS statistic of ``drift_component`` is above
      ``drift_threshold`` (held-out/validate/test: ``drift_ks``; incoming: ``shift_ks``), else 0.
      Turning on also emits a rank-zero warning.
    - ``<name>/<split>/floored_fraction`` — fraction of singular values raised to the floor
      (rank-deficient Jacobians).
    - ``<name>/<split>/num_samples`` — rows scored (all ranks); ``<name>/<split>/nonfinite`` — rows
      whose score is NaN/Inf (a non-finite input row).
    - ``<name>/time/score_seconds`` — seconds the last measurement took;
      ``<name>/time/total_score_seconds`` — all scoring and curation time since fit start;
      ``<name>/time/share`` — that total divided by the wall time since fit start.
    - ``<name>/monitor/failures_total`` — measurements skipped because scoring raised.
    - ``<name>/trust/<diagnostic>`` — Gaussianity diagnostics of the held-out embeddings at every
      held-out evaluation (``epps_pulley``, ``mean_offset``, ``eig_max``, ``eig_min``,
      ``condition_number``, ``effective_rank``, ``norm_mean``, ``norm_cv_ratio``,
      ``shape_epps_pulley``, ``shape_norm_cv_ratio``, ``n_samples``, ``dim``; meanings in
      :mod:`jepa_monitor.diagnostics`); ``<name>/trust/score`` — the trust indicator in [0, 1]
      (below ``TRUST_THRESHOLD`` = 0.5 a rank-zero warning names the weakest diagnostic);
      ``<name>/trust/agreement/<a>_vs_<b>`` — Spearman correlation on half the held-out set between
      ``jepa_score``, ``log_density``, ``mahalanobis`` and ``knn`` (the two embedding baselines are
      fitted on the other half); a pair below 0.1 raises a warning.
    - With a ``policy``: ``<name>/policy/fraction_dropped``, ``<name>/policy/mean_weight``,
      ``<name>/policy/batch_weight``, ``<name>/policy/active`` (current batch),
      ``<name>/policy/rows_seen_total``, ``<name>/policy/rows_dropped_total``,
      ``<name>/policy/rows_scored_total`` (rows that needed the Jacobian score),
      ``<name>/policy/rows_nonfinite_total`` (cumulative), every ``trainer.log_every_n_steps``
      batches. Dropped and down-weighted rows go to the export with ``kept`` and ``weight``.

    TensorBoard only (the ``SummaryWriter`` of every ``TensorBoardLogger``, global rank 0):

    - histograms ``<name>/hist/<split>/<c>`` at every evaluation, and ``<name>/hist/policy/weight``;
    - images ``<name>/images/<split>_lowest`` and ``<name>/images/<split>_highest`` — the
      ``num_images`` held-out samples with the lowest / highest ``drift_component``, for (B, C, H, W)
      inputs with 1 or 3 channels;
    - a custom-scalars layout (category ``jepa-monitor <name>``) grouping quantiles, drift, alerts,
      floored fraction, time share, trust and curation charts.

    **Export** (``export`` not False): one row per scored sample in
    ``<log_dir>/jepa_monitor/<name>.csv`` (or ``.parquet``), where ``log_dir`` is the first logger's
    directory or ``trainer.default_root_dir``; columns in :mod:`jepa_monitor.export`. Rank 0 writes.

    Args:
        encoder: dotted attribute path on the LightningModule (``"encoder"``, ``"backbone.trunk"``;
            ``""`` for the module itself) or a callable ``module -> encoder``.
        heldout: a DataLoader (or iterable of batches, laid out as training batches), a tensor of
            held-out samples, or the path of a ``torch.save``-d tensor or dict batch (for YAML
            configs). At most ``heldout_max_samples`` rows are read, once, and kept in CPU memory.
        every_n_steps: held-out evaluation every this many training batches.
        input_key: where the input sits in a batch: dict key, tuple/list index, attribute name; 0 or
            None for a bare tensor.
        id_key: where per-sample ids sit in a batch (exported); held-out rows otherwise get their
            position.
        heldout_max_samples: rows of the held-out set read and scored.
        incoming_every_n_steps: incoming-batch scoring every this many training batches (None: off).
        incoming_max_rows: rows of the training batch scored (a random subset when larger).
        components: which components are logged (all by default).
        score_options: keyword options of :func:`jepa_monitor.score_samples`; ``input_module`` may be
            a dotted attribute path on the LightningModule.
        policy: a curation policy from :mod:`jepa_monitor.policies`, applied to every training batch.
        weight_key: batch key under which a reweighting policy writes per-sample weights.
        name: prefix of every key, export file name and ``state_key``: two monitors need two names.
        drift_component: the component that drives alerts and the image grids.
        drift_threshold: KS statistic above which an alert is raised.
        num_images: images per grid (0: none).
        export: ``True``/``"csv"``, ``"parquet"`` (needs pyarrow) or ``False``.
        max_failures: consecutive failed measurements after which the monitor disables itself.
        seed: seed of the private generator that picks incoming rows.
    """

    def __init__(
        self,
        encoder: Union[str, Callable[[LightningModule], Callable]] = "encoder",
        heldout: Union[str, os.PathLike, torch.Tensor, Iterable, None] = None,
        *,
        every_n_steps: int = 1000,
        input_key: Key = 0,
        id_key: Key = None,
        heldout_max_samples: int = 128,
        incoming_every_n_steps: Optional[int] = 500,
        incoming_max_rows: int = 16,
        components: Sequence[str] = COMPONENTS,
        score_options: Optional[Dict[str, Any]] = None,
        policy: Any = None,
        weight_key: str = "sample_weight",
        name: str = "jepa",
        drift_component: str = "log_density",
        drift_threshold: float = 0.5,
        num_images: int = 8,
        export: Union[bool, str] = True,
        max_failures: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if heldout is None:
            raise ValueError("JEPAScoreMonitor needs heldout=<DataLoader or tensor of held-out samples>.")
        if not (isinstance(encoder, str) or callable(encoder)):
            raise TypeError("encoder must be a dotted attribute path on the LightningModule or a callable module -> encoder.")
        for label, value in (("every_n_steps", every_n_steps), ("heldout_max_samples", heldout_max_samples),
                             ("incoming_max_rows", incoming_max_rows), ("max_failures", max_failures)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer; got {value!r}.")
        if incoming_every_n_steps is not None and (not isinstance(incoming_every_n_steps, int) or incoming_every_n_steps < 1):
            raise ValueError(f"incoming_every_n_steps must be a positive integer or None; got {incoming_every_n_steps!r}.")
        bad = [c for c in components if c not in COMPONENTS]
        if bad or not components:
            raise ValueError(f"components={tuple(components)!r}: choose one or more of {COMPONENTS}.")
        if drift_component not in COMPONENTS:
            raise ValueError(f"drift_component={drift_component!r} is not one of {COMPONENTS}.")
        if export is True:
            export = "csv"
        if export not in (False, *FORMATS):
            raise ValueError(f"export={export!r}: use True/'csv', 'parquet' or False.")
        if export == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ModuleNotFoundError as err:
                raise ModuleNotFoundError("export='parquet' needs pyarrow: pip install pyarrow, or use export='csv'.") from err
        if not name or "/" in name:
            raise ValueError(f"name={name!r} must be a non-empty string without '/'.")
        policy_key = getattr(policy, "weight_key", "sample_weight")
        if policy_key != "sample_weight":
            # A key set on the policy alone must be honoured; two different keys set on purpose
            # cannot both be.
            if weight_key not in ("sample_weight", policy_key):
                raise ValueError(
                    f"weight_key={weight_key!r} on the monitor and weight_key={policy_key!r} on the policy "
                    "differ; set it in one place."
                )
            weight_key = policy_key

        self.encoder = encoder
        self.heldout = heldout
        self.every_n_steps = every_n_steps
        self.input_key = input_key
        self.id_key = id_key
        self.heldout_max_samples = heldout_max_samples
        self.incoming_every_n_steps = incoming_every_n_steps
        self.incoming_max_rows = incoming_max_rows
        self.components = tuple(components)
        self.score_options = dict(score_options or {})
        self.policy = policy
        self.weight_key = weight_key
        self.name = name
        self.drift_component = drift_component
        self.drift_threshold = drift_threshold
        self.num_images = num_images
        self.export = export
        self.max_failures = max_failures
        self.seed = seed

        # persisted (state_dict)
        self._batches = 0
        self._reference: Optional[Dict[str, torch.Tensor]] = None
        self._latest_heldout: Optional[Dict[str, torch.Tensor]] = None
        self._history: List[Dict[str, Any]] = []
        self._failures = 0
        self._failures_total = 0
        self._disabled = False
        self._policy_failures = 0
        self._policy_disabled = False
        self._score_seconds_total = 0.0
        self._alerts: Dict[str, bool] = {}
        self._policy_counts = {"rows_seen": 0, "rows_dropped": 0, "rows_scored": 0, "rows_nonfinite": 0}
        self._trust: Optional[float] = None
        self._generator = torch.Generator().manual_seed(seed)

        # per process
        self._heldout_x: Optional[torch.Tensor] = None
        self._heldout_ids: Optional[List[str]] = None
        self._exporter: Optional[ScoreExporter] = None
        self._pending_policy_rows: List[Dict[str, Any]] = []
        self._warned: set = set()
        self._layout_written: set = set()
        self._t0: Optional[float] = None
        self._score_seconds_run = 0.0
        self._checked_train_batch = False

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[name={self.name}]"

    @property
    def _tag(self) -> str:
        return f"JEPAScoreMonitor(name={self.name!r})"

    @property
    def reference(self) -> Optional[Dict[str, torch.Tensor]]:
        """Held-out scores at fit start, per component (None before fit)."""
        return self._reference

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One entry per evaluation: batch, step, split, and the drift of ``drift_component``."""
        return self._history

    @property
    def disabled(self) -> bool:
        return self._disabled

    def state_dict(self) -> Dict[str, Any]:
        state = {
            "version": 1,
            "batches": self._batches,
            "reference": self._reference,
            "latest_heldout": self._latest_heldout,
            "history": list(self._history),
            "failures": self._failures,
            "failures_total": self._failures_total,
            "disabled": self._disabled,
            "policy_failures": self._policy_failures,
            "policy_disabled": self._policy_disabled,
            "score_seconds_total": self._score_seconds_total,
            "alerts": dict(self._alerts),
            "policy_counts": dict(self._policy_counts),
            "trust": self._trust,
            "generator": self._generator.get_state(),
        }
        if self.policy is not None and hasattr(self.policy, "state_dict"):
            state["policy"] = self.policy.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._batches = int(state_dict["batches"])
        self._reference = state_dict["reference"]
        self._latest_heldout = state_dict["latest_heldout"]
        self._history = list(state_dict["history"])
        self._failures = int(state_dict["failures"])
        self._failures_total = int(state_dict["failures_total"])
        self._disabled = bool(state_dict["disabled"])
        self._policy_failures = int(state_dict.get("policy_failures", 0))
        self._policy_disabled = bool(state_dict.get("policy_disabled", False))
        self._score_seconds_total = float(state_dict["score_seconds_total"])
        self._alerts = dict(state_dict["alerts"])
        self._policy_counts = dict(state_dict["policy_counts"])
        self._trust = state_dict["trust"]
        self._generator.set_state(state_dict["generator"])
        if "policy" in state_dict and self.policy is not None and hasattr(self.policy, "load_state_dict"):
            self.policy.load_state_dict(state_dict["policy"])

    # ------------------------------------------------------------------ configuration
    def _resolve(self, pl_module: LightningModule, path: str, what: str) -> Any:
        obj: Any = pl_module
        walked = []
        for part in [p for p in path.split(".") if p]:
            if not hasattr(obj, part):
                children = [n for n, _ in obj.named_children()] if isinstance(obj, nn.Module) else []
                where = ".".join([type(pl_module).__name__, *walked])
                raise AttributeError(
                    f"{what}={path!r}: {where} has no attribute {part!r} (its submodules: {children}). "
                    f"Pass {what}=<dotted attribute path on the LightningModule> or a callable module -> encoder."
                )
            obj = getattr(obj, part)
            walked.append(part)
        return obj

    def _encoder(self, pl_module: LightningModule) -> Callable:
        enc = self._resolve(pl_module, self.encoder, "encoder") if isinstance(self.encoder, str) else self.encoder(pl_module)
        # Never differentiate through a DDP/DataParallel wrapper: its forward syncs buffers and
        # registers gradient hooks meant for the training step.
        while isinstance(enc, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            enc = enc.module
        if not callable(enc):
            raise TypeError(f"encoder={self.encoder!r} resolved to a {type(enc).__name__}, which is not callable.")
        return enc

    def _score_fn(self, pl_module: LightningModule) -> Callable[[torch.Tensor], Any]:
        options = dict(self.score_options)
        if isinstance(options.get("input_module"), str):
            options["input_module"] = self._resolve(pl_module, options["input_module"], "score_options['input_module']")
        return functools.partial(score_samples, self._encoder(pl_module), **options)

    def _cache_heldout(self) -> None:
        if self._heldout_x is not None:
            return
        xs: List[torch.Tensor] = []
        ids: List[str] = []
        have_ids = True
        n = 0
        if isinstance(self.heldout, (str, os.PathLike)):
            # A file saved with torch.save: a tensor, or one dict batch read with input_key/id_key
            # (the form a LightningCLI YAML config can name).
            loaded = torch.load(self.heldout, map_location="cpu", weights_only=True)
            batches, key, id_key = [loaded], (0 if isinstance(loaded, torch.Tensor) else self.input_key), self.id_key
            if isinstance(loaded, torch.Tensor):
                id_key = None
        elif isinstance(self.heldout, torch.Tensor):
            batches: Any = [self.heldout]
            key: Key = 0
            id_key: Key = None
        else:
            batches, key, id_key = self.heldout, self.input_key, self.id_key
        # Creating a DataLoader iterator draws a seed from the global RNG (and so would worker
        # start-up): fork it so the training run's shuffling and augmentations are untouched.
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.no_grad():
            for batch in batches:
                x = get_input(batch, key)
                batch_ids = get_ids(batch, id_key, x.shape[0]) if id_key is not None else None
                have_ids = have_ids and batch_ids is not None
                xs.append(x.detach().cpu().clone())
                ids.extend(batch_ids or [])
                n += x.shape[0]
                if n >= self.heldout_max_samples:
                    break
        if n == 0:
            raise ValueError(
                "heldout yielded no samples; pass a non-empty DataLoader or tensor of held-out samples "
                "(check drop_last=True with a batch size larger than the held-out set)."
            )
        x = torch.cat(xs)[: self.heldout_max_samples]
        self._heldout_x = x
        self._heldout_ids = ids[: x.shape[0]] if have_ids else [str(i) for i in range(x.shape[0])]

    def _prepare(self, pl_module: LightningModule) -> None:
        """Everything that can be wrong with the configuration fails here, naming the culprit."""
        try:
            self._score_fn(pl_module)
            self._cache_heldout()
            if not self._heldout_x.is_floating_point() and "input_module" not in self.score_options:
                raise TypeError(
                    f"the held-out input has dtype {self._heldout_x.dtype}, which cannot carry gradients; "
                    "for token ids pass score_options={'input_module': '<dotted path of the embedding layer>'}."
                )
        except MisconfigurationException:
            raise
        except Exception as err:
            raise MisconfigurationException(f"{self._tag}: {_message(err)}") from err

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0 = time.perf_counter()
        self._score_seconds_run = 0.0
        self._checked_train_batch = False
        self._prepare(pl_module)
        if not trainer.loggers:
            self._warn_once("nologger", f"{self._tag}: the Trainer has no logger; scores are computed and "
                            f"exported to {trainer.default_root_dir} but not logged.")
        for writer in tensorboard_writers(trainer):
            if id(writer) not in self._layout_written:
                writer.add_custom_scalars(custom_scalars_layout(self.name, self.components, self.policy is not None))
                self._layout_written.add(id(writer))
        if self._disabled:
            return
        if self._reference is None:
            self._heldout_evaluation(trainer, pl_module, "heldout", strict=True)
        else:
            # Resumed: the reference and the series come from the checkpoint; only check that the
            # configuration still scores.
            try:
                self._score_fn(pl_module)(self._heldout_x[:2].to(pl_module.device))
            except Exception as err:
                raise MisconfigurationException(f"{self._tag}: {_message(err)}") from err

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._checked_train_batch:
            self._check_train_batch(batch)
        if self._disabled:
            return
        if self.incoming_every_n_steps is not None and self._batches % self.incoming_every_n_steps == 0:
            self._incoming_evaluation(trainer, pl_module, batch)
        if self.policy is not None and not self._policy_disabled:
            self._curate(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._batches += 1
        if not self._disabled and self._batches % self.every_n_steps == 0:
            self._heldout_evaluation(trainer, pl_module, "heldout", strict=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_policy_rows(trainer)
        self._close()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._evaluate_stage(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.TESTING:
            self._evaluate_stage(trainer, pl_module, "test")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()

    # ------------------------------------------------------------------ measurements
    def _evaluate_stage(self, trainer: Trainer, pl_module: LightningModule, split: str) -> None:
        self._prepare(pl_module)
        if self._t0 is None:
            self._t0 = time.perf_counter()
        if not self._disabled:
            self._heldout_evaluation(trainer, pl_module, split, strict=False)
        self._close()

    def _check_train_batch(self, batch: Any) -> None:
        """Runs on the first training batch, before its training step: a wrong input_key or id_key
        is a configuration error, not a measurement fault."""
        try:
            x = get_input(batch, self.input_key)
            get_ids(batch, self.id_key, x.shape[0])
            if not x.is_floating_point() and "input_module" not in self.score_options:
                raise TypeError(
                    f"input_key={self.input_key!r} selects a {x.dtype} tensor, which cannot carry gradients; "
                    "for token ids pass score_options={'input_module': '<dotted path of the embedding layer>'}."
                )
        except Exception as err:
            raise MisconfigurationException(f"{self._tag}: in the training batch: {_message(err)}") from err
        self._checked_train_batch = True

    def _score_rows(self, pl_module: LightningModule, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        s = self._score_fn(pl_module)(x.to(pl_module.device))
        n = s.jepa_score.shape[0]
        meta = torch.stack(
            [
                s.jepa_score.double().cpu(), s.log_prior.double().cpu(), s.log_density.double().cpu(),
                s.n_floored.double().cpu(), torch.full((n,), float(s.rank_dim if n else 0), dtype=torch.float64),
                index.double().cpu(),
            ],
            dim=1,
        )
        return torch.cat([meta, s.embedding.double().cpu()], dim=1)

    def _measure(self, trainer: Trainer, compute: Callable[[], torch.Tensor], what: str,
                 strict: bool) -> Optional[Dict[str, Any]]:
        """Run ``compute`` (this rank's packed rows), gather all ranks' rows; None (and a warning) when
        it failed on any rank. Every rank reaches the same collectives whether or not it failed."""
        start = time.perf_counter()
        rows = err = None
        try:
            rows = compute()
        except Exception as e:  # a fault inside scoring must never end the training run
            err = e
        # Every rank reaches the gather even when it failed, so a strict (fit-start) failure on one
        # rank fails all of them instead of leaving the others waiting in the collective.
        gathered = gather_rows(trainer.strategy, rows, trainer.world_size)
        seconds = time.perf_counter() - start
        self._add_seconds(seconds)
        if gathered is None:
            if strict:
                reason = _message(err) if err is not None else "it failed on another rank"
                raise MisconfigurationException(f"{self._tag}: scoring the {what} failed: {reason}") from err
            self._on_failure(what, err)
            return None
        self._failures = 0
        out = {c: gathered[:, i].to(torch.float32) for i, c in enumerate(COMPONENTS)}
        out["n_floored"] = gathered[:, 3]
        out["rank_dim"] = gathered[:, 4]
        out["index"] = gathered[:, 5].long()
        out["embedding"] = gathered[:, _N_META:].to(torch.float32)
        out["seconds"] = seconds
        return out

    def _on_failure(self, what: str, err: Optional[BaseException]) -> None:
        self._failures += 1
        self._failures_total += 1
        reason = f"{type(err).__name__}: {err}" if err is not None else "it failed on another rank"
        warnings.warn(
            f"{self._tag}: scoring the {what} at training batch {self._batches} failed ({reason}); the "
            f"measurement is skipped and training continues ({self._failures}/{self.max_failures} in a row).",
            RuntimeWarning, stacklevel=2,
        )
        if self._failures >= self.max_failures:
            self._disabled = True
            warnings.warn(
                f"{self._tag}: DISABLED after {self._failures} consecutive scoring failures (last: {reason}). "
                "No more scores are measured or logged and no batch is curated in this run; fix the cause "
                "and restart (the state is in the checkpoint).",
                RuntimeWarning, stacklevel=2,
            )

    def _on_policy_failure(self, err: BaseException) -> None:
        """Curation makes no collective call, so its faults are counted per rank, apart from the
        measurements (whose failures every rank learns through the gather and counts alike): a
        rank-local count must never switch off a rank's measurements and strand the others in a
        collective."""
        self._policy_failures += 1
        warnings.warn(
            f"{self._tag}: curating training batch {self._batches} failed ({type(err).__name__}: {err}); the batch "
            f"trains unfiltered ({self._policy_failures}/{self.max_failures} in a row).",
            RuntimeWarning, stacklevel=2,
        )
        if self._policy_failures >= self.max_failures:
            self._policy_disabled = True
            warnings.warn(
                f"{self._tag}: curation DISABLED on this rank after {self._policy_failures} consecutive failures; "
                "batches train unfiltered from now on (monitoring continues).",
                RuntimeWarning, stacklevel=2,
            )

    def _add_seconds(self, seconds: float) -> None:
        self._score_seconds_total += seconds
        self._score_seconds_run += seconds

    def _heldout_evaluation(self, trainer: Trainer, pl_module: LightningModule, split: str, strict: bool) -> None:
        with torch.inference_mode(False), torch.no_grad():
            n = self._heldout_x.shape[0]
            index = torch.arange(trainer.global_rank, n, trainer.world_size)
            res = self._measure(trainer, lambda: self._score_rows(pl_module, self._heldout_x[index], index),
                                f"{split} set", strict)
            if res is None:
                self._flush_policy_rows(trainer)
                return
            order = torch.argsort(res["index"])  # rank-interleaved shards back to held-out order
            res = {k: (v[order] if isinstance(v, torch.Tensor) else v) for k, v in res.items()}
            scores = {c: res[c] for c in COMPONENTS}
            if split == "heldout":
                if self._reference is None:
                    self._reference = {c: v.clone() for c, v in scores.items()}
                self._latest_heldout = {c: v.clone() for c, v in scores.items()}
            with self._reporting(f"{split} set"):
                metrics = self._split_metrics(split, res, compare_to=self._reference, prefix="drift")
                ks = metrics.get(f"{self.name}/{split}/{self.drift_component}/drift_ks")
                metrics.update(self._alert(split, ks, "held-out scores moved away from the reference"))
                metrics.update(self._time_metrics(res["seconds"]))
                if split == "heldout":
                    metrics.update(self._trust_metrics(res["embedding"], scores))
                    self._calibrate_policy(scores)
                self._history.append(self._history_entry(trainer, split, metrics))
                self._log(trainer, metrics)
                self._write_tensorboard(trainer, split, scores, images=self._heldout_x[res["index"]])
                self._export(trainer, split, scores, res["n_floored"], [self._heldout_ids[i] for i in res["index"].tolist()])
            if split == "heldout":
                self._flush_policy_rows(trainer)

    def _incoming_evaluation(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        with torch.inference_mode(False), torch.no_grad():
            picked: Dict[str, Any] = {}

            def compute() -> torch.Tensor:
                x = get_input(batch, self.input_key)
                n = x.shape[0]
                rows = torch.arange(n)
                if n > self.incoming_max_rows:
                    rows = torch.randperm(n, generator=self._generator)[: self.incoming_max_rows].sort().values
                ids = get_ids(batch, self.id_key, n)
                picked["ids"] = [ids[i] for i in rows.tolist()] if ids is not None else None
                return self._score_rows(pl_module, x[rows.to(x.device)], rows)

            res = self._measure(trainer, compute, "incoming batch", strict=False)
            if self.id_key is not None:
                id_lists = gather_objects(picked.get("ids"), trainer.world_size)
            if res is None:
                return
            with self._reporting("incoming batch"):
                metrics = self._split_metrics("incoming", res, compare_to=self._reference, prefix="drift")
                metrics.update(self._split_metrics("incoming", res, compare_to=self._latest_heldout, prefix="shift", summary=False))
                ks = metrics.get(f"{self.name}/incoming/{self.drift_component}/shift_ks")
                metrics.update(self._alert("incoming", ks, "incoming data differ from the held-out data"))
                metrics.update(self._time_metrics(res["seconds"]))
                self._history.append(self._history_entry(trainer, "incoming", metrics))
                self._log(trainer, metrics)
                scores = {c: res[c] for c in COMPONENTS}
                self._write_tensorboard(trainer, "incoming", scores, images=None)
                all_ids = None
                if self.id_key is not None and all(i is not None for i in id_lists):
                    all_ids = [i for lst in id_lists for i in lst]
                self._export(trainer, "incoming", scores, res["n_floored"], all_ids)

    # ------------------------------------------------------------------ curation (policy)
    def _curate(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> None:
        from jepa_monitor.batch_edit import apply_decision

        start = time.perf_counter()
        try:
            x = get_input(batch, self.input_key)
            ids = get_ids(batch, self.id_key, x.shape[0])
            with torch.inference_mode(False), torch.no_grad():
                decision = self.policy.decide_batch(self._score_fn(pl_module), x, self._batches, trust=self._trust)
        except Exception as err:
            self._add_seconds(time.perf_counter() - start)
            self._on_policy_failure(err)
            return
        self._policy_failures = 0
        # Editing the batch is not a measurement: an error here is a bug or an uneditable batch and
        # must surface rather than train on a half-edited batch.
        apply_decision(batch, decision, input_key=self.input_key, weight_key=self.weight_key, mode=self.policy.mode)
        self._add_seconds(time.perf_counter() - start)
        keep = decision.keep.detach().cpu().bool()
        weight = decision.weight.detach().cpu().float()
        self._policy_counts["rows_seen"] += int(keep.numel())
        self._policy_counts["rows_dropped"] += int((~keep).sum())
        self._policy_counts["rows_scored"] += int(getattr(decision, "n_scored", 0))
        self._policy_counts["rows_nonfinite"] += int(getattr(decision, "n_nonfinite", 0))
        touched = (~keep) | (weight < 1)
        if touched.any():
            sel = touched.nonzero().reshape(-1)
            score_key = getattr(self.policy, "score_key", None)
            self._pending_policy_rows.append({
                "step": trainer.global_step,
                "ids": [ids[i] for i in sel.tolist()] if ids is not None else None,
                "scores": {score_key: decision.scores.detach().cpu().double()[sel].tolist()} if score_key in COMPONENTS else {},
                "kept": keep[sel].int().tolist(),
                "weight": weight[sel].tolist(),
            })
        if trainer.log_every_n_steps and self._batches % trainer.log_every_n_steps == 0:
            self._log(trainer, {
                f"{self.name}/policy/fraction_dropped": float((~keep).float().mean()),
                f"{self.name}/policy/mean_weight": float(weight.mean()),
                f"{self.name}/policy/batch_weight": float(decision.batch_weight),
                f"{self.name}/policy/active": float(bool(decision.active)),
                f"{self.name}/policy/rows_seen_total": float(self._policy_counts["rows_seen"]),
                f"{self.name}/policy/rows_dropped_total": float(self._policy_counts["rows_dropped"]),
                f"{self.name}/policy/rows_scored_total": float(self._policy_counts["rows_scored"]),
                f"{self.name}/policy/rows_nonfinite_total": float(self._policy_counts["rows_nonfinite"]),
            })
            for writer in tensorboard_writers(trainer):
                writer.add_histogram(f"{self.name}/hist/policy/weight", weight.numpy(), trainer.global_step)

    def _calibrate_policy(self, scores: Dict[str, torch.Tensor]) -> None:
        if self.policy is None:
            return
        # Every component: the policy picks its own, and its cheap first stage needs the others.
        try:
            self.policy.calibrate(scores)
        except Exception as err:  # e.g. no finite held-out score after a divergence: keep the old threshold
            self._warn_once("calibrate", f"{self._tag}: policy calibration skipped ({type(err).__name__}: {err}).")

    def _flush_policy_rows(self, trainer: Trainer) -> None:
        """Dropped-row exports are buffered per rank and gathered at held-out evaluations, so
        curation itself needs no collective call per training step."""
        if self.policy is None:
            return
        per_rank = gather_objects(self._pending_policy_rows, trainer.world_size)
        self._pending_policy_rows = []
        with self._reporting("curated rows"):
            for rows in per_rank:
                for r in rows:
                    n = len(r["kept"])
                    self._export_rows(trainer, r["step"], "incoming", n, sample_ids=r["ids"], scores=r["scores"],
                                      kept=r["kept"], weight=r["weight"])

    @contextlib.contextmanager
    def _reporting(self, what: str) -> Iterator[None]:
        """Statistics, logging, TensorBoard and export after a measurement: a fault there (a full
        disk, a logger error) is a warning, never the end of the run. No collective call may run
        inside, since only some ranks may fail."""
        try:
            yield
        except Exception as err:
            warnings.warn(
                f"{self._tag}: reporting the {what} at training batch {self._batches} failed "
                f"({type(err).__name__}: {err}); those results are not logged, training continues.",
                RuntimeWarning, stacklevel=3,
            )

    # ------------------------------------------------------------------ metrics
    def _split_metrics(self, split: str, res: Dict[str, Any], compare_to: Optional[Dict[str, torch.Tensor]],
                       prefix: str, summary: bool = True) -> Dict[str, float]:
        p = f"{self.name}/{split}"
        metrics: Dict[str, float] = {}
        if summary:
            n = res["jepa_score"].shape[0]
            finite = torch.stack([torch.isfinite(res[c]) for c in COMPONENTS]).all(0)
            metrics[f"{p}/num_samples"] = float(n)
            metrics[f"{p}/nonfinite"] = float(n - int(finite.sum()))
            total = float(res["rank_dim"].sum())
            metrics[f"{p}/floored_fraction"] = float(res["n_floored"].sum()) / total if total else 0.0
            for c in self.components:
                for key, value in summarize(res[c]).items():
                    if key != "nonfinite":
                        metrics[f"{p}/{c}/{key}"] = float(value)
        if compare_to is not None:
            for c in self.components:
                metrics[f"{p}/{c}/{prefix}_ks"] = float(ks_statistic(res[c], compare_to[c]))
                metrics[f"{p}/{c}/{prefix}_w1"] = float(wasserstein_1(res[c], compare_to[c]))
        return metrics

    def _alert(self, split: str, ks: Optional[float], meaning: str) -> Dict[str, float]:
        if ks is None:
            return {}
        on = bool(ks > self.drift_threshold)
        if on and not self._alerts.get(split, False):
            rank_zero_warn(
                f"{self._tag}: drift alert on {split} at training batch {self._batches}: KS statistic of "
                f"{self.drift_component} = {ks:.3f} > drift_threshold = {self.drift_threshold} ({meaning})."
            )
        self._alerts[split] = on
        return {f"{self.name}/{split}/drift_alert": float(on)}

    def _time_metrics(self, seconds: float) -> Dict[str, float]:
        wall = time.perf_counter() - self._t0 if self._t0 is not None else 0.0
        return {
            f"{self.name}/time/score_seconds": seconds,
            f"{self.name}/time/total_score_seconds": self._score_seconds_total,
            f"{self.name}/time/share": self._score_seconds_run / wall if wall > 0 else 0.0,
            f"{self.name}/monitor/failures_total": float(self._failures_total),
        }

    def _trust_metrics(self, embedding: torch.Tensor, scores: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Can the held-out scores be read as a density right now? (see :mod:`jepa_monitor.diagnostics`)"""
        p = f"{self.name}/trust"
        finite = torch.isfinite(embedding).all(1) & torch.isfinite(scores["jepa_score"])
        if int(finite.sum()) < 8:
            return {}
        z = embedding[finite]
        try:
            # Its directions come from a private generator with a fixed seed: comparable across
            # evaluations and no draw from the global RNG.
            report = gaussianity_report(z)
            trust = trust_score(report)
            # The embedding baselines must be fitted on samples other than the ones they score.
            fit, held = torch.arange(z.shape[0]) % 2 == 0, torch.arange(z.shape[0]) % 2 == 1
            agreement = score_agreement({
                "jepa_score": scores["jepa_score"][finite][held],
                "log_density": scores["log_density"][finite][held],
                "mahalanobis": MahalanobisScore(shrinkage="ledoit_wolf").fit(z[fit]).score(z[held]),
                "knn": KNNScore(k=min(5, int(fit.sum()))).fit(z[fit]).score(z[held]),
            })
        except Exception as err:  # a diagnostic must not cost a measurement, let alone the run
            self._warn_once("trust", f"{self._tag}: trust diagnostics skipped ({type(err).__name__}: {err}).")
            return {}
        self._trust = trust
        metrics = {f"{p}/{k}": float(report[k]) for k in REPORT_KEYS}
        metrics[f"{p}/score"] = trust
        metrics.update({f"{p}/agreement/{pair}": float(rho) for pair, rho in agreement.items()})
        low = trust < TRUST_THRESHOLD
        if low and not self._alerts.get("trust", False):
            rank_zero_warn(
                f"{self._tag}: trust {trust:.2f} < {TRUST_THRESHOLD} at training batch {self._batches}: the held-out "
                f"embeddings are far from N(0, I) (weakest diagnostic: {weakest_diagnostic(report)}), so the "
                "scores cannot be read as a density yet."
            )
        self._alerts["trust"] = low
        pairs = disagreement(agreement)
        if pairs and not self._alerts.get("agreement", False):
            rank_zero_warn(f"{self._tag}: scores disagree sharply on the held-out set (Spearman < "
                           f"{DISAGREEMENT_THRESHOLD}): {', '.join(pairs)}.")
        self._alerts["agreement"] = bool(pairs)
        return metrics

    def _history_entry(self, trainer: Trainer, split: str, metrics: Dict[str, float]) -> Dict[str, Any]:
        c = self.drift_component
        key = "shift" if split == "incoming" else "drift"
        return {
            "batch": self._batches,
            "step": trainer.global_step,
            "split": split,
            "mean": metrics.get(f"{self.name}/{split}/{c}/mean"),
            "drift_ks": metrics.get(f"{self.name}/{split}/{c}/{key}_ks"),
            "drift_w1": metrics.get(f"{self.name}/{split}/{c}/{key}_w1"),
        }

    # ------------------------------------------------------------------ outputs
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _log(self, trainer: Trainer, metrics: Dict[str, float]) -> None:
        if not trainer.is_global_zero:
            return
        if not trainer.loggers:
            self._warn_once("nologger", f"{self._tag}: the Trainer has no logger; scores are computed and "
                            f"exported to {trainer.default_root_dir} but not logged.")
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def _write_tensorboard(self, trainer: Trainer, split: str, scores: Dict[str, torch.Tensor],
                           images: Optional[torch.Tensor]) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        step = trainer.global_step
        for writer in writers:
            for c in self.components:
                v = scores[c][torch.isfinite(scores[c])]
                if v.numel():
                    writer.add_histogram(f"{self.name}/hist/{split}/{c}", v.numpy(), step)
        if images is not None and self.num_images > 0 and looks_like_images(images):
            s = scores[self.drift_component]
            finite = torch.isfinite(s).nonzero().reshape(-1)
            k = min(self.num_images, finite.numel())
            if k:
                order = finite[torch.argsort(s[finite])]
                low, high = image_grid(images[order[:k]]), image_grid(images[order[-k:].flip(0)])
                for writer in writers:
                    writer.add_image(f"{self.name}/images/{split}_lowest", low, step)
                    writer.add_image(f"{self.name}/images/{split}_highest", high, step)
        for writer in writers:
            writer.flush()

    def _log_dir(self, trainer: Trainer) -> str:
        for logger in trainer.loggers:
            if getattr(logger, "log_dir", None):
                return logger.log_dir
        return trainer.default_root_dir

    def _export(self, trainer: Trainer, split: str, scores: Dict[str, torch.Tensor], n_floored: torch.Tensor,
                ids: Optional[List[str]]) -> None:
        n = scores["jepa_score"].shape[0]
        self._export_rows(trainer, trainer.global_step, split, n, sample_ids=ids,
                          scores={c: scores[c] for c in COMPONENTS}, n_floored=n_floored.long())

    def _export_rows(self, trainer: Trainer, step: int, split: str, n: int, **columns: Any) -> None:
        if not self.export or not trainer.is_global_zero:
            return
        if self._exporter is None:
            self._exporter = ScoreExporter(export_path(self._log_dir(trainer), self.name, self.export), self.export)
        self._exporter.write(step, split, n, **columns)

    @property
    def export_file(self) -> Optional[str]:
        """Path of the per-sample export once something was written (rank 0)."""
        return None if self._exporter is None else str(self._exporter.path)

    def _close(self) -> None:
        if self._exporter is not None:
            self._exporter.close()
