"""Federated averaging (strategy = fedavg, server/fedavg.py) through the in-process transport on the session's demo
silos: the averaging step by hand, rounds and their checkpoint, the shipped round, a silo dropped mid-round, a
server killed mid-round, the hybrid, and no user data in any message."""

from __future__ import annotations

import json

import pytest
import torch

from clients.client_app import in_process_endpoint
from clients.silo import EVAL_LEDGER, SiloWorker
from common.model.config import BackboneConfig, TrainConfig
from common.model.coefficients import CoefficientConfig
from common.model.integration import IntegrationConfig
from common.protocol.eval_policy import EvalPolicy
from common.protocol.messages import BUDGET_ERROR_CODE, error_text
from server.config import FedAvgConfig, PipelineConfig
from server.fedavg import average
from server.pipeline import Pipeline, PipelineError
from server.transport import InProcessTransport, MessageRecorder

from privacy import assert_no_user_data, recorded_messages


def _cfg(world, **kw) -> PipelineConfig:
    root, enc, _ = world
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    base = dict(backbone=bb, train=TrainConfig(epochs=1, batch_size=32, warmup_steps=2, val_max_users=10),
                coefficients=CoefficientConfig(steps=4, batch_size=8), baselines=["task_arithmetic"],
                granularities=["task"], teacher_top_k=8, timeout_s=60, strategy="fedavg",
                fedavg=FedAvgConfig(rounds=2))
    return PipelineConfig(**{**base, **kw})


def _transport(world, tmp, calls=None, broken=None, observer=None, policies=None):
    root, _, dirs = world
    endpoints = {}
    for d in dirs:
        fn = in_process_endpoint(SiloWorker(d.name, d, state_dir=tmp / "state" / d.name, cache_dir=root / "cache",
                                            policy=(policies or {}).get(d.name)))
        if broken and d.name in broken:
            fn = broken[d.name](fn)
        endpoints[d.name] = fn

    def observe(direction, silo, message_type, content):
        if calls is not None and direction == "down":
            calls.append((silo, message_type))
        if observer is not None:
            observer(direction, silo, message_type, content)

    return InProcessTransport(endpoints, observe)


def test_average_is_the_user_weighted_mean_of_the_updates():
    theta = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    updates = {"a": {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0])},
               "c": {"w": torch.tensor([0.0, 3.0]), "b": torch.tensor([-1.0])}}
    got = average(theta, updates, {"a": 30, "c": 10})
    torch.testing.assert_close(got["w"], torch.tensor([1.0 + 0.75, 2.0 + 0.75]))
    torch.testing.assert_close(got["b"], torch.tensor([0.5 + 1.5 - 0.25]))
    got = average(theta, {"a": updates["a"]}, {"a": 30, "c": 10})  # c dropped: renormalised over a alone
    torch.testing.assert_close(got["w"], torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="no silo"):
        average(theta, updates, {"a": 0, "c": 0})


def test_fedavg_rounds_are_stored_averaged_and_the_best_round_is_shipped(world, tmp_path):
    calls = []
    rec = MessageRecorder(tmp_path / "messages")
    p = Pipeline(_transport(world, tmp_path, calls, observer=rec), _cfg(world), tmp_path / "run")
    report = p.run()
    kinds = {m for _, m in calls}
    assert "train.finetune" not in kinds and "query.teacher" not in kinds  # FedAvg from the base: no merging
    # 2 training rounds + the validation-only call for the last model, to every silo
    assert sorted(calls).count(("garden", "train.round")) == 3
    fed = p.state.fedavg
    assert [r.round for r in fed.rounds] == [0, 1, 2] and fed.init == "base"
    assert all(len(r.val) == 3 for r in fed.rounds)  # every model scored on every silo's held-out users
    assert all(set(r.users) == {"garden", "kitchen", "outdoor"} and min(r.users.values()) > 0 for r in fed.rounds[1:])
    torch.testing.assert_close(p.fed.round_model(0)["adaptor.weight"], p.base.state["adaptor.weight"])
    assert any(not torch.equal(p.fed.round_model(2)[n], p.fed.round_model(1)[n]) for n in p.base.state)
    means = {r.round: sum(m["values"]["ndcg@10"] for m in r.val.values()) / 3 for r in fed.rounds}
    assert means[fed.chosen] == max(means.values())
    assert set(report["metrics"]["garden"]) == {"pretrained", "fedavg"}
    assert report["selection"]["chosen"] == "fedavg" and report["strategy"] == "fedavg"
    assert "Federated rounds" in (tmp_path / "run" / "report.md").read_text()
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "federated averaging" in card and f"Round {fed.chosen} is shipped" in card
    assert_no_user_data(recorded_messages(tmp_path / "messages"), world[2])
    # every round is one validation evaluation of each silo's budget (the final validation-only one too): 3, and
    # the evaluate stage's selection scores the shipped candidate once more on validation
    for d in world[2]:
        assert list(_ledger(tmp_path, d.name).values()) == [{"val": 3 + 1, "test": 2}]


def _ledger(tmp_path, domain: str) -> dict:
    return json.loads((tmp_path / "state" / domain / EVAL_LEDGER).read_text())


def _round_of(content) -> int:
    return json.loads(content["header"]["json"])["round"]


def test_a_silo_dropped_mid_round_leaves_the_round_to_the_others(world, tmp_path):
    def fails_in_round_two(fn):
        def wrapped(message_type, content):
            if message_type == "train.round" and _round_of(content) == 2:
                raise RuntimeError("silo lost its disk")
            return fn(message_type, content)
        return wrapped

    p = Pipeline(_transport(world, tmp_path, broken={"kitchen": fails_in_round_two}), _cfg(world), tmp_path / "run")
    report = p.run()
    assert [(d["domain"], d["stage"]) for d in report["dropped"]] == [("kitchen", "fedavg")]
    rounds = p.state.fedavg.rounds
    assert set(rounds[1].users) == {"garden", "kitchen", "outdoor"}
    assert set(rounds[2].users) == {"garden", "outdoor"}  # averaged over the two that answered, renormalised
    assert "kitchen" not in report["metrics"]


def test_a_silo_refuses_rounds_beyond_its_evaluation_budget(world, tmp_path):
    """A round returns the received model's validation aggregate: each one spends an evaluation of the silo's
    budget, so rounds (validation-only ones included) are no unlimited evaluation oracle. kitchen (eval-budget 3)
    answers rounds 1-3 and refuses the 4th with the budget code; it is dropped, named, and the run goes on."""
    tight = {"kitchen": EvalPolicy(budget=3)}
    p = Pipeline(_transport(world, tmp_path, policies=tight), _cfg(world, fedavg=FedAvgConfig(rounds=4)),
                 tmp_path / "run")
    report = p.run()
    assert report["dropped"] == [{"domain": "kitchen", "stage": "fedavg", "reason": error_text(BUDGET_ERROR_CODE)}]
    assert "eval-budget" in report["dropped"][0]["reason"]
    rounds = p.state.fedavg.rounds
    assert [set(r.users) for r in rounds[1:]] == [{"garden", "kitchen", "outdoor"}] * 3 + [{"garden", "outdoor"}]
    assert list(_ledger(tmp_path, "kitchen").values()) == [{"val": 3}]
    assert sorted(report["metrics"]) == ["garden", "outdoor"]


def test_rounds_beyond_every_silos_budget_stop_the_run_with_one_clear_line(world, tmp_path):
    everyone = {d.name: EvalPolicy(budget=2) for d in world[2]}
    with pytest.raises(PipelineError) as err:
        Pipeline(_transport(world, tmp_path, policies=everyone), _cfg(world, fedavg=FedAvgConfig(rounds=3)),
                 tmp_path / "run").run()
    msg = str(err.value)
    assert "\n" not in msg and "at fedavg" in msg and "eval-budget" in msg, msg


def test_a_server_killed_mid_round_resumes_after_the_last_stored_round(world, tmp_path):
    class Killed(Exception):
        pass

    class Dying(InProcessTransport):  # the server process dies as round 2 is sent (not a silo failure)
        def call(self, message_type, requests, reply_type, timeout, on_reply=None):
            if message_type == "train.round" and any(h.round == 2 for h, _ in requests.values()):
                raise Killed()
            return super().call(message_type, requests, reply_type, timeout, on_reply)

    first = _transport(world, tmp_path)
    with pytest.raises(Killed):
        Pipeline(Dying(first.endpoints), _cfg(world), tmp_path / "run").run()
    calls = []
    p = Pipeline(_transport(world, tmp_path, calls), _cfg(world), tmp_path / "run")
    p.run()
    assert [r.round for r in p.state.fedavg.rounds] == [0, 1, 2]
    # round 1 is not trained again: only round 2 and the final validation reach each silo
    assert sorted(calls).count(("garden", "train.round")) == 2


def test_hybrid_starts_from_the_best_merged_candidate(world, tmp_path):
    p = Pipeline(_transport(world, tmp_path), _cfg(world, fedavg=FedAvgConfig(rounds=1, init="merged")),
                 tmp_path / "run")
    report = p.run()
    fed = p.state.fedavg
    assert fed.init in ("mergerec-task", "task_arithmetic")
    assert fed.init_val[fed.init] == max(fed.init_val.values())
    merged = {**p.merges.mergerec_states(), **p.merges.merged_states()}[fed.init]
    assert all(torch.equal(p.fed.round_model(0)[n], merged[n]) for n in merged)
    assert {"mergerec-task", "task_arithmetic", "hybrid"} <= set(report["metrics"]["garden"])
    assert report["selection"]["chosen"] == "hybrid"


def test_fedavg_config_is_checked_before_any_silo(world):
    with pytest.raises(ValueError, match="finetune = full"):
        _cfg(world, train=TrainConfig(finetune="lora", val_max_users=10))
    with pytest.raises(ValueError, match="val-max-users"):
        _cfg(world, train=TrainConfig(val_max_users=None))
    with pytest.raises(ValueError, match="fedavg-init = merged"):
        _cfg(world, integration=IntegrationConfig(kind="xcross"))
