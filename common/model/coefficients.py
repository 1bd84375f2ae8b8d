"""Learned merging coefficients (MergeRec stage 5), on the server, from pseudo-users and teacher top-k logits.

The merged model is ``theta(W)[n] = base[n] + sum_d W[d, g(n)] * v_d[n]`` where ``v_d`` are the processed
vectors of a training-free init (``methods.process``) and ``g(n)`` the parameter's group: one group for
task-wise coefficients, the sorted ``layer_of`` groups for layer-wise ones. W [D, G] is the only tensor with
``requires_grad``; ``theta(W)`` is built from one stacked tensor per parameter (``V[n]`` of shape [D, *shape])
and run with ``torch.func.functional_call``, so a step costs one forward/backward of one model plus the
weighted sum, with no copy of the model.

Student scores of a pseudo-user (history = [item i]) of domain d: ``model(dom, "histories", [[i]]) @
model(dom, "items", arange(N_d)).T`` under theta(W) (both L2-normalised by the model, so cosines).
Nothing here touches user data: inputs are item ids, catalog-derived domain inputs and teacher logits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from common.model.backbones import items_in_batches
from common.model.metrics import SeenItems
from common.model.config import INT32_MAX, Count, Seed
from common.merging.losses import adamerging_entropy, mergerec_loss
from common.merging.task_vectors import State, check_compatible
from common.merging.teacher import TopKLogits

log = logging.getLogger(__name__)

#: coefficient init when ``CoefficientConfig.init`` is None, by training-free init method (method.md, stage 5)
DEFAULT_INIT: dict[str, float] = {"task_arithmetic": 0.2, "ties": 1.0, "dare_ties": 1.0, "dare_linear": 0.2,
                                  "magnitude_prune": 0.2, "breadcrumbs": 0.2}


class CoefficientConfig(BaseModel):
    """How the coefficients are learned. Defaults follow MergeRec (Adam 1e-3, 500 steps, 16 pseudo-users).
    Floats must be finite (as in every configuration model, common/core/strict.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    granularity: Literal["task", "layer"] = "task"
    init: float | None = Field(None, description="None: the init method's default (DEFAULT_INIT; 1/D for "
                                                 "weight_average)")
    lr: float = Field(1e-3, gt=0, description="coefficient-learning rate (Adam)")
    steps: int = Field(500, ge=0, le=INT32_MAX, description="coefficient-learning steps")
    batch_size: Count = Field(16, description="pseudo-users per coefficient step")
    kd_weight: float = Field(1000.0, ge=0)
    tau: float = Field(0.05, gt=0)
    loss: Literal["mergerec", "adamerging"] = "mergerec"
    dropout: bool = Field(True, description="model.train() during steps (the reference keeps dropout on)")
    # follows TrainConfig.seen_items in a PipelineConfig (one run-config key, seen-items)
    seen_items: SeenItems = Field("exclude", description="exclude: a pseudo-user's own item is left out of the "
                                  "student's softmax, as the teacher leaves it out of its targets")
    # Python only (not a run-config key: measured useless, docs/benchmarks.md)
    item_refresh_every: int = Field(0, ge=0, le=INT32_MAX, description="0: item embeddings frozen at the init W "
                                    "(reference); K > 0: recomputed, with gradient, every K steps (K = 1: every "
                                    "step)")
    holdout_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="pseudo-users held out to pick the "
                                    "best W (0: off, the last W is returned)")
    # the light backbone's last MergeRec step (common/model/tower_fit.py): catalog items only, server-side
    # (epochs, batch size, lr) picked on validation NDCG@10 over the real domains: docs/benchmarks.md, claim 2
    tower_fit_epochs: int = Field(60, ge=0, le=10_000, description="epochs of the item-tower fit after the "
                                  "coefficients (light backbone; 0 = off)")
    tower_fit_lr: float = Field(1e-3, gt=0, description="item-tower fit learning rate (Adam)")
    tower_fit_batch_size: int = Field(512, ge=1, le=1_000_000, description="items per item-tower fit step")
    eval_every: Count = 50
    item_batch_size: Count = 1024
    seed: Seed = 0
    log_every: Count = 50


def initial_value(cfg: CoefficientConfig, method: str | None, num_tasks: int) -> float:
    """cfg.init, else the default of the init method (0.2 task arithmetic, 1.0 TIES, 1/D weight average)."""
    if cfg.init is not None:
        return float(cfg.init)
    if method == "weight_average":
        return 1.0 / num_tasks
    if method in DEFAULT_INIT:
        return DEFAULT_INIT[method]
    raise ValueError(f"CoefficientConfig.init is None and init method {method!r} has no default; "
                     f"known: {sorted(DEFAULT_INIT) + ['weight_average']}")


@dataclass
class DomainBatchSource:
    """One domain's inputs to coefficient learning.

    dom_inputs: opaque per-domain model input (e.g. ``DomainInputs``); pseudo_item_ids LongTensor [P];
    teacher: top-k logits whose rows follow ``pseudo_item_ids`` (None only for the AdaMerging loss);
    num_items: N (taken from the teacher or ``dom_inputs.num_items`` when omitted).
    """

    dom_inputs: Any
    pseudo_item_ids: torch.Tensor
    teacher: TopKLogits | None = None
    num_items: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        self.pseudo_item_ids = torch.as_tensor(self.pseudo_item_ids, dtype=torch.long).reshape(-1)
        label = self.name or getattr(self.dom_inputs, "domain", "domain")
        if self.teacher is not None:
            if not torch.equal(self.teacher.item_ids, self.pseudo_item_ids):
                raise ValueError(f"{label}: teacher rows do not follow pseudo_item_ids")
            if self.num_items is not None and self.num_items != self.teacher.num_items:
                raise ValueError(f"{label}: num_items {self.num_items} != teacher's {self.teacher.num_items}")
            self.num_items = self.teacher.num_items
        if self.num_items is None:
            self.num_items = getattr(self.dom_inputs, "num_items", None)
        if self.num_items is None:
            raise ValueError(f"{label}: num_items unknown (no teacher and dom_inputs has no num_items)")
        if self.pseudo_item_ids.numel() and int(self.pseudo_item_ids.max()) >= self.num_items:
            raise ValueError(f"{label}: pseudo-user item id out of range [0, {self.num_items})")


class CoefficientMerger:
    """theta(W) = base + sum_d W[d, g(n)] * V[n][d], differentiable in W, without copying any model."""

    def __init__(self, base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
                 group_of: Callable[[str], str] | None = None, granularity: str = "task",
                 device: torch.device | str | None = None):
        if not vectors:
            raise ValueError("no vectors")
        for d, v in enumerate(vectors):
            check_compatible(v, base, f"vector {d}")
        self.names = list(base)
        if granularity == "task":
            self.groups: tuple[str, ...] = ("all",)
            self.group_index = {n: 0 for n in self.names}
        elif granularity == "layer":
            if group_of is None:
                raise ValueError("layer-wise coefficients need group_of(name)")
            labels = {n: group_of(n) for n in self.names}
            self.groups = tuple(sorted(set(labels.values())))
            self.group_index = {n: self.groups.index(labels[n]) for n in self.names}
        else:
            raise ValueError(f"unknown granularity {granularity!r}")
        self.base = {n: base[n].detach().to(device) for n in self.names}
        self.stacked = {n: torch.stack([v[n].detach().to(device=device, dtype=base[n].dtype) for v in vectors])
                        for n in self.names}
        self.num_tasks = len(vectors)
        self.dtype = self.base[self.names[0]].dtype
        self.device = self.base[self.names[0]].device

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_tasks, len(self.groups)

    def initial(self, value: float | torch.Tensor) -> torch.Tensor:
        """Leaf W [D, G] filled with ``value`` (or a copy of a [D, G] / [D] tensor), requires_grad."""
        if isinstance(value, torch.Tensor):
            w = value.detach().to(device=self.device, dtype=self.dtype)
            w = w.reshape(-1, 1).expand(self.shape) if w.dim() == 1 else w
            if tuple(w.shape) != self.shape:
                raise ValueError(f"W must be {list(self.shape)}, got {list(value.shape)}")
            return w.clone().requires_grad_(True)
        return torch.full(self.shape, float(value), dtype=self.dtype, device=self.device, requires_grad=True)

    def merged_params(self, W: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: base[name] + sum_d W[d, g(name)] * V[name][d]}; differentiable in W."""
        if tuple(W.shape) != self.shape:
            raise ValueError(f"W must be {list(self.shape)}, got {list(W.shape)}")
        return {n: self.base[n] + torch.tensordot(W[:, self.group_index[n]], self.stacked[n], dims=1)
                for n in self.names}

    @torch.no_grad()
    def merged_state(self, W: torch.Tensor) -> State:
        """Detached merged state (CPU) for W."""
        return {n: t.detach().cpu().clone() for n, t in self.merged_params(W.detach()).items()}


def merge_with_coefficients(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
                            W: torch.Tensor, groups: Sequence[str],
                            group_of: Callable[[str], str] | None = None) -> State:
    """Merged state from learned W [D, G] and its group labels (one group: task-wise)."""
    W = torch.as_tensor(W)
    granularity = "task" if len(groups) == 1 else "layer"
    merger = CoefficientMerger(base, vectors, group_of, granularity)
    if granularity == "layer" and tuple(groups) != merger.groups:
        raise ValueError(f"groups {list(groups)} do not match the model's {list(merger.groups)}")
    return merger.merged_state(W.to(merger.dtype))


# --------------------------------------------------------------------------------------------------- forward


def encode_items(model: nn.Module, params: Mapping[str, torch.Tensor], source: DomainBatchSource,
                 batch_size: int = 1024) -> torch.Tensor:
    """[N, d] item embeddings of the domain under ``params`` (keeps the graph if grad is enabled)."""
    device = next(iter(params.values())).device
    return items_in_batches(lambda ids: functional_call(model, params, (source.dom_inputs, "items", ids)),
                            source.dom_inputs, device, batch_size)


def pseudo_user_losses(model: nn.Module, params: Mapping[str, torch.Tensor], source: DomainBatchSource,
                       rows: torch.Tensor, item_embeddings: torch.Tensor, cfg: CoefficientConfig) -> torch.Tensor:
    """[b] losses of the pseudo-users at ``rows`` (positions in ``source.pseudo_item_ids``)."""
    device = item_embeddings.device
    hist = source.pseudo_item_ids[rows].view(-1, 1).to(device)  # a history of one item, right-aligned
    q = functional_call(model, params, (source.dom_inputs, "histories", hist))
    scores = q @ item_embeddings.T  # [b, N] cosines
    if cfg.seen_items == "exclude":  # the pseudo-user's own item is no candidate (nor a teacher target)
        scores = scores.masked_fill(torch.nn.functional.one_hot(hist.view(-1), scores.shape[1]).bool(), float("-inf"))
    if cfg.loss == "adamerging":
        return adamerging_entropy(scores, cfg.tau, reduction="none")
    t = source.teacher
    return mergerec_loss(scores, t.indices[rows].to(device), t.values[rows].to(device), cfg.tau, cfg.kd_weight,
                         reduction="none")


def batch_loss(model: nn.Module, merger: CoefficientMerger, W: torch.Tensor, domains: Sequence[DomainBatchSource],
               batch: Sequence[tuple[int, torch.Tensor]], cfg: CoefficientConfig,
               item_embeddings: Mapping[int, torch.Tensor] | None = None,
               encoded: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean loss over a batch given as [(domain index, rows)]: one step of coefficient learning. Domains
    without cached ``item_embeddings`` are encoded under theta(W) (differentiable) and, when ``encoded`` is
    given, put there so the caller can cache them."""
    params = merger.merged_params(W)
    per = []
    for d, rows in batch:
        items = (item_embeddings or {}).get(d)
        if items is None:
            items = encode_items(model, params, domains[d], cfg.item_batch_size)
            if encoded is not None:
                encoded[d] = items
        per.append(pseudo_user_losses(model, params, domains[d], rows, items, cfg))
    return torch.cat(per).mean()


def mean_loss(model: nn.Module, params: Mapping[str, torch.Tensor], domains: Sequence[DomainBatchSource],
              rows: Sequence[torch.Tensor], cfg: CoefficientConfig,
              item_embeddings: Mapping[int, torch.Tensor] | None = None) -> float:
    """Mean pseudo-user loss of the merged model `params` over ``rows[d]`` of each domain d, without gradients
    and with the model in eval mode (dropout off; the mode is left in eval). Item embeddings come from
    ``item_embeddings[d]`` when given, else are encoded under `params`. The held-out loss of coefficient
    learning, and what picks a task-arithmetic lambda in the benchmarks."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for d, r in enumerate(rows):
            if not r.numel():
                continue
            emb = (item_embeddings[d] if item_embeddings is not None
                   else encode_items(model, params, domains[d], cfg.item_batch_size))
            for s in range(0, r.numel(), 256):
                losses = pseudo_user_losses(model, params, domains[d], r[s:s + 256], emb, cfg)
                total += float(losses.sum())
                count += losses.numel()
    return total / max(count, 1)


# -------------------------------------------------------------------------------------------------- learning


@dataclass
class CoefficientResult:
    """W [D, G] chosen (best held-out step, else the last), its groups, per-step training losses
    (``history[i] = {"step", "loss"}``: the loss at the W *before* that step's update), held-out losses
    (``{"step", "loss"}``, step 0 = init) and the final W."""

    W: torch.Tensor
    groups: tuple[str, ...]
    history: list[dict] = field(default_factory=list)
    holdout: list[dict] = field(default_factory=list)
    chosen_step: int = 0
    final_W: torch.Tensor | None = None


def split_rows(domains: Sequence[DomainBatchSource], fraction: float, gen: torch.Generator):
    """(train rows, held-out rows) per domain: a seeded `fraction` of each domain's pseudo-users held out (at
    least one, never all, when fraction > 0), each part sorted."""
    train, hold = [], []
    for src in domains:
        p = src.pseudo_item_ids.numel()
        perm = torch.randperm(p, generator=gen)
        h = 0
        if fraction > 0 and p >= 2:
            h = min(max(1, round(fraction * p)), p - 1)
        hold.append(perm[:h].sort().values)
        train.append(perm[h:].sort().values)
    return train, hold


class _Batches:
    """Epochs over the pooled (domain, row) pairs: each pseudo-user equally likely, so a domain is drawn in
    proportion to its pseudo-user count."""

    def __init__(self, rows: list[torch.Tensor], batch_size: int, gen: torch.Generator):
        self.dom = torch.cat([torch.full((len(r),), d, dtype=torch.long) for d, r in enumerate(rows)])
        self.row = torch.cat(rows)
        if self.dom.numel() == 0:
            raise ValueError("no pseudo-users to learn from")
        self.b, self.gen = batch_size, gen
        self.order, self.ptr = torch.empty(0, dtype=torch.long), 0

    def next(self) -> list[tuple[int, torch.Tensor]]:
        take = []
        need = self.b
        while need > 0:
            if self.ptr >= self.order.numel():
                self.order, self.ptr = torch.randperm(self.dom.numel(), generator=self.gen), 0
            part = self.order[self.ptr:self.ptr + need]
            self.ptr += part.numel()
            need -= part.numel()
            take.append(part)
        sel = torch.cat(take)
        doms, rows = self.dom[sel], self.row[sel]
        return [(int(d), rows[doms == d]) for d in torch.unique(doms)]


def _check_inputs(model: nn.Module, base: Mapping[str, torch.Tensor], domains: Sequence[DomainBatchSource],
                  cfg: CoefficientConfig) -> None:
    names = {n for n, _ in model.named_parameters()}
    if names != set(base):
        diff = sorted(names ^ set(base))
        raise ValueError(f"model parameters and base state differ, e.g. {diff[:3]}")
    if not domains:
        raise ValueError("no domains")
    if cfg.loss == "mergerec":
        missing = [s.name or i for i, s in enumerate(domains) if s.teacher is None]
        if missing:
            raise ValueError(f"mergerec loss needs teacher logits for every domain; missing for {missing}")


def _encode_all(model: nn.Module, merger: CoefficientMerger, W: torch.Tensor, domains: Sequence[DomainBatchSource],
                cfg: CoefficientConfig) -> dict[int, torch.Tensor]:
    """Every domain's item embeddings under theta(W), without gradients (frozen for the whole run when
    item_refresh_every is 0); the model is left in the training mode coefficient learning uses."""
    model.eval()
    with torch.no_grad():
        params = merger.merged_params(W.detach())
        out = {d: encode_items(model, params, src, cfg.item_batch_size) for d, src in enumerate(domains)}
    model.train(cfg.dropout)
    return out


def _step_message(step: int, steps: int, history: list[dict], holdout: list[dict], w: torch.Tensor) -> str:
    return (f"step {step}/{steps} loss {history[-1]['loss']:.4f}"
            + (f" holdout {holdout[-1]['loss']:.4f}" if holdout else "")
            + f" W mean {float(w.mean()):.4f} [{float(w.min()):.4f}, {float(w.max()):.4f}]")


def _learn_coefficients(model: nn.Module, base: Mapping[str, torch.Tensor],
                       vectors: Sequence[Mapping[str, torch.Tensor]], group_of: Callable[[str], str],
                       domains: Sequence[DomainBatchSource], cfg: CoefficientConfig, progress: bool = True, *,
                       method: str | None = None) -> CoefficientResult:
    """Learn W [D, G] by Adam on the MergeRec (or AdaMerging) loss over pseudo-users of all domains.

    ``model``: any module with ``forward(dom_inputs, kind, x)`` (docs/design.md model contract) whose
    parameter names equal ``base``'s; its own parameters are never used nor modified (its train/eval mode is
    restored). ``vectors``: the processed v_d, one per task (the D rows of W; need not equal len(domains)).
    ``method``: the init method's name, for the default init when ``cfg.init`` is None.
    """
    _check_inputs(model, base, domains, cfg)
    device = next(iter(model.parameters())).device
    merger = CoefficientMerger(base, vectors, group_of, cfg.granularity, device=device)
    W = merger.initial(initial_value(cfg, method, merger.num_tasks))
    opt = torch.optim.Adam([W], lr=cfg.lr)
    gen = torch.Generator().manual_seed(int(cfg.seed))
    train_rows, hold_rows = split_rows(domains, cfg.holdout_fraction, gen)
    batches = _Batches(train_rows, cfg.batch_size, gen)
    use_holdout = any(r.numel() for r in hold_rows)

    was_training = model.training
    cache: dict[int, torch.Tensor] = {}
    cache_step: dict[int, int] = {}

    def holdout_loss() -> float:
        loss = mean_loss(model, merger.merged_params(W.detach()), domains, hold_rows, cfg,
                         cache if cfg.item_refresh_every == 0 else None)
        model.train(cfg.dropout)
        return loss

    history: list[dict] = []
    holdout: list[dict] = []
    best = (float("inf"), 0, W.detach().clone())
    try:
        model.train(cfg.dropout)
        if cfg.item_refresh_every == 0:
            cache.update(_encode_all(model, merger, W, domains, cfg))
        if use_holdout:
            h = holdout_loss()
            holdout.append({"step": 0, "loss": h})
            best = (h, 0, W.detach().clone())
        bar = tqdm(range(1, cfg.steps + 1), desc=f"coefficients ({cfg.granularity})", disable=not progress,
                   leave=False)
        for step in bar:
            batch = batches.next()
            # cached item embeddings where still fresh; the others are encoded inside the step's graph
            items = {d: cache[d] for d, _ in batch if cfg.item_refresh_every == 0
                     or (d in cache and step - cache_step[d] < cfg.item_refresh_every)}
            encoded: dict[int, torch.Tensor] = {}
            loss = batch_loss(model, merger, W, domains, batch, cfg, items, encoded)
            for d, e in encoded.items():
                cache[d], cache_step[d] = e.detach(), step
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": float(loss.detach())})
            if use_holdout and (step % cfg.eval_every == 0 or step == cfg.steps):
                h = holdout_loss()
                holdout.append({"step": step, "loss": h})
                if h < best[0]:
                    best = (h, step, W.detach().clone())
            if step % cfg.log_every == 0 or step == cfg.steps:
                log.info(_step_message(step, cfg.steps, history, holdout, W.detach()))
                bar.set_postfix_str(f"loss {history[-1]['loss']:.4f}")
        bar.close()
    finally:
        model.train(was_training)

    final = W.detach().clone()
    if use_holdout:
        chosen_W, chosen_step = best[2], best[1]
    else:
        chosen_W, chosen_step = final, cfg.steps
    return CoefficientResult(W=chosen_W, groups=merger.groups, history=history, holdout=holdout,
                             chosen_step=chosen_step, final_W=final)


def learn_coefficients(model: nn.Module, base: Mapping[str, torch.Tensor],
                       vectors: Sequence[Mapping[str, torch.Tensor]], group_of: Callable[[str], str],
                       domains: Sequence[DomainBatchSource], cfg: CoefficientConfig, progress: bool = True, *,
                       method: str | None = None) -> CoefficientResult:
    """See `_learn_coefficients`. Runs with the global torch RNG seeded from ``cfg.seed`` (dropout draws from
    it) inside a forked RNG scope, so the result does not depend on what ran before in the process (a server
    in a Flower process and one in a test must learn the same W) and the caller's RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        return _learn_coefficients(model, base, vectors, group_of, domains, cfg, progress, method=method)
