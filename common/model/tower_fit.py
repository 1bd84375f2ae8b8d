"""Item-tower fit (the last step of MergeRec on the light backbone): on catalog items only, teach the merged
model's item tower to reproduce what each domain's own fine-tuned model makes of that domain's items.

Why: with the transformer blocks frozen, a light task vector is almost entirely its item adaptor (a linear map over
frozen text features), and the domains' adaptors disagree in ways no weighted sum of them reproduces (their
differences are not low-rank; docs/benchmarks.md). The backbone's item tower therefore has a second, wider path,
``adaptor_mlp`` (zero output at the base, never trained in a silo); the server fits the linear adaptor and that
residual together, so that for every item i of domain d::

    normalize(tower(x_i)) ~ normalize(tower_d(x_i))        (cosine loss, every domain weighted equally)

where ``tower_d`` is domain d's fine-tuned item tower, i.e. base + task vector, which the server already holds.
Inputs are the server's catalog view (item texts -> frozen features) and the task vectors: no user data and no new
message. Every parameter outside the item tower (positions, blocks) keeps its merged value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from common.model.backbones import ITEM_MLP, DomainInputs, items_in_batches

log = logging.getLogger(__name__)

#: parameter-name prefixes of the light backbone's item tower (what the fit changes)
ITEM_TOWER = ("adaptor.", ITEM_MLP)


def has_item_tower(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state has a fittable item tower (the light backbone's adaptor)."""
    return "adaptor.weight" in state


@torch.no_grad()
def item_outputs(model: nn.Module, state: Mapping[str, torch.Tensor], dom: DomainInputs,
                 batch_size: int = 4096) -> torch.Tensor:
    """[N, d] L2-normalised item embeddings of the domain's whole catalog under `state` (CPU, float32)."""
    params = {n: t.float() for n, t in state.items()}
    return items_in_batches(lambda ids: functional_call(model, params, (dom, "items", ids)), dom,
                            torch.device("cpu"), batch_size)


def fit_item_tower(model: nn.Module, merged: Mapping[str, torch.Tensor], doms: Sequence[DomainInputs],
                   targets: Sequence[torch.Tensor], *, epochs: int, lr: float = 1e-3, batch_size: int = 512,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """A copy of `merged` whose item-tower parameters (ITEM_TOWER) are trained for `epochs` passes over every item
    of `doms` (Adam, `lr`, minibatches of `batch_size` items drawn by a `seed`ed generator) to minimise the mean
    over items of w_d * (1 - cos(tower(x_i), targets[d][i])), w_d = N / (D * N_d), so each domain counts equally
    whatever its catalog size. targets[d]: [N_d, dim] (any scale; compared by cosine). CPU, float32."""
    if len(doms) != len(targets) or not doms:
        raise ValueError(f"{len(doms)} domains but {len(targets)} target tables")
    for dom, tgt in zip(doms, targets):
        if dom.features is None or tgt.shape[0] != dom.num_items:
            raise ValueError(f"{dom.domain}: item-tower targets need item features and one row per item "
                             f"({tgt.shape[0]} rows, {dom.num_items} items)")
    params = {n: t.detach().float().clone() for n, t in merged.items()}
    tower = [n for n in params if n.startswith(ITEM_TOWER)]
    if not tower or epochs == 0:
        return params
    for n in tower:
        params[n].requires_grad_(True)
    # all catalogs as one table: the tower sees only an item's features, not its domain
    joint = DomainInputs("item-tower-fit", sum(d.num_items for d in doms),
                         features=torch.cat([d.features.float() for d in doms]))
    goal = nn.functional.normalize(torch.cat([t.float() for t in targets]), dim=-1)
    weight = torch.cat([torch.full((d.num_items,), joint.num_items / (len(doms) * d.num_items)) for d in doms])
    opt = torch.optim.Adam([params[n] for n in tower], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    t0, loss = time.perf_counter(), torch.tensor(float("nan"))
    try:
        for epoch in range(epochs):
            order = torch.randperm(joint.num_items, generator=gen)
            for s in range(0, joint.num_items, batch_size):
                ids = order[s:s + batch_size]
                out = functional_call(model, params, (joint, "items", ids))  # normalised by the model
                loss = ((1.0 - (out * goal[ids]).sum(-1)) * weight[ids]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if epoch == 0 or (epoch + 1) % 10 == 0 or epoch + 1 == epochs:
                log.info("item-tower fit: epoch %d/%d loss %.4f (%.0f s)", epoch + 1, epochs, float(loss.detach()),
                         time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return {n: t.detach() for n, t in params.items()}
