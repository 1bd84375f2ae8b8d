"""Content fingerprints: of a model state (what a silo and the server compare before any merge) and of a file."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch

def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex digest over the sorted parameter names, each one's dtype, shape and raw bytes.

    Stable across processes and machines with the same byte order; independent of dict order and of
    whether a tensor is contiguous or lives on another device.
    """
    h = hashlib.sha256()
    h.update(b"mergerec-state-v1")
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header = f"{len(name)}:{name}|{t.dtype}|{tuple(t.shape)}|{len(raw)}|"
        h.update(header.encode("utf-8"))
        h.update(raw)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
