"""MMEB evaluation files: every query with its own candidate list (the first is the positive).

Columns (as in the MMEB eval release): ``qry_text``, ``qry_img_path``, ``tgt_text`` (a
list of candidate texts), ``tgt_img_path`` (a list of candidate image paths, same length,
empty strings for text-only candidates). Files are .jsonl or .parquet (pyarrow). Image
paths are relative to ``image_dir`` (default: the data file's folder). Bad rows raise a
``BadDataError`` naming the file and the row; nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .mmeb import BadDataError

EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")


@dataclass
class EvalRow:
    source: str
    row: int
    qry_text: str
    qry_image: str | None
    cand_texts: list[str]
    cand_images: list[str | None]


def is_eval_file(path: str) -> bool:
    """True when the file's first row (or schema) has MMEB eval columns."""
    p = Path(path)
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        return "tgt_text" in json.loads(line)
                    except json.JSONDecodeError:
                        return False
        return False
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return "tgt_text" in pq.read_schema(p).names
    return False


def _rows(path: Path):
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise BadDataError(str(path), i, f"invalid JSON: {exc.msg}", hint=False) from exc
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError("reading .parquet files needs pyarrow: `pip install pyarrow`") from exc
        yield from pq.read_table(path).to_pylist()
    else:
        raise BadDataError(str(path), None, f"unsupported file type {path.suffix!r} (use .jsonl or .parquet)", hint=False)


def read_eval_file(path: str, image_dir: str | None = None, limit: int | None = None) -> list[EvalRow]:
    p = Path(path)
    root = image_dir or str(p.parent)
    out = []
    for i, r in enumerate(_rows(p)):
        if limit is not None and len(out) >= limit:
            break
        missing = [c for c in ("qry_text", "tgt_text") if c not in r]
        if missing:
            raise BadDataError(str(p), i, f"missing column(s) {missing}; MMEB eval rows have {list(EVAL_COLUMNS)}", hint=False)
        cands = r["tgt_text"]
        if isinstance(cands, str):
            cands = [cands]
        imgs = r.get("tgt_img_path") or [""] * len(cands)
        if isinstance(imgs, str):
            imgs = [imgs]
        if not cands:
            raise BadDataError(str(p), i, "tgt_text is an empty candidate list", hint=False)
        if len(imgs) != len(cands):
            raise BadDataError(str(p), i, f"tgt_text has {len(cands)} candidates but tgt_img_path has {len(imgs)}",
                               hint=False)

        def img(x, what):
            if not x:
                return None
            full = os.path.join(root, x)
            if not os.path.exists(full):
                raise BadDataError(str(p), i, f"{what} image not found: {full}", hint=False)
            return full

        q_img = img(r.get("qry_img_path") or "", "query")
        if not (r["qry_text"] or "").strip() and q_img is None:
            raise BadDataError(str(p), i, "empty query: no text and no image", hint=False)
        out.append(EvalRow(str(p), i, r["qry_text"] or "", q_img, [c or "" for c in cands],
                           [img(x, f"candidate {k}") for k, x in enumerate(imgs)]))
    return out
