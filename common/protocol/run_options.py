"""Run-configuration keys read by both the ServerApp and the ClientApp (where the run directory and the
simulated silos' data live, how long to wait for SuperNodes), with their defaults.

Where defaults live: here for these keys, and in the pydantic models for every other key (PipelineConfig,
TrainConfig, CoefficientConfig, BackboneConfig; server/config.py maps run-config keys onto them). pyproject's
[tool.flwr.app.config] lists every key, because Flower accepts `--run-config` overrides only of listed keys,
with the value "" = "the default": a value given there or with `--run-config` is an explicit setting.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


def kebab(name: str) -> str:
    return name.replace("_", "-")


def given(rc: dict) -> dict:
    """The keys actually set: "" (pyproject's "use the default") counts as not given."""
    return {k: v for k, v in dict(rc).items() if not (isinstance(v, str) and v.strip() == "")}


def comma_list(v, sep: str = ",") -> list[str]:
    if isinstance(v, (list, tuple)):
        return [str(x).strip() for x in v if str(x).strip()]
    return [x.strip() for x in str(v).split(sep) if x.strip()]


def list_setting(v, sep: str = ",") -> list[str]:
    """A list-valued setting: "none" is the empty list (a plain "" already means "the default"), otherwise
    the `sep`-separated items."""
    return [] if str(v).strip().lower() == "none" else comma_list(v, sep)


class RunOptions(BaseModel):
    """Options of the run itself (not of the method): validated from the run-config, unknown keys ignored
    here (server/config.py rejects keys that nothing reads)."""

    model_config = ConfigDict(extra="ignore", alias_generator=kebab, populate_by_name=True, allow_inf_nan=False)

    # None: a new runs/<timestamp> (common/core/runs.py), relative to the ServerApp's working directory (the project
    # folder under `flwr run .`'s local simulation); the ServerApp points runs/latest at the run it starts
    run_dir: Path | None = Field(None, description="checkpoints, report, model/ (none = a new runs/<timestamp>, "
                                 "linked as runs/latest; the same dir again = resume)")
    domains: list[str] = Field(["garden", "kitchen", "outdoor"],
                               description="simulation: partition i is domains[i] (comma list)")
    data_root: Path = Field(Path(".cache/demo-data"), description="simulation: <data-root>/<domain> is a silo's data")
    silo_state_root: Path | None = Field(None, description="simulation: where silos keep fine-tuned weights "
                                         "(none = .cache/silo-state)")
    cache_dir: Path | None = Field(None, description="item-embedding cache (none = .cache)")
    min_nodes: int = Field(0, ge=0, le=100_000, description="SuperNodes to wait for before starting (0 = one per "
                           "domain, or the federation's own count)")
    node_wait_s: float = Field(300.0, gt=0, description="seconds to wait for them")
    record_messages: Path | None = Field(None, description="write every message both ways to this folder (audits)")
    expect_domains: list[str] = Field([], description="domains that must take part; each one missing is reported")

    @field_validator("domains", "expect_domains", mode="before")
    @classmethod
    def _lists(cls, v):
        return comma_list(v)

    @classmethod
    def from_run_config(cls, rc: dict) -> "RunOptions":
        keys = {kebab(n) for n in cls.model_fields}
        return cls.model_validate({k: v for k, v in given(rc).items() if k in keys})


OPTION_KEYS = frozenset(kebab(n) for n in RunOptions.model_fields)
