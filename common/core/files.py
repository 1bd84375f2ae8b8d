"""Writing a file so that a crash never leaves it half-written: the data goes to a temporary file beside the
target (created owner-only), is flushed to disk, and is then renamed over the target (atomic on POSIX).
Every file the project writes for later reading (checkpoints, task vectors, caches, keys) goes through here."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, not while other threads create files
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def default_mode() -> int:
    """What a plain open() would create: 0o666 less the process's umask (as read at import)."""
    return 0o666 & ~_UMASK


@contextmanager
def atomic_path(path: str | Path, mode: int | None = None, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer that wants a file name (safetensors, numpy: give
    ``suffix=".npz"`` where the writer appends one). When the block ends normally the file is flushed to disk,
    gets permissions `mode` (default: as the umask allows, like open()) and replaces `path`; when it raises,
    the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, mode: int | None = None) -> Path:
    """Write `data` (str as UTF-8) to `path` atomically (permissions as in `atomic_path`); returns `path`."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(raw)
    return Path(path)
