"""The fine-tuning loss (common.model.train._batch_loss) against a loop written out by hand."""

import math

import pytest
import torch
from torch.nn import functional as F

from common.model.backbones import DomainInputs, LightRecommender
from common.model.config import BackboneConfig, TrainConfig
from common.model.train import _batch_loss, _sampled_loss


@pytest.fixture
def light():
    torch.manual_seed(0)
    cfg = BackboneConfig(kind="light", dim=None, layers=1, heads=2, dropout=0.0, max_items=6)
    feats = F.normalize(torch.randn(12, 8), dim=-1)
    model = LightRecommender(cfg, feature_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), DomainInputs("d", 12, features=feats)


@torch.no_grad()
def _reference(model, dom, rows, tau, mask):
    """Mean over every (history prefix, next item) pair of -log softmax over all items, one pair at a time."""
    items = model(dom, "items", torch.arange(dom.num_items))
    losses = []
    for inputs, targets in rows:
        for t in range(len(inputs)):
            h = model(dom, "histories", torch.tensor([inputs[: t + 1]]))[0]
            logits = [float(h @ items[j]) / tau for j in range(dom.num_items)]
            if mask and inputs[t] != targets[t]:
                logits[inputs[t]] = -math.inf
            norm = math.log(sum(math.exp(v) for v in logits if v != -math.inf))
            losses.append(norm - logits[targets[t]])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("mask", [False, True])
def test_causal_full_softmax_loss_matches_reference(light, mask):
    model, dom = light
    rows = [([0, 3, 5], [3, 5, 7]), ([2, 2], [2, 9]), ([11], [4])]  # [2 -> 2] is a repeat: never masked
    cfg = TrainConfig(tau=0.05, mask_current_item=mask)
    with torch.no_grad():
        got = float(_batch_loss(model, dom, rows, cfg, None, torch.device("cpu")))
    assert got == pytest.approx(_reference(model, dom, rows, 0.05, mask), rel=1e-4)


def test_mask_lowers_the_loss_when_the_current_item_outscores_the_target(light):
    model, dom = light
    rows = [([0, 3, 5], [3, 5, 7])]
    with torch.no_grad():
        losses = [float(_batch_loss(model, dom, rows, TrainConfig(mask_current_item=m), None, torch.device("cpu")))
                  for m in (False, True)]
    assert losses[1] < losses[0]


def test_inbatch_mask_only_hits_candidates(light):
    """In-batch negatives: the current item is masked only where it is one of the batch's target candidates."""
    model, dom = light
    rows = [([0, 3], [3, 5]), ([5], [0])]
    cfg = TrainConfig(negatives="inbatch", mask_current_item=True)
    with torch.no_grad():
        got = float(_batch_loss(model, dom, rows, cfg, None, torch.device("cpu")))
        cands = torch.tensor([0, 3, 5])
        items = model(dom, "items", cands)
        h = torch.cat([model(dom, "positions", torch.tensor([[0, 3]]))[0], model(dom, "histories", torch.tensor([[5]]))])
        logits = h @ items.T / cfg.tau
        logits[0, 0] = -math.inf  # current 0, target 3
        logits[1, 1] = -math.inf  # current 3, target 5
        logits[2, 2] = -math.inf  # current 5, target 0
    assert got == pytest.approx(float(F.cross_entropy(logits, torch.tensor([1, 2, 0]))), rel=1e-5)


@pytest.mark.parametrize("mask", [False, True])
def test_sampled_softmax_over_every_item_is_the_full_softmax(light, mask):
    """negatives='sampled' drawing all N items: same candidates, zero log-weight, so exactly the full loss."""
    model, dom = light
    rows = [([0, 3, 5], [3, 5, 7]), ([2, 2], [2, 9]), ([11], [4])]
    full = TrainConfig(tau=0.05, mask_current_item=mask)
    sampled = TrainConfig(tau=0.05, mask_current_item=mask, negatives="sampled", num_negatives=dom.num_items)
    inputs = torch.tensor([[0, 3, 5], [-1, 2, 2], [-1, -1, 11]])
    with torch.no_grad():
        want = float(_batch_loss(model, dom, rows, full, None, torch.device("cpu")))
        out = model(dom, "positions", inputs)
        targets = torch.tensor([[3, 5, 7], [-1, 2, 9], [-1, -1, 4]])
        valid = inputs >= 0
        got = float(_sampled_loss(model, dom, out[valid] / 0.05, targets[valid], inputs[valid], sampled,
                                  torch.device("cpu")))
    assert got == pytest.approx(want, rel=1e-5)


def test_sampled_softmax_matches_a_hand_computed_estimate(light):
    """A subset of items: the loss is -log of the target's share of exp(logit) over the target plus the drawn
    non-target items, each of those weighted by N / num_negatives (and the current item left out). Over several
    draws, so that the target and the current item are among the drawn items in some of them."""
    model, dom = light
    rows = [([0, 3], [3, 5])]
    cfg = TrainConfig(tau=0.05, negatives="sampled", num_negatives=5, mask_current_item=True)
    hits = 0
    for seed in range(12):
        with torch.no_grad():
            torch.manual_seed(seed)
            got = float(_batch_loss(model, dom, rows, cfg, None, torch.device("cpu")))
            torch.manual_seed(seed)
            drawn = torch.randperm(dom.num_items)[:5].tolist()
            items = model(dom, "items", torch.arange(dom.num_items))
            h = model(dom, "positions", torch.tensor([[0, 3]]))[0]
        losses = []
        for pos, (cur, tgt) in enumerate([(0, 3), (3, 5)]):
            logit = lambda j: float(h[pos] @ items[j]) / 0.05
            others = sum(math.exp(logit(j)) * dom.num_items / 5 for j in drawn if j not in (tgt, cur))
            losses.append(-logit(tgt) + math.log(math.exp(logit(tgt)) + others))
            hits += tgt in drawn or cur in drawn
        assert got == pytest.approx(sum(losses) / 2, rel=1e-5), seed
    assert hits >= 3, "some draws must contain a target or the current item"