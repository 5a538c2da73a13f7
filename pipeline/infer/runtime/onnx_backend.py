"""ONNX models written by pipeline.export, run with onnxruntime; the metadata lives in ``metadata_props``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.infer.runtime.base import ExportedDetector, InferenceError


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    import onnx  # optional heavy dependency, only for .onnx files

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


class OnnxDetector(ExportedDetector):
    """An ONNX model written by pipeline.export, run with onnxruntime (CPU by default).

    ``input_size`` (w, h) must equal the exported size (the graph has fixed H, W); None uses it.
    """

    backend = "onnxruntime"
    fmt = "ONNX"

    def __init__(self, path: str | Path, input_size: Sequence[int] | None = None, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
        import onnxruntime as ort  # optional heavy dependency, only for .onnx files

        path = Path(path)
        self._init_metadata(path, read_onnx_metadata(path), input_size)
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
        batch = inp.shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None

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
        return self.outputs(outs)
