"""The whole pipeline through the in-process transport on tiny demo silos: stages, resume, faults, privacy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import pytest

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.model.config import BackboneConfig, TrainConfig
from common.data.demo import make_demo
from common.model.coefficients import CoefficientConfig
from server.config import PipelineConfig
from server.pipeline import Pipeline, PipelineError
from server.transport import InProcessTransport, MessageRecorder

from helpers import make_tiny_encoder
from privacy import assert_no_user_data, recorded_messages


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=3, n_items=60, n_users=80, seed=1)
    return root, enc, dirs


def _cfg(enc: Path, root: Path, **kw) -> PipelineConfig:
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    base = dict(backbone=bb, train=TrainConfig(epochs=2, batch_size=32, progress=False, warmup_steps=5),
                coefficients=CoefficientConfig(steps=10, batch_size=8), baselines=["task_arithmetic", "ties"],
                teacher_top_k=16, min_silos=2, retries=1, timeout_s=60)
    return PipelineConfig(**{**base, **kw})


def _transport(dirs, root, observer=None, broken: dict | None = None):
    endpoints = {}
    for d in dirs:
        w = SiloWorker(d.name, d, state_dir=root / "state" / d.name, cache_dir=root / "cache")
        fn = in_process_endpoint(w)
        if broken and d.name in broken:
            fn = broken[d.name](fn)
        endpoints[d.name] = fn
    return InProcessTransport(endpoints, observer)


def test_full_pipeline_and_report(world, tmp_path, caplog):
    root, enc, dirs = world
    with caplog.at_level("INFO"):
        report = Pipeline(_transport(dirs, root), _cfg(enc, root, granularities=["task", "layer"]),
                          tmp_path / "run").run()
    # progress the ServerApp logs itself (so it reaches its console in a deployment too): per silo and stage
    server_lines = [r.getMessage() for r in caplog.records if r.name == "server.pipeline"]
    for d in dirs:
        for what in (f"finetune: silo {d.name} epoch 1 loss", f"finetune: silo {d.name} fine-tuned",
                     f"teacher: silo {d.name} replied", f"evaluate: silo {d.name} test NDCG@10"):
            assert any(line.startswith(what) for line in server_lines), what
    assert sorted(report["active"]) == sorted(d.name for d in dirs)
    for d in dirs:
        models = report["metrics"][d.name]
        assert {"pretrained", "task_arithmetic", "ties", "mergerec-task", "mergerec-layer"} <= set(models)
        # evaluate-finetuned "own": a silo is sent (and scores) its own fine-tuned model, never another silo's
        assert {m for m in models if m.startswith("finetuned-")} == {f"finetuned-{d.name}"}
        assert all(0 <= m["values"]["ndcg@10"] <= 1 for m in models.values())
    model_dir = tmp_path / "run" / "model"
    assert (model_dir / "model.safetensors").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["base_fingerprint"] == report["base_fingerprint"]
    # the shipped variant is the better one on validation (never test), and the card says so
    chosen = report["selection"]["chosen"]
    assert config["method"] == chosen
    val = report["selection"]["mean_val_ndcg@10"]
    assert val[chosen] == max(val.values())
    # every merged candidate competes (not only the MergeRec variants), and the folder holds exactly its weights
    assert set(val) == {"mergerec-task", "mergerec-layer", "task_arithmetic", "ties"}
    from safetensors.torch import load_file

    shipped, stored = load_file(str(model_dir / "model.safetensors")), load_file(str(tmp_path / "run" / "merges" / f"{chosen}.safetensors"))
    assert shipped.keys() == stored.keys() and all(torch.equal(shipped[n], stored[n]) for n in stored)
    assert report["seen_items"] == "exclude" and "left out of the ranking" in (tmp_path / "run" / "report.md").read_text()
    card = (model_dir / "README.md").read_text()
    assert "2601.01753" in card and "validation NDCG@10" in card and chosen in card
    report_md = (tmp_path / "run" / "report.md").read_text()
    for png in ("recall_at_10.png", "coefficients.png", "coefficient_loss.png"):
        assert (tmp_path / "run" / "plots" / png).stat().st_size > 5000
        assert f"plots/{png}" in report_md
    assert report["bytes"][dirs[0].name]["received_from_silo"] > 0


def test_resume_does_not_finetune_again(world, tmp_path):
    root, enc, dirs = world
    calls = []
    first = _transport(dirs, root, observer=lambda dr, s, mt, c: calls.append((dr, mt)))
    p = Pipeline(first, _cfg(enc, root), tmp_path / "run")
    p.handshake()
    p.finetune()
    n_finetune = sum(1 for dr, mt in calls if mt == "train.finetune" and dr == "down")
    assert n_finetune == 3
    calls.clear()
    report = Pipeline(_transport(dirs, root, observer=lambda dr, s, mt, c: calls.append((dr, mt))),
                      _cfg(enc, root), tmp_path / "run").run()
    assert not [c for c in calls if c[1] == "train.finetune"]
    assert len(report["active"]) == 3


def test_failing_silo_is_retried_then_dropped(world, tmp_path):
    root, enc, dirs = world
    attempts = []

    def crash_on_finetune(fn):
        def wrapped(mt, content):
            if mt == "train.finetune":
                attempts.append(1)
                raise RuntimeError("disk on fire")
            return fn(mt, content)
        return wrapped

    report = Pipeline(_transport(dirs, root, broken={dirs[1].name: crash_on_finetune}), _cfg(enc, root),
                      tmp_path / "run").run()
    assert len(attempts) == 2  # first try + one retry
    assert report["dropped"] == [{"domain": dirs[1].name, "stage": "finetune",
                                  "reason": "silo crashed (RuntimeError)"}]  # never the exception's text
    assert dirs[1].name not in report["metrics"]


def test_too_few_silos_stops_with_clear_message(world, tmp_path):
    root, enc, dirs = world
    with pytest.raises(PipelineError, match="min-silos is 3"):
        Pipeline(_transport(dirs[:2], root), _cfg(enc, root, min_silos=3), tmp_path / "run").run()


def test_second_pipeline_on_a_busy_run_dir_fails_at_once(world, tmp_path):
    """While one pipeline runs in a directory (here: holds its lock), another refuses to start; once the
    first is gone, the directory is free again."""
    import fcntl

    root, enc, dirs = world
    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PipelineError, match="in use by another running pipeline"):
            Pipeline(_transport(dirs, root), _cfg(enc, root), run).run()
    report = Pipeline(_transport(dirs, root), _cfg(enc, root, baselines=[]), run).run()
    assert sorted(report["active"]) == sorted(d.name for d in dirs)


def test_no_user_data_in_any_message(world, tmp_path):
    """Record every message both ways; no user id, user sequence or per-user score may appear."""
    root, enc, dirs = world
    recorder = MessageRecorder(tmp_path / "messages")
    Pipeline(_transport(dirs, root, observer=recorder), _cfg(enc, root), tmp_path / "run").run()
    types = {p.name.split("-")[2] for p in (tmp_path / "messages").glob("*.json")}
    assert types == {"query.handshake", "train.finetune", "query.teacher", "evaluate.merged"}
    assert assert_no_user_data(recorded_messages(tmp_path / "messages"), dirs) >= 24


def test_privacy_check_catches_a_leak(world, tmp_path):
    """The checker itself must fail on a message carrying a user sequence or a per-user score vector."""
    root, enc, dirs = world
    from common.data.format import load_silo

    silo = load_silo(dirs[0])
    seq = next(s for s in silo.train if len(s) >= 3)
    with pytest.raises(AssertionError, match="user sequence"):
        assert_no_user_data([("leak", json.dumps({"x": seq}), {})], dirs)
    with pytest.raises(AssertionError, match="per-user"):
        assert_no_user_data([("leak", "{}", {"s": np.zeros(len(silo.test), np.float32)})], dirs)
