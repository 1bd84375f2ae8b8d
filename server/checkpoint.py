"""The run directory's checkpoint: a versioned pydantic model, a config fingerprint per stage, and the SHA-256
of every file a later stage or a resume reads back.

- A changed configuration redoes only the stages it affects (e.g. a new eval-max-users redoes the evaluation,
  nothing else); a change that affects fine-tuning (backbone, training, seed) needs a new run directory.
- On resume every stored file of a completed stage is checked (present, same SHA-256, and for task vectors
  and teacher files the same checks as a fresh reply); a damaged or edited file is named in the log and
  removed, and the stage that made it is redone (for per-silo files: only for that silo).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger(__name__)

STAGES = ["handshake", "finetune", "weave", "merge_init", "pseudo_users", "teacher", "coefficients", "integration",
          "evaluate", "artifacts"]

# the PipelineConfig fields each stage's output depends on (its own and those of the stages it reads from);
# fields listed nowhere and not in NO_EFFECT count for every stage
_OWN = {"finetune": {"backbone", "train", "seed"}, "weave": {"weave_rounds", "weave_epochs"},
        "merge_init": {"baselines"},
        "pseudo_users": {"pseudo_users", "pseudo_users_n"}, "teacher": {"teacher_top_k"},
        "coefficients": {"init_method", "granularities", "coefficients"}, "integration": {"integration"},
        "evaluate": {"baselines", "eval_max_users", "evaluate_finetuned"}}
_READS = {"merge_init": ["weave"], "teacher": ["pseudo_users"], "coefficients": ["teacher", "pseudo_users", "weave"],
          "integration": ["coefficients", "teacher", "pseudo_users", "weave"],
          "evaluate": ["integration", "coefficients", "teacher", "pseudo_users", "weave"]}
NO_EFFECT = {"min_silos", "retries", "timeout_s", "max_task_vector_ratio", "catalog_root"}


class CheckpointError(RuntimeError):
    """checkpoint.json cannot be used; the message names the file and what to do."""


class Dropped(BaseModel):
    domain: str
    stage: str
    reason: str


class Checkpoint(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: Literal[1] = 1
    config: str
    stage_configs: dict[str, str] = {}
    completed: list[str] = []
    domains: list[str] = []
    dropped: list[Dropped] = []
    timings: dict[str, float] = {}
    bytes: dict[str, dict[str, int]] = {}
    val: dict[str, dict] = {}
    finetune: dict[str, dict] = {}
    files: dict[str, str] = {}  # path relative to the run directory -> SHA-256
    merges: dict[str, list[str]] = {}  # stored merge (merges/<name>.safetensors) -> the domains it merged
    weave: dict = {}  # weaving progress (server/weaving.py): rounds done, holders, hops, skipped silos


def _dump(cfg) -> dict:
    """The config as fingerprinted: LoRA and weaving fields are left out while off (finetune = full,
    weave-rounds = 0), so run directories made before those options existed still resume."""
    dump = cfg.model_dump(mode="json")
    if dump["train"].get("finetune") == "full":
        for k in ("finetune", "lora_rank", "lora_alpha", "lora_targets"):
            dump["train"].pop(k, None)
    if not dump.get("weave_rounds"):
        for k in ("weave_rounds", "weave_epochs"):
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


def load(path: Path, cfg) -> dict:
    """The checkpoint as a dict (fresh if there is none), with stages invalidated by a config change removed."""
    fps = stage_fingerprints(cfg)
    if not path.exists():
        return Checkpoint(config=cfg.fingerprint(), stage_configs=fps).model_dump(mode="json")
    try:
        ck = Checkpoint.model_validate_json(path.read_text())
    except (ValidationError, ValueError, OSError) as exc:
        kind = type(exc).__name__
        raise CheckpointError(f"{path} is damaged or not a checkpoint of this version ({kind}): restore it, or "
                              "use a new run directory") from None
    st = ck.model_dump(mode="json")
    if st["config"] == cfg.fingerprint():
        st["stage_configs"] = fps
        return st
    old = st["stage_configs"]
    if not old:  # written before stages had their own fingerprints: any change may affect any stage
        raise CheckpointError(f"run directory {path.parent} belongs to a run with another configuration "
                              f"({st['config']} != {cfg.fingerprint()}): use a new run directory")
    changed = [s for s in _OWN if old.get(s) != fps[s]]
    if "finetune" in changed:
        raise CheckpointError(f"run directory {path.parent} belongs to a run with another configuration "
                              f"({st['config']} != {cfg.fingerprint()}) that changes fine-tuning: use a new run "
                              "directory")
    redo = [s for s in changed if s in st["completed"]]
    if redo:
        log.info("configuration changed: redoing stage(s) %s", ", ".join(redo))
    invalidate(st, path.parent, redo)
    st["config"], st["stage_configs"] = cfg.fingerprint(), fps
    return st


def invalidate(st: dict, run_dir: Path, stages: list[str]) -> None:
    """Forget completed stages; a redone teacher stage needs its files gone (it skips silos that have one)."""
    st["completed"] = [s for s in st["completed"] if s not in stages]
    if "teacher" in stages or "pseudo_users" in stages:
        for f in (run_dir / "teacher").glob("*.npz"):
            f.unlink()
            st["files"].pop(f"teacher/{f.name}", None)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record(st: dict, run_dir: Path, path: Path) -> None:
    st["files"][str(path.relative_to(run_dir))] = sha256(path)


def stage_of(rel: str) -> str:
    if rel.startswith("merges/"):  # stored merges: the learned ones come from the coefficients stage
        return "coefficients" if rel.startswith("merges/mergerec-") else "merge_init"
    return {"task_vectors": "finetune", "lora": "finetune", "woven": "weave", "teacher": "teacher",
            "pseudo_users.json": "pseudo_users", "coefficients.json": "coefficients", "integration": "integration",
            "integration.json": "integration", "metrics.json": "evaluate",
            "metrics_val.json": "evaluate"}.get(rel.split("/")[0], "")


def verify(st: dict, run_dir: Path, expected: list[str], check) -> None:
    """Every file in `expected` (relative paths of completed stages' outputs) must exist, hash as recorded and
    pass `check(rel, path)` (raises on a bad file). A bad file is removed and its stage, and every later
    stage, is redone."""
    for rel in expected:
        stage = stage_of(rel)
        if stage not in st["completed"]:
            continue
        path = run_dir / rel
        problem = None
        if not path.exists():
            problem = "missing"
        elif rel in st["files"] and sha256(path) != st["files"][rel]:
            problem = "changed since it was written (SHA-256 differs)"
        else:
            try:
                check(rel, path)
            except Exception as exc:  # any reader error: a damaged file
                problem = f"unreadable or invalid ({type(exc).__name__}: {str(exc)[:120]})"
        if problem is None:
            continue
        path.unlink(missing_ok=True)
        st["files"].pop(rel, None)
        if rel.startswith("merges/"):  # a stored merge is recomputed from the task vectors when next needed
            log.error("stored merge %s is %s: it is recomputed", path, problem)
            st.get("merges", {}).pop(Path(rel).stem, None)
            continue
        log.error("stored file %s is %s: stage %s is redone for it", path, problem, stage)
        later = STAGES[STAGES.index(stage):]
        if stage == "finetune":  # that silo's teacher file (and task vector) came from the model being redone
            for other in (f"teacher/{Path(rel).stem}.npz", f"task_vectors/{Path(rel).stem}.safetensors"):
                (run_dir / other).unlink(missing_ok=True)
                st["files"].pop(other, None)
        st["completed"] = [s for s in st["completed"] if s not in later]
        if stage == "pseudo_users":
            invalidate(st, run_dir, ["teacher"])


def verify_run(p) -> None:
    """On resume (after the handshake): every stored file of a completed stage of pipeline `p` is checked."""
    done, st = p.state["completed"], p.state
    expected = list(st["files"])
    if "finetune" in done:
        expected += [str(p._tv_path(d).relative_to(p.run_dir)) for d in p.active()]
        if p.lora is not None:
            expected += [f"lora/{d}.safetensors" for d in p.active()]
    if "weave" in done and p.cfg.weave_rounds:
        expected += [f"woven/{d}.safetensors" for d in p.active()]
    if "teacher" in done:
        expected += [str(p._teacher_path(d).relative_to(p.run_dir)) for d in p.active()]
    expected += [f for f, s in (("pseudo_users.json", "pseudo_users"), ("coefficients.json", "coefficients"),
                                ("metrics.json", "evaluate")) if s in done]
    # metrics_val.json is checked when recorded (runs from before it existed have none)
    verify(st, p.run_dir, list(dict.fromkeys(expected)), lambda rel, path: _check_file(p, rel, path))
    p._save()


def _check_file(p, rel: str, path: Path) -> None:
    """The checks a fresh reply gets (server/validation.py), on a stored file; JSON files must parse."""
    import numpy as np
    from safetensors.numpy import load_file

    from server.validation import check_lora_module, check_task_vector, check_teacher_top, expected_k

    if rel.startswith(("lora/", "woven/")):
        check_lora_module(load_file(str(path)), p.lora, p.base_state, p.base_norm, p.cfg.max_task_vector_ratio,
                          f"stored {rel}")
    elif rel.startswith("task_vectors/"):
        check_task_vector(load_file(str(path)), p.shapes, p.base_norm, p.cfg.max_task_vector_ratio, f"stored {rel}")
    elif rel.startswith("teacher/") and path.stem in p.catalogs:
        chosen = json.loads((p.run_dir / "pseudo_users.json").read_text())
        with np.load(path, allow_pickle=False) as z:
            named = {k: z[k] for k in z.files}
        n = len(p.catalogs[path.stem])
        check_teacher_top(named, len(chosen[path.stem]), n, expected_k(p.cfg.teacher_top_k, n))
    elif rel.startswith("merges/"):
        stored = load_file(str(path))
        if {n: a.shape for n, a in stored.items()} != p.shapes or not all(np.isfinite(a).all() for a in stored.values()):
            raise ValueError("not a finite state of the base's shapes")
    elif rel.startswith("integration/"):  # the integrated model: finite, and loadable as its spec says
        from common.model.integration import IntegratedRecommender, load_exact
        from common.protocol.messages import IntegratedSpec

        spec = IntegratedSpec(**json.loads((p.run_dir / "integration.json").read_text())["spec"])
        load_exact(IntegratedRecommender.skeleton(p.base, spec), load_file(str(path)))
        if not all(np.isfinite(a).all() for a in load_file(str(path)).values()):
            raise ValueError("non-finite parameters")
    elif rel.endswith(".json"):
        json.loads(path.read_text())
