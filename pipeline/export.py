"""``python -m pipeline.export``: the export stage - ONNX export of the trained model and, with
``export.formats=[onnx,openvino,ncnn,mnn]``, OpenVINO, NCNN and MNN models, each verified against PyTorch and
on the validation split, optionally INT8 (:func:`pipeline.infer.export.export_model`)."""
from __future__ import annotations

from pipeline.cli import hydra_entry
from pipeline.config import Config
from pipeline.infer.export import export_model

__all__ = ["export_model", "main"]


@hydra_entry("export")
def main(cfg: Config) -> int:
    export_model(cfg)
    return 0


if __name__ == "__main__":
    main()
