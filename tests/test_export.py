import math

import numpy as np
import pytest
import torch

from jepa_monitor.export import COLUMNS, ScoreExporter, export_path, read_scores


def _write_two_batches(path, fmt):
    exp = ScoreExporter(path, fmt)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 3, generator=g)
    exp.write(
        5, "heldout", 3, sample_ids=[0, 1, "a,b"],
        scores={"jepa_score": s[0], "log_prior": s[1], "log_density": s[2]},
        n_floored=torch.tensor([0, 2, 0]),
    )
    exp.write(7, "incoming", 2, sample_ids=None, scores={"log_density": torch.tensor([1.5, float("nan")])},
              kept=torch.tensor([True, False]), weight=torch.tensor([1.0, 0.0]))
    exp.close()
    return s


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_roundtrip_and_append(tmp_path, fmt):
    path = export_path(tmp_path, "jepa", fmt)
    assert path == tmp_path / "jepa_monitor" / f"jepa.{fmt}"
    s = _write_two_batches(path, fmt)
    # a resumed run appends to the same file
    exp = ScoreExporter(path, fmt)
    exp.write(9, "validate", 1, scores={"jepa_score": [2.0]}, n_floored=[1])
    exp.close()
    out = read_scores(path)
    assert tuple(out) == COLUMNS
    assert out["step"].tolist() == [5, 5, 5, 7, 7, 9]
    assert out["split"].tolist() == ["heldout"] * 3 + ["incoming"] * 2 + ["validate"]
    assert out["sample_id"].tolist() == ["0", "1", "a,b", "", "", ""]
    # float32 scores survive exactly
    np.testing.assert_array_equal(out["jepa_score"][:3], s[0].double().numpy())
    np.testing.assert_array_equal(out["log_density"][:3], s[2].double().numpy())
    assert math.isnan(out["jepa_score"][3]) and out["log_density"][3] == 1.5 and math.isnan(out["log_density"][4])
    assert out["n_floored"].tolist() == [0, 2, 0, -1, -1, 1]
    assert np.isnan(out["kept"][:3]).all() and out["kept"][3:5].tolist() == [1.0, 0.0]
    assert out["weight"][3:5].tolist() == [1.0, 0.0] and np.isnan(out["weight"][5])


def test_bad_columns_fail_clearly(tmp_path):
    exp = ScoreExporter(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="unknown score columns"):
        exp.write(0, "heldout", 1, scores={"score": [1.0]})
    with pytest.raises(ValueError, match="2 values for 3 rows"):
        exp.write(0, "heldout", 3, n_floored=[1, 2])
    with pytest.raises(ValueError, match="not one of"):
        ScoreExporter(tmp_path / "x.txt", "txt")
