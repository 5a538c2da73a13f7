"""DetectionDataset over a prepared COCO json, and the collate that builds the ground-truth batch.

Batch contract (consumed by the loss and the training step)::

    {"images":    float32 [B, 3, H, W] normalised,
     "gt_boxes":  float32 [B, G, 4] xyxy in network-input pixels (zero rows where padded),
     "gt_labels": int64   [B, G] class index 0..C-1 (0 where padded),
     "gt_valid":  bool    [B, G],
     "meta":      [{"image_id", "file", "orig_size": (h, w), "transform": 3x3 list}] * B}

G is the largest box count in the batch (may be 0). Crowd boxes (iscrowd=1) are left out of the
targets, as the official code does; COCO evaluation reads them from the json.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.data.formats import load_json
from pipeline.data.transforms import TrainTransform, preprocess, read_image, warp_boxes
from pipeline.data.validate import DataError


class Record(NamedTuple):
    image_id: int
    path: str
    boxes: np.ndarray  # float32 [k, 4] xyxy original pixels
    labels: np.ndarray  # int64 [k]


def resolve_file(file_name: str, json_dir: Path) -> str:
    """Prepared jsons hold absolute paths or paths relative to the json's folder."""
    p = Path(file_name)
    return str(p if p.is_absolute() else json_dir / p)


def load_records(json_path: Path, class_names: Sequence[str]) -> tuple[list[Record], list[str]]:
    """Read a prepared COCO json -> (records sorted by image id, class names in label order)."""
    if not json_path.is_file():
        raise DataError(f"prepared data '{json_path}' not found; run `python -m pipeline.prepare` (or `dvc repro "
                        "prepare`) first, with the same data.prepared_dir")
    coco = load_json(json_path)
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    names = [c["name"] for c in cats]
    if class_names and list(class_names) != names:
        raise DataError(f"'{json_path}' has classes {names} but data.class_names is {list(class_names)}; re-run "
                        "`python -m pipeline.prepare` with this config")
    label_of = {c["id"]: k for k, c in enumerate(cats)}
    per_image: dict[int, list] = {im["id"]: [] for im in coco["images"]}
    for a in coco.get("annotations", []):
        if a.get("iscrowd", 0) or a["image_id"] not in per_image:
            continue
        x, y, w, h = a["bbox"]
        per_image[a["image_id"]].append((x, y, x + w, y + h, label_of[a["category_id"]]))
    records = []
    for im in sorted(coco["images"], key=lambda im: im["id"]):
        rows = np.asarray(per_image[im["id"]], np.float64).reshape(-1, 5)
        records.append(Record(im["id"], resolve_file(im["file_name"], json_path.parent),
                              rows[:, :4].astype(np.float32), rows[:, 4].astype(np.int64)))
    return records, names


def check_prepared(json_path: Path, cfg: Any) -> tuple[list[Record], list[str]]:
    """A prepared split's records and class names, checked against ``data.class_names`` and
    ``model.num_classes`` (DataError naming the file and the fix)."""
    records, class_names = load_records(Path(json_path), list(cfg.data.class_names))
    if len(class_names) != int(cfg.model.num_classes):
        raise DataError(f"'{json_path}' has {len(class_names)} classes {class_names} but "
                        f"model.num_classes={cfg.model.num_classes}; re-run `python -m pipeline.prepare` with "
                        "this config or set model.num_classes")
    return records, class_names


class DetectionDataset(Dataset):
    """Items: (image float32 [3, h, w], boxes float32 [k, 4] network-input xyxy, labels int64 [k], meta).

    ``train=True`` applies the official augmentation; otherwise ``preprocess`` (the evaluation/export
    preprocessing). An index may be ``(i, (w, h))`` to ask for another input size (multi-scale).
    """

    def __init__(self, json_path: str | Path, cfg: Any, train: bool, seed: int | None = None):
        d = cfg.data
        self.json_path = Path(json_path)
        self.records, self.class_names = check_prepared(self.json_path, cfg)
        self.train = train
        self.input_size = (int(d.input_size[0]), int(d.input_size[1]))
        self.keep_ratio, self.mean, self.std = bool(d.keep_ratio), list(d.mean), list(d.std)
        self.transform = (TrainTransform(d.augment, self.input_size, self.keep_ratio, self.mean, self.std, seed)
                          if train else None)

    def __len__(self) -> int:
        return len(self.records)

    def reseed(self, seed: int) -> None:
        if self.transform is not None:
            self.transform.reseed(seed)

    def __getitem__(self, item: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        index, size = item if isinstance(item, tuple) else (item, None)
        rec = self.records[index]
        img = read_image(rec.path)
        dst = tuple(size) if size else self.input_size
        if self.transform is not None:
            chw, boxes, labels, M = self.transform(img, rec.boxes, rec.labels, dst)
        else:
            chw, M = preprocess(img, dst, self.keep_ratio, self.mean, self.std)
            boxes = np.clip(warp_boxes(rec.boxes, M), 0, [dst[0], dst[1]] * 2).astype(np.float32)
            labels = rec.labels
        meta = {"image_id": rec.image_id, "file": rec.path, "orig_size": (img.shape[0], img.shape[1]),
                "transform": M.tolist()}
        return (torch.from_numpy(chw), torch.from_numpy(np.asarray(boxes, np.float32).reshape(-1, 4)),
                torch.from_numpy(np.asarray(labels, np.int64).reshape(-1)), meta)


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]]) -> dict:
    """Stack images (all the same size) and pad the boxes to the largest count G in the batch."""
    sizes = {tuple(item[0].shape) for item in batch}
    if len(sizes) != 1:
        raise ValueError(f"images in one batch have different sizes {sorted(sizes)}; all items of a batch must "
                         "use the same input size")
    b, g = len(batch), max(len(item[1]) for item in batch)
    gt_boxes = torch.zeros(b, g, 4, dtype=torch.float32)
    gt_labels = torch.zeros(b, g, dtype=torch.int64)
    gt_valid = torch.zeros(b, g, dtype=torch.bool)
    for i, (_, boxes, labels, _) in enumerate(batch):
        k = len(boxes)
        gt_boxes[i, :k], gt_labels[i, :k], gt_valid[i, :k] = boxes, labels, True
    # numpy's single-threaded copy: torch.stack goes through OpenMP, which stalls on a busy machine
    images = torch.from_numpy(np.stack([item[0].numpy() for item in batch]))
    return {"images": images, "gt_boxes": gt_boxes, "gt_labels": gt_labels,
            "gt_valid": gt_valid, "meta": [item[3] for item in batch]}
