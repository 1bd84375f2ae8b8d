"""MergeRec loss with top-k teacher logits and the AdaMerging entropy."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from common.merging.losses import adamerging_entropy, mergerec_loss


def dense_reference(s, t, tau, kd_weight):
    """The dense loss written out independently: CE on s/tau against argmax t, plus tau^2-scaled KL."""
    ce = F.cross_entropy(s / tau, t.argmax(1))
    kl = F.kl_div(F.log_softmax(s / tau, dim=1), F.softmax(t / tau, dim=1), reduction="batchmean")
    return ce + kd_weight * tau ** 2 * kl


def test_hand_computed_topk():
    # logits s/tau = [0, ln2, 0] -> q = [.25, .5, .25]; teacher top-2 = items (1, 0) with t/tau = (ln3, 0)
    # -> p = (.75, .25) on items (1, 0), zero on item 2. CE = -ln q_1 = ln 2; KL = .75 ln(.75/.5) + .25 ln(.25/.25)
    for tau, kd in [(1.0, 2.0), (0.5, 2.0)]:
        s = torch.tensor([[0.0, math.log(2.0), 0.0]]) * tau
        idx = torch.tensor([[1, 0]])
        val = torch.tensor([[math.log(3.0), 0.0]]) * tau
        expect = math.log(2.0) + kd * tau ** 2 * 0.75 * math.log(1.5)
        got = mergerec_loss(s, idx, val, tau=tau, kd_weight=kd)
        assert got.item() == pytest.approx(expect, rel=1e-6)


def test_k_equals_n_is_the_dense_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(5, 9, generator=g, dtype=torch.float64) * 2 - 1
    t = torch.rand(5, 9, generator=g, dtype=torch.float64) * 2 - 1
    val, idx = t.sort(dim=1, descending=True)
    for tau, kd in [(0.05, 1000.0), (0.2, 3.0)]:
        got = mergerec_loss(s, idx, val, tau=tau, kd_weight=kd)
        torch.testing.assert_close(got, dense_reference(s, t, tau, kd), rtol=1e-10, atol=1e-10)
    # gradients agree too
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    mergerec_loss(s1, idx, val).backward()
    dense_reference(s2, t, 0.05, 1000.0).backward()
    torch.testing.assert_close(s1.grad, s2.grad)


def test_topk_teacher_puts_zero_mass_outside_and_student_normalises_over_all():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(3, 6, generator=g, dtype=torch.float64)
    t = torch.rand(3, 6, generator=g, dtype=torch.float64)
    val, idx = t.topk(2, dim=1)
    tau = 0.1
    # the same loss written densely: teacher probability zero outside its top-2, student over all 6 items
    p = torch.zeros_like(t).scatter_(1, idx, F.softmax(val / tau, dim=1))
    logq = F.log_softmax(s / tau, dim=1)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - logq), torch.zeros_like(p)).sum(1)
    ce = -logq.gather(1, idx[:, :1]).squeeze(1)
    per = mergerec_loss(s, idx, val, tau=tau, kd_weight=7.0, reduction="none")
    torch.testing.assert_close(per, ce + 7.0 * tau ** 2 * kl)
    assert per.shape == (3,)


def test_ce_on_raw_cosines_option():
    s = torch.tensor([[0.2, 0.9, -0.1]])
    idx, val = torch.tensor([[1]]), torch.tensor([[0.5]])
    # k = 1: teacher is one-hot on item 1, so KL = CE(s/tau) and CE is on s (raw) or s/tau
    tau = 0.05
    raw = mergerec_loss(s, idx, val, tau=tau, kd_weight=0.0, ce_scaled=False)
    scaled = mergerec_loss(s, idx, val, tau=tau, kd_weight=0.0)
    assert raw.item() == pytest.approx(F.cross_entropy(s, torch.tensor([1])).item())
    assert scaled.item() == pytest.approx(F.cross_entropy(s / tau, torch.tensor([1])).item())


def test_adamerging_entropy():
    assert adamerging_entropy(torch.zeros(2, 8)).item() == pytest.approx(math.log(8))
    assert adamerging_entropy(torch.tensor([[1.0, -1.0, -1.0]]), tau=0.01).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.tensor([[0.0, math.log(3.0)]])  # tau = 1: p = (.25, .75)
    assert adamerging_entropy(s, tau=1.0).item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert adamerging_entropy(torch.zeros(4, 3), reduction="none").shape == (4,)


def test_shape_errors():
    with pytest.raises(ValueError):
        mergerec_loss(torch.zeros(2, 5), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2))


def test_entropy_ignores_items_left_out_of_the_softmax():
    """A score of -inf (an item the pseudo-user has seen) has probability 0 and adds nothing: the entropy equals
    the entropy over the remaining items, not nan."""
    import torch

    from common.merging.losses import adamerging_entropy

    s = torch.tensor([[0.3, -0.2, 0.5, 0.1]])
    masked = s.clone()
    masked[0, 2] = float("-inf")
    got = adamerging_entropy(masked, tau=0.5)
    want = adamerging_entropy(s[:, [0, 1, 3]], tau=0.5)
    assert torch.isfinite(got) and torch.allclose(got, want)
