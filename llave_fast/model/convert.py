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

# Vision towers whose config is known without downloading anything. Layer counts are those
# LLaVA-NeXT keeps: its SigLIP tower deletes the last of so400m's 27 layers.
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model",
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
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
)


class CheckpointKeyError(ValueError):
    """A checkpoint's weights do not match the model: some missing, some left over."""


def is_llava_qwen_config(raw: dict) -> bool:
    return raw.get("model_type") == "llava_qwen" or (
        "mm_vision_tower" in raw and raw.get("model_type") in (None, "qwen2", "llava_qwen")
    )


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
            pairs = ast.literal_eval(value)
    else:
        pairs = value
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"cannot read image_grid_pinpoints {value!r}")
    out = []
    for p in pairs:
        if not isinstance(p, (list, tuple)) or len(p) != 2:
            raise ValueError(f"image_grid_pinpoints entry {p!r} is not a (width, height) pair")
        w, h = int(p[0]), int(p[1])
        out.append([h, w])
    return out


def _vision_config_for(raw: dict, vision_config) -> dict:
    if vision_config is not None:
        if hasattr(vision_config, "to_dict"):
            vision_config = vision_config.to_dict()
        vc = dict(vision_config)
        vc.setdefault("model_type", "siglip_vision_model")
        if "siglip" in vc["model_type"]:
            vc.setdefault("vision_use_head", False)  # LLaVA-NeXT replaces SigLIP's head with Identity
        return vc
    name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    if not name:
        raise ValueError("the llava_qwen config has no mm_vision_tower: pass vision_config=... explicitly")
    base = os.path.basename(str(name).rstrip("/"))
    if base in KNOWN_VISION_TOWERS:
        return dict(KNOWN_VISION_TOWERS[base])
    raise ValueError(
        f"unknown vision tower {name!r} (known without a download: {sorted(KNOWN_VISION_TOWERS)}); pass "
        f"vision_config=<its SiglipVisionConfig/CLIPVisionConfig as a dict, with num_hidden_layers = the layers the "
        f"checkpoint keeps>"
    )


def convert_llava_qwen_config(raw: dict, *, image_token_index: int, vision_config=None):
    """A ``llava_qwen`` config.json (dict) -> ``LlavaOnevisionConfig``.

    ``image_token_index`` is the id the tokenizer gives ``<image>`` (LLaVE's tokenizers have
    no such token: the loader adds it; it must lie inside the embedding table, whose unused
    row it takes: the row is overwritten by visual features anyway).
    """
    from transformers import AutoConfig, LlavaOnevisionConfig, Qwen2Config

    if not is_llava_qwen_config(raw):
        raise ValueError(f"not a llava_qwen config (model_type={raw.get('model_type')!r}, no mm_vision_tower)")

    # ---- language model: flat Qwen2 keys; LLaVE's constructor sets rope_scaling = None
    text = {k: raw[k] for k in _QWEN2_KEYS if k in raw}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(raw.get("rope_theta", 10000.0))}
    dtype = raw.get("torch_dtype", raw.get("dtype"))
    text_config = Qwen2Config(**text)
    if not 0 <= image_token_index < text_config.vocab_size:
        raise ValueError(
            f"the image token id {image_token_index} is outside the checkpoint's embedding table "
            f"(vocab_size {text_config.vocab_size})"
        )

    # ---- vision tower
    vc = _vision_config_for(raw, vision_config)
    model_type = vc.pop("model_type")
    vision = AutoConfig.for_model(model_type, **vc)
    mm_hidden = raw.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.hidden_size:
        raise ValueError(f"mm_hidden_size {mm_hidden} != the vision tower's hidden_size {vision.hidden_size}")
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
        raise ValueError(f"mm_projector_type {proj!r} is not supported (LLaVE uses 'mlp2x_gelu': Linear, GELU, Linear)")

    # ---- anyres
    merge = raw.get("mm_patch_merge_type", "flat")
    if merge != "spatial_unpad":
        raise ValueError(f"mm_patch_merge_type {merge!r} is not supported (LLaVE uses 'spatial_unpad')")
    aspect = str(raw.get("image_aspect_ratio", ""))
    if "image_grid_pinpoints" not in raw or raw["image_grid_pinpoints"] is None:
        raise ValueError("the llava_qwen config has no image_grid_pinpoints")
    pinpoints = parse_grid_pinpoints(raw["image_grid_pinpoints"], vision.image_size)
    if re.fullmatch(r"anyres_max_\d+", aspect):
        vision_aspect_ratio = aspect
    elif aspect == "anyres":
        # plain anyres never shrinks the feature map: a cap of the largest grid's tile count never triggers
        max_tiles = max((h // vision.image_size) * (w // vision.image_size) for h, w in pinpoints)
        vision_aspect_ratio = f"anyres_max_{max_tiles}"
    else:
        raise ValueError(f"image_aspect_ratio {aspect!r} is not supported (LLaVE uses anyres / anyres_max_N)")

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
    return config


def read_raw_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(file) as f:
        return json.load(f)


def load_config(path: str, *, tokenizer=None, vision_config=None):
    """The ``LlavaOnevisionConfig`` of a local checkpoint folder in either format.

    For ``llava_qwen`` folders, ``tokenizer`` (with ``<image>`` added if it lacked it) gives the
    image token id; without it the tokenizer is loaded from the folder.
    """
    raw = read_raw_config(path)
    if is_llava_qwen_config(raw):
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
        ensure_image_token(tokenizer)
        return convert_llava_qwen_config(
            raw, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_config=vision_config
        )
    if raw.get("model_type") != "llava_onevision":
        raise ValueError(
            f"{path!r}: model_type {raw.get('model_type')!r} is neither llava_qwen (LLaVA-NeXT) nor llava_onevision"
        )
    if vision_config is not None:
        raise ValueError("vision_config applies to llava_qwen checkpoints only; this one is in transformers format")
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
    return cls.from_pretrained(path)


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
    """Tensor names in a folder's safetensors checkpoint (index or single file); None when the
    folder has no safetensors (e.g. a pickled ``pytorch_model.bin``: transformers' own
    loading report is then the only check)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted(json.load(f)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return sorted(f.keys())
    return None


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
