"""Stage-1 fine-tuning: early stopping and the final fit on train + validation items (common.model.train)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

import common.model.train as train
from common.model.backbones import DomainInputs, LightRecommender
from common.model.config import BackboneConfig, TrainConfig
from common.data.format import load_silo
from common.data.demo import make_domain


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    silo = load_silo(make_domain(tmp_path_factory.mktemp("demo"), "garden", seed=0))
    torch.manual_seed(0)
    feats = F.normalize(torch.randn(len(silo.catalog), 16), dim=-1)
    cfg = BackboneConfig(kind="light", dim=16, layers=1, heads=2, max_items=10)
    torch.manual_seed(1)
    model = LightRecommender(cfg, feature_dim=16)
    return silo, DomainInputs(silo.domain, len(silo.catalog), features=feats), model


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 4, "batch_size": 64, "lr": 5e-3, "patience": 4, "warmup_steps": 2, "progress": False,
                          "selection": "refit", **kw})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_rows_with_val_append_each_users_val_item(setup):
    silo, _, _ = setup
    plain = train._training_rows(silo, True, 50, None, 0)
    more = train._training_rows(silo, True, 50, None, 0, with_val=True)
    u = silo.users[0]
    assert plain[0] == (silo.train[0][:-1], silo.train[0][1:])
    assert more[0] == (silo.train[0], silo.train[0][1:] + [silo.val[u]])
    # targets: the train items after the first, then the val item; never the test item
    assert [r[1] for r in more] == [seq[1:] + [silo.val[u]] for u, seq in zip(silo.users, silo.train)]


def test_fine_tune_refits_from_the_start_for_the_chosen_epochs(setup):
    silo, dom, base = setup
    model = copy.deepcopy(base)
    res = train.fine_tune(model, silo, dom, _cfg())
    assert res.best_epoch >= 1, "the demo data is learnable: some epoch must beat the untrained model"
    assert res.refit_epochs == res.best_epoch
    assert train.chosen_epoch(res.history) == res.best_epoch  # the rule the benchmark's --reuse applies
    # the refit alone, from the same start, gives bit-identical weights (the benchmark's --reuse relies on it)
    again = copy.deepcopy(base)
    train.refit(again, silo, dom, _cfg(), res.best_epoch)
    assert _same(res.state, {n: p.detach() for n, p in again.named_parameters()})
    # and they differ from the selection run's best weights
    sel = copy.deepcopy(base)
    best = train.fine_tune(sel, silo, dom, _cfg(refit_on_val=False))
    assert best.refit_epochs == 0 and best.best_epoch == res.best_epoch and best.val == res.val
    assert not _same(res.state, best.state)
    assert train.evaluate_split(sel, silo, dom, "val", seed=0)["ndcg@10"] == pytest.approx(best.val["ndcg@10"])


def test_no_refit_when_no_epoch_beats_the_start(setup, monkeypatch):
    silo, dom, base = setup
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2])
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: {"ndcg@10": next(scores), "recall@10": 0.0})
    model = copy.deepcopy(base)
    res = train.fine_tune(model, silo, dom, _cfg())
    assert res.best_epoch == 0 and res.refit_epochs == 0 and res.epochs == 4
    assert _same(res.state, {n: p.detach() for n, p in base.named_parameters()})


def test_chosen_epoch_is_the_earliest_best():
    rows = lambda *v: [{"epoch": e, "val_ndcg@10": x} for e, x in enumerate(v)]  # noqa: E731
    assert train.chosen_epoch(rows(0.1, 0.3, 0.2, 0.3)) == 1  # a tie later does not move it
    assert train.chosen_epoch(rows(0.4, 0.3, 0.2)) == 0  # nothing beat the start
    assert train.chosen_epoch(rows(0.1, 0.2, 0.25)) == 2


def test_warmup_never_outlasts_one_epoch(setup):
    silo, _, base = setup
    rows = train._training_rows(silo, True, 50, None, 0)  # 600 demo users
    assert train.warmup_steps(_cfg(batch_size=64, warmup_steps=100), [rows]) == 10  # ceil(600 / 64)
    assert train.warmup_steps(_cfg(batch_size=64, warmup_steps=4), [rows]) == 4
    assert train.warmup_steps(_cfg(batch_size=64, warmup_steps=100), [rows, rows[:64]]) == 11  # pooled domains
    assert train.warmup_steps(_cfg(batch_size=64, warmup_steps=100, max_steps_per_epoch=3), [rows]) == 3
    # the lr the optimiser reaches: full lr from the end of the first epoch on
    opt, sched = train._optimiser(copy.deepcopy(base), _cfg(batch_size=64, warmup_steps=100, lr=1e-3), [rows])
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9:] == pytest.approx([1e-3] * 3)


def test_frozen_parameters_stay_at_the_base_and_the_rest_trains(setup):
    silo, dom, base = setup
    model = copy.deepcopy(base)
    train.refit(model, silo, dom, _cfg(freeze=["adaptor", "position"]), epochs=2)  # trains unconditionally
    state = dict(model.named_parameters())
    start = dict(base.named_parameters())
    for n, t in state.items():
        if n.startswith(("adaptor", "position")):
            assert torch.equal(t, start[n]), n
    assert any(not torch.equal(t, start[n]) for n, t in state.items() if n.startswith("blocks"))
    assert all(p.requires_grad for p in model.parameters())  # the model is left trainable again
    with pytest.raises(ValueError, match="no parameter name starts with 'adapter'"):
        train.fine_tune(copy.deepcopy(base), silo, dom, _cfg(epochs=1, freeze=["adapter"]))


def test_l2sp_penalty_by_hand_and_it_shrinks_the_task_vector(setup):
    silo, dom, base = setup
    model = copy.deepcopy(base)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.adaptor.bias.add_(torch.tensor([3.0] + [0.0] * 15))
        model.adaptor.weight[0, 0] -= 2.0
    assert float(train.l2sp_penalty(model, anchor)) == pytest.approx(9.0 + 4.0)

    def tv_norm(cfg):
        m = copy.deepcopy(base)
        train.refit(m, silo, dom, cfg, epochs=2)
        st = dict(m.named_parameters())
        return sum(float(((st[n].detach() - p.detach()) ** 2).sum()) for n, p in base.named_parameters()) ** 0.5

    free, pulled = tv_norm(_cfg()), tv_norm(_cfg(l2sp=10.0))
    assert pulled < 0.8 * free


def test_held_out_users_selection_trains_once_and_never_on_the_scored_validation_items(setup, monkeypatch):
    """selection='held-out-users': one run on train + val items, except the held-out users' val items, which
    are exactly what early stopping scores; the best epoch's weights are final (no refit)."""
    silo, dom, base = setup
    cfg = _cfg(selection="held-out-users", val_max_users=40)
    held = train.held_out_users(silo, cfg)
    assert len(held) == 40 == len(set(held))
    rows = train._training_rows(silo, True, 50, None, 0, with_val=True, held_out=frozenset(held))
    for u, (inputs, targets) in enumerate(rows):  # every demo user has >= 2 train items: row index = user index
        has_val = targets[-1] == silo.val[silo.users[u]] and len(targets) == len(silo.train[u])
        assert has_val == (u not in held)
    scored = []
    real_evaluate = train.evaluate
    monkeypatch.setattr(train, "evaluate", lambda m, d, h, t, **kw: scored.append(list(t)) or real_evaluate(m, d, h, t, **kw))
    res = train.fine_tune(copy.deepcopy(base), silo, dom, cfg)
    assert scored[0] == [silo.val[silo.users[u]] for u in held]
    assert res.refit_epochs == 0 and res.best_epoch > 0
    steps_per_epoch = -(-len(rows) // cfg.batch_size)
    assert res.steps == res.epochs * steps_per_epoch  # one run: no second (refit) pass


def test_continue_selection_trains_the_best_epoch_on_for_continue_epochs(setup):
    """selection='continue': the held-out-users run's best weights, then `continue_epochs` epochs of the final
    fit on every user's train + val items (the refit's own seeded loop), instead of a retrain from the start."""
    silo, dom, base = setup
    res = train.fine_tune(copy.deepcopy(base), silo, dom, _cfg(selection="continue", continue_epochs=2,
                                                                 val_max_users=40))
    assert res.best_epoch >= 1 and res.refit_epochs == 2
    held = train.fine_tune(copy.deepcopy(base), silo, dom, _cfg(selection="held-out-users", val_max_users=40))
    assert held.best_epoch == res.best_epoch and held.refit_epochs == 0
    assert [h["val_ndcg@10"] for h in held.history] == [h["val_ndcg@10"] for h in res.history]
    again = copy.deepcopy(base)
    again.load_state_dict(held.state, strict=False)
    train.refit(again, silo, dom, _cfg(), 2)
    assert _same(res.state, {n: p.detach() for n, p in again.named_parameters()})
    assert not _same(res.state, held.state)
    rows = train._training_rows(silo, True, 50, None, 0, with_val=True, held_out=frozenset(train.held_out_users(
        silo, _cfg(val_max_users=40))))
    assert res.steps == res.epochs * -(-len(rows) // 64) + 2 * -(-len(silo.users) // 64)
