"""OpenVINO, NCNN and MNN: the export stage converts and verifies each one, the runtime is chosen from the
file, evaluate / predict run through each, and every bad input gets one clear message (no half-written file).

The stage runs once per module (all formats + both INT8 models) on the tiny model of evalkit.py."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from evalkit import CLASSES, INPUT_SIZE, perturbed_model, tiny_cfg, write_split

from pipeline.config import ConfigError, compose
from pipeline.evaluate import evaluate_model
from pipeline.infer import export as export_stage
from pipeline.infer.export import HEADLINE, ExportError, export_model
from pipeline.infer.exporters import common, ncnn_export
from pipeline.infer.exporters.onnx_export import ExportModule
from pipeline.infer.predict import run_predict
from pipeline.infer.runtime import (
    InferenceError,
    MnnDetector,
    NcnnDetector,
    OnnxDetector,
    OpenVinoDetector,
    TorchDetector,
    load_detector,
    sidecar_path,
)

# ~100 s of CPU (NNCF quantization, four conversions, seven evaluations); 4-16 min wall on a 2-core machine
# shared with other work
pytestmark = pytest.mark.slow

W, H = INPUT_SIZE
FORMATS = {"openvino": ("model.openvino.xml", OpenVinoDetector), "ncnn": ("model.ncnn.param", NcnnDetector),
           "mnn": ("model.mnn", MnnDetector)}
ALL = ["export.formats=[onnx,openvino,ncnn,mnn]"]


def _textured_split_with_model_ground_truth(folder: Path, ckpt: Path) -> Path:
    """A prepared folder whose images are evalkit's with noise added (flat backgrounds give many positions the
    same receptive field, i.e. exact score ties that float noise of 1e-7 reorders) and whose val boxes are the
    model's own top detections: mAP is high and the same for every faithful runtime."""
    from pipeline.data.transforms import read_image
    from pipeline.infer.evaluate import image_records
    from pipeline.infer.predict import detect_image

    rng = np.random.default_rng(0)
    for split, n, seed in (("val", 5, 1), ("train", 4, 2)):
        write_split(folder, split, n, seed=seed)
    for path in sorted((folder / "images").glob("*.png")):
        img = cv2.imread(str(path)).astype(int) + rng.integers(-40, 41, (64, 96, 3))
        cv2.imwrite(str(path), np.clip(img, 0, 255).astype(np.uint8))
    gt = json.loads((folder / "val.json").read_text())
    det = TorchDetector(ckpt, input_size=INPUT_SIZE)
    gt["annotations"] = []
    for image_id, path in image_records(gt, folder):
        for d in detect_image(det, read_image(path), 0.05, 0.6, 3):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": image_id, "iscrowd": 0,
                                      "category_id": d["category_id"], "bbox": d["bbox"],
                                      "area": d["bbox"][2] * d["bbox"][3]})
    (folder / "val.json").write_text(json.dumps(gt))
    return folder


def _spread_checkpoint(cfg, path: Path) -> Path:
    """evalkit's tiny model with its class logits scaled up (its scores are all ~0.501 otherwise)."""
    from pipeline.config import to_dict
    from pipeline.model.checkpoint import save_checkpoint

    model = perturbed_model(cfg, seed=0)
    with torch.no_grad():
        for conv in model.head.gfl_cls:
            conv.weight[: len(CLASSES)] *= 300.0
    state = model.state_dict()
    return save_checkpoint(path, {"model": state, "ema": state, "config": to_dict(cfg), "epoch": 1, "step": 1})


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    """(cfg, report, out dir): the real stage with every format and INT8 (any INT8 drop accepted here)."""
    ckpt = _spread_checkpoint(tiny[0], tmp_path_factory.mktemp("spread") / "best.pt")
    gt_dir = _textured_split_with_model_ground_truth(tmp_path_factory.mktemp("textured"), ckpt)
    out = tmp_path_factory.mktemp("export_all")
    cfg = tiny_cfg(gt_dir, out, [f"export.checkpoint={ckpt}", f"eval.checkpoint={ckpt}", *ALL, "export.int8=true",
                                 "export.calib_images=2", "export.int8_max_map_drop=1.0"])
    return cfg, export_model(cfg), out / "export"


def test_stage_exports_and_verifies_every_format(exported):
    cfg, report, out = exported
    assert report["map_torch"] > 0.5  # the ground truth is the model's own output
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(report))
    for fmt, (name, _) in FORMATS.items():
        entry = report["formats"][fmt]
        assert entry["path"] == str(out / "deploy" / name) and Path(entry["path"]).is_file(), entry
        assert entry["max_abs_diff"] <= cfg.export.atol and entry["map_diff"] <= cfg.export.map_tolerance, entry
        assert entry["map_diff"] == pytest.approx(abs(entry["map"] - report["map_torch"]), abs=1e-12)
        assert report["latency_ms"][fmt]["p50_ms"] > 0 and entry["size_bytes"] > 0
    q = report["formats"]["openvino"]["int8"]
    assert q["rejected"] is False and Path(q["path"]).name == "model.int8.openvino.xml" and Path(q["path"]).is_file()
    assert q["map_drop"] == pytest.approx(report["formats"]["openvino"]["map"] - q["map"])
    assert (out / "model.int8.onnx").is_file() and (out / "deploy" / "model.ncnn.bin").is_file()
    assert sidecar_path(out / "deploy" / "model.mnn").is_file() and (out / "deploy" / "model.openvino.bin").is_file()
    headline = json.loads((out / "metrics.json").read_text())
    assert set(headline) == set(HEADLINE) and headline["ncnn_map"] == report["formats"]["ncnn"]["map"]
    assert not list(out.rglob(".export-*")), "a staging folder was left behind"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_runtime_from_file_metadata_and_parity(exported, fmt):
    cfg, _, out = exported
    name, cls = FORMATS[fmt]
    det = load_detector(out / "deploy" / name, threads=1)
    ref = OnnxDetector(out / "model.onnx")
    assert type(det) is cls and det.backend == fmt
    assert det.class_names == CLASSES and det.strides == ref.strides and det.reg_max == ref.reg_max
    assert det.preprocessing == ref.preprocessing and det.preprocessing.input_size == (W, H)
    torch_det = TorchDetector(cfg.export.checkpoint)
    module = ExportModule(torch_det.model, (H, W), decode_in_graph=False)
    x = np.random.default_rng(1).standard_normal((3, 3, H, W)).astype(np.float32)  # batch 3: loops / resizes
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = det.forward(x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    with pytest.raises(InferenceError, match=rf"input size \[96, 64\].*fixed-size {cls.fmt} model"):
        load_detector(out / "deploy" / name, input_size=[96, 64])


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_evaluate_and_predict_through_each_runtime(exported, tmp_path, fmt):
    cfg, report, out = exported
    model = out / "deploy" / FORMATS[fmt][0]
    ev_cfg = tiny_cfg(Path(cfg.data.prepared_dir), tmp_path, [f"eval.checkpoint={model}"])
    metrics = evaluate_model(ev_cfg)
    assert metrics["mAP"] == pytest.approx(report["formats"][fmt]["map"], abs=1e-9)
    images = Path(cfg.data.prepared_dir) / "images"
    pr_cfg = tiny_cfg(Path(cfg.data.prepared_dir), tmp_path, [f"predict.checkpoint={model}",
                                                               f"predict.source={images}", "predict.score_thr=0.3"])
    summary = run_predict(pr_cfg)
    assert summary["backend"] == fmt and summary["detections"] > 0
    onnx_cfg = tiny_cfg(Path(cfg.data.prepared_dir), tmp_path / "o", [f"predict.checkpoint={out / 'model.onnx'}",
                                                                       f"predict.source={images}",
                                                                       "predict.score_thr=0.3"])
    run_predict(onnx_cfg)
    ours = json.loads((tmp_path / "predict" / "predictions.json").read_text())
    onnx = json.loads((tmp_path / "o" / "predict" / "predictions.json").read_text())
    assert len(ours) == len(onnx)
    # this tiny model's scores are nearly equal everywhere: 1e-6 differences reorder them and change which of
    # two overlapping boxes NMS keeps, so detections are compared per image by count and best score (the
    # accuracy of each runtime is compared exactly by the mAP above and by the stage)
    for image in {p["image"] for p in onnx}:
        a, b = ([p["score"] for p in preds if p["image"] == image] for preds in (ours, onnx))
        assert len(a) == len(b) and abs(max(a) - max(b)) < 1e-4, (fmt, image)


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_format_is_rejected_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"export.formats: \['onnx', 'tflite'\].*one of \['onnx', 'openvino', "
                                          r"'ncnn', 'mnn'\]"):
        compose(["export.formats=[onnx,tflite]"])
    with pytest.raises(ConfigError, match="Did you mean 'openvino'"):
        compose(["export.formats=[openvno]"])


def test_missing_converter_and_runtime_name_the_extra(exported, tmp_path, monkeypatch):
    _, _, out = exported
    real = common.importlib.import_module

    def no_openvino(name, *a):
        if name.split(".")[0] == "openvino":
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(common.importlib, "import_module", no_openvino)
    from pipeline.infer.exporters.openvino_export import to_openvino
    with pytest.raises(ExportError, match=r"export.formats has openvino.*'openvino'.*not installed: "
                                          r"pip install 'nanodet-pipeline\[deploy\]'"):
        to_openvino(out / "model.onnx", tmp_path / "m.openvino.xml", {})
    assert list(tmp_path.iterdir()) == []
    from pipeline.infer.runtime import deploy_backends
    monkeypatch.setattr(deploy_backends.importlib, "import_module", no_openvino)
    with pytest.raises(InferenceError, match=r"OpenVINO models needs the Python package 'openvino'.*\[deploy\]"):
        load_detector(out / "deploy" / "model.openvino.xml")


def test_failing_converter_leaves_no_file(exported, tmp_path, monkeypatch):
    _, _, out = exported
    import pnnx

    monkeypatch.setattr(pnnx, "EXEC_PATH", "/bin/false")
    dest = tmp_path / "model.ncnn.param"
    with pytest.raises(ExportError, match=r"the ncnn converter failed \(exit 1\).*drop ncnn from export.formats"):
        ncnn_export.to_ncnn(out / "model.onnx", dest, {}, (H, W))
    assert list(tmp_path.iterdir()) == []  # neither the files nor the staging folder


def test_op_the_runtime_cannot_run_fails_the_stage_and_deletes_the_model(exported, tmp_path, monkeypatch):
    """A converter output NCNN cannot load (an unknown layer, as when an op has no NCNN kernel): the stage names
    the format and the fix, deletes that model, keeps the verified ONNX one and writes no metrics.json."""
    cfg, _, _ = exported
    real = export_stage.to_ncnn

    def unknown_layer(*args, **kw):
        param = real(*args, **kw)
        text = param.read_text().replace("Sigmoid ", "NoSuchOp ", 1)
        param.write_text(text)
        return param

    monkeypatch.setattr(export_stage, "to_ncnn", unknown_layer)
    bad_cfg = tiny_cfg(Path(cfg.data.prepared_dir), tmp_path,
                       [f"export.checkpoint={cfg.export.checkpoint}", "export.formats=[onnx,ncnn]"])
    with pytest.raises(ExportError) as err:
        export_model(bad_cfg)
    msg = str(err.value)
    for part in ("export to ncnn failed", "NCNN runtime cannot load", "model.ncnn.param", "The ncnn model was deleted",
                 "verified ONNX model", "Drop ncnn from export.formats"):
        assert part in msg, msg
    deploy = tmp_path / "export" / "deploy"
    assert not (deploy / "model.ncnn.param").exists() and not (deploy / "model.ncnn.bin").exists()
    assert (tmp_path / "export" / "model.onnx").is_file() and not (tmp_path / "export" / "metrics.json").exists()
    saved = json.loads((tmp_path / "export" / "export.json").read_text())
    assert "NCNN runtime cannot load" in saved["formats"]["ncnn"]["error"]


def test_parity_failure_of_a_format_fails_the_stage(exported, tmp_path, monkeypatch):
    cfg, _, _ = exported
    real = MnnDetector.forward
    monkeypatch.setattr(MnnDetector, "forward", lambda self, x: real(self, x) + 0.01)
    bad_cfg = tiny_cfg(Path(cfg.data.prepared_dir), tmp_path,
                       [f"export.checkpoint={cfg.export.checkpoint}", "export.formats=[onnx,mnn]"])
    with pytest.raises(ExportError, match=r"export to mnn failed: mnn output differs from PyTorch by 0.01 "
                                          r"\(> export.atol=0.001\).*The mnn model was deleted"):
        export_model(bad_cfg)
    assert not (tmp_path / "export" / "deploy" / "model.mnn").exists()
    assert not sidecar_path(tmp_path / "export" / "deploy" / "model.mnn").exists()


def test_missing_sidecar_or_weights_named(exported, tmp_path):
    _, _, out = exported
    import shutil

    shutil.copy(out / "deploy" / "model.mnn", tmp_path / "model.mnn")
    with pytest.raises(InferenceError, match=r"MNN model .*model.mnn has no metadata file .*model.mnn.json"):
        load_detector(tmp_path / "model.mnn")
    shutil.copy(out / "deploy" / "model.ncnn.param", tmp_path / "model.ncnn.param")
    with pytest.raises(InferenceError, match=r"NCNN model .*model.ncnn.param needs its weights .*model.ncnn.bin"):
        load_detector(tmp_path / "model.ncnn.param")
    (tmp_path / "model.tflite").write_bytes(b"x")
    with pytest.raises(InferenceError, match=r"unknown type '.tflite'.*OpenVINO .xml, an NCNN .param"):
        load_detector(tmp_path / "model.tflite")
