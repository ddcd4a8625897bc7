"""JEPAScoreMonitor: the encoder's own density estimate of held-out and incoming data, during training.

The callback schedules, gathers, logs and decides; every number comes from the core
(:class:`jepa_monitor.Scorer`, :mod:`jepa_monitor.metrics`, :mod:`jepa_monitor.policies`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from jepa_monitor import metrics as mon
from jepa_monitor.batches import Key, get_ids, get_input
from jepa_monitor.reading import READINGS, cross_fitted_log_prior, fit_reading
from jepa_monitor.policies import EMBEDDING_SCORES, Policy, ThresholdPolicy
from jepa_monitor.scorer import Scorer
from jepa_monitor.whitening import Whitening

from ._clock import MonitorClock
from ._config import build_scorer, check_arguments, check_batch, read_heldout
from ._curation import Curation, curation_scorer
from ._distributed import compute_and_gather, gather_objects
from ._failures import FailureCounter
from ._heldout import HeldoutSet, pick_rows, side_inputs
from ._refresh import OnReferenceLevel, ReadingRefresh
from ._reporting import Reporter
from ._options import Alerts, Cadence, Outputs
from ._schedule import Schedule
from ._synchronous import SynchronousScorer, synchronous_world


#: The version of :meth:`JEPAScoreMonitor.state_dict`; 2 (the previous release) and 3 are read too.
STATE_VERSION = 4


def _history_entry_v4(entry: Dict[str, Any]) -> Dict[str, Any]:
    """A history entry of a state before version 4, whose incoming entries held the data-shift KS/W1
    under ``drift_ks``/``drift_w1``: named ``shift_ks``/``shift_w1`` now."""
    if entry.get("split") != "incoming" or "drift_ks" not in entry:
        return dict(entry)
    out = {k: v for k, v in entry.items() if k not in ("drift_ks", "drift_w1")}
    out.update(shift_ks=entry["drift_ks"], shift_w1=entry.get("drift_w1"))
    return out


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)  # KeyError quotes


class JEPAScoreMonitor(Callback):
    r"""Scores held-out and incoming samples with the encoder's density estimate during training.

    The held-out set is scored when fit starts, then within ``Cadence.pass_share`` of training's
    backward passes (default 5 %, counted, never timed: ``callbacks/_schedule.py``; with a policy the
    first evaluations come at doubling intervals) or every ``Cadence.every_n_batches`` training
    batches when that is given (the callback's own counter, so gradient accumulation does not change
    the cadence; the evaluation runs after the step of that batch), and under ``trainer.validate()`` /
    ``test()``. Rows of the current training batch (a random subset from a private generator) are
    scored right after each held-out evaluation (``Cadence.incoming_every_n_batches="auto"``: the same
    weights, which the data-shift test needs) or every ``incoming_every_n_batches`` batches. A
    *batch* is the callback's count of training batches; a *step* is ``trainer.global_step``. Scoring runs in eval mode
    with every module's mode restored, in full precision, without touching parameters, their
    gradients or the global RNG, so a monitored run trains exactly as an unmonitored one. Works with
    ``lightning.pytorch`` and ``pytorch_lightning`` Trainers.

    **The reading** (``reading="fitted"``, the default): ``log_prior`` and ``log_density`` read the
    embedding through the Gaussian N(μ, Σ) fitted (Ledoit–Wolf shrunk) to the held-out embeddings of
    the latest held-out evaluation, each held-out row through a fit without it
    (:mod:`jepa_monitor.reading`); ``jepa_score`` is the paper's, whatever the reading.
    ``reading="isotropic"`` reads N(0, I), as the paper does. Trust judges the reading in use. With
    a policy, the reference it is calibrated on is read again between evaluations, as often as the
    encoder's moves require (``callbacks/_refresh.py``); for the library's quantile-calibrated policies
    a row curation scores with its Jacobian is read on that reference's level (its ``jepa_score`` and
    ``log_density`` minus the median change of re-scored reference rows since the evaluation; also in
    the export). Everything that decides what is curated
    (schedule, pacing, refresh) counts passes and reads data: the same seed curates the same rows on
    any machine and under any load.

    **Logged scalars** (every logger, at ``trainer.global_step``; ``<split>`` is ``heldout``,
    ``incoming``, ``validate`` or ``test``, ``<c>`` each of ``Outputs.components``):

    - ``<name>/<split>/<c>/mean``, ``std``, ``p1``, ``p5``, ``p50``, ``p95`` — summary of the finite
      scores (nats).
    - ``<name>/<split>/num_samples``, ``nonfinite``, ``floored_fraction`` — rows scored (all ranks),
      rows with a NaN/Inf score, fraction of singular values raised to the floor.
    - ``<name>/<split>/systematic_floored`` — the n_floored shared by most rows (0 if none): dead
      output dimensions; the score is then over the remaining rank (warned once).
    - ``<name>/incoming/<c>/shift_ks``, ``shift_w1`` — **data shift**: incoming rows against held-out rows
      scored with the same weights at the same batch (only at batches where both are scored: every
      held-out evaluation that an incoming evaluation coincides with — all of them by default).
    - ``<name>/incoming/data_shift_alert`` — 1 when ``shift_ks`` of ``Alerts.component`` exceeds
      ``Alerts.threshold`` (warns when it turns on, if ``"data_shift"`` is in ``Alerts.warn_on``).
    - ``<name>/heldout/<c>/drift_ks``, ``drift_w1`` — **model change** against the anchor: the first
      held-out evaluation, re-anchored once when trust is first reached. ``change_ks``, ``change_w1`` — against the
      previous held-out evaluation. ``<name>/heldout/model_change_alert`` — ``change_ks`` above
      the threshold (warns only if ``"model_change"`` is in ``Alerts.warn_on``).
    - ``<name>/trust/score`` — can the scores be read as a density under ``reading`` (NaN: unknown,
      e.g. fewer embedded rows than 4·K); ``<name>/trust/<diagnostic>`` — the Gaussianity report of
      :mod:`jepa_monitor.diagnostics` on up to ``Cadence.trust_rows`` embedded held-out rows
      (``n_samples``, ``dim``, ``epps_pulley``, ``mean_offset``, ``eig_max``, ``eig_min``,
      ``condition_number``, ``effective_rank``, ``norm_mean``, ``norm_cv_ratio``,
      ``shape_epps_pulley``, ``shape_norm_cv_ratio``);
      ``<name>/trust/agreement/<a>_vs_<b>`` — Spearman between jepa_score, log_density,
      mahalanobis and knn on the Jacobian-scored rows.
    - ``<name>/time/score_seconds``, ``total_score_seconds`` — the last measurement and all monitor
      time since fit start (scoring, trust, logging, export, curation); ``share`` — the measurement
      part of it (curation excluded) over the wall time after the fit-start evaluation;
      ``curation_share`` — curation's seconds (deciding, refreshing the policy's reference, logging the
      decision) over the same wall time; ``fit_start_seconds`` — that
      first evaluation. These seconds are reported, never used to decide.
      ``measurement_pass_share``, ``curation_pass_share`` — the configured shares of training's
      backward passes (``Cadence.pass_share``, the policy's ``pass_share``); ``heldout_gap`` —
      batches between held-out evaluations chosen within that share; ``heldout_rows``,
      ``incoming_rows`` — rows the share lets the next evaluations score (the configured maxima
      unless that would space evaluations more than 1000 batches apart);
      ``<name>/monitor/failures_total``.
    - With a ``policy``, every ``trainer.log_every_n_steps`` batches: ``<name>/policy/fraction_dropped``,
      ``mean_weight``, ``batch_weight``, ``active`` (current batch) and ``<name>/policy/<counter>_total`` for
      every counter of the policy (rows seen, dropped, not applied, scored by Jacobian, sketched,
      decided by the gate, estimated, capped, non-finite, …; see
      :class:`jepa_monitor.policies.ThresholdPolicy`); with ``reading="fitted"``,
      ``<name>/policy/refresh_gap`` (batches until the policy's reference is read again) and
      ``<name>/policy/stale_drop`` (share of fresh held-out rows the previous reading put below its
      5 % quantile at the latest refresh; about 0.05 when the encoder did not move).

    **SummaryWriter only** (global rank 0, any logger whose ``experiment`` has one, e.g. either
    namespace's ``TensorBoardLogger``; other loggers are warned about once): histograms
    ``<name>/hist/<split>/<c>`` and ``<name>/hist/policy/weight``; images ``<name>/images/<split>_lowest``
    / ``_highest`` (``Outputs.num_images`` held-out samples, (B, C, H, W) inputs with 1 or 3 channels); a
    custom-scalars layout (category ``jepa-monitor <name>``).

    **Export** (``Outputs.export`` not False): one row per scored sample in ``<dir>/jepa_monitor/<name>.csv``
    (or ``.parquet``); ``<dir>`` is the log dir of the first logger with a SummaryWriter, else
    ``trainer.default_root_dir``. Rank 0 writes; columns in :mod:`jepa_monitor.export`.

    Args:
        encoder: dotted attribute path on the LightningModule (``"encoder"``, ``"backbone.trunk"``;
            ``""`` for the module itself) or a callable ``module -> encoder``.
        heldout: a DataLoader (batches laid out as training batches), a tensor, or the path of a
            ``torch.save``-d tensor or dict batch. Read once, into CPU memory.
        input_key, id_key: where the input / the sample ids sit in a batch: a key or index, a path
            (``"views.0.image"``, ``("views", 0, "image")``, ``(0, 0)``) or a callable ``batch -> tensor``.
        encoder_kwargs_keys: side inputs of the encoder, e.g. ``{"attention_mask": "attention_mask"}``
            (keyword -> where it sits in a batch; a list of keys means the same names): sliced with
            the scored rows and passed as ``encoder(x, **side)``; ``attention_mask`` also masks mean pooling.
        cadence: when and how much to score: a :class:`Cadence` (held-out evaluations every
            ``every_n_batches`` or within ``pass_share`` of training's backward passes, rows per
            evaluation, incoming rows, the seed that picks them).
        scorer: how the encoder is read and differentiated: a :class:`~jepa_monitor.Scorer` template
            without an encoder (``Scorer(output="proj", vectorize=0, input_module="embed_tokens")``;
            ``input_module`` may be a dotted path on the LightningModule); the monitor binds
            ``encoder`` at every measurement, and sets ``prior`` under the fitted reading.
        reading: ``"fitted"`` (default) or ``"isotropic"``: the Gaussian ``log_prior`` reads the
            embedding through (see "The reading" above).
        policy: a curation policy (:mod:`jepa_monitor.policies`, or any :class:`~jepa_monitor.policies.Policy`);
            its ``pass_share`` paces the Jacobian rows it scores (counted backward passes, a
            share of a training batch's rows; the refresh of its reference is paid from it too),
            and per-sample weights go under its ``weight_key``.
        alerts: which alerts warn, on which component, at which KS level: an :class:`Alerts`.
        outputs: components logged, images per grid, per-sample export: an :class:`Outputs`.
        name: prefix of every key, export file and ``state_key``: two monitors need two names.
        max_failures: consecutive failures after which measurements (or curation) stop.
        rank_synchronous: pad every rank's scored rows to the same count so every rank runs the same
            forward and backward passes (needed when parameters are sharded, FSDP); ``"auto"``: on
            for sharded strategies only.
    """

    def __init__(
        self,
        encoder: Union[str, Callable[[Any], Callable]],
        heldout: Union[str, os.PathLike, torch.Tensor, Iterable],
        *,
        input_key: Key = 0,
        id_key: Key = None,
        encoder_kwargs_keys: Union[Mapping[str, Key], Sequence[str], None] = None,
        cadence: Cadence = Cadence(),
        scorer: Scorer = Scorer(),
        reading: str = "fitted",
        policy: Optional[Policy] = None,
        alerts: Alerts = Alerts(),
        outputs: Outputs = Outputs(),
        name: str = "jepa",
        max_failures: int = 3,
        rank_synchronous: Union[bool, str] = "auto",
    ) -> None:
        super().__init__()
        check_arguments(heldout=heldout, encoder=encoder, policy=policy, scorer=scorer, cadence=cadence,
                        alerts=alerts, outputs=outputs, max_failures=max_failures)
        if reading not in READINGS:
            raise ValueError(f"reading={reading!r} is not one of {READINGS}.")
        if rank_synchronous not in (True, False, "auto"):
            raise ValueError(f"rank_synchronous={rank_synchronous!r}: use True, False or 'auto'.")
        self.keys = mon.MetricKeys(name)
        self.encoder, self.heldout, self.name = encoder, heldout, name
        self.input_key, self.id_key = input_key, id_key
        self.side_keys = dict(encoder_kwargs_keys) if isinstance(encoder_kwargs_keys, Mapping) else {k: k for k in (encoder_kwargs_keys or ())}
        self.cadence, self.scorer_template, self.policy = cadence, scorer, policy
        self.alerts, self.outputs = alerts, outputs
        self.schedule = Schedule(cadence)
        self.reading = reading
        self._prior: Optional[Whitening] = None  # the fitted Gaussian of the latest held-out evaluation
        self._embed_dim: Optional[int] = None  # K, known after the first held-out evaluation
        self._curation_passes = 0  # backward passes curation (refresh included) spent on the current batch
        self._refresh = ReadingRefresh()  # the policy's reference, read again between evaluations
        self._sketch: Optional[int] = None  # output directions of the policy's sketched Jacobian rows
        self._last_counted = -1
        self.rank_synchronous = rank_synchronous
        self._sync_world: Optional[int] = None  # set at fit start: pad every rank's rows alike
        self.report = Reporter(self.keys, self._tag, alerts=alerts, outputs=outputs)
        self.curation = None if policy is None else Curation(
            policy, self.keys, self._tag, input_key=input_key, id_key=id_key, side_keys=self.side_keys,
            max_failures=max_failures)
        self.failures = FailureCounter.for_scoring(self._tag, max_failures)
        # persisted (state_dict)
        self.tracker = mon.ScoreTracker(self.keys, components=outputs.components, alert_component=alerts.component,
                                        threshold=alerts.threshold)
        self.clock = MonitorClock()
        self._batches = 0
        self._history: List[Dict[str, Any]] = []
        self._trust: Optional[float] = None
        self._scored_rows = {"heldout": 0, "incoming": 0}  # rows of the latest evaluation of each
        self._generator = torch.Generator().manual_seed(cadence.seed)
        # per process
        self._data: Optional[HeldoutSet] = None
        self._checked_batch = False

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        return f"{type(self).__qualname__}[name={self.name}]"

    @property
    def _tag(self) -> str:
        return f"JEPAScoreMonitor(name={self.name!r})"

    @property
    def reference(self) -> Optional[Dict[str, torch.Tensor]]:
        """The anchor of the model-change distances: held-out scores per component (None before fit)."""
        return self.tracker.anchor

    @property
    def history(self) -> List[Dict[str, Any]]:
        """One entry per evaluation: batch, step, split, mean and KS/W1 of ``Alerts.component`` (``shift_ks``/``shift_w1`` for incoming rows, ``drift_ks``/``drift_w1`` for held-out rows)."""
        return self._history

    @property
    def trust(self) -> Optional[float]:
        """The latest trust indicator (NaN: unknown; None before the first held-out evaluation)."""
        return self._trust

    @property
    def disabled(self) -> bool:
        return self.failures.disabled

    @property
    def export_file(self) -> Optional[str]:
        """Path of the per-sample export once something was written (rank 0)."""
        return None if self.report.exporter is None else str(self.report.exporter.path)

    def state_dict(self) -> Dict[str, Any]:
        """Everything a resumed run needs (``version`` :data:`STATE_VERSION`)."""
        state = dict(version=STATE_VERSION, batches=self._batches, trust=self._trust, history=list(self._history),
                     generator=self._generator.get_state(), failures=self.failures.state_dict(),
                     tracker=self.tracker.state_dict(), clock=self.clock.state_dict(),
                     schedule=self.schedule.state_dict(),
                     prior=None if self._prior is None else self._prior.state_dict())
        if self.curation is not None:
            state.update(self.curation.state_dict())
            state["refresh"] = self._refresh.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a state of this release or of release 2 (before the fitted reading: it has no
        ``prior``, ``refresh`` nor ``pacer``, and its time-paced curation restarts its pacing)."""
        version = int(state_dict.get("version", 1))
        if not 2 <= version <= STATE_VERSION:
            raise ValueError(f"{self._tag}: a checkpoint state of version {version} cannot be read by this release "
                             f"(it reads versions 2 to {STATE_VERSION}).")
        self._batches, self._trust = int(state_dict["batches"]), state_dict["trust"]
        self._history = [_history_entry_v4(h) for h in state_dict["history"]] if version < 4 \
            else list(state_dict["history"])
        self.clock.load_state_dict(state_dict["clock"])
        self.tracker.load_state_dict(state_dict["tracker"])
        self.schedule.load_state_dict(state_dict["schedule"])
        self._generator.set_state(state_dict["generator"])
        self.failures.load_state_dict(state_dict["failures"])
        prior = state_dict.get("prior")  # absent from checkpoints of releases that read N(0, I) only
        self._prior = None if prior is None else Whitening.from_state_dict(prior)
        if self.curation is not None:
            self.curation.load_state_dict(state_dict)
            self._refresh.load_state_dict(state_dict.get("refresh"))

    # ------------------------------------------------------------------ configuration
    def scorer(self, pl_module: Any) -> Scorer:
        """The :class:`~jepa_monitor.Scorer` of the module's current encoder with the options of the ``scorer`` template,
        reading the embedding through the latest fitted Gaussian (``reading="fitted"``, once a held-out
        evaluation has fitted one); rank-synchronous under sharded training (``callbacks/_synchronous.py``)."""
        scorer = build_scorer(pl_module, self.encoder, self.scorer_template)
        if self.reading == "fitted":
            scorer = scorer.replace(prior=self._prior)
        if self._sync_world is None or self._data is None:
            return scorer
        return SynchronousScorer(scorer, self._sync_world, self._data.rows(torch.arange(1), pl_module.device))

    def _prepare(self, pl_module: Any) -> None:
        """Everything that can be wrong with the configuration fails here, naming the culprit."""
        try:
            scorer = self.scorer(pl_module)
            if self._data is None:
                self._data = read_heldout(
                    self.heldout, scorer, pl_module.device, input_key=self.input_key, id_key=self.id_key,
                    side_keys=self.side_keys, template=self.scorer_template,
                    jacobian_rows=self.cadence.heldout_rows, trust_rows=self.cadence.trust_rows)
        except MisconfigurationException:
            raise
        except Exception as err:
            raise MisconfigurationException(f"{self._tag}: {_message(err)}") from err

    def _check_train_batch(self, batch: Any) -> None:
        """The first training batch, before its step: a wrong key is a configuration error."""
        try:
            check_batch(batch, input_key=self.input_key, id_key=self.id_key, side_keys=self.side_keys,
                        template=self.scorer_template)
        except Exception as err:
            raise MisconfigurationException(f"{self._tag}: in the training batch: {_message(err)}") from err
        self._checked_batch = True

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.clock.start()
        self._checked_batch = False
        self._sync_world = synchronous_world(self.rank_synchronous, trainer.strategy, trainer.world_size)
        self._prepare(pl_module)
        self.report.start(trainer, with_policy=self.policy is not None)
        if not self.disabled and self.tracker.anchor is None:
            self._heldout_evaluation(trainer, pl_module, "heldout", strict=True, burst=True)
        elif self.tracker.anchor is not None:  # resumed: only check that the configuration still scores
            try:
                x, side = self._data.rows(torch.arange(min(2, self._data.num_rows)), pl_module.device)
                self._embed_dim = self.scorer(pl_module).score(x, **side).embed_dim
                if self.policy is not None:
                    self._sketch = self.policy.sketch_rows(self._embed_dim)
            except Exception as err:
                raise MisconfigurationException(f"{self._tag}: {_message(err)}") from err

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._checked_batch:
            self._check_train_batch(batch)
        if self.disabled:
            return
        b = self._batches
        if b > self._last_counted:  # once per batch, also when the start hook runs again after a resume
            self._last_counted = b
            self.schedule.note_batch(get_input(batch, self.input_key).shape[0], self._curation_passes)
            self._curation_passes = 0
        if self.schedule.needs_plan():  # every rank alike: the batch count is the same everywhere
            self._plan(trainer)
        if self.curation is not None and self.tracker.latest_batch != b and self.policy.needs_refresh(b):
            self._heldout_evaluation(trainer, pl_module, "heldout", strict=False)
        if self.schedule.incoming_due(b, self.tracker.latest_batch) and not self.disabled:
            # Scored with the fit-start evaluation (same weights): part of its burst.
            self._incoming_evaluation(trainer, pl_module, batch, burst=b == 0)
        if self.curation is not None and not self.curation.failures.disabled and not self.disabled:
            start = time.perf_counter()  # curation's seconds: the refresh, the decision, its logging
            if self.reading == "fitted" and self._refresh.due(b):
                self._refresh_reading(pl_module)
            self._curate(trainer, pl_module, batch)
            self.clock.add(time.perf_counter() - start, curation=True)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Scored after the step, with the weights the next batch's incoming rows will see: no optimizer
        # step happens in between, so the two are compared under the same weights (data shift).
        self._batches += 1
        if not self.disabled and self.schedule.heldout_due(self._batches):
            self._heldout_evaluation(trainer, pl_module, "heldout", strict=False)
            if self.schedule.budgeted:
                self._plan(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._flush_curated(trainer)
        self.report.close()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if str(trainer.state.fn) in ("validate", "TrainerFn.VALIDATING") and not trainer.sanity_checking:
            self._evaluate_stage(trainer, pl_module, "validate")

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if str(trainer.state.fn) in ("test", "TrainerFn.TESTING"):
            self._evaluate_stage(trainer, pl_module, "test")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.report.close()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.report.close()

    def _evaluate_stage(self, trainer: Any, pl_module: Any, split: str) -> None:
        self._prepare(pl_module)
        if not self.disabled:
            self._heldout_evaluation(trainer, pl_module, split, strict=False)
        self.report.close()

    def _curate(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        b = self._batches
        scorer = curation_scorer(self.scorer(pl_module))
        if self.reading == "fitted" and self._refresh.jepa is not None and self._level_mode() == "lazy":
            scorer = self._on_level(scorer, pl_module)
        result = self.curation.curate(scorer, batch, batch_index=b, step=trainer.global_step,
                                      trust=self._trust, passes_per_row=self._row_passes)
        if "decision" in result:
            self._curation_passes += int(result["decision"].n_scored) * self._row_passes
        if "decision" in result and trainer.log_every_n_steps and b % trainer.log_every_n_steps == 0:
            with self.report.guard("curated batch", b):
                refresh = {"refresh_gap": self._refresh.gap, "stale_drop": self._refresh.stale_drop} \
                    if self.reading == "fitted" and self._refresh.jepa is not None else None
                self.report.curated_batch(trainer, self.curation.metrics(result, refresh), result["weight"])

    # ------------------------------------------------------------------ measurements
    def _measure(self, trainer: Any, compute: Callable[[], torch.Tensor], what: str, strict: bool) -> Optional[mon.Measurement]:
        """This rank's packed rows, gathered from every rank; None (and a warning) when any rank
        failed. Every rank reaches the same collectives whether or not it failed."""
        gathered, err, seconds = compute_and_gather(compute, trainer.strategy, trainer.world_size)
        if gathered is None:
            if strict:
                reason = _message(err) if err is not None else "it failed on another rank"
                raise MisconfigurationException(f"{self._tag}: scoring the {what} failed: {reason}") from err
            self.failures.failed(f"the {what} at training batch {self._batches}", err)
            return None
        self.failures.succeeded()
        return mon.Measurement.unpack(gathered, seconds)

    def _heldout_evaluation(self, trainer: Any, pl_module: Any, split: str, strict: bool, burst: bool = False) -> None:
        self.clock.timed(split, self._score_heldout, trainer, pl_module, split, strict, burst=burst)

    def _incoming_evaluation(self, trainer: Any, pl_module: Any, batch: Any, burst: bool = False) -> None:
        self.clock.timed("incoming", self._score_incoming, trainer, pl_module, batch, burst=burst)

    def _score_heldout(self, trainer: Any, pl_module: Any, split: str, strict: bool) -> None:
        data = self._data
        planned = self.schedule.rows[0] if self.schedule.rows and split == "heldout" else self.cadence.heldout_rows
        n = min(planned, data.num_rows)  # validate()/test() score every configured row
        if split == "heldout":
            self._scored_rows["heldout"] = n
        index = torch.arange(trainer.global_rank, n, trainer.world_size)

        def compute() -> torch.Tensor:
            x, side = data.rows(index, pl_module.device)
            return mon.Measurement.pack(self.scorer(pl_module).score(x, **side), index)

        with torch.inference_mode(False), torch.no_grad():
            m = self._measure(trainer, compute, f"{split} set", strict)
        if m is None:
            self._flush_curated(trainer)
            return
        m = m.sorted_by_index()
        self._embed_dim = int(m.embedding.shape[1])
        with self.report.guard(f"{split} set", self._batches):
            z = self._data.embed_rest(m.embedding, lambda: self.scorer(pl_module), pl_module.device) \
                if split == "heldout" else m.embedding
            if self.reading == "fitted":
                m = self._read_through_fit(m, z, keep=split == "heldout")
            trust = self._trust_evaluation(z, m) if split == "heldout" else None
            metrics, turned_on = self.tracker.heldout(split, m, self._batches, None if trust is None else trust.trust)
            metrics.update(self.report.rank_deficiency(split, m))
            self.report.alerts(turned_on, self._batches)
            if trust is not None:
                metrics.update(trust.metrics)
                if self.curation is not None:
                    reference = dict(m.scores, embedding=z)
                    self._sketch = self.policy.sketch_rows(self._embed_dim)
                    if self._sketch is not None:  # the sketch's level is calibrated on the reference rows
                        x, side = self._data.rows(m.index, pl_module.device)
                        with torch.inference_mode(False), torch.no_grad():
                            reference["sketch_score"] = self.scorer(pl_module).sketched(self._sketch).score(
                                x, **side).jepa_score.cpu()
                    self._refresh.reset(reference, self._batches, self._prior)
                    self._calibrate(reference, trust.trust)
            self._publish(trainer, split, m, metrics, images=data.x[m.index],
                          sample_ids=[data.ids[i] for i in m.index.tolist()])
        if split == "heldout":
            self._flush_curated(trainer)

    def _read_through_fit(self, m: mon.Measurement, z: torch.Tensor, keep: bool) -> mon.Measurement:
        """Fit the Gaussian of the held-out embeddings ``z`` (every embedded row; the scored rows
        first), kept for what is scored next when ``keep`` (training's held-out evaluations; not
        validate()/test()), and read the scored rows' prior cross-fitted (each through a
        Gaussian fitted without it, :func:`jepa_monitor.reading.cross_fitted_log_prior`). When no
        Gaussian can be fitted (a collapsed encoder) the previous one stays and the rows keep the
        prior they were scored with."""
        try:
            fitted = fit_reading(z)
            prior = cross_fitted_log_prior(z, m.num_rows)
        except ValueError as err:
            self.report.warn_once("fit", f"{self._tag}: no Gaussian could be fitted to the held-out embeddings at "
                                         f"training batch {self._batches} ({err}); the previous reading is kept.")
            return m
        if keep:
            self._prior = fitted
        density = m.scores["jepa_score"].double() + prior
        scores = dict(m.scores, log_prior=prior.float(), log_density=density.float())
        return mon.Measurement(scores, m.n_floored, m.rank_dim, m.index, m.embedding, m.seconds)

    def _trust_evaluation(self, z: torch.Tensor, m: mon.Measurement) -> mon.TrustResult:
        """Trust of the reading in use, from the embeddings ``z`` of every kept held-out row (a forward
        pass each, on every rank alike: the trust that gates curation must be the same everywhere).
        Never reused stale."""
        self._trust = None
        result = mon.trust_metrics(self.keys, z, m.scores, reading=self.reading)
        self._trust = result.trust
        self.report.trust(result, self._batches)
        return result

    def _refresh_reading(self, pl_module: Any) -> None:
        """Read the policy's reference again through a Gaussian fitted to fresh held-out embeddings
        (``callbacks/_refresh.py``); the same on every rank."""
        refresh = self._refresh
        try:
            with torch.inference_mode(False), torch.no_grad():
                x, side = self._data.rows(torch.arange(self._data.num_rows), pl_module.device)
                z = self.scorer(pl_module).embed(x, **side).float().cpu()
            reference, self._prior = refresh.update(self._batches, z, self._prior)
        except Exception as err:  # a measurement: warn, keep the previous reading
            refresh.last = self._batches
            self.report.warn_once("refresh", f"{self._tag}: refreshing the fitted reading failed at training batch "
                                             f"{self._batches} ({type(err).__name__}: {err}); the previous one is kept.")
            return
        self._charge_curation(self._data.num_rows)  # a forward pass per row, counted as one pass
        if self._level_mode() == "eager":
            try:
                with torch.inference_mode(False), torch.no_grad():
                    level = self._on_level(curation_scorer(self.scorer(pl_module)), pl_module)
                    level.measure()
                    if "sketch_score" in refresh.columns:
                        level.sketched(self._sketch).measure()
            except Exception as err:  # the level measured last stays
                self.report.warn_once("level", f"{self._tag}: measuring the reference's Jacobian level failed at training "
                                               f"batch {self._batches} ({type(err).__name__}: {err}); the last one is kept.")
            reference = refresh.on_level(reference)
        self._calibrate(reference, self._trust, batch=self.tracker.latest_batch)

    def _level_mode(self) -> Optional[str]:
        """How the policy's reference keeps its Jacobian level between evaluations
        (``callbacks/_refresh.py``): None when the policy reads no Jacobian; "lazy" for the library's
        policies calibrated on a quantile of the reference (measured when a row is scored with the
        Jacobian, subtracted from it); "eager" for an absolute threshold or a policy of your own
        (measured at every refresh, the reference moved onto it)."""
        key = self.policy.score_key
        if key == "log_prior" or key in EMBEDDING_SCORES:
            return None
        if isinstance(self.policy, ThresholdPolicy) and self.policy.absolute_threshold is None:
            return "lazy"
        return "eager"

    def _on_level(self, scorer: Any, pl_module: Any) -> OnReferenceLevel:
        """``scorer`` reading Jacobian scores on the level of the policy's reference (K passes a row)."""
        return OnReferenceLevel(scorer, self._refresh, lambda rows: self._data.rows(rows, pl_module.device),
                                self._charge_curation, self._embed_dim or 1)

    def _charge_curation(self, passes: int) -> None:
        """Curation work outside a decision's own Jacobian rows (a refresh, a level measurement)."""
        self._curation_passes += passes
        self.curation.charge(passes)

    @property
    def _row_passes(self) -> int:
        """Backward passes one curation Jacobian row costs: the sketch's directions, else K."""
        return self._sketch or self._embed_dim or 1

    def _calibrate(self, scores: Dict[str, torch.Tensor], trust: Optional[float], batch: Optional[int] = None) -> None:
        try:
            self.policy.calibrate(scores, batch=self._batches if batch is None else batch, trust=trust)
        except Exception as err:  # e.g. no finite held-out score after a divergence: keep the old threshold
            self.report.warn_once("calibrate", f"{self._tag}: policy calibration skipped ({type(err).__name__}: {err}).")

    def _score_incoming(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        picked: Dict[str, Any] = {}

        def compute() -> torch.Tensor:
            x = get_input(batch, self.input_key)
            limit = self.schedule.rows[1] if self.schedule.rows else self.cadence.incoming_rows
            rows = pick_rows(x.shape[0], limit, self._generator)
            self._scored_rows["incoming"] = int(rows.numel())
            ids = get_ids(batch, self.id_key, x.shape[0])
            picked["ids"] = [ids[i] for i in rows.tolist()] if ids is not None else None
            s = self.scorer(pl_module).score(x[rows.to(x.device)], **side_inputs(batch, self.side_keys, rows))
            return mon.Measurement.pack(s, rows)

        with torch.inference_mode(False), torch.no_grad():
            m = self._measure(trainer, compute, "incoming batch", strict=False)
            id_lists = gather_objects(picked.get("ids"), trainer.world_size) if self.id_key is not None else [None]
        if m is None:
            return
        with self.report.guard("incoming batch", self._batches):
            metrics, turned_on = self.tracker.incoming(m, self._batches)
            metrics.update(self.report.rank_deficiency("incoming", m))
            self.report.alerts(turned_on, self._batches)
            ids = [i for lst in id_lists for i in lst] if all(i is not None for i in id_lists) else None
            self._publish(trainer, "incoming", m, metrics, images=None, sample_ids=ids)

    def _publish(self, trainer: Any, split: str, m: mon.Measurement, metrics: Dict[str, float],
                 images: Optional[torch.Tensor], sample_ids: Optional[List[str]]) -> None:
        metrics.update(self._time_metrics(m.seconds))
        self._history.append(mon.history_entry(self.keys, self._batches, trainer.global_step, split,
                                               self.alerts.component, metrics))
        self.report.measurement(trainer, split, m, metrics, images=images, sample_ids=sample_ids)

    # ------------------------------------------------------------------ time
    def _plan(self, trainer: Any) -> None:
        """Rows and spacing of the next evaluations within the budget (``callbacks/_schedule.py``)."""
        incoming_on = self.cadence.incoming_every_n_batches is not None
        k = self._embed_dim or 1
        heldout_rows = self._scored_rows["heldout"]
        embedded = self._data.num_rows - heldout_rows if self._data is not None else 0  # trust rows: one pass each
        measured = [(heldout_rows * k + embedded, heldout_rows),
                    (self._scored_rows["incoming"] * k if incoming_on else 0, self._scored_rows["incoming"])]
        maxima = (min(self.cadence.heldout_rows, self._data.num_rows) if self._data is not None else self.cadence.heldout_rows,
                  self.cadence.incoming_rows)
        early = self.policy is not None
        rows = self.schedule.replan(measured, maxima, self.tracker.latest_batch,
                                    lambda proposal: gather_objects(proposal, trainer.world_size), early)
        if rows is not None:
            with self.report.guard("schedule", self._batches):
                self.report.plan(trainer, gap=self.schedule.gap, share=self.cadence.pass_share, rows=rows)

    def _time_metrics(self, seconds: float) -> Dict[str, float]:
        return self.clock.metrics(self.keys, seconds, failures_total=self.failures.total,
                                  measurement_share=self.cadence.pass_share,
                                  curation_share=None if self.policy is None else self.policy.pass_share,
                                  curating=self.curation is not None,
                                  gap=self.schedule.gap)

    def _flush_curated(self, trainer: Any) -> None:
        """Curated rows are buffered per rank and gathered at held-out evaluations, so curation itself
        needs no collective call per training step."""
        if self.curation is None:
            return
        per_rank = gather_objects(self.curation.take_pending(), trainer.world_size)
        with self.report.guard("curated rows", self._batches):
            self.report.curated_rows(trainer, per_rank)
