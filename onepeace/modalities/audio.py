"""The audio modality, in one file: config, adapter, preprocessing, collate, fast embed path (and the
long-audio windows), released checkpoint format, file suffixes, registration.

A clip is a path, a (wave, rate) pair or a 16 kHz array -> ``(N,)`` float32, resampled, layer-normed,
cropped to 15 s / tiled to 1 s (onepeace/data/audio.py); a batch zero-pads to ``(B, N_max)`` with a
``(B, T' + 1)`` padding mask over the feature frames (+ CLS). The adapter
(onepeace/modeling/adapters/audio.py) runs the conv feature extractor and the conv positions.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch

from ..config import RELEASED_AUDIO_FEATURE_SPEC, AdapterConfig
from ..data.audio import AUDIO_EXTENSIONS, AudioTransform, collate_waveforms
from ..inference import collect_embeddings, length_sorted_batches, require_branch
from ..modeling.adapters.audio import AudioAdapter
from ..registry import register_modality


@dataclass(frozen=True)
class AudioAdapterConfig(AdapterConfig):
    # (channels, kernel, stride) per conv block of the waveform feature extractor; () = none (decoder)
    feature_encoder_spec: tuple[tuple[int, int, int], ...] = RELEASED_AUDIO_FEATURE_SPEC
    conv_bias: bool = False
    abs_pos_type: str = "conv"  # "conv" (positions computed from the frames) or "fixed" (a table)
    conv_pos_depth: int = 5
    conv_pos_width: int = 95
    conv_pos_groups: int = 16
    conv_pos_pre_ln: bool = False
    max_positions: int = 1026  # rows of the "fixed" position table
    bucket_size: int = 512
    sample_rate: int = 16000  # preprocessing
    max_seconds: float = 15.0  # the reference keeps the first 15 s
    min_seconds: float = 1.0  # shorter clips are tiled to 1 s

    kind: ClassVar[str] = "audio"

    @property
    def conv_pos_kernel(self) -> int:
        return max(3, self.conv_pos_width // self.conv_pos_depth)

    @property
    def feature_dim(self) -> int:
        return self.feature_encoder_spec[-1][0] if self.feature_encoder_spec else 0

    def decoder_variant(self) -> "AudioAdapterConfig":
        return AudioAdapterConfig(feature_encoder_spec=(), abs_pos_type="fixed", use_attn_bias=False, bucket_size=256)

    @classmethod
    def from_released(cls, view, args: Mapping[str, Any]) -> "AudioAdapterConfig":
        """Channels and kernels from the conv weights (strides from the cfg's spec); "fixed" or "conv"
        positions from which tensors exist; conv depth, groups and kernel from the position convs."""
        common = view.common(args)  # first: its notes come before ours
        spec = list(parse_feature_spec(args.get("feature_encoder_spec")))
        convs = sorted((int(m.group(1)), view.shape(m.group(0)))
                       for m in view.matches(r"embed_audios\.0\.conv_layers\.(\d+)\.0\.weight"))
        tensor_spec = []
        for i, (idx, shape) in enumerate(convs):  # shape (channels, in, kernel)
            if i >= len(spec):
                raise ValueError(f"audio conv layer {idx}: the cfg gives no stride for it")
            tensor_spec.append((shape[0], shape[2], spec[i][2]))
        feature_spec = view.pick("feature_encoder_spec", tuple(spec) or None, tuple(tensor_spec) or None) or ()
        fixed, pre_ln = view.has("embed_positions.weight"), view.has("embed_positions.0.weight")
        table = view.shape("rel_pos_table_list.0.weight")
        return cls(
            **common,
            feature_encoder_spec=feature_spec,
            conv_bias=view.pick("conv_bias", args.get("conv_bias"), view.has("embed_audios.0.conv_layers.0.0.bias")),
            abs_pos_type=view.pick("abs_pos_type", args.get("abs_pos_type"), "fixed" if fixed else "conv"),
            conv_pos_pre_ln=view.pick("conv_pos_pre_ln", args.get("conv_pos_pre_ln"), pre_ln),
            max_positions=view.shape("embed_positions.weight")[0] if fixed else 1026,
            bucket_size=view.pick("bucket_size", args.get("bucket_size"),
                                  (table[0] - 2) // 2 if table else args.get("bucket_size", 512)),
            **({} if fixed else _conv_positions(view, args, pre_ln)),
        )

    def to_released(self, task: dict[str, Any]) -> dict[str, Any]:
        fields = super().to_released(task)
        fields["feature_encoder_spec"] = repr([tuple(t) for t in self.feature_encoder_spec])
        return fields


def _conv_positions(view, args: Mapping[str, Any], pre_ln: bool) -> dict[str, Any]:
    """conv_pos_depth / groups / width from the position convs (weights (D, D / groups, kernel))."""
    conv = view.shape(f"embed_positions.{'1.' if pre_ln else ''}1.0.weight")
    if conv is None:
        return {}
    depth = len(view.matches(r"embed_positions\.(1\.)?\d+\.0\.weight"))
    kernel, width = conv[2], int(args.get("conv_pos_width", 95))
    out = dict(conv_pos_depth=view.pick("conv_pos_depth", int(args.get("conv_pos_depth", 5)), depth),
               conv_pos_groups=view.pick("conv_pos_groups", args.get("conv_pos_groups"), view.embed_dim // conv[1]))
    if max(3, width // out["conv_pos_depth"]) != kernel:
        view.note(f"cfg conv_pos_width={width} gives a different kernel than the tensors' {kernel}; "
                  f"using width {kernel * out['conv_pos_depth']}")
        width = kernel * out["conv_pos_depth"]
    out["conv_pos_width"] = width
    return out


def parse_feature_spec(spec: Any) -> tuple[tuple[int, int, int], ...]:
    """The released `feature_encoder_spec` string, e.g. "[(512,10,5)] + [(512,3,2)] * 4", safely."""
    if spec is None:
        return ()
    if not isinstance(spec, str):
        return tuple(tuple(int(v) for v in t) for t in spec)

    def ev(node: ast.AST):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts] if isinstance(node, ast.List) else tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"unsupported element in feature_encoder_spec {spec!r}")

    return tuple(tuple(int(v) for v in t) for t in ev(ast.parse(spec, mode="eval")))


# ---- preprocessing ----
def audio_transform(model) -> AudioTransform:
    """path / (wave, rate) / 16 kHz array -> (N,) prepared waveform at this model's settings.
    Only the crop the model reads (max_seconds, + 0.1 s for the resampler) is decoded, so the work
    per file is bounded by the crop, not by the file (a clip longer than that is normalised over the
    decoded part; the reference normalised over the whole file: see onepeace/data/audio.py)."""
    require_branch(model, "audio")
    cfg = model.config.adapters["audio"]
    return AudioTransform(sample_rate=cfg.sample_rate, max_seconds=cfg.max_seconds, min_seconds=cfg.min_seconds,
                          decode_seconds=cfg.max_seconds)


def collate_audios(model, items: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """(N_i,) waveforms -> {"audio": (B, N_max), "audio_padding_mask": (B, T' + 1)}."""
    audio, mask = collate_waveforms(list(items), model.config.adapters["audio"].feature_encoder_spec)
    return {"audio": audio, "audio_padding_mask": mask}


# ---- the fast embed path: length-sorted batches under a sample budget ----
@torch.inference_mode()
def embed_waveforms(model, waves: Sequence[torch.Tensor], batch_size: int = 8,
                    max_samples: int | None = 2 * 240_000) -> torch.Tensor:
    """Prepared 1-D waveforms (layer-normed, cropped/tiled) -> (N, D) embeddings.
    Batches hold at most `max_samples` padded samples (default: 30 s of audio; on a CPU a larger
    batch gains little per token, while mixed lengths waste the padding)."""
    require_branch(model, "audio")
    sort = not model.reference_mode

    def run():
        lengths = [w.shape[0] for w in waves]
        for index in length_sorted_batches(lengths, batch_size, max_samples if sort else None, sort):
            batch = collate_audios(model, [waves[i] for i in index])
            yield index, model(**{k: v.to(model.device) for k, v in batch.items()}).embeddings["audio"]

    return collect_embeddings(model, len(waves), run())


def encode_audios(model, sources: Sequence[Any], batch_size: int = 8, long_audio: str = "crop",
                  window_seconds: float | None = None, hop_seconds: float | None = None) -> torch.Tensor:
    """long_audio="crop" (the reference): keep the first 15 s. "windows": cover the whole clip with
    windows of `window_seconds` (default the model's 15 s) every `hop_seconds` (default 2/3 of a
    window; the last window ends at the clip's end), embed each and average the embeddings (then
    re-normalise). Deterministic; clips no longer than one window give the same result as "crop"."""
    if long_audio == "crop":
        transform = audio_transform(model)
        return embed_waveforms(model, [transform(s) for s in sources], batch_size)
    if long_audio != "windows":
        raise ValueError(f"long_audio must be 'crop' or 'windows', got {long_audio!r}")
    cfg = model.config.adapters["audio"]
    window = round((window_seconds or cfg.max_seconds) * cfg.sample_rate)
    hop = round((hop_seconds or (window_seconds or cfg.max_seconds) * 2 / 3) * cfg.sample_rate)
    if hop < 1 or hop > window:
        raise ValueError(f"hop_seconds must be in (0, window_seconds], got {hop / cfg.sample_rate}")
    full = AudioTransform(sample_rate=cfg.sample_rate, max_seconds=None, min_seconds=cfg.min_seconds)
    pieces, owner = [], []
    for i, source in enumerate(sources):
        wave = full(source)  # layer-normed over the whole clip, like the reference before its crop
        for start in audio_window_starts(wave.shape[0], window, hop):
            pieces.append(wave[start:start + window])
            owner.append(i)
    emb = embed_waveforms(model, pieces, batch_size)
    out = torch.zeros(len(sources), emb.shape[1], dtype=emb.dtype, device=emb.device)
    out.index_add_(0, torch.tensor(owner, device=emb.device), emb)
    return torch.nn.functional.normalize(out, dim=-1)


def audio_window_starts(n_samples: int, window: int, hop: int) -> list[int]:
    """Start offsets of windows covering [0, n_samples): every `hop`, plus one ending at the end."""
    if n_samples <= window:
        return [0]
    starts = list(range(0, n_samples - window + 1, hop))
    if starts[-1] + window < n_samples:
        starts.append(n_samples - window)
    return starts


def example_audios(model, n: int) -> dict[str, torch.Tensor]:
    """n random clips of 1 s and shorter (so a batch has padding), prepared as the transform would."""
    rate = model.config.adapters["audio"].sample_rate
    waves = [torch.randn(rate - (i % 2) * rate // 4) for i in range(n)]
    return collate_audios(model, [(w - w.mean()) / w.std() for w in waves])


register_modality("audio", AudioAdapterConfig, AudioAdapter, audio_transform, collate_audios, embed_waveforms,
                  encode=encode_audios, suffixes=AUDIO_EXTENSIONS, batch_size=8, example=example_audios)
