"""LLaVE's input pipeline: the qwen_1_5 prompt, anyres image tiling, and the batch contract.

What LLaVE (LLaVA-NeXT ``llava_qwen`` code) does, reproduced here:

* Prompt: the qwen_1_5 chat template with its system turn, the user turn holding the image
  placeholder and the text, and an assistant turn of "\\n"::

      <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
      <|im_start|>user\\n<image>\\nRepresent the given image.<|im_end|>\\n
      <|im_start|>assistant\\n\\n<|im_end|>\\n

  The prompt is tokenised in pieces split at ``<image>``; each ``<image>`` becomes as many
  image-token ids as the image has visual features (transformers' LlavaOnevision layout).
  MMEB's ``<|image_1|>`` placeholders become ``<image>``. The pooled position is the last
  real token (the final "\\n").
* Placeholder (LLaVE's ``preprocess_multimodal``, the same function in
  ``llava/train/train.py`` and ``llava/eval/model_embed.py``, called by both the training
  set's and the evaluation set's ``__getitem__``): a text holding exactly one ``<image>``
  that does not start with it becomes ``"<image>\\n" + text.replace("<image>", "").strip()``
  (:func:`move_placeholder`); a text that starts with it is left as it is. A text with no
  placeholder keeps no image: LLaVE still runs the image through the vision tower, but
  ``llava/model/llava_arch.py: prepare_inputs_labels_for_multimodal`` (the ``num_images == 0``
  branch) appends ``image_features[0:0]``, zero features, so the sample is embedded as its text
  alone, at training and at evaluation alike. :meth:`LLaVEProcessor.__call__` does the same
  with ``image_without_placeholder="drop"`` (and warns once), which evaluation
  (:func:`llave_fast.evaluate.apply_eval_protocol`) and the training collator
  (:class:`llave_fast.data.PairCollator`) use; the processor's own default, for direct calls
  (``LLaVEEmbedder.encode``), is ``"prepend"``: the image goes in front of the text.
* Images (anyres): the grid with the best fit among ``image_grid_pinpoints`` (height, width)
  is chosen; the image is resized to fit it (bicubic, aspect kept) and centred on black
  padding, then cut into ``image_size`` squares, row-major. The base view is the whole image
  resized to ``image_size`` x ``image_size`` (bicubic, aspect ignored) and comes first. Pixels
  are scaled by 1/255 and normalised with ``image_mean``/``image_std``.
* Visual tokens per image (what LLaVE and :class:`~llave_fast.model.embedder.LLaVEOnevisionModel`
  produce): the base view's n*n patches (n = image_size // patch_size, floored: 384-px tiles
  of 14-px patches give 27 x 27 = 729), then the crops' feature map with the padding cut
  away ("unpad", LLaVE's floored rule), shrunk when it exceeds ``anyres_max_N``, an
  ``image_newline`` after every row.
* Length: ``max_length`` (LLaVE's ``tokenizer_model_max_length``) cuts the whole sequence,
  image tokens inserted, as LLaVE does; ``max_text_tokens`` (ours, optional, a training
  option: LLaVE never cuts a text on its own) cuts the user text alone. Evaluation leaves it
  off unless asked (:func:`llave_fast.evaluate.apply_eval_protocol`).

The batch contract (what :class:`LLaVEEmbedder.forward` takes; batch-first and aligned
sample by sample so GradCache can split it)::

    input_ids       LongTensor (B, L)
    attention_mask  LongTensor (B, L)   1 = real token, 0 = padding (left or right)
    pixel_values    list of B entries: FloatTensor (n_tiles, 3, S, S) or None (text only)
    image_sizes     list of B entries: (height, width) of the original image, or None

Only PIL and numpy are used for images (no torchvision).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from .convert import ensure_image_token
from ..errors import InvalidArgument, InvalidArgumentType, MissingFile

__all__ = [
    "LLaVEProcessor",
    "count_image_tokens",
    "num_image_tiles",
    "best_resolution",
    "IMAGE_PLACEHOLDER",
    "MMEB_IMAGE_PLACEHOLDER",
    "SYSTEM_PROMPT",
    "IMAGE_WITHOUT_PLACEHOLDER",
    "move_placeholder",
    "count_placeholders",
    "has_placeholder",
]

IMAGE_PLACEHOLDER = "<image>"
MMEB_IMAGE_PLACEHOLDER = re.compile(r"<\|image_\d+\|>")
SYSTEM_PROMPT = "You are a helpful assistant."
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"
#: what :meth:`LLaVEProcessor.__call__` does with an image whose text has no placeholder
IMAGE_WITHOUT_PLACEHOLDER = ("drop", "prepend")


def has_placeholder(text: str) -> bool:
    """Whether ``text`` holds an image placeholder (``<image>`` or MMEB's ``<|image_N|>``)."""
    return IMAGE_PLACEHOLDER in text or MMEB_IMAGE_PLACEHOLDER.search(text) is not None


def count_placeholders(text: str) -> int:
    """How many image placeholders ``text`` holds, as :meth:`LLaVEProcessor.__call__` counts them."""
    return MMEB_IMAGE_PLACEHOLDER.sub(IMAGE_PLACEHOLDER, text).count(IMAGE_PLACEHOLDER)


def move_placeholder(text: str) -> str:
    """LLaVE's placeholder rule on a text whose placeholders are already ``<image>``.

    ``llava/train/train.py: preprocess_multimodal`` (and its copy in
    ``llava/eval/model_embed.py``): exactly one ``<image>`` not at the start -> removed, the text
    stripped, ``"<image>\\n"`` put in front (and the whole stripped again); a text starting with
    ``<image>``, or holding none or several, is returned unchanged.
    """
    if text.count(IMAGE_PLACEHOLDER) == 1 and not text.startswith(IMAGE_PLACEHOLDER):
        text = (IMAGE_PLACEHOLDER + "\n" + text.replace(IMAGE_PLACEHOLDER, "").strip()).strip()
    return text


# --------------------------------------------------------------------------------------------
# anyres geometry (all sizes are (height, width), as transformers expects)
# --------------------------------------------------------------------------------------------


def best_resolution(height: int, width: int, grid_pinpoints) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's resolution, then wastes the least.

    Same rule as LLaVA-NeXT's ``select_best_resolution`` (which takes (width, height); the
    rule is symmetric) and the one transformers' model uses to rebuild the grid, so the
    processor and the model always agree.
    """
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution((height, width), [list(p) for p in grid_pinpoints]))


def num_image_tiles(height: int, width: int, *, image_size: int, grid_pinpoints) -> int:
    """Tiles fed to the vision tower for one image: 1 base view + the crops of its grid."""
    best_h, best_w = best_resolution(height, width, grid_pinpoints)
    return 1 + math.ceil(best_h / image_size) * math.ceil(best_w / image_size)


def unpadded_shape(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """(rows, cols) of a (rows, cols) feature map after LLaVE's unpad for an image of
    (height, width): the rows (or columns) that only saw the centred black padding are cut.

    LLaVE's rule, integer for integer: the kept extent is ``int(extent * scale)``, floored
    (transformers rounds to 7 decimals first, which keeps one more row or column for some
    sizes, e.g. a 94 x 423 (width x height) image with 27-patch tiles: LLaVE 11 columns,
    transformers 13).
    """
    if width / height > cols / rows:  # padding was added above and below
        kept = int(height * (cols / width))
        pad = (rows - kept) // 2
        return rows - 2 * pad, cols
    kept = int(width * (rows / height))  # padding was added left and right
    pad = (cols - kept) // 2
    return rows, cols - 2 * pad


def anyres_max_tiles(vision_aspect_ratio: str) -> int:
    m = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if not m or int(m.group(1)) < 1:
        raise InvalidArgument(f"vision_aspect_ratio must look like 'anyres_max_9', got {vision_aspect_ratio!r}")
    return int(m.group(1))


def shrunk_shape(rows: int, cols: int, n: int, vision_aspect_ratio: str) -> tuple[int, int]:
    """LLaVE's ``anyres_max_N`` rule: a map of more than 1.1 x sqrt(N tiles' worth) of features
    is resized (bilinear) to (rows // ratio, cols // ratio)."""
    ratio = math.sqrt(rows * cols / (anyres_max_tiles(vision_aspect_ratio) * n * n))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return rows, cols


def count_image_tokens(
    height: int,
    width: int,
    *,
    image_size: int,
    patch_size: int,
    grid_pinpoints,
    vision_aspect_ratio: str = "anyres_max_9",
) -> int:
    """Visual features LLaVE produces for one image of this size (and the embedder too).

    Base view n*n (n = image_size // patch_size: the patch convolution floors, so 384-px
    tiles of 14-px patches give 27 x 27 = 729); the crops' (gh*n, gw*n) map; LLaVE's unpad
    to the image's aspect ratio; the ``anyres_max_N`` shrink; one ``image_newline`` per row.
    """
    n = image_size // patch_size
    best_h, best_w = best_resolution(height, width, grid_pinpoints)
    rows, cols = unpadded_shape(height, width, (best_h // image_size) * n, (best_w // image_size) * n)
    rows, cols = shrunk_shape(rows, cols, n, vision_aspect_ratio)
    return n * n + rows * (cols + 1)


def _check_pinpoints(grid_pinpoints, image_size: int) -> list[list[int]]:
    if not isinstance(grid_pinpoints, (list, tuple)) or not grid_pinpoints:
        raise InvalidArgument(f"image_grid_pinpoints must be a non-empty list of (height, width), got {grid_pinpoints!r}")
    out = []
    for p in grid_pinpoints:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise InvalidArgument(f"image_grid_pinpoints entries must be (height, width) pairs, got {p!r}")
        h, w = int(p[0]), int(p[1])
        if h <= 0 or w <= 0 or h % image_size or w % image_size:
            raise InvalidArgument(
                f"image_grid_pinpoints entry {p!r} is not a positive multiple of the tile size {image_size}"
            )
        out.append([h, w])
    return out


# --------------------------------------------------------------------------------------------
# the processor
# --------------------------------------------------------------------------------------------


def _positive_or_none(name: str, value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise InvalidArgument(f"{name} must be a positive int or None, got {value!r}")
    return value


WIDE_RANGE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


_wide_range_said = False  # said once per process (a data set of 16-bit images would say it per image)


def warn_wide_range(image, name: str) -> None:
    """Warn (once per process, naming the first) that an image of more than 8 bits a channel (PIL
    modes I, I;16, F) loses its range in the conversion to RGB that LLaVE (and so this processor)
    does: values are clipped to 0..255, so a 16-bit photo comes out nearly white and a float one
    nearly black."""
    global _wide_range_said
    mode = getattr(image, "mode", None)
    if mode in WIDE_RANGE_MODES and not _wide_range_said:
        _wide_range_said = True
        warnings.warn(f"{name} has PIL mode {mode!r} (more than 8 bits a channel): its conversion to RGB, as LLaVE "
                      "converts, clips values to 0..255 (16-bit images come out nearly white, float ones nearly "
                      "black); scale such images to 8 bits first for meaningful embeddings (said once)", stacklevel=3)


class LLaVEProcessor:
    """Texts and images -> the batch dict :class:`LLaVEEmbedder` takes (see module docstring).

    Build it from in-memory objects (a tokenizer and the geometry of the vision side), from
    a model config (:meth:`from_config`), or from a local folder (:meth:`from_pretrained`);
    nothing is downloaded. If the tokenizer has no ``image_token``, it is added to it as a
    special token (LLaVE's own tokenizers lack one; its id must fit the model's vocabulary).
    """

    def __init__(
        self,
        tokenizer,
        *,
        image_size: int,
        patch_size: int,
        image_grid_pinpoints: Sequence[Sequence[int]],
        vision_aspect_ratio: str = "anyres_max_9",
        image_mean: Sequence[float] = SIGLIP_MEAN,
        image_std: Sequence[float] = SIGLIP_STD,
        rescale_factor: float = 1 / 255,
        image_token: str = IMAGE_PLACEHOLDER,
        system_prompt: str = SYSTEM_PROMPT,
        max_text_tokens: int | None = None,
        max_length: int | None = None,
        image_without_placeholder: str = "prepend",
    ):
        if tokenizer is None:
            raise InvalidArgument("LLaVEProcessor needs a tokenizer")
        image_size, patch_size = int(image_size), int(patch_size)
        # the patch convolution floors: 384-px tiles of 14-px patches give 27 x 27 patches (so400m)
        if patch_size <= 0 or image_size < patch_size:
            raise InvalidArgument(
                f"image_size ({image_size}) must be at least patch_size ({patch_size}) and patch_size positive"
            )
        anyres_max_tiles(vision_aspect_ratio)
        if len(image_mean) != 3 or len(image_std) != 3 or any(s <= 0 for s in image_std):
            raise InvalidArgument(f"image_mean/image_std must be 3 values (std > 0), got {image_mean!r}, {image_std!r}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.patch_size = patch_size
        self.image_grid_pinpoints = _check_pinpoints(image_grid_pinpoints, image_size)
        self.vision_aspect_ratio = str(vision_aspect_ratio)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.rescale_factor = float(rescale_factor)
        self.image_token = image_token
        self.system_prompt = system_prompt
        # the user text (not the template, not the image tokens) is cut to this many tokens
        self.max_text_tokens = max_text_tokens
        # LLaVE's rule (``tokenizer_model_max_length``): the whole sequence, image tokens inserted,
        # is cut to this many tokens; the pooled token is then the last one kept
        self.max_length = max_length
        # an image whose text has no placeholder: "drop" (LLaVE, see the module docstring) or "prepend"
        # (the image in front of the text); a call can override it
        self.image_without_placeholder = image_without_placeholder
        self.images_dropped = 0  # images dropped so far by __call__ (counted, warned about once)
        self._warned_drop = False

        self.image_token_id = ensure_image_token(tokenizer, image_token)
        for tok in ("<|im_start|>", "<|im_end|>"):
            ids = tokenizer(tok, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise InvalidArgument(f"the tokenizer must know the chat token {tok!r} as one token, got ids {ids}")
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else 0
        self.pad_token_id = int(pad)

    @property
    def image_without_placeholder(self) -> str:
        return self._image_without_placeholder

    @image_without_placeholder.setter
    def image_without_placeholder(self, value: str) -> None:
        if value not in IMAGE_WITHOUT_PLACEHOLDER:
            raise InvalidArgument(f"image_without_placeholder must be one of {IMAGE_WITHOUT_PLACEHOLDER} ('drop': "
                             f"LLaVE's rule, the text alone is embedded), got {value!r}")
        self._image_without_placeholder = value

    # both are checked on every assignment (the constructor, a training run, an evaluation's
    # --max-text-tokens): a value that is no positive int fails here, not in a data worker
    @property
    def max_text_tokens(self) -> int | None:
        return self._max_text_tokens

    @max_text_tokens.setter
    def max_text_tokens(self, value: int | None) -> None:
        self._max_text_tokens = _positive_or_none("max_text_tokens", value)

    @property
    def max_length(self) -> int | None:
        return self._max_length

    @max_length.setter
    def max_length(self, value: int | None) -> None:
        self._max_length = _positive_or_none("max_length", value)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(cls, tokenizer, config, **kwargs) -> "LLaVEProcessor":
        """From a ``LlavaOnevisionConfig``: tile size, patch size, pinpoints, aspect rule.
        Image mean/std default to the vision tower's (SigLIP: 0.5; CLIP: OpenAI's)."""
        if "clip" in config.vision_config.model_type:
            kwargs.setdefault("image_mean", CLIP_MEAN)
            kwargs.setdefault("image_std", CLIP_STD)
        proc = cls(
            tokenizer,
            image_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            image_grid_pinpoints=config.image_grid_pinpoints,
            vision_aspect_ratio=config.vision_aspect_ratio,
            **kwargs,
        )
        if proc.image_token_id != config.image_token_index:
            raise InvalidArgument(
                f"the tokenizer gives the image token {proc.image_token!r} id {proc.image_token_id} but the model "
                f"config says image_token_index={config.image_token_index}"
            )
        return proc

    @classmethod
    def from_pretrained(cls, path: str, config=None, tokenizer=None, *, vision_config=None, ignore_config_keys=(),
                        **kwargs) -> "LLaVEProcessor":
        """From a local folder: its tokenizer files (unless ``tokenizer`` is given), its model
        config (either checkpoint format, unless ``config`` is given; ``vision_config`` and
        ``ignore_config_keys`` as in :meth:`LLaVEEmbedder.from_pretrained`) and, when present,
        ``preprocessor_config.json`` (image mean/std). A ``llava_qwen`` folder's
        ``tokenizer_model_max_length`` becomes ``max_length`` (LLaVE cuts every sequence there),
        as when the embedder loads it."""
        from .convert import is_llava_qwen_config, llava_qwen_max_length, load_config, load_tokenizer, read_raw_config

        if not os.path.isdir(path):
            raise MissingFile(f"{path!r} is not a folder (LLaVEProcessor.from_pretrained reads local files only)")
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        if config is None:
            config = load_config(path, tokenizer=tokenizer, vision_config=vision_config,
                                 ignore_config_keys=ignore_config_keys)
            raw = read_raw_config(path)
            if is_llava_qwen_config(raw) and "max_length" not in kwargs:
                kwargs["max_length"] = llava_qwen_max_length(raw)
        pre = read_preprocessor_config(path)
        for key in ("image_mean", "image_std", "rescale_factor"):
            if key in pre and key not in kwargs:
                kwargs[key] = pre[key]
        extra = pre.get("llave_fast", {})
        for key in ("system_prompt", "max_text_tokens", "max_length"):
            if key in extra and key not in kwargs:
                kwargs[key] = extra[key]
        if "image_token" not in kwargs:
            kwargs["image_token"] = tokenizer.convert_ids_to_tokens(config.image_token_index)
        return cls.from_config(tokenizer, config, **kwargs)

    def save_pretrained(self, path: str) -> None:
        """Tokenizer files plus a ``preprocessor_config.json`` in transformers' LlavaOnevision
        image-processor format (grid pinpoints as (height, width))."""
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        cfg = {
            "image_processor_type": "LlavaOnevisionImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "size": {"height": self.image_size, "width": self.image_size},
            "resample": 3,  # bicubic
            "do_rescale": True,
            "rescale_factor": self.rescale_factor,
            "do_normalize": True,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_pad": True,
            "image_grid_pinpoints": self.image_grid_pinpoints,
            "llave_fast": {"system_prompt": self.system_prompt, "image_token": self.image_token,
                           "max_text_tokens": self.max_text_tokens, "max_length": self.max_length},
        }
        with open(os.path.join(path, PREPROCESSOR_FILE), "w") as f:
            json.dump(cfg, f, indent=2)

    # ---- text -------------------------------------------------------------------------------

    def build_prompt(self, text: str, has_image: bool, index: int = 0) -> str:
        """LLaVE's prompt string for one sample whose image (``has_image``) is used (``<image>``
        marks the image's place).

        MMEB's ``<|image_N|>`` becomes ``<image>``; a single placeholder not at the start moves to
        the front (:func:`move_placeholder`, LLaVE's ``preprocess_multimodal``); then
        ``max_text_tokens`` cuts the text. With ``has_image`` and no placeholder the image goes in
        front of the text: whether such an image is used at all is :meth:`__call__`'s decision
        (LLaVE drops it, see :attr:`image_without_placeholder`).
        """
        if not isinstance(text, str):
            raise InvalidArgumentType(f"texts[{index}] must be a str, got {type(text).__name__}")
        user = MMEB_IMAGE_PLACEHOLDER.sub(IMAGE_PLACEHOLDER, text)
        n = user.count(IMAGE_PLACEHOLDER)
        if has_image:
            if n == 0:
                user = IMAGE_PLACEHOLDER + "\n" + user
            elif n > 1:
                raise InvalidArgument(
                    f"texts[{index}] has {n} image placeholders but a sample holds one image: {text[:120]!r}"
                )
            else:
                user = move_placeholder(user)  # LLaVE: llava/train/train.py preprocess_multimodal
        elif n:
            raise InvalidArgument(
                f"texts[{index}] has an image placeholder (<|image_N|> or <image>) but images[{index}] is None: "
                f"{text[:120]!r}"
            )
        user = self.truncate(user)
        return (
            f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n\n<|im_end|>\n"
        )

    def truncate(self, text: str) -> str:
        """The text cut after ``max_text_tokens`` tokens of its own (the image placeholder is kept)."""
        limit = self.max_text_tokens
        if limit is None or not text:
            return text
        head = ""
        if text.startswith(IMAGE_PLACEHOLDER):
            head, text = IMAGE_PLACEHOLDER, text[len(IMAGE_PLACEHOLDER):]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        if len(offsets) <= limit:
            return head + text
        # a character split over several byte-level tokens (CJK, emoji with Qwen's BPE) shares one
        # span: a cut at a token's end can keep a whole character past the limit; step back until
        # the cut text is at most ``limit`` tokens again
        for k in range(limit, 0, -1):
            cut = text[: offsets[k - 1][1]]
            if k < limit and offsets[k - 1][1] == offsets[k][1]:
                continue  # the same cut as the one just refused
            if len(self.tokenizer(cut, add_special_tokens=False)["input_ids"]) <= limit:
                return head + cut
        return head

    # ---- images -----------------------------------------------------------------------------

    def num_image_tokens(self, height: int, width: int) -> int:
        return count_image_tokens(
            height,
            width,
            image_size=self.image_size,
            patch_size=self.patch_size,
            grid_pinpoints=self.image_grid_pinpoints,
            vision_aspect_ratio=self.vision_aspect_ratio,
        )

    def _normalise(self, img) -> np.ndarray:
        x = np.asarray(img, dtype=np.float32) * np.float32(self.rescale_factor)  # (S, S, 3)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.transpose(2, 0, 1)

    @staticmethod
    def _check_image(image, index: int) -> None:
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise InvalidArgumentType(f"images[{index}] must be a PIL.Image.Image or None, got {type(image).__name__}")

    def _note_dropped(self, text: str, index: int) -> None:
        self.images_dropped += 1
        if not self._warned_drop:
            self._warned_drop = True
            warnings.warn(
                f"texts[{index}] has no image placeholder (<|image_1|> or <image>) but images[{index}] is an image: "
                f"LLaVE drops such an image and embeds the text alone (llava/model/llava_arch.py, "
                f"prepare_inputs_labels_for_multimodal), and so does this call (image_without_placeholder="
                f"'drop'; said once, counted in images_dropped): {text[:80]!r}",
                stacklevel=3,
            )

    def preprocess_image(self, image, index: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
        """One image -> (tiles (1 + gh*gw, 3, S, S) float32, (height, width))."""
        from PIL import Image

        self._check_image(image, index)
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InvalidArgument(f"images[{index}] is empty (size {image.size})")
        warn_wide_range(image, f"images[{index}]")
        image = image.convert("RGB")
        S = self.image_size
        best_h, best_w = best_resolution(height, width, self.image_grid_pinpoints)
        # crops: resize to fit the best grid (aspect kept), centre on black, cut row-major
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), best_w), best_h
        canvas = Image.new("RGB", (best_w, best_h), (0, 0, 0))
        canvas.paste(image.resize((new_w, new_h), Image.Resampling.BICUBIC), ((best_w - new_w) // 2, (best_h - new_h) // 2))
        views = [image.resize((S, S), Image.Resampling.BICUBIC)]  # base view: aspect ignored
        views += [canvas.crop((x, y, x + S, y + S)) for y in range(0, best_h, S) for x in range(0, best_w, S)]
        tiles = np.stack([self._normalise(v) for v in views])
        return torch.from_numpy(tiles), (height, width)

    # ---- the batch --------------------------------------------------------------------------

    def __call__(
        self,
        texts: Sequence[str],
        images: Sequence[Any] | None = None,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        image_without_placeholder: str | None = None,
    ) -> dict:
        """Texts (and one optional image per text) -> the batch dict of the module docstring.

        ``image_without_placeholder``: what becomes of an image whose text has no placeholder,
        "drop" (LLaVE's rule: the text alone is embedded) or "prepend"; None: the processor's
        :attr:`image_without_placeholder`.
        """
        rule = self.image_without_placeholder if image_without_placeholder is None else image_without_placeholder
        if rule not in IMAGE_WITHOUT_PLACEHOLDER:
            raise InvalidArgument(f"image_without_placeholder must be one of {IMAGE_WITHOUT_PLACEHOLDER} or None, got "
                             f"{image_without_placeholder!r}")
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise InvalidArgumentType(f"texts must be a list of str, got {type(texts).__name__}")
        if len(texts) == 0:
            raise InvalidArgument("texts is empty: a batch needs at least one sample")
        if images is None:
            images = [None] * len(texts)
        elif not isinstance(images, (list, tuple)):
            raise InvalidArgumentType(f"images must be a list (one PIL image or None per text) or None, got {type(images).__name__}")
        if len(images) != len(texts):
            raise InvalidArgument(f"texts has {len(texts)} entries but images has {len(images)}: give one image (or None) per text")
        if padding_side not in ("left", "right"):
            raise InvalidArgument(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
            raise InvalidArgument(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")

        pixel_values, image_sizes, prompts = [], [], []
        for i, (text, image) in enumerate(zip(texts, images)):
            if image is not None and rule == "drop" and isinstance(text, str) and not has_placeholder(text):
                self._check_image(image, i)
                image = None  # LLaVE: the text alone (llava_arch.py prepare_inputs_labels_for_multimodal)
                self._note_dropped(text, i)
            prompts.append(self.build_prompt(text, image is not None, i))
            if image is None:
                pixel_values.append(None)
                image_sizes.append(None)
            else:
                tiles, size = self.preprocess_image(image, i)
                pixel_values.append(tiles)
                image_sizes.append(size)

        # tokenise in pieces split at <image>, as LLaVE does, all pieces in one tokenizer call
        pieces = [p.split(IMAGE_PLACEHOLDER) for p in prompts]
        flat = [s for ps in pieces for s in ps]
        flat_ids = iter(self.tokenizer(flat, add_special_tokens=False)["input_ids"])
        sequences = []
        for ps, size in zip(pieces, image_sizes):
            ids = list(next(flat_ids))
            for _ in ps[1:]:
                ids += [self.image_token_id] * self.num_image_tokens(*size)
                ids += list(next(flat_ids))
            if self.max_length is not None:
                ids = ids[: self.max_length]  # LLaVE cuts after the image tokens are in, not the text alone
            sequences.append(ids)

        length = max(len(s) for s in sequences)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for i, s in enumerate(sequences):
            lo = 0 if padding_side == "right" else length - len(s)
            input_ids[i, lo : lo + len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[i, lo : lo + len(s)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": pixel_values,
            "image_sizes": image_sizes,
        }

    def __repr__(self) -> str:
        return (
            f"LLaVEProcessor(image_size={self.image_size}, patch_size={self.patch_size}, "
            f"image_grid_pinpoints={self.image_grid_pinpoints}, vision_aspect_ratio={self.vision_aspect_ratio!r}, "
            f"image_token={self.image_token!r} (id {self.image_token_id}), vocab={len(self.tokenizer)}, "
            f"max_length={self.max_length}, max_text_tokens={self.max_text_tokens}, "
            f"image_without_placeholder={self.image_without_placeholder!r})"
        )


def read_preprocessor_config(path: str) -> dict:
    file = os.path.join(path, PREPROCESSOR_FILE)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)
