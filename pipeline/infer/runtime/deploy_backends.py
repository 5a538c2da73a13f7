"""OpenVINO, NCNN and MNN models written by pipeline.export (the pip extra ``deploy`` installs the runtimes).

How a user names each model (what evaluate / predict / bench accept):
* OpenVINO: the ``.xml`` file (its weights: the ``.bin`` with the same stem); metadata in the xml's rt_info.
* NCNN: the ``.param`` file (its weights: the ``.bin`` with the same stem); metadata in ``<.param>.json``.
* MNN: the ``.mnn`` file; metadata in ``<.mnn>.json``.
All take float32 ``[B, 3, H, W]`` normalised BGR at the exported H, W; NCNN runs one image at a time.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.infer.runtime.base import DEPLOY_EXTRA, ExportedDetector, InferenceError, read_sidecar

RT_INFO_SECTION = "nanodet"  # OpenVINO rt_info section that holds the metadata (one string per key)


def import_runtime(module: str, fmt: str):
    """``import module`` or an InferenceError naming the format and the pip extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InferenceError(f"running {fmt} models needs the Python package '{module}', which is not installed: "
                             f"{DEPLOY_EXTRA}") from None


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send what C++ libraries print to fd 1 (MNN prints its CPU features) to stderr: stdout stays clean for
    JSON (pipeline.bench prints its report there)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):  # Python-level writers too (NNCF's progress bars)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _load_error(fmt: str, path: Path, err: Exception) -> InferenceError:
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return InferenceError(f"the {fmt} runtime cannot load {path}: {first}; re-export it with "
                          f"`python -m pipeline.export export.formats=[onnx,{fmt.lower()}]`")


class OpenVinoDetector(ExportedDetector):
    """An OpenVINO IR (.xml + .bin) on the CPU plugin, fp32 inference precision (parity with PyTorch)."""

    backend = "openvino"
    fmt = "OpenVINO"

    def __init__(self, path: str | Path, input_size: Sequence[int] | None = None, threads: int | None = None):
        ov = import_runtime("openvino", self.fmt)
        path = Path(path)
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as err:  # noqa: BLE001 -- OpenVINO raises untyped RuntimeErrors
            raise _load_error(self.fmt, path, err) from None
        meta = {}
        if model.has_rt_info([RT_INFO_SECTION]):
            keys = model.get_rt_info([RT_INFO_SECTION]).astype(dict)
            meta = {str(k): model.get_rt_info([RT_INFO_SECTION, k]).astype(str) for k in keys}
        self._init_metadata(path, meta, input_size)
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as err:  # noqa: BLE001 -- an op the CPU plugin cannot run, a bad file, ...
            raise _load_error(self.fmt, path, err) from None
        self.request = self.compiled.create_infer_request()

    def forward(self, images: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        self.request.infer({0: np.ascontiguousarray(images, dtype=np.float32)})
        return self.outputs([self.request.get_output_tensor(i).data.copy() for i in range(len(self.compiled.outputs))])


class NcnnDetector(ExportedDetector):
    """An NCNN model (.param + .bin, converted by pnnx), fp32 storage and arithmetic (parity with PyTorch)."""

    backend = "ncnn"
    fmt = "NCNN"

    def __init__(self, path: str | Path, input_size: Sequence[int] | None = None, threads: int | None = None):
        self.ncnn = import_runtime("ncnn", self.fmt)
        path = Path(path)
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise InferenceError(f"NCNN model {path} needs its weights {weights} next to it (the .param file names "
                                 "the model, the .bin with the same stem holds the weights)")
        self._init_metadata(path, read_sidecar(path, self.fmt), input_size)
        net = self.ncnn.Net()
        net.opt.use_fp16_packed = net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = False
        net.opt.use_bf16_storage = False
        if threads:
            net.opt.num_threads = int(threads)
        if net.load_param(str(path)) != 0 or net.load_model(str(weights)) != 0:
            raise _load_error(self.fmt, path, RuntimeError("ncnn load_param / load_model returned an error"))
        self.net = net
        self.input_name, self.output_names = net.input_names()[0], list(net.output_names())

    def forward(self, images: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        per_image = []
        for image in np.ascontiguousarray(images, dtype=np.float32):
            ex = self.net.create_extractor()
            ex.input(self.input_name, self.ncnn.Mat(image).clone())
            outs = []
            for name in self.output_names:
                ret, mat = ex.extract(name)
                if ret != 0:
                    raise InferenceError(f"NCNN could not compute output {name} of {self.path} (error {ret})")
                outs.append(np.array(mat))
            per_image.append(outs)
        return self.outputs([np.stack(o) for o in zip(*per_image)])


class MnnDetector(ExportedDetector):
    """An MNN model (.mnn, converted from the ONNX file), CPU backend, high (fp32) precision."""

    backend = "mnn"
    fmt = "MNN"

    def __init__(self, path: str | Path, input_size: Sequence[int] | None = None, threads: int | None = None):
        with stdout_to_stderr():
            self.mnn = import_runtime("MNN", self.fmt)
        path = Path(path)
        meta = read_sidecar(path, self.fmt)
        self._init_metadata(path, meta, input_size)
        names = json.loads(meta.get("output_names", '["output"]'))
        try:
            with stdout_to_stderr():
                self.interp = self.mnn.Interpreter(str(path))
                self.session = self.interp.createSession(
                    {"numThread": int(threads or 1), "precision": "high", "backend": "CPU"})
        except Exception as err:  # noqa: BLE001 -- MNN raises untyped errors
            raise _load_error(self.fmt, path, err) from None
        self.input = self.interp.getSessionInput(self.session)
        self.output_names, self.batch = names, None

    def forward(self, images: np.ndarray) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        mnn, images = self.mnn, np.ascontiguousarray(images, dtype=np.float32)
        if self.batch != len(images):
            self.interp.resizeTensor(self.input, tuple(images.shape))
            self.interp.resizeSession(self.session)
            self.batch = len(images)
        self.input.copyFrom(mnn.Tensor(images.shape, mnn.Halide_Type_Float, images, mnn.Tensor_DimensionType_Caffe))
        self.interp.runSession(self.session)
        outs = []
        for name in self.output_names:
            out = self.interp.getSessionOutput(self.session, name)
            shape = tuple(out.getShape())
            host = mnn.Tensor(shape, mnn.Halide_Type_Float, np.zeros(shape, np.float32), mnn.Tensor_DimensionType_Caffe)
            out.copyToHostTensor(host)
            outs.append(np.array(host.getNumpyData(), dtype=np.float32).reshape(shape))
        return self.outputs(outs)
