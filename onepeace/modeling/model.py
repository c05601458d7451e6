"""The ONE-PEACE model: adapters -> one shared encoder -> per-modality LayerNorm -> projection heads."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig, ClassifyHeadConfig, ModelConfig
from ..registry import adapter_class
from .adapters import AdapterOutput
from .attention import RealRows
from .encoder import Encoder
from .packed import PackedLinear, pack_linears, set_dense_above, unpack_linears

ATTENTION_KERNELS = ("sdpa", "eager")  # see OnePeaceModel.attention_kernel


@dataclass
class ModelOutput:
    """Per-modality results of a forward pass (keys are modality names).

    embeddings: (B, D) L2-normalised projections of the CLS state (single-modality passes of a
        model with projection heads; joint passes have none).
    hidden_states: (B, S_m, D) final states after the modality's LayerNorm, CLS first.
    padding_masks: (B, S_m) bool, True = padding.
    """

    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden_states: dict[str, torch.Tensor] = field(default_factory=dict)
    padding_masks: dict[str, torch.Tensor] = field(default_factory=dict)


class OnePeaceModel(nn.Module):
    """ONE-PEACE: adapters for each modality feeding one shared Multiway Transformer.

    >>> model = OnePeaceModel(get_config("one-peace-tiny"))
    >>> out = model(text=torch.tensor([[10, 20, 2]]))
    >>> out.embeddings["text"].shape
    torch.Size([1, 64])
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        enc = config.encoder
        self.adapters = nn.ModuleDict({
            name: adapter_class(cfg)(cfg, enc.embed_dim, enc.attention_heads, enc.rel_pos_tables)
            for name, cfg in config.adapters.items()
        })
        self.encoder = Encoder(enc, experts=list(config.adapters))
        if config.projections:
            self.projections = nn.ModuleDict({name: nn.Linear(enc.embed_dim, enc.embed_dim) for name in config.adapters})
            self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        else:
            self.projections = None
            self.logit_scale = None
        if config.classify_head is not None:
            from .heads import ClassifyHead

            self.classify_head = ClassifyHead(config.classify_head, enc.embed_dim, enc.attention_heads)
        else:
            self.classify_head = None
        self._tokenizer = None
        # the plain implementation kept for benchmarks: eager attention with an explicit float32
        # softmax, the (B, H, S, S) mask rebuilt in every layer, batches padded to the longest item
        self.reference_mode = False
        self.attention_kernel = "sdpa"

    @property
    def attention_kernel(self) -> str:
        """Attention kernel outside the reference mode: "sdpa" (torch's fused kernel, the default) or
        "eager" (explicit float32 softmax; `onepeace.modeling.cpu_choice` picks it where it measured it
        faster on this CPU). Same numbers up to rounding."""
        return getattr(self, "_attention_kernel", "sdpa")  # a model pickled before this attribute: sdpa

    @attention_kernel.setter
    def attention_kernel(self, value: str) -> None:
        if value not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {value!r}")
        self._attention_kernel = value

    @property
    def reference_mode(self) -> bool:
        """The plain implementation kept for benchmarks (see __init__); also tells the adapters."""
        return self._reference_mode

    @reference_mode.setter
    def reference_mode(self, value: bool) -> None:
        self._reference_mode = bool(value)
        for adapter in self.adapters.values():
            adapter.reference_mode = bool(value)

    def fuse_for_inference(self) -> "OnePeaceModel":
        """One matmul for q/k/v and one for the GeGLU input projections of every layer (the
        parameters become views of the fused tensors: no extra memory, same state dict). For GPUs;
        a packed model is refused (call `to_dense` first: on CPU the packed weights are faster)."""
        for layer in self.encoder.layers:
            layer.attn.fuse_projections()
            for expert in layer.ffn.values():
                expert.fuse_projections()
        return self

    # ------------------------------------------------------------------ packed CPU inference
    def to_packed(self, dense_above: int | None = None) -> "OnePeaceModel":
        """Swap the encoder's nn.Linear layers for inference-only `PackedLinear` layers where this CPU
        can pack their dtype (`onepeace.modeling.packed.cpu_can_pack`; elsewhere they stay nn.Linear):
        the same numbers (<= 1e-6 relative), short inputs ~2.5x and large batches ~1.3x faster, the
        dense weights released (no second copy). ``onepeace.load`` does this on CPU.

        A packed model is an inference model: it is put in eval mode and its parameters are frozen
        (requires_grad=False, so a plain ``model(...)`` builds no graph); it refuses ``train()``, a
        forward whose inputs require gradients and dtype/device changes until `to_dense`, which gives
        the requires_grad flags back. Fused projections (`fuse_for_inference`) are dropped first.
        dense_above: inputs of this many rows or more are multiplied with a per-call dense copy of the
        weight (`PackedLinear.dense_above`: for CPUs where packed products lose on large batches)."""
        self.eval()
        for layer in self.encoder.layers:
            layer.attn.unfuse_projections()
            for expert in layer.ffn.values():
                expert.unfuse_projections()
        trainable = [name for name, p in self.named_parameters() if p.requires_grad]
        if pack_linears(self.encoder) and not hasattr(self, "_trainable_when_packed"):
            self._trainable_when_packed = trainable  # names (weights included), given back by to_dense
        if self.is_packed:
            self.requires_grad_(False)
        set_dense_above(self.encoder, dense_above)
        return self

    def to_dense(self) -> "OnePeaceModel":
        """Plain nn.Linear layers again (bit-identical weights) and the requires_grad flags from before
        `to_packed`: to train, differentiate or convert the model."""
        unpack_linears(self)
        trainable = self.__dict__.pop("_trainable_when_packed", None)
        if trainable is not None:
            trainable = set(trainable)
            for name, p in self.named_parameters():
                p.requires_grad_(name in trainable)
        return self

    @property
    def is_packed(self) -> bool:
        """Whether any layer is a `PackedLinear` (see `to_packed`)."""
        return any(isinstance(m, PackedLinear) for m in self.modules())

    def train(self, mode: bool = True) -> "OnePeaceModel":
        if mode and self.is_packed:  # refused before any submodule changes mode
            raise RuntimeError("this model's weights are packed for CPU inference and cannot train: call "
                               "model.to_dense() first (or load with onepeace.load(..., pack=False))")
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda(): refuse a conversion packed layers cannot follow BEFORE any tensor
        # is converted (nn.Module converts child by child: a late refusal would leave a mixed model)
        for module in self.modules():
            if isinstance(module, PackedLinear):
                module.check_conversion(fn)
        return super()._apply(fn, recurse)

    def compile_encoder(self, **kwargs: Any) -> "OnePeaceModel":
        """torch.compile the shared encoder in place (parameter names unchanged). The model is made
        dense first (`to_dense`): torch.compile cannot trace packed weights (it packs its own)."""
        self.to_dense()
        self.encoder.compile(**kwargs)
        return self

    # ------------------------------------------------------------------ modalities
    def add_modality(self, name: str, adapter_config: AdapterConfig, init_from: str | None = None
                     ) -> "OnePeaceModel":
        """Add a modality branch in place: its adapter, one FFN expert per encoder layer, its final
        LayerNorm and (with projection heads) its projection. Every existing parameter is kept as is
        (same tensors); the shared attention is untouched.

        The new pieces are built exactly as a model listing `name` would build them (a one-branch
        model of the same encoder config, of which only the branch is kept). init_from: an existing
        modality whose FFN experts, final LayerNorm and projection the new branch starts from (copies);
        the new adapter also starts from that modality's adapter if it defines `initialize_from`.
        """
        if name in self.adapters:
            raise ValueError(f"this model already has a {name!r} branch")
        if init_from is not None and init_from not in self.adapters:
            raise ValueError(f"init_from={init_from!r} is not a branch of this model (it has {list(self.modalities)})")
        branch = dataclasses.replace(self.config, adapters={name: adapter_config}, classify_head=None)
        with torch.device(self.device):
            donor = OnePeaceModel(branch).to(self.dtype)
        if init_from is not None:
            with torch.no_grad():
                for layer, new in zip(self.encoder.layers, donor.encoder.layers):
                    new.ffn[name].load_state_dict(layer.ffn[init_from].state_dict())
                donor.encoder.final_norms[name].load_state_dict(self.encoder.final_norms[init_from].state_dict())
                if self.projections is not None:
                    donor.projections[name].load_state_dict(self.projections[init_from].state_dict())
            if hasattr(donor.adapters[name], "initialize_from"):
                donor.adapters[name].initialize_from(self.adapters[init_from])
        self.adapters[name] = donor.adapters[name]
        self.adapters[name].reference_mode = self.reference_mode
        for layer, new in zip(self.encoder.layers, donor.encoder.layers):
            layer.ffn[name] = new.ffn[name]
        self.encoder.final_norms[name] = donor.encoder.final_norms[name]
        if self.projections is not None:
            self.projections[name] = donor.projections[name]
        self.config = dataclasses.replace(self.config, adapters={**self.config.adapters, name: adapter_config})
        return self

    def set_classify_head(self, head: ClassifyHeadConfig) -> "OnePeaceModel":
        """Attach a new (randomly initialised) task head, e.g. for fine-tuning; the config records it."""
        from .heads import ClassifyHead

        missing = [m for m in head.input_modalities if m not in self.adapters]
        if missing:
            raise ValueError(f"a {head.head_type!r} head needs the {missing} branch (this model has {list(self.modalities)})")
        with torch.device(self.device):
            self.classify_head = ClassifyHead(head, self.config.encoder.embed_dim,
                                              self.config.encoder.attention_heads).to(self.dtype)
        self.config = dataclasses.replace(self.config, classify_head=head)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.adapters)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def temperature(self) -> torch.Tensor:
        """exp(logit_scale) clamped to [1, 100], the scale of the contrastive logits."""
        return self.logit_scale.clamp(0, math.log(100)).exp()

    # ------------------------------------------------------------------ forward
    def forward(self, text: torch.Tensor | None = None, image: torch.Tensor | None = None,
                audio: torch.Tensor | None = None, audio_padding_mask: torch.Tensor | None = None,
                joint: bool = False, **other: torch.Tensor) -> ModelOutput:
        """Run single-modality passes (default) or ONE joint pass over all given modalities (`joint`).

        text: (B, T) int64 ids, pad 1; image: (B, 3, S, S) normalised; audio: (B, N) 16 kHz
        waveforms (layer-normed, zero-padded) with `audio_padding_mask` (B, T'+1), True = pad.
        Other registered modalities come as keyword arguments, with `{name}_padding_mask`.
        """
        inputs, masks = _inputs_and_masks(text=text, image=image, audio=audio,
                                          audio_padding_mask=audio_padding_mask, **other)
        if not inputs:
            raise ValueError(f"no inputs given; this model takes {list(self.modalities)}")
        missing = [m for m in inputs if m not in self.adapters]
        if missing:
            raise ValueError(f"this model has no {missing} branch (it has {list(self.modalities)}); "
                             "was it loaded with modalities=...?")
        order = [m for m in self.modalities if m in inputs]  # canonical order: text first
        outs = {m: self.embed_inputs(m, inputs[m], masks.get(m)) for m in order}

        result = ModelOutput()
        groups = [order] if joint else [[m] for m in order]
        for group in groups:
            hidden = self.encode(
                [(m, outs[m]) for m in group])
            for m in group:
                result.hidden_states[m] = hidden[m]
                result.padding_masks[m] = outs[m].padding_mask
            if len(group) == 1 and self.projections is not None:
                m = group[0]
                result.embeddings[m] = self.project(m, hidden[m][:, 0])
        return result

    def embed_inputs(self, modality: str, value: torch.Tensor, padding_mask: torch.Tensor | None = None,
                     **kwargs: Any) -> AdapterOutput:
        """Run one adapter: raw tensor -> (B, S, D) tokens with their padding mask."""
        adapter = self.adapters[modality]
        if value.is_floating_point():
            value = value.to(self.dtype)
        if padding_mask is not None:
            return adapter(value, padding_mask=padding_mask, **kwargs)
        return adapter(value, **kwargs)

    def encode(self, segments: Sequence[tuple[str, AdapterOutput]]) -> dict[str, torch.Tensor]:
        """One encoder pass over the concatenation of the segments (in the given order).

        Returns each segment's final hidden states (B, S_m, D) after its own final LayerNorm.
        """
        x = torch.cat([out.tokens for _, out in segments], dim=1)  # (B, S, D)
        padding_mask = torch.cat([out.padding_mask for _, out in segments], dim=1)  # (B, S)
        has_padding = bool(padding_mask.any())
        if has_padding:
            x = x * (1 - padding_mask.unsqueeze(-1).to(x.dtype))  # padded rows enter as zero vectors
        layout = [(name, out.tokens.shape[1]) for name, out in segments]
        if self.reference_mode:
            def masks(layer: int):  # rebuilt per layer at full (B, H, S, S), as the published code does
                built = self.attention_masks(segments, padding_mask if has_padding else None, x.dtype)
                if built is None:
                    return None
                mask = built[layer if len(built) > 1 else 0]
                return mask.expand(x.shape[0], -1, -1, -1).contiguous()
            hidden = self.encoder(x, masks, layout, eager=True)
        else:
            masks = self.attention_masks(segments, padding_mask if has_padding else None, x.dtype)
            eager = self.attention_kernel == "eager"
            if has_padding and masks is not None and len(segments) == 1 and not torch.is_grad_enabled():
                # inference on a padded one-modality batch: every row-wise op runs on the real rows only
                # (padded keys are -inf in the mask, so the padded rows never influence real ones)
                rows = RealRows(padding_mask)
                hidden = rows.scatter(self.encoder(rows.gather(x), masks, layout, eager=eager, rows=rows))
            else:
                hidden = self.encoder(x, masks, layout, eager=eager)
        result, start = {}, 0
        for name, length in layout:
            result[name] = hidden[:, start:start + length]
            start += length
        return result

    def attention_masks(self, segments: Sequence[tuple[str, AdapterOutput]], padding_mask: torch.Tensor | None,
                        dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Additive attention masks, one per relative-bias table (1, or one per layer), built once.

        Each modality's relative bias sits on its own diagonal block (cross-modality blocks are 0);
        key-padding columns are -inf. With no bias tables there is no mask at all, even with padding
        (the reference's behaviour, kept for parity: padded rows then still act as keys).
        """
        n_tables = max(self.adapters[name].num_rel_tables for name, _ in segments)
        if n_tables == 0:
            return None
        masks = []
        for t in range(n_tables):
            if len(segments) == 1:
                name, out = segments[0]
                mask = self.adapters[name].attention_bias(t, out).to(dtype)  # (1|B, H, S, S)
            else:
                B = segments[0][1].tokens.shape[0]
                S = sum(out.tokens.shape[1] for _, out in segments)
                H = self.config.encoder.attention_heads
                mask = torch.zeros(B, H, S, S, dtype=dtype, device=segments[0][1].tokens.device)
                start = 0
                for name, out in segments:
                    length = out.tokens.shape[1]
                    adapter = self.adapters[name]
                    if adapter.num_rel_tables:
                        mask[:, :, start:start + length, start:start + length] = adapter.attention_bias(t, out)
                    start += length
            if padding_mask is not None:
                mask = mask.masked_fill(padding_mask[:, None, None, :], float("-inf"))
            # contiguous once here: the bias is a permuted view, which the attention kernel would
            # otherwise copy in every layer (18 ms a layer for 15-s audio)
            masks.append(mask.contiguous())
        return masks

    def project(self, modality: str, cls_state: torch.Tensor) -> torch.Tensor:
        """(B, D) CLS state -> (B, D) L2-normalised embedding."""
        if self.projections is None:
            raise RuntimeError("this model has no projection heads (a task checkpoint)")
        return F.normalize(self.projections[modality](cls_state), dim=-1)

    # ------------------------------------------------------------------ task heads
    @property
    def head_type(self) -> str | None:
        """'vl', 'al', 'text', 'image' or 'audio' for a fine-tuned task checkpoint, else None."""
        return None if self.classify_head is None else self.config.classify_head.head_type

    def classify(self, text: torch.Tensor | None = None, image: torch.Tensor | None = None,
                 audio: torch.Tensor | None = None, audio_padding_mask: torch.Tensor | None = None,
                 image_2: torch.Tensor | None = None, **other: torch.Tensor) -> torch.Tensor:
        """(B, num_classes) logits of the task head. 'vl'/'al' heads take one joint pass (text first);
        two-image heads (NLVR2) a second joint pass with `image_2`, whose pooled vector is appended.
        A head over another registered modality takes it as a keyword (``video=...``)."""
        if self.classify_head is None:
            raise RuntimeError("this model has no task head (load a one_peace_classify checkpoint)")
        hc = self.config.classify_head
        needed = hc.input_modalities
        given, pads = _inputs_and_masks(text=text, image=image, audio=audio,
                                        audio_padding_mask=audio_padding_mask, **other)
        missing = [m for m in needed if given.get(m) is None]
        if missing:
            raise ValueError(f"a {hc.head_type!r} head needs {list(needed)}; missing {missing}")
        if hc.use_two_images and image_2 is None:
            raise ValueError("this head compares two images: pass image_2")

        def pooled_pass(second_image: bool) -> torch.Tensor:
            segments = []
            for m in needed:
                kwargs = {"second_image": True} if (second_image and m == "image") else {}
                pad = pads.get(m)
                value = image_2 if (second_image and m == "image") else given[m]
                segments.append((m, self.embed_inputs(m, value, pad, **kwargs)))
            hidden = self.encode(segments)
            m = hc.pooled_modality
            pad = dict(segments)[m].padding_mask
            return self.classify_head.pool(hidden[m], pad)

        pooled = pooled_pass(False)
        if hc.use_two_images:
            pooled = torch.cat([pooled, pooled_pass(True)], dim=-1)
        return self.classify_head.classify(pooled)

    @torch.inference_mode()
    def ground(self, images: Sequence[Any], phrases: Sequence[str]) -> torch.Tensor:
        """Visual grounding: (N, 4) boxes x1, y1, x2, y2 in each image's own pixels, for one phrase per
        image (the released API: sigmoid of the 4 outputs scaled by the width and height)."""
        from ..data.image import load_image
        from ..inference import modality_transform

        images, phrases = _as_list(images), [phrases] if isinstance(phrases, str) else list(phrases)
        if len(images) != len(phrases):
            raise ValueError(f"{len(images)} images but {len(phrases)} phrases: give one phrase per image")
        transform = modality_transform(self, "image")
        pil = [load_image(i) for i in images]
        pixels = torch.stack([transform(p) for p in pil]).to(self.device)
        tokens = self.tokenizer(phrases).to(self.device)
        logits = self.classify(text=tokens, image=pixels)
        scale = torch.tensor([[p.width, p.height, p.width, p.height] for p in pil], dtype=torch.float32)
        return logits.float().sigmoid().cpu() * scale

    # ------------------------------------------------------------------ raw inputs
    @property
    def tokenizer(self) -> Callable:
        """The released BPE tokenizer (found via ONEPEACE_BPE_DIR or the cache); settable."""
        if self._tokenizer is None:
            from ..tokenizer import get_tokenizer

            max_length = self.config.adapters["text"].max_length if "text" in self.config.adapters else 70
            self._tokenizer = get_tokenizer(max_length=max_length)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Callable) -> None:
        self._tokenizer = value

    def encode_text(self, texts: str | Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Raw strings -> (N, D) L2-normalised embeddings, in input order."""
        from ..inference import encode_items

        return encode_items(self, "text", [texts] if isinstance(texts, str) else list(texts), batch_size)

    def encode_image(self, images: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Paths or PIL images -> (N, D) L2-normalised embeddings."""
        from ..inference import encode_items

        return encode_items(self, "image", _as_list(images), batch_size)

    def encode_audio(self, audios: Sequence[Any], batch_size: int = 8, long_audio: str = "crop") -> torch.Tensor:
        """Paths, (array, sample_rate) pairs or 16 kHz arrays -> (N, D) L2-normalised embeddings.

        long_audio="crop" keeps the first 15 s (the reference); "windows" averages the embeddings of
        overlapping 15-s windows covering the whole clip (see onepeace.modalities.audio.encode_audios)."""
        from ..inference import encode_items

        return encode_items(self, "audio", _as_list(audios, tuple_is_item=True), batch_size, long_audio=long_audio)

    def encode_video(self, videos: Sequence[Any], num_frames: int | None = 8, fps: float | None = None,
                     **options: Any):
        """Video files (.mp4 .webm .mkv .mov ...) -> VideoEmbeddings: `frames` (N, D) the averaged image
        embeddings of `num_frames` uniform frames (or `fps` per second), `audio` (N, D) the audio track's
        (NaN rows + `has_audio` mask without one), `fused`. No video branch needed: see onepeace.video_files."""
        from ..video_files import encode_video

        return encode_video(self, _as_list(videos), num_frames=num_frames, fps=fps, **options)

    def encode_items(self, modality: str, items: Sequence[Any], batch_size: int = 32) -> torch.Tensor:
        """Raw items of any branch (``model.encode_items("video", ["clip.gif"])``) -> (N, D) L2-normalised
        embeddings, through the modality's registered preprocessing and collate."""
        from ..inference import encode_items

        return encode_items(self, modality, _as_list(items), batch_size)

    def zero_shot(self, inputs: Sequence[Any] | Any, labels: Sequence[str], templates: Any = None,
                  modality: str | None = None) -> tuple[torch.Tensor, Any]:
        """Zero-shot classification on any labels: ((N, C) probabilities, a reusable classifier).
        See onepeace.zero_shot (prompt ensembles per modality; modality from file suffixes)."""
        from ..zero_shot import zero_shot

        return zero_shot(self, inputs, labels, templates, modality)


def _inputs_and_masks(**named: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Keyword arguments -> ({modality: input}, {modality: padding mask}), None values dropped."""
    inputs, masks = {}, {}
    for key, value in named.items():
        if value is None:
            continue
        if key.endswith("_padding_mask"):
            masks[key[: -len("_padding_mask")]] = value
        else:
            inputs[key] = value
    return inputs, masks


def _as_list(items: Any, tuple_is_item: bool = False) -> list:
    if isinstance(items, (list,)):
        return items
    if isinstance(items, tuple) and not tuple_is_item:
        return list(items)
    if isinstance(items, tuple) and tuple_is_item and len(items) == 2 and isinstance(items[1], int):
        return [items]
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__") or hasattr(items, "ndim"):
        return [items]  # one path, one array or tensor
    return list(items)
