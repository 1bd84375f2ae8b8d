"""The real thing on loopback: one flower-superlink (TLS + SuperNode authentication) and one flower-supernode
per demo domain, the full MergeRec pipeline submitted with `flwr run`. Checks artifacts, equality with the
in-process pipeline, privacy of every recorded message, and the two faults (a SuperNode killed during
fine-tuning; the ServerApp stopped after fine-tuning and started again)."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

import pytest
import torch

from clients.client_app import handle
from clients.silo import SiloWorker
from common.data.demo import make_demo
from deployment.local import start_stack
from server.config import pipeline_config
from server.pipeline import Pipeline
from server.transport import InProcessTransport

from faults import kill_supernode
from helpers import make_tiny_encoder
from privacy import assert_no_user_data, recorded_messages

pytestmark = [pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["garden", "kitchen", "outdoor"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    enc = make_tiny_encoder(root / "enc")
    make_demo(root / "data", n_domains=3, n_items=120, n_users=150, seed=5)
    return root, enc


def run_config(root: Path, enc: Path, run_dir: Path, **extra) -> dict:
    rc = {"run-dir": str(run_dir), "encoder": str(enc), "cache-dir": str(root / "cache"), "epochs": 3,
          "coef-steps": 30, "teacher-top-k": 32, "min-nodes": 3, "timeout-s": 120.0, "node-wait-s": 120.0,
          "baselines": "task_arithmetic,ties"}
    rc.update(extra)
    return rc


def full_config(rc: dict) -> dict:
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **rc}


def in_process_report(root: Path, rc: dict, run_dir: Path) -> dict:
    cfg, _, _ = pipeline_config(full_config(rc))
    def single_threaded(worker):
        """Silo work runs with one thread, as on the SuperNodes; the server side keeps the default, as the
        ServerApp does."""
        def call(message_type, content):
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return handle(worker, message_type, content)
            finally:
                torch.set_num_threads(threads)
        return call

    endpoints = {d: single_threaded(SiloWorker(d, root / "data" / d, state_dir=run_dir / "silo-state" / d,
                                               cache_dir=root / "cache")) for d in DOMAINS}
    return Pipeline(InProcessTransport(endpoints), cfg, run_dir).run()


def _finetune_requests(folder: Path) -> int:
    return len(list(folder.glob("*-down-train.finetune-*.json")))


def test_deployment_matches_in_process_and_leaks_nothing(world, tmp_path):
    root, enc = world
    rc = run_config(root, enc, tmp_path / "run", **{"record-messages": str(tmp_path / "messages")})
    with start_stack(DOMAINS, root / "data", run_dir=tmp_path / "stack") as stack:
        res = stack.run_app(ROOT, run_config=rc, timeout=900)
        assert res.ok, f"{res.status}: {res.details}\n{stack.log_tails()}"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted(report["active"]) == DOMAINS and report["dropped"] == []
    card = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert card["domains"] == DOMAINS and card["base_fingerprint"] == report["base_fingerprint"]
    assert (tmp_path / "run" / "model" / "model.safetensors").stat().st_size > 0
    for d in DOMAINS:
        assert report["bytes"][d]["received_from_silo"] > report["bytes"][d]["sent_to_silo"] / 100

    reference = in_process_report(root, rc, tmp_path / "in-process")
    for d in DOMAINS:
        for model, m in reference["metrics"][d].items():
            got = report["metrics"][d][model]["values"]
            for k, v in m["values"].items():
                assert got[k] == pytest.approx(v, abs=1e-6), f"{d}/{model}/{k}: flower {got[k]} vs in-process {v}"

    n = assert_no_user_data(recorded_messages(tmp_path / "messages"), [root / "data" / d for d in DOMAINS])
    assert n >= 24 and _finetune_requests(tmp_path / "messages") == 3


def test_lora_and_weaving_through_flower(world, tmp_path):
    """finetune = lora with one weaving round over real SuperNodes: the train.weave action reaches every silo,
    the metrics equal the in-process pipeline's, and no recorded message leaks user data."""
    root, enc = world
    rc = run_config(root, enc, tmp_path / "run", **{"record-messages": str(tmp_path / "messages"),
                                                    "finetune": "lora", "lora-rank": 4, "weave-rounds": 1,
                                                    "epochs": 2, "coef-steps": 10, "baselines": "task_arithmetic",
                                                    "granularities": "task"})
    with start_stack(DOMAINS, root / "data", run_dir=tmp_path / "stack") as stack:
        res = stack.run_app(ROOT, run_config=rc, timeout=900)
        assert res.ok, f"{res.status}: {res.details}\n{stack.log_tails()}"
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert sorted(report["active"]) == DOMAINS and report["dropped"] == []
    assert len(report["weave"]["hops"]) == 3 and report["weave"]["skipped"] == []
    for d in DOMAINS:
        assert report["finetune"][d]["upload_bytes"] < report["finetune"][d]["dense_task_vector_bytes"] / 5
    reference = in_process_report(root, rc, tmp_path / "in-process")
    for d in DOMAINS:
        for model, m in reference["metrics"][d].items():
            got = report["metrics"][d][model]["values"]
            assert got == pytest.approx(m["values"], abs=1e-6), f"{d}/{model}"
    msgs = tmp_path / "messages"
    assert len(list(msgs.glob("*-up-train.weave-*.json"))) == 3
    assert assert_no_user_data(recorded_messages(msgs), [root / "data" / d for d in DOMAINS]) >= 27


def _wait_for(predicate, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def _completed(run_dir: Path) -> list[str]:
    try:
        return json.loads((run_dir / "checkpoint.json").read_text())["completed"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_supernode_killed_during_finetuning_is_dropped(world, tmp_path):
    root, enc = world
    run_dir = tmp_path / "run"
    rc = run_config(root, enc, run_dir, epochs=30, patience=30, **{"record-messages": str(tmp_path / "messages"),
                                                                   "timeout-s": 60.0})
    with start_stack(DOMAINS, root / "data", run_dir=tmp_path / "stack") as stack:
        res = stack.run_app(ROOT, run_config=rc, timeout=900, wait=False)
        assert res.run_id is not None, res.details
        _wait_for(lambda: _finetune_requests(tmp_path / "messages") >= 3, 300, "fine-tuning to start")
        time.sleep(2)
        kill_supernode(stack, "kitchen")
        res = stack.wait_run(res, timeout=900)
        assert res.ok, f"{res.status}: {res.details}\n{stack.log_tails()}"
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["active"]) == ["garden", "outdoor"]
    assert [d["domain"] for d in report["dropped"]] == ["kitchen"]
    assert report["dropped"][0]["stage"] == "finetune"
    assert "kitchen" not in report["metrics"] and set(report["metrics"]) == {"garden", "outdoor"}
    assert assert_no_user_data(recorded_messages(tmp_path / "messages"), [root / "data" / d for d in DOMAINS]) >= 12


def test_serverapp_stopped_after_finetuning_resumes_without_finetuning_again(world, tmp_path):
    root, enc = world
    run_dir = tmp_path / "run"
    msgs = tmp_path / "messages"
    # a long coefficient stage gives time to stop the ServerApp after fine-tuning
    rc = run_config(root, enc, run_dir, **{"record-messages": str(msgs), "coef-steps": 400})
    with start_stack(DOMAINS, root / "data", run_dir=tmp_path / "stack") as stack:
        first = stack.run_app(ROOT, run_config=rc, timeout=900, wait=False)
        assert first.run_id is not None, first.details
        _wait_for(lambda: "finetune" in _completed(run_dir), 600, "fine-tuning to complete")
        stack.flwr("stop", str(first.run_id), stack.connection, timeout=60)
        first = stack.wait_run(first, timeout=120)
        assert not first.ok
        assert "coefficients" not in _completed(run_dir)
        before = _finetune_requests(msgs)
        assert before == 3
        second = stack.run_app(ROOT, run_config=rc, timeout=900)
        assert second.ok, f"{second.status}: {second.details}\n{stack.log_tails()}"
    assert _finetune_requests(msgs) == before, "silos were asked to fine-tune again after the restart"
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["active"]) == DOMAINS
    assert "mergerec-layer" in report["metrics"]["garden"]
    assert assert_no_user_data(recorded_messages(msgs), [root / "data" / d for d in DOMAINS]) >= 24


def test_simulation_run_leaks_nothing(world, tmp_path):
    """`python -m deployment.simulate`'s path (simulation SuperLink, Ray): every recorded message passes the
    privacy check, and every expected silo took part."""
    from deployment.local import format_run_config
    from deployment.simulate import exit_status, run_simulation

    root, enc = world
    rc = {"encoder": str(enc), "cache-dir": str(root / "cache"), "silo-state-root": str(tmp_path / "state"),
          "epochs": 2, "coef-steps": 10, "teacher-top-k": 16, "baselines": "task_arithmetic",
          "granularities": "task", "record-messages": str(tmp_path / "messages"), "timeout-s": 300.0}
    report = run_simulation(DOMAINS, root / "data", tmp_path / "run", format_run_config(rc), timeout=900)
    assert sorted(report["active"]) == DOMAINS and report["dropped"] == []
    assert exit_status(report, DOMAINS) == 0
    n = assert_no_user_data(recorded_messages(tmp_path / "messages"), [root / "data" / d for d in DOMAINS])
    assert n >= 24
