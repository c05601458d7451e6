"""Masks for ONE-PEACE's denoising contrastive pretraining (spec section 10.2).

Every mask is over the *positions* of one item, position 0 being the adapter's CLS:

* text: ``T + 1`` positions for ``T`` tokens (the final ``</s>`` included); token ``j`` sits at
  position ``j + 1``;
* image: ``n_patches + 1`` positions;
* audio: ``T' + 1`` positions for ``T'`` conv frames.

A mask is a bool tensor, True = masked. Position 0 and the text's ``</s>`` are never masked, and in
a batch padding positions are False. ``preserve_ids`` are the kept (not masked), non-padding
positions of an item in increasing order (0 included); a batch right-pads them with -1.

The reference rules, one function each:

=========================  ========================================================================
view                       rule
=========================  ========================================================================
text-only                  :func:`whole_word_mask`, ratio 0.15
image-only                 :func:`random_mask`, ``int(0.75 * n_patches)`` patches
joint vl, text             :func:`joint_text_mask`, ``int(0.4 * n_tokens)``, prefers text-only-kept
joint vl, image            :func:`joint_image_mask`, ``int(0.6875 * n)``, all image-only-kept first
audio-only                 :func:`span_mask`, p = 0.55, spans of 5
joint al, audio            :func:`span_mask`, p = 0.45 (drawn independently of the audio-only view)
joint al, text             :func:`whole_word_mask`, ratio 0.4
=========================  ========================================================================

All randomness comes from a ``torch.Generator`` passed in (never the global RNG);
:func:`item_generator` makes one per (seed, epoch, dataset index), so an item's masks do not depend
on the number of workers, the batch it lands in or the order items are read.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "MaskingConfig",
    "item_generator",
    "joint_image_mask",
    "joint_text_mask",
    "pad_masks",
    "pad_preserve_ids",
    "preserve_ids",
    "random_mask",
    "span_mask",
    "whole_word_mask",
]


@dataclass(frozen=True)
class MaskingConfig:
    """Mask ratios of every pretraining view (defaults: the reference's)."""

    text_mask_ratio: float = 0.15  # text-only view, whole-word (ratio of words)
    image_mask_ratio: float = 0.75  # image-only view (ratio of patches)
    vl_text_mask_ratio: float = 0.4  # joint vl view, text (ratio of tokens, EOS excluded)
    vl_image_mask_ratio: float = 0.6875  # joint vl view, image (ratio of patches)
    audio_mask_ratio: float = 0.55  # audio-only view (spans; ratio of frames)
    al_audio_mask_ratio: float = 0.45  # joint al view, audio (spans, drawn independently)
    al_text_mask_ratio: float = 0.4  # joint al view, text: whole-word (ratio of words)
    audio_span: int = 5  # frames per audio span (centre +- span // 2)

    def __post_init__(self) -> None:
        for name in ("text_mask_ratio", "image_mask_ratio", "vl_text_mask_ratio",
                     "vl_image_mask_ratio", "audio_mask_ratio", "al_audio_mask_ratio",
                     "al_text_mask_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if self.audio_span < 1:
            raise ValueError(f"audio_span must be >= 1, got {self.audio_span!r}")


# --------------------------------------------------------------------------------------------
# helpers


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1], got {ratio!r}")


def _shuffled(values: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``values`` (1-D) in a random order drawn from ``generator``."""
    if values.numel() <= 1:
        return values
    return values[torch.randperm(values.numel(), generator=generator)]


# --------------------------------------------------------------------------------------------
# mask rules


def whole_word_mask(
    word_starts: torch.Tensor, ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Whole-word masking of one text item.

    Args:
        word_starts: (T,) bool over the item's tokens, the final ``</s>`` included (e.g.
            ``Tokenizer.word_start_mask(tokens)``). The last token is never a candidate.
            The first token always starts a word (even if ``word_starts[0]`` is False), so
            every non-EOS token belongs to exactly one word.
        ratio: fraction of words to mask; ``ceil(ratio * n_words)`` words are chosen uniformly
            without replacement (at least 1 when there is a word and ``ratio > 0``).
        generator: source of randomness.

    Returns:
        (T + 1,) bool over positions (0 = CLS, never masked; ``T`` = ``</s>``, never masked).
        A masked word masks its start token and the continuation tokens that follow it, up to
        the next word start or the ``</s>``.
    """
    _check_ratio(ratio)
    if word_starts.dim() != 1:
        raise ValueError(f"word_starts must be 1-D (T,), got shape {tuple(word_starts.shape)}")
    n_tokens = word_starts.numel()  # T, including the final </s>
    mask = torch.zeros(n_tokens + 1, dtype=torch.bool)  # (T+1,)
    body = n_tokens - 1  # tokens that can be masked (all but </s>)
    if body <= 0:
        return mask
    starts = word_starts[:body].to(torch.bool).clone()  # (T-1,)
    starts[0] = True  # a leading continuation would otherwise belong to no word
    start_idx = starts.nonzero().flatten()  # (W,) token index of each word start
    n_words = start_idx.numel()
    n_mask = min(n_words, math.ceil(ratio * n_words))
    if n_mask == 0:
        return mask
    ends = torch.cat([start_idx[1:], torch.tensor([body])])  # (W,) exclusive end of each word
    chosen = torch.randperm(n_words, generator=generator)[:n_mask]
    for w in chosen.tolist():
        s, e = int(start_idx[w]), int(ends[w])
        mask[s + 1 : e + 1] = True  # token j -> position j + 1
    return mask


def random_mask(n_units: int, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """Mask exactly ``count`` of positions ``1 .. n_units`` uniformly at random.

    Returns:
        (n_units + 1,) bool; position 0 (CLS) is False.
    """
    if n_units < 0 or not 0 <= count <= n_units:
        raise ValueError(f"need 0 <= count <= n_units, got count={count}, n_units={n_units}")
    mask = torch.zeros(n_units + 1, dtype=torch.bool)  # (n+1,)
    if count:
        chosen = torch.randperm(n_units, generator=generator)[:count] + 1
        mask[chosen] = True
    return mask


def joint_text_mask(
    text_only_mask: torch.Tensor,
    n_tokens_excl_eos: int,
    ratio: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Text mask of a joint view, complementary to the text-only view where possible.

    ``int(ratio * n_tokens_excl_eos)`` of positions ``1 .. n_tokens_excl_eos`` are masked: first
    positions the text-only mask KEPT (in random order), then, if those run out, positions it
    masked (in random order).

    Args:
        text_only_mask: (T + 1,) bool, the item's text-only mask.
        n_tokens_excl_eos: number of text tokens before ``</s>`` (``T - 1`` for an unpadded item).
        ratio: fraction of those tokens to mask.
        generator: source of randomness.

    Returns:
        (T + 1,) bool, same length as ``text_only_mask``.
    """
    _check_ratio(ratio)
    n = int(n_tokens_excl_eos)
    if text_only_mask.dim() != 1 or not 0 <= n <= text_only_mask.numel() - 1:
        raise ValueError(
            f"n_tokens_excl_eos={n} does not fit a text mask of shape {tuple(text_only_mask.shape)}"
        )
    count = int(ratio * n)
    positions = torch.arange(1, n + 1)  # (n,) candidate positions
    prior = text_only_mask[1 : n + 1].to(torch.bool)  # (n,)
    kept, masked = positions[~prior], positions[prior]
    # Two permutations drawn in a fixed order, so the result only depends on the generator state.
    order = torch.cat([_shuffled(kept, generator), _shuffled(masked, generator)])
    mask = torch.zeros_like(text_only_mask, dtype=torch.bool)  # (T+1,)
    mask[order[:count]] = True
    return mask


def joint_image_mask(
    image_only_mask: torch.Tensor, ratio: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Image mask of the joint vl view: the image-only view's kept patches, then masked ones.

    ``count = int(ratio * n_patches)`` patches are masked: every patch the image-only mask KEPT
    plus random image-only-masked patches up to ``count``. If the kept patches alone exceed
    ``count``, ``count`` of them are chosen at random.

    Args:
        image_only_mask: (n_patches + 1,) bool.
        ratio: fraction of patches to mask.
        generator: source of randomness.

    Returns:
        (n_patches + 1,) bool; position 0 (CLS) is False.
    """
    _check_ratio(ratio)
    if image_only_mask.dim() != 1 or image_only_mask.numel() < 1:
        raise ValueError(f"image_only_mask must be (n+1,), got {tuple(image_only_mask.shape)}")
    n = image_only_mask.numel() - 1
    count = int(ratio * n)
    positions = torch.arange(1, n + 1)  # (n,)
    prior = image_only_mask[1:].to(torch.bool)  # (n,)
    kept, masked = positions[~prior], positions[prior]
    mask = torch.zeros(n + 1, dtype=torch.bool)  # (n+1,)
    if kept.numel() >= count:
        mask[_shuffled(kept, generator)[:count]] = True
    else:
        mask[kept] = True
        mask[_shuffled(masked, generator)[: count - kept.numel()]] = True
    return mask


def span_mask(
    n_frames: int, ratio: float, span: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Span masking of ``n_frames`` audio frames (T'), exactly ``int(T' * ratio)`` masked.

    ``int(T' * (ratio + 0.1) / span)`` centres are drawn uniformly over the frames (with
    replacement); each masks frames ``centre - span // 2 .. centre + span // 2`` (clamped to the
    sequence). Then random masked frames are unmasked, or random unmasked frames masked, until
    exactly ``int(T' * ratio)`` are masked.

    Returns:
        (n_frames + 1,) bool over positions; position 0 (CLS) is False, frame f is position f + 1.
    """
    _check_ratio(ratio)
    if n_frames < 0:
        raise ValueError(f"n_frames must be >= 0, got {n_frames}")
    if span < 1:
        raise ValueError(f"span must be >= 1, got {span}")
    frames = torch.zeros(n_frames, dtype=torch.bool)  # (T',)
    target = int(n_frames * ratio)
    n_centres = int(n_frames * (ratio + 0.1) / span)
    if n_frames and n_centres:
        centres = torch.randint(0, n_frames, (n_centres,), generator=generator)  # (C,)
        half = span // 2
        offsets = torch.arange(-half, half + 1)  # (span',)
        covered = (centres.unsqueeze(1) + offsets).clamp_(0, n_frames - 1)  # (C, span')
        frames[covered.flatten()] = True
    current = int(frames.sum())
    if current > target:
        on = frames.nonzero().flatten()
        frames[_shuffled(on, generator)[: current - target]] = False
    elif current < target:
        off = (~frames).nonzero().flatten()
        frames[_shuffled(off, generator)[: target - current]] = True
    return torch.cat([torch.zeros(1, dtype=torch.bool), frames])  # (T'+1,)


# --------------------------------------------------------------------------------------------
# formats


def preserve_ids(mask: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Kept positions of one item, increasing: (K,) int64.

    Args:
        mask: (L,) bool, True = masked.
        valid: optional (L,) bool, True = real position (False = padding, never kept).
    """
    if mask.dim() != 1:
        raise ValueError(f"mask must be 1-D, got shape {tuple(mask.shape)}")
    keep = ~mask.to(torch.bool)
    if valid is not None:
        if valid.shape != mask.shape:
            raise ValueError(f"valid {tuple(valid.shape)} and mask {tuple(mask.shape)} differ")
        keep &= valid.to(torch.bool)
    return keep.nonzero().flatten().to(torch.int64)


def pad_preserve_ids(ids: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-item preserve ids: (B, K_max) int64, right-padded with -1."""
    width = max((int(t.numel()) for t in ids), default=0)
    out = torch.full((len(ids), width), -1, dtype=torch.int64)  # (B, K)
    for row, t in enumerate(ids):
        out[row, : t.numel()] = t.to(torch.int64)
    return out


def pad_masks(masks: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Stack per-item masks: (B, length) bool, right-padded with False (padding is never masked)."""
    out = torch.zeros(len(masks), length, dtype=torch.bool)  # (B, L)
    for row, m in enumerate(masks):
        if m.numel() > length:
            raise ValueError(f"mask {row} has {m.numel()} positions, more than length={length}")
        out[row, : m.numel()] = m.to(torch.bool)
    return out


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index) only.

    The three integers are hashed (BLAKE2b) into a 63-bit seed, so nearby triples give unrelated
    streams, and the result does not depend on workers, batching or reading order.
    """
    key = f"onepeace-mask:{int(seed)}:{int(epoch)}:{int(index)}".encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    generator = torch.Generator(device="cpu")
    generator.manual_seed(value)
    return generator
