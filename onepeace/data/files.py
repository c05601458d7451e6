"""Finding inputs on disk: modality from the file suffix (each modality registers its suffixes, see
:func:`onepeace.registry.modality_for_path`); text files give one item per line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ..registry import modality_for_path

# suffixes of files of texts (the text modality registers them); .jsonl lines are JSON
TEXT_EXTENSIONS = frozenset({".txt", ".jsonl"})
# keys of a JSONL object that hold its text, in order of preference (the demo manifests use "text")
JSONL_TEXT_KEYS = ("text", "caption", "sentence")


def modality_of(path: str | Path) -> str | None:
    """The registered modality whose suffixes include this file's (a .txt / .jsonl file: texts), or None."""
    return modality_for_path(path)


def find_inputs(paths: Sequence[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Files and folders -> ([(modality, path)], [(path, problem)]). Folders are walked recursively,
    in sorted order; their files of unknown type are ignored, explicitly named ones are reported."""
    found, problems = [], []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.is_file()):
                m = modality_of(f)
                if m is not None:
                    found.append((m, str(f)))
        elif p.exists():
            m = modality_of(p)
            if m is None:
                problems.append((str(p), f"unknown file type {p.suffix!r}"))
            else:
                found.append((m, str(p)))
        else:
            problems.append((str(p), "no such file or folder"))
    return found, problems


def text_items(path: str) -> list[tuple[str, str]]:
    """A text file -> [(name, text)], named path:line. A .txt file gives one text per non-empty line;
    a .jsonl file one per line whose JSON is a string or an object with a "text" (or "caption",
    "sentence") string; other lines (e.g. audio-only manifest lines) give nothing.
    Raises OSError / UnicodeDecodeError for an unreadable file, ValueError naming the line for bad JSON."""
    jsonl = Path(path).suffix.lower() == ".jsonl"
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if jsonl:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                if isinstance(obj, dict):
                    obj = next((obj[k] for k in JSONL_TEXT_KEYS if isinstance(obj.get(k), str)), None)
                if not isinstance(obj, str) or not obj.strip():
                    continue
                line = obj.strip()
            out.append((f"{path}:{n}", line))
    return out
