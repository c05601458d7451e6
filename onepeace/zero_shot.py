"""Zero-shot classification on any labels: prompt-ensemble class embeddings, computed once.

    probs, clf = model.zero_shot(["cow.flac", "dog.flac"], ["dog", "siren", "rain"])   # (2, 3)
    probs = clf.classify(model, ["rain.wav"])    # the labels are not embedded again
    probs = clf(model.encode_audio(["rain.wav"]))  # or from embeddings you already have

As open_clip's ``build_zero_shot_classifier``: every label is written into every template, the texts
are embedded, and a label's class embedding is the mean of its L2-normalised text embeddings,
re-normalised (a prompt ensemble). Probabilities are softmax(temperature * cos), with the model's own
contrastive temperature (exp(logit_scale)).

The default templates are OURS (written for this package, CLIP-style): the paper's ImageNet prompts
are the CLIP ensemble, and the official ESC-50 evaluation reads one caption per class from a label
file that is not published with the code, so the audio ensemble here is a reasonable set of sound
prompts, not the official file. Pass ``templates=`` to use your own.

A library module: it imports only the layers below the model (inference, registry), so
``OnePeaceModel.zero_shot`` can delegate here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from .registry import can_embed, modality_for_path

# ImageNet-style photo prompts (a CLIP-like ensemble of our own choosing; "{}" is the label)
IMAGE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "a drawing of a {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a pixelated photo of the {}.", "a sculpture of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a good photo of a {}.", "a sketch of a {}.", "a photo of a small {}.",
    "a photo of a large {}.", "a cartoon {}.", "art of the {}.", "itap of a {}.",
)
# sound prompts (ESC-50-style labels: "dog", "siren", "rain"); ours, see the module docstring
AUDIO_TEMPLATES: tuple[str, ...] = (
    "the sound of {}.", "the sound of a {}.", "a recording of {}.", "a recording of a {}.", "the noise of {}.",
    "a sound clip of {}.", "audio of {}.", "a {} can be heard.", "this is the sound of {}.",
    "a noisy recording of {}.", "a clear recording of {}.", "{}",
)
VIDEO_TEMPLATES: tuple[str, ...] = (
    "a video of a {}.", "a video of the {}.", "a clip of {}.", "footage of a {}.", "a short video of {}.",
    "a blurry video of a {}.", "a video showing {}.", "{}",
)
DEFAULT_TEMPLATES: dict[str, tuple[str, ...]] = {"image": IMAGE_TEMPLATES, "audio": AUDIO_TEMPLATES,
                                                 "video": VIDEO_TEMPLATES}
FALLBACK_TEMPLATES: tuple[str, ...] = ("{}",)  # any other modality: the bare label

# templates: format strings with "{}" for every label, or {label: [its own captions]} (per-class
# prompts, e.g. the demo's concepts.json), or a function label -> its captions
Templates = Union[Sequence[str], Mapping[str, Sequence[str]], Callable[[str], Sequence[str]]]


def default_templates(modality: str | None) -> tuple[str, ...]:
    """The default prompt ensemble of a modality (the bare label for modalities without one)."""
    return DEFAULT_TEMPLATES.get(modality or "", FALLBACK_TEMPLATES)


def check_labels(labels: Sequence[str] | str) -> list[str]:
    """A non-empty list of distinct non-empty label strings (a single string is an error, not C labels)."""
    if isinstance(labels, str):
        raise ValueError(f"labels must be a list of strings, got the single string {labels!r} "
                         "(split it first, e.g. labels.split(','))")
    out = [x.strip() if isinstance(x, str) else x for x in labels]
    bad = [x for x in out if not isinstance(x, str) or not x]
    if bad:
        raise ValueError(f"labels must be non-empty strings, got {bad!r}")
    if not out:
        raise ValueError("zero-shot classification needs at least one label, got none")
    dupes = sorted({x for x in out if out.count(x) > 1})
    if dupes:
        raise ValueError(f"labels must be distinct, got {dupes} more than once")
    return out


def expand_prompts(labels: Sequence[str], templates: Templates) -> list[list[str]]:
    """Per label, the texts to embed: each "{}" template filled with the label, or the label's own
    captions from a mapping / function."""
    if isinstance(templates, Mapping):
        missing = [x for x in labels if not templates.get(x)]
        if missing:
            raise ValueError(f"the templates mapping has no captions for labels {missing}")
        return [[str(t) for t in templates[x]] for x in labels]
    if callable(templates):
        prompts = [list(templates(x)) for x in labels]
        empty = [x for x, p in zip(labels, prompts) if not p]
        if empty:
            raise ValueError(f"the templates function gave no captions for labels {empty}")
        return prompts
    if isinstance(templates, str):
        templates = [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty: give at least one, e.g. ['a photo of a {}.']")
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad:
        raise ValueError(f"every template needs a '{{}}' where the label goes, got {bad!r}")
    # replace, not str.format: labels and templates may hold other braces
    return [[t.replace("{}", x) for t in templates] for x in labels]


def prompt_ensemble(text_embeddings: torch.Tensor, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """(P, D) text embeddings + one list of row indices per class -> (C, D): per class the mean of its
    L2-normalised rows, re-normalised. The one definition that eval.zero_shot uses too."""
    emb = F.normalize(text_embeddings.float(), dim=-1)
    return torch.stack([F.normalize(emb[list(rows)].mean(0), dim=-1) for rows in groups])


def infer_modality(inputs: Sequence[Any], modality: str | None = None) -> str:
    """The modality of the inputs: `modality` when given, else from the file suffixes (the registry's
    table). In-memory items (PIL images, arrays, (wave, rate) pairs) need an explicit `modality`."""
    if modality is not None:
        return modality
    kinds: dict[str, list[str]] = {}
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)):
            raise ValueError(f"cannot tell the modality of an in-memory {type(item).__name__} input: pass "
                             "modality= (e.g. modality='image')")
        kind = modality_for_path(item)
        if kind is None:
            raise ValueError(f"cannot tell the modality of {os.fspath(item)!r} from its suffix: pass modality= "
                             "or use a file type of a registered modality")
        kinds.setdefault(kind, []).append(os.fspath(item))
    if not kinds:
        raise ValueError("no inputs to classify")
    if len(kinds) > 1:
        raise ValueError("the inputs mix modalities (" + "; ".join(f"{k}: {v[0]}" + (" ..." if len(v) > 1 else "")
                         for k, v in kinds.items()) + "): classify one modality per call")
    return next(iter(kinds))


def check_modality(model, modality: str) -> None:
    if not can_embed(model, modality):  # its own branch, or a registered compose path (video files)
        raise ValueError(f"unknown modality {modality!r} for zero-shot classification: this model has the "
                         f"branches {list(model.modalities)}")
    if "text" not in model.modalities:
        raise ValueError("zero-shot classification embeds the labels as texts: this model has no text branch")


@dataclass
class ZeroShotClassifier:
    """Labels embedded once; call it on (N, D) embeddings of the modality, or `classify` raw inputs."""

    labels: list[str]
    prompts: list[list[str]]  # per label, the texts that were embedded
    class_embeddings: torch.Tensor  # (C, D) float32, L2-normalised rows, on the CPU
    temperature: float  # the model's exp(logit_scale): probs = softmax(temperature * cos)
    modality: str | None = None  # the modality the default templates were chosen for
    templates: Any = field(default=None, repr=False)  # what was given (None = the defaults)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings -> (N, C) temperature * cosine similarity."""
        emb = F.normalize(torch.as_tensor(embeddings).detach().float().cpu(), dim=-1)
        if emb.ndim != 2 or emb.shape[1] != self.class_embeddings.shape[1]:
            raise ValueError(f"expected (N, {self.class_embeddings.shape[1]}) embeddings, got {tuple(emb.shape)}")
        return self.temperature * emb @ self.class_embeddings.T

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) embeddings -> (N, C) probabilities (rows sum to 1)."""
        return self.logits(embeddings).softmax(dim=-1)

    def classify(self, model, inputs: Sequence[Any] | Any, modality: str | None = None,
                 batch_size: int | None = None) -> torch.Tensor:
        """Raw inputs (files, PIL images, waveforms ...) -> (N, C) probabilities."""
        from .inference import encode_items

        inputs = as_input_list(inputs)
        kind = infer_modality(inputs, modality or (None if all_files(inputs) else self.modality))
        check_modality(model, kind)
        return self(encode_items(model, kind, inputs, batch_size))

    def top_k(self, probs: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """(N, C) probabilities -> per row the k most likely (label, probability), best first."""
        values, index = probs.topk(min(k, self.num_classes), dim=-1)
        return [[(self.labels[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, index)]


def all_files(inputs: Sequence[Any]) -> bool:
    return bool(inputs) and all(isinstance(x, (str, os.PathLike)) for x in inputs)


def as_input_list(inputs: Any) -> list:
    """One input or a sequence of them -> a list (a (wave, rate) pair or an array is one input)."""
    if isinstance(inputs, (str, os.PathLike)) or hasattr(inputs, "ndim"):
        return [inputs]
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], int):
        return [inputs]
    if hasattr(inputs, "size") and hasattr(inputs, "mode"):  # one PIL image
        return [inputs]
    return list(inputs)


@torch.inference_mode()
def build_zero_shot_classifier(model, labels: Sequence[str], templates: Templates | None = None,
                               modality: str | None = None, batch_size: int = 64) -> ZeroShotClassifier:
    """Embed every label's prompts once -> a reusable :class:`ZeroShotClassifier`.

    templates None: the default ensemble of `modality` (image, audio and video have one; otherwise
    the bare label)."""
    from .inference import encode_items

    labels = check_labels(labels)
    if modality is not None:
        check_modality(model, modality)
    elif "text" not in model.modalities:
        check_modality(model, "text")
    prompts = expand_prompts(labels, default_templates(modality) if templates is None else templates)
    texts = [t for group in prompts for t in group]
    text_emb = encode_items(model, "text", texts, batch_size).cpu()  # (P, D)
    groups, start = [], 0
    for group in prompts:
        groups.append(range(start, start + len(group)))
        start += len(group)
    temperature = float(model.temperature) if getattr(model, "logit_scale", None) is not None else 100.0
    return ZeroShotClassifier(labels, prompts, prompt_ensemble(text_emb, groups), temperature, modality, templates)


def zero_shot(model, inputs: Sequence[Any] | Any, labels: Sequence[str], templates: Templates | None = None,
              modality: str | None = None, batch_size: int | None = None) -> tuple[torch.Tensor, ZeroShotClassifier]:
    """Raw inputs of one modality -> ((N, C) probabilities, the reusable classifier).

    modality None: from the file suffixes (in-memory items need it explicitly)."""
    inputs = as_input_list(inputs)
    kind = infer_modality(inputs, modality)
    check_modality(model, kind)
    classifier = build_zero_shot_classifier(model, labels, templates, kind)
    return classifier.classify(model, inputs, kind, batch_size), classifier
