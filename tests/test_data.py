"""Domain-folder loading: CatalogView / SiloData contracts, privacy, and one test per kind of bad input."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pydantic_core
import pytest

from common.data.format import (CatalogView, DataError, ItemMeta, PrivacyError, SiloData, load_catalog, load_silo,
                         write_domain)

META = {
    "K0": {"title": "Red Lamp", "brand": "Acme", "category": "Home Lighting"},
    "K1": {"title": "Blue Mug", "brand": "", "category": "Home Kitchen", "price": 3.5},
    "K2": {"title": "Green Hat", "category": "Clothing"},
    "K3": {"title": "Yellow Kite", "brand": "Sky", "category": "Toys"},
    "EXTRA": {"title": 12345, "brand": None},  # not in smap: ignored, even though it is malformed
}
SMAP = {"K2": 2, "K0": 0, "K3": 3, "K1": 1}
UMAP = {"alice": 0, "bob": 1, "carol": 2}
TRAIN = {"0": [0, 1], "2": [3, 3, 0], "1": [2]}
VAL = {"0": [2], "1": [0], "2": [1]}
TEST = {"0": [3], "1": [1]}


def _write(folder: Path, **override) -> Path:
    files = {"meta_data": META, "smap": SMAP, "umap": UMAP, "train": TRAIN, "val": VAL, "test": TEST}
    files.update(override)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / f"{name}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return folder


@pytest.fixture
def domain(tmp_path) -> Path:
    return _write(tmp_path / "Shop")


# --------------------------------------------------------------------------------------------------------
# happy path
# --------------------------------------------------------------------------------------------------------


def test_load_catalog_orders_by_id_and_fills_defaults(domain):
    cat = load_catalog(domain)
    assert cat.domain == "Shop"  # folder name
    assert len(cat) == 4
    assert cat.item_keys == ("K0", "K1", "K2", "K3")
    assert cat.items[1] == ItemMeta(title="Blue Mug", brand="", category="Home Kitchen")  # extra key ignored
    assert cat.items[2] == ItemMeta(title="Green Hat", brand="", category="Clothing")  # missing brand -> ""
    assert load_catalog(domain, "other").domain == "other"


def test_load_silo_contents_and_eval_splits(domain):
    silo = load_silo(domain)
    assert silo.domain == "Shop" and silo.num_users == 3
    assert silo.users == [0, 1, 2]
    assert silo.train == [[0, 1], [2], [3, 3, 0]]  # aligned with users, repeats kept
    assert silo.val == {0: 2, 1: 0, 2: 1} and silo.test == {0: 3, 1: 1}
    hist, tgt = silo.eval_split("val")
    assert hist == [[0, 1], [2], [3, 3, 0]] and tgt == [2, 0, 1]
    hist, tgt = silo.eval_split("test")  # user 2 has no test target: skipped
    assert hist == [[0, 1, 2], [2, 0]] and tgt == [3, 1]
    hist[0].append(99)  # callers get copies
    assert silo.train[0] == [0, 1]
    with pytest.raises(ValueError, match="unknown split"):
        silo.eval_split("train")
    counts = silo.interaction_counts()
    assert counts.dtype == np.int64 and counts.tolist() == [2, 1, 1, 2]


def test_silo_data_never_serialises(domain):
    silo = load_silo(domain)
    for attempt in (lambda: pickle.dumps(silo), lambda: pickle.dumps({"x": [silo]}, protocol=0),
                    lambda: copy.deepcopy(silo), lambda: copy.copy(silo), lambda: silo.__getstate__(),
                    lambda: silo.__reduce__(), lambda: silo.__reduce_ex__(2)):
        with pytest.raises(PrivacyError, match="must never leave its silo"):
            attempt()
    with pytest.raises(TypeError):
        json.dumps(silo)
    with pytest.raises(pydantic_core.PydanticSerializationError):
        pydantic_core.to_json(silo)
    assert "alice" not in repr(silo) and "[0, 1]" not in repr(silo)


def test_catalog_fingerprint_and_json_roundtrip(domain, tmp_path):
    cat = load_catalog(domain)
    fp = cat.fingerprint()
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert load_catalog(domain).fingerprint() == fp  # stable across loads
    assert load_catalog(domain, "renamed").fingerprint() == fp  # content only
    changed = CatalogView(domain="Shop", item_keys=cat.item_keys,
                          items=(ItemMeta(title="Red Lamp!", brand="Acme", category="Home Lighting"), *cat.items[1:]))
    assert changed.fingerprint() != fp
    # field boundaries matter: moving a character from title to brand changes the fingerprint
    a = CatalogView("d", ("k",), (ItemMeta(title="ab", brand="c"),))
    b = CatalogView("d", ("k",), (ItemMeta(title="a", brand="bc"),))
    assert a.fingerprint() != b.fingerprint()
    with pytest.raises(DataError, match="item key 'a' appears more than once"):
        CatalogView("x", ("a", "a"), (ItemMeta(), ItemMeta()))
    with pytest.raises(DataError, match="2 item keys but 1 items"):
        CatalogView("x", ("a", "b"), (ItemMeta(),))


def test_item_meta_is_frozen():
    m = ItemMeta(title="t")
    with pytest.raises(Exception):
        m.title = "u"  # type: ignore[misc]


def test_write_domain_roundtrip_is_atomic_and_loadable(domain, tmp_path):
    silo = load_silo(domain)
    out = tmp_path / "copy"
    keys = ["alice", "bob", "carol"]
    write_domain(out, silo.catalog, keys, [[0, 1], [2], [3, 3, 0]], [2, 0, 1], [3, 1, 0])
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["meta_data.json", "smap.json", "umap.json", "train.json", "val.json", "test.json"])  # no temp files
    back = load_silo(out)
    assert back.catalog.item_keys == silo.catalog.item_keys and back.catalog.items == silo.catalog.items
    assert back.train == silo.train and back.val == silo.val and back.test == {0: 3, 1: 1, 2: 0}
    assert json.loads((out / "umap.json").read_text()) == {"alice": 0, "bob": 1, "carol": 2}
    assert json.loads((out / "train.json").read_text())["2"] == [3, 3, 0]
    assert json.loads((out / "meta_data.json").read_text())["K2"] == {"title": "Green Hat", "brand": "",
                                                                      "category": "Clothing"}
    with pytest.raises(DataError, match="outside 0..3"):
        write_domain(out, silo.catalog, keys, [[0], [1], [9]], [0, 0, 0], [0, 0, 0])
    with pytest.raises(DataError, match="empty train sequence"):
        write_domain(out, silo.catalog, keys, [[0], [], [1]], [0, 0, 0], [0, 0, 0])
    with pytest.raises(DataError, match="3 user keys, 2 train"):
        write_domain(out, silo.catalog, keys, [[0], [1]], [0, 0, 0], [0, 0, 0])
    assert load_silo(out).train == silo.train  # failed writes left the folder intact


# --------------------------------------------------------------------------------------------------------
# bad inputs: each error names the file and the offending key/value
# --------------------------------------------------------------------------------------------------------


def _error(folder: Path, loader=load_silo) -> str:
    with pytest.raises(DataError) as info:
        loader(folder)
    return str(info.value)


@pytest.mark.parametrize("name", ["meta_data", "smap", "umap", "train", "val", "test"])
def test_missing_file(domain, name):
    (domain / f"{name}.json").unlink()
    msg = _error(domain)
    assert f"{name}.json" in msg and "missing file" in msg


def test_missing_file_for_catalog(domain):
    (domain / "smap.json").unlink()
    assert "smap.json: missing file" in _error(domain, load_catalog)


def test_invalid_json_reports_line_and_column(tmp_path):
    folder = _write(tmp_path / "d", train='{\n "0": [0, 1],\n "1": [2,,]\n}')
    msg = _error(folder)
    assert "train.json" in msg and "invalid JSON at line 3 column" in msg


def test_top_level_must_be_an_object(tmp_path):
    msg = _error(_write(tmp_path / "d", umap=[1, 2]))
    assert "umap.json" in msg and "must be a JSON object" in msg


def test_duplicate_json_key(tmp_path):
    msg = _error(_write(tmp_path / "d", val='{"0": [2], "1": [0], "0": [1]}'))
    assert "val.json" in msg and "key '0' appears more than once" in msg


def test_item_id_out_of_range(tmp_path):
    msg = _error(_write(tmp_path / "d", train={**TRAIN, "2": [3, 4, 0]}))
    assert "train.json" in msg and "user '2'" in msg and "item id 4 at position 1" in msg and "0..3" in msg


def test_item_id_negative(tmp_path):
    msg = _error(_write(tmp_path / "d", val={**VAL, "1": [-1]}))
    assert "val.json" in msg and "user '1'" in msg and "item id -1" in msg


def test_huge_item_id(tmp_path):
    msg = _error(_write(tmp_path / "d", test={**TEST, "1": [10**30]}))
    assert "test.json" in msg and "user '1'" in msg and str(10**30) in msg


@pytest.mark.parametrize("bad", ["3", 1.5, True, None])
def test_non_integer_item_id_in_sequence(tmp_path, bad):
    msg = _error(_write(tmp_path / "d", train={**TRAIN, "0": [0, bad]}))
    assert "train.json" in msg and "key '0' at position 1" in msg and repr(bad) in msg


def test_sequence_not_a_list(tmp_path):
    msg = _error(_write(tmp_path / "d", test={**TEST, "0": 3}))
    assert "test.json" in msg and "key '0'" in msg and "list" in msg


def test_non_integer_id_in_smap(tmp_path):
    msg = _error(_write(tmp_path / "d", smap={**SMAP, "K1": "1"}), load_catalog)
    assert "smap.json" in msg and "key 'K1'" in msg and "'1'" in msg


def test_non_integer_id_in_umap(tmp_path):
    msg = _error(_write(tmp_path / "d", umap={**UMAP, "bob": 1.0}))
    assert "umap.json" in msg and "key 'bob'" in msg and "1.0" in msg


def test_non_integer_user_key(tmp_path):
    msg = _error(_write(tmp_path / "d", val={**VAL, "x1": [0]}))
    assert "val.json" in msg and "user key 'x1' is not an integer" in msg


def test_empty_sequence(tmp_path):
    msg = _error(_write(tmp_path / "d", train={**TRAIN, "1": []}))
    assert "train.json" in msg and "user '1' has an empty sequence" in msg


def test_missing_sequence(tmp_path):
    train = {k: v for k, v in TRAIN.items() if k != "1"}
    msg = _error(_write(tmp_path / "d", train=train, val={"0": [2], "2": [1]}, test={"0": [3]}))
    assert "umap.json" in msg and "user 'bob' (id 1) has no sequence in train.json" in msg


@pytest.mark.parametrize("split,value", [("val", [1, 2]), ("test", []), ("val", [])])
def test_target_not_exactly_one_item(tmp_path, split, value):
    base = {"val": VAL, "test": TEST}[split]
    msg = _error(_write(tmp_path / "d", **{split: {**base, "0": value}}))
    assert f"{split}.json" in msg and "user '0' must have exactly one item" in msg and repr(value) in msg


@pytest.mark.parametrize("split", ["val", "test"])
def test_target_user_not_in_train(tmp_path, split):
    umap = {**UMAP, "dave": 3}
    train = {**TRAIN}
    base = {"val": VAL, "test": TEST}[split]
    # dave is known (umap) but has no train sequence; the val/test check fires first
    msg = _error(_write(tmp_path / "d", umap=umap, train=train, **{split: {**base, "3": [0]}}))
    assert f"{split}.json" in msg and "user '3' has no sequence in train.json" in msg


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_user_id_not_in_umap(tmp_path, split):
    base = {"train": TRAIN, "val": VAL, "test": TEST}[split]
    msg = _error(_write(tmp_path / "d", **{split: {**base, "7": [1]}}))
    assert f"{split}.json" in msg and "user id '7' is not in umap.json" in msg


def test_duplicate_id_in_smap(tmp_path):
    msg = _error(_write(tmp_path / "d", smap={**SMAP, "K3": 1}), load_catalog)
    assert "smap.json" in msg and "id 1" in msg and "'K1'" in msg and "'K3'" in msg


def test_gap_in_smap_ids(tmp_path):
    msg = _error(_write(tmp_path / "d", smap={**SMAP, "K3": 7}), load_catalog)
    assert "smap.json" in msg and "item 'K3' has id 7" in msg and "0..3" in msg


def test_negative_id_in_smap(tmp_path):
    msg = _error(_write(tmp_path / "d", smap={**SMAP, "K0": -1}), load_catalog)
    assert "smap.json" in msg and "item 'K0' has a negative id -1" in msg


def test_duplicate_id_in_umap(tmp_path):
    msg = _error(_write(tmp_path / "d", umap={**UMAP, "carol": 0}))
    assert "umap.json" in msg and "user 'carol' has id 0" in msg and "'alice'" in msg


def test_metadata_missing_for_smap_item(tmp_path):
    meta = {k: v for k, v in META.items() if k != "K2"}
    msg = _error(_write(tmp_path / "d", meta_data=meta), load_catalog)
    assert "meta_data.json" in msg and "no metadata for item 'K2'" in msg and "smap.json" in msg


@pytest.mark.parametrize("field,value", [("title", 42), ("brand", ["x"]), ("category", None)])
def test_non_string_metadata_field(tmp_path, field, value):
    meta = {**META, "K1": {**META["K1"], field: value}}
    msg = _error(_write(tmp_path / "d", meta_data=meta))
    assert "meta_data.json" in msg and f"key 'K1', field '{field}'" in msg and repr(value) in msg
    assert "pydantic" not in msg and "errors.pydantic.dev" not in msg


def test_metadata_entry_not_an_object(tmp_path):
    msg = _error(_write(tmp_path / "d", meta_data={**META, "K0": "Red Lamp"}), load_catalog)
    assert "meta_data.json" in msg and "key 'K0'" in msg and "'Red Lamp'" in msg


def test_errors_are_value_errors():
    assert issubclass(DataError, ValueError) and issubclass(PrivacyError, RuntimeError)


def test_silo_constructor_checks_alignment(domain):
    cat = load_catalog(domain)
    with pytest.raises(DataError, match="2 users but 1 train"):
        SiloData("x", cat, [0, 1], [[0]], {}, {})


# --------------------------------------------------------------------------------------------------------
# guards: nesting depth, file size, too few users, empty titles
# --------------------------------------------------------------------------------------------------------


def test_deeply_nested_json_names_the_file(tmp_path):
    folder = _write(tmp_path / "Shop", val='{"0": ' + "[" * 200000 + "]" * 200000 + "}")
    assert "val.json: JSON nested too deeply" in _error(folder)


def test_oversized_file_is_refused_before_reading(tmp_path, monkeypatch):
    import common.data.format as data

    folder = _write(tmp_path / "Shop")
    monkeypatch.setattr(data, "MAX_JSON_BYTES", 64)
    assert "meta_data.json" in (msg := _error(folder)) and "more than the limit of 64" in msg


def test_too_few_users_is_refused_at_load(domain, tmp_path):
    msg = _error(domain, lambda f: load_silo(f, min_users=5))
    assert "umap.json: 3 users, a domain needs at least 5" in msg
    empty = _write(tmp_path / "Empty", umap={}, train={}, val={}, test={})
    assert "umap.json: 0 users" in _error(empty)


def test_empty_titles_are_counted_in_a_warning(tmp_path, caplog):
    meta = {**META, "K1": {"title": "", "brand": "Acme"}, "K3": {"brand": "Sky"}}
    folder = _write(tmp_path / "Shop", meta_data=meta)
    with caplog.at_level("WARNING", logger="common.data.format"):
        load_catalog(folder)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "2 of 4 items have an empty title (their text is brand and category only)"]
