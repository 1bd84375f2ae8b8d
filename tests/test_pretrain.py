"""The pretrained base as a file: pretraining on public domains, the bundle, and the handshake's refusal of a
silo whose base file differs from the server's."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch

from clients.client_app import handle
from clients.silo import SiloWorker
from common.model.backbones import build_backbone, shared_state
from common.model.base_model import BUNDLED, BaseFileError, load_base
from common.model.config import BackboneConfig, TrainConfig
from common.data.demo import make_demo
from common.model.coefficients import CoefficientConfig
from common.core.fingerprint import fingerprint
from common.model.pretrain import main as pretrain_main
from server.config import PipelineConfig
from server.pipeline import Pipeline
from server.transport import InProcessTransport

from helpers import make_tiny_encoder

SILOS, PUBLIC = ["garden", "kitchen", "outdoor"], ["toys", "books"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    enc = make_tiny_encoder(root / "enc")
    make_demo(root / "data", n_domains=5, n_items=50, n_users=60, seed=2)
    return root, enc


def _pretrain(root: Path, enc: Path, out: Path, *extra: str) -> dict:
    argv = ["--data", str(root / "data"), "--domains", *PUBLIC, "--out", str(out), "--epochs", "3",
            "--patience", "3", "--batch-size", "16", "--layers", "1", "--cache", str(root / "cache"), *extra]
    # the tiny encoder stands in for MiniLM: pretraining builds BackboneConfig(encoder=...) from the CLI default,
    # so point the default at it for this call
    import common.model.pretrain as pt

    orig = pt.BackboneConfig
    pt.BackboneConfig = lambda **kw: orig(**{"encoder": str(enc), "heads": 2, **kw})
    try:
        assert pretrain_main(argv) == 0
    finally:
        pt.BackboneConfig = orig
    return json.loads((out / "card.json").read_text())


def _backbone(root: Path, enc: Path, base: str = "init") -> BackboneConfig:
    return BackboneConfig(encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache", base=base)


def test_pretraining_is_deterministic_and_the_card_describes_it(world, tmp_path):
    root, enc = world
    a = _pretrain(root, enc, tmp_path / "a")
    b = _pretrain(root, enc, tmp_path / "b")
    assert a["fingerprint"] == b["fingerprint"]
    assert (tmp_path / "a" / "base.safetensors").read_bytes() == (tmp_path / "b" / "base.safetensors").read_bytes()
    assert [d["domain"] for d in a["data"]] == PUBLIC
    assert a["command"].startswith("python -m common.model.pretrain --data")
    assert a["history"][0]["epoch"] == 0 and "ndcg@10" in a["validation"]
    init = fingerprint(shared_state(build_backbone(_backbone(root, enc))))
    assert a["fingerprint"] != init  # it trained


def test_base_file_loads_bit_for_bit_and_fingerprint_covers_it(world, tmp_path):
    root, enc = world
    card = _pretrain(root, enc, tmp_path / "p")
    for f in ("base.safetensors", "base.json"):
        model = build_backbone(_backbone(root, enc, str(tmp_path / "p" / f)))
        assert fingerprint(shared_state(model)) == card["fingerprint"]
    # one changed weight -> another fingerprint
    state, _ = load_base(str(tmp_path / "p" / "base.safetensors"))
    name = sorted(state)[0]
    state[name] = state[name].clone()
    state[name].view(-1)[0] += 1e-3
    assert fingerprint(state) != card["fingerprint"]


def test_frozen_parts_stay_at_the_init_and_centred_bases_need_centred_runs(world, tmp_path):
    """`--freeze blocks position` (the bundled base's recipe) trains only the adaptor; `--center-items` is part of
    the base's architecture, so a run without it refuses that base by name."""
    root, enc = world
    card = _pretrain(root, enc, tmp_path / "p", "--freeze", "blocks", "position", "--center-items")
    assert card["architecture"]["center_items"] is True
    init = shared_state(build_backbone(_backbone(root, enc)))
    state, _ = load_base(str(tmp_path / "p" / "base.json"))
    moved = {k.split(".")[0] for k in state if not torch.equal(state[k], init[k])}
    assert moved == {"adaptor"}
    with pytest.raises(BaseFileError, match="another backbone.*center_items"):
        build_backbone(_backbone(root, enc, str(tmp_path / "p" / "base.json")))
    centred = _backbone(root, enc, str(tmp_path / "p" / "base.json")).model_copy(update={"center_items": True})
    assert fingerprint(shared_state(build_backbone(centred))) == card["fingerprint"]


def test_damaged_or_foreign_base_files_are_refused_naming_the_file(world, tmp_path):
    root, enc = world
    _pretrain(root, enc, tmp_path / "p")
    bundle = tmp_path / "p" / "base.json"
    doc = json.loads(bundle.read_text())
    raw = bytearray(base64.b64decode(doc["safetensors_base64"]))
    raw[-1] ^= 0xFF  # flip a byte of the last weight
    doc["safetensors_base64"] = base64.b64encode(bytes(raw)).decode()
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(BaseFileError, match="edited.json.*SHA-256"):
        build_backbone(_backbone(root, enc, str(bad)))
    (tmp_path / "cut.json").write_text(bundle.read_text()[:1000])
    with pytest.raises(BaseFileError, match="cut.json.*unreadable"):
        build_backbone(_backbone(root, enc, str(tmp_path / "cut.json")))
    with pytest.raises(BaseFileError, match="another backbone.*layers"):
        build_backbone(BackboneConfig(encoder=str(enc), layers=2, heads=2, cache_dir=root / "cache",
                                      base=str(bundle)))
    with pytest.raises(BaseFileError, match="not found"):
        build_backbone(_backbone(root, enc, str(tmp_path / "missing.json")))


def test_silo_with_a_different_base_file_is_refused(world, tmp_path):
    root, enc = world
    _pretrain(root, enc, tmp_path / "p")
    _pretrain(root, enc, tmp_path / "q", "--seed", "1")  # another base, same architecture
    server_base = str(tmp_path / "p" / "base.json")
    endpoints = {}
    for d in SILOS:
        own = str(tmp_path / "q" / "base.json") if d == "outdoor" else None
        w = SiloWorker(d, root / "data" / d, state_dir=tmp_path / "state" / d, cache_dir=root / "cache", base=own)
        endpoints[d] = (lambda w: (lambda mt, c: handle(w, mt, c)))(w)
    cfg = PipelineConfig(backbone=_backbone(root, enc, server_base),
                         train=TrainConfig(epochs=1, batch_size=16, progress=False, warmup_steps=2),
                         coefficients=CoefficientConfig(steps=3, batch_size=4), baselines=["task_arithmetic"],
                         teacher_top_k=8, min_silos=2, retries=0, timeout_s=60)
    report = Pipeline(InProcessTransport(endpoints), cfg, tmp_path / "run").run()
    assert sorted(report["active"]) == ["garden", "kitchen"]
    assert [(x["domain"], x["stage"]) for x in report["dropped"]] == [("outdoor", "handshake")]
    assert "refused" in report["dropped"][0]["reason"]


def test_bundled_base_matches_its_card():
    """The checkpoint shipped with the code loads into the default architecture and is the one its card
    (and the command in it) describes."""
    state, card = load_base("bundled")
    assert BUNDLED.is_file() and card is not None
    assert fingerprint(state) == card.fingerprint
    model = build_backbone(BackboneConfig(base="bundled", adaptor_hidden=0))
    assert fingerprint(shared_state(model)) == card.fingerprint
    # the default architecture adds the item MLP residual (its seeded init; nothing before the merge trains it)
    full = shared_state(build_backbone(BackboneConfig(base="bundled")))
    assert {n for n in full if n not in state} == {n for n in full if n.startswith("adaptor_mlp.")} != set()
    assert all(torch.equal(full[n], state[n]) for n in state)
    assert card.command.startswith("python -m common.model.pretrain")
    assert {d["domain"] for d in card.data}.isdisjoint({"Beauty", "Sports", "Toys"})
    assert all(torch.isfinite(t).all() for t in state.values())
