"""LLaVE on transformers: the embedder, its processor, checkpoint conversion, a tiny model.

* :class:`LLaVEEmbedder` - LlavaOnevisionModel (no LM head) -> last real token -> L2 norm.
* :class:`LLaVEProcessor` - LLaVE's prompt and anyres tiling -> the batch dict.
* :mod:`.convert` - LLaVA-NeXT ``llava_qwen`` checkpoints (the official LLaVE releases).
* :mod:`.tiny` - the same architecture at toy size, built offline.
* :mod:`.arch` - real-size architectures (``arch:llave-0.5b``) from configs alone, random weights.
"""

from .arch import ARCHITECTURES, arch_config, build_arch_model, build_stand_in_tokenizer
from .convert import CheckpointKeyError, convert_llava_qwen_config, load_config
from .embedder import BATCH_KEYS, LLaVEEmbedder, default_attn_implementation
from .processor import LLaVEProcessor, count_image_tokens, num_image_tiles
from .tiny import build_tiny_model, build_tiny_tokenizer, tiny_config

__all__ = [
    "LLaVEEmbedder",
    "LLaVEProcessor",
    "BATCH_KEYS",
    "CheckpointKeyError",
    "convert_llava_qwen_config",
    "load_config",
    "count_image_tokens",
    "num_image_tiles",
    "default_attn_implementation",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "tiny_config",
    "ARCHITECTURES",
    "arch_config",
    "build_arch_model",
    "build_stand_in_tokenizer",
]
