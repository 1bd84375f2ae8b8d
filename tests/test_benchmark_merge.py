"""The merge benchmark end to end on the synthetic demo domains (light backbone, a few coefficient steps):
`--methods` measures only what it names, and the report stays consistent with the rows it has."""

import json

import pytest

from benchmarks.merge import METHODS, main
from common.demo import make_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    dirs = make_demo(root / "demo", n_domains=3, n_items=120, n_users=200, seed=0)
    return root, [d.name for d in dirs]


def test_methods_filter_measures_only_what_it_names(demo):
    root, names = demo
    out = root / "merge.json"
    picked = ["pretrained", "task_arithmetic@0.3", "mergerec-task"]
    assert main(["--data", str(root / "demo"), "--domains", *names, "--cache", str(root / "cache"),
                 "--light-epochs", "2", "--coef-steps", "3", "--joint-epochs", "0", "--pseudo-users", "40",
                 "--methods", *picked, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"]
    scenarios = {r["scenario"] for r in report["rows"]}
    assert scenarios == {"in-domain", *(f"unseen-{d}" for d in names)}
    for scenario in scenarios:
        assert {r["method"] for r in report["rows"] if r["scenario"] == scenario} == set(picked)
    in_domain = [r for r in report["rows"] if r["scenario"] == "in-domain"]
    assert {r["domain"] for r in in_domain} == set(names)
    # the verdict compares what was run: task arithmetic is the only training-free merge, layer-wise is absent
    verdict = {v["case"]: v for v in report["mergerec_vs_training_free"]}
    assert set(verdict) == {"in-domain", "unseen (mean of 3)"}
    for v in verdict.values():
        assert v["best training-free"] == "task_arithmetic@0.3"
        assert "MergeRec layer" not in v
        assert v["best MergeRec - best training-free"] == pytest.approx(v["MergeRec task"] - v["its R@10"])
    # only MergeRec needs pseudo-users, so the teacher bytes are there; 40 pseudo-users x top-k 256 (or N)
    for sent in report["bytes_sent_per_silo"].values():
        assert sent["teacher_logit_bytes"] == 40 * min(256, 120) * 8
    assert "| mergerec-task |" in out.with_suffix(".md").read_text()


def test_without_learned_methods_no_teacher_is_computed(demo):
    root, names = demo
    out = root / "free.json"
    assert main(["--data", str(root / "demo"), "--domains", *names[:2], "--cache", str(root / "cache"),
                 "--light-epochs", "2", "--joint-epochs", "0", "--no-unseen", "--methods", "ties",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["method"] for r in report["rows"]} == {"ties"}
    # no pseudo-users, so no teacher logits; and no verdict without MergeRec
    assert all(sent["teacher_logit_bytes"] == 0 for sent in report["bytes_sent_per_silo"].values())
    assert report["mergerec_vs_training_free"] == []


def test_unknown_method_is_refused(demo, capsys):
    root, names = demo
    with pytest.raises(SystemExit):
        main(["--data", str(root / "demo"), "--methods", "mergerec-everything"])
    assert "invalid choice" in capsys.readouterr().err
    assert "mergerec-layer" in METHODS
