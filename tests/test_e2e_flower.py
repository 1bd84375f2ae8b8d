"""The real thing on loopback: one flower-superlink (TLS + SuperNode authentication) and one flower-supernode
per demo domain, shared by the tests of this module, the full pipeline submitted with `flwr run`. Each silo
request starts a ClientApp process, so an end-to-end test costs about one process start per stage: one hybrid
run (MergeRec stages, then FedAvg rounds) carries the checks that share a configuration: artifacts, equality
with the in-process pipeline, the ServerApp stopped mid-round and started again, privacy of every recorded
message. Apart, last (the stack keeps that node down): LoRA with weaving and a SuperNode killed during
fine-tuning (drop, equality, privacy). The simulation runtime's privacy check is in
tests/test_benchmark_pipeline.py (the pipeline benchmark's smoke runs the hybrid through it)."""

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

from faults import frozen_supernodes, kill_supernode
from helpers import make_tiny_encoder
from privacy import assert_no_user_data, recorded_messages

pytestmark = [pytest.mark.e2e]
ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["garden", "kitchen", "outdoor"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    enc = make_tiny_encoder(root / "enc")
    make_demo(root / "data", n_domains=3, n_items=80, n_users=60, seed=5)
    return root, enc


@pytest.fixture(scope="module")
def stack(world, tmp_path_factory):
    """One SuperLink + three SuperNodes for the module (starting them is most of an end-to-end test's time)."""
    root, _ = world
    with start_stack(DOMAINS, root / "data", run_dir=tmp_path_factory.mktemp("stack")) as s:
        yield s


def run_config(root: Path, enc: Path, run_dir: Path, **extra) -> dict:
    rc = {"run-dir": str(run_dir), "encoder": str(enc), "cache-dir": str(root / "cache"), "epochs": 2,
          "coef-steps": 20, "teacher-top-k": 16, "min-nodes": 3, "timeout-s": 120.0, "node-wait-s": 120.0,
          "baselines": "task_arithmetic", "granularities": "task,layer"}
    rc.update(extra)
    return rc


def full_config(rc: dict) -> dict:
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**defaults, **rc}


def in_process_report(root: Path, rc: dict, run_dir: Path, crash: tuple[str, str] | None = None) -> dict:
    """The same configuration through the in-process transport; `crash` = (domain, message type): that silo
    raises on that message (and every later one), as a SuperNode that died there."""
    cfg, _, _ = pipeline_config(full_config(rc))
    dead = set()

    def single_threaded(worker):
        """Silo work runs with one thread, as on the SuperNodes; the server side keeps the default, as the
        ServerApp does."""
        def call(message_type, content):
            if crash is not None and worker.domain == crash[0] and (dead or message_type == crash[1]):
                dead.add(worker.domain)
                raise ConnectionError(f"{worker.domain} is gone")
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


#: how long a wait goes on after the `flwr run` log stream ended: the stream can end while the run goes on
#: (seen on a fresh clone: the run was fine-tuning), so its end alone does not fail the wait
STREAM_GRACE_S = 30.0


def _wait_for(predicate, timeout: float, what: str, stack=None) -> None:
    """Poll `predicate` every 0.1 s; with `stack`, fail STREAM_GRACE_S after its `flwr run` log stream ended
    (the run finished or failed: what was waited for will not come) instead of waiting out `timeout`."""
    t0, ended = time.monotonic(), None
    while not predicate():
        now = time.monotonic()
        assert now - t0 < timeout, f"timed out waiting for {what}"
        if stack is not None and not stack.procs["flwr-run"].alive:
            ended = ended or now
            if now - ended > STREAM_GRACE_S and not predicate():
                raise AssertionError(f"the run ended while waiting for {what}:\n{stack.log_tails()}")
        time.sleep(0.1)


def _rounds_stored(run_dir: Path) -> list[int]:
    try:
        fed = json.loads((run_dir / "checkpoint.json").read_text()).get("fedavg") or {}
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [r["round"] for r in fed.get("rounds", [])]


def _requests(folder: Path, kind: str) -> int:
    return len(list(folder.glob(f"*-down-{kind}-*.json")))


def test_hybrid_stopped_mid_round_resumes_to_the_in_process_result(world, stack, tmp_path):
    """The hybrid (MergeRec stages, then FedAvg rounds from the best merge) through `flwr run`, with TLS and node
    authentication: the ServerApp is stopped with `flwr stop` during round 1, once round 0 (every silo's score of
    the merged candidates) is stored; the silos are frozen meanwhile, so the stop lands there however fast the
    machine is. Started again, it goes on where it stopped (no silo fine-tunes again, round 0 is not asked again),
    and the finished run equals an uninterrupted in-process run of the same configuration: every model's metrics
    (pretrained, merges, MergeRec, hybrid), the shipped model, the card. No recorded message leaks user data.
    (Resuming from every other stage boundary is tested in process: tests/test_pipeline_inprocess.py,
    tests/test_config_checkpoint.py, tests/test_fedavg.py.)"""
    root, enc = world
    run_dir = tmp_path / "run"
    msgs = tmp_path / "messages"
    rc = run_config(root, enc, run_dir, **{"record-messages": str(msgs), "strategy": "fedavg",
                                           "fedavg-init": "merged", "fedavg-rounds": 1})

    run = stack.run_app(ROOT, run_config=rc, timeout=900, wait=False)
    assert run.run_id is not None, run.details
    _wait_for(lambda: _rounds_stored(run_dir), 600, "round 0 to be stored", stack)
    with frozen_supernodes(stack):  # the ServerApp now waits for replies that cannot come until it is stopped
        stack.flwr("stop", str(run.run_id), stack.connection, timeout=60)
        assert not stack.wait_run(run, timeout=120).ok
    assert _rounds_stored(run_dir) == [0] and _finetune_requests(msgs) == 3
    rounds_before = _requests(msgs, "train.round")
    last = stack.run_app(ROOT, run_config=rc, timeout=900)
    assert last.ok, f"{last.status}: {last.details}\n{stack.log_tails()}"
    assert _finetune_requests(msgs) == 3, "silos were asked to fine-tune again after a restart"
    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["active"]) == DOMAINS and report["dropped"] == []
    assert report["selection"]["chosen"] == "hybrid"
    assert [r["round"] for r in report["fedavg"]["rounds"]] == [0, 1]
    # after the restart only round 1 (not stored yet) and the last model's validation reach the silos: round 0's
    # scoring of the merged candidates is not asked again
    assert _requests(msgs, "train.round") - rounds_before == 3 * 2
    card = json.loads((run_dir / "model" / "config.json").read_text())
    assert card["domains"] == DOMAINS and card["base_fingerprint"] == report["base_fingerprint"]
    assert card["method"] == "hybrid" and (run_dir / "model" / "model.safetensors").stat().st_size > 0
    for d in DOMAINS:
        assert report["bytes"][d]["received_from_silo"] > report["bytes"][d]["sent_to_silo"] / 100

    reference = in_process_report(root, rc, tmp_path / "in-process")
    assert set(reference["metrics"]["garden"]) >= {"pretrained", "task_arithmetic", "mergerec-task",
                                                   "mergerec-layer", "hybrid"}
    for d in DOMAINS:
        assert set(report["metrics"][d]) == set(reference["metrics"][d]), d
        for model, m in reference["metrics"][d].items():
            got = report["metrics"][d][model]["values"]
            for k, v in m["values"].items():
                assert got[k] == pytest.approx(v, abs=1e-6), f"{d}/{model}/{k}: flower {got[k]} vs in-process {v}"
    assert assert_no_user_data(recorded_messages(msgs), [root / "data" / d for d in DOMAINS]) >= 24


def test_lora_weaving_with_a_supernode_killed_during_finetuning(world, stack, tmp_path):
    """finetune = lora with one weaving round over real SuperNodes, and kitchen's SuperNode killed (SIGKILL, its
    ClientApp with it) as soon as its ClientApp started on the fine-tuning request (polled, so no long
    fine-tuning is needed to catch it): the run goes on with the other two, the train.weave action reaches both,
    the LoRA upload stays small, the metrics equal the in-process pipeline's with kitchen crashing at the same
    request, and no recorded message leaks user data. Most of the wall time is the SuperLink's wait: it answers for
    the dead node only once its heartbeat patience has passed (2 x 30 s in flwr 1.41), or the stage limit (60 s)
    ends an attempt and the retry finds the node gone; no CPU is spent meanwhile. Last in the module: the stack
    keeps the killed SuperNode down."""
    root, enc = world
    run_dir, msgs = tmp_path / "run", tmp_path / "messages"
    rc = run_config(root, enc, run_dir, **{"record-messages": str(msgs), "timeout-s": 60.0, "finetune": "lora",
                                           "lora-rank": 4, "weave-rounds": 1, "coef-steps": 10,
                                           "granularities": "task"})
    kitchen = stack.procs["supernode-kitchen"]
    seen = len(kitchen.output())  # the node's log holds the earlier tests' runs too

    def kitchen_finetuning() -> bool:
        out = kitchen.output()[seen:]
        i = out.find("Receiving: train.finetune")
        return i >= 0 and "Start `flwr-clientapp` process" in out[i:]

    res = stack.run_app(ROOT, run_config=rc, timeout=900, wait=False)
    assert res.run_id is not None, res.details
    _wait_for(lambda: _finetune_requests(msgs) >= 3 and kitchen_finetuning(), 300,
              "kitchen's ClientApp to start fine-tuning", stack)
    kill_supernode(stack, "kitchen")
    res = stack.wait_run(res, timeout=900)
    assert res.ok, f"{res.status}: {res.details}\n{stack.log_tails()}"
    report = json.loads((run_dir / "report.json").read_text())
    alive = ["garden", "outdoor"]
    assert sorted(report["active"]) == alive
    assert [d["domain"] for d in report["dropped"]] == ["kitchen"] and report["dropped"][0]["stage"] == "finetune"
    assert "kitchen" not in report["metrics"] and set(report["metrics"]) == set(alive)
    assert len(report["weave"]["hops"]) == 2 and report["weave"]["skipped"] == []
    for d in alive:
        assert report["finetune"][d]["upload_bytes"] < report["finetune"][d]["dense_task_vector_bytes"] / 5
    reference = in_process_report(root, rc, tmp_path / "in-process", crash=("kitchen", "train.finetune"))
    assert [d["domain"] for d in reference["dropped"]] == ["kitchen"]
    for d in alive:
        assert set(report["metrics"][d]) == set(reference["metrics"][d]), d
        for model, m in reference["metrics"][d].items():
            got = report["metrics"][d][model]["values"]
            assert got == pytest.approx(m["values"], abs=1e-6), f"{d}/{model}"
    assert len(list(msgs.glob("*-up-train.weave-*.json"))) == 2
    assert assert_no_user_data(recorded_messages(msgs), [root / "data" / d for d in DOMAINS]) >= 12
