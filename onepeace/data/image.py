"""Image loading and preprocessing for the ONE-PEACE vision adapter.

The reference pipeline (spec section 7.2) is, for an image file ``path`` and side ``S``::

    Image.open(path).convert("RGB")            # PIL, uint8
      -> .resize((S, S), Image.BICUBIC)        # Pillow's bicubic, on the uint8 image
      -> float in [0, 1]                       # x / 255
      -> (x - CLIP_MEAN) / CLIP_STD            # per channel

``image_to_tensor`` keeps exactly that path for ordinary RGB, L and P images, so tensors match
the reference bit for bit (up to float32 rounding of the normalisation). ``load_image`` adds the
input hygiene the reference does not have, each choice documented where it is made:

* EXIF orientation is applied (``ImageOps.exif_transpose``): a phone photo stored sideways with an
  orientation tag is what the user sees upright, so that is what the model should see. (The
  reference ignores the tag; for the usual tag-less images nothing changes.)
* Alpha (RGBA, LA, PA, P with transparency) is *dropped* by plain ``convert("RGB")``, exactly as
  the reference does, for parity: transparent pixels show whatever colour they store (often
  black). Composite onto a background yourself before calling if that matters.
* 16-bit ('I;16*'), 32-bit integer ('I') and float ('F') grayscale are rescaled to 0..255 before
  conversion, because ``convert`` would clip them (a 16-bit scan would come out almost all white).
* CMYK, YCbCr, '1' (bilevel), etc. go through ``convert("RGB")``.
* Animated images (GIF, APNG, WebP): the first frame.
* Every failure to read a file (missing, empty, not an image, corrupt, truncated, too large) is an
  :class:`InputError` naming the file.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "InputError",
    "load_image",
    "image_to_tensor",
    "ImageTransform",
    "preprocess_images",
]

#: File suffixes (lower case) treated as images when scanning folders.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

#: CLIP normalisation constants used by ONE-PEACE (RGB order); defined with the model config.
from ..config import CLIP_MEAN, CLIP_STD  # noqa: E402

ImageSource = Union[str, "os.PathLike[str]", Image.Image]


class InputError(ValueError):
    """A user-supplied input (image, audio file, array) cannot be used; the message names it."""


# --------------------------------------------------------------------------------------------
# helpers


def _describe(source: object) -> str:
    """A short, quoted name for ``source`` to put in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or ""
        detail = f"mode={source.mode}, size={source.size[0]}x{source.size[1]}"
        return f"<PIL image {name!r} {detail}>" if name else f"<PIL image {detail}>"
    return f"<{type(source).__name__}>"


def _bomb_message(reason: str) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    return (
        f"image is too large ({reason}; the limit is PIL.Image.MAX_IMAGE_PIXELS = {limit} "
        "pixels, a guard against decompression bombs). If you trust this file, raise the limit, "
        "e.g. `PIL.Image.MAX_IMAGE_PIXELS = 300_000_000` (or None to disable the check)"
    )


def _decode_reason(exc: BaseException) -> str:
    """A readable reason for a Pillow decode failure (Pillow words truncation several ways)."""
    msg = str(exc) or type(exc).__name__
    if msg.startswith("image is too large"):  # our own pixel-count guard: already readable
        return msg
    if "truncated" in msg.lower():
        return f"file is truncated ({msg})"
    return f"corrupt or unsupported image data ({msg})"


def _check_pixels(image: Image.Image) -> None:
    """Apply Pillow's decompression-bomb limit to an already opened image (raises ValueError)."""
    limit = Image.MAX_IMAGE_PIXELS
    w, h = image.size
    if limit is not None and w * h > limit:
        raise ValueError(_bomb_message(f"{w}x{h} = {w * h} pixels"))


def _wide_gray_to_l(image: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float grayscale to 8-bit 'L' by the mode's range.

    ``convert("L")`` would clip these to 0..255, so e.g. a 16-bit image (0..65535) would be
    almost entirely white. Instead:

    * ``I;16*`` (unsigned 16-bit): divide by 257 (65535 -> 255), exact full-range mapping.
    * ``I`` (signed 32-bit) and ``F`` (float32): linear min/max stretch of the image's own
      finite values to 0..255 (their nominal range is meaningless in practice). Non-finite
      float pixels take the nearest end of the range (NaN -> min). A constant image has no
      range to stretch and keeps plain ``convert`` semantics (its value clipped to 0..255).
    """
    arr = np.asarray(image)  # (H, W), uint16 / int32 / float32 (maybe byte-swapped)
    if image.mode.startswith("I;16"):
        out = np.rint(arr.astype(np.float64) / 257.0)
    else:
        arr = arr.astype(np.float64)
        finite = np.isfinite(arr)
        if not finite.any():
            raise ValueError(f"{image.mode} image has no finite pixel values")
        lo, hi = float(arr[finite].min()), float(arr[finite].max())
        arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
        if hi > lo:
            out = np.rint((arr - lo) * (255.0 / (hi - lo)))
        else:
            out = arr  # constant image: clip below, as convert() would
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return an RGB version of an already loaded image (see module docstring for each mode)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        return _wide_gray_to_l(image).convert("RGB")
    # Everything else (L, P, PA, RGBA, LA, RGBX, CMYK, YCbCr, 1, ...): the reference's plain
    # convert("RGB"). For palette images with transparency stored as bytes Pillow warns that
    # transparency is lost; dropping alpha is our documented parity choice, so silence it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Palette images with Transparency")
        return image.convert("RGB")


def _normalise_loaded(image: Image.Image) -> Image.Image:
    """Shared tail of ``load_image`` for file and PIL inputs: first frame, EXIF, size, RGB."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated: first frame
        image.load()
    w, h = image.size
    if w == 0 or h == 0:
        raise ValueError(f"image has zero size ({w}x{h})")
    _check_pixels(image)
    try:
        # Returns a transposed copy (or a plain copy when there is nothing to do), so the
        # result never depends on the open file.
        image = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not make a readable photo unusable
        image = image.copy()
    return _to_rgb(image)


# --------------------------------------------------------------------------------------------
# public API


def load_image(source: ImageSource) -> Image.Image:
    """Load ``source`` (a path or a PIL image) as an upright, fully decoded RGB PIL image.

    For an ordinary RGB/L/P file this is the reference's ``Image.open(path).convert("RGB")``;
    see the module docstring for EXIF, alpha, wide grayscale, CMYK and animation handling.
    A PIL image is put through the same steps and returned as a new image (its pixels are not
    modified; an animated one is rewound to frame 0), so a path and ``Image.open(path)`` give
    identical results.

    Raises:
        InputError: the file is missing, empty, not an image, corrupt or truncated, has zero
            size, or exceeds ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression bomb guard).
        TypeError: ``source`` is neither a path nor a PIL image.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                _check_pixels(source)  # before load(): a lazily opened bomb must not be decoded
                source.load()  # lazily opened images may still be truncated
                return _normalise_loaded(source)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"cannot read image {name}: {_bomb_message(str(exc))}") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise InputError(f"cannot read image {name}: {_decode_reason(exc)}") from exc

    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"load_image expects a path or a PIL.Image.Image, got {type(source).__name__}"
        )

    path = os.fspath(source)
    if not os.path.exists(path):
        raise InputError(f"cannot read image {name}: file not found")
    if os.path.isdir(path):
        raise InputError(f"cannot read image {name}: is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise InputError(f"cannot read image {name}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and 2x that; treat it as the limit.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # force the decode inside the try: truncation/corruption show here
                return _normalise_loaded(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"cannot read image {name}: {_bomb_message(str(exc))}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"cannot read image {name}: not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # e.g. "image file is truncated (N bytes not processed)", "Truncated File Read",
        # a broken PNG chunk, a bad JPEG segment
        raise InputError(f"cannot read image {name}: {_decode_reason(exc)}") from exc


def image_to_tensor(
    image: Image.Image,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Resize ``image`` to (size, size) with Pillow bicubic and normalise: (3, size, size) float32.

    The aspect ratio is not kept (the reference squashes to a square). A non-RGB image is first
    converted as in :func:`load_image`.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("mean and std must have 3 values (R, G, B)")
    if any(s == 0 for s in std):
        raise ValueError(f"std must be non-zero, got {tuple(std)}")
    if image.mode != "RGB":
        image = _to_rgb(image)
    resized = image.resize((size, size), Image.Resampling.BICUBIC)  # uint8 in, uint8 out
    arr = np.asarray(resized, dtype=np.uint8)  # (S, S, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)  # (3, S, S)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s).contiguous()


@dataclass(frozen=True)
class ImageTransform:
    """Callable: image path or PIL image -> normalised (3, size, size) float32 tensor.

    ``size`` is the model's ``image_size`` (256 for the released ONE-PEACE).
    """

    size: int = 256
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, source: ImageSource) -> torch.Tensor:
        return image_to_tensor(load_image(source), self.size, self.mean, self.std)


def preprocess_images(
    sources: Sequence[ImageSource],
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Load and preprocess several images into one batch: (N, 3, size, size) float32.

    An empty sequence gives an empty (0, 3, size, size) batch. The first unreadable input
    raises :class:`InputError` naming it.
    """
    if isinstance(sources, (str, os.PathLike, Image.Image)):
        raise TypeError("preprocess_images expects a sequence of images; use load_image for one")
    tensors = [image_to_tensor(load_image(src), size, mean, std) for src in sources]
    if not tensors:
        return torch.empty(0, 3, size, size, dtype=torch.float32)
    return torch.stack(tensors, dim=0)
