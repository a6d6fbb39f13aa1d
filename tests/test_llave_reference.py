"""LLaVE's real geometry, end to end: a tiny ``llava_qwen`` checkpoint with 384-px tiles of
14-px patches (27 x 27 = 729 patches per tile: 384 is not a multiple of 14), loaded by
``LLaVEEmbedder.from_pretrained`` and compared, number for number, with LLaVE's forward.

The truth here is this file's own implementation of what LLaVE's code does, written from
LLaVE's description (DESIGN.md) and not from ``llave_fast``: PIL preprocessing (anyres
pinpoints as (width, height), resize-and-pad, row-major crops, a base view resized to
384 x 384), SigLIP from its raw weights (floored patch convolution, the checkpoint's kept
layers, no post-layernorm), the 2-layer GELU projector, the unpadded grid with LLaVE's
floored ``int()`` and one ``image_newline`` per row, the qwen_1_5 prompt tokenised in pieces
split at ``<image>``, the sequence cut at ``tokenizer_model_max_length``, Qwen2 with RoPE
from the config's own theta, the last token's final hidden state, L2-normalised. It runs in
float64; the embedder runs in float32.

Both config layouts are covered: ``rope_theta`` at top level (what the released checkpoints
have, written by transformers 4.x) and inside ``rope_parameters`` (what transformers 5 writes
when a LLaVE model is re-saved). Widths are tiny so the whole file runs in seconds on CPU.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from llave_fast.model import LLaVEEmbedder, build_tiny_tokenizer

TILE, PATCH = 384, 14
SIDE = TILE // PATCH  # 27: the convolution floors
V_HIDDEN, V_HEADS, V_INTER, V_TOWER_LAYERS, V_KEPT = 32, 2, 64, 3, 2
T_HIDDEN, T_HEADS, T_KV, T_INTER, T_LAYERS = 64, 4, 2, 128, 2
THETA = 1_000_000.0  # Qwen2's RoPE base; the old converter's default was 10000
TOL = 1e-5  # fp32 embedder vs float64 truth, on unit vectors

# the tower's own config.json (3 layers); the checkpoint keeps 2 (LLaVE deletes the last)
TOWER_CONFIG = dict(
    model_type="siglip_vision_model", hidden_size=V_HIDDEN, intermediate_size=V_INTER,
    num_hidden_layers=V_TOWER_LAYERS, num_attention_heads=V_HEADS, image_size=TILE, patch_size=PATCH,
    num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)

# (width, height) -> the grid LLaVE picks (tiles wide, tiles high) and the unpad direction
IMAGES = {
    (50, 40): ((1, 1), "rows"),
    (40, 50): ((1, 1), "cols"),
    (900, 400): ((2, 1), "rows"),
    (400, 900): ((1, 2), "cols"),
    (800, 500): ((2, 2), "rows"),
    (500, 800): ((2, 2), "cols"),
    # int(94 * 54 / 423) = 11 under LLaVE's floor, 12 after transformers' round(., 7): 11 vs 13 columns kept
    (94, 423): ((1, 2), "cols"),
}


# ------------------------------------------------------------------------------------------
# the checkpoint, written by hand in LLaVA-NeXT's names
# ------------------------------------------------------------------------------------------


def _weights(vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def lin(out_f, in_f, scale=1.0):
        return torch.randn(out_f, in_f, generator=g) * scale / math.sqrt(in_f)

    def vec(n, scale=0.1, base=0.0):
        return base + scale * torch.randn(n, generator=g)

    w = {}
    v = "model.vision_tower.vision_tower.vision_model."
    w[v + "embeddings.patch_embedding.weight"] = torch.randn(V_HIDDEN, 3, PATCH, PATCH, generator=g) / PATCH
    w[v + "embeddings.patch_embedding.bias"] = vec(V_HIDDEN)
    w[v + "embeddings.position_embedding.weight"] = 0.5 * torch.randn(SIDE * SIDE, V_HIDDEN, generator=g)
    for i in range(V_KEPT):
        p = f"{v}encoder.layers.{i}."
        for ln in ("layer_norm1", "layer_norm2"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = vec(V_HIDDEN, base=1.0), vec(V_HIDDEN)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            w[p + f"self_attn.{proj}.weight"], w[p + f"self_attn.{proj}.bias"] = lin(V_HIDDEN, V_HIDDEN), vec(V_HIDDEN)
        w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"] = lin(V_INTER, V_HIDDEN), vec(V_INTER)
        w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"] = lin(V_HIDDEN, V_INTER), vec(V_HIDDEN)
    w[v + "post_layernorm.weight"], w[v + "post_layernorm.bias"] = vec(V_HIDDEN, base=1.0), vec(V_HIDDEN)
    w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"] = lin(T_HIDDEN, V_HIDDEN), vec(T_HIDDEN)
    w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"] = lin(T_HIDDEN, T_HIDDEN), vec(T_HIDDEN)
    w["model.image_newline"] = torch.randn(T_HIDDEN, generator=g)
    w["model.embed_tokens.weight"] = torch.randn(vocab, T_HIDDEN, generator=g)
    dh = T_HIDDEN // T_HEADS
    for i in range(T_LAYERS):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = vec(T_HIDDEN, base=1.0)
        w[p + "post_attention_layernorm.weight"] = vec(T_HIDDEN, base=1.0)
        w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"] = lin(T_HIDDEN, T_HIDDEN), vec(T_HIDDEN)
        w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"] = lin(T_KV * dh, T_HIDDEN), vec(T_KV * dh)
        w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"] = lin(T_KV * dh, T_HIDDEN), vec(T_KV * dh)
        w[p + "self_attn.o_proj.weight"] = lin(T_HIDDEN, T_HIDDEN)
        w[p + "mlp.gate_proj.weight"] = lin(T_INTER, T_HIDDEN)
        w[p + "mlp.up_proj.weight"] = lin(T_INTER, T_HIDDEN)
        w[p + "mlp.down_proj.weight"] = lin(T_HIDDEN, T_INTER)
    w["model.norm.weight"] = vec(T_HIDDEN, base=1.0)
    w["lm_head.weight"] = lin(vocab, T_HIDDEN)
    return {k: t.contiguous() for k, t in w.items()}


def write_checkpoint(folder, layout: str, *, seed: int = 0, max_length: int = 4096, **overrides) -> dict:
    """A tiny LLaVE checkpoint with the real geometry; ``layout`` 'released' (transformers 4.x:
    top-level rope_theta, torch_dtype, string pinpoints) or 'transformers5' (rope_parameters,
    dtype, layer_types, pinpoints as a list). Returns the raw config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(with_image_token=False)  # LLaVE's tokenizers have no <image>
    vocab = len(tok) + 11
    save_file(_weights(vocab, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
    raw = {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "vocab_size": vocab,
        "hidden_size": T_HIDDEN, "intermediate_size": T_INTER, "num_hidden_layers": T_LAYERS,
        "num_attention_heads": T_HEADS, "num_key_value_heads": T_KV, "hidden_act": "silu",
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "use_cache": True, "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": T_LAYERS,
        "attention_dropout": 0.0, "initializer_range": 0.02,
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"), "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "mm_vision_tower": "tiny/siglip-tiny-patch14-384", "mm_hidden_size": V_HIDDEN,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_newline_position": "grid",
        "mm_spatial_pool_mode": "bilinear", "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "image_crop_resolution": None, "image_split_resolution": None, "mm_resampler_type": None,
        "tokenizer_model_max_length": max_length, "tokenizer_padding_side": "right", "use_pos_skipping": False,
        "pos_skipping_range": 4096, "vision_tower_pretrained": None, "use_mm_proj": True,
    }
    if layout == "released":
        raw.update(rope_theta=THETA, rope_scaling=None, torch_dtype="bfloat16", transformers_version="4.40.0.dev0",
                   image_grid_pinpoints="(1x1),...,(2x2)")
    elif layout == "transformers5":
        raw.update(rope_parameters={"rope_type": "default", "rope_theta": THETA}, dtype="bfloat16",
                   transformers_version="5.0.0", layer_types=["full_attention"] * T_LAYERS,
                   image_grid_pinpoints=[[384, 384], [384, 768], [768, 384], [768, 768]])
    else:
        raise AssertionError(layout)
    raw.update(overrides)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    tok.save_pretrained(str(folder))
    return raw


# ------------------------------------------------------------------------------------------
# LLaVE's forward, written here from its description (float64)
# ------------------------------------------------------------------------------------------


class Reference:
    def __init__(self, folder, raw: dict, theta: float | None = None):
        from safetensors.torch import load_file
        from transformers import PreTrainedTokenizerFast

        self.w = {k: v.double() for k, v in load_file(str(folder / "model.safetensors")).items()}
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(folder))
        if theta is None:
            theta = raw["rope_theta"] if "rope_theta" in raw else raw["rope_parameters"]["rope_theta"]
        self.theta = float(theta)
        self.max_length = raw["tokenizer_model_max_length"]
        pins = raw["image_grid_pinpoints"]
        if isinstance(pins, str):  # "(1x1),...,(2x2)": every grid from the first to the last, times the tile
            ends = [tuple(int(x) for x in m.strip("()").split("x")) for m in pins.split(",") if "x" in m]
            a, b = ends[0], ends[-1]
            pins = [[i * TILE, j * TILE] for i in range(a[0], b[0] + 1) for j in range(a[1], b[1] + 1)]
        self.pins = [tuple(p) for p in pins]  # (width, height)

    # -- images (PIL, LLaVA-NeXT's mm_utils rules)
    def grid(self, w: int, h: int) -> tuple[int, int]:
        best, best_eff, best_waste = None, -1, None
        for pw, ph in self.pins:
            s = min(pw / w, ph / h)
            eff = min(int(w * s) * int(h * s), w * h)
            waste = pw * ph - eff
            if eff > best_eff or (eff == best_eff and waste < best_waste):
                best, best_eff, best_waste = (pw, ph), eff, waste
        return best

    def tiles(self, image: Image.Image) -> torch.Tensor:
        w, h = image.size
        pw, ph = self.grid(w, h)
        if pw / w < ph / h:
            nw, nh = pw, min(math.ceil(h * pw / w), ph)
        else:
            nw, nh = min(math.ceil(w * ph / h), pw), ph
        canvas = Image.new("RGB", (pw, ph), (0, 0, 0))
        canvas.paste(image.resize((nw, nh)), ((pw - nw) // 2, (ph - nh) // 2))
        views = [image.resize((TILE, TILE))]
        for top in range(0, ph, TILE):
            for left in range(0, pw, TILE):
                views.append(canvas.crop((left, top, left + TILE, top + TILE)))
        arr = [torch.from_numpy(np.asarray(v, dtype=np.float64)) for v in views]  # (TILE, TILE, 3)
        return torch.stack([((a / 255.0) - 0.5) / 0.5 for a in arr]).permute(0, 3, 1, 2)

    def siglip(self, pixels: torch.Tensor) -> torch.Tensor:
        w, v = self.w, "model.vision_tower.vision_tower.vision_model."
        x = F.conv2d(pixels, w[v + "embeddings.patch_embedding.weight"], w[v + "embeddings.patch_embedding.bias"],
                     stride=PATCH)  # floors: 384 -> 27
        assert x.shape[-2:] == (SIDE, SIDE)
        x = x.flatten(2).transpose(1, 2) + w[v + "embeddings.position_embedding.weight"]
        i = 0
        while f"{v}encoder.layers.{i}.mlp.fc1.weight" in w:  # every layer the checkpoint kept
            p = f"{v}encoder.layers.{i}."
            y = F.layer_norm(x, (V_HIDDEN,), w[p + "layer_norm1.weight"], w[p + "layer_norm1.bias"], 1e-6)
            q, k, vv = (F.linear(y, w[p + f"self_attn.{n}_proj.weight"], w[p + f"self_attn.{n}_proj.bias"]) for n in "qkv")
            heads = lambda t: t.view(t.shape[0], t.shape[1], V_HEADS, -1).transpose(1, 2)  # noqa: E731
            att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(V_HIDDEN // V_HEADS), dim=-1)
            o = (att @ heads(vv)).transpose(1, 2).reshape(x.shape)
            x = x + F.linear(o, w[p + "self_attn.out_proj.weight"], w[p + "self_attn.out_proj.bias"])
            y = F.layer_norm(x, (V_HIDDEN,), w[p + "layer_norm2.weight"], w[p + "layer_norm2.bias"], 1e-6)
            y = F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"]), approximate="tanh")
            x = x + F.linear(y, w[p + "mlp.fc2.weight"], w[p + "mlp.fc2.bias"])
            i += 1
        assert i == V_KEPT
        return x  # no post_layernorm

    def visual_tokens(self, image: Image.Image) -> torch.Tensor:
        w = self.w
        feats = self.siglip(self.tiles(image))
        feats = F.linear(F.gelu(F.linear(feats, w["model.mm_projector.0.weight"], w["model.mm_projector.0.bias"])),
                         w["model.mm_projector.2.weight"], w["model.mm_projector.2.bias"])
        iw, ih = image.size
        pw, ph = self.grid(iw, ih)
        gw, gh = pw // TILE, ph // TILE
        full = torch.zeros(gh * SIDE, gw * SIDE, T_HIDDEN, dtype=torch.float64)
        for r in range(gh):
            for c in range(gw):
                full[r * SIDE:(r + 1) * SIDE, c * SIDE:(c + 1) * SIDE] = feats[1 + r * gw + c].view(SIDE, SIDE, -1)
        H, W = full.shape[:2]
        if iw / ih > W / H:
            pad = (H - int(ih * (W / iw))) // 2
            full = full[pad:H - pad]
        else:
            pad = (W - int(iw * (H / ih))) // 2
            full = full[:, pad:W - pad]
        assert math.sqrt(full.shape[0] * full.shape[1] / (9 * SIDE * SIDE)) <= 1.1  # anyres_max_9 never shrinks 2x2
        rows = [torch.cat([row, w["model.image_newline"][None]]) for row in full]
        return torch.cat([feats[0]] + rows)

    # -- text and the language model
    def prompt(self, text: str, has_image: bool) -> str:
        user = ("<image>\n" + text) if has_image else text
        return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n")

    def embed(self, text: str, image: Image.Image | None) -> torch.Tensor:
        w = self.w
        parts = self.prompt(text, image is not None).split("<image>")
        seq = []
        for j, part in enumerate(parts):
            if j:
                seq.append(self.visual_tokens(image))
            ids = self.tok(part, add_special_tokens=False)["input_ids"]
            seq.append(w["model.embed_tokens.weight"][torch.tensor(ids, dtype=torch.long)])
        x = torch.cat(seq)[: self.max_length]
        n, dh = x.shape[0], T_HIDDEN // T_HEADS
        inv = 1.0 / self.theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
        ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

        def rope(t):  # (heads, n, dh)
            half = torch.cat([-t[..., dh // 2:], t[..., :dh // 2]], -1)
            return t * cos + half * sin

        def rms(t, weight):
            return weight * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)

        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for i in range(T_LAYERS):
            p = f"model.layers.{i}."
            y = rms(x, w[p + "input_layernorm.weight"])
            q = F.linear(y, w[p + "self_attn.q_proj.weight"], w[p + "self_attn.q_proj.bias"]).view(n, T_HEADS, dh)
            k = F.linear(y, w[p + "self_attn.k_proj.weight"], w[p + "self_attn.k_proj.bias"]).view(n, T_KV, dh)
            v = F.linear(y, w[p + "self_attn.v_proj.weight"], w[p + "self_attn.v_proj.bias"]).view(n, T_KV, dh)
            q, k, v = rope(q.transpose(0, 1)), rope(k.transpose(0, 1)), v.transpose(0, 1)
            out = []
            for h in range(T_HEADS):  # grouped-query: head h reads key/value head h // (heads / kv heads)
                kv = h // (T_HEADS // T_KV)
                s = (q[h] @ k[kv].T) / math.sqrt(dh)
                out.append(torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[kv])
            x = x + F.linear(torch.stack(out, 1).reshape(n, T_HIDDEN), w[p + "self_attn.o_proj.weight"])
            y = rms(x, w[p + "post_attention_layernorm.weight"])
            y = F.silu(F.linear(y, w[p + "mlp.gate_proj.weight"])) * F.linear(y, w[p + "mlp.up_proj.weight"])
            x = x + F.linear(y, w[p + "mlp.down_proj.weight"])
        last = rms(x, w["model.norm.weight"])[-1]
        return last / last.norm()


# ------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------


def picture(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: [int(x) for x in torch.randint(0, 256, (n,), generator=g)]  # noqa: E731
    im = Image.new("RGB", (w, h), tuple(rnd(3)))
    d = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = int(torch.randint(0, w, (1,), generator=g)), int(torch.randint(0, h, (1,), generator=g))
        d.ellipse((x0, y0, x0 + w // 3 + 1, y0 + h // 4 + 1), fill=tuple(rnd(3)))
    return im


TEXTS = ["<|image_1|>\nRepresent the given image with the following question: how many red circles?",
         "Find the colour of the large star."]


@pytest.fixture(scope="module", params=["released", "transformers5"])
def loaded(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"llave_real_{request.param}")
    raw = write_checkpoint(folder, request.param)
    model = LLaVEEmbedder.from_pretrained(str(folder), vision_config=TOWER_CONFIG).eval()
    return request.param, folder, raw, model, Reference(folder, raw)


def test_real_geometry_config(loaded):
    layout, _, _, model, _ = loaded
    cfg = model.config
    assert cfg.vision_config.image_size == TILE and cfg.vision_config.patch_size == PATCH
    # the tower's own config says 3 layers; the checkpoint keeps 2: counted from its weight names
    assert cfg.vision_config.num_hidden_layers == V_KEPT
    assert cfg.text_config.rope_parameters["rope_theta"] == THETA, layout
    assert model.processor.max_length == 4096
    assert sorted(map(tuple, cfg.image_grid_pinpoints)) == [(384, 384), (384, 768), (768, 384), (768, 768)]


@pytest.mark.parametrize("size", list(IMAGES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_embeddings_match_llave(loaded, size):
    layout, _, _, model, ref = loaded
    (gw, gh), direction = IMAGES[size]
    image = picture(*size, seed=size[0] + size[1])
    pw, ph = ref.grid(*size)
    assert (pw // TILE, ph // TILE) == (gw, gh), f"{size}: the test meant a {gw}x{gh} grid"
    truth = ref.embed(TEXTS[0].replace("<|image_1|>\n", ""), image)
    tokens = ref.visual_tokens(image).shape[0]
    batch = model.processor([TEXTS[0]], [image])
    assert int((batch["input_ids"] == model.processor.image_token_id).sum()) == tokens  # LLaVE's count, exactly
    grid_tokens = tokens - SIDE * SIDE  # rows * (cols + 1)
    if direction == "cols":  # every row of the grid kept, columns cut
        rows = gh * SIDE
        assert grid_tokens % rows == 0 and grid_tokens // rows - 1 < gw * SIDE
    else:  # full-width rows, some rows cut
        assert grid_tokens % (gw * SIDE + 1) == 0 and grid_tokens // (gw * SIDE + 1) < gh * SIDE
    got = model.encode([TEXTS[0]], [image]).double()[0]
    err = (got - truth).abs().max().item()
    print(f"{layout} {size[0]}x{size[1]} px ({gw}x{gh} tiles, {tokens} visual tokens): max abs error {err:.2e}")
    assert err <= TOL, f"{layout} {size}: max abs error {err:.3e} > {TOL}"


def test_text_embeddings_match_llave(loaded):
    layout, _, _, model, ref = loaded
    got = model.encode(TEXTS[1:] + ["two green squares at the bottom right"]).double()
    for text, g in zip(TEXTS[1:] + ["two green squares at the bottom right"], got):
        err = (g - ref.embed(text, None)).abs().max().item()
        assert err <= TOL, f"{layout} {text!r}: max abs error {err:.3e}"


def test_the_comparison_sees_rope_theta(loaded):
    """The control: LLaVE's forward with the old default theta (10000) is far from the embedder,
    so the tests above would have caught the lost rope_theta."""
    _, folder, raw, model, _ = loaded
    wrong = Reference(folder, raw, theta=10000.0)
    image = picture(800, 500, seed=1)
    got = model.encode([TEXTS[0]], [image]).double()[0]
    assert (got - wrong.embed(TEXTS[0].replace("<|image_1|>\n", ""), image)).abs().max().item() > 1e-3


def test_cut_inside_the_image_matches_llave(tmp_path):
    """tokenizer_model_max_length cuts the whole sequence, image tokens inserted: here inside
    the visual tokens (729 + ... of a 2x2 grid), as LLaVE's forward does."""
    raw = write_checkpoint(tmp_path, "released", seed=1, max_length=1000)
    model = LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=TOWER_CONFIG).eval()
    ref = Reference(tmp_path, raw)
    image = picture(800, 500, seed=2)
    batch = model.processor([TEXTS[0]], [image])
    assert batch["input_ids"].shape[1] == 1000 and bool((batch["input_ids"][0, -1] == model.processor.image_token_id))
    got = model.encode([TEXTS[0]], [image]).double()[0]
    err = (got - ref.embed(TEXTS[0].replace("<|image_1|>\n", ""), image)).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3e}"


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(rope_theta=None), "no rope_theta"),
        (dict(rope_parameters={"rope_type": "linear", "rope_theta": THETA, "factor": 2.0}), "only plain RoPE"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 5.0}), "two RoPE bases"),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(mm_use_im_start_end=True), "mm_use_im_start_end"),
        (dict(some_new_switch=3), r"does not understand: \['some_new_switch'\]"),
        (dict(layer_types=["full_attention", "sliding_attention"]), "layer_types"),
    ],
)
def test_config_keys_that_change_the_forward_are_never_defaulted(tmp_path, change, match):
    raw = write_checkpoint(tmp_path, "released", **change)
    if raw.get("rope_theta") is None:
        raw.pop("rope_theta")
        (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=TOWER_CONFIG)


def test_ignore_config_keys_lets_a_checked_key_through(tmp_path):
    write_checkpoint(tmp_path, "released", some_new_switch=3)
    m = LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=TOWER_CONFIG, ignore_config_keys=["some_new_switch"])
    assert m.config.vision_config.num_hidden_layers == V_KEPT


def test_so400m_needs_no_vision_config_and_keeps_26_layers():
    from llave_fast.model.convert import convert_llava_qwen_config, vision_layers_in_checkpoint

    names = [f"model.vision_tower.vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(26)]
    raw = {
        "model_type": "llava_qwen", "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152, "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "spatial_unpad", "image_aspect_ratio": "anyres_max_9",
        "image_grid_pinpoints": "(1x1),...,(2x2)",
    }
    cfg = convert_llava_qwen_config(raw, image_token_index=151646, vision_layers=vision_layers_in_checkpoint(names))
    assert cfg.vision_config.num_hidden_layers == 26 and cfg.vision_config.image_size == 384
    assert cfg.vision_config.patch_size == 14


def test_llava_onevision_base_loads_and_takes_llaves_grid(tmp_path):
    """The recipe's starting point: LLaVA-OneVision's own layout (model_type 'llava', a 6x6 grid,
    tokenizer_model_max_length 32768). With LLaVE's grid and length put over it, it embeds as
    LLaVE's forward does with those settings."""
    six = [[w * TILE, h * TILE] for w in range(1, 7) for h in range(1, 7)]
    raw = write_checkpoint(tmp_path, "released", model_type="llava", image_grid_pinpoints=six,
                           tokenizer_model_max_length=32768, mm_vision_tower_lr=2e-6, mm_projector_lr=None)
    m = LLaVEEmbedder.from_pretrained(str(tmp_path), vision_config=TOWER_CONFIG).eval()
    assert len(m.config.image_grid_pinpoints) == 36 and m.processor.max_length == 32768
    big = picture(2000, 1900, seed=4)
    assert m.processor.num_image_tokens(1900, 2000) > 3699  # more than LLaVE's 2x2 grid can give
    m.set_image_grid("(1x1),...,(2x2)")
    m.processor.max_length = 4096
    ref = Reference(tmp_path, dict(raw, image_grid_pinpoints="(1x1),...,(2x2)", tokenizer_model_max_length=4096))
    got = m.encode([TEXTS[0]], [big]).double()[0]
    err = (got - ref.embed(TEXTS[0].replace("<|image_1|>\n", ""), big)).abs().max().item()
    assert err <= TOL, f"max abs error {err:.3e}"
