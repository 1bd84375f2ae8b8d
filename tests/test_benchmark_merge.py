"""The merge benchmark is a driver over the federation's code: on the same demo data and run-config it reports
exactly the metrics a pipeline run gets, and its extra rows (picked lambda, unseen domains, joint training)
are consistent with what it ran."""

import json

import pytest

from benchmarks.merge import main
from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.data.demo import make_demo
from server.config import ConfigError, app_defaults, parse_overrides, pipeline_config
from server.pipeline import Pipeline
from server.transport import InProcessTransport

from helpers import make_tiny_encoder

pytestmark = pytest.mark.slow  # more than a few seconds on 2 cores: not in `make test-fast`

#: rows the pipeline run computes itself (MergeRec task-wise: the default `granularities`)
SHARED = ["pretrained", "task_arithmetic", "ties", "mergerec-task"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "demo", n_domains=3, n_items=60, n_users=80, seed=0)
    names = [d.name for d in dirs]
    rc = (f'encoder="{enc}" epochs=2 batch-size=32 patience=1 coef-steps=4 coef-batch-size=8 teacher-top-k=16 '
          f'baselines="task_arithmetic,ties" cache-dir="{root / "cache"}"')
    out = root / "merge.json"
    assert main(["--data", str(root / "demo"), "--domains", *names, "--run-config", rc, "--cache", str(root / "cache"),
                 "--run-dir", str(root / "bench-run"), "--extras", "picked", "unseen", "--joint-epochs", "1",
                 "--out", str(out)]) == 0
    return root, names, rc, json.loads(out.read_text())


def test_benchmark_rows_equal_a_pipeline_run(bench):
    root, names, rc, report = bench
    # the benchmark scores every silo's model everywhere (its unseen rows need them): so does this run
    cfg, _, _ = pipeline_config(app_defaults() | parse_overrides(rc + ' evaluate-finetuned="all"'))
    endpoints = {d: in_process_endpoint(SiloWorker(d, root / "demo" / d, state_dir=root / "state" / d,
                                                   cache_dir=root / "cache")) for d in names}
    run = Pipeline(InProcessTransport(endpoints), cfg, root / "pipeline-run").run()
    label = {"task_arithmetic": "task_arithmetic@0.3"}
    rows = {(r["method"], r["domain"]): r for r in report["rows"] if r["scenario"] == "in-domain"}
    shared = SHARED + [f"finetuned-{d}" for d in names]
    for d in names:
        for model in shared:
            got, want = rows[(label.get(model, model), d)], run["metrics"][d][model]["values"]
            assert got["recall@10"] == want["recall@10"] and got["ndcg@10"] == want["ndcg@10"], (model, d)


def test_extra_rows_are_consistent(bench):
    root, names, rc, report = bench
    assert report["complete"]
    scenarios = {r["scenario"] for r in report["rows"]}
    assert scenarios == {"in-domain", *(f"unseen-{d}" for d in names)}
    in_domain = {r["method"] for r in report["rows"] if r["scenario"] == "in-domain"}
    # the granularity the run did not learn, and MergeRec without its item-tower fit, are extra rows
    assert {"mergerec-layer", "mergerec-task without item-tower fit"} <= in_domain
    for d in names:  # unseen: only the held-out domain is tested; the base row is the in-domain one
        unseen = [r for r in report["rows"] if r["scenario"] == f"unseen-{d}"]
        assert {r["domain"] for r in unseen} == {d}
        methods = {r["method"] for r in unseen}
        assert {"pretrained", "task_arithmetic@picked", "mergerec-task", "mergerec-layer", "breadcrumbs"} <= methods
        assert f"finetuned-{d}" not in methods  # the held-out domain's own model is not part of that merge
        base = [r for r in report["rows"] if r["method"] == "pretrained" and r["domain"] == d]
        assert len({r["recall@10"] for r in base}) == 1
    picked = report["coefficients"]["in-domain/task_arithmetic_lambda"]
    assert picked["picked"] == float(min(picked["heldout_loss"], key=picked["heldout_loss"].get))
    assert any(r["method"] == "joint (pooled, non-private)" for r in report["rows"])
    verdict = {v["case"] for v in report["mergerec_vs_training_free"]}
    assert verdict == {"in-domain", "unseen (mean of 3)"}
    assert "| mergerec-task |" in (root / "merge.md").read_text()
    assert all(b["received_from_silo"] > 0 for b in report["bytes_per_silo"].values())


def test_bad_run_config_is_named(bench):
    root, names, _, _ = bench
    with pytest.raises(ConfigError, match="epochz"):
        main(["--data", str(root / "demo"), "--domains", *names, "--run-config", "epochz=3",
              "--out", str(root / "x.json")])
    with pytest.raises(ConfigError, match="lr"):
        parse_overrides("lr=1e-")
