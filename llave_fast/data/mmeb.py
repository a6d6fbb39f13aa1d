"""MMEB-train reader: local parquet/jsonl files or a hub dataset, images loaded lazily.

MMEB-train (and LLaVE's training data) has one table per subset with the columns

    qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]

Texts carry MMEB's image placeholder ``<|image_1|>`` where the image goes; image paths
are relative to an image folder, and an empty path means "no image". A subset is one file
(``MSCOCO.jsonl``, subset ``MSCOCO``) or a folder of hub-style shards
(``MSCOCO/original-00000-of-00001.parquet``, subset ``MSCOCO``, split ``original``; the hub's
other layouts, and the shard names refused, in :func:`.mmeb_tables._name_file`).

Bad data stops the run with a ``BadDataError`` naming where it is (``FILE:LINE`` for jsonl,
``FILE: row N`` for parquet, both 1-based: :func:`data_location`): a missing or unreadable image, a query or target with
neither text nor image, a placeholder with no image, a missing, unknown or mistyped
column. Columns and rows are checked when the dataset is built; images are checked for
existence then (``check_images="exists"``, the default) and decoded in ``__getitem__``
(or all at build time with ``check_images="decode"``, with a progress bar). With
``skip_bad_rows=True`` a bad row is logged (``logging.warning``, with file, row and reason), recorded in ``skipped``
and left out; nothing is ever dropped silently. A row whose image turns out unreadable
only in ``__getitem__`` is replaced by the next good row (deterministically), and is
recorded in ``skipped`` of the process that read it (a DataLoader worker's own copy).
Images follow ``bad_images`` ("skip" or "fail") when it is given, ``skip_bad_rows`` when
not; a missing image whose path is relative says which folder it was looked up in and
suggests ``--image-dir``.

An image path must stay inside the image folder (:class:`ImageRoot`): an absolute path
elsewhere, ``..`` that climbs out, or a symbolic link inside the folder that leads out of it
is a bad row (``skip_bad_rows`` decides), refused before the file is looked at, so the
message is the same whether such a file exists or not; ``allow_outside_image_dir=True``
(``--allow-outside-image-dir``) reads them.

This module holds the dataset (:class:`MMEBDataset`: row checks, skipping, records); what it
builds on lives beside it and stays importable from here: the table readers in
:mod:`.mmeb_tables`, :class:`BadDataError` in :mod:`.bad_data`, :class:`ImageRoot` in
:mod:`.image_root`, the pixel limit and :func:`open_rgb` in :mod:`.images`.
"""

from __future__ import annotations

import logging
import numbers
import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .bad_data import BadDataError, data_location
from ..model.processor import count_placeholders
from .collate import Record, make_id
from .image_root import (  # noqa: F401 - re-exported: mmeb_eval, the CLI and tests import them from here
    _ALLOW_OUTSIDE,
    ALLOW_OUTSIDE_FLAG,
    ImageRoot,
    allow_outside_default,
    missing_image_hint,
    outside_image_dir_allowed,
)
# re-exported: evaluate imports open_rgb from here, tests MAX_IMAGE_PIXELS
from .images import MAX_IMAGE_PIXELS, ImageTooLarge, image_problem, open_rgb  # noqa: F401
from .mmeb_tables import (  # noqa: F401 - re-exported: mmeb_eval and tests import them from here
    _SHARD_RE,
    MAX_LINE_BYTES,
    MMEB_COLUMNS,
    MMEB_NEG_COLUMNS,
    MMEB_REQUIRED_COLUMNS,
    _discover,
    _load_hub,
    _name_file,
    _read_jsonl,
    _read_parquet,
    _Source,
    data_files,
    data_kind,
    jsonl_lines,
    missing_shards,
    parse_json_line,
    partial_conversions,
)
from ..errors import InvalidArgument

__all__ = ["BadDataError", "ImageRoot", "MMEBDataset", "MMEB_COLUMNS", "MMEB_NEG_COLUMNS", "MMEB_REQUIRED_COLUMNS",
           "outside_image_dir_allowed"]

logger = logging.getLogger(__name__)

_LOG_EACH = 50  # skipped rows logged one by one; past that, a count per reason at the end

IMAGE_HINT = (" (pass bad_images='skip' / --bad-images skip to skip and count such rows; --check-images decodes "
              "every image before training)")
# the hint when every image was decoded before training already (check_images="decode")
IMAGE_HINT_DECODED = " (pass bad_images='skip' / --bad-images skip to skip and count such rows)"


def _decode_share(across_ranks: bool) -> tuple[int, int]:
    """(rank, world) whose share of the images this process decodes: (0, 1) unless asked to
    share and a process group of several ranks is running."""
    if not across_ranks:
        return 0, 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _refuse_merged(picked) -> None:
    """Refuse tables that would be read as one subset but are not one table: a subset and split
    is one file, or the shards of one folder (every hub layout keeps them there) that agree on
    their count; and a subset is not both a one-file table and shards. ``a/MSCOCO.jsonl`` and
    ``b/MSCOCO.jsonl`` were read as one subset MSCOCO: ``max_rows_per_subset`` took its rows
    from the first alone, ``subsets=`` picked both."""
    first: dict[tuple, tuple] = {}
    kinds: dict[str, dict[bool, Path]] = {}
    for f, subset, file_split in picked:
        folder = os.path.dirname(os.path.realpath(f))
        shard = _name_file(f)[2]
        count = None if shard is None or len(shard) < 2 else shard[1]
        a_folder, a_count, a = first.setdefault((subset, file_split), (folder, count, f))
        if a_folder != folder or a_count != count:
            why = "in two folders" if a_folder != folder else f"shards of {a_count} and of {count}"
            raise InvalidArgument(
                f"{a} and {f} would both be read as subset {subset!r} (split {file_split!r}), {why}: two copies "
                f"of one subset, or two subsets named alike, are not merged; name one of them in --data (paths=), "
                f"or rename one")
        kinds.setdefault(subset, {}).setdefault(shard is None, f)
        if len(kinds[subset]) > 1:
            one, shard = kinds[subset][True], kinds[subset][False]
            raise InvalidArgument(
                f"subset {subset!r} is both a one-file table ({one}) and shards ({shard}): two copies of one subset "
                f"are not merged; name one of them in --data (paths=), or rename one")


# ---------------------------------------------------------------- the dataset
class MMEBDataset(torch.utils.data.Dataset):
    """MMEB-train pairs as records (see ``llave_fast.data.collate.Record``).

    Args:
        paths: a data file, a folder (searched recursively for .parquet/.jsonl/.jsonl.gz in any
            case, hidden folders and files left out: :func:`data_files`), a list of these, or a
            hub dataset name such as ``"TIGER-Lab/MMEB-train"`` (needs
            ``datasets`` and the network).
        image_dir: the folder image paths are relative to (MMEB's image root); None means
            each data file's own folder.
        subsets: keep only these subsets (all by default); naming one that is not there
            is an error.
        use_negatives: load the hard negatives (``neg_text``/``neg_image_path``): every
            kept row must have one. Off: records carry ``neg_* = None`` and negative
            images are never opened.
        skip_bad_rows: skip, log and record bad rows instead of raising.
        split: hub-style shard split to keep (``original`` or ``diverse_instruction``);
            None keeps every file (local) or reads ``original`` (hub).
        max_rows_per_subset: keep the first N rows of each subset (VLM2Vec's
            ``num_sample_per_subset``), a positive int; None keeps every row.
        check_images: ``"exists"`` (default: every image path must name a file),
            ``"decode"`` (also open every distinct image now) or ``"none"``.
        allow_extra_columns: ignore columns besides MMEB's instead of raising.
        bad_images: what a missing or unreadable image does, at build time and when a
            record is read: ``"fail"`` (raise ``BadDataError``) or ``"skip"`` (record it in
            ``skipped``, log it, and serve the next good row in its place); None follows
            ``skip_bad_rows``.
        progress: a progress bar over the distinct images when ``check_images="decode"``.
        max_image_pixels: an image with more pixels than this (width x height, read from its
            header before anything is decoded) is a bad image (``bad_images`` decides);
            default :data:`MAX_IMAGE_PIXELS`; 0: no limit of ours (Pillow's own still applies).
        allow_outside_image_dir: read image paths that lead outside the image folder (absolute
            paths elsewhere, ``..``, symbolic links out of it: :class:`ImageRoot`); off, such a
            row is bad (``skip_bad_rows`` decides). None: False, unless inside
            :func:`outside_image_dir_allowed`.
        decode_across_ranks: with ``check_images="decode"`` in a running process group of several
            ranks (``torch.distributed``), each rank decodes a 1/world share of the distinct images
            and the problems are gathered, so every rank drops the same rows (a collective: every
            rank must build the dataset). ``images_decoded_here`` counts this rank's share.

    Ids (``target_id``, ``query_id``, ``neg_id``) name an image by its file: its path joined to
    its image folder and normalised (``./a.png`` and ``a.png`` are one image), relative to the
    folder above every table's image folder (``d1/a.png`` and ``d2/a.png`` are two, also when
    two tables in ``d1`` and ``d2`` both write ``a.png``), so ranks agree on them wherever the
    data lies. ``rows_with_image_dropped`` counts the rows kept with an image on a side whose
    text has no placeholder: LLaVE drops such an image and embeds the text alone (the
    processor's ``image_without_placeholder="drop"``, what training uses).
    """

    def __init__(
        self,
        paths,
        image_dir=None,
        *,
        subsets: Sequence[str] | None = None,
        use_negatives: bool = False,
        skip_bad_rows: bool = False,
        split: str | None = None,
        max_rows_per_subset: int | None = None,
        check_images: str = "exists",
        allow_extra_columns: bool = False,
        bad_images: str | None = None,
        progress: bool = False,
        max_image_pixels: int | None = None,
        allow_outside_image_dir: bool | None = None,
        decode_across_ranks: bool = False,
    ):
        self.allow_outside_image_dir = allow_outside_default(allow_outside_image_dir)
        if max_rows_per_subset is not None:
            if not isinstance(max_rows_per_subset, numbers.Integral) or isinstance(max_rows_per_subset, bool) \
                    or max_rows_per_subset < 1:
                raise InvalidArgument(f"max_rows_per_subset must be a positive int (the first N rows of each subset) "
                                      f"or None (every row), got {max_rows_per_subset!r}")
            max_rows_per_subset = int(max_rows_per_subset)
        max_image_pixels = MAX_IMAGE_PIXELS if max_image_pixels is None else max_image_pixels
        if not isinstance(max_image_pixels, int) or isinstance(max_image_pixels, bool) or max_image_pixels < 0:
            raise InvalidArgument(f"max_image_pixels must be an int >= 0 (0: no limit), got {max_image_pixels!r}")
        self.max_image_pixels = max_image_pixels
        if check_images not in ("none", "exists", "decode"):
            raise InvalidArgument(f"check_images must be 'none', 'exists' or 'decode', got {check_images!r}")
        if bad_images not in (None, "skip", "fail"):
            raise InvalidArgument(f"bad_images must be 'skip', 'fail' or None, got {bad_images!r}")
        if isinstance(subsets, str):
            subsets = [subsets]
        self.image_dir = None if image_dir is None else str(image_dir)
        self.use_negatives = bool(use_negatives)
        self.skip_bad_rows = bool(skip_bad_rows)
        self.skip_bad_images = self.skip_bad_rows if bad_images is None else bad_images == "skip"
        self.check_images = check_images
        self.progress = bool(progress)
        self.decode_across_ranks = bool(decode_across_ranks)
        self.skipped: list[tuple[str, int, str]] = []
        self._bad_positions: set[int] = set()
        self._roots: dict[str, ImageRoot] = {}

        found = _discover(paths)
        if isinstance(found, str):
            self.sources = _load_hub(
                found, subsets, split or "original", allow_extra_columns, max_rows_per_subset, self.image_dir
            )
        else:
            self.sources = self._load_files(found, subsets, split, allow_extra_columns, max_rows_per_subset)
        if not self.sources:
            raise InvalidArgument(f"no MMEB data found in {paths!r} (subsets={subsets}, split={split})")
        if self.use_negatives:
            lacking = [s.name for s in self.sources if not s.has_neg]
            if lacking:
                raise BadDataError(
                    ", ".join(lacking), None, "use_negatives=True but no neg_text/neg_image_path columns", hint=False
                )
        # ids name an image by its path from the folder above every image folder (the class docstring)
        roots = {src.image_root: os.path.abspath(src.image_root) for src in self.sources}
        self._id_base = os.path.commonpath(list(roots.values()))
        rel_of = {root: os.path.relpath(full, self._id_base) for root, full in roots.items()}
        # one real folder named by two paths (one through a link) is one prefix: its images one id each
        canon: dict[str, str] = {}
        for root in sorted(rel_of, key=lambda r: rel_of[r]):
            canon.setdefault(os.path.realpath(root), rel_of[root])
        self._id_roots = {root: canon[os.path.realpath(root)] for root in rel_of}
        self._index_rows()

    # -------------------------------------------------------------- construction
    def _load_files(self, files, subsets, split, allow_extra, max_rows) -> list[_Source]:
        picked, seen, shards = [], set(), {}
        for f in files:
            subset, file_split, shard = _name_file(f)
            if split is not None and file_split is not None and file_split != split:
                continue
            if (subset, os.path.realpath(f)) in seen:  # one file named twice (two spellings, a folder and a file in it)
                continue
            seen.add((subset, os.path.realpath(f)))
            # one shard twice (two copies of a subset, or two subsets given one name), or one folder holding a
            # one-file subset twice (MSCOCO.jsonl beside MSCOCO.jsonl.gz: read twice, silently, before)
            where = (subset, file_split, shard if shard is not None else os.path.dirname(os.path.realpath(f)))
            first = shards.setdefault(where, f)
            if first is not f:
                what = "the same shard of" if shard is not None else "one folder's copies of"
                raise InvalidArgument(
                    f"{first} and {f} are both read as {what} subset {subset!r} (split {file_split!r}): two copies "
                    f"of one subset, or two subsets named alike; name one of them in --data (paths=)")
            picked.append((f, subset, file_split))
        available = sorted({s for _, s, _ in picked})
        if subsets is not None:  # before the checks below: a subset not read is not refused nor warned about
            unknown = [s for s in subsets if s not in available]
            if unknown:
                raise InvalidArgument(f"subset(s) {unknown} not found; available: {available}")
            picked = [(f, s, sp) for f, s, sp in picked if s in set(subsets)]
        _refuse_merged(picked)
        gone = missing_shards(_name_file(f) for f, _, _ in picked)
        if gone:
            logger.warning("%d subset(s) are read without some of their hub shards (a partial download or copy?); "
                           "each is trained on what is there: %s", len(gone), "; ".join(gone[:5])
                           + ("; ..." if len(gone) > 5 else ""))
        partial = partial_conversions(f for f, _, _ in picked)
        if partial:  # as a partial download: trained on what is there, said
            logger.warning("%d subset(s) are read from the hub parquet converter's partial conversion (a "
                           "partial-<split> folder: the converter's branch holds only the first part of a dataset too "
                           "large for it); each is trained on that part: %s", len(partial), "; ".join(partial[:5])
                           + ("; ..." if len(partial) > 5 else ""))
        splits = sorted({sp for _, _, sp in picked if sp is not None})
        if split is None and len(splits) > 1:
            logger.warning("the data holds shards of %d splits (%s) and all are read; LLaVE trains on 'original' "
                           "alone (--mmeb-split original)", len(splits), ", ".join(splits))
        picked = [(f, s) for f, s, _ in picked]
        sources, taken = [], Counter()
        for f, subset in picked:
            left = None if max_rows is None else max_rows - taken[subset]
            if left is not None and left <= 0:
                continue
            reader = _read_parquet if data_kind(f) == "parquet" else _read_jsonl
            src = reader(f, allow_extra, left)
            src.subset = subset
            src.image_root = self.image_dir if self.image_dir is not None else str(f.parent)
            taken[subset] += src.n
            sources.append(src)
        return sources

    def _root(self, src: _Source) -> ImageRoot:
        return self._root_at(src.image_root)

    def _root_at(self, folder: str) -> ImageRoot:
        root = self._roots.get(folder)
        if root is None:
            root = self._roots[folder] = ImageRoot(folder, self.allow_outside_image_dir)
        return root

    def _outside(self, src: _Source, rel: str, column: str) -> str | None:
        """Why the row's image path ``rel`` may not be read (:meth:`ImageRoot.path`), or None;
        remembered while the rows are indexed (targets repeat a lot)."""
        memo = self.__dict__.get("_outside_memo")
        key = (src.image_root, rel, column)
        if memo is not None and key in memo:
            return memo[key]
        why = self._root(src).path(rel, column)[1]
        if memo is not None:
            memo[key] = why
        return why

    def _image_columns(self, src: _Source) -> tuple[str, ...]:
        cols = ("qry_image_path", "pos_image_path")
        return cols + ("neg_image_path",) if self.use_negatives and src.has_neg else cols

    def _row_problem(self, src: _Source, row: int, exists_cache: dict[str, str | None]) -> str | None:
        """Why the row cannot be used, or None; ``self._image_problem_found`` says whether the
        reason is an image (``bad_images`` decides) or the row itself (``skip_bad_rows``), and
        ``self._image_dropped_found`` whether a side's image has no placeholder (LLaVE drops it)."""
        self._image_problem_found = self._image_dropped_found = False
        if row in src.problems:
            return src.problems[row]
        if self.use_negatives and row in src.neg_problems:  # a negative not used is never looked at
            return src.neg_problems[row]
        c = src.cols
        q, qi, p, pi = c["qry"][row], c["qry_image_path"][row], c["pos_text"][row], c["pos_image_path"][row]
        if not q.strip() and not qi:
            return "empty query: qry is empty and qry_image_path is empty"
        if not p.strip() and not pi:
            return "empty target: pos_text is empty and pos_image_path is empty"
        sides = [("qry", q, "qry_image_path", qi), ("pos_text", p, "pos_image_path", pi)]
        if self.use_negatives:
            n, ni = c["neg_text"][row], c["neg_image_path"][row]
            if not n.strip() and not ni:
                return "no hard negative (neg_text and neg_image_path are empty) but use_negatives=True"
            sides.append(("neg_text", n, "neg_image_path", ni))
        for text_col, text, img_col, img in sides:
            # the processor's rule (<image> and every <|image_N|>), here where the row can be named and skipped
            n = count_placeholders(text)
            if n and not img:
                return f"{text_col} has an image placeholder (<image> or <|image_N|>) but {img_col} is empty"
            if n > 1:
                return f"{text_col} has {n} image placeholders, but a side holds one image ({img_col})"
            self._image_dropped_found |= bool(img) and not n
        for img_col in self._image_columns(src):  # before anything looks at the file (ImageRoot)
            rel = c[img_col][row]
            if rel and (why := self._outside(src, rel, img_col)) is not None:
                return why
        if self.check_images != "none":
            for img_col in self._image_columns(src):
                rel = c[img_col][row]
                if not rel:
                    continue
                path = os.path.join(src.image_root, rel)
                # keyed by the file the path reaches (img/./a.png is img/a.png; '..' after a link as the kernel
                # applies it): one check per distinct image (targets repeat a lot), the one the loader opens
                key = self._root_at(src.image_root).real(rel)
                if key not in exists_cache:
                    exists_cache[key] = image_problem(path, decode=self.check_images == "decode",
                                                       max_pixels=self.max_image_pixels)
                if exists_cache[key] is not None:
                    self._image_problem_found = True
                    why = exists_cache[key]
                    hint = self._missing_hint(src, rel) if why == "image file not found" else ""
                    return f"{why}: {path!r} ({img_col}){hint}"
        return None

    def _missing_hint(self, src: _Source, rel: str) -> str:
        """What to try when an image file is not where the row says."""
        hint = missing_image_hint(rel, src.image_root if self.image_dir is None else self.image_dir,
                                  self.image_dir is not None)
        return f"; {hint}" if hint else ""

    def _decode_all(self, exists_cache: dict[str, str | None]) -> None:
        """``check_images="decode"``: open every distinct image once, with a progress bar; with
        ``decode_across_ranks`` in a process group of several ranks, each rank opens its share (the
        distinct images in the order the rows name them, every ``world``-th from its rank) and the
        problems found are exchanged, so every rank knows every image and drops the same rows."""
        paths: dict[str, tuple[int, str]] = {}  # the joined path: where it is first named (source, its path)
        for s, src in enumerate(self.sources):
            for img_col in self._image_columns(src):
                bad = src.problems.keys() | (src.neg_problems.keys() if img_col == "neg_image_path" else set())
                for row, rel in enumerate(src.cols[img_col]):
                    if rel and row not in bad:
                        if self._outside(src, rel, img_col) is None:  # one outside is never opened
                            paths.setdefault(self._root_at(src.image_root).real(rel), (s, rel))
        rank, world = _decode_share(self.decode_across_ranks)
        mine = [p for k, p in enumerate(paths) if k % world == rank]
        from concurrent.futures import ThreadPoolExecutor

        from tqdm.auto import tqdm

        found: dict[str, str | None] = {}
        bar = tqdm(total=len(mine), desc="checking images", unit="image", disable=not self.progress)
        # PIL decodes outside the GIL: a few threads keep the disk and the cores busy
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for path, why in zip(mine, pool.map(lambda p: image_problem(p, True, self.max_image_pixels), mine)):
                found[path] = why
                bar.update(1)
        bar.close()
        self.images_decoded_here = len(mine)
        if world > 1:
            found = self._exchange_problems(paths, found)
        for path in paths:
            exists_cache[path] = found.get(path)
        self.images_checked = len(paths)
        bad = sum(why is not None for why in exists_cache.values())
        logger.info("checked %d distinct images (%d here, of %d ranks): %d unusable", len(paths), len(mine), world, bad)

    @staticmethod
    def _exchange_problems(paths: dict[str, tuple[int, str]], found: dict[str, str | None]) -> dict[str, str | None]:
        """Every rank's problems, on every rank: each sends ``(source index, image path as written,
        problem)`` for its bad images (where its data lies may differ from another rank's) and the
        number of distinct images it found, which must agree (otherwise the ranks read other data)."""
        import torch.distributed as dist

        mine = [(*paths[p], why) for p, why in found.items() if why is not None]
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (len(paths), mine))
        counts = [n for n, _ in gathered]
        if len(set(counts)) > 1:
            raise InvalidArgument(f"check_images='decode' across ranks: the ranks found {counts} distinct images "
                                  "(by rank): they read other data; give every rank the same data")
        where = {key: p for p, key in paths.items()}
        out: dict[str, str | None] = {}
        for rank, (_, problems) in enumerate(gathered):
            for s, rel, why in problems:
                if (s, rel) not in where:  # as many images, other ones: other data
                    raise InvalidArgument(f"check_images='decode' across ranks: rank {rank} checked image {rel!r} "
                                          f"of table {s}, which this rank's data does not name first there: the ranks "
                                          "read other data; give every rank the same data")
                out[where[(s, rel)]] = why
        return out

    def _index_rows(self):
        exists_cache: dict[str, str | None] = {}
        self.images_checked = self.images_decoded_here = None
        self._outside_memo: dict[tuple[str, str, str], str | None] = {}
        try:
            self._index_checked_rows(exists_cache)
        finally:
            del self._outside_memo  # not carried to DataLoader workers

    def _index_checked_rows(self, exists_cache: dict[str, str | None]):
        if self.check_images == "decode":
            self._decode_all(exists_cache)
        src_idx, row_idx = [], []
        reasons: Counter = Counter()
        self.rows_with_image_dropped = 0
        for s, src in enumerate(self.sources):
            for row in range(src.n):
                problem = self._row_problem(src, row, exists_cache)
                if problem is None:
                    src_idx.append(s)
                    row_idx.append(row)
                    self.rows_with_image_dropped += self._image_dropped_found
                    continue
                image = self._image_problem_found
                if not (self.skip_bad_images if image else self.skip_bad_rows):
                    raise BadDataError(src.name, row, problem, src.line(row), hint=self._image_hint() if image else True)
                self._record_skip(src, row, problem, log=len(self.skipped) < _LOG_EACH)
                reasons[problem.split(":")[0]] += 1
        if len(self.skipped) > _LOG_EACH:
            logger.warning(
                "skipped %d bad rows in all (the first %d logged above); by reason: %s",
                len(self.skipped), _LOG_EACH, dict(reasons),
            )
        self._src_idx = np.asarray(src_idx, dtype=np.int32)
        self._row_idx = np.asarray(row_idx, dtype=np.int64)
        if len(self._row_idx) == 0:
            names = ", ".join(src.name for src in self.sources)
            if not self.skipped:
                raise InvalidArgument(f"no rows: {names} {'is' if len(self.sources) == 1 else 'are'} empty")
            raise InvalidArgument(f"no usable rows in {names}: all {len(self.skipped)} rows were bad; by reason: "
                             f"{dict(reasons)} (the first, {self.where(*self.skipped[0][:2])}: {self.skipped[0][2]})")

    def _image_hint(self) -> str:
        return IMAGE_HINT_DECODED if self.check_images == "decode" else IMAGE_HINT

    def where(self, source: str, row: int) -> str:
        """Where row ``row`` (0-based) of the table ``source`` is, as error messages say it
        (:func:`data_location`: ``FILE:LINE`` for jsonl)."""
        src = next((x for x in self.sources if x.name == source), None)
        return data_location(source, row, None if src is None else src.line(row))

    def _record_skip(self, src: _Source, row: int, reason: str, log: bool = True):
        self.skipped.append((src.name, row, reason))
        if log:
            err = BadDataError(src.name, row, reason, src.line(row), hint=False)
            logger.warning("skipping bad row: %s", err)

    # -------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._row_idx)

    def query_has_image(self) -> np.ndarray:
        """(len,) bool: which queries carry an image (a non-empty ``qry_image_path``), read from
        the table without opening any image; what batches grouped by modality need."""
        out = np.zeros(len(self._row_idx), dtype=bool)
        for s, src in enumerate(self.sources):
            mine = self._src_idx == s
            paths = src.cols["qry_image_path"]
            out[mine] = [bool(paths[r]) for r in self._row_idx[mine]]
        return out

    @property
    def subsets(self) -> list[str]:
        return sorted({s.subset for s in self.sources})

    def _load_image(self, src: _Source, row: int, column: str):
        rel = src.cols[column][row]
        if not rel:
            return None
        path, outside = self._root(src).path(rel, column)  # checked when built; a link may have changed since
        if outside is not None:
            raise BadDataError(src.name, row, outside, src.line(row))
        try:
            return open_rgb(path, self.max_image_pixels)  # convert() loads the pixels: decode errors surface here
        except FileNotFoundError as exc:
            raise BadDataError(src.name, row, f"image file not found: {path!r} ({column}){self._missing_hint(src, rel)}",
                               src.line(row), hint=self._image_hint()) from exc
        except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            why = str(exc) or type(exc).__name__
            raise BadDataError(src.name, row, f"unreadable image ({why}): {path!r} ({column})", src.line(row),
                               hint=self._image_hint()) from exc

    def _image_key(self, src: _Source, rel: str) -> str:
        """The image's part of an id ('' for none): the file's real path (symbolic links resolved:
        a file and a link to it are one image) from its image folder's real path, after that
        folder's path from ``self._id_base``; a file outside every image folder (read with
        ``allow_outside_image_dir``) by its real path from the real ``self._id_base``."""
        if not rel:
            return ""
        real = self._root_at(src.image_root).real(rel)
        for folder in (src.image_root, *self._id_roots):  # its own folder first
            inside = self._root_at(folder).real_root
            if real == inside or real.startswith(inside.rstrip(os.sep) + os.sep):
                return os.path.normpath(os.path.join(self._id_roots[folder], os.path.relpath(real, inside)))
        return os.path.relpath(real, os.path.realpath(self._id_base))

    def _record(self, pos: int) -> Record:
        src = self.sources[self._src_idx[pos]]
        row = int(self._row_idx[pos])
        c = src.cols
        qry_image = self._load_image(src, row, "qry_image_path")
        pos_image = self._load_image(src, row, "pos_image_path")
        neg_text = neg_image = neg_id = None
        if self.use_negatives:
            neg_text = c["neg_text"][row]
            neg_image = self._load_image(src, row, "neg_image_path")
            neg_id = make_id(neg_text, self._image_key(src, c["neg_image_path"][row]))
        return {
            "qry": c["qry"][row],
            "qry_image": qry_image,
            "pos_text": c["pos_text"][row],
            "pos_image": pos_image,
            "neg_text": neg_text,
            "neg_image": neg_image,
            "target_id": make_id(c["pos_text"][row], self._image_key(src, c["pos_image_path"][row])),
            "query_id": make_id(c["qry"][row], self._image_key(src, c["qry_image_path"][row])),
            "neg_id": neg_id,
            "subset": src.subset,
            "row": row,
        }

    def __getitem__(self, i: int) -> Record:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for MMEBDataset of length {n}")
        pos = i % n
        for _ in range(n):
            if pos not in self._bad_positions:
                try:
                    return self._record(pos)
                except BadDataError as exc:
                    if not self.skip_bad_images:
                        raise
                    self._bad_positions.add(pos)
                    src = self.sources[self._src_idx[pos]]
                    self._record_skip(src, exc.row, exc.reason)
            pos = (pos + 1) % n  # the next good row stands in for a row found bad only now
        raise InvalidArgument(f"no readable rows left: all {n} rows have unreadable images (see the log)")

    def __repr__(self) -> str:
        return (
            f"MMEBDataset({len(self)} rows, subsets={self.subsets}, use_negatives={self.use_negatives}, "
            f"skipped={len(self.skipped)})"
        )

