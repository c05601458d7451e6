"""Released checkpoints by name: the table, a verified resumable download, a one-time conversion.

>>> import onepeace
>>> [c.name for c in onepeace.list_pretrained()][:2]
['one-peace', 'one-peace-vision']
>>> model = onepeace.load("one-peace")          # doctest: +SKIP  (7.8 GB on first use)

Files go to ``${ONEPEACE_CACHE:-~/.cache/onepeace}/checkpoints/``:

- ``NAME.pt``: the released file, written atomically: bytes arrive in ``NAME.pt.part`` (kept when a
  download is interrupted and resumed with an HTTP range request next time), and only a file whose
  size and sha256 check out is moved to ``NAME.pt``. A body that fails the check is deleted.
- ``NAME.pt.sha256``: the file's sha256, from the table where the publisher gave one, otherwise
  recorded at the first download; every later use checks the file against it.
- ``converted/NAME/``: the converted folder (config.json + model.safetensors) written once, so every
  later ``load`` is pickle-free and reads only the branches it is asked for.

Downloads go through `pooch` (hash checks, atomic moves) with a ranged `requests` downloader.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

_BUCKET = "https://one-peace-shanghai.oss-accelerate.aliyuncs.com"


@dataclass(frozen=True)
class PretrainedCheckpoint:
    """One released checkpoint, as the official repository's checkpoint table lists it."""

    name: str
    task: str
    modalities: tuple[str, ...]
    url: str
    size_bytes: int | None = None  # None: the publisher gives no size (checked against the server's)
    sha256: str | None = None  # None: recorded at the first download, verified on later loads
    loadable: bool = True  # False: a checkpoint of the vision-only codebase (mmdet/mmseg), listed for reference

    @property
    def filename(self) -> str:
        return f"{self.name}.pt"


def _entry(name: str, task: str, modalities: str, path: str, loadable: bool = True,
           size_bytes: int | None = None) -> PretrainedCheckpoint:
    return PretrainedCheckpoint(name, task, tuple(modalities.split(",")), f"{_BUCKET}/{path}",
                                size_bytes=size_bytes, loadable=loadable)


# The official checkpoints.md and README model card. Sizes and hashes are not published there; the
# 4B file is ~7.8 GB. "one-peace" is the pretrained model the retrieval API (from_pretrained("ONE-PEACE")) uses.
PRETRAINED: dict[str, PretrainedCheckpoint] = {c.name: c for c in [
    _entry("one-peace", "pretrained 4B (embeddings, retrieval, zero-shot)", "text,image,audio", "one-peace.pt"),
    _entry("one-peace-vision", "pretrained vision branch (1.5B)", "image",
           "one_peace_checkpoints/one-peace-vision.pkl", loadable=False),
    _entry("imagenet-384", "ImageNet-1k classification, 384 px", "image",
           "one_peace_checkpoints/onepeace_ft_21kto1k_384.pth", loadable=False),
    _entry("imagenet-512", "ImageNet-1k classification, 512 px", "image",
           "one_peace_checkpoints/onepeace_ft_21kto1k_512.pth", loadable=False),
    _entry("coco-detection", "COCO detection + instance segmentation", "image",
           "one_peace_checkpoints/onepeace_det_coco.pth", loadable=False),
    _entry("ade20k-segmentation", "ADE20K semantic segmentation", "image",
           "one_peace_checkpoints/onepeace_seg_cocostuff2ade20k.pth", loadable=False),
    _entry("k400-video", "Kinetics-400 action recognition", "image",
           "one_peace_checkpoints/onepeace_video_k400.pth", loadable=False),
    _entry("fsd50k", "FSD50K audio classification", "audio", "one_peace_checkpoints/finetune_fsd50k.pt"),
    _entry("vggsound", "VGGSound audio(-visual) classification", "audio,image",
           "one_peace_checkpoints/finetune_vggsound.pt"),
    _entry("audio-text-retrieval", "AudioCaps & Clotho audio-text retrieval", "text,audio",
           "one_peace_checkpoints/finetune_al_retrieval.pt"),
    _entry("aqa", "audio question answering (AVQA)", "text,audio", "one_peace_checkpoints/finetune_aqa.pt"),
    _entry("coco-retrieval", "COCO image-text retrieval", "text,image", "one_peace_checkpoints/finetune_coco.pt"),
    _entry("flickr30k-retrieval", "Flickr30K image-text retrieval", "text,image",
           "one_peace_checkpoints/finetune_flickr.pt"),
    _entry("refcoco", "visual grounding (RefCOCO)", "text,image", "one_peace_checkpoints/finetune_refcoco.pt"),
    _entry("refcoco+", "visual grounding (RefCOCO+)", "text,image", "one_peace_checkpoints/finetune_refcoco%2B.pt"),
    _entry("refcocog", "visual grounding (RefCOCOg; the official 'ONE-PEACE_Grounding')", "text,image",
           "one_peace_checkpoints/finetune_refcocog.pt"),
    _entry("nlvr2", "visual reasoning (NLVR2)", "text,image", "one_peace_checkpoints/finetune_nlvr2.pt"),
    _entry("vqa", "visual question answering (VQAv2)", "text,image", "one_peace_checkpoints/finetune_vqa.pt"),
]}


class DownloadError(RuntimeError):
    """A checkpoint could not be fetched or failed its check; the message says what to do."""


def list_pretrained() -> list[PretrainedCheckpoint]:
    """Every released checkpoint (name, task, modalities, size where published, URL)."""
    return list(PRETRAINED.values())


def cache_dir() -> Path:
    """``${ONEPEACE_CACHE:-~/.cache/onepeace}/checkpoints``."""
    return Path(os.environ.get("ONEPEACE_CACHE") or "~/.cache/onepeace").expanduser() / "checkpoints"


def get_pretrained(name: str) -> PretrainedCheckpoint:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise KeyError(f"no released checkpoint named {name!r}; known: {', '.join(PRETRAINED)}") from None


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class RangedDownloader:
    """A pooch downloader that keeps partial bytes in ``part`` and resumes them with a Range request.

    pooch hands us a temporary output path beside the target and deletes it on any error; the bytes
    live in ``part`` meanwhile, so an interrupted download is resumed, never restarted, and only a
    complete body reaches pooch's hash check."""

    def __init__(self, part: Path, size_bytes: int | None, progress: bool, timeout: float = 30.0):
        self.part, self.size_bytes, self.progress, self.timeout = part, size_bytes, progress, timeout

    def __call__(self, url: str, output_file: str, pooch_obj=None, check_only: bool = False) -> None:
        import requests
        from tqdm.auto import tqdm

        have = self.part.stat().st_size if self.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with requests.get(url, headers=headers, stream=True, timeout=self.timeout) as response:
            if have and response.status_code == 416:  # nothing left to send: the part is whole
                response.close()
            else:
                response.raise_for_status()
                if have and response.status_code != 206:  # the server ignored the range: start over
                    have = 0
                total = have + int(response.headers.get("Content-Length", 0)) or None
                with open(self.part, "ab" if have else "wb") as out, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, disable=not self.progress,
                        desc=self.part.name.removesuffix(".part")) as bar:
                    for block in response.iter_content(1 << 20):
                        out.write(block)
                        bar.update(len(block))
                if total is not None and self.part.stat().st_size != total:
                    raise DownloadError(f"{url}: the connection ended after {self.part.stat().st_size} of "
                                        f"{total} bytes (run again to resume)")
        size = self.part.stat().st_size
        if self.size_bytes is not None and size != self.size_bytes:
            self.part.unlink()
            raise DownloadError(f"{url}: got {size} bytes, the table says {self.size_bytes}: the partial "
                                "file was deleted")
        os.replace(self.part, output_file)


def download(name: str, *, progress: bool = True, checkpoint: PretrainedCheckpoint | None = None) -> Path:
    """The released file of checkpoint `name` in the cache, downloaded (or resumed) if needed and
    checked against its sha256. Returns the path of ``NAME.pt``."""
    import pooch

    ckpt = checkpoint or get_pretrained(name)
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target, hash_file = folder / ckpt.filename, _hash_file(ckpt)
    known = expected_sha256(ckpt)
    if target.exists() and known is not None:
        _verify(target, known, ckpt)
        return target
    downloader = RangedDownloader(folder / f"{ckpt.filename}.part", ckpt.size_bytes, progress)
    try:
        pooch.retrieve(ckpt.url, known_hash=f"sha256:{known}" if known else None, fname=ckpt.filename,
                       path=folder, downloader=downloader, progressbar=False)
    except ValueError as err:  # pooch: the body's hash differs (pooch deleted it)
        raise DownloadError(f"{ckpt.url}: the downloaded file failed its check and was deleted ({err})") from err
    except DownloadError:
        raise
    except OSError as err:  # requests' connection errors are OSErrors: offline, refused, reset
        raise DownloadError(
            f"cannot download {ckpt.name!r} from {ckpt.url} ({type(err).__name__}: {err}). Offline? Download "
            f"that URL elsewhere and put the file at {target} (bytes received so far are kept in "
            f"{downloader.part} and resumed next time)") from err
    if known is None:  # first download without a published hash: record it for every later use
        hash_file.write_text(sha256_of(target) + "\n")
    return target


def _hash_file(ckpt: PretrainedCheckpoint) -> Path:
    return cache_dir() / f"{ckpt.filename}.sha256"


def expected_sha256(ckpt: PretrainedCheckpoint) -> str | None:
    """The published sha256, else the one recorded at the first download, else None."""
    hash_file = _hash_file(ckpt)
    return ckpt.sha256 or (hash_file.read_text().strip() if hash_file.exists() else None)


def _verify(path: Path, expected: str, ckpt: PretrainedCheckpoint) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise DownloadError(f"{path} does not match its recorded sha256 ({actual} != {expected}): the file "
                            f"is corrupt or was replaced. Delete it to download {ckpt.url} again")


def resolve(name: str, *, progress: bool = True,
            convert: Callable[[Path, Path], object] | None = None) -> Path:
    """A converted folder for checkpoint `name` (downloaded and converted on first use)."""
    ckpt = get_pretrained(name)
    if not ckpt.loadable:
        raise ValueError(f"{name!r} is a checkpoint of the official vision codebase (mmdet/mmseg/classification "
                         f"heads), which onepeace does not load; download it from {ckpt.url}")
    out = cache_dir() / "converted" / name
    done = out / "converted-from.sha256"
    source = download(name, progress=progress)
    recorded = expected_sha256(ckpt)  # set by now: published, or recorded by the download
    if done.exists() and done.read_text().strip() == recorded:
        return out
    if convert is None:
        from .checkpoint import convert_checkpoint as convert
    convert(source, out)
    done.write_text(recorded + "\n")  # written last: a conversion cut short is redone
    return out


__all__ = ["DownloadError", "PRETRAINED", "PretrainedCheckpoint", "cache_dir", "download", "get_pretrained",
           "list_pretrained", "resolve"]
