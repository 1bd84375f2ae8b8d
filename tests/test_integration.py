"""X-Cross-style integrated model (common/model/integration.py): exactness checks, gate training, the pipeline's
`integration = "xcross"` candidate end to end (evaluated at the silos, privacy-checked), hostile requests."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from common.model.backbones import build_backbone, shared_state
from common.model.config import BackboneConfig
from common.data.format import load_catalog
from common.data.demo import make_demo
from common.model.integration import IntegratedRecommender, IntegrationConfig, from_arrays
from common.model.coefficients import CoefficientConfig, DomainBatchSource, mean_loss
from common.model.gates import train_gates
from common.merging.teacher import teacher_topk
from common.protocol.messages import EVALUATE, BaseSpec, ContractError, EvaluateRequest, IntegratedSpec, SiloReplyError, encode
from common.core.fingerprint import fingerprint
from common.merging.task_vectors import state_to_numpy
from server.pipeline import Pipeline
from server.transport import MessageRecorder

from helpers import make_tiny_encoder
from privacy import assert_no_user_data, recorded_messages
from test_pipeline_inprocess import _cfg, _transport


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("xworld")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=3, n_items=60, n_users=80, seed=1)
    return root, enc, dirs


@pytest.fixture(scope="module")
def models(world):
    """base (2 blocks) and three perturbed 'domain' states."""
    root, enc, dirs = world
    cfg = BackboneConfig(kind="light", encoder=str(enc), layers=2, heads=2, cache_dir=root / "cache")
    base = build_backbone(cfg).eval()
    bs = shared_state(base)
    gen = torch.Generator().manual_seed(0)
    states = [{n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in bs.items()} for _ in range(3)]
    doms = [base.domain_inputs(load_catalog(d, d.name)) for d in dirs]
    return base, bs, states, doms


def _histories(n_items: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    hist = torch.randint(0, n_items, (6, 7), generator=gen)
    hist[0, :4] = -1  # padded on the left
    return hist


@pytest.mark.parametrize("hidden", [0, 8])
def test_one_hot_gates_give_that_domains_model(models, hidden):
    base, _, states, doms = models
    hist = _histories(doms[0].num_items)
    for d in range(3):
        m = IntegratedRecommender.from_states(base, states[d], states, hidden).eval()
        with torch.no_grad():
            for gate in m.gates:
                gate.out.bias.zero_()
                gate.out.bias[d] = 1e4  # softmax = one-hot on d
        ref = copy.deepcopy(base)
        ref.load_state_dict(states[d])
        with torch.no_grad():
            items = ref(doms[0], "items", torch.arange(doms[0].num_items))
            got = m(doms[0], "histories", hist) @ m(doms[0], "items", torch.arange(doms[0].num_items)).T
            want = ref(doms[0], "histories", hist) @ items.T
            assert torch.allclose(m(doms[0], "positions", hist), ref(doms[0], "positions", hist), atol=1e-5)
        assert torch.allclose(got, want, atol=1e-5)


def test_uniform_gates_over_identical_blocks_give_the_base(models):
    base, bs, _, doms = models
    m = IntegratedRecommender.from_states(base, bs, [bs, bs, bs], 4).eval()
    hist = _histories(doms[1].num_items)
    with torch.no_grad():
        g = m.gates[0](torch.randn(2, 3, m.adaptor.out_features))
        assert torch.allclose(g, torch.full_like(g, 1 / 3))  # the mix starts as the uniform average
        assert torch.allclose(m(doms[1], "histories", hist), base(doms[1], "histories", hist), atol=1e-5)


def _sources(base, states, doms):
    """Pseudo-users = every item; teacher = each domain's own model (top-16)."""
    out = []
    for d, dom in enumerate(doms):
        ref = copy.deepcopy(base)
        ref.load_state_dict(states[d])
        ref.eval()
        ids = torch.arange(dom.num_items)
        with torch.no_grad():
            items = ref(dom, "items", ids)
            top = teacher_topk(lambda q: ref(dom, "histories", q.view(-1, 1)), items, ids, 16, 64, exclude_own=True)
        out.append(DomainBatchSource(dom_inputs=dom, pseudo_item_ids=ids, teacher=top, name=dom.domain))
    return out


def test_gate_training_lowers_the_held_out_loss(models):
    base, bs, states, doms = models
    srcs = _sources(base, states, doms)
    m = IntegratedRecommender.from_states(base, bs, states, 0)
    cfg = CoefficientConfig(batch_size=16, holdout_fraction=0.3, eval_every=10, dropout=False)
    res = train_gates(m, srcs, cfg, steps=60, lr=0.05)
    first, best = res.holdout[0]["loss"], min(h["loss"] for h in res.holdout)
    assert best < first - 1e-3, res.holdout
    # the model holds the chosen gates: its held-out loss is the best one
    from common.model.coefficients import split_rows

    _, hold = split_rows(srcs, cfg.holdout_fraction, torch.Generator().manual_seed(cfg.seed))
    assert mean_loss(m, dict(m.named_parameters()), srcs, hold, cfg) == pytest.approx(best, rel=1e-5)
    assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.slow
def test_pipeline_with_xcross_candidate_is_evaluated_and_private(world, tmp_path):
    root, enc, dirs = world
    recorder = MessageRecorder(tmp_path / "messages")
    cfg = _cfg(enc, root, baselines=["task_arithmetic"], granularities=["task"],
               integration=IntegrationConfig(kind="xcross", steps=10))
    report = Pipeline(_transport(dirs, root, observer=recorder), cfg, tmp_path / "run").run()
    for d in dirs:
        m = report["metrics"][d.name]
        assert {"mergerec-task", "xcross"} <= set(m)
        assert 0 <= m["xcross"]["values"]["ndcg@10"] <= 1 and m["xcross"]["users"] >= 5
    cost = report["integration"]["cost"]
    assert cost["integrated"]["parameters"] > cost["single_merged"]["parameters"] > 0
    assert cost["integrated"]["seconds_per_batch"] > 0
    assert "Integrated model `xcross`" in (tmp_path / "run" / "report.md").read_text()
    # what went down to the silos: evaluate requests naming xcross as an integrated model of 3 block sets
    downs = [json.loads(json.loads(q.read_text())["config"]["header"]["json"])
             for q in sorted((tmp_path / "messages").glob("*-down-evaluate.merged-*.json"))]
    assert [r["integrated"]["xcross"]["num_domains"] for r in downs if r["split"] == "test"] == [3, 3, 3]
    assert assert_no_user_data(recorded_messages(tmp_path / "messages"), dirs) >= 24


def _request(bb, base_fp, spec=None, integrated=None):
    """An EvaluateRequest as a curious or broken server could send it (model_construct skips its checks)."""
    spec = spec or IntegratedSpec(num_domains=2)
    return EvaluateRequest.model_construct(base=BaseSpec(backbone=bb, seed=0, fingerprint=base_fp), split="test",
                                           models=["xcross"],
                                           integrated=integrated or {"xcross": spec})


def _refused(call, caplog, content, what: str, message_type: str = EVALUATE) -> None:
    """A contract error reply (code 100, its fixed text); what was wrong is in the silo's log only."""
    caplog.clear()
    with pytest.raises(SiloReplyError) as exc:
        call(message_type, content)
    assert exc.value.code == 100 and what not in exc.value.reason
    assert any(what in r.getMessage() for r in caplog.records if r.name.startswith("clients")), caplog.records


def test_hostile_integrated_requests_are_refused(world, models, tmp_path, caplog):
    root, enc, dirs = world
    base = models[0]
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=2, heads=2, cache_dir=root / "cache")
    fp = fingerprint(shared_state(base))
    worker = SiloWorker(dirs[0].name, dirs[0], state_dir=tmp_path / "state", cache_dir=root / "cache")
    call = in_process_endpoint(worker)
    good = state_to_numpy({n: p.detach() for n, p in IntegratedRecommender.skeleton(
        base, IntegratedSpec(num_domains=2)).named_parameters()})
    assert call(EVALUATE, encode(_request(bb, fp), {"xcross": good})) is not None  # well-formed: answered
    bad_shape = {**good, "gates.0.out.weight": np.zeros((3, good["gates.0.out.weight"].shape[1]), np.float32)}
    extra = {**good, "experts.0.2.linear1.weight": good["experts.0.0.linear1.weight"]}
    nan = {**good, "gates.1.out.bias": np.full_like(good["gates.1.out.bias"], np.nan)}
    wrong_dtype = {**good, "adaptor.bias": good["adaptor.bias"].astype(np.float64)}
    missing = {k: v for k, v in good.items() if not k.startswith("experts.1.1.")}
    for named in (bad_shape, extra, nan, wrong_dtype, missing):
        _refused(call, caplog, encode(_request(bb, fp), {"xcross": named}), "model xcross")
    # the spec says 3 block sets, the arrays hold 2: refused
    _refused(call, caplog, encode(_request(bb, fp, IntegratedSpec(num_domains=3)), {"xcross": good}), "model xcross")
    # an integrated entry for a model that is not asked for is a contract error
    stray = _request(bb, fp, integrated={"xcross": IntegratedSpec(num_domains=2),
                                         "other": IntegratedSpec(num_domains=2)})
    _refused(call, caplog, encode(stray, {"xcross": good}), "integrated")
    # specs the contract refuses outright: too many domains, a gate too wide, an unknown kind
    for spec in ({"num_domains": 33}, {"num_domains": 2, "gate_hidden": 5000}, {"num_domains": 2, "kind": "moe"}):
        with pytest.raises(ValueError):
            IntegratedSpec(**spec)
    with pytest.raises(ContractError):
        from_arrays(base, IntegratedSpec(num_domains=2), bad_shape, "model xcross")


@pytest.mark.parametrize("key,value", [("integration", "moe"), ("integration-steps", -1), ("integration-lr", 0.0),
                                       ("gate-hidden", -2), ("gate-hidden", 5000)])
def test_bad_integration_config_names_the_key(key, value):
    from server.config import ConfigError, app_defaults, pipeline_config

    with pytest.raises(ConfigError, match=f"(^|[ ;]){key}: "):
        pipeline_config({**app_defaults(), key: value})


@pytest.mark.slow
def test_turning_integration_on_redoes_only_integration_and_evaluation(world, tmp_path):
    root, enc, dirs = world
    calls = []
    run = tmp_path / "run"
    kw = dict(baselines=[], granularities=["task"])
    first = Pipeline(_transport(dirs, root), _cfg(enc, root, **kw), run).run()
    assert "xcross" not in first["metrics"][dirs[0].name] and first["integration"] is None
    on = _cfg(enc, root, **kw, integration=IntegrationConfig(kind="xcross", steps=5, gate_hidden=4))
    report = Pipeline(_transport(dirs, root, observer=lambda dr, s, mt, c: calls.append((dr, mt))), on, run).run()
    asked = {mt for dr, mt in calls if dr == "down"}
    assert asked == {"query.handshake", "evaluate.merged"}  # no fine-tuning, no teacher again
    assert all("xcross" in report["metrics"][d.name] for d in dirs)
    assert report["integration"]["spec"] == {"kind": "xcross", "num_domains": 3, "gate_hidden": 4}
    # the stored integrated model is checked on resume like every other stored file
    ck = json.loads((run / "checkpoint.json").read_text())
    assert "integration/xcross.safetensors" in ck["files"] and "integration" in ck["completed"]


def test_new_domain_tunes_only_the_gates_and_sends_aggregates(world, models, tmp_path, caplog):
    """X-Cross "new domain with less data": the silo fine-tunes the gates on a fraction of its users; the tuned
    model stays there; only before/after test aggregates come back. A bad fraction is refused."""
    from safetensors.torch import load_file

    from common.model.config import TrainConfig
    from common.protocol.messages import TUNE_GATES, GateTuneReply, GateTuneRequest, decode

    root, enc, dirs = world
    base, bs, states, _ = models
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=2, heads=2, cache_dir=root / "cache")
    spec = BaseSpec(backbone=bb, seed=0, fingerprint=fingerprint(shared_state(base)))
    sent = IntegratedRecommender.from_states(base, bs, states[:2], 0)
    arrays = {"model": state_to_numpy({n: p.detach() for n, p in sent.named_parameters()})}
    worker = SiloWorker(dirs[2].name, dirs[2], state_dir=tmp_path / "state", cache_dir=root / "cache")
    call = in_process_endpoint(worker)
    train = TrainConfig(epochs=3, batch_size=16, lr=0.05, warmup_steps=1, patience=3, refit_on_val=False,
                        progress=False, val_max_users=None, freeze=[])  # freeze=[]: the silo still freezes
    req = GateTuneRequest(base=spec, spec=sent.spec, train=train, user_fraction=0.5)
    reply, out = decode(call(TUNE_GATES, encode(req, arrays)), GateTuneReply)
    assert out == {} and reply.domain == dirs[2].name and reply.before.users == reply.after.users >= 5
    assert assert_no_user_data([("reply", reply.model_dump_json(), {})], dirs) >= 1
    tuned = load_file(str(next((tmp_path / "state").glob("integrated-tuned-*.safetensors"))))
    sent_state = {n: p.detach() for n, p in sent.named_parameters()}
    assert all(torch.equal(tuned[n], t) for n, t in sent_state.items() if not n.startswith("gates."))
    assert any(not torch.equal(tuned[n], t) for n, t in sent_state.items() if n.startswith("gates."))
    for bad in (0.0, 1.5):
        hostile = GateTuneRequest.model_construct(**{**req.__dict__, "user_fraction": bad})
        _refused(call, caplog, encode(hostile, arrays), "user_fraction", TUNE_GATES)
