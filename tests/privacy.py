"""Shared check: no user key, user sequence or per-user score in any recorded message.

A recorded message (server.transport.MessageRecorder) is a JSON file holding every record of every kind
(config, metric; array records go to the .npz next to it), or the text of an error reply. The checker parses
the JSON recursively (a string that holds JSON is parsed too), decodes bytes, base64 and hex runs of text, and
looks at every array of any dtype and rank (as a whole, flattened row- and column-wise, and each row).

What it sees (tests/test_privacy_checker.py measures it on a generated family of encodings):
- user keys (umap.json) in any text, compared with case and every non-alphanumeric character ignored (another
  separator, none, spaces between the characters), forwards or reversed, also inside base64 / hex / bytes;
- user sequences (train, train + val, train + val + test): the whole sequence of 3+ items as a list of numbers;
  any 5 consecutive items of one, in order or reversed, or 6 shifted by any constant (1-based ids, an offset),
  inside any run of numbers: a list, an array (any int / float dtype, rows, columns, flattened), the numbers of
  a text whatever joins them, item keys in a text (their ids), the bytes of a config record;
- sequences packed into one number: 3-6 consecutive items as the digits of an integer or a float (each item
  zero-padded to one width, or not padded when that makes 6+ digits), in a header, a text or an array;
- per-user shapes: an array with a dimension, or a header list with a length, equal to a domain's number of
  users (or validation / test users).

What it cannot see: encryption, hashing or any keyed transform; a sequence sorted, permuted, scaled or with
items left out (every other item); fewer than 5 consecutive items (6 when shifted) inside a longer run of numbers (they are
indistinguishable from teacher top-k rows); arithmetic progressions shifted (a counter looks the same); packing
into float32 fractions or with fewer than 6 digits; a key reduced to its number or another id; anything split
across fields or messages, or hidden in the low bits of model weights; what aggregates reveal (differencing:
tests/test_eval_privacy.py). That is why the protocol's replies are typed (common/protocol/messages.py) and
the server validates every field before it stores anything: a leak should be impossible to send, not merely
detected afterwards.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WINDOW = 5  # consecutive items matched anywhere (shift- and reversal-invariant)
PACK_MIN_DIGITS = 6  # a packed number with fewer digits matches too much by chance
PACK_ITEMS = (3, 4, 5, 6)
_INT = re.compile(r"\d+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_RUN = re.compile(r"\d+(?:[^\w]+\d+){2,}")
_B64 = re.compile(r"[A-Za-z0-9+/_-]{12,}={0,2}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2}){6,}")
_ALNUM = re.compile(r"[A-Za-z0-9]+")
MAX_DEPTH = 4  # nested decodings (base64 of JSON of base64 ...)


def _norm(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values in sorted_set, elementwise (binary search: np.isin sorts both sides on every call)."""
    if not sorted_set.size:
        return np.zeros(values.shape, bool)
    idx = np.clip(np.searchsorted(sorted_set, values), 0, sorted_set.size - 1)
    return sorted_set[idx] == values


def _small_int(digits: str) -> int:
    """A number of a text as an int64 (one too long for it: -1, a break in any run)."""
    return int(digits) if len(digits) < 18 else -1


def _diffs(seq) -> tuple[int, ...]:
    return tuple(int(b) - int(a) for a, b in zip(seq[:-1], seq[1:]))


@dataclass
class Secrets:
    user_keys: set[str] = field(default_factory=set)
    norm_keys: set[str] = field(default_factory=set)
    seqs: set[tuple[int, ...]] = field(default_factory=set)
    lengths: set[int] = field(default_factory=set)
    user_counts: set[int] = field(default_factory=set)
    windows: set[tuple[int, ...]] = field(default_factory=set)  # difference tuples of WINDOW consecutive items
    exact: set[tuple[int, ...]] = field(default_factory=set)  # WINDOW consecutive items themselves
    # difference tuples of WINDOW + 1 consecutive items: a shifted match must be one item longer, since five
    # shifted items of a small catalog turn up by chance in teacher top-k tables (item ids by design)
    windows_long: set[tuple[int, ...]] = field(default_factory=set)
    packed: set[int] = field(default_factory=set)  # 3-6 consecutive items as digits, leading zeros dropped
    item_ids: dict[str, int] = field(default_factory=dict)  # normalised item key -> item id

    @classmethod
    def of(cls, silo_dirs) -> "Secrets":
        from common.data.format import load_silo

        s = cls()
        for d in silo_dirs:
            silo = load_silo(d)
            s.user_keys |= set(json.loads((Path(d) / "umap.json").read_text()))
            s.item_ids.update({_norm(k): i for i, k in enumerate(silo.catalog.item_keys)})
            width = len(str(max(len(silo.catalog) - 1, 0)))
            for u, seq in zip(silo.users, silo.train):
                full = list(seq)
                variants = [tuple(full)]
                if u in silo.val:
                    full.append(silo.val[u])
                    variants.append(tuple(full))
                if u in silo.test:
                    variants.append(tuple(full + [silo.test[u]]))
                for v in variants:
                    s._add(v, width)
            s.user_counts |= {silo.num_users, len(silo.test), len(silo.val)}
        s.seqs = {q for q in s.seqs if len(q) >= 3}
        s.lengths = {len(q) for q in s.seqs}
        s.norm_keys = {_norm(k) for k in s.user_keys if len(_norm(k)) >= 4}
        return s

    def _add(self, seq: tuple[int, ...], width: int) -> None:
        self.seqs.add(seq)
        for i in range(len(seq) - WINDOW + 1):
            d = _diffs(seq[i:i + WINDOW])
            if len(set(d)) > 1:  # an arithmetic progression is what counters look like
                self.windows.add(d)
                self.exact.add(tuple(seq[i:i + WINDOW]))
        for i in range(len(seq) - WINDOW):
            d = _diffs(seq[i:i + WINDOW + 1])
            if len(set(d)) > 1:
                self.windows_long.add(d)
        for n in PACK_ITEMS:
            for i in range(len(seq) - n + 1):
                part = seq[i:i + n]
                for w in range(width, 7):
                    digits = "".join(str(x).zfill(w) for x in part).lstrip("0")
                    if len(digits) >= PACK_MIN_DIGITS:
                        self.packed.add(int(digits))
                plain = "".join(map(str, part))
                if len(plain) >= PACK_MIN_DIGITS:
                    self.packed.add(int(plain))


class Checker:
    def __init__(self, secrets: Secrets):
        self.s = secrets
        self.findings: list[str] = []
        self._scalars: list[tuple[float, str]] = []
        if not hasattr(secrets, "_lookup"):  # sorted arrays for vectorised lookups, built once per Secrets
            coef = np.random.default_rng(0).integers(1, 2**40, WINDOW - 1, dtype=np.int64)
            wins = np.array(sorted(secrets.windows), dtype=np.int64).reshape(-1, WINDOW - 1)
            secrets._lookup = (np.array(sorted(secrets.packed), dtype=np.float64), coef, np.unique(wins @ coef),
                               {len(k) for k in secrets.norm_keys})
        # windows are looked up by a hash first (vectorised over long arrays), then compared exactly
        self._packed, self._coef, self._hashes, self._key_lengths = secrets._lookup

    # -- primitives ------------------------------------------------------------------------------------
    def numbers(self, values, where: str, valid: np.ndarray | None = None) -> None:
        """A run of integers: a whole user sequence (padding stripped; forwards or backwards), or WINDOW
        consecutive items of one anywhere inside it, forwards or backwards, or WINDOW + 1 of them shifted by any
        constant. `valid`:
        which entries are integers at all (a window must lie inside them)."""
        t = np.asarray(values, dtype=np.int64).reshape(-1)
        if valid is None:
            for cand in (t, t[t >= 0]):
                if cand.size in self.s.lengths:
                    tup = tuple(cand.tolist())
                    if tup in self.s.seqs or tup[::-1] in self.s.seqs:
                        self.findings.append(f"user sequence in {where}")
                        return
        if t.size < WINDOW or not self._hashes.size:
            return
        d = np.diff(t)
        ok = None if valid is None else np.lib.stride_tricks.sliding_window_view(valid, WINDOW).all(1)
        for items, run, mask in ((t, d, ok), (t[::-1], -d[::-1], None if ok is None else ok[::-1])):
            win = np.lib.stride_tricks.sliding_window_view(run, WINDOW - 1)
            hit = _member(win @ self._coef, self._hashes)
            if mask is not None:
                hit &= mask
            for i in np.flatnonzero(hit)[:1000]:
                if tuple(win[i].tolist()) not in self.s.windows:
                    continue
                same_items = tuple(items[i:i + WINDOW].tolist()) in self.s.exact
                shifted = i + WINDOW <= run.size and tuple(run[i:i + WINDOW].tolist()) in self.s.windows_long
                if same_items or shifted:
                    self.findings.append(f"a run of a user sequence in {where}")
                    return

    def packed(self, values: np.ndarray, where: str, exact_only: bool = False) -> None:
        """Numbers whose digits are 3-6 consecutive items of a user sequence: integers, or floats whose shortest
        decimal form holds them (7009012.0, 0.007009012; the smallest power of ten that makes them integral)."""
        v = np.abs(np.asarray(values, dtype=np.float64).reshape(-1))
        v = v[np.isfinite(v) & (v > 0) & (v < 2**53)]
        if not v.size or not self._packed.size:
            return
        integral = v == np.round(v)
        self._packed_in(v[integral], where)
        if exact_only:
            return
        v = v[~integral]
        for k in range(1, 16):
            if not v.size:
                return
            x = v * 10.0**k
            r = np.rint(x)
            exact = np.abs(x - r) <= x * 1e-15 + 1e-12
            if self._packed_in(r[exact & (r < 2**53)], where):
                return
            v = v[~exact]

    def _packed_in(self, cand: np.ndarray, where: str) -> bool:
        cand = cand[cand >= 10 ** (PACK_MIN_DIGITS - 1)]
        if cand.size:
            if _member(cand, self._packed).any():
                self.findings.append(f"user sequence packed into a number in {where}")
                return True
        return False

    def flush(self, where: str) -> None:
        """The numbers of a message's headers (collected by `tree`), checked for packed sequences at once."""
        if self._scalars:
            self.packed(np.array([v for v, _ in self._scalars if abs(v) < 2**53]), f"a header number of {where}")
            self._scalars = []

    def text(self, value: str, where: str, depth: int = 0) -> None:
        if len(value) < 3:
            return
        norm = _norm(value)
        for s in (norm, norm[::-1]):
            for n in self._key_lengths:
                if {s[i:i + n] for i in range(len(s) - n + 1)} & self.s.norm_keys:
                    self.findings.append(f"user key in {where}")
                    break
            else:
                continue
            break
        ints = [_small_int(x) for x in _INT.findall(value)]
        if len(ints) >= 3:
            self.numbers(ints, f"the numbers of {where}")
            for m in _RUN.finditer(value):  # numbers joined by punctuation or spaces only: each run on its own
                self.numbers([_small_int(x) for x in _INT.findall(m.group(0))], f"a run of numbers in {where}")
        nums = [float(x) for x in _NUMBER.findall(value) if len(x.replace(".", "").lstrip("0")) >= PACK_MIN_DIGITS]
        if nums:
            self.packed(np.array(nums), f"a number in {where}")
        items = [self.s.item_ids[w] for w in (_norm(t) for t in _ALNUM.findall(value)) if w in self.s.item_ids]
        if len(items) >= 3:
            self.numbers(items, f"the item keys of {where}")
        if depth >= MAX_DEPTH:
            return
        stripped = value.strip()
        if stripped[:1] in "[{\"" and len(stripped) > 1:
            try:
                self.tree(json.loads(stripped), f"JSON inside {where}", depth + 1)
            except (ValueError, RecursionError):
                pass
        for m in _B64.finditer(value):
            run = m.group(0)
            for decode in (base64.b64decode, base64.urlsafe_b64decode):
                try:
                    raw = decode(run + "=" * (-len(run) % 4))
                except (binascii.Error, ValueError):
                    continue
                if len(raw) >= 3:
                    self.raw(raw, f"base64 in {where}", depth + 1)
        for m in _HEX.finditer(value):
            self.raw(bytes.fromhex(m.group(0)), f"hex in {where}", depth + 1)

    def raw(self, data: bytes, where: str, depth: int = 0) -> None:
        self.text(data.decode("utf-8", "replace"), f"bytes of {where}", depth)
        for dt in (np.uint8, np.int16, np.int32, np.int64, np.float32, np.float64):
            if len(data) % np.dtype(dt).itemsize == 0 and len(data) >= 3 * np.dtype(dt).itemsize:
                self.array(np.frombuffer(data, dtype=dt), f"bytes of {where} as {np.dtype(dt).name}", shapes=False,
                           as_text=False)

    # -- structures ------------------------------------------------------------------------------------
    def tree(self, obj, where: str, depth: int = 0) -> None:
        if isinstance(obj, dict):
            if set(obj) == {"__bytes__"}:
                self.raw(base64.b64decode(obj["__bytes__"]), where, depth)
                return
            for k, v in obj.items():
                self.text(str(k), where, depth)
                self.tree(v, f"{where}/{k}", depth)
        elif isinstance(obj, list):
            nums = [x for x in obj if isinstance(x, (int, float)) and not isinstance(x, bool)]
            if obj and len(nums) == len(obj):
                if len(obj) in self.s.user_counts:
                    self.findings.append(f"per-user list (length {len(obj)}) in {where}")
                self.array(np.array(nums, dtype=np.float64), where, shapes=False)
                return
            for i, x in enumerate(obj):
                self.tree(x, f"{where}[{i}]", depth)
        elif isinstance(obj, bool) or obj is None:
            return
        elif isinstance(obj, (int, float)):
            self._scalars.append((float(obj), where))  # looked at together, by `flush`
        elif isinstance(obj, str):
            self.text(obj, where, depth)

    def array(self, a: np.ndarray, where: str, shapes: bool = True, as_text: bool = True) -> None:
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
        if as_text and a.dtype.kind in "iu" and a.dtype.itemsize == 1 and a.size >= 4:
            self.text(a.astype(np.uint8).tobytes().decode("utf-8", "replace"), f"the bytes of {where}")
        with np.errstate(all="ignore"):
            flat = a.reshape(-1)
            self.packed(flat, where, exact_only=a.dtype.kind == "f" and a.dtype.itemsize < 8)
            if a.dtype.kind == "f":
                integral = np.isfinite(flat) & (flat == np.round(flat)) & (np.abs(flat) < 2**53)
                if not integral.any():
                    return
                if not integral.all():  # windows inside the integral stretches of a float array
                    self.numbers(np.where(integral, flat, 0).astype(np.int64), where, valid=integral)
                    return
            ints = a.astype(np.int64)
        if ints.size and ints.min() == ints.max():
            return  # a constant array holds no sequence
        self.numbers(ints.reshape(-1), where)
        if ints.ndim >= 2:
            self.numbers(ints.reshape(-1, order="F"), f"the columns of {where}")
            if ints.shape[-1] <= max(self.s.lengths, default=0) + 64:
                for row in ints.reshape(-1, ints.shape[-1]):
                    self.numbers(row, f"a row of {where}")
            if ints.shape[0] <= max(self.s.lengths, default=0) + 64:
                for col in ints.reshape(ints.shape[0], -1).T:
                    self.numbers(col, f"a column of {where}")


def find_leaks(messages, silo_dirs=None, secrets: Secrets | None = None) -> tuple[int, list[str]]:
    """messages: iterable of (label, recorded_text, {name: ndarray}). Returns (count, findings)."""
    checker = Checker(secrets or Secrets.of(silo_dirs))
    n = 0
    for label, text, arrays in messages:
        n += 1
        try:
            checker.tree(json.loads(text), label)
        except ValueError:
            checker.text(text, label)
        checker.flush(label)
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
