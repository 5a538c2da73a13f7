"""NCNN model (``.param`` + ``.bin``, fp32 weights) converted by pnnx from the verified ONNX file; the
metadata in a sidecar ``<.param>.json`` (NCNN files have no place for it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.infer.exporters.common import ExportError, publish, require, run_converter, staging
from pipeline.infer.runtime import sidecar_path


def ncnn_files(param: Path) -> list[Path]:
    """The files of an NCNN model, the one a user names (.param) last."""
    return [param.with_suffix(".bin"), sidecar_path(param), param]


def to_ncnn(onnx_path: Path, dest_param: Path, meta: dict[str, str], input_hw: tuple[int, int]) -> Path:
    """ONNX -> ``dest_param`` (``model.ncnn.param``), its ``.bin`` and the metadata sidecar."""
    pnnx = require("pnnx", "ncnn")
    with staging(dest_param.parent) as tmp:
        shutil.copyfile(onnx_path, tmp / "model.onnx")
        h, w = input_hw
        # pnnx writes model.ncnn.param / .bin (and its own intermediate files) next to its input; fp16=0 keeps
        # fp32 weights (parity with PyTorch), batch 1: NCNN runs one image at a time
        run_converter([pnnx.EXEC_PATH, "model.onnx", f"inputshape=[1,3,{h},{w}]", "fp16=0"], "ncnn", cwd=tmp)
        param = tmp / "model.ncnn.param"
        if not (param.is_file() and param.with_suffix(".bin").is_file()):
            raise ExportError(f"pnnx did not write {param.name} / {param.with_suffix('.bin').name} for {onnx_path}; "
                              "drop ncnn from export.formats or report the failing operator")
        sidecar_path(param).write_text(json.dumps(meta, indent=1))
        publish(list(zip(ncnn_files(param), ncnn_files(dest_param))))
    return dest_param
