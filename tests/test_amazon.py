"""Raw Amazon files -> domain format: metadata formats, k-core, chronological order, leave-one-out."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from common.data.amazon import convert, k_core, main, read_meta
from common.data.format import DataError, load_silo

# 2014 metadata lines are Python literals (single quotes); 2018 lines are JSON with a flat "category" list
META_LINES = [
    "{'asin': 'I1', 'title': 'Red Lamp', 'brand': 'Acme', 'categories': [['Home', 'Lighting', 'Lamps'], ['Sale']]}",
    json.dumps({"asin": "I2", "title": "Blue Mug", "category": ["Home", "Kitchen"], "price": "$3"}),
    "{'asin': 'I3', 'title': \"Kid's Kite\", 'categories': [['Toys']], 'related': {'also_bought': ['I1']}}",
    json.dumps({"asin": "I4", "title": "Lonely Item", "brand": "Solo", "categories": [["Misc"]]}),
    "{'asin': 'I5', 'brand': 'NoTitle', 'categories': [['Misc']]}",  # no title: its reviews are dropped
    json.dumps({"asin": "I7", "title": "   ", "categories": [["Misc"]]}),  # blank title: dropped too
    "",
]


def review(user: str, item: str, t: int, rating: float = 5.0) -> str:
    return json.dumps({"reviewerID": user, "asin": item, "unixReviewTime": t, "overall": rating,
                       "reviewText": "fine"})


# core 3: E's only distinct item I4 has one review, so I4 goes, then E (2 left) goes.
# F reviews I5 (no title) and I6 (no metadata at all): those reviews go, F keeps 3.
REVIEWS = [
    review("B", "I2", 200), review("A", "I3", 300), review("A", "I1", 100), review("B", "I1", 200),
    review("C", "I1", 50), review("C", "I2", 60), review("C", "I3", 70), review("A", "I2", 200),
    review("B", "I3", 150), review("E", "I1", 10), review("E", "I2", 20), review("E", "I4", 30),
    review("F", "I5", 1), review("F", "I3", 5), review("F", "I6", 6), review("F", "I2", 3), review("F", "I1", 4),
]


def _gz(path: Path, lines: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def test_read_meta_both_formats(tmp_path):
    metas = read_meta(_gz(tmp_path / "meta.json.gz", META_LINES))
    assert set(metas) == {"I1", "I2", "I3", "I4"}
    assert metas["I1"].category == "Home Lighting Lamps" and metas["I1"].brand == "Acme"  # first path only
    assert metas["I2"].category == "Home Kitchen" and metas["I2"].brand == ""  # 2018 "category"
    assert metas["I3"].title == "Kid's Kite"


def test_convert_kcore_order_and_split(tmp_path):
    reviews = _gz(tmp_path / "reviews.json.gz", REVIEWS)
    meta = _gz(tmp_path / "meta.json.gz", META_LINES)
    stats = convert(reviews, meta, tmp_path / "Shop", core=3)
    assert (stats.reviews, stats.with_meta, stats.interactions, stats.users, stats.items) == (17, 15, 12, 4, 3)
    out = tmp_path / "Shop"
    umap = json.loads((out / "umap.json").read_text())
    smap = json.loads((out / "smap.json").read_text())
    assert list(umap) == ["B", "A", "C", "F"]  # users by first appearance in the review file; E removed
    # walk B (I1@200, I2@200 tie: file order is I2 first, I3@150 earliest) -> I3, I2, I1
    assert smap == {"I3": 0, "I2": 1, "I1": 2}
    seqs = {u: json.loads((out / "train.json").read_text())[str(i)] for u, i in umap.items()}
    val = {u: json.loads((out / "val.json").read_text())[str(i)] for u, i in umap.items()}
    test = {u: json.loads((out / "test.json").read_text())[str(i)] for u, i in umap.items()}
    # full chronological sequences: B: I3(150) I2(200) I1(200); A: I1(100) I2(200) I3(300);
    # C: I1 I2 I3; F: I2(3) I1(4) I3(5)
    assert (seqs["B"], val["B"], test["B"]) == ([0], [1], [2])
    assert (seqs["A"], val["A"], test["A"]) == ([2], [1], [0])
    assert (seqs["C"], val["C"], test["C"]) == ([2], [1], [0])
    assert (seqs["F"], val["F"], test["F"]) == ([1], [2], [0])
    silo = load_silo(out)
    assert silo.domain == "Shop" and silo.num_users == 4 and len(silo.catalog) == 3
    assert silo.catalog.items[0].title == "Kid's Kite" and silo.catalog.items[0].category == "Toys"
    assert silo.catalog.item_keys == ("I3", "I2", "I1")
    assert json.loads((out / "meta_data.json").read_text())["I1"] == {
        "title": "Red Lamp", "brand": "Acme", "category": "Home Lighting Lamps"}


def test_default_five_core_plain_files_and_repeats(tmp_path):
    lines, t = [], 0
    for u in range(6):  # six users x six items, everyone reviews everything: a 5-core
        for i in range(6):
            t += 1
            lines.append(review(f"U{u}", f"P{(i + u) % 6}", t))
    lines += [review("U0", "P0", 10_000)]  # a repeat purchase stays in the sequence
    lines += [review("X", f"P{i}", 5) for i in range(4)]  # X has 4 interactions: dropped by the 5-core
    meta = [json.dumps({"asin": f"P{i}", "title": f"Product {i}", "categories": [["Cat", f"Sub{i}"]]})
            for i in range(6)]
    (tmp_path / "r.json").write_text("\n".join(lines))
    (tmp_path / "m.json").write_text("\n".join(meta))
    stats = convert(tmp_path / "r.json", tmp_path / "m.json", tmp_path / "out", domain="Named")
    assert (stats.users, stats.items, stats.interactions) == (6, 6, 37)
    silo = load_silo(tmp_path / "out", "Named")
    assert silo.num_users == 6
    u0 = silo.users[0]
    full = silo.train[0] + [silo.val[u0], silo.test[u0]]
    assert full == [0, 1, 2, 3, 4, 5, 0]  # U0's order defines the ids; the repeat is last
    assert [len(s) for s in silo.train] == [5, 4, 4, 4, 4, 4]


def test_k_core_is_iterative():
    # items: 0 has 3 users, 1 has 2, 2 has 1; with k=2 item 2 goes, then user 2 (only 1 left) goes,
    # then item 1 still has 2 users ...
    users = np.array([0, 0, 1, 1, 2, 2, 3])
    items = np.array([0, 1, 0, 1, 0, 2, 0])
    mask, rounds = k_core(users, items, 2, 2)
    assert mask.tolist() == [True, True, True, True, False, False, False]
    assert rounds >= 2


def test_cli_prints_counts(tmp_path, capsys):
    reviews = _gz(tmp_path / "reviews.json.gz", REVIEWS)
    meta = _gz(tmp_path / "meta.json.gz", META_LINES)
    assert main(["--reviews", str(reviews), "--meta", str(meta), "--out", str(tmp_path / "o"), "--core", "3"]) == 0
    printed = capsys.readouterr().out
    assert "users: 4" in printed and "items: 3" in printed and "interactions: 12" in printed
    assert main(["--reviews", str(tmp_path / "nope"), "--meta", str(meta), "--out", str(tmp_path / "o2")]) == 1
    assert "missing file" in capsys.readouterr().out


def test_bad_lines_are_reported(tmp_path):
    meta = _gz(tmp_path / "meta.json.gz", META_LINES)
    (tmp_path / "bad.json").write_text(review("A", "I1", 1) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.json:2: neither JSON nor a Python literal"):
        convert(tmp_path / "bad.json", meta, tmp_path / "o")
    (tmp_path / "bad2.json").write_text(json.dumps({"reviewerID": "A", "asin": "I1"}))
    with pytest.raises(DataError, match=r"bad2.json:1: unixReviewTime"):
        convert(tmp_path / "bad2.json", meta, tmp_path / "o")
    with pytest.raises(DataError, match="nothing survives"):
        convert(_gz(tmp_path / "r.gz", REVIEWS), meta, tmp_path / "o", core=50)
