"""LoRA task vectors: low-rank factors per target weight, trained at a silo, materialised at the server.

A LoRA module for a model is, per target parameter ``W`` of shape [out, in] (a 2-D weight), two factors
``A`` [r, in] and ``B`` [out, r]; the adapted weight is ``W + (alpha / r) * B @ A``. Only the factors are
trained (every other parameter stays at the base) and only the factors leave a silo: array names
``<parameter name>.lora_A`` / ``<parameter name>.lora_B`` (float32). The server turns them back into an
ordinary task vector (``materialise``: ``delta = (alpha / r) * B @ A`` for targets, zeros elsewhere), so every
merge method works unchanged on LoRA silos.

Why our own module and not peft: the light backbone's attention (``nn.TransformerEncoderLayer`` ->
``nn.MultiheadAttention``) keeps its q/k/v projection as a raw Parameter (``in_proj_weight``), not an
``nn.Linear``. peft (0.21) handles that only by wrapping the whole ``nn.MultiheadAttention`` (in and out
projections together, no way to target one; weights merged and unmerged around every forward, documented as
hacky) and renames the wrapped parameters (``base_layer``). We need per-parameter targets chosen by name
patterns and factors keyed by the base's own parameter names. So each target gets a
``torch.nn.utils.parametrize`` parametrization (``LoraDelta``): the module's forward reads ``W + scale * B @ A``
wherever it reads the weight, whatever kind of module it is; removing the parametrizations restores the base.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from common.core.errors import ContractError

SUFFIXES = (".lora_A", ".lora_B")


class LoraDelta(nn.Module):
    """Parametrization ``W -> W + scale * B @ A``; A [r, in] small random (seeded), B [out, r] zero, so the
    adapted model starts exactly at the base."""

    def __init__(self, out_f: int, in_f: int, rank: int, scale: float, gen: torch.Generator):
        super().__init__()
        bound = 1.0 / math.sqrt(in_f)
        self.lora_A = nn.Parameter((torch.rand(rank, in_f, generator=gen) * 2 - 1) * bound)
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank))
        self.scale = scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.scale * (self.lora_B @ self.lora_A)


def scale_of(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)


def resolve_targets(shapes: Mapping[str, tuple[int, ...]], patterns: list[str], key: str = "lora-targets") -> list[str]:
    """Sorted parameter names matched by the glob `patterns` (fnmatch on full names). Each pattern must match
    at least one parameter and every match must be 2-D; otherwise a ValueError naming the config `key`."""
    out: set[str] = set()
    for pat in patterns:
        hits = [n for n in shapes if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"{key}: pattern {pat!r} matches no parameter of the model")
        flat = [n for n in hits if len(shapes[n]) != 2]
        if flat:
            raise ValueError(f"{key}: pattern {pat!r} matches {flat[0]!r}, which is not a 2-D weight")
        out |= set(hits)
    return sorted(out)


def factor_shapes(shapes: Mapping[str, tuple[int, ...]], targets: list[str], rank: int) -> dict[str, tuple[int, int]]:
    """Array name -> shape of a LoRA module's factors: A [r, in], B [out, r] per target."""
    out = {}
    for n in targets:
        o, i = shapes[n]
        out[f"{n}.lora_A"], out[f"{n}.lora_B"] = (rank, i), (o, rank)
    return out


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def attach(model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int = 0,
           factors: Mapping[str, np.ndarray] | None = None) -> None:
    """Parametrize every target weight of `model` in place (`factors`: start from these instead of the fresh
    initialisation). Afterwards the model's trainable LoRA parameters are those `is_lora_param` names."""
    gen = torch.Generator().manual_seed(seed)
    for n in targets:
        owner, leaf = _owner(model, n)
        w = getattr(owner, leaf)
        delta = LoraDelta(w.shape[0], w.shape[1], rank, scale_of(rank, alpha), gen).to(w.device)
        if factors is not None:
            with torch.no_grad():
                delta.lora_A.copy_(torch.from_numpy(np.asarray(factors[f"{n}.lora_A"], dtype=np.float32)))
                delta.lora_B.copy_(torch.from_numpy(np.asarray(factors[f"{n}.lora_B"], dtype=np.float32)))
        parametrize.register_parametrization(owner, leaf, delta)


def is_lora_param(name: str) -> bool:
    """A LoRA factor of an attached model (`named_parameters` name)."""
    return name.endswith(SUFFIXES)


def factors(model: nn.Module, targets: list[str]) -> dict[str, np.ndarray]:
    """The attached factors as float32 arrays, keyed `<target>.lora_A` / `.lora_B` (what a silo sends)."""
    out = {}
    for n in targets:
        owner, leaf = _owner(model, n)
        delta = owner.parametrizations[leaf][0]
        out[f"{n}.lora_A"] = delta.lora_A.detach().cpu().float().numpy().copy()
        out[f"{n}.lora_B"] = delta.lora_B.detach().cpu().float().numpy().copy()
    return out


def detach(model: nn.Module, targets: list[str]) -> None:
    """Remove the parametrizations; the targets are back at their base values (the factors are dropped)."""
    for n in targets:
        owner, leaf = _owner(model, n)
        parametrize.remove_parametrizations(owner, leaf, leave_parametrized=False)


def materialise(named: Mapping[str, np.ndarray], base: Mapping[str, torch.Tensor], rank: int,
                alpha: float) -> dict[str, torch.Tensor]:
    """The ordinary task vector of a LoRA module: ``(alpha / r) * B @ A`` for each target, zeros for every other
    parameter of `base` (float32, CPU). Every merge method then applies unchanged."""
    scale = scale_of(rank, alpha)
    out = {n: torch.zeros_like(t, dtype=torch.float32) for n, t in base.items()}
    for key in named:
        if key.endswith(".lora_A"):
            n = key[: -len(".lora_A")]
            a = torch.from_numpy(np.array(named[key], dtype=np.float32))
            b = torch.from_numpy(np.array(named[f"{n}.lora_B"], dtype=np.float32))
            out[n] = scale * (b @ a)
    return out


def check_factors(named: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, int]], what: str) -> None:
    """Exactly the expected factor names, float32, the expected shapes, finite values; ContractError naming
    what is wrong (names only the receiver's own parameter names, never a sender-chosen key)."""
    missing = sorted(set(expected) - set(named))
    extra = len(set(named) - set(expected))
    if missing or extra:
        raise ContractError(f"{what}: missing LoRA factors {missing[:4]}, {extra} unexpected")
    for n, want in expected.items():
        a = named[n]
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or tuple(a.shape) != tuple(want):
            raise ContractError(f"{what}: factor {n} is {getattr(a, 'dtype', '?')}{list(np.shape(a))}, expected "
                                f"float32{list(want)}")
        if not np.isfinite(a).all():
            raise ContractError(f"{what}: factor {n} has non-finite values")


def dense_bytes(base: Mapping[str, torch.Tensor]) -> int:
    """float32 bytes of a full task vector of `base` (what finetune = full sends)."""
    return int(sum(t.numel() for t in base.values()) * 4)


def nbytes(named: Mapping[str, np.ndarray]) -> int:
    """Raw float bytes of a set of arrays (the payload a reply carries, before record overhead)."""
    return int(sum(np.asarray(a).nbytes for a in named.values()))


class LoraSpec:
    """What a run's LoRA modules are: resolved target names, rank, alpha and the factor shapes, from a
    TrainConfig and the base's parameter shapes (a bad lora-targets pattern is a ValueError naming the key)."""

    def __init__(self, train, shapes: Mapping[str, tuple[int, ...]]):
        self.rank, self.alpha = int(train.lora_rank), float(train.lora_alpha)
        self.targets = resolve_targets(shapes, list(train.lora_targets))
        self.shapes = factor_shapes(shapes, self.targets, self.rank)

    def materialise(self, named: Mapping[str, np.ndarray], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return materialise(named, base, self.rank, self.alpha)
