"""On-disk domain format -> `CatalogView` (what a server may see) and `SiloData` (what never leaves a silo).

A domain folder holds six JSON files (docs/data.md):

- meta_data.json   item key -> {"title", "brand", "category"} (extra entries and extra fields are ignored)
- smap.json        item key -> item id; the ids are a permutation of 0..N-1 (row order of the item table)
- umap.json        user key -> user id (unique)
- train.json       user id (as a string) -> chronological list of item ids (non-empty)
- val.json         user id -> [second-to-last item id]
- test.json        user id -> [last item id]

Every problem is reported as a `DataError` (a `ValueError`) naming the file and the offending key/value.
Structural validation goes through pydantic models (one per file kind); the cross-file checks over the
sequences (id ranges, user sets) are vectorised so that loading a 35k-user domain stays well under a second.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, RootModel, StrictInt, ValidationError

from common.core.files import atomic_write

META_FILE = "meta_data.json"
SMAP_FILE = "smap.json"
UMAP_FILE = "umap.json"
SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}
DOMAIN_FILES = (META_FILE, SMAP_FILE, UMAP_FILE, *SPLIT_FILES.values())

_PRIVACY_MESSAGE = "SiloData holds user data and must never leave its silo"
#: larger files are refused before they are read (override: MERGEREC_MAX_JSON_BYTES)
MAX_JSON_BYTES = int(os.environ.get("MERGEREC_MAX_JSON_BYTES", str(512 << 20)))

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A domain folder (or a catalog payload) is missing, malformed or inconsistent."""


class PrivacyError(RuntimeError):
    """Someone tried to serialise or copy private silo data."""


# ---------------------------------------------------------------------------------------------------------
# pydantic models, one per file kind
# ---------------------------------------------------------------------------------------------------------


class ItemMeta(BaseModel):
    """The text fields of one item. Missing fields are empty strings; extra fields are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)

    title: str = ""
    brand: str = ""
    category: str = ""


class MetaFile(RootModel[dict[str, ItemMeta]]):
    """meta_data.json: item key -> ItemMeta."""


class IdMapFile(RootModel[dict[str, StrictInt]]):
    """smap.json / umap.json: key -> integer id."""


class SequenceFile(RootModel[dict[str, list[StrictInt]]]):
    """train.json / val.json / test.json: user id (string) -> list of item ids."""


# ---------------------------------------------------------------------------------------------------------
# reading helpers
# ---------------------------------------------------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(loc: tuple) -> str:
    if not loc:
        return "top level"
    out = f"key {str(loc[0])!r}"
    for part in loc[1:]:
        out += f" at position {part}" if isinstance(part, int) else f", field {part!r}"
    return out


def _validation_message(name: str, exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors[:3]:
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        parts.append(f"{_where(tuple(err['loc']))}: {msg} (got {_short(err.get('input'))})")
    more = f" (and {len(errors) - 3} more problems)" if len(errors) > 3 else ""
    return f"{name}: " + "; ".join(parts) + more


def _validate(model: type[BaseModel], data: Any, name: str):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DataError(_validation_message(name, exc)) from None


def _no_duplicate_keys(name: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise DataError(f"{name}: key {key!r} appears more than once")
                seen.add(key)
        return out

    return hook


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise DataError(f"{path}: {size} bytes, more than the limit of {MAX_JSON_BYTES} (MERGEREC_MAX_JSON_BYTES)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys(str(path)))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply (this format is at most 3 levels deep)") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be a JSON object, got {type(data).__name__}")
    return data


def _id_map(path: Path, what: str) -> dict[str, int]:
    """Validated key -> id map; ids are non-negative and unique."""
    ids = _validate(IdMapFile, _read_json(path), str(path)).root
    owner: dict[int, str] = {}
    for key, value in ids.items():
        if value < 0:
            raise DataError(f"{path}: {what} {key!r} has a negative id {value}")
        if value in owner:
            raise DataError(f"{path}: {what} {key!r} has id {value}, which is already used by {what} {owner[value]!r}")
        owner[value] = key
    return ids


# ---------------------------------------------------------------------------------------------------------
# CatalogView: all a server may know about a domain
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogView:
    """The item table of one domain; index = item id. Holds no user data and may cross the network."""

    domain: str
    item_keys: tuple[str, ...]
    items: tuple[ItemMeta, ...]
    _fp: list = field(default_factory=list, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.domain, str):
            raise DataError(f"catalog domain must be a string, got {_short(self.domain)}")
        object.__setattr__(self, "item_keys", tuple(self.item_keys))
        object.__setattr__(self, "items", tuple(self.items))
        if len(self.item_keys) != len(self.items):
            raise DataError(f"catalog {self.domain!r}: {len(self.item_keys)} item keys but {len(self.items)} items")
        if len(set(self.item_keys)) != len(self.item_keys):
            seen: set[str] = set()
            dup = next(k for k in self.item_keys if k in seen or seen.add(k))
            raise DataError(f"catalog {self.domain!r}: item key {dup!r} appears more than once")
        for i, (key, meta) in enumerate(zip(self.item_keys, self.items)):
            if not isinstance(key, str) or not isinstance(meta, ItemMeta):
                raise DataError(f"catalog {self.domain!r}: item {i} must be (str key, ItemMeta), "
                                f"got ({_short(key)}, {type(meta).__name__})")

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"CatalogView(domain={self.domain!r}, items={len(self)})"

    def fingerprint(self) -> str:
        """SHA-256 (hex) over the ordered item keys and texts. The domain name is not part of it."""
        if not self._fp:
            h = hashlib.sha256(b"catalog-v1\0")
            for key, m in zip(self.item_keys, self.items):
                for part in (key, m.title, m.brand, m.category):
                    raw = part.encode("utf-8")
                    h.update(len(raw).to_bytes(8, "little"))
                    h.update(raw)
            self._fp.append(h.hexdigest())
        return self._fp[0]


def _domain_name(path: Path, domain: str | None) -> str:
    return domain if domain is not None else Path(os.path.abspath(path)).name


def load_catalog(path: str | os.PathLike, domain: str | None = None) -> CatalogView:
    """Read meta_data.json + smap.json of a domain folder. Domain defaults to the folder name."""
    path = Path(path)
    smap_path, meta_path = path / SMAP_FILE, path / META_FILE
    smap = _id_map(smap_path, "item")
    n = len(smap)
    keys: list[str | None] = [None] * n
    for key, value in smap.items():
        if value >= n:
            raise DataError(f"{smap_path}: item {key!r} has id {value}, but ids must be 0..{n - 1} "
                            f"(a permutation of the {n} items)")
        keys[value] = key
    # ids are unique, non-negative and < n, so they are exactly 0..n-1
    raw_meta = _read_json(meta_path)
    missing = [k for k in smap if k not in raw_meta]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{meta_path}: no metadata for item {missing[0]!r} of {SMAP_FILE}{more}")
    meta = _validate(MetaFile, {k: raw_meta[k] for k in keys}, str(meta_path)).root
    untitled = sum(1 for k in keys if not meta[k].title.strip())
    if untitled:
        log.warning("%s: %d of %d items have an empty title (their text is brand and category only)",
                    meta_path, untitled, n)
    return CatalogView(domain=_domain_name(path, domain), item_keys=tuple(keys), items=tuple(meta[k] for k in keys))


# ---------------------------------------------------------------------------------------------------------
# SiloData: the private side
# ---------------------------------------------------------------------------------------------------------


class SiloData:
    """A domain's users and their sequences. Never serialisable: pickling or copying raises PrivacyError."""

    __slots__ = ("domain", "catalog", "users", "train", "val", "test")

    def __init__(self, domain: str, catalog: CatalogView, users: list[int], train: list[list[int]],
                 val: dict[int, int], test: dict[int, int]):
        if len(users) != len(train):
            raise DataError(f"silo {domain!r}: {len(users)} users but {len(train)} train sequences")
        self.domain = domain
        self.catalog = catalog
        self.users = users
        self.train = train
        self.val = val
        self.test = test

    @property
    def num_users(self) -> int:
        return len(self.users)

    def eval_split(self, name: str) -> tuple[list[list[int]], list[int]]:
        """(histories, targets) in user order. val input = train; test input = train + [val target]."""
        if name == "val":
            return ([list(seq) for u, seq in zip(self.users, self.train) if u in self.val],
                    [self.val[u] for u in self.users if u in self.val])
        if name == "test":
            histories, targets = [], []
            for u, seq in zip(self.users, self.train):
                if u in self.test:
                    histories.append(list(seq) + ([self.val[u]] if u in self.val else []))
                    targets.append(self.test[u])
            return histories, targets
        raise ValueError(f"unknown split {name!r} (expected 'val' or 'test')")

    def interaction_counts(self) -> np.ndarray:
        """How often each item occurs in the train sequences, int64 [num_items]."""
        n = len(self.catalog)
        if not self.train:
            return np.zeros(n, dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(self.train), dtype=np.int64)
        return np.bincount(flat, minlength=n).astype(np.int64)

    def __repr__(self) -> str:
        return f"SiloData(domain={self.domain!r}, users={len(self.users)}, items={len(self.catalog)})"

    # -- privacy: no pickling, no copying, no state export ------------------------------------------------
    def __reduce__(self):
        raise PrivacyError(_PRIVACY_MESSAGE)

    def __reduce_ex__(self, protocol):
        raise PrivacyError(_PRIVACY_MESSAGE)

    def __getstate__(self):
        raise PrivacyError(_PRIVACY_MESSAGE)

    def __copy__(self):
        raise PrivacyError(_PRIVACY_MESSAGE)

    def __deepcopy__(self, memo):
        raise PrivacyError(_PRIVACY_MESSAGE)


def _sequences(path: Path, user_ids: set[int], num_items: int, exactly_one: bool) -> dict[int, list[int]]:
    """One split file -> {user id: item ids}, checked against the users of umap and the item range."""
    data = _read_json(path)
    values = data.values()
    plain = all(type(v) is list for v in values) and set(map(type, itertools.chain.from_iterable(values))) <= {int}
    if not plain:  # slow path only when something is off: pydantic names the offending key and value
        data = _validate(SequenceFile, data, str(path)).root
    keys, seqs = list(data), list(data.values())

    def first(pred) -> str:
        return next(k for k, v in zip(keys, seqs) if pred(k, v))

    try:
        uids = list(map(int, keys))
        canonical = list(map(str, uids)) == keys
    except ValueError:
        canonical = False
    if not canonical:
        bad = first(lambda k, v: not (k.isascii() and k.isdigit() and str(int(k)) == k))
        raise DataError(f"{path}: user key {bad!r} is not an integer user id")
    if not user_ids.issuperset(uids):
        bad = first(lambda k, v: int(k) not in user_ids)
        raise DataError(f"{path}: user id {bad!r} is not in {UMAP_FILE}")
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    if exactly_one and (lens != 1).any():
        bad = first(lambda k, v: len(v) != 1)
        raise DataError(f"{path}: user {bad!r} must have exactly one item, got {len(data[bad])}: {_short(data[bad])}")
    if not exactly_one and (lens == 0).any():
        raise DataError(f"{path}: user {first(lambda k, v: not v)!r} has an empty sequence")
    out = dict(zip(uids, seqs))
    try:
        flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
        bad = np.flatnonzero((flat < 0) | (flat >= num_items))
        first_bad = int(bad[0]) if len(bad) else None
    except OverflowError:
        first_bad = next(i for i, v in enumerate(itertools.chain.from_iterable(seqs)) if not 0 <= v < num_items)
    if first_bad is not None:
        row = int(np.searchsorted(np.cumsum(lens), first_bad, side="right"))
        key = keys[row]
        pos = first_bad - (int(lens[:row].sum()) if row else 0)
        value = data[key][pos]
        raise DataError(f"{path}: user {key!r} has item id {value} at position {pos}, "
                        f"outside 0..{num_items - 1} (the items of {SMAP_FILE})")
    return out


def load_silo(path: str | os.PathLike, domain: str | None = None, min_users: int = 1) -> SiloData:
    """Read all six files of a domain folder and check them against each other. Fewer than `min_users` users
    (or validation / test users) is an error: a silo serves at least MIN_USERS_FOR_METRICS (5)."""
    path = Path(path)
    for name in DOMAIN_FILES:
        if not (path / name).is_file():
            raise DataError(f"{path / name}: missing file")
    name = _domain_name(path, domain)
    catalog = load_catalog(path, name)
    umap = _id_map(path / UMAP_FILE, "user")
    user_ids = set(umap.values())
    n = len(catalog)
    train = _sequences(path / SPLIT_FILES["train"], user_ids, n, exactly_one=False)
    targets: dict[str, dict[int, int]] = {}
    for split in ("val", "test"):
        f = path / SPLIT_FILES[split]
        seqs = _sequences(f, user_ids, n, exactly_one=True)
        extra = [u for u in seqs if u not in train]
        if extra:
            raise DataError(f"{f}: user {str(extra[0])!r} has no sequence in {SPLIT_FILES['train']}")
        targets[split] = {u: s[0] for u, s in seqs.items()}
    if len(train) != len(umap):
        key, uid = next((k, u) for k, u in umap.items() if u not in train)
        raise DataError(f"{path / UMAP_FILE}: user {key!r} (id {uid}) has no sequence in {SPLIT_FILES['train']}")
    for file, count in ((UMAP_FILE, len(umap)), (SPLIT_FILES["val"], len(targets["val"])),
                        (SPLIT_FILES["test"], len(targets["test"]))):
        if count < max(min_users, 1):
            raise DataError(f"{path / file}: {count} users, a domain needs at least {max(min_users, 1)} "
                            "(aggregate metrics leave a silo only over at least that many users)")
    users = sorted(train)
    return SiloData(domain=name, catalog=catalog, users=users, train=[train[u] for u in users],
                    val=targets["val"], test=targets["test"])


# ---------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------


def _write_json_atomic(path: Path, data: Any, indent: int) -> None:
    atomic_write(path, json.dumps(data, indent=indent, ensure_ascii=False))


def write_domain(path: str | os.PathLike, catalog: CatalogView, user_keys: list[str], train: list[list[int]],
                 val: list[int], test: list[int]) -> Path:
    """Write the six files of a domain folder; user id = position in `user_keys`. Each file is atomic."""
    path = Path(path)
    m = len(user_keys)
    if not (len(train) == len(val) == len(test) == m):
        raise DataError(f"write_domain: {m} user keys, {len(train)} train, {len(val)} val, {len(test)} test")
    if len(set(user_keys)) != m:
        raise DataError("write_domain: user keys are not unique")
    n = len(catalog)

    def check(ids: Iterable[int], what: str) -> None:
        for v in ids:
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < n:
                raise DataError(f"write_domain: {what} holds item id {_short(v)} outside 0..{n - 1}")

    for u, seq in enumerate(train):
        if not seq:
            raise DataError(f"write_domain: user {user_keys[u]!r} has an empty train sequence")
        check(seq, f"train of user {user_keys[u]!r}")
    check(val, "val")
    check(test, "test")
    path.mkdir(parents=True, exist_ok=True)
    meta = {k: {"title": it.title, "brand": it.brand, "category": it.category}
            for k, it in zip(catalog.item_keys, catalog.items)}
    _write_json_atomic(path / META_FILE, meta, 4)
    _write_json_atomic(path / SMAP_FILE, {k: i for i, k in enumerate(catalog.item_keys)}, 4)
    _write_json_atomic(path / UMAP_FILE, {k: u for u, k in enumerate(user_keys)}, 4)
    _write_json_atomic(path / SPLIT_FILES["train"], {str(u): [int(i) for i in s] for u, s in enumerate(train)}, 1)
    _write_json_atomic(path / SPLIT_FILES["val"], {str(u): [int(i)] for u, i in enumerate(val)}, 1)
    _write_json_atomic(path / SPLIT_FILES["test"], {str(u): [int(i)] for u, i in enumerate(test)}, 1)
    return path
