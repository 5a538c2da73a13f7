"""One module per target format; the export stage (pipeline.infer.export) calls them and verifies each result.

Every converter writes into a temporary folder next to the destination and moves the finished files into
place (weights first, the file a user names last), so a failed or interrupted conversion never leaves a
model file behind that looks usable. OpenVINO, NCNN and MNN are converted from the verified ONNX file.
"""
