"""Training the gates of an integrated model (common/model/integration.py) at the server, on pseudo-users, with
MergeRec's loss (CE toward the teacher's best item + distillation toward the silos' top-k teacher logits).

The data path is coefficient learning's (common/model/coefficients.py): the same `DomainBatchSource`s, the
same pseudo-user split (`split_rows`) and batches, the same per-pseudo-user loss (`pseudo_user_losses`) and
held-out loss (`mean_loss`). Only the gate parameters get gradients; every other parameter (shared non-block
weights and the K block sets) stays fixed. Item embeddings depend only on the shared adaptor, so they are
encoded once. Inputs are item ids, catalog-derived features and teacher logits: no user data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from common.model.integration import IntegratedRecommender
from common.model.coefficients import (
    CoefficientConfig,
    DomainBatchSource,
    _Batches,
    encode_items,
    mean_loss,
    pseudo_user_losses,
    split_rows,
)

log = logging.getLogger(__name__)


@dataclass
class GateResult:
    """history[i] = {"step", "loss"} (training loss before step i's update); holdout = {"step", "loss"} on the
    held-out pseudo-users (step 0 = the uniform start); the model holds the chosen gates (best held-out step,
    else the last)."""

    history: list[dict] = field(default_factory=list)
    holdout: list[dict] = field(default_factory=list)
    chosen_step: int = 0


def gate_parameters(model: IntegratedRecommender) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("gates.")}


def _step(model, params, domains, batch, items, cfg) -> torch.Tensor:
    per = [pseudo_user_losses(model, params, domains[d], rows, items[d], cfg) for d, rows in batch]
    return torch.cat(per).mean()


def _train(model: IntegratedRecommender, domains: Sequence[DomainBatchSource], cfg: CoefficientConfig,
           steps: int, lr: float) -> GateResult:
    if not domains or any(s.teacher is None for s in domains):
        raise ValueError("gate training needs teacher logits for every domain")
    gates = gate_parameters(model)
    for n, p in model.named_parameters():
        p.requires_grad_(n in gates)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(int(cfg.seed))
    train_rows, hold_rows = split_rows(domains, cfg.holdout_fraction, gen)
    batches = _Batches(train_rows, cfg.batch_size, gen)
    model.eval()
    with torch.no_grad():
        items = {d: encode_items(model, params, s, cfg.item_batch_size) for d, s in enumerate(domains)}
    use_holdout = any(r.numel() for r in hold_rows)
    res = GateResult()
    best = (float("inf"), 0, None)

    def check(step: int) -> None:
        nonlocal best
        h = mean_loss(model, params, domains, hold_rows, cfg, items)
        res.holdout.append({"step": step, "loss": h})
        if h < best[0]:
            best = (h, step, {n: p.detach().clone() for n, p in gates.items()})

    opt = torch.optim.Adam(list(gates.values()), lr=lr)
    if use_holdout:
        check(0)
    for step in range(1, steps + 1):
        model.train(cfg.dropout)
        loss = _step(model, params, domains, batches.next(), items, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        res.history.append({"step": step, "loss": float(loss.detach())})
        if use_holdout and (step % cfg.eval_every == 0 or step == steps):
            check(step)
        if step % cfg.log_every == 0 or step == steps:
            log.info("gates: step %d/%d loss %.4f%s", step, steps, res.history[-1]["loss"],
                     f" holdout {res.holdout[-1]['loss']:.4f}" if use_holdout else "")
    res.chosen_step = steps
    if use_holdout and best[2] is not None:
        with torch.no_grad():
            for n, t in best[2].items():
                gates[n].copy_(t)
        res.chosen_step = best[1]
    return res


def train_gates(model: IntegratedRecommender, domains: Sequence[DomainBatchSource], cfg: CoefficientConfig,
                *, steps: int, lr: float) -> GateResult:
    """Adam on the gates of `model` (in place) for `steps` steps at `lr`; loss, batch size, held-out fraction,
    dropout and seed from `cfg` (coefficient learning's). Seeded in a forked RNG scope, like
    `learn_coefficients`; the model is left in eval mode with no parameter requiring grad."""
    if cfg.loss != "mergerec":
        raise ValueError("gate training uses the mergerec loss")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        try:
            return _train(model, domains, cfg, steps, lr)
        finally:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
