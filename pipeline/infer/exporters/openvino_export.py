"""OpenVINO IR (``.xml`` + ``.bin``, fp32 weights) converted from the verified ONNX file with
``openvino.convert_model``, the metadata in the IR's rt_info; INT8 by NNCF post-training quantization."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.infer.exporters.common import ExportError, publish, require, staging
from pipeline.infer.runtime.deploy_backends import RT_INFO_SECTION, stdout_to_stderr


def ir_files(xml: Path) -> list[Path]:
    """The files of an IR, the one a user names (.xml) last."""
    return [xml.with_suffix(".bin"), xml]


def _save(model, ov, dest_xml: Path, meta: dict[str, str]) -> Path:
    for key, value in meta.items():
        model.set_rt_info(str(value), [RT_INFO_SECTION, key])
    with staging(dest_xml.parent) as tmp:
        staged = tmp / dest_xml.name
        ov.save_model(model, str(staged), compress_to_fp16=False)  # fp32 weights: parity with PyTorch
        publish(list(zip(ir_files(staged), ir_files(dest_xml))))
    return dest_xml


def to_openvino(onnx_path: Path, dest_xml: Path, meta: dict[str, str]) -> Path:
    """ONNX -> OpenVINO IR at ``dest_xml`` (+ its .bin), metadata in rt_info section ``nanodet``."""
    ov = require("openvino", "openvino")
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as err:  # noqa: BLE001 -- the converter raises untyped errors (unsupported op, ...)
        raise ExportError(f"openvino.convert_model failed on {onnx_path}: {str(err).strip()[:400]}; drop openvino "
                          "from export.formats or report the failing operator") from None
    return _save(model, ov, dest_xml, meta)


def quantize_openvino(fp32_xml: Path, dest_xml: Path, calib: Sequence[np.ndarray], meta: dict[str, str]) -> Path:
    """NNCF post-training INT8 quantization of an IR, calibrated on ``calib`` ([1, 3, H, W] arrays, real
    images). The head's final 1x1 convs (gfl_cls) stay float: their output mixes probabilities and DFL
    logits, which one 8-bit scale cannot hold (as for the onnxruntime INT8 model)."""
    ov = require("openvino", "openvino")
    nncf = require("nncf", "openvino INT8")
    logging.getLogger("nncf").setLevel(logging.ERROR)  # per-node chatter about skipped quantizers
    model = ov.Core().read_model(str(fp32_xml))
    try:
        with stdout_to_stderr():  # NNCF's progress bars: stdout stays clean for JSON (pipeline.bench)
            quantized = nncf.quantize(model, nncf.Dataset(list(calib)), subset_size=len(calib),
                                      ignored_scope=nncf.IgnoredScope(patterns=[".*gfl_cls.*"], validate=False))
    except Exception as err:  # noqa: BLE001 -- NNCF raises untyped errors
        raise ExportError(f"NNCF INT8 quantization of {fp32_xml} failed: {str(err).strip()[:400]}; export without "
                          "INT8 (export.int8=false) or without openvino") from None
    return _save(quantized, ov, dest_xml, {**meta, "quantization": "int8 NNCF post-training (gfl_cls kept float)"})
