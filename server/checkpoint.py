"""The run state: a typed, versioned pydantic model that the stages read and change directly and that is written
to `checkpoint.json` after every step worth keeping (server/run_dir.py), with a config fingerprint per stage.

- A changed configuration redoes only the stages it affects (e.g. a new eval-max-users redoes the evaluation,
  nothing else); a change that affects fine-tuning (backbone, training, seed) needs a new run directory.
- `files` holds the SHA-256 of every file a later stage or a resume reads back; on resume every stored file of a
  completed stage is checked (`verify`: present, same SHA-256, and the checks a fresh reply gets); a damaged or
  edited file is named in the log and removed, and the stage that made it is redone (per-silo files: only for
  that silo).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

log = logging.getLogger(__name__)

STAGES = ["handshake", "finetune", "weave", "merge_init", "pseudo_users", "teacher", "coefficients", "integration",
          "fedavg", "evaluate", "artifacts"]

# the PipelineConfig fields each stage's output depends on (its own and those of the stages it reads from);
# fields listed nowhere and not in NO_EFFECT count for every stage
_OWN = {"finetune": {"backbone", "train", "seed"}, "weave": {"weave_rounds", "weave_epochs"},
        "merge_init": {"baselines"},
        "pseudo_users": {"pseudo_users", "pseudo_users_n"}, "teacher": {"teacher_top_k"},
        "coefficients": {"init_method", "granularities", "coefficients"}, "integration": {"integration"},
        "fedavg": {"strategy", "fedavg"}, "evaluate": {"baselines", "eval_max_users", "eval_epsilon", "evaluate_finetuned"}}
_READS = {"merge_init": ["weave"], "teacher": ["pseudo_users"], "coefficients": ["teacher", "pseudo_users", "weave"],
          "integration": ["coefficients", "teacher", "pseudo_users", "weave"],
          "fedavg": ["merge_init", "coefficients", "teacher", "pseudo_users", "weave"],
          "evaluate": ["fedavg", "integration", "coefficients", "teacher", "pseudo_users", "weave"]}
NO_EFFECT = {"min_silos", "retries", "timeout_s", "max_task_vector_ratio", "catalog_root"}


class CheckpointError(RuntimeError):
    """checkpoint.json cannot be used; the message names the file and what to do."""


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dropped(_Part):
    domain: str
    stage: str
    reason: str


class SiloBytes(_Part):
    sent_to_silo: int = 0
    received_from_silo: int = 0


class SiloFinetune(_Part):
    """What the server keeps of a silo's fine-tuning reply (aggregates and sizes only)."""

    epochs: int | None = None
    refit_epochs: int | None = None
    seconds: float | None = None
    upload_bytes: int | None = None
    dense_task_vector_bytes: int | None = None
    dp: dict | None = None  # the silo's DP guarantee (FinetuneReply.dp), None without DP


class WeaveHop(_Part):
    round: int
    module: str
    silo: str
    seconds: float


class WeaveSkip(_Part):
    domain: str
    round: int
    module: str
    reason: str


class WeaveState(_Part):
    """Weaving progress (server/weaving.py): rounds done, which silo last trained each module, every hop."""

    rounds: int = 0
    epochs: int
    holders: dict[str, str]
    hops: list[WeaveHop] = []
    skipped: list[WeaveSkip] = []


class FedRound(_Part):
    """The global model after `round` rounds (rounds/<round>.safetensors; 0 = the starting model)."""

    round: int
    val: dict[str, dict] = {}  # domain -> that model's held-out validation AggregateMetrics (as a dict)
    users: dict[str, int] = {}  # domain -> users it trained on in the round that made this model (its weight)
    loss: dict[str, float | None] = {}
    seconds: dict[str, float] = {}
    up: dict[str, int] = {}  # domain -> bytes it sent in that round (its update)
    down: dict[str, int] = {}  # domain -> bytes sent to it (the global model)


class FedAvgState(_Part):
    """Federated averaging progress (server/fedavg.py)."""

    init: str  # "base", or the merged candidate the hybrid started from
    init_val: dict[str, float | None] = {}  # hybrid: each merged candidate's mean held-out validation NDCG@10
    rounds: list[FedRound] = []
    chosen: int | None = None  # the round shipped: best mean held-out validation NDCG@10


class Checkpoint(_Part):
    """The whole run state. Stages change it in place; `RunDir.save` writes it."""

    version: Literal[1] = 1
    config: str
    stage_configs: dict[str, str] = {}
    completed: list[str] = []
    domains: list[str] = []  # every silo that passed the first handshake (sorted)
    dropped: list[Dropped] = []
    timings: dict[str, float] = {}
    bytes: dict[str, SiloBytes] = {}
    val: dict[str, dict] = {}  # domain -> its fine-tuning reply's validation AggregateMetrics (as a dict)
    finetune: dict[str, SiloFinetune] = {}
    files: dict[str, str] = {}  # path relative to the run directory -> SHA-256
    merges: dict[str, list[str]] = {}  # stored merge (merges/<name>.safetensors) -> the domains it merged
    weave: WeaveState | None = None
    fedavg: FedAvgState | None = None

    @field_validator("weave", mode="before")
    @classmethod
    def _no_weave(cls, v):
        return v or None  # checkpoints written before the typed state stored {} for "no weave"

    def active(self) -> list[str]:
        """The silos still in the run: passed the handshake and not dropped."""
        dropped = {d.domain for d in self.dropped}
        return [d for d in self.domains if d not in dropped]

    def is_dropped(self, domain: str, stage: str | None = None) -> bool:
        return any(d.domain == domain and stage in (None, d.stage) for d in self.dropped)

    def add_time(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 3)

    def count_bytes(self, domain: str, down: int, up: int) -> None:
        b = self.bytes.setdefault(domain, SiloBytes())
        b.sent_to_silo += down
        b.received_from_silo += up


def _dump(cfg) -> dict:
    """The config as fingerprinted: LoRA, weaving and DP fields are left out while off (finetune = full,
    weave-rounds = 0, dp-epsilon unset), so run directories made before those options existed still resume."""
    dump = cfg.model_dump(mode="json")
    if dump["train"].get("dp_epsilon") is None:
        for k in ("dp_epsilon", "dp_delta", "dp_clip"):
            dump["train"].pop(k, None)
    if dump["train"].get("finetune") == "full":
        for k in ("finetune", "lora_rank", "lora_alpha", "lora_targets"):
            dump["train"].pop(k, None)
    if not dump.get("weave_rounds"):
        for k in ("weave_rounds", "weave_epochs"):
            dump.pop(k, None)
    if dump.get("strategy", "mergerec") == "mergerec":
        for k in ("strategy", "fedavg"):
            dump.pop(k, None)
    return dump


def stage_fingerprints(cfg) -> dict[str, str]:
    dump = _dump(cfg)
    everywhere = set(dump) - NO_EFFECT - set().union(*_OWN.values())
    out = {}
    for stage in _OWN:
        fields = set(_OWN["finetune"]) | _OWN[stage] | everywhere
        for dep in _READS.get(stage, []):
            fields |= _OWN[dep]
        text = json.dumps({k: dump[k] for k in sorted(fields) if k in dump}, sort_keys=True)
        out[stage] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return out


def load(path: Path, cfg) -> Checkpoint:
    """The checkpoint (fresh if there is none), with stages invalidated by a config change removed."""
    fps = stage_fingerprints(cfg)
    if not path.exists():
        return Checkpoint(config=cfg.fingerprint(), stage_configs=fps)
    try:
        ck = Checkpoint.model_validate_json(path.read_text())
    except (ValidationError, ValueError, OSError) as exc:
        kind = type(exc).__name__
        raise CheckpointError(f"{path} is damaged or not a checkpoint of this version ({kind}): restore it, or "
                              "use a new run directory") from None
    if ck.config == cfg.fingerprint():
        ck.stage_configs = fps
        return ck
    old = ck.stage_configs
    if not old:  # written before stages had their own fingerprints: any change may affect any stage
        raise CheckpointError(f"run directory {path.parent} belongs to a run with another configuration "
                              f"({ck.config} != {cfg.fingerprint()}): use a new run directory")
    changed = [s for s in _OWN if old.get(s) != fps[s]]
    if "finetune" in changed:
        raise CheckpointError(f"run directory {path.parent} belongs to a run with another configuration "
                              f"({ck.config} != {cfg.fingerprint()}) that changes fine-tuning: use a new run "
                              "directory")
    redo = [s for s in changed if s in ck.completed]
    if redo:
        log.info("configuration changed: redoing stage(s) %s", ", ".join(redo))
    invalidate(ck, path.parent, redo)
    ck.config, ck.stage_configs = cfg.fingerprint(), fps
    return ck


def invalidate(ck: Checkpoint, run_dir: Path, stages: list[str]) -> None:
    """Forget completed stages; a redone teacher stage needs its files gone (it skips silos that have one)."""
    ck.completed = [s for s in ck.completed if s not in stages]
    if "teacher" in stages or "pseudo_users" in stages:
        for f in (run_dir / "teacher").glob("*.npz"):
            f.unlink()
            ck.files.pop(f"teacher/{f.name}", None)


def stage_of(rel: str) -> str:
    """The stage that writes the run-directory file `rel` ("" for files no stage reads back)."""
    if rel.startswith("merges/"):  # stored merges: the learned ones come from the coefficients stage
        return "coefficients" if rel.startswith("merges/mergerec-") else "merge_init"
    return {"task_vectors": "finetune", "lora": "finetune", "woven": "weave", "teacher": "teacher",
            "pseudo_users.json": "pseudo_users", "coefficients.json": "coefficients", "integration": "integration",
            "integration.json": "integration", "rounds": "fedavg", "metrics.json": "evaluate",
            "metrics_val.json": "evaluate"}.get(rel.split("/")[0], "")


def verify(ck: Checkpoint, run_dir: Path, expected: list[str], check: Callable[[str, Path], None],
           sha256: Callable[[Path], str]) -> None:
    """Every file in `expected` (relative paths of completed stages' outputs) must exist, hash as recorded and
    pass `check(rel, path)` (raises on a bad file). A bad file is removed and its stage, and every later
    stage, is redone (a stored merge is only forgotten: it is recomputed when next needed)."""
    for rel in expected:
        stage = stage_of(rel)
        if stage not in ck.completed:
            continue
        path = run_dir / rel
        problem = None
        if not path.exists():
            problem = "missing"
        elif rel in ck.files and sha256(path) != ck.files[rel]:
            problem = "changed since it was written (SHA-256 differs)"
        else:
            try:
                check(rel, path)
            except Exception as exc:  # any reader error: a damaged file
                problem = f"unreadable or invalid ({type(exc).__name__}: {str(exc)[:120]})"
        if problem is None:
            continue
        path.unlink(missing_ok=True)
        ck.files.pop(rel, None)
        if rel.startswith("merges/"):
            log.error("stored merge %s is %s: it is recomputed", path, problem)
            ck.merges.pop(Path(rel).stem, None)
            continue
        log.error("stored file %s is %s: stage %s is redone for it", path, problem, stage)
        later = STAGES[STAGES.index(stage):]
        if stage == "finetune":  # that silo's teacher file (and task vector) came from the model being redone
            for other in (f"teacher/{Path(rel).stem}.npz", f"task_vectors/{Path(rel).stem}.safetensors"):
                (run_dir / other).unlink(missing_ok=True)
                ck.files.pop(other, None)
        ck.completed = [s for s in ck.completed if s not in later]
        if stage == "pseudo_users":
            invalidate(ck, run_dir, ["teacher"])
