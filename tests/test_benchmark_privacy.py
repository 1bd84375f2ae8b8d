"""benchmarks/privacy.py: the attack's AUC / TPR arithmetic, and the whole driver on demo data (--smoke)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import privacy


def test_auc_and_tpr_at_low_fpr():
    assert privacy.auc_and_tpr(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == (1.0, 1.0)
    assert privacy.auc_and_tpr(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == (0.0, 0.0)
    assert privacy.auc_and_tpr(np.array([1.0, 1.0]), np.array([1.0, 1.0]))[0] == 0.5  # ties count half
    # AUC = P(member > non-member): 3 of the 4 pairs
    assert privacy.auc_and_tpr(np.array([2.0, 4.0]), np.array([1.0, 3.0]))[0] == 0.75
    # 200 non-members: 1% FPR allows 2 of them above the threshold (the third highest, 197)
    non = np.arange(200, dtype=float)
    members = np.array([198.5, 197.5, 196.5, 10.0])
    auc, tpr = privacy.auc_and_tpr(members, non)
    assert tpr == 0.5  # 198.5 and 197.5 exceed 197; 196.5 does not
    assert auc == pytest.approx((198.5 + 197.5 + 196.5 + 10) / 4 / 200, abs=0.01)


@pytest.mark.slow
def test_smoke_run_writes_every_row_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "privacy.json"
    args = ["--smoke", "--run-dir", str(tmp_path / "run"), "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert privacy.main(args) == 0
    doc = json.loads(out.read_text())
    models = [(r["model"].split(" (")[0], r["epsilon"]) for r in doc["rows"]]
    assert models == [("overfitted silo model", "inf"), ("silo model", "inf"), ("merged model", "inf"),
                      ("silo model", "8"), ("merged model", "8"), ("untrained base", "0")]
    dp_rows = [r for r in doc["rows"] if r["epsilon"] == "8"]
    assert all(0 < r["dp_epsilon_spent"] <= 8 for r in dp_rows)
    assert all(0 <= r["attack_auc"] <= 1 and r["attack_users"] > 0 for r in doc["rows"][:-1])
    assert all(d is None for d in doc["rows"][1]["dp"].values())
    # each silo's guarantee is in the DP run's report and model card; the run without DP says it has none
    for page in (tmp_path / "run" / "eps-8" / "report.md", tmp_path / "run" / "eps-8" / "model" / "README.md"):
        text = page.read_text()
        assert "Privacy (user-level DP-SGD" in text and f"{dp_rows[0]['dp_epsilon_spent']:.3f}"[:4] in text
    assert "No differential-privacy guarantee" in (tmp_path / "run" / "eps-inf" / "model" / "README.md").read_text()
    report = json.loads((tmp_path / "run" / "eps-8" / "report.json").read_text())
    assert all(f["dp"]["epsilon"] <= 8 for f in report["finetune"].values())
    # every part is stored in the run directory: a second run recomputes nothing and writes the same rows

    def recompute(*a, **k):
        raise AssertionError("a stored part was recomputed")

    monkeypatch.setattr(privacy, "overfit", recompute)
    monkeypatch.setattr(privacy, "one_epsilon", recompute)
    assert privacy.main(args) == 0
    assert json.loads(out.read_text())["rows"] == doc["rows"]
