"""Curation inside the training loop: decide with the policy, edit the batch, count, buffer exports.

No collective call happens here (decisions are local to each rank), so curation faults are counted
per rank, and the rows it touched are buffered and written at the next held-out evaluation.

Curation scores a few rows at a time (the gate's undecided rows, paced): a scorer whose
``vectorize`` is unset (None) takes ``"replicated"`` rows here, a fixed mode with plain batched
kernels, not ``"auto"``, which picks a mode by timing it and so could make a decision depend on the
machine's load through float32 rounding (``python benchmarks/bench_scorer.py --rows`` compares the
modes). An explicit ``vectorize`` is kept.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional

import torch

from jepa_monitor.batches import Key, apply_decision, get_ids, get_input
from jepa_monitor.metrics import MetricKeys
from jepa_monitor.scorer import Scorer
from jepa_monitor.sample_scores import COMPONENTS

from ._failures import FailureCounter
from ._heldout import side_inputs
from ._pacing import CurationPacer


def curation_scorer(scorer: Any) -> Any:
    """``scorer`` as curation uses it: an unset ``vectorize`` becomes ``"replicated"`` (module docstring)."""
    if isinstance(scorer, Scorer) and scorer.vectorize is None:
        return scorer.replace(vectorize="replicated")
    return scorer


class Curation:
    """The policy of one monitor, applied to training batches."""

    def __init__(self, policy: Any, keys: MetricKeys, tag: str, *, input_key: Key, id_key: Key,
                 side_keys: Mapping[str, Key], max_failures: int) -> None:
        self.policy, self.keys = policy, keys
        budget = policy.pass_share
        self.pacer = CurationPacer(budget) if budget is not None else None
        self.input_key, self.id_key, self.side_keys = input_key, id_key, side_keys
        self.failures = FailureCounter.for_curation(tag, max_failures)
        self.pending: List[Dict[str, Any]] = []
        self.tag, self.warned_estimate = tag, False

    def curate(self, scorer: Any, batch: Any, *, batch_index: int, step: int,
               trust: Optional[float], passes_per_row: int) -> Dict[str, Any]:
        """Decide for ``batch`` and edit it in place; returns what to log (no ``decision`` when the
        policy failed on it).
        ``passes_per_row``: backward passes one Jacobian row costs (K), what the pacing counts."""
        try:
            x = get_input(batch, self.input_key)
            cap = None if self.pacer is None else self.pacer.max_rows(x.shape[0], passes_per_row)
            ids = get_ids(batch, self.id_key, x.shape[0])
            side = side_inputs(batch, self.side_keys)
            with torch.inference_mode(False), torch.no_grad():
                decision = self.policy.decide_batch(scorer, x, batch_index, trust, side=side, max_scored=cap)
        except Exception as err:
            self.failures.failed(f"{batch_index}", err)
            return {}
        self.failures.succeeded()
        n_estimated, n = int(decision.n_estimated), int(decision.keep.numel())
        if 4 * n_estimated > 3 * n and decision.n_gated == 0 and not self.warned_estimate:
            # The embedding alone decided no row and most rows were estimated (e.g. a LayerNorm'd
            # embedding whose prior term is the same for every row): the budget then decides nearly blind.
            self.warned_estimate = True
            warnings.warn(f"{self.tag}: curation decided {n_estimated} of {n} rows at training batch {batch_index} from "
                          "an estimate (their prior term plus the reference's median Jacobian term), not from their Jacobian: "
                          "the embedding's prior did not separate them and the policy's max_jacobian_rows (or its "
                          "pass_share pacing) capped the Jacobian rows. Such decisions are only as good as that "
                          "estimate (watch rows_estimated_total); raise pass_share (None: no pacing) and the "
                          "policy's max_jacobian_rows (None: every undecided row exact) if junk gets through.",
                          RuntimeWarning, stacklevel=2)
        # Editing the batch is not a measurement: an error here is a bug and must surface rather
        # than train on a half-edited batch.
        edit = apply_decision(batch, decision, input_key=self.input_key, weight_key=self.policy.weight_key,
                              mode=self.policy.mode)
        keep = decision.keep.detach().cpu().bool()
        weight = decision.weight.detach().cpu().float()
        touched = (~keep) | (weight < 1)  # rows the policy acted on, exported with what training saw
        if edit.not_applied:
            # Training sees these rows: the counters and the export must say so.
            self.policy.record_not_applied(edit.not_applied)
            keep = torch.ones_like(keep)
            if not edit.weights_written:  # nor did a weight reach the loss: the rows trained at weight 1
                weight = torch.ones_like(weight)
        if touched.any():
            sel = touched.nonzero().reshape(-1)
            score_key = self.policy.score_key
            self.pending.append({
                "step": step,
                "ids": [ids[i] for i in sel.tolist()] if ids is not None else None,
                "scores": {score_key: decision.scores.detach().cpu().double()[sel].tolist()} if score_key in COMPONENTS else {},
                "kept": keep[sel].int().tolist(),
                "weight": weight[sel].tolist(),
            })
        if self.pacer is not None and decision.active:
            self.pacer.spent(n, int(decision.n_scored), passes_per_row)
        return {"keep": keep, "weight": weight, "decision": decision}

    def charge(self, passes: int) -> None:
        """Curation work outside a decision's own rows (a refresh, a level measurement) spent ``passes``."""
        if self.pacer is not None:
            self.pacer.charge(passes)

    def metrics(self, result: Mapping[str, Any], refresh: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
        """This batch's decision, every counter of the policy (``<counter>_total``) and ``refresh``
        (``refresh_gap``, ``stale_drop`` of the reference's refresh, when there is one)."""
        k, d = self.keys, result["decision"]
        out = {
            k.policy("fraction_dropped"): float((~result["keep"]).float().mean()),
            k.policy("mean_weight"): float(result["weight"].mean()),
            k.policy("batch_weight"): float(d.batch_weight),
            k.policy("active"): float(bool(d.active)),
        }
        out.update({k.policy(f"{name}_total"): float(v) for name, v in self.policy.counts.items()})
        out.update({k.policy(name): float(v) for name, v in (refresh or {}).items()})
        return out

    def take_pending(self) -> List[Dict[str, Any]]:
        rows, self.pending = self.pending, []
        return rows

    def state_dict(self) -> Dict[str, Any]:
        """Its part of the monitor's state (keys at the top level of the monitor's ``state_dict``)."""
        return {"policy": self.policy.state_dict(), "curation_failures": self.failures.state_dict(),
                "pacer": None if self.pacer is None else self.pacer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "policy" in state:  # absent when the checkpoint was written without a policy
            self.policy.load_state_dict(state["policy"])
            self.failures.load_state_dict(state["curation_failures"])
            if self.pacer is not None:
                self.pacer.load_state_dict(state.get("pacer"))
