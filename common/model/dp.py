"""User-level DP-SGD for silo fine-tuning: the plan (noise from the accountant), per-user clipping, the noisy step.

A training row is one user (common/model/train.py builds one row per user: causal backbones train every position
of the user's sequence in it, the text backbone its last item), so clipping a row's gradient clips everything that
user contributes to a step. Each step samples users independently with probability q = batch_size / users (Poisson
sampling, as the accountant assumes), clips every sampled user's gradient to L2 norm `clip`, sums them, adds
N(0, (sigma clip)^2) to every coordinate and divides by the expected batch size q * users. sigma is the smallest
noise multiplier whose planned steps (every epoch fine-tuning may run, the final fit included) stay within the
target epsilon (common/core/dp_accounting.py); stopping early only spends less.

Per-user gradients are a loop of one backward pass per sampled user, not Opacus's per-sample hooks nor torch.func's
vmap: the item tower runs once per batch on a candidate set shared by the batch (not a per-sample input, which
Opacus's hooks need), LoRA parametrizes nn.MultiheadAttention's raw in_proj_weight (which Opacus's grad samplers
do not cover), and the loss selects positions with boolean masks whose shapes depend on the data (which vmap
cannot batch). The loop works for every backbone and for dense and LoRA fine-tuning alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from common.core.dp_accounting import epsilon as rdp_epsilon
from common.core.dp_accounting import noise_for_epsilon


@dataclass
class DPPlan:
    """The noise and sampling of one silo's DP fine-tuning; `steps` counts the noisy steps taken so far."""

    target_epsilon: float
    epsilon: float  # the accountant's epsilon for `planned_steps` at (sample_rate, sigma, delta)
    delta: float
    sigma: float  # noise multiplier: noise std = sigma * clip
    clip: float
    sample_rate: float
    users: int
    steps_per_epoch: int
    planned_steps: int
    order: int  # the Renyi order that gives `epsilon`
    steps: int = 0
    gen: torch.Generator = field(default_factory=torch.Generator, repr=False)

    def summary(self) -> dict:
        """What the silo reports (its guarantee and how it was reached; no user data)."""
        return {"epsilon": self.epsilon, "delta": self.delta, "target_epsilon": self.target_epsilon,
                "noise_multiplier": self.sigma, "clip": self.clip, "sample_rate": self.sample_rate,
                "users": self.users, "planned_steps": self.planned_steps, "steps": self.steps,
                "accountant": "rdp"}


def make_plan(target_epsilon: float, delta: float | None, clip: float, users: int, batch_size: int, epochs: int,
              seed: int, max_steps_per_epoch: int | None = None) -> DPPlan:
    """Plan `epochs` epochs of DP-SGD over `users` training users (each a row): q = batch_size / users, one epoch
    = round(users / batch_size) steps (at most `max_steps_per_epoch`), delta = 1 / users unless given."""
    if users < 2:
        raise ValueError(f"DP fine-tuning needs at least 2 training users (got {users})")
    delta = 1.0 / users if delta is None else delta
    q = min(1.0, batch_size / users)
    per_epoch = max(1, round(users / batch_size))
    if max_steps_per_epoch:
        per_epoch = min(per_epoch, max_steps_per_epoch)
    planned = per_epoch * epochs
    sigma = noise_for_epsilon(target_epsilon, q, planned, delta)
    eps, order = rdp_epsilon(q, sigma, planned, delta)
    gen = torch.Generator().manual_seed(seed)
    return DPPlan(target_epsilon, eps, delta, sigma, clip, q, users, per_epoch, planned, order, gen=gen)


def clipped_user_sum(params: list[torch.Tensor], user_losses, clip: float) -> tuple[list[torch.Tensor], list[float]]:
    """Sum over users of each user's gradient of `params`, each clipped to L2 norm <= `clip` first.
    `user_losses`: an iterable of scalar losses, one per user (each a function of that user's data only).
    Returns (summed gradients, every user's gradient norm before clipping)."""
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for loss in user_losses:
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)  # shared parts reused
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms.append(norm)
        scale = min(1.0, clip / (norm + 1e-12))
        for t, g in zip(total, grads):
            t.add_(g, alpha=scale)
    return total, norms


def noisy_step(plan: DPPlan, params: list[torch.Tensor], n_rows: int,
               user_loss: Callable[[int], torch.Tensor]) -> tuple[list[float], int]:
    """Sample users (each row with probability plan.sample_rate), set every param's .grad to the noisy mean of their
    clipped gradients (divided by the expected batch size), count the step. `user_loss(i)`: row i's loss.
    Returns (the sampled users' losses, how many were sampled). The caller then steps its optimiser."""
    picked = torch.nonzero(torch.rand(n_rows, generator=plan.gen) < plan.sample_rate).flatten().tolist()
    losses = []

    def each():
        for i in picked:
            loss = user_loss(i)
            losses.append(float(loss.detach()))
            yield loss

    total, _ = clipped_user_sum(params, each(), plan.clip)
    expected = plan.sample_rate * n_rows
    for p, t in zip(params, total):
        noise = torch.normal(0.0, plan.sigma * plan.clip, size=tuple(p.shape), generator=plan.gen)
        p.grad = (t + noise.to(device=t.device, dtype=t.dtype)) / expected
    plan.steps += 1
    return losses, len(picked)
