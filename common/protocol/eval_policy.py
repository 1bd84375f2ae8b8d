"""A silo's own evaluation policy: which users its aggregates are over, how many it releases, and their noise.

The server asks only for "the validation / test metrics of these models" (EvaluateRequest names a split, never
users, a subsample size or a seed). The silo answers from a subsample it fixes itself, the same users for every
request of a split, so no two answers are over different user sets and differencing across subsets has
nothing to work on. What is left for a server to learn is the mean over that fixed set of whatever models it
sends (docs/design.md, "What the server learns from metrics"); a per-run budget of model evaluations bounds
how many such means one run can ask for, and optional Laplace noise makes each one epsilon-differentially
private.

Where a silo's policy comes from: node-config keys `eval-max-users`, `eval-budget`, `eval-epsilon` (deployment,
set by the silo's operator), the run-config keys of the same names for simulated silos (one operator runs
everything there), or a `SiloWorker(policy=...)` in-process.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from pydantic import Field

from common.core.errors import ContractError
from common.core.strict import Strict
from common.model.config import INT32_MAX, MIN_USERS_FOR_METRICS

#: model evaluations per split per run a silo answers by default: the pipeline asks for (pretrained +
#: training-free baselines + MergeRec variants + one fine-tuned model per silo + FedAvg / integrated candidates)
#: on test, and on validation the merged candidates, its fine-tuning (one) and every FedAvg round (one each,
#: validation-only rounds included), once per attempt; 128 leaves room for retries and a few resumes at dozens
#: of silos (default FedAvg: 10 rounds + 1), and is far below the ~n requests a reconstruction over n users needs.
DEFAULT_EVAL_BUDGET = 128
#: how many runs the budget ledger remembers (older runs are forgotten)
LEDGER_RUNS = 64


class EvalBudgetError(ContractError):
    """The silo's evaluation budget for this run and split is spent (error code BUDGET_ERROR_CODE)."""


class EvalPolicy(Strict):
    """What a silo's released evaluation aggregates are over. Set by the silo, never by a request."""

    max_users: int | None = Field(None, ge=MIN_USERS_FOR_METRICS, le=INT32_MAX, description="the silo's own "
                                  "fixed subsample of this many users per split (none = every user)")
    budget: int | None = Field(DEFAULT_EVAL_BUDGET, ge=1, le=INT32_MAX, description="model evaluations per split "
                               "and run the silo answers (none = no limit); a request beyond it is refused")
    epsilon: float | None = Field(None, gt=0, le=1e6, description="Laplace noise of scale 1 / (users x epsilon) "
                                  "on every released metric value (none = exact values)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="the subsample's seed (none = derived from "
                             "the silo's own data: secret to the server); Python only, for benchmarks that "
                             "reproduce a historical seeded subsample")

    @classmethod
    def from_config(cls, config: dict) -> "EvalPolicy":
        """From node-config / run-config keys eval-max-users, eval-budget, eval-epsilon ("" = the default;
        0 or "none" = no subsample / no limit / no noise). A bad value is a ValueError naming the key."""
        fields = {"eval-max-users": "max_users", "eval-budget": "budget", "eval-epsilon": "epsilon"}
        values = {}
        for key, name in fields.items():
            v = config.get(key)
            if v is None or (isinstance(v, str) and v.strip() == ""):
                continue
            values[name] = None if str(v).strip().lower() in ("0", "0.0", "none") else v
        try:
            return cls(**values)
        except ValueError as exc:
            bad = next((k for k, n in fields.items() if n in str(exc)), "eval-*")
            raise ValueError(f"bad silo setting {bad}: must be " + {
                "eval-max-users": f"an integer >= {MIN_USERS_FOR_METRICS}, or 0 / none",
                "eval-budget": "an integer >= 1, or 0 / none", "eval-epsilon": "a number > 0, or 0 / none",
            }.get(bad, "valid")) from None


def data_secret(users, train, val, test) -> bytes:
    """A secret the server cannot compute: SHA-256 over the silo's own user data."""
    h = hashlib.sha256(b"mergerec-eval-subsample")
    h.update(repr((list(users), [list(s) for s in train], sorted(val.items()), sorted(test.items()))).encode())
    return h.digest()


def split_seed(secret: bytes, split: str) -> int:
    """The subsample seed of one split, derived from the silo's secret."""
    return int.from_bytes(hashlib.sha256(secret + split.encode()).digest()[:8], "big") >> 1


def fixed_subsample(n: int, k: int | None, seed: int) -> list[int]:
    """Indices (sorted) of the `k` of `n` evaluation rows a silo always uses for one split (all when k is None
    or >= n). Deterministic in (n, k, seed): the same users for every request. The draw is the one fine-tuning's
    seeded subsamples make (torch.randperm), so a benchmark that passes seed 0 scores the users it always did."""
    if k is None or k >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values.tolist()


def laplace_noise(values: dict[str, float], users: int, epsilon: float, key: bytes) -> dict[str, float]:
    """Every value + Laplace(1 / (users x epsilon)), clipped to [0, 1]. Each value is a mean of per-user numbers in
    [0, 1], so one user changes it by at most 1 / users: each released value is epsilon-DP. The noise is a
    deterministic function of `key` (secret, split, model bytes): asking for the same model again returns the same
    numbers, so repeating a request averages nothing away."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
    scale = 1.0 / (users * epsilon)
    return {k: float(min(1.0, max(0.0, v + rng.laplace(0.0, scale)))) for k, v in sorted(values.items())}
