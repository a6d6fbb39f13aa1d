"""MMEB-train tables read into columns of text: the MMEB columns, .jsonl and .parquet files (one
row's problem kept as that row's problem, a file's as a :class:`BadDataError`), a hub dataset, and
which data files a list of files and folders names (subset and split from the file's name)."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .bad_data import BadDataError
from ..errors import InvalidArgument, MissingDependency, MissingFile

__all__ = ["MAX_LINE_BYTES", "MMEB_COLUMNS", "MMEB_NEG_COLUMNS", "MMEB_REQUIRED_COLUMNS",
           "HUB_SPLITS", "data_files", "data_kind", "data_stem", "jsonl_lines", "missing_shards", "open_jsonl",
           "parse_json_line", "partial_conversions"]

logger = logging.getLogger(__name__)

MMEB_REQUIRED_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path")
MMEB_NEG_COLUMNS = ("neg_text", "neg_image_path")
MMEB_COLUMNS = MMEB_REQUIRED_COLUMNS + MMEB_NEG_COLUMNS
# what each data file name ending reads as, in any case (.JSONL): gzip is read for jsonl alone
_KINDS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
# endings that look like data but are not read: a named or found file with one is refused, never passed over
_REFUSED = {
    ".parquet.gz": "a parquet file compresses its own pages: gunzip it and pass the .parquet",
    ".json.gz": "MMEB data is JSON lines: gunzip it and name it .jsonl (one JSON object a line)",
    **{f".{kind}.{comp}": "only .jsonl.gz is read compressed: decompress it"
       for kind in ("jsonl", "json", "parquet") for comp in ("bz2", "xz", "zst", "zip")},
}
_JSON_HINT = ("MMEB data is JSON lines (.jsonl: one JSON object a line) and .json is not read; a table written as "
              "JSON lines is read once named .jsonl, one written as a JSON array must be converted (one object a line)")
_SHARD_RE = re.compile(r"^(?P<split>.+?)-\d+-of-\d+$")  # hub shard names: original-00000-of-00001
_SHARD_TAIL_RE = re.compile(r"^(?P<prefix>.+)-(?P<index>\d+)-of-(?P<count>\d+)$")
_SPLIT_NAME_RE = re.compile(r"^\w+(\.\w+)*$")  # the hub's split names (datasets.Split): never a '-'
_CONVERTER_RE = re.compile(r"^\d{4}$")  # the hub's parquet converter: <subset>/<split>/0000.parquet
# the split names MMEB's hub datasets use (and the usual ones): what the folder of a parquet-converter shard
# must be named to be read as <subset>/<split>/0000.parquet; any other folder is the subset (split level left out)
HUB_SPLITS = frozenset({"original", "diverse_instruction", "train", "test", "validation", "dev", "val"})
# the converter's folder for a split it converted only in part (a dataset too large for it): <subset>/partial-<split>/
_PARTIAL = "partial-"
_HUB_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class _Source:
    """One table: a data file or one hub subset, its columns as lists of str."""

    name: str  # the file path, or hub "name/subset[split]"
    subset: str
    image_root: str  # folder image paths are relative to
    cols: dict[str, list[str]]
    lines: list[int] | None = None  # jsonl line number of each row
    has_neg: bool = False
    problems: dict[int, str] = field(default_factory=dict)  # rows found bad while reading
    # rows whose hard negative alone is bad: a problem only with use_negatives
    neg_problems: dict[int, str] = field(default_factory=dict)
    n: int = field(init=False)

    def __post_init__(self):
        self.n = len(self.cols["qry"])
        for c in MMEB_NEG_COLUMNS:  # a table without negatives reads as empty negatives
            self.cols.setdefault(c, [""] * self.n)

    def line(self, row: int) -> int | None:
        return None if self.lines is None else self.lines[row]


class _Cell(Exception):
    """A value that is not text; becomes a row problem."""


def _as_text(value, column: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and column in MMEB_NEG_COLUMNS and len(value) <= 1:
        # some releases store one negative as a one-element list
        return _as_text(value[0] if value else None, column)
    kind = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
    raise _Cell(f"column {column!r} holds {kind}, expected a string")


def _texts(values, column: str, problems: dict[int, str]) -> list[str]:
    out = []
    for row, v in enumerate(values):
        try:
            out.append(_as_text(v, column))
        except _Cell as exc:
            problems.setdefault(row, str(exc))
            out.append("")
    return out


# ---------------------------------------------------------------- reading tables
def _column_problem(names: Iterable[str], allow_extra: bool) -> str | None:
    names = list(names)
    missing = [c for c in MMEB_REQUIRED_COLUMNS if c not in names]
    if missing:
        return f"missing required column(s) {missing}; an MMEB table has {list(MMEB_COLUMNS)}"
    unknown = [c for c in names if c not in MMEB_COLUMNS]
    if unknown and not allow_extra:
        return f"unknown column(s) {unknown}; an MMEB table has {list(MMEB_COLUMNS)} (allow_extra_columns=True ignores others)"
    return None


MAX_LINE_BYTES = 16 << 20  # a data line longer than this (16 MiB; MMEB rows are a few hundred bytes) is a bad row


def jsonl_lines(f, max_bytes: int = MAX_LINE_BYTES):
    """``(line number, text or None, problem or None)`` for each non-blank line of a binary file:
    a line that is not UTF-8, or longer than ``max_bytes`` (never held whole in memory), is a
    problem of that line, not of the file."""
    lineno = 0
    while True:
        raw = f.readline(max_bytes + 1)
        if not raw:
            return
        lineno += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            n = len(raw)
            while raw and not raw.endswith(b"\n"):  # the rest of the long line, in bounded pieces
                raw = f.readline(max_bytes + 1)
                n += len(raw)
            yield lineno, None, f"a line of {n} bytes, over the limit of {max_bytes} bytes (MAX_LINE_BYTES)"
            continue
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            yield lineno, None, f"not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
            continue
        if text.strip():
            yield lineno, text.rstrip("\r\n"), None  # the newline would move a truncated line's error to "line 2"


def parse_json_line(text: str):
    """(object, problem): json.loads, with its errors as a row's problem (RecursionError included:
    a deeply nested line is bad data, not a crash)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at column {exc.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply to parse"


def _read_jsonl(path: Path, allow_extra: bool, max_rows: int | None) -> _Source:
    """Rows of a .jsonl file; a line that is not a valid MMEB row is a row problem."""
    rows, lines, problems = [], [], {}
    with open_jsonl(path) as f:
        for lineno, text, problem in jsonl_lines(f):
            if max_rows is not None and len(rows) >= max_rows:
                break
            row = len(rows)
            lines.append(lineno)
            obj = {}
            if problem is None:
                obj, problem = parse_json_line(text)
            if problem is not None:
                problems[row] = problem
                obj = {}
            if not isinstance(obj, dict):
                problems[row] = f"expected a JSON object, got {type(obj).__name__}"
                obj = {}
            if row not in problems and (why := _column_problem(obj.keys(), allow_extra)):
                problems[row] = why
            rows.append(obj)
    has_neg = any(c in r for r in rows for c in MMEB_NEG_COLUMNS)
    names = MMEB_COLUMNS if has_neg else MMEB_REQUIRED_COLUMNS
    neg_problems: dict[int, str] = {}
    cols = {c: _texts((r.get(c) for r in rows), c, neg_problems if c in MMEB_NEG_COLUMNS else problems) for c in names}
    return _Source(str(path), "", "", cols, lines, has_neg, problems, neg_problems)


@contextlib.contextmanager
def open_jsonl(path):
    """A jsonl data file opened for :func:`jsonl_lines` (binary; ``.jsonl.gz`` decompressed as it is
    read); a gzip stream that is cut or corrupt is a :class:`BadDataError` naming the file, not an
    internal error from the middle of a read."""
    path = Path(path)
    gz = data_suffix(path) == ".jsonl.gz"
    with gzip.open(path, "rb") if gz else open(path, "rb") as f:
        try:
            yield f
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            if not gz:
                raise
            raise BadDataError(str(path), None, f"not a readable gzip file: {type(exc).__name__}: {exc}",
                               hint=False) from exc


def _import_pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependency(
            "reading .parquet MMEB files needs pyarrow: `pip install pyarrow` (or convert the files to .jsonl)"
        ) from exc
    return pq


def _read_parquet(path: Path, allow_extra: bool, max_rows: int | None) -> _Source:
    """Rows of a .parquet file; its schema is checked once (a bad column is a file problem)."""
    pq = _import_pyarrow_parquet()
    src = str(path)
    try:
        schema = pq.read_schema(path)
    except Exception as exc:
        raise BadDataError(src, None, f"not a readable parquet file: {exc}", hint=False) from exc
    keep = _schema_columns(schema.names, src, allow_extra)
    try:
        table = pq.read_table(path, columns=keep)
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors vary (corrupt pages, duplicate columns)
        raise BadDataError(src, None, f"not a readable parquet file: {type(exc).__name__}: {exc}", hint=False) from exc
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return _from_columns({c: table.column(c).to_pylist() for c in keep}, src, None)


def _schema_columns(names, src: str, allow_extra: bool) -> list[str]:
    why = _column_problem(names, allow_extra)
    if why:
        raise BadDataError(src, None, why, hint=False)
    return [c for c in MMEB_COLUMNS if c in names]


def _from_columns(columns: dict, src: str, max_rows: int | None) -> _Source:
    """A table given as {column name: values}."""
    problems: dict[int, str] = {}
    neg_problems: dict[int, str] = {}
    cols = {}
    for c, values in columns.items():
        values = list(values)
        cols[c] = _texts(values if max_rows is None else values[:max_rows], c,
                         neg_problems if c in MMEB_NEG_COLUMNS else problems)
    return _Source(src, "", "", cols, None, any(c in columns for c in MMEB_NEG_COLUMNS), problems, neg_problems)


_LAYOUTS = ("<subset>.jsonl / <subset>.parquet, <subset>/<split>-00000-of-00001.parquet, "
            "data/<subset>-<split>-00000-of-00001.parquet, <subset>/<split>/0000.parquet, "
            "<subset>/partial-<split>/0000.parquet or <subset>/0000.parquet")


def _converter_split(folder: str) -> tuple[str | None, bool]:
    """(the split a parquet-converter folder names, or None where it names none; whether it is the
    converter's partial conversion, ``partial-<split>``)."""
    if folder.lower() in HUB_SPLITS:
        return folder, False
    if folder.lower().startswith(_PARTIAL) and folder[len(_PARTIAL):].lower() in HUB_SPLITS:
        return folder[len(_PARTIAL):], True
    return None, False


def partial_conversions(files) -> list[str]:
    """One line per subset and split read from the hub parquet converter's partial conversion
    (``<subset>/partial-<split>/0000.parquet``: the converter's branch holds only the first part of
    a dataset too large for it), e.g. ``"MSCOCO (split original, in .../MSCOCO/partial-original)"``;
    read as split ``<split>``, such a folder otherwise passes for the whole subset."""
    out = {}
    for f in map(Path, files):
        if _CONVERTER_RE.match(data_stem(f)) and data_kind(f) == "parquet":
            folder = Path(os.path.abspath(f)).parent
            split, partial = _converter_split(folder.name)
            if partial:
                out.setdefault((folder.parent.name, split), f"{folder.parent.name} (split {split}, in {folder})")
    return [out[k] for k in sorted(out)]


def _name_file(path: Path) -> tuple[str, str | None, tuple | None]:
    """``(subset, split, shard)`` of a data file from its name and folders; ``shard`` (None for a
    one-file subset) tells two shards of one subset and split apart. The hub's layouts:
    ``<subset>/<split>-00000-of-00001.parquet`` (``push_to_hub``),
    ``data/<subset>-<split>-00000-of-00001.parquet`` (subset and split in the file name: the
    split is what follows its last '-', since the hub's split names never hold one) and
    ``<subset>/<split>/0000.parquet`` (the hub's parquet converter; the folder is read as the split
    when it has a split's name, :data:`HUB_SPLITS`, and as the subset otherwise: ``c/MSCOCO/0000.parquet``
    is subset MSCOCO, not split MSCOCO of a subset "c"; its ``partial-<split>`` folder, the part it
    converted of a dataset too large for it, is split ``<split>``: :func:`partial_conversions` says
    which were read); any other file is a subset of its own,
    named by the file. A shard name that fits none of these is refused: the old
    reading (the folder names the subset, the rest of the name the split) named every subset
    of ``data/`` "data", and every converter shard a subset "0000"."""
    stem = data_stem(path)
    folder = Path(os.path.abspath(path)).parent  # "A/../A/x" and a bare "x" in the current folder alike
    m = _SHARD_TAIL_RE.match(stem)
    if m:
        prefix, shard = m["prefix"], (int(m["index"]), int(m["count"]))
        if _SPLIT_NAME_RE.match(prefix):  # <subset>/<split>-00000-of-00001
            return folder.name, prefix, shard
        subset, _, split = prefix.rpartition("-")
        # data/<subset>-<split>-...; a split of its own with a '-' (diverse-instruction) is not the hub's
        if subset and _SPLIT_NAME_RE.match(split) and folder.name in ("data", subset):
            return subset, split, shard
        raise InvalidArgument(
            f"{path}: a shard named {path.name!r} in folder {folder.name!r} fits none of the layouts read "
            f"({_LAYOUTS}; a split name has no '-'): cannot tell its subset and split apart; rename it or its folder")
    if _CONVERTER_RE.match(stem) and data_kind(path) == "parquet":  # <subset>/<split>/0000.parquet
        split = _converter_split(folder.name)[0]  # partial-<split>: split <split> (partial_conversions says it)
        if split is None:  # <subset>/0000.parquet: the split level left out
            return folder.name, None, (int(stem),)
        subset = folder.parent.name
        if not subset:
            raise InvalidArgument(f"{path}: a parquet-converter shard ({path.name!r}) is named by its folders "
                                  f"<subset>/<split>/{path.name}, but it has no subset folder above {folder.name!r}: "
                                  f"name the folder above the subset folders instead")
        return subset, split, (int(stem),)
    return stem, None, None


def missing_shards(named) -> list[str]:
    """What is missing of each subset (dataset) and split whose hub shards say how many there are:
    ``named`` is ``(subset, split, shard)`` per file (:func:`_name_file`); one line per incomplete set,
    e.g. ``"MSCOCO (split original): shards 00001 of 00000-00002 missing"`` (a partial download
    otherwise reads as a smaller subset, silently)."""
    have: dict[tuple, set[int]] = {}
    count_of: dict[tuple, int] = {}
    for subset, split, shard in named:
        if shard is not None and len(shard) == 2:
            have.setdefault((subset, split), set()).add(shard[0])
            count_of[(subset, split)] = shard[1]
    out = []
    for key, idx in sorted(have.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        gone = [i for i in range(count_of[key]) if i not in idx]
        if gone:
            shown = ", ".join(f"{i:05d}" for i in gone[:5]) + (", ..." if len(gone) > 5 else "")
            out.append(f"{key[0]}" + (f" (split {key[1]})" if key[1] else "") + f": {len(gone)} of its "
                       f"{count_of[key]} shards missing ({shown})")
    return out


def data_suffix(path) -> str | None:
    """The data-file ending of ``path``, lower-cased (``.jsonl``, ``.jsonl.gz``, ``.parquet``, or one
    that is refused, ``.parquet.gz`` ...), or None for a file that is no data file."""
    name = Path(path).name.lower()
    return next((end for end in (*_KINDS, *_REFUSED) if name.endswith(end) and len(name) > len(end)), None)


def data_kind(path) -> str | None:
    """``"jsonl"`` or ``"parquet"``: how a data file is read (None: not a data file); a file whose
    ending looks like data but is not read (``.parquet.gz``) is refused, naming it."""
    end = data_suffix(path)
    if end in _REFUSED:
        raise InvalidArgument(f"{path}: files ending {end} are not read: {_REFUSED[end]}")
    return _KINDS.get(end)


def data_stem(path) -> str:
    """The file's name without its data ending (``MSCOCO.jsonl.gz``: ``MSCOCO``)."""
    path = Path(path)
    end = data_suffix(path)
    return path.name[: -len(end)] if end else path.stem


def _discover(paths) -> list[Path] | str:
    """Data files named by ``paths`` (files and folders), or a hub dataset name."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if len(paths) == 1 and isinstance(paths[0], str) and not os.path.exists(paths[0]) and _HUB_NAME_RE.match(paths[0]):
        return paths[0]
    return data_files(paths, missing_hint=" (a hub dataset is named 'owner/name' and needs the `datasets` package)")


def data_files(paths, missing_hint: str = "") -> list[Path]:
    """The data files named by ``paths``: files as given, folders searched recursively (sorted).
    Endings are matched in any case (``.JSONL``); ``.jsonl.gz`` is read, and other compressed data
    (``.parquet.gz``, ``.json.gz`` ...) is refused naming the file, never passed over. Hidden
    folders and files (``.git``, ``.cache``, ``.ipynb_checkpoints``: copies and caches, never the
    data) are not searched: data files there are counted and said (a warning), and read only
    when named (or their folder is). A folder without any data file, a file of another type or a
    missing path is an error naming it (``missing_hint`` is added to the last)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found, left_out = _search(p)
            plain = [f for f in left_out if f.name.lower().endswith(".json")]
            left_out = [f for f in left_out if f not in plain]
            if plain:
                logger.warning("%d .json file(s) under %s are not read (e.g. %s): %s; metadata beside the tables "
                               "may be left as it is", len(plain), p, plain[0], _JSON_HINT)
            if left_out:
                packed = [f for f in left_out if data_suffix(f) in _REFUSED]
                logger.warning("%d data-like file(s) under %s are not read: %d in hidden folders or with hidden "
                               "names (name them, or their folder, to read them), %d in a compressed form that is "
                               "not read (%s; e.g. %s)", len(left_out), p, len(left_out) - len(packed), len(packed),
                               ", ".join(sorted({data_suffix(f) for f in packed})) or "none", left_out[0])
            if not found:
                raise MissingFile(f"no {'/'.join(_KINDS)} files under {p}"
                                        + (f" ({len(left_out)} hidden or compressed as not read: {left_out[0]})"
                                           if left_out else "")
                                        + (f" ({len(plain)} .json file(s), e.g. {plain[0]}: {_JSON_HINT})"
                                           if plain else ""))
            files += found
        elif p.is_file():
            if data_kind(p) is None:
                json_hint = f" ({_JSON_HINT})" if p.name.lower().endswith(".json") else ""
                raise InvalidArgument(f"{p}: unsupported data file type {p.suffix!r}; expected one of {tuple(_KINDS)}"
                                      f"{json_hint}")
            files.append(p)
        else:
            raise MissingFile(f"{p}: no such file or folder{missing_hint}")
    return files


def _search(folder: Path) -> tuple[list[Path], list[Path]]:
    """(the data files under ``folder``, sorted; the data files left out: hidden, or in a compressed
    form that is not read, ``.json.gz`` metadata beside the tables say, or plain ``.json``, which
    :func:`data_files` says apart; a file named itself is refused)."""
    found, left_out = [], []
    for root, dirs, names in os.walk(folder):  # links to folders are not followed, as rglob did not
        dirs.sort()
        in_hidden = any(part.startswith(".") for part in Path(root).relative_to(folder).parts)
        for name in sorted(names):
            f = Path(root, name)
            end = data_suffix(f)
            if end is None:
                if name.lower().endswith(".json") and not in_hidden and not name.startswith(".") and f.is_file():
                    left_out.append(f)
                continue
            if in_hidden or name.startswith(".") or end in _REFUSED:
                left_out.append(f)
            elif f.is_file():
                found.append(f)
    return sorted(found), left_out


def _load_hub(name: str, subsets, split: str, allow_extra: bool, max_rows, image_dir) -> list[_Source]:
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependency(
            f"{name!r} is not a local path, so it is read as a hub dataset, which needs the `datasets` package "
            "(`pip install datasets`) and network access; or download the parquet files and pass their folder"
        ) from exc
    try:
        names = list(subsets) if subsets is not None else list(datasets.get_dataset_config_names(name))
    except Exception as exc:
        raise RuntimeError(f"could not list the subsets of hub dataset {name!r} (network?): {exc}") from exc
    sources = []
    for subset in names:
        src = f"{name}/{subset}[{split}]"
        try:
            ds = datasets.load_dataset(name, subset, split=split)
        except Exception as exc:
            raise RuntimeError(f"could not load hub dataset {src} (network? subset name?): {exc}") from exc
        keep = _schema_columns(ds.column_names, src, allow_extra)
        source = _from_columns({c: ds[c] for c in keep}, src, max_rows)
        source.subset, source.image_root = subset, str(image_dir or ".")
        sources.append(source)
    return sources
