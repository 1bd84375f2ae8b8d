"""Message contracts: everything that crosses the network between the server and a silo.

Each message = one pydantic *header* (small, JSON, in a ConfigRecord) + named groups of float/int arrays
(ArrayRecords). Both sides validate every message against these models; anything else is an error.

What may cross (method.md): down — base fingerprint, configs, pseudo-user item ids, merged weights;
up — task vectors, top-k teacher logits for pseudo-users (keyed by *item* ids the server chose), catalog
(item texts) when asked, aggregate metrics. No field here can hold a user id, a sequence or a per-user
score: metrics are `AggregateMetrics` (a fixed set of metric names + a user count, and only over at least
`MIN_USERS_FOR_METRICS` users), and arrays are checked for names, dtypes and shapes on receipt.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from common.core.errors import ContractError  # noqa: F401 (re-exported: the contracts' error)
from common.merging.task_vectors import check_state_arrays  # noqa: F401 (re-exported)
from common.merging.teacher import check_teacher_arrays  # noqa: F401 (re-exported)
from common.model.config import (  # noqa: F401 (re-exported)
    INT32_MAX,
    MAX_EPOCHS,
    MIN_USERS_FOR_METRICS,
    BackboneConfig,
    Seed,
    TrainConfig,
)
from common.model.integration import IntegratedSpec  # noqa: F401 (re-exported)
from common.model.metrics import SeenItems

_METRIC = re.compile(r"^(recall|ndcg)@\d{1,3}$")
#: a domain name as every reply carries it: nothing free-form (the server also requires its own name for the silo)
Domain = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]

# message types (Flower: "query.<name>", "train.<name>", "evaluate.<name>")
HANDSHAKE = "query.handshake"
FINETUNE = "train.finetune"
TEACHER = "query.teacher"
EVALUATE = "evaluate.merged"
WEAVE = "train.weave"
FED_ROUND = "train.round"
TUNE_GATES = "train.gates"


#: a silo's error reply codes; the server stores and logs only the code and its fixed text (`error_text`)
CONTRACT_ERROR_CODE = 100  # the request broke its contract
DATA_ERROR_CODE = 101  # the silo's own data is broken
INTERNAL_ERROR_CODE = 102  # anything else
BUDGET_ERROR_CODE = 103  # the silo's evaluation budget for this run is spent (common/protocol/eval_policy.py)
ERROR_TEXTS = {CONTRACT_ERROR_CODE: "the silo refused the request (contract)",
               DATA_ERROR_CODE: "data error at the silo (details in the silo's own log)",
               INTERNAL_ERROR_CODE: "internal error at the silo (details in the silo's own log)",
               BUDGET_ERROR_CODE: "the silo's evaluation budget for this run is spent (its eval-budget)"}
#: Flower's own error codes (flwr.common.constant.ErrorCode), for errors a SuperNode or the SuperLink reports
FLOWER_ERROR_TEXTS = {0: "unknown error", 1: "the ClientApp did not load", 2: "the ClientApp raised an exception",
                      3: "message unavailable", 4: "reply unavailable", 5: "node unavailable",
                      6: "a mod refused the message", 7: "invalid FAB", 8: "the ClientApp crashed"}
MAX_SECONDS = 7 * 24 * 3600.0  # a week: the bound of every duration in a reply
MAX_LOSS = 1e6  # a training loss (cross-entropy over a catalog) far below this
TEACHER_TOLERANCE = 1e-2  # teacher values are cosines: [-1, 1] up to float16 rounding (<= 2**-11)


def error_text(code, flower: bool = False) -> str:
    """What the server stores and logs of an error reply: its code and a fixed text, never the reply's own
    text (a silo could write anything there, another silo's name or 5 MB of user data). Capped by construction."""
    code = code if isinstance(code, int) and not isinstance(code, bool) and abs(code) < 10**9 else -1
    texts = FLOWER_ERROR_TEXTS if flower and code not in ERROR_TEXTS else ERROR_TEXTS
    return f"{'Flower' if flower else 'silo'} error {code}: {texts.get(code, 'error reply')}"


class SiloReplyError(Exception):
    """A silo's error reply: a code and a fixed text that holds no user data (clients/client_app.py)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Header(BaseModel):
    """Every message header. The configuration models requests carry (BackboneConfig, TrainConfig) and the
    bounds here (Seed, INT32_MAX, MAX_EPOCHS, MIN_USERS_FOR_METRICS) are the ones the server's run-config check
    validates (server/config.py), so a request built from a checked configuration is never refused here."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def array_groups(self) -> set[str]:
        """The exact set of array groups a message with this header carries (decode enforces it)."""
        return set()


class AggregateMetrics(Header):
    """Mean Recall@k / NDCG@k over `users` users of one split. Nothing per user."""

    users: int = Field(ge=MIN_USERS_FOR_METRICS, le=INT32_MAX, description="users averaged over; the server also "
                       "checks it against the silo's handshake count (server/validation.py)")
    values: dict[str, float] = Field(description="recall@k / ndcg@k -> a rate in [0, 1]")

    @field_validator("values")
    @classmethod
    def _names(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k in v if not _METRIC.match(k)]
        if bad:
            raise ValueError(f"only recall@k / ndcg@k may leave a silo, got {bad}")
        out_of_range = [k for k, x in v.items() if not (0.0 <= x <= 1.0)]
        if out_of_range:
            raise ValueError(f"metric values must be in [0, 1]: {out_of_range}")
        return v

    @classmethod
    def from_result(cls, result: dict[str, float]) -> "AggregateMetrics":
        """From `RankingAccumulator.result()` output."""
        values = {k: float(v) for k, v in result.items() if k != "users"}
        return cls(users=int(result["users"]), values=values)


class CatalogItem(Header):
    key: str
    title: str
    brand: str
    category: str


class BaseSpec(Header):
    """The shared pretrained model every silo starts from: how to build it, and its fingerprint. Carried by
    every request, because a silo process may be new for each message (Flower starts ClientApps on demand)."""

    backbone: BackboneConfig
    seed: Seed
    fingerprint: str


class HandshakeRequest(Header):
    base: BaseSpec
    send_catalog: bool = False


class HandshakeReply(Header):
    domain: Domain
    num_items: int = Field(gt=0, le=INT32_MAX)
    users: int = Field(ge=MIN_USERS_FOR_METRICS, le=INT32_MAX, description="the silo's users: no aggregate it "
                       "sends later may be over more")
    catalog_fingerprint: str
    base_fingerprint: str
    catalog: list[CatalogItem] | None = None

    @model_validator(mode="after")
    def _catalog_size(self):
        if self.catalog is not None and len(self.catalog) != self.num_items:
            raise ValueError(f"catalog has {len(self.catalog)} items, num_items says {self.num_items}")
        return self


class FinetuneRequest(Header):
    """Its reply's `val` and `history` are aggregates of the held-out validation users: one "val" evaluation of
    the silo's per-run budget (refused with BUDGET_ERROR_CODE beyond it)."""

    base: BaseSpec
    train: TrainConfig  # its val_max_users is at least MIN_USERS_FOR_METRICS (TrainConfig checks it)


class EpochProgress(Header):
    """One epoch of a silo's fine-tuning, aggregates only (shown in the ServerApp's log as progress)."""

    epoch: int = Field(ge=0, le=MAX_EPOCHS)
    loss: float | None = Field(None, ge=0, le=MAX_LOSS, description="mean training loss (None for epoch 0)")
    val_ndcg10: float = Field(ge=0, le=1, description="validation NDCG@10 after the epoch, a rate")


class DPGuarantee(Header):
    """A silo's user-level DP fine-tuning (common/model/dp.py): its (epsilon, delta) from the RDP accountant over
    every planned step, and the settings that reach it. Covers the task vector / LoRA factors and everything
    computed from them alone (teacher logits on pseudo-users, merges); not the aggregate metrics a silo reports."""

    epsilon: float = Field(ge=0, le=1e6)
    delta: float = Field(gt=0, lt=1)
    target_epsilon: float = Field(gt=0, le=1e6, description="the request's dp-epsilon")
    noise_multiplier: float = Field(gt=0, le=1e7, description="noise std / clip")
    clip: float = Field(gt=0, le=1e6)
    sample_rate: float = Field(gt=0, le=1, description="Poisson sampling probability of each user per step")
    users: int = Field(ge=2, le=INT32_MAX, description="training users (held-out validation users excluded)")
    planned_steps: int = Field(ge=1, le=INT32_MAX, description="steps accounted (every epoch fine-tuning may run)")
    steps: int = Field(ge=0, le=INT32_MAX, description="steps taken (early stopping: at most the planned)")
    accountant: Literal["rdp"] = "rdp"


class FinetuneReply(Header):
    """Arrays: group "task_vector" = {parameter name: float32 array} (mode "full"), or group "lora" =
    {"<target>.lora_A": float32 [r, in], "<target>.lora_B": float32 [out, r]} (mode "lora", common/model/lora.py)."""

    domain: Domain
    mode: Literal["full", "lora"] = "full"
    base_fingerprint: str
    val: AggregateMetrics  # the selection run's best epoch, on validation
    epochs: int = Field(ge=0, le=MAX_EPOCHS, description="epochs of the selection run (<= the request's)")
    refit_epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="epochs of the final fit on train + validation "
                              "items (0: best epoch sent)")
    seconds: float = Field(ge=0, le=MAX_SECONDS, description="wall-clock seconds, at most a week")
    # selection run, per epoch (and the starting weights)
    history: list[EpochProgress] = Field(default_factory=list, max_length=MAX_EPOCHS + 1)
    dp: DPGuarantee | None = None  # the request's train.dp_epsilon set: the silo's guarantee

    def array_groups(self) -> set[str]:
        return {"task_vector"} if self.mode == "full" else {"lora"}


class WeaveRequest(Header):
    """One weaving hop (server/weaving.py): train domain `module`'s LoRA module for `epochs` epochs on this
    silo's own data, starting from base + module. Arrays: group "lora" (as FinetuneReply's), the module."""

    base: BaseSpec
    train: TrainConfig  # finetune must be "lora"; rank, alpha and targets say what the module is
    module: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    round: int = Field(ge=1, le=10_000)
    epochs: int = Field(ge=1, le=10_000)

    @model_validator(mode="after")
    def _lora(self):
        if self.train.finetune != "lora":
            raise ValueError("weaving moves LoRA modules: train.finetune must be 'lora'")
        return self

    def array_groups(self) -> set[str]:
        return {"lora"}


class WeaveReply(Header):
    """Arrays: group "lora", the module's updated factors. Nothing else of the silo's training leaves it."""

    domain: Domain
    base_fingerprint: str
    module: str
    round: int = Field(ge=1, le=10_000)
    epochs: int = Field(ge=0, le=10_000, description="<= the request's")
    seconds: float = Field(ge=0, le=MAX_SECONDS, description="wall-clock seconds, at most a week")

    def array_groups(self) -> set[str]:
        return {"lora"}


class FedRoundRequest(Header):
    """One round of federated averaging at a silo (server/fedavg.py). Arrays: group "model", the global model's
    full weights (as EvaluateRequest's). The silo first scores that model on the validation items of its
    held-out users (the seeded `train.val_max_users` subsample, never trained on in a round), then, when
    `epochs` > 0, trains it `epochs` epochs on every other user's train + validation items; FedProx adds
    `prox_mu` / 2 * ||theta - theta_global||^2 to the loss. `epochs` = 0: validation only. Every round, training
    or not, is one "val" evaluation of the silo's per-run budget (refused with BUDGET_ERROR_CODE beyond it): a
    validation-only round is an evaluation of a model the server chose."""

    base: BaseSpec
    train: TrainConfig
    round: int = Field(ge=0, le=10_000)
    epochs: int = Field(ge=0, le=MAX_EPOCHS)
    prox_mu: float = Field(0.0, ge=0.0, le=1e6)

    @model_validator(mode="after")
    def _dense(self):
        if self.train.finetune != "full":
            raise ValueError("federated averaging trains every parameter: train.finetune must be 'full'")
        if self.train.val_max_users is None:
            raise ValueError("federated averaging validates on held-out users: train.val_max_users must be set")
        return self

    def array_groups(self) -> set[str]:
        return {"model"}


class FedRoundReply(Header):
    """`val`: the received model on the held-out users' validation items (aggregate). Arrays (when `epochs` > 0):
    group "update" = the trained weights minus the received ones, float32, every parameter. `users`: how many
    users' sequences the silo trained on (the FedAvg weight)."""

    domain: Domain
    base_fingerprint: str
    round: int = Field(ge=0, le=10_000)
    epochs: int = Field(ge=0, le=MAX_EPOCHS)
    users: int = Field(ge=0, le=INT32_MAX, description="<= the silo's handshake count")
    loss: float | None = Field(None, ge=0.0, le=MAX_LOSS)
    seconds: float = Field(ge=0, le=MAX_SECONDS, description="wall-clock seconds, at most a week")
    val: AggregateMetrics

    def array_groups(self) -> set[str]:
        return {"update"} if self.epochs > 0 else set()


class TeacherRequest(Header):
    base: BaseSpec
    pseudo_item_ids: list[int] = Field(min_length=1)
    top_k: int | None = Field(None, gt=0, le=INT32_MAX, description="None: dense (k = number of items)")
    chunk_size: int = Field(256, gt=0)
    seen_items: SeenItems = Field("exclude", description="exclude: a pseudo-user's own item is not among its targets "
                                  "(k is then at most N - 1)")

    @field_validator("pseudo_item_ids")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("pseudo_item_ids must be unique non-negative item ids")
        return v


class TeacherReply(Header):
    """Arrays: group "teacher" = {"indices": int32 [P, k], "values": float32 [P, k]}, rows in the order of
    the request's pseudo_item_ids. Values are cosines in [-1, 1] (TEACHER_TOLERANCE for float16 rounding)."""

    domain: Domain
    num_items: int = Field(gt=0, le=INT32_MAX)
    k: int = Field(gt=0, le=INT32_MAX)

    def array_groups(self) -> set[str]:
        return {"teacher"}




class EvaluateRequest(Header):
    """"The `split` metrics of these models." Arrays: one group per model name = {parameter name: float32 array}:
    full weights, or for a model named in `integrated` the integrated model's parameters (shared non-block
    weights, K block sets, gates). Which users the metrics are over is the silo's alone (its EvalPolicy: a fixed
    subsample per split, a per-run budget, optional noise; common/protocol/eval_policy.py): the request names no
    users, no subsample size and no seed."""

    base: BaseSpec
    split: Literal["val", "test"] = "test"
    models: list[str] = Field(min_length=1)
    seen_items: SeenItems = "exclude"
    integrated: dict[str, IntegratedSpec] = Field(default_factory=dict)

    @field_validator("integrated")
    @classmethod
    def _integrated_are_models(cls, v: dict, info: ValidationInfo) -> dict:
        if set(v) - set(info.data.get("models") or []):
            raise ValueError("integrated names a model that is not in models")
        return v

    def array_groups(self) -> set[str]:
        return set(self.models)


class EvaluateReply(Header):
    domain: Domain
    metrics: dict[str, AggregateMetrics]


#: the parameters a silo may train in a GateTuneRequest: only the gates (common/model/integration.py names)
GATE_FROZEN_PREFIXES = ("adaptor", "position", "experts")


class GateTuneRequest(Header):
    """X-Cross's "new domain with less data": a silo (typically one that took no part) fine-tunes only the gates
    of an integrated model on a seeded `user_fraction` of its training users (common.model.train.fine_tune with
    every non-gate parameter frozen; `train.freeze` and `train.max_users` are set by the silo). Arrays: group
    "model" = the integrated model's parameters, checked as in EvaluateRequest. The tuned model stays in the
    silo; only aggregate test metrics before and after come back (`GateTuneReply`), over the silo's own fixed
    test subsample (as EvaluateRequest's; two evaluations of its budget)."""

    base: BaseSpec
    spec: IntegratedSpec
    train: TrainConfig
    user_fraction: float = Field(gt=0, le=1)

    def array_groups(self) -> set[str]:
        return {"model"}


def fraction_users(fraction: float, num_users: int) -> int:
    """How many training users a silo trains on for `fraction` of its `num_users` (never fewer than an aggregate
    needs): what `GateTuneRequest.user_fraction` means, and what a benchmark sets as `TrainConfig.max_users` for
    the same fraction (the same seeded subsample, common.model.train)."""
    return max(MIN_USERS_FOR_METRICS, round(fraction * num_users))


class GateTuneReply(Header):
    domain: Domain
    before: AggregateMetrics  # test split, the integrated model as received
    after: AggregateMetrics  # test split, after tuning its gates
    epochs: int = Field(ge=0, le=MAX_EPOCHS, description="<= the request's")
    seconds: float = Field(ge=0, le=MAX_SECONDS, description="wall-clock seconds, at most a week")


Arrays = dict[str, dict[str, np.ndarray]]


def encode(header: Header, arrays: Arrays | None = None):
    """-> flwr RecordDict: ConfigRecord "header" {"type", "json"} + one ArrayRecord per array group."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    content = RecordDict()
    content["header"] = ConfigRecord({"type": type(header).__name__, "json": header.model_dump_json()})
    for group, named in (arrays or {}).items():
        content[f"arrays.{group}"] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in named.items()})
    return content


def decode(content, header_type: type[Header]) -> tuple[Header, Arrays]:
    """Inverse of `encode`; raises ContractError naming what is wrong."""
    try:
        cfg = content.config_records["header"]
    except KeyError:
        raise ContractError("message has no 'header' config record") from None
    # Error texts name only what the receiver knows (field names, counts), never a value the sender chose:
    # a reply's text could hold anything, and error texts end up in the server's log and report.
    extra = len(set(content.config_records) - {"header"}) + len(content.metric_records)
    if extra:
        raise ContractError(f"{extra} unexpected config/metric record(s): a message is one header + array groups")
    if set(cfg) != {"type", "json"}:
        raise ContractError("the header record must hold exactly the entries type and json")
    if cfg.get("type") != header_type.__name__:
        raise ContractError(f"expected a {header_type.__name__} message, got another type")
    try:
        header = header_type.model_validate_json(cfg["json"])
    except ValidationError as exc:
        raise ContractError(f"invalid {header_type.__name__}: {_problems(exc, header_type)}") from None
    except Exception:  # not JSON at all
        raise ContractError(f"invalid {header_type.__name__}: the header is not valid JSON") from None
    arrays: Arrays = {}
    for key, record in content.array_records.items():
        if not key.startswith("arrays."):
            raise ContractError("an array record is not named arrays.<group>")
        arrays[key[len("arrays."):]] = {n: a.numpy() for n, a in record.items()}
    want = header.array_groups()
    if set(arrays) != want:
        raise ContractError(f"{header_type.__name__}: array groups missing {sorted(want - set(arrays))[:3]}, "
                            f"{len(set(arrays) - want)} unexpected")
    return header, arrays


def _problems(exc: ValidationError, header_type: type[Header]) -> str:
    """pydantic errors as '<top-level field>: <error type>' (no input values, no sender-chosen keys)."""
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        loc = err.get("loc") or ("",)
        field = loc[0] if loc[0] in header_type.model_fields else "an unexpected field"
        parts.append(f"{field}: {err['type']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


