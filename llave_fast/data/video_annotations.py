"""Captions of the videos of a text-video retrieval benchmark (MSR-VTT, MSVD), read from the files
LLaVE's and CLIP4Clip's harnesses use: :func:`read_annotations` (CSV, JSON, JSON lines, text, a
captions pickle, CLIP4Clip's MSVD folder) into :class:`VideoAnnotations`, one caption per video
(MSR-VTT 1k-A) or several (MSVD). ``llave-fast eval-video`` (:mod:`llave_fast.eval_video`) reads
them; every bad file or row is a :class:`VideoDataError` naming where and why.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..model.processor import has_placeholder
from ..errors import MissingFile
from .mmeb import BadDataError

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_EXTENSIONS", "VideoDataError", "VideoAnnotations", "read_annotations", "read_video_list"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv")
ID_KEYS = ("video_id", "video", "vid", "clip_name", "video_name")
CAPTION_KEYS = ("sentence", "caption", "captions", "sentences", "text")


class VideoDataError(BadDataError):
    """An annotation file, one of its rows, or a video file that cannot be used: says where and why,
    located as every data error is (``FILE:LINE: reason``, ``FILE: row N: reason`` for a file without
    lines, ``FILE: reason``; see :func:`~llave_fast.data.mmeb.data_location`). ``row`` is given
    1-based here, as the annotation readers count; ``.row`` keeps it 0-based like BadDataError's."""

    def __init__(self, source: str, row: int | None, reason: str, line: int | None = None):
        super().__init__(source, None if row is None else row - 1, reason, line, hint=False)

    def at_line(self, line: int | None) -> "VideoDataError":
        if line is None or self.line is not None:
            return self
        return VideoDataError(self.source, None if self.row is None else self.row + 1, self.reason, line)


@dataclass
class VideoAnnotations:
    """Captions and the videos they describe: ``captions[i]`` describes ``video_ids[caption_to_video[i]]``."""

    source: str
    video_ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_to_video: list[int] = field(default_factory=list)
    layout: str = ""
    splits: dict = field(default_factory=dict)  # split -> videos, where the file says (MSR-VTT's json)
    extensions: dict = field(default_factory=dict)  # video id -> the extension its rows wrote (".mp4"), if any

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    @property
    def multi_caption(self) -> bool:
        return self.num_captions > self.num_videos

    def add(self, video_id: str, caption: str, row: int | None) -> None:
        vid = _clean_id(video_id, self.source, row)
        ext = _written_extension(video_id)
        if ext is not None:
            other = self.extensions.setdefault(vid, ext)
            if other != ext:  # a.mp4 and a.avi: two files, one id once the extensions are taken off
                raise VideoDataError(self.source, row, f"video ids {vid + other!r} and {vid + ext!r} name two files "
                                     f"but one video {vid!r} (ids are matched without their extension); rename one")
        if not isinstance(caption, str) or not caption.strip():
            raise VideoDataError(self.source, row, f"the caption of video {vid!r} is empty or not text: {caption!r}")
        if has_placeholder(caption):  # found here, before any video is decoded, naming the row
            raise VideoDataError(self.source, row, f"the caption of video {vid!r} holds an image placeholder "
                                 f"(<image> or <|image_N|>), but a caption is text alone: {caption[:80]!r}")
        index = self._index.get(vid)
        if index is None:
            index = self._index[vid] = len(self.video_ids)
            self.video_ids.append(vid)
        self.captions.append(caption.strip())
        self.caption_to_video.append(index)

    def __post_init__(self):
        self._index = {v: i for i, v in enumerate(self.video_ids)}

    def select(self, video_ids: Sequence[str], where: str) -> "VideoAnnotations":
        """These videos only, in this order, with all their captions."""
        by_video: dict[str, list[str]] = {}
        for cap, v in zip(self.captions, self.caption_to_video):
            by_video.setdefault(self.video_ids[v], []).append(cap)
        missing = [v for v in video_ids if v not in by_video]
        if missing:
            raise VideoDataError(where, None, f"{len(missing)} of its {len(video_ids)} videos have no caption in "
                               f"{self.source} (first: {', '.join(map(repr, missing[:5]))})")
        out = VideoAnnotations(self.source, layout=self.layout)
        for v in dict.fromkeys(video_ids):
            for cap in by_video[v]:
                out.add(v, cap, None)
        out.extensions = {v: e for v, e in self.extensions.items() if v in out._index}
        return out

    def head(self, num_videos: int) -> "VideoAnnotations":
        """The first ``num_videos`` videos with their captions."""
        return self.select(self.video_ids[:num_videos], self.source) if num_videos < self.num_videos else self


def _written_extension(video_id) -> str | None:
    """The video extension a row wrote on its id (``".mp4"`` of ``"video9770.mp4"``), or None."""
    if not isinstance(video_id, str):
        return None
    ext = os.path.splitext(video_id.strip())[1].lower()
    return ext if ext in VIDEO_EXTENSIONS else None


def _clean_id(video_id, source: str, row: int | None, line: int | None = None) -> str:
    if isinstance(video_id, (int, np.integer)) and not isinstance(video_id, bool):
        video_id = str(video_id)
    if not isinstance(video_id, str) or not video_id.strip():
        raise VideoDataError(source, row, f"the video id is empty or not text: {video_id!r}", line=line)
    vid = video_id.strip()
    stem, ext = os.path.splitext(vid)
    return stem if ext.lower() in VIDEO_EXTENSIONS else vid  # "video9770.mp4" -> "video9770"


def _caption_text(value, source: str, row: int | None) -> list[str]:
    """A caption cell: a string, a list of strings (several captions), or a list of token lists
    (CLIP4Clip's raw-captions.pkl: each caption is its words, joined with spaces)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value:
        out = []
        for c in value:
            if isinstance(c, str):
                out.append(c)
            elif isinstance(c, (list, tuple)) and c and all(isinstance(w, str) for w in c):
                out.append(" ".join(c))
            else:
                raise VideoDataError(source, row, f"a caption must be a string or a list of words, got {c!r}")
        return out
    raise VideoDataError(source, row, f"expected a caption (a string) or a list of captions, got {value!r}")


def _pick(record: dict, keys, what: str, source: str, row: int):
    for k in keys:
        if k in record:
            return record[k]
    raise VideoDataError(source, row, f"expected a {what} field (one of {', '.join(keys)}), got fields "
                       f"{sorted(record)}")


def _read_records(records, ann: VideoAnnotations, lines: list[int] | None = None) -> None:
    """Records of a JSON list or a jsonl file (``lines``: each record's line, for the messages)."""
    for row, rec in enumerate(records, start=1):
        try:
            if not isinstance(rec, dict):
                raise VideoDataError(ann.source, row, f"expected an object with a video id and a caption, got "
                                                      f"{type(rec).__name__}: {str(rec)[:80]}")
            vid = _pick(rec, ID_KEYS, "video id", ann.source, row)
            for cap in _caption_text(_pick(rec, CAPTION_KEYS, "caption", ann.source, row), ann.source, row):
                ann.add(vid, cap, row)
        except VideoDataError as e:
            raise e.at_line(lines[row - 1] if lines else None) from None


def _read_csv(path: str, ann: VideoAnnotations) -> None:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        id_col = next((k for k in ID_KEYS if k in fields), None)
        cap_col = next((k for k in ("sentence", "caption", "text") if k in fields), None)
        if id_col is None or cap_col is None:
            raise VideoDataError(path, None, f"the header row has columns {fields}; expected a video id column "
                               f"({' or '.join(ID_KEYS)}) and a caption column (sentence, caption or text), "
                               "e.g. MSRVTT_JSFUSION_test.csv's key,vid_key,video_id,sentence", line=1)
        for row, rec in enumerate(reader, start=1):
            if rec.get(id_col) is None or rec.get(cap_col) is None:
                raise VideoDataError(path, row, f"has {len([v for v in rec.values() if v is not None])} cells, "
                                   f"expected the {len(fields)} columns of the header {fields}",
                                   line=reader.line_num)
            extra = rec.get(None)  # cells past the header's columns: a caption with unquoted commas, cut silently
            if extra and any(cell.strip() for cell in extra):  # (a trailing comma's empty cell is no caption)
                raise VideoDataError(path, row, f"has {len(fields) + len(extra)} cells, more than the {len(fields)} "
                                   f"columns of the header {fields} (extra: {extra!r}); quote a caption that holds "
                                   'commas ("a square, moving left")', line=reader.line_num)
            try:
                ann.add(rec[id_col], rec[cap_col], row)
            except VideoDataError as e:
                raise e.at_line(reader.line_num) from None


class _KeyTwice(Exception):
    """A JSON object writing one key twice (turned into a VideoDataError naming the file)."""


def _unique_keys(pairs):
    """A JSON object's members, refusing a key written twice (json keeps the last, silently: a video
    id repeated in MSVD-style ``{id: [captions]}`` lost its first captions)."""
    out = {}
    for k, v in pairs:
        if k in out:
            raise _KeyTwice(f"the key {k!r} is written twice in one object (the first one's value would be lost)")
        out[k] = v
    return out


def _read_json(path: str, ann: VideoAnnotations) -> None:
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as e:
            raise VideoDataError(path, None, f"is not valid JSON ({e})") from e
        except _KeyTwice as e:
            raise VideoDataError(path, None, str(e)) from e
    if isinstance(data, dict) and isinstance(data.get("sentences"), list):
        ann.layout = "json: {'sentences': [{'video_id', 'caption'}, ...]} (MSR-VTT videodatainfo)"
        videos = data.get("videos") if isinstance(data.get("videos"), list) else []
        splits = {}
        for v in videos:
            if isinstance(v, dict) and v.get("split") is not None:
                splits[str(v["split"])] = splits.get(str(v["split"]), 0) + 1
        ann.splits = splits
        _read_records(data["sentences"], ann)
    elif isinstance(data, list):
        ann.layout = "json: [{'video_id', 'caption'}, ...]"
        _read_records(data, ann)
    elif isinstance(data, dict):
        ann.layout = "json: {video_id: [caption, ...]}"
        for row, (vid, caps) in enumerate(data.items(), start=1):
            for cap in _caption_text(caps, path, row):
                ann.add(vid, cap, row)
    else:
        raise VideoDataError(path, None, f"expected a JSON object (video id -> captions) or a list of records, got "
                           f"{type(data).__name__}")


def _read_jsonl(path: str, ann: VideoAnnotations) -> None:
    ann.layout = "jsonl: one {'video_id', 'caption'} a line"
    with open(path, encoding="utf-8-sig") as f:
        lines = [(i, ln) for i, ln in enumerate(f, start=1) if ln.strip()]
    records = []
    for row, (line, text) in enumerate(lines, start=1):
        try:
            records.append(json.loads(text.rstrip("\r\n")))  # the newline would move a truncated line's error
        except json.JSONDecodeError as e:
            raise VideoDataError(path, row, f"is not valid JSON ({e})", line=line) from e
    _read_records(records, ann, [line for line, _ in lines])


def _read_txt(path: str, ann: VideoAnnotations) -> None:
    ann.layout = "txt: '<video id> <caption>' a line (MSVD annotations.txt)"
    with open(path, encoding="utf-8-sig") as f:
        row = 0
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            row += 1
            parts = text.strip().split(None, 1)
            if len(parts) != 2:
                raise VideoDataError(path, row, f"expected '<video id> <caption>' (the id, a space, the caption), got "
                                   f"{text.strip()[:80]!r}", line=line)
            try:
                ann.add(parts[0], parts[1], row)
            except VideoDataError as e:
                raise e.at_line(line) from None


class _PlainUnpickler(pickle.Unpickler):
    """Lists, dicts and strings only: a caption pickle never needs a class, so none is loaded."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a captions pickle holds plain data only")


def _read_pickle(path: str, ann: VideoAnnotations) -> None:
    ann.layout = "pkl: {video_id: [[word, ...], ...]} (CLIP4Clip's raw-captions.pkl)"
    with open(path, "rb") as f:
        try:
            data = _PlainUnpickler(f).load()
        except Exception as e:  # noqa: BLE001 - any unpickling failure is bad data, said with its reason
            raise VideoDataError(path, None, f"is not a captions pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise VideoDataError(path, None, f"expected a dict video id -> captions, got {type(data).__name__}")
    for row, (vid, caps) in enumerate(data.items(), start=1):
        for cap in _caption_text(caps, path, row):
            ann.add(vid, cap, row)


def read_video_list(path: str) -> list[str]:
    """One video id a line (MSVD's test_list.txt); blank lines skipped."""
    with open(path, encoding="utf-8-sig") as f:
        lines = [(i, _clean_id(s, path, None, line=i)) for i, s in enumerate(f, start=1) if s.strip()]
    if not lines:
        raise VideoDataError(path, None, "names no video (expected one video id a line)")
    first: dict[str, int] = {}
    for i, vid in lines:
        if vid in first:  # counted twice, a video would weigh twice in every recall: refused, not dropped
            raise VideoDataError(path, None, f"names video {vid!r} twice (lines {first[vid]} and {i})", line=i)
        first[vid] = i
    return [vid for _, vid in lines]


def read_annotations(path: str, video_list: str | None = None) -> VideoAnnotations:
    """Captions and their videos from one annotation file (or CLIP4Clip's MSVD folder).

    Layouts (by extension):

    * ``.csv`` with a header: a video id column (``video_id``) and a caption column
      (``sentence``, ``caption`` or ``text``); MSR-VTT's ``MSRVTT_JSFUSION_test.csv``
      (``key,vid_key,video_id,sentence``).
    * ``.json``: an object video id -> list of captions (MSVD style); a list of records
      ``{"video_id": ..., "caption": ...}`` (the caption may be a list); or MSR-VTT's
      ``{"sentences": [{"video_id", "caption"}, ...]}``. Id keys: video_id, video, vid,
      clip_name, video_name; caption keys: sentence, caption, captions, sentences, text.
    * ``.jsonl``: one record a line, as above.
    * ``.txt``: ``<video id> <caption>`` a line (MSVD's annotations.txt).
    * ``.pkl``: CLIP4Clip's ``raw-captions.pkl`` (video id -> captions as word lists; plain
      data only, no class is unpickled).
    * a folder holding ``raw-captions.pkl`` and ``test_list.txt`` (CLIP4Clip's ``msvd_data``,
      what LLaVE's own command reads): the test videos with their captions.

    A video id with a video extension (``video9770.mp4``) is the file's stem. ``video_list``
    (one id a line) keeps those videos only, in its order. Anything else is a
    :class:`VideoDataError` (a ``BadDataError``) naming the file, the row and what was expected.
    """
    if os.path.isdir(path):
        pkl, lst = os.path.join(path, "raw-captions.pkl"), os.path.join(path, "test_list.txt")
        if not (os.path.isfile(pkl) and os.path.isfile(lst)):
            raise VideoDataError(path, None, "is a folder without CLIP4Clip's MSVD files (expected raw-captions.pkl and "
                               "test_list.txt in it); give an annotation file instead")
        ann = read_annotations(pkl, video_list or lst)
        ann.layout = "folder: raw-captions.pkl + test_list.txt (CLIP4Clip's msvd_data)"
        return ann
    if not os.path.isfile(path):
        raise MissingFile(f"no annotation file {path!r}")
    ext = os.path.splitext(path)[1].lower()
    readers = {".csv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl, ".txt": _read_txt, ".pkl": _read_pickle,
               ".pickle": _read_pickle}
    if ext not in readers:
        raise VideoDataError(path, None, f"has the extension {ext or '(none)'!r}; expected an annotation file .csv, "
                           ".json, .jsonl, .txt or .pkl, or CLIP4Clip's MSVD folder")
    ann = VideoAnnotations(path, layout="csv: video_id + sentence columns" if ext == ".csv" else "")
    try:
        readers[ext](path, ann)
    except UnicodeDecodeError as e:
        raise VideoDataError(path, None, f"is not UTF-8 text ({e})") from e
    if ann.num_captions == 0:
        raise VideoDataError(path, None, "holds no caption")
    if len(ann.splits) > 1 and video_list is None:  # CLIP4Clip's MSRVTT_data.json: every split in one file
        raise VideoDataError(path, None, "holds the videos of several splits (" + ", ".join(
            f"{k} {n}" for k, n in sorted(ann.splits.items())) + "): every split's sentences would be scored; give "
            "--video-list with the ids of the split to evaluate (MSR-VTT's test list), or a file of that split")
    if video_list is not None:
        ann = ann.select(read_video_list(video_list), video_list)
    _say_repeated_captions(ann)
    return ann


def _say_repeated_captions(ann: "VideoAnnotations") -> None:
    """Warn when a video holds one caption twice: each row is a text->video query (as CLIP4Clip counts
    MSR-VTT's and MSVD's repeated captions), so a copied row weighs twice; said, not refused."""
    pairs = list(zip(ann.caption_to_video, ann.captions))
    repeated = len(pairs) - len(set(pairs))
    if repeated:
        seen, first = set(), None
        for v, c in pairs:
            if (v, c) in seen:
                first = (ann.video_ids[v], c)
                break
            seen.add((v, c))
        logger.warning("%s: %d caption row(s) repeat a caption of the same video (each is a query, as in CLIP4Clip's "
                       "protocol; a copied row weighs twice in the text->video recalls); first: video %r, %r",
                       ann.source, repeated, first[0], first[1][:60])
