"""LoRA task vectors and weaving (common/model/lora.py, server/weaving.py) on tiny demo silos, in process: the factors
and their materialised delta, every merge method on LoRA deltas, a LoRA + weave run end to end (bytes, privacy,
resume), a silo failing mid-weave, hostile LoRA replies, and a bad lora-targets pattern."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from safetensors.numpy import load_file as load_numpy

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.model import lora
from common.model.backbones import build_backbone
from common.model.config import BackboneConfig, TrainConfig
from common.data.demo import make_demo
from common.merging import methods as merge_methods
from common.model.coefficients import CoefficientConfig
from server.config import PipelineConfig
from server.pipeline import Pipeline, PipelineError
from server.transport import InProcessTransport, MessageRecorder

from helpers import make_tiny_encoder
from privacy import assert_no_user_data, recorded_messages

RANK = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=3, n_items=50, n_users=40, seed=3)
    return root, enc, dirs


def _cfg(world, **kw) -> PipelineConfig:
    root, enc, _ = world
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    train = TrainConfig(epochs=3, lr=3e-3, batch_size=32, progress=False, warmup_steps=2, finetune="lora", lora_rank=RANK,
                        **kw.pop("train", {}))
    base = dict(backbone=bb, train=train, coefficients=CoefficientConfig(steps=3, batch_size=8),
                baselines=["task_arithmetic"], granularities=["task"], evaluate_finetuned=False, teacher_top_k=8,
                min_silos=2, retries=0, timeout_s=60, weave_rounds=2, weave_epochs=1)
    return PipelineConfig(**{**base, **kw})


def _transport(world, observer=None, wrap: dict | None = None) -> InProcessTransport:
    root, _, dirs = world
    endpoints = {}
    for d in dirs:
        fn = in_process_endpoint(SiloWorker(d.name, d, state_dir=root / "state" / d.name, cache_dir=root / "cache"))
        # handles are not domain names (as through Flower, where they are node ids)
        endpoints[f"node-{d.name}"] = wrap[d.name](fn) if wrap and d.name in wrap else fn
    return InProcessTransport(endpoints, observer)


@pytest.fixture(scope="module")
def woven_run(world):
    """One LoRA + weave run (2 rounds over 3 silos), every message recorded."""
    root = world[0]
    rec = MessageRecorder(root / "messages")
    report = Pipeline(_transport(world, observer=rec), _cfg(world), root / "run").run()
    return root / "run", report


# ------------------------------------------------------------------------------------------ the module itself
def test_materialised_delta_is_scaled_b_at_a_and_attach_applies_it():
    shapes = {"w": (3, 2), "b": (3,)}
    a = np.array([[1.0, 2.0]], np.float32)  # [r=1, in=2]
    b = np.array([[1.0], [0.0], [-2.0]], np.float32)  # [out=3, r=1]
    base = {"w": torch.ones(3, 2), "b": torch.zeros(3)}
    delta = lora.materialise({"w.lora_A": a, "w.lora_B": b}, base, rank=1, alpha=3.0)
    hand = 3.0 * np.array([[1, 2], [0, 0], [-2, -4]], np.float32)
    assert np.array_equal(delta["w"].numpy(), hand) and not delta["b"].any()
    assert lora.factor_shapes(shapes, ["w"], 1) == {"w.lora_A": (1, 2), "w.lora_B": (3, 1)}
    lin = torch.nn.Linear(2, 3)
    before = lin.weight.detach().clone()
    lora.attach(lin, ["weight"], rank=1, alpha=3.0, factors={"weight.lora_A": a, "weight.lora_B": b})
    assert torch.allclose(lin.weight, before + torch.from_numpy(hand))
    assert sorted(n for n, _ in lin.named_parameters() if lora.is_lora_param(n)) == [
        "parametrizations.weight.0.lora_A", "parametrizations.weight.0.lora_B"]
    lora.detach(lin, ["weight"])
    assert torch.equal(lin.weight, before) and sorted(n for n, _ in lin.named_parameters()) == ["bias", "weight"]


def test_only_the_factors_train(world):
    """fine_tune on a model with LoRA attached: every base parameter stays exactly at the base, factors move."""
    from common.data.format import load_silo
    from common.model.train import fine_tune

    cfg = _cfg(world)
    model = build_backbone(cfg.backbone, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = lora.resolve_targets({n: tuple(p.shape) for n, p in model.named_parameters()}, cfg.train.lora_targets)
    lora.attach(model, targets, RANK, 16.0, seed=0)
    start = lora.factors(model, targets)
    silo = load_silo(world[2][1])
    fine_tune(model, silo, model.domain_inputs(silo.catalog), cfg.train.model_copy(update={"refit_on_val": False}))
    moved = lora.factors(model, targets)
    assert any(not np.array_equal(start[n], moved[n]) for n in start)
    lora.detach(model, targets)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_bad_lora_targets_stop_the_run_naming_the_key(world, tmp_path):
    for pattern, why in (("*.nothing_here", "matches no parameter"), ("*.norm1.weight", "not a 2-D weight")):
        with pytest.raises(PipelineError, match=f"lora-targets: .*{why}"):
            Pipeline(_transport(world), _cfg(world, train={"lora_targets": [pattern]}), tmp_path / pattern[2:])


# ------------------------------------------------------------------------------------------ LoRA + weave run
def test_lora_delta_is_low_rank_on_targets_only_and_uploads_less(world, woven_run):
    run, report = woven_run
    root, enc, dirs = world
    base = build_backbone(_cfg(world).backbone, seed=0)
    targets = lora.resolve_targets({n: tuple(p.shape) for n, p in base.named_parameters()}, _cfg(world).train.lora_targets)
    assert len(targets) == 4
    for d in dirs:
        tv = load_numpy(str(run / "task_vectors" / f"{d.name}.safetensors"))
        factors = load_numpy(str(run / "lora" / f"{d.name}.safetensors"))
        for n, delta in tv.items():
            if n not in targets:
                assert not delta.any(), n  # only the targets move
                continue
            assert 0 < np.linalg.matrix_rank(delta) <= RANK, n
            hand = (16.0 / RANK) * factors[f"{n}.lora_B"] @ factors[f"{n}.lora_A"]
            assert np.allclose(delta, hand, atol=1e-7), n
        info = report["finetune"][d.name]
        assert 0 < info["upload_bytes"] < info["dense_task_vector_bytes"] / 5, info


def test_weaving_changes_every_module_and_merges_use_the_woven_ones(world, woven_run):
    run, report = woven_run
    dirs = world[2]
    weave = report["weave"]
    assert weave["rounds"] == 2 and len(weave["hops"]) == 6 and weave["skipped"] == []
    # round 1: each module moved to the next silo of the ring; round 2: to the one after
    ring = sorted(d.name for d in dirs)
    assert {(h["round"], h["module"], h["silo"]) for h in weave["hops"]} == {
        (r, m, ring[(ring.index(m) + r) % 3]) for r in (1, 2) for m in ring}
    p = Pipeline(_transport(world), _cfg(world), run)
    for d in ring:
        before, after = load_numpy(str(run / "lora" / f"{d}.safetensors")), load_numpy(str(run / "woven" / f"{d}.safetensors"))
        assert any(not np.allclose(before[n], after[n]) for n in before), d
        woven = p.vectors.load([d])[d]
        assert all(torch.equal(woven[n], t) for n, t in p.base.lora.materialise(after, p.base.state).items())
    assert sorted(report["metrics"]) == ring and "mergerec-task" in report["metrics"][ring[0]]


def test_every_merge_method_runs_on_lora_deltas(world, woven_run):
    run, _ = woven_run
    p = Pipeline(_transport(world), _cfg(world), run)
    names = merge_methods.method_names()
    merged = p.merges.merged_states(methods=names)
    assert set(merged) == set(names) and len(names) >= 6
    for name, state in merged.items():
        assert all(torch.isfinite(t).all() for t in state.values()), name
        assert any(not torch.equal(state[n], p.base.state[n]) for n in p.base.lora.targets), name


def test_no_user_data_in_lora_and_weave_messages(world, woven_run):
    root, _, dirs = world
    msgs = root / "messages"
    types = {f.name.split("-")[2] for f in msgs.glob("*.json")}
    assert types == {"query.handshake", "train.finetune", "train.weave", "query.teacher", "evaluate.merged"}
    assert assert_no_user_data(recorded_messages(msgs), dirs) >= 30
    weave_up = sorted(msgs.glob("*-up-train.weave-*.npz"))
    assert len(weave_up) == 6 and all(k.startswith("arrays.lora/") for k in np.load(weave_up[0]).files)


def test_resume_after_weave_does_not_weave_again(world, woven_run):
    run, report = woven_run
    sent = []
    again = Pipeline(_transport(world, observer=lambda dr, s, mt, c: sent.append(mt)), _cfg(world), run).run()
    assert set(sent) == {"query.handshake"} and again["metrics"] == report["metrics"]


# ------------------------------------------------------------------------------------------ faults
def _raise_on(message_type):
    def wrap(fn):
        def call(mt, content):
            if mt == message_type:
                raise RuntimeError("silo crashed mid-weave")
            return fn(mt, content)
        return call
    return wrap


def test_silo_failing_mid_weave_is_skipped_and_the_run_finishes(world, tmp_path):
    dirs = world[2]
    ring = sorted(d.name for d in dirs)
    bad = ring[1]
    report = Pipeline(_transport(world, wrap={bad: _raise_on("train.weave")}), _cfg(world), tmp_path / "run").run()
    weave = report["weave"]
    assert [(s["domain"], s["round"]) for s in weave["skipped"]] == [(bad, 1)]
    assert all(h["silo"] != bad for h in weave["hops"])
    # the module that was to go to the failed silo moved on to the next live one in the same round
    first = ring[0]
    assert {"round": 1, "module": first, "silo": ring[2]} in [{k: h[k] for k in ("round", "module", "silo")}
                                                               for h in weave["hops"]]
    assert sorted(report["active"]) == ring and report["dropped"] == []  # out of the weave, not out of the run
    assert sorted(report["metrics"]) == ring


def _corrupt_lora(update, message_type="train.finetune"):
    def wrap(fn):
        def call(mt, content):
            out = fn(mt, content)
            if mt != message_type:
                return out
            named = {n: a.numpy().copy() for n, a in out.array_records["arrays.lora"].items()}
            update(named)
            fixed = RecordDict()
            for k, v in out.items():
                fixed[k] = v
            fixed["arrays.lora"] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in named.items()})
            return fixed
        return call
    return wrap


def _first_b(named, fn):
    n = sorted(k for k in named if k.endswith("lora_B"))[0]
    named[n] = fn(named[n])


HOSTILE = {
    "wrong shape": (lambda t: _first_b(t, lambda a: np.zeros((a.shape[0], a.shape[1] + 1), np.float32)), "expected float32"),
    "NaN": (lambda t: _first_b(t, lambda a: np.full_like(a, np.nan)), "non-finite"),
    "unknown name": (lambda t: t.__setitem__("adaptor.weight.lora_A", np.zeros((RANK, 2), np.float32)), "unexpected"),
    "missing factor": (lambda t: t.pop(sorted(t)[0]), "missing LoRA factors"),
    "float64": (lambda t: _first_b(t, lambda a: a.astype(np.float64)), "expected float32"),
    "huge delta": (lambda t: _first_b(t, lambda a: np.full_like(a, 1e18)), "max-task-vector-ratio"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_lora_reply_is_refused(world, tmp_path, name):
    update, why = HOSTILE[name]
    bad = world[2][0].name
    p = Pipeline(_transport(world, wrap={bad: _corrupt_lora(update)}), _cfg(world, weave_rounds=0), tmp_path / "run")
    p.handshake()
    p.finetune()
    assert [(d.domain, d.stage) for d in p.state.dropped] == [(bad, "finetune")]
    reason = p.state.dropped[0].reason
    assert reason.startswith("invalid reply") and why in reason, reason
    assert not (tmp_path / "run" / "task_vectors" / f"{bad}.safetensors").exists()
    assert math.isfinite(sum(float(t.abs().sum()) for tv in p.vectors.load(p.active()).values() for t in tv.values()))


def test_hostile_weave_reply_is_skipped(world, tmp_path):
    """A NaN module back from a hop: that silo is out of the weave, the module keeps its factors."""
    ring = sorted(d.name for d in world[2])
    bad = ring[2]
    nan = _corrupt_lora(HOSTILE["NaN"][0], "train.weave")
    report = Pipeline(_transport(world, wrap={bad: nan}), _cfg(world, weave_rounds=1), tmp_path / "run").run()
    skipped = report["weave"]["skipped"]
    assert [(s["domain"], s["round"]) for s in skipped] == [(bad, 1)] and "non-finite" in skipped[0]["reason"]
    for d in ring:
        woven = load_numpy(str(tmp_path / "run" / "woven" / f"{d}.safetensors"))
        assert all(np.isfinite(a).all() for a in woven.values())


class Killed(BaseException):
    """Stands in for kill -9 of the server: nothing in the pipeline may catch it."""


def test_weave_resumes_after_the_last_stored_round(world, tmp_path):
    def kill_in_round_2(fn):
        def call(mt, content):
            if mt == "train.weave" and json.loads(content.config_records["header"]["json"])["round"] == 2:
                raise Killed()
            return fn(mt, content)
        return call

    run = tmp_path / "run"
    with pytest.raises(Killed):
        Pipeline(_transport(world, wrap={d.name: kill_in_round_2 for d in world[2]}), _cfg(world), run).run()
    ck = json.loads((run / "checkpoint.json").read_text())
    assert ck["weave"]["rounds"] == 1 and "weave" not in ck["completed"]
    sent = []
    report = Pipeline(_transport(world, observer=lambda dr, s, mt, c: sent.append((dr, mt))), _cfg(world), run).run()
    assert sent.count(("down", "train.finetune")) == 0 and sent.count(("down", "train.weave")) == 3
    assert report["weave"]["rounds"] == 2 and len(report["weave"]["hops"]) == 6


@pytest.mark.parametrize("rel,finetunes,weaves", [("woven/garden.safetensors", 0, 6),
                                                 ("lora/garden.safetensors", 1, 6)])
def test_damaged_lora_or_woven_file_is_redone_on_resume(world, woven_run, tmp_path, rel, finetunes, weaves):
    """A stored module is checked on resume like a fresh reply: a damaged woven module redoes the weave; a
    damaged LoRA module refits that silo only (its task vector goes with it), then weaves again."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(woven_run[0], run)
    raw = bytearray((run / rel).read_bytes())
    raw[-8:] = b"\xff" * 8
    (run / rel).write_bytes(bytes(raw))
    sent = []
    report = Pipeline(_transport(world, observer=lambda dr, s, mt, c: sent.append((dr, mt))), _cfg(world), run).run()
    assert sent.count(("down", "train.finetune")) == finetunes and sent.count(("down", "train.weave")) == weaves
    assert report["weave"]["rounds"] == 2 and report["dropped"] == []


def test_new_weave_epochs_redo_weave_and_merges_only(world, woven_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(woven_run[0], run)
    files = lambda: json.loads((run / "checkpoint.json").read_text())["files"]  # noqa: E731
    before = files()
    sent = []
    Pipeline(_transport(world, observer=lambda dr, s, mt, c: sent.append((dr, mt))), _cfg(world, weave_epochs=2),
             run).run()
    asked = {mt for dr, mt in sent if dr == "down"}
    assert asked == {"query.handshake", "train.weave", "evaluate.merged"}
    after = files()
    for rel in ("woven/garden.safetensors", "merges/task_arithmetic.safetensors", "merges/mergerec-task.safetensors"):
        assert after[rel] != before[rel], rel  # merged again from the newly woven modules
    assert after["task_vectors/garden.safetensors"] == before["task_vectors/garden.safetensors"]


def test_stage_fingerprints_ignore_lora_and_weaving_while_off():
    """Run directories made before LoRA and weaving existed still resume: while off, those fields are not
    fingerprinted; switching LoRA on changes fine-tuning's fingerprint, weaving changes the merges'."""
    from server.checkpoint import stage_fingerprints

    off = stage_fingerprints(PipelineConfig())
    same = stage_fingerprints(PipelineConfig(train=TrainConfig(lora_rank=2), weave_epochs=3))
    assert off == same
    lora_on = stage_fingerprints(PipelineConfig(train=TrainConfig(finetune="lora")))
    assert lora_on["finetune"] != off["finetune"]
    woven = stage_fingerprints(PipelineConfig(train=TrainConfig(finetune="lora"), weave_rounds=1))
    assert woven["finetune"] == lora_on["finetune"] and woven["teacher"] == lora_on["teacher"]
    assert all(woven[s] != lora_on[s] for s in ("weave", "merge_init", "coefficients", "evaluate"))
