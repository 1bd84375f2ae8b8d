"""Raw Amazon review files -> the domain format of common/data/format.py (k-core, chronological, leave-one-out).

Inputs (gzipped or plain, one record per line):
- reviews: JSON lines with reviewerID, asin, unixReviewTime (overall is read by nobody: every review counts
  as an interaction), as in the 2014 and 2018 releases;
- metadata: one dict per line with asin, title, brand and either "categories" (2014: a list of category
  paths, each a list of strings) or "category" (2018: one path as a list of strings). The 2014 release
  writes Python dict literals rather than JSON, so a line that is not JSON is read with ast.literal_eval.

Steps: drop reviews of items without a metadata title; iterative k-core (users need max(k, 3)
interactions, items k); each user's interactions sorted by time (stable: ties keep file order); users
numbered by first appearance in the review file, items by first appearance when walking the users in that
order through their chronological sequences; category = the first category path joined with spaces;
leave-one-out split (last -> test, second-to-last -> val, the rest -> train).

    python -m common.data.amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz --out data/Beauty
"""

from __future__ import annotations

import argparse
import ast
import gzip
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from common.data.format import CatalogView, DataError, ItemMeta, write_domain


@dataclass
class ConversionStats:
    reviews: int = 0              # review lines read
    meta_items: int = 0           # metadata entries with a title
    meta_skipped: int = 0         # metadata lines without an asin or a title
    with_meta: int = 0            # reviews whose item has a metadata title
    interactions: int = 0         # after k-core
    users: int = 0
    items: int = 0
    core_rounds: int = 0


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing file")
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if line:
                yield lineno, line


def _parse_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError:
        try:
            rec = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise DataError(f"{path}:{lineno}: neither JSON nor a Python literal ({type(exc).__name__})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{lineno}: expected an object, got {type(rec).__name__}")
    return rec


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _category(rec: dict[str, Any]) -> str:
    path: Any = None
    cats = rec.get("categories")
    if isinstance(cats, list) and cats:
        path = cats[0]
    elif isinstance(rec.get("category"), list):
        path = rec["category"]
    if isinstance(path, str):
        return path.strip()
    if not isinstance(path, list):
        return ""
    return " ".join(p.strip() for p in path if isinstance(p, str) and p.strip())


def read_meta(path: str | os.PathLike, stats: ConversionStats | None = None) -> dict[str, ItemMeta]:
    """asin -> ItemMeta for every metadata line with a non-empty title (first line wins for an asin)."""
    path = Path(path)
    out: dict[str, ItemMeta] = {}
    for lineno, line in _lines(path):
        rec = _parse_record(path, lineno, line)
        asin, title = rec.get("asin"), _text(rec.get("title"))
        if not isinstance(asin, str) or not asin or not title:
            if stats is not None:
                stats.meta_skipped += 1
            continue
        if asin not in out:
            out[asin] = ItemMeta(title=title, brand=_text(rec.get("brand")), category=_category(rec))
    if stats is not None:
        stats.meta_items = len(out)
    return out


def read_reviews(path: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """(user keys, item keys, unix times), one entry per review line, in file order."""
    path = Path(path)
    users, items, times = [], [], []
    for lineno, line in _lines(path):
        rec = _parse_record(path, lineno, line)
        user, item, t = rec.get("reviewerID"), rec.get("asin"), rec.get("unixReviewTime")
        if not isinstance(user, str) or not isinstance(item, str):
            raise DataError(f"{path}:{lineno}: reviewerID and asin must be strings, got {user!r} and {item!r}")
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise DataError(f"{path}:{lineno}: unixReviewTime must be a number, got {t!r}")
        users.append(user)
        items.append(item)
        times.append(int(t))
    return users, items, times


def k_core(users: np.ndarray, items: np.ndarray, k_user: int, k_item: int) -> tuple[np.ndarray, int]:
    """Boolean mask of the interactions in the (k_user, k_item)-core, and the number of rounds it took."""
    mask = np.ones(len(users), dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        cu = np.bincount(users[mask], minlength=int(users.max(initial=-1)) + 1)
        ci = np.bincount(items[mask], minlength=int(items.max(initial=-1)) + 1)
        keep = mask & (cu[users] >= k_user) & (ci[items] >= k_item)
        if np.array_equal(keep, mask):
            return mask, rounds
        mask = keep


def _codes(keys: list[str]) -> tuple[np.ndarray, list[str]]:
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(k, len(index)) for k in keys), dtype=np.int64, count=len(keys))
    return codes, list(index)


def convert(reviews: str | os.PathLike, meta: str | os.PathLike, out: str | os.PathLike,
            domain: str | None = None, core: int = 5) -> ConversionStats:
    """Convert one raw domain; writes the six domain files to `out` and returns the counts."""
    if core < 1:
        raise ValueError(f"core must be >= 1, got {core}")
    out = Path(out)
    stats = ConversionStats()
    metas = read_meta(meta, stats)
    user_keys, item_keys, times = read_reviews(reviews)
    stats.reviews = len(user_keys)

    has_meta = np.fromiter((k in metas for k in item_keys), dtype=bool, count=len(item_keys))
    stats.with_meta = int(has_meta.sum())
    u_all, u_names = _codes(user_keys)
    i_all, i_names = _codes(item_keys)
    t_all = np.asarray(times, dtype=np.int64)
    order = np.flatnonzero(has_meta)  # file positions of the usable reviews
    u, i, t = u_all[order], i_all[order], t_all[order]

    mask, stats.core_rounds = k_core(u, i, max(core, 3), core)
    u, i, t = u[mask], i[mask], t[mask]
    stats.interactions = len(u)
    if not len(u):
        raise DataError(f"nothing survives the {core}-core filter ({stats.reviews} reviews, "
                        f"{stats.with_meta} with item metadata)")

    # users by first appearance (in file order); each user's interactions by time, ties in file order
    uniq_u, first_u = np.unique(u, return_index=True)
    user_rank = np.empty(int(u.max()) + 1, dtype=np.int64)
    user_rank[uniq_u[np.argsort(first_u, kind="stable")]] = np.arange(len(uniq_u))
    seq_order = np.lexsort((t, user_rank[u]))  # lexsort is stable: equal keys keep file order
    u_sorted, i_sorted = user_rank[u[seq_order]], i[seq_order]

    # items by first appearance along the users' chronological sequences
    uniq_i, first_i = np.unique(i_sorted, return_index=True)
    item_order = uniq_i[np.argsort(first_i, kind="stable")]
    item_id = np.empty(int(i.max()) + 1, dtype=np.int64)
    item_id[item_order] = np.arange(len(item_order))
    ids = item_id[i_sorted]

    bounds = np.flatnonzero(np.diff(u_sorted)) + 1
    seqs = [s.tolist() for s in np.split(ids, bounds)]
    user_code_by_rank = uniq_u[np.argsort(first_u, kind="stable")]
    users_out = [u_names[c] for c in user_code_by_rank]
    train = [s[:-2] for s in seqs]
    val = [s[-2] for s in seqs]
    test = [s[-1] for s in seqs]

    keys = [i_names[c] for c in item_order]
    name = domain if domain is not None else Path(os.path.abspath(out)).name
    catalog = CatalogView(domain=name, item_keys=tuple(keys), items=tuple(metas[k] for k in keys))
    write_domain(out, catalog, users_out, train, val, test)
    stats.users, stats.items = len(users_out), len(keys)
    return stats


def main(argv: list[str] | None = None, prog: str = "python -m common.data.amazon") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--reviews", type=Path, required=True, help="reviews file (JSON lines, .gz or plain)")
    ap.add_argument("--meta", type=Path, required=True, help="metadata file (JSON or Python-literal lines)")
    ap.add_argument("--out", type=Path, required=True, help="domain folder to write")
    ap.add_argument("--domain", help="domain name (default: the folder name)")
    ap.add_argument("--core", type=int, default=5, help="k of the iterative k-core filter (default 5)")
    args = ap.parse_args(argv)
    try:
        stats = convert(args.reviews, args.meta, args.out, args.domain, args.core)
    except DataError as exc:
        print(f"error: {exc}")
        return 1
    for name, value in asdict(stats).items():
        print(f"{name:>14}: {value}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
