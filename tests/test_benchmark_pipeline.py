"""`python -m benchmarks.pipeline --smoke`: the pipeline benchmark's driver on demo data, through the real Flower
simulation (deployment.simulate), cold then warm; the item-embedding cache changes no result. The demo data is
written beforehand, smaller than the driver's default (it writes its own only where none exists)."""

from __future__ import annotations

import json

import pytest

from benchmarks.pipeline import main
from common.core.report import ROOT
from common.data.demo import make_demo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_smoke_writes_stage_silo_bytes_rss_and_metrics(tmp_path, tiny_encoder):
    enc = tiny_encoder
    make_demo(tmp_path / "work" / "demo-data", n_domains=3, n_items=60, n_users=50, seed=0)
    out = tmp_path / "pipeline.json"
    assert main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--run-config", f"encoder='{enc}'"]) == 0
    result = json.loads(out.read_text())
    # the small demo written above, not a new one (result paths are relative to the project root)
    assert (ROOT / result["data_root"]).resolve() == (tmp_path / "work" / "demo-data").resolve()
    assert [r["run"] for r in result["runs"]] == ["cold", "warm"]
    cold, warm = result["runs"]
    for r in (cold, warm):
        assert {"handshake", "finetune", "teacher", "coefficients", "evaluate"} <= set(r["stages_s"])
        assert sorted(r["silos"]) == ["garden", "kitchen", "outdoor"] and r["dropped"] == []
        for s in r["silos"].values():
            assert s["received_from_silo"] > s["task_vector_bytes"] > 0 and s["teacher_bytes"] > 0
            assert s["sent_to_silo"] > 0 and s["seconds"] > 0
        assert r["peak_rss_process_mb"] > 50 and r["peak_rss_total_mb"] >= r["peak_rss_process_mb"]
        assert {m["model"] for m in r["metrics"]} >= {"pretrained", "task_arithmetic", "mergerec-task"}
    assert any((tmp_path / "work" / "cache" / "item_embeddings").iterdir())
    key = lambda m: (m["domain"], m["model"])  # noqa: E731
    assert sorted(cold["metrics"], key=key) == [dict(m, run="cold") for m in sorted(warm["metrics"], key=key)]
    assert (tmp_path / "pipeline.md").read_text().startswith("# Federated pipeline benchmark")
