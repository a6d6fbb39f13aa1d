"""``llave-fast eval-video``: zero-shot text-video retrieval (MSR-VTT, MSVD), as LLaVE evaluates it.

LLaVE (trained on images and texts only) reports zero-shot text-video retrieval with its
``CLIP4Clip/main_task_retrieval.py``. This module does the same with a saved model:

* Frames: :func:`sample_frame_indices` (LLaVE's rule: every ``round(native_fps / fps)``-th
  frame, 3 fps by default; more than ``max_frames`` (32) of those -> ``max_frames`` indices
  spread evenly over the whole clip), decoded with PyAV (:func:`decode_video`, the optional
  ``video`` extra).
* Videos and captions are embedded as :mod:`llave_fast.model.video` describes (per-frame
  vision tower and projector, 2x2 bilinear pooling, ``image_newline`` after every row, the
  prompt ``<image>\\nRepresent the given video.``; captions ``Find me an video that matches
  the given caption: ...``), then every caption is scored against every video (cosine).
* Annotations: :func:`read_annotations` (CSV, JSON, JSON lines, text, and CLIP4Clip's MSVD
  folder); one caption per video (MSR-VTT 1k-A) or several (MSVD).
* Metrics: :func:`retrieval_metrics`, both directions, CLIP4Clip's protocol.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .data.mmeb import BadDataError
from .errors import InvalidArgument, MissingDependency

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoDataError",
    "VideoAnnotations",
    "sample_frame_indices",
    "decode_video",
    "read_annotations",
    "find_videos",
    "retrieval_metrics",
    "format_metrics_table",
    "eval_video",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ogv")
ID_KEYS = ("video_id", "video", "vid", "clip_name", "video_name")
CAPTION_KEYS = ("sentence", "caption", "captions", "sentences", "text")
RESULT_FILE = "video_eval.json"
AV_HINT = 'decoding videos needs PyAV: pip install "llave-fast[video]" (or pip install av)'


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


# --------------------------------------------------------------------------------------------
# frames
# --------------------------------------------------------------------------------------------


def sample_frame_indices(num_frames: int, native_fps: float, fps: float = 3, max_frames: int = 32) -> list[int]:
    """Which decoded frames of a clip LLaVE's video harness keeps (its ``process_video_with_decord``).

    Every ``round(native_fps / fps)``-th frame from frame 0 (Python's ``round``, halves to even;
    at least 1: LLaVE's own code fails with a step of 0 for clips under 1.5 x ``fps``); when that
    gives more than ``max_frames`` frames, ``max_frames`` indices spread evenly over the whole
    clip instead, ``numpy.linspace(0, num_frames - 1, max_frames)`` floored. E.g. 300 frames
    at 30 fps: every 10th, 30 frames; 450 frames at 30 fps: 45 > 32, so 32 frames 0, 14, 28, ..., 449.
    """
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise InvalidArgument(f"num_frames must be a positive int, got {num_frames!r}")
    if not isinstance(max_frames, (int, np.integer)) or isinstance(max_frames, bool) or max_frames < 1:
        raise InvalidArgument(f"max_frames must be a positive int, got {max_frames!r}")
    for name, v in (("native_fps", native_fps), ("fps", fps)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not v > 0 \
                or not np.isfinite(v):
            raise InvalidArgument(f"{name} must be a positive number, got {v!r}")
    step = max(1, round(float(native_fps) / float(fps)))
    idx = list(range(0, int(num_frames), step))
    if len(idx) > max_frames:
        idx = np.linspace(0, int(num_frames) - 1, int(max_frames), dtype=int).tolist()
    return [int(i) for i in idx]


def _require_av():
    try:
        import av
    except ImportError as e:
        raise MissingDependency(f"{AV_HINT} ({e})") from e
    return av


def _native_fps(stream) -> float | None:
    for rate in (getattr(stream, "average_rate", None), getattr(stream, "guessed_rate", None),
                 getattr(stream, "base_rate", None)):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return None


def _decode_indices(av, path: str, indices: set[int]) -> tuple[dict[int, np.ndarray], int, float | None]:
    """Decode every frame of the first video stream; keep the RGB arrays at ``indices``."""
    kept: dict[int, np.ndarray] = {}
    n = 0
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoDataError(path, None, "has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _native_fps(stream)
        for frame in container.decode(stream):
            if n in indices:
                kept[n] = frame.to_ndarray(format="rgb24")
            n += 1
    return kept, n, fps


def _frame_count(av, path: str) -> tuple[int, float | None]:
    """The stream's frame count from the container (its index), else by demuxing (no decoding)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoDataError(path, None, "has no video stream")
        stream = container.streams.video[0]
        fps = _native_fps(stream)
        n = int(stream.frames or 0)
        if n <= 0:
            n = sum(1 for p in container.demux(stream) if p.size)
    return n, fps


def decode_video(path: str, fps: float = 3, max_frames: int = 32) -> tuple[np.ndarray, dict]:
    """The frames LLaVE's harness takes from a video file, as a uint8 (F, H, W, 3) RGB array, and
    ``{"num_frames", "native_fps", "indices"}``.

    Indices come from :func:`sample_frame_indices` over the decoded frames. The frame count is
    read from the container first; when decoding finds another count, the indices are
    recomputed from the true count and the clip decoded again. Raises ImportError without
    PyAV and :class:`VideoDataError` (a ``BadDataError``) naming the file when it cannot be decoded.
    """
    sample_frame_indices(1, 1.0, fps, max_frames)  # check the arguments before blaming the file
    av = _require_av()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no video file {path!r}")
    errors = (av.error.FFmpegError, OSError, ValueError, RuntimeError, UnicodeDecodeError)
    try:
        n, native = _frame_count(av, path)
        if native is None:
            raise VideoDataError(path, None, "has no frame rate in its video stream")
        for _ in range(2):
            if n < 1:
                break
            idx = sample_frame_indices(n, native, fps, max_frames)
            kept, decoded, native = _decode_indices(av, path, set(idx))
            if decoded == n:
                return np.stack([kept[i] for i in idx]), {"num_frames": n, "native_fps": native, "indices": idx}
            n = decoded  # the container's count was off: sample again from the decoded count
    except VideoDataError:
        raise
    except errors as e:
        raise VideoDataError(path, None, f"cannot be decoded as a video ({type(e).__name__}: {e})") from e
    raise VideoDataError(path, None, f"cannot be decoded as a video ({n} frames decoded)")


# --------------------------------------------------------------------------------------------
# annotations
# --------------------------------------------------------------------------------------------


@dataclass
class VideoAnnotations:
    """Captions and the videos they describe: ``captions[i]`` describes ``video_ids[caption_to_video[i]]``."""

    source: str
    video_ids: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_to_video: list[int] = field(default_factory=list)
    layout: str = ""

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
        if not isinstance(caption, str) or not caption.strip():
            raise VideoDataError(self.source, row, f"the caption of video {vid!r} is empty or not text: {caption!r}")
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
        return out

    def head(self, num_videos: int) -> "VideoAnnotations":
        """The first ``num_videos`` videos with their captions."""
        return self.select(self.video_ids[:num_videos], self.source) if num_videos < self.num_videos else self


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
            try:
                ann.add(rec[id_col], rec[cap_col], row)
            except VideoDataError as e:
                raise e.at_line(reader.line_num) from None


def _read_json(path: str, ann: VideoAnnotations) -> None:
    with open(path, encoding="utf-8-sig") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise VideoDataError(path, None, f"is not valid JSON ({e})") from e
    if isinstance(data, dict) and isinstance(data.get("sentences"), list):
        ann.layout = "json: {'sentences': [{'video_id', 'caption'}, ...]} (MSR-VTT videodatainfo)"
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
        ids = [_clean_id(s, path, None, line=i) for i, s in enumerate(f, start=1) if s.strip()]
    if not ids:
        raise VideoDataError(path, None, "names no video (expected one video id a line)")
    return ids


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
        raise FileNotFoundError(f"no annotation file {path!r}")
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
    if video_list is not None:
        ann = ann.select(read_video_list(video_list), video_list)
    return ann


def find_videos(video_ids: Sequence[str], videos_dir: str) -> list[str]:
    """The file of every video id: ``videos_dir/<id>.<ext>`` for a video extension (mp4, avi, ...),
    also in sub-folders (as LLaVE's MSVD reader walks the folder). Missing files are one error
    that counts them and names the first few."""
    if not os.path.isdir(videos_dir):
        raise NotADirectoryError(f"--videos {videos_dir!r} is not a folder")
    found: dict[str, str] = {}
    for root, dirs, files in os.walk(videos_dir):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS:
                # a file at the top of the folder wins over one in a sub-folder; the first extension in sort order
                found.setdefault(stem, os.path.join(root, name))
    missing = [v for v in video_ids if v not in found]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(video_ids)} videos have no file in {videos_dir!r} (looked for <id> with any of "
            f"{', '.join(VIDEO_EXTENSIONS)}, sub-folders included); first missing: "
            f"{', '.join(repr(v) for v in missing[:5])}")
    return [found[v] for v in video_ids]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _summary(ranks: np.ndarray) -> dict:
    return {
        "R@1": float(100.0 * np.mean(ranks <= 1)),
        "R@5": float(100.0 * np.mean(ranks <= 5)),
        "R@10": float(100.0 * np.mean(ranks <= 10)),
        "median_rank": float(np.median(ranks)),
        "mean_rank": float(np.mean(ranks)),
        "num_queries": int(ranks.size),
    }


def retrieval_metrics(sim, caption_to_video) -> dict:
    """Text->video and video->text recall of a (captions x videos) similarity matrix.

    ``caption_to_video[i]``: the video caption ``i`` describes; every video needs at least one
    caption. CLIP4Clip's protocol, which LLaVE's evaluation uses:

    * t2v: each caption is a query over all videos; its rank is its own video's.
    * v2t: each video is a query over the videos' caption sets; a caption set scores as its
      best caption (the max similarity over the set), and the rank is the own set's. With one
      caption per video this is the transpose of t2v.

    Ranks are 1-based; R@k is the percentage of queries with rank <= k; the median is numpy's
    (the mean of the two middle ranks for an even count). Ties count against the query: the
    rank is 1 + the number of *other* candidates scoring at least as high as the right one
    (deterministic, whatever the order; a model that scores everything alike gets the worst
    rank, not the best). NaN scores are refused.
    """
    s = sim.detach().float().cpu().numpy() if isinstance(sim, torch.Tensor) else np.asarray(sim, dtype=np.float64)
    s = s.astype(np.float64, copy=False)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise InvalidArgument(f"sim must be a non-empty (captions, videos) matrix, got shape {s.shape}")
    c2v = np.asarray(caption_to_video)
    C, V = s.shape
    if c2v.shape != (C,) or not np.issubdtype(c2v.dtype, np.integer):
        raise InvalidArgument(f"caption_to_video must hold one int per caption ({C}), got {c2v.dtype} {c2v.shape}")
    if C and (c2v.min() < 0 or c2v.max() >= V):
        raise InvalidArgument(f"caption_to_video values must be video indices in [0, {V}), got {c2v.min()}..{c2v.max()}")
    counts = np.bincount(c2v, minlength=V)
    if (counts == 0).any():
        raise InvalidArgument(f"videos {np.flatnonzero(counts == 0)[:5].tolist()} have no caption "
                         "(every video needs at least one)")
    if np.isnan(s).any():
        raise InvalidArgument(f"sim has {int(np.isnan(s).sum())} NaN scores")
    # text -> video: rank = number of videos scoring at least the right one's score (itself included)
    right = s[np.arange(C), c2v]
    t2v = (s >= right[:, None]).sum(axis=1)
    # video -> text: caption set g scores max over its captions; rank among the V sets
    best = np.full((V, V), -np.inf)  # best[g, v]: the best score of set g's captions for video v
    np.maximum.at(best, c2v, s)
    by_video = best.T  # (videos, caption sets)
    own = np.diagonal(by_video)
    v2t = (by_video >= own[:, None]).sum(axis=1)
    return {"t2v": _summary(t2v), "v2t": _summary(v2t)}


def format_metrics_table(metrics: dict) -> str:
    """The two directions as an aligned text table (recalls in %, ranks 1-based)."""
    head = f"{'direction':<14}{'R@1 %':>8}{'R@5 %':>8}{'R@10 %':>8}{'MdR':>8}{'MnR':>9}{'queries':>9}"
    lines = [head, "-" * len(head)]
    for key, name in (("t2v", "text->video"), ("v2t", "video->text")):
        m = metrics[key]
        lines.append(f"{name:<14}{m['R@1']:>8.1f}{m['R@5']:>8.1f}{m['R@10']:>8.1f}{m['median_rank']:>8.1f}"
                     f"{m['mean_rank']:>9.1f}{m['num_queries']:>9d}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


def _load_model(model_path: str, dev: torch.device, dt: torch.dtype, *, max_text_tokens=None,
                autocast: torch.dtype | None = None):
    """(the model under LLaVE's protocol, {"checkpoint": tag for a run folder, and the protocol's
    settings}): see :func:`llave_fast.evaluate.load_eval_model`."""
    from .evaluate import load_eval_model

    return load_eval_model(model_path, dev, dt, max_text_tokens=max_text_tokens, autocast=autocast)


def _prepare(processor, path: str, fps: float, max_frames: int):
    from .model.video import frames_to_pixels

    frames, info = decode_video(path, fps=fps, max_frames=max_frames)
    return frames_to_pixels(processor, frames), info


@torch.no_grad()
def encode_videos(model, paths: Sequence[str], *, fps: float = 3, max_frames: int = 32, batch: int = 8,
                  max_length: int = 8192, workers: int = 2, progress: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """(V, d) embeddings of video files and each one's decode info; decoding runs ``workers``
    threads ahead of the model, at most two batches ahead (bounded memory)."""
    from tqdm import tqdm

    from .model.video import embed_video_batch, video_batch

    processor = model.processor
    out, infos = [], []
    chunks = [list(paths[i: i + batch]) for i in range(0, len(paths), batch)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(paths), desc="videos", unit="video", disable=not progress, file=sys.stderr) as bar:
        pending = [[pool.submit(_prepare, processor, p, fps, max_frames) for p in c] for c in chunks[:2]]
        try:
            for k in range(len(chunks)):
                done = [f.result() for f in pending.pop(0)]
                if k + 2 < len(chunks):
                    pending.append([pool.submit(_prepare, processor, p, fps, max_frames) for p in chunks[k + 2]])
                pixels = [d[0] for d in done]
                infos += [d[1] for d in done]
                out.append(embed_video_batch(model, video_batch(processor, pixels, max_length=max_length)).cpu())
                bar.update(len(done))
        except BaseException:
            for f in (f for c in pending for f in c):  # a bad video stops the run: no decoding after it
                f.cancel()
            raise
    return torch.cat(out), infos


@torch.no_grad()
def encode_captions(model, captions: Sequence[str], *, batch: int = 8, progress: bool = True) -> torch.Tensor:
    """(C, d) embeddings of captions with LLaVE's text prompt (``Find me an video ...``)."""
    from tqdm import tqdm

    from .model.video import CAPTION_PROMPT

    texts = [CAPTION_PROMPT + c for c in captions]
    out = []
    for i in tqdm(range(0, len(texts), batch), desc="captions", unit="batch", disable=not progress, file=sys.stderr):
        out.append(model.encode(texts[i: i + batch], batch_size=batch).cpu())
    return torch.cat(out)


def eval_video(model_path: str, videos_dir: str, annotations: str, output_dir: str, *, max_frames: int = 32,
               fps: float = 3, batch: int = 8, device: str = "auto", dtype: str = "auto", max_length: int = 8192,
               video_list: str | None = None, limit: int | None = None, workers: int = 2,
               progress: bool = True, max_text_tokens=None) -> dict:
    """Zero-shot text-video retrieval of a saved model; writes ``output_dir/video_eval.json``.

    Refuses (before decoding anything) a ``max_frames`` whose tokens, with the prompt's, exceed
    ``max_length`` (default 8192, LLaVE's video setting) or the language model's
    ``max_position_embeddings``, and a model whose config asks for a video layout other than
    LLaVE's (:func:`~llave_fast.model.video.check_video_config`). Captions are cut only as LLaVE
    cuts them unless ``max_text_tokens`` asks ("saved" or a number), and ``dtype="llave"`` is
    LLaVE's precision (:func:`llave_fast.evaluate.apply_eval_protocol`, :func:`~llave_fast.evaluate.eval_precision`).
    """
    from .evaluate import check_max_text_tokens, eval_autocast, eval_precision, precision_label
    from .model.video import (check_video_config, check_video_length, count_video_tokens, tokens_per_frame,
                              video_length_limit)

    for name, v in (("max_frames", max_frames), ("batch", batch), ("max_length", max_length), ("workers", workers)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidArgument(f"{name} must be a positive int, got {v!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InvalidArgument(f"limit must be a positive int or None, got {limit!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise InvalidArgument(f"fps must be a positive number, got {fps!r}")
    dev, dt = eval_precision(device, dtype)
    check_max_text_tokens(max_text_tokens)
    _require_av()
    ann = read_annotations(annotations, video_list)
    if limit is not None:
        ann = ann.head(limit)
    paths = find_videos(ann.video_ids, videos_dir)

    model, extra = _load_model(model_path, dev, dt, max_text_tokens=max_text_tokens, autocast=eval_autocast(dtype))
    check_video_config(model.config)  # before any video is decoded
    proc = model.processor
    limit_len = video_length_limit(model.config, max_length)
    longest = check_video_length(proc, max_frames, limit_len)

    t0 = time.perf_counter()
    v_emb, infos = encode_videos(model, paths, fps=fps, max_frames=max_frames, batch=batch, max_length=limit_len,
                                 workers=workers, progress=progress)
    t1 = time.perf_counter()
    c_emb = encode_captions(model, ann.captions, batch=batch, progress=progress)
    t2 = time.perf_counter()
    metrics = retrieval_metrics(c_emb @ v_emb.t(), ann.caption_to_video)
    frames = [len(i["indices"]) for i in infos]
    result = {
        **metrics,
        "num_videos": ann.num_videos,
        "num_captions": ann.num_captions,
        "model": model_path,
        "device": str(dev),
        "dtype": precision_label(dt, dtype),
        **extra,
        "annotations": annotations,
        "annotation_layout": ann.layout,
        "videos": videos_dir,
        "protocol": ("t2v: each caption against every video; v2t: each video against every video's caption set, a "
                     "set scoring as its best caption (CLIP4Clip's, LLaVE's); ranks 1-based, ties counted against "
                     "the query; R@k in %"),
        "frames": {"fps": fps, "max_frames": max_frames, "mean_frames": float(np.mean(frames)),
                   "min_frames": int(min(frames)), "max_frames_used": int(max(frames)),
                   "tokens_per_frame": tokens_per_frame(proc.image_size, proc.patch_size),
                   "max_video_tokens": count_video_tokens(max_frames, image_size=proc.image_size,
                                                          patch_size=proc.patch_size),
                   "max_sequence_length": longest, "max_length": limit_len},
        "seconds": {"videos": round(t1 - t0, 3), "captions": round(t2 - t1, 3)},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(output_dir, exist_ok=True)
    from .checkpoint import write_atomic  # whole or not at all: a rerun's failed write keeps the earlier result

    write_atomic(os.path.join(output_dir, RESULT_FILE), json.dumps(result, indent=2))
    return result
