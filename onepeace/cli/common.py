"""What the commands share: the flag groups declared once (as argparse parent parsers), dtype and
modality-list parsing, loading the model the flags name."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Sequence

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype | None:
    if name == "keep":
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)} or 'keep'") from None


def parse_modalities(value: str | None) -> tuple[str, ...] | None:
    return tuple(m.strip() for m in value.split(",") if m.strip()) if value else None


def parse_set(items: Sequence[str]) -> dict:
    """--set KEY=VALUE ... -> {key: value}, values parsed as JSON when they are JSON."""
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


@dataclass(frozen=True)
class Flags:
    """Parent parsers: a command lists the groups it takes (`parents=[flags.model, flags.bpe]`)."""

    device: argparse.ArgumentParser  # --device
    read: argparse.ArgumentParser  # --modalities, --allow-unsafe-pickle (reading a checkpoint)
    model: argparse.ArgumentParser  # device + read + --dtype (default float32): what load() takes
    bpe: argparse.ArgumentParser  # --bpe-dir
    quiet: argparse.ArgumentParser  # --quiet / -q


def shared_flags() -> Flags:
    def group() -> argparse.ArgumentParser:
        return argparse.ArgumentParser(add_help=False)

    device, read, bpe, quiet = group(), group(), group(), group()
    device.add_argument("--device", default="cpu")
    read.add_argument("--modalities", type=parse_modalities, default=None, help="load only these, e.g. text,image")
    read.add_argument("--allow-unsafe-pickle", action="store_true",
                      help="unpickle with torch's full unpickler (runs code from the file: trusted files only)")
    model = argparse.ArgumentParser(add_help=False, parents=[device, read])
    model.add_argument("--dtype", type=parse_dtype, default=torch.float32, help="float32 (default), bfloat16, float16, keep")
    bpe.add_argument("--bpe-dir", default=None, help="folder with encoder.json, vocab.bpe, dict.txt")
    quiet.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return Flags(device=device, read=read, model=model, bpe=bpe, quiet=quiet)


def load_model(args: argparse.Namespace):
    """The model of --model with the model flags (and --bpe-dir's tokenizer when given)."""
    import onepeace

    model = onepeace.load(args.model, device=args.device, dtype=args.dtype, modalities=args.modalities,
                          allow_unsafe_pickle=getattr(args, "allow_unsafe_pickle", False))
    if getattr(args, "bpe_dir", None):
        model.tokenizer = onepeace.get_tokenizer(args.bpe_dir)
    return model
