"""The pydantic base of every configuration model: unknown fields are an error, never silently ignored."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
