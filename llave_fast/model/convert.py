"""LLaVA-NeXT ``llava_qwen`` checkpoints (the official LLaVE releases) -> transformers' LlavaOnevision.

The released LLaVE checkpoints (zhibinlan/LLaVE-0.5B, -2B, -7B) are in the original
LLaVA-NeXT layout: a flat Qwen2 ``config.json`` (written by transformers 4.x: ``rope_theta``
and ``torch_dtype`` at top level) plus ``mm_*`` keys, and weights named::

    model.embed_tokens.* / model.layers.* / model.norm.*      the Qwen2 language model
    model.vision_tower.vision_tower.vision_model.*            SigLIP, its last layer deleted
    model.mm_projector.0.* / model.mm_projector.2.*           Linear, GELU, Linear
    model.image_newline
    lm_head.weight                                            dropped: an embedder never uses it

Nothing is rewritten on disk: :func:`convert_llava_qwen_config` builds the
``LlavaOnevisionConfig`` and :data:`LLAVA_QWEN_KEY_MAPPING` renames the weights while
transformers' ``from_pretrained`` loads them (``key_mapping=``), so DeepSpeed ZeRO-3
partitioning at load time (``HfDeepSpeedConfig`` created before ``from_pretrained``) works
unchanged. :func:`check_checkpoint_keys` compares the checkpoint's key names (read from the
safetensors headers) with the model's, and fails on anything missing or left over
(``lm_head`` excepted); under ZeRO-3, where transformers reports no unexpected keys, it is
the only guard.

Conventions: LLaVA-NeXT stores grid pinpoints and image sizes as (width, height);
transformers expects (height, width). The pinpoints are swapped here.
"""

from __future__ import annotations

import ast
import json
import os
import re
from typing import Any
from ..errors import InvalidArgument, MissingFile

__all__ = [
    "LLAVA_QWEN_KEY_MAPPING",
    "KNOWN_VISION_TOWERS",
    "CheckpointKeyError",
    "is_llava_qwen_config",
    "convert_llava_qwen_config",
    "parse_grid_pinpoints",
    "load_config",
    "checkpoint_keys",
    "check_checkpoint_keys",
    "check_known_keys",
    "rope_theta_of",
    "vision_layers_in_checkpoint",
    "llava_qwen_max_length",
    "llava_qwen_key_mapping",
    "load_tokenizer",
]

# checkpoint name (regex, matched from the start) -> LlavaOnevisionModel parameter name
LLAVA_QWEN_KEY_MAPPING: dict[str, str] = {
    r"^model\.vision_tower\.vision_tower\.vision_model\.": "vision_tower.",
    r"^model\.mm_projector\.0\.": "multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "multi_modal_projector.linear_2.",
    r"^model\.image_newline$": "image_newline",
    r"^model\.(embed_tokens|layers|norm)\.": r"language_model.\1.",
}

# Vision towers whose config is known without downloading anything: the tower's own config
# (so400m has 27 layers). The layers a checkpoint keeps are counted from its weight names
# (LLaVA-NeXT's SigLIP tower deletes the last layer: 26 of 27).
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model",
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        patch_size=14,
        image_size=384,
        num_channels=3,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        vision_use_head=False,
    ),
}

# lm_head is the only checkpoint entry an embedder leaves behind on purpose
_DROPPED = re.compile(r"(^|\.)lm_head\.")

_VISION_LAYER = re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")

_QWEN2_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "head_dim",
)

# Keys of a llava_qwen config.json that the converter reads or checks (below), and keys that
# do not change the embedding of an image or a text (training switches, video-only options,
# bookkeeping). Any other key stops the conversion: a key that changes the forward must never
# be dropped silently (``ignore_config_keys=`` lets a caller who checked one through).
_READ_KEYS = frozenset(_QWEN2_KEYS) | {
    "model_type", "rope_theta", "rope_parameters", "rope_scaling", "torch_dtype", "dtype", "layer_types",
    "mm_vision_tower", "vision_tower", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_projector_type", "mm_patch_merge_type", "image_aspect_ratio", "image_grid_pinpoints",
    "tokenizer_model_max_length", "mm_use_im_start_end", "mm_use_im_patch_token", "image_crop_resolution",
    "image_split_resolution", "mm_resampler_type",
}
_NO_EFFECT_KEYS = frozenset({
    # bookkeeping and generic PretrainedConfig fields
    "architectures", "_name_or_path", "transformers_version", "use_cache", "initializer_range", "id2label",
    "label2id", "problem_type", "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder",
    "chunk_size_feed_forward", "tokenizer_padding_side", "torchscript", "use_bfloat16", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size", "pruned_heads", "prefix",
    "finetuning_task", "task_specific_params", "tokenizer_class", "tf_legacy_loss", "sep_token_id",
    "decoder_start_token_id", "_attn_implementation", "_attn_implementation_autoset", "attn_implementation",
    # generation settings (an embedder never generates)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # only read with rope_scaling, which LLaVE sets to None
    "max_sequence_length",
    # training only (dropout is off at inference; the loss's own scale and hardness)
    "attention_dropout", "use_pos_skipping", "pos_skipping_range", "mm_tunable_parts", "mm_vision_tower_lr",
    "mm_projector_lr", "unfreeze_mm_vision_tower", "tune_mm_mlp_adapter", "tune_mm_vision_resampler",
    "freeze_mm_mlp_adapter", "freeze_mm_vision_resampler", "use_mm_proj", "vision_tower_pretrained",
    "mm_vision_tower_pretrained", "delay_load", "logit_scale", "alpha",
    # video only (LLaVE embeds images and texts); mm_newline_position, mm_spatial_pool_mode and
    # add_faster_video are carried into the config and checked by llave_fast.model.video.check_video_config
    "mm_newline_position", "mm_spatial_pool_mode", "mm_spatial_pool_stride", "mm_spatial_pool_out_channels",
    "mm_pooling_position", "mm_resampler_location", "add_faster_video", "faster_token_stride", "force_sample",
    "add_time_instruction", "frames_upbound", "max_frames_num", "video_fps", "tokens_per_frame",
})


class CheckpointKeyError(InvalidArgument):
    """A checkpoint's weights do not match the model: some missing, some left over."""


def is_llava_qwen_config(raw: dict) -> bool:
    """LLaVA-NeXT's layout: ``llava_qwen`` (LLaVE), or ``llava`` / ``qwen2`` with ``mm_*`` keys
    (LLaVA-OneVision's own releases say ``llava``). A LLaVA-NeXT checkpoint whose language model is
    not Qwen2 (``LlavaLlamaForCausalLM``, ``LlavaMistralForCausalLM``...) is refused, naming it."""
    found = raw.get("model_type") == "llava_qwen" or (
        "mm_vision_tower" in raw and raw.get("model_type") in (None, "qwen2", "llava_qwen", "llava")
    )
    archs = raw.get("architectures") or []
    if found and isinstance(archs, list) and archs and not any("qwen" in str(a).lower() for a in archs):
        raise InvalidArgument(
            f"this LLaVA-NeXT checkpoint's language model is not Qwen2 (architectures {archs}): llave-fast converts "
            "LLaVA-NeXT checkpoints with a Qwen2 language model (LLaVE, LLaVA-OneVision: LlavaQwenForCausalLM) only")
    return found


def rope_theta_of(raw: dict) -> float:
    """The language model's RoPE base from either config layout.

    transformers 4.x (the released checkpoints): ``rope_theta`` at top level. transformers 5
    (a re-saved model): ``rope_parameters = {"rope_type": "default", "rope_theta": ...}``.
    LLaVE's constructor sets ``rope_scaling = None``, so a 4.x ``rope_scaling`` is ignored as
    LLaVE ignores it; in the 5.x layout anything but plain RoPE is refused. A config without a
    theta is refused too (never a default).
    """
    top = raw.get("rope_theta")
    params = raw.get("rope_parameters")
    theta = None
    if params is not None:
        if not isinstance(params, dict):
            raise InvalidArgument(f"rope_parameters must be a dict, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if kind != "default" or extra:
            raise InvalidArgument(
                f"rope_parameters {params!r}: only plain RoPE (rope_type 'default', rope_theta) is supported; "
                f"LLaVE runs with rope_scaling = None"
            )
        theta = params.get("rope_theta")
    if theta is not None and top is not None and float(theta) != float(top):
        raise InvalidArgument(f"the config gives two RoPE bases: rope_theta {top} and rope_parameters.rope_theta {theta}")
    theta = top if theta is None else theta
    if theta is None:
        raise InvalidArgument(
            "the llava_qwen config has no rope_theta (neither at top level nor in rope_parameters): refusing to guess "
            "(Qwen2 models use 1000000.0); add it to config.json"
        )
    theta = float(theta)
    if not theta > 0:
        raise InvalidArgument(f"rope_theta must be positive, got {theta}")
    return theta


def check_known_keys(raw: dict, ignore=()) -> None:
    """Refuse a llava_qwen config with a key the converter neither reads nor knows to be
    harmless, or a read key whose value would change the forward in a way not reproduced."""
    unknown = set(raw) - _READ_KEYS - _NO_EFFECT_KEYS - set(ignore or ())
    if raw.get("mm_resampler_type") is None:  # a resampler's own settings, when there is no resampler
        unknown = {k for k in unknown if not k.startswith(("mm_perceiver_", "mm_qformer_", "mm_mask_drop_"))}
    unknown = sorted(unknown)
    if unknown:
        raise InvalidArgument(
            f"the llava_qwen config has keys the converter does not understand: {unknown}. They may change the "
            f"model's forward; after checking that they do not, pass ignore_config_keys={unknown!r}"
        )
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw.get(key):
            raise InvalidArgument(f"{key}={raw[key]!r} adds tokens around the image: not supported (LLaVE uses false)")
    for key in ("image_crop_resolution", "image_split_resolution", "mm_resampler_type"):
        if raw.get(key) is not None:
            raise InvalidArgument(f"{key}={raw[key]!r} is not supported (LLaVE leaves it null)")
    if raw.get("use_sliding_window"):
        raise InvalidArgument("use_sliding_window=true is not supported (LLaVE's Qwen2 attends to the whole sequence)")
    layer_types = raw.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise InvalidArgument(f"layer_types {sorted(set(layer_types))}: only full_attention layers are supported")


def vision_layers_in_checkpoint(keys) -> int | None:
    """How many vision-tower layers a llava_qwen checkpoint keeps, from its weight names
    (None when it has no vision-tower layer at all). The indices must run 0..k-1."""
    if keys is None:
        return None
    found = sorted({int(m.group(1)) for k in keys if (m := _VISION_LAYER.match(k))})
    if not found:
        return None
    if found != list(range(len(found))):
        missing = sorted(set(range(found[-1] + 1)) - set(found))
        raise CheckpointKeyError(f"the checkpoint's vision-tower layers are not 0..{found[-1]}: missing {missing}")
    return len(found)


def parse_grid_pinpoints(value, image_size: int) -> list[list[int]]:
    """LLaVA-NeXT pinpoints, (width, height), in any of their stored forms -> [[h, w], ...].

    Forms: a list of pairs; a string of that list; or ``"(1x1),...,(2x2)"`` (tile counts,
    expanded to every grid in the range and scaled by ``image_size``).
    """
    if isinstance(value, str):
        s = value.replace(" ", "")
        m = re.findall(r"\((\d+)x(\d+)\)", s)
        if "x" in s and m:
            (w0, h0), (w1, h1) = (tuple(map(int, m[0])), tuple(map(int, m[-1])))
            pairs = [(w * image_size, h * image_size) for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
        else:
            try:
                pairs = ast.literal_eval(value)
            except (ValueError, SyntaxError) as e:
                raise InvalidArgument(f"cannot read image_grid_pinpoints {value!r}: give '(1x1),...,(2x2)' (tile "
                                      "counts) or a list of [width, height] pairs in pixels") from e
    else:
        pairs = value
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise InvalidArgument(f"cannot read image_grid_pinpoints {value!r}")
    out = []
    for p in pairs:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise InvalidArgument(f"image_grid_pinpoints entry {p!r} is not a (width, height) pair")
        w, h = int(p[0]), int(p[1])
        out.append([h, w])
    return out


def _vision_config_for(raw: dict, vision_config, vision_layers: int | None) -> dict:
    vc = _tower_config(raw, vision_config)
    tower_layers = vc.get("num_hidden_layers")
    if not isinstance(tower_layers, int) or tower_layers < 1:
        raise InvalidArgument(f"the vision tower's config needs num_hidden_layers (a positive int), got {tower_layers!r}")
    siglip = "siglip" in vc["model_type"]
    if vision_layers is None:
        # LLaVA-NeXT's SigLIP tower deletes its last layer
        vision_layers = tower_layers - 1 if siglip else tower_layers
    elif siglip and vision_layers == tower_layers:
        raise CheckpointKeyError(
            f"the checkpoint keeps all {tower_layers} layers of its SigLIP tower, but LLaVA-NeXT's SigLIP tower (LLaVE's) "
            f"deletes the last one and runs {tower_layers - 1}: LLaVE would ignore the weights of layer "
            f"{tower_layers - 1}, and running them would give other embeddings. Remove "
            f"model.vision_tower.vision_tower.vision_model.encoder.layers.{tower_layers - 1}.* from the checkpoint; if "
            f"your model really runs {tower_layers} layers (or the vision_config given already has its last layer "
            f"removed), pass vision_config as the tower's own config, before LLaVA-NeXT deletes its last layer: "
            f"num_hidden_layers={tower_layers + 1}")
    if not isinstance(vision_layers, int) or not 1 <= vision_layers <= tower_layers:
        raise CheckpointKeyError(
            f"the checkpoint keeps {vision_layers!r} vision-tower layers (encoder.layers.0..{vision_layers - 1}) but "
            f"the tower {vc['model_type']} has {tower_layers}: is vision_config the right tower?"
        )
    vc["num_hidden_layers"] = vision_layers
    return vc


def _tower_config(raw: dict, vision_config) -> dict:
    if vision_config is not None:
        if hasattr(vision_config, "to_dict"):
            vision_config = vision_config.to_dict()
        vc = dict(vision_config)
        if vc.get("model_type") in ("siglip", "clip") and isinstance(vc.get("vision_config"), dict):
            # a two-tower SiglipConfig / CLIPConfig (the config.json of most hub towers): its vision half
            outer = vc["model_type"]
            vc = dict(vc["vision_config"])
            vc.setdefault("model_type", f"{outer}_vision_model")
        vc.setdefault("model_type", "siglip_vision_model")
        if "siglip" in vc["model_type"]:
            vc.setdefault("vision_use_head", False)  # LLaVA-NeXT replaces SigLIP's head with Identity
        return vc
    name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not name:
        raise InvalidArgument("the llava_qwen config has no mm_vision_tower: pass vision_config=... explicitly")
    base = os.path.basename(str(name).rstrip("/"))
    if base in KNOWN_VISION_TOWERS:
        return dict(KNOWN_VISION_TOWERS[base])
    raise InvalidArgument(
        f"unknown vision tower {name!r} (known without a download: {sorted(KNOWN_VISION_TOWERS)}); pass "
        f"vision_config=<the tower's own config.json as a dict or config object; the layers the checkpoint keeps are "
        f"counted from its weight names>"
    )


def convert_llava_qwen_config(
    raw: dict, *, image_token_index: int, vision_config=None, vision_layers: int | None = None, ignore_config_keys=()
):
    """A ``llava_qwen`` config.json (dict) -> ``LlavaOnevisionConfig``.

    ``image_token_index`` is the id the tokenizer gives ``<image>`` (LLaVE's tokenizers have
    no such token: the loader adds it; it must lie inside the embedding table, whose unused
    row it takes: the row is overwritten by visual features anyway).

    ``vision_config``: the tower's own config (for towers other than so400m-patch14-384).
    ``vision_layers``: the tower layers the checkpoint keeps (the loader counts them from the
    weight names, :func:`vision_layers_in_checkpoint`); None applies LLaVA-NeXT's rule
    (SigLIP: all but the last).

    Both config layouts are read (:func:`rope_theta_of`); a key that is neither understood
    nor known to leave the forward alone raises (:func:`check_known_keys`).
    """
    from transformers import AutoConfig, LlavaOnevisionConfig, Qwen2Config

    if not is_llava_qwen_config(raw):
        raise InvalidArgument(f"not a llava_qwen config (model_type={raw.get('model_type')!r}, no mm_vision_tower)")
    check_known_keys(raw, ignore_config_keys)

    # ---- language model: flat Qwen2 keys; LLaVE's constructor sets rope_scaling = None
    text = {k: raw[k] for k in _QWEN2_KEYS if k in raw}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta_of(raw)}
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    text_config = Qwen2Config(**text)
    if not 0 <= image_token_index < text_config.vocab_size:
        raise InvalidArgument(
            f"the image token id {image_token_index} is outside the checkpoint's embedding table "
            f"(vocab_size {text_config.vocab_size})"
        )

    # ---- vision tower
    vc = _vision_config_for(raw, vision_config, vision_layers)
    model_type = vc.pop("model_type")
    vision = AutoConfig.for_model(model_type, **vc)
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size:
        raise InvalidArgument(f"mm_hidden_size {mm_hidden} != the vision tower's hidden_size {vision.hidden_size}")
    if "siglip" in model_type:
        # LLaVA-NeXT's SigLIP tower: the output of its last (kept) layer, before post_layernorm, every patch;
        # mm_vision_select_layer is not applied again
        feature_layer, strategy = -1, "full"
    else:
        # its CLIP tower applies mm_vision_select_layer and drops CLS for "patch"
        feature_layer = int(raw.get("mm_vision_select_layer", -2))
        strategy = "default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full"

    # ---- projector
    proj = raw.get("mm_projector_type", "linear")
    if proj != "mlp2x_gelu":
        raise InvalidArgument(f"mm_projector_type {proj!r} is not supported (LLaVE uses 'mlp2x_gelu': Linear, GELU, Linear)")

    # ---- anyres
    merge = raw.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise InvalidArgument(f"mm_patch_merge_type {merge!r} is not supported (LLaVE uses 'spatial_unpad')")
    aspect = str(raw.get("image_aspect_ratio", ""))
    if "image_grid_pinpoints" not in raw or raw["image_grid_pinpoints"] is None:
        raise InvalidArgument("the llava_qwen config has no image_grid_pinpoints")
    pinpoints = parse_grid_pinpoints(raw["image_grid_pinpoints"], vision.image_size)
    if re.fullmatch(r"anyres_max_\d+", aspect):
        vision_aspect_ratio = aspect
    elif aspect == "anyres":
        # plain anyres never shrinks the feature map: a cap of the largest grid's tile count never triggers
        max_tiles = max((h // vision.image_size) * (w // vision.image_size) for h, w in pinpoints)
        vision_aspect_ratio = f"anyres_max_{max_tiles}"
    else:
        raise InvalidArgument(f"image_aspect_ratio {aspect!r} is not supported (LLaVE uses anyres / anyres_max_N)")

    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=int(image_token_index),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=vision_aspect_ratio,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    if dtype is not None:
        config.dtype = dtype
        config.text_config.dtype = dtype
        config.vision_config.dtype = dtype
    # video-only layout keys, carried (an export keeps them) for llave_fast.model.video.check_video_config,
    # with what LLaVE's code reads when a key is absent (llava_arch.py prepare_inputs_labels_for_multimodal:
    # getattr(config, "mm_newline_position", "one_token"); get_2dPool: config.mm_spatial_pool_mode, no default)
    config.mm_newline_position = raw.get("mm_newline_position", "one_token")
    config.mm_spatial_pool_mode = raw.get("mm_spatial_pool_mode")
    config.add_faster_video = raw.get("add_faster_video", False)
    return config


def check_model_type(raw: dict, path: str) -> None:
    """Refuse a config.json of neither format this package loads."""
    if not is_llava_qwen_config(raw) and raw.get("model_type") != "llava_onevision":
        raise InvalidArgument(
            f"{path!r}: model_type {raw.get('model_type')!r} is neither llava_qwen (LLaVA-NeXT) nor llava_onevision"
        )


def read_raw_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise MissingFile(f"no config.json in {path!r}")
    with open(file) as f:
        return json.load(f)


def load_config(path: str, *, tokenizer=None, vision_config=None, ignore_config_keys=()):
    """The ``LlavaOnevisionConfig`` of a local checkpoint folder in either format.

    For ``llava_qwen`` folders, ``tokenizer`` (with ``<image>`` added if it lacked it) gives the
    image token id; without it the tokenizer is loaded from the folder. The vision-tower
    layers kept are counted from the checkpoint's weight names.
    """
    raw = read_raw_config(path)
    if is_llava_qwen_config(raw):
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        ensure_image_token(tokenizer)
        return convert_llava_qwen_config(
            raw, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_config=vision_config,
            vision_layers=vision_layers_in_checkpoint(checkpoint_keys(path)), ignore_config_keys=ignore_config_keys,
        )
    check_model_type(raw, path)
    if vision_config is not None:
        raise InvalidArgument("vision_config applies to llava_qwen checkpoints only; this one is in transformers format")
    if ignore_config_keys:
        raise InvalidArgument("ignore_config_keys applies to llava_qwen checkpoints only; this one is in transformers "
                              "format")
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig.from_pretrained(path)


def load_tokenizer(path: str):
    """The tokenizer of a local folder, by the class its ``tokenizer_config.json`` names (no
    config.json detour: a ``llava_qwen`` config is not one transformers' AutoConfig knows)."""
    import transformers

    file = os.path.join(path, "tokenizer_config.json")
    name = None
    if os.path.isfile(file):
        with open(file) as f:
            name = json.load(f).get("tokenizer_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoTokenizer
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise MissingFile(f"no tokenizer in {path!r}: none of {', '.join(TOKENIZER_FILES)} (a model folder carries "
                          "its tokenizer; copy it from the folder the model came from)")
    try:
        tokenizer = cls.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:  # what transformers raises for a broken or partial one
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InvalidArgument(f"the tokenizer in {path!r} ({', '.join(present)}) could not be loaded: "
                              f"{type(e).__name__}: {first}") from e
    vocab = len(tokenizer.get_vocab())
    if vocab < 2:  # a tokenizer_config.json without the vocabulary files: transformers builds one of its special tokens
        raise InvalidArgument(f"the tokenizer in {path!r} has no vocabulary ({vocab} token{'' if vocab == 1 else 's'}, from {', '.join(present)}); "
                              "copy the tokenizer files from the folder the model came from")
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def ensure_image_token(tokenizer, token: str = "<image>") -> int:
    """The id of ``token``, added to the tokenizer as a special (never split) token if absent."""
    if token not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(token))


# --------------------------------------------------------------------------------------------
# checkpoint key names, read from the headers only (no weight is loaded)
# --------------------------------------------------------------------------------------------


def checkpoint_keys(path: str) -> list[str] | None:
    """Tensor names in a folder's checkpoint: safetensors (index or single file) or a pickled
    ``pytorch_model.bin`` (index, or the file memory-mapped: no weight is read). None when
    the folder holds neither."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        file = os.path.join(path, index)
        if os.path.isfile(file):
            with open(file) as f:
                return sorted(json.load(f)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return sorted(f.keys())
    pickled = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(pickled):
        import torch

        return sorted(torch.load(pickled, map_location="meta", weights_only=True, mmap=True))
    return None


def llava_qwen_max_length(raw: dict) -> int | None:
    """LLaVE's ``tokenizer_model_max_length``: its forward cuts every sequence (image tokens
    inserted) to this many tokens. None when the config does not set it."""
    value = raw.get("tokenizer_model_max_length")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(f"tokenizer_model_max_length must be a positive int, got {value!r}")
    return value


def llava_qwen_key_mapping(keys: list[str] | None, config) -> dict[str, str]:
    """The key mapping for one checkpoint. A tied Qwen2 (0.5B) checkpoint that kept only
    ``lm_head.weight`` gets its embedding table from there."""
    mapping = dict(LLAVA_QWEN_KEY_MAPPING)
    if (
        keys is not None
        and "model.embed_tokens.weight" not in keys
        and "lm_head.weight" in keys
        and config.text_config.tie_word_embeddings
    ):
        mapping[r"^lm_head\.weight$"] = "language_model.embed_tokens.weight"
    return mapping


def _rename(key: str, mapping: dict[str, str]) -> str:
    for pattern, repl in mapping.items():
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def _normalise_transformers_key(key: str) -> str:
    # LlavaOnevisionForConditionalGeneration exports (model.*) and the older llava-hf layout
    # (language_model.model.*) both name the same LlavaOnevisionModel parameters
    key = re.sub(r"^model\.", "", key)
    key = re.sub(r"^language_model\.model\.", "language_model.", key)
    return key


def check_checkpoint_keys(
    ckpt_keys: list[str], model_keys, *, mapping: dict[str, str] | None, source: str
) -> None:
    """Raise :class:`CheckpointKeyError` unless every model weight has exactly one checkpoint
    entry and every checkpoint entry but ``lm_head`` lands in the model."""
    model_keys = set(model_keys)
    renamed = {}
    for k in ckpt_keys:
        if mapping is not None:
            target = _rename(k, mapping)
            if target == k and _DROPPED.search(k):
                continue  # lm_head, unless the mapping turns it into the (tied) embedding table
        else:
            if _DROPPED.search(k):
                continue
            target = _normalise_transformers_key(k)
        renamed.setdefault(target, []).append(k)
    unexpected = sorted(src for tgt, srcs in renamed.items() if tgt not in model_keys for src in srcs)
    duplicated = sorted(srcs[0] + " / " + srcs[1] for srcs in renamed.values() if len(srcs) > 1)
    missing = sorted(model_keys - set(renamed))
    if unexpected or missing or duplicated:
        raise CheckpointKeyError(format_key_report(source, missing=missing, unexpected=unexpected, other=duplicated))


def format_key_report(source: str, *, missing=(), unexpected=(), mismatched=(), other=()) -> str:
    def show(title, keys):
        keys = list(keys)
        if not keys:
            return ""
        more = f"\n    ... and {len(keys) - 20} more" if len(keys) > 20 else ""
        return f"\n  {title} ({len(keys)}):\n    " + "\n    ".join(map(str, keys[:20])) + more

    return (
        f"checkpoint {source!r} does not match the model (every weight must land; only lm_head is dropped):"
        + show("missing from the checkpoint", missing)
        + show("in the checkpoint but not in the model", unexpected)
        + show("wrong shape", mismatched)
        + show("two checkpoint entries for one weight", other)
    )
