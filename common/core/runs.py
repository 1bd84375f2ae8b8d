"""Run directories: a new run's default folder (`runs/<timestamp>`) and `runs/latest`, a symlink to the newest run.

Every launch mode goes through the ServerApp, which calls `link_latest` with its run directory when the run starts
(`make run` and `make e2e` pass a run directory under the project's runs/, `flwr run .` uses the default), so after
any of them `runs/latest/model` is the newest run's model folder.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

RUNS = Path("runs")
LATEST = "latest"


def new_run_dir(root: str | Path = RUNS) -> Path:
    """`<root>/<YYYYmmdd-HHMMSS>`: the run directory of a run that names none."""
    return Path(root) / time.strftime("%Y%m%d-%H%M%S")


def link_latest(run_dir: str | Path) -> Path | None:
    """Point `latest` beside `run_dir` at it, when run_dir lies in a folder named `runs`: a relative symlink,
    replaced atomically (a reader sees the previous run or this one, never nothing). `run_dir` is resolved first,
    so run-dir=runs/latest resumes the run it points at and leaves the link as it is. Returns the link; None
    when run_dir is not in a `runs` folder, when `latest` there is a real folder (an older version's default run
    directory: left alone, with a warning) or when the file system refuses symlinks (a warning)."""
    run = Path(run_dir).resolve()
    if run.parent.name != RUNS.name or run.name == LATEST:
        return None
    link = run.parent / LATEST
    if link.exists() and not link.is_symlink():
        log.warning("%s is a folder (an older run directory), not a link: not pointed at %s; rename it to get "
                    "%s/latest back", link, run.name, RUNS)
        return None
    tmp = run.parent / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(run.name, tmp)
        os.replace(tmp, link)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("could not point %s at %s: %s", link, run.name, exc)
        return None
    return link
