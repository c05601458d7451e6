"""`onepeace export MODEL --format onnx --out DIR`: one ONNX graph per branch (onepeace.onnx), which
``onepeace.load(DIR)`` (and so embed / index / serve --model DIR) runs with ONNX Runtime."""
from __future__ import annotations

import argparse

from .common import Flags

FORMATS = ("onnx",)


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("export", parents=[flags.read],
                       help="export the model's branches for another runtime (ONNX: one graph per branch)")
    p.add_argument("model", help="released .pt checkpoint, converted folder or released name")
    p.add_argument("--format", choices=FORMATS, default="onnx", help="onnx (the only one so far)")
    p.add_argument("--out", "-o", required=True, help="output folder (graphs, config.json, onnx.json)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="int8: ONNX Runtime's dynamic int8 matrix products (the folder holds only int8 graphs)")
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    import time

    import onepeace
    from ..onnx.export import export_onnx

    model = onepeace.load(args.model, modalities=args.modalities, pack=False,
                          allow_unsafe_pickle=args.allow_unsafe_pickle)
    start = time.perf_counter()
    out = export_onnx(model, args.out, quantize=args.quantize, opset=args.opset)
    import json

    manifest = json.loads((out / "onnx.json").read_text())
    for name, entry in manifest["graphs"].items():
        size = (out / entry["file"]).stat().st_size / 2 ** 20
        print(f"{name:<6} {out / entry['file']} ({size:.1f} MiB, {manifest['weights']}): "
              f"inputs {', '.join(entry['inputs'])}; max |onnx - torch| {manifest['check'][name]:.1e}")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s: onepeace.load({str(out)!r}) runs it with onnxruntime")
    return 0
