"""Configuration checked before the handshake (the error names the run-config key); the checkpoint: per silo
during fine-tuning, per stage for config changes, and damaged or edited files on resume."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.model.config import BackboneConfig, TrainConfig
from common.data.demo import make_demo
from common.model.coefficients import CoefficientConfig
from server.config import KNOWN_KEYS, ConfigError, pipeline_config, pyproject_block
from server.config import PipelineConfig
from server.pipeline import Pipeline, PipelineError
from server.transport import InProcessTransport

from helpers import make_tiny_encoder

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


@pytest.mark.parametrize("key,value", [
    ("baselines", "task_arithmetic,no_such_merge"), ("baselines", "ties,ties"), ("init-method", "bogus"),
    ("granularities", ","), ("granularities", "task,bogus"), ("teacher-top-k", -5), ("eval-max-users", -3),
    ("pseudo-users-n", -1), ("pseudo-users", "bogus"), ("coef-steps", -1), ("coef-lr", 0.0), ("epochs", -2),
    ("batch-size", 0), ("lr", -1.0), ("min-silos", 0), ("retries", -1), ("timeout-s", 0),
    ("max-task-vector-ratio", 0), ("backbone", "huge"), ("min-nodes", -1), ("node-wait-s", "soon"),
    ("finetune", "partial"), ("lora-rank", 0), ("lora-alpha", 0), ("lora-targets", ","), ("weave-rounds", -1),
    ("weave-rounds", 2), ("weave-epochs", 0), ("coef-item-refresh", -1),
])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"(^|[ ;]){key}: "):
        pipeline_config({**DEFAULTS, key: value})


def test_unknown_key_and_good_defaults():
    with pytest.raises(ConfigError, match="unknown run-config key"):
        pipeline_config({**DEFAULTS, "teacher-topk": 5})
    cfg, _, _ = pipeline_config(DEFAULTS)
    assert cfg.teacher_top_k == 64 and cfg.eval_max_users is None and cfg.max_task_vector_ratio == 10.0
    assert cfg.coefficients.item_refresh_every == 0  # the reference: merged item embeddings frozen at the init W
    assert pipeline_config({**DEFAULTS, "coef-item-refresh": 1})[0].coefficients.item_refresh_every == 1


def test_pyproject_lists_every_key_and_defaults_live_in_code():
    """One source of defaults: pyproject names every key (Flower only accepts overrides of listed keys) with
    "" and, in comments, the defaults generated from the models (`python -m server.config`)."""
    assert set(DEFAULTS) == KNOWN_KEYS and set(DEFAULTS.values()) == {""}
    text = (ROOT / "pyproject.toml").read_text()
    assert pyproject_block() in text, "pyproject.toml is stale: paste `python -m server.config` over its table"


def test_training_defaults_follow_the_backbone_unless_given():
    text = TrainConfig.for_backbone("text")
    cfg, _, _ = pipeline_config({**DEFAULTS, "backbone": "text"})
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.patience) == \
        (text.lr, text.batch_size, text.epochs, text.patience) == (5e-5, 32, 3, 1)
    cfg, _, _ = pipeline_config({**DEFAULTS, "backbone": "text", "epochs": 7})
    assert cfg.train.epochs == 7 and cfg.train.lr == 5e-5  # only the given key changes
    light, _, _ = pipeline_config(DEFAULTS)
    assert light.train == TrainConfig.for_backbone("light", progress=False)
    cfg, run_dir, server = pipeline_config({**DEFAULTS, "seed": 3, "min-nodes": 2, "run-dir": "x"})
    assert cfg.train.seed == cfg.coefficients.seed == cfg.seed == 3 and run_dir == Path("x")
    assert server["min_nodes"] == 2


def test_light_dense_fine_tuning_freezes_the_blocks_unless_told_otherwise():
    assert pipeline_config(DEFAULTS)[0].train.freeze == ["blocks"]
    assert pipeline_config({**DEFAULTS, "freeze": "none"})[0].train.freeze == []
    assert pipeline_config({**DEFAULTS, "freeze": "adaptor,position"})[0].train.freeze == ["adaptor", "position"]
    assert pipeline_config({**DEFAULTS, "finetune": "lora"})[0].train.freeze == []  # LoRA factors live in the blocks
    assert pipeline_config({**DEFAULTS, "backbone": "text"})[0].train.freeze == []


# ------------------------------------------------------------------------------------------ checkpoint
class Killed(BaseException):
    """Stands in for kill -9: nothing in the pipeline may catch it."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=3, n_items=40, n_users=30, seed=6)
    w = (root, enc, dirs)
    Pipeline(_transport(w), _cfg(w), root / "full").run()
    return w


def _cfg(world, **kw) -> PipelineConfig:
    root, enc, _ = world
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    base = dict(backbone=bb, train=TrainConfig(epochs=1, batch_size=32, progress=False, warmup_steps=2),
                coefficients=CoefficientConfig(steps=3, batch_size=8), baselines=["task_arithmetic"],
                granularities=["task"], evaluate_finetuned=False, teacher_top_k=8, min_silos=2, retries=1,
                timeout_s=60)
    return PipelineConfig(**{**base, **kw})


def _transport(world, calls=None, kill=None):
    root, enc, dirs = world
    endpoints = {}
    for d in dirs:
        fn = in_process_endpoint(SiloWorker(d.name, d, state_dir=root / "state" / d.name, cache_dir=root / "cache"))

        def call(mt, c, fn=fn, name=d.name):
            if calls is not None:
                calls.append((mt, name))
            if kill == (mt, name):
                raise Killed()
            return fn(mt, c)
        endpoints[d.name] = call
    return InProcessTransport(endpoints)


def _asked(calls, mt):
    return sorted(name for t, name in calls if t == mt)


def _copy(world, tmp_path) -> Path:
    shutil.copytree(world[0] / "full", tmp_path / "run")
    return tmp_path / "run"


def test_finished_silos_survive_a_kill_during_the_last_finetune(world, tmp_path):
    calls = []
    with pytest.raises(Killed):
        Pipeline(_transport(world, calls, kill=("train.finetune", "outdoor")), _cfg(world), tmp_path / "run").run()
    ck = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert sorted(ck["finetune"]) == ["garden", "kitchen"] and "finetune" not in ck["completed"]
    calls.clear()
    report = Pipeline(_transport(world, calls), _cfg(world), tmp_path / "run").run()
    assert _asked(calls, "train.finetune") == ["outdoor"]
    assert sorted(report["active"]) == ["garden", "kitchen", "outdoor"]


def test_config_change_reuses_unaffected_stages(world, tmp_path):
    run = _copy(world, tmp_path)
    calls = []
    report = Pipeline(_transport(world, calls), _cfg(world, eval_max_users=10, baselines=["ties"]), run).run()
    assert _asked(calls, "train.finetune") == [] and _asked(calls, "query.teacher") == []
    # test split for every candidate, then the validation split for the MergeRec variants (model selection)
    assert _asked(calls, "evaluate.merged") == sorted(["garden", "kitchen", "outdoor"] * 2)
    assert "ties" in report["metrics"]["garden"] and report["metrics"]["garden"]["ties"]["users"] == 10
    calls.clear()
    Pipeline(_transport(world, calls), _cfg(world, eval_max_users=10, baselines=["ties"], teacher_top_k=4), run).run()
    assert _asked(calls, "train.finetune") == [] and _asked(calls, "query.teacher") == ["garden", "kitchen", "outdoor"]
    with pytest.raises(PipelineError, match="changes fine-tuning"):
        Pipeline(_transport(world), _cfg(world, train=TrainConfig(epochs=2, progress=False)), run)


def test_checkpoint_without_stage_fingerprints_refuses_a_changed_config(world, tmp_path):
    run = _copy(world, tmp_path)
    ck = json.loads((run / "checkpoint.json").read_text())
    ck.pop("stage_configs")
    (run / "checkpoint.json").write_text(json.dumps(ck))
    with pytest.raises(PipelineError, match="another configuration"):
        Pipeline(_transport(world), _cfg(world, eval_max_users=10), run)
    Pipeline(_transport(world), _cfg(world), run)  # the same configuration still resumes


def test_damaged_checkpoint_is_a_clear_error(world, tmp_path):
    run = _copy(world, tmp_path)
    text = (run / "checkpoint.json").read_text()
    (run / "checkpoint.json").write_text(text[: len(text) // 2])
    with pytest.raises(PipelineError, match="checkpoint.json is damaged"):
        Pipeline(_transport(world), _cfg(world), run)
    (run / "checkpoint.json").write_text(json.dumps({**json.loads(text), "completed": 3}))
    with pytest.raises(PipelineError, match="checkpoint.json is damaged"):
        Pipeline(_transport(world), _cfg(world), run)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _edit_coefficients(path: Path) -> None:
    c = json.loads(path.read_text())
    c["task"]["W"] = [[9.0 for _ in row] for row in c["task"]["W"]] if isinstance(c["task"]["W"][0], list) \
        else [9.0 for _ in c["task"]["W"]]
    path.write_text(json.dumps(c))


@pytest.mark.parametrize("rel,damage,asked", [
    ("task_vectors/kitchen.safetensors", _truncate, {"train.finetune": ["kitchen"], "query.teacher": ["kitchen"]}),
    ("teacher/garden.npz", _truncate, {"train.finetune": [], "query.teacher": ["garden"]}),
    ("coefficients.json", _edit_coefficients, {"train.finetune": [], "query.teacher": []}),
    ("pseudo_users.json", lambda p: p.write_text("{"), {"train.finetune": [], "query.teacher": ["garden", "kitchen",
                                                                                               "outdoor"]}),
])
def test_damaged_or_edited_file_is_named_and_its_stage_redone(world, tmp_path, caplog, rel, damage, asked):
    run = _copy(world, tmp_path)
    before = json.loads((run / "report.json").read_text())
    damage(run / rel)
    calls = []
    with caplog.at_level("ERROR"):
        report = Pipeline(_transport(world, calls), _cfg(world), run).run()
    assert any(rel.split("/")[-1] in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    for mt, domains in asked.items():
        assert _asked(calls, mt) == domains
    assert report["coefficients"]["task"]["W"] != [] and sorted(report["active"]) == sorted(before["active"])
    if rel == "coefficients.json":
        assert report["coefficients"] == before["coefficients"]  # recomputed, not the edited values


@pytest.mark.parametrize("name", ["task_arithmetic", "mergerec-task"])
def test_damaged_stored_merge_is_recomputed_without_redoing_a_stage(world, tmp_path, caplog, name):
    """Each merge is computed once and stored in merges/; a damaged one is named, dropped and recomputed from
    the stored task vectors and coefficients (the same weights), and no stage or silo is asked again."""
    from safetensors.torch import load_file

    run = _copy(world, tmp_path)
    before = json.loads((run / "checkpoint.json").read_text())
    assert f"merges/{name}.safetensors" in before["files"] and name in before["merges"]
    shipped = load_file(str(run / "model" / "model.safetensors"))
    _truncate(run / "merges" / f"{name}.safetensors")
    calls = []
    with caplog.at_level("ERROR"):
        Pipeline(_transport(world, calls), _cfg(world), run).run()
    assert any(f"{name}.safetensors" in r.getMessage() and "recomputed" in r.getMessage() for r in caplog.records)
    assert {mt for mt, _ in calls} == {"query.handshake"}, calls  # only the handshake of a resume
    after = json.loads((run / "checkpoint.json").read_text())
    assert after["completed"] == before["completed"]
    again = load_file(str(run / "model" / "model.safetensors"))
    assert all(torch.equal(again[n], shipped[n]) for n in shipped)
