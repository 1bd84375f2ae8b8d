"""Server-side checks of every silo reply, run before anything of it is stored (and again on stored files
when a run resumes). Each check raises ContractError; the pipeline treats that as the silo's failure
(retry, then drop, with the reason in report.json).

Error texts name only what the server already knows (its own parameter names, counts, the request's
values): a reply may hold anything, and these texts go to the server's log and report.

Ranges: the message models bound every number (common/protocol/messages.py); the checks here bound it against
the request and the handshake: user counts <= the silo's handshake count (and the request's max-users),
epochs <= the request's, teacher values cosines in [-1, 1] (+- TEACHER_TOLERANCE, float16 rounding).
"""

from __future__ import annotations

import math

import numpy as np

from common.protocol.messages import (
    AggregateMetrics,
    ContractError,
    EvaluateReply,
    FedRoundReply,
    FinetuneReply,
    GateTuneReply,
    TEACHER_TOLERANCE,
    TeacherReply,
    WeaveReply,
    check_state_arrays,
    check_teacher_arrays,
)
from common.merging.teacher import teacher_k
from common.model.metrics import DEFAULT_KS

METRIC_KEYS = frozenset(f"{m}@{k}" for m in ("recall", "ndcg") for k in DEFAULT_KS)


def state_norm(named) -> float:
    """L2 norm over every parameter, in float64 (a float32 sum of squares overflows for huge entries). An
    elementwise square and sum, not a BLAS dot: OpenBLAS's thread pool has been seen to hang the ServerApp
    inside `np.dot` in Flower's simulation runtime on a loaded machine."""
    total = 0.0
    for a in named.values():
        total += float(np.square(np.asarray(a, dtype=np.float64)).sum())
    return math.sqrt(total)


def check_task_vector(named, shapes: dict, base_norm: float, max_ratio: float, what: str) -> None:
    """Names, shapes, float32, finite (check_state_arrays) and ||tau|| <= max_ratio * ||theta_base||."""
    check_state_arrays(named, shapes, what)
    norm = state_norm(named)
    if not math.isfinite(norm) or norm > max_ratio * base_norm:
        raise ContractError(f"{what}: norm {norm:.3g} exceeds {max_ratio:g} x the base model's norm "
                            f"{base_norm:.3g} (max-task-vector-ratio)")


def _same(got: str, want: str, field: str) -> None:
    if got != want:
        raise ContractError(f"{field} differs from the handshake's (expected {want[:16]})")


def check_lora_module(named, spec, base_state: dict, base_norm: float, max_ratio: float, what: str) -> None:
    """A LoRA module (common/model/lora.py): exactly the expected factor names, float32, shapes [r, in] / [out, r],
    finite; and its materialised delta within the task-vector norm bound (max-task-vector-ratio)."""
    from common.model.lora import check_factors

    check_factors(named, spec.shapes, what)
    norm = state_norm(spec.materialise(named, base_state))
    if not math.isfinite(norm) or norm > max_ratio * base_norm:
        raise ContractError(f"{what}: norm {norm:.3g} exceeds {max_ratio:g} x the base model's norm "
                            f"{base_norm:.3g} (max-task-vector-ratio)")


def _finite(reply, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(reply, name)
        if not math.isfinite(v) or v < 0:
            raise ContractError(f"{name} must be finite and >= 0")


def check_epochs(reply, train) -> None:
    """A fine-tuning's epochs within the request's TrainConfig: selection epochs and every history entry <=
    train.epochs (one entry per epoch plus the starting weights), the final fit <= its bound."""
    refit_max = train.epochs if train.final_fit_epochs is None else train.final_fit_epochs
    if reply.epochs > train.epochs or reply.refit_epochs > refit_max:
        raise ContractError(f"epochs must be <= {train.epochs} and refit_epochs <= {refit_max} (the request's)")
    if len(reply.history) > train.epochs + 1 or any(h.epoch > train.epochs for h in reply.history):
        raise ContractError(f"history must hold at most one entry per epoch 0..{train.epochs}")


def check_dp(dp, train, users: int | None) -> None:
    """A fine-tuning reply's DP guarantee against the request: present exactly when train.dp_epsilon is set, epsilon
    within the target, the request's clip (and delta when given), steps <= planned, users <= the handshake's."""
    if train.dp_epsilon is None:
        if dp is not None:
            raise ContractError("dp must be absent: the request asked for no DP fine-tuning")
        return
    if dp is None:
        raise ContractError("dp is missing: the request asked for DP fine-tuning (dp-epsilon)")
    if dp.target_epsilon != train.dp_epsilon or dp.epsilon > train.dp_epsilon * (1 + 1e-9):
        raise ContractError(f"dp: epsilon must be <= the request's target {train.dp_epsilon:g}")
    if dp.clip != train.dp_clip or (train.dp_delta is not None and dp.delta != train.dp_delta):
        raise ContractError("dp: clip and delta must be the request's")
    if dp.steps > dp.planned_steps or (users is not None and dp.users > users):
        raise ContractError("dp: steps must be <= planned_steps and users <= the silo's user count")


def check_finetune(reply: FinetuneReply, arrays, *, domain: str, base_fp: str, shapes: dict, base_norm: float,
                   max_ratio: float, lora=None, base_state: dict | None = None, train=None,
                   users: int | None = None) -> None:
    """`lora`: the run's LoraSpec when finetune = lora (the reply must then carry factors), else None; `train`:
    the request's TrainConfig (epoch bounds); `users`: the silo's handshake user count."""
    _same(reply.domain, domain, "domain")
    _same(reply.base_fingerprint, base_fp, "base fingerprint")
    _finite(reply, ("seconds", "epochs", "refit_epochs"))
    if train is not None:
        check_epochs(reply, train)
        check_dp(reply.dp, train, users)
    check_metrics(reply.val, "validation metrics", users)
    if reply.mode != ("full" if lora is None else "lora"):
        raise ContractError(f"mode must be {'full' if lora is None else 'lora'} (the run's finetune)")
    if lora is None:
        check_task_vector(arrays["task_vector"], shapes, base_norm, max_ratio, f"task vector of {domain}")
    else:
        check_lora_module(arrays["lora"], lora, base_state, base_norm, max_ratio, f"LoRA module of {domain}")


def check_weave(reply: WeaveReply, arrays, *, domain: str, base_fp: str, module: str, round_: int, lora,
                base_state: dict, base_norm: float, max_ratio: float, epochs: int | None = None) -> None:
    """A weaving hop's reply: the silo and module asked, its base, the round, epochs <= the request's, finite
    numbers, a valid module."""
    _same(reply.domain, domain, "domain")
    _same(reply.base_fingerprint, base_fp, "base fingerprint")
    if reply.module != module or reply.round != round_:
        raise ContractError(f"module/round differ from the request's ({module}, round {round_})")
    if epochs is not None and reply.epochs > epochs:
        raise ContractError(f"epochs must be <= the request's {epochs}")
    _finite(reply, ("seconds", "epochs"))
    check_lora_module(arrays["lora"], lora, base_state, base_norm, max_ratio, f"module {module} from {domain}")


def check_round(reply: FedRoundReply, arrays, *, domain: str, base_fp: str, round_: int, epochs: int, shapes: dict,
                base_norm: float, max_ratio: float, users: int | None = None) -> None:
    """A FedAvg round's reply: the silo, base, round and epochs asked; finite aggregates; user counts <= `users`
    (the handshake's); with epochs > 0 a user count to weigh by and an update of the model's exact shapes within
    the task-vector norm bound."""
    _same(reply.domain, domain, "domain")
    _same(reply.base_fingerprint, base_fp, "base fingerprint")
    if reply.round != round_ or reply.epochs != epochs:
        raise ContractError(f"round/epochs differ from the request's ({round_}, {epochs})")
    check_metrics(reply.val, "validation metrics", users)
    if users is not None and reply.users > users:
        raise ContractError(f"users exceeds the silo's {users} users (its handshake)")
    if epochs > 0:
        if reply.users < 1:
            raise ContractError("users must be at least 1 after a training round")
        check_task_vector(arrays["update"], shapes, base_norm, max_ratio, f"update of {domain}")


def check_gate(reply: GateTuneReply, *, domain: str, epochs: int, users: int | None = None) -> None:
    """A gate-tuning reply (X-Cross's new domain): the silo asked, epochs <= the request's, and before / after
    test aggregates each checked as check_metrics (user counts <= `users`, the silo's handshake count when it
    has one) and over the same users (the silo's fixed test subsample scores both)."""
    _same(reply.domain, domain, "domain")
    _finite(reply, ("seconds", "epochs"))
    if reply.epochs > epochs:
        raise ContractError(f"epochs must be <= the request's {epochs}")
    check_metrics(reply.before, "before", users)
    check_metrics(reply.after, "after", users)
    if reply.before.users != reply.after.users:
        raise ContractError("before and after must be over the same users (the silo's fixed test subsample)")


def check_metrics(m: AggregateMetrics, what: str, users: int | None = None) -> None:
    """The fixed metric names, rates in [0, 1], and (given `users`, the silo's handshake count, or the request's
    max-users when smaller) an aggregate over at most that many users."""
    if set(m.values) != METRIC_KEYS:
        raise ContractError(f"{what}: metric names must be exactly {sorted(METRIC_KEYS)}")
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in m.values.values()):
        raise ContractError(f"{what}: metric values must be finite and in [0, 1]")
    if users is not None and m.users > users:
        raise ContractError(f"{what}: a user count above {users} (the silo's users, or the request's max-users)")


def check_teacher(reply: TeacherReply, arrays, *, domain: str, pseudo_item_ids: list[int], num_items: int,
                  top_k: int | None, exclude_own: bool) -> None:
    """A teacher reply: its domain, catalog size, k; its arrays (check_teacher_top); and with `exclude_own` no row
    targets its own pseudo-user's item (the student leaves that item out: a target there would be an infinite
    loss)."""
    _same(reply.domain, domain, "domain")
    if reply.num_items != num_items:
        raise ContractError(f"num_items differs from the catalog's {num_items}")
    k = teacher_k(top_k, num_items, exclude_own)
    if reply.k != k:
        raise ContractError(f"k must be {k} (top-k asked {top_k}, catalog of {num_items} items)")
    check_teacher_rows(arrays["teacher"], pseudo_item_ids, num_items, k, exclude_own)


def check_teacher_rows(named, pseudo_item_ids: list[int], num_items: int, k: int, exclude_own: bool) -> None:
    """Teacher top-k arrays for `pseudo_item_ids` (fresh or stored): check_teacher_top, and with `exclude_own`
    no row targets its own pseudo-user's item."""
    check_teacher_top(named, len(pseudo_item_ids), num_items, k)
    if exclude_own and (named["indices"] == np.asarray(pseudo_item_ids).reshape(-1, 1)).any():
        raise ContractError("teacher rows must not target their own pseudo-user's item (seen-items exclude)")


def check_teacher_top(named, rows: int, num_items: int, k: int) -> None:
    """Shapes, dtypes, index range; finite values sorted descending per row; no repeated index in a row."""
    if k > num_items:
        raise ContractError(f"k {k} exceeds the catalog's {num_items} items")
    check_teacher_arrays(named, rows, num_items, k)
    idx, val = named["indices"], named["values"]
    if not np.isfinite(val).all():
        raise ContractError("teacher values must be finite")
    if (np.abs(val.astype(np.float32)) > 1.0 + TEACHER_TOLERANCE).any():
        raise ContractError(f"teacher values must be cosines in [-1, 1] (+- {TEACHER_TOLERANCE:g})")
    if k > 1 and (np.diff(val, axis=1) > 0).any():
        raise ContractError("teacher values must be sorted descending in every row")
    if k > 1 and (np.diff(np.sort(idx, axis=1), axis=1) == 0).any():
        raise ContractError("teacher indices repeat within a row")


def check_evaluate(reply: EvaluateReply, arrays, *, domain: str, models: list[str], users: int | None = None) -> None:
    """Metrics for exactly the models asked, each over at most `users` users (the silo's handshake count)."""
    _same(reply.domain, domain, "domain")
    missing = sorted(set(models) - set(reply.metrics))
    unasked = len(set(reply.metrics) - set(models))
    if missing or unasked:
        raise ContractError(f"metrics must cover exactly the models asked for: missing {missing[:3]}, "
                            f"{unasked} not asked for")
    for name in models:
        check_metrics(reply.metrics[name], f"metrics of {name}", users)


def check_config(cfg) -> None:
    """Names the pydantic types cannot check: merge methods against the registry, the init method's
    coefficient default, duplicates. Messages start with the run-config key (server/config.py)."""
    from common.merging import methods as merge_methods
    from common.model.coefficients import DEFAULT_INIT

    known = merge_methods.method_names()
    bad = [b for b in cfg.baselines if b not in known]
    if bad:
        raise ValueError(f"baselines: unknown merge method(s) {bad}; known: {known}")
    if len(set(cfg.baselines)) != len(cfg.baselines):
        raise ValueError("baselines: a method is listed twice")
    if cfg.init_method not in known:
        raise ValueError(f"init-method: unknown merge method {cfg.init_method!r}; known: {known}")
    if cfg.coefficients.init is None and cfg.init_method not in {*DEFAULT_INIT, "weight_average"}:
        raise ValueError(f"init-method: {cfg.init_method!r} has no default coefficient init; "
                         f"use one of {sorted({*DEFAULT_INIT, 'weight_average'})}")
    if len(set(cfg.granularities)) != len(cfg.granularities):
        raise ValueError("granularities: a granularity is listed twice")
    if cfg.train.dp_epsilon is not None and (cfg.weave_rounds or cfg.strategy == "fedavg"):
        raise ValueError("dp-epsilon: DP-SGD covers one-shot fine-tuning only; weaving and federated rounds would "
                         "train without it (set weave-rounds = 0 and strategy = mergerec)")
    if cfg.weave_rounds and cfg.train.finetune != "lora":
        raise ValueError("weave-rounds: weaving moves LoRA modules; set finetune = lora (or weave-rounds = 0)")
    if cfg.strategy == "fedavg":
        if cfg.train.finetune != "full":
            raise ValueError("strategy: federated averaging trains every parameter; set finetune = full")
        if cfg.train.val_max_users is None:
            raise ValueError("strategy: federated averaging picks its round on held-out users; set val-max-users")
        if cfg.fedavg.init == "base" and (cfg.weave_rounds or cfg.integration.kind != "none"):
            raise ValueError("strategy: fedavg from the base runs no merge stages; weave-rounds and integration "
                             "need fedavg-init = merged")

