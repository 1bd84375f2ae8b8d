"""On resume, a stored file gets the checks a fresh reply got (server/validation.py): a damaged or edited file
is refused here, and the pipeline redoes the stage that made it (server/checkpoint.py `verify`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.model.integration import IntegratedRecommender, IntegratedSpec, load_exact
from server.base import BaseContext
from server.run_dir import RunDir
from common.merging.teacher import teacher_k
from server.validation import check_lora_module, check_task_vector, check_teacher_rows


class StoredFileCheck:
    """`check(rel, path)` raises on a stored file that a fresh reply with the same content would have failed."""

    def __init__(self, cfg, run: RunDir, base: BaseContext):
        self.cfg, self.run, self.base = cfg, run, base

    def __call__(self, rel: str, path: Path) -> None:
        b, ratio = self.base, self.cfg.max_task_vector_ratio
        if rel.startswith(("lora/", "woven/")):
            check_lora_module(self.run.read_arrays(path), b.lora, b.state, b.norm, ratio, f"stored {rel}")
        elif rel.startswith("task_vectors/"):
            check_task_vector(self.run.read_arrays(path), b.shapes, b.norm, ratio, f"stored {rel}")
        elif rel.startswith("teacher/") and path.stem in b.catalogs:
            chosen = self.run.read_json(self.run.pseudo_users)
            n = len(b.catalogs[path.stem])
            exclude = self.cfg.train.seen_items == "exclude"
            check_teacher_rows(self.run.read_arrays(path), chosen[path.stem], n,
                               teacher_k(self.cfg.teacher_top_k, n, exclude), exclude)
        elif rel.startswith("merges/"):
            stored = self.run.read_arrays(path)
            if {n: a.shape for n, a in stored.items()} != b.shapes or not all(np.isfinite(a).all()
                                                                                for a in stored.values()):
                raise ValueError("not a finite state of the base's shapes")
        elif rel.startswith("integration/"):  # the integrated model: finite, and loadable as its spec says
            spec = IntegratedSpec(**self.run.read_json(self.run.integration_info)["spec"])
            params = self.run.read_tensors(path)
            load_exact(IntegratedRecommender.skeleton(b.model, spec), params)
            if not all(t.isfinite().all() for t in params.values()):
                raise ValueError("non-finite parameters")
        elif rel.endswith(".json"):
            self.run.read_json(path)
