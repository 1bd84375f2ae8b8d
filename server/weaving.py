"""LoRA task vectors on the server, and weaving (data-isolated WeaveRec) between fine-tuning and merging.

LoRA (run-config finetune = lora): a silo's FinetuneReply carries LoRA factors, not a dense task vector. The
server stores the factors (`lora/<domain>.safetensors`) and *materialises* the ordinary task vector
``delta = (alpha / r) * B @ A`` (zeros outside the targets) into `task_vectors/<domain>.safetensors`: every
merge method (task arithmetic, TIES, DARE, breadcrumbs, MergeRec task- and layer-wise) then runs unchanged.
Sparsifying merges see the dense delta, not the factors; that is the point (one code path for every method).

Weaving (weave-rounds = R > 0): each domain's LoRA module travels a fixed ring of the silos (sorted domain
names). In round r every module moves to the next live silo after the one that last trained it, which trains
it `weave-epochs` epochs on its own train + validation items starting from base + module and returns the
updated factors (WeaveRequest / WeaveReply, validated like a fine-tuning reply). A module never hops onto the
silo that holds it; one silo trains at most one module per call, so a round is one call when all are live.
A silo that fails a hop (error, invalid reply, no reply) is out of the weave: the module keeps its factors and
moves on to the next live silo in the same round; the silo itself stays in the run (its teacher and
evaluation are unaffected). After R rounds the woven modules (`woven/<domain>.safetensors`) replace the task
vectors for merging (`woven_task_vectors`). Each round is checkpointed: a resumed run continues after the last
stored round (from scratch when a stored module is missing or changed, or weave-epochs changed).

Privacy: a hop shows domain d's LoRA module to another silo (as merged models are shown to every silo); no
user data moves, and every hop's messages go through the same contracts and recorded-message checks.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy

from common.core.files import atomic_path
from common.protocol.messages import WEAVE, WeaveReply, WeaveRequest
from server import checkpoint
from server.limits import stage_timeout
from server.validation import check_weave

log = logging.getLogger("server.pipeline")


def lora_spec(cfg, shapes: dict):
    """The run's LoraSpec (finetune = lora), else None; a bad lora-targets pattern stops the run before any
    silo is contacted, naming the key."""
    from common.model.lora import LoraSpec
    from server.silo_caller import PipelineError

    if cfg.train.finetune != "lora":
        return None
    try:
        return LoraSpec(cfg.train, shapes)
    except ValueError as exc:
        raise PipelineError(f"bad run-config: {exc}") from None


def lora_path(p, domain: str):
    return p.run_dir / "lora" / f"{domain}.safetensors"


def woven_path(p, domain: str):
    return p.run_dir / "woven" / f"{domain}.safetensors"


def _save(p, path, named: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        save_numpy({n: np.ascontiguousarray(a) for n, a in named.items()}, str(tmp))
    p._record(path)


def received_task_vector(p, d: str, o) -> dict[str, torch.Tensor]:
    """The task vector of a validated FinetuneReply (LoRA: factors stored, delta materialised); records the
    upload bytes next to what a dense task vector would take. A new fine-tuning result voids any weave state."""
    from common.merging.task_vectors import state_from_numpy

    info = {"upload_bytes": o.bytes_up, "dense_task_vector_bytes": p.base_bytes}
    p.state["finetune"].setdefault(d, {}).update(info)
    if p.lora is None:
        return state_from_numpy(o.arrays["task_vector"])
    _save(p, lora_path(p, d), o.arrays["lora"])
    p.state.pop("weave", None)
    return p.lora.materialise(o.arrays["lora"], p.base_state)


def woven_task_vectors(p, domains: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The woven modules of `domains`, materialised as task vectors (after the weave stage)."""
    return {d: p.lora.materialise(load_numpy(str(woven_path(p, d))), p.base_state) for d in domains}


def _next_live(ring: list[str], live: set[str], after: str) -> str | None:
    i = ring.index(after)
    return next((ring[(i + k) % len(ring)] for k in range(1, len(ring) + 1) if ring[(i + k) % len(ring)] in live),
                None)


def _resume(p, ring: list[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """(weave state, modules): continue a stored weave when its files are intact, else start from lora/."""
    st = p.state.get("weave")
    if st and st.get("epochs") == p.cfg.weave_epochs and st.get("rounds", 0) <= p.cfg.weave_rounds:
        rels = [str(woven_path(p, d).relative_to(p.run_dir)) for d in ring]
        if all((p.run_dir / r).exists() and p.state["files"].get(r) == checkpoint.sha256(p.run_dir / r) for r in rels):
            log.info("weave: resuming after round %d", st["rounds"])
            return st, {d: load_numpy(str(woven_path(p, d))) for d in ring}
    st = {"rounds": 0, "epochs": p.cfg.weave_epochs, "holders": {d: d for d in ring}, "hops": [], "skipped": []}
    p.state["weave"] = st
    return st, {d: load_numpy(str(lora_path(p, d))) for d in ring}


def _hop(p, r: int, batch: dict[str, str], modules: dict, st: dict) -> dict[str, str | None]:
    """One call: module -> silo (distinct silos). Returns module -> None (accepted) or the failure reason."""
    reqs = {s: (WeaveRequest(base=p.spec, train=p.cfg.train, module=m, round=r, epochs=p.cfg.weave_epochs),
                {"lora": modules[m]}) for m, s in batch.items()}
    by_handle = {p.calls.handles[s]: s for s in reqs if s in p.calls.handles}
    timeout = stage_timeout("finetune", p.cfg.timeout_s, max_items=max(map(len, p.catalogs.values()), default=0),
                            epochs=p.cfg.weave_epochs, refit=False)
    outcomes = p.t.call(WEAVE, {h: reqs[s] for h, s in by_handle.items()}, WeaveReply, timeout)
    got = {by_handle[h]: o for h, o in outcomes.items() if h in by_handle}
    result = {}
    for m, s in batch.items():
        o = got.get(s)
        err = "silo not connected" if s not in by_handle.values() else "no reply" if o is None else o.error
        if o is not None:
            p.calls.count(o, s)
        if err is None:
            try:
                check_weave(o.header, o.arrays, domain=s, base_fp=p.base_fp, module=m, round_=r, lora=p.lora,
                            base_state=p.base_state, base_norm=p.base_norm, max_ratio=p.cfg.max_task_vector_ratio)
            except Exception as exc:  # a bad reply is that silo's failure, never a crash
                err = f"invalid reply: {exc}" if isinstance(exc, ValueError) else f"invalid reply: {type(exc).__name__}"
        if err is None:
            modules[m] = o.arrays["lora"]
            st["hops"].append({"round": r, "module": m, "silo": s, "seconds": round(o.header.seconds, 2)})
            log.info("weave: round %d, module %s trained by silo %s", r, m, s)
        else:
            log.warning("weave: round %d, silo %s failed on module %s: %s; it is out of the weave", r, s, m, err)
            st["skipped"].append({"domain": s, "round": r, "module": m, "reason": err})
        result[m] = err
    return result


def _round(p, r: int, ring: list[str], modules: dict, st: dict) -> None:
    """Every module one hop further along the ring (skipping silos out of the weave); then checkpointed."""
    out = {x["domain"] for x in st["skipped"]}
    live = {s for s in ring if s not in out and s in p.active()}
    cursor, pending = dict(st["holders"]), set(modules)
    while pending:
        batch: dict[str, str] = {}
        for m in sorted(pending):
            target = _next_live(ring, live, cursor[m])
            if target is None or target == st["holders"][m]:
                pending.discard(m)  # nowhere else to go this round: the module stays
            elif target not in batch.values():
                batch[m] = target
        for m, err in (_hop(p, r, batch, modules, st) if batch else {}).items():
            if err is None:
                st["holders"][m] = batch[m]
                pending.discard(m)
            else:
                live.discard(batch[m])
                cursor[m] = batch[m]
    for d in ring:
        _save(p, woven_path(p, d), modules[d])
    st["rounds"] = r
    p._save()


def run_weave(p) -> None:
    """The weave stage (see the module docstring); a no-op when weave-rounds is 0."""
    if not p.cfg.weave_rounds:
        return
    t0 = time.perf_counter()
    ring = sorted(p.active())
    st, modules = _resume(p, ring)
    for r in range(st["rounds"] + 1, p.cfg.weave_rounds + 1):
        _round(p, r, ring, modules, st)
    log.info("weave: %d round(s), %d hop(s), %d silo(s) skipped in %.1fs", st["rounds"], len(st["hops"]),
             len({x["domain"] for x in st["skipped"]}), time.perf_counter() - t0)
