"""The silos' task vectors as the server stores them, and the vectors every merge reads.

- finetune = full: a FinetuneReply carries the dense task vector, stored as task_vectors/<d>.safetensors.
- finetune = lora: it carries LoRA factors, stored as lora/<d>.safetensors and *materialised* into the ordinary
  dense task vector ``delta = (alpha / r) * B @ A`` (zeros outside the targets), so every merge method runs
  unchanged (common/model/lora.py).
- After the weave stage (weave-rounds > 0) the woven modules (woven/<d>.safetensors, server/weaving.py) replace
  the fine-tuned ones for merging.
"""

from __future__ import annotations

import torch

from common.merging.task_vectors import state_from_numpy
from server.base import BaseContext
from server.checkpoint import Checkpoint, SiloFinetune
from server.run_dir import RunDir
from server.transport import Outcome


class TaskVectors:
    def __init__(self, cfg, run: RunDir, state: Checkpoint, base: BaseContext):
        self.cfg, self.run, self.state, self.base = cfg, run, state, base

    def has(self, domain: str) -> bool:
        return self.run.task_vector(domain).exists()

    def store(self, domain: str, o: Outcome) -> None:
        """Store a validated FinetuneReply's vector (LoRA: the factors too) and its sizes; a new fine-tuning result
        voids any weave state."""
        info = self.state.finetune.setdefault(domain, SiloFinetune())
        info.upload_bytes, info.dense_task_vector_bytes = o.bytes_up, self.base.dense_bytes
        if self.base.lora is None:
            vector = state_from_numpy(o.arrays["task_vector"])
        else:
            self.run.write_arrays(self.state, self.run.lora(domain), o.arrays["lora"])
            self.state.weave = None
            vector = self.base.lora.materialise(o.arrays["lora"], self.base.state)
        self.run.write_tensors(self.state, self.run.task_vector(domain), vector)

    def load(self, domains: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The vectors merges use: the fine-tuned ones, or the woven LoRA modules once the weave stage ran."""
        if self.cfg.weave_rounds and "weave" in self.state.completed:
            return {d: self.base.lora.materialise(self.run.read_arrays(self.run.woven(d)), self.base.state)
                    for d in domains}
        return {d: self.run.read_tensors(self.run.task_vector(d)) for d in domains}
