"""Videos into LLaVE: frames -> visual tokens -> one embedding, as LLaVE's video retrieval does.

What LLaVE's zero-shot text-video evaluation (``CLIP4Clip/main_task_retrieval.py`` with the
LLaVA-NeXT ``llava_qwen`` model) does with a video, reproduced here:

* Frames (sampled by :func:`llave_fast.eval_video.sample_frame_indices`) are each resized to the
  vision tower's tile (``image_size`` x ``image_size``, bicubic, aspect ignored; no anyres
  tiling) and normalised like images.
* Each frame goes through the vision tower and the projector on its own: an n x n map of
  features (n = image_size // patch_size, floored: 27 for 384-px tiles of 14-px patches).
* The map is shrunk 2x2 by bilinear interpolation to ceil(n/2) x ceil(n/2) (LLaVA's
  ``get_2dPool`` in ``bilinear`` mode, the mode LLaVE's training sets; LLaVE calls it with
  stride 2 whatever the config says).
* One ``image_newline`` closes every row of every frame (LLaVA's ``mm_newline_position
  = "grid"``, LLaVE's training default): a frame gives ph x (pw + 1) tokens, 14 x 15 = 210
  for LLaVE's geometry, 32 frames 6720 (:func:`count_video_tokens`).
* The layout is read from the model config and anything else is refused
  (:func:`check_video_config`): ``mm_newline_position`` must be "grid" and
  ``mm_spatial_pool_mode`` "bilinear" (LLaVE's ``get_2dPool`` also knows "average" and "max",
  its ``prepare_inputs_labels_for_multimodal`` "frame", "one_token" and "no_token"; none of
  those is implemented here), ``add_faster_video`` false (LLaVE's code cannot run it: the
  features it needs are computed in a commented-out line). A ``llava_qwen`` config without
  ``mm_newline_position`` means "one_token" to LLaVE's code and is refused; LLaVE's training
  (``llava/train/train.py: train``) always writes "grid", and so does llave-fast's
  (:func:`set_trained_layout`). A transformers-format config without these keys (llave-fast's
  own exports before they were carried, tiny models) is taken as "grid" / "bilinear".
* The prompt is the qwen_1_5 template around ``<image>\\nRepresent the given video.``;
  captions are plain texts ``Find me an video that matches the given caption: <caption>``
  (LLaVE's wording, its "an video" included). Pooling is the image path's: the final
  hidden state of the last real token, L2-normalised.

Length: LLaVE's video evaluation raises the model's cut (``tokenizer_model_max_length``) to
8192 and then cuts silently. A cut inside the video would pool a visual token instead of the
prompt's end, so here a video that does not fit is refused instead (:func:`video_batch`),
naming the numbers; with LLaVE's geometry 32 frames fit (6720 + the prompt < 8192).

transformers' own LlavaOnevision video path differs (one ``image_newline`` after the whole
video, ``mm_newline_position = "one_token"``); its per-frame features are reused
(``get_video_features``: vision tower, feature layer, projector, bilinear 2x2 pooling) and
the newlines are laid out as LLaVE does.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .processor import IMAGE_PLACEHOLDER
from ..errors import InvalidArgument, InvalidArgumentType

__all__ = [
    "VIDEO_PROMPT",
    "CAPTION_PROMPT",
    "LLAVE_VIDEO_MAX_LENGTH",
    "pooled_grid",
    "tokens_per_frame",
    "count_video_tokens",
    "frames_to_pixels",
    "video_prompt_tokens",
    "video_batch",
    "video_length_limit",
    "video_features",
    "embed_video_batch",
    "video_forward",
    "check_video_config",
    "set_trained_layout",
    "VIDEO_LAYOUT",
]

VIDEO_PROMPT = IMAGE_PLACEHOLDER + "\nRepresent the given video."
CAPTION_PROMPT = "Find me an video that matches the given caption: "  # LLaVE's wording, "an video" included
LLAVE_VIDEO_MAX_LENGTH = 8192  # LLaVE's video evaluation sets tokenizer_model_max_length to this
#: the video layout implemented here: config key -> (the value implemented, LLaVE's other values)
VIDEO_LAYOUT = {
    "mm_newline_position": ("grid", ("frame", "one_token", "no_token")),
    "mm_spatial_pool_mode": ("bilinear", ("average", "max")),
}


def check_video_config(config) -> None:
    """Refuse a model config whose video layout is not the one implemented here (module docstring).

    Reads ``mm_newline_position`` (LLaVE: ``llava/model/llava_arch.py:
    prepare_inputs_labels_for_multimodal``), ``mm_spatial_pool_mode`` (``get_2dPool``) and
    ``add_faster_video``. A key absent from the config (a transformers-format folder) is taken as
    the value implemented; a ``llava_qwen`` checkpoint's absent keys are what LLaVE's code makes of
    them (:func:`~llave_fast.model.convert.convert_llava_qwen_config`).
    """
    for key, (want, others) in VIDEO_LAYOUT.items():
        got = getattr(config, key, want)
        if got != want:
            if got is None:
                why = (f"the checkpoint's config has no {key} (LLaVE's get_2dPool reads it with no default, so "
                       "LLaVE's own video path fails on it too)")
            elif got in others:
                why = f"{key} = {got!r} is one of LLaVE's video layouts but not implemented here"
            else:
                why = f"{key} = {got!r} is not a value LLaVE's code knows ({(want,) + others})"
            raise InvalidArgument(f"{why}: llave-fast embeds videos with {key} = {want!r} only (LLaVE's training writes "
                             f"mm_newline_position 'grid' and mm_spatial_pool_mode 'bilinear'); set {key} to "
                             f"{want!r} in the model's config.json if that is what the model was trained with")
    if getattr(config, "add_faster_video", False):
        raise InvalidArgument(f"add_faster_video = {config.add_faster_video!r}: not implemented here (and LLaVE's own "
                         "video path cannot run it); set it to false in the model's config.json")


def set_trained_layout(config) -> None:
    """Write the video layout implemented here into a model config, as LLaVE's training writes it
    into the config of the model it trains (``llava/train/train.py: train``: ``mm_newline_position``
    "grid", ``mm_spatial_pool_mode`` "bilinear"), and ``add_faster_video`` false: a model saved by
    llave-fast's training then carries the layout it is embedded with (:func:`check_video_config`),
    whatever the checkpoint it started from said (a ``llava_qwen`` config without the key reads as
    "one_token")."""
    for key, (want, _) in VIDEO_LAYOUT.items():
        setattr(config, key, want)
    config.add_faster_video = False


def pooled_grid(image_size: int, patch_size: int) -> tuple[int, int]:
    """(rows, cols) of one frame's feature map after the 2x2 bilinear pooling: n x n patches
    (n = image_size // patch_size, the patch convolution floors) -> ceil(n/2) x ceil(n/2)."""
    image_size, patch_size = int(image_size), int(patch_size)
    if patch_size <= 0 or image_size < patch_size:
        raise InvalidArgument(f"image_size ({image_size}) must be at least patch_size ({patch_size}) and patch_size positive")
    n = image_size // patch_size
    return math.ceil(n / 2), math.ceil(n / 2)


def tokens_per_frame(image_size: int, patch_size: int) -> int:
    """Visual tokens of one frame: the pooled rows, each closed by an ``image_newline``."""
    rows, cols = pooled_grid(image_size, patch_size)
    return rows * (cols + 1)


def count_video_tokens(num_frames: int, *, image_size: int, patch_size: int) -> int:
    """Visual tokens of a video of ``num_frames`` frames: frames x pooled_h x (pooled_w + 1)
    (384-px tiles of 14-px patches: 27 x 27 -> 14 x 14 -> 210 a frame, 6720 for 32 frames)."""
    if not isinstance(num_frames, (int, np.integer)) or isinstance(num_frames, bool) or num_frames < 1:
        raise InvalidArgument(f"num_frames must be a positive int, got {num_frames!r}")
    return int(num_frames) * tokens_per_frame(image_size, patch_size)


def frames_to_pixels(processor, frames, index: int = 0) -> torch.Tensor:
    """Frames -> (F, 3, S, S) float32: each frame resized to the tile (bicubic, aspect ignored,
    as LLaVE's SigLIP processor does) and normalised with the processor's mean/std.

    ``frames``: a uint8 array (F, H, W, 3) or a list of PIL images / (H, W, 3) uint8 arrays.
    """
    from PIL import Image

    if isinstance(frames, tuple) and len(frames) == 2 and isinstance(frames[1], dict):
        raise InvalidArgument(f"videos[{index}]: got a (frames, info) pair, as decode_video returns; pass its "
                              "first item: frames, info = decode_video(path)")
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InvalidArgument(f"videos[{index}]: frames must be a uint8 (F, H, W, 3) array, got "
                             f"{frames.dtype} {frames.shape}")
        frames = list(frames)
    if not isinstance(frames, (list, tuple)) or not frames:
        raise InvalidArgument(f"videos[{index}]: expected a non-empty list of frames, got {type(frames).__name__}")
    S = processor.image_size
    out = []
    for j, f in enumerate(frames):
        if isinstance(f, np.ndarray):
            if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8:
                raise InvalidArgument(f"videos[{index}] frame {j}: expected a uint8 (H, W, 3) array, got {f.dtype} {f.shape}")
            f = Image.fromarray(f)
        elif not isinstance(f, Image.Image):
            raise InvalidArgumentType(f"videos[{index}] frame {j}: expected a PIL image or a uint8 array, got {type(f).__name__}")
        out.append(processor._normalise(f.convert("RGB").resize((S, S), Image.Resampling.BICUBIC)))
    return torch.from_numpy(np.stack(out))


def _prompt_pieces(processor, text: str) -> tuple[list[int], list[int]]:
    """Token ids of the prompt before and after ``<image>`` (tokenised in pieces, as images are)."""
    prompt = processor.build_prompt(text, True)
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) != 2:
        raise InvalidArgument(f"the video prompt must hold exactly one {IMAGE_PLACEHOLDER}, got {text!r}")
    head, tail = processor.tokenizer(pieces, add_special_tokens=False)["input_ids"]
    return list(head), list(tail)


def video_prompt_tokens(processor, text: str = VIDEO_PROMPT) -> int:
    """Tokens of the video prompt other than the visual ones (template, system turn, text)."""
    head, tail = _prompt_pieces(processor, text)
    return len(head) + len(tail)


def check_video_length(processor, num_frames: int, max_length: int, text: str = VIDEO_PROMPT, *,
                       model_cap: bool = False) -> int:
    """The sequence length of a ``num_frames`` video; a clear error when it exceeds ``max_length``
    (``model_cap``: that length is the language model's ``max_position_embeddings``, which no flag raises)."""
    per = tokens_per_frame(processor.image_size, processor.patch_size)
    prompt = video_prompt_tokens(processor, text)
    total = int(num_frames) * per + prompt
    if total > max_length:
        fit = max(0, (int(max_length) - prompt) // per)
        raise InvalidArgument(
            f"a video of {num_frames} frames is {num_frames} x {per} visual tokens per frame + {prompt} prompt tokens "
            f"= {total} tokens, more than the maximum length {max_length}: lower --max-frames to {fit} or less"
            + (" (the language model's max_position_embeddings; no flag raises it)" if model_cap else
               " (or raise --max-length, up to the language model's max_position_embeddings)")
            + ". LLaVE would cut the "
            f"sequence there and pool a visual token instead of the prompt's end."
        )
    return total


def video_length_limit(config, max_length: int = LLAVE_VIDEO_MAX_LENGTH) -> int:
    """``max_length``, capped by the language model's ``max_position_embeddings`` when it has one."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InvalidArgument(f"max_length must be a positive int, got {max_length!r}")
    max_pos = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    return min(max_length, int(max_pos)) if max_pos else max_length


def video_batch(processor, videos: Sequence[torch.Tensor], *, text: str = VIDEO_PROMPT,
                padding_side: str = "right", max_length: int = LLAVE_VIDEO_MAX_LENGTH) -> dict:
    """Preprocessed videos (each (F, 3, S, S), :func:`frames_to_pixels`) -> the video batch:

    ``input_ids`` / ``attention_mask`` (B, L) as for images, the prompt's ``<image>`` replaced
    by :func:`count_video_tokens` image-token ids; ``pixel_values_videos``: the list of
    (F_i, 3, S, S) tensors. A video longer than ``max_length`` tokens is refused.
    """
    if not isinstance(videos, (list, tuple)) or not videos:
        raise InvalidArgument(f"videos must be a non-empty list of (F, 3, S, S) tensors, got {type(videos).__name__}")
    if padding_side not in ("left", "right"):
        raise InvalidArgument(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    S = processor.image_size
    head, tail = _prompt_pieces(processor, text)
    seqs = []
    for i, v in enumerate(videos):
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[1:]) != (3, S, S) or v.shape[0] < 1:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise InvalidArgument(f"videos[{i}] must be a (frames, 3, {S}, {S}) tensor, got {got}")
        check_video_length(processor, v.shape[0], max_length, text)
        n = count_video_tokens(v.shape[0], image_size=S, patch_size=processor.patch_size)
        seqs.append(head + [processor.image_token_id] * n + tail)
    L = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), L), processor.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        lo = 0 if padding_side == "right" else L - len(s)
        input_ids[i, lo: lo + len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, lo: lo + len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values_videos": list(videos)}


def video_features(model, pixel_values: torch.Tensor, num_frames: Sequence[int]) -> list[torch.Tensor]:
    """Visual tokens of each video, LLaVE's layout (module docstring).

    ``model``: the LlavaOnevisionModel; ``pixel_values``: every video's frames stacked
    (sum F_i, 3, S, S); ``num_frames``: F_i per video. Returns one (F_i * ph * (pw + 1), D)
    tensor per video.
    """
    cfg = model.config
    check_video_config(cfg)
    total = int(sum(num_frames))
    if pixel_values.dim() != 4 or pixel_values.shape[0] != total:
        raise InvalidArgument(f"pixel_values must stack {total} frames as (frames, 3, S, S), got {tuple(pixel_values.shape)}")
    ph, pw = pooled_grid(cfg.vision_config.image_size, cfg.vision_config.patch_size)
    with _whole(model.image_newline):  # get_video_features reads image_newline too
        # transformers' video path: vision tower per frame, the feature layer, projector, 2x2 bilinear pooling
        out = model.get_video_features(
            pixel_values_videos=pixel_values[None],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
        feats = getattr(out, "pooler_output", out)[0]
        newline = model.image_newline
        return _grid_rows(feats, newline, total, ph, pw, num_frames)


def _grid_rows(feats, image_newline, total, ph, pw, num_frames):
    """Pooled features (total * ph * pw (+ 1), D) -> LLaVE's "grid" layout, one tensor per video."""
    if feats.shape[0] == total * ph * pw + 1:  # transformers' one image_newline after the whole video: not LLaVE's
        feats = feats[:-1]
    if feats.shape[0] != total * ph * pw:
        raise InvalidArgument(f"the vision side gave {feats.shape[0]} features for {total} frames, expected "
                         f"{total} x {ph} x {pw} (transformers' get_video_features changed?)")
    dim = feats.shape[-1]
    grid = feats.reshape(total, ph, pw, dim)
    # torch.cat's promotion, as LLaVE's add_token_per_grid: one dtype when nothing autocasts; bf16 features
    # and an fp16 image_newline meet in fp32 under LLaVE's evaluation precision
    dt = torch.promote_types(grid.dtype, image_newline.dtype)
    grid = grid.to(dt)
    newline = image_newline.to(device=grid.device, dtype=dt)
    # LLaVE's "grid" layout: frame by frame, row by row, each row closed by image_newline
    grid = torch.cat([grid, newline.expand(total, ph, 1, dim)], dim=2)
    return [v.reshape(-1, dim) for v in grid.split(list(num_frames))]


def _whole(param):
    """A context in which ``param`` is whole.

    DeepSpeed ZeRO-3 keeps a parameter partitioned (an empty placeholder on each rank) and gathers
    it only when its module's forward runs, or when it is read inside the forward of the engine's
    root module; ``image_newline`` belongs to no sub-module that runs, so read outside the root's
    forward (:func:`video_features` called directly) it is gathered here, for reading only.
    """
    status = getattr(param, "ds_status", None)
    if status is None or status.name != "NOT_AVAILABLE":  # not partitioned, or gathered already
        return contextlib.nullcontext()
    if torch.is_grad_enabled():
        raise InvalidArgument(
            f"image_newline (ds_numel {getattr(param, 'ds_numel', '?')}) is partitioned by DeepSpeed ZeRO-3 and was read "
            "outside the model's forward with gradients on, where its gradient would be lost: embed videos through "
            "the embedder (embed_video_batch / LLaVEEmbedder.forward) or under torch.no_grad()")
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def embed_video_batch(embedder, batch: dict) -> torch.Tensor:
    """The :func:`video_batch` dict -> (B, d) float32 unit rows (LLaVEEmbedder's pooling).

    Runs as ``embedder``'s forward (``LLaVEEmbedder.forward`` hands a batch holding
    ``pixel_values_videos`` to :func:`video_forward`): under DeepSpeed ZeRO-3 the engine gathers
    every parameter its root module's forward reads, ``image_newline`` included (read outside
    that forward it is an empty placeholder), and keeps its gradient, as on the image path.
    """
    if not isinstance(batch, dict) or "pixel_values_videos" not in batch:
        raise InvalidArgument(f"batch must be video_batch's dict (with 'pixel_values_videos'), got "
                              f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
    return embedder(batch)


def video_forward(embedder, batch: dict) -> torch.Tensor:
    """:func:`embed_video_batch`'s computation; ``LLaVEEmbedder.forward`` calls it."""
    m = embedder.model
    cfg = m.config
    videos = batch["pixel_values_videos"]
    device = m.get_input_embeddings().weight.device
    input_ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device=device, dtype=torch.long)
    B, L = input_ids.shape
    if len(videos) != B:
        raise InvalidArgument(f"batch['pixel_values_videos'] has {len(videos)} videos but input_ids has {B} rows")
    num_frames = [int(v.shape[0]) for v in videos]
    is_image = input_ids == cfg.image_token_index
    have = is_image.sum(dim=1).tolist()
    pixel = torch.cat(list(videos)).to(device=device, dtype=m.dtype)
    autocast = getattr(embedder, "autocast_dtype", None) is not None  # LLaVE's precision (LLaVEEmbedder.autocast)
    with embedder.autocast() if autocast else contextlib.nullcontext():
        feats = video_features(m, pixel, num_frames)
        for i, (f, n) in enumerate(zip(feats, have)):
            if f.shape[0] != n:
                raise InvalidArgument(f"video {i} has {n} image tokens but its {num_frames[i]} frames give {f.shape[0]} "
                                 "features")
        embeds = m.get_input_embeddings()(input_ids)
        feats = torch.cat(feats)
        # as LLaVEEmbedder._input_embeddings: under autocast, promoted as LLaVE's torch.cat promotes
        dt = torch.promote_types(torch.float32, feats.dtype) if autocast else embeds.dtype
        embeds, feats = embeds.to(dt), feats.to(dt)
        where = is_image.unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(where, feats)
        # as LLaVEEmbedder.forward: positions count real tokens, the last real token is pooled
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = m.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
    last = (L - 1) - mask.flip(dims=[1]).argmax(dim=1)
    return F.normalize(hidden[torch.arange(B, device=device), last].float(), dim=-1)
