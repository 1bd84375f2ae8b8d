"""The systems benchmark (benchmarks/systems.py) is a driver over the federation's code: on demo data its
in-domain rows equal a plain pipeline run with the same run-config, its unseen xcross equals the new-domain
untuned xcross evaluated by the silo itself, and every fraction has its gate-tuned and LoRA rows."""

import json

import pytest

from benchmarks.systems import main
from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.data.demo import make_demo
from server.config import app_defaults, parse_overrides, pipeline_config
from server.pipeline import Pipeline
from server.transport import InProcessTransport

from helpers import make_tiny_encoder

pytestmark = pytest.mark.slow  # more than a few seconds on 2 cores: not in `make test-fast`

FRACTIONS = [0.5, 1.0]


@pytest.fixture(scope="module")
def systems(tmp_path_factory):
    root = tmp_path_factory.mktemp("systems")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "demo", n_domains=3, n_items=60, n_users=80, seed=0)
    names = [d.name for d in dirs]
    rc = (f'encoder="{enc}" epochs=2 batch-size=32 patience=1 coef-steps=20 coef-batch-size=8 teacher-top-k=16 '
          f'integration-steps=10 lora-rank=2 cache-dir="{root / "cache"}"')
    out = root / "systems.json"
    assert main(["--data", str(root / "demo"), "--domains", *names, "--run-config", rc, "--cache", str(root / "cache"),
                 "--run-root", str(root / "runs"), "--unseen", names[-1], "--held-out", names[-1],
                 "--fractions", *map(str, FRACTIONS), "--gate-run-config", "lr=0.05", "--out", str(out)]) == 0
    return root, names, rc, json.loads(out.read_text())


def _plain_run(root, names, rc: str, extra: str):
    cfg, _, _ = pipeline_config(app_defaults() | parse_overrides(rc + " " + extra))
    endpoints = {d: in_process_endpoint(SiloWorker(d, root / "demo" / d, state_dir=root / "state" / d,
                                                   cache_dir=root / "cache")) for d in names}
    return Pipeline(InProcessTransport(endpoints), cfg, root / "plain-run").run()


def test_lora_rows_equal_a_plain_pipeline_run(systems):
    root, names, rc, report = systems
    run = _plain_run(root, names, rc, 'finetune="lora" integration="xcross" baselines="task_arithmetic,ties"')
    rows = {(r["method"], r["domain"]): r for r in report["rows"]
            if r["variant"] == "lora" and r["scenario"] == "in-domain"}
    for d in names:
        for method, model in (("mergerec-task", "mergerec-task"), ("xcross", "xcross"), ("ties", "ties"),
                              ("own fine-tuned", f"finetuned-{d}")):
            got, want = rows[(method, d)], run["metrics"][d][model]
            assert (got["recall@10"], got["ndcg@10"], got["users"]) == \
                (want["values"]["recall@10"], want["values"]["ndcg@10"], want["users"]), (method, d)


def test_every_variant_scenario_and_fraction_has_its_rows(systems):
    root, names, rc, report = systems
    assert report["complete"] and report["command"].startswith("python -m benchmarks.systems")
    held = names[-1]
    methods = {"task_arithmetic", "ties", "mergerec-task", "mergerec-layer", "xcross"}
    for v in ("full", "lora", "weave"):
        rows = [r for r in report["rows"] if r["variant"] == v]
        assert {(r["method"], r["domain"]) for r in rows if r["scenario"] == "in-domain"} >= \
            {(m, d) for m in methods | {"own fine-tuned"} for d in names}
        unseen = [r for r in rows if r["scenario"] == f"unseen-{held}"]
        assert {r["method"] for r in unseen} == methods | {"pretrained"} and {r["domain"] for r in unseen} == {held}
        assert all(r["upload_bytes_per_silo"] > 0 for r in rows if r["method"] in methods)
    lora = {r["method"]: r for r in report["rows"] if r["variant"] == "lora" and r["scenario"] == "in-domain"}
    full = {r["method"]: r for r in report["rows"] if r["variant"] == "full" and r["scenario"] == "in-domain"}
    assert lora["ties"]["upload_bytes_per_silo"] < full["ties"]["upload_bytes_per_silo"]  # factors, not dense
    assert lora["xcross"]["upload_bytes_per_silo"] > lora["ties"]["upload_bytes_per_silo"]  # + teacher top-k
    new = [r for r in report["rows"] if r["scenario"] == f"new-domain-{held}"]
    for f in FRACTIONS:
        for method in ("xcross (others) + gates tuned", "LoRA from the base"):
            got = [r for r in new if r["method"] == method and r.get("fraction") == f]
            assert len(got) == 1 and got[0]["users"] >= 5 and got[0]["train_users"] >= 5, (method, f)
    tuned = [r["train_users"] for r in new if r["method"] == "LoRA from the base"]
    assert tuned == sorted(tuned) and tuned[0] < tuned[-1]
    # the silo's own evaluation of the untuned model equals the unseen xcross row (same model, same users)
    untuned = [r for r in new if r["method"] == "xcross (others), gates untuned"]
    unseen_x = [r for r in report["rows"] if r["variant"] == "lora" and r["scenario"] == f"unseen-{held}"
                and r["method"] == "xcross"]
    assert len(untuned) == 1 and untuned[0]["recall@10"] == unseen_x[0]["recall@10"]
    assert untuned[0]["ndcg@10"] == unseen_x[0]["ndcg@10"]
    md = (root / "systems.md").read_text()
    assert "| xcross |" in md and "new-domain" in md and "python -m benchmarks.systems" in md
