"""Task vectors over a model's shared state (the base-model fingerprint that guards them: common/core/fingerprint.py).

A state is ``dict[str, Tensor]`` (parameter name -> float32 tensor, CPU). A task vector is
``tau_d = theta_d - theta_pre`` over every shared parameter (docs/design.md, "Merge contracts"). Task vectors
and fingerprints may cross the network; they carry no user data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from common.core.errors import ContractError
from common.core.fingerprint import fingerprint

State = dict[str, torch.Tensor]


class BaseMismatchError(ValueError):
    """A fine-tuned state does not belong to the base it is compared with (fingerprint, names or shapes)."""




def check_compatible(state: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], what: str = "state") -> None:
    """Raise BaseMismatchError naming the first offending parameter unless names and shapes equal the base's."""
    missing = sorted(set(base) - set(state))
    extra = sorted(set(state) - set(base))
    if missing:
        raise BaseMismatchError(f"{what} lacks parameter {missing[0]!r} of the base ({len(missing)} missing)")
    if extra:
        raise BaseMismatchError(f"{what} has parameter {extra[0]!r} that the base lacks ({len(extra)} extra)")
    for name in sorted(base):
        if tuple(state[name].shape) != tuple(base[name].shape):
            raise BaseMismatchError(f"{what}: parameter {name!r} has shape {tuple(state[name].shape)}, "
                                    f"the base has {tuple(base[name].shape)}")


def task_vector(finetuned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                expected_base_fingerprint: str | None = None) -> State:
    """``finetuned - base`` per parameter (float32, detached).

    ``expected_base_fingerprint``: the base the fine-tuned model declares it started from; when given and it
    differs from ``fingerprint(base)`` the vector is refused with BaseMismatchError.
    """
    if expected_base_fingerprint is not None:
        actual = fingerprint(base)
        if actual != expected_base_fingerprint:
            raise BaseMismatchError(f"fine-tuned model was trained from base {expected_base_fingerprint[:16]}, "
                                    f"this base is {actual[:16]}")
    check_compatible(finetuned, base, "fine-tuned state")
    return {n: (finetuned[n].detach().float() - base[n].detach().float()) for n in base}


def add_vector(base: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor], scale: float = 1.0) -> State:
    """``base + scale * vector`` per parameter (a new state; the inputs are not modified)."""
    check_compatible(vector, base, "vector")
    return {n: base[n] + scale * vector[n] for n in base}


def state_to_numpy(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A state as float32 numpy arrays (what a message carries)."""
    return {n: t.detach().cpu().to(torch.float32).numpy() for n, t in state.items()}


def state_from_numpy(named: Mapping[str, np.ndarray]) -> State:
    """Arrays from a message back to float32 tensors (copies: message buffers may be read-only)."""
    return {n: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in named.items()}


Weight = float | Mapping[str, float]


def apply(base: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]],
          weights: Sequence[Weight], group_of: Callable[[str], str] | None = None) -> State:
    """Merged state ``base[n] + sum_d w_d(n) * vectors[d][n]``.

    ``weights[d]`` is either one float for task d, or a dict group -> float read through
    ``group_of(parameter name)`` (layer-wise weights; ``group_of`` is then required, and every group a
    parameter maps to must be present).
    """
    if len(vectors) != len(weights):
        raise ValueError(f"{len(vectors)} vectors but {len(weights)} weights")
    for d, v in enumerate(vectors):
        check_compatible(v, base, f"vector {d}")
    per_group = any(isinstance(w, Mapping) for w in weights)
    if per_group and group_of is None:
        raise ValueError("per-group weights need group_of(name)")
    out: State = {}
    for name, b in base.items():
        acc = b.clone()
        g = group_of(name) if per_group else None
        for d, (v, w) in enumerate(zip(vectors, weights)):
            if isinstance(w, Mapping):
                if g not in w:
                    raise ValueError(f"weights of task {d} have no entry for group {g!r} (parameter {name!r})")
                w = w[g]
            acc.add_(v[name].to(acc.dtype), alpha=float(w))
        out[name] = acc
    return out

def check_state_arrays(named: dict[str, np.ndarray], reference: dict[str, tuple[int, ...]], what: str) -> None:
    """Names and shapes must equal the model's parameters exactly; float32 only."""
    missing = sorted(set(reference) - set(named))
    extra = sorted(set(named) - set(reference))
    if missing or extra:
        raise ContractError(f"{what}: missing parameters {missing[:5]}, {len(extra)} unexpected")
    for n, a in named.items():
        if a.dtype != np.float32 or tuple(a.shape) != tuple(reference[n]):
            raise ContractError(f"{what}: parameter {n} is {a.dtype}{list(a.shape)}, expected float32{list(reference[n])}")
        if not np.isfinite(a).all():
            raise ContractError(f"{what}: parameter {n} has non-finite values")
