"""The run directory: every path a run writes, its checkpoint, the SHA-256 record of files read back later, and
the lock that keeps two pipelines out of one directory.

    checkpoint.json            the run state (server/checkpoint.py)
    task_vectors/<d>.safetensors, lora/<d>.safetensors, woven/<d>.safetensors
    pseudo_users.json, teacher/<d>.npz, coefficients.json, merges/<name>.safetensors
    integration/<name>.safetensors, integration.json, rounds/<r>.safetensors (FedAvg)
    metrics.json, metrics_val.json
    model/, report.json, report.md, plots/, flwr-run.log (launchers)

Writes are atomic (a crash never leaves half a file); `record` remembers a file's SHA-256 in the state so that a
resume can tell an intact file from a damaged or edited one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file, save_file

from common.core.files import atomic_path, atomic_write
from common.core.fingerprint import sha256_file
from server import checkpoint
from server.checkpoint import Checkpoint


class RunDirBusy(RuntimeError):
    """Another running pipeline holds this run directory."""


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ paths
    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.json"

    def task_vector(self, domain: str) -> Path:
        return self.root / "task_vectors" / f"{domain}.safetensors"

    def lora(self, domain: str) -> Path:
        return self.root / "lora" / f"{domain}.safetensors"

    def woven(self, domain: str) -> Path:
        return self.root / "woven" / f"{domain}.safetensors"

    def teacher(self, domain: str) -> Path:
        return self.root / "teacher" / f"{domain}.npz"

    def merge(self, name: str) -> Path:
        return self.root / "merges" / f"{name}.safetensors"

    def round(self, r: int) -> Path:
        """The FedAvg global model after r rounds (server/fedavg.py)."""
        return self.root / "rounds" / f"{r}.safetensors"

    def integrated(self, name: str) -> Path:
        return self.root / "integration" / f"{name}.safetensors"

    @property
    def integration_info(self) -> Path:
        return self.root / "integration.json"

    @property
    def pseudo_users(self) -> Path:
        return self.root / "pseudo_users.json"

    @property
    def coefficients(self) -> Path:
        return self.root / "coefficients.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def metrics_val(self) -> Path:
        return self.root / "metrics_val.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    # ------------------------------------------------------------------ state
    def load(self, cfg) -> Checkpoint:
        """The run state for `cfg` (fresh, resumed, or with the stages a config change affects forgotten)."""
        return checkpoint.load(self.checkpoint, cfg)

    def save(self, state: Checkpoint) -> None:
        atomic_write(self.checkpoint, Checkpoint.model_validate(state.model_dump()).model_dump_json(indent=1))

    def record(self, state: Checkpoint, path: Path) -> None:
        """Remember the SHA-256 of a file a later stage or a resume reads back (checked on resume)."""
        state.files[self.rel(path)] = sha256_file(path)

    def intact(self, state: Checkpoint, path: Path) -> bool:
        """The file exists and hashes as recorded."""
        rel = self.rel(path)
        return path.exists() and state.files.get(rel) == sha256_file(path)

    def verify(self, state: Checkpoint, expected: list[str], check) -> None:
        """On resume: every stored file of a completed stage checked (server/checkpoint.py `verify`)."""
        checkpoint.verify(state, self.root, expected, check, sha256_file)

    # ------------------------------------------------------------------ files
    def write_tensors(self, state: Checkpoint, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(path) as tmp:
            save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp))
        self.record(state, path)

    def write_arrays(self, state: Checkpoint, path: Path, arrays: dict[str, np.ndarray]) -> None:
        """numpy arrays as safetensors (.safetensors) or npz (.npz)."""
        suffix = path.suffix
        with atomic_path(path, suffix=suffix) as tmp:
            if suffix == ".npz":
                np.savez(tmp, **arrays)
            else:
                save_numpy({n: np.ascontiguousarray(a) for n, a in arrays.items()}, str(tmp))
        self.record(state, path)

    def write_json(self, state: Checkpoint | None, path: Path, obj) -> None:
        """JSON, atomically; recorded when `state` is given (a file a later stage reads back)."""
        atomic_write(path, json.dumps(obj, indent=1))
        if state is not None:
            self.record(state, path)

    @staticmethod
    def read_json(path: Path):
        return json.loads(Path(path).read_text())

    @staticmethod
    def read_tensors(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))

    @staticmethod
    def read_arrays(path: Path) -> dict[str, np.ndarray]:
        if Path(path).suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        return load_numpy(str(path))

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def locked(self):
        """An exclusive lock on the directory while a pipeline runs (released when the process ends, however it
        ends): a second ServerApp on the same directory fails at once."""
        with open(self.root / ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirBusy(f"run directory {self.root} is in use by another running pipeline: wait for it, "
                                 "stop it (flwr stop), or use another run-dir") from None
            yield
