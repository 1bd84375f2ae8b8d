"""`python -m benchmarks.pipeline --smoke`: the pipeline benchmark's driver on demo data, through the real Flower
simulation (deployment.simulate, Ray), one cold run (a warm run is the same code with the cache kept; that cached
embeddings equal computed ones is tested in tests/test_backbones.py; tests/test_launcher.py starts a warm run). The
demo data is written beforehand, smaller than the driver's default (it writes its own only where none exists).
The run is the hybrid (the MergeRec stages, then a FedAvg round from the best merge) with every message recorded:
the simulation path leaks no user data in any message of either strategy (the privacy check of `make run`'s
path)."""

from __future__ import annotations

import json

import pytest

from benchmarks.pipeline import main
from common.core.report import ROOT
from common.data.demo import make_demo
from privacy import assert_no_user_data, recorded_messages

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_smoke_writes_stage_silo_bytes_rss_and_metrics(tmp_path, tiny_encoder):
    enc = tiny_encoder
    # users, items and max-items (50) all differ: the privacy check flags any array or list with one entry per user
    dirs = make_demo(tmp_path / "work" / "demo-data", n_domains=3, n_items=80, n_users=60, seed=0)
    out, msgs = tmp_path / "pipeline.json", tmp_path / "messages"
    hybrid = f"strategy='fedavg' fedavg-init='merged' fedavg-rounds=1 record-messages='{msgs}'"
    assert main(["--smoke", "--runs", "cold", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--run-config", f"encoder='{enc}' {hybrid}"]) == 0
    result = json.loads(out.read_text())
    # the small demo written above, not a new one (result paths are relative to the project root)
    assert (ROOT / result["data_root"]).resolve() == (tmp_path / "work" / "demo-data").resolve()
    assert [r["run"] for r in result["runs"]] == ["cold"]
    for r in result["runs"]:
        assert {"handshake", "finetune", "teacher", "coefficients", "evaluate"} <= set(r["stages_s"])
        assert sorted(r["silos"]) == ["garden", "kitchen", "outdoor"] and r["dropped"] == []
        for s in r["silos"].values():
            assert s["received_from_silo"] > s["task_vector_bytes"] > 0 and s["teacher_bytes"] > 0
            assert s["sent_to_silo"] > 0 and s["seconds"] > 0
        assert r["peak_rss_process_mb"] > 50 and r["peak_rss_total_mb"] >= r["peak_rss_process_mb"]
        assert {m["model"] for m in r["metrics"]} >= {"pretrained", "task_arithmetic", "mergerec-task", "hybrid"}
    assert any((tmp_path / "work" / "cache" / "item_embeddings").iterdir())
    assert (tmp_path / "pipeline.md").read_text().startswith("# Federated pipeline benchmark")
    report = json.loads((tmp_path / "work" / "cold" / "run" / "report.json").read_text())
    assert len(report["fedavg"]["rounds"]) == 2  # round 0 (the merged start) and the trained round
    # three silos: handshake, fine-tuning, teacher, the round(s), evaluations, each way
    assert assert_no_user_data(recorded_messages(msgs), dirs) >= 24
