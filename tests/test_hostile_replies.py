"""Hostile replies through the real message path (in-process transport, real silos, one silo's reply corrupted
after it is encoded). Each must drop only that silo, with the stage and reason in report.json, while the run
finishes with the other two; a resume afterwards works. Numbers out of their documented range (docs/design.md,
"Message checks") are hostile replies too. An error reply (test_error_reply_names_only_its_sender) drops its
sender, whatever silo its text names, and only its code and fixed text are kept.

Fine-tuning is shared: a module fixture fine-tunes the 3 silos once (and one more runs through the
coefficients); each case copies the run directory of the stage before the one under test."""

from __future__ import annotations

import json
import logging
import math
import shutil

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.model.config import BackboneConfig, TrainConfig
from common.data.demo import make_demo
from common.model.coefficients import CoefficientConfig
from common.protocol.messages import SiloReplyError, error_text
from server.config import PipelineConfig
from server.pipeline import Pipeline
from server.transport import InProcessTransport

from corrupt import arrays as _arrays
from corrupt import copy_record as _copy
from corrupt import header as _header
from corrupt import set_field as _set

from helpers import make_tiny_encoder

BAD = "kitchen"  # the hostile silo; garden and outdoor are honest


def _cfg(enc, root) -> PipelineConfig:
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    return PipelineConfig(backbone=bb, train=TrainConfig(epochs=1, batch_size=32, progress=False, warmup_steps=2),
                          coefficients=CoefficientConfig(steps=3, batch_size=8), baselines=["task_arithmetic"],
                          granularities=["task"], evaluate_finetuned=False, teacher_top_k=8, min_silos=2,
                          retries=1, timeout_s=60)


def _transport(world, corrupt=None, stage_type=None, observer=None) -> InProcessTransport:
    root, enc, dirs = world
    endpoints = {}
    for d in dirs:
        fn = in_process_endpoint(SiloWorker(d.name, d, state_dir=root / "state" / d.name, cache_dir=root / "cache"))
        if corrupt is not None and d.name == BAD:
            fn = (lambda fn: lambda mt, c: corrupt(fn(mt, c)) if mt == stage_type else fn(mt, c))(fn)
        endpoints[d.name] = fn
    return InProcessTransport(endpoints, observer)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=3, n_items=40, n_users=30, seed=2)
    w = (root, enc, dirs)
    p = Pipeline(_transport(w), _cfg(enc, root), root / "after-finetune")
    p.handshake()
    p.finetune()
    shutil.copytree(root / "after-finetune", root / "after-coefficients")
    p = Pipeline(_transport(w), _cfg(enc, root), root / "after-coefficients")
    p.handshake()
    for stage in ("merge_init", "pseudo_users", "teacher", "coefficients"):
        getattr(p, stage)()
    return w


# ------------------------------------------------------------------------------------------ corruptions


def _add(name, record):
    def corrupt(c):
        out = _copy(c)
        out[name] = record
        return out
    return corrupt


def _first(named, fn):
    n = sorted(named)[0]
    named[n] = fn(named[n])


def _nan_metric(h):
    h["metrics"][next(iter(h["metrics"]))]["values"]["ndcg@10"] = math.nan


def _extra_metric(h):
    h["metrics"][next(iter(h["metrics"]))]["values"]["recall@7"] = 0.1


def _unasked_model(h):
    h["metrics"]["never-asked"] = next(iter(h["metrics"].values()))


def _missing_model(h):
    h["metrics"].pop(next(iter(h["metrics"])))


def _metric(value):
    def update(h):
        h["metrics"][next(iter(h["metrics"]))]["values"]["ndcg@10"] = value
    return update


def _evaluate_users(h):
    h["metrics"][next(iter(h["metrics"]))]["users"] = 10**9


def _history(key, value):
    return _header(lambda h: h["history"][-1].__setitem__(key, value))


def _val_users(h):
    h["val"]["users"] = 10**9


def _teacher_value(v):
    def update(t):
        t["values"][0, 0 if v > 0 else -1] = v  # the row stays sorted descending
    return update


def _too_big_k(named):
    for n, fill in (("indices", 0), ("values", -1.0)):
        named[n] = np.concatenate([named[n], np.full((named[n].shape[0], 40), fill, named[n].dtype)], axis=1)


HANDSHAKE = {
    "catalog fingerprint mismatch": _set("catalog_fingerprint", "0" * 64),
    "num_items differs from the catalog": _set("num_items", 7),
    "extra array group": _add("arrays.extra", ArrayRecord({"x": Array(np.zeros(3, np.float32))})),
}
FINETUNE = {
    "task vector NaN": _arrays("task_vector", lambda t: _first(t, lambda a: np.where(a == a, np.nan, a))),
    "task vector Inf": _arrays("task_vector", lambda t: _first(t, lambda a: np.full_like(a, np.inf))),
    "task vector huge finite": _arrays("task_vector", lambda t: _first(t, lambda a: np.full_like(a, 3e38))),
    "task vector wrong shape": _arrays("task_vector", lambda t: _first(t, lambda a: a.reshape(-1)[:-1].copy())),
    "task vector float64": _arrays("task_vector", lambda t: _first(t, lambda a: a.astype(np.float64))),
    "task vector extra array": _arrays("task_vector", lambda t: t.__setitem__("extra", np.zeros(3, np.float32))),
    "extra array group": _add("arrays.extra", ArrayRecord({"x": Array(np.zeros(3, np.float32))})),
    "extra config record": _add("note", ConfigRecord({"x": "y"})),
    "extra metric record": _add("m", MetricRecord({"x": 1.0})),
    "wrong base fingerprint": _set("base_fingerprint", "0" * 64),
    "wrong domain (blames another silo)": _set("domain", "garden"),
    "seconds NaN": _set("seconds", math.nan),
    "seconds Inf": _set("seconds", math.inf),
    "seconds negative": _set("seconds", -1.0),
    "seconds above a week": _set("seconds", 1e300),
    "epochs above the request's": _set("epochs", 5),
    "refit_epochs above the request's": _set("refit_epochs", 5),
    "history epoch above the request's": _history("epoch", 9),
    "history val NDCG 1.5": _history("val_ndcg10", 1.5),
    "history loss 1e30": _history("loss", 1e30),
    "validation metric 1.5": _header(lambda h: h["val"]["values"].__setitem__("recall@10", 1.5)),
    "validation users 10**9": _header(_val_users),
    "extra header field": _set("note", "x"),
}
TEACHER = {
    "values NaN": _arrays("teacher", lambda t: t["values"].__setitem__((0, 0), np.nan)),
    "values Inf": _arrays("teacher", lambda t: t["values"].__setitem__((0, 0), np.inf)),
    "value 6e4 (not a cosine)": _arrays("teacher", _teacher_value(6e4)),
    "value -6e4 (not a cosine)": _arrays("teacher", _teacher_value(-6e4)),
    "values unsorted": _arrays("teacher", lambda t: t.__setitem__("values", t["values"][:, ::-1].copy())),
    "duplicate indices": _arrays("teacher", lambda t: t["indices"].__setitem__((0, 1), t["indices"][0, 0])),
    "k > items": lambda c: _set("k", 48)(_arrays("teacher", _too_big_k)(c)),
    "values float32 (not the wire's float16)": _arrays("teacher", lambda t: t.__setitem__(
        "values", t["values"].astype(np.float32))),
    "indices int64 (not the wire's uint16)": _arrays("teacher", lambda t: t.__setitem__(
        "indices", t["indices"].astype(np.int64))),
    "index out of range": _arrays("teacher", lambda t: t["indices"].__setitem__((0, 0), 60000)),
    "wrong shape": _arrays("teacher", lambda t: t.update(indices=t["indices"][1:], values=t["values"][1:])),
    "wrong num_items": _set("num_items", 41),
    "wrong domain": _set("domain", "outdoor"),
    "extra array group": _add("arrays.extra", ArrayRecord({"x": Array(np.zeros(3, np.float32))})),
}
EVALUATE = {
    "unasked model": _header(_unasked_model),
    "missing model": _header(_missing_model),
    "extra metric key": _header(_extra_metric),
    "NaN metric": _header(_nan_metric),
    "metric 1.5": _header(_metric(1.5)),
    "users 10**9 (more than the silo has)": _header(_evaluate_users),
    "wrong domain": _set("domain", "garden"),
    "extra metric record": _add("m", MetricRecord({"x": 1.0})),
}
CASES = ([("handshake", "query.handshake", k, v) for k, v in HANDSHAKE.items()]
         + [("finetune", "train.finetune", k, v) for k, v in FINETUNE.items()]
         + [("teacher", "query.teacher", k, v) for k, v in TEACHER.items()]
         + [("evaluate", "evaluate.merged", k, v) for k, v in EVALUATE.items()])


def _start(world, tmp_path, stage):
    """A copy of the shared run directory, ready for `stage` (for fine-tuning: the bad silo's result removed)."""
    root = world[0]
    run = tmp_path / "run"
    shutil.copytree(root / ("after-coefficients" if stage == "evaluate" else "after-finetune"), run)
    if stage == "finetune":
        (run / "task_vectors" / f"{BAD}.safetensors").unlink()
        ck = json.loads((run / "checkpoint.json").read_text())
        ck["completed"].remove("finetune")
        ck["val"].pop(BAD)
        ck["finetune"].pop(BAD)
        ck["files"].pop(f"task_vectors/{BAD}.safetensors")
        (run / "checkpoint.json").write_text(json.dumps(ck))
    return run


@pytest.mark.parametrize("stage,message_type,name,corrupt", CASES, ids=[f"{c[0]}: {c[2]}" for c in CASES])
def test_hostile_reply_drops_only_that_silo(world, tmp_path, stage, message_type, name, corrupt):
    root, enc, dirs = world
    run = _start(world, tmp_path, stage)
    report = Pipeline(_transport(world, corrupt, message_type), _cfg(enc, root), run).run()
    assert [(d["domain"], d["stage"]) for d in report["dropped"]] == [(BAD, stage)], report["dropped"]
    assert report["dropped"][0]["reason"].startswith(("invalid reply", "malformed reply"))
    assert sorted(report["active"]) == ["garden", "outdoor"]
    assert sorted(report["metrics"]) == ["garden", "outdoor"] and "mergerec-task" in report["metrics"]["garden"]
    on_disk = json.loads((run / "report.json").read_text())
    assert on_disk["dropped"] == report["dropped"] and on_disk["active"] == report["active"]
    sent = []
    again = Pipeline(_transport(world, observer=lambda dr, silo, mt, c: sent.append(mt)), _cfg(enc, root), run).run()
    assert again["dropped"] == report["dropped"] and again["metrics"] == report["metrics"]
    assert set(sent) == {"query.handshake"}  # resume: stored files re-checked and reused, nothing redone


# ------------------------------------------------------------------------------------------ error replies
def _error_reply(reason):
    def corrupt(c):
        raise SiloReplyError(101, reason)  # what the hostile silo's endpoint answers instead of its reply
    return corrupt


NAMES_GARDEN = "silo garden: data error in val.json (PLANTED)"  # blames an honest silo
HUGE = "silo garden: PLANTED " + "x" * 5_000_000  # 5 MB of text
ERRORS = [("handshake", "query.handshake", "names garden", _error_reply(NAMES_GARDEN)),
          ("handshake", "query.handshake", "5 MB", _error_reply(HUGE)),
          ("teacher", "query.teacher", "names garden", _error_reply(NAMES_GARDEN)),
          ("teacher", "query.teacher", "5 MB", _error_reply(HUGE))]


@pytest.mark.parametrize("stage,message_type,name,corrupt", ERRORS, ids=[f"{c[0]}: {c[2]}" for c in ERRORS])
def test_error_reply_names_only_its_sender(world, tmp_path, caplog, stage, message_type, name, corrupt):
    """A silo's error text is never read: the silo that sent it is dropped (by its handle and handshake domain),
    whatever silo the text names, and what is stored and logged is its code and a fixed, short text."""
    root, enc, dirs = world
    run = _start(world, tmp_path, stage)
    with caplog.at_level(logging.DEBUG):
        report = Pipeline(_transport(world, corrupt, message_type), _cfg(enc, root), run).run()
    assert report["dropped"] == [{"domain": BAD, "stage": stage, "reason": error_text(101)}]
    assert sorted(report["active"]) == ["garden", "outdoor"]
    assert sorted(report["metrics"]) == ["garden", "outdoor"]
    for f in ("report.json", "checkpoint.json", "report.md"):
        text = (run / f).read_text()
        assert "PLANTED" not in text and len(text) < 200_000, (f, len(text))
    logged = [r.getMessage() for r in caplog.records]
    assert not any("PLANTED" in m for m in logged)
    assert sum(map(len, logged)) < 200_000
