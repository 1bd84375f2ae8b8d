"""Streamed top-k teacher logits: exactness, wire format, validation and a bounded memory peak."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from common.merging.teacher import TopKLogits, teacher_topk

ROOT = Path(__file__).resolve().parents[1]


def _setup(n=50, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = F.normalize(torch.randn(n, d, generator=g), dim=1)
    proj = torch.randn(d, d, generator=g)

    def queries(ids):  # a stand-in fine-tuned model: history [i] -> normalised projection of item i
        return F.normalize(items[ids] @ proj, dim=1)

    return items, queries


def test_k_equal_n_is_dense_and_topk_is_its_prefix():
    items, queries = _setup()
    ids = torch.tensor([3, 0, 49, 17, 8])
    dense = queries(ids) @ items.T
    full = teacher_topk(queries, items, ids, None, chunk_size=2)
    assert full.k == 50 and torch.equal(full.item_ids, ids)
    torch.testing.assert_close(full.dense(), dense)
    assert torch.equal(teacher_topk(queries, items, ids, 500, chunk_size=3).indices, full.indices)
    top = teacher_topk(queries, items, ids, 7, chunk_size=2)
    assert top.indices.shape == (5, 7) and top.values.dtype == torch.float32 and top.indices.dtype == torch.int64
    ref = dense.topk(7, dim=1)
    torch.testing.assert_close(top.values, ref.values)
    assert torch.equal(top.indices, ref.indices)
    assert bool((top.values[:, :-1] >= top.values[:, 1:]).all())


def test_excluding_the_own_item_is_the_dense_topk_without_it():
    """seen-items exclude: a pseudo-user's own item is never among its targets (the MergeRec reference keeps it,
    and it is the top-1 for nearly every pseudo-user); k is at most N - 1, and None means N - 1."""
    items, queries = _setup()
    ids = torch.tensor([3, 0, 49, 17])
    dense = queries(ids) @ items.T
    dense[torch.arange(4), ids] = float("-inf")
    top = teacher_topk(queries, items, ids, 6, chunk_size=3, exclude_own=True)
    ref = dense.topk(6, dim=1)
    assert torch.equal(top.indices, ref.indices)
    torch.testing.assert_close(top.values, ref.values)
    assert not (top.indices == ids.view(-1, 1)).any()
    full = teacher_topk(queries, items, ids, None, exclude_own=True)
    assert full.k == 49 and bool(full.values.isfinite().all())
    assert not (teacher_topk(queries, items, ids, 6).indices == ids.view(-1, 1)).all(1).all()  # kept by default


def test_wire_dtypes_follow_catalog_size():
    """uint16 indices up to 65,536 items (ids 0..65535), uint32 above; float16 values, 4 bytes per entry."""
    from common.protocol.messages import ContractError, check_teacher_arrays

    for n, want in ((50, np.uint16), (1 << 16, np.uint16), ((1 << 16) + 1, np.uint32)):
        idx = torch.tensor([[n - 1, 0], [1, n - 2]])
        top = TopKLogits(item_ids=torch.tensor([0, 1]), indices=idx, values=torch.tensor([[0.9, 0.1], [0.5, -0.3]]),
                         num_items=n)
        arr = top.to_arrays()
        assert arr["indices"].dtype == want and arr["values"].dtype == np.float16
        assert arr["indices"].nbytes + arr["values"].nbytes == 4 * 2 * (2 if want == np.uint16 else 3)
        check_teacher_arrays(arr, 2, n, 2)
        assert torch.equal(TopKLogits.from_arrays([0, 1], arr["indices"], arr["values"], n).indices, idx)
        with pytest.raises(ContractError, match="teacher arrays must be"):
            check_teacher_arrays({**arr, "values": arr["values"].astype(np.float32)}, 2, n, 2)
        with pytest.raises(ContractError, match="teacher arrays must be"):
            check_teacher_arrays({**arr, "indices": arr["indices"].astype(np.int64)}, 2, n, 2)
        bad = arr["indices"].copy()
        bad[0, 0] = n if n < (1 << 16) else bad[0, 0]
        if n < (1 << 16):
            with pytest.raises(ContractError, match="out of range"):
                check_teacher_arrays({**arr, "indices": bad}, 2, n, 2)


def test_wire_round_trip_and_validation():
    items, queries = _setup()
    ids = torch.tensor([1, 2, 3])
    top = teacher_topk(queries, items, ids, 4)
    arr = top.to_arrays()
    assert set(arr) == {"indices", "values"}
    assert arr["indices"].dtype == np.uint16 and arr["values"].dtype == np.float16 and arr["indices"].shape == (3, 4)
    for a in arr.values():
        a.flags.writeable = False  # as decoded from a message buffer
    back = TopKLogits.from_arrays(ids.tolist(), arr["indices"], arr["values"], 50)
    assert torch.equal(back.indices, top.indices)
    torch.testing.assert_close(back.values, top.values, atol=2.0 ** -11, rtol=0)  # float16 rounding in [-1, 1]
    assert back.indices.dtype == torch.int64 and back.values.dtype == torch.float32
    arr = top.to_arrays()
    bad_idx = arr["indices"].copy()
    bad_idx[0, 0] = 50
    with pytest.raises(ValueError, match="out of range"):
        TopKLogits.from_arrays(ids, bad_idx, arr["values"], 50)
    with pytest.raises(ValueError, match="sorted"):
        TopKLogits.from_arrays(ids, arr["indices"], arr["values"][:, ::-1].copy(), 50)
    with pytest.raises(ValueError, match="indices must be"):
        TopKLogits.from_arrays(ids[:2], arr["indices"], arr["values"], 50)
    with pytest.raises(ValueError, match="values"):
        TopKLogits.from_arrays(ids, arr["indices"], arr["values"][:, :3], 50)
    with pytest.raises(ValueError, match="out of range"):
        teacher_topk(queries, items, torch.tensor([50]), 4)


_MEASURE = textwrap.dedent("""
    import json, sys, torch
    from torch.nn import functional as F
    from torch.profiler import ProfilerActivity, profile
    sys.path.insert(0, sys.argv[1])
    from common.merging.teacher import teacher_topk
    torch.set_num_threads(1)
    n, d, k = 12000, 8, 64
    items = F.normalize(torch.randn(n, d), dim=1)
    ids = torch.arange(n)
    queries = lambda c: items[c]

    def largest_allocation_mib(fn):
        # bytes allocated by the single most allocating operator call (the allocator's own accounting,
        # unaffected by page reclaim, unlike peak RSS)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        return out, max(e.cpu_memory_usage for e in prof.events()) / 2**20

    top, streamed = largest_allocation_mib(lambda: teacher_topk(queries, items, ids, k, chunk_size=256))
    dense, dense_mib = largest_allocation_mib(lambda: (queries(ids) @ items.T).topk(k, dim=1))  # deliberately dense
    assert torch.equal(dense.indices, top.indices)
    print(json.dumps({"streamed_mib": streamed, "dense_mib": dense_mib}))
""")


@pytest.mark.slow
def test_memory_stays_bounded_as_the_catalog_grows():
    """P = N = 12000: no operator of the streamed teacher allocates more than a chunk (256 x N floats, 12 MiB);
    the dense variant, measured the same way, allocates the 549 MiB P x N matrix, so the check would catch it."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 100.0
    assert m["streamed_mib"] < bound, m
    assert m["dense_mib"] > bound, m
