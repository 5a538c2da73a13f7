"""What the converters share: the export error, atomic publishing of a set of files, running a converter."""
from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from pipeline.errors import UserError
from pipeline.infer.runtime import DEPLOY_EXTRA


class ExportError(UserError, RuntimeError):
    """The exported model does not match PyTorch (or could not be written); the message says by how much."""


def require(module: str, fmt: str):
    """``import module`` or an ExportError naming the format and the pip extra that installs its converter."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"export.formats has {fmt}, whose converter needs the Python package '{module}', which "
                          f"is not installed: {DEPLOY_EXTRA}, or drop {fmt} from export.formats") from None


@contextlib.contextmanager
def staging(dest_dir: Path) -> Iterator[Path]:
    """A temporary folder in ``dest_dir`` (same file system: the final moves are renames), always removed."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=dest_dir))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(files: Sequence[tuple[Path, Path]]) -> None:
    """Rename each (staged, final) pair in order: list the file a user names (.xml, .param, .mnn) last."""
    for staged, final in files:
        os.replace(staged, final)


def run_converter(cmd: Sequence[str], fmt: str, cwd: Path, timeout_s: float = 900) -> None:
    """Run a converter in a subprocess (its own output captured); an ExportError with its last lines if it fails."""
    try:
        res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ExportError(f"the {fmt} converter could not run ({err}); reinstall it: {DEPLOY_EXTRA}") from None
    if res.returncode != 0:
        tail = " | ".join((res.stdout + res.stderr).strip().splitlines()[-4:])[-600:]
        raise ExportError(f"the {fmt} converter failed (exit {res.returncode}): {tail}. The verified ONNX model "
                          f"is kept; drop {fmt} from export.formats or report the failing operator")


def remove_model(paths: Sequence[Path]) -> None:
    """Delete a rejected model's files (it failed a check: nothing that looks usable stays)."""
    for path in paths:
        Path(path).unlink(missing_ok=True)
