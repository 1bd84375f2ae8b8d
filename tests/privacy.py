"""Shared check: no user key, user sequence or per-user score in any recorded message.

A recorded message (server.transport.MessageRecorder) is a JSON file holding every record of every kind
(config, metric; array records go to the .npz next to it), or the text of an error reply. The checker parses
the JSON recursively (a string that holds JSON is parsed too, as are number lists written as text such as
"7,9,12"), decodes bytes, and looks at every array of any dtype and rank. It looks for:

- user keys (umap.json keys) as a string or a word of a string;
- user sequences (train, train + val, train + val + test; at least 3 items) as a list or a number run of
  ints, floats or text, as a whole array or as any row along an array's last axis (padding stripped);
- per-user shapes: an array with a dimension, or a header list with a length, equal to a domain's number
  of users (or validation / test users).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

_WORD = re.compile(r"[^\w\-]+")
_NUM_RUN = re.compile(r"-?\d+(?:\.0+)?(?:\s*[,;\s]\s*-?\d+(?:\.0+)?){2,}")


@dataclass
class Secrets:
    user_keys: set[str] = field(default_factory=set)
    seqs: set[tuple[int, ...]] = field(default_factory=set)
    lengths: set[int] = field(default_factory=set)
    user_counts: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, silo_dirs) -> "Secrets":
        from common.data.format import load_silo

        s = cls()
        for d in silo_dirs:
            silo = load_silo(d)
            s.user_keys |= set(json.loads((Path(d) / "umap.json").read_text()))
            for u, seq in zip(silo.users, silo.train):
                full = list(seq)
                s.seqs.add(tuple(full))
                if u in silo.val:
                    full.append(silo.val[u])
                    s.seqs.add(tuple(full))
                if u in silo.test:
                    s.seqs.add(tuple(full + [silo.test[u]]))
            s.user_counts |= {silo.num_users, len(silo.test), len(silo.val)}
        s.seqs = {q for q in s.seqs if len(q) >= 3}
        s.lengths = {len(q) for q in s.seqs}
        return s


class Checker:
    def __init__(self, secrets: Secrets):
        self.s = secrets
        self.findings: list[str] = []

    # -- primitives ------------------------------------------------------------------------------------
    def numbers(self, values, where: str) -> None:
        """A run of numbers (already integral): a user sequence if it equals one, padding stripped."""
        t = tuple(int(v) for v in values)
        for cand in (t, tuple(v for v in t if v >= 0)):
            if cand in self.s.seqs:
                self.findings.append(f"user sequence in {where}")
                return

    def text(self, value: str, where: str) -> None:
        words = set(_WORD.split(value)) | {value}
        if words & self.s.user_keys:
            self.findings.append(f"user key {sorted(words & self.s.user_keys)[0]!r} in {where}")
        for m in _NUM_RUN.finditer(value):
            run = [int(float(x)) for x in re.findall(r"-?\d+(?:\.0+)?", m.group(0))]
            for n in self.s.lengths & set(range(3, len(run) + 1)):
                for i in range(len(run) - n + 1):
                    self.numbers(run[i:i + n], f"text of {where}")
        stripped = value.strip()
        if stripped[:1] in "[{\"" and len(stripped) > 1:
            try:
                self.tree(json.loads(stripped), f"JSON inside {where}")
            except (ValueError, RecursionError):
                pass

    def raw(self, data: bytes, where: str) -> None:
        self.text(data.decode("utf-8", "replace"), f"bytes of {where}")
        for dt in (np.int32, np.int64, np.float32, np.float64):
            if len(data) % np.dtype(dt).itemsize == 0 and data:
                self.array(np.frombuffer(data, dtype=dt), f"bytes of {where} as {np.dtype(dt).name}", shapes=False)

    # -- structures ------------------------------------------------------------------------------------
    def tree(self, obj, where: str) -> None:
        if isinstance(obj, dict):
            if set(obj) == {"__bytes__"}:
                self.raw(base64.b64decode(obj["__bytes__"]), where)
                return
            for k, v in obj.items():
                self.text(str(k), where)
                self.tree(v, f"{where}/{k}")
        elif isinstance(obj, list):
            nums = [x for x in obj if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if obj and len(nums) == len(obj):
                if len(obj) in self.s.user_counts:
                    self.findings.append(f"per-user list (length {len(obj)}) in {where}")
                if all(float(x).is_integer() for x in nums):
                    self.numbers(nums, where)
            for i, x in enumerate(obj):
                self.tree(x, f"{where}[{i}]")
        elif isinstance(obj, str):
            self.text(obj, where)

    def array(self, a: np.ndarray, where: str, shapes: bool = True) -> None:
        if shapes and set(a.shape) & self.s.user_counts:
            self.findings.append(f"per-user shape {a.shape} of {where}")
        if a.dtype.kind in "US":
            for v in a.reshape(-1).tolist():
                self.text(v.decode("utf-8", "replace") if isinstance(v, bytes) else v, where)
            return
        if a.dtype.kind == "O":
            for v in a.reshape(-1).tolist():
                self.tree(v if not isinstance(v, bytes) else {"__bytes__": base64.b64encode(v).decode()}, where)
            return
        if a.dtype.kind not in "biuf" or a.size == 0:
            return
        with np.errstate(all="ignore"):
            if a.dtype.kind == "f":
                if not (np.isfinite(a).all() and (a == np.round(a)).all() and np.abs(a).max() < 2**53):
                    return
            ints = a.astype(np.int64)
        if ints.size in self.s.lengths or ints.size - int((ints < 0).sum()) in self.s.lengths:
            self.numbers(ints.reshape(-1), where)
        if ints.ndim >= 2 and (ints.shape[-1] in self.s.lengths or (ints < 0).any()):
            for row in ints.reshape(-1, ints.shape[-1]):
                self.numbers(row, f"a row of {where}")


def find_leaks(messages, silo_dirs) -> tuple[int, list[str]]:
    """messages: iterable of (label, recorded_text, {name: ndarray}). Returns (count, findings)."""
    checker = Checker(Secrets.of(silo_dirs))
    n = 0
    for label, text, arrays in messages:
        n += 1
        try:
            checker.tree(json.loads(text), label)
        except ValueError:
            checker.text(text, label)
        for name, a in arrays.items():
            checker.array(np.asarray(a), f"{label}/{name}")
    return n, checker.findings


def assert_no_user_data(messages, silo_dirs) -> int:
    """Raises AssertionError listing the leaks found; returns how many messages were checked."""
    n, findings = find_leaks(messages, silo_dirs)
    assert not findings, f"{len(findings)} leak(s): " + "; ".join(findings[:5])
    return n


def recorded_messages(folder: Path):
    """Messages written by server.transport.MessageRecorder (headers, all records, error replies)."""
    for js in sorted(Path(folder).glob("*.json")):
        npz = js.parent / (js.name[: -len(".json")] + ".npz")
        arrays = {}
        if npz.exists():
            with np.load(npz, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        yield js.name, js.read_text(), arrays
