"""MNN model (``.mnn``, fp32 weights) converted from the verified ONNX file by MNN's converter; the metadata
in a sidecar ``<.mnn>.json``.

The converter runs as ``_tools.mnnconvert`` (the compiled converter of the MNN wheel) in a subprocess, not
through the ``mnnconvert`` command or ``MNN.tools.mnnconvert``: in MNN 3.6.1 that wrapper, when imported,
runs ``pip install -U aliyun-log-python-sdk`` with whatever ``pip`` is on PATH and, when that succeeds,
sends a usage log (machine id, model sizes) to an Alibaba Cloud endpoint after every conversion.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from pipeline.infer.exporters.common import ExportError, publish, run_converter, staging
from pipeline.infer.runtime import DEPLOY_EXTRA, sidecar_path

CONVERT = "import sys, _tools; sys.exit(0 if _tools.mnnconvert(sys.argv) else 1)"


def mnn_files(model: Path) -> list[Path]:
    """The files of an MNN model, the one a user names (.mnn) last."""
    return [sidecar_path(model), model]


def to_mnn(onnx_path: Path, dest: Path, meta: dict[str, str]) -> Path:
    """ONNX -> ``dest`` (``model.mnn``) and its metadata sidecar."""
    if importlib.util.find_spec("_tools") is None or importlib.util.find_spec("MNN") is None:
        raise ExportError("export.formats has mnn, whose converter needs the Python package 'MNN', which is not "
                          f"installed: {DEPLOY_EXTRA}, or drop mnn from export.formats")
    with staging(dest.parent) as tmp:
        staged = tmp / dest.name
        run_converter([sys.executable, "-c", CONVERT, "-f", "ONNX", "--modelFile", str(Path(onnx_path).resolve()),
                       "--MNNModel", str(staged), "--bizCode", "nanodet-pipeline"], "mnn", cwd=tmp)
        if not staged.is_file():
            raise ExportError(f"the MNN converter wrote no {dest.name} for {onnx_path}; drop mnn from "
                              "export.formats or report the failing operator")
        sidecar_path(staged).write_text(json.dumps(meta, indent=1))
        publish(list(zip(mnn_files(staged), mnn_files(dest))))
    return dest
