"""ONNX export and an ONNX Runtime path (the optional extra `onnx`: ``pip install onepeace[onnx]``).

>>> from onepeace.onnx import export_onnx
>>> export_onnx(model, "exported/")                # one graph per branch + config.json + onnx.json
>>> onnx_model = onepeace.load("exported/")        # an OnnxModel: encode_text / encode_image / encode_audio

Nothing here imports onnx or onnxruntime at module level: ``import onepeace`` works without the extra.
"""
from __future__ import annotations

from .export import MANIFEST_FILE, export_onnx, is_onnx_folder
from .runtime import OnnxModel, load_onnx

__all__ = ["MANIFEST_FILE", "OnnxModel", "export_onnx", "is_onnx_folder", "load_onnx"]
