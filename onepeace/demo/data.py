"""An offline tri-modal demo data set: silhouettes and digits, their captions, spoken captions.

:func:`build_demo_data` writes, in a minute or so on two CPU cores and without any network
access, a small data set in the manifest format :func:`onepeace.data.datasets.read_manifest`
reads, for a quick end-to-end demo of ONE-PEACE-style training (image-text, then audio-text,
then image <-> audio retrieval through text, never an audio-image pair):

* **20 concepts**: the 10 animals of ``animal-mnist`` (28x28 silhouettes) and the 10 digits of
  scikit-learn's ``load_digits()`` (8x8, named "zero" .. "nine").
* **images**: grayscale PNG files at their native resolution, always a *light figure on a dark
  background* (both sources already are: animal-mnist stores white silhouettes on black, and the
  digits' ink value 16 is mapped to 255, paper 0 to 0; nothing is inverted). Each concept's images
  are de-duplicated by content (animal-mnist repeats ~3 % of its images, 188 of them birds, so a
  naive split would leak test images into training) and split at random (seeded) into disjoint
  train and test sets.
* **text**: 9 caption templates per group (animals / digits), with "a" / "an" chosen by sound
  ("an elephant", "an eight", "a one"). Each training image line carries one template drawn at
  random (seeded); test image lines use template 0.
* **audio**: the captions spoken by ``espeak-ng`` and ``flite`` in many *voices* (engine, accent or
  speaker, variant, speed, pitch; :mod:`onepeace.demo.speech`), converted to mono, resampled to 16 kHz, trimmed and peak
  normalised, saved as 16-bit WAV. Two test splits: **held-out voices** (:data:`HELDOUT_VOICES`:
  espeak-ng / flite voices never heard in training) and a **held-out engine**
  (:data:`HELDOUT_ENGINE_VOICES`: festival, a synthesiser never heard in training).
* **spoken words**: every training voice (``word_voices``: all of them by default, in the quick
  build too) also says each concept's name alone ("dog", "seven"), paired with that word as text,
  and every held-out voice and engine voice says it once for the word test splits. A user who
  presses Record and says "dog" gives the model one word, not a caption. The captions alone did not
  teach it that: a quick model trained on spoken captions of 3-12 voices memorised its training
  clips (0.65-0.78 top-1) and scored 0.00-0.10 on held-out voices; the same model trained on the
  words of every training voice (300 steps) scored 0.53 on held-out words and 0.30 on the held-out
  engine's words (chance 0.05).

Class balance: every concept has exactly ``images_per_class_train`` training *lines*. The 8x8
digits have only 174-183 images per class, so after ``images_per_class_test`` (40) are set aside a
digit class has 134-143 distinct training images; to keep the classes balanced (class balancing
helped the digits a lot in the prototype, see ``shared/notes/demo-data.md``) those images are
reused, each reuse with a *different* caption template. ``manifest_info.json`` records how many
distinct training images each concept has. Audio-text training clips are balanced per concept too.

Layout of the data folder::

    images/{train,test}/{concept}/{source index}.png
    audio/{train,test,test-engine}/{voice slug}/{concept}-{template}.wav   a spoken caption
    audio/{train,test,test-engine}/{voice slug}/{concept}-word.wav         the word alone
    train_vl.jsonl   {"image", "text", "label", "group", "template"}   image-text pairs
    test_vl.jsonl    one line per test image, text = template 0
    train_al.jsonl   {"audio", "text", "label", "group", "template", "voice", "engine", "kind"}
                     kind "caption" (template >= 0) or "word" (template -1, text = the concept's name)
    test_al.jsonl    spoken captions, held-out voices only
    test_al_engine.jsonl  spoken captions, the held-out engine (festival) only
    test_al_words.jsonl, test_al_engine_words.jsonl  the words alone, held-out voices / engine
    concepts.json    {"concepts", "groups", "templates"}
    voices.json      {"train", "heldout", "details"}
    manifest_info.json  build parameters + version + counts; written LAST, marks a complete build

Everything is deterministic given ``seed`` (and the installed espeak-ng / flite versions).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .speech import HELDOUT_ENGINE_VOICES, HELDOUT_VOICES, SAMPLE_RATE, TRAIN_VOICES, Voice, pick_voices, speak_all

__all__ = [
    "ANIMALS",
    "ANIMAL_TEMPLATES",
    "CONCEPTS",
    "DATA_VERSION",
    "DIGITS",
    "DIGIT_TEMPLATES",
    "FULL_SIZES",
    "GROUPS",
    "HELDOUT_ENGINE_VOICES",
    "HELDOUT_VOICES",
    "QUICK_SIZES",
    "SAMPLE_RATE",
    "TRAIN_VOICES",
    "Voice",
    "build_demo_data",
    "captions",
    "check_requirements",
    "default_root",
    "with_article",
]

#: Bump whenever the output for the same parameters changes: an old cache is then rebuilt.
DATA_VERSION = 3  # 2: more espeak-ng variants, a held-out engine (festival); 3: spoken words

#: Sample rate of every written clip (the rate ONE-PEACE's audio adapter expects).

# animal-mnist stores integer labels only. The order is alphabetical (0 = bear ... 9 = zebra): the
# package's description lists the classes in this order, and a montage of each label's images
# confirms it (label 6 are the long-necked giraffes, label 9 the striped zebras, label 1 birds).
ANIMALS: tuple[str, ...] = (
    "bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
#: load_digits() target k is the digit k.
DIGITS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CONCEPTS: tuple[str, ...] = ANIMALS + DIGITS
GROUPS: dict[str, tuple[str, ...]] = {"animal": ANIMALS, "digit": DIGITS}

# "{}" is the concept's name. An article written directly before "{}" ("a {}") is corrected to
# "an" where the name starts with a vowel sound (see with_article). Template 0 is the one used for
# test images and zero-shot class prompts, so it is the most literal description.
ANIMAL_TEMPLATES: tuple[str, ...] = (
    "a silhouette of a {}",
    "a drawing of a {}",
    "the shape of a {}",
    "a black and white {}",
    "a picture of a {}",
    "an image of a {}",
    "this is a {}",
    "a small {}",
    "the outline of a {}",
)
DIGIT_TEMPLATES: tuple[str, ...] = (
    "the number {}",
    "a handwritten {}",
    "the digit {}",
    "a drawing of the number {}",
    "a picture of a {}",
    "{} written by hand",
    "the numeral {}",
    "a blurry {}",
    "a tiny {}",
)
_TEMPLATES = {"animal": ANIMAL_TEMPLATES, "digit": DIGIT_TEMPLATES}

# Words that start with a vowel letter but a consonant sound ("a one", "a unicorn", "a European").
_CONSONANT_SOUND_PREFIXES = ("one", "once", "uni", "use", "eu")

#: Default sizes of the full build (``build_demo_data(**sizes)`` overrides any of them).
#: ``train_voices`` / ``heldout_voices``: how many of the fixed voices to use (None: all).
FULL_SIZES: dict[str, int | None] = {
    "images_per_class_train": 200,
    "images_per_class_test": 40,
    "audio_clips_train": 5000,
    "audio_templates_test": 2,
    "train_voices": None,
    "heldout_voices": None,
    "heldout_engine_voices": None,
    "word_voices": None,
}
#: Defaults of the tiny CI build (``quick=True``): ~100 clips, ~760 images, a few seconds.
QUICK_SIZES: dict[str, int | None] = {
    "images_per_class_train": 30,
    "images_per_class_test": 8,
    "audio_clips_train": 60,
    "audio_templates_test": 1,
    "train_voices": 3,
    "heldout_voices": 2,
    "heldout_engine_voices": 2,
    # every training voice says the words (~1,900 short clips, ~1 minute): the quick model's audio
    # reached held-out voices and the held-out engine only with that many voices (module docstring)
    "word_voices": None,
}

_MANIFESTS = ("train_vl.jsonl", "test_vl.jsonl", "train_al.jsonl", "test_al.jsonl", "test_al_engine.jsonl",
              "test_al_words.jsonl", "test_al_engine_words.jsonl")
_INFO = "manifest_info.json"
_APT_FIX = "apt-get install -y espeak-ng flite festival festvox-kdlpc16k festvox-us-slt-hts"
# the held-out engine's voices (see speech.FESTIVAL_VOICES), as installed by Debian's festvox packages
_FESTIVAL_VOICE_DIRS = ("english/ked_diphone", "us/cmu_us_slt_arctic_hts")
_ANIMAL_FILES = ("animal_data_version_3.gz", "animal_label_version_3.gz")


# --------------------------------------------------------------------------------------------
# text


def with_article(phrase: str) -> str:
    """``"a elephant"`` -> ``"an elephant"``: fix the article before the first word of ``phrase``.

    Only a leading ``"a "`` / ``"an "`` is touched; the choice is by sound, approximated by the
    first letter with exceptions for words like "one" (``"a one"``).
    """
    words = phrase.split(" ", 1)
    if len(words) != 2 or words[0] not in ("a", "an"):
        return phrase
    noun = words[1]
    vowel_sound = noun[:1].lower() in "aeiou" and not noun.lower().startswith(
        _CONSONANT_SOUND_PREFIXES)
    return ("an " if vowel_sound else "a ") + noun


def _fill(template: str, name: str) -> str:
    # Fix the article of the noun phrase that starts right before "{}" ("a {}" -> "an eight");
    # an article further away ("a small {}", "a black and white {}") is left as written.
    head, sep, tail = template.partition("{}")
    if not sep:
        raise ValueError(f"template {template!r} has no '{{}}'")
    for article in ("a ", "an "):
        if head == article or head.endswith(" " + article):
            head = head[: len(head) - len(article)]
            return head + with_article("a " + name) + tail
    return head + name + tail


def captions(concept: str) -> list[str]:
    """The caption strings of ``concept`` (template ``i`` filled in), e.g. ``"an elephant"``."""
    if concept in ANIMALS:
        templates = ANIMAL_TEMPLATES
    elif concept in DIGITS:
        templates = DIGIT_TEMPLATES
    else:
        raise KeyError(f"unknown concept {concept!r}; expected one of {', '.join(CONCEPTS)}")
    return [_fill(t, concept) for t in templates]


def _group(concept: str) -> str:
    return "animal" if concept in ANIMALS else "digit"


# --------------------------------------------------------------------------------------------
# voices


# --------------------------------------------------------------------------------------------
# requirements and sources


def _animal_mnist_dir() -> Path | None:
    """The folder holding animal-mnist's data files, or None; the package is NOT imported (its
    ``__init__`` imports tensorflow, which is neither needed nor installed)."""
    try:
        spec = importlib.util.find_spec("animal_mnist")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "data" / "Animal_MNIST"
        if all((folder / name).is_file() for name in _ANIMAL_FILES):
            return folder
    return None


def check_requirements() -> list[str]:
    """What is missing to build the demo data: one human-readable line per problem, each ending
    with the exact command that fixes it. Empty when everything is there."""
    problems: list[str] = []
    missing = [tool for tool in ("espeak-ng", "flite", "text2wave") if shutil.which(tool) is None]
    if missing:
        problems.append(f"{' and '.join(missing)} not found on PATH (the speech synthesisers that "
                        f"speak the captions; text2wave is festival's); fix: {_APT_FIX}")
    voices = [v for v in _FESTIVAL_VOICE_DIRS if not (Path("/usr/share/festival/voices") / v).is_dir()]
    if "text2wave" not in missing and voices:
        problems.append(f"festival voice(s) {', '.join(voices)} not installed (the held-out engine); "
                        f"fix: {_APT_FIX}")
    if _animal_mnist_dir() is None:
        # --no-deps: its metadata requires tensorflow and pandas, which only its own loader uses
        problems.append("animal-mnist is not installed (the animal silhouettes); fix: "
                        "pip install --no-deps animal-mnist")
    if importlib.util.find_spec("sklearn") is None:
        problems.append("scikit-learn is not installed (the 8x8 handwritten digits); fix: "
                        "pip install scikit-learn")
    return problems


def _load_animals() -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist: (10000, 28, 28) uint8 white-on-black silhouettes and int labels 0-9."""
    folder = _animal_mnist_dir()
    if folder is None:
        raise RuntimeError("animal-mnist data files not found; fix: pip install --no-deps animal-mnist")
    arrays = []
    for name in _ANIMAL_FILES:
        with gzip.open(folder / name, "rb") as f:
            # unpickling is safe here: these are the installed package's own data files
            arrays.append(np.asarray(pickle.load(f)))
    images, labels = arrays
    if images.shape[1:] != (28, 28) or len(images) != len(labels) or set(np.unique(labels)) != set(
            range(len(ANIMALS))):
        raise RuntimeError(f"unexpected animal-mnist data in {folder}: images {images.shape}, "
                           f"labels {sorted(set(np.unique(labels).tolist()))}")
    return images.astype(np.uint8), labels.astype(np.int64)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: (1797, 8, 8) uint8 with ink 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits  # heavy import: only when building

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return images, np.asarray(digits.target, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# images


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # one independent stream per purpose, so changing e.g. the audio sizes leaves the image split
    # as it was
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _write_images(folder: Path, sizes: dict[str, Any], seed: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Split, write the PNGs and return (train lines, test lines, distinct train images/concept)."""
    from PIL import Image

    n_train = sizes["images_per_class_train"]
    n_test = sizes["images_per_class_test"]
    animals, animal_labels = _load_animals()
    digits, digit_labels = _load_digits()
    sources = [(animals, animal_labels, ANIMALS), (digits, digit_labels, DIGITS)]

    train_lines: list[dict[str, Any]] = []
    test_lines: list[dict[str, Any]] = []
    unique_train: dict[str, int] = {}
    seen: set[bytes] = set()  # content hashes over all concepts
    for images, labels, names in sources:
        for label, concept in enumerate(names):
            ci = CONCEPTS.index(concept)
            indices = []
            for i in np.flatnonzero(labels == label):
                digest = hashlib.sha1(images[i].tobytes()).digest()
                if digest not in seen:  # duplicates would leak across the split
                    seen.add(digest)
                    indices.append(int(i))
            if n_test >= len(indices):
                raise ValueError(f"images_per_class_test={n_test} leaves no training image for "
                                 f"{concept!r} ({len(indices)} distinct images)")
            rng = _rng(seed, 1, ci)
            order = [indices[j] for j in rng.permutation(len(indices))]
            test_idx, pool = order[:n_test], order[n_test:n_test + n_train]
            unique_train[concept] = len(pool)
            texts = captions(concept)

            def save(split: str, index: int, _images: np.ndarray = images,
                     _concept: str = concept) -> str:
                rel = f"images/{split}/{_concept}/{index:05d}.png"
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                if not (folder / rel).exists():
                    Image.fromarray(_images[index]).save(folder / rel)  # 2-D uint8 -> mode "L"
                return rel

            for index in test_idx:
                test_lines.append({"image": save("test", index), "text": texts[0],
                                   "label": concept, "group": _group(concept), "template": 0})
            # Balanced lines: cycle through the distinct images when there are fewer than n_train
            # (the digits); the r-th use of an image takes the r-th entry of its own random
            # template order, so a reused image always comes with a new caption.
            orders = [rng.permutation(len(texts)) for _ in pool]
            for k in range(n_train):
                slot, use = k % len(pool), k // len(pool)
                template = int(orders[slot][use % len(texts)])
                train_lines.append({"image": save("train", pool[slot]), "text": texts[template],
                                    "label": concept, "group": _group(concept),
                                    "template": template})
    # shuffle the training lines so a reader that does not shuffle still sees mixed classes
    order = _rng(seed, 2).permutation(len(train_lines))
    return [train_lines[i] for i in order], test_lines, unique_train


# --------------------------------------------------------------------------------------------
# audio


@dataclass(frozen=True)
class _Clip:
    voice: Voice
    concept: str
    template: int  # -1: the concept's name alone (a "word" clip)
    text: str
    path: str  # relative to the data folder

    def line(self) -> dict[str, Any]:
        return {"audio": self.path, "text": self.text, "label": self.concept,
                "group": _group(self.concept), "template": self.template,
                "voice": self.voice.id, "engine": self.voice.engine,
                "kind": "word" if self.template < 0 else "caption"}


def _word_clips(voices: Sequence[Voice], split: str) -> list[_Clip]:
    """Each voice says each concept's name alone: text = the name, template -1."""
    return [_Clip(voice, concept, -1, concept, f"audio/{split}/{voice.slug}/{concept}-word.wav")
            for concept in CONCEPTS for voice in voices]


def _plan_audio(train_voices: Sequence[Voice], heldout_voices: Sequence[Voice], engine_voices: Sequence[Voice],
                sizes: dict[str, Any], seed: int) -> tuple[list[_Clip], list[_Clip], list[_Clip]]:
    """Which (voice, concept, template) to speak for training, held-out voices, held-out engine."""
    per_concept = sizes["audio_clips_train"] // len(CONCEPTS)  # balanced classes
    n_voices = len(train_voices)
    base, extra = divmod(per_concept, n_voices)
    train: list[_Clip] = []
    test: list[_Clip] = []
    engine_test: list[_Clip] = []
    for ci, concept in enumerate(CONCEPTS):
        texts = captions(concept)
        rng = _rng(seed, 3, ci)
        for vi, voice in enumerate(train_voices):
            # the `extra` clips go to a window of voices that moves with the concept, so every
            # voice speaks about as many clips overall
            k = min(base + int((vi - ci * extra) % n_voices < extra), len(texts))
            for t in sorted(rng.choice(len(texts), size=k, replace=False).tolist()):
                train.append(_Clip(voice, concept, t, texts[t],
                                   f"audio/train/{voice.slug}/{concept}-{t:02d}.wav"))
        k = min(sizes["audio_templates_test"], len(texts))
        for voice in heldout_voices:
            for t in sorted(rng.choice(len(texts), size=k, replace=False).tolist()):
                test.append(_Clip(voice, concept, t, texts[t],
                                  f"audio/test/{voice.slug}/{concept}-{t:02d}.wav"))
        engine_rng = _rng(seed, 6, ci)  # its own stream: the other splits stay as they were
        for voice in engine_voices:
            for t in sorted(engine_rng.choice(len(texts), size=k, replace=False).tolist()):
                engine_test.append(_Clip(voice, concept, t, texts[t],
                                         f"audio/test-engine/{voice.slug}/{concept}-{t:02d}.wav"))
    return train, test, engine_test


# --------------------------------------------------------------------------------------------
# build + cache


def default_root(quick: bool = False) -> Path:
    """``${ONEPEACE_CACHE:-~/.cache/onepeace}/demo-data/{full|quick}``."""
    cache = os.environ.get("ONEPEACE_CACHE") or os.path.join("~", ".cache", "onepeace")
    return Path(os.path.expanduser(cache)) / "demo-data" / ("quick" if quick else "full")


def _resolve_sizes(quick: bool, sizes: dict[str, Any]) -> dict[str, Any]:
    resolved = dict(QUICK_SIZES if quick else FULL_SIZES)
    unknown = sorted(set(sizes) - set(resolved))
    if unknown:
        raise TypeError(f"unknown size(s) {', '.join(unknown)}; expected {', '.join(resolved)}")
    resolved.update(sizes)
    for key, value in resolved.items():
        optional = key in ("train_voices", "heldout_voices", "heldout_engine_voices", "word_voices")
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive integer{' or None' if optional else ''}, "
                             f"got {value!r}")
        resolved[key] = int(value)
    if resolved["audio_clips_train"] < len(CONCEPTS):
        raise ValueError(f"audio_clips_train must be >= {len(CONCEPTS)} (one clip per concept), "
                         f"got {resolved['audio_clips_train']}")
    return resolved


def _read_info(root: Path) -> dict[str, Any] | None:
    try:
        with open(root / _INFO, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    info = _read_info(root)
    return (info is not None and info.get("version") == DATA_VERSION
            and info.get("params") == params
            and all((root / name).is_file() for name in (*_MANIFESTS, "concepts.json",
                                                         "voices.json")))


def _check_replaceable(root: Path) -> None:
    """Raise unless ``root`` is absent, empty or a (possibly outdated) demo-data folder, so a
    mistyped ``root`` never wipes unrelated files."""
    if not root.exists():
        return
    if not root.is_dir():
        raise RuntimeError(f"{root} exists and is not a folder; choose another root")
    ours = any((root / name).exists() for name in (_INFO, "concepts.json", "voices.json"))
    if not ours and any(root.iterdir()):
        raise RuntimeError(f"{root} is not empty and is not a demo-data folder (no {_INFO}); "
                           "refusing to delete it. Choose another root or empty it.")


def _tool_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = (out.stdout or out.stderr).strip().splitlines()
    # flite prints a copyright line first; prefer the line that names the version
    return next((ln.strip() for ln in lines if "version" in ln.lower()), lines[0] if lines else "")


def _write_jsonl(path: Path, lines: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
            n += 1
    return n


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_demo_data(root: str | os.PathLike | None = None, *, quick: bool = False, seed: int = 0,
                    workers: int | None = None, progress: bool = True, **sizes: int | None
                    ) -> Path:
    """Build (or find cached) the offline tri-modal demo data set; returns its folder.

    Args:
        root: the data folder; default :func:`default_root` (``quick`` picks ``full``/``quick``).
        quick: the tiny CI version (:data:`QUICK_SIZES`: 30/8 images per concept, 3 training and
            2 held-out voices, 1 template per concept and voice; a few seconds).
        seed: seeds the image split, the caption choice and (when a subset is asked for) the voices.
        workers: synthesis threads (default ``os.cpu_count()``); does not change the output.
        progress: show a tqdm progress bar while speaking.
        **sizes: override any of :data:`FULL_SIZES` / :data:`QUICK_SIZES`:
            ``images_per_class_train`` (training lines per concept; distinct images are reused,
            with new captions, where a concept has fewer), ``images_per_class_test``,
            ``audio_clips_train`` (spread evenly over the 20 concepts and the training voices),
            ``audio_templates_test`` (per held-out voice and concept), ``train_voices`` /
            ``heldout_voices`` (how many of :data:`TRAIN_VOICES` / :data:`HELDOUT_VOICES`;
            None = all).

    A folder whose ``manifest_info.json`` has the same parameters and :data:`DATA_VERSION` is
    returned at once. Otherwise the data is built into a temporary sibling folder, the old
    ``root`` (only if it is a demo-data folder or empty) is deleted, and the new one renamed into
    place; ``manifest_info.json`` is written last, so an interrupted build is never mistaken for a
    complete one. (Two processes building the same root at once both build; the last one wins.)

    Raises:
        RuntimeError: a requirement is missing (the message lists each with its fix, see
            :func:`check_requirements`), a synthesiser failed, or ``root`` holds unrelated files.
        TypeError / ValueError: an unknown or invalid size.
    """
    sizes = _resolve_sizes(quick, sizes)
    params = {"quick": bool(quick), "seed": int(seed), "sizes": sizes}
    root = Path(os.path.expanduser(os.fspath(root))) if root is not None else default_root(quick)
    if _is_complete(root, params):
        return root

    problems = check_requirements()
    if problems:
        raise RuntimeError("cannot build the demo data:\n" + "\n".join(f"  - {p}" for p in problems))
    _check_replaceable(root)  # before the work, not after it
    workers = max(1, int(workers or os.cpu_count() or 1))

    root.parent.mkdir(parents=True, exist_ok=True)
    partial = root.parent / f".{root.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    try:
        _build_into(partial, params, workers, progress)
        _check_replaceable(root)
        if root.exists():
            shutil.rmtree(root)  # the old build (different parameters or version)
        os.replace(partial, root)
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return root


def _build_into(folder: Path, params: dict[str, Any], workers: int, progress: bool) -> None:
    """Write the whole data set into the (new, empty) `folder`; manifest_info.json last."""
    start = time.perf_counter()
    sizes, seed = params["sizes"], params["seed"]
    train_vl, test_vl, unique_train = _write_images(folder, sizes, seed)

    voice_rng = _rng(seed, 4)
    train_voices = pick_voices(TRAIN_VOICES, sizes["train_voices"], voice_rng)
    heldout_voices = pick_voices(HELDOUT_VOICES, sizes["heldout_voices"], voice_rng)
    engine_voices = pick_voices(HELDOUT_ENGINE_VOICES, sizes["heldout_engine_voices"], voice_rng)
    word_voices = pick_voices(TRAIN_VOICES, sizes["word_voices"], _rng(seed, 7))
    train_clips, test_clips, engine_clips = _plan_audio(train_voices, heldout_voices, engine_voices, sizes, seed)
    words = {"train": _word_clips(word_voices, "train"), "test": _word_clips(heldout_voices, "test"),
             "engine": _word_clips(engine_voices, "test-engine")}
    seconds = speak_all([*train_clips, *test_clips, *engine_clips, *(c for w in words.values() for c in w)], folder,
                        workers, progress)
    train_al = [clip.line() for clip in (*train_clips, *words["train"])]
    order = _rng(seed, 5).permutation(len(train_al))  # mixed classes and voices

    manifests = {"train_vl": train_vl, "test_vl": test_vl, "train_al": [train_al[i] for i in order],
                 "test_al": [c.line() for c in test_clips],
                 "test_al_engine": [c.line() for c in engine_clips],
                 "test_al_words": [c.line() for c in words["test"]],
                 "test_al_engine_words": [c.line() for c in words["engine"]]}
    counts = {name: _write_jsonl(folder / f"{name}.jsonl", lines) for name, lines in manifests.items()}
    _write_descriptions(folder, train_voices, heldout_voices, engine_voices)
    _write_json(folder / _INFO, {  # last: its presence marks a complete build
        "version": DATA_VERSION,
        "params": params,
        "counts": counts,
        "distinct_train_images": unique_train,
        "voices": {"train": len(train_voices), "heldout": len(heldout_voices),
                   "heldout_engine": len(engine_voices), "words": len(word_voices)},
        "audio_seconds": round(seconds, 1),
        "image_style": "grayscale PNG, light figure on dark background, native resolution",
        "tools": {"espeak-ng": _tool_version(["espeak-ng", "--version"]),
                  "flite": _tool_version(["flite", "--version"]),
                  "festival": _tool_version(["festival", "--version"])},
        "build_seconds": round(time.perf_counter() - start, 1),
    })


def _write_descriptions(folder: Path, train_voices: Sequence[Voice], heldout_voices: Sequence[Voice],
                        engine_voices: Sequence[Voice]) -> None:
    """concepts.json (concepts, groups, caption templates) and voices.json (which voice is held out)."""
    _write_json(folder / "concepts.json", {
        "concepts": list(CONCEPTS),
        "groups": {group: list(names) for group, names in GROUPS.items()},
        "templates": {concept: captions(concept) for concept in CONCEPTS},
    })
    _write_json(folder / "voices.json", {
        "train": [v.id for v in train_voices],
        "heldout": [v.id for v in heldout_voices],
        "heldout_engine": [v.id for v in engine_voices],
        "details": {v.id: {"engine": v.engine, "name": v.name, "speed": v.speed,
                           "pitch": v.pitch} for v in (*train_voices, *heldout_voices, *engine_voices)},
    })


def demo_output_and_data(out_dir: str | os.PathLike, data_root: str | os.PathLike | None, quick: bool
                         ) -> tuple[Path, Path]:
    """(output folder, created; the demo data folder, built or cached) for a run on the demo data."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out, Path(build_demo_data(data_root, quick=quick, seed=0))
