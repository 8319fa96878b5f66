"""The k_init trade-off table: state bytes from the formula, loss ratios over seeds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import microadam_k_tradeoff  # noqa: E402


def test_rows_and_files(tmp_path):
    runs = [{"optimizer": "adamw", "final_val_loss": 2.0}, {"optimizer": "adamw", "final_val_loss": 2.2},
            {"optimizer": "microadam", "final_val_loss": 2.31}, {"optimizer": "microadam", "final_val_loss": 2.52},
            {"optimizer": "microadam@k_init=0.05", "final_val_loss": 2.1},
            {"optimizer": "microadam@bias_correction=window", "final_val_loss": 2.0}]  # not a k variant
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": runs}))
    assert microadam_k_tradeoff.main([str(path), "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "tradeoff.json").read_text())
    assert [r["k_init"] for r in rows] == [0.01, 0.05]
    # 0.5 (4-bit error feedback) + 4 m k (int16 index + bf16 value, m = 10) + 4 / 64 (bf16 min, max per bucket)
    assert rows[0]["state_bytes_per_param"] == pytest.approx(0.5 + 0.4 + 4 / 64, rel=1e-3)
    assert rows[1]["state_bytes_per_param"] == pytest.approx(0.5 + 2.0 + 4 / 64, rel=1e-3)
    assert rows[0]["loss_ratio"] == pytest.approx((2.31 + 2.52) / 2 / 2.1)
    assert "| 0.05 |" in (tmp_path / "out" / "tradeoff.md").read_text()
