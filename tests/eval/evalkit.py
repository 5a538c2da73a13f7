"""Helpers for the evaluate / export / predict tests: tiny prepared datasets and checkpoints.

Images are 96x64 (non-square) with coloured rectangles; the model is ShuffleNetV2-0.5x with perturbed
BatchNorm statistics (so that every layer matters for parity) and zero class biases (so that a
random model still produces detections above the score threshold).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from pipeline.config import compose, to_dict

CLASSES = ["square", "disc", "bar"]
INPUT_SIZE = [192, 128]  # [w, h]: non-square on purpose


def write_split(folder: Path, split: str, n: int, seed: int, size=(96, 64)) -> Path:
    """``n`` images with 1-3 boxes each; COCO json with categories 1..C and relative file names."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    w, h = size
    for i in range(n):
        img = np.full((h, w, 3), 90, np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(10, 30)), int(rng.integers(10, 30))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            label = int(rng.integers(0, len(CLASSES)))
            cv2.rectangle(img, (x, y), (x + bw - 1, y + bh - 1), [(255, 0, 0), (0, 255, 0), (0, 0, 255)][label], -1)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": label + 1,
                         "bbox": [float(x), float(y), float(bw), float(bh)], "area": float(bw * bh), "iscrowd": 0})
        name = f"images/{split}_{i}.png"
        cv2.imwrite(str(folder / name), img)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]
    path = folder / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def tiny_cfg(prepared: Path, out: Path, extra: list[str] | None = None):
    return compose([
        "model=nanodet_plus_m_0.5x", f"model.num_classes={len(CLASSES)}", f"data.class_names=[{','.join(CLASSES)}]",
        f"data.prepared_dir={prepared}", f"data.input_size=[{INPUT_SIZE[0]},{INPUT_SIZE[1]}]",
        "data.eval_batch_size=3", "data.num_workers=0", "train.device=cpu",
        f"eval.out_dir={out / 'evaluate'}", f"export.out_dir={out / 'export'}", f"predict.out_dir={out / 'predict'}",
        "export.verify_images=4", "eval.num_vis_images=4", *(extra or []),
    ])


def perturbed_model(cfg, seed: int = 0):
    """The inference model with random BN statistics and zero class biases (eval mode)."""
    from pipeline.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg.model, with_aux=False)
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    for conv in model.head.gfl_cls:
        conv.bias.data[: model.num_classes] = 0.0
    return model.eval()


def save_tiny_checkpoint(path: Path, cfg, seed: int = 0) -> Path:
    from pipeline.model.checkpoint import save_checkpoint

    state = perturbed_model(cfg, seed).state_dict()
    return save_checkpoint(path, {"model": state, "ema": state, "config": to_dict(cfg), "epoch": 1, "step": 1})
