"""The fine-tuning loss (common.model.train._batch_loss) against a loop written out by hand."""

import math

import pytest
import torch
from torch.nn import functional as F

from common.model.backbones import DomainInputs, LightRecommender
from common.model.config import BackboneConfig, TrainConfig
from common.model.train import _batch_loss


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


#: (seen_items, mask_current_item) -> which input items a position's softmax leaves out
MASKS = {("rank", False): "none", ("rank", True): "current", ("exclude", False): "prefix", ("exclude", True): "prefix"}


@torch.no_grad()
def _reference(model, dom, rows, tau, mask):
    """Mean over every (history prefix, next item) pair of -log softmax over all items, one pair at a time.
    mask: "none", "current" (the last input item) or "prefix" (every input item so far); never the target."""
    items = model(dom, "items", torch.arange(dom.num_items))
    losses = []
    for inputs, targets in rows:
        for t in range(len(inputs)):
            h = model(dom, "histories", torch.tensor([inputs[: t + 1]]))[0]
            logits = [float(h @ items[j]) / tau for j in range(dom.num_items)]
            left_out = {"none": [], "current": [inputs[t]], "prefix": inputs[: t + 1]}[mask]
            for j in left_out:
                if j != targets[t]:
                    logits[j] = -math.inf
            norm = math.log(sum(math.exp(v) for v in logits if v != -math.inf))
            losses.append(norm - logits[targets[t]])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seen,current", sorted(MASKS))
def test_causal_full_softmax_loss_matches_reference(light, seen, current):
    model, dom = light
    rows = [([0, 3, 5], [3, 5, 7]), ([2, 2], [2, 9]), ([11, 4, 0], [4, 0, 11])]  # [2 -> 2]: a repeat, never masked
    cfg = TrainConfig(tau=0.05, seen_items=seen, mask_current_item=current, negatives="full")
    with torch.no_grad():
        got = float(_batch_loss(model, dom, rows, cfg, None, torch.device("cpu")))
    assert got == pytest.approx(_reference(model, dom, rows, 0.05, MASKS[(seen, current)]), rel=1e-4)


def test_masks_lower_the_loss_when_seen_items_outscore_the_target(light):
    model, dom = light
    rows = [([0, 3, 5], [3, 5, 7])]
    with torch.no_grad():
        losses = [float(_batch_loss(model, dom, rows, TrainConfig(seen_items=s, mask_current_item=m,
                                                                  negatives="full"), None, torch.device("cpu")))
                  for s, m in (("rank", False), ("rank", True), ("exclude", True))]
    assert losses[2] <= losses[1] < losses[0]


def test_inbatch_mask_only_hits_candidates(light):
    """In-batch negatives: the current item is masked only where it is one of the batch's target candidates."""
    model, dom = light
    rows = [([0, 3], [3, 5]), ([5], [0])]
    cfg = TrainConfig(negatives="inbatch", seen_items="rank", mask_current_item=True)
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


@pytest.mark.parametrize("seen,current", sorted(MASKS))
def test_sampled_softmax_over_every_item_is_the_full_softmax(light, seen, current):
    """negatives='sampled' drawing all N items: same candidates, zero log-weight, so exactly the full loss."""
    model, dom = light
    rows = [([0, 3, 5], [3, 5, 7]), ([2, 2], [2, 9]), ([11], [4])]
    full = TrainConfig(tau=0.05, seen_items=seen, mask_current_item=current, negatives="full")
    sampled = full.model_copy(update={"negatives": "sampled", "num_negatives": dom.num_items})
    with torch.no_grad():
        want = float(_batch_loss(model, dom, rows, full, None, torch.device("cpu")))
        got = float(_batch_loss(model, dom, rows, sampled, None, torch.device("cpu")))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("seen", ["rank", "exclude"])
def test_sampled_softmax_matches_a_hand_computed_estimate(light, seen):
    """A subset of items: the loss is -log of the target's share of exp(logit) over the target plus the drawn
    non-target items, each of those weighted by N / num_negatives (and the current item, or with seen-items
    exclude every input item so far, left out). Over several draws, so that the target and the left-out items
    are among the drawn items in some of them."""
    model, dom = light
    rows = [([0, 3], [3, 5])]
    cfg = TrainConfig(tau=0.05, negatives="sampled", num_negatives=5, seen_items=seen, mask_current_item=True)
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
        for pos, tgt in enumerate([3, 5]):
            left_out = {0, 3} if seen == "exclude" and pos == 1 else {[0, 3][pos]}
            logit = lambda j: float(h[pos] @ items[j]) / 0.05
            others = sum(math.exp(logit(j)) * dom.num_items / 5 for j in drawn if j != tgt and j not in left_out)
            losses.append(-logit(tgt) + math.log(math.exp(logit(tgt)) + others))
            hits += tgt in drawn or bool(left_out & set(drawn))
        assert got == pytest.approx(sum(losses) / 2, rel=1e-5), seed
    assert hits >= 3, "some draws must contain a target or a left-out item"
