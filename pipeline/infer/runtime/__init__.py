"""Inference runners behind one interface: a PyTorch checkpoint (.pt), an exported model (ONNX, OpenVINO,
NCNN, MNN), or the model being trained (in memory, for validation during training).

All run THE one preprocessing (:func:`pipeline.data.transforms.preprocess`) and THE one decoder
(:func:`pipeline.model.decode.postprocess`); they differ only in what produces the head output.
evaluate, predict, export verification and bench all go through :func:`load_detector`, which picks the
runtime from the file name (see :data:`RUNTIMES`).

Exported models carry everything needed to run them (written by pipeline.export): class names, input size,
mean/std, strides, reg_max, preprocessing mode, output layout, thresholds - in ONNX ``metadata_props``, in
OpenVINO ``rt_info``, and in a sidecar ``<model file>.json`` for NCNN and MNN.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from pipeline.infer.runtime.base import (
    DEPLOY_EXTRA,
    REQUIRED_METADATA,
    Detector,
    ExportedDetector,
    InferenceError,
    Preprocessing,
    class_names_from_config,
    preprocess_batch,
    sidecar_path,
)
from pipeline.infer.runtime.deploy_backends import MnnDetector, NcnnDetector, OpenVinoDetector
from pipeline.infer.runtime.onnx_backend import OnnxDetector, read_onnx_metadata
from pipeline.infer.runtime.torch_backend import TORCH_SUFFIXES, ModuleDetector, TorchDetector

__all__ = [
    "DEPLOY_EXTRA",
    "REQUIRED_METADATA",
    "RUNTIMES",
    "TORCH_SUFFIXES",
    "Detector",
    "ExportedDetector",
    "InferenceError",
    "MnnDetector",
    "ModuleDetector",
    "NcnnDetector",
    "OnnxDetector",
    "OpenVinoDetector",
    "Preprocessing",
    "TorchDetector",
    "check_model_file",
    "class_names_from_config",
    "load_detector",
    "preprocess_batch",
    "read_onnx_metadata",
    "sidecar_path",
]

# the file a user names -> the runtime that runs it (NCNN and OpenVINO weights: the .bin next to it)
RUNTIMES: dict[str, type[ExportedDetector]] = {
    ".onnx": OnnxDetector, ".xml": OpenVinoDetector, ".param": NcnnDetector, ".mnn": MnnDetector,
}
KNOWN = "a .pt checkpoint, an .onnx model, an OpenVINO .xml, an NCNN .param or an .mnn model"


def check_model_file(path: str | Path) -> Path:
    """``path`` as a Path; an InferenceError naming it when there is no such file (checked before any work)."""
    path = Path(path)
    if not path.is_file():
        hint = ("train a model first (`python -m pipeline.train`) or point eval.checkpoint / predict.checkpoint "
                f"to an existing file ({KNOWN})")
        raise InferenceError(f"model file {path} does not exist; {hint}")
    return path


def load_detector(path: str | Path, device: str | torch.device = "cpu", input_size: Sequence[int] | None = None,
                  threads: int | None = None) -> Detector:
    """A .pt checkpoint of ours or a model written by pipeline.export; a clear error otherwise."""
    path = check_model_file(path)
    if path.suffix in RUNTIMES:
        return RUNTIMES[path.suffix](path, input_size=input_size, threads=threads)
    if path.suffix in TORCH_SUFFIXES:
        return TorchDetector(path, device=device, input_size=input_size)
    raise InferenceError(f"model file {path}: unknown type '{path.suffix}'; expected {KNOWN} "
                         "(`python -m pipeline.export export.formats=[...]` writes them)")
