"""Synthetic demo domains: deterministic, valid, fast, and with structure that item text reveals."""

from __future__ import annotations

import time

import numpy as np
import pytest

from common.data.format import load_silo
from common.data.demo import DOMAINS, THEMES, main, make_demo, make_domain

FILES = ["meta_data.json", "smap.json", "umap.json", "train.json", "val.json", "test.json"]


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo"), n_domains=3, seed=0)


def test_same_seed_same_bytes(demo_dirs, tmp_path):
    again = make_demo(tmp_path / "again", n_domains=3, seed=0)
    assert [d.name for d in again] == ["garden", "kitchen", "outdoor"]
    for a, b in zip(demo_dirs, again):
        for f in FILES:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f"{a.name}/{f} differs"
    other = make_demo(tmp_path / "other", n_domains=1, seed=1)[0]
    assert (other / "train.json").read_bytes() != (demo_dirs[0] / "train.json").read_bytes()


def test_valid_domains_with_expected_shape(demo_dirs):
    for d in demo_dirs:
        silo = load_silo(d)
        assert silo.domain == d.name and len(silo.catalog) == 300 and silo.num_users == 600
        lengths = [len(s) + 2 for s in silo.train]  # + val + test
        assert min(lengths) >= 5 and max(lengths) <= 20
        for meta in silo.catalog.items:
            assert meta.title and meta.category.startswith(d.name.capitalize() + " ")
        assert (silo.interaction_counts() > 0).mean() > 0.9


def test_themes_are_shared_across_domains(demo_dirs):
    for d in demo_dirs:
        titles = " ".join(m.title for m in load_silo(d).catalog.items)
        for theme in THEMES.values():
            assert any(w in titles for w in theme["words"])
    item_keys = [set(load_silo(d).catalog.item_keys) for d in demo_dirs]
    assert not (item_keys[0] & item_keys[1])  # item sets are disjoint across domains


def _theme_of(title: str) -> int:
    names = list(THEMES)
    hits = [sum(w in title for w in THEMES[n]["words"]) for n in names]
    return int(np.argmax(hits))


def test_text_signal_beats_popularity(demo_dirs):
    """Reading the theme off the titles of the recent history beats popularity clearly (NDCG@10)."""
    silo = load_silo(demo_dirs[0])
    themes = np.array([_theme_of(m.title) for m in silo.catalog.items])
    pop = silo.interaction_counts().astype(float)
    histories, targets = silo.eval_split("test")

    def ndcg(score) -> float:
        total = 0.0
        for h, t in zip(histories, targets):
            s = score(h)
            rank = int((s > s[t]).sum())
            total += 1 / np.log2(rank + 2) if rank < 10 else 0.0
        return total / len(targets)

    def by_theme(h):
        share = np.bincount(themes[h[-5:]], minlength=len(THEMES))
        return pop * (0.1 + share[themes])

    base, text = ndcg(lambda h: pop), ndcg(by_theme)
    assert text > 1.5 * base, (base, text)


def test_fast_and_checks_arguments(tmp_path):
    t0 = time.process_time()  # CPU seconds: a loaded CI machine must not fail this
    make_domain(tmp_path, "books", n_items=300, n_users=600, seed=3)
    assert time.process_time() - t0 < 1.5
    small = make_demo(tmp_path / "small", n_domains=5, n_items=12, n_users=10, seed=2)
    assert [d.name for d in small] == list(DOMAINS)
    assert all(load_silo(d).num_users == 10 for d in small)
    with pytest.raises(ValueError):
        make_demo(tmp_path, n_domains=6)
    with pytest.raises(ValueError):
        make_domain(tmp_path, "cars")


def test_cli(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--domains", "2", "--items", "40", "--users", "30"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "garden"), str(tmp_path / "kitchen")]
    assert load_silo(tmp_path / "kitchen").num_users == 30
