"""Manifest datasets and the pretraining collate for ONE-PEACE.

A manifest is a JSONL file, one object per line, either an image-text pair or an audio-text pair::

    {"image": "images/a.jpg", "text": "a dog on the grass"}
    {"audio": "clips/b.flac", "text": "a dog barks", "label": 3}

Paths are relative to the manifest's folder (absolute paths are kept); other keys are kept
as-is. :class:`ManifestDataset` turns a line into a tokenised, preprocessed item with the
masks of every pretraining view (see :mod:`onepeace.data.masking`), and
:func:`collate_pretrain` pads a list of items into the batch layout the pretraining losses read
(the layout of ``fixtures/official-pretrain-tiny/expected.pt``):

* vision-language: ``src_tokens`` (B, T) int64 padded with 1, ``src_images`` (B, 3, S, S), and
  for the views ``text``, ``image``, ``vl_text``, ``vl_image``: ``{view}_mask_indices``
  (B, T+1 or n+1) bool and ``{view}_preserve_ids`` (B, K) int64 padded with -1;
* audio-language: ``src_tokens``, ``src_audios`` (B, N) float32, ``audio_padding_masks``
  (B, T'+1) bool, and the views ``text``, ``audio``, ``al_text``, ``al_audio`` likewise.

A file that cannot be read does not stop training: the item is logged (logger
``onepeace.data``) and comes back as ``None``, which the collate drops.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import RELEASED_AUDIO_FEATURE_SPEC
from .audio import AudioTransform, InputError, collate_waveforms, feature_lengths, normalize_waveform
from .image import ImageTransform
from .masking import (
    MaskingConfig,
    item_generator,
    joint_image_mask,
    joint_text_mask,
    pad_masks,
    pad_preserve_ids,
    preserve_ids,
    random_mask,
    span_mask,
    whole_word_mask,
)

__all__ = [
    "AL_VIEWS",
    "DEFAULT_MASKING",
    "VL_VIEWS",
    "ManifestDataset",
    "collate_pretrain",
    "read_manifest",
]

logger = logging.getLogger("onepeace.data")

#: Masked views of a vision-language item and the modality each is over.
VL_VIEWS: tuple[tuple[str, str], ...] = (
    ("text", "text"), ("image", "image"), ("vl_text", "text"), ("vl_image", "image"))
#: Masked views of an audio-language item and the modality each is over.
AL_VIEWS: tuple[tuple[str, str], ...] = (
    ("text", "text"), ("audio", "audio"), ("al_text", "text"), ("al_audio", "audio"))

#: The reference mask ratios (``ManifestDataset``'s default; frozen, so safe to share).
DEFAULT_MASKING = MaskingConfig()

_MEDIA_KEYS = ("image", "audio")  # the pretraining tasks' media (vl, al)


def media_keys() -> tuple[str, ...]:
    """Keys a manifest line may carry its medium under: every registered modality but text."""
    from ..registry import list_modalities

    return tuple(m for m in list_modalities() if m != "text")
_PATCH_SIZE = 16  # pixels per image patch side of the released image adapter
_TEXT_PAD = 1


# --------------------------------------------------------------------------------------------
# manifest


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL manifest; media paths come back resolved against the manifest's folder.

    Blank lines are skipped. Each other line must be a JSON object with a string ``"text"`` and
    exactly one medium key: ``"image"``, ``"audio"`` or another registered modality such as
    ``"video"`` (a non-empty string path).

    Raises:
        FileNotFoundError: the manifest does not exist.
        ValueError: a malformed line; the message names ``file:line``.
    """
    path = Path(path)
    folder = path.parent
    keys = media_keys()
    entries: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(entry, dict):
                raise ValueError(  # noqa: TRY004 - a malformed line is a ValueError
                    f"{where}: expected a JSON object, got {type(entry).__name__}")
            media = [k for k in keys if k in entry]
            if len(media) != 1:
                raise ValueError(f"{where}: expected exactly one of {' or '.join(map(repr, keys))}, got "
                                 f"{media or 'none'}")
            key = media[0]
            if not isinstance(entry[key], str) or not entry[key]:
                raise ValueError(f"{where}: '{key}' must be a non-empty path string")
            if not isinstance(entry.get("text"), str):
                raise ValueError(f"{where}: 'text' must be a string")  # noqa: TRY004
            media_path = Path(os.path.expanduser(entry[key]))
            entry[key] = str(media_path if media_path.is_absolute() else folder / media_path)
            entries.append(entry)
    return entries


# --------------------------------------------------------------------------------------------
# dataset


class ManifestDataset(Dataset):
    """Image-text / audio-text pairs from a manifest, with pretraining masks.

    Args:
        manifest: a JSONL path (see :func:`read_manifest`) or an already read list of entries.
        tokenizer: a :class:`onepeace.tokenizer.Tokenizer` (``encode`` and ``word_start_mask``).
        image_transform: path -> (3, S, S) tensor; default ``ImageTransform()`` (S = 256).
        audio_transform: path -> prepared (N,) waveform; default ``AudioTransform()``.
        audio_feature_spec: the audio adapter's (channels, kernel, stride) conv spec, to count
            the T' frames an audio mask is over; default: the released spec.
        masking: mask ratios, or None for no masks (evaluation).
        seed: base seed; masks depend only on (seed, epoch, index).
        max_text_length: text ids kept before ``</s>``.
        patch_size: image patch side in pixels (n_patches = (S // patch_size) ** 2).

    ``__getitem__`` returns a dict, or None for an unreadable item (logged as a warning):

    * ``index`` (int), ``kind`` (``'vl'`` or ``'al'``), ``tokens`` (T,) int64 ending in ``</s>``;
    * ``image`` (3, S, S) float32, or ``audio`` (N,) float32 and ``audio_frames`` (int T');
    * with masking, per view (see :data:`VL_VIEWS` / :data:`AL_VIEWS`):
      ``{view}_mask_indices`` (T+1,) / (n+1,) / (T'+1,) bool and ``{view}_preserve_ids`` (K,)
      int64, unpadded.

    Call :meth:`set_epoch` before each epoch (in the main process, before creating the
    DataLoader iterator) to draw new masks.
    """

    def __init__(
        self,
        manifest: str | os.PathLike | Sequence[dict[str, Any]],
        *,
        tokenizer: Any,
        image_transform: Callable[[str], torch.Tensor] | None = None,
        audio_transform: Callable[[str], torch.Tensor] | None = None,
        audio_feature_spec: Sequence[tuple[int, int, int]] | None = None,
        masking: MaskingConfig | None = DEFAULT_MASKING,
        seed: int = 0,
        max_text_length: int = 70,
        patch_size: int = _PATCH_SIZE,
        audio_augment: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None = None,
    ) -> None:
        if isinstance(manifest, (str, os.PathLike)):
            self.manifest_path: str | None = os.fspath(manifest)
            self.entries = read_manifest(manifest)
        else:
            self.manifest_path = None
            self.entries = [dict(e) for e in manifest]
            for i, e in enumerate(self.entries):
                if sum(k in e for k in _MEDIA_KEYS) != 1 or not isinstance(e.get("text"), str):
                    raise ValueError(f"entry {i}: expected a string 'text' and exactly one of "
                                     "'image' or 'audio'")
        self.tokenizer = tokenizer
        self.image_transform = image_transform if image_transform is not None else ImageTransform()
        self.audio_transform = audio_transform if audio_transform is not None else AudioTransform()
        self.audio_feature_spec = tuple(
            tuple(layer) for layer in (audio_feature_spec or RELEASED_AUDIO_FEATURE_SPEC))
        self.masking = masking
        self.seed = int(seed)
        self.max_text_length = int(max_text_length)
        self.patch_size = int(patch_size)
        # (N,) waveform, generator -> (M,) waveform (e.g. data.augment.WaveformAugment); the draws are
        # a function of (seed, epoch, index), like the masks, so a resumed run hears the same audio
        self.audio_augment = audio_augment
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masks ``__getitem__`` draws."""
        self.epoch = int(epoch)

    def collate(self, items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
        """:func:`collate_pretrain` with this dataset's audio feature spec (a ``collate_fn``)."""
        return collate_pretrain(items, audio_feature_spec=self.audio_feature_spec)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        entry = self.entries[index]
        kind = "vl" if "image" in entry else "al"
        path = entry["image"] if kind == "vl" else entry["audio"]
        try:
            return self._load(index, entry, kind, path)
        except (InputError, OSError) as exc:
            logger.warning("skipping item %d (%s): %s", index, path, exc)
        except Exception as exc:  # noqa: BLE001 - a bad item must never stop a training run
            logger.warning("skipping item %d (%s): %s: %s", index, path, type(exc).__name__, exc)
        return None

    def _load(self, index: int, entry: dict[str, Any], kind: str, path: str) -> dict[str, Any]:
        tokens = torch.tensor(
            self.tokenizer.encode(entry["text"], max_length=self.max_text_length),
            dtype=torch.int64)  # (T,)
        item: dict[str, Any] = {"index": int(index), "kind": kind, "tokens": tokens}
        if kind == "vl":
            image = self.image_transform(path)  # (3, S, S)
            if image.dim() != 3 or image.shape[0] != 3 or image.shape[1] != image.shape[2]:
                raise ValueError(f"image transform gave shape {tuple(image.shape)}, "
                                 "expected (3, S, S)")
            item["image"] = image
            if self.masking is not None:
                n_patches = (image.shape[-1] // self.patch_size) ** 2
                item.update(self._vl_masks(index, tokens, n_patches))
        else:
            audio = torch.as_tensor(self.audio_transform(path))  # (N,)
            if self.audio_augment is not None:
                audio = self._augment_audio(index, audio)
            if audio.dim() != 1 or audio.numel() == 0:
                raise ValueError(f"audio transform gave shape {tuple(audio.shape)}, "
                                 "expected a non-empty (N,)")
            frames = int(feature_lengths(int(audio.numel()), self.audio_feature_spec))  # T'
            if frames == 0:
                raise InputError(f"audio '{path}' is too short: no feature frames")
            item["audio"] = audio.to(torch.float32)
            item["audio_frames"] = frames
            if self.masking is not None:
                item.update(self._al_masks(index, tokens, frames))
        return item

    def _augment_audio(self, index: int, audio: torch.Tensor) -> torch.Tensor:
        """Augment a prepared (normalised) clip: scaled to RMS 0.1 first, so the augmentation's
        clipping at +-1 acts as on a recording, then normalised and cropped again."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(index), 7]))
        wave = self.audio_augment(audio.to(torch.float32).numpy() * np.float32(0.1), rng)
        out = normalize_waveform(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)))
        max_seconds = getattr(self.audio_transform, "max_seconds", None)
        if max_seconds is not None:  # a slower clip may have grown past the crop
            out = out[: round(max_seconds * getattr(self.audio_transform, "sample_rate", 16_000))]
        return out.contiguous()

    def _text_masks(self, tokens: torch.Tensor, ratio: float, gen: torch.Generator) -> torch.Tensor:
        return whole_word_mask(self.tokenizer.word_start_mask(tokens), ratio, gen)  # (T+1,)

    def _vl_masks(self, index: int, tokens: torch.Tensor, n_patches: int) -> dict[str, torch.Tensor]:
        cfg = self.masking
        assert cfg is not None
        gen = item_generator(self.seed, self.epoch, index)
        text = self._text_masks(tokens, cfg.text_mask_ratio, gen)  # (T+1,)
        image = random_mask(n_patches, int(cfg.image_mask_ratio * n_patches), gen)  # (n+1,)
        vl_text = joint_text_mask(text, tokens.numel() - 1, cfg.vl_text_mask_ratio, gen)
        vl_image = joint_image_mask(image, cfg.vl_image_mask_ratio, gen)
        return _with_preserve_ids(
            {"text": text, "image": image, "vl_text": vl_text, "vl_image": vl_image})

    def _al_masks(self, index: int, tokens: torch.Tensor, frames: int) -> dict[str, torch.Tensor]:
        cfg = self.masking
        assert cfg is not None
        gen = item_generator(self.seed, self.epoch, index)
        text = self._text_masks(tokens, cfg.text_mask_ratio, gen)  # (T+1,)
        audio = span_mask(frames, cfg.audio_mask_ratio, cfg.audio_span, gen)  # (T'+1,)
        al_text = self._text_masks(tokens, cfg.al_text_mask_ratio, gen)  # (T+1,)
        al_audio = span_mask(frames, cfg.al_audio_mask_ratio, cfg.audio_span, gen)  # (T'+1,)
        return _with_preserve_ids(
            {"text": text, "audio": audio, "al_text": al_text, "al_audio": al_audio})


def _with_preserve_ids(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{view: mask} -> {view_mask_indices: mask, view_preserve_ids: kept positions}."""
    out: dict[str, torch.Tensor] = {}
    for view, mask in masks.items():
        out[f"{view}_mask_indices"] = mask
        out[f"{view}_preserve_ids"] = preserve_ids(mask)
    return out


# --------------------------------------------------------------------------------------------
# collate


def collate_pretrain(
    items: Sequence[dict[str, Any] | None],
    audio_feature_spec: Sequence[tuple[int, int, int]] | None = None,
) -> dict[str, Any] | None:
    """Pad ``ManifestDataset`` items into one pretraining batch; None items are dropped.

    Args:
        items: items of one kind (all ``'vl'`` or all ``'al'``), or None for bad items.
        audio_feature_spec: the conv spec the items' audio masks were made with (default the
            released one; only kernels and strides matter). ``ManifestDataset.collate`` passes
            the dataset's own.

    Returns:
        The batch dict described in the module docstring plus ``index`` (B,) int64 and
        ``kind``; without masks (items from ``masking=None``) only the inputs, padding masks,
        ``index`` and ``kind``. None when every item was None.

    Raises:
        ValueError: mixed kinds, or items that disagree on having masks, or audio masks that
            do not fit ``audio_feature_spec``.
    """
    kept = [it for it in items if it is not None]
    if not kept:
        return None
    kinds = {it["kind"] for it in kept}
    if len(kinds) != 1:
        raise ValueError(f"cannot collate items of different kinds in one batch: {sorted(kinds)}")
    kind = kinds.pop()
    views = VL_VIEWS if kind == "vl" else AL_VIEWS
    has_masks = {f"{views[0][0]}_mask_indices" in it for it in kept}
    if len(has_masks) != 1:
        raise ValueError("cannot collate items with masks together with items without masks")
    masked = has_masks.pop()

    # text: (B, T) padded with 1; text masks over T+1 positions
    tokens = [it["tokens"] for it in kept]
    width = max(int(t.numel()) for t in tokens)
    src_tokens = torch.full((len(kept), width), _TEXT_PAD, dtype=torch.int64)  # (B, T)
    for row, t in enumerate(tokens):
        src_tokens[row, : t.numel()] = t
    lengths = {"text": width + 1}

    batch: dict[str, Any] = {"src_tokens": src_tokens}
    if kind == "vl":
        images = [it["image"] for it in kept]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"cannot batch images of different shapes: {sorted(shapes)}")
        batch["src_images"] = torch.stack(images).to(torch.float32)  # (B, 3, S, S)
        if masked:
            lengths["image"] = max(int(it["image_mask_indices"].numel()) for it in kept)
    else:
        spec = audio_feature_spec or RELEASED_AUDIO_FEATURE_SPEC
        src_audios, padding = collate_waveforms([it["audio"] for it in kept], spec)
        frames = torch.tensor([it["audio_frames"] for it in kept], dtype=torch.int64)  # (B,)
        if not torch.equal((~padding).sum(1), frames + 1):
            raise ValueError("the items' audio frame counts do not match audio_feature_spec; "
                             "collate with the dataset's spec (ManifestDataset.collate)")
        batch["src_audios"] = src_audios  # (B, N)
        batch["audio_padding_masks"] = padding  # (B, T'+1), True = padding
        lengths["audio"] = padding.shape[1]

    if masked:
        for view, modality in views:
            batch[f"{view}_mask_indices"] = pad_masks(
                [it[f"{view}_mask_indices"] for it in kept], lengths[modality])  # (B, L)
            batch[f"{view}_preserve_ids"] = pad_preserve_ids(
                [it[f"{view}_preserve_ids"] for it in kept])  # (B, K)

    batch["index"] = torch.tensor([it["index"] for it in kept], dtype=torch.int64)  # (B,)
    batch["kind"] = kind
    return batch
