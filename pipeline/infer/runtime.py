"""Inference runners behind one interface: a PyTorch checkpoint (.pt), an exported ONNX model (.onnx), or
the model being trained (in memory, for validation during training).

Both run THE one preprocessing (:func:`pipeline.data.transforms.preprocess`) and THE one decoder
(:func:`pipeline.model.decode.postprocess`); they differ only in what produces the head output.
evaluate, predict, export verification and bench all go through :func:`load_detector`.

ONNX models carry everything needed to run them in ``metadata_props`` (written by pipeline.export):
class names, input size, mean/std, strides, reg_max, preprocessing mode, output layout, thresholds.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config, from_dict, to_dict
from pipeline.data.transforms import preprocess
from pipeline.errors import UserError
from pipeline.model.checkpoint import load_model_for_inference
from pipeline.model.decode import Detections, multiclass_nms, postprocess, priors_for
from pipeline.perf import autocast

TORCH_SUFFIXES = (".pt", ".pth")


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
        head = torch.as_tensor(out).float()  # on the backend's device (CPU for .pt files and ONNX)
        priors = priors_for(hw, self.strides, head.device)
        return postprocess(head, priors, self.num_classes, self.reg_max, hw, score_thr, iou_thr, max_dets,
                           scores_are_logits=self.scores_are_logits)


class TorchDetector(Detector):
    """A checkpoint of ours: EMA weights (when present) of the inference model (no aux branch)."""

    backend = "torch"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 input_size: Sequence[int] | None = None):
        self.path = Path(path)
        self.device = torch.device(device)
        model, cfg = load_model_for_inference(self.path, self.device)
        self.model, self.cfg = model.eval(), cfg if not isinstance(cfg, dict) else from_dict(cfg)
        self.class_names = class_names_from_config(self.cfg)
        self.strides = tuple(int(s) for s in self.model.strides)
        self.reg_max = int(self.model.reg_max)
        size = tuple(int(v) for v in (input_size or self.cfg.data.input_size))
        if any(v % max(self.strides) for v in size):
            raise InferenceError(f"input size {list(size)} for {self.path} is not a multiple of the largest "
                                 f"stride {max(self.strides)}; use e.g. "
                                 f"{[max(1, round(v / max(self.strides))) * max(self.strides) for v in size]}")
        d = self.cfg.data
        self.preprocessing = Preprocessing(size, bool(d.keep_ratio), tuple(d.mean), tuple(d.std))

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> torch.Tensor:
        return self.model(torch.from_numpy(np.ascontiguousarray(images)).to(self.device)).float().cpu()

    def config_dict(self) -> dict:
        return to_dict(self.cfg)


class ModuleDetector(Detector):
    """The model being trained, in memory (its EMA when there is one): validation during training runs
    through THE evaluation like any checkpoint. Eval mode only while detecting; autocast as in training."""

    backend = "torch"

    def __init__(self, model: torch.nn.Module, cfg: Config, device: torch.device, amp_dtype: torch.dtype | None):
        self.model, self.device, self.amp_dtype = model, torch.device(device), amp_dtype
        self.path = Path(cfg.train.out_dir)
        self.class_names = class_names_from_config(cfg)
        self.strides = tuple(int(s) for s in model.strides)
        self.reg_max = int(model.reg_max)
        d = cfg.data
        self.preprocessing = Preprocessing(tuple(int(v) for v in d.input_size), bool(d.keep_ratio), tuple(d.mean),
                                           tuple(d.std))

    @torch.no_grad()
    def forward(self, images: np.ndarray) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with autocast(self.device, self.amp_dtype):
                batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
                head_out = self.model(batch)
            return head_out.float()
        finally:
            self.model.train(was_training)


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx  # optional heavy dependency, only for .onnx files

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


REQUIRED_METADATA = ("class_names", "input_size", "mean", "std", "strides", "reg_max", "preprocessing", "layout")


class OnnxDetector(Detector):
    """An ONNX model written by pipeline.export, run with onnxruntime (CPU by default).

    ``input_size`` (w, h) must equal the exported size (the graph has fixed H, W); None uses it.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, input_size: Sequence[int] | None = None, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort  # optional heavy dependency, only for .onnx files

        self.path = Path(path)
        meta = read_onnx_metadata(self.path)
        missing = [k for k in REQUIRED_METADATA if k not in meta]
        if missing:
            raise InferenceError(f"ONNX model {self.path} lacks the metadata {missing} that pipeline.export "
                                 "writes; export it with `python -m pipeline.export`")
        self.metadata = meta
        self.class_names = list(json.loads(meta["class_names"]))
        self.strides = tuple(int(s) for s in json.loads(meta["strides"]))
        self.reg_max = int(meta["reg_max"])
        self.layout = meta["layout"]
        self.scores_are_logits = False  # the graph applies the sigmoid to the class part
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=list(providers))
        except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own untyped errors
            raise InferenceError(f"onnxruntime cannot load {self.path}: {str(err).splitlines()[0][:300]}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        batch, _, height, width = inp.shape
        self.fixed_batch = batch if isinstance(batch, int) else None
        exported = tuple(json.loads(meta["input_size"]))
        size = tuple(int(v) for v in (input_size or exported))
        graph_wh = (width, height)
        if all(isinstance(v, int) for v in graph_wh) and size != graph_wh:
            raise InferenceError(f"input size {list(size)} (width, height) does not fit the fixed-size ONNX model "
                                 f"{self.path}, exported for {list(graph_wh)}; use data.input_size={list(graph_wh)} "
                                 "or re-export the model at the size you need")
        self.preprocessing = Preprocessing(size, meta["preprocessing"] == "letterbox",
                                           tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"])))

    def _run(self, images: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})

    def forward(self, images: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Raw layout -> [B, N, C + 4(R+1)] (probabilities + DFL logits); decoded -> (scores, boxes)."""
        if self.fixed_batch is None or len(images) == self.fixed_batch:
            outs = self._run(images)
        else:  # a fixed-batch graph: run in chunks, padding the last one
            b = self.fixed_batch
            chunks = []
            for i in range(0, len(images), b):
                part = images[i:i + b]
                pad = np.zeros((b - len(part), *part.shape[1:]), dtype=np.float32)
                chunks.append([o[:len(part)] for o in self._run(np.concatenate([part, pad]))])
            outs = [np.concatenate(parts) for parts in zip(*chunks)]
        return outs[0] if self.layout == "raw" else (outs[0], outs[1])

    def config_dict(self) -> dict | None:
        return json.loads(self.metadata["config"]) if "config" in self.metadata else None


def check_model_file(path: str | Path) -> Path:
    """``path`` as a Path; an InferenceError naming it when there is no such file (checked before any work)."""
    path = Path(path)
    if not path.is_file():
        hint = ("train a model first (`python -m pipeline.train`) or point eval.checkpoint / predict.checkpoint "
                "to an existing .pt or .onnx file")
        raise InferenceError(f"model file {path} does not exist; {hint}")
    return path


def load_detector(path: str | Path, device: str | torch.device = "cpu", input_size: Sequence[int] | None = None,
                  threads: int | None = None) -> Detector:
    """A .pt checkpoint of ours or an .onnx written by pipeline.export; a clear error otherwise."""
    path = check_model_file(path)
    if path.suffix == ".onnx":
        return OnnxDetector(path, input_size=input_size, threads=threads)
    if path.suffix in TORCH_SUFFIXES:
        return TorchDetector(path, device=device, input_size=input_size)
    raise InferenceError(f"model file {path}: unknown type '{path.suffix}'; expected a .pt checkpoint or an .onnx model")


def preprocess_batch(detector: Detector, images_bgr: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Preprocess BGR images with the detector's own settings -> ([B, 3, H, W], list of 3x3 matrices)."""
    pairs = [detector.preprocessing(img) for img in images_bgr]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]
