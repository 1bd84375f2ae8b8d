"""Shared check: no user id, user sequence or per-user score in any recorded message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _int_lists(obj):
    if isinstance(obj, list):
        if obj and all(isinstance(x, int) and not isinstance(x, bool) for x in obj):
            yield tuple(obj)
        for x in obj:
            yield from _int_lists(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _int_lists(x)


def assert_no_user_data(messages, silo_dirs: list[Path]) -> int:
    """messages: iterable of (label, header_json_text, {name: ndarray}). Returns how many were checked."""
    from common.data import load_silo

    user_keys, seqs, user_counts = set(), set(), set()
    for d in silo_dirs:
        silo = load_silo(d)
        user_keys |= set(json.loads((Path(d) / "umap.json").read_text()))
        seqs |= {tuple(s) for s in silo.train if len(s) >= 3}
        seqs |= {tuple(h) for h in silo.eval_split("test")[0] if len(h) >= 3}
        user_counts |= {silo.num_users, len(silo.test), len(silo.val)}
    n = 0
    for label, text, arrays in messages:
        n += 1
        words = set(text.replace('"', " ").replace(",", " ").replace(":", " ").split())
        leaked = words & user_keys
        assert not leaked, f"user key(s) {sorted(leaked)[:3]} in {label}"
        for lst in _int_lists(json.loads(text)):
            assert lst not in seqs, f"a user sequence appears in the header of {label}"
        for name, a in arrays.items():
            assert a.dtype in (np.float32, np.int32), f"{label}/{name} has dtype {a.dtype}"
            assert not (set(a.shape) & user_counts), f"{label}/{name} shape {a.shape} looks per-user"
            if a.dtype == np.int32 and a.ndim == 2:
                rows = {tuple(r) for r in a.tolist()}
                assert not (rows & seqs), f"a user sequence appears in {label}/{name}"
    return n


def recorded_messages(folder: Path):
    """Messages written by server.transport.MessageRecorder."""
    for js in sorted(Path(folder).glob("*.json")):
        with np.load(js.parent / (js.name[: -len(".json")] + ".npz")) as z:
            arrays = {k: z[k] for k in z.files}
        yield js.name, js.read_text(), arrays
