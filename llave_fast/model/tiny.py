"""A tiny LLaVE of the same architecture, built offline, for tests and the default training job.

Same modules as LLaVE (SigLIP vision tower, 2-layer GELU projector, Qwen2 language model,
anyres tiling with unpadding and ``image_newline``), scaled down: 32 px tiles of 8 px
patches (16 visual tokens per tile), a (1x1)..(2x2) grid of tiles, 2 vision and 2 language
layers. The tokenizer is a WordPiece model over a fixed lowercase English vocabulary (the
words of the synthetic shapes/colours/counts/positions dataset, MMEB's instruction words,
the chat template), with single letters and digits as the fallback for any other word, and
Qwen's chat tokens (``<|endoftext|>`` is the pad). Nothing is downloaded.
"""

from __future__ import annotations

import torch

from .embedder import LLaVEEmbedder
from .processor import LLaVEProcessor
from ..errors import InvalidArgument

__all__ = ["TINY_VOCAB_WORDS", "SPECIAL_TOKENS", "build_tiny_tokenizer", "tiny_config", "build_tiny_model"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")

TINY_VOCAB_WORDS = tuple(
    dict.fromkeys(
        """
    red green blue yellow purple orange black white gray grey pink brown cyan magenta colour color colours colors
    colored coloured
    circle circles square squares triangle triangles star stars shape shapes rectangle rectangles dot dots
    object objects item items thing things figure figures
    zero one two three four five six seven eight nine ten
    left right top bottom center centre middle upper lower corner side edge above below beside near far next
    small large big little tiny huge medium size sized bigger smaller biggest smallest largest larger
    what which where how many much is are was were be there here it its this that these those they them
    a an the of in on at to and or with without by for from as than not no yes only all each every both
    some any most more less same different other another
    image images picture pictures photo photos scene view background canvas drawing drawn
    represent given following question questions answer answers query text caption captions description
    describe find select retrieve match matches matching shows show showing contains contain containing
    count number total please identify classify category class label task instruction document
    you your i me my we our assistant user system helpful
    first second third last single pair double
    """.split()
    )
)
_PUNCT = tuple(".,?!:;'\"-()[]/_+=*&%#@<>|")
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
_DIGITS = tuple("0123456789")


def build_tiny_tokenizer(*, with_image_token: bool = True, vocab_size: int | None = None):
    """A PreTrainedTokenizerFast (transformers' tokenizers backend) built in memory.

    Lowercases, splits into words / single digits / single punctuation marks / newlines,
    then WordPiece: known words are one token, other words fall back to letters
    (``##``-continued); anything else is ``[UNK]``. ``with_image_token=False`` leaves out
    ``<image>`` (as LLaVE's own Qwen tokenizers do; the loader adds it).

    ``vocab_size``: the tokenizer's length without ``<image>``; the ordinary entries are
    padded with ``[unusedN]`` entries (never produced: the pre-tokenizer splits brackets off)
    so that the chat tokens take the last ids. Qwen2's tokenizer (a stand-in of its size for
    real-size models): ``vocab_size=151646`` puts ``<|endoftext|>``, ``<|im_start|>``,
    ``<|im_end|>`` at 151643..151645 and ``<image>`` at 151646, as LLaVE's loader does.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in SPECIAL_TOKENS if with_image_token or t != "<image>"]
    vocab: dict[str, int] = {}
    for tok in ("[UNK]", "\n", *TINY_VOCAB_WORDS, *_LETTERS, *_DIGITS, *_PUNCT):
        vocab.setdefault(tok, len(vocab))
    for ch in _LETTERS + _DIGITS:
        vocab.setdefault("##" + ch, len(vocab))
    if vocab_size is not None:
        chat = len([t for t in SPECIAL_TOKENS if t != "<image>"])
        if not isinstance(vocab_size, int) or vocab_size < len(vocab) + chat:
            raise InvalidArgument(f"vocab_size must be an int >= {len(vocab) + chat} (the tiny vocabulary and the chat "
                             f"tokens), got {vocab_size!r}")
        for i in range(vocab_size - chat - len(vocab)):
            vocab[f"[unused{i}]"] = len(vocab)
    for tok in specials:  # specials last, as in Qwen's tokenizer
        vocab.setdefault(tok, len(vocab))

    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\n|[a-z]+|[0-9]|[^\sa-z0-9]"), behavior="removed", invert=True
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in specials if t != "<|endoftext|>"],
        model_max_length=4096,
    )


def tiny_config(
    *,
    vocab_size: int,
    image_token_index: int,
    image_size: int = 32,
    patch_size: int = 8,
    max_grid: int = 2,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
):
    """A LlavaOnevisionConfig of LLaVE's architecture at toy size.

    Grid pinpoints: every (i x j) tile grid with 1 <= i, j <= ``max_grid``, in pixels
    (height, width) of ``image_size`` tiles.
    """
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=4 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
    )
    pinpoints = [[i * image_size, j * image_size] for i in range(1, max_grid + 1) for j in range(1, max_grid + 1)]
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_model(seed: int = 0, *, torch_dtype=None, attn_implementation: str | None = None, **config_kwargs) -> LLaVEEmbedder:
    """A randomly initialised tiny LLaVEEmbedder with its tokenizer and processor.

    Deterministic given ``seed`` (the global torch RNG is left as it was).
    ``config_kwargs`` go to :func:`tiny_config` (e.g. ``image_size=64``).
    """
    tokenizer = build_tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = tiny_config(vocab_size=len(tokenizer), image_token_index=image_id, **config_kwargs)
    processor = LLaVEProcessor.from_config(tokenizer, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LLaVEEmbedder.from_config(
            config, processor, torch_dtype=torch_dtype, attn_implementation=attn_implementation
        )
