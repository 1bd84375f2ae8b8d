"""What every benchmark driver shares: the pipeline over in-process silos (the federation's own code, messages
encoded as through Flower) and a per-stage timer."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

from clients.client_app import in_process_endpoint
from clients.silo import SiloWorker
from server.pipeline import Pipeline
from server.transport import InProcessTransport

log = logging.getLogger("benchmarks")


def silo_pipeline(cfg, data: Path | dict[str, Path], domains: list[str], run_dir: Path, cache: Path,
                  traffic=None) -> Pipeline:
    """The pipeline over one in-process silo per domain (data: a folder with one sub-folder per domain, or
    domain -> its folder; silos' state folders inside `run_dir`; their evaluation policy from `cfg`'s eval-*
    keys), what every benchmark driver runs."""
    paths = data if isinstance(data, dict) else {d: Path(data) / d for d in domains}
    # a benchmark is the data owner measuring its own data: no evaluation budget (the drivers score many extra
    # models), and the subsample seeded by the run's seed (the users every recorded result was measured on)
    policy = cfg.silo_policy(budget=None, seed=cfg.seed)
    endpoints = {d: in_process_endpoint(SiloWorker(d, paths[d], state_dir=run_dir / "silo-state" / d,
                                                   cache_dir=cache, policy=policy)) for d in domains}
    return Pipeline(InProcessTransport(endpoints, observer=traffic), cfg, run_dir, expected=domains)



class Stages:
    """Wall time and peak RSS (process high-water mark, MB) at the end of each stage."""

    def __init__(self):
        self.rows: list[dict] = []

    def __call__(self, name: str):
        stages = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()
                log.info("stage %s ...", name)

            def __exit__(self, *exc):
                dt = time.perf_counter() - self.t0
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                stages.rows.append({"stage": name, "seconds": round(dt, 1), "peak_rss_mb": round(peak, 1)})
                log.info("stage %s: %.1fs, peak RSS %.0f MB", name, dt, peak)

        return _Ctx()
