"""What every runtime shares: the error class, the preprocessing settings of a model, the Detector interface
(preprocess -> backend forward -> THE decoder) and the metadata every exported model carries."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data.transforms import preprocess
from pipeline.errors import UserError
from pipeline.model.decode import Detections, multiclass_nms, postprocess, priors_for

# the pip extra that installs the OpenVINO, NCNN and MNN runtimes and converters (pyproject.toml)
DEPLOY_EXTRA = "pip install 'nanodet-pipeline[deploy]' (in a checkout: pip install -e '.[deploy]')"


class InferenceError(UserError, RuntimeError):
    """A model file that is missing or cannot run as asked; the message names the file and the fix."""


@dataclass(frozen=True)
class Preprocessing:
    """How images must be turned into network input for one model (fixed by its training)."""

    input_size: tuple[int, int]  # (width, height) of the network input
    keep_ratio: bool  # True: letterbox; False: stretch resize (the official configs)
    mean: tuple[float, float, float]  # BGR
    std: tuple[float, float, float]

    @property
    def mode(self) -> str:
        return "letterbox" if self.keep_ratio else "stretch"

    @property
    def input_hw(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[0]

    def __call__(self, img_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HxWx3 uint8 BGR -> (chw float32 [3, h, w], M 3x3 original -> network-input pixels)."""
        chw, matrix = preprocess(img_bgr, list(self.input_size), self.keep_ratio, list(self.mean), list(self.std))
        return np.ascontiguousarray(chw, dtype=np.float32), np.asarray(matrix, dtype=np.float64)


def class_names_from_config(cfg: Config) -> list[str]:
    """Class names of a trained model: ``data.class_names``, else ``<prepared_dir>/classes.json``, else
    generic ``class0..`` names (a model must always be runnable)."""
    names = list(cfg.data.class_names)
    if names:
        return names
    path = Path(cfg.data.prepared_dir) / "classes.json"
    if path.is_file():
        data = json.loads(path.read_text())
        names = data.get("class_names", data.get("classes", [])) if isinstance(data, dict) else data
        names = [n["name"] if isinstance(n, dict) else str(n) for n in names]
        if len(names) == cfg.model.num_classes:
            return names
    return [f"class{i}" for i in range(cfg.model.num_classes)]


class Detector:
    """Common part: preprocessing, priors and decoding. Subclasses implement :meth:`forward`."""

    path: Path
    class_names: list[str]
    strides: tuple[int, ...]
    reg_max: int
    preprocessing: Preprocessing
    scores_are_logits: bool = True
    backend: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def forward(self, images: np.ndarray) -> Any:
        """[B, 3, H, W] float32 normalised -> backend output (head output or decoded pair)."""
        raise NotImplementedError

    def detect(self, images: np.ndarray, score_thr: float = 0.05, iou_thr: float = 0.6,
               max_dets: int = 100) -> list[Detections]:
        """[B, 3, H, W] preprocessed batch -> one Detections per image (network-input pixels)."""
        out = self.forward(images)
        if isinstance(out, tuple):  # decoded layout: (scores [B,N,C], boxes [B,N,4]) -> the same NMS only
            scores, boxes = (torch.as_tensor(o) for o in out)
            return [multiclass_nms(boxes[i], scores[i], score_thr, iou_thr, max_dets) for i in range(len(boxes))]
        hw = images.shape[2:]
        head = torch.as_tensor(out).float()  # on the backend's device (CPU for .pt files and exported models)
        priors = priors_for(hw, self.strides, head.device)
        return postprocess(head, priors, self.num_classes, self.reg_max, hw, score_thr, iou_thr, max_dets,
                           scores_are_logits=self.scores_are_logits)


def preprocess_batch(detector: Detector, images_bgr: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Preprocess BGR images with the detector's own settings -> ([B, 3, H, W], list of 3x3 matrices)."""
    pairs = [detector.preprocessing(img) for img in images_bgr]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


# ------------------------------------------------------------------------- exported-model metadata
# written by pipeline.infer.exporters (ONNX metadata_props, OpenVINO rt_info, a sidecar JSON for NCNN / MNN)
REQUIRED_METADATA = ("class_names", "input_size", "mean", "std", "strides", "reg_max", "preprocessing", "layout")


def sidecar_path(model_path: str | Path) -> Path:
    """The JSON next to an NCNN / MNN model that holds its metadata: ``model.mnn`` -> ``model.mnn.json``."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def read_sidecar(model_path: Path, fmt: str) -> dict[str, str]:
    path = sidecar_path(model_path)
    if not path.is_file():
        raise InferenceError(f"{fmt} model {model_path} has no metadata file {path} (class names, input size, "
                             "strides...); export it with `python -m pipeline.export` and keep both files together")
    return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}


class ExportedDetector(Detector):
    """A model written by pipeline.export for some runtime: everything but the forward pass comes from its
    metadata. The network input has a fixed H, W (the exported size); the batch axis is free."""

    scores_are_logits = False  # the graph applies the sigmoid to the class part
    fmt = ""

    def _init_metadata(self, path: Path, meta: dict[str, str], input_size: Sequence[int] | None) -> None:
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise InferenceError(f"{self.fmt} model {path} lacks the metadata {missing} that pipeline.export "
                                 "writes; export it with `python -m pipeline.export`")
        self.path, self.metadata = path, meta
        self.class_names = list(json.loads(meta["class_names"]))
        self.strides = tuple(int(s) for s in json.loads(meta["strides"]))
        self.reg_max = int(meta["reg_max"])
        self.layout = meta["layout"]
        exported = tuple(int(v) for v in json.loads(meta["input_size"]))
        size = tuple(int(v) for v in (input_size or exported))
        if size != exported:
            raise InferenceError(f"input size {list(size)} (width, height) does not fit the fixed-size {self.fmt} "
                                 f"model {path}, exported for {list(exported)}; use data.input_size={list(exported)} "
                                 "or re-export the model at the size you need")
        self.preprocessing = Preprocessing(size, meta["preprocessing"] == "letterbox",
                                           tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])))

    def outputs(self, outs: Sequence[np.ndarray]) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """The backend's outputs in graph order -> raw [B, N, C + 4(R+1)] or decoded (scores, boxes)."""
        return outs[0] if self.layout == "raw" else (outs[0], outs[1])

    def config_dict(self) -> dict | None:
        return json.loads(self.metadata["config"]) if "config" in self.metadata else None
