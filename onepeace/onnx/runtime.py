"""The exported graphs behind the model API: ``onepeace.load(folder)`` of a folder written by
``onepeace export --format onnx`` returns an :class:`OnnxModel`.

An OnnxModel is called like a OnePeaceModel for single-modality passes (``model(text=ids)``,
``model(audio=waves, audio_padding_mask=mask)`` -> ``ModelOutput`` with ``embeddings``), so the
modality plugins' preprocessing, length-sorted batching and collate (onepeace/modalities/*.py) run
unchanged in front of ONNX Runtime, and so do ``encode_text / encode_image / encode_audio``,
``encode_items``, ``zero_shot`` and everything built on onepeace.inference (``onepeace embed``,
``onepeace index``, ``onepeace serve``). Joint passes, hidden states and task heads are not exported.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ModelConfig
from ..modeling.adapters.text import PAD_ID
from ..modeling.model import ModelOutput, OnePeaceModel
from .export import FORMAT, MANIFEST_FILE, require_module


class OnnxModel:
    """Exported branches run by ONNX Runtime (CPU), with the OnePeaceModel embedding API.

    config: the ModelConfig of the exported branches (preprocessing settings from it, as in PyTorch).
    threads: ONNX Runtime's intra-op threads (default: torch.get_num_threads(), i.e. what the PyTorch
        path would use). Sessions are created on first use of a branch."""

    reference_mode = False  # the plugins' batching asks; the graphs have one mode
    training = False
    device = torch.device("cpu")
    dtype = torch.float32
    # the same methods as the PyTorch model: they only call onepeace.inference with `self`
    tokenizer = OnePeaceModel.tokenizer
    encode_text = OnePeaceModel.encode_text
    encode_image = OnePeaceModel.encode_image
    encode_audio = OnePeaceModel.encode_audio
    encode_video = OnePeaceModel.encode_video
    encode_items = OnePeaceModel.encode_items
    zero_shot = OnePeaceModel.zero_shot

    def __init__(self, folder: str | os.PathLike, config: ModelConfig, manifest: dict[str, Any],
                 threads: int | None = None):
        self.folder, self.config, self.manifest = Path(folder), config, manifest
        self.threads = threads
        self._tokenizer = None
        self._sessions: dict[str, Any] = {}
        # modality -> graph entry; `name in model.adapters` is how onepeace.inference asks for a branch
        self.adapters = {m: manifest["graphs"][m] for m in config.adapters}
        scale = manifest.get("temperature")
        self.logit_scale = None if scale is None else torch.tensor(float(scale)).log()
        self.load_report = None

    def __repr__(self) -> str:
        return (f"OnnxModel({str(self.folder)!r}, modalities={list(self.modalities)}, "
                f"weights={self.manifest.get('weights', 'float32')})")

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    @property
    def temperature(self) -> torch.Tensor:
        return self.logit_scale.exp()

    @property
    def head_type(self) -> None:
        return None

    def eval(self) -> "OnnxModel":
        return self

    def session(self, modality: str):
        """The ONNX Runtime session of one branch (created once)."""
        if modality not in self._sessions:
            ort = require_module("onnxruntime")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads or torch.get_num_threads()
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            path = self.folder / self.adapters[modality]["file"]
            self._sessions[modality] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[modality]

    def release(self) -> None:
        """Drop the ONNX Runtime sessions (their weights and buffers); the next call creates them again."""
        self._sessions.clear()

    def __call__(self, text: torch.Tensor | None = None, image: torch.Tensor | None = None,
                 audio: torch.Tensor | None = None, audio_padding_mask: torch.Tensor | None = None,
                 joint: bool = False, **other: torch.Tensor) -> ModelOutput:
        """Single-modality passes -> ModelOutput with `embeddings` only ((B, D) float32 each)."""
        if joint:
            raise ValueError("an ONNX export holds one graph per branch: joint passes need the PyTorch model")
        if other:
            raise ValueError(f"this ONNX model has no {sorted(other)} input (it has {list(self.modalities)})")
        inputs = {"text": text, "image": image, "audio": audio}
        given = [m for m, v in inputs.items() if v is not None]
        if not given:
            raise ValueError(f"no inputs given; this model takes {list(self.modalities)}")
        missing = [m for m in given if m not in self.adapters]
        if missing:
            raise ValueError(f"this ONNX model has no {missing} branch (it has {list(self.modalities)})")
        result = ModelOutput()
        for m in given:
            feeds = self._feeds(m, inputs[m], audio_padding_mask)
            result.embeddings[m] = torch.from_numpy(self.session(m).run(None, feeds)[0])
        return result

    forward = __call__

    def _feeds(self, modality: str, value: torch.Tensor, audio_mask: torch.Tensor | None) -> dict[str, np.ndarray]:
        """Graph inputs of one batch, checked as the PyTorch adapters check them (a bad input is a
        ValueError naming it, not an ONNX Runtime error)."""
        cfg = self.config.adapters[modality]
        if modality == "text":
            _check_tokens(value, cfg.vocab_size, cfg.max_positions)
            return {"tokens": value.long().numpy(), "padding_mask": value.eq(PAD_ID).numpy()}
        if modality == "image":
            side = cfg.image_size
            if value.dim() != 4 or tuple(value.shape[1:]) != (3, side, side):
                raise ValueError(f"this exported image graph takes (B, 3, {side}, {side}) pixels "
                                 f"(the config's image_size), got {tuple(value.shape)}")
            return {"pixels": value.float().contiguous().numpy()}
        if value.dim() != 2:
            raise ValueError(f"waveforms must be (B, N), got {tuple(value.shape)}")
        frames = _num_frames(value.shape[1], cfg.feature_encoder_spec)
        if frames < 1:
            raise ValueError(f"{value.shape[1]} samples is too short for the audio feature extractor")
        if audio_mask is None:
            audio_mask = torch.zeros(value.shape[0], frames + 1, dtype=torch.bool)
        if tuple(audio_mask.shape) != (value.shape[0], frames + 1):
            raise ValueError(f"audio_padding_mask must be (B, T'+1) = {(value.shape[0], frames + 1)} for "
                             f"{value.shape[1]} samples, got {tuple(audio_mask.shape)}")
        return {"waveform": value.float().contiguous().numpy(), "padding_mask": audio_mask.bool().numpy()}


def _check_tokens(tokens: torch.Tensor, vocab: int, max_positions: int) -> None:
    if tokens.dim() != 2:
        raise ValueError(f"text must be (B, T) token ids, got {tuple(tokens.shape)}")
    if tokens.shape[1] + 1 > max_positions:
        raise ValueError(f"text of {tokens.shape[1]} tokens is longer than the model's {max_positions - 1} positions")
    if tokens.numel() and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        raise ValueError(f"token id {int(tokens.max())} is outside this model's vocabulary of {vocab} "
                         "(was the text tokenized with another dictionary?)")


def _num_frames(samples: int, spec: Sequence[tuple[int, int, int]]) -> int:
    for _, kernel, stride in spec:
        samples = 1 + (samples - kernel) // stride
    return samples


def read_manifest(folder: Path) -> dict[str, Any]:
    """onnx.json -> dict; a missing or foreign manifest, or a listed graph file that is missing, is
    an error naming the file."""
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: not a folder written by `onepeace export --format onnx`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON (truncated or damaged?): {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("graphs"), dict):
        raise ValueError(f"{path}: not an onepeace ONNX manifest (format {FORMAT!r} with graphs)")
    for modality, entry in manifest["graphs"].items():
        if not (folder / entry["file"]).is_file():
            raise FileNotFoundError(f"{folder / entry['file']} is missing: the manifest lists the {modality} graph "
                                    f"there (export it again: onepeace export MODEL --format onnx --out {folder})")
    return manifest


def load_onnx(folder: str | os.PathLike, modalities: Sequence[str] | None = None,
              threads: int | None = None) -> OnnxModel:
    """An exported folder -> OnnxModel (checks the manifest, config.json and the graph files now;
    onnxruntime must be installed: the extra `onnx`)."""
    require_module("onnxruntime")
    folder = Path(folder)
    manifest = read_manifest(folder)
    config = ModelConfig.load(folder / "config.json")
    absent = [m for m in config.adapters if m not in manifest["graphs"]]
    if absent:
        raise ValueError(f"{folder / 'config.json'} lists {absent} but {folder / MANIFEST_FILE} has no graph for them")
    if modalities is not None:
        unknown = [m for m in modalities if m not in manifest["graphs"]]
        if unknown:
            raise ValueError(f"{folder} has no {unknown} graph (it has {list(manifest['graphs'])})")
        config = config.select(modalities)
    return OnnxModel(folder, config, manifest, threads)
