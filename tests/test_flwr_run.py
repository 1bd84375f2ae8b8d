"""`flwr run .` on a fresh copy of the repository, as the README shows it: Flower's own local simulation
(its default federation), no demo data prepared beforehand. The run must pass, write the model folder,
report.md and the plots, and its streamed log must show progress for every stage with little
third-party request chatter."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from deployment.procs import MARKER, ProcessSet, flwr_env, free_port, new_run_id

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINES = ["handshake: silos", "epoch 1 loss", "val NDCG@10", "stage finetune done", "fine-tuned", "stage teacher done", "step 20/20",
               "stage coefficients done", "evaluate: silo", "stage evaluate done", "shipping "]


def _fresh_copy(dest: Path) -> Path:
    """The files a clone would have: tracked and not-ignored files of the working tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.mark.e2e
@pytest.mark.slow
def test_flwr_run_dot_on_a_fresh_copy(tmp_path):
    repo = _fresh_copy(tmp_path / "repo")
    home = tmp_path / "flwr-home"
    home.mkdir()
    # `flwr run` leaves its local SuperLink running (as Flower does): everything it started carries this marker
    run_id = new_run_id("flwr-run-")
    env = flwr_env(home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
                   FLWR_LOCAL_CONTROL_API_PORT=str(free_port()), **{MARKER: run_id})
    try:
        proc = subprocess.run(["flwr", "run", ".", "--run-config", "epochs=2 coef-steps=20", "--stream"], cwd=repo,
                              env=env, capture_output=True, text=True, timeout=900)
    finally:
        left = ProcessSet(run_id).stop()
    assert left == [], "processes of `flwr run .` survived the teardown"
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    run = repo / "runs" / "latest"
    report = json.loads((run / "report.json").read_text())
    assert len(report["active"]) >= 2 and report["dropped"] == []
    assert (repo / ".cache" / "demo-data" / report["active"][0] / "smap.json").exists()
    for rel in ("report.md", "model/config.json", "model/model.safetensors", "model/README.md",
                "plots/recall_at_10.png", "plots/coefficients.png", "plots/coefficient_loss.png"):
        assert (run / rel).stat().st_size > 0, rel
    lines = [line for line in log.splitlines() if line.strip()]
    chatter = [line for line in lines if "HTTP Request:" in line]
    assert len(chatter) < 0.05 * len(lines), f"{len(chatter)} of {len(lines)} lines are request logs"
    missing = [s for s in STAGE_LINES if s not in log]
    assert not missing, f"no progress line for {missing}:\n{log[-3000:]}"
