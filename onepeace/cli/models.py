"""`onepeace convert` (released .pt -> converted folder) and `onepeace info` (what a checkpoint holds)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import Flags, load_model, parse_dtype


def register(sub, flags: Flags) -> None:
    p = sub.add_parser("convert", parents=[flags.read], help="released .pt -> config.json + model.safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--dtype", type=parse_dtype, default=None, help="storage dtype of the output (default: keep)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: the encoder's linear layers stored as int8 + per-channel scales (CPU inference)")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="PATH",
                   help="with --quantize int8: images, audio and text files (or folders) like those you will embed; "
                        "up to 64 per modality run through the float model to smooth each FFN's output projection "
                        "for int8 (SmoothQuant; see onepeace.modeling.smoothing)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", parents=[flags.model], help="config, parameters per modality, dtype")
    p.add_argument("model", help="released .pt checkpoint or converted folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoint import load_released_checkpoint, save_converted

    if args.quantize:
        from ..modeling.quantized import check_quantize

        check_quantize(args.quantize, dtype=args.dtype)  # before reading the checkpoint
    if args.calibrate and not args.quantize:
        raise ValueError("--calibrate calibrates int8 quantisation: add --quantize int8")
    if args.calibrate:
        from ..modeling.smoothing import calibration_inputs

        calibration = calibration_inputs(args.calibrate)  # a bad file fails here, before the checkpoint is read
    model, report = load_released_checkpoint(args.checkpoint, dtype=args.dtype, modalities=args.modalities,
                                             allow_unsafe=args.allow_unsafe_pickle)
    if args.quantize:
        from ..modeling.quantized import quantize_int8

        if args.calibrate:
            from ..modeling.smoothing import calibrate_for_int8

            print(calibrate_for_int8(model, calibration))
        print(f"quantised {quantize_int8(model, pack=False)} encoder linear layers to int8")
    out = save_converted(model, args.out_dir)
    print(report.summary())
    n = sum(parameter_counts(model).values())
    kind = "encoder linears int8, the rest " if args.quantize else ""
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} ({n:,} parameters, {kind}{model.dtype})")
    return 0


def parameter_counts(model) -> dict[str, int]:
    """Parameters by branch: 'shared' (attention, norms, logit scale) and one entry per modality."""
    from ..checkpoint import _our_key_modality

    from ..modeling.packed import PackedLinear
    from ..modeling.quantized import Int8Linear

    # a packed or int8 layer's weight is not a Parameter (it lives packed inside the layer): count it too
    sizes = [(name, p.numel()) for name, p in model.named_parameters()]
    sizes += [(f"{name}.weight", m.in_features * m.out_features) for name, m in model.named_modules()
              if isinstance(m, (PackedLinear, Int8Linear))]
    counts = {"shared": 0, **{m: 0 for m in model.modalities}}
    for name, n in sizes:
        counts[_our_key_modality(name, model.modalities) or "shared"] += n
    return counts


def cmd_info(args: argparse.Namespace) -> int:
    from ..modeling.quantized import quantization

    model = load_model(args)
    if getattr(model, "load_report", None) is None:  # an ONNX export: graphs, not a PyTorch model
        manifest = Path(args.model) / "onnx.json"
        print(f"{args.model}: an ONNX export (onepeace export --format onnx), run by ONNX Runtime; "
              f"branches {', '.join(model.modalities)}; its manifest: {manifest}")
        if args.json:
            print(manifest.read_text())
        return 0
    report = model.load_report
    counts = parameter_counts(model)
    info = {
        "model": str(args.model), "modalities": list(model.modalities), "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device), "quantize": quantization(model),
        "parameters": {"total": sum(counts.values()), **counts},
        "not_loaded": report.skipped_modalities, "storage_dtypes": report.storage_dtypes,
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(args.model, model, info)
    return 0


def _print_info(path, model, info: dict) -> None:
    report, enc = model.load_report, model.config.encoder
    print(f"model        {path}")
    print(f"encoder      D={enc.embed_dim} F={enc.ffn_embed_dim} L={enc.layers} H={enc.attention_heads} "
          f"(magneto={enc.magneto_scale_attn}, scale_fc={enc.scale_fc}, layer_scale={enc.use_layer_scale}, "
          f"rel_pos_tables={enc.rel_pos_tables})")
    print(f"modalities   {', '.join(model.modalities)}")
    quantized = " with the encoder's linear layers int8" if info["quantize"] else ""
    print(f"dtype        {info['dtype']}{quantized} (stored: "
          f"{', '.join(f'{k} x{v}' for k, v in report.storage_dtypes.items())})")
    print(f"parameters   {info['parameters']['total']:,} total")
    for branch, n in info["parameters"].items():
        if branch != "total":
            print(f"  {branch:<10} {n:>15,}")
    for m, n in report.skipped_modalities.items():
        print(f"  {m:<10} {'not loaded':>15} ({n} tensors in the file left unread)")
    if report.recomputed or report.pretraining_only or report.placeholders:
        print(f"ignored      {report.summary()}")
    for name, cfg in model.config.adapters.items():
        fields = {k: v for k, v in cfg.to_dict().items() if k != "kind"}
        print(f"{name + ' adapter':<13}" + " " + ", ".join(f"{k}={v}" for k, v in fields.items()))
