"""Console logging for the apps: our progress lines at INFO, third-party request chatter at WARNING.

Flower streams a ServerApp's console to `flwr run --stream` by posting it to the SuperLink with httpx; at
INFO, httpx logs one line per post, which would drown the progress lines (one per stage, per silo reply,
fine-tuning epoch and coefficient step)."""

from __future__ import annotations

import logging

QUIET = ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub", "asyncio", "grpc", "matplotlib", "PIL")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Root logger at `level` (a handler is added if there is none); the QUIET loggers at WARNING."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=FORMAT)
    root.setLevel(level)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
