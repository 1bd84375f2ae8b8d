"""Hostile replies to the training messages that test_hostile_replies.py does not cover: a FedAvg round
(FedRoundReply, server/fedavg.py), a weaving hop (WeaveReply, server/weaving.py) and X-Cross gate tuning
(GateTuneReply, server/integration_stage.py). One silo's reply is corrupted after it is encoded, through the real
message path (in-process transport, real silos on the session's demo data): numbers out of range or inconsistent
with the request or the handshake, NaN / Inf / wrong-shape / huge-norm arrays. Each is refused with a reason the
server wrote (never a text the silo sent), the silo is dropped (FedAvg, gate tuning) or out of the weave, and the
honest silos go on."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

from clients.client_app import in_process_endpoint
from clients.silo import EVAL_LEDGER, SiloWorker
from common.model.coefficients import CoefficientConfig
from common.model.config import BackboneConfig, TrainConfig
from common.model.integration import IntegratedRecommender
from server.config import FedAvgConfig, PipelineConfig
from server.integration_stage import parameters
from server.pipeline import Pipeline, PipelineError
from server.transport import InProcessTransport

from corrupt import arrays as _arrays
from corrupt import header as _header
from corrupt import set_field as _set
from corrupt import users as _users

BAD = "kitchen"  # the hostile silo; garden and outdoor are honest
PLANTED = "PLANTED"  # a value only the hostile silo wrote: no reason, report or log line may repeat it
RANK = 4


def _cfg(world, **kw) -> PipelineConfig:
    root, enc, _ = world
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    base = dict(backbone=bb, train=TrainConfig(epochs=1, batch_size=32, warmup_steps=2, val_max_users=10),
                coefficients=CoefficientConfig(steps=3, batch_size=8), baselines=["task_arithmetic"],
                granularities=["task"], evaluate_finetuned=False, teacher_top_k=8, min_silos=2, retries=1,
                timeout_s=60)
    return PipelineConfig(**{**base, **kw})


def _fedavg_cfg(world) -> PipelineConfig:
    return _cfg(world, strategy="fedavg", fedavg=FedAvgConfig(rounds=1))


def _lora_cfg(world) -> PipelineConfig:
    train = TrainConfig(epochs=1, batch_size=32, warmup_steps=2, finetune="lora", lora_rank=RANK)
    return _cfg(world, train=train, weave_rounds=1, weave_epochs=1)


def _transport(world, state, message_type=None, corrupt=None) -> InProcessTransport:
    root, _, dirs = world
    endpoints = {}
    for d in dirs:
        fn = in_process_endpoint(SiloWorker(d.name, d, state_dir=state / d.name, cache_dir=root / "cache"))
        if corrupt is not None and d.name == BAD:
            fn = (lambda fn: lambda mt, c: corrupt(fn(mt, c)) if mt == message_type else fn(mt, c))(fn)
        endpoints[d.name] = fn
    return InProcessTransport(endpoints)


# ------------------------------------------------------------------------------------------ corruptions


def _metric(field, key, value):
    """`h[field]`'s metric `key` set to `value` (None: removed)."""
    def update(h):
        if value is None:
            h[field]["values"].pop(key)
        else:
            h[field]["values"][key] = value
    return _header(update)


def _drop_group(group):
    def corrupt(c):
        out = RecordDict()
        for k, v in c.items():
            if k != f"arrays.{group}":
                out[k] = v
        return out
    return corrupt


def _first(named, fn, suffix=""):
    n = sorted(k for k in named if k.endswith(suffix))[0]
    named[n] = fn(named[n])


def _common(group, suffix=""):
    """Corruptions of a reply's array group (task-vector-like: float32, the model's names and shapes)."""
    one = lambda fn: _arrays(group, lambda t: _first(t, fn, suffix))  # noqa: E731
    return {
        f"{group} NaN": one(lambda a: np.full_like(a, np.nan)),
        f"{group} Inf": one(lambda a: np.full_like(a, np.inf)),
        f"{group} huge norm": one(lambda a: np.full_like(a, 1e18)),
        f"{group} wrong shape": one(lambda a: np.zeros((a.shape[0] + 1, *a.shape[1:]), np.float32)),
        f"{group} float64": one(lambda a: a.astype(np.float64)),
        f"{group} missing array": _arrays(group, lambda t: t.pop(sorted(t)[0])),
        f"{group} extra array": _arrays(group, lambda t: t.__setitem__("adaptor.weight.extra", np.zeros(3, np.float32))),
        f"no {group} group": _drop_group(group),
        "wrong domain": _set("domain", PLANTED),
        "wrong base fingerprint": _set("base_fingerprint", PLANTED),
        "seconds NaN": _set("seconds", math.nan),
        "seconds above a week": _set("seconds", 1e300),
        "extra header field": _set("note", PLANTED),
    }


def _assert_refused(reason: str) -> None:
    assert reason.startswith(("invalid reply", "malformed reply")), reason
    assert PLANTED not in reason, reason


# ------------------------------------------------------------------------------------------ FedAvg rounds
FED_ROUND = {
    **_common("update"),
    "round differs from the request's": _set("round", 7),
    "epochs above the request's": _set("epochs", 5),
    "users above the handshake's": _set("users", 10**6),
    "users 0 after training": _set("users", 0),
    "val users above the handshake's": _users("val", 10**6),
    "val NaN": _metric("val", "ndcg@10", math.nan),
    "val 1.5": _metric("val", "recall@10", 1.5),
    "val huge": _metric("val", "ndcg@50", 1e300),
    "val metric missing": _metric("val", "recall@50", None),
    "val metric not asked": _metric("val", "recall@7", 0.1),
    "loss Inf": _set("loss", math.inf),
    "loss 1e30": _set("loss", 1e30),
}


@pytest.mark.parametrize("name", sorted(FED_ROUND))
def test_hostile_round_reply_drops_only_that_silo(world, tmp_path, name):
    cfg = _fedavg_cfg(world)
    p = Pipeline(_transport(world, tmp_path / "state", "train.round", FED_ROUND[name]), cfg, tmp_path / "run")
    report = p.run()
    assert [(d["domain"], d["stage"]) for d in report["dropped"]] == [(BAD, "fedavg")], report["dropped"]
    _assert_refused(report["dropped"][0]["reason"])
    assert sorted(report["active"]) == ["garden", "outdoor"]
    rounds = p.state.fedavg.rounds
    assert set(rounds[1].users) == {"garden", "outdoor"}  # the round averaged over the honest silos only
    assert all(set(r.val) == {"garden", "outdoor"} for r in rounds)
    assert all(torch.isfinite(t).all() for t in p.fed.round_model(1).values())
    assert sorted(report["metrics"]) == ["garden", "outdoor"] and "fedavg" in report["metrics"]["garden"]
    assert PLANTED not in (tmp_path / "run" / "report.json").read_text()


# ------------------------------------------------------------------------------------------ weaving hops
WEAVE = {
    **_common("lora", "lora_B"),
    "round differs from the request's": _set("round", 7),
    "module differs from the request's": _set("module", PLANTED),
    "another silo's module": _set("module", "outdoor"),
    "epochs above the request's": _set("epochs", 5),
}


@pytest.fixture(scope="module")
def lora_finetuned(world, tmp_path_factory):
    """A run directory after LoRA fine-tuning of the 3 silos (each case weaves from a copy of it)."""
    root = tmp_path_factory.mktemp("hostile-weave")
    p = Pipeline(_transport(world, root / "state"), _lora_cfg(world), root / "run")
    p.handshake()
    p.finetune()
    return root


def test_a_finetuning_spends_one_validation_evaluation(world, lora_finetuned):
    """Its reply's val and history are aggregates of the held-out users: one "val" evaluation of the budget."""
    for d in world[2]:
        ledger = json.loads((lora_finetuned / "state" / d.name / EVAL_LEDGER).read_text())
        assert list(ledger.values()) == [{"val": 1}]


@pytest.mark.parametrize("name", sorted(WEAVE))
def test_hostile_weave_reply_takes_that_silo_out_of_the_weave(world, lora_finetuned, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(lora_finetuned / "run", run)
    p = Pipeline(_transport(world, lora_finetuned / "state", "train.weave", WEAVE[name]), _lora_cfg(world), run)
    p.handshake()
    p.weave()
    st = p.state.weave
    assert [(s.domain, s.round, s.module) for s in st.skipped] == [(BAD, 1, "garden")], st.skipped
    _assert_refused(st.skipped[0].reason)
    # the honest silos took every hop: garden's module went on to outdoor, the others moved as planned
    assert sorted((h.module, h.silo) for h in st.hops) == [("garden", "outdoor"), ("kitchen", "outdoor"),
                                                           ("outdoor", "garden")]
    assert st.rounds == 1 and "weave" in p.state.completed and p.state.dropped == []
    for d in ("garden", "kitchen", "outdoor"):
        woven = p.rundir.read_arrays(p.rundir.woven(d))
        assert all(np.isfinite(a).all() for a in woven.values()), d
    assert PLANTED not in (run / "checkpoint.json").read_text()


# ------------------------------------------------------------------------------------------ gate tuning
GATES = {
    "epochs above the request's": _set("epochs", 5),
    "before users above the handshake's": _users("before", 10**6),
    "after users above the handshake's": _users("after", 10**6),
    "before and after over different users": _users("after", 5),
    "before and after users above the handshake's": lambda c: _users("before", 10**6)(_users("after", 10**6)(c)),
    "before NaN": _metric("before", "ndcg@10", math.nan),
    "after 1.5": _metric("after", "recall@10", 1.5),
    "after huge": _metric("after", "ndcg@50", 1e300),
    "after Inf": _metric("after", "ndcg@5", math.inf),
    "before metric missing": _metric("before", "recall@50", None),
    "after metric not asked": _metric("after", "recall@7", 0.1),
    "wrong domain": _set("domain", PLANTED),
    "another silo's domain": _set("domain", "garden"),
    "seconds NaN": _set("seconds", math.nan),
    "seconds above a week": _set("seconds", 1e300),
    "extra header field": _set("note", PLANTED),
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_hostile_gate_reply_drops_that_silo(world, tmp_path, name):
    p = Pipeline(_transport(world, tmp_path / "state", "train.gates", GATES[name]), _cfg(world), tmp_path / "run")
    p.handshake()
    model = IntegratedRecommender.from_states(p.base.model, p.base.state, [p.base.state, p.base.state], 0)
    integrated = parameters(model)
    train = TrainConfig(epochs=1, batch_size=16, warmup_steps=1, refit_on_val=False, val_max_users=None)
    with pytest.raises(PipelineError, match=f"silo {BAD} did not tune the gates"):
        p.xcross.tune_gates_at(BAD, integrated, 0.5, train)
    assert [(d.domain, d.stage) for d in p.state.dropped] == [(BAD, "tune_gates")]
    _assert_refused(p.state.dropped[0].reason)
    honest = p.xcross.tune_gates_at("garden", integrated, 0.5, train)  # the run goes on with the honest silos
    assert honest.domain == "garden" and honest.before.users == honest.after.users <= p.base.users["garden"]
    assert sorted(p.active()) == ["garden", "outdoor"]
