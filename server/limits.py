"""How long the server waits for a silo's reply in each stage (per attempt).

run-config `timeout-s` = a number: that many seconds for every stage. `timeout-s = "auto"` (the default): each
stage's limit is sized from the data the server knows (the largest catalog, the epochs asked, the number of
models to evaluate), with a wide margin, so that a slow but honest silo is never dropped. A silo that dies is
not waited for anyway: Flower answers for a dead node with an error reply at once; the limit only bounds a silo
that hangs while alive.

Margins (measured on 2 shared cores, docs/benchmarks.md): a light-backbone epoch on Sports (18,357 items, 35k
users, full softmax) takes about 300 s, i.e. 0.016 s per catalog item, with validation; the limit allows
0.1 s per item and epoch (6x), doubled when the final fit retrains. Item-text encoding (MiniLM, ~63 items/s)
happens at the first contact, before the server knows any catalog size, so the handshake gets a fixed
2 hours (about 450k items at that speed).
"""

from __future__ import annotations

BASE_S = 1800.0                 # every derived limit starts here (process start, model build, transfer)
HANDSHAKE_S = 7200.0            # first contact: the silo encodes its whole catalog (no size known yet)
FINETUNE_S_PER_ITEM_EPOCH = 0.1
TEACHER_S_PER_ITEM = 0.05       # scoring every item as a pseudo-user against the catalog
EVALUATE_S_PER_ITEM_MODEL = 0.05
GATE_TUNE_FACTOR = 4            # gate tuning (train.gates) runs an integrated model: K block sets per forward


def stage_timeout(stage: str, timeout_s: float | None, *, max_items: int = 0, epochs: int = 1,
                  refit: bool = True, models: int = 1) -> float:
    """Seconds to wait for the replies of one attempt of `stage`."""
    if timeout_s is not None:
        return float(timeout_s)
    if stage == "handshake":
        return HANDSHAKE_S
    if stage == "finetune":
        return BASE_S + FINETUNE_S_PER_ITEM_EPOCH * max_items * epochs * (2 if refit else 1)
    if stage == "fedavg":  # one round: a validation pass, then `epochs` local epochs
        return BASE_S + EVALUATE_S_PER_ITEM_MODEL * max_items + FINETUNE_S_PER_ITEM_EPOCH * max_items * epochs
    if stage == "tune_gates":
        return BASE_S + GATE_TUNE_FACTOR * FINETUNE_S_PER_ITEM_EPOCH * max_items * epochs * (2 if refit else 1)
    if stage == "teacher":
        return BASE_S + TEACHER_S_PER_ITEM * max_items
    if stage == "evaluate":
        return BASE_S + EVALUATE_S_PER_ITEM_MODEL * max_items * max(models, 1)
    return HANDSHAKE_S
