"""Using a run's model: MergedRecommender (from_pretrained, index, recommend, evaluate) and the `mergerec`
recommend / evaluate / export commands, checked against the pipeline's own evaluation numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from deployment.cli import main as mergerec
from common.model.config import BackboneConfig, TrainConfig
from common.data.format import load_silo
from common.data.demo import make_demo
from common.model.coefficients import CoefficientConfig
from common.protocol.messages import EvaluateRequest
from common.model.metrics import metrics_from_ranks, ranks_excluding_seen
from common.api.model_folder import ModelFolderError
from common.api.recommend import MergedRecommender
from server.config import PipelineConfig
from server.pipeline import Pipeline
from server.transport import InProcessTransport

from helpers import make_tiny_encoder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    enc = make_tiny_encoder(root / "enc")
    dirs = make_demo(root / "data", n_domains=3, n_items=60, n_users=80, seed=2)
    bb = BackboneConfig(kind="light", encoder=str(enc), layers=1, heads=2, cache_dir=root / "cache")
    cfg = PipelineConfig(backbone=bb, train=TrainConfig(epochs=2, batch_size=32, progress=False, warmup_steps=5),
                         coefficients=CoefficientConfig(steps=10, batch_size=8), baselines=["task_arithmetic"],
                         teacher_top_k=16, timeout_s=60)
    workers = {d.name: SiloWorker(d.name, d, state_dir=root / "state" / d.name, cache_dir=root / "cache") for d in dirs}
    transport = InProcessTransport({n: in_process_endpoint(w) for n, w in workers.items()})
    pipeline = Pipeline(transport, cfg, root / "run")
    report = pipeline.run()
    return {"root": root, "dirs": dirs, "report": report, "model": root / "run" / "model", "workers": workers,
            "spec": pipeline.base.spec}


def _values(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "users"}


def _keys(silo, ids):
    return [silo.catalog.item_keys[i] for i in ids]


def test_recommend_returns_k_unseen_items(run):
    rec = MergedRecommender.from_pretrained(run["model"]).index(run["dirs"][0])
    silo = load_silo(run["dirs"][0])
    history = _keys(silo, silo.train[0])
    out = rec.recommend(history, k=7)
    assert len(out) == 7 and [r.rank for r in out] == list(range(1, 8))
    assert not set(r.key for r in out) & set(history)
    assert [r.score for r in out] == sorted((r.score for r in out), reverse=True)
    with_seen = rec.recommend(history, k=len(silo.catalog), exclude_seen=False)
    assert set(history) <= {r.key for r in with_seen}
    many = rec.recommend_many([history, history[:1]], k=3)
    assert [r.key for r in many[0]] == [r.key for r in out[:3]] and len(many[1]) == 3


def test_raw_item_texts_and_a_new_catalog(run):
    rec = MergedRecommender.from_pretrained(run["model"]).index(run["dirs"][1])
    silo = load_silo(run["dirs"][1])
    ids = silo.train[3]
    by_key = rec.recommend(_keys(silo, ids), k=5)
    texts = [{"title": m.title, "brand": m.brand, "category": m.category} for m in (silo.catalog.items[i] for i in ids)]
    assert [r.key for r in rec.recommend(texts, k=5)] == [r.key for r in by_key]
    # an item text that is in no catalog, and a brand-new shop given as plain texts
    out = rec.recommend(["Glow Neon Camp Lantern by Voltage"], k=4)
    assert len(out) == 4
    shop = ["Vintage Tea Kettle", "Neon Desk Lamp", "Rustic Oak Shelf", "Retro Toaster", "Glow Night Light"]
    rec.index(shop)
    got = rec.recommend(["Neon Desk Lamp"], k=3)
    assert len(got) == 3 and "Neon Desk Lamp" not in {r.key for r in got}


def test_scores_and_metrics_equal_the_pipeline_evaluation(run):
    """recommend's scores, ranked like the evaluation, give the pipeline's test metrics for the shipped model;
    `evaluate` returns exactly the pipeline's numbers."""
    chosen = run["report"]["selection"]["chosen"]
    rec = MergedRecommender.from_pretrained(run["model"])
    for d in run["dirs"]:
        pipeline = run["report"]["metrics"][d.name][chosen]["values"]
        assert _values(rec.evaluate(d, "test")) == pytest.approx(pipeline, abs=1e-12)
        silo = load_silo(d)
        histories, targets = silo.eval_split("test")
        rec.index(d)
        scores, _ = rec.scores([_keys(silo, h) for h in histories])
        assert torch.allclose(scores, rec.score_ids(histories), atol=1e-6)
        ours = metrics_from_ranks(ranks_excluding_seen(scores.clone(), torch.tensor(targets), histories))
        for k in ("recall@10", "ndcg@10", "recall@50"):
            assert ours[k] == pytest.approx(pipeline[k], abs=1.5 / len(targets))


def test_scores_equal_those_the_silo_evaluation_ranks(run, monkeypatch):
    """The shipped weights evaluated by a silo exactly as in the pipeline (SiloWorker.evaluate): the score
    matrix it ranks equals MergedRecommender.scores for the same histories given as item keys."""
    import common.model.train

    d = run["dirs"][1]
    captured = []
    real = common.model.train.ranks_excluding_seen  # the default protocol: history items left out
    monkeypatch.setattr(common.model.train, "ranks_excluding_seen",
                        lambda sc, t, h, g=None: captured.append(sc.clone()) or real(sc, t, h, g))
    arrays = {n: t.numpy() for n, t in load_file(str(run["model"] / "model.safetensors")).items()}
    reply, _ = run["workers"][d.name].evaluate(EvaluateRequest(base=run["spec"], models=["shipped"]), {"shipped": arrays})
    rec = MergedRecommender.from_pretrained(run["model"]).index(d)
    silo = load_silo(d)
    histories, _ = silo.eval_split("test")
    order = sorted(range(len(histories)), key=lambda i: min(len(histories[i]), rec.model.cfg.max_items))
    ours, _ = rec.scores([_keys(silo, histories[i]) for i in order])
    assert ours.shape == torch.cat(captured).shape
    assert torch.allclose(ours, torch.cat(captured), atol=1e-5)
    assert reply.metrics["shipped"].values == pytest.approx(_values(rec.evaluate(d, "test")), abs=1e-12)


def test_silo_finetuned_file_loads_and_matches_its_metrics(run):
    d = run["dirs"][2]
    (weights,) = (run["root"] / "state" / d.name).glob("finetuned-*.safetensors")
    rec = MergedRecommender.from_pretrained(weights, cache_dir=run["root"] / "cache")
    assert rec.config.method == f"finetuned-{d.name}"
    pipeline = run["report"]["metrics"][d.name][f"finetuned-{d.name}"]["values"]
    assert _values(rec.evaluate(d, "test")) == pytest.approx(pipeline, abs=1e-12)


def test_a_model_folder_of_an_older_run_still_loads(run, tmp_path):
    """Older runs wrote model/model_card.json + model/merged.safetensors."""
    cfg = json.loads((run["model"] / "config.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    (old / "merged.safetensors").write_bytes((run["model"] / "model.safetensors").read_bytes())
    (old / "model_card.json").write_text(json.dumps({"base_fingerprint": cfg["base_fingerprint"],
                                                     "merged_fingerprint": cfg["fingerprint"], "method": cfg["method"],
                                                     "domains": cfg["domains"], "backbone": cfg["backbone"], "seed": 0}))
    d = run["dirs"][0]
    new = MergedRecommender.from_pretrained(run["model"]).evaluate(d, "val")
    assert MergedRecommender.from_pretrained(old).evaluate(d, "val") == new


def test_changed_weights_are_refused(run, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for f in run["model"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    name = next(iter(state))
    state[name] = state[name] + 0.01
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelFolderError, match="fingerprint"):
        MergedRecommender.from_pretrained(folder)
    with pytest.raises(ModelFolderError, match="no such model"):
        MergedRecommender.from_pretrained(tmp_path / "nothing")


def test_recommend_evaluate_export_commands(run, capsys, tmp_path):
    d = run["dirs"][0]
    silo = load_silo(d)
    history = _keys(silo, silo.train[1])
    assert mergerec(["recommend", "--model", str(run["model"]), "--catalog", str(d), "--history",
                     ",".join(history), "-k", "5", "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 5 and not {r["key"] for r in out} & set(history)
    assert mergerec(["evaluate", "--model", str(run["model"]), "--data", *map(str, run["dirs"]), "--split", "test",
                     "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    chosen = run["report"]["selection"]["chosen"]
    for row in rows:
        assert row["ndcg@10"] == pytest.approx(run["report"]["metrics"][row["domain"]][chosen]["values"]["ndcg@10"],
                                               abs=1e-12)
    (weights,) = (run["root"] / "state" / d.name).glob("finetuned-*.safetensors")
    assert mergerec(["export", "--model", str(weights), "--out", str(tmp_path / "exported")]) == 0
    capsys.readouterr()
    assert mergerec(["evaluate", "--model", str(tmp_path / "exported"), "--data", str(d), "--format", "json"]) == 0
    exported = json.loads(capsys.readouterr().out)[0]
    assert exported["ndcg@10"] == pytest.approx(run["report"]["metrics"][d.name][f"finetuned-{d.name}"]["values"]
                                                ["ndcg@10"], abs=1e-12)
    assert mergerec(["recommend", "--model", str(tmp_path / "missing"), "--catalog", str(d), "--history", "x"]) == 1


def test_history_keys_or_explicit_texts(run, capsys):
    """`--history` takes item keys (an unknown one is an error naming it); `--history-texts` takes raw item texts,
    which give what the Python API gives for the same texts."""
    d = run["dirs"][1]
    silo = load_silo(d)
    titles = [silo.catalog.items[i].title for i in silo.train[2]]
    assert mergerec(["recommend", "--model", str(run["model"]), "--catalog", str(d), "--history",
                     ",".join(titles), "-k", "4", "--format", "json"]) == 1
    err = capsys.readouterr().err
    assert f"--history: {titles[0]!r} is not an item key" in err and "--history-texts" in err
    assert mergerec(["recommend", "--model", str(run["model"]), "--catalog", str(d), "--history-texts",
                     "--history", ",".join(titles), "-k", "4", "--format", "json"]) == 0
    got = [r["key"] for r in json.loads(capsys.readouterr().out)]
    want = MergedRecommender.from_pretrained(run["model"]).index(d).recommend([{"title": t} for t in titles], k=4)
    assert got == [r.key for r in want] and len(got) == 4


def _readme_commands() -> list[str]:
    """The `mergerec ...` lines of the README's "Use the merged model" block, continuations joined."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("### Use the merged model", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [line.split("   #", 1)[0].strip() for line in lines if line.strip().startswith("mergerec ")]


def test_readme_commands_work_on_runs_latest(run, tmp_path, monkeypatch, capsys):
    """After a run, the README's next commands work as written: runs/latest is the newest run (linked the way
    the ServerApp links it) and the demo data sits at .cache/demo-data."""
    import shlex
    import shutil

    from common.core.runs import link_latest

    commands = _readme_commands()
    assert len(commands) == 3 and all("runs/latest/model" in c for c in commands)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "demo-data").symlink_to(run["dirs"][0].parent)
    shutil.copytree(run["model"], tmp_path / "runs" / "20250101-000000" / "model")
    monkeypatch.chdir(tmp_path)
    assert link_latest(Path("runs") / "20250101-000000")
    for command in commands:
        argv = shlex.split(command)[1:]
        assert mergerec(argv) == 0, (command, capsys.readouterr().err)
        assert capsys.readouterr().out.strip()


def test_every_option_has_help(capsys):
    from common.api.cli import build_parser
    from deployment.cli import launch_commands

    ap = build_parser({**launch_commands()})
    for name, sub in ap._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"mergerec {name} {action.option_strings[0]} has no help"
    with pytest.raises(SystemExit):
        mergerec(["demo-data", "--help"])
    assert capsys.readouterr().out.startswith("usage: mergerec demo-data")
