"""`pipeline.predict`: expected boxes, drawing, folders with a broken image, video, ONNX, errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from evalkit import CLASSES, INPUT_SIZE, tiny_cfg

from pipeline.config import ConfigError
from pipeline.data.transforms import preprocess
from pipeline.infer.runtime import InferenceError, TorchDetector
from pipeline.predict import expand_shorthands, run_predict


def _expected(ckpt, img: np.ndarray, score_thr: float) -> list[list[float]]:
    """Boxes computed outside predict: the shared preprocessing, detect, then a per-axis rescale by hand."""
    det = TorchDetector(ckpt)
    pre = det.preprocessing
    chw, _ = preprocess(img, list(INPUT_SIZE), False, pre.mean, pre.std)
    out = det.detect(chw[None], score_thr, 0.6, 100)[0]
    sx, sy = img.shape[1] / INPUT_SIZE[0], img.shape[0] / INPUT_SIZE[1]
    return [[x1 * sx, y1 * sy, (x2 - x1) * sx, (y2 - y1) * sy] for x1, y1, x2, y2 in out.boxes.tolist()]


def test_predict_folder_boxes_drawing_and_broken_image(tiny, tmp_path):
    cfg, ckpt, prepared, _ = tiny
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    shutil.copy(prepared / "images" / "val_0.png", src / "a.png")
    shutil.copy(prepared / "images" / "val_1.png", src / "sub" / "b.png")
    (src / "broken.jpg").write_bytes(b"not an image")
    cfg = tiny_cfg(prepared, tmp_path, [f"predict.source={src}", f"predict.checkpoint={ckpt}", "predict.score_thr=0.3"])
    summary = run_predict(cfg)
    assert summary["failed"] == [str(src / "broken.jpg")] and summary["images"] == 2
    preds = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    assert preds and set(preds[0]) == {"image", "bbox", "score", "category_id", "category"}
    assert all(p["score"] >= 0.3 and p["category"] == CLASSES[p["category_id"] - 1] for p in preds)
    img = cv2.imread(str(src / "a.png"))
    got = [p["bbox"] for p in preds if p["image"] == str(src / "a.png")]
    np.testing.assert_allclose(got, _expected(ckpt, img, 0.3), atol=0.02)
    drawn = cv2.imread(str(tmp_path / "predict" / "images" / "a.png"))
    assert drawn.shape == img.shape and np.abs(drawn.astype(int) - img).sum() > 0  # boxes were drawn
    assert (tmp_path / "predict" / "images" / "sub" / "b.png").is_file()


def test_predict_video_with_onnx(tiny, tmp_path):
    from pipeline.infer.exporters.onnx_export import ExportModule, build_metadata, export_onnx, write_metadata

    cfg, ckpt, prepared, _ = tiny
    det = TorchDetector(ckpt)
    onnx_path = export_onnx(ExportModule(det.model, det.preprocessing.input_hw, False), tmp_path / "m.onnx")
    write_metadata(onnx_path, build_metadata(det.config_dict(), CLASSES, det.preprocessing, det.strides, det.reg_max,
                                             False, {"score_thr": 0.05, "iou_thr": 0.6, "max_dets": 100}))
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (96, 64))
    frame = cv2.imread(str(prepared / "images" / "val_0.png"))
    for _ in range(3):
        writer.write(frame)
    writer.release()
    cfg = tiny_cfg(prepared, tmp_path, [f"predict.source={video}", f"predict.checkpoint={onnx_path}",
                                        "predict.score_thr=0.3"])
    summary = run_predict(cfg)
    assert summary["kind"] == "video" and summary["frames"] == 3 and summary["backend"] == "onnxruntime"
    frames = json.loads((tmp_path / "predict" / "clip.json").read_text())
    assert [f["frame"] for f in frames] == [0, 1, 2] and frames[0]["detections"]
    assert (tmp_path / "predict" / "clip.mp4").stat().st_size > 0


def test_predict_errors(tiny, tmp_path):
    _, ckpt, prepared, _ = tiny
    with pytest.raises(ConfigError, match="predict.source is not set"):
        run_predict(tiny_cfg(prepared, tmp_path, [f"predict.checkpoint={ckpt}"]))
    with pytest.raises(InferenceError, match="does not exist"):
        run_predict(tiny_cfg(prepared, tmp_path, [f"predict.source={tmp_path}/none.png", f"predict.checkpoint={ckpt}"]))
    with pytest.raises(InferenceError, match=r"model file .*missing\.onnx does not exist"):
        run_predict(tiny_cfg(prepared, tmp_path, [f"predict.source={prepared}/images/val_0.png",
                                                  f"predict.checkpoint={tmp_path}/missing.onnx"]))
    assert expand_shorthands(["source=a.jpg", "checkpoint=m.pt", "eval.iou_thr=0.5"]) == [
        "predict.source=a.jpg", "predict.checkpoint=m.pt", "eval.iou_thr=0.5"]


@pytest.mark.slow
def test_entry_point_unreadable_image_exits_1(tiny, tmp_path):
    _, ckpt, _, _ = tiny
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    res = subprocess.run([sys.executable, "-m", "pipeline.predict", f"source={bad}", f"checkpoint={ckpt}",
                          f"predict.out_dir={tmp_path}/out"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert res.returncode == 1, res.stderr
    assert "cannot read image" in res.stderr and str(bad) in res.stderr and "Traceback" not in res.stderr
