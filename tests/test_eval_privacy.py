"""The differencing attack on evaluation aggregates (issue 24), against the old protocol and the silo's own policy.

Old protocol (reimplemented here as it was): the server chose `max_users` and `seed` of every evaluation
request, and the silo scored `common.model.train._subsample(n, max_users, seed)`. 120 requests of 5 users with
seeds 0..119 and least squares over the subsets (rebuilt with that same function) recover every test user's
hit@10 exactly. New protocol: a request names no users, size or seed; the silo answers from its own fixed
subsample (common/protocol/eval_policy.py), so the same attack gets one number 120 times and its least-squares
estimate is that number for every user: the mean over the silo's fixed users, which is what docs/design.md
("What the server learns from metrics") says the server learns. Plus: the per-run budget and the noise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clients.client_app import in_process_endpoint
from clients.silo import EVAL_LEDGER, SiloWorker
from common.core.fingerprint import fingerprint
from common.data.demo import make_demo
from common.data.format import load_silo
from common.merging.task_vectors import state_to_numpy
from common.model.backbones import build_backbone, encode_all_items, shared_state
from common.model.config import BackboneConfig
from common.model.train import _subsample, evaluate
from common.protocol.eval_policy import EvalPolicy
from common.protocol.messages import (BUDGET_ERROR_CODE, EVALUATE, BaseSpec, EvaluateReply, EvaluateRequest,
                                      SiloReplyError, decode, encode, error_text)

from helpers import make_tiny_encoder

REQUESTS, SIZE = 120, 5


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One demo silo (40 users), the base model as the model under attack, and each test user's true hit@10."""
    root = tmp_path_factory.mktemp("evalpriv")
    enc = make_tiny_encoder(root / "enc")
    (folder,) = make_demo(root / "data", n_domains=1, n_items=60, n_users=40, seed=5)
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, dim=16, ff_mult=1, adaptor_hidden=8,
                        cache_dir=root / "cache")  # small: the attack sends 120 requests
    model = build_backbone(bb, seed=0).eval()
    spec = BaseSpec(backbone=bb, seed=0, fingerprint=fingerprint(shared_state(model)))
    silo = load_silo(folder)
    dom = model.domain_inputs(silo.catalog)
    histories, targets = silo.eval_split("test")
    items = encode_all_items(model, dom).detach()
    truth = np.array([evaluate(model, dom, [h], [t], item_embeddings=items)["recall@10"]
                      for h, t in zip(histories, targets)])
    assert 0 < truth.sum() < len(truth), "the attack needs users with and without a hit"
    weights = state_to_numpy(shared_state(model))
    return {"root": root, "folder": folder, "model": model, "spec": spec, "silo": silo, "dom": dom,
            "truth": truth, "weights": weights, "items": items}


def _least_squares(n: int, answers: list[float]) -> tuple[np.ndarray, int]:
    """The attacker's estimate of every user's hit@10 from the answers to seeds 0..len-1 (subsets rebuilt with the
    silo's old subsampling function), and the rank of the system."""
    a = np.zeros((len(answers), n))
    for seed in range(len(answers)):
        a[seed, _subsample(n, SIZE, seed).numpy()] = 1.0 / SIZE
    return np.linalg.lstsq(a, np.array(answers), rcond=None)[0], int(np.linalg.matrix_rank(a))


def _ask(call, spec, weights, split="test") -> EvaluateReply:
    req = EvaluateRequest(base=spec, split=split, models=["m"])
    return decode(call(EVALUATE, encode(req, {"m": weights})), EvaluateReply)[0]


@pytest.mark.slow
def test_old_protocol_leaks_every_users_hit(world):
    """The reimplemented old behaviour: the server's seeds pick the users, and least squares recovers them all."""
    histories, targets = world["silo"].eval_split("test")
    answers = [evaluate(world["model"], world["dom"], histories, targets, max_users=SIZE, seed=s,
                        item_embeddings=world["items"])["recall@10"] for s in range(REQUESTS)]
    x, rank = _least_squares(len(histories), answers)
    assert rank == len(histories)
    assert np.abs(x - world["truth"]).max() < 1e-6, "the old protocol's aggregates must give every user away"


@pytest.mark.slow
def test_silo_owned_subsample_leaves_the_attack_only_the_mean(world, tmp_path):
    """The same attack through the real message path: 120 answers, all one number (the mean over the silo's fixed
    5 users), and the least-squares estimate is that number for every user."""
    worker = SiloWorker("garden", world["folder"], state_dir=tmp_path / "state", cache_dir=world["root"] / "cache",
                        policy=EvalPolicy(max_users=SIZE, budget=None))
    call = in_process_endpoint(worker)
    replies = [_ask(call, world["spec"], world["weights"]).metrics["m"] for _ in range(REQUESTS)]
    answers = [r.values["recall@10"] for r in replies]
    assert {r.users for r in replies} == {SIZE} and len(set(answers)) == 1
    x, _ = _least_squares(len(world["truth"]), answers)
    assert np.ptp(x) < 1e-9 and x[0] == pytest.approx(answers[0])  # one value for everyone: the released mean
    assert np.abs(x - world["truth"]).max() >= min(answers[0], 1 - answers[0]) - 1e-9  # no user's hit recovered
    # that number is the mean over the 5 users the silo fixed (by its own secret, not a seed the server chose)
    assert answers[0] == pytest.approx(world["truth"][worker.eval_rows("test")].mean())


def test_every_request_of_a_split_uses_the_same_users(world, tmp_path):
    """The subsample is a function of the silo's data and policy only: the same rows for every request, after a
    restart, and in a state folder of its own; each split has its own."""
    worker = SiloWorker("garden", world["folder"], state_dir=tmp_path / "a", policy=EvalPolicy(max_users=SIZE))
    first = worker.eval_rows("test")
    assert len(first) == SIZE and worker.eval_rows("test") == first
    again = SiloWorker("garden", world["folder"], state_dir=tmp_path / "b", policy=EvalPolicy(max_users=SIZE))
    assert again.eval_rows("test") == first
    assert len(worker.eval_rows("val")) == SIZE
    everyone = SiloWorker("garden", world["folder"], state_dir=tmp_path / "c")
    assert everyone.eval_rows("test") == list(range(len(world["truth"])))


def test_budget_refuses_beyond_its_models_per_run_and_survives_a_restart(world, tmp_path):
    """Budget 12 model evaluations per split and run: 3 requests of 4 models, then a refusal with its own code
    and fixed text, counted in the state folder (a fresh ClientApp process of the same run sees it); another
    run, or the other split, starts from 0."""
    policy = EvalPolicy(max_users=SIZE, budget=12)
    worker = SiloWorker("garden", world["folder"], state_dir=tmp_path, cache_dir=world["root"] / "cache",
                        policy=policy)
    worker.run_key = "run-1"
    call = in_process_endpoint(worker)
    four = EvaluateRequest(base=world["spec"], models=["a", "b", "c", "d"])
    arrays = {m: world["weights"] for m in four.models}
    for _ in range(3):
        decode(call(EVALUATE, encode(four, arrays)), EvaluateReply)
    with pytest.raises(SiloReplyError) as err:
        call(EVALUATE, encode(four, arrays))
    assert err.value.code == BUDGET_ERROR_CODE and err.value.reason == error_text(BUDGET_ERROR_CODE)
    restarted = SiloWorker("garden", world["folder"], state_dir=tmp_path, cache_dir=world["root"] / "cache",
                           policy=policy)
    restarted.run_key = "run-1"
    with pytest.raises(SiloReplyError):
        in_process_endpoint(restarted)(EVALUATE, encode(four, arrays))
    assert json.loads((tmp_path / EVAL_LEDGER).read_text()) == {"run-1": {"test": 12}}
    _ask(call, world["spec"], world["weights"], split="val")  # the validation split has its own budget
    worker.run_key = "run-2"
    _ask(call, world["spec"], world["weights"])


@pytest.mark.slow
def test_noise_is_calibrated_and_repeats_average_nothing(world, tmp_path):
    exact = _ask(in_process_endpoint(SiloWorker("garden", world["folder"], state_dir=tmp_path / "x",
                                                policy=EvalPolicy(budget=None))), world["spec"], world["weights"])
    worker = SiloWorker("garden", world["folder"], state_dir=tmp_path / "n", policy=EvalPolicy(budget=None, epsilon=0.5))
    call = in_process_endpoint(worker)
    noisy = [_ask(call, world["spec"], world["weights"]).metrics["m"] for _ in range(3)]
    assert noisy[0] == noisy[1] == noisy[2]  # the same model gets the same noise: nothing to average
    values, truth = noisy[0].values, exact.metrics["m"].values
    assert values != truth and all(0.0 <= v <= 1.0 for v in values.values())
    # another model (one weight nudged) draws other noise; its spread matches Laplace(1 / (users x epsilon))
    draws = []
    for i in range(24):
        w = {n: a.copy() for n, a in world["weights"].items()}
        w[sorted(w)[0]].flat[0] += 1e-5 * (i + 1)
        draws.append(_ask(call, world["spec"], w).metrics["m"].values["ndcg@50"] - truth["ndcg@50"])
    scale = 1.0 / (noisy[0].users * 0.5)
    assert 0.3 * scale < np.mean(np.abs(draws)) < 3 * scale


def test_policy_keys_are_validated_with_the_key_named():
    assert EvalPolicy.from_config({"eval-max-users": "0", "eval-budget": "none", "eval-epsilon": ""}) == \
        EvalPolicy(max_users=None, budget=None)
    assert EvalPolicy.from_config({"eval-max-users": 50, "eval-epsilon": 2.0}).epsilon == 2.0
    for key, bad in (("eval-max-users", 3), ("eval-budget", -1), ("eval-epsilon", "x")):
        with pytest.raises(ValueError, match=key):
            EvalPolicy.from_config({key: bad})
