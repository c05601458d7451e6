"""`onepeace ground` (draw the box a phrase describes) and `onepeace classify` (ranked labels)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import Flags, load_model


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("ground", parents=[flags.model, flags.bpe], help="visual grounding: draw the box a phrase describes")
    p.add_argument("image")
    p.add_argument("phrase")
    p.add_argument("--model", "-m", required=True, help="a grounding checkpoint (one_peace_classify, 'vl' head)")
    p.add_argument("--out", "-o", default=None, help="PNG to write (default IMAGE_ground.png)")
    p.set_defaults(func=cmd_ground)

    p = sub.add_parser("classify", parents=[flags.model], help="ranked labels of files from a task checkpoint")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--labels", default=None, help="id2label JSON ({\"0\": \"dog\", ...} or a list)")
    p.add_argument("-k", type=int, default=5)
    p.set_defaults(func=cmd_classify)


def draw_box(image, box, label: str):
    """A copy of the PIL image with the box (x1, y1, x2, y2) and its label drawn on it."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    x1, y1, x2, y2 = [float(v) for v in box]
    width = max(2, round(min(out.size) / 100))
    draw.rectangle([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], outline=(255, 40, 40), width=width)
    text_box = draw.textbbox((0, 0), label)
    tx, ty = min(x1, x2), max(0, min(y1, y2) - (text_box[3] - text_box[1]) - 4)
    draw.rectangle([tx, ty, tx + text_box[2] - text_box[0] + 4, ty + text_box[3] - text_box[1] + 4], fill=(255, 40, 40))
    draw.text((tx + 2, ty + 1), label, fill=(255, 255, 255))
    return out


def cmd_ground(args: argparse.Namespace) -> int:
    from ..data.image import load_image

    model = load_model(args)
    if model.head_type != "vl" or model.config.classify_head.num_classes != 4:
        raise ValueError(f"{args.model} is not a grounding checkpoint (needs a 'vl' head with 4 outputs; "
                         f"head: {model.head_type})")
    box = model.ground([args.image], [args.phrase])[0]
    out = Path(args.out or f"{Path(args.image).stem}_ground.png")
    draw_box(load_image(args.image), box, args.phrase).save(out)
    print(f"box x1={box[0]:.1f} y1={box[1]:.1f} x2={box[2]:.1f} y2={box[3]:.1f}; wrote {out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from .. import inference
    from ..config import JOINT_HEAD_TYPES
    from ..finetune import collate_items

    model = load_model(args)
    kind = model.head_type
    if kind is None or kind in JOINT_HEAD_TYPES:
        raise ValueError(f"{args.model} has a {kind!r} head; `onepeace classify` takes single-modality heads "
                         "(image, audio, video, ...)")
    labels: dict[int, str] = {}
    if args.labels:
        raw = json.loads(Path(args.labels).read_text())
        labels = {int(k): v for k, v in raw.items()} if isinstance(raw, dict) else dict(enumerate(raw))
    prepare = inference.modality_transform(model, kind)
    status = 0
    for path in args.files:
        try:
            x = prepare(path)
        except (ValueError, OSError) as e:
            print(f"skipped {path}: {e}", file=sys.stderr)
            status = 1
            continue
        with torch.inference_mode():
            logits = model.classify(**collate_items(model, kind, [x]))
        probs = logits.float().softmax(-1)[0]
        top = probs.topk(min(args.k, probs.numel()))
        print(path)
        for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            print(f"  {rank}. {labels.get(i, str(i)):<30} {p:.4f}")
    return status
