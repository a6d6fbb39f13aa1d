"""LLaVEEmbedder: transformers' LlavaOnevisionModel (no LM head) turned into an embedder.

``forward(batch)`` returns the final hidden state (after the language model's last RMSNorm)
at the last real token of every row, L2-normalised, as float32 (B, d). The batch contract
is described in :mod:`llave_fast.model.processor`: batch-first and aligned sample by sample,
so GradCache can split it anywhere; text-only samples carry ``None`` image entries. The
forward gathers the image samples' tiles into the (n_tiles, 3, S, S) stack and the
(n_images, 2) sizes LlavaOnevisionModel expects; the model writes each image's visual
features over that sample's image tokens, in batch order.

Padding: rows may be padded on either side. Position ids are computed from the attention
mask (``cumsum - 1``), so a left-padded row gets the same positions, hence the same
embedding, as a right-padded one, and a sample's embedding does not depend on its batch.

Loading: :meth:`LLaVEEmbedder.from_pretrained` reads LLaVE's own ``llava_qwen`` checkpoints
(config converted and weights renamed at load time, see :mod:`llave_fast.model.convert`) and
transformers-format folders, including this class's :meth:`save_pretrained` exports. Weights
always go through transformers' ``from_pretrained``: under DeepSpeed ZeRO-3, create
``transformers.integrations.HfDeepSpeedConfig(ds_config)`` (and keep a reference to it)
*before* calling ``from_pretrained``; the model is then built under ``deepspeed.zero.Init``
and every weight is partitioned as it is loaded, never materialised whole on one rank.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .convert import (
    CheckpointKeyError,
    llava_qwen_max_length,
    vision_layers_in_checkpoint,
    check_checkpoint_keys,
    check_model_type,
    checkpoint_keys,
    convert_llava_qwen_config,
    ensure_image_token,
    format_key_report,
    is_llava_qwen_config,
    llava_qwen_key_mapping,
    load_config,
    load_tokenizer,
    read_raw_config,
    WEIGHT_FILES,
)
from .processor import (
    LLaVEProcessor,
    best_resolution,
    count_image_tokens,
    num_image_tiles,
    shrunk_shape,
    unpadded_shape,
)
from ..dtypes import DTYPES, dtype_name
from ..errors import HubModelUnavailable, InvalidArgument, InvalidArgumentType, MissingFile, MissingKey, NotAFolder

__all__ = ["LLaVEEmbedder", "import_modeling_modules", "LLaVEOnevisionModel", "default_attn_implementation", "BATCH_KEYS"]

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def default_attn_implementation(dtype: torch.dtype) -> str:
    """``flash_attention_2`` when flash-attn is installed, CUDA is there and the weights are
    bf16/fp16; ``sdpa`` otherwise."""
    if (
        dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.is_available()
    ):
        return "flash_attention_2"
    return "sdpa"


def _resolve_dtype(torch_dtype, raw: dict | None = None) -> torch.dtype:
    """None -> float32; "auto" -> the checkpoint's dtype; a name or a torch.dtype."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype
    if torch_dtype == "auto":
        stored = (raw or {}).get("torch_dtype") or (raw or {}).get("dtype") or "float32"
        return _resolve_dtype(stored)
    if not isinstance(torch_dtype, str):
        raise InvalidArgumentType(f"torch_dtype must be None, 'auto', a torch.dtype or a name such as 'bf16', got "
                                  f"{type(torch_dtype).__name__}")
    return DTYPES[dtype_name(torch_dtype, name="torch_dtype")]


def looks_like_hub_id(path: str) -> bool:
    """Whether a model name that is not an existing path reads as a Hugging Face hub id (``owner/name``):
    one slash, not absolute, not starting with ``.`` or ``~``. The loader fetches only those; the command
    line checks every other name as a local folder before it starts."""
    return not (os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") != 1)


def _resolve_path(path: str) -> str:
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotAFolder(f"{path!r} is a file: give the checkpoint folder")
    if not looks_like_hub_id(path):
        raise MissingFile(f"no checkpoint folder {path!r} (and it is not a hub id of the form owner/name)")
    try:  # a hub id, when the network allows
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "*.tiktoken"]
        )
    except Exception as e:  # noqa: BLE001 - report why, whatever the hub client raised
        raise HubModelUnavailable(
            f"{path!r} is not a local folder and could not be fetched from the Hugging Face hub ({type(e).__name__}: "
            f"{e}). Download it where the network allows and pass the folder.", model_id=path
        ) from e


def _file_stamps(folder: str) -> dict:
    """(inode, mtime) of each file in ``folder`` (empty if it does not exist yet)."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            st = entry.stat(follow_symlinks=False)
            out[entry.name] = (st.st_ino, st.st_mtime_ns)
    return out


def _process_umask() -> int:
    """The process's umask, read without changing it where the kernel says it (Linux 4.7+:
    ``/proc/self/status``). ``os.umask`` can only be read by setting it, and for that instant another
    thread (a data loader's, a checkpoint writer's) would create its files with the temporary mask."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the fallback's instant: the narrowest mask, so no file gets a wider mode
    os.umask(mask)
    return mask


def _widen_to_umask(folder: str, before: dict) -> None:
    """Give the files a save wrote the mode any new file gets under the process's umask.

    transformers writes ``model.safetensors`` through a private temporary file (mode 0600), so an
    export was unreadable by the other users of a shared folder while its ``config.json`` and
    tokenizer files were not. Only files the save created or replaced are touched, and only widened
    up to what the umask allows (never past it)."""
    default = 0o666 & ~_process_umask()
    kept = []
    for entry in os.scandir(folder):
        if not entry.is_file(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        if before.get(entry.name) == (st.st_ino, st.st_mtime_ns):
            continue  # there before the save and not rewritten by it
        mode = st.st_mode & 0o777
        if mode | default != mode:
            try:
                os.chmod(entry.path, mode | default)
            except OSError as e:  # another user's file rewritten in place (a shared folder): the save stands
                kept.append(f"{entry.name} ({mode:o}: {e.strerror or e})")
    if kept:
        import warnings

        warnings.warn(f"saved in {folder!r}, but these files keep modes narrower than the umask's "
                      f"{default:o}: {', '.join(kept)}", stacklevel=3)


def _fix_saved_config(file: str, dtype: torch.dtype | None) -> None:
    """transformers' class name in ``architectures`` (the weights are LlavaOnevisionModel's;
    LLaVE's packing is ours) and, when given, the stored dtype."""
    import json

    with open(file) as f:
        cfg = json.load(f)
    cfg["architectures"] = ["LlavaOnevisionModel"]
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        cfg["dtype"] = name
        for sub in ("text_config", "vision_config"):
            if isinstance(cfg.get(sub), dict) and "dtype" in cfg[sub]:
                cfg[sub]["dtype"] = name
    with open(file, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


@functools.cache
def llave_onevision_class():
    """:class:`LLaVEOnevisionModel`, built on first use (transformers is imported lazily)."""
    from transformers import LlavaOnevisionModel

    class LLaVEOnevisionModel(LlavaOnevisionModel):
        """transformers' LlavaOnevisionModel with LLaVE's own packing of the anyres features.

        Same weights, same modules; only :meth:`pack_image_features` differs: the unpad keeps
        ``int(extent * scale)`` rows or columns as LLaVE does (transformers rounds to 7 decimals
        first and keeps one more for some image sizes, see
        :func:`~llave_fast.model.processor.unpadded_shape`).
        """

        def pack_image_features(self, image_features, image_sizes, image_newline=None,
                                vision_aspect_ratio="anyres_max_9"):
            cfg = self.config
            S = cfg.vision_config.image_size
            n = S // cfg.vision_config.patch_size  # the patch convolution floors (384 / 14 -> 27)
            packed = []
            for feats, size in zip(image_features, image_sizes):
                h, w = int(size[0]), int(size[1])
                base, crops = feats[0], feats[1:]
                if base.shape[0] != n * n:
                    raise InvalidArgument(f"the base view has {base.shape[0]} features, expected {n} x {n}")
                dim = base.shape[-1]
                best_h, best_w = best_resolution(h, w, cfg.image_grid_pinpoints)
                gh, gw = best_h // S, best_w // S
                if crops.shape[0] != gh * gw:
                    raise InvalidArgument(f"an image of (height, width) {(h, w)} has {crops.shape[0]} crops, expected {gh * gw}")
                # (gh, gw, n, n, D) -> (D, gh*n, gw*n): the crops' features as one map, row-major
                grid = crops.reshape(gh, gw, n, n, dim).permute(4, 0, 2, 1, 3).reshape(dim, gh * n, gw * n)
                rows, cols = unpadded_shape(h, w, gh * n, gw * n)
                top, left = (gh * n - rows) // 2, (gw * n - cols) // 2
                grid = grid[:, top: top + rows, left: left + cols]
                small = shrunk_shape(rows, cols, n, vision_aspect_ratio)
                if small != (rows, cols):
                    grid = F.interpolate(grid[None], list(small), mode="bilinear")[0]
                if image_newline is not None:  # one image_newline closes every row
                    # torch.cat's type promotion, as LLaVE's (llava_arch.py prepare_inputs_labels_for_multimodal):
                    # the same dtype when nothing autocasts; under bf16 autocast with fp16 weights the bf16
                    # features and the fp16 image_newline meet in fp32, the newline not rounded to bf16
                    dt = torch.promote_types(grid.dtype, image_newline.dtype)
                    nl = image_newline.to(device=grid.device, dtype=dt)[:, None, None]
                    grid = torch.cat([grid.to(dt), nl.expand(dim, grid.shape[1], 1)], dim=-1)
                packed.append(torch.cat([base.to(grid.dtype), grid.flatten(1).t()]))
            lens = torch.tensor([x.shape[0] for x in packed], dtype=torch.long, device=packed[0].device)
            return packed, lens

    LLaVEOnevisionModel.__module__ = __name__
    return LLaVEOnevisionModel


def __getattr__(name):
    if name == "LLaVEOnevisionModel":
        return llave_onevision_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def import_modeling_modules(config) -> None:
    """Import the transformers modeling modules ``config`` builds (the model's own and its text and
    vision towers') now, before any ``deepspeed.zero.Init``.

    transformers imports a sub-model's modeling module lazily, on first use. When that first use
    is inside ``zero.Init`` (an ``HfDeepSpeedConfig`` with ZeRO-3 alive), DeepSpeed records each
    new module class's ``__init__`` as the class is created, before decorators such as
    transformers' hub-kernel layers (``use_kernelized_func``) replace it, and puts the recorded
    one back when the context exits: every later model of that class lacks ``_kernel_funcs``
    and its first forward fails. Imported here, outside the context, the classes are complete
    before DeepSpeed sees them, and a second model in the same process builds like the first.
    """
    from transformers import AutoModel

    for sub in (config, getattr(config, "text_config", None), getattr(config, "vision_config", None)):
        if sub is not None and type(sub) in AutoModel._model_mapping:
            AutoModel._model_mapping[type(sub)]  # the lookup imports the class's module


class LLaVEEmbedder(nn.Module):
    """LLaVE: LlavaOnevisionModel -> last real token's final hidden state -> L2 norm.

    Args:
        model: a ``transformers.LlavaOnevisionModel`` (the base model, no LM head). Its class
            becomes :class:`LLaVEOnevisionModel` (same modules and weights, LLaVE's packing
            of the anyres features), in place.
        processor: the :class:`LLaVEProcessor` matching it (needed by :meth:`encode` and
            :meth:`save_pretrained`).
    """

    def __init__(self, model, processor: LLaVEProcessor | None = None):
        super().__init__()
        from transformers import LlavaOnevisionModel

        if not isinstance(model, LlavaOnevisionModel):
            raise InvalidArgumentType(f"model must be a transformers LlavaOnevisionModel, got {type(model).__name__}")
        llave_cls = llave_onevision_class()
        if type(model) is LlavaOnevisionModel:
            # same modules and weights; LLaVE's packing of the anyres features (see LLaVEOnevisionModel)
            model.__class__ = llave_cls
        elif not isinstance(model, llave_cls):
            raise InvalidArgumentType(f"model must be a LlavaOnevisionModel, not the subclass {type(model).__name__}")
        self.model = model
        self._processor = processor
        # ZeRO-3 gathers each module's weights with collectives as the module runs, so every
        # rank must run the same modules in the same order. A text-only chunk on one rank and
        # an image chunk on another would skip the vision tower on one side only (a hang).
        # When set (the trainer does so under multi-rank ZeRO-3), a chunk without images runs the
        # vision side on a blank image whose features enter the result with weight 0 (_forward).
        self.uniform_modules = False
        self._dummy = None
        # Evaluation in LLaVE's precision (llave_fast.evaluate, dtype "llave"): fp16 weights, every
        # forward under torch.autocast(dtype=autocast_dtype). None: no autocast (training, plain dtypes).
        self.autocast_dtype: torch.dtype | None = None
        if processor is not None and processor.image_token_id != model.config.image_token_index:
            raise InvalidArgument(
                f"processor image token id {processor.image_token_id} != model config image_token_index "
                f"{model.config.image_token_index}"
            )
        # Visual features are hidden states of the vision encoder, taken before its post_layernorm
        # (and SigLIP has no head here): those weights are loaded (every weight lands) but never
        # used, so they are frozen and get no optimizer state.
        post_ln = getattr(model.vision_tower, "post_layernorm", None)
        if post_ln is not None:
            post_ln.requires_grad_(False)

    # ---- properties -------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def processor(self) -> LLaVEProcessor | None:
        return self._processor

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config,
        processor: LLaVEProcessor | None = None,
        *,
        torch_dtype=None,
        attn_implementation: str | None = None,
    ) -> "LLaVEEmbedder":
        """A freshly initialised model (built under ``deepspeed.zero.Init`` when an
        ``HfDeepSpeedConfig`` with ZeRO-3 is alive)."""
        dtype = _resolve_dtype(torch_dtype)
        attn = attn_implementation or default_attn_implementation(dtype)
        from transformers import LlavaOnevisionModel

        import_modeling_modules(config)
        model = LlavaOnevisionModel._from_config(config, dtype=dtype, attn_implementation=attn)
        return cls(model, processor)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        torch_dtype=None,
        attn_implementation: str | None = None,
        vision_config: dict | Any | None = None,
        ignore_config_keys: Sequence[str] = (),
    ) -> "LLaVEEmbedder":
        """Load a checkpoint folder (or hub id, when the network allows).

        Formats: LLaVE's ``llava_qwen`` (LLaVA-NeXT) checkpoints, converted on the fly; and
        transformers' ``llava_onevision`` folders (this class's exports, llava-hf ones).
        Every weight must land: a missing or left-over tensor (other than ``lm_head``)
        raises :class:`~llave_fast.model.convert.CheckpointKeyError`.

        Args:
            torch_dtype: None (float32), "auto" (the checkpoint's dtype), or a dtype.
            attn_implementation: None picks :func:`default_attn_implementation`.
            vision_config: for ``llava_qwen`` checkpoints whose ``mm_vision_tower`` is not
                SigLIP so400m-patch14-384: the tower's own config (its ``config.json`` as a
                dict, or a config object). The layers the checkpoint keeps (LLaVE deletes the
                tower's last) are counted from the checkpoint's weight names.
            ignore_config_keys: ``llava_qwen`` config keys to let through although the
                converter does not know them (it refuses unknown keys: they may change the
                forward).

        ``llava_qwen`` configs are read in both layouts (``rope_theta`` at top level as the
        releases have it, or inside ``rope_parameters`` as transformers 5 re-saves them), and
        their ``tokenizer_model_max_length`` becomes the processor's ``max_length`` (LLaVE
        cuts every sequence, image tokens inserted, to it).

        ZeRO-3: create ``HfDeepSpeedConfig(ds_config)`` first; loading then partitions.
        """
        path = _resolve_path(path)
        raw = read_raw_config(path)
        check_model_type(raw, path)
        dtype = _resolve_dtype(torch_dtype, raw)
        keys = checkpoint_keys(path)
        if keys is None:
            raise MissingFile(f"no weights in {path!r}: none of {', '.join(WEIGHT_FILES)} (a folder with a config "
                              "alone is no model; a training run's base/ folder is one: give the run folder or its "
                              "export)")
        tokenizer = load_tokenizer(path)
        processor_kwargs = {}
        if is_llava_qwen_config(raw):
            image_id = ensure_image_token(tokenizer)
            config = convert_llava_qwen_config(
                raw, image_token_index=image_id, vision_config=vision_config,
                vision_layers=vision_layers_in_checkpoint(keys), ignore_config_keys=ignore_config_keys,
            )
            mapping = llava_qwen_key_mapping(keys, config)
            processor_kwargs["max_length"] = llava_qwen_max_length(raw)
        else:
            if ignore_config_keys:
                raise InvalidArgument("ignore_config_keys applies to llava_qwen checkpoints only; this one is in transformers format")
            config = load_config(path, vision_config=vision_config)
            mapping = None
        attn = attn_implementation or default_attn_implementation(dtype)
        from transformers import LlavaOnevisionModel

        import_modeling_modules(config)
        # loaded as transformers' class (its checkpoint-name conversions apply); __init__ switches it to LLaVE's packing
        model, info = LlavaOnevisionModel.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation=attn,
            key_mapping=mapping,
            output_loading_info=True,
        )
        if keys is not None:
            # our own check of the checkpoint's names against the model's (under ZeRO-3 transformers reports
            # no unexpected keys, so this is the guard there)
            check_checkpoint_keys(keys, model.state_dict().keys(), mapping=mapping, source=path)
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if "lm_head" not in k)
        missing = sorted(info.get("missing_keys", ()))
        mismatched = sorted(map(str, info.get("mismatched_keys", ())))
        if missing or unexpected or mismatched or info.get("error_msgs"):
            raise CheckpointKeyError(
                format_key_report(path, missing=missing, unexpected=unexpected, mismatched=mismatched,
                                  other=info.get("error_msgs", ()))
            )
        processor = LLaVEProcessor.from_pretrained(path, config=config, tokenizer=tokenizer, **processor_kwargs)
        return cls(model, processor)

    def save_pretrained(self, path: str, *, state_dict: dict | None = None, **kwargs) -> None:
        """Write a self-contained transformers-format folder: config, safetensors weights,
        tokenizer, ``preprocessor_config.json``. :meth:`from_pretrained` loads it back.

        Under ZeRO-3 the parameters are partitioned: pass the gathered ``state_dict`` (e.g.
        the engine's consolidated 16-bit state dict; keys with or without this module's
        ``model.`` prefix) and call on one rank only.
        """
        if self._processor is None:
            raise InvalidArgument("this LLaVEEmbedder has no processor: a saved folder would not be self-contained")
        if state_dict and all(k.startswith("model.") for k in state_dict):
            # this module's own state_dict: LlavaOnevisionModel names carry no "model." prefix
            state_dict = {k[len("model."):]: v for k, v in state_dict.items()}
        import inspect

        if "save_original_format" in inspect.signature(self.model.save_pretrained).parameters:
            # transformers >= 5 would otherwise write the names the weights were loaded under (LLaVA-NeXT's, for a
            # converted llava_qwen checkpoint) or its legacy layout; the export uses LlavaOnevisionModel's own names
            kwargs.setdefault("save_original_format", False)
        # a given state dict (e.g. a 16-bit export) sets the stored dtype, so "auto" loads it as written
        dtypes = {v.dtype for v in (state_dict or {}).values() if torch.is_tensor(v) and v.is_floating_point()}
        before = _file_stamps(path)
        self.model.save_pretrained(path, state_dict=dict(state_dict) if state_dict else None, **kwargs)
        _widen_to_umask(path, before)
        _fix_saved_config(os.path.join(path, "config.json"), dtypes.pop() if len(dtypes) == 1 else None)
        self._processor.save_pretrained(path)

    # ---- the forward ------------------------------------------------------------------------

    def _gather_images(self, batch: dict, input_ids: torch.Tensor, mask: torch.Tensor):
        """Validate the per-sample image entries and stack the image samples' tiles.

        Returns (pixel values, image sizes, image tokens per image); a row cut inside its
        image (the processor's ``max_length``) holds fewer image tokens than its features."""
        B = input_ids.shape[0]
        pixel_values, image_sizes = batch.get("pixel_values"), batch.get("image_sizes")
        if pixel_values is None:
            pixel_values = [None] * B
        if image_sizes is None:
            image_sizes = [None] * B
        for name, v in (("pixel_values", pixel_values), ("image_sizes", image_sizes)):
            if isinstance(v, torch.Tensor) or not isinstance(v, (list, tuple)):
                raise InvalidArgumentType(f"batch[{name!r}] must be a list with one entry (or None) per sample, got {type(v).__name__}")
            if len(v) != B:
                raise InvalidArgument(f"batch[{name!r}] has {len(v)} entries but input_ids has {B} rows")

        cfg = self.model.config
        S = cfg.vision_config.image_size
        is_image = input_ids == cfg.image_token_index
        n_img_tokens = is_image.sum(dim=1).tolist()
        last = (input_ids.shape[1] - 1) - mask.flip(dims=[1]).argmax(dim=1)
        ends_in_image = is_image[torch.arange(B, device=input_ids.device), last].tolist()
        tiles, sizes, kept = [], [], []
        for i, (pv, size) in enumerate(zip(pixel_values, image_sizes)):
            if (pv is None) != (size is None):
                raise InvalidArgument(f"sample {i}: pixel_values and image_sizes must both be given or both be None")
            if pv is None:
                if n_img_tokens[i]:
                    raise InvalidArgument(f"sample {i} has {n_img_tokens[i]} image tokens but no image (pixel_values is None)")
                continue
            if not isinstance(pv, torch.Tensor) or pv.dim() != 4 or tuple(pv.shape[1:]) != (3, S, S):
                got = tuple(pv.shape) if isinstance(pv, torch.Tensor) else type(pv).__name__
                raise InvalidArgument(f"sample {i}: pixel_values must be a (n_tiles, 3, {S}, {S}) tensor, got {got}")
            if len(size) != 2 or min(size) <= 0:
                raise InvalidArgument(f"sample {i}: image_sizes entry must be (height, width), got {size!r}")
            h, w = int(size[0]), int(size[1])
            want_tiles = num_image_tiles(h, w, image_size=S, grid_pinpoints=cfg.image_grid_pinpoints)
            if pv.shape[0] != want_tiles:
                raise InvalidArgument(
                    f"sample {i}: an image of (height, width) = {(h, w)} needs {want_tiles} tiles with this model's "
                    f"grid pinpoints, got {pv.shape[0]} (was it processed for another model?)"
                )
            want_tokens = count_image_tokens(
                h, w, image_size=S, patch_size=cfg.vision_config.patch_size,
                grid_pinpoints=cfg.image_grid_pinpoints, vision_aspect_ratio=cfg.vision_aspect_ratio,
            )
            cut = 0 < n_img_tokens[i] < want_tokens and ends_in_image[i]  # the sequence was cut inside the image
            if n_img_tokens[i] != want_tokens and not cut:
                limit = getattr(getattr(self, "processor", None), "max_length", None)
                hint = ""
                if limit is not None and int(mask[i].sum()) >= limit:  # the processor's cut ended the row
                    hint = (f": max_length={limit} (--max-length) cut the sequence before its image; LLaVE's "
                            f"prompt and this image need at least {int(mask[i].sum()) + want_tokens} tokens")
                raise InvalidArgument(
                    f"sample {i} has {n_img_tokens[i]} image tokens but its image of (height, width) = {(h, w)} "
                    f"gives {want_tokens} visual features" + hint
                )
            tiles.append(pv)
            sizes.append((h, w))
            kept.append(n_img_tokens[i])
        if not tiles:
            return None, None, []
        device = input_ids.device
        pixel = torch.cat(tiles).to(device=device, dtype=self.model.dtype, non_blocking=True)
        return pixel, torch.tensor(sizes, dtype=torch.long, device=device), kept

    def autocast(self):
        """The context every forward runs in: ``torch.autocast`` to :attr:`autocast_dtype` on the
        weights' device when set (LLaVE's evaluation precision), else nothing.

        LLaVE evaluates with the weights in fp16 (``llava/model/builder.py: load_pretrained_model``,
        ``torch_dtype="float16"`` by default, which ``llava/eval/model_embed.py: main`` and
        ``CLIP4Clip/main_task_retrieval.py: main`` keep) and every forward under
        ``torch.autocast(dtype=torch.bfloat16, device_type="cuda")`` (``model_embed.py: main``,
        ``main_task_retrieval.py: eval_epoch``): matrix products in bf16, while the residual stream
        (fp16 embeddings + bf16 sub-layer outputs) is promoted to fp32, so every RMSNorm, the final
        one included, comes out in fp32.
        """
        import contextlib

        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = self.model.get_input_embeddings().weight.device
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def forward(self, batch: dict) -> torch.Tensor:
        """The batch dict of :mod:`llave_fast.model.processor` -> (B, d) float32, unit rows.

        A video batch (:func:`~llave_fast.model.video.video_batch`, with ``pixel_values_videos``)
        is embedded here too, so that DeepSpeed ZeRO-3 gathers what the video path reads
        (``image_newline``) as it does for images: inside the root module's forward."""
        if isinstance(batch, dict) and "pixel_values_videos" in batch:
            from .video import video_forward

            return video_forward(self, batch)
        if self.autocast_dtype is not None:
            with self.autocast():
                return self._forward(batch)
        return self._forward(batch)

    def _forward(self, batch: dict) -> torch.Tensor:
        if not isinstance(batch, dict):
            raise InvalidArgumentType(f"batch must be a dict with keys {BATCH_KEYS}, got {type(batch).__name__}")
        for key in ("input_ids", "attention_mask"):
            if key not in batch:
                raise MissingKey(f"batch has no {key!r} (keys: {sorted(batch)}; expected {BATCH_KEYS})")
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InvalidArgument(f"input_ids must be an integer (B, L) tensor, got {getattr(input_ids, 'shape', input_ids)!r}")
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise InvalidArgument(
                f"attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                f"got {getattr(attention_mask, 'shape', attention_mask)!r}"
            )
        B, L = input_ids.shape
        if B == 0:
            raise InvalidArgument("empty batch (input_ids has 0 rows)")
        device = self.model.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        mask = attention_mask.to(device=device, dtype=torch.long)
        lengths = mask.sum(dim=1)
        if bool((lengths == 0).any()):
            raise InvalidArgument(f"rows {torch.nonzero(lengths == 0).flatten().tolist()} have no real token (all padding)")
        pixel_values, image_sizes, kept = self._gather_images(batch, input_ids, mask)

        # positions count real tokens only: left and right padding give the same positions
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
        embeds = self._input_embeddings(input_ids, pixel_values, image_sizes, kept)
        tie = None
        if pixel_values is None and self.uniform_modules:
            # the vision side runs on a blank image here, where an image batch runs it (after the token
            # embeddings, before the language model), and joins the result with weight 0: its modules
            # run (and get zero gradients) on this rank as on the others. Its features never enter the
            # language model, so a text-only batch keeps its own length (no image-long dummy row).
            pixel, sizes = self._dummy_image(device)
            tie = 0.0 * self.model.get_image_features(pixel_values=pixel, image_sizes=sizes).pooler_output[0].sum()
        out = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state  # (B, L, D), after the final RMSNorm
        # last real token of each row, whichever side the padding is on
        last = (L - 1) - mask.flip(dims=[1]).argmax(dim=1)
        pooled = hidden[torch.arange(B, device=device), last]
        if tie is not None:
            pooled = pooled + tie.to(pooled.dtype)
        return F.normalize(pooled.float(), dim=-1)

    def _input_embeddings(self, input_ids, pixel_values, image_sizes, kept):
        """Token embeddings with each image's visual features written over its image tokens,
        in batch order; an image cut by ``max_length`` keeps its first features (as LLaVE's
        cut of the whole sequence does)."""
        m = self.model
        embeds = m.get_input_embeddings()(input_ids)
        if self.autocast_dtype is not None:
            # LLaVE's evaluation (llava_arch.py prepare_inputs_labels_for_multimodal): every row's
            # embeddings go through torch.cat with the image features (bf16/fp32 under autocast, a
            # zero-length slice for a text-only row), which promotes the fp16 token embeddings to fp32
            embeds = embeds.float()
        if pixel_values is None:
            return embeds
        feats = m.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes).pooler_output
        feats = torch.cat([f[:k] for f, k in zip(feats, kept)])
        if self.autocast_dtype is None:
            feats = feats.to(embeds.dtype)
        else:  # promoted as LLaVE's torch.cat promotes (fp32 under bf16 autocast with fp16 weights)
            dt = torch.promote_types(embeds.dtype, feats.dtype)
            embeds, feats = embeds.to(dt), feats.to(dt)
        where = (input_ids == m.config.image_token_index).unsqueeze(-1)
        return embeds.masked_scatter(where.expand_as(embeds), feats)

    def _dummy_image(self, device):
        """(tiles, image sizes) of one blank image of one tile's size, for :attr:`uniform_modules`."""
        from PIL import Image

        if self._processor is None:
            raise InvalidArgument("uniform_modules needs the processor (to build the dummy image)")
        if self._dummy is None:
            size = self.model.config.vision_config.image_size
            d = self._processor(["<image>"], [Image.new("RGB", (size, size))])
            self._dummy = (d["pixel_values"][0], d["image_sizes"][0])
        pix, size = self._dummy
        return (pix.to(device=device, dtype=self.model.dtype),
                torch.tensor([tuple(size)], dtype=torch.long, device=device))

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        images: Sequence[Any] | None = None,
        batch_size: int = 16,
        padding_side: str = "right",
    ) -> torch.Tensor:
        """Embed texts (each with an optional PIL image) in eval mode without grad.

        ``<|image_N|>`` placeholders become the image token; an image whose text has no
        placeholder goes before the text (the processor's ``image_without_placeholder``, "prepend"
        by default; "drop" is LLaVE's rule, the text alone, which evaluation and training use).
        Returns a (B, d) float32 CPU tensor of unit rows.
        """
        if self._processor is None:
            raise InvalidArgument("encode needs a processor: build the embedder with one (from_pretrained does)")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidArgument(f"batch_size must be a positive int, got {batch_size!r}")
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise InvalidArgumentType(f"texts must be a list of str, got {type(texts).__name__}")
        if images is not None and (not isinstance(images, (list, tuple)) or len(images) != len(texts)):
            n = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
            raise InvalidArgument(f"texts has {len(texts)} entries but images has {n}: give one image (or None) per text")
        was_training = self.training
        self.eval()
        try:
            out = []
            for lo in range(0, len(texts), batch_size):
                hi = lo + batch_size
                batch = self._processor(
                    list(texts[lo:hi]), None if images is None else list(images[lo:hi]), padding_side=padding_side
                )
                out.append(self(batch).cpu())
            if not out:
                return torch.empty(0, self.embed_dim)
            return torch.cat(out)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def encode_videos(self, videos: Sequence[Any], batch_size: int = 4, max_length: int = 8192) -> torch.Tensor:
        """Embed videos as LLaVE's zero-shot video retrieval does (see :mod:`llave_fast.model.video`):
        each video is its sampled frames, a uint8 (F, H, W, 3) array or a list of PIL images
        (:func:`llave_fast.eval_video.decode_video` gives them). Returns a (V, d) float32 CPU tensor
        of unit rows; captions go through :meth:`encode` with
        :data:`~llave_fast.model.video.CAPTION_PROMPT` in front. A video longer than ``max_length``
        tokens (capped by the model's ``max_position_embeddings``) is refused, not cut."""
        from .video import embed_video_batch, frames_to_pixels, video_batch, video_length_limit

        if self._processor is None:
            raise InvalidArgument("encode_videos needs a processor: build the embedder with one (from_pretrained does)")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise InvalidArgument(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(videos, (list, tuple)):
            raise InvalidArgumentType(f"videos must be a list (one frames array or list of frames per video), "
                            f"got {type(videos).__name__}")
        limit = video_length_limit(self.model.config, max_length)
        was_training = self.training
        self.eval()
        try:
            out = []
            for lo in range(0, len(videos), batch_size):
                chunk = videos[lo: lo + batch_size]
                pixels = [frames_to_pixels(self._processor, v, lo + i) for i, v in enumerate(chunk)]
                out.append(embed_video_batch(self, video_batch(self._processor, pixels, max_length=limit)).cpu())
            return torch.cat(out) if out else torch.empty(0, self.embed_dim)
        finally:
            self.train(was_training)

    # ---- training switches ------------------------------------------------------------------

    def set_image_grid(self, grid) -> None:
        """Override the anyres grid of the model config and the processor alike.

        ``grid`` in LLaVA-NeXT's (width, height) forms: ``"(1x1),...,(2x2)"`` (tile counts,
        every grid in the range, times the tile size; LLaVE's setting) or a list of
        [width, height] pixel pairs (or its JSON string). No weight depends on the grid.
        """
        from .convert import parse_grid_pinpoints
        from .processor import _check_pinpoints

        if self._processor is None:
            raise InvalidArgument("set_image_grid needs the processor (it tiles the images)")
        S = self.model.config.vision_config.image_size
        try:
            pins = _check_pinpoints(parse_grid_pinpoints(grid, S), S)
        except (ValueError, SyntaxError) as e:
            raise InvalidArgument(f"image_grid {grid!r} is not '(1x1),...,(2x2)' or a list of [width, height] pairs "
                             f"of multiples of the tile size {S}: {e}") from e
        self.model.config.image_grid_pinpoints = pins
        self._processor.image_grid_pinpoints = [list(p) for p in pins]
        self._dummy = None

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant activation checkpointing of every vision and language layer."""
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.model, "activation_checkpointing_disable"):
            self.model.activation_checkpointing_disable()
        else:
            self.model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        flag = getattr(type(self.model), "is_activation_checkpointing", None)
        return bool(self.model.is_activation_checkpointing if flag is not None else self.model.is_gradient_checkpointing)

    def extra_repr(self) -> str:
        c = self.model.config
        return (
            f"embed_dim={self.embed_dim}, vision={c.vision_config.model_type} x{c.vision_config.num_hidden_layers}, "
            f"text=qwen2 x{c.text_config.num_hidden_layers}, attn={c._attn_implementation}"
        )
