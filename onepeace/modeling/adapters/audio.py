"""Audio adapter: wav2vec2-style conv feature extractor on the raw 16 kHz waveform, convolutional
(or fixed) positions, CLS with its own position, 1-D relative bias."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import AdapterConfig
from ..packed import linear, pack_weight, packable
from ..relative_position import bucket_index_1d
from .base import Adapter, AdapterOutput


class FeatureConvBlock(nn.Module):
    """Conv1d -> LayerNorm over channels (per time step) -> GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=bias)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, N) -> (B, C_out, N')
        x = self.conv(x)
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)

    def forward_time_major(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C_in) -> (B, N', C_out)
        """The same block as ONE matrix product (inference): in time-major layout the k x C_in
        window of every output step is contiguous, so the im2col matrix is a strided view of x
        (rows `stride` x C_in apart) multiplied by the (C_out, k x C_in) weight, packed for oneDNN on
        CPU. No transposes around the LayerNorm; ~1.7x faster than k strided products, 2x Conv1d."""
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        B, N, C = x.shape
        steps = (N - kernel) // stride + 1
        if C == 1:  # the first block sees raw samples: a tiny (B, N', k) window matrix
            y = x[..., 0].unfold(1, kernel, stride) @ self.conv.weight[:, 0, :].T
        else:
            x = x.contiguous()
            cols = x.as_strided((B, steps, kernel * C), (N * C, stride * C, 1))  # (B, N', k C_in), a view
            y = linear(cols, self._window_weight())
        if self.conv.bias is not None:
            y.add_(self.conv.bias)
        return F.gelu(self.norm(y))

    def _window_weight(self) -> torch.Tensor:
        """conv.weight (C_out, C_in, k) as (C_out, k C_in) in window order, packed where this CPU can
        pack the dtype (`packed.packable`, the encoder layers' check; else dense); cached until the weight changes (a new tensor, an in-place update or another dtype)."""
        w = self.conv.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = getattr(self, "_window_cache", None)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable outside inference mode
                dense = w.detach().permute(0, 2, 1).reshape(w.shape[0], -1).contiguous()
                window_weight = pack_weight(dense) if packable(dense) else dense
            self._window_cache = cached = (key, window_weight)
        return cached[1]

    def __getstate__(self):  # deepcopy / pickling: the packed cache has no storage; it is rebuilt
        state = dict(self.__dict__)
        state.pop("_window_cache", None)
        return state


class ConvPositionalEmbedding(nn.Module):
    """Positions computed from the frames: `depth` blocks of grouped Conv1d -> (drop the last frame if
    the kernel is even) -> LayerNorm without affine -> GELU; optionally a LayerNorm(D) first."""

    def __init__(self, dim: int, depth: int, kernel: int, groups: int, pre_norm: bool):
        super().__init__()
        self.kernel = kernel
        self.pre_norm = nn.LayerNorm(dim) if pre_norm else None
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = x.transpose(1, 2)  # (B, D, T)
        for conv in self.convs:
            x = conv(x)
            if self.kernel % 2 == 0:
                x = x[:, :, :-1]
            # normalized_shape from the module, not x.shape: a constant for the ONNX exporter
            x = F.layer_norm(x.transpose(1, 2), (conv.out_channels,)).transpose(1, 2)
            x = F.gelu(x)
        return x.transpose(1, 2)


class AudioAdapter(Adapter):
    RELEASED_NAMES = [
        (r"^feature_extractor\.(\d+)\.conv\.(weight|bias)$", r"embed_audios.0.conv_layers.\1.0.\2"),
        (r"^feature_extractor\.(\d+)\.norm\.(weight|bias)$", r"embed_audios.0.conv_layers.\1.2.1.\2"),
        (r"^feature_norm\.(weight|bias)$", r"embed_audios.2.\1"),
        (r"^feature_proj\.(weight|bias)$", r"embed_audios.3.\1"),
        (r"^pos_embed\.weight$", "embed_positions.weight"),
        (r"^pos_conv\.pre_norm\.(weight|bias)$", r"embed_positions.0.\1"),
        # conv blocks sit at indices 1..depth (index 0 is a transpose); inside a second Sequential
        # when conv_pos_pre_ln is set: see `released_names` below
        (r"^mask_token$", "mask_embedding"),
    ]
    UNUSED_IN_FORWARD = ("mask_token",)

    # cfg: AudioAdapterConfig (onepeace/modalities/audio.py; not imported here: modeling sits below the plugins)
    def __init__(self, cfg: AdapterConfig, embed_dim: int, num_heads: int, num_rel_tables: int = 1):
        super().__init__(cfg, embed_dim, num_heads, num_rel_tables, num_rel_rows=2 * cfg.bucket_size + 2)
        blocks, prev = [], 1
        for channels, kernel, stride in cfg.feature_encoder_spec:
            blocks.append(FeatureConvBlock(prev, channels, kernel, stride, bias=cfg.conv_bias))
            prev = channels
        self.feature_extractor = nn.ModuleList(blocks)
        if blocks:
            self.feature_norm = nn.LayerNorm(prev)
            self.feature_proj = nn.Linear(prev, embed_dim)
        else:  # the pretraining decoder's audio adapter only adds positions
            self.feature_norm = self.feature_proj = None
        if cfg.abs_pos_type == "conv":
            self.pos_conv = ConvPositionalEmbedding(embed_dim, cfg.conv_pos_depth, cfg.conv_pos_kernel,
                                                    cfg.conv_pos_groups, cfg.conv_pos_pre_ln)
            self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = None
        elif cfg.abs_pos_type == "fixed":
            self.pos_conv = self.cls_pos_embed = None
            self.pos_embed = nn.Embedding(cfg.max_positions, embed_dim)
        else:
            raise ValueError(f"unknown abs_pos_type {cfg.abs_pos_type!r}; known: 'conv', 'fixed'")
        # present in the released files; the inference path does not use it
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

    def released_name_rules(self) -> list[tuple[str, str]]:
        conv_prefix = "embed_positions.1." if self.cfg.conv_pos_pre_ln else "embed_positions."
        offset_rule = (r"^pos_conv\.convs\.(\d+)\.(weight|bias)$",
                       lambda m: f"{conv_prefix}{int(m[1]) + 1}.0.{m[2]}")
        return self.released_names() + [offset_rule]

    def bias_index(self, seq_len: int, device: torch.device) -> torch.Tensor:
        return bucket_index_1d(self.cfg.bucket_size, device=str(device))

    def num_frames(self, num_samples: int) -> int:
        for _, kernel, stride in self.cfg.feature_encoder_spec:
            num_samples = 1 + (num_samples - kernel) // stride
        return num_samples

    def extract_features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, N) 16 kHz samples -> (B, T', D) frame features (50 per second for the released spec)."""
        if self.feature_proj is None:
            raise RuntimeError("this audio adapter has no feature extractor (a decoder adapter)")
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (B, N), got {tuple(waveforms.shape)}")
        if self.num_frames(waveforms.shape[1]) < 1:
            raise ValueError(f"{waveforms.shape[1]} samples is too short for the audio feature extractor")
        if not torch.is_grad_enabled() and not self.reference_mode:  # inference: time-major products (~1e-6)
            x = waveforms.unsqueeze(-1)  # (B, N, 1)
            for block in self.feature_extractor:
                x = block.forward_time_major(x)
            x = self.feature_norm(x)  # (B, T', C)
        else:
            x = waveforms.unsqueeze(1)  # (B, 1, N)
            for block in self.feature_extractor:
                x = block(x)
            x = self.feature_norm(x.transpose(1, 2))  # (B, T', C)
        return self.feature_proj(x)

    def embed_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T', D) frames -> (B, T' + 1, D): CLS prepended, positions added."""
        if self.pos_conv is not None:
            positions = self.pos_conv(frames)  # computed from the frames BEFORE the embedding LayerNorm
            positions = torch.cat([self.cls_pos_embed.expand(frames.shape[0], -1, -1).to(frames.dtype), positions], 1)
        else:
            positions = self.pos_embed.weight[: frames.shape[1] + 1].unsqueeze(0)
        x = self.prepend_cls(frames)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x + positions

    def add_positions(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is None:
            raise RuntimeError("only an audio adapter with 'fixed' positions can act as a decoder adapter")
        return x + self.pos_embed.weight[: x.shape[1]].unsqueeze(0)

    def forward(self, waveforms: torch.Tensor, padding_mask: torch.Tensor | None = None,
                preserve_ids: torch.Tensor | None = None, frames: torch.Tensor | None = None) -> AdapterOutput:
        """waveforms (B, N) (layer-normed, zero-padded), padding_mask (B, T' + 1) True = pad.

        preserve_ids (B, K) (masked pretraining): the kept frames are gathered FIRST and the conv
        positions are computed over that compacted sequence (the reference's order).
        frames (B, T', D): this batch's `extract_features(waveforms)`, when already computed (the
        pretraining objective runs several passes over the same audio; extracting once saves most
        of an audio step).
        """
        if frames is None:
            frames = self.extract_features(waveforms)
        B, T = frames.shape[:2]
        if preserve_ids is not None:
            K = preserve_ids.shape[1]
            pad = preserve_ids.eq(-1)
            frame_ids = preserve_ids[:, 1:].masked_fill(pad[:, 1:], K - 1) - 1  # skip CLS; -1 slot -> frame K-2
            kept = torch.gather(frames, 1, frame_ids.unsqueeze(-1).expand(-1, -1, frames.shape[-1]))
            x = self.finish(self.embed_frames(kept))  # (B, K, D)
            return AdapterOutput(x, pad, positions=preserve_ids.masked_fill(pad, K - 1), full_length=T + 1)
        if padding_mask is None:
            padding_mask = torch.zeros(B, T + 1, dtype=torch.bool, device=frames.device)
        elif padding_mask.shape != (B, T + 1):
            raise ValueError(
                f"audio_padding_mask must be (B, T'+1) = {(B, T + 1)} for {waveforms.shape[1]} samples, "
                f"got {tuple(padding_mask.shape)}"
            )
        x = self.embed_frames(frames)
        return AdapterOutput(self.finish(x), padding_mask.bool())
