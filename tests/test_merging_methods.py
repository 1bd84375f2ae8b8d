"""Task vectors and training-free merges: hand-computed examples, and peft's merge_utils as an independent check."""

from __future__ import annotations

import pytest
import torch

from common.merging import methods
from common.merging.methods import MergeConfig, config_for, merge, process, topk_mask
from common.core.fingerprint import fingerprint
from common.merging.task_vectors import BaseMismatchError, add_vector, apply, task_vector

T = torch.tensor


def close(a, b, **kw):
    torch.testing.assert_close(a, T(b, dtype=a.dtype) if not isinstance(b, torch.Tensor) else b, **kw)


def delta(base, merged):
    return {n: merged[n] - base[n] for n in base}


# ------------------------------------------------------------------------------------------------ task vectors


def test_fingerprint_is_stable_and_sensitive():
    s = {"b": torch.zeros(2, 2), "a": T([1.0, 2.0])}
    fp = fingerprint(s)
    assert len(fp) == 64 and fp == fingerprint({"a": T([1.0, 2.0]), "b": torch.zeros(2, 2)})
    assert fp == fingerprint({"a": T([1.0, 2.0]), "b": torch.zeros(2, 2).t()})  # layout does not matter
    # frozen format: a change of the hashing scheme must be deliberate (it invalidates every stored fingerprint)
    assert fp == "2679230417cd8cf04a6e1e7435fbdf11a547e6aca2ee25cc551338586fe8fd13"
    assert fp != fingerprint({"a": T([1.0, torch.nextafter(T(2.0), T(3.0)).item()]), "b": torch.zeros(2, 2)})
    assert fp != fingerprint({"a": T([1.0, 2.0], dtype=torch.float64), "b": torch.zeros(2, 2)})
    assert fp != fingerprint({"a": T([1.0, 2.0]), "b": torch.zeros(4)})
    assert fp != fingerprint({"a": T([1.0, 2.0]), "c": torch.zeros(2, 2)})


def test_task_vector_checks_base():
    base = {"w": T([1.0, 2.0]), "b": T([0.5])}
    ft = {"w": T([1.5, 1.0]), "b": T([0.0])}
    tv = task_vector(ft, base, expected_base_fingerprint=fingerprint(base))
    close(tv["w"], [0.5, -1.0])
    close(tv["b"], [-0.5])
    with pytest.raises(BaseMismatchError, match="base"):
        task_vector(ft, base, expected_base_fingerprint=fingerprint(ft))
    with pytest.raises(BaseMismatchError, match="'b'"):
        task_vector({"w": ft["w"]}, base)
    with pytest.raises(BaseMismatchError, match="'x'"):
        task_vector({**ft, "x": T([1.0])}, base)
    with pytest.raises(BaseMismatchError, match=r"'w'.*\(3,\)"):
        task_vector({"w": T([1.0, 2.0, 3.0]), "b": T([0.0])}, base)
    assert issubclass(BaseMismatchError, ValueError)


def test_apply_list_and_group_weights():
    base = {"l0.w": T([1.0, 1.0]), "head": T([0.0])}
    v1 = {"l0.w": T([1.0, 2.0]), "head": T([1.0])}
    v2 = {"l0.w": T([-1.0, 4.0]), "head": T([2.0])}
    m = apply(base, [v1, v2], [0.5, 0.25])
    close(m["l0.w"], [1.25, 3.0])
    close(m["head"], [1.0])
    group = lambda n: "layer0" if n.startswith("l0.") else "rest"  # noqa: E731
    m = apply(base, [v1, v2], [{"layer0": 1.0, "rest": 0.0}, {"layer0": 0.0, "rest": 2.0}], group)
    close(m["l0.w"], [2.0, 3.0])
    close(m["head"], [4.0])
    with pytest.raises(ValueError, match="rest"):
        apply(base, [v1, v2], [{"layer0": 1.0}, {"layer0": 1.0}], group)
    close(add_vector(base, v1, 2.0)["l0.w"], [3.0, 5.0])
    assert base["l0.w"].tolist() == [1.0, 1.0]  # inputs untouched


# ------------------------------------------------------------------------------------ hand-computed examples

TAU1 = T([0.5, -0.1, 0.3, -0.8, 0.0, 0.2])
TAU2 = T([-0.4, 0.2, 0.6, 0.1, -0.3, -0.05])
BASE = {"w": T([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])}


def test_weight_average_and_task_arithmetic_by_hand():
    plan = process([{"w": TAU1}, {"w": TAU2}], "weight_average")
    assert plan.weights == [0.5, 0.5]
    close(delta(BASE, merge(BASE, plan.vectors, plan.weights))["w"], [0.05, 0.05, 0.45, -0.35, -0.15, 0.075])
    plan = process([{"w": TAU1}, {"w": TAU2}], "task_arithmetic")
    assert plan.weights == [0.3, 0.3]
    close(delta(BASE, merge(BASE, plan.vectors, plan.weights))["w"], [0.03, 0.03, 0.27, -0.21, -0.09, 0.045])


def test_ties_by_hand():
    # top-3 of 6 per task: s1 = [.5, 0, .3, -.8, 0, 0], s2 = [-.4, 0, .6, 0, -.3, 0]
    # sum [.1, 0, .9, -.8, -.3, 0] -> signs [+, +(tie), +, -, -, +]; -.4 disagrees at 0; .3 and .6 share index 2
    plan = process([{"w": TAU1}, {"w": TAU2}], config_for("ties", density=0.5))
    close(plan.vectors[0]["w"], [0.5, 0.0, 0.15, -0.8, 0.0, 0.0])
    close(plan.vectors[1]["w"], [0.0, 0.0, 0.3, 0.0, -0.3, 0.0])
    assert plan.weights == [1.0, 1.0]
    close(delta(BASE, merge(BASE, plan.vectors, plan.weights))["w"], [0.5, 0.0, 0.45, -0.8, -0.3, 0.0])


def test_global_and_tensor_scope_differ():
    t1 = {"a": T([0.5, -0.1, 0.3, -0.8]), "b": T([0.0, 0.2])}
    t2 = {"a": T([-0.4, 0.2, 0.6, 0.1]), "b": T([-0.3, -0.05])}
    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    # global: top-3 of the 6 entries of each task -> same numbers as the one-tensor example
    g = process([t1, t2], config_for("ties", density=0.5, scope="global"))
    mg = merge(base, g.vectors, g.weights)
    close(mg["a"], [0.5, 0.0, 0.45, -0.8])
    close(mg["b"], [-0.3, 0.0])
    # per tensor: top-2 of a, top-1 of b -> s1 = a[.5,0,0,-.8] b[0,.2]; s2 = a[-.4,0,.6,0] b[-.3,0]
    t = process([t1, t2], config_for("ties", density=0.5, scope="tensor"))
    mt = merge(base, t.vectors, t.weights)
    close(mt["a"], [0.5, 0.0, 0.6, -0.8])
    close(mt["b"], [-0.3, 0.2])
    # plain magnitude pruning shows the same difference without consensus
    p = process([{"a": T([1.0, 0.9]), "b": T([0.1, 0.05])}], config_for("magnitude_prune", density=0.5))
    close(p.vectors[0]["a"], [1.0, 0.9])
    close(p.vectors[0]["b"], [0.0, 0.0])
    p = process([{"a": T([1.0, 0.9]), "b": T([0.1, 0.05])}], config_for("magnitude_prune", density=0.5,
                                                                          scope="tensor"))
    close(p.vectors[0]["a"], [1.0, 0.0])
    close(p.vectors[0]["b"], [0.1, 0.0])


def test_count_election():
    # three tasks: two small negatives outvote one large positive by count, not by sum
    vs = [{"w": T([3.0])}, {"w": T([-1.0])}, {"w": T([-1.0])}]
    by_sum = process(vs, MergeConfig(consensus="ties"))
    by_count = process(vs, MergeConfig(consensus="ties", elect="count"))
    assert [v["w"].item() for v in by_sum.vectors] == [3.0, 0.0, 0.0]
    assert [v["w"].item() for v in by_count.vectors] == [0.0, -0.5, -0.5]


class _FixedRand:
    """Stands in for torch.rand: returns preset uniforms in call order (one call per task and tensor)."""

    def __init__(self, draws):
        self.draws = list(draws)

    def __call__(self, shape, generator=None, dtype=None, **kw):
        out = self.draws.pop(0)
        assert tuple(out.shape) == tuple(shape)
        return out


def test_dare_by_hand_with_fixed_mask(monkeypatch):
    t1, t2 = {"w": T([0.5, -0.1, 0.3, -0.8])}, {"w": T([-0.4, 0.2, 0.6, 0.1])}
    draws = [T([0.7, 0.2, 0.9, 0.4]), T([0.9, 0.6, 0.8, 0.55])]  # p = 0.5: keep where u >= 0.5
    monkeypatch.setattr(methods.torch, "rand", _FixedRand(draws))
    lin = process([t1, t2], "dare_linear")  # v1 = [1, 0, .6, 0], v2 = [-.8, .4, 1.2, .2]
    close(lin.vectors[0]["w"], [1.0, 0.0, 0.6, 0.0])
    close(lin.vectors[1]["w"], [-0.8, 0.4, 1.2, 0.2])
    assert lin.weights == [0.3, 0.3]
    monkeypatch.setattr(methods.torch, "rand", _FixedRand(draws))
    ties = process([t1, t2], "dare_ties")  # sum [.2, .4, 1.8, .2]: all +; -.8 dropped; index 2 shared
    close(ties.vectors[0]["w"], [1.0, 0.0, 0.3, 0.0])
    close(ties.vectors[1]["w"], [0.0, 0.4, 0.6, 0.2])
    close(merge({"w": torch.zeros(4)}, ties.vectors, ties.weights)["w"], [1.0, 0.4, 0.9, 0.2])


def test_dare_is_seeded_and_drops_the_right_fraction():
    tv = {"w": torch.randn(200, 500, generator=torch.Generator().manual_seed(1))}
    a = process([tv], config_for("dare_linear", drop_prob=0.9), seed=3).vectors[0]["w"]
    b = process([tv], config_for("dare_linear", drop_prob=0.9), seed=3).vectors[0]["w"]
    c = process([tv], config_for("dare_linear", drop_prob=0.9), seed=4).vectors[0]["w"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    close(a[kept], tv["w"][kept] * 10.0)


def test_breadcrumbs_by_hand():
    tau = {"w": T([0.9, -0.1, 0.5, 0.05, -0.7, 0.3, 0.2, -0.02, 0.6, 0.4])}
    # drop the largest 10 % (0.9), keep the next 50 % (-.7, .6, .5, .4, .3), drop the rest
    plan = process([tau], config_for("breadcrumbs", beta=0.1, density=0.5))
    close(plan.vectors[0]["w"], [0.0, 0.0, 0.5, 0.0, -0.7, 0.3, 0.0, 0.0, 0.6, 0.4])
    assert plan.weights == [0.3]
    with pytest.raises(ValueError):
        config_for("breadcrumbs", beta=0.5, density=0.6)


def test_topk_mask_ties_and_global_matches_full_sort():
    assert topk_mask(T([1.0, 1.0, 1.0, 0.5]), 2).tolist() == [True, True, False, False]
    assert topk_mask(T([1.0, 2.0]), 0).tolist() == [False, False]
    assert topk_mask(T([0.0, 3.0, 0.0]), 2).tolist() == [False, True, False]  # zeros need not be marked
    assert topk_mask(T([1.0, 2.0]), 5).tolist() == [True, True]
    g = torch.Generator().manual_seed(0)
    tv = {"x": torch.randn(30, 7, generator=g), "y": torch.randn(11, generator=g), "z": torch.randn(3, 3, 2, generator=g)}
    out = process([tv], MergeConfig(sparsify="magnitude", density=0.25)).vectors[0]
    names = sorted(tv)
    flat = torch.cat([tv[n].reshape(-1) for n in names])
    k = int(0.25 * flat.numel())
    expect = torch.zeros_like(flat)
    top = flat.abs().argsort(descending=True)[:k]
    expect[top] = flat[top]
    close(torch.cat([out[n].reshape(-1) for n in names]), expect)


def test_registry_and_inputs_untouched():
    assert {"weight_average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"} <= set(
        methods.method_names())
    assert config_for("ties").density == 0.2 and config_for("ties").scope == "global"
    with pytest.raises(ValueError, match="unknown merge method"):
        config_for("nope")
    with pytest.raises(ValueError):
        config_for("ties", density=1.5)
    t1 = {"w": TAU1.clone()}
    process([t1, {"w": TAU2.clone()}], "ties")
    assert torch.equal(t1["w"], TAU1)


# ---------------------------------------------------------------------------------- peft as a second opinion

peft_mu = pytest.importorskip("peft.utils.merge_utils")


def _random_vectors(d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(8, 10, generator=g), "b": torch.randn(10, generator=g)} for _ in range(d)]


@pytest.mark.parametrize("elect,peft_elect", [("sum", "total"), ("count", "frequency")])
def test_ties_tensor_scope_matches_peft(elect, peft_elect):
    tvs = _random_vectors()
    base = {n: torch.zeros_like(t) for n, t in tvs[0].items()}
    plan = process(tvs, config_for("ties", density=0.3, scope="tensor", elect=elect, lam=0.7))
    merged = merge(base, plan.vectors, plan.weights)
    for n in base:
        ref = peft_mu.ties([tv[n] for tv in tvs], torch.full((3,), 0.7), density=0.3, majority_sign_method=peft_elect)
        close(merged[n], ref)


def test_task_arithmetic_and_magnitude_prune_match_peft():
    tvs = _random_vectors(seed=1)
    base = {n: torch.zeros_like(t) for n, t in tvs[0].items()}
    ta = process(tvs, "task_arithmetic")
    mp = process(tvs, config_for("magnitude_prune", density=0.4, scope="tensor"))
    for n in base:
        close(merge(base, ta.vectors, ta.weights)[n], peft_mu.task_arithmetic([tv[n] for tv in tvs],
                                                                                torch.full((3,), 0.3)))
        close(merge(base, mp.vectors, mp.weights)[n], peft_mu.magnitude_prune([tv[n] for tv in tvs],
                                                                                 torch.full((3,), 0.3), 0.4))


@pytest.mark.parametrize("name,peft_fn", [("dare_linear", "dare_linear"), ("dare_ties", "dare_ties")])
def test_dare_matches_peft_with_shared_mask(monkeypatch, name, peft_fn):
    tvs = _random_vectors(seed=2)
    base = {n: torch.zeros_like(t) for n, t in tvs[0].items()}
    p = 0.75
    # our drop masks (same seed -> same masks for both methods), read off the linear variant
    masks = [{n: (v[n] != 0).float() for n in v} for v in process(tvs, config_for("dare_linear", drop_prob=p),
                                                                    seed=5).vectors]
    plan = process(tvs, config_for(name, drop_prob=p, lam=0.6), seed=5)
    merged = merge(base, plan.vectors, plan.weights)
    for n in base:
        queue = [m[n] for m in masks]
        monkeypatch.setattr(peft_mu.torch, "bernoulli", lambda probs, *a, **k: queue.pop(0))
        ref = getattr(peft_mu, peft_fn)([tv[n] for tv in tvs], torch.full((3,), 0.6), density=1 - p)
        monkeypatch.undo()
        assert not queue
        close(merged[n], ref)
