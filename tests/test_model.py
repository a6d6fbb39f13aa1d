"""The LLaVE model: llava_qwen conversion, pooling, padding, anyres token counts, export.

Everything runs on CPU with a tiny checkpoint the tests write themselves in LLaVE's own
LLaVA-NeXT ``llava_qwen`` layout (config.json with the mm_* keys, LLaVA-NeXT weight names,
an lm_head, tokenizer files without <image>). Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from PIL import Image, ImageDraw

from llave_fast.model import (
    CheckpointKeyError,
    LLaVEEmbedder,
    LLaVEProcessor,
    build_tiny_model,
    build_tiny_tokenizer,
    convert_llava_qwen_config,
    count_image_tokens,
    default_attn_implementation,
    tiny_config,
)

ATOL = 2e-5  # fp32: same maths, different padding / batch layout

# LLaVE stores pinpoints as (width, height): wide grids (1x1, 2x1, 3x1 tiles wide) and one tall (1x2)
PINPOINTS_WH = [[32, 32], [64, 32], [96, 32], [32, 64]]
PINPOINTS_HW = [[32, 32], [32, 64], [32, 96], [64, 32]]
# the tower before LLaVA-NeXT deletes its last layer: 3 layers, of which the checkpoints keep 2
VISION = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)


# ------------------------------------------------------------------------------------------
# writing a llava_qwen checkpoint (the test's own, independent naming of LLaVA-NeXT's keys)
# ------------------------------------------------------------------------------------------


def to_llava_next_name(name: str) -> str:
    """transformers' LlavaOnevisionModel parameter name -> LLaVA-NeXT's."""
    for pat, rep in (
        (r"^vision_tower\.", "model.vision_tower.vision_tower.vision_model."),
        (r"^multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
        (r"^multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
        (r"^image_newline$", "model.image_newline"),
        (r"^language_model\.", "model."),
    ):
        if re.match(pat, name):
            return re.sub(pat, rep, name)
    raise AssertionError(f"unmapped name {name}")


def write_llava_qwen(folder, *, seed=0, drop=(), extra=(), tie=False, lm_head=True, embed=True):
    """A tiny LLaVE checkpoint as LLaVA-NeXT writes it. Returns {llava_next_name: tensor}."""
    from safetensors.torch import save_file
    from transformers import LlavaOnevisionModel

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(with_image_token=False)
    vocab_size = len(tok) + 11  # padded embedding table, as Qwen's 151936 > len(tokenizer)
    cfg = tiny_config(vocab_size=vocab_size, image_token_index=len(tok), tie_word_embeddings=tie)
    g = torch.Generator().manual_seed(seed)
    ref = LlavaOnevisionModel(cfg)
    weights = {}
    for name, t in ref.state_dict().items():
        # every weight differs from any fresh initialisation
        weights[to_llava_next_name(name)] = (t + 0.05 * torch.randn(t.shape, generator=g)).contiguous()
    if lm_head:
        weights["lm_head.weight"] = torch.randn(vocab_size, 128, generator=g)
    if not embed:
        weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    for k in drop:
        del weights[k]
    for k in extra:
        weights[k] = torch.zeros(3)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava_qwen",
        "vocab_size": vocab_size,
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 2,
        "attention_dropout": 0.0,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "mm_vision_tower": "tiny/siglip-tiny-patch8-32",
        "mm_hidden_size": 64,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": PINPOINTS_WH,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_newline_position": "grid",
        "tokenizer_model_max_length": 4096,
        "tokenizer_padding_side": "right",
    }
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save_pretrained(str(folder))
    return weights


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llave_tiny")
    weights = write_llava_qwen(folder)
    return folder, weights


@pytest.fixture(scope="module")
def model(ckpt):
    folder, _ = ckpt
    return LLaVEEmbedder.from_pretrained(str(folder), vision_config=VISION).eval()


def shapes_image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    im = Image.new("RGB", (w, h), tuple(int(x) for x in torch.randint(0, 256, (3,), generator=g)))
    d = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = int(torch.randint(0, max(1, w - 1), (1,), generator=g)), int(torch.randint(0, max(1, h - 1), (1,), generator=g))
        d.rectangle((x0, y0, x0 + w // 3, y0 + h // 3), fill=tuple(int(x) for x in torch.randint(0, 256, (3,), generator=g)))
    return im


def report(a, b):
    d = (a - b).abs()
    return f"max abs diff {d.max().item():.3e} at {tuple(int(i) for i in torch.nonzero(d == d.max())[0])}"


# ------------------------------------------------------------------------------------------
# conversion and loading
# ------------------------------------------------------------------------------------------


def test_llava_qwen_round_trip_every_weight(ckpt, model):
    _, weights = ckpt
    sd = model.model.state_dict()
    landed = set()
    for name, value in sd.items():
        src = to_llava_next_name(name)
        assert src in weights, f"{name} has no checkpoint entry {src}"
        assert torch.equal(value, weights[src]), f"{name} differs from checkpoint {src}"
        landed.add(src)
    # every checkpoint tensor but lm_head landed somewhere
    assert set(weights) - landed == {"lm_head.weight"}


def test_llava_qwen_config_conversion(ckpt, model):
    cfg = model.config
    # (width, height) -> (height, width), in the model config and the processor alike
    assert [list(p) for p in cfg.image_grid_pinpoints] == PINPOINTS_HW
    assert model.processor.image_grid_pinpoints == PINPOINTS_HW
    assert cfg.vision_feature_layer == -1 and cfg.vision_feature_select_strategy == "full"
    assert cfg.vision_config.num_hidden_layers == 2 and not cfg.vision_config.vision_use_head
    assert cfg.text_config.rope_parameters["rope_theta"] == 10000.0
    assert cfg.vision_aspect_ratio == "anyres_max_9"
    # the tokenizer had no <image>: it was added, inside the padded embedding table
    tok = build_tiny_tokenizer(with_image_token=False)
    assert cfg.image_token_index == len(tok) == model.processor.image_token_id
    assert cfg.image_token_index < cfg.text_config.vocab_size
    assert model.embed_dim == 128


def test_so400m_vision_tower_is_known_without_download():
    raw = {
        "model_type": "llava_qwen", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "max_window_layers": 24,
        "use_sliding_window": False, "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152,
        "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad", "mm_vision_select_layer": -2,
        "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": [[384, 384], [768, 384], [384, 768], [768, 768]],
    }
    cfg = convert_llava_qwen_config(raw, image_token_index=151646)
    v = cfg.vision_config
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_attention_heads, v.patch_size, v.image_size) == (
        1152, 4304, 26, 16, 14, 384)
    assert cfg.image_grid_pinpoints == [[384, 384], [384, 768], [768, 384], [768, 768]]
    assert cfg.text_config.rope_parameters == {"rope_type": "default", "rope_theta": 1000000.0}
    assert str(cfg.dtype).endswith("bfloat16")
    # real sizes: a 27x27 = 729-token base view, then the unpadded grid with a newline per row
    count = lambda h, w: count_image_tokens(h, w, image_size=384, patch_size=14, grid_pinpoints=cfg.image_grid_pinpoints)  # noqa: E731
    assert count(384, 384) == 729 + 27 * 28  # 1x1 grid
    assert count(800, 800) == 729 + 54 * 55  # 2x2 grid
    assert count(384, 768) == 729 + 27 * 55  # 1x2 grid, (height, width)
    # "(1x1),...,(2x2)" string form and plain anyres are read too
    raw2 = dict(raw, image_grid_pinpoints="(1x1),...,(2x2)", image_aspect_ratio="anyres")
    cfg2 = convert_llava_qwen_config(raw2, image_token_index=151646)
    assert sorted(map(tuple, cfg2.image_grid_pinpoints)) == [(384, 384), (384, 768), (768, 384), (768, 768)]
    assert cfg2.vision_aspect_ratio == "anyres_max_4"
    with pytest.raises(ValueError, match="unknown vision tower"):
        convert_llava_qwen_config(dict(raw, mm_vision_tower="openai/some-other-tower"), image_token_index=1)
    with pytest.raises(ValueError, match="mm_projector_type"):
        convert_llava_qwen_config(dict(raw, mm_projector_type="linear"), image_token_index=1)
    with pytest.raises(ValueError, match="outside the checkpoint's embedding table"):
        convert_llava_qwen_config(raw, image_token_index=151936)


@pytest.mark.parametrize(
    "kind, kwargs, needle",
    [
        ("missing", dict(drop=("model.layers.1.mlp.up_proj.weight",)), "model.layers.1.mlp.up_proj.weight"),
        ("missing", dict(drop=("model.image_newline",)), "image_newline"),
        ("unexpected", dict(extra=("model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight",)),
         "encoder.layers.2.mlp.fc1.weight"),
        ("unexpected", dict(extra=("model.mm_projector.4.weight",)), "model.mm_projector.4.weight"),
    ],
)
def test_missing_or_unexpected_key_fails_loudly(tmp_path, kind, kwargs, needle):
    write_llava_qwen(tmp_path, **kwargs)
    with pytest.raises(CheckpointKeyError) as err:
        LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=VISION)
    msg = str(err.value)
    if "encoder.layers.2" in needle:
        # every layer of the 3-layer tower: LLaVE deletes the last and would ignore its weights (refused, said)
        assert "keeps all 3 layers of its SigLIP tower" in msg and "runs 2" in msg
        assert "encoder.layers.2.*" in msg and "num_hidden_layers=4" in msg
        return
    assert needle in msg
    assert ("missing from the checkpoint" if kind == "missing" else "in the checkpoint but not in the model") in msg


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        LLaVEEmbedder.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    build_tiny_tokenizer().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="neither llava_qwen"):
        LLaVEEmbedder.from_pretrained(str(tmp_path))


def test_unknown_vision_tower_needs_vision_config(ckpt):
    folder, _ = ckpt
    with pytest.raises(ValueError, match="vision_config"):
        LLaVEEmbedder.from_pretrained(str(folder))


def test_tied_checkpoint_with_only_lm_head(tmp_path):
    weights = write_llava_qwen(tmp_path, tie=True, lm_head=False, embed=False)
    m = LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=VISION)
    assert torch.equal(m.model.language_model.embed_tokens.weight, weights["lm_head.weight"])


def test_save_pretrained_round_trip(model, tmp_path):
    model.save_pretrained(str(tmp_path))
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    again = LLaVEEmbedder.from_pretrained(str(tmp_path)).eval()
    a_sd, b_sd = model.model.state_dict(), again.model.state_dict()
    assert a_sd.keys() == b_sd.keys()
    assert all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)
    assert again.processor.image_grid_pinpoints == model.processor.image_grid_pinpoints
    assert again.processor.image_token_id == model.processor.image_token_id
    texts = ["<|image_1|>\nRepresent the given image.", "a red circle at the top left", "how many stars?"]
    images = [shapes_image(96, 32), None, shapes_image(40, 70, 1)]
    a = model.encode(texts, images)
    b = again.encode(texts, images)
    assert torch.allclose(a, b, atol=1e-6, rtol=0), report(a, b)


def test_export_from_a_prefixed_16bit_state_dict(model, tmp_path):
    """What a ZeRO-3 export passes: this module's own (model.-prefixed) state dict, in bf16."""
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(k.startswith("model.") for k in sd)
    model.save_pretrained(str(tmp_path), state_dict=sd)
    m = LLaVEEmbedder.from_pretrained(str(tmp_path), torch_dtype="auto")
    assert m.dtype == torch.bfloat16
    own = m.model.state_dict()
    assert all(torch.equal(own[k[len("model."):]], v) for k, v in sd.items())
    assert LLaVEEmbedder.from_pretrained(str(tmp_path)).dtype == torch.float32  # None means float32


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_a_saved_folder_has_the_modes_the_umask_gives(model, tmp_path, umask, expected):
    """transformers writes model.safetensors through a 0600 temporary file: an export was unreadable
    by the other users of a shared folder while its config.json was not. Every file the save writes
    now has the umask's mode; a file already in the folder that the save did not write keeps its own."""
    own = tmp_path / "notes.txt"
    own.write_text("mine")
    os.chmod(own, 0o600)
    old = os.umask(umask)
    try:
        model.save_pretrained(str(tmp_path))
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir() if p.name != "notes.txt"}
    assert "model.safetensors" in modes and "config.json" in modes, modes
    assert all(m == expected for m in modes.values()), modes
    assert own.stat().st_mode & 0o777 == 0o600


def test_a_file_whose_mode_cannot_be_widened_leaves_the_save_standing_with_a_warning(model, tmp_path, monkeypatch):
    """Another user's file in a shared folder (here config.json, 0600), rewritten in place by the save
    (transformers opens it "w"), cannot be chmod-ed by this user (EPERM): widening its mode failed the
    whole save after its weights were written. The save now stands and names the file left narrower."""
    (tmp_path / "config.json").write_text("{}")
    os.chmod(tmp_path / "config.json", 0o600)
    real_chmod = os.chmod

    def chmod(path, mode, *args, **kwargs):  # config.json is another user's: only its owner may chmod it
        if os.path.abspath(str(path)) == str(tmp_path / "config.json"):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_chmod(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    old = os.umask(0o022)
    try:
        with pytest.warns(UserWarning, match=r"keep modes narrower than the umask's 644: config\.json \(600: "
                                             r"Operation not permitted\)"):
            model.save_pretrained(str(tmp_path))
    finally:
        os.umask(old)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert LLaVEEmbedder.from_pretrained(str(tmp_path)) is not None


def test_a_folder_without_weights_or_tokenizer_is_refused_by_name(model, tmp_path):
    """A folder missing its weights or its tokenizer failed inside transformers (OSError, or ValueError
    "Couldn't instantiate the backend tokenizer"; the CLI called both a bug); a tokenizer_config.json
    without the vocabulary gave a TypeError later. Each is now a typed error naming the folder."""
    import shutil

    from llave_fast.errors import InvalidArgument, MissingFile

    model.save_pretrained(str(tmp_path / "good"))

    def variant(name, drop=(), write=None):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        for f in drop:
            (tmp_path / name / f).unlink()
        for f, text in (write or {}).items():
            (tmp_path / name / f).write_text(text)
        return str(tmp_path / name)

    with pytest.raises(MissingFile, match=r"no weights in '.*nowts': none of model.safetensors, "):
        LLaVEEmbedder.from_pretrained(variant("nowts", drop=["model.safetensors"]))
    tokenizer_files = [p.name for p in (tmp_path / "good").iterdir() if p.name.startswith("tokenizer")]
    assert tokenizer_files, sorted(p.name for p in (tmp_path / "good").iterdir())
    with pytest.raises(MissingFile, match=r"no tokenizer in '.*notok': none of tokenizer.json, "):
        LLaVEEmbedder.from_pretrained(variant("notok", drop=tokenizer_files))
    with pytest.raises(InvalidArgument, match=r"the tokenizer in '.*novocab' \(tokenizer_config.json\) could not "
                                              r"be loaded: ValueError: "):
        LLaVEEmbedder.from_pretrained(variant("novocab", drop=["tokenizer.json"]))
    # a class that builds itself from the config alone: one special token, no vocabulary
    with pytest.raises(InvalidArgument, match=r"the tokenizer in '.*qwen' has no vocabulary \(1 token, from "
                                              r"tokenizer_config.json\)"):
        LLaVEEmbedder.from_pretrained(variant("qwen", drop=["tokenizer.json"],
                                              write={"tokenizer_config.json": '{"tokenizer_class": "Qwen2TokenizerFast"}'}))
    with pytest.raises(InvalidArgument, match=r"the tokenizer in '.*broken' \(tokenizer.json, tokenizer_config.json\) "
                                              r"could not be loaded: "):
        LLaVEEmbedder.from_pretrained(variant("broken", write={"tokenizer.json": "{not json"}))
    assert LLaVEEmbedder.from_pretrained(str(tmp_path / "good")) is not None


def test_transformers_format_with_lm_head_loads(model, tmp_path):
    """A LlavaOnevisionForConditionalGeneration export (model.* names + lm_head) loads too."""
    from transformers import LlavaOnevisionForConditionalGeneration

    full = LlavaOnevisionForConditionalGeneration(model.config)
    full.model.load_state_dict(model.model.state_dict())
    full.save_pretrained(str(tmp_path))
    model.processor.save_pretrained(str(tmp_path))
    m = LLaVEEmbedder.from_pretrained(str(tmp_path))
    sd = model.model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in m.model.state_dict().items())


# ------------------------------------------------------------------------------------------
# prompt, tiling, token counts
# ------------------------------------------------------------------------------------------


def test_prompt_format(model):
    p = model.processor
    assert p.build_prompt("<|image_1|>\nRepresent the given image.", True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nRepresent the given image.<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_end|>\n"
    )
    assert p.build_prompt("what?", True).count("<image>\nwhat?") == 1  # image before text without a placeholder
    batch = p(["<|image_1|>\nwhat colour is the circle?", "a blue star"], [shapes_image(32, 32), None])
    tok = p.tokenizer
    for row, mask in zip(batch["input_ids"], batch["attention_mask"]):
        ids = row[mask.bool()].tolist()
        tail = tok.convert_ids_to_tokens(ids[-6:])
        assert tail == ["<|im_start|>", "assistant", "\n", "\n", "<|im_end|>", "\n"], tail
        assert tok.convert_ids_to_tokens(ids[:3]) == ["<|im_start|>", "system", "\n"]
    ids0 = batch["input_ids"][0]
    pos = torch.nonzero(ids0 == p.image_token_id).flatten()
    assert len(pos) == p.num_image_tokens(32, 32) and bool((pos.diff() == 1).all())  # one contiguous run
    assert int((batch["input_ids"][1] == p.image_token_id).sum()) == 0


def test_tiling_base_view_and_row_major_crops(model):
    norm = lambda c: (torch.tensor(c, dtype=torch.float32) / 255 - 0.5) / 0.5  # noqa: E731
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    # tiny default grid (1x1..2x2): a 64x64 image in four coloured quadrants -> base view + 2x2 crops
    p = build_tiny_model().processor
    im = Image.new("RGB", (64, 64))
    for k, c in enumerate(colours):
        im.paste(c, ((k % 2) * 32, (k // 2) * 32, (k % 2) * 32 + 32, (k // 2) * 32 + 32))
    tiles, size = p.preprocess_image(im)
    assert size == (64, 64) and tiles.shape == (5, 3, 32, 32)
    # base view: the whole image squeezed to 32x32 (quadrants now 16 px)
    for k, c in enumerate(colours):
        assert torch.allclose(tiles[0, :, (k // 2) * 16 + 4, (k % 2) * 16 + 4], norm(c), atol=1e-5), k
    for k, c in enumerate(colours):  # crops row-major: TL, TR, BL, BR
        assert torch.allclose(tiles[1 + k, :, 16, 16], norm(c), atol=1e-5), k

    # the converted checkpoint's grid, (height, width) = (32,32),(32,64),(32,96),(64,32):
    p = model.processor
    # a 96x32 (w x h) image takes the (32, 96) pinpoint: three crops, left to right
    wide = Image.new("RGB", (96, 32))
    for k, c in enumerate(colours[:3]):
        wide.paste(c, (k * 32, 0, k * 32 + 32, 32))
    tiles, size = p.preprocess_image(wide)
    assert size == (32, 96) and tiles.shape[0] == 4
    for k in range(3):
        assert torch.allclose(tiles[1 + k, :, 16, 16], norm(colours[k]), atol=1e-5), k
    # a 48x32 (w x h) image takes the (32, 64) pinpoint: kept 48x32, centred on black padding
    tiles, _ = p.preprocess_image(Image.new("RGB", (48, 32), (255, 255, 255)))
    assert tiles.shape[0] == 3  # base + two crops side by side
    assert torch.allclose(tiles[1, :, 16, 0], norm((0, 0, 0)), atol=1e-5)  # left padding is black
    assert torch.allclose(tiles[1, :, 16, 31], norm((255, 255, 255)), atol=1e-5)
    assert torch.allclose(tiles[2, :, 16, 31], norm((0, 0, 0)), atol=1e-5)  # right padding too
    # a tall 32x64 (w x h) image takes the (64, 32) pinpoint: two crops, top to bottom
    tall = Image.new("RGB", (32, 64))
    tall.paste(colours[3], (0, 32, 32, 64))
    tiles, size = p.preprocess_image(tall)
    assert size == (64, 32) and tiles.shape[0] == 3
    assert torch.allclose(tiles[2, :, 16, 16], norm(colours[3]), atol=1e-5)


SIZES_WH = [(32, 32), (64, 64), (96, 32), (32, 96), (500, 20), (20, 500), (1, 1), (37, 91), (200, 130), (33, 65)]


def test_image_token_counts_match_vision_features(model):
    p = model.processor
    images = [shapes_image(w, h, i) for i, (w, h) in enumerate(SIZES_WH)]
    batch = p(["<|image_1|>\nrepresent"] * len(images), images)
    with torch.no_grad():
        feats = model.model.get_image_features(
            torch.cat(batch["pixel_values"]), torch.tensor(batch["image_sizes"])
        ).pooler_output
    for (w, h), f, row in zip(SIZES_WH, feats, batch["input_ids"]):
        n = p.num_image_tokens(h, w)
        assert f.shape[0] == n, f"image {w}x{h}: {f.shape[0]} features, {n} tokens counted"
        assert int((row == p.image_token_id).sum()) == n
    emb = model(batch)  # the model's own placeholder check passes for every aspect ratio
    assert emb.shape == (len(images), model.embed_dim) and torch.isfinite(emb).all()


def test_anyres_max_shrink_counts_match():
    """Grids larger than anyres_max_N tiles are shrunk: counts still match the features."""
    m = build_tiny_model(max_grid=3).eval()
    m.model.config.vision_aspect_ratio = "anyres_max_1"
    tok = m.processor.tokenizer
    p = LLaVEProcessor.from_config(tok, m.model.config)
    images = [shapes_image(w, h, i) for i, (w, h) in enumerate([(96, 96), (90, 30), (30, 95), (64, 96)])]
    batch = p(["x"] * 4, images)
    with torch.no_grad():
        feats = m.model.get_image_features(torch.cat(batch["pixel_values"]), torch.tensor(batch["image_sizes"])).pooler_output
    full = [count_image_tokens(h, w, image_size=32, patch_size=8, grid_pinpoints=p.image_grid_pinpoints,
                               vision_aspect_ratio="anyres_max_99") for (h, w) in batch["image_sizes"]]
    assert [f.shape[0] for f in feats] == [p.num_image_tokens(*s) for s in batch["image_sizes"]]
    assert any(f.shape[0] < n for f, n in zip(feats, full))  # the shrink did happen
    with torch.no_grad():
        assert torch.isfinite(m(batch)).all()


# ------------------------------------------------------------------------------------------
# the forward: pooling, padding, batch layout
# ------------------------------------------------------------------------------------------


TEXTS = [
    "<|image_1|>\nRepresent the given image with the following question: how many red circles?",
    "two green squares at the bottom right",
    "<|image_1|>\nFind the colour of the large star.",
    "yes",
    "<|image_1|>\nRepresent the given image.",
]
IMAGES_WH = [(64, 64), None, (96, 32), None, (20, 70)]


def _images():
    return [None if s is None else shapes_image(*s, seed=i) for i, s in enumerate(IMAGES_WH)]


def test_left_and_right_padding_give_the_same_embeddings(model):
    p = model.processor
    imgs = _images()
    right, left = p(TEXTS, imgs, padding_side="right"), p(TEXTS, imgs, padding_side="left")
    assert not torch.equal(right["attention_mask"], left["attention_mask"])  # padding really differs
    with torch.no_grad():
        a, b = model(right), model(left)
    assert torch.allclose(a, b, atol=ATOL, rtol=0), report(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sample_alone_equals_sample_in_mixed_padded_batch(model, padding_side):
    p = model.processor
    imgs = _images()
    with torch.no_grad():
        together = model(p(TEXTS, imgs, padding_side=padding_side, pad_to_multiple_of=16))
        alone = torch.cat([model(p([t], [im])) for t, im in zip(TEXTS, imgs)])
    assert torch.allclose(together, alone, atol=ATOL, rtol=0), report(together, alone)
    # and the samples are not all the same vector
    assert (together @ together.T - torch.eye(len(TEXTS))).abs().max() < 0.9999


def test_pooling_reads_the_last_real_token(model):
    """Changing a padding token changes nothing; changing the last real token changes the embedding."""
    p = model.processor
    batch = p(["a red circle", "three blue stars at the top left of the picture"], padding_side="right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        base = model(batch)
        pad_changed = dict(batch, input_ids=torch.where(mask.bool(), ids, torch.full_like(ids, 7)))
        assert torch.allclose(model(pad_changed), base, atol=ATOL, rtol=0)
        last = int(mask[0].sum()) - 1
        tail_changed = ids.clone()
        tail_changed[0, last] = 7
        moved = model(dict(batch, input_ids=tail_changed))
    assert not torch.allclose(moved[0], base[0], atol=1e-3)
    assert torch.allclose(moved[1], base[1], atol=ATOL, rtol=0)


def test_vision_features_skip_post_layernorm(model):
    """Features are the last kept layer's output before post_layernorm: changing it changes nothing."""
    batch = model.processor(["<|image_1|>\nx"], [shapes_image(64, 40)])
    ln = model.model.vision_tower.post_layernorm
    assert not ln.weight.requires_grad  # unused, hence frozen
    with torch.no_grad():
        a = model(batch)
        saved = ln.weight.clone(), ln.bias.clone()
        ln.weight.mul_(3.0)
        ln.bias.add_(1.0)
        b = model(batch)
        ln.weight.copy_(saved[0])
        ln.bias.copy_(saved[1])
        # ... while the last encoder layer does matter
        fc2 = model.model.vision_tower.encoder.layers[-1].mlp.fc2.bias
        fc2.add_(0.5)
        c = model(batch)
        fc2.sub_(0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-4)


def test_gradcache_style_split_gives_the_same_embeddings(model):
    from llave_fast.gradcache import split_batch

    batch = model.processor(TEXTS, _images(), padding_side="left")
    with torch.no_grad():
        whole = model(batch)
        parts = torch.cat([model(chunk) for chunk in split_batch(batch, 2)])
    assert torch.allclose(whole, parts, atol=ATOL, rtol=0), report(whole, parts)


def test_gradients_with_and_without_checkpointing():
    m = build_tiny_model(seed=3)
    batch = m.processor(TEXTS, _images(), padding_side="left")

    def grads():
        m.zero_grad(set_to_none=True)
        e = m(batch)
        (e @ torch.linspace(-1, 1, m.embed_dim)).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    m.train()
    g0 = grads()
    m.gradient_checkpointing_enable()
    assert m.is_gradient_checkpointing
    g1 = grads()
    m.gradient_checkpointing_disable()
    assert g0.keys() == g1.keys()
    assert any(n.startswith("model.vision_tower.") for n in g0) and any("multi_modal_projector" in n for n in g0)
    assert "model.image_newline" in g0
    for n in g0:
        assert torch.isfinite(g0[n]).all(), n
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-4), f"{n}: {report(g0[n], g1[n])}"


def test_encode_matches_forward_and_restores_mode(model):
    texts, imgs = TEXTS[:3], _images()[:3]
    model.train()
    try:
        e = model.encode(texts, imgs, batch_size=2)
        assert model.training
    finally:
        model.eval()
    with torch.no_grad():
        f = model(model.processor(texts, imgs))
    assert e.shape == (3, model.embed_dim) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.allclose(e, f, atol=ATOL, rtol=0), report(e, f)
    assert model.encode(["hi"]).shape == (1, model.embed_dim)


# ------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "texts, images, exc, match",
    [
        (["a", "b"], [None], ValueError, "texts has 2 entries but images has 1"),
        ("a red circle", None, TypeError, "texts must be a list of str"),
        ([], None, ValueError, "empty"),
        (["a", 3], None, TypeError, r"texts\[1\] must be a str"),
        (["<|image_1|>\nwhat?"], [None], ValueError, r"images\[0\] is None"),
        (["<|image_1|> and <|image_2|>"], ["IMG"], ValueError, "2 image placeholders"),
        (["a"], ["not an image"], TypeError, r"images\[0\] must be a PIL.Image"),
        (["a"], (x for x in [None]), TypeError, "images must be a list"),
    ],
)
def test_processor_rejects_bad_inputs(model, texts, images, exc, match):
    if isinstance(images, list):
        images = [shapes_image(32, 32) if x == "IMG" else x for x in images]
    with pytest.raises(exc, match=match):
        model.processor(texts, images)


def test_processor_rejects_bad_padding_side(model):
    with pytest.raises(ValueError, match="padding_side"):
        model.processor(["a"], padding_side="middle")


def test_forward_rejects_inconsistent_batches(model):
    p = model.processor
    good = p(["<|image_1|>\nx", "y"], [shapes_image(64, 64), None])
    cases = [
        (dict(good, pixel_values=[None, None], image_sizes=[None, None]), "image tokens but no image"),
        (dict(good, pixel_values=[good["pixel_values"][0][:1], None]), r"needs 2 tiles .* got 1"),
        # same tile count (2), other unpadded feature count
        (dict(good, image_sizes=[(10, 20), None]), r"has 36 image tokens but its image .* gives 26"),
        (dict(good, pixel_values=good["pixel_values"][:1]), "has 1 entries but input_ids has 2 rows"),
        (dict(good, image_sizes=[None, None]), "both be given or both be None"),
        (dict(good, attention_mask=good["attention_mask"][:, :-1]), "shaped like input_ids"),
        (dict(good, attention_mask=torch.zeros_like(good["attention_mask"])), "no real token"),
        ({k: v for k, v in good.items() if k != "attention_mask"}, "attention_mask"),
        (dict(good, pixel_values=torch.zeros(2, 3, 32, 32)), "one entry"),
    ]
    for batch, match in cases:
        with pytest.raises((ValueError, KeyError, TypeError), match=match):
            model(batch)


# ------------------------------------------------------------------------------------------
# the tiny model and options
# ------------------------------------------------------------------------------------------


def test_tiny_model_is_small_deterministic_and_knows_the_dataset_words():
    a, b, c = build_tiny_model(seed=0), build_tiny_model(seed=0), build_tiny_model(seed=1)
    n = sum(p.numel() for p in a.parameters())
    assert 1e5 < n < 5e6, n
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    tok = a.processor.tokenizer
    # the synthetic dataset's words are single tokens; unknown words fall back to letters, never [UNK]
    words = "red green blue yellow purple orange black white circle square triangle star one five left right top bottom center small large"
    assert len(tok(words, add_special_tokens=False)["input_ids"]) == len(words.split())
    assert tok.unk_token_id not in tok("zebra xylophone 42", add_special_tokens=False)["input_ids"]


def test_attn_implementation_choice():
    assert default_attn_implementation(torch.float32) == "sdpa"
    if not torch.cuda.is_available():
        assert default_attn_implementation(torch.bfloat16) == "sdpa"
    m = build_tiny_model()
    assert m.config._attn_implementation == "sdpa"


def test_bf16_load(ckpt):
    folder, _ = ckpt
    m = LLaVEEmbedder.from_pretrained(str(folder), vision_config=VISION, torch_dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16
    with torch.no_grad():
        e = m(m.processor(TEXTS[:2], _images()[:2]))
    assert e.dtype == torch.float32 and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-4)
    assert math.isfinite(float(e.sum()))


# ------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3: weights partitioned at load time, through transformers' from_pretrained
# ------------------------------------------------------------------------------------------


def _zero3_load_rank(rank, world, folder):
    import os

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    from safetensors.torch import load_file
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must stay alive during from_pretrained
    m = LLaVEEmbedder.from_pretrained(folder, vision_config=VISION)
    params = dict(m.model.named_parameters())
    assert all(hasattr(p, "ds_id") for p in params.values()), "not built under zero.Init"
    big = params["language_model.layers.0.mlp.gate_proj.weight"]
    assert big.numel() == 0 and big.ds_numel == 512 * 128  # partitioned: nothing whole on this rank
    written = load_file(os.path.join(folder, "model.safetensors"))
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, p in params.items():
            assert torch.equal(p.detach().cpu(), written[to_llava_next_name(name)]), name
    del keep


@pytest.mark.slow
def test_zero3_partitions_at_load_and_every_weight_lands(ckpt):
    pytest.importorskip("deepspeed")
    pytest.importorskip("accelerate")
    from llave_fast.testing import spawn_ranks

    folder, _ = ckpt
    spawn_ranks(_zero3_load_rank, 2, str(folder))


def test_max_text_tokens_cuts_only_the_user_text():
    from llave_fast.model import build_tiny_model
    from PIL import Image

    proc = build_tiny_model(0).processor
    long_text = " ".join(["red circle on the left"] * 40)
    full = proc([long_text])["attention_mask"].sum().item()
    proc.max_text_tokens = 10
    cut = proc([long_text])["attention_mask"].sum().item()
    n_text = len(proc.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert n_text > 10
    assert cut == full - (n_text - 10)
    # short texts and the image placeholder are untouched
    short = proc(["red circle"])["input_ids"]
    proc.max_text_tokens = None
    assert torch.equal(short, proc(["red circle"])["input_ids"])
    proc.max_text_tokens = 3
    img = Image.new("RGB", (32, 32))
    b = proc(["<|image_1|>\n" + long_text], [img])
    assert (b["input_ids"] == proc.image_token_id).sum() > 0
    with pytest.raises(ValueError, match="max_text_tokens"):
        type(proc)(proc.tokenizer, image_size=32, patch_size=8, image_grid_pinpoints=[[32, 32]], max_text_tokens=0)


def _byte_level_bpe():
    """A small byte-level BPE (Qwen2's kind of tokenizer), trained here, offline: a character outside
    its merges is several byte tokens sharing one character span."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["what is in the image? a red circle on the left"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])


def test_max_text_tokens_is_a_bound_with_multi_byte_characters():
    """Cut at a token's end, a character split over byte tokens kept its other bytes: 25 gave 27 tokens."""
    tok = _byte_level_bpe()
    texts = ["😀😀😀 漢字テスト 🎉 what is in the image?", "日本語の文章です。とても長い。", "a red circle 😀 on the left"]
    over = []
    for limit in range(1, 30):
        proc = LLaVEProcessor(tok, image_size=32, patch_size=8, image_grid_pinpoints=[[32, 32]], max_text_tokens=limit)
        for text in texts:
            cut = proc.truncate(text)
            n = len(tok(cut, add_special_tokens=False)["input_ids"])
            full = len(tok(text, add_special_tokens=False)["input_ids"])
            if n > limit or not text.startswith(cut) or (full <= limit and cut != text):
                over.append((limit, text[:12], n))
            assert n >= limit - 4 or full <= limit, (limit, text, cut)  # no more than a character's bytes lost
    assert not over, over


def test_processor_from_a_llava_qwen_folder_cuts_at_its_max_length_and_takes_the_loaders_options(tmp_path):
    """Loaded alone, the processor of an official-layout folder cuts as the embedder's does
    (tokenizer_model_max_length), and vision_config / ignore_config_keys reach the config reader."""
    write_llava_qwen(tmp_path)
    proc = LLaVEProcessor.from_pretrained(str(tmp_path), vision_config=VISION)
    assert proc.max_length == 4096
    assert proc.max_length == LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=VISION).processor.max_length
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, some_new_switch=True)))
    with pytest.raises(ValueError, match="some_new_switch"):
        LLaVEProcessor.from_pretrained(str(tmp_path), vision_config=VISION)
    proc = LLaVEProcessor.from_pretrained(str(tmp_path), vision_config=VISION, ignore_config_keys=["some_new_switch"])
    assert proc.max_length == 4096


def test_a_two_tower_siglip_config_gives_its_vision_half(tmp_path):
    """Most hub towers' config.json is a SiglipConfig / CLIPConfig with the vision tower nested."""
    write_llava_qwen(tmp_path)
    two_tower = {"model_type": "siglip", "text_config": {"hidden_size": 16}, "vision_config": dict(VISION)}
    m = LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=two_tower)
    assert m.config.vision_config.num_hidden_layers == 2 and m.config.vision_config.hidden_size == 64


def test_a_llava_next_checkpoint_with_another_language_model_is_refused_naming_it(tmp_path):
    write_llava_qwen(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(raw, model_type="llava",
                                                          architectures=["LlavaLlamaForCausalLM"])))
    with pytest.raises(ValueError, match=r"not Qwen2 \(architectures \['LlavaLlamaForCausalLM'\]\)"):
        LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=VISION)


def test_an_image_of_more_than_8_bits_a_channel_is_said_to_lose_its_range(model, tmp_path, monkeypatch):
    """LLaVE converts a 16-bit or float image to RGB as it is (values clipped to 0..255); so do we,
    with a warning, in the processor and when a data file's image is opened."""
    import warnings

    import numpy as np

    from llave_fast.data.images import open_rgb

    wide = Image.fromarray((np.random.default_rng(0).random((40, 40)) * 65535).astype(np.uint16))
    assert wide.mode == "I;16"
    wide.save(tmp_path / "wide.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "plain.png")
    from llave_fast.model import processor as processor_module

    for run in (lambda: model.processor(["<image>\nx"], [wide]), lambda: open_rgb(str(tmp_path / "wide.png"))):
        monkeypatch.setattr(processor_module, "_wide_range_said", False)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            run()
            run()  # said once per process, not per image
        said = [w for w in seen if "'I;16'" in str(w.message) and "clips values to 0..255" in str(w.message)]
        assert len(said) == 1, seen
    monkeypatch.setattr(processor_module, "_wide_range_said", False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.processor(["<image>\nx"], [Image.new("RGB", (40, 40))])
        open_rgb(str(tmp_path / "plain.png"))
    assert not [w for w in seen if "8 bits" in str(w.message)], seen


def test_processor_takes_so400m_geometry_and_rejects_a_patch_larger_than_the_tile():
    tok = build_tiny_tokenizer()
    pins = [[384, 384], [384, 768], [768, 384], [768, 768]]
    p = LLaVEProcessor(tok, image_size=384, patch_size=14, image_grid_pinpoints=pins)
    assert p.num_image_tokens(384, 384) == 729 + 27 * 28  # 27 x 27 patches: the convolution floors
    with pytest.raises(ValueError, match=r"image_size \(10\) must be at least patch_size \(14\)"):
        LLaVEProcessor(tok, image_size=10, patch_size=14, image_grid_pinpoints=[[10, 10]])
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        LLaVEProcessor(tok, image_size=384, patch_size=14, image_grid_pinpoints=pins, max_length=0)


def test_unpad_follows_llave_floor_not_transformers_round():
    """A 94 x 423 (width x height) image on a 1-wide, 2-high grid of 27-patch tiles: LLaVE keeps
    int(94 * 54 / 423) = int(11.999...) = 11 columns, padding (27 - 11) // 2 = 8 each side."""
    from llave_fast.model.processor import unpadded_shape

    assert unpadded_shape(423, 94, 54, 27) == (54, 11)
    n = count_image_tokens(423, 94, image_size=384, patch_size=14,
                           grid_pinpoints=[[384, 384], [384, 768], [768, 384], [768, 768]])
    assert n == 729 + 54 * 12


def test_checkpoint_keys_of_a_pickled_checkpoint(tmp_path):
    from llave_fast.model.convert import checkpoint_keys, vision_layers_in_checkpoint

    names = [f"model.vision_tower.vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(3)]
    torch.save({k: torch.zeros(2) for k in names + ["model.norm.weight"]}, tmp_path / "pytorch_model.bin")
    keys = checkpoint_keys(str(tmp_path))
    assert keys == sorted(names + ["model.norm.weight"])
    assert vision_layers_in_checkpoint(keys) == 3
    with pytest.raises(CheckpointKeyError, match=r"missing \[1\]"):
        vision_layers_in_checkpoint([names[0], names[2]])


def test_max_length_cuts_the_whole_sequence_after_the_image_tokens():
    """LLaVE's rule: the sequence, image tokens inserted, is cut; the text alone never is."""
    proc = build_tiny_model(0).processor
    long_text = "<|image_1|>\n" + " ".join(["red circle on the left"] * 40)
    img = Image.new("RGB", (64, 32))
    full = proc([long_text], [img])["input_ids"][0]
    n_image = int((full == proc.image_token_id).sum())
    proc.max_length = n_image + 20
    cut = proc([long_text], [img])["input_ids"][0]
    assert cut.shape[0] == n_image + 20 and torch.equal(cut, full[: n_image + 20])
    assert int((cut == proc.image_token_id).sum()) == n_image  # the image is whole, the text after it is cut
    proc.max_length = None
    assert torch.equal(proc([long_text], [img])["input_ids"][0], full)


def test_a_max_length_that_cuts_before_the_image_names_max_length():
    """The cut lands before the image placeholder: no image token is left for its features, and the
    error says which setting did it (it used to name only the token counts)."""
    from llave_fast.errors import InvalidArgument

    model = build_tiny_model(0)
    proc = model.processor
    proc.max_length = 10
    batch = proc(["<|image_1|>\nred circle"], [Image.new("RGB", (64, 64))])
    assert int((batch["input_ids"] == proc.image_token_id).sum()) == 0
    with pytest.raises(InvalidArgument, match=r"0 image tokens.*max_length=10 \(--max-length\) cut the sequence "
                                              r"before its image"):
        model(batch)
    with pytest.raises(InvalidArgument, match="max_text_tokens must be a positive int or None, got 0"):
        proc.max_text_tokens = 0  # checked on assignment too, not only in the constructor


# ------------------------------------------------------------------------------ precision names
@pytest.mark.parametrize("spelling, dtype", [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
    ("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16),
    ("fp32", torch.float32), ("float32", torch.float32), (torch.float16, torch.float16),
])
def test_one_precision_map_for_the_loader_export_and_evaluation(spelling, dtype):
    from llave_fast.dtypes import parse_dtype
    from llave_fast.evaluate import eval_precision

    assert parse_dtype(spelling) == dtype
    assert build_tiny_model(torch_dtype=spelling).dtype == dtype
    if isinstance(spelling, str):
        assert eval_precision("cpu", spelling) == (torch.device("cpu"), dtype)


def test_a_bad_precision_names_the_argument_and_the_choices(tmp_path):
    from llave_fast.errors import InvalidArgument, InvalidArgumentType
    from llave_fast.evaluate import eval_precision
    from llave_fast.export import export_run

    with pytest.raises(InvalidArgument, match=r"torch_dtype must be one of \['bf16', 'fp16', 'fp32'\], got 'int8' "
                                              r"\(also accepted: bfloat16 \(bf16\)"):
        build_tiny_model(torch_dtype="int8")
    with pytest.raises(InvalidArgumentType, match="torch_dtype must be None, 'auto', a torch.dtype or a name"):
        build_tiny_model(torch_dtype=16)
    # export has no evaluation precision; refused before the run folder is looked at
    with pytest.raises(InvalidArgument, match=r"dtype must be one of \['bf16', 'fp16', 'fp32'\], got 'llave'"):
        export_run(str(tmp_path / "no_run"), dtype="llave")
    with pytest.raises(InvalidArgument, match=r"dtype must be one of \['auto', 'bf16', 'fp16', 'fp32', 'llave'\], "
                                              r"got 'float64'"):
        eval_precision("cpu", "float64")


def test_uniform_modules_run_the_vision_side_without_lengthening_a_text_batch():
    """Multi-rank ZeRO-3 (uniform_modules): a text-only batch runs the vision tower and projector on a
    blank image, in the image path's order, with zero gradients; the embeddings are unchanged and the
    language model sees the batch's own rows and length, not an image-long dummy row."""
    from llave_fast.model import build_tiny_model

    m = build_tiny_model(0).eval()
    batch = m.processor(["a red circle", "three blue stars at the top left"])
    with torch.no_grad():
        plain = m(batch)
    order, shapes = [], []
    hooks = [mod.register_forward_pre_hook(lambda mod, a, k, name=name: order.append(name), with_kwargs=True)
             for name, mod in (("embed", m.model.get_input_embeddings()), ("vision", m.model.vision_tower),
                               ("projector", m.model.multi_modal_projector), ("lm", m.model.language_model))]
    hooks.append(m.model.language_model.register_forward_pre_hook(
        lambda mod, a, k: shapes.append(tuple(k["inputs_embeds"].shape[:2])), with_kwargs=True))
    m.uniform_modules = True
    m.zero_grad(set_to_none=True)
    out = m(batch)
    for h in hooks:
        h.remove()
    assert order == ["embed", "vision", "projector", "lm"], order  # the image path's order
    assert shapes == [tuple(batch["input_ids"].shape)], shapes
    torch.testing.assert_close(out, plain, rtol=0, atol=ATOL)
    out.sum().backward()
    vision = [p.grad for p in m.model.multi_modal_projector.parameters()]
    assert all(g is not None and not g.any() for g in vision), "the vision side must get zero gradients"
    # an image batch is left as it is
    with torch.no_grad():
        imgs = m.processor(["<image> x", "y"], [Image.new("RGB", (40, 30)), None])
        m.uniform_modules = False
        a = m(imgs)
        m.uniform_modules = True
        torch.testing.assert_close(m(imgs), a, rtol=0, atol=0)


def test_the_umask_is_read_without_being_changed(model, tmp_path, monkeypatch):
    """``os.umask`` can only be read by setting it; while it was 0, another thread's new files (a loader's,
    a checkpoint writer's) got mode 0666. Where the kernel reports it (Linux), the save now reads the umask
    without setting it, and the modes are still the umask's."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("no /proc/self/status: the umask can only be read by setting it")
    old = os.umask(0o027)
    try:
        calls = []
        real = os.umask
        monkeypatch.setattr(os, "umask", lambda m: calls.append(m) or real(m))
        model.save_pretrained(str(tmp_path))
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert calls == [], f"the save set the umask: {calls}"
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640
    from llave_fast.model.embedder import _process_umask

    old = os.umask(0o027)
    try:
        assert _process_umask() == 0o027
    finally:
        os.umask(old)
