"""PyTorch runtimes: a checkpoint of ours (.pt) and the model being trained (in memory)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config, from_dict, to_dict
from pipeline.infer.runtime.base import Detector, InferenceError, Preprocessing, class_names_from_config
from pipeline.model.checkpoint import load_model_for_inference
from pipeline.perf import autocast

TORCH_SUFFIXES = (".pt", ".pth")


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
        # the backbone's stride-32 map must divide the input; extra levels (64, 128) use ceil like the official
        # code (the 416 preset: 416 / 64 -> 7 x 7), as pipeline.config checks data.input_size
        largest = min(max(self.strides), 32)
        if any(v % largest for v in size):
            raise InferenceError(f"input size {list(size)} for {self.path} is not a multiple of the largest "
                                 f"backbone stride {largest}; use e.g. "
                                 f"{[max(1, round(v / largest)) * largest for v in size]}")
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
