"""Full-ranking leave-one-out metrics: Recall@k and NDCG@k with one target per user.

Seen items (`SEEN_ITEMS`): "exclude" (the default) leaves the items of a user's history out of the ranking, as a
recommender serves users (`MergedRecommender.recommend`) and as the S3-Rec-family full-sort tables that report
SASRec, S3-Rec and TIGER on Amazon Beauty/Sports/Toys evaluate; a target the user had already seen then counts as
a miss at every k. "rank" ranks every item of the catalog, history included (MergeRec's own code; domains where
repeat purchases are normal). Every result names its protocol.

Contract: every metric here is an aggregate over users. `RankingAccumulator.result()` is what may leave a
silo; per-user ranks stay inside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

DEFAULT_KS = (1, 5, 10, 50)
MISS = 1 << 62  #: the rank of a target that cannot be recommended (it was already seen): a miss at every k
SeenItems = Literal["exclude", "rank"]
SEEN_ITEMS: dict[str, str] = {"exclude": "items the user has already seen are left out of the ranking",
                              "rank": "every item is ranked, the user's history included"}


def seen_mask(histories: Sequence[Sequence[int]], num_items: int, device=None) -> torch.Tensor:
    """Bool [B, N]: True where item j is in user b's history (every item of it, not only the last ones)."""
    rows = [torch.full((len(h),), b, dtype=torch.long) for b, h in enumerate(histories)]
    cols = [torch.as_tensor(list(h), dtype=torch.long) for h in histories]
    mask = torch.zeros(len(histories), num_items, dtype=torch.bool)
    if rows:
        mask[torch.cat(rows), torch.cat(cols)] = True
    return mask.to(device) if device is not None else mask


def ranks_excluding_seen(scores: torch.Tensor, targets: torch.Tensor, histories: Sequence[Sequence[int]],
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """`target_ranks` with each user's history items left out of the ranking; a target inside its own history
    gets rank MISS (a miss at every k). scores [B, N] (modified in place), targets [B]."""
    seen = seen_mask(histories, scores.shape[1], scores.device)
    lost = seen.gather(1, targets.view(-1, 1).to(seen.device)).squeeze(1)
    scores.masked_fill_(seen, float("-inf"))
    scores[lost] = 0.0  # any finite row: its rank is replaced below
    ranks = target_ranks(scores, targets, generator)
    ranks[lost] = MISS
    return ranks


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """0-based rank of each target among all N items. scores [B,N], targets [B] -> int64 [B].

    rank = #items scored strictly higher + a uniformly random share of the items tied with the target
    (random tie-breaking, seeded by `generator`), so constant scores do not look perfect.
    """
    t = scores.gather(1, targets.view(-1, 1))
    # counting in int32 is ~4x faster on CPU than the default int64 sum of a bool matrix (exact below 2^31 items)
    higher = (scores > t).sum(1, dtype=torch.int32).long()
    ties = (scores == t).sum(1, dtype=torch.int32).long() - 1
    if generator is None or not bool((ties > 0).any()):
        return higher
    u = torch.rand(ties.shape, generator=generator)
    return higher + torch.floor(u * (ties + 1).to(u.dtype)).long()


def metrics_from_ranks(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over users; one relevant item each, so NDCG@k = 1/log2(rank+2) if rank < k."""
    acc = RankingAccumulator(ks)
    acc.add(ranks)
    return acc.result()


class RankingAccumulator:
    """Streams ranks batch by batch and keeps only sums (no per-user values are stored)."""

    def __init__(self, ks=DEFAULT_KS):
        self.ks = tuple(sorted(ks))
        self.count = 0
        self.hits = {k: 0.0 for k in self.ks}
        self.gains = {k: 0.0 for k in self.ks}

    def add(self, ranks: torch.Tensor) -> None:
        r = ranks.to(torch.float64)
        gain = 1.0 / torch.log2(r + 2.0)
        for k in self.ks:
            inside = r < k
            self.hits[k] += float(inside.sum())
            self.gains[k] += float(gain[inside].sum())
        self.count += int(r.numel())

    def result(self) -> dict[str, float]:
        if self.count == 0:
            return {**{f"recall@{k}": math.nan for k in self.ks}, **{f"ndcg@{k}": math.nan for k in self.ks}, "users": 0}
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"recall@{k}"] = self.hits[k] / self.count
        for k in self.ks:
            out[f"ndcg@{k}"] = self.gains[k] / self.count
        out["users"] = self.count
        return out
