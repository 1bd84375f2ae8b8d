"""Silo-side distillation targets (MergeRec stage 4), streamed and compact.

For each pseudo-user (an item id i, read as the history [i]) the silo's own fine-tuned model scores every item
of its domain: t_j = cosine(f_d(pseudo-user), f_d(item_j)). Only the top-k (index, value) pairs per pseudo-user
leave the silo, rows in the order of the requested pseudo-user item ids: they describe the model, not any user.
The loss (``losses.mergerec_loss``) treats the missing N - k entries as zero teacher probability.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from common.core.errors import ContractError


class TopKLogits(BaseModel):
    """Top-k teacher logits of P pseudo-users over a catalog of ``num_items`` items.

    item_ids [P] int64 (the pseudo-users), indices [P, k] int64 (item ids, each row distinct), values [P, k]
    float32 cosine scores sorted descending per row. k = num_items means dense (a permutation per row).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    item_ids: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    num_items: int

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, data):
        if isinstance(data, dict):
            data = dict(data)
            for key, dtype in (("item_ids", torch.long), ("indices", torch.long), ("values", torch.float32)):
                v = data.get(key)
                if v is not None and not isinstance(v, torch.Tensor):  # wire dtypes (uint16, float16) widened here
                    v = torch.from_numpy(np.asarray(v).astype(np.int64 if dtype == torch.long else np.float32))
                if v is not None:
                    data[key] = v.to(dtype)
        return data

    @model_validator(mode="after")
    def _check(self) -> "TopKLogits":
        p = self.item_ids.shape[0] if self.item_ids.dim() == 1 else -1
        if p < 0:
            raise ValueError(f"item_ids must be 1-D, got {list(self.item_ids.shape)}")
        if self.indices.dim() != 2 or self.indices.shape[0] != p:
            raise ValueError(f"indices must be [{p}, k], got {list(self.indices.shape)}")
        if self.values.shape != self.indices.shape:
            raise ValueError(f"values {list(self.values.shape)} must match indices {list(self.indices.shape)}")
        k = self.indices.shape[1]
        if self.num_items <= 0 or k > self.num_items or (p and k == 0):
            raise ValueError(f"k = {k} must be in [1, num_items = {self.num_items}]")
        for name, t in (("item_ids", self.item_ids), ("indices", self.indices)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_items):
                raise ValueError(f"{name} out of range [0, {self.num_items})")
        if not torch.isfinite(self.values).all():
            raise ValueError("values must be finite")
        if k > 1 and not bool((self.values[:, :-1] >= self.values[:, 1:]).all()):
            raise ValueError("values must be sorted descending within each row")
        return self

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Wire form (``common.protocol.messages.teacher_wire_dtypes``): {"indices": uint16 [P, k] (uint32 above 65,536
        items), "values": float16 [P, k]}; rows follow the request's item ids. 4 bytes per entry instead of 8
        (int32 + float32) or 16 (int64 + float32). float16 rounding is monotone: rows stay sorted."""
        idx_dtype, val_dtype = teacher_wire_dtypes(self.num_items)
        return {"indices": self.indices.numpy().astype(idx_dtype),
                "values": self.values.to(torch.float32).numpy().astype(val_dtype)}

    @classmethod
    def from_arrays(cls, item_ids, indices, values, num_items: int) -> "TopKLogits":
        """Inverse of ``to_arrays`` up to float16 rounding of the values (the item ids come from the request);
        indices int64 and values float32 again; validates everything."""
        return cls(item_ids=item_ids, indices=indices, values=values, num_items=int(num_items))

    def dense(self, fill: float = float("-inf")) -> torch.Tensor:
        """[P, N] with the known values and ``fill`` elsewhere (for tests and small catalogs only)."""
        out = torch.full((self.item_ids.shape[0], self.num_items), fill, dtype=torch.float32)
        return out.scatter_(1, self.indices, self.values)


@torch.no_grad()
def teacher_k(k: int | None, num_items: int, exclude_own: bool) -> int:
    """The k a teacher reply carries: the k asked (None = every item), at most N, or N - 1 when a pseudo-user's
    own item is left out."""
    n = num_items - 1 if exclude_own else num_items
    return n if k is None or k >= n else int(k)


def teacher_topk(query_embeddings_fn: Callable[[torch.Tensor], torch.Tensor], item_embeddings: torch.Tensor,
                 pseudo_item_ids: torch.Tensor, k: int | None, chunk_size: int = 256,
                 exclude_own: bool = False) -> TopKLogits:
    """Top-k cosine logits of each pseudo-user against all N items, computed ``chunk_size`` pseudo-users at a time.

    ``query_embeddings_fn(item_ids [c]) -> [c, d]``: the fine-tuned model's embedding of the pseudo-users whose
    history is that single item; ``item_embeddings`` [N, d]. Both L2-normalised, so logits = q @ items.T.
    ``k`` None or >= N gives k = N (dense, rows sorted). ``exclude_own``: a pseudo-user's own item is never one of its
    targets (the seen-items protocol "exclude": a recommender does not offer what the user just saw); k is then at
    most N - 1. Memory: O(chunk_size * N + P * k) besides the inputs; the P x N matrix never exists.
    """
    if item_embeddings.dim() != 2:
        raise ValueError(f"item_embeddings must be [N, d], got {list(item_embeddings.shape)}")
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    n = item_embeddings.shape[0]
    ids = torch.as_tensor(pseudo_item_ids, dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"pseudo-user item ids out of range [0, {n})")
    if k is not None and k <= 0:
        raise ValueError(f"k must be positive or None, got {k}")
    if exclude_own and n < 2:
        raise ValueError("a catalog of one item has no target besides the pseudo-user's own item")
    k_eff = teacher_k(k, n, exclude_own)
    p = ids.numel()
    out_idx = torch.empty((p, k_eff), dtype=torch.long)
    out_val = torch.empty((p, k_eff), dtype=torch.float32)
    items_t = item_embeddings.T
    for s in range(0, p, chunk_size):
        q = query_embeddings_fn(ids[s:s + chunk_size])
        if q.dim() != 2 or q.shape[0] != min(chunk_size, p - s) or q.shape[1] != item_embeddings.shape[1]:
            raise ValueError(f"query_embeddings_fn returned {list(q.shape)} for a chunk of {min(chunk_size, p - s)}")
        scores = (q.to(items_t.dtype) @ items_t).float()  # [c, N]
        if exclude_own:
            chunk = ids[s:s + chunk_size]
            scores[torch.arange(len(chunk)), chunk] = float("-inf")
        top = torch.topk(scores, k_eff, dim=1, largest=True, sorted=True)
        out_val[s:s + chunk_size] = top.values
        out_idx[s:s + chunk_size] = top.indices
        del scores, top
    return TopKLogits(item_ids=ids.clone(), indices=out_idx, values=out_val, num_items=n)

def teacher_wire_dtypes(num_items: int) -> tuple[np.dtype, np.dtype]:
    """(index dtype, value dtype) of teacher top-k arrays on the wire: the smallest unsigned integer that holds
    every item id of the catalog, and float16 values (cosine scores in [-1, 1]: rounding error <= 2**-11, a
    tenth of a percent of a logit after the temperature)."""
    return (np.dtype(np.uint16) if num_items <= 1 << 16 else np.dtype(np.uint32)), np.dtype(np.float16)


def check_teacher_arrays(named: dict[str, np.ndarray], rows: int, num_items: int, k: int) -> None:
    if set(named) != {"indices", "values"}:
        raise ContractError(f"teacher arrays must be exactly indices/values, got {len(named)} other array(s)")
    idx, val = named["indices"], named["values"]
    if idx.shape != (rows, k) or val.shape != (rows, k):
        raise ContractError(f"teacher arrays must be [{rows}, {k}], got {idx.shape} and {val.shape}")
    want_idx, want_val = teacher_wire_dtypes(num_items)
    if idx.dtype != want_idx or val.dtype != want_val:
        raise ContractError(f"teacher arrays must be {want_idx}/{want_val} for {num_items} items, "
                            f"got {idx.dtype}/{val.dtype}")
    if idx.size and int(idx.max()) >= num_items:
        raise ContractError(f"teacher indices out of range [0, {num_items})")
