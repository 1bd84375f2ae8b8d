"""Shared, session-scoped test fixtures and the two lanes.

Lanes: `make test-fast` runs `-m "not slow and not e2e"` (unit and in-process tests); `make test` runs
everything, on pytest-xdist workers (`make test`: 3, `make test-fast`: 2; Makefile), one torch thread each. Mark a
test `slow` when it takes more than a few seconds on 2 cores, `e2e` when it starts real Flower processes.

Fixtures built once per session (tests copy what they change, never edit these):
- `tiny_encoder`: a 2-layer, 32-wide BERT with MiniLM's tokenizer (tests/helpers.py).
- `world`: (root, encoder, domain dirs) with three small demo domains and one shared item-embedding cache
  (`root / "cache"`), so each catalog is encoded once per session.

Every process a test starts inherits this session's marker (MERGEREC_RUN_ID, deployment/procs.py); launchers and
stacks started by tests mark their processes with run ids below it. At the end of the session whatever still
carries it is stopped, so a failing test never leaves Flower or Ray running.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import make_tiny_encoder

# numpy's OpenBLAS thread pool hung a ServerApp inside np.dot on a loaded machine; tests never need it
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Under pytest-xdist (`make test` runs `-n 3`, `make test-fast` `-n 2`) each worker gets its share of the cores, as
# do the processes its tests start: two workers of two torch threads each on 2 cores slow each other down many times.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(_threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _stop_leftover_processes():
    from deployment.procs import MARKER, ProcessSet, new_run_id

    run_id = os.environ[MARKER] = new_run_id("pytest-")  # below an inherited marker, if pytest runs inside a run
    yield
    left = ProcessSet(run_id).stop()
    assert not left, f"processes of this test session survived the teardown: {left}"


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return make_tiny_encoder(tmp_path_factory.mktemp("tiny-encoder"))


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_encoder):
    """(root, encoder folder, [domain dirs]): three demo domains of 50 items and 40 users (seed 1); item
    embeddings cached under root / "cache" for the whole session."""
    from common.data.demo import make_demo

    root = tmp_path_factory.mktemp("world")
    dirs = make_demo(root / "data", n_domains=3, n_items=50, n_users=40, seed=1)
    return root, tiny_encoder, dirs

