"""Training-free merges as one family: sparsify x sign consensus x weighting.

``process(task_vectors, cfg, seed)`` turns the task vectors ``tau_d`` into processed vectors ``v_d`` and
weights ``w_d`` (a ``MergePlan``) such that

    merged = base + sum_d w_d * v_d                       (``merge(base, plan.vectors, plan.weights)``)

Steps, each chosen by a field of ``MergeConfig``:

1. sparsify each ``tau_d`` independently
   - ``none``
   - ``magnitude``: keep the ``density`` fraction of entries with the largest ``|tau_d|``; ``scope="global"``
     ranks over the whole model per task (the MergeRec reference TIES), ``scope="tensor"`` per tensor (peft).
     Exactly ``int(density * count)`` entries are kept; ties at the threshold go to the earlier entry (sorted
     parameter names, row-major order).
   - ``dare``: drop each entry with probability ``drop_prob`` (seeded ``torch.Generator``), rescale the rest by
     ``1 / (1 - drop_prob)`` when ``rescale``.
   - ``breadcrumbs``: drop the ``beta`` fraction of largest ``|tau_d|`` and keep the next ``density`` fraction
     (fractions of all entries of the tensor, or of the model with ``scope="global"``); the smallest go.
2. consensus
   - ``none``: linear sum.
   - ``ties``: per coordinate, elect a sign (``elect="sum"``: sign of the sum of the sparsified values;
     ``"count"``: the more frequent sign; a tie elects +), keep only entries with the elected sign, and divide
     each by the number of tasks kept at that coordinate (disjoint mean). The division is folded into ``v_d``.
3. weighting: ``w_d = lam`` (or ``lam / D`` with ``average=True``).

Registered methods and their defaults (``config_for(name)``):

- ``weight_average``: no sparsity, w = 1/D.
- ``task_arithmetic``: no sparsity, lambda 0.3 (the usual task-arithmetic choice; MergeRec learns from 0.2).
- ``magnitude_prune``: global magnitude top-20 %, linear, lambda 0.3.
- ``ties``: global magnitude top-20 % + TIES (sum election, disjoint mean), lambda 1.0 (as MergeRec).
- ``dare_linear``: DARE p = 0.5 + linear, lambda 0.3.
- ``dare_ties``: DARE p = 0.5 + TIES, lambda 1.0. p = 0.5 rather than DARE's LLM setting (0.9): our task vectors
  are full fine-tunes of small models, where heavy drop-and-rescale amplifies noise by 1/(1-p).
- ``breadcrumbs``: per tensor, drop the top 1 % and keep the next 90 % (bottom 9 % dropped), linear, lambda 0.3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.merging.task_vectors import State, apply, check_compatible

__all__ = ["MergeConfig", "MergePlan", "REGISTRY", "config_for", "merge", "method_names", "process", "register",
           "topk_mask"]


class MergeConfig(BaseModel):
    """One training-free merge. Fields that a step does not use are ignored by it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = Field("custom", description="name, for reports only")
    sparsify: Literal["none", "magnitude", "dare", "breadcrumbs"] = "none"
    density: float = Field(1.0, gt=0.0, le=1.0, description="magnitude/breadcrumbs: fraction of entries kept")
    scope: Literal["global", "tensor"] = Field("global", description="magnitude/breadcrumbs ranking scope")
    drop_prob: float = Field(0.0, ge=0.0, lt=1.0, description="dare: probability of dropping an entry")
    rescale: bool = Field(True, description="dare: divide kept entries by 1 - drop_prob")
    beta: float = Field(0.0, ge=0.0, lt=1.0, description="breadcrumbs: fraction of largest entries dropped")
    consensus: Literal["none", "ties"] = "none"
    elect: Literal["sum", "count"] = Field("sum", description="ties: sign election by summed value or by count")
    lam: float = Field(1.0, description="weight of every processed vector (lambda)")
    average: bool = Field(False, description="weights = lam / D instead of lam")

    @model_validator(mode="after")
    def _check(self) -> "MergeConfig":
        if self.sparsify == "breadcrumbs" and self.beta + self.density > 1.0 + 1e-12:
            raise ValueError(f"breadcrumbs: beta ({self.beta}) + density ({self.density}) must be <= 1")
        return self


@dataclass
class MergePlan:
    """Processed vectors and their weights: merged = base + sum_d weights[d] * vectors[d]."""

    vectors: list[State]
    weights: list[float]
    config: MergeConfig | None = None
    stats: dict = field(default_factory=dict)


REGISTRY: dict[str, MergeConfig] = {}


def register(name: str, cfg: MergeConfig) -> None:
    """Add (or replace) a named method."""
    REGISTRY[name] = cfg.model_copy(update={"method": name})


def method_names() -> list[str]:
    return sorted(REGISTRY)


def config_for(name: str, **overrides) -> MergeConfig:
    """The registered config of ``name`` with ``overrides`` applied (validated)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(method_names())}")
    return MergeConfig.model_validate({**REGISTRY[name].model_dump(), **overrides})


register("weight_average", MergeConfig(average=True, lam=1.0))
register("task_arithmetic", MergeConfig(lam=0.3))
register("magnitude_prune", MergeConfig(sparsify="magnitude", density=0.2, scope="global", lam=0.3))
register("ties", MergeConfig(sparsify="magnitude", density=0.2, scope="global", consensus="ties", lam=1.0))
register("dare_linear", MergeConfig(sparsify="dare", drop_prob=0.5, lam=0.3))
register("dare_ties", MergeConfig(sparsify="dare", drop_prob=0.5, consensus="ties", lam=1.0))
register("breadcrumbs", MergeConfig(sparsify="breadcrumbs", beta=0.01, density=0.9, scope="tensor", lam=0.3))


# ----------------------------------------------------------------------------------------------- sparsifiers


def topk_mask(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (same shape) of the ``min(k, numel)`` largest entries of non-negative ``magnitudes``.

    Uses one ``kthvalue`` (selection, no full sort); ties at the threshold go to the earliest entries. When
    fewer than k entries are non-zero, only those are marked (the zeros would contribute nothing).
    """
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest
    mask = flat > threshold
    if threshold <= 0:
        return mask.view(magnitudes.shape)
    extra = k - int(mask.sum())
    if extra > 0:
        mask[torch.nonzero(flat == threshold).squeeze(1)[:extra]] = True
    return mask.view(magnitudes.shape)


def _band_mask(magnitudes: torch.Tensor, skip_fraction: float, keep_fraction: float) -> torch.Tensor:
    """Entries ranked (by magnitude, largest first) in [skip, skip + keep) of ``numel``."""
    n = magnitudes.numel()
    skip = int(skip_fraction * n)
    keep = int(keep_fraction * n)
    mask = topk_mask(magnitudes, skip + keep)
    if skip > 0:
        mask &= ~topk_mask(magnitudes, skip)
    return mask


def _rank_sparsify(vector: State, names: list[str], skip: float, keep: float, scope: str) -> State:
    if scope == "tensor":
        return {n: vector[n] * _band_mask(vector[n].abs(), skip, keep) for n in names}
    flat = torch.cat([vector[n].reshape(-1).abs() for n in names])
    mask = _band_mask(flat, skip, keep)
    del flat
    out, start = {}, 0
    for n in names:
        t = vector[n]
        out[n] = t * mask[start:start + t.numel()].view(t.shape)
        start += t.numel()
    return out


def _dare(vector: State, names: list[str], p: float, rescale: bool, gen: torch.Generator) -> State:
    scale = 1.0 / (1.0 - p) if rescale else 1.0
    out = {}
    for n in names:
        t = vector[n]
        keep = torch.rand(t.shape, generator=gen, dtype=torch.float32) >= p
        out[n] = t * keep * scale
    return out


def _sparsify(vector: State, names: list[str], cfg: MergeConfig, gen: torch.Generator) -> State:
    if cfg.sparsify == "none":
        return {n: vector[n].clone() for n in names}
    if cfg.sparsify == "magnitude":
        return _rank_sparsify(vector, names, 0.0, cfg.density, cfg.scope)
    if cfg.sparsify == "breadcrumbs":
        return _rank_sparsify(vector, names, cfg.beta, cfg.density, cfg.scope)
    if cfg.sparsify == "dare":
        return _dare(vector, names, cfg.drop_prob, cfg.rescale, gen)
    raise ValueError(f"unknown sparsifier {cfg.sparsify!r}")


# ------------------------------------------------------------------------------------------------- consensus


def _ties_consensus(vectors: list[State], names: list[str], elect: str) -> None:
    """In place: keep entries agreeing with the elected sign, divided by the number of agreeing tasks."""
    for n in names:
        stacked = torch.stack([v[n] for v in vectors])  # [D, *shape]
        signs = stacked.sign()
        score = stacked.sum(0) if elect == "sum" else signs.sum(0)
        elected = torch.where(score >= 0, 1.0, -1.0).to(stacked.dtype)
        agree = signs == elected  # zeros (pruned entries) never agree
        count = agree.sum(0).clamp_min(1).to(stacked.dtype)
        kept = stacked * agree / count
        for d, v in enumerate(vectors):
            v[n] = kept[d]


# ---------------------------------------------------------------------------------------------------- entry


def process(task_vectors: Sequence[Mapping[str, torch.Tensor]], cfg: MergeConfig | str,
            seed: int = 0, generator: torch.Generator | None = None) -> MergePlan:
    """Processed vectors ``v_d`` and weights ``w_d`` (see the module docstring). Inputs are not modified.

    ``seed`` seeds DARE's drop masks (a fresh CPU generator) unless ``generator`` is given. All vectors must
    share names and shapes.
    """
    if isinstance(cfg, str):
        cfg = config_for(cfg)
    if not task_vectors:
        raise ValueError("no task vectors to merge")
    names = sorted(task_vectors[0])
    for d, v in enumerate(task_vectors[1:], start=1):
        check_compatible(v, task_vectors[0], f"task vector {d}")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    vectors = [_sparsify(v, names, cfg, generator) for v in task_vectors]
    if cfg.consensus == "ties":
        _ties_consensus(vectors, names, cfg.elect)
    total = sum(t.numel() for t in vectors[0].values())
    kept = [sum(int(torch.count_nonzero(v[n])) for n in names) / max(total, 1) for v in vectors]
    d = len(vectors)
    w = cfg.lam / d if cfg.average else cfg.lam
    return MergePlan(vectors=vectors, weights=[float(w)] * d, config=cfg, stats={"nonzero_fraction": kept})


def merge(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
          weights: Sequence[float | Mapping[str, float]], group_of=None) -> State:
    """``base + sum_d weights[d] * vectors[d]`` (see ``task_vectors.apply``)."""
    return apply(base, vectors, weights, group_of)
