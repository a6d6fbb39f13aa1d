"""Real-size LLaVE architectures built from configs alone: random weights, nothing downloaded.

A model name ``arch:<name>`` (``llave-fast train --model arch:llave-0.5b``) builds the
architecture of a released LLaVE model at its real size with random weights, the way
``tiny`` builds the toy one: for measuring speed and memory at real size where no checkpoint
can be downloaded. It learns nothing a user would want; its tokenizer is a stand-in.

Each architecture is kept as the ``config.json`` its checkpoint has, in LLaVA-NeXT's
``llava_qwen`` layout, and goes through the same conversion as a downloaded checkpoint
(:func:`~llave_fast.model.convert.convert_llava_qwen_config`): so400m's tower config, its
last layer dropped, the (width, height) pinpoints swapped, ``tokenizer_model_max_length``
as the processor's ``max_length``.

``llave-0.5b``: LLaVE-0.5B, i.e. LLaVA-OneVision-0.5B's shapes with LLaVE's grid.

* language model Qwen2-0.5B: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
  an embedding table of 151936 rows (the tokenizer has 151646 entries; ``<image>`` is added
  at 151646), tied input/output embeddings, RoPE base 1e6;
* vision tower SigLIP so400m/14 at 384 px: hidden 1152, 27 layers of which the last is
  dropped (26 kept), 16 heads, intermediate 4304, 27 x 27 = 729 patches per tile;
* projector Linear 1152 -> 896, GELU, Linear 896 -> 896;
* anyres grids (1x1)..(2x2) of 384-px tiles (LLaVE's training grid), anyres_max_9;
  sequences cut at 4096 tokens.

About 0.89 B parameters (3.6 GB in fp32). ``init="fast"`` skips transformers' weight
initialisation (43 s on two CPU cores) and fills the weights from one seeded generator
(a few seconds): norms 1, biases 0, every other tensor uniform with standard deviation 0.02.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from .embedder import LLaVEEmbedder
from .processor import LLaVEProcessor
from ..errors import InvalidArgument

__all__ = [
    "ARCH_PREFIX",
    "ARCHITECTURES",
    "QWEN2_TOKENIZER_SIZE",
    "is_arch_name",
    "arch_raw_config",
    "arch_config",
    "build_stand_in_tokenizer",
    "build_arch_model",
    "fast_init_",
]

ARCH_PREFIX = "arch:"

# Qwen2's tokenizer: 151643 byte-level BPE entries, then <|endoftext|>, <|im_start|>, <|im_end|>
QWEN2_TOKENIZER_SIZE = 151646

# SigLIP so400m/14 at 384 px, (width, height) pinpoints of (1x1)..(2x2) tiles, as LLaVA-NeXT stores them
_GRID_1x1_TO_2x2 = [[384, 384], [384, 768], [768, 384], [768, 768]]

ARCHITECTURES: dict[str, dict] = {
    "llave-0.5b": {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        # Qwen2-0.5B
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "max_window_layers": 24,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
        # the vision side: so400m (its config is known offline), 2-layer GELU projector, anyres
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_hidden_size": 1152,
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": _GRID_1x1_TO_2x2,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
    },
}


def is_arch_name(name) -> bool:
    """Whether a ``model`` option names a built-from-config architecture (``arch:...``)."""
    return isinstance(name, str) and name.startswith(ARCH_PREFIX)


def _key(name: str) -> str:
    key = name[len(ARCH_PREFIX):] if is_arch_name(name) else name
    if key not in ARCHITECTURES:
        raise InvalidArgument(f"unknown architecture {name!r}: known are "
                         f"{[ARCH_PREFIX + k for k in sorted(ARCHITECTURES)]}")
    return key


def arch_raw_config(name: str) -> dict:
    """The architecture's ``llava_qwen`` config.json (a copy), by name with or without ``arch:``."""
    return copy.deepcopy(ARCHITECTURES[_key(name)])


def arch_config(name: str, *, image_token_index: int = QWEN2_TOKENIZER_SIZE):
    """The ``LlavaOnevisionConfig`` of an architecture, converted as a downloaded checkpoint's
    config is (so400m keeps 26 of its 27 layers by LLaVA-NeXT's rule)."""
    from .convert import convert_llava_qwen_config

    return convert_llava_qwen_config(arch_raw_config(name), image_token_index=image_token_index)


def build_stand_in_tokenizer(vocab_size: int = QWEN2_TOKENIZER_SIZE):
    """A tokenizer of Qwen2's size: the tiny WordPiece vocabulary padded with unused entries, the
    chat tokens at Qwen2's ids (151643..151645) and ``<image>`` at 151646. Enough for shapes and
    throughput; its token counts for real text differ from Qwen2's BPE."""
    from .tiny import build_tiny_tokenizer

    return build_tiny_tokenizer(vocab_size=vocab_size)


def _no_init_weights():
    """transformers' context that skips weight initialisation (torch's and its own), where the
    installed version has it; otherwise nothing (the weights are then initialised, then filled)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return getattr(__import__(module, fromlist=["no_init_weights"]), "no_init_weights")()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


@torch.no_grad()
def fast_init_(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> torch.nn.Module:
    """Fill every parameter from one generator seeded with ``seed``, in ``named_parameters``
    order: 1-D norm weights 1, biases 0, everything else uniform with standard deviation ``std``
    (uniform, not normal: three times faster on a CPU). Buffers are left as built."""
    g = torch.Generator().manual_seed(int(seed))
    bound = std * math.sqrt(3.0)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            p.zero_()
        elif p.dim() == 1 and "norm" in name:
            p.fill_(1.0)
        elif p.device.type == "cpu":
            p.uniform_(-bound, bound, generator=g)
        else:  # the generator is a CPU one
            p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=g))
    return module


def build_arch_model(
    name: str,
    seed: int = 0,
    *,
    torch_dtype=None,
    attn_implementation: str | None = None,
    init: str = "default",
    tokenizer=None,
) -> LLaVEEmbedder:
    """A randomly initialised real-size LLaVEEmbedder (with a stand-in tokenizer and its processor).

    Args:
        name: ``arch:llave-0.5b`` (or ``llave-0.5b``); see :data:`ARCHITECTURES`.
        seed: the weights are a function of it (the global torch RNG is left as it was).
        torch_dtype: None (float32), a dtype or its name.
        init: ``"default"``, transformers' initialisation (built under ``deepspeed.zero.Init``,
            hence partitioned, when an ``HfDeepSpeedConfig`` with ZeRO-3 is alive: the training
            path); ``"fast"``, no initialisation at construction, then :func:`fast_init_` (CPU
            tests; refused under ZeRO-3, whose partitioned parameters it cannot fill).
        tokenizer: a tokenizer of the architecture's size; default :func:`build_stand_in_tokenizer`.
    """
    if init not in ("default", "fast"):
        raise InvalidArgument(f"init must be 'default' or 'fast', got {init!r}")
    raw = arch_raw_config(name)
    if tokenizer is None:
        tokenizer = build_stand_in_tokenizer()
    from .convert import convert_llava_qwen_config, ensure_image_token, llava_qwen_max_length

    image_id = ensure_image_token(tokenizer)
    config = convert_llava_qwen_config(raw, image_token_index=image_id)
    processor = LLaVEProcessor.from_config(tokenizer, config, max_length=llava_qwen_max_length(raw))
    if init == "fast":
        from transformers.integrations import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise InvalidArgument("init='fast' cannot fill ZeRO-3 partitioned parameters: use init='default'")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init == "default":
            return LLaVEEmbedder.from_config(config, processor, torch_dtype=torch_dtype,
                                             attn_implementation=attn_implementation)
        with _no_init_weights():
            model = LLaVEEmbedder.from_config(config, processor, torch_dtype=torch_dtype,
                                              attn_implementation=attn_implementation)
    fast_init_(model.model, seed)
    return model
