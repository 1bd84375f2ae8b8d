"""The privacy checker itself (tests/privacy.py): every leak kind, injected into the real recorded messages of
an in-process run, must be caught; the untouched recording must pass."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.model.config import BackboneConfig, TrainConfig
from common.data.format import load_silo
from common.data.demo import make_demo
from common.model.coefficients import CoefficientConfig
from server.config import PipelineConfig
from server.pipeline import Pipeline
from server.transport import InProcessTransport, MessageRecorder

from helpers import make_tiny_encoder
from privacy import assert_no_user_data, find_leaks, recorded_messages


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real run (2 tiny demo silos): its recorded folder and the raw messages, in order."""
    root = tmp_path_factory.mktemp("privacy")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=2, n_items=50, n_users=40, seed=3)
    raw = []
    recorder = MessageRecorder(root / "messages")

    def observer(direction, silo, message_type, content):
        recorder(direction, silo, message_type, content)
        raw.append((direction, silo, message_type, content))

    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    cfg = PipelineConfig(backbone=bb, train=TrainConfig(epochs=1, batch_size=32, progress=False, warmup_steps=2),
                         coefficients=CoefficientConfig(steps=2, batch_size=8), baselines=["task_arithmetic"],
                         granularities=["task"], teacher_top_k=8, min_silos=2, retries=0, timeout_s=60)
    endpoints = {d.name: in_process_endpoint(SiloWorker(d.name, d, state_dir=root / "state" / d.name,
                                                        cache_dir=root / "cache")) for d in dirs}
    Pipeline(InProcessTransport(endpoints, observer), cfg, root / "run").run()
    silo = load_silo(dirs[0])
    secret = {"key": next(iter(json.loads((dirs[0] / "umap.json").read_text()))),
              "seq": next(list(s) for s in silo.train if len(s) >= 3), "users": silo.num_users}
    return root, dirs, raw, secret


def _copy(content) -> RecordDict:
    out = RecordDict()
    for k, v in content.items():
        out[k] = v
    return out


def _header(content) -> dict:
    return json.loads(content.config_records["header"]["json"])


def _with_header(content, update) -> RecordDict:
    out = _copy(content)
    h = _header(content)
    update(h)
    out["header"] = ConfigRecord({"type": content.config_records["header"]["type"], "json": json.dumps(h)})
    return out


def _rename_model(h, key):
    h["metrics"][key] = h["metrics"].pop(next(iter(h["metrics"])))


def _add(content, name, record) -> RecordDict:
    out = _copy(content)
    out[name] = record
    return out


def _arr(a) -> ArrayRecord:
    return ArrayRecord({"x": Array(np.ascontiguousarray(a))})


LEAKS = {
    "key as an EvaluateReply model name": lambda c, s: _with_header(c, lambda h: _rename_model(h, s["key"])),
    "key in an extra config record": lambda c, s: _add(c, "note", ConfigRecord({"who": f"user {s['key']}"})),
    "key as a metric record key": lambda c, s: _add(c, "m", MetricRecord({s["key"]: 1.0})),
    "key in a string array": lambda c, s: _add(c, "arrays.k", _arr(np.array([s["key"]]))),
    "sequence as 1-D int32": lambda c, s: _add(c, "arrays.x", _arr(np.array(s["seq"], np.int32))),
    "sequence as float32": lambda c, s: _add(c, "arrays.x", _arr(np.array(s["seq"], np.float32))),
    "sequence as a padded int64 row": lambda c, s: _add(c, "arrays.x", _arr(
        np.array([[-1] * 3 + s["seq"], [-1] * (3 + len(s["seq"]))], np.int64))),
    "sequence as a 3-D float64 row": lambda c, s: _add(c, "arrays.x", _arr(
        np.array(s["seq"], np.float64).reshape(1, 1, -1))),
    "sequence as a header string": lambda c, s: _with_header(
        c, lambda h: h.__setitem__("domain", ",".join(map(str, s["seq"])))),
    "sequence as a header float list": lambda c, s: _with_header(
        c, lambda h: h.__setitem__("x", [float(v) for v in s["seq"]])),
    "sequence as JSON inside a header string": lambda c, s: _with_header(
        c, lambda h: h.__setitem__("x", json.dumps({"h": json.dumps(s["seq"])}))),
    "sequence in a metric record list": lambda c, s: _add(c, "m", MetricRecord({"x": [float(v) for v in s["seq"]]})),
    "sequence as bytes in a config record": lambda c, s: _add(
        c, "b", ConfigRecord({"b": np.array(s["seq"], np.int32).tobytes()})),
    "per-user score array": lambda c, s: _add(c, "arrays.x", _arr(np.zeros(s["users"], np.float32))),
    "per-user score array, transposed": lambda c, s: _add(c, "arrays.x", _arr(np.zeros((1, s["users"]), np.float16))),
    "per-user list in the header": lambda c, s: _with_header(c, lambda h: h.__setitem__("x", [0.5] * s["users"])),
}


def test_clean_recording_passes(recorded):
    root, dirs, raw, _ = recorded
    types = {p.name.split("-")[2] for p in (root / "messages").glob("*.json")}
    assert types == {"query.handshake", "train.finetune", "query.teacher", "evaluate.merged"}
    assert assert_no_user_data(recorded_messages(root / "messages"), dirs) >= 16


@pytest.mark.parametrize("kind", sorted(LEAKS))
def test_injected_leak_is_caught(recorded, tmp_path, kind):
    """The leak is put into a real reply (an EvaluateReply) and the whole recording is checked again."""
    root, dirs, raw, secret = recorded
    folder = tmp_path / "messages"
    shutil.copytree(root / "messages", folder)
    direction, silo, message_type, content = next(m for m in raw if m[0] == "up" and m[2] == "evaluate.merged")
    MessageRecorder(folder)(direction, silo, message_type, LEAKS[kind](content, secret))
    n, findings = find_leaks(recorded_messages(folder), dirs)
    assert findings, f"{kind}: not caught"
    with pytest.raises(AssertionError, match="leak"):
        assert_no_user_data(recorded_messages(folder), dirs)


def test_leak_in_error_text_is_caught(recorded, tmp_path):
    root, dirs, raw, secret = recorded
    MessageRecorder(tmp_path)("error", "x", "train.finetune", f"val.json: user {secret['key']!r} has {secret['seq']}")
    n, findings = find_leaks(recorded_messages(tmp_path), dirs)
    assert n == 1 and len(findings) == 2
