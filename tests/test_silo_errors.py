"""A silo whose data is broken: it is named in report.json with its stage and reason, and no user key or
user sequence reaches any log line (server or silo console: simulation writes both into the run directory's
flwr-run.log), error text, recorded message, checkpoint or report; the full text is in the silo's errors.log."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.model.config import BackboneConfig, TrainConfig
from common.data.demo import make_demo
from common.model.coefficients import CoefficientConfig
from server.config import PipelineConfig
from server.pipeline import Pipeline
from deployment.simulate import exit_status
from server.transport import InProcessTransport, MessageRecorder
from common.protocol.messages import error_text

from helpers import make_tiny_encoder
from privacy import find_leaks, recorded_messages


def _break_val(folder) -> None:
    """One user's validation entry holds their whole train sequence: load_silo's DataError quotes it."""
    val = json.loads((folder / "val.json").read_text())
    train = json.loads((folder / "train.json").read_text())
    user = next(u for u, s in train.items() if len(s) >= 3)
    val[user] = train[user]
    (folder / "val.json").write_text(json.dumps(val))


def _break_umap(folder) -> None:
    """A user key with no sequence: load_silo's DataError quotes the user key."""
    umap = json.loads((folder / "umap.json").read_text())
    umap["ZZZ-U99999"] = len(umap)
    (folder / "umap.json").write_text(json.dumps(umap))


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=4, n_items=50, n_users=40, seed=4)
    intact = [root / "intact" / d.name for d in dirs[1:3]]
    for d, copy in zip(dirs[1:3], intact):
        shutil.copytree(d, copy)
    _break_val(dirs[1])
    _break_umap(dirs[2])

    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    cfg = PipelineConfig(backbone=bb, train=TrainConfig(epochs=1, batch_size=32, progress=False, warmup_steps=2),
                         coefficients=CoefficientConfig(steps=2, batch_size=8), baselines=["task_arithmetic"],
                         granularities=["task"], teacher_top_k=8, min_silos=2, retries=1, timeout_s=60)
    endpoints = {d.name: in_process_endpoint(SiloWorker(d.name, d, state_dir=root / "state" / d.name,
                                                        cache_dir=root / "cache")) for d in dirs}
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    top = logging.getLogger()
    level = top.level
    top.addHandler(handler)
    top.setLevel(logging.DEBUG)
    try:
        report = Pipeline(InProcessTransport(endpoints, MessageRecorder(root / "messages")), cfg, root / "run",
                          expected=[d.name for d in dirs] + ["ghost"]).run()
    finally:
        top.removeHandler(handler)
        top.setLevel(level)
    return root, dirs, intact, report, records


def test_broken_silo_is_named_in_the_report(broken_run):
    root, dirs, intact, report, records = broken_run
    assert sorted(report["active"]) == sorted([dirs[0].name, dirs[3].name])
    assert report["dropped"] == [
        {"domain": dirs[1].name, "stage": "handshake", "reason": error_text(101)},
        {"domain": dirs[2].name, "stage": "handshake", "reason": error_text(101)},
        {"domain": "ghost", "stage": "handshake", "reason": "expected silo did not answer the handshake"}]
    on_disk = json.loads((root / "run" / "report.json").read_text())
    assert on_disk["dropped"] == report["dropped"]
    assert exit_status(report, [d.name for d in dirs]) == 3
    assert exit_status({"active": ["a", "b"], "dropped": []}, ["a", "b"]) == 0


def test_error_text_is_the_code_and_a_fixed_template():
    """What the server keeps of an error reply: its code and a fixed text, whatever the reply's own text says."""
    assert error_text(101) == "silo error 101: data error at the silo (details in the silo's own log)"
    assert error_text(5, flower=True) == "Flower error 5: node unavailable"
    assert error_text(101, flower=True).startswith("Flower error 101: data error")
    assert error_text(10**12) == error_text("x" * 10**6) == "silo error -1: error reply"


def test_full_error_text_stays_in_the_silo_log(broken_run):
    """The detail is in the silo's own errors.log (its state folder); its console lines name the file only."""
    root, dirs, intact, report, records = broken_run
    assert "must have exactly one item" in (root / "state" / dirs[1].name / "errors.log").read_text()
    assert "ZZZ-U99999" in (root / "state" / dirs[2].name / "errors.log").read_text()
    silo_side = [r.getMessage() for r in records if r.name.startswith("clients")]
    assert any("data error in val.json" in m for m in silo_side)
    assert not any("ZZZ-U99999" in m or "must have exactly one item" in m for m in silo_side)
    assert not (root / "run" / "errors.log").exists()


def test_no_user_data_in_any_log_or_run_file(broken_run):
    root, dirs, intact, report, records = broken_run
    console = "\n".join(r.getMessage() for r in records)  # server and silos: all of it is flwr-run.log in simulation
    texts = [("console log", console, {})]
    for name in ("report.json", "checkpoint.json", "report.md"):
        texts.append((name, (root / "run" / name).read_text(), {}))
    texts += list(recorded_messages(root / "messages"))
    assert any(m[0].split("-")[1] == "error" for m in texts[4:]), "the error reply was not recorded"
    n, findings = find_leaks(texts, [dirs[0], *intact, dirs[3]])
    assert not findings, findings[:5]
    assert not [label for label, text, _ in texts if "ZZZ-U99999" in text]  # the broken silo's extra user key


def test_requests_for_metrics_of_too_few_users_are_refused():
    """A curious server cannot ask a silo for metrics (test, validation or per-epoch) over fewer users than an
    aggregate needs: an evaluation request names no users at all (the silo's own policy picks them; a request
    that tries, with max_users or a seed, is refused), and fine-tuning validates on at least 5."""
    from flwr.app import ConfigRecord

    from common.protocol.messages import MIN_USERS_FOR_METRICS, BaseSpec, ContractError, EvaluateRequest, FinetuneRequest
    from common.protocol.messages import decode, encode

    spec = BaseSpec(backbone=BackboneConfig(), seed=0, fingerprint="0" * 64)
    content = encode(EvaluateRequest(base=spec, models=["m"]), {"m": {}})
    decode(content, EvaluateRequest)
    for extra in ({"max_users": MIN_USERS_FOR_METRICS - 1}, {"max_users": MIN_USERS_FOR_METRICS}, {"seed": 7}):
        h = json.loads(content.config_records["header"]["json"])  # what a curious server could send
        content["header"] = ConfigRecord({"type": "EvaluateRequest", "json": json.dumps({**h, **extra})})
        with pytest.raises(ContractError, match="an unexpected field"):
            decode(content, EvaluateRequest)
    FinetuneRequest(base=spec, train=TrainConfig(val_max_users=MIN_USERS_FOR_METRICS))
    with pytest.raises(ValueError, match="val_max_users must be at least"):
        FinetuneRequest(base=spec, train=TrainConfig(val_max_users=1))
