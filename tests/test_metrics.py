import math

import numpy as np
import pytest
import torch

from common.model.metrics import MISS, RankingAccumulator, metrics_from_ranks, ranks_excluding_seen, target_ranks


def test_hand_computed_single_user():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    ranks = target_ranks(scores, torch.tensor([2]))
    assert ranks.tolist() == [1]
    m = metrics_from_ranks(ranks, ks=(1, 5))
    assert m["recall@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["recall@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx(1 / math.log2(3))


def test_hand_computed_three_users():
    # ranks 0, 3, 12 -> recall@1 = 1/3, recall@5 = 2/3, recall@10 = 2/3, recall@50 = 1
    m = metrics_from_ranks(torch.tensor([0, 3, 12]))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@5"] == pytest.approx(2 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["recall@50"] == pytest.approx(1.0)
    assert m["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(5)) / 3)
    assert m["ndcg@50"] == pytest.approx((1.0 + 1 / math.log2(5) + 1 / math.log2(14)) / 3)
    assert m["users"] == 3


def test_matches_sorting_implementation():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(64, 300)).astype(np.float32)
    targets = rng.integers(0, 300, size=64)
    # independent: position of the target in a descending argsort
    order = np.argsort(-scores, axis=1, kind="stable")
    expected = np.array([int(np.where(order[i] == targets[i])[0][0]) for i in range(64)])
    got = target_ranks(torch.from_numpy(scores), torch.from_numpy(targets))
    assert got.tolist() == expected.tolist()
    ndcg = np.mean(np.where(expected < 10, 1 / np.log2(expected + 2), 0))
    assert metrics_from_ranks(got)["ndcg@10"] == pytest.approx(ndcg)


def test_ties_are_broken_at_random_not_optimistically():
    scores = torch.zeros(2000, 100)
    ranks = target_ranks(scores, torch.zeros(2000, dtype=torch.long), torch.Generator().manual_seed(0))
    assert ranks.min() >= 0 and ranks.max() <= 99
    assert abs(ranks.float().mean().item() - 49.5) < 3.0
    assert metrics_from_ranks(ranks)["recall@10"] == pytest.approx(0.1, abs=0.03)


def test_accumulator_streams_batches():
    acc = RankingAccumulator((1, 10))
    acc.add(torch.tensor([0, 20]))
    acc.add(torch.tensor([5]))
    assert acc.result()["recall@10"] == pytest.approx(2 / 3)
    assert RankingAccumulator().result()["users"] == 0


def test_seen_items_excluded_hand_computed():
    # user 0 saw items 0 and 3; target 2 is behind 0 (seen, out) and 3 (seen, out) and 1 (unseen): rank 1
    # user 1's target 1 is in its own history: a miss at every k, even k > N (rank MISS)
    scores = torch.tensor([[0.9, 0.6, 0.5, 0.8], [0.1, 0.9, 0.2, 0.3]])
    ranks = ranks_excluding_seen(scores.clone(), torch.tensor([2, 1]), [[0, 3], [1, 2]])
    assert ranks.tolist() == [1, MISS]
    assert metrics_from_ranks(ranks, ks=(1, 5))["recall@5"] == pytest.approx(0.5)


def test_seen_items_excluded_matches_a_sorting_implementation():
    rng = np.random.default_rng(1)
    n = 200
    scores = rng.normal(size=(40, n)).astype(np.float32)
    histories = [list(rng.choice(n, size=rng.integers(1, 30), replace=False)) for _ in range(40)]
    targets = np.array([rng.integers(0, n) if i % 5 else histories[i][0] for i in range(40)])
    expected = []
    for i in range(40):  # independent: sort the unseen items, find the target (absent when seen: a miss)
        unseen = [j for j in np.argsort(-scores[i], kind="stable") if j not in set(histories[i])]
        expected.append(unseen.index(targets[i]) if targets[i] in unseen else MISS)
    got = ranks_excluding_seen(torch.from_numpy(scores.copy()), torch.from_numpy(targets), histories)
    assert got.tolist() == expected
