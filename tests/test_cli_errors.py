"""A newcomer's mistakes: each is one clear line on stderr naming the option, file or key, and a non-zero exit
status, never a Python traceback; and `runs/latest` points at the newest run whichever launcher started it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.api.model_folder import ModelConfig, save_model_folder
from common.core.runs import link_latest, new_run_dir
from common.model.config import BackboneConfig
from deployment.cli import main as mergerec

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def catalog(world):
    return world[2][0]  # the garden demo domain (keys GAR00000...)


# ------------------------------------------------------------------------------------------ mergerec options
def test_device_without_cuda(capsys, catalog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mergerec(["recommend", "--model", "base:init", "--catalog", str(catalog), "--history", "GAR00001",
                     "--device", "cuda"]) == 1
    _one_line_error(capsys, "--device", "CUDA is not available")
    assert mergerec(["evaluate", "--model", "base:init", "--data", str(catalog), "--device", "tpu-7"]) == 1
    _one_line_error(capsys, "--device", "unknown device")


def test_encoder_folder_that_does_not_exist(capsys, catalog, tmp_path):
    assert mergerec(["recommend", "--model", "base:init", "--catalog", str(catalog), "--history", "GAR00001",
                     "--encoder", str(tmp_path / "no-encoder")]) == 1
    _one_line_error(capsys, "--encoder", "no-encoder")


def test_export_never_overwrites_by_accident(capsys, tmp_path):
    (tmp_path / "file").write_text("mine")
    assert mergerec(["export", "--model", "base:init", "--out", str(tmp_path / "file")]) == 1
    _one_line_error(capsys, "--out", "file")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    assert mergerec(["export", "--model", "base:init", "--out", str(tmp_path / "folder")]) == 1
    _one_line_error(capsys, "--out", "not empty", "--force")
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["notes.txt"]


def test_model_with_nan_or_inf_weights_is_refused(capsys, tmp_path, catalog, tiny_encoder):
    cfg = ModelConfig(backbone=BackboneConfig(encoder=str(tiny_encoder), cache_dir=tmp_path / "cache"))
    for name, bad in (("nan", float("nan")), ("inf", float("inf"))):
        folder = save_model_folder(tmp_path / name, {"adaptor.weight": torch.tensor([[0.5, bad]]),
                                                     "position.weight": torch.zeros(2, 2)}, cfg)
        assert mergerec(["evaluate", "--model", str(folder), "--data", str(catalog)]) == 1
        _one_line_error(capsys, str(folder), "adaptor.weight", "NaN or Inf")
        assert mergerec(["recommend", "--model", str(folder / "model.safetensors"), "--catalog", str(catalog),
                         "--history", "GAR00001"]) == 1
        _one_line_error(capsys, "model.safetensors", "NaN or Inf")


@pytest.mark.parametrize("argv,option", [
    (["evaluate", "--max-users", "-3"], "--max-users"), (["evaluate", "--max-users", "0"], "--max-users"),
    (["evaluate", "--seed", str(2**70)], "--seed"), (["recommend", "-k", "0", "--history", "GAR00001"], "-k"),
])
def test_out_of_range_numbers(capsys, catalog, argv, option):
    where = ["--data", str(catalog)] if argv[0] == "evaluate" else ["--catalog", str(catalog)]
    with pytest.raises(SystemExit) as exc:
        mergerec([argv[0], "--model", "base:init", *where, *argv[1:]])
    assert exc.value.code == 2
    _one_line_error(capsys, option)


def test_history_key_not_in_the_catalog(capsys, catalog, tmp_path):
    assert mergerec(["recommend", "--model", "base:init", "--catalog", str(catalog), "--history",
                     "GAR00001,Neon Glow Tumbler"]) == 1
    _one_line_error(capsys, "--history", "'Neon Glow Tumbler'", "--history-texts")
    (tmp_path / "h.txt").write_text("GAR00001\nno-such-key\n")
    assert mergerec(["recommend", "--model", "base:init", "--catalog", str(catalog), "--history-file",
                     str(tmp_path / "h.txt")]) == 1
    _one_line_error(capsys, "--history-file", "'no-such-key'")
    assert mergerec(["recommend", "--model", "base:init", "--catalog", str(tmp_path / "nothing"), "--history",
                     "GAR00001"]) == 1
    _one_line_error(capsys, "--catalog", "nothing")


# ------------------------------------------------------------------------------------------ simulate
@pytest.mark.parametrize("rc,key", [("epochs=-1", "epochs"), ("lr=inf", "lr"), (f"seed={2**70}", "seed"),
                                    ("teacher-topk=5", "teacher-topk"), ("epochs", "epochs")])
def test_simulate_checks_the_run_config_before_starting_anything(capsys, monkeypatch, tmp_path, rc, key):
    from deployment import simulate

    def no_run(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(simulate, "run_simulation", no_run)
    monkeypatch.setattr(simulate.subprocess, "Popen", no_run)
    assert simulate.main(["--data-root", str(tmp_path / "data"), "--run-config", rc], prog="mergerec simulate") == 2
    _one_line_error(capsys, "mergerec simulate", "--run-config", key)
    assert not (tmp_path / "data").exists()  # not even the demo data


def test_simulate_run_directory_is_a_new_folder_under_runs(monkeypatch, tmp_path, world):
    from deployment import simulate

    seen = []

    def fake_run(domains, data_root, run_dir, *a, **k):
        seen.append(run_dir)
        return {"metrics": {}, "dropped": [], "timings": {}, "active": domains}

    monkeypatch.setattr(simulate, "ROOT", tmp_path)
    monkeypatch.setattr(simulate, "run_simulation", fake_run)
    assert simulate.main(["--data-root", str(world[2][0].parent)]) == 0
    (run_dir,) = seen
    assert run_dir.parent == (tmp_path / "runs").resolve() and run_dir.name[:2] == "20"


# ------------------------------------------------------------------------------------------ runs/latest
def test_link_latest_points_at_the_newest_run(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    first, second = runs / "20250101-000000", runs / "20250102-000000"
    first.mkdir(parents=True)
    second.mkdir()
    assert link_latest(first) == runs / "latest" and os.readlink(runs / "latest") == first.name
    assert link_latest(second) and os.readlink(runs / "latest") == second.name  # relative: the folder can move
    assert link_latest(runs / "latest") == runs / "latest" and os.readlink(runs / "latest") == second.name  # resume
    assert link_latest(tmp_path / "elsewhere") is None and not (tmp_path / "latest").exists()  # not in a runs/
    monkeypatch.chdir(tmp_path)
    assert new_run_dir().parent == Path("runs")
    old = tmp_path / "old" / "runs"
    (old / "latest").mkdir(parents=True)  # an older version's default run directory: left alone
    (old / "x").mkdir()
    assert link_latest(old / "x") is None and (old / "latest").is_dir() and not (old / "latest").is_symlink()


@pytest.mark.parametrize("given", [None, "absolute"])
def test_server_app_links_runs_latest_when_a_run_starts(tmp_path, monkeypatch, given):
    """`flwr run .` (no run-dir: a new runs/<timestamp> in the ServerApp's working directory) and `make run` /
    `make e2e` (an absolute run-dir under the project's runs/): runs/latest points at the run."""
    from server import server_app

    started = []

    class FakePipeline:
        def __init__(self, transport, cfg, run_dir, expected=None):
            started.append(Path(run_dir))

        def run(self):
            return {}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(server_app, "Pipeline", FakePipeline)
    monkeypatch.setattr(server_app, "wait_for_nodes", lambda *a, **k: [])
    monkeypatch.setattr(server_app, "results_table", lambda report: "")
    rc = {} if given is None else {"run-dir": str(tmp_path / "project" / "runs" / "20250101-000000")}
    server_app.main(SimpleNamespace(), SimpleNamespace(run_config=rc))
    (run_dir,) = started
    latest = run_dir.resolve().parent / "latest"
    assert latest.is_symlink() and latest.resolve() == run_dir.resolve()
    if given is None:
        assert run_dir.parent == Path("runs") and (tmp_path / "runs" / "latest").is_symlink()


def test_make_e2e_writes_its_run_under_runs():
    """`make e2e` passes the ServerApp a run directory under the project's runs/ (so runs/latest follows it) and
    checks that same folder's artifacts."""
    out = subprocess.run(["make", "-n", "e2e"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    run_dir = out.split('run-dir="', 1)[1].split('"', 1)[0]
    assert Path(run_dir).parent == ROOT / "runs"
    assert f"deployment.check_artifacts {run_dir} " in out



def test_every_simulated_silo_runs_at_once_up_to_twice_the_cores():
    """Three silos on 2 cores run together (Ray is told 3 CPUs); many silos are capped at twice the cores, wider
    silos at fewer."""
    from deployment.simulate import silos_at_once

    assert silos_at_once(3, cores=2) == 3
    assert silos_at_once(10, cores=2) == 4
    assert silos_at_once(10, cpus_per_silo=2, cores=2) == 2
    assert silos_at_once(2, cpus_per_silo=4, cores=2) == 1
