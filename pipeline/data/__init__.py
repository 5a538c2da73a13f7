"""Data: built-in dataset generator, COCO / YOLO / VOC readers, validation, transforms, datasets, loaders.

Import the submodules directly (``pipeline.data.loader.build_loader``, ``pipeline.data.transforms.preprocess``);
this package keeps no state and imports nothing heavy.
"""
