"""Presets: LLaVE-0.5B's real-size architecture built from configs alone (``arch:llave-0.5b``),
and LLaVE's own published training script as a preset (``llave_2b_recipe.json``) with every
flag of the script mapped to an option or to the reason it has none here.

The real-size test builds the 0.89 B-parameter model in fp32 (3.6 GB) with the fast
deterministic initialisation and embeds one image+text pair and one text: about a minute on
two CPU cores, nearly all of it the forward (two 384-px tiles through 26 SigLIP layers and
1,290 tokens through Qwen2-0.5B). Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from typing import Any, Callable, NamedTuple

import pytest
import torch
from PIL import Image, ImageDraw

from llave_fast.train import TrainConfig, _config_path, check_config

# ==========================================================================================
# arch:llave-0.5b
# ==========================================================================================

# LLaVA-OneVision-0.5B / LLaVE-0.5B, written down here independently of llave_fast.model.arch
QWEN2_05B = dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
SO400M = dict(hidden=1152, layers=26, heads=16, intermediate=4304, patch=14, image=384)  # 27 layers, last dropped
GRID_HW = [(384, 384), (384, 768), (768, 384), (768, 768)]  # (1x1)..(2x2) tiles, (height, width)


def expected_parameters() -> int:
    """LlavaOnevisionModel's parameter count at these shapes (no LM head: tied, and an embedder has none)."""
    q, s = QWEN2_05B, SO400M
    hd = q["hidden"] // q["heads"]
    kv = q["kv_heads"] * hd
    lm_layer = (q["hidden"] * q["hidden"] + q["hidden"]  # q_proj (with bias)
                + 2 * (q["hidden"] * kv + kv)  # k_proj, v_proj (with bias)
                + q["hidden"] * q["hidden"]  # o_proj
                + 3 * q["hidden"] * q["intermediate"]  # gate, up, down
                + 2 * q["hidden"])  # two RMSNorms
    lm = q["vocab"] * q["hidden"] + q["layers"] * lm_layer + q["hidden"]
    d, n_patches = s["hidden"], (s["image"] // s["patch"]) ** 2
    vit_layer = 4 * (d * d + d) + 2 * d * s["intermediate"] + s["intermediate"] + d + 4 * d
    vit = 3 * s["patch"] ** 2 * d + d + n_patches * d + s["layers"] * vit_layer + 2 * d  # + post_layernorm
    projector = d * q["hidden"] + q["hidden"] + q["hidden"] * q["hidden"] + q["hidden"]
    return lm + vit + projector + q["hidden"]  # + image_newline


def test_arch_config_has_llave_0_5b_shapes():
    from llave_fast.model import arch_config

    cfg = arch_config("arch:llave-0.5b")
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.intermediate_size,
            t.vocab_size) == tuple(QWEN2_05B.values())
    assert t.tie_word_embeddings and cfg.tie_word_embeddings
    assert t.rope_parameters == {"rope_type": "default", "rope_theta": 1000000.0}
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.image_size) == tuple(SO400M.values())
    assert not v.vision_use_head
    assert sorted(map(tuple, cfg.image_grid_pinpoints)) == GRID_HW
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-1, "full")  # last kept layer, every patch
    assert (cfg.vision_aspect_ratio, cfg.projector_hidden_act, cfg.multimodal_projector_bias) == ("anyres_max_9", "gelu", True)
    assert cfg.image_token_index == 151646


def test_stand_in_tokenizer_has_qwen2s_size_and_ids():
    from llave_fast.model import build_stand_in_tokenizer
    from llave_fast.model.tiny import build_tiny_tokenizer

    tok = build_stand_in_tokenizer()
    assert len(tok) == 151647  # Qwen2's 151646 entries, then <image> as LLaVE's loader adds it
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])
    assert ids == [151643, 151644, 151645, 151646] and tok.pad_token_id == 151643
    assert len(build_tiny_tokenizer(with_image_token=False, vocab_size=151646)) == 151646
    # the padding entries never come out of real text; the tiny vocabulary still does
    text = "a red circle [unused7] above two squares"
    assert tok(text)["input_ids"] == build_tiny_tokenizer()(text)["input_ids"]
    with pytest.raises(ValueError, match="vocab_size must be an int >="):
        build_tiny_tokenizer(vocab_size=10)


def test_fast_init_is_seeded_fills_every_weight_and_keeps_buffers():
    from llave_fast.model import LLaVEEmbedder, tiny_config
    from llave_fast.model.arch import _no_init_weights, fast_init_

    def build(fast, seed=0):
        cfg = tiny_config(vocab_size=400, image_token_index=399)
        if not fast:
            return LLaVEEmbedder.from_config(cfg)
        with _no_init_weights():
            m = LLaVEEmbedder.from_config(cfg)
        return fast_init_(m.model, seed)

    ref, a, b, c = build(False), build(True), build(True), build(True, seed=1)
    for (name, x), (_, y) in zip(ref.named_buffers(), a.named_buffers()):  # rotary inv_freq, position ids
        assert torch.equal(x, y), name
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    for name, p in pa.items():
        assert torch.equal(p, pb[name]), name  # same seed, same weights
        if name.endswith("bias"):
            assert not p.any(), name
        elif p.dim() == 1 and "norm" in name:
            assert (p == 1).all(), name
        else:
            assert not torch.equal(p, pc[name]), name  # another seed, other weights
            assert abs(p.float().std().item() - 0.02) < 0.004, name


def test_unknown_architecture_is_refused():
    from llave_fast.model import build_arch_model

    with pytest.raises(ValueError, match=r"unknown architecture 'arch:llave-9b'.*arch:llave-0.5b"):
        build_arch_model("arch:llave-9b")
    with pytest.raises(ValueError, match="init must be"):
        build_arch_model("arch:llave-0.5b", init="lazy")
    with pytest.raises(ValueError, match=r"model='arch:llave-9b': unknown architecture"):
        check_config(TrainConfig(model="arch:llave-9b"), world=1)


def test_arch_preset_loads_checks_and_builds_through_build_model(monkeypatch):
    import llave_fast.model.arch as A
    import llave_fast.train as T
    from llave_fast.model import build_tiny_model

    c = TrainConfig.from_json("llave_0.5b_arch.json")
    check_config(c, world=1)
    check_config(c, world=8)
    assert (c.model, c.data, c.image_size, c.bf16, c.gradient_checkpointing) == (
        "arch:llave-0.5b", "synthetic", 384, True, True)
    seen = {}

    def fake(name, seed=0, **kw):  # the real one is built in the test below; here only the dispatch
        seen.update(name=name, seed=seed, **kw)
        return build_tiny_model(seed)

    monkeypatch.setattr(A, "build_arch_model", fake)
    m = T.build_model(c, {}, bf16=False)
    assert seen == {"name": "arch:llave-0.5b", "seed": c.seed, "torch_dtype": torch.float32}
    assert m.is_gradient_checkpointing


def _square_picture(side: int) -> Image.Image:
    im = Image.new("RGB", (side, side), (40, 90, 160))
    d = ImageDraw.Draw(im)
    d.ellipse((side // 8, side // 8, side // 2, side // 2), fill=(230, 40, 40))
    d.rectangle((side // 2, side // 2, side - side // 8, side - side // 8), fill=(250, 220, 30))
    return im


def test_real_size_llave_0_5b_builds_and_embeds_on_cpu():
    from llave_fast.model import build_arch_model, count_image_tokens

    m = build_arch_model("arch:llave-0.5b", seed=0, init="fast", torch_dtype=torch.float32).eval()
    assert sum(p.numel() for p in m.parameters()) == expected_parameters() == 893_618_208
    assert m.embed_dim == 896 and m.dtype == torch.float32
    assert len(m.model.vision_tower.encoder.layers) == 26 and len(m.model.language_model.layers) == 24
    p = m.processor
    assert p.max_length == 4096 and p.image_token_id == m.config.image_token_index == 151646

    # token counts: a base view of 27 x 27 = 729 patches, then the unpadded grid with a newline after every row
    one, four = _square_picture(300), _square_picture(800)
    b4 = p(["<image>\nWhat is shown?"], [four])
    assert tuple(b4["pixel_values"][0].shape) == (5, 3, 384, 384)  # base view + 2x2 crops
    assert int((b4["input_ids"] == p.image_token_id).sum()) == 729 + 54 * 55 == 3699
    assert count_image_tokens(800, 800, image_size=384, patch_size=14, grid_pinpoints=m.config.image_grid_pinpoints,
                              vision_aspect_ratio=m.config.vision_aspect_ratio) == 3699

    # the forward: one image+text pair (1x1 grid: base view + one crop) and one text-only sample, one batch
    texts = ["<image>\nRepresent the given image with the following question: what is in the picture?",
             "a red circle above a yellow square"]
    batch = p(texts, [one, None])
    assert tuple(batch["pixel_values"][0].shape) == (2, 3, 384, 384) and batch["pixel_values"][1] is None
    n_img = (batch["input_ids"] == p.image_token_id).sum(dim=1).tolist()
    assert n_img == [729 + 27 * 28, 0]
    seen = []
    hook = m.model.multi_modal_projector.register_forward_hook(lambda mod, i, o: seen.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            emb = m(batch)
    finally:
        hook.remove()
    assert seen == [(2, 729, 896)]  # per tile: 729 features before packing, projected to the LM's width
    assert emb.shape == (2, 896) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert (emb[0] - emb[1]).abs().max() > 1e-3  # the two samples differ
    with torch.no_grad():
        alone = m(p(texts[1:], None))  # the text alone, unpadded, as in its padded batch
    assert (alone[0] - emb[1]).abs().max().item() < 1e-4


# ==========================================================================================
# LLaVE's published training script as a preset
# ==========================================================================================

# The script's shell variables and its flags, as LLaVE's README ("Training") gives them
# (github.com/DeepLearnXMU/LLaVE, README.md; the one training script LLaVE publishes). Data,
# not code: the launcher's and the training program's flags with their values, in order.
LLAVE_SCRIPT_VARIABLES = {
    "VISION_MODEL_VERSION": "google/siglip-so400m-patch14-384",
    "ALPHA": "9",
    "PROMPT_VERSION": "qwen_1_5",
    "PREV_STAGE_CHECKPOINT": "BAAI/Aquila-VL-2B-llava-qwen",
    "RUN_NAME": "LLaVE-2B",
}
LLAVE_SCRIPT_FLAGS = r"""
--nproc_per_node=8 --master_port=20042
--deepspeed $prefix/LLaVE/scripts/zero3.json
--model_name_or_path $PREV_STAGE_CHECKPOINT
--version $PROMPT_VERSION
--data_path TIGER-Lab/MMEB-train
--image_folder $prefix/MMEB-train
--mm_tunable_parts="mm_mlp_adapter,mm_language_model"
--mm_vision_tower_lr=2e-6
--vision_tower ${VISION_MODEL_VERSION}
--mm_projector_type mlp2x_gelu
--mm_vision_select_layer -2
--mm_use_im_start_end False
--mm_use_im_patch_token False
--group_by_modality_length True
--image_aspect_ratio anyres_max_9
--image_grid_pinpoints  "(1x1),...,(2x2)"
--mm_patch_merge_type spatial_unpad
--bf16 True
--run_name $RUN_NAME
--output_dir $prefix/checkpoints/$RUN_NAME
--num_train_epochs 1
--per_device_train_batch_size 4
--per_device_eval_batch_size 4
--gradient_accumulation_steps 8
--evaluation_strategy "no"
--save_strategy "steps"
--save_steps 500
--save_total_limit 1
--learning_rate 1e-5
--weight_decay 0.
--warmup_ratio 0.03
--lr_scheduler_type "cosine"
--logging_steps 1
--tf32 True
--model_max_length 4096
--gradient_checkpointing True
--dataloader_num_workers 4
--lazy_preprocess True
--report_to none
--torch_compile True
--torch_compile_backend "inductor"
--dataloader_drop_last True
--frames_upbound 32
--subset_name ImageNet_1K HatefulMemes SUN397 N24News VOC2007 OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA Visual7W VisDial CIRR NIGHTS WebQA VisualNews_i2t VisualNews_t2i MSCOCO_t2i MSCOCO_i2t MSCOCO
--num_sample_per_subset 50000
--lora_enable False
--alpha ${ALPHA}
"""

PRESET = "llave_2b_recipe.json"
WORLD = 8  # --nproc_per_node


def parse_flags(text: str, variables: dict) -> dict[str, Any]:
    """``--name value``, ``--name=value`` and ``--name v1 v2 ...`` -> {name: str or list of str};
    ``$VAR`` / ``${VAR}`` of the script's own variables substituted (``$prefix``, the user's
    folder, stays)."""
    def sub(tok):
        return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), tok)

    flags: dict[str, Any] = {}
    name = None
    for tok in shlex.split(text):
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            if name in flags:
                raise AssertionError(f"--{name} given twice")
            flags[name] = [sub(value)] if eq else []
        elif name is None:
            raise AssertionError(f"value {tok!r} before any flag")
        else:
            flags[name].append(sub(tok))
    return {k: v[0] if len(v) == 1 else v for k, v in flags.items()}


def _bool(v: str) -> bool:
    assert v in ("True", "False"), v
    return v == "True"


class Option(NamedTuple):
    """The flag sets this preset option; ``value(flag value, all flags)`` is what it must hold."""
    field: str
    value: Callable[[Any, dict], Any]


class NoOption(NamedTuple):
    """The flag has no option here; ``why``, and where it can be checked, ``holds(flag value,
    preset, all flags)``."""
    why: str
    holds: Callable[[Any, TrainConfig, dict], bool] | None = None


def _no_shrink_with_this_grid(v, c, f) -> bool:
    """anyres_max_9 caps a feature map at 9 tiles' worth; (1x1)..(2x2) grids give at most 4: no
    image size is ever shrunk, so the cap has no effect (the checkpoint's own value is used)."""
    from llave_fast.model import count_image_tokens
    from llave_fast.model.convert import parse_grid_pinpoints

    pins = parse_grid_pinpoints(c.image_grid, 384)
    sizes = [(384, 384), (800, 800), (300, 900), (900, 300), (2000, 1900), (5000, 5000), (20, 3000)]
    count = lambda h, w, ar: count_image_tokens(h, w, image_size=384, patch_size=14, grid_pinpoints=pins,  # noqa: E731
                                                vision_aspect_ratio=ar)
    return v == "anyres_max_9" and all(count(h, w, v) == count(h, w, "anyres_max_1000") for h, w in sizes)


# Every flag of the script -> the preset option it maps to, or why it has none here.
FLAG_TABLE: dict[str, Option | NoOption] = {
    # launcher (torchrun)
    "nproc_per_node": NoOption("the launcher's rank count: launch on 8 ranks; it enters global_batch (8 x 4 x 8)",
                               lambda v, c, f: int(v) == WORLD and c.global_batch // int(v) // c.accumulation_steps
                               == int(f["per_device_train_batch_size"])),
    "master_port": NoOption("the launcher's rendezvous port (torchrun / deepspeed take their own)"),
    # model
    "deepspeed": Option("deepspeed_config", lambda v, f: os.path.basename(v)),  # ours: ZeRO stage 3 too (below)
    "model_name_or_path": Option("model", lambda v, f: v),
    "version": NoOption("the prompt template: LLaVEProcessor builds qwen_1_5's (system turn, assistant turn of "
                        "'\\n'), the only one LLaVE uses", lambda v, c, f: v == "qwen_1_5"),
    "mm_tunable_parts": Option("lr_vision", lambda v, f: 0.0 if "mm_vision_tower" not in v.split(",") else None),
    "mm_vision_tower_lr": NoOption("the vision tower's rate, never used: mm_tunable_parts leaves the tower out "
                                   "(frozen: lr_vision 0)", lambda v, c, f: c.lr_vision == 0.0),
    "vision_tower": NoOption("the checkpoint's own tower (its config's mm_vision_tower); so400m's config is "
                             "known without a download",
                             lambda v, c, f: os.path.basename(v) in __import__(
                                 "llave_fast.model.convert", fromlist=["KNOWN_VISION_TOWERS"]).KNOWN_VISION_TOWERS),
    "mm_projector_type": NoOption("read from the checkpoint's config; the converter takes mlp2x_gelu only",
                                  lambda v, c, f: v == "mlp2x_gelu"),
    "mm_vision_select_layer": NoOption("no effect with SigLIP: LLaVA-NeXT's SigLIP tower deletes its last layer and "
                                       "returns the last kept layer's output; the select layer is not applied again"),
    "mm_use_im_start_end": NoOption("read from the checkpoint's config; only False is supported",
                                    lambda v, c, f: _bool(v) is False),
    "mm_use_im_patch_token": NoOption("read from the checkpoint's config; only False is supported",
                                      lambda v, c, f: _bool(v) is False),
    "image_aspect_ratio": NoOption("the checkpoint's own; at grids up to (2x2) anyres_max_9 never shrinks a map",
                                   _no_shrink_with_this_grid),
    "image_grid_pinpoints": Option("image_grid", lambda v, f: v),
    "mm_patch_merge_type": NoOption("read from the checkpoint's config; the converter takes spatial_unpad only",
                                    lambda v, c, f: v == "spatial_unpad"),
    "alpha": Option("alpha", lambda v, f: float(v)),
    # data
    "data_path": Option("data", lambda v, f: v),
    "image_folder": NoOption("the user's image folder: --image-dir (the preset leaves it unset)",
                             lambda v, c, f: c.image_dir is None),
    "subset_name": Option("subsets", lambda v, f: list(v)),
    "num_sample_per_subset": Option("max_rows_per_subset", lambda v, f: int(v)),
    "group_by_modality_length": Option("group_by_modality", lambda v, f: _bool(v)),
    "model_max_length": Option("max_length", lambda v, f: int(v)),
    "lazy_preprocess": NoOption("LLaVA's switch for reading items on demand: MMEBDataset always does"),
    "dataloader_num_workers": Option("num_workers", lambda v, f: int(v)),
    "dataloader_drop_last": NoOption("the partial last batch is always dropped (BatchOrder; per modality when grouped)",
                                     lambda v, c, f: _bool(v) is True),
    "frames_upbound": NoOption("the frames cap of video training data; MMEB-train holds none (zero-shot video "
                               "retrieval: llave-fast eval-video --max-frames, default 32)"),
    # optimisation
    "num_train_epochs": Option("epochs", lambda v, f: float(v)),
    "per_device_train_batch_size": Option("global_batch", lambda v, f: int(f["nproc_per_node"]) * int(v)
                                          * int(f["gradient_accumulation_steps"])),
    "gradient_accumulation_steps": Option("accumulation_steps", lambda v, f: int(v)),
    "learning_rate": Option("lr", lambda v, f: float(v)),
    "weight_decay": Option("weight_decay", lambda v, f: float(v)),
    "warmup_ratio": Option("warmup_ratio", lambda v, f: float(v)),
    "lr_scheduler_type": Option("min_lr_ratio", lambda v, f: {"cosine": 0.0}[v]),  # Hugging Face's cosine ends at 0
    "bf16": Option("bf16", lambda v, f: _bool(v)),
    "tf32": NoOption("TF32 for fp32 matmuls on the GPU: the model runs in bf16, so only fp32 GEMMs (the loss's) "
                     "could use it; speed, not results; llave-fast leaves torch's setting as it is"),
    "gradient_checkpointing": Option("gradient_checkpointing", lambda v, f: _bool(v)),
    "torch_compile": NoOption("speed only, not reproduced: the model is not compiled (README, 'Not reproduced')"),
    "torch_compile_backend": NoOption("the backend of torch_compile, which is not used"),
    "lora_enable": NoOption("full fine-tuning is the only mode", lambda v, c, f: _bool(v) is False),
    # evaluation, checkpoints, logging
    "per_device_eval_batch_size": NoOption("no evaluation during training (evaluation_strategy 'no')",
                                           lambda v, c, f: f["evaluation_strategy"] == "no"),
    "evaluation_strategy": Option("eval_before", lambda v, f: v != "no"),
    "save_strategy": NoOption("'steps': a checkpoint every save_steps, our only schedule (save_every)",
                              lambda v, c, f: v == "steps"),
    "save_steps": Option("save_every", lambda v, f: int(v)),
    "save_total_limit": Option("keep_checkpoints", lambda v, f: int(v)),
    "output_dir": NoOption("the user's run folder: --output-dir (default runs/<date-time>)",
                           lambda v, c, f: c.output_dir is None),
    "run_name": NoOption("a name for experiment trackers"),
    "logging_steps": NoOption("every step is logged here (train_log.jsonl and the progress line)",
                              lambda v, c, f: int(v) == 1),
    "report_to": Option("tensorboard", lambda v, f: v == "tensorboard"),
}

# Values the script leaves to the defaults of LLaVE's train.py, its loss and Hugging Face's
# Trainer: option -> (the value, where it comes from)
SCRIPT_DEFAULTS: dict[str, tuple[Any, str]] = {
    "mmeb_split": ("original", "LLaVE's DataArguments.dataset_split"),
    "logit_scale": (50.0, "LLaVE's ModelArguments.logit_scale"),
    "lr_projector": (1e-5, "no --mm_projector_lr: the projector trains at --learning_rate"),
    "grad_clip": (1.0, "Trainer's max_grad_norm; zero3.json's gradient_clipping is 'auto'"),
    "seed": (42, "Trainer's seed"),
    "mask_duplicates": (False, "LLaVE's WeightedClipLoss masks nothing"),
    "max_text_tokens": (None, "LLaVE cuts only the whole sequence (model_max_length)"),
}

# Options the preset sets that are ours, with no counterpart in LLaVE's script
OURS_ONLY = {
    "chunk_size": "GradCache's chunk: 4, the pairs of one of LLaVE's micro-steps per rank, for the same activation "
                  "memory (no effect on the gradients)",
}


@pytest.fixture(scope="module")
def script_flags():
    return parse_flags(LLAVE_SCRIPT_FLAGS, LLAVE_SCRIPT_VARIABLES)


@pytest.fixture(scope="module")
def preset():
    return TrainConfig.from_json(PRESET)


def test_the_script_parses_as_its_flags(script_flags):
    assert len(script_flags) == 48  # 2 of the launcher, 46 of train_mem.py
    assert script_flags["subset_name"][:2] == ["ImageNet_1K", "HatefulMemes"] and len(script_flags["subset_name"]) == 20
    assert script_flags["model_name_or_path"] == "BAAI/Aquila-VL-2B-llava-qwen"
    assert script_flags["alpha"] == "9" and script_flags["image_grid_pinpoints"] == "(1x1),...,(2x2)"
    assert script_flags["mm_tunable_parts"] == "mm_mlp_adapter,mm_language_model"
    assert script_flags["output_dir"] == "$prefix/checkpoints/LLaVE-2B"


def test_every_flag_of_llaves_script_is_mapped(script_flags):
    unmapped = sorted(set(script_flags) - set(FLAG_TABLE))
    assert not unmapped, f"flags of LLaVE's script with no entry in FLAG_TABLE: {unmapped}"
    stale = sorted(set(FLAG_TABLE) - set(script_flags))
    assert not stale, f"FLAG_TABLE entries for flags the script does not have: {stale}"
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for flag, entry in FLAG_TABLE.items():
        if isinstance(entry, Option):
            assert entry.field in fields, f"--{flag} maps to {entry.field!r}, not a TrainConfig option"
        else:
            assert len(entry.why) > 15, f"--{flag}: say why it has no option"


def test_the_preset_holds_the_scripts_values(script_flags, preset):
    for flag, entry in FLAG_TABLE.items():
        v = script_flags[flag]
        if isinstance(entry, Option):
            want, got = entry.value(v, script_flags), getattr(preset, entry.field)
            assert got == want, f"--{flag} {v!r} means {entry.field}={want!r}; {PRESET} has {got!r}"
        elif entry.holds is not None:
            assert entry.holds(v, preset, script_flags), f"--{flag} {v!r}: {entry.why}"
    for field, (want, source) in SCRIPT_DEFAULTS.items():
        assert getattr(preset, field) == want, f"{field}: {source} gives {want!r}; {PRESET} has {getattr(preset, field)!r}"


def test_every_option_the_preset_sets_is_accounted_for():
    with open(_config_path(PRESET)) as f:
        raw = {k for k in json.load(f) if not k.startswith("_")}
    from_flags = {e.field for e in FLAG_TABLE.values() if isinstance(e, Option)}
    unexplained = sorted(raw - from_flags - set(SCRIPT_DEFAULTS) - set(OURS_ONLY))
    assert not unexplained, f"{PRESET} sets options that neither the script nor its defaults give: {unexplained}"


def test_published_preset_is_valid_on_8_ranks(preset):
    check_config(preset, world=WORLD)
    assert preset.global_batch // WORLD // preset.accumulation_steps == 4  # 4 pairs per device per micro-step
    with open(_config_path(preset.deepspeed_config)) as f:
        assert json.load(f)["zero_optimization"]["stage"] == 3  # LLaVE's scripts/zero3.json is ZeRO-3 as well


def test_05b_recipe_is_the_published_script_with_the_05b_base(preset):
    """LLaVE publishes no 0.5B script: the 0.5B recipe is the 2B script with the 0.5B base (the base
    and alpha 9 for it from LLaVE's paper); only run housekeeping differs besides the model."""
    small = TrainConfig.from_json("llave_0.5b_recipe.json")
    differ = {f.name for f in dataclasses.fields(TrainConfig) if getattr(small, f.name) != getattr(preset, f.name)}
    housekeeping = {"bf16", "keep_checkpoints", "num_workers"}  # None = bf16 on CUDA; kept checkpoints; workers
    assert differ - housekeeping == {"model"}, sorted(differ)
    assert (small.model, small.alpha) == ("lmms-lab/llava-onevision-qwen2-0.5b-ov", 9.0)
    check_config(small, world=WORLD)
    with open(_config_path("llave_0.5b_recipe.json")) as f:
        comment = json.load(f)["_comment"]
    assert "0.5B base substituted" in comment and "from LLaVE's paper, not from its scripts" in comment
