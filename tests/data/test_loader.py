"""Dataset, collate, samplers (train DDP sharding, eval sharding without padding), multi-scale, bench."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from pipeline.data import loader as loader_mod
from pipeline.data.dataset import DetectionDataset, collate
from pipeline.data.loader import (
    MultiScaleBatchSampler,
    ShardSampler,
    bench_data,
    build_loader,
    multi_scale_size,
)
from pipeline.data.transforms import warp_boxes
from pipeline.data.validate import DataError


def _fake_rank(monkeypatch, rank, world):
    monkeypatch.setattr(loader_mod.dist, "get_rank", lambda: rank)
    monkeypatch.setattr(loader_mod.dist, "get_world_size", lambda: world)


def test_train_loader_batch_contract(tiny_prepared, make_cfg):
    cfg = make_cfg(tiny_prepared)
    loader = build_loader(cfg, "train", train=True, distributed=False)
    assert len(loader) == 5  # 20 images, batch 4, drop_last
    loader.set_epoch(0)
    batch = next(iter(loader))
    assert batch["images"].shape == (4, 3, 64, 64) and batch["images"].dtype == torch.float32
    b, g = batch["gt_labels"].shape
    assert b == 4 and batch["gt_boxes"].shape == (4, g, 4) and batch["gt_valid"].dtype == torch.bool
    assert batch["gt_labels"].dtype == torch.int64 and batch["gt_boxes"].dtype == torch.float32
    valid = batch["gt_valid"]
    boxes = batch["gt_boxes"][valid]
    assert ((boxes >= 0) & (boxes <= 64)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    assert (batch["gt_boxes"][~valid] == 0).all() and (batch["gt_labels"][valid] < 5).all()
    meta = batch["meta"][0]
    assert isinstance(meta["image_id"], int) and meta["orig_size"] == (96, 96)
    assert np.asarray(meta["transform"]).shape == (3, 3) and meta["file"].endswith(".jpg")


def test_eval_items_match_the_json(tiny_prepared, make_cfg):
    cfg = make_cfg(tiny_prepared)
    ds = DetectionDataset(tiny_prepared / "val.json", cfg, train=False)
    coco = json.loads((tiny_prepared / "val.json").read_text())
    image, boxes, labels, meta = ds[0]
    assert image.shape == (3, 64, 64)
    rows = [a for a in coco["annotations"] if a["image_id"] == meta["image_id"]]
    expect = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in rows)]).reshape(-1, 4)
    np.testing.assert_allclose(boxes.numpy(), warp_boxes(expect, np.asarray(meta["transform"])), atol=1e-3)
    assert labels.tolist() == [a["category_id"] - 1 for a in rows]
    assert np.asarray(meta["transform"])[0, 0] == pytest.approx(64 / 96)


def test_eval_loader_each_image_once(tiny_prepared, make_cfg):
    cfg = make_cfg(tiny_prepared)
    ids = [m["image_id"] for batch in build_loader(cfg, "val", train=False, distributed=False) for m in batch["meta"]]
    coco = json.loads((tiny_prepared / "val.json").read_text())
    assert sorted(ids) == sorted(im["id"] for im in coco["images"])


def test_eval_sharding_over_ranks_has_no_padding(tiny_prepared, make_cfg, monkeypatch):
    cfg = make_cfg(tiny_prepared)
    seen = []
    for rank in range(3):  # 8 images over 3 ranks: 3 + 3 + 2, nothing repeated
        _fake_rank(monkeypatch, rank, 3)
        loader = build_loader(cfg, "val", train=False, distributed=True)
        seen += [m["image_id"] for batch in loader for m in batch["meta"]]
    assert len(seen) == 8 and len(set(seen)) == 8


def test_shard_sampler():
    shards = [list(ShardSampler(7, 3, r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(7)) and [len(s) for s in shards] == [3, 2, 2]
    with pytest.raises(ValueError, match="rank 3"):
        ShardSampler(7, 3, 3)


def test_train_sampler_two_ranks(tiny_prepared, make_cfg, monkeypatch):
    cfg = make_cfg(tiny_prepared)
    orders = {}
    for rank in range(2):
        _fake_rank(monkeypatch, rank, 2)
        loader = build_loader(cfg, "train", train=True, distributed=True)
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 2
        loader.set_epoch(3)
        orders[rank] = list(loader.sampler)
    assert len(orders[0]) == len(orders[1]) == 10
    assert sorted(orders[0] + orders[1]) == list(range(20))  # no sample lost or duplicated
    # an odd count is padded by DistributedSampler, and only by repeating samples
    parts = [list(DistributedSampler(range(7), num_replicas=2, rank=r, shuffle=True, seed=0)) for r in range(2)]
    assert set(parts[0] + parts[1]) == set(range(7)) and len(parts[0] + parts[1]) == 8


def test_set_epoch_reshuffles_deterministically(tiny_prepared, make_cfg):
    loader = build_loader(make_cfg(tiny_prepared), "train", train=True, distributed=False)
    loader.set_epoch(0)
    e0 = list(loader.sampler)
    loader.set_epoch(1)
    e1 = list(loader.sampler)
    loader.set_epoch(0)
    assert e0 != e1 and list(loader.sampler) == e0


def test_multi_scale(tiny_prepared, make_cfg, monkeypatch):
    cfg = make_cfg(tiny_prepared, "data.augment.multi_scale=[0.5,1.6]")
    sizes = {}
    for rank in range(2):
        _fake_rank(monkeypatch, rank, 2)
        loader = build_loader(cfg, "train", train=True, distributed=True)
        assert isinstance(loader.batch_sampler, MultiScaleBatchSampler)
        loader.set_epoch(2)
        sizes[rank] = [batch[0][1] for batch in loader.batch_sampler]
    stride = max(cfg.model.head.strides)
    assert sizes[0] == sizes[1]  # every rank uses the same size for the same step
    assert all(w % stride == 0 and h % stride == 0 for w, h in sizes[0]) and len(set(sizes[0])) > 1
    batch = next(iter(loader))
    s = batch["images"].shape[-1]
    assert s % stride == 0 and batch["images"].shape[-2] == s
    assert multi_scale_size((320, 192), 1.1, 32) == (352, 224) and multi_scale_size((64, 64), 0.1, 64) == (64, 64)


def test_collate_pads_and_rejects_mixed_sizes():
    item = lambda k, s=8: (torch.zeros(3, s, s), torch.ones(k, 4), torch.arange(k), {"image_id": k})
    out = collate([item(0), item(2)])
    assert out["gt_boxes"].shape == (2, 2, 4) and out["gt_valid"].tolist() == [[False, False], [True, True]]
    assert collate([item(0), item(0)])["gt_boxes"].shape == (2, 0, 4)
    with pytest.raises(ValueError, match="different sizes"):
        collate([item(1, 8), item(1, 16)])


def test_workers_are_seeded(tiny_prepared, make_cfg):
    cfg = make_cfg(tiny_prepared, "data.num_workers=2")
    first = []
    for _ in range(2):
        loader = build_loader(cfg, "train", train=True, distributed=False)
        loader.set_epoch(0)
        it = iter(loader)
        first.append([next(it)["images"], next(it)["images"]])  # one batch from each worker
    torch.testing.assert_close(first[0][0], first[1][0])  # same seed -> same augmentation
    torch.testing.assert_close(first[0][1], first[1][1])


def test_dataset_errors(tiny_prepared, make_cfg, tmp_path):
    with pytest.raises(DataError, match="model.num_classes=3"):
        DetectionDataset(tiny_prepared / "train.json", make_cfg(tiny_prepared, "model.num_classes=3"), train=True)
    with pytest.raises(DataError, match="run `python -m pipeline.prepare`"):
        build_loader(make_cfg(tmp_path), "train", train=True, distributed=False)


def test_small_split_keeps_a_partial_batch(tiny_prepared, make_cfg):
    loader = build_loader(make_cfg(tiny_prepared, "data.batch_size=32"), "train", train=True, distributed=False)
    assert len(loader) == 1 and next(iter(loader))["images"].shape[0] == 20


def test_bench_data(tiny_prepared, make_cfg, capsys):
    out = bench_data(make_cfg(tiny_prepared, "data.num_workers=2"), num_batches=3)
    assert out["num_images"] == 12 and out["augment_ms"] > 0 and out["read_ms"] > 0
    # the rates are the same report's images over its seconds
    assert out["images_per_s"] == pytest.approx(out["num_images"] / out["seconds"], rel=1e-9)
    assert out["images_per_s_per_worker"] == pytest.approx(out["images_per_s"] / max(1, out["num_workers"]), rel=1e-9)
    assert "images/s" in capsys.readouterr().out
