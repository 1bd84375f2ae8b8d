"""Pseudo-user selection from a catalog view: all / random / k-means."""

from __future__ import annotations

import pytest
import torch

from common.merging import pseudo_users
from common.merging.pseudo_users import kmeans, select_pseudo_users


def _sorted_unique(ids, n_items):
    return ids.dtype == torch.long and torch.equal(ids, torch.unique(ids)) and int(ids.min()) >= 0 \
        and int(ids.max()) < n_items


def test_all_and_random():
    assert torch.equal(select_pseudo_users(7), torch.arange(7))
    assert torch.equal(select_pseudo_users(7, "all", n=3), torch.arange(7))
    a = select_pseudo_users(100, "random", n=10, seed=1)
    assert a.numel() == 10 and _sorted_unique(a, 100)
    assert torch.equal(a, select_pseudo_users(100, "random", n=10, seed=1))
    assert not torch.equal(a, select_pseudo_users(100, "random", n=10, seed=2))
    assert torch.equal(select_pseudo_users(5, "random", n=50), torch.arange(5))
    assert torch.equal(select_pseudo_users(5, "random", n=None), torch.arange(5))


def _blobs(centers, per, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    pts = torch.cat([c + spread * torch.randn(per, c.numel(), generator=g) for c in centers])
    perm = torch.randperm(pts.shape[0], generator=g)
    return pts[perm], perm


def test_kmeans_picks_one_item_per_cluster_nearest_its_centre():
    centers = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 5.0, 5.0]])
    x, perm = _blobs(centers, per=40)
    cluster_of = perm // 40  # row r of x is point perm[r] of the unshuffled blobs
    ids = select_pseudo_users(200, "kmeans", n=5, item_embeddings=x, seed=0, chunk_size=17)
    assert ids.numel() == 5 and _sorted_unique(ids, 200)
    assert sorted(cluster_of[ids].tolist()) == [0, 1, 2, 3, 4]
    # each chosen item is the member of its blob nearest to that blob's mean (k-means converges to the means)
    for i in ids.tolist():
        members = torch.nonzero(cluster_of == cluster_of[i]).squeeze(1)
        mean = x[members].mean(0)
        assert i == int(members[(x[members] - mean).norm(dim=1).argmin()])
    assert torch.equal(ids, select_pseudo_users(200, "kmeans", n=5, item_embeddings=x, seed=0, chunk_size=64))
    r = select_pseudo_users(200, "kmeans", n=5, item_embeddings=x, seed=0, kmeans_init="random")
    assert r.numel() <= 5 and _sorted_unique(r, 200)


def test_kmeans_chunking_never_builds_n_by_n(monkeypatch):
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(3))
    seen = []
    real = pseudo_users._sq_dist

    def spy(a, a_sq, c, c_sq):
        seen.append((a.shape[0], c.shape[0]))
        return real(a, a_sq, c, c_sq)

    monkeypatch.setattr(pseudo_users, "_sq_dist", spy)
    ids = select_pseudo_users(300, "kmeans", n=20, item_embeddings=x, chunk_size=50)
    assert 0 < ids.numel() <= 20 and _sorted_unique(ids, 300)
    assert all(rows * cols <= 300 * 20 for rows, cols in seen)
    assert max(c for _, c in seen) <= 20


def test_kmeans_duplicates_and_errors():
    x = torch.zeros(10, 2)  # every item identical: all centroids coincide, nearest items dedupe
    ids = select_pseudo_users(10, "kmeans", n=3, item_embeddings=x)
    assert _sorted_unique(ids, 10) and 1 <= ids.numel() <= 3
    with pytest.raises(ValueError, match="item_embeddings"):
        select_pseudo_users(10, "kmeans", n=3)
    with pytest.raises(ValueError, match=r"\[10, F\]"):
        select_pseudo_users(10, "kmeans", n=3, item_embeddings=torch.zeros(9, 2))
    with pytest.raises(ValueError, match="strategy"):
        select_pseudo_users(10, "nearest", n=3)
    with pytest.raises(ValueError):
        select_pseudo_users(10, "random", n=0)
    with pytest.raises(ValueError):
        kmeans(x, 11)
