"""Fine-tuning for downstream tasks: a classification head, a linear probe, contrastive retrieval.

Three modes (``FinetuneConfig.mode``), all on labelled manifests (``{"image": ..., "text": ...,
"label": ...}`` lines; any registered modality in place of image):

* ``classify``: a task head on the encoder's final states of one modality (attention pooling over
  the tokens as in the reference's classify head, or the CLS row; then Linear+tanh pooler and an
  MLP), trained with the whole model (or the `trainable` subset) by cross-entropy.
* ``linear-probe``: the model frozen; one linear layer on its L2-normalised embeddings.
* ``retrieval``: contrastive (InfoNCE) fine-tuning of the modality against the captions; items
  with the same caption are positives of each other. Evaluated zero-shot (prompt ensembles).

Trainable parameters get layer-wise learning-rate decay: adapters are depth 0, encoder layer i
depth i + 1, everything above depth L + 1 (see :func:`onepeace.train.optim.layer_decay_groups`).
Nothing here needs the training extras: torch and the core package only.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClassifyHeadConfig, JsonConfig

log = logging.getLogger("onepeace.finetune")
MODES = ("classify", "linear-probe", "retrieval")


@dataclass(frozen=True)
class FinetuneConfig(JsonConfig):
    model: str  # a converted folder or a released .pt
    train_manifest: str
    test_manifest: str | None = None  # held-out split: accuracy after training (and zero-shot before)
    mode: str = "classify"  # "classify", "linear-probe" or "retrieval"
    modality: str = "image"  # the branch to fine-tune / classify
    output_dir: str = "runs/finetune"
    concepts: str | None = None  # concepts.json: class order + caption templates of each class
    pooling: str = "attention"  # classify head: "attention" (reference) or "cls"
    head_scale_ratio: float = 2.0  # classify head: MLP hidden width = int(D * ratio)
    steps: int = 200
    batch_size: int = 64
    lr: float = 2e-4
    layer_decay: float = 0.75  # lr of depth d = lr * layer_decay ** (L + 1 - d)
    weight_decay: float = 0.05
    warmup_steps: int = 20
    label_smoothing: float = 0.1  # classify
    # fnmatch patterns over parameter names; `trainable` overrides `frozen`. () and () = all train
    frozen: tuple[str, ...] = ()
    trainable: tuple[str, ...] = ()
    probe_steps: int = 300  # linear-probe: full-batch AdamW steps on the cached embeddings
    probe_lr: float = 1e-2
    seed: int = 0
    bpe_dir: str | None = None
    eval_batch_size: int = 64
    save_model: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.pooling not in ("attention", "cls"):
            raise ValueError(f"pooling must be 'attention' or 'cls', got {self.pooling!r}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {self.steps}, {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown FinetuneConfig fields: {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


# ------------------------------------------------------------------------------------------ data
def labelled_entries(manifest: str | Path, modality: str) -> list[dict]:
    """Manifest lines of `modality` (other media are skipped), paths resolved."""
    from .data.datasets import read_manifest

    entries = [e for e in read_manifest(manifest) if modality in e]
    if not entries:
        raise ValueError(f"{manifest} has no {modality!r} lines")
    return entries


def class_names(entries: Sequence[dict], concepts: Mapping | None) -> list[str]:
    classes = list(concepts["concepts"]) if concepts else sorted({str(e.get("label")) for e in entries})
    unknown = sorted({str(e.get("label")) for e in entries} - set(classes))
    if unknown:
        raise ValueError(f"labels {unknown[:10]} are not among the classes {classes[:10]}...")
    return classes


def shuffled_batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """`steps` batches of indices: seeded permutations, one epoch after another (last partial dropped)."""
    if n < batch_size:
        raise ValueError(f"{n} training items but batch_size {batch_size}")
    rng = random.Random(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        perm = list(range(n))
        rng.shuffle(perm)
        batches += [perm[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    return batches[:steps]


def collate_items(model, modality: str, prepared: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prepared items -> forward keyword arguments on the model's device (floats in its dtype)."""
    from .registry import get_modality

    batch = get_modality(model.config.adapters[modality].kind).collate(model, prepared)
    return {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
            for k, v in batch.items()}


def prepare_entries(model, modality: str, entries: Sequence[dict]) -> list[torch.Tensor]:
    from .inference import modality_transform

    transform = modality_transform(model, modality)
    return [transform(e[modality]) for e in entries]


# ------------------------------------------------------------------------------------------ training
def apply_trainable(model: nn.Module, frozen: Sequence[str], trainable: Sequence[str]) -> list[str]:
    """Freeze by patterns (nothing frozen when both are empty); returns the trainable names."""
    from .train.optim import apply_freezing

    return apply_freezing(model, frozen, trainable)


def _optimizer(model, cfg: FinetuneConfig):
    from .train.optim import cosine_schedule, layer_decay_groups

    groups = layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    if not groups:
        raise ValueError("no trainable parameters: check FinetuneConfig.frozen / trainable")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    return opt, cosine_schedule(opt, cfg.warmup_steps, cfg.steps, cfg.lr)


def _steps(cfg: FinetuneConfig, n_items: int, what: str):
    batches = shuffled_batches(n_items, cfg.batch_size, cfg.steps, cfg.seed)
    if cfg.progress:
        from tqdm import tqdm

        return tqdm(batches, desc=what, unit="step", leave=False)
    return batches


def _optimizer_step(model, opt, sched, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 3.0)
    opt.step()
    sched.step()


def train_classify(model, cfg: FinetuneConfig, entries: Sequence[dict], classes: Sequence[str]) -> list[float]:
    """Attach a classify head over `cfg.modality` and train it (with the trainable encoder parts)."""
    model.to_dense()  # training needs dense weights (onepeace.load packs them on CPU); before freezing
    head = ClassifyHeadConfig(head_type=cfg.modality, num_classes=len(classes), attn_pooling=cfg.pooling == "attention",
                              use_pooler=True, head_scale_ratio=cfg.head_scale_ratio)
    torch.manual_seed(cfg.seed)
    model.set_classify_head(head)
    apply_trainable(model, cfg.frozen, cfg.trainable)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[str(e["label"])] for e in entries])
    transform = _transform(model, cfg.modality)
    opt, sched = _optimizer(model, cfg)
    model.train()
    losses = []
    for batch in _steps(cfg, len(entries), "classify"):
        inputs = collate_items(model, cfg.modality, [transform(entries[i][cfg.modality]) for i in batch])
        logits = model.classify(**inputs)
        loss = F.cross_entropy(logits.float(), labels[batch].to(model.device), label_smoothing=cfg.label_smoothing)
        _optimizer_step(model, opt, sched, loss)
        losses.append(loss.item())
    model.eval()
    return losses


def _transform(model, modality: str):
    from .inference import modality_transform

    return modality_transform(model, modality)


def _branch_trainable(model, branch: str) -> bool:
    """Whether any parameter on `branch`'s forward path (its own or a shared one) is trainable."""
    from .checkpoint import _our_key_modality

    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith(("classify_head.", "logit_scale")):
            owner = _our_key_modality(name, model.modalities)
            if owner in (None, branch):
                return True
    return False


def train_retrieval(model, cfg: FinetuneConfig, entries: Sequence[dict]) -> list[float]:
    """Contrastive fine-tuning of `cfg.modality` against the entries' captions.

    When nothing on the text path trains (e.g. a new modality learning against a frozen model), the
    caption embeddings are constants: they are computed once, not in every step."""
    from .losses.contrastive import contrastive_loss

    model.to_dense()  # training needs dense weights (onepeace.load packs them on CPU); before freezing
    apply_trainable(model, cfg.frozen, cfg.trainable)
    captions = sorted({e["text"] for e in entries})
    caption_id = {t: i for i, t in enumerate(captions)}
    ids = [model.tokenizer.encode(t) for t in captions]
    text_frozen = not _branch_trainable(model, "text")
    cached = None
    if text_frozen:
        from .modalities.text import embed_token_ids

        cached = embed_token_ids(model, ids, batch_size=cfg.eval_batch_size).float().clone()  # a normal tensor
    transform = _transform(model, cfg.modality)
    opt, sched = _optimizer(model, cfg)
    model.train()
    losses = []
    for batch in _steps(cfg, len(entries), f"retrieval ({cfg.modality})"):
        inputs = collate_items(model, cfg.modality, [transform(entries[i][cfg.modality]) for i in batch])
        cap = torch.tensor([caption_id[entries[i]["text"]] for i in batch], device=model.device)
        media = model(**inputs).embeddings[cfg.modality]
        if cached is not None:
            text = cached[cap]
        else:
            tokens = collate_items(model, "text", [torch.tensor(ids[c]) for c in cap.tolist()])
            text = model(**tokens).embeddings["text"]
        loss = contrastive_loss(media, text, model.logit_scale, group_ids=cap)
        _optimizer_step(model, opt, sched, loss)
        losses.append(loss.item())
    model.eval()
    return losses


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int, lr: float,
                       weight_decay: float = 1e-4, seed: int = 0) -> tuple[nn.Linear, list[float]]:
    """A linear classifier on fixed (N, D) features: full-batch AdamW, `steps` steps."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(head(features), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return head, losses


# ------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def embed_manifest_entries(model, modality: str, entries: Sequence[dict], batch_size: int = 64) -> torch.Tensor:
    """Manifest lines ({modality: file, "label": ...}) -> (N, D) float32 CPU embeddings, in order.
    (Unlike onepeace.inference.embed_entries, an unreadable file raises: a manifest is curated.)"""
    from .inference import embed_prepared

    # clone: a normal tensor (embed_prepared runs in inference mode), usable as training input
    return embed_prepared(model, modality, prepare_entries(model, modality, entries), batch_size).float().cpu().clone()


@torch.no_grad()
def classify_accuracy(model, modality: str, entries: Sequence[dict], classes: Sequence[str],
                      batch_size: int = 64) -> float:
    index = {c: i for i, c in enumerate(classes)}
    transform = _transform(model, modality)
    correct = 0
    for start in range(0, len(entries), batch_size):
        chunk = entries[start:start + batch_size]
        logits = model.classify(**collate_items(model, modality, [transform(e[modality]) for e in chunk]))
        truth = torch.tensor([index[str(e["label"])] for e in chunk], device=logits.device)
        correct += int((logits.argmax(-1) == truth).sum())
    return correct / len(entries)


@torch.no_grad()
def zero_shot_accuracy(model, modality: str, entries: Sequence[dict], classes: Sequence[str],
                       concepts: Mapping | None = None, batch_size: int = 64) -> float:
    """Top-1 against class prompt ensembles (the concepts' templates, else the entries' captions)."""
    from .eval.zero_shot import EmbeddedSet, class_embeddings, embed_texts, zero_shot

    if concepts is not None:
        pairs = [(t, c) for c in classes for t in concepts["templates"][c]]
    else:
        pairs = sorted({(e["text"], str(e["label"])) for e in entries})
    texts = embed_texts(model, [t for t, _ in pairs], [c for _, c in pairs])
    media = EmbeddedSet(embed_manifest_entries(model, modality, entries, batch_size), [str(e["label"]) for e in entries],
                        [str(e[modality]) for e in entries])
    return zero_shot(media, classes, class_embeddings(texts, classes))["top1"]


# ------------------------------------------------------------------------------------------ entry point
def finetune(cfg: FinetuneConfig, model=None) -> dict[str, Any]:
    """Run one fine-tuning job; writes finetune.json, metrics.json (and the model) to cfg.output_dir.

    `model`: an already loaded OnePeaceModel (else cfg.model is loaded). Returns the metrics:
    zero-shot accuracy before, test accuracy after, the loss curve, minutes.
    """
    import onepeace

    started = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "finetune.json")
    if model is None:
        model = onepeace.load(cfg.model)
    if cfg.bpe_dir is not None:
        model.tokenizer = onepeace.get_tokenizer(cfg.bpe_dir)
    concepts = json.loads(Path(cfg.concepts).read_text()) if cfg.concepts else None
    train = labelled_entries(cfg.train_manifest, cfg.modality)
    test = labelled_entries(cfg.test_manifest, cfg.modality) if cfg.test_manifest else []
    classes = class_names(train + test, concepts)
    metrics: dict[str, Any] = {"mode": cfg.mode, "modality": cfg.modality, "classes": len(classes),
                               "train_items": len(train), "test_items": len(test)}
    can_zero_shot = "text" in model.adapters and model.projections is not None
    if test and can_zero_shot:
        metrics["zero_shot_accuracy_before"] = zero_shot_accuracy(model, cfg.modality, test, classes, concepts)
    torch.manual_seed(cfg.seed)
    if cfg.mode == "classify":
        metrics["losses"] = train_classify(model, cfg, train, classes)
        if test:
            metrics["accuracy"] = classify_accuracy(model, cfg.modality, test, classes, cfg.eval_batch_size)
    elif cfg.mode == "retrieval":
        metrics["losses"] = train_retrieval(model, cfg, train)
        if test:
            metrics["accuracy"] = zero_shot_accuracy(model, cfg.modality, test, classes, concepts)
    else:  # linear-probe: the model is never changed
        for p in model.parameters():
            p.requires_grad_(False)
        index = {c: i for i, c in enumerate(classes)}
        feats = embed_manifest_entries(model, cfg.modality, train, cfg.eval_batch_size)
        labels = torch.tensor([index[str(e["label"])] for e in train])
        head, metrics["losses"] = train_linear_probe(feats, labels, len(classes), cfg.probe_steps, cfg.probe_lr,
                                                     seed=cfg.seed)
        if test:
            test_feats = embed_manifest_entries(model, cfg.modality, test, cfg.eval_batch_size)
            truth = torch.tensor([index[str(e["label"])] for e in test])
            with torch.no_grad():
                metrics["accuracy"] = (head(test_feats).argmax(-1) == truth).float().mean().item()
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(out / "linear_head.safetensors"))
        (out / "classes.json").write_text(json.dumps(classes) + "\n")
    if cfg.save_model and cfg.mode != "linear-probe":
        from .checkpoint import save_converted

        save_converted(model, out / "model")
        (out / "classes.json").write_text(json.dumps(classes) + "\n")
    losses = metrics.get("losses", [])
    metrics["first_loss"] = losses[0] if losses else math.nan
    metrics["last_loss"] = sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else math.nan
    metrics["minutes"] = (time.time() - started) / 60
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics
