"""The item-tower fit (common/model/tower_fit.py) and the item MLP residual it fits (common/model/backbones.py)."""

import pytest
import torch
from torch.nn import functional as F

from common.model.backbones import DomainInputs, LightRecommender, shared_state
from common.model.config import BackboneConfig
from common.model.tower_fit import fit_item_tower, item_outputs


def _model(hidden: int, feature_dim: int = 16, dim: int = 8) -> LightRecommender:
    torch.manual_seed(0)
    cfg = BackboneConfig(kind="light", dim=dim, layers=1, heads=2, dropout=0.0, max_items=4, adaptor_hidden=hidden)
    return LightRecommender(cfg, feature_dim=feature_dim).eval()


def _domains(n_items=(40, 400), feature_dim=16):
    gen = torch.Generator().manual_seed(1)
    return [DomainInputs(f"d{i}", n, features=F.normalize(torch.randn(n, feature_dim, generator=gen), dim=-1))
            for i, n in enumerate(n_items)]


def _cosine_loss(model, state, doms, targets) -> list[float]:
    """Per-domain mean (1 - cos) of the model's item embeddings under `state` against the targets (independent of
    the fit's own batching and weights)."""
    out = []
    for dom, tgt in zip(doms, targets):
        got = item_outputs(model, state, dom)
        out.append(float((1 - (got * F.normalize(tgt, dim=-1)).sum(-1)).mean()))
    return out


def test_the_residual_changes_nothing_until_it_is_fitted():
    """Zero output at the base: the same item and history embeddings as a model without it; every other parameter
    is bit-identical whatever the residual's width (it is built last from the seeded RNG)."""
    with_mlp, without = _model(32), _model(0)
    dom = _domains((30,))[0]
    ids = torch.arange(30)
    assert torch.equal(with_mlp(dom, "items", ids), without(dom, "items", ids))
    hist = torch.tensor([[1, 2, 3], [-1, 4, 5]])
    assert torch.equal(with_mlp(dom, "histories", hist), without(dom, "histories", hist))
    a, b = shared_state(with_mlp), shared_state(without)
    assert set(a) - set(b) == {n for n in a if n.startswith("adaptor_mlp.")} != set()
    assert all(torch.equal(a[n], b[n]) for n in b)
    assert with_mlp.layer_of("adaptor_mlp.0.weight") == with_mlp.layer_of("adaptor.weight") == "adaptor"


def test_fit_reproduces_each_domains_tower_and_keeps_the_rest():
    """Targets are two domains' fine-tuned towers (different nonlinear maps of the features): the fit brings the
    merged tower far closer to both than their weight average, the MLP residual beats the linear adaptor alone,
    and positions and blocks keep their merged values."""
    doms = _domains()
    gen = torch.Generator().manual_seed(2)
    maps = [torch.randn(16, 8, generator=gen) for _ in doms]
    targets = [torch.tanh(3 * d.features @ m) for d, m in zip(doms, maps)]
    losses = {}
    for hidden in (0, 64):
        model = _model(hidden)
        merged = shared_state(model)
        with torch.no_grad():
            merged["position.weight"] += 0.1  # a merged value the fit must keep
        fitted = fit_item_tower(model, merged, doms, targets, epochs=60, lr=1e-2, batch_size=220, seed=0)
        assert set(fitted) == set(merged)
        changed = {n for n in merged if not torch.equal(fitted[n], merged[n])}
        assert changed and all(n.startswith(("adaptor.", "adaptor_mlp.")) for n in changed)
        before, after = _cosine_loss(model, merged, doms, targets), _cosine_loss(model, fitted, doms, targets)
        assert all(a < 0.5 * b for a, b in zip(after, before)), (before, after)
        losses[hidden] = after
    assert sum(losses[64]) < 0.8 * sum(losses[0]), losses


def test_each_domain_counts_equally_whatever_its_catalog_size():
    """Equal domain weights make the objective blind to how many items a catalog has: a 40-item catalog repeated
    ten times (400 rows) beside a 400-item one whose targets contradict it gives the same fit as the 40 items
    themselves. Weighting items instead (the big catalog 10:1 in the first fit, 1:1 in the second) does not."""
    doms = _domains()
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(16, 8, generator=gen)
    targets = [doms[0].features @ m, -(doms[1].features @ m)]
    repeated = DomainInputs("d0x10", 400, features=doms[0].features.repeat(10, 1))
    model = _model(0)
    # one full batch per epoch: both fits then minimise the very same function, step for step
    fits = [fit_item_tower(model, shared_state(model), ds, ts, epochs=60, lr=3e-3, batch_size=1000, seed=0)
            for ds, ts in (((doms[0], doms[1]), targets), ((repeated, doms[1]), (targets[0].repeat(10, 1), targets[1])))]
    small = [_cosine_loss(model, f, doms, targets) for f in fits]
    assert abs(small[0][0] - small[1][0]) < 1e-4 and abs(small[0][1] - small[1][1]) < 1e-4, small
    assert small[0][0] < 0.9 * small[0][1]  # the fit moved: the small, coherent catalog is fitted better


def test_zero_epochs_and_bad_inputs():
    model = _model(8)
    doms = _domains((10,))
    state = shared_state(model)
    same = fit_item_tower(model, state, doms, [torch.randn(10, 8)], epochs=0)
    assert all(torch.equal(same[n], state[n]) for n in state)
    with pytest.raises(ValueError, match="one row per item"):
        fit_item_tower(model, state, doms, [torch.randn(9, 8)], epochs=1)
    with pytest.raises(ValueError, match="2 target tables"):
        fit_item_tower(model, state, doms, [torch.randn(10, 8)] * 2, epochs=1)


def test_silo_fine_tuning_never_trains_the_residual(tmp_path):
    """The residual is the server's: a silo's task vector is zero there (common/model/train.py, SERVER_FITTED),
    with nothing frozen by the configuration."""
    from common.data.demo import make_domain
    from common.data.format import load_silo
    from common.model.config import TrainConfig
    from common.model.train import fine_tune

    silo = load_silo(make_domain(tmp_path, "garden", seed=0))
    model = _model(8).train()
    dom = _domains((len(silo.catalog),))[0]
    start = shared_state(model)
    res = fine_tune(model, silo, dom, TrainConfig(epochs=1, batch_size=64, progress=False, warmup_steps=0, max_steps_per_epoch=4))
    moved = {n for n in start if not torch.equal(start[n], res.state[n])}
    assert any(n.startswith("blocks.") for n in moved) and not any(n.startswith("adaptor_mlp.") for n in moved)
