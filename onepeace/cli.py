"""The `onepeace` command line: embed, index, search, serve, convert, info, train, fine-tune, demo, eval."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from .data.files import find_inputs, text_items

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _dtype(name: str) -> torch.dtype | None:
    if name == "keep":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)} or 'keep'") from None


def _modalities(value: str | None) -> tuple[str, ...] | None:
    return tuple(m.strip() for m in value.split(",") if m.strip()) if value else None


def _load_model(args: argparse.Namespace):
    import onepeace

    return onepeace.load(args.model, device=args.device, dtype=args.dtype, modalities=args.modalities,
                         allow_unsafe_pickle=getattr(args, "allow_unsafe_pickle", False))


def _set_bpe_dir(model, bpe_dir: str | None) -> None:
    if bpe_dir:
        from .tokenizer import get_tokenizer

        model.tokenizer = get_tokenizer(bpe_dir)


# ------------------------------------------------------------------------------------------ embed
def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from .inference import embed_entries

    if args.as_modality:  # every input (a file or a folder, e.g. a folder of frames) is one item
        items = [(args.as_modality, p) for p in args.inputs if Path(p).exists()]
        failed = [(p, "no such file or folder") for p in args.inputs if not Path(p).exists()]
    else:
        items, failed = find_inputs(args.inputs)
    texts = [(f"--text[{i}]", t) for i, t in enumerate(args.text or [])]
    for modality, path in [x for x in items if x[0] == "text"]:
        try:
            texts += text_items(path)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            failed.append((path, f"cannot read text file: {e}"))
    items = [x for x in items if x[0] != "text"]
    if not items and not texts:
        print("nothing to embed: no image, audio, .txt or .jsonl files found and no --text given", file=sys.stderr)
        for path, why in failed:
            print(f"  skipped {path}: {why}", file=sys.stderr)
        return 2

    model = _load_model(args)
    _set_bpe_dir(model, args.bpe_dir)
    names: list[str] = []
    modalities: list[str] = []
    chunks: list[torch.Tensor] = []

    def report(path: str, why: str) -> None:
        failed.append((path, why))
        tqdm.write(f"skipped {path}: {why}", file=sys.stderr)

    found = list(dict.fromkeys(m for m, _ in items))
    media = [m for m in ("image", "audio") if m in found] + [m for m in found if m not in ("image", "audio")]
    plans = [(kind, [(p, p) for m, p in items if m == kind]) for kind in media] + [("text", texts)]
    total = sum(len(v) for _, v in plans)
    bar = tqdm(total=total, unit="item", desc="embedding", disable=args.quiet)
    for modality, entries in plans:
        if entries:
            ok, emb = embed_entries(model, modality, entries, report, args.batch_size, bar.update)
            chunks.append(emb)
            names += ok
            modalities += [modality] * len(ok)
    bar.close()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dim = model.config.encoder.embed_dim
    embeddings = torch.cat(chunks).numpy() if chunks else np.zeros((0, dim), np.float32)
    np.savez(out, embeddings=embeddings, files=np.array(names, dtype=str), modalities=np.array(modalities, dtype=str),
             failed_files=np.array([p for p, _ in failed], dtype=str),
             failed_errors=np.array([w for _, w in failed], dtype=str))
    counts = {m: modalities.count(m) for m in dict.fromkeys(modalities)}
    print(f"wrote {out}: {len(names)} embeddings of dim {dim} "
          f"({', '.join(f'{n} {m}' for m, n in counts.items()) or 'none'}); {len(failed)} skipped")
    return 0 if names else 1


# ------------------------------------------------------------------------------------------ index / search / serve
def cmd_index(args: argparse.Namespace) -> int:
    from .index import IndexConfig, build_index

    config = IndexConfig(chunk_files=args.chunk_files, batch_size=args.batch_size, ivf_threshold=args.ivf_threshold,
                         nlist=args.nlist, nprobe=args.nprobe)
    model = _load_model(args)
    _set_bpe_dir(model, args.bpe_dir)
    report = build_index(args.folder, args.out, model, args.model, config, rank=args.rank, world_size=args.world_size,
                         progress=not args.quiet)
    print(f"{args.out}: {report.summary()}")
    for path, why in report.failed:
        print(f"  failed {path}: {why}")
    return 0


def _query_parts(args: argparse.Namespace):
    from .index import QueryPart, parse_weights

    raw = ([("text", t) for t in args.text or []] + [("image", p) for p in args.image or []]
           + [("audio", p) for p in args.audio or []])
    weights = parse_weights(args.weights, raw)
    return [QueryPart(m, v, w, name=f"--{m} {v!r}") for (m, v), w in zip(raw, weights)]


def cmd_search(args: argparse.Namespace) -> int:
    from .index import SearchIndex, embed_query, format_table

    parts = _query_parts(args)
    if not parts:
        raise ValueError("give at least one --text, --image or --audio")
    index = SearchIndex(args.index)
    args.model = index.query_model_path(args.model)
    model = _load_model(args)
    _set_bpe_dir(model, args.bpe_dir)
    hits = index.search(embed_query(model, parts), k=args.k, modality=args.modality)
    if args.json:
        print(json.dumps({"query": [{"modality": p.modality, "value": str(p.value), "weight": p.weight} for p in parts],
                          "modality": args.modality, "results": hits}, indent=2))
    else:
        print(format_table(hits, index.info.get("root")))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, max_upload_bytes=args.max_upload_mb * 1024 * 1024,
                         torch_threads=args.torch_threads, log_requests=args.log_requests)
    return serve(args.index, model_path=args.model, config=config, device=args.device, bpe_dir=args.bpe_dir)


# ------------------------------------------------------------------------------------------ convert
def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_released_checkpoint, save_converted

    model, report = load_released_checkpoint(args.checkpoint, dtype=args.dtype, modalities=args.modalities,
                                             allow_unsafe=args.allow_unsafe_pickle)
    out = save_converted(model, args.out_dir)
    print(report.summary())
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'} ({n:,} parameters, {model.dtype})")
    return 0


# ------------------------------------------------------------------------------------------ info
def parameter_counts(model) -> dict[str, int]:
    """Parameters by branch: 'shared' (attention, norms, logit scale) and one entry per modality."""
    from .checkpoint import _our_key_modality

    counts = {"shared": 0, **{m: 0 for m in model.modalities}}
    for name, p in model.named_parameters():
        counts[_our_key_modality(name, model.modalities) or "shared"] += p.numel()
    return counts


def cmd_info(args: argparse.Namespace) -> int:
    model = _load_model(args)
    report = model.load_report
    counts = parameter_counts(model)
    total = sum(counts.values())
    enc = model.config.encoder
    info = {
        "model": str(args.model),
        "modalities": list(model.modalities),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
        "parameters": {"total": total, **counts},
        "not_loaded": report.skipped_modalities,
        "storage_dtypes": report.storage_dtypes,
        "config": model.config.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {args.model}")
    print(f"encoder      D={enc.embed_dim} F={enc.ffn_embed_dim} L={enc.layers} H={enc.attention_heads} "
          f"(magneto={enc.magneto_scale_attn}, scale_fc={enc.scale_fc}, layer_scale={enc.use_layer_scale}, "
          f"rel_pos_tables={enc.rel_pos_tables})")
    print(f"modalities   {', '.join(model.modalities)}")
    print(f"dtype        {info['dtype']} (stored: {', '.join(f'{k} x{v}' for k, v in report.storage_dtypes.items())})")
    print(f"parameters   {total:,} total")
    for branch, n in counts.items():
        print(f"  {branch:<10} {n:>15,}")
    for m, n in report.skipped_modalities.items():
        print(f"  {m:<10} {'not loaded':>15} ({n} tensors in the file left unread)")
    if report.recomputed or report.pretraining_only or report.placeholders:
        print(f"ignored      {report.summary()}")
    for name, cfg in model.config.adapters.items():
        fields = {k: v for k, v in cfg.to_dict().items() if k != "kind"}
        print(f"{name + ' adapter':<13}" + " " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


# ------------------------------------------------------------------------------------------ train
def cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import main as train_main

    return train_main([args.config, "--set", *args.set] if args.set else [args.config])


# ------------------------------------------------------------------------------------------ task heads
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
    from .data.image import load_image

    model = _load_model(args)
    _set_bpe_dir(model, args.bpe_dir)
    if model.head_type != "vl" or model.config.classify_head.num_classes != 4:
        raise ValueError(f"{args.model} is not a grounding checkpoint (needs a 'vl' head with 4 outputs; "
                         f"head: {model.head_type})")
    box = model.ground([args.image], [args.phrase])[0]
    out = Path(args.out or f"{Path(args.image).stem}_ground.png")
    draw_box(load_image(args.image), box, args.phrase).save(out)
    print(f"box x1={box[0]:.1f} y1={box[1]:.1f} x2={box[2]:.1f} y2={box[3]:.1f}; wrote {out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from . import inference
    from .config import JOINT_HEAD_TYPES
    from .finetune import collate_items

    model = _load_model(args)
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


# ------------------------------------------------------------------------------------------ demo / eval
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    try:
        metrics = run_demo(args.out, quick=args.quick, seed=args.seed, ablation=False if args.no_ablation else None,
                           bpe_dir=args.bpe_dir)
    except RuntimeError as e:
        print(f"onepeace demo: {e}", file=sys.stderr)
        return 2
    keys = ["image_zero_shot_top1", "audio_zero_shot_top1_heldout_voices", "audio_to_image_r1", "image_to_text_r1",
            "audio_to_text_r1"]
    abl = metrics.get("ablation_no_dcl", {})
    print(f"{'metric':<40} {'ITC+DCL':>8} {'no DCL':>8}")
    for k in keys:
        print(f"{k:<40} {metrics[k]:>8.3f} {abl.get(k, float('nan')):>8.3f}")
    print(f"{'minutes':<40} {metrics['minutes']:>8.1f}")
    print(f"report: {Path(args.out) / 'report.md'}; model: {Path(args.out) / 'model'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.zero_shot import evaluate, load_concepts

    model = _load_model(args)
    _set_bpe_dir(model, args.bpe_dir)
    result = evaluate(model, args.manifests, concepts=load_concepts(args.concepts), progress=not args.quiet)
    for kind, top1 in result["zero_shot"].items():
        print(f"zero-shot {kind:<6} top-1 {top1:.3f}  ({result['counts'][kind]} items, {len(result['classes'])} classes)")
    print(f"{'query -> key':<16} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'mAP':>6}")
    for pair, v in result["retrieval"].items():
        print(f"{pair:<16} " + " ".join(f"{v.get(k, float('nan')):>6.3f}" for k in ("r1", "r5", "r10", "map")))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------ fine-tuning
def _parse_set(items: Sequence[str]) -> dict:
    raw = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            raw[key] = json.loads(value)
        except json.JSONDecodeError:
            raw[key] = value
    return raw


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune

    raw = json.loads(Path(args.config).read_text()) if args.config else {}
    flags = {"model": args.model, "train_manifest": args.train, "test_manifest": args.test, "mode": args.mode,
             "modality": args.modality, "output_dir": args.out, "concepts": args.concepts, "steps": args.steps,
             "bpe_dir": args.bpe_dir}
    raw.update({k: v for k, v in flags.items() if v is not None})
    raw.update(_parse_set(args.set))
    missing = [k for k in ("model", "train_manifest") if k not in raw]
    if missing:
        raise ValueError(f"give {missing} (flags --model/--train, or a config file)")
    metrics = finetune(FinetuneConfig.from_dict(raw))
    print(f"mode {metrics['mode']} on {metrics['modality']}: {metrics['train_items']} training items, "
          f"{metrics['classes']} classes, loss {metrics['first_loss']:.3f} -> {metrics['last_loss']:.3f}")
    if "zero_shot_accuracy_before" in metrics:
        print(f"zero-shot accuracy before: {metrics['zero_shot_accuracy_before']:.3f}")
    if "accuracy" in metrics:
        print(f"test accuracy after ({metrics['test_items']} items): {metrics['accuracy']:.3f}")
    print(f"wrote {raw.get('output_dir', 'runs/finetune')} ({metrics['minutes']:.1f} min)")
    return 0


def cmd_demo_finetune(args: argparse.Namespace) -> int:
    from .demo.finetune import run_finetune_demo

    metrics = run_finetune_demo(args.model, args.out, quick=args.quick, bpe_dir=args.bpe_dir)
    print(f"{'method':<100} {'accuracy':>8} {'min':>5}")
    for name, acc, minutes in metrics["table"]:
        print(f"{name:<100} {acc:>8.3f} {minutes:>5.1f}")
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_demo_video(args: argparse.Namespace) -> int:
    from .demo.video import run_video_demo

    m = run_video_demo(args.model, args.out, quick=args.quick, bpe_dir=args.bpe_dir)
    print(f"pre-existing parameters bit-identical after video training: {m['pre_existing_parameters_identical']}")
    print(f"{'metric':<28} {'before':>7} {'trained':>7}")
    for key in ("video_zero_shot_top1", "video_to_audio_r1", "audio_to_video_r1", "video_to_image_r1",
                "image_to_video_r1", "video_to_audio_map", "video_to_image_map", "video_to_text_r1"):
        print(f"{key:<28} {m['before_training'][key]:>7.3f} {m['trained'][key]:>7.3f}")
    print(f"report: {Path(args.out) / 'report.md'} ({m['minutes']:.1f} min)")
    return 0


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onepeace", description="ONE-PEACE embeddings without fairseq.")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p: argparse.ArgumentParser, model_flag: bool = True) -> None:
        if model_flag:
            p.add_argument("--model", "-m", required=True, help="released .pt checkpoint or converted folder")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", type=_dtype, default=torch.float32, help="float32 (default), bfloat16, float16, keep")
        p.add_argument("--modalities", type=_modalities, default=None, help="load only these, e.g. text,image")
        p.add_argument("--allow-unsafe-pickle", action="store_true",
                       help="unpickle with torch's full unpickler (runs code from the file: trusted files only)")

    p = sub.add_parser("embed", help="embed image/audio files, folders and texts into an .npz")
    p.add_argument("inputs", nargs="*", help="files or folders (modality from the extension; .txt/.jsonl: one text per line)")
    p.add_argument("--text", "-t", action="append", help="a text to embed (repeatable)")
    p.add_argument("--as", dest="as_modality", default=None, metavar="MODALITY",
                   help="embed every input as this modality, one item per file or folder (e.g. --as video clips/*.gif)")
    p.add_argument("--out", "-o", default="embeddings.npz")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--bpe-dir", default=None, help="folder with encoder.json, vocab.bpe, dict.txt")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    model_options(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", help="embed every image, audio and text file under a folder into a searchable index")
    p.add_argument("folder", help="folder to index recursively (images, audio, .txt/.jsonl lines as texts)")
    p.add_argument("--out", "-o", required=True, help="index folder (created; rerun to resume or update)")
    p.add_argument("--chunk-files", type=int, default=256, help="files per committed shard (default 256)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--ivf-threshold", type=int, default=50_000,
                   help="per modality: above this many vectors use an IVF index instead of exact search")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default ~4 sqrt(n))")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default nlist/8, >= 8)")
    p.add_argument("--rank", type=int, default=None, help="this process's share (default: torchrun's RANK, else 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of shares (default: WORLD_SIZE, else 1)")
    p.add_argument("--bpe-dir", default=None)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    model_options(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search an index with text, image and audio queries (weighted, composed)")
    p.add_argument("index")
    p.add_argument("--text", "-t", action="append", help="a text query part (repeatable)")
    p.add_argument("--image", "-i", action="append", help="an image file query part (repeatable)")
    p.add_argument("--audio", "-a", action="append", help="an audio file query part (repeatable)")
    p.add_argument("--weights", "-w", nargs="+", default=None,
                   help="one number per part (texts, images, audios in that order) or modality=number")
    p.add_argument("--modality", choices=["image", "audio", "text"], default=None, help="only results of this modality")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--json", action="store_true", help="JSON output instead of a table")
    p.add_argument("--model", "-m", default=None, help="default: the model the index was built with")
    p.add_argument("--bpe-dir", default=None)
    model_options(p, model_flag=False)
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("serve", help="HTTP JSON API + web page to search an index (default: the demo model and data)")
    p.add_argument("index", nargs="?", default=None,
                   help="index folder (default: index the demo data with runs/demo/model on first use)")
    p.add_argument("--model", "-m", default=None, help="default: the index's model (runs/demo/model for the demo)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=int, default=10, help="largest accepted upload (default 10 MB)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for the model (default 1: lowest latency for small models on shared CPUs; "
                        "0 = torch's default)")
    p.add_argument("--log-requests", action="store_true", help="log every request to stderr")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bpe-dir", default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="released .pt -> config.json + model.safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--dtype", type=_dtype, default=None, help="storage dtype of the output (default: keep)")
    p.add_argument("--modalities", type=_modalities, default=None)
    p.add_argument("--allow-unsafe-pickle", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="pretrain one stage (one process; use torchrun -m onepeace.train for many)")
    p.add_argument("config", help="training config JSON (onepeace.train.config.TrainConfig)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ground", help="visual grounding: draw the box a phrase describes")
    p.add_argument("image")
    p.add_argument("phrase")
    p.add_argument("--model", "-m", required=True, help="a grounding checkpoint (one_peace_classify, 'vl' head)")
    p.add_argument("--out", "-o", default=None, help="PNG to write (default IMAGE_ground.png)")
    p.add_argument("--bpe-dir", default=None)
    model_options(p, model_flag=False)
    p.set_defaults(func=cmd_ground)

    p = sub.add_parser("classify", help="ranked labels of image or audio files from a task checkpoint")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--labels", default=None, help="id2label JSON ({\"0\": \"dog\", ...} or a list)")
    p.add_argument("-k", type=int, default=5)
    model_options(p, model_flag=False)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("demo", help="pretrain a small model on offline data, evaluate, write runs/demo/report.md")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a tiny version in about two minutes (CI)")
    p.add_argument("--no-ablation", action="store_true", help="skip the contrast-only ablation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bpe-dir", default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="zero-shot classification and retrieval on manifests")
    p.add_argument("manifests", nargs="+", help="JSONL manifests with image/audio, text and label")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--concepts", default=None, help="concepts.json with caption templates per class (prompt ensembles)")
    p.add_argument("--out", "-o", default=None, help="write all numbers as JSON")
    p.add_argument("--bpe-dir", default=None)
    p.add_argument("--quiet", "-q", action="store_true")
    model_options(p, model_flag=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", help="fine-tune: classify head, linear probe or contrastive retrieval (LLRD)")
    p.add_argument("config", nargs="?", default=None, help="FinetuneConfig JSON (flags and --set override it)")
    p.add_argument("--model", "-m", default=None, help="converted folder or released .pt")
    p.add_argument("--train", default=None, help="training manifest (JSONL with label)")
    p.add_argument("--test", default=None, help="held-out manifest: accuracy after (and zero-shot before)")
    p.add_argument("--mode", choices=("classify", "linear-probe", "retrieval"), default=None)
    p.add_argument("--modality", default=None, help="the branch to fine-tune (default image)")
    p.add_argument("--concepts", default=None, help="concepts.json: class order and caption templates")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", "-o", default=None, help="output folder (default runs/finetune)")
    p.add_argument("--bpe-dir", default=None)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="other FinetuneConfig fields, e.g. layer_decay=0.65 pooling=cls (values parsed as JSON)")
    p.set_defaults(func=cmd_finetune)

    for name, func, what in (
            ("demo-finetune", cmd_demo_finetune, "zero-shot vs linear probe vs fine-tuned accuracy on the demo data"),
            ("demo-video", cmd_demo_video, "add a video modality to the demo model, train it against text, evaluate")):
        p = sub.add_parser(name, help=what)
        p.add_argument("--model", "-m", default="runs/demo/model", help="the trained demo model (onepeace demo)")
        p.add_argument("--out", default=f"runs/{name}")
        p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps (CI)")
        p.add_argument("--bpe-dir", default=None)
        p.set_defaults(func=func)

    p = sub.add_parser("info", help="config, parameters per modality, dtype")
    p.add_argument("model", help="released .pt checkpoint or converted folder")
    p.add_argument("--json", action="store_true")
    model_options(p, model_flag=False)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"onepeace {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
