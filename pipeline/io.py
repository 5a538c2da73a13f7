"""The one atomic file writer: write a temporary file next to the target, then rename it into place.

A reader (DVC, a resuming run, another rank) sees the old complete file or the new complete file, never a
torn one. Temporary files are named ``.<name>.tmp.<pid>``; one left by a killed writer (its process is
gone) is removed by the next write of the same file.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.logging import get_logger

log = get_logger(__name__)


def temp_path(path: Path) -> Path:
    """Where a write of ``path`` by this process goes before the rename."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[IO[Any]], None], *,
                 binary: bool = False, fsync: bool = False, keep_prev: str | None = None,
                 on_phase: Callable[[str, Path], None] | None = None) -> Path:
    """Write ``content`` (text, bytes, or a function that writes to the open file) to ``path`` atomically.

    ``binary``: open the temporary file in binary mode (implied by bytes content). ``fsync``: flush the
    file and the folder to disk (checkpoints). ``keep_prev``: first move an existing ``path`` to
    ``path + keep_prev``. ``on_phase(phase, tmp)`` is called after each phase ("partial", "written",
    "swapped", "renamed"; the test-only fault hooks of pipeline.faults). The folder is created.
    OSError propagates; the temporary file is removed whatever happens.
    """
    path = Path(path)
    tmp = temp_path(path)
    phase = on_phase or (lambda _name, _tmp: None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        binary = binary or isinstance(content, bytes)
        with open(tmp, "wb" if binary else "w", **({} if binary else {"newline": ""})) as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        phase("partial", tmp)
        phase("written", tmp)
        if keep_prev and path.exists():
            os.replace(path, path.with_name(path.name + keep_prev))
        phase("swapped", tmp)
        os.replace(tmp, path)
        phase("renamed", tmp)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        fsync_dir(path.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some filesystems cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> None:
    """Delete temporary files that a killed write of ``path`` left (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp.*"):
        pid = tmp.name.rsplit(".", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted write", tmp)
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
