"""The pydantic base of every configuration model: unknown fields are an error, never silently ignored, and a
float must be finite (NaN / Inf are refused: JSON cannot carry them, so a message would reach a silo with null
in their place and be refused there)."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
