"""``llave-fast eval-video``: zero-shot text-video retrieval (MSR-VTT, MSVD), as LLaVE evaluates it.

LLaVE (trained on images and texts only) reports zero-shot text-video retrieval with its
``CLIP4Clip/main_task_retrieval.py``. This module does the same with a saved model:

* Frames: :func:`sample_frame_indices` (LLaVE's rule: every ``round(native_fps / fps)``-th
  frame, 3 fps by default; more than ``max_frames`` (32) of those -> ``max_frames`` indices
  spread evenly over the whole clip), decoded with PyAV (:func:`decode_video`, the optional
  ``video`` extra). Every frame is decoded (LLaVE samples from the true frame count); each
  sampled one becomes the model's pixels as soon as it is decoded, so a decoding thread holds one
  full-size frame, not 32. A phone video's display rotation (its container's display matrix) is
  applied as LLaVE's decord applies it: turned upright when it is 90, 180 or 270 degrees, flips
  ignored, other angles left as stored; ``video_eval.json``'s ``per_video`` records each rotation.
* Videos and captions are embedded as :mod:`llave_fast.model.video` describes (per-frame
  vision tower and projector, 2x2 bilinear pooling, ``image_newline`` after every row, the
  prompt ``<image>\\nRepresent the given video.``; captions ``Find me an video that matches
  the given caption: ...``), then every caption is scored against every video (cosine).
* Annotations: :func:`~llave_fast.data.video_annotations.read_annotations` (CSV, JSON, JSON
  lines, text, and CLIP4Clip's MSVD folder; re-exported here); one caption per video (MSR-VTT
  1k-A) or several (MSVD). Video files: :func:`find_videos`.
* Metrics: :func:`retrieval_metrics`, both directions, CLIP4Clip's protocol.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from .data.video_annotations import (  # noqa: F401 - re-exported: the readers' public names
    VIDEO_EXTENSIONS,
    VideoAnnotations,
    VideoDataError,
    read_annotations,
    read_video_list,
)
from .errors import InvalidArgument, MissingDependency, MissingFile, NotAFolder

logger = logging.getLogger(__name__)

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoDataError",
    "VideoAnnotations",
    "sample_frame_indices",
    "decode_video",
    "read_annotations",
    "read_video_list",
    "find_videos",
    "retrieval_metrics",
    "format_metrics_table",
    "encode_videos",
    "encode_captions",
    "eval_video",
]

RESULT_FILE = "video_eval.json"
AV_HINT = 'decoding videos needs PyAV: pip install "llave-fast[video]" (or pip install av)'


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


class _Stopped(Exception):
    """A decode given up because the run it decodes for has stopped (:func:`encode_videos`'s stop event)."""


def _turns(frame) -> int | None:
    """Degrees clockwise the frame is to be turned to be shown upright, as decord reads its stream's display
    matrix (phone videos are stored sideways with one): ``-av_display_rotation_get``, truncated to an int,
    in [0, 360); None when this PyAV cannot read it (no ``VideoFrame.rotation``)."""
    ccw = getattr(frame, "rotation", None)  # av_display_rotation_get, truncated; 0 without a display matrix
    return None if ccw is None else (-int(ccw)) % 360


def _decode_indices(av, path: str, indices: Sequence[int], keep=None, stop=None) -> tuple[list, int, float | None,
                                                                                           int | None]:
    """Decode every frame of the first video stream; ``keep(rgb)`` (default: the array itself) of the RGB array
    of each frame at ``indices``, in their order, made as soon as the frame is decoded: only what ``keep``
    returns is held. The frames are turned upright as decord turns them: by the first frame's display
    rotation (:func:`_turns`) when it is 90, 180 or 270 degrees; another angle is left as stored, as decord
    leaves it. ``stop`` (a threading.Event), checked every frame, gives up the decode (:class:`_Stopped`).
    Returns the kept items, the frames decoded, the frame rate and the rotation."""
    where: dict[int, list[int]] = {}
    for j, i in enumerate(indices):
        where.setdefault(i, []).append(j)
    kept: list = [None] * len(indices)
    n, size, turns = 0, None, 0
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoDataError(path, None, "has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _native_fps(stream)
        for frame in container.decode(stream):
            if stop is not None and stop.is_set():
                raise _Stopped(path)
            if n == 0:
                turns = _turns(frame)
            if n in where:
                rgb = frame.to_ndarray(format="rgb24")
                if size is None:
                    size = rgb.shape
                elif rgb.shape != size:  # the frames were stacked into one array: this was refused before too
                    raise VideoDataError(path, None, f"changes its frame size from {size[1]}x{size[0]} to "
                                         f"{rgb.shape[1]}x{rgb.shape[0]} at frame {n}")
                if turns in (90, 180, 270):
                    rgb = np.ascontiguousarray(np.rot90(rgb, -(turns // 90)))  # rot90 turns counter-clockwise
                item = rgb if keep is None else keep(rgb)
                del rgb  # the full-size frame is not held past its item
                for j in where[n]:
                    kept[j] = item
            n += 1
    return kept, n, fps, turns


def _frame_count(av, path: str, stop=None) -> tuple[int, float | None, int | None]:
    """The stream's frame count from the container (its index), else by demuxing (no decoding), its
    frame rate, and the frames its stated duration holds (None: no duration stated)."""
    with av.open(path) as container:
        if not container.streams.video:
            raise VideoDataError(path, None, "has no video stream")
        stream = container.streams.video[0]
        fps = _native_fps(stream)
        seconds = None
        if stream.duration and stream.time_base:
            seconds = float(stream.duration * stream.time_base)
        elif container.duration:
            seconds = container.duration / 1e6
        n = int(stream.frames or 0)
        if n <= 0:
            for packet in container.demux(stream):
                if stop is not None and stop.is_set():
                    raise _Stopped(path)
                n += 1 if packet.size else 0
    return n, fps, (round(seconds * fps) if seconds and fps else None)


def _decode(path: str, fps: float, max_frames: int, keep=None, stop=None) -> tuple[list, dict]:
    """:func:`decode_video`'s work: ``keep`` of each sampled frame (:func:`_decode_indices`) and the info."""
    sample_frame_indices(1, 1.0, fps, max_frames)  # check the arguments before blaming the file
    av = _require_av()
    if not os.path.isfile(path):
        raise MissingFile(f"no video file {path!r}")
    errors = (av.error.FFmpegError, OSError, ValueError, RuntimeError, UnicodeDecodeError)
    try:
        n, native, stated = _frame_count(av, path, stop)
        if native is None:
            raise VideoDataError(path, None, "has no frame rate in its video stream")
        for _ in range(2):
            if n < 1:
                break
            idx = sample_frame_indices(n, native, fps, max_frames)
            kept, decoded, native, turns = _decode_indices(av, path, idx, keep, stop)
            if decoded == n:
                return kept, {"num_frames": n, "native_fps": native, "indices": idx, "stated_frames": stated,
                              "rotation": turns}
            del kept  # not held through the second pass
            n = decoded  # the container's count was off: sample again from the decoded count
    except (VideoDataError, _Stopped):
        raise
    except errors as e:
        raise VideoDataError(path, None, f"cannot be decoded as a video ({type(e).__name__}: {e})") from e
    raise VideoDataError(path, None, f"cannot be decoded as a video ({n} frames decoded)")


def decode_video(path: str, fps: float = 3, max_frames: int = 32) -> tuple[np.ndarray, dict]:
    """The frames LLaVE's harness takes from a video file, as a uint8 (F, H, W, 3) RGB array, and
    ``{"num_frames", "native_fps", "indices", "stated_frames", "rotation"}``.

    Indices come from :func:`sample_frame_indices` over the decoded frames. The frame count is
    read from the container first; when decoding finds another count, the indices are
    recomputed from the true count and the clip decoded again. A video whose container says to show it
    turned (``rotation``: degrees clockwise, a phone video's display matrix) is turned upright when that
    is 90, 180 or 270 degrees, as LLaVE's decord turns it. Raises ImportError without PyAV and
    :class:`VideoDataError` (a ``BadDataError``) naming the file when it cannot be decoded.
    """
    frames, info = _decode(path, fps, max_frames)
    return np.stack(frames), info


def check_video_files(paths: Sequence[str]) -> None:
    """Open every video's container before any video is encoded (milliseconds each, nothing decoded):
    a file that is no video, has no video stream or no frame rate is found now, all of them in one
    error, instead of stopping the run when its turn comes, hours of encoding later."""
    av = _require_av()
    errors = (av.error.FFmpegError, OSError, ValueError, RuntimeError, UnicodeDecodeError)
    bad = []  # (path, reason)
    for path in paths:
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    bad.append((path, "has no video stream"))
                elif _native_fps(container.streams.video[0]) is None:
                    bad.append((path, "has no frame rate in its video stream"))
        except errors as e:
            why = getattr(e, "strerror", None) or str(e)  # FFmpeg's errors repeat the path in str()
            bad.append((path, f"cannot be opened as a video ({type(e).__name__}: {why})"))
    if bad:
        others = "".join(f"; {p}: {why}" for p, why in bad[1:5]) + ("; ..." if len(bad) > 5 else "")
        count = "" if len(bad) == 1 else f" ({len(bad)} of the {len(paths)} videos cannot be used{others})"
        raise VideoDataError(bad[0][0], None, bad[0][1] + count)


def find_videos(video_ids: Sequence[str], videos_dir: str, extensions: dict | None = None) -> list[str]:
    """The file of every video id: ``videos_dir/<id>.<ext>`` for a video extension (mp4, avi, ...),
    also in sub-folders (as LLaVE's MSVD reader walks the folder); the extension an annotation
    wrote on the id (``extensions``: id -> ".mp4") is taken where such a file exists. Missing
    files are one error that counts them and names the first few."""
    if not os.path.isdir(videos_dir):
        raise NotAFolder(f"--videos {videos_dir!r} is not a folder")
    found: dict[str, str] = {}
    written: dict[str, str] = {}
    extensions = extensions or {}
    seen_dirs = set()
    for root, dirs, files in os.walk(videos_dir, followlinks=True):  # linked dataset parts are searched too
        real = os.path.realpath(root)
        if real in seen_dirs:  # a link back up the tree (or two links to one folder): once
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS:
                # a file at the top of the folder wins over one in a sub-folder; the first extension in sort order
                found.setdefault(stem, os.path.join(root, name))
                if extensions.get(stem) == ext.lower():
                    written.setdefault(stem, os.path.join(root, name))
    found.update(written)
    missing = [v for v in video_ids if v not in found]
    if missing:
        raise MissingFile(
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


def _prepare(processor, path: str, fps: float, max_frames: int, stop=None):
    """One video's (F, 3, S, S) pixels and decode info: each sampled frame becomes its pixels as soon as it is
    decoded (the pixels ``frames_to_pixels`` makes of the whole clip, bit for bit), so a worker holds one
    full-size frame at a time instead of all of them (32 4K frames: 0.8 GB)."""
    from .model.video import frames_to_pixels

    pixels, info = _decode(path, fps, max_frames, keep=lambda rgb: frames_to_pixels(processor, [rgb])[0], stop=stop)
    return torch.stack(pixels), info


@torch.no_grad()
def encode_videos(model, paths: Sequence[str], *, fps: float = 3, max_frames: int = 32, batch: int = 8,
                  max_length: int = 8192, workers: int = 2, progress: bool = True) -> tuple[torch.Tensor, list[dict]]:
    """(V, d) embeddings of video files and each one's decode info; decoding runs ``workers``
    threads ahead of the model, at most two batches ahead (bounded memory). When anything stops it (a bad
    video, Ctrl-C), the decodes still running give up within a frame instead of reading their clips to the end."""
    from tqdm import tqdm

    from .model.video import embed_video_batch, video_batch

    processor = model.processor
    stop = threading.Event()  # set when the run stops: the decodes under way give up (checked every frame)
    out, infos = [], []
    chunks = [list(paths[i: i + batch]) for i in range(0, len(paths), batch)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, \
            tqdm(total=len(paths), desc="videos", unit="video", disable=not progress, file=sys.stderr) as bar:
        pending = [[pool.submit(_prepare, processor, p, fps, max_frames, stop) for p in c] for c in chunks[:2]]
        try:
            for k in range(len(chunks)):
                done = [f.result() for f in pending.pop(0)]
                if k + 2 < len(chunks):
                    pending.append([pool.submit(_prepare, processor, p, fps, max_frames, stop) for p in chunks[k + 2]])
                pixels = [d[0] for d in done]
                infos += [d[1] for d in done]
                out.append(embed_video_batch(model, video_batch(processor, pixels, max_length=max_length)).cpu())
                bar.update(len(done))
        except BaseException:
            stop.set()  # the pool's exit waits for the running decodes: they stop at their next frame
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


def _say_rotations(per_video: list[dict]) -> None:
    """Say how many videos were turned upright (their display rotation, as LLaVE's decord turns them), and
    warn about those left as stored: an angle decord does not turn either, or a PyAV that cannot read it."""
    turned = [r for r in per_video if r["rotation"] in (90, 180, 270)]
    odd = [r for r in per_video if r["rotation"] not in (None, 0, 90, 180, 270)]
    unread = [r for r in per_video if r["rotation"] is None]
    if turned:
        logger.info("%d of %d videos carry a display rotation (phone videos) and were turned upright, as LLaVE's "
                    "decord turns them: %s", len(turned), len(per_video),
                    ", ".join(f"{r['file']} ({r['rotation']} degrees)" for r in turned[:5]))
    if odd:
        logger.warning("%d of %d videos carry a display rotation that is no multiple of 90 degrees; they are scored as "
                       "stored, as LLaVE's decord leaves them: %s", len(odd), len(per_video),
                       ", ".join(f"{r['file']} ({r['rotation']} degrees)" for r in odd[:5]))
    if unread:
        import av

        logger.warning("PyAV %s cannot read a video's display rotation (no VideoFrame.rotation): %d videos are scored "
                       "as stored, where LLaVE's decord turns a phone video upright; upgrade PyAV (pip install -U av)",
                       getattr(av, "__version__", "?"), len(unread))


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
    from .evaluate import check_max_text_tokens, eval_autocast, eval_precision, load_eval_model, precision_label
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
    paths = find_videos(ann.video_ids, videos_dir, ann.extensions)

    model, extra = load_eval_model(model_path, dev, dt, max_text_tokens=max_text_tokens,
                                   autocast=eval_autocast(dtype))
    check_video_config(model.config)  # before any video is decoded
    proc = model.processor
    limit_len = video_length_limit(model.config, max_length)
    longest = check_video_length(proc, max_frames, limit_len, model_cap=limit_len < max_length)
    check_video_files(paths)  # before any video is encoded: a bad file found now, not when its turn comes

    t0 = time.perf_counter()
    v_emb, infos = encode_videos(model, paths, fps=fps, max_frames=max_frames, batch=batch, max_length=limit_len,
                                 workers=workers, progress=progress)
    t1 = time.perf_counter()
    c_emb = encode_captions(model, ann.captions, batch=batch, progress=progress)
    t2 = time.perf_counter()
    metrics = retrieval_metrics(c_emb @ v_emb.t(), ann.caption_to_video)
    frames = [len(i["indices"]) for i in infos]
    per_video = [{"id": v, "file": p, "num_frames": i["num_frames"], "stated_frames": i.get("stated_frames"),
                  "rotation": i.get("rotation")} for v, p, i in zip(ann.video_ids, paths, infos)]
    _say_rotations(per_video)
    # a damaged mkv/webm decodes up to the damage without an error: far fewer frames than its duration says
    short = [r for r in per_video if r["stated_frames"] and r["num_frames"] < 0.9 * r["stated_frames"] - 1]
    if short:
        logger.warning("%d of %d videos decoded to far fewer frames than their containers' duration states (damaged "
                       "or cut files?); they are scored on what decoded: %s", len(short), len(per_video),
                       ", ".join(f"{r['file']} ({r['num_frames']} of {r['stated_frames']})" for r in short[:5]))
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
        "short_videos": [r["id"] for r in short],
        "per_video": per_video,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(output_dir, exist_ok=True)
    from .checkpoint import write_atomic  # whole or not at all: a rerun's failed write keeps the earlier result

    write_atomic(os.path.join(output_dir, RESULT_FILE), json.dumps(result, indent=2))
    return result
