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
    ("weave-rounds", 2), ("weave-epochs", 0),
])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(ConfigError, match=f"(^|[ ;]){key}: "):
        pipeline_config({**DEFAULTS, key: value})


#: values a silo would refuse (or overflow on) that the run-config check must stop first, naming the key
SILO_WOULD_REFUSE = [
    ("lr", float("inf")), ("lr", float("nan")), ("lora-alpha", float("inf")), ("coef-lr", float("inf")),
    ("integration-lr", float("nan")), ("timeout-s", float("inf")), ("max-task-vector-ratio", float("inf")),
    ("node-wait-s", float("inf")), ("seed", 2**70), ("seed", -1), ("epochs", 10**6), ("patience", 10**6),
    ("continue-epochs", 10**6), ("batch-size", 2**40), ("num-negatives", 2**40), ("max-users", 2**40),
    ("val-max-users", 3), ("teacher-top-k", 2**40), ("eval-max-users", 2**40), ("eval-max-users", 4),
    ("pseudo-users-n", 2**40), ("coef-steps", 2**40), ("coef-batch-size", 2**40), ("weave-epochs", 10**6),
    ("min-nodes", 2**70), ("encoder", "/no/such/encoder"), ("base", "./no-such-base.safetensors"),
]


class _UntouchableGrid:
    """A ServerApp grid that fails the test if anything asks it for nodes or sends a message."""

    def __getattr__(self, name):
        raise AssertionError(f"a silo was contacted (grid.{name}) before the run-config check")


@pytest.mark.parametrize("key,value", SILO_WOULD_REFUSE)
def test_values_a_silo_refuses_stop_the_server_app_before_any_silo(key, value, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from server import server_app

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"(^|[ ;]){key}: "):
        server_app.main(_UntouchableGrid(), SimpleNamespace(run_config={**DEFAULTS, key: value}))
    assert not (tmp_path / "runs").exists()  # nothing written either


EDGE_VALUES = [
    ("seed", 2**63 - 1), ("lr", 1e-30), ("lr", 1e30), ("epochs", 10_000), ("patience", 10_000),
    ("batch-size", 2**31 - 1), ("num-negatives", 3), ("max-users", 2**31 - 1), ("val-max-users", 5),
    ("teacher-top-k", 2**31 - 1), ("eval-max-users", 5), ("eval-max-users", 2**31 - 1), ("lora-alpha", 1e30),
    ("finetune", "lora"), ("backbone", "text"), ("timeout-s", 1e12),
]


@pytest.mark.parametrize("key,value", EDGE_VALUES)
def test_every_request_from_an_accepted_config_passes_the_silos_checks(key, value):
    """One validation on both sides: whatever the run-config check accepts, the requests built from it (as
    server/pipeline.py, merge_store.py and weaving.py build them) decode at a silo without a contract error,
    and the seed fits torch's generators."""
    from common.protocol.messages import (BaseSpec, EvaluateRequest, FinetuneRequest, HandshakeRequest,
                                          TeacherRequest, WeaveRequest, decode, encode)

    cfg, _, _ = pipeline_config({**DEFAULTS, key: value})
    base = BaseSpec(backbone=cfg.backbone, seed=cfg.seed, fingerprint="0" * 64)
    requests = [(HandshakeRequest(base=base), {}), (FinetuneRequest(base=base, train=cfg.train), {}),
                (TeacherRequest(base=base, pseudo_item_ids=[0, 1], top_k=cfg.teacher_top_k), {}),
                (EvaluateRequest(base=base, models=["m"]), {"m": {}})]
    if cfg.train.finetune == "lora":
        requests.append((WeaveRequest(base=base, train=cfg.train, module="garden", round=1,
                                      epochs=cfg.weave_epochs), {"lora": {}}))
    for req, arrays in requests:
        header, _ = decode(encode(req, arrays), type(req))
        assert header == req
    torch.Generator().manual_seed(cfg.seed)
    torch.Generator().manual_seed(cfg.train.seed)


def test_unknown_key_and_good_defaults():
    with pytest.raises(ConfigError, match="unknown run-config key"):
        pipeline_config({**DEFAULTS, "teacher-topk": 5})
    cfg, _, _ = pipeline_config(DEFAULTS)
    assert cfg.teacher_top_k == 64 and cfg.eval_max_users is None and cfg.max_task_vector_ratio == 10.0
    assert cfg.coefficients.item_refresh_every == 0  # the reference: merged item embeddings frozen at the init W


@pytest.mark.parametrize("key,field", [("l2sp", ("train", "l2sp")), ("refit-on-val", ("train", "refit_on_val")),
                                       ("coef-item-refresh", ("coefficients", "item_refresh_every"))])
def test_knobs_measured_useless_are_python_only(key, field):
    """Not run-config keys (the benchmarks that measured them set the Python fields)."""
    assert key not in KNOWN_KEYS and key not in DEFAULTS
    with pytest.raises(ConfigError, match=f"unknown run-config key.*{key}"):
        pipeline_config({**DEFAULTS, key: 1})
    model, name = field
    assert name in type(getattr(PipelineConfig(), model)).model_fields


def test_pyproject_lists_every_key_and_defaults_live_in_code():
    """One source of defaults: pyproject names every key (Flower only accepts overrides of listed keys) with
    "" and, in comments, the defaults generated from the models (`python -m server.config`)."""
    assert set(DEFAULTS) == KNOWN_KEYS and set(DEFAULTS.values()) == {""}
    text = (ROOT / "pyproject.toml").read_text()
    assert pyproject_block() in text, "pyproject.toml is stale: paste `python -m server.config` over its table"


def test_pyproject_comments_are_the_field_descriptions():
    """Each key's comment ends with the one-line description of the pydantic field it sets: no second help
    table to keep in step."""
    import server.config as config
    from common.protocol.run_options import RunOptions

    assert not hasattr(config, "HELP")
    text = (ROOT / "pyproject.toml").read_text()
    fields = {**{k: (RunOptions, k.replace("-", "_")) for k in config.OPTION_KEYS},
              **{k: (config._MODELS[m], f) for k, (m, f) in config.PIPELINE_KEYS.items()}}
    assert set(fields) == KNOWN_KEYS
    for key, (model, name) in fields.items():
        desc = model.model_fields[name].description
        assert desc and "\n" not in desc, f"{model.__name__}.{name} ({key}) needs a one-line description"
        (line,) = [x for x in text.splitlines() if x.startswith(f'{key} = ""')]
        assert line.endswith(f": {desc}"), line


def test_pipeline_config_is_what_flwr_run_runs():
    """`PipelineConfig()` is the configuration `flwr run .` runs with no overrides (and with backbone=text, the
    text backbone's training defaults); a training field given explicitly beats the backbone's default."""
    assert PipelineConfig() == pipeline_config(DEFAULTS)[0]
    text = PipelineConfig(backbone=BackboneConfig(kind="text"))
    assert text == pipeline_config({**DEFAULTS, "backbone": "text"})[0]
    assert (text.train.lr, text.train.batch_size, text.train.epochs, text.train.patience) == (5e-5, 32, 3, 1)
    assert PipelineConfig().train.freeze == ["blocks"] and text.train.freeze == []
    mine = PipelineConfig(backbone=BackboneConfig(kind="text"), train=TrainConfig(lr=0.01, freeze=["adaptor"]))
    assert (mine.train.lr, mine.train.freeze, mine.train.batch_size) == (0.01, ["adaptor"], 32)
    assert PipelineConfig(train=TrainConfig(freeze=[])).train.freeze == []  # given explicitly: not the default
    assert PipelineConfig(train=TrainConfig(epochs=2)).train.freeze == ["blocks"]  # not given: the default
    assert PipelineConfig(train=TrainConfig(epochs=7)) == pipeline_config({**DEFAULTS, "epochs": 7})[0]
    # the defaults do not stick: a configuration built for one backbone takes another's when moved to it
    light_train = PipelineConfig(train=TrainConfig(epochs=2)).train
    assert PipelineConfig(backbone=BackboneConfig(kind="text"), train=light_train).train.freeze == []


def test_training_defaults_follow_the_backbone_unless_given():
    text = TrainConfig().with_backbone_defaults("text")
    cfg, _, _ = pipeline_config({**DEFAULTS, "backbone": "text"})
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs, cfg.train.patience) == \
        (text.lr, text.batch_size, text.epochs, text.patience) == (5e-5, 32, 3, 1)
    cfg, _, _ = pipeline_config({**DEFAULTS, "backbone": "text", "epochs": 7})
    assert cfg.train.epochs == 7 and cfg.train.lr == 5e-5  # only the given key changes
    light, _, _ = pipeline_config(DEFAULTS)
    assert light.train == TrainConfig(progress=False).with_backbone_defaults("light")
    cfg, run_dir, server = pipeline_config({**DEFAULTS, "seed": 3, "min-nodes": 2, "run-dir": "x"})
    assert cfg.train.seed == cfg.coefficients.seed == cfg.seed == 3 and run_dir == Path("x")
    assert server["min_nodes"] == 2
    assert PipelineConfig(seed=3) == cfg  # one seed for the base, fine-tuning and coefficient learning


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
    # test split for every candidate, then the validation split for the merged candidates (model selection)
    assert _asked(calls, "evaluate.merged") == sorted(["garden", "kitchen", "outdoor"] * 2)
    # eval-max-users is the simulated silos' setting (these in-process silos keep their own policy: all users)
    assert "ties" in report["metrics"]["garden"] and report["metrics"]["garden"]["ties"]["users"] > 10
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


def test_evaluate_finetuned_of_older_run_directories_still_loads():
    """`evaluate_finetuned` was a bool (true: every silo scored every silo's model); a stored config keeps its
    meaning, and the default scores each silo's own model at that silo only."""
    assert PipelineConfig().evaluate_finetuned == "own"
    assert PipelineConfig(evaluate_finetuned=True).evaluate_finetuned == "all"
    assert PipelineConfig(evaluate_finetuned=False).evaluate_finetuned == "none"
    with pytest.raises(ValueError):
        PipelineConfig(evaluate_finetuned="some")
