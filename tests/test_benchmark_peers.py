"""The peers benchmark (benchmarks/peers.py) is a driver: on demo data its rows equal the runs' own numbers."""

from __future__ import annotations

import json

import pytest

from benchmarks import peers

pytestmark = pytest.mark.slow  # several pipeline runs: not in `make test-fast`


def test_peers_rows_come_from_the_runs(world, tmp_path):
    root, enc, dirs = world
    out = tmp_path / "peers.json"
    rc = (f'encoder="{enc}" epochs=1 coef-steps=4 teacher-top-k=8 baselines="task_arithmetic" granularities="task" '
          'val-max-users=10')
    peers.main(["--data-root", str(dirs[0].parent), "--domains", ",".join(d.name for d in dirs), "--rounds", "1,2",
                "--hybrid-rounds", "1", "--prox-mu", "0.1", "--joint-epochs", "1", "--run-config", rc,
                "--cache", str(root / "cache"), "--work", str(tmp_path / "work"), "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["seen_items"] == "exclude" and "commit" in doc
    methods = [r["method"] for r in doc["rows"]]
    assert methods[0].startswith("own model") and any(m.startswith("MergeRec one-shot") for m in methods)
    assert {"fedavg after 1 round(s)", "fedavg after 2 round(s)", "fedprox (mu 0.1) after 2 round(s)",
            "hybrid after 1 round(s)", "joint training, pooled data (non-private reference)"} <= set(methods)
    # the FedAvg rows are the run's stored rounds evaluated at the silos: round 2 costs twice round 1's bytes
    f1, f2 = (next(r for r in doc["rows"] if r["method"] == f"fedavg after {k} round(s)") for k in (1, 2))
    assert f2["MB up / silo"] == pytest.approx(2 * f1["MB up / silo"], rel=0.01) and f1["MB up / silo"] > 0
    run = json.loads((tmp_path / "work" / "3-silos" / "mergerec" / "report.json").read_text())
    shipped = next(r for r in doc["rows"] if r["method"].endswith("(shipped)"))
    d = dirs[0].name
    assert shipped[f"{d} N@10"] == run["metrics"][d][run["selection"]["chosen"]]["values"]["ndcg@10"]
    hybrid = json.loads((tmp_path / "work" / "3-silos" / "hybrid" / "report.json").read_text())
    assert hybrid["fedavg"]["init"] in run["metrics"][d]  # started from a merged candidate of the MergeRec run
