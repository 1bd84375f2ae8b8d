"""Pseudo-users from a catalog view only (MergeRec stage 3).

A pseudo-user of a domain is one catalog item i, read as a user whose history is the single item i. The
server picks them without any user data: all items, a random subset, or the items nearest to the centroids
of a k-means over item embeddings (e.g. the frozen item-text features). The result is a sorted, unique
LongTensor of item ids, which is what is sent to the silo.
"""

from __future__ import annotations

from typing import Literal

import torch

Strategy = Literal["all", "random", "kmeans"]


def select_pseudo_users(num_items: int, strategy: Strategy = "all", n: int | None = None,
                        item_embeddings: torch.Tensor | None = None, seed: int = 0, *,
                        kmeans_iters: int = 10, kmeans_init: str = "kmeans++",
                        chunk_size: int = 4096) -> torch.Tensor:
    """Item ids (LongTensor [P], sorted, unique, each in [0, num_items)) to use as pseudo-users.

    - ``all``: every item (``n`` ignored).
    - ``random``: ``n`` items uniformly without replacement (seeded).
    - ``kmeans``: k-means with ``n`` clusters over ``item_embeddings`` [N, F] (Euclidean, seeded init, at most
      ``kmeans_iters`` Lloyd steps), then the item nearest each centroid; duplicates are merged, so P <= n.
      Distances are computed in chunks of ``chunk_size`` items x n centroids, never N x N.
    ``n`` None or >= num_items means all items for every strategy.
    """
    if num_items <= 0:
        raise ValueError(f"num_items must be positive, got {num_items}")
    if strategy not in ("all", "random", "kmeans"):
        raise ValueError(f"unknown pseudo-user strategy {strategy!r} (all, random, kmeans)")
    if n is not None and n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if strategy == "all" or n is None or n >= num_items:
        return torch.arange(num_items, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    if strategy == "random":
        return torch.randperm(num_items, generator=gen)[:n].sort().values
    if item_embeddings is None:
        raise ValueError("strategy 'kmeans' needs item_embeddings [N, F]")
    if item_embeddings.dim() != 2 or item_embeddings.shape[0] != num_items:
        raise ValueError(f"item_embeddings must be [{num_items}, F], got {list(item_embeddings.shape)}")
    x = item_embeddings.detach().to(torch.float32)
    centroids = kmeans(x, n, iters=kmeans_iters, init=kmeans_init, generator=gen, chunk_size=chunk_size)
    nearest = _nearest_items(x, centroids, chunk_size)
    return torch.unique(nearest)  # sorted


def _sq_dist(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [len(x), len(c)], clamped at 0."""
    return (x_sq[:, None] - 2.0 * (x @ c.T) + c_sq[None, :]).clamp_min_(0.0)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    best = _sq_dist(x, x_sq, x[first:first + 1], x_sq[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        total = float(best.sum())
        if total <= 0.0:  # every remaining point coincides with a centroid: pick uniformly among the unchosen
            free = torch.ones(n, dtype=torch.bool)
            free[torch.tensor(chosen)] = False
            cand = torch.nonzero(free).squeeze(1)
            nxt = int(cand[torch.randint(len(cand), (1,), generator=gen)])
        else:
            nxt = int(torch.multinomial(best, 1, generator=gen))
        chosen.append(nxt)
        d = _sq_dist(x, x_sq, x[nxt:nxt + 1], x_sq[nxt:nxt + 1]).squeeze(1)
        torch.minimum(best, d, out=best)
    return x[torch.tensor(chosen)].clone()


def _assign(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    c_sq = (c * c).sum(1)
    out = torch.empty(x.shape[0], dtype=torch.long)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = _sq_dist(x[s:s + chunk], x_sq[s:s + chunk], c, c_sq).argmin(1)
    return out


def kmeans(x: torch.Tensor, k: int, *, iters: int = 10, init: str = "kmeans++",
           generator: torch.Generator | None = None, chunk_size: int = 4096) -> torch.Tensor:
    """Centroids [k, F] of Lloyd's k-means on x [N, F] (k <= N). Empty clusters keep their centroid."""
    n = x.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if init == "kmeans++":
        c = _kmeanspp(x, k, gen)
    elif init == "random":
        c = x[torch.randperm(n, generator=gen)[:k]].clone()
    else:
        raise ValueError(f"unknown k-means init {init!r}")
    x_sq = (x * x).sum(1)
    assign = None
    for _ in range(iters):
        new = _assign(x, x_sq, c, chunk_size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c


def _nearest_items(x: torch.Tensor, c: torch.Tensor, chunk: int) -> torch.Tensor:
    """For each centroid, the index of the nearest row of x (chunked over x)."""
    x_sq = (x * x).sum(1)
    c_sq = (c * c).sum(1)
    best_d = torch.full((c.shape[0],), float("inf"))
    best_i = torch.zeros(c.shape[0], dtype=torch.long)
    for s in range(0, x.shape[0], chunk):
        d = _sq_dist(x[s:s + chunk], x_sq[s:s + chunk], c, c_sq)  # [chunk, k]
        val, idx = d.min(0)
        better = val < best_d
        best_d[better] = val[better]
        best_i[better] = idx[better] + s
    return best_i
