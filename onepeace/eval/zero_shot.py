"""Zero-shot evaluation on a manifest (the trainer's periodic hook; `onepeace eval` builds on it)."""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

log = logging.getLogger("onepeace.eval")


def retrieval_recall_at_1(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor) -> float:
    """queries (N, D), keys (M, D); positives (N, M) bool. Fraction of queries whose top key is a positive."""
    top = (queries @ keys.T).argmax(dim=1)
    return positives[torch.arange(len(queries)), top].float().mean().item()


@torch.no_grad()
def evaluate_manifest(model, manifest: str, bpe_dir: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """R@1 both ways between each medium and the texts (a text matches every item with the same text),
    and zero-shot accuracy when items carry a "label" (class embedding = mean of that label's texts)."""
    from ..data.datasets import read_manifest
    from ..inference import encode_audios, encode_images, embed_token_ids
    from ..tokenizer import get_tokenizer

    entries = read_manifest(manifest)
    if bpe_dir is not None:
        model.tokenizer = get_tokenizer(bpe_dir)
    result: dict[str, Any] = {}
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        by_kind["image" if "image" in e else "audio"].append(e)
    for kind, items in by_kind.items():
        if kind not in model.adapters:
            continue
        encode = encode_images if kind == "image" else encode_audios
        good, media = [], []
        for e in items:
            try:
                media.append(encode(model, [e[kind]], batch_size=1))
                good.append(e)
            except (ValueError, OSError) as err:
                log.warning("eval: skipping %s: %s", e[kind], err)
        if not good:
            continue
        media_emb = torch.cat(media)
        texts = sorted({e["text"] for e in good})
        text_emb = embed_token_ids(model, [model.tokenizer.encode(t) for t in texts], batch_size)
        text_index = {t: i for i, t in enumerate(texts)}
        target = torch.tensor([text_index[e["text"]] for e in good])
        positives = torch.zeros(len(good), len(texts), dtype=torch.bool)
        positives[torch.arange(len(good)), target] = True
        result[f"{kind}_to_text_r1"] = retrieval_recall_at_1(media_emb, text_emb, positives)
        result[f"text_to_{kind}_r1"] = retrieval_recall_at_1(text_emb, media_emb, positives.T)
        if all("label" in e for e in good):
            labels = sorted({str(e["label"]) for e in good})
            class_emb = []
            for label in labels:
                rows = sorted({text_index[e["text"]] for e in good if str(e["label"]) == label})
                class_emb.append(torch.nn.functional.normalize(text_emb[rows].mean(0), dim=-1))
            pred = (media_emb @ torch.stack(class_emb).T).argmax(1)
            truth = torch.tensor([labels.index(str(e["label"])) for e in good])
            result[f"{kind}_zero_shot_acc"] = (pred == truth).float().mean().item()
    return result
