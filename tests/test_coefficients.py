"""Learned merging coefficients on a toy model that honours forward(dom, kind, x)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from common.model.coefficients import (
    CoefficientConfig,
    CoefficientMerger,
    DomainBatchSource,
    batch_loss,
    initial_value,
    learn_coefficients,
    merge_with_coefficients,
)
from common.merging.methods import merge
from common.merging.task_vectors import apply
from common.merging.teacher import teacher_topk


@dataclass
class Dom:
    domain: str
    num_items: int
    features: torch.Tensor  # [N, F] fixed per-domain item features (an input, not a parameter)


class Toy(nn.Module):
    """Item: MLP(features); history: mean of its items' features -> MLP -> extra linear. L2-normalised."""

    def __init__(self, f=5, h=7, d=4, p_drop=0.0):
        super().__init__()
        self.l1 = nn.Linear(f, h)
        self.l2 = nn.Linear(h, d)
        self.query = nn.Linear(d, d)
        self.drop = nn.Dropout(p_drop)
        self.calls: list[tuple[str, bool, bool, torch.Tensor]] | None = None

    def _mlp(self, feats):
        return self.l2(self.drop(torch.tanh(self.l1(feats))))

    def forward(self, dom, kind, x):
        if kind == "items":
            out = F.normalize(self._mlp(dom.features[x]), dim=-1)
        elif kind == "histories":
            valid = (x >= 0).to(dom.features.dtype)
            mean = (dom.features[x.clamp_min(0)] * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
            out = F.normalize(self.query(self._mlp(mean)), dim=-1)
        else:
            raise ValueError(kind)
        if self.calls is not None:
            self.calls.append((kind, out.requires_grad, self.training, out.detach().clone()))
        return out

    @staticmethod
    def layer_of(name: str) -> str:
        return {"l1": "layer0", "l2": "layer1"}.get(name.split(".")[0], "rest")


def make_problem(dtype=torch.float32, sizes=(12, 9), k=5, target=None, seed=0, p_drop=0.0):
    """Base model, two task vectors, two domains; teacher = each domain's fine-tuned model (base + v_d), or
    the model base + sum_d target[d] * v_d for every domain when ``target`` is given."""
    torch.manual_seed(seed)
    model = Toy(p_drop=p_drop).to(dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    vectors = [{n: 0.6 * torch.randn_like(t) for n, t in base.items()} for _ in sizes]
    sources = []
    for d, n_items in enumerate(sizes):
        dom = Dom(f"dom{d}", n_items, torch.randn(n_items, 5, dtype=dtype))
        weights = [1.0 if j == d else 0.0 for j in range(len(sizes))] if target is None else target
        teacher_params = apply(base, vectors, weights)
        model.eval()
        with torch.no_grad():
            items = functional_call(model, teacher_params, (dom, "items", torch.arange(n_items)))
            top = teacher_topk(lambda ids: functional_call(model, teacher_params, (dom, "histories", ids.view(-1, 1))),
                               items, torch.arange(n_items), k, chunk_size=4, exclude_own=True)
        sources.append(DomainBatchSource(dom_inputs=dom, pseudo_item_ids=torch.arange(n_items), teacher=top))
    return model, base, vectors, sources


def full_loss(model, base, vectors, sources, W, granularity, cfg):
    merger = CoefficientMerger(base, vectors, Toy.layer_of, granularity)
    batch = [(d, torch.arange(s.pseudo_item_ids.numel())) for d, s in enumerate(sources)]
    model.eval()
    with torch.no_grad():
        return float(batch_loss(model, merger, W.to(merger.dtype), sources, batch, cfg))


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_gradient_matches_finite_differences(granularity):
    model, base, vectors, sources = make_problem(torch.float64)
    model.eval()
    cfg = CoefficientConfig(granularity=granularity, dropout=False)
    merger = CoefficientMerger(base, vectors, Toy.layer_of, granularity)
    assert merger.groups == (("all",) if granularity == "task" else ("layer0", "layer1", "rest"))
    g = torch.Generator().manual_seed(1)
    W = (0.5 + 0.3 * torch.rand(merger.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    batch = [(0, torch.tensor([0, 3, 5, 11])), (1, torch.tensor([2, 8]))]

    def loss(w):
        return batch_loss(model, merger, w, sources, batch, cfg)  # item embeddings live under theta(W)

    loss(W).backward()
    eps = 1e-6
    fd = torch.zeros_like(W)
    with torch.no_grad():
        for i in range(W.shape[0]):
            for j in range(W.shape[1]):
                wp, wm = W.detach().clone(), W.detach().clone()
                wp[i, j] += eps
                wm[i, j] -= eps
                fd[i, j] = (loss(wp) - loss(wm)) / (2 * eps)
    assert fd.abs().max() > 1e-3  # a real signal, not two zeros
    torch.testing.assert_close(W.grad, fd, rtol=1e-4, atol=1e-8)
    # frozen item embeddings: same check through the query path only
    with torch.no_grad():
        frozen = {d: functional_call(model, merger.merged_params(W.detach()), (s.dom_inputs, "items",
                                                                               torch.arange(s.num_items)))
                  for d, s in enumerate(sources)}
    W.grad = None
    batch_loss(model, merger, W, sources, batch, cfg, frozen).backward()
    with torch.no_grad():
        for i in range(W.shape[0]):
            for j in range(W.shape[1]):
                wp, wm = W.detach().clone(), W.detach().clone()
                wp[i, j] += eps
                wm[i, j] -= eps
                fd[i, j] = (batch_loss(model, merger, wp, sources, batch, cfg, frozen)
                            - batch_loss(model, merger, wm, sources, batch, cfg, frozen)) / (2 * eps)
    torch.testing.assert_close(W.grad, fd, rtol=1e-4, atol=1e-8)


def test_only_W_gets_gradients_and_model_is_untouched():
    model, base, vectors, sources = make_problem(p_drop=0.2)
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = learn_coefficients(model, base, vectors, Toy.layer_of, sources,
                             CoefficientConfig(granularity="layer", init=0.4, steps=3, lr=0.01), progress=False)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not model.training  # mode restored
    assert res.W.shape == (2, 3) and not res.W.requires_grad and res.groups == ("layer0", "layer1", "rest")
    assert not torch.equal(res.W, torch.full((2, 3), 0.4))
    assert [h["step"] for h in res.history] == [1, 2, 3] and res.chosen_step == 3


def test_merged_params_equal_training_free_merge():
    _, base, vectors, _ = make_problem()
    task = CoefficientMerger(base, vectors, Toy.layer_of, "task")
    W = torch.tensor([[0.3], [0.5]])
    ref = merge(base, vectors, [0.3, 0.5])
    got = task.merged_params(W)
    for n in base:
        torch.testing.assert_close(got[n], ref[n])
    layer = CoefficientMerger(base, vectors, Toy.layer_of, "layer")
    W = torch.tensor([[0.1, 0.2, 0.3], [0.7, -0.4, 1.5]])
    ref = apply(base, vectors, [dict(zip(layer.groups, row.tolist())) for row in W], Toy.layer_of)
    got = layer.merged_params(W)
    via_result = merge_with_coefficients(base, vectors, W, layer.groups, Toy.layer_of)
    for n in base:
        torch.testing.assert_close(got[n], ref[n])
        torch.testing.assert_close(via_result[n], ref[n])


def test_learning_moves_towards_known_coefficients():
    target = [0.8, 0.3]
    model, base, vectors, sources = make_problem(target=target, k=None, seed=2)
    cfg = CoefficientConfig(init=0.2, lr=0.03, steps=120, batch_size=8, dropout=False, item_refresh_every=1,
                            seed=0)
    res = learn_coefficients(model, base, vectors, Toy.layer_of, sources, cfg, progress=False)
    W0 = torch.full((2, 1), 0.2)
    start = full_loss(model, base, vectors, sources, W0, "task", cfg)
    end = full_loss(model, base, vectors, sources, res.W, "task", cfg)
    assert end < 0.5 * start, (start, end, res.W)
    t = torch.tensor(target).view(2, 1)
    assert (res.W - t).norm() < 0.5 * (W0 - t).norm(), res.W


def test_item_refresh_zero_freezes_item_embeddings():
    model, base, vectors, sources = make_problem(p_drop=0.3)
    model.calls = []
    cfg = CoefficientConfig(init=0.5, steps=6, lr=0.05, item_refresh_every=0, dropout=True)
    res = learn_coefficients(model, base, vectors, Toy.layer_of, sources, cfg, progress=False)
    items = [c for c in model.calls if c[0] == "items"]
    assert len(items) == 2 and not any(c[1] for c in items)  # once per domain, no graph
    assert not any(c[2] for c in items)  # encoded deterministically (eval mode)
    assert all(c[2] for c in model.calls if c[0] == "histories")  # dropout on during steps
    merger = CoefficientMerger(base, vectors)
    with torch.no_grad():
        model.eval()
        init_items = functional_call(model, merger.merged_params(torch.full((2, 1), 0.5)),
                                     (sources[0].dom_inputs, "items", torch.arange(12)))
    torch.testing.assert_close(items[0][3], init_items)
    assert not torch.equal(res.W, torch.full((2, 1), 0.5))

    model.calls = []
    learn_coefficients(model, base, vectors, Toy.layer_of, sources, cfg.model_copy(update={"item_refresh_every": 2}),
                       progress=False)
    items = [c for c in model.calls if c[0] == "items"]
    assert len(items) > 2 and all(c[1] for c in items)  # recomputed inside steps, differentiable
    model.calls = None


def test_holdout_picks_the_best_evaluated_step():
    model, base, vectors, sources = make_problem()
    cfg = CoefficientConfig(init=1.0, steps=40, lr=0.05, holdout_fraction=0.25, eval_every=10, dropout=False)
    res = learn_coefficients(model, base, vectors, Toy.layer_of, sources, cfg, progress=False)
    assert [h["step"] for h in res.holdout] == [0, 10, 20, 30, 40]
    best = min(res.holdout, key=lambda h: h["loss"])
    assert res.chosen_step == best["step"]
    if res.chosen_step == 40:
        assert torch.equal(res.W, res.final_W)
    elif res.chosen_step == 0:
        assert torch.equal(res.W, torch.ones(2, 1))


def test_adamerging_needs_no_teacher_and_config_defaults():
    model, base, vectors, sources = make_problem()
    no_teacher = [DomainBatchSource(dom_inputs=s.dom_inputs, pseudo_item_ids=s.pseudo_item_ids) for s in sources]
    res = learn_coefficients(model, base, vectors, Toy.layer_of, no_teacher,
                             CoefficientConfig(loss="adamerging", init=0.3, steps=3), progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    with pytest.raises(ValueError, match="teacher"):
        learn_coefficients(model, base, vectors, Toy.layer_of, no_teacher, CoefficientConfig(init=0.3, steps=1),
                           progress=False)
    with pytest.raises(ValueError, match="follow"):
        DomainBatchSource(dom_inputs=sources[0].dom_inputs, pseudo_item_ids=torch.arange(3),
                          teacher=sources[0].teacher)
    cfg = CoefficientConfig()
    assert (cfg.lr, cfg.steps, cfg.batch_size, cfg.kd_weight, cfg.tau) == (1e-3, 500, 16, 1000.0, 0.05)
    assert initial_value(cfg, "task_arithmetic", 3) == 0.2 and initial_value(cfg, "ties", 3) == 1.0
    assert initial_value(cfg, "weight_average", 4) == 0.25
    assert initial_value(cfg.model_copy(update={"init": 0.7}), "ties", 3) == 0.7
    with pytest.raises(ValueError, match="default"):
        learn_coefficients(model, base, vectors, Toy.layer_of, sources, CoefficientConfig(steps=1), progress=False)
    res = learn_coefficients(model, base, vectors, Toy.layer_of, sources, CoefficientConfig(steps=1),
                             progress=False, method="ties")
    assert res.W.shape == (2, 1)


def test_learned_coefficients_do_not_depend_on_prior_rng_use():
    """Dropout draws from the global RNG: the result must not depend on what ran before (the server runs in
    another process than the in-process reference)."""
    import torch as _t

    from common.model.backbones import DomainInputs, LightRecommender
    from common.model.config import BackboneConfig
    from common.merging.teacher import teacher_topk
    from common.model.coefficients import CoefficientConfig, DomainBatchSource, learn_coefficients
    from common.model.backbones import shared_state

    _t.manual_seed(0)
    model = LightRecommender(BackboneConfig(dim=16, heads=2, dropout=0.3), feature_dim=8)
    feats = _t.nn.functional.normalize(_t.randn(40, 8), dim=-1)
    dom = DomainInputs("d", 40, features=feats)
    base = shared_state(model)
    vec = {n: 0.05 * _t.randn_like(t) for n, t in base.items()}
    ids = _t.arange(40)
    with _t.no_grad():
        top = teacher_topk(lambda i: model(dom, "histories", i.view(-1, 1)), model(dom, "items", ids), ids, 8, exclude_own=True)
    src = [DomainBatchSource(dom_inputs=dom, pseudo_item_ids=ids, teacher=top)]
    cfg = CoefficientConfig(steps=5, batch_size=4, init=0.5, lr=0.05)
    results = []
    for burn in (0, 17):
        _t.manual_seed(1234)
        _t.rand(burn)
        results.append(learn_coefficients(model, base, [vec], model.layer_of, src, cfg, progress=False).W)
    assert _t.equal(results[0], results[1])


def test_seen_items_exclude_leaves_the_pseudo_users_own_item_out_of_the_student_softmax():
    """The student's loss for a pseudo-user [i] equals mergerec_loss over its scores with item i at -inf (the
    teacher never targets it either); with seen-items rank the scores are used as they are."""
    from common.merging.losses import mergerec_loss
    from common.model.coefficients import pseudo_user_losses

    model, base, vectors, sources = make_problem(k=4)
    params = apply(base, vectors, [0.5, 0.5])
    src, rows = sources[0], torch.arange(6)
    model.eval()
    with torch.no_grad():
        items = functional_call(model, params, (src.dom_inputs, "items", torch.arange(src.dom_inputs.num_items)))
        q = functional_call(model, params, (src.dom_inputs, "histories", src.pseudo_item_ids[rows].view(-1, 1)))
        scores = q @ items.T
        masked = scores.clone()
        masked[torch.arange(6), src.pseudo_item_ids[rows]] = float("-inf")
        t = src.teacher
        for seen, s in (("exclude", masked), ("rank", scores)):
            got = pseudo_user_losses(model, params, src, rows, items, CoefficientConfig(seen_items=seen))
            want = mergerec_loss(s, t.indices[rows], t.values[rows], reduction="none")
            torch.testing.assert_close(got, want)
            assert bool(got.isfinite().all())
