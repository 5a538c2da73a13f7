"""ONNX export: parity with PyTorch (raw and decoded, batch 1 and 3, non-square), metadata, stage checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from evalkit import CLASSES, INPUT_SIZE, perturbed_model, tiny_cfg

from pipeline.infer.export import HEADLINE, ExportError, check_parity, export_model
from pipeline.infer.exporters.onnx_export import ExportModule, build_metadata, export_onnx, write_metadata
from pipeline.infer.runtime import (
    InferenceError,
    OnnxDetector,
    Preprocessing,
    TorchDetector,
    read_onnx_metadata,
)

W, H = INPUT_SIZE
THRESHOLDS = {"score_thr": 0.05, "iou_thr": 0.6, "max_dets": 100}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    cfg = tiny_cfg(tmp_path_factory.mktemp("unused"), tmp_path_factory.mktemp("out"))
    return cfg, perturbed_model(cfg, seed=3)


def _export(cfg, model, path, decode: bool, dynamic: bool = True):
    module = ExportModule(model, (H, W), decode_in_graph=decode)
    export_onnx(module, path, opset=17, dynamic_batch=dynamic)
    pre = Preprocessing((W, H), False, tuple(cfg.data.mean), tuple(cfg.data.std))
    meta = build_metadata({"model": {"x": 1}}, CLASSES, pre, model.strides, model.reg_max, decode, THRESHOLDS)
    write_metadata(path, meta)
    return module, meta


@pytest.mark.parametrize("decode", [False, True], ids=["raw", "decoded"])
def test_parity_dynamic_batch_non_square(model, tmp_path, decode):
    cfg, net = model
    path = tmp_path / "m.onnx"
    module, _ = _export(cfg, net, path, decode)
    det = OnnxDetector(path)
    graph_in = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in graph_in] == ["batch", 3, H, W]  # [w, h] config -> [B, 3, h, w]
    n = sum((H // s) * (W // s) for s in net.strides)
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 3, H, W)).astype(np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x))
        out = det.forward(x)
        ref, out = (ref, out) if decode else ((ref,), (out,))
        for r, o in zip(ref, out):
            assert o.shape == tuple(r.shape) and o.shape[:2] == (batch, n)
            np.testing.assert_allclose(o, r.numpy(), atol=1e-4, rtol=0)
    if not decode:  # class part are probabilities, box part raw logits (the official layout)
        assert 0.0 <= out[0][..., : len(CLASSES)].min() and out[0][..., : len(CLASSES)].max() <= 1.0


def test_decoded_and_raw_give_the_same_detections(model, tmp_path):
    cfg, net = model
    raw_path, dec_path = tmp_path / "raw.onnx", tmp_path / "dec.onnx"
    _export(cfg, net, raw_path, False)
    _export(cfg, net, dec_path, True)
    x = np.random.default_rng(0).standard_normal((2, 3, H, W)).astype(np.float32)
    a = OnnxDetector(raw_path).detect(x, 0.3, 0.6, 50)
    b = OnnxDetector(dec_path).detect(x, 0.3, 0.6, 50)
    assert sum(len(d.scores) for d in a) > 0
    for da, db in zip(a, b):
        np.testing.assert_allclose(da.boxes.numpy(), db.boxes.numpy(), atol=1e-3)
        np.testing.assert_array_equal(da.labels.numpy(), db.labels.numpy())


def test_metadata_round_trip_and_fixed_size_error(model, tmp_path):
    cfg, net = model
    path = tmp_path / "m.onnx"
    _, meta = _export(cfg, net, path, False, dynamic=False)
    assert read_onnx_metadata(path) == meta
    det = OnnxDetector(path)
    assert det.class_names == CLASSES and det.layout == "raw" and det.reg_max == net.reg_max
    assert det.preprocessing == Preprocessing((W, H), False, tuple(cfg.data.mean), tuple(cfg.data.std))
    assert det.strides == tuple(net.strides) and det.fixed_batch == 1
    assert json.loads(meta["input_size"]) == [W, H] and meta["preprocessing"] == "stretch"
    for key in ("package_version", "config_hash", "config", "score_thr", "iou_thr", "mean", "std"):
        assert meta[key]
    x = np.random.default_rng(0).standard_normal((3, 3, H, W)).astype(np.float32)  # fixed batch 1: chunked
    assert det.forward(x).shape[0] == 3
    with pytest.raises(InferenceError, match=r"input size \[128, 128\].*does not fit the fixed-size ONNX.*\[192, 128\]"):
        OnnxDetector(path, input_size=[128, 128])
    bare = tmp_path / "bare.onnx"
    export_onnx(ExportModule(net, (H, W), False), bare)
    with pytest.raises(InferenceError, match="lacks the metadata"):
        OnnxDetector(bare)


def test_parity_check_fails_loudly(model, tmp_path):
    cfg, net = model
    path = tmp_path / "m.onnx"
    module, _ = _export(cfg, net, path, False)
    x = np.random.default_rng(0).standard_normal((2, 3, H, W)).astype(np.float32)
    assert check_parity(module, OnnxDetector(path), x, atol=1e-3) < 1e-4
    with pytest.raises(ExportError, match="differs from PyTorch"):
        check_parity(module, OnnxDetector(path), x, atol=1e-12)


def _ground_truth_from_model(tiny) -> None:
    """Replace val.json's boxes by the model's own top detections, so mAP is high and the torch/ONNX
    comparison below is meaningful (a random model scores ~0 on the drawn rectangles)."""
    from pipeline.data.transforms import read_image
    from pipeline.infer.evaluate import image_records
    from pipeline.infer.predict import detect_image

    _, ckpt, prepared, _ = tiny
    gt = json.loads((prepared / "val.json").read_text())
    det = TorchDetector(ckpt, input_size=INPUT_SIZE)
    anns = []
    for image_id, path in image_records(gt, prepared):
        for d in detect_image(det, read_image(path), 0.05, 0.6, 3):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": d["category_id"],
                         "bbox": d["bbox"], "area": d["bbox"][2] * d["bbox"][3], "iscrowd": 0})
    gt["annotations"] = anns
    (prepared / "val_model.json").write_text(json.dumps(gt))


def test_export_stage_end_to_end_with_int8(tiny, tmp_path, monkeypatch):
    _, ckpt, prepared, _ = tiny
    _ground_truth_from_model(tiny)
    monkeypatch.setattr("pipeline.infer.evaluate.split_json",
                        lambda c, split="val": prepared / ("val_model.json" if split == "val" else f"{split}.json"))
    # a bound of 1.0 accepts any INT8 model: this test is about the files; the bound has its own test below
    cfg = tiny_cfg(prepared, tmp_path, [f"export.checkpoint={ckpt}", "export.int8=true", "export.calib_images=4",
                                        "export.int8_max_map_drop=1.0"])
    report = export_model(cfg)
    saved = json.loads((tmp_path / "export" / "export.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["int8"]["rejected"] is False and report["int8"]["max_map_drop"] == 1.0
    # metrics.json (the DVC metric): a few flat headline numbers, equal to the report's
    headline = json.loads((tmp_path / "export" / "metrics.json").read_text())
    assert list(headline) == list(HEADLINE[:8]) and all(type(v) is float for v in headline.values())  # ONNX + INT8
    assert headline["map_onnx"] == report["map_onnx"] and headline["int8_map_drop"] == report["int8"]["map_drop"]
    assert headline["onnxruntime_p50_ms"] == report["latency_ms"]["onnxruntime"]["p50_ms"]
    assert report["max_abs_diff"] <= 1e-3 and report["verify_images"] == 4
    assert report["map_torch"] > 0.5  # the ground truth is the model's own output
    assert abs(report["map_torch"] - report["map_onnx"]) <= cfg.export.map_tolerance
    assert report["int8"]["map_drop"] == pytest.approx(report["map_onnx"] - report["int8"]["map"])
    assert (tmp_path / "export" / "model.int8.onnx").is_file()
    assert set(report["latency_ms"]) == {"torch", "onnxruntime", "onnxruntime_int8"}
    onnx_metrics_det = OnnxDetector(tmp_path / "export" / "model.onnx")
    assert onnx_metrics_det.class_names == CLASSES and onnx_metrics_det.preprocessing.input_size == tuple(INPUT_SIZE)

    def worse(detector, cfg, out_dir=None):
        return {"mAP": 0.5 if detector.backend == "torch" else 0.4}

    monkeypatch.setattr("pipeline.infer.evaluate.evaluate_detector", worse)
    cfg = tiny_cfg(prepared, tmp_path / "again", [f"export.checkpoint={ckpt}"])
    with pytest.raises(ExportError, match=r"ONNX mAP 0.4000 differs from PyTorch mAP 0.5000"):
        export_model(cfg)


def _int8_scores(map_int8: float):
    """evaluate_detector stand-in: PyTorch and fp32 ONNX score 0.5, the INT8 model ``map_int8``."""
    def fake(detector, cfg, out_dir=None, **_):
        return {"mAP": map_int8 if "int8" in Path(str(detector.path)).name else 0.5}
    return fake


def test_int8_map_drop_bound_both_sides(tiny, tmp_path, monkeypatch):
    """The real export stage (real quantization) with the mAPs fixed: INT8 is 0.05 below fp32."""
    _, ckpt, prepared, _ = tiny
    monkeypatch.setattr("pipeline.infer.evaluate.evaluate_detector", _int8_scores(0.45))
    base = [f"export.checkpoint={ckpt}", "export.int8=true", "export.calib_images=2"]
    out = tmp_path / "export"

    # within the bound (a drop equal to it passes): the INT8 model and the headline metrics are written
    report = export_model(tiny_cfg(prepared, tmp_path, [*base, "export.int8_max_map_drop=0.05"]))
    assert report["int8"]["map_drop"] == pytest.approx(0.05) and report["int8"]["rejected"] is False
    assert (out / "model.int8.onnx").is_file()
    assert json.loads((out / "metrics.json").read_text())["int8_map"] == 0.45

    # beyond it: the stage fails naming both mAPs, the drop and the key; the INT8 file is deleted, the fp32
    # model stays usable, export.json says why, and no metrics.json claims a finished export
    with pytest.raises(ExportError) as err:
        export_model(tiny_cfg(prepared, tmp_path, [*base, "export.int8_max_map_drop=0.04"]))
    msg = str(err.value)
    for part in ("INT8 mAP 0.4500", "0.0500 below the fp32 ONNX mAP 0.5000", "export.int8_max_map_drop=0.04",
                 "export.int8=false", "model.int8.onnx"):
        assert part in msg, msg
    assert not (out / "model.int8.onnx").exists() and not (out / "metrics.json").exists()
    saved = json.loads((out / "export.json").read_text())
    assert saved["int8"]["rejected"] is True and saved["int8"]["path"] is None and saved["int8"]["map"] == 0.45
    fp32 = OnnxDetector(out / "model.onnx")
    assert fp32.class_names == CLASSES and fp32.forward(np.zeros((1, 3, H, W), np.float32)).shape[0] == 1


def test_int8_bound_is_validated():
    from pipeline.config import ConfigError, compose

    assert compose([]).export.int8_max_map_drop == 0.01
    for bad in ("-0.1", "1.5", "nan"):
        with pytest.raises(ConfigError, match=rf"export.int8_max_map_drop: must be in \[0, 1\].*got {bad}"):
            compose([f"export.int8_max_map_drop={bad}"])


INJECT = """
from pathlib import Path
import pipeline.infer.evaluate as ev
real = ev.evaluate_detector
def lowered(detector, cfg, out_dir=None, **kw):  # the real evaluation; the INT8 model's mAP made 0.3 lower
    out = real(detector, cfg, out_dir, **kw)
    return {**out, "mAP": out["mAP"] - 0.3} if "int8" in Path(str(detector.path)).name else out
ev.evaluate_detector = lowered
from pipeline.export import main
main()
"""


@pytest.mark.slow
def test_int8_drop_fails_the_entry_point_with_exit_2(tiny, tmp_path):
    _, ckpt, prepared, _ = tiny
    args = [sys.executable, "-c", INJECT, "model=nanodet_plus_m_0.5x", f"model.num_classes={len(CLASSES)}",
            f"data.prepared_dir={prepared}", f"data.input_size=[{W},{H}]", "data.num_workers=0",
            "data.eval_batch_size=3", f"export.checkpoint={ckpt}", f"export.out_dir={tmp_path / 'export'}",
            "export.verify_images=4", "export.int8=true", "export.calib_images=2", "export.int8_max_map_drop=0.2",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "below the fp32 ONNX mAP" in errors[0] and "export.int8_max_map_drop=0.2" in errors[0], errors[0]
    assert (tmp_path / "export" / "model.onnx").is_file()
    assert not (tmp_path / "export" / "model.int8.onnx").exists()
