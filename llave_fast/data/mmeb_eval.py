"""MMEB evaluation files: every query with its own candidate list (the first is the positive).

Columns (as in the MMEB eval release): ``qry_text``, ``qry_img_path``, ``tgt_text`` (a
list of candidate texts), ``tgt_img_path`` (a list of candidate image paths, same length,
empty strings for text-only candidates). Files are .jsonl or .parquet (pyarrow). Image
paths are relative to ``image_dir`` (default: the data file's folder) and must stay inside it
(``llave_fast.data.mmeb.ImageRoot``: an absolute path elsewhere, ``..`` or a symbolic link out
of it is a bad row, refused before the file is looked at; ``allow_outside_image_dir=True`` /
``--allow-outside-image-dir`` reads them). Bad rows raise a ``BadDataError`` naming the file and
the row; nothing is dropped silently.

Datasets: a file is one dataset named by its stem (``ImageNet-1K.jsonl``); hub-style shards are
named as the hub lays them out (``ImageNet-1K/test-00000-of-00001.parquet``, how
TIGER-Lab/MMEB-eval is stored; ``data/ImageNet-1K-test-00000-of-00001.parquet``; the parquet
converter's ``ImageNet-1K/test/0000.parquet``), and the shards of one name are one dataset
(:func:`find_eval_datasets`). :func:`read_eval_set` reads one
dataset into a table of its *distinct* (text, image path) pairs and, per query, indices
into that table, so each distinct input is encoded once however many candidate lists
share it (MMEB's lists of 1000 candidates share almost all of them).
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image_root import missing_image_hint
from .mmeb import BadDataError, ImageRoot, allow_outside_default, data_files, jsonl_lines, parse_json_line
from .mmeb_tables import _name_file, data_kind, missing_shards, open_jsonl, partial_conversions
from ..errors import InvalidArgument, MissingDependency

logger = logging.getLogger(__name__)

__all__ = ["EVAL_COLUMNS", "EvalDataset", "EvalRow", "EvalSet", "find_eval_datasets", "is_eval_file",
           "read_eval_file", "read_eval_set", "write_mmeb_eval"]

EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
_PARQUET_BATCH = 1024  # rows per record batch: a parquet file is never held as Python objects whole


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
    kind = data_kind(p)
    if kind == "jsonl":  # a byte-order mark (some editors write one) is no JSON
        with open_jsonl(p) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    try:
                        return "tgt_text" in json.loads(line)
                    except json.JSONDecodeError:
                        return False
        return False
    if kind == "parquet":
        pq = _pyarrow_parquet()
        try:
            return "tgt_text" in pq.read_schema(p).names
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors vary by version; say which file
            raise BadDataError(str(p), None, f"not a readable parquet file ({type(exc).__name__}: {exc})",
                               hint=False) from exc
    return False


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependency("reading .parquet files needs pyarrow: `pip install pyarrow`") from exc
    return pq


def _rows(path: Path):
    """(row index from 0, dict, line number from 1 or None) of every row of one file."""
    kind = data_kind(path)
    if kind == "jsonl":
        with open_jsonl(path) as f:
            for i, (lineno, text, problem) in enumerate(jsonl_lines(f)):
                row = None
                if problem is None:
                    row, problem = parse_json_line(text)
                if problem is not None:
                    raise BadDataError(str(path), i, problem, lineno, hint=False)
                if not isinstance(row, dict):
                    raise BadDataError(str(path), i, f"a JSON {type(row).__name__}, expected an object", lineno,
                                       hint=False)
                yield i, row, lineno
    elif kind == "parquet":
        pq = _pyarrow_parquet()
        try:
            pf = pq.ParquetFile(path)
            batches = pf.iter_batches(batch_size=_PARQUET_BATCH)
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    yield i, row, None
                    i += 1
        except BadDataError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors vary by version; say which file
            raise BadDataError(str(path), None, f"not a readable parquet file ({type(exc).__name__}: {exc})",
                               hint=False) from exc
    else:
        raise BadDataError(str(path), None, f"unsupported file type {path.suffix!r} (use .jsonl or .parquet)",
                           hint=False)


class _Images:
    """Image paths joined to the image folder, each checked to stay inside it (``ImageRoot``)
    and then to exist, once."""

    def __init__(self, root: str, allow_outside: bool = False, given: bool = True):
        self.root = root
        self.where = ImageRoot(root, allow_outside)
        self.seen: dict[str, bool] = {}
        self.given = given  # whether root is --image-dir (else the data file's folder): said with a missing image

    def __call__(self, rel, source: str, row: int, what: str) -> str | None:
        if rel is None or rel == "":
            return None
        if not isinstance(rel, str):
            raise BadDataError(source, row, f"{what} image path holds {type(rel).__name__} {rel!r}, expected a string",
                               hint=False)
        full, outside = self.where.path(rel, f"{what} image")
        if outside is not None:  # said before the file is looked at: the same whether it exists or not
            raise BadDataError(source, row, outside, hint=False)
        ok = self.seen.get(full)
        if ok is None:
            ok = self.seen[full] = os.path.isfile(full)
        if not ok:
            hint = missing_image_hint(rel, self.root, self.given)
            raise BadDataError(source, row, f"{what} image not found: {full}" + (f" ({hint})" if hint else ""),
                               hint=False)
        return full


def _text(value, source: str, row: int, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadDataError(source, row, f"{what} holds {type(value).__name__} {str(value)[:60]!r}, expected a string",
                           hint=False)
    return value


def _parse_row(r: dict, source: str, i: int, images: _Images, line: int | None = None):
    """(query text, query image, candidate texts, candidate images) of one row, checked (an error
    names the row's line where the file has lines)."""
    try:
        return _parse_row_at(r, source, i, images)
    except BadDataError as exc:
        raise exc.at_line(line) from None


def _parse_row_at(r: dict, source: str, i: int, images: _Images):
    missing = [c for c in ("qry_text", "tgt_text") if c not in r]
    if missing:
        raise BadDataError(source, i, f"missing column(s) {missing}; MMEB eval rows have {list(EVAL_COLUMNS)}",
                           hint=False)
    cands = r["tgt_text"]
    if isinstance(cands, str):
        if cands.lstrip().startswith("["):  # a list written out as text (a CSV round trip): not one candidate
            raise BadDataError(source, i, f"tgt_text holds the string {cands[:60]!r}, a list written as text; "
                               "expected a JSON list of candidate texts", hint=False)
        cands = [cands]
    if not isinstance(cands, (list, tuple)):
        raise BadDataError(source, i, f"tgt_text holds {type(cands).__name__}, expected a list of candidate texts",
                           hint=False)
    imgs = r.get("tgt_img_path")
    if imgs is None or (isinstance(imgs, (list, tuple)) and len(imgs) == 0):
        imgs = [""] * len(cands)
    elif isinstance(imgs, str):
        imgs = [imgs]
    elif not isinstance(imgs, (list, tuple)):
        raise BadDataError(source, i, f"tgt_img_path holds {type(imgs).__name__}, expected a list of image paths",
                           hint=False)
    if not cands:
        raise BadDataError(source, i, "tgt_text is an empty candidate list", hint=False)
    if len(imgs) != len(cands):
        raise BadDataError(source, i, f"tgt_text has {len(cands)} candidates but tgt_img_path has {len(imgs)}",
                           hint=False)
    q_text = _text(r["qry_text"], source, i, "qry_text")
    q_img = images(r.get("qry_img_path"), source, i, "query")
    if not q_text.strip() and q_img is None:
        raise BadDataError(source, i, "empty query: no text and no image", hint=False)
    c_texts = [_text(c, source, i, f"tgt_text[{k}]") for k, c in enumerate(cands)]
    c_imgs = [images(x, source, i, f"candidate {k}") for k, x in enumerate(imgs)]
    for k, (t, im) in enumerate(zip(c_texts, c_imgs)):
        if not t.strip() and im is None:
            raise BadDataError(source, i, f"empty candidate {k}: no text and no image", hint=False)
    return q_text, q_img, c_texts, c_imgs


def read_eval_file(path: str, image_dir: str | None = None, limit: int | None = None, *,
                   allow_outside_image_dir: bool | None = None) -> list[EvalRow]:
    """Every row of one MMEB-eval file (the first ``limit``), image paths joined to the image
    folder and checked (to stay inside it unless ``allow_outside_image_dir``; None: False unless
    inside ``llave_fast.data.mmeb.outside_image_dir_allowed``)."""
    p = Path(path)
    images = _Images(image_dir or str(p.parent), allow_outside_default(allow_outside_image_dir), image_dir is not None)
    out = []
    for i, r, line in _rows(p):
        if limit is not None and len(out) >= limit:
            break
        q_text, q_img, c_texts, c_imgs = _parse_row(r, str(p), i, images, line)
        out.append(EvalRow(str(p), i, q_text, q_img, c_texts, c_imgs))
    _warn_single_candidates(str(p), [len(row.cand_texts) for row in out])
    return out


def _warn_single_candidates(where: str, counts) -> None:
    """MMEB's rows hold 1000 candidates (retrieval) or a class list: a query with one candidate is a
    hit whatever the model, so a perfect score on it says nothing. Counted, never silent."""
    counts = list(counts)
    single = sum(n == 1 for n in counts)
    if single:
        logger.warning("%s: %d of %d queries have a single candidate (tgt_text): each counts as a hit whatever the "
                       "model, and precision@1 includes them", where, single, len(counts))


# ------------------------------------------------------------------------------------ datasets
@dataclass
class EvalDataset:
    """One MMEB-eval dataset: its name and its files (one file, or the shards of one folder)."""

    name: str
    files: list[str]


def find_eval_datasets(paths) -> list[EvalDataset] | None:
    """The MMEB-eval datasets that ``paths`` (files and folders, folders searched recursively)
    name, in the order given; None when none of the files is an MMEB-eval file (they are
    MMEB-train files). A mix of both kinds, or two datasets of one name, is refused.

    A dataset is named as an MMEB-train subset is (:func:`llave_fast.data.mmeb_tables._name_file`),
    in every layout the hub writes: ``<name>.jsonl``/``.parquet``; ``<name>/test-00000-of-00001.parquet``
    (``push_to_hub``: how TIGER-Lab/MMEB-eval is stored); ``data/<name>-test-00000-of-00001.parquet``;
    and the parquet converter's ``<name>/test/0000.parquet`` (or ``<name>/0000.parquet``). The
    files of one dataset lie in one folder and belong to one split, each shard once; a dataset
    missing some of its shards, or read from the converter's partial conversion
    (``<name>/partial-test/0000.parquet``: the first part of a dataset too large for it), is refused."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = data_files(paths)
    kinds = {f: is_eval_file(str(f)) for f in files}
    if not any(kinds.values()):
        return None
    if not all(kinds.values()):
        train = next(f for f, k in kinds.items() if not k)
        evals = next(f for f, k in kinds.items() if k)
        raise InvalidArgument(f"--data mixes MMEB-eval files (e.g. {evals}, rows with tgt_text) and other files (e.g. "
                         f"{train}, no tgt_text column): evaluate them in separate runs")
    by_name: dict[str, EvalDataset] = {}
    first: dict[str, tuple[Path, str | None, Path]] = {}  # name: (folder, split, its first file)
    shards: dict[tuple[str, tuple], Path] = {}
    counts: dict[str, int | None] = {}
    seen: set[tuple[str, Path]] = set()
    for f in files:
        name, split, shard = _name_file(f)
        if (name, f.resolve()) in seen:  # a file named twice (e/x.jsonl and ./e/../e/x.jsonl) counts once
            continue
        seen.add((name, f.resolve()))
        where = f.parent.resolve() if shard is not None else f.resolve()
        folder, first_split, a = first.setdefault(name, (where, split, f))
        if split != first_split and None not in (split, first_split):
            one, two = (a.name, f.name) if a.parent == f.parent else (a, f)
            raise InvalidArgument(f"the shards of {name!r} in {f.parent} belong to different splits ({one} and "
                                  f"{two}): a dataset's shards are one split; keep one split there (MMEB-eval's is "
                                  "'test'), or name the split's files in --data")
        if split != first_split or where != folder:
            raise InvalidArgument(f"two datasets are named {name!r}: {a} and {f} (a dataset is named by its file's "
                                  "stem, or by its folders for hub-style shards: <name>/test-00000-of-00001.parquet, "
                                  "data/<name>-test-00000-of-00001.parquet, <name>/test/0000.parquet); rename one, "
                                  "or name one in --data")
        if shard is not None:
            other = shards.setdefault((name, shard), f)
            count = shard[1] if len(shard) > 1 else None
            first_count = counts.setdefault(name, count)
            if other is not f or count != first_count:
                why = f"both shard {shard[0]} of" if other is not f else f"shards of {first_count} and of {count} of"
                raise InvalidArgument(f"{other if other is not f else a} and {f} are {why} dataset {name!r}: two "
                                      "copies of one dataset are not merged; keep one")
        if name in by_name:
            by_name[name].files.append(str(f))
        else:
            by_name[name] = EvalDataset(name, [str(f)])
    partial = partial_conversions(f for ds in by_name.values() for f in ds.files)
    if partial:  # as a partial download: a score under MMEB's name is of the whole dataset
        raise InvalidArgument(f"{len(partial)} dataset(s) are the hub parquet converter's partial conversion (a "
                              "partial-<split> folder: the first part of a dataset too large for the converter), whose "
                              "score would pass for the whole dataset's: " + "; ".join(partial[:5])
                              + ("; ..." if len(partial) > 5 else "")
                              + ": download the dataset's own files (its main branch) instead (--max-queries evaluates "
                              "part of a dataset)")
    gone = missing_shards(_name_file(Path(f)) for ds in by_name.values() for f in ds.files)
    if gone:  # a score under MMEB's name is of the whole dataset; --max-queries evaluates part of one
        raise InvalidArgument(f"{len(gone)} dataset(s) lack some of their hub shards (a partial download or copy?): "
                              + "; ".join(gone[:5]) + ("; ..." if len(gone) > 5 else "")
                              + ": fetch the missing files (--max-queries evaluates part of a dataset)")
    return list(by_name.values())


@dataclass
class EvalSet:
    """One dataset read for scoring, every distinct input once.

    ``pairs``: the distinct (text, absolute image path or None) inputs, queries' and
    candidates' alike (the model embeds both the same way); ``origin[k]``: the (file, row, line)
    where pair k first appears (for error messages); ``queries[q]``: query q's pair index;
    ``candidates[q]``: its candidate list as pair indices, the positive first.
    """

    name: str
    files: list[str]
    pairs: list[tuple[str, str | None]] = field(default_factory=list)
    origin: list[tuple[str, int, int | None]] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    candidates: list[np.ndarray] = field(default_factory=list)

    @property
    def num_queries(self) -> int:
        return len(self.queries)

    @property
    def num_candidate_slots(self) -> int:
        """Candidates over all lists, copies counted (what a per-list encoder would encode)."""
        return int(sum(len(c) for c in self.candidates))


def read_eval_set(dataset: EvalDataset, image_dir: str | None = None, max_queries: int | None = None, *,
                  allow_outside_image_dir: bool | None = None) -> EvalSet:
    """Read a dataset's rows (the first ``max_queries``, over its files in order) into an
    :class:`EvalSet`. Image paths are relative to ``image_dir`` (default: each file's folder),
    must stay inside it unless ``allow_outside_image_dir`` (None: False unless inside
    ``llave_fast.data.mmeb.outside_image_dir_allowed``), and each distinct one is checked to exist."""
    allow = allow_outside_default(allow_outside_image_dir)
    out = EvalSet(dataset.name, list(dataset.files))
    index: dict[tuple[str, str | None], int] = {}

    def intern(key, source, row, line) -> int:
        k = index.get(key)
        if k is None:
            k = index[key] = len(out.pairs)
            out.pairs.append(key)
            out.origin.append((source, row, line))
        return k

    for path in dataset.files:
        p = Path(path)
        images = _Images(image_dir or str(p.parent), allow, image_dir is not None)
        n_file = 0
        for i, r, line in _rows(p):
            if max_queries is not None and out.num_queries >= max_queries:
                break
            q_text, q_img, c_texts, c_imgs = _parse_row(r, str(p), i, images, line)
            out.queries.append(intern((q_text, q_img), str(p), i, line))
            out.candidates.append(np.fromiter((intern(c, str(p), i, line) for c in zip(c_texts, c_imgs)),
                                              dtype=np.int64, count=len(c_texts)))
            n_file += 1
        if n_file == 0 and (max_queries is None or out.num_queries < max_queries):
            raise BadDataError(str(p), None, "no rows (an MMEB-eval file has one query per row)", hint=False)
    _warn_single_candidates(dataset.name, [len(c) for c in out.candidates])
    return out


# ------------------------------------------------------------------------------ synthetic sets
def write_mmeb_eval(folder: str, name: str, n_queries: int, *, num_candidates: int = 10, pool: int | None = None,
                    task: str = "i2t", seed: int = 0, image_size: int = 64, file_format: str = "jsonl",
                    shards: int = 1) -> tuple[list[str], str]:
    """Write an MMEB-eval-style dataset of synthetic items (for tests and the benchmark).

    Query ``q`` is item ``q`` of the synthetic eval split (one ``task``: "i2t", "t2i" or
    "vqa"); its candidate list is its own target first, then ``num_candidates - 1`` other
    distinct targets drawn from a shared pool (the targets of the first ``pool`` items,
    default ``2 * n_queries``), as MMEB's lists share candidates. Images go to
    ``folder/images/<name>/``, paths relative to ``folder``. ``file_format``: "jsonl"
    (``folder/<name>.jsonl``) or "parquet" (``folder/<name>.parquet``, or with ``shards > 1``
    hub-style shards ``folder/<name>/test-0000k-of-0000n.parquet``). Returns (data files,
    image folder to pass as ``image_dir``).
    """
    import random

    from .synthetic import SyntheticDataset

    if file_format not in ("jsonl", "parquet"):
        raise InvalidArgument(f"file_format must be 'jsonl' or 'parquet', got {file_format!r}")
    if shards < 1 or (shards > 1 and file_format != "parquet"):
        raise InvalidArgument(f"shards must be 1, or more with file_format='parquet', got {shards} with {file_format!r}")
    pool = max(pool or 2 * n_queries, n_queries)
    ds = SyntheticDataset(pool, seed=seed, split="eval", image_size=image_size, tasks=(task,))
    rel_dir = os.path.join("images", name)
    os.makedirs(os.path.join(folder, rel_dir), exist_ok=True)

    def save(image, stem) -> str:
        if image is None:
            return ""
        rel = os.path.join(rel_dir, f"{stem}.png")
        full = os.path.join(folder, rel)
        if not os.path.exists(full):
            image.save(full)
        return rel

    targets: dict[str, tuple[str, str]] = {}  # target_id -> (text, image path): the shared pool
    records = []
    for i in range(pool):
        r = ds[i]
        if r["target_id"] not in targets:
            targets[r["target_id"]] = (r["pos_text"], save(r["pos_image"], f"t{len(targets)}"))
        records.append(r)
    ids = list(targets)
    rng = random.Random(seed)
    rows = []
    for q in range(n_queries):
        r = records[q]
        others = [t for t in ids if t != r["target_id"]]
        chosen = [r["target_id"]] + rng.sample(others, min(num_candidates - 1, len(others)))
        rows.append({"qry_text": r["qry"], "qry_img_path": save(r["qry_image"], f"q{q}"),
                     "tgt_text": [targets[t][0] for t in chosen], "tgt_img_path": [targets[t][1] for t in chosen]})
    if file_format == "jsonl":
        path = os.path.join(folder, f"{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return [path], folder
    import pyarrow as pa
    import pyarrow.parquet as pq

    if shards == 1:
        paths = [os.path.join(folder, f"{name}.parquet")]
    else:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        paths = [os.path.join(folder, name, f"test-{k:05d}-of-{shards:05d}.parquet") for k in range(shards)]
    per = -(-len(rows) // len(paths))
    for k, path in enumerate(paths):
        pq.write_table(pa.Table.from_pylist(rows[k * per:(k + 1) * per]), path)
    return paths, folder
