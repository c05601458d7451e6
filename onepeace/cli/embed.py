"""`onepeace embed`: files, folders and texts -> an embeddings .npz (onepeace.embeddings_file)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import Flags, load_model


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("embed", parents=[flags.model, flags.bpe, flags.quiet],
                       help="embed files (any registered modality), folders and texts into an .npz")
    p.add_argument("inputs", nargs="*", help="files or folders (modality from the extension; .txt/.jsonl: one text per line)")
    p.add_argument("--text", "-t", action="append", help="a text to embed (repeatable)")
    p.add_argument("--as", dest="as_modality", default=None, metavar="MODALITY",
                   help="embed every input as this modality, one item per file or folder (e.g. --as video clips/*.gif)")
    p.add_argument("--out", "-o", default="embeddings.npz")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--model", "-m", required=True, help="released .pt checkpoint or converted folder")
    p.set_defaults(func=cmd_embed)


def plan_items(args: argparse.Namespace) -> tuple[list[tuple[str, list[tuple[str, object]]]], list[tuple[str, str]]]:
    """The inputs grouped by modality: ([(modality, [(name, source)])], [(input, why skipped)]).
    Text files give one entry per line (named path:line); --text values are named --text[i]."""
    from ..data.files import find_inputs, text_items

    if args.as_modality:  # every input (a file or a folder, e.g. a folder of frames) is one item
        items = [(args.as_modality, p) for p in args.inputs if Path(p).exists()]
        failed = [(p, "no such file or folder") for p in args.inputs if not Path(p).exists()]
    else:
        items, failed = find_inputs(args.inputs)
    texts: list[tuple[str, object]] = [(f"--text[{i}]", t) for i, t in enumerate(args.text or [])]
    for path in [p for m, p in items if m == "text"]:
        try:
            texts += text_items(path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            failed.append((path, f"cannot read text file: {e}"))
    kinds = list(dict.fromkeys(m for m, _ in items if m != "text"))  # files first, in the order found
    plans = [(kind, [(p, p) for m, p in items if m == kind]) for kind in kinds] + [("text", texts)]
    return [(m, entries) for m, entries in plans if entries], failed


def cmd_embed(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..embeddings_file import EmbeddingsFile, write_embeddings
    from ..inference import embed_entries

    plans, failed = plan_items(args)
    if not plans:
        print("nothing to embed: no files of a known type and no --text given", file=sys.stderr)
        for path, why in failed:
            print(f"  skipped {path}: {why}", file=sys.stderr)
        return 2
    model = load_model(args)

    def report(path: str, why: str) -> None:
        failed.append((path, why))
        tqdm.write(f"skipped {path}: {why}", file=sys.stderr)

    names, modalities, chunks = [], [], [torch.zeros(0, model.config.encoder.embed_dim)]
    bar = tqdm(total=sum(len(v) for _, v in plans), unit="item", desc="embedding", disable=args.quiet)
    for modality, entries in plans:
        ok, emb = embed_entries(model, modality, entries, report, args.batch_size, bar.update)
        chunks.append(emb)
        names += ok
        modalities += [modality] * len(ok)
    bar.close()
    data = EmbeddingsFile(torch.cat(chunks).numpy(), names, modalities, failed)
    out = write_embeddings(args.out, data)
    print(f"wrote {out}: {len(names)} embeddings of dim {data.embeddings.shape[1]} "
          f"({', '.join(f'{n} {m}' for m, n in data.counts().items()) or 'none'}); {len(failed)} skipped")
    return 0 if names else 1
