"""Inference: one runtime over .pt checkpoints, ONNX models and the model in training (``runtime``), THE
evaluation (``evaluate``) with its COCO metrics (``metrics``) and figures (``viz``), ONNX export
(``export``) and prediction (``predict``)."""
