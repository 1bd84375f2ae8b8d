"""User-level DP-SGD: the RDP accountant against an independent numerical computation, per-user clipping, the
noise calibration and DP fine-tuning on demo data (common/core/dp_accounting.py, common/model/dp.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import common.model.train as train
from common.core import dp_accounting as acc
from common.data.demo import make_domain
from common.data.format import load_silo
from common.model import dp
from common.model.backbones import DomainInputs, LightRecommender
from common.model.config import BackboneConfig, TrainConfig


def _log_moment_by_integration(q: float, sigma: float, order: float) -> float:
    """log E_{z ~ N(0, sigma^2)} [((1 - q) + q exp((2z - 1) / (2 sigma^2)))^order]: the Renyi moment of the sampled
    Gaussian mixture against N(0, sigma^2) (Mironov et al. 2019, section 3.3), by the trapezoid rule on a fine
    grid in log space. Independent of the accountant's binomial closed form; valid for fractional orders too."""
    z = np.linspace(-40 * sigma - 20, 40 * sigma + 20 + order / sigma**2, 400_001)
    log_density = -z**2 / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    log_ratio = np.logaddexp(-math.inf if q == 1 else math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
    f = log_density + order * log_ratio
    m = f.max()
    return m + math.log(np.trapezoid(np.exp(f - m), z))


def _epsilon_by_integration(q, sigma, steps, delta, orders) -> float:
    best = math.inf
    for a in orders:
        rdp = steps * _log_moment_by_integration(q, sigma, a) / (a - 1)
        best = min(best, rdp + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1))
    return best


@pytest.mark.parametrize("q,sigma,order", [(0.01, 1.0, 2), (0.05, 0.8, 8), (0.2, 2.0, 32), (0.005, 0.6, 5),
                                           (1.0, 1.5, 4)])
def test_rdp_step_equals_numerical_integration(q, sigma, order):
    assert acc.rdp_step(q, sigma, order) == pytest.approx(
        _log_moment_by_integration(q, sigma, order) / (order - 1), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("q,sigma,steps,delta", [(128 / 5000, 0.77, 840, 1 / 5000), (0.01, 1.1, 3000, 1e-5),
                                                 (0.1, 3.0, 100, 1e-6)])
def test_epsilon_equals_an_independent_computation(q, sigma, steps, delta):
    orders = range(2, 65)
    eps, order = acc.epsilon(q, sigma, steps, delta, orders=orders)
    assert eps == pytest.approx(_epsilon_by_integration(q, sigma, steps, delta, orders), rel=1e-5)
    # the Gaussian mechanism without sampling (q = 1) has a closed form: rdp(a) = a / (2 sigma^2)
    eps1, _ = acc.epsilon(1.0, sigma, steps, delta, orders=orders)
    closed = min(steps * a / (2 * sigma**2) + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
                 for a in orders)
    assert eps1 == pytest.approx(closed, rel=1e-9)


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_noise_is_the_smallest_that_meets_the_target(target):
    q, steps, delta = 0.02, 500, 1e-4
    sigma = acc.noise_for_epsilon(target, q, steps, delta)
    assert acc.epsilon(q, sigma, steps, delta)[0] <= target
    assert acc.epsilon(q, sigma * 0.99, steps, delta)[0] > target  # 1% less noise would overspend


def test_bad_accountant_inputs_are_errors():
    for bad in (dict(q=0.0, sigma=1.0, order=2), dict(q=0.1, sigma=0.0, order=2), dict(q=0.1, sigma=1.0, order=1)):
        with pytest.raises(ValueError):
            acc.rdp_step(**bad)
    with pytest.raises(ValueError, match="target epsilon"):
        acc.noise_for_epsilon(math.inf, 0.1, 10, 1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    silo = load_silo(make_domain(tmp_path_factory.mktemp("demo"), "garden", seed=0))
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(len(silo.catalog), 16), dim=-1)
    torch.manual_seed(1)
    model = LightRecommender(BackboneConfig(kind="light", dim=16, layers=1, heads=2, max_items=10), feature_dim=16)
    return silo, DomainInputs(silo.domain, len(silo.catalog), features=feats), model


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 32, "lr": 5e-3, "patience": 3, "warmup_steps": 2,
                          "progress": False, "num_negatives": 64, "val_max_users": 20, **kw})


def _user_grads(model, dom, rows, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for r in rows:
        g = torch.autograd.grad(train._batch_loss(model, dom, [r], cfg, None, "cpu"), params, allow_unused=True)
        out.append([torch.zeros_like(p) if x is None else x for p, x in zip(params, g)])
    return params, out


def test_each_users_gradient_is_clipped(setup):
    silo, dom, base = setup
    model = copy.deepcopy(base).eval()  # no dropout, no sampled negatives: the same loss twice, the same gradient
    cfg = _cfg(negatives="full")
    rows = train._training_rows(silo, True, 10, None, 0)[:12]
    params, grads = _user_grads(model, dom, rows, cfg)
    norms = [math.sqrt(sum(float((x**2).sum()) for x in g)) for g in grads]
    clip = float(np.median(norms))  # half the users are above it
    total, seen = dp.clipped_user_sum(params, (train._batch_loss(model, dom, [r], cfg, None, "cpu") for r in rows),
                                      clip)
    assert seen == pytest.approx(norms, rel=1e-5)
    expected = [sum(g[j] * min(1.0, clip / n) for g, n in zip(grads, norms)) for j in range(len(params))]
    for t, e in zip(total, expected):
        torch.testing.assert_close(t, e, rtol=1e-4, atol=1e-5)
    # each user's contribution, clipped, has norm <= clip: the sum of k users is within k * clip
    assert math.sqrt(sum(float((t**2).sum()) for t in total)) <= len(rows) * clip * (1 + 1e-6)
    assert sum(n > clip * 1.01 for n in norms) >= 3  # the clipping was exercised


def test_noisy_step_adds_calibrated_noise_over_the_expected_batch(setup):
    silo, dom, base = setup
    model = copy.deepcopy(base).train()
    cfg = _cfg(negatives="full")
    rows = train._training_rows(silo, True, 10, None, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    plan = dp.make_plan(4.0, None, 1e-9, len(rows), 32, 2, seed=0)  # clip ~0: the gradient is noise alone
    picked, _ = dp.noisy_step(plan, params, len(rows), lambda i: train._batch_loss(model, dom, [rows[i]], cfg, None,
                                                                                  "cpu"))
    noise = torch.cat([p.grad.flatten() for p in params]) * plan.sample_rate * len(rows)
    assert plan.steps == 1 and plan.delta == pytest.approx(1 / len(rows))
    assert float(noise.std()) == pytest.approx(plan.sigma * plan.clip, rel=0.1)
    assert plan.epsilon <= 4.0 and plan.planned_steps == 2 * round(len(rows) / 32)


def test_dp_fine_tune_reports_its_guarantee_and_leaves_held_out_users_untrained(setup):
    silo, dom, base = setup
    model = copy.deepcopy(base)
    cfg = _cfg(dp_epsilon=8.0, dp_clip=0.5, selection="continue")
    res = train.fine_tune(model, silo, dom, cfg)
    held = train.held_out_users(silo, cfg)
    members = train.trained_users(silo, True, cfg)
    assert not set(held) & set(members) and len(members) == len(silo.users) - len(held)
    d = res.dp
    assert d["epsilon"] <= 8.0 and d["users"] == len(members) and d["delta"] == pytest.approx(1 / len(members))
    assert d["planned_steps"] == (cfg.epochs + 1) * round(len(members) / cfg.batch_size)
    assert 0 < d["steps"] <= d["planned_steps"] and d["steps"] == res.steps
    assert d["epsilon"] == pytest.approx(acc.epsilon(d["sample_rate"], d["noise_multiplier"], d["planned_steps"],
                                                     d["delta"])[0])
    # no DP: nothing reported, the held-out users' train items are trained on
    plain = train.fine_tune(copy.deepcopy(base), silo, dom, _cfg(selection="continue"))
    assert plain.dp is None
    assert set(held) <= set(train.trained_users(silo, True, _cfg(selection="continue")))


def test_dp_needs_a_selection_outside_the_trained_users():
    with pytest.raises(ValueError, match="selection"):
        TrainConfig(dp_epsilon=1.0, selection="refit")


def test_run_config_keys_and_refusals():
    from server.config import ConfigError, pipeline_config

    cfg, _, _ = pipeline_config({"dp-epsilon": 4, "dp-clip": 0.5})
    assert cfg.train.dp_epsilon == 4.0 and cfg.train.dp_clip == 0.5 and cfg.train.dp_delta is None
    for off in ("inf", "none"):
        assert pipeline_config({"dp-epsilon": off})[0].train.dp_epsilon is None
    assert pipeline_config({})[0].train.dp_epsilon is None  # off by default
    with pytest.raises(ConfigError, match="dp-epsilon"):
        pipeline_config({"dp-epsilon": 4, "strategy": "fedavg"})
    with pytest.raises(ConfigError, match="dp-epsilon"):
        pipeline_config({"dp-epsilon": -1})


def test_server_checks_the_reported_guarantee_against_the_request():
    from common.core.errors import ContractError
    from common.protocol.messages import DPGuarantee
    from server.validation import check_dp

    asked = TrainConfig(dp_epsilon=4.0, selection="continue")
    good = dict(epsilon=3.99, delta=1e-3, target_epsilon=4.0, noise_multiplier=1.1, clip=1.0, sample_rate=0.1,
                users=1000, planned_steps=40, steps=30)
    check_dp(DPGuarantee(**good), asked, users=1000)
    for bad, match in ((None, "missing"), (DPGuarantee(**{**good, "epsilon": 4.5}), "target"),
                       (DPGuarantee(**{**good, "clip": 2.0}), "clip"), (DPGuarantee(**{**good, "steps": 41}), "steps"),
                       (DPGuarantee(**{**good, "users": 1001}), "users")):
        with pytest.raises(ContractError, match=match):
            check_dp(bad, asked, users=1000)
    with pytest.raises(ContractError, match="absent"):
        check_dp(DPGuarantee(**good), TrainConfig(), users=1000)
    check_dp(None, TrainConfig(), users=1000)
