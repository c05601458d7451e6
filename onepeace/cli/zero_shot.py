"""`onepeace zero-shot FILES... --labels "dog,siren,rain"`: ranked labels of files, no training."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import Flags, load_model


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("zero-shot", parents=[flags.model, flags.bpe],
                       help="zero-shot classification of files on labels you give (prompt ensembles)")
    p.add_argument("files", nargs="+", help="image / audio / video files (the modality comes from the suffix)")
    p.add_argument("--model", "-m", default="runs/demo/model",
                   help="released .pt, converted folder or a released name (default: the demo model runs/demo/model)")
    labels = p.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", "-l", default=None, help='comma-separated labels, e.g. "dog,siren,rain"')
    labels.add_argument("--labels-file", default=None, help="one label per line, or a JSON list")
    p.add_argument("--templates-file", default=None,
                   help="prompt templates with {} for the label: one per line, a JSON list, or a JSON object "
                        "{label: [captions]} (default: the built-in ensemble of each file's modality)")
    p.add_argument("-k", type=int, default=5, help="how many labels to print per file (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.set_defaults(func=cmd_zero_shot)


def read_labels(args: argparse.Namespace) -> list[str]:
    """--labels "a,b" or --labels-file (one per line, or a JSON list) -> the label strings."""
    if args.labels is not None:
        return [x.strip() for x in args.labels.split(",") if x.strip()]
    text = Path(args.labels_file).read_text()
    if text.lstrip().startswith("["):
        raw = json.loads(text)
        return [str(x) for x in raw]
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_templates(path: str | None):
    """--templates-file -> a list of "{}" templates or a {label: [captions]} mapping (None: defaults)."""
    if path is None:
        return None
    text = Path(path).read_text()
    if text.lstrip()[:1] in ("[", "{"):
        raw = json.loads(text)
        if not isinstance(raw, (list, dict)):
            raise ValueError(f"{path}: expected a JSON list of templates or an object {{label: [captions]}}")
        return raw
    return [line.rstrip("\n") for line in text.splitlines() if line.strip()]


def _group_by_modality(files: list[str], model, skip) -> dict[str, list[str]]:
    """{modality: [files]} in input order; files of no known modality or branch go to `skip`."""
    from ..registry import can_embed, modality_for_path

    groups: dict[str, list[str]] = {}
    for path in files:
        kind = modality_for_path(path)
        if kind is None or kind == "text":
            skip(path, "not a file type of a zero-shot modality (by its suffix)")
        elif not can_embed(model, kind):  # video files also embed through image + audio (compose)
            skip(path, f"a {kind} file, but the model has no {kind} branch (it has {list(model.modalities)})")
        elif not Path(path).is_file():
            skip(path, "no such file")
        else:
            groups.setdefault(kind, []).append(path)
    return groups


def cmd_zero_shot(args: argparse.Namespace) -> int:
    from ..inference import embed_entries
    from ..zero_shot import build_zero_shot_classifier, check_labels

    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    labels = check_labels(read_labels(args))
    templates = read_templates(args.templates_file)
    skipped: list[dict[str, str]] = []

    def skip(name: str, why: str) -> None:
        skipped.append({"file": name, "error": why})
        print(f"skipped {name}: {why}", file=sys.stderr)

    model = load_model(args)
    results: dict[str, dict] = {}
    for kind, paths in _group_by_modality(list(args.files), model, skip).items():
        names, emb = embed_entries(model, kind, [(p, p) for p in paths], skip)
        if not names:
            continue
        classifier = build_zero_shot_classifier(model, labels, templates, kind)
        probs = classifier(emb)  # (n, C)
        for name, row, top in zip(names, probs, classifier.top_k(probs, args.k)):
            results[name] = {"file": name, "modality": kind,
                             "top": [{"label": label, "prob": p} for label, p in top],
                             "probs": dict(zip(labels, row.tolist()))}
    ordered = [results[f] for f in args.files if f in results]
    if args.json:
        print(json.dumps({"labels": labels, "results": ordered, "skipped": skipped}, indent=2))
    else:
        for r in ordered:
            print(r["file"])
            for t in r["top"]:
                print(f"  {t['prob']:.3f}  {t['label']}")
    if not ordered:
        print(f"onepeace zero-shot: no file could be classified ({len(skipped)} skipped)", file=sys.stderr)
        return 1
    return 0
