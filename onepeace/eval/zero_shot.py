"""Zero-shot classification and retrieval on manifests, by modality pair (pairs never trained together
included: audio <-> image goes through the shared space only).

Items of an image/audio manifest carry a "label"; texts are the manifests' captions. Class
embeddings are prompt ensembles: the mean of the normalised embeddings of every caption template of
the class (from a concepts file, or the distinct captions of that label), re-normalised.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .metrics import confusion_matrix, mean_average_precision, recall_at_k

log = logging.getLogger("onepeace.eval")


@dataclass
class EmbeddedSet:
    """Embeddings of one modality's items with their labels (and file names or texts)."""

    embeddings: torch.Tensor  # (N, D)
    labels: list[str]
    names: list[str]
    extra: list[dict] = field(default_factory=list)


@torch.no_grad()
def embed_media(model, entries: Sequence[dict], kind: str, batch_size: int = 32, progress: bool = False) -> EmbeddedSet:
    """Embed the `kind` items ('image', 'audio', 'video', any registered modality) of manifest
    entries with the modality's registered preprocessing; unreadable ones are logged and skipped."""
    from .. import inference

    prepare = inference.modality_transform(model, kind)
    tensors, kept = [], []
    iterator = entries
    if progress:
        from tqdm import tqdm

        iterator = tqdm(entries, desc=f"embedding {kind}", unit="item", leave=False)
    for e in iterator:
        try:
            tensors.append(prepare(e[kind]))
            kept.append(e)
        except (ValueError, OSError) as err:
            log.warning("eval: skipping %s: %s", e[kind], err)
    emb = inference.embed_prepared(model, kind, tensors, batch_size) if tensors \
        else torch.zeros(0, model.config.encoder.embed_dim)
    return EmbeddedSet(emb.cpu(), [str(e.get("label", "")) for e in kept], [str(e[kind]) for e in kept], list(kept))


def media_kind(entry: dict, known: Sequence[str]) -> str:
    """The non-text modality of a manifest line (the key naming a registered modality)."""
    kinds = [k for k in entry if k != "text" and k in known]
    if len(kinds) != 1:
        raise ValueError(f"a manifest line needs exactly one media key out of {sorted(set(known) - {'text'})}, "
                         f"got {sorted(entry)}")
    return kinds[0]


@torch.no_grad()
def embed_texts(model, texts: Sequence[str], labels: Sequence[str], batch_size: int = 64) -> EmbeddedSet:
    from ..modalities.text import embed_token_ids

    emb = embed_token_ids(model, [model.tokenizer.encode(t) for t in texts], batch_size)
    return EmbeddedSet(emb.cpu(), list(labels), list(texts))


def class_embeddings(text_set: EmbeddedSet, classes: Sequence[str]) -> torch.Tensor:
    """(C, D): prompt ensemble per class (mean of its texts' embeddings, normalised)."""
    from ..zero_shot import prompt_ensemble  # the same ensemble as model.zero_shot's classifier

    groups = []
    for c in classes:
        members = [i for i, label in enumerate(text_set.labels) if label == c]
        if not members:
            raise ValueError(f"no text for class {c!r}")
        groups.append(members)
    return prompt_ensemble(text_set.embeddings, groups)


def zero_shot(media: EmbeddedSet, classes: Sequence[str], class_emb: torch.Tensor) -> dict[str, Any]:
    index = {c: i for i, c in enumerate(classes)}
    truth = torch.tensor([index[label] for label in media.labels])
    pred = (media.embeddings @ class_emb.T).argmax(dim=1)
    return {"top1": (pred == truth).float().mean().item(), "pred": pred, "truth": truth,
            "confusion": confusion_matrix(truth, pred, len(classes))}


def retrieval(queries: EmbeddedSet, keys: EmbeddedSet, ks=(1, 5, 10)) -> dict[str, float]:
    """Class-level retrieval: a key is a match when it has the query's label."""
    sim = queries.embeddings @ keys.embeddings.T
    positives = torch.tensor([[q == k for k in keys.labels] for q in queries.labels], dtype=torch.bool)
    result = {f"r{k}": v for k, v in recall_at_k(sim, positives, ks).items()}
    result["map"] = mean_average_precision(sim, positives)
    return result


def load_concepts(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def evaluate(model, manifests: Sequence[str | Path], concepts: dict | None = None, batch_size: int = 32,
             progress: bool = False, keep_embeddings: bool = False) -> dict[str, Any]:
    """Zero-shot top-1 per medium, and class-level R@1/5/10 + mAP for every modality pair.

    Returns {"zero_shot": {kind: top1}, "retrieval": {"audio->image": {...}, ...}, "classes": [...],
    "confusion": {kind: (C, C) list}} (+ "sets" with the embeddings when keep_embeddings).
    """
    from ..data.datasets import read_manifest
    from ..registry import list_modalities

    entries = [e for m in manifests for e in read_manifest(m)]
    known = list_modalities()
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        by_kind[media_kind(e, known)].append(e)
    sets: dict[str, EmbeddedSet] = {}
    for kind, items in by_kind.items():
        if kind in model.adapters:
            sets[kind] = embed_media(model, items, kind, batch_size, progress)
    # texts: every caption template per class (concepts file) or the manifests' distinct captions
    if concepts is not None:
        pairs = [(t, c) for c in concepts["concepts"] for t in concepts["templates"][c]]
    else:
        pairs = sorted({(e["text"], str(e.get("label", ""))) for e in entries})
    if "text" in model.adapters and pairs:
        sets["text"] = embed_texts(model, [t for t, _ in pairs], [c for _, c in pairs])
    classes = list(concepts["concepts"]) if concepts else sorted({s for st in sets.values() for s in st.labels})
    result: dict[str, Any] = {"classes": classes, "zero_shot": {}, "retrieval": {}, "confusion": {},
                              "counts": {k: len(v.labels) for k, v in sets.items()}}
    if "text" in sets:
        class_emb = class_embeddings(sets["text"], classes)
        for kind in sets:
            if kind != "text" and len(sets[kind].labels):
                zs = zero_shot(sets[kind], classes, class_emb)
                result["zero_shot"][kind] = zs["top1"]
                result["confusion"][kind] = zs["confusion"].tolist()
    # media first (in the model's branch order), text last
    names = [k for k in model.modalities if k != "text" and k in sets and len(sets[k].labels)]
    names += ["text"] if "text" in sets and len(sets["text"].labels) else []
    for q in names:
        for k in names:
            if q != k:
                result["retrieval"][f"{q}->{k}"] = retrieval(sets[q], sets[k])
    if keep_embeddings:
        result["sets"] = sets
    return result


def evaluate_manifest(model, manifest: str, bpe_dir: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """The trainer's periodic hook: flat numbers for one manifest."""
    if bpe_dir is not None:
        from ..tokenizer import get_tokenizer

        model.tokenizer = get_tokenizer(bpe_dir)
    result = evaluate(model, [manifest], batch_size=batch_size)
    flat: dict[str, Any] = {f"{k}_zero_shot_top1": v for k, v in result["zero_shot"].items()}
    for pair, values in result["retrieval"].items():
        flat[f"{pair.replace('->', '_to_')}_r1"] = values["r1"]
    return flat
