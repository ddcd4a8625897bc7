"""Per-sample score export: one row per scored sample, CSV (default) or Parquet.

Columns, in this order (``COLUMNS``):

- ``step``: the trainer's global step when the sample was scored (int).
- ``split``: ``"heldout"``, ``"incoming"``, ``"validate"`` or ``"test"``.
- ``sample_id``: the id taken from the batch (``id_key``), the position in the held-out set, or
  empty when unknown.
- ``jepa_score``, ``log_prior``, ``log_density``: the score components (float; empty/NaN when not
  computed, e.g. rows a curation policy decided on from a cheaper score).
- ``n_floored``: singular values raised to the floor for that sample (int; -1 when not computed).
- ``kept``: 1/0 for incoming rows a curation policy decided on; empty/NaN otherwise.
- ``weight``: the policy's weight in [0, 1] for those rows; empty/NaN otherwise.

CSV is the default because it is appended to after every evaluation and survives a crashed run
intact. Parquet (``pyarrow``) streams one row group per write and is complete once ``close()`` ran.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

COLUMNS = ("step", "split", "sample_id", "jepa_score", "log_prior", "log_density", "n_floored", "kept", "weight")
SCORE_COLUMNS = ("jepa_score", "log_prior", "log_density")
FORMATS = ("csv", "parquet")

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def export_path(log_dir: Union[str, os.PathLike], name: str, fmt: str = "csv") -> Path:
    """``<log_dir>/jepa_monitor/<name>.<fmt>``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {FORMATS}.")
    return Path(log_dir) / "jepa_monitor" / f"{name}.{fmt}"


def _column(values: Optional[ArrayLike], n: int, dtype, fill) -> np.ndarray:
    if values is None:
        return np.full(n, fill, dtype=dtype)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().to(torch.float64 if dtype == np.float64 else torch.int64).numpy()
    arr = np.asarray(values, dtype=dtype).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"an export column has {arr.shape[0]} values for {n} rows.")
    return arr


def _rows(
    step: int,
    split: str,
    n: int,
    sample_ids: Optional[Sequence] = None,
    scores: Optional[Dict[str, ArrayLike]] = None,
    n_floored: Optional[ArrayLike] = None,
    kept: Optional[ArrayLike] = None,
    weight: Optional[ArrayLike] = None,
) -> Dict[str, np.ndarray]:
    scores = scores or {}
    unknown = set(scores) - set(SCORE_COLUMNS)
    if unknown:
        raise ValueError(f"unknown score columns {sorted(unknown)}; expected some of {SCORE_COLUMNS}.")
    ids = [""] * n if sample_ids is None else ["" if i is None else str(i) for i in sample_ids]
    if len(ids) != n:
        raise ValueError(f"{len(ids)} sample ids for {n} rows.")
    cols = {
        "step": np.full(n, int(step), dtype=np.int64),
        "split": np.array([split] * n, dtype=object),
        "sample_id": np.array(ids, dtype=object),
    }
    for key in SCORE_COLUMNS:
        cols[key] = _column(scores.get(key), n, np.float64, np.nan)
    cols["n_floored"] = _column(n_floored, n, np.int64, -1)
    cols["kept"] = _column(kept, n, np.float64, np.nan)
    cols["weight"] = _column(weight, n, np.float64, np.nan)
    return cols


def _fmt_float(v: float) -> str:
    # 17 significant digits round-trip float64 (and therefore every float32 score) exactly.
    return "" if math.isnan(v) else repr(float(v))


class ScoreExporter:
    """Appends per-sample rows to ``path`` (created with its parent directories on first write).

    An existing file is appended to (a resumed run continues the same export).
    """

    def __init__(self, path: Union[str, os.PathLike], fmt: Optional[str] = None):
        self.path = Path(path)
        self.fmt = fmt or self.path.suffix.lstrip(".") or "csv"
        if self.fmt not in FORMATS:
            raise ValueError(f"export format {self.fmt!r} is not one of {FORMATS}.")
        if self.fmt == "parquet":
            import pyarrow  # noqa: F401  (fail at construction, not at the first write)
        self._writer = None

    def write(self, step: int, split: str, n: int, **columns) -> None:
        """Write ``n`` rows; ``columns`` as in :data:`COLUMNS` (``sample_ids``, ``scores`` (dict of
        components), ``n_floored``, ``kept``, ``weight``), each optional."""
        if n == 0:
            return
        cols = _rows(step, split, n, **columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.fmt == "csv":
            self._write_csv(cols, n)
        else:
            self._write_parquet(cols)

    def _write_csv(self, cols: Dict[str, np.ndarray], n: int) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as fh:
            out = csv.writer(fh)
            if new:
                out.writerow(COLUMNS)
            for i in range(n):
                out.writerow(
                    [
                        int(cols["step"][i]),
                        cols["split"][i],
                        cols["sample_id"][i],
                        *(_fmt_float(cols[k][i]) for k in SCORE_COLUMNS),
                        "" if cols["n_floored"][i] < 0 else int(cols["n_floored"][i]),
                        "" if math.isnan(cols["kept"][i]) else int(cols["kept"][i]),
                        _fmt_float(cols["weight"][i]),
                    ]
                )

    def _write_parquet(self, cols: Dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "step": pa.array(cols["step"], pa.int64()),
                "split": pa.array(cols["split"].tolist(), pa.string()),
                "sample_id": pa.array(cols["sample_id"].tolist(), pa.string()),
                **{k: pa.array(cols[k], pa.float64(), from_pandas=True) for k in SCORE_COLUMNS},
                "n_floored": pa.array(
                    cols["n_floored"], pa.int64(), mask=cols["n_floored"] < 0
                ),
                "kept": pa.array(cols["kept"], pa.float64(), from_pandas=True).cast(pa.int8()),
                "weight": pa.array(cols["weight"], pa.float64(), from_pandas=True),
            }
        )
        if self._writer is None:
            previous = pq.read_table(self.path) if self.path.exists() else None
            self._writer = pq.ParquetWriter(self.path, table.schema)
            if previous is not None:
                self._writer.write_table(previous.cast(table.schema))
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scores(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Read an export back: one numpy array per column of :data:`COLUMNS`.

    ``step`` and ``n_floored`` are int64 (-1 where not computed); ``split`` and ``sample_id`` are
    object arrays of str; the score columns, ``kept`` and ``weight`` are float64 with NaN where empty.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        out = {}
        for key in COLUMNS:
            col = table.column(key)
            if key in ("split", "sample_id"):
                out[key] = np.array(col.to_pylist(), dtype=object)
            elif key == "n_floored":
                out[key] = col.fill_null(-1).to_numpy().astype(np.int64)
            elif key == "step":
                out[key] = col.to_numpy().astype(np.int64)
            else:
                out[key] = np.array(col.cast("double").to_pylist(), dtype=object).astype(np.float64)
        return out
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ValueError(f"{path} is not a jepa-monitor export (expected header {','.join(COLUMNS)}).")
        rows = list(reader)
    columns = list(zip(*rows)) if rows else [()] * len(COLUMNS)
    raw = dict(zip(COLUMNS, columns))

    def floats(values):
        return np.array([float(v) if v != "" else np.nan for v in values], dtype=np.float64)

    return {
        "step": np.array([int(v) for v in raw["step"]], dtype=np.int64),
        "split": np.array(raw["split"], dtype=object),
        "sample_id": np.array(raw["sample_id"], dtype=object),
        **{k: floats(raw[k]) for k in SCORE_COLUMNS},
        "n_floored": np.array([int(v) if v != "" else -1 for v in raw["n_floored"]], dtype=np.int64),
        "kept": floats(raw["kept"]),
        "weight": floats(raw["weight"]),
    }
