"""Evaluation under LLaVE's protocol whatever the training options were (issue 21, item 4).

Each point was checked against LLaVE's own code (github.com/DeepLearnXMU/LLaVE):

* Text cut: LLaVE cuts only the whole sequence, at ``tokenizer_model_max_length``
  (``llava/model/llava_arch.py: prepare_inputs_labels_for_multimodal``); a training-time cut of
  the text alone (``max_text_tokens``, saved with the processor) is not applied at evaluation
  unless asked for.
* Placeholder: ``llava/train/train.py: preprocess_multimodal`` (copied in
  ``llava/eval/model_embed.py``) moves a single non-leading ``<image>`` to the front as
  ``"<image>\\n" + stripped text``; ``prepare_inputs_labels_for_multimodal`` gives a text without
  placeholder zero image features (``image_features[0:0]``): the text alone is embedded, at
  training (``LazySupervisedDataset.__getitem__``) and evaluation (``EvalDataset.__getitem__``).
* Video layout: ``mm_newline_position`` / ``mm_spatial_pool_mode`` (and ``add_faster_video``)
  are read and anything but LLaVE's trained layout ("grid", "bilinear") is refused.
* Precision: LLaVE evaluates fp16 weights (``llava/model/builder.py: load_pretrained_model``)
  under bf16 autocast (``model_embed.py: main``, ``CLIP4Clip/main_task_retrieval.py:
  eval_epoch``): ``dtype="llave"``.

Tiny models only, written here; nothing is downloaded.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from _helpers import run_cli as _main  # noqa: E402
from llave_fast.model import LLaVEEmbedder, build_tiny_model  # noqa: E402

LONG = "represent the given image with the following question: " + " ".join(["red circle on the left"] * 12)




def _img(w=40, h=30, colour=(200, 30, 30)):
    return Image.new("RGB", (w, h), colour)


@pytest.fixture(scope="module")
def trained_cut(tmp_path_factory):
    """A saved model whose processor carries a training-time text cut (what `llave-fast train` saves
    with --max-text-tokens, e.g. 256 in configs/llave_0.5b.json; 4 here)."""
    torch.manual_seed(0)
    m = build_tiny_model(0)
    m.processor.max_text_tokens = 4
    folder = tmp_path_factory.mktemp("cut") / "model"
    m.save_pretrained(str(folder))
    assert LLaVEEmbedder.from_pretrained(str(folder)).processor.max_text_tokens == 4  # read back as saved
    return folder


# ------------------------------------------------------------------------------ 1. the text cut
def test_eval_ignores_the_training_text_cut_unless_asked(trained_cut):
    from llave_fast.evaluate import encode_pairs, load_eval_model

    dev, dt = torch.device("cpu"), torch.float32
    model, extra = load_eval_model(str(trained_cut), dev, dt)
    assert model.processor.max_text_tokens is None  # LLaVE: no cut of the text alone
    assert extra["max_text_tokens"] is None and extra["max_text_tokens_saved"] == 4

    plain = LLaVEEmbedder.from_pretrained(str(trained_cut)).eval()
    plain.processor.max_text_tokens = None
    got = encode_pairs(model, [(LONG, None)], progress=False)
    torch.testing.assert_close(got, plain.encode([LONG]), rtol=0, atol=1e-6)

    cut, extra = load_eval_model(str(trained_cut), dev, dt, max_text_tokens="saved")
    assert cut.processor.max_text_tokens == 4 and extra["max_text_tokens"] == 4
    plain.processor.max_text_tokens = 4
    torch.testing.assert_close(encode_pairs(cut, [(LONG, None)], progress=False), plain.encode([LONG]),
                               rtol=0, atol=1e-6)
    assert (got - plain.encode([LONG])).abs().max() > 1e-3  # the cut does change the embedding
    assert load_eval_model(str(trained_cut), dev, dt, max_text_tokens=7)[0].processor.max_text_tokens == 7
    with pytest.raises(ValueError, match="max_text_tokens must be None .* got 0"):
        load_eval_model(str(trained_cut), dev, dt, max_text_tokens=0)


def test_eval_video_loads_its_model_under_the_same_protocol(trained_cut, tmp_path, monkeypatch):
    """eval-video's captions: the text cut as eval applies it (None unless asked; 'saved' gives the training cut)."""
    from llave_fast import eval_video as ev

    class Loaded(Exception):
        pass

    def stop(model, paths, **kw):  # the model eval-video would encode with, before any video is decoded
        raise Loaded(model)

    monkeypatch.setattr(ev, "encode_videos", stop)
    monkeypatch.setattr(ev, "_require_av", lambda: None)  # the file below is never decoded
    monkeypatch.setattr(ev, "check_video_files", lambda paths: None)  # nor opened
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v0.mp4").write_bytes(b"")
    ann = tmp_path / "ann.csv"
    ann.write_text("video_id,sentence\nv0,a caption\n")
    for asked, want in ((None, None), ("saved", 4), (7, 7)):
        with pytest.raises(Loaded) as got:
            ev.eval_video(str(trained_cut), str(tmp_path / "videos"), str(ann), str(tmp_path / "out"), device="cpu",
                          max_text_tokens=asked)
        model = got.value.args[0]
        assert model.processor.max_text_tokens == want and model.processor.image_without_placeholder == "drop"
        assert not model.training and model.dtype == torch.float32


def test_eval_cli_text_cut_flag_and_cache_key(trained_cut, tmp_path, capsys):
    data = tmp_path / "Cut.jsonl"
    data.write_text(json.dumps({"qry_text": LONG, "qry_img_path": "", "tgt_text": ["red", "blue"],
                                "tgt_img_path": ["", ""]}) + "\n")
    out_dir = tmp_path / "out"
    rc, out, err = _main(capsys, "eval", "--model", trained_cut, "--data", data, "--output-dir", out_dir,
                         "--device", "cpu")
    assert rc == 0, err
    assert json.loads(out)["max_text_tokens"] is None
    rc, out, err = _main(capsys, "eval", "--model", trained_cut, "--data", data, "--output-dir", out_dir,
                         "--device", "cpu", "--max-text-tokens", "saved")
    assert rc == 0, err
    assert json.loads(out)["max_text_tokens"] == "saved"
    assert "cached with other settings (max_text_tokens: None -> 'saved'); recomputing" in err
    rc, out, err = _main(capsys, "eval", "--model", trained_cut, "--data", data, "--max-text-tokens", "many")
    assert rc == 2 and "expected a positive integer or 'saved', got 'many'" in err


# ------------------------------------------------------------------------------ 2. placeholders
@pytest.mark.parametrize("text, expected", [
    # one placeholder not at the start: removed, the rest stripped, "<image>\n" in front
    ("what is <image> in this image? ", "<image>\nwhat is  in this image?"),
    ("Represent the given image.\n<image>", "<image>\nRepresent the given image."),
    (" <image>\nRepresent", "<image>\nRepresent"),  # a leading space is not a leading placeholder
    (" <image>", "<image>"),
    # at the start: left exactly as it is (no strip)
    ("<image> Represent the given image. ", "<image> Represent the given image. "),
    ("<image>\nRepresent", "<image>\nRepresent"),
    # none or several: unchanged
    ("Represent the given image.", "Represent the given image."),
    ("<image> and <image>", "<image> and <image>"),
])
def test_move_placeholder_is_llaves_preprocess_multimodal(text, expected):
    from llave_fast.model.processor import move_placeholder

    assert move_placeholder(text) == expected


def test_non_leading_placeholder_moves_to_the_front():
    p = build_tiny_model(0).processor
    img = _img()
    moved = p(["what colour is <|image_1|> the square?"], [img])
    front = p(["<|image_1|>\nwhat colour is  the square?"], [img])  # LLaVE's rewrite, its double space kept
    assert torch.equal(moved["input_ids"], front["input_ids"])
    ids = moved["input_ids"][0].tolist()
    first = ids.index(p.image_token_id)
    user = p.tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                       add_special_tokens=False)["input_ids"]
    assert first == len(user)  # the image tokens open the user turn
    prompt = p.build_prompt("what colour is <|image_1|> the square?", True)
    assert prompt.count("<|im_start|>user\n<image>\nwhat colour is  the square?<|im_end|>") == 1


def test_an_image_without_placeholder_is_dropped_with_a_warning():
    m = build_tiny_model(0).eval()
    p = m.processor
    img = _img()
    assert p.image_without_placeholder == "prepend"  # a direct call's default: the image before the text
    assert torch.equal(p(["a red square"], [img])["input_ids"], p(["<|image_1|>\na red square"], [img])["input_ids"])
    with pytest.warns(UserWarning, match=r"no image placeholder .* LLaVE drops such an image"):
        b = p(["a red square", "<|image_1|>\nx"], [img, img], image_without_placeholder="drop")
    assert b["pixel_values"][0] is None and b["image_sizes"][0] is None and b["pixel_values"][1] is not None
    assert p.images_dropped == 1
    text_only = p(["a red square"])
    n = int(text_only["attention_mask"].sum())
    assert torch.equal(b["input_ids"][0, :n], text_only["input_ids"][0]) and int(b["attention_mask"][0].sum()) == n
    p.image_without_placeholder = "drop"  # what evaluation sets (apply_eval_protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per processor, counted after that
        p(["another text"], [img])
    assert p.images_dropped == 2
    with torch.no_grad():
        torch.testing.assert_close(m.encode(["a red square"], [img]), m.encode(["a red square"]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="image_without_placeholder must be one of"):
        p.image_without_placeholder = "keep"
    with pytest.raises(ValueError, match="image_without_placeholder must be one of"):
        p(["a"], [img], image_without_placeholder="keep")
    # a bad image is still named, dropped or not
    with pytest.raises(TypeError, match=r"images\[0\] must be a PIL.Image"):
        p(["a"], ["not an image"])


def test_training_rows_follow_llave_too(tmp_path):
    """MMEB-train rows (qry / qry_image_path / pos_text / pos_image_path / neg_*) through the reader and
    the training collator: LLaVE's training does the same (train.py: LazySupervisedDataset.__getitem__
    -> preprocess_multimodal; llava_arch.py drops the image of a text without placeholder)."""
    from llave_fast.data import MMEBDataset, PairCollator

    (tmp_path / "img").mkdir()
    _img().save(tmp_path / "img" / "a.png")
    _img(30, 40, (20, 200, 20)).save(tmp_path / "img" / "b.png")
    rows = [
        # the placeholder after the instruction: moved to the front
        {"qry": "Represent the given image with the following question: what is it? <|image_1|>",
         "qry_image_path": "a.png", "pos_text": "a red square", "pos_image_path": "",
         "neg_text": "a cat", "neg_image_path": "b.png"},  # an image without placeholder: dropped
        {"qry": "find the green one", "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.",
         "pos_image_path": "b.png", "neg_text": "<|image_1|>\nRepresent the given image.", "neg_image_path": "a.png"},
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "Mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = MMEBDataset(tmp_path / "data", tmp_path / "img", use_negatives=True)
    recs = [ds[i] for i in range(len(ds))]
    proc = build_tiny_model(0).processor
    with pytest.warns(UserWarning, match="no image placeholder"):
        batch = PairCollator(proc, use_negatives=True)(recs)
    want_q = proc(["<|image_1|>\nRepresent the given image with the following question: what is it?",
                   "find the green one"], [recs[0]["qry_image"], None])
    assert torch.equal(batch["query"]["input_ids"], want_q["input_ids"])
    neg = batch["negatives"]
    assert neg["pixel_values"][0] is None and neg["pixel_values"][1] is not None
    want_n = proc(["a cat", rows[1]["neg_text"]], [None, recs[1]["neg_image"]])
    assert torch.equal(neg["input_ids"], want_n["input_ids"])
    assert proc.image_without_placeholder == "prepend"  # the collator passes its rule, the processor is unchanged
    old = PairCollator(proc, use_negatives=True, image_without_placeholder="prepend")(recs)["negatives"]
    assert old["pixel_values"][0] is not None


@pytest.mark.filterwarnings("ignore:texts.*has no image placeholder:UserWarning")  # said, and logged per dataset
def test_mmeb_eval_rows_follow_llave(tmp_path, capsys):
    """MMEB-eval rows (qry_text / qry_img_path / tgt_text / tgt_img_path) with both cases: scored as if
    written LLaVE's way, the dropped image counted and said."""
    from llave_fast.evaluate import encode_pairs, load_eval_model

    folder = tmp_path / "m"
    build_tiny_model(0).save_pretrained(str(folder))
    _img().save(tmp_path / "red.png")
    _img(30, 40, (20, 20, 200)).save(tmp_path / "blue.png")
    odd = {"qry_text": "Represent the given image with the following question: what colour? <|image_1|>",
           "qry_img_path": "red.png", "tgt_text": ["red", "<|image_1|>\nRepresent the given image.", "blue"],
           "tgt_img_path": ["", "blue.png", "blue.png"]}  # candidate 2: an image but no placeholder
    (tmp_path / "Odd.jsonl").write_text(json.dumps(odd) + "\n")
    rc, out, err = _main(capsys, "eval", "--model", folder, "--data", tmp_path / "Odd.jsonl", "--device", "cpu")
    assert rc == 0, err
    got = json.loads(out)["datasets"]["Odd"]
    assert got["images_dropped"] == 1 and got["num_encoded"] == 4
    assert "1 of 4 distinct inputs have an image but no image placeholder" in err

    model, _ = load_eval_model(str(folder), torch.device("cpu"), torch.float32)
    red, blue = str(tmp_path / "red.png"), str(tmp_path / "blue.png")
    a = encode_pairs(model, [(odd["qry_text"], red), ("blue", blue)], progress=False)
    b = encode_pairs(model, [("<|image_1|>\nRepresent the given image with the following question: what colour?", red),
                             ("blue", None)], progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_our_generated_mmeb_rows_never_hit_either_case(tmp_path):
    """The row formats the tests write (write_mmeb_eval, the synthetic dataset and its MMEB-train
    export): every text that comes with an image starts with its one placeholder, so LLaVE's rule
    changes none of them (the two cases above are written by hand)."""
    from llave_fast.data import SyntheticDataset
    from llave_fast.data.mmeb_eval import write_mmeb_eval
    from llave_fast.model.processor import MMEB_IMAGE_PLACEHOLDER, has_placeholder

    def fine(text, has_image):
        if not has_image:
            return not has_placeholder(text)
        return len(MMEB_IMAGE_PLACEHOLDER.findall(text)) == 1 and MMEB_IMAGE_PLACEHOLDER.match(text) is not None

    for task in ("i2t", "t2i", "vqa"):
        (path,), _ = write_mmeb_eval(str(tmp_path), f"S_{task}", 4, num_candidates=3, task=task, seed=1)
        for r in map(json.loads, open(path)):
            assert fine(r["qry_text"], bool(r["qry_img_path"]))
            assert all(fine(t, bool(i)) for t, i in zip(r["tgt_text"], r["tgt_img_path"]))
    ds = SyntheticDataset(12, seed=0, split="train", hard_negatives=True)
    for r in (ds[i] for i in range(len(ds))):
        for t, i in (("qry", "qry_image"), ("pos_text", "pos_image"), ("neg_text", "neg_image")):
            if r[t] is not None:
                assert fine(r[t], r[i] is not None), r[t]


# ------------------------------------------------------------------------------ 3. video layout
@pytest.mark.parametrize("key, value, needle", [
    ("mm_newline_position", "one_token", "is one of LLaVE's video layouts but not implemented"),
    ("mm_newline_position", "frame", "is one of LLaVE's video layouts but not implemented"),
    ("mm_newline_position", "sideways", "is not a value LLaVE's code knows"),
    ("mm_spatial_pool_mode", "average", "is one of LLaVE's video layouts but not implemented"),
    ("mm_spatial_pool_mode", "max", "is one of LLaVE's video layouts but not implemented"),
    ("mm_spatial_pool_mode", None, "get_2dPool reads it with no default"),
    ("add_faster_video", True, "add_faster_video = True: not implemented"),
])
def test_video_layout_other_than_llaves_is_refused(key, value, needle):
    m = build_tiny_model(0).eval()
    frames = [_img(32, 32)] * 2
    ok = m.encode_videos([frames])  # a config without the keys: LLaVE's trained layout
    assert ok.shape == (1, m.embed_dim)
    setattr(m.config, key, value)
    with pytest.raises(ValueError, match=needle):
        m.encode_videos([frames])
    setattr(m.config, key, {"add_faster_video": False}.get(key, "grid" if key == "mm_newline_position" else "bilinear"))
    torch.testing.assert_close(m.encode_videos([frames]), ok, rtol=0, atol=0)


def _raw_llava_qwen(**extra):
    raw = {"model_type": "llava_qwen", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu",
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152,
           "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "spatial_unpad",
           "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": "(1x1),...,(2x2)"}
    raw.update(extra)
    return raw


def test_llava_qwen_video_keys_are_read_and_kept_by_an_export(tmp_path):
    from transformers import LlavaOnevisionConfig

    from llave_fast.model.convert import convert_llava_qwen_config
    from llave_fast.model.video import check_video_config

    # LLaVE's training writes these (llava/train/train.py: train)
    cfg = convert_llava_qwen_config(_raw_llava_qwen(mm_newline_position="grid", mm_spatial_pool_mode="bilinear"),
                                    image_token_index=63)
    check_video_config(cfg)
    cfg.save_pretrained(str(tmp_path))
    again = LlavaOnevisionConfig.from_pretrained(str(tmp_path))
    assert (again.mm_newline_position, again.mm_spatial_pool_mode) == ("grid", "bilinear")
    # absent: what LLaVE's code makes of it, refused for video (images are unaffected)
    cfg = convert_llava_qwen_config(_raw_llava_qwen(mm_spatial_pool_mode="bilinear"), image_token_index=63)
    assert cfg.mm_newline_position == "one_token"
    with pytest.raises(ValueError, match="mm_newline_position = 'one_token'"):
        check_video_config(cfg)
    cfg = convert_llava_qwen_config(_raw_llava_qwen(mm_newline_position="grid"), image_token_index=63)
    with pytest.raises(ValueError, match="no mm_spatial_pool_mode"):
        check_video_config(cfg)


def test_eval_video_refuses_the_layout_before_decoding(tmp_path, capsys):
    pytest.importorskip("av")
    m = build_tiny_model(0)
    m.config.mm_newline_position = "one_token"
    m.save_pretrained(str(tmp_path / "m"))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "video0.mp4").write_bytes(b"not a video")  # decoding it would fail otherwise
    (tmp_path / "ann.csv").write_text("video_id,sentence\nvideo0,a red square\n")
    rc, out, err = _main(capsys, "eval-video", "--model", tmp_path / "m", "--videos", tmp_path / "videos",
                         "--annotations", tmp_path / "ann.csv", "--output-dir", tmp_path / "out", "--device", "cpu")
    assert rc == 1 and "mm_newline_position = 'one_token'" in err and "Traceback" not in err
    assert "video0.mp4" not in err


# ------------------------------------------------------------------------------ 4. precision
def test_llave_precision_is_offered_and_cuda_only(monkeypatch, tmp_path, capsys):
    from llave_fast import evaluate as ev

    assert ev.eval_autocast("llave") is torch.bfloat16 and ev.eval_autocast("auto") is None
    assert ev.precision_label(torch.float16, "llave") == "float16+autocast-bfloat16"
    assert ev.precision_label(torch.bfloat16, "auto") == "bfloat16"
    with pytest.raises(ValueError, match="runs on CUDA only"):
        ev.eval_precision("cpu", "llave")
    folder = tmp_path / "m"
    build_tiny_model(0).save_pretrained(str(folder))
    rc, out, err = _main(capsys, "eval", "--model", folder, "--device", "cpu", "--dtype", "llave", "--num-eval", "4")
    assert rc == 1 and "runs on CUDA only" in err and "Traceback" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ev.eval_precision("auto", "llave") == (torch.device("cuda"), torch.float16)


def test_llave_precision_regime_on_text():
    """fp16 weights under bf16 autocast (checked on a text: CPU autocast runs the language model as CUDA's
    does; its vision tower needs CUDA's fp32 layer_norm): matrix products in bf16, the residual stream
    promoted to fp32, so the final RMSNorm comes out in fp32, as in LLaVE's evaluation."""
    ref = build_tiny_model(0).eval()
    texts = ["a red circle on the left", "two green squares"]
    with torch.no_grad():
        want = ref.encode(texts)
    m = build_tiny_model(0).to(torch.float16).eval()
    m.autocast_dtype = torch.bfloat16
    seen = {}
    lm = m.model.language_model
    lm.norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("norm", (i[0].dtype, o.dtype)))
    lm.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, i, o: seen.__setitem__("q_proj", o.dtype))
    got = m.encode(texts)
    assert lm.norm.weight.dtype == torch.float16
    assert seen == {"norm": (torch.float32, torch.float32), "q_proj": torch.bfloat16}
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.99
    m.autocast_dtype = None  # plain fp16: the norm stays in fp16
    m.encode(texts)
    assert seen["norm"] == (torch.float16, torch.float16)


def test_llave_precision_image_features_meet_the_text_in_fp32():
    """Under autocast, the bf16 image features, the fp16 image_newline and the fp16 token embeddings are
    joined in fp32, as LLaVE's torch.cat promotes them (llava_arch.py): image_newline's fp16 values enter
    the language model unrounded. (On the CPU the vision tower's LayerNorms are made fp32 here, what
    CUDA autocast does for layer_norm.)"""
    m = build_tiny_model(0).to(torch.float16).eval()
    for mod in m.model.vision_tower.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.float()
    m.autocast_dtype = torch.bfloat16
    seen = {}

    def grab(mod, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    m.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    p = m.processor
    batch = p(["<|image_1|>\nx", "y"], [_img(32, 32), None])
    m(batch)
    emb = seen["embeds"]
    assert emb.dtype == torch.float32
    nl = m.model.image_newline.detach()
    assert nl.dtype == torch.float16
    rows = emb[0][batch["input_ids"][0] == p.image_token_id]
    # one tile's grid: the last feature of each row is image_newline, exactly its fp16 value
    assert any(torch.equal(r, nl.float()) for r in rows)
    ids = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    torch.testing.assert_close(emb[1][: len(ids)], m.model.get_input_embeddings()(ids).float(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_llave_precision_end_to_end_on_cuda(tmp_path, capsys):
    folder = tmp_path / "m"
    build_tiny_model(0).save_pretrained(str(folder))
    _img().save(tmp_path / "red.png")
    (tmp_path / "P.jsonl").write_text(json.dumps({"qry_text": "<|image_1|>\nwhat colour?", "qry_img_path": "red.png",
                                                  "tgt_text": ["red", "blue"], "tgt_img_path": ["", ""]}) + "\n")
    rc, out, err = _main(capsys, "eval", "--model", folder, "--data", tmp_path / "P.jsonl", "--dtype", "llave")
    assert rc == 0, err
    assert json.loads(out)["dtype"] == "float16+autocast-bfloat16"
    from llave_fast.evaluate import load_eval_model

    m, _ = load_eval_model(str(folder), torch.device("cuda"), torch.float16, autocast=torch.bfloat16)
    seen = {}
    m.model.language_model.norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("norm", o.dtype))
    ref = LLaVEEmbedder.from_pretrained(str(folder)).eval()
    texts, imgs = ["<|image_1|>\nwhat colour?", "red"], [_img(), None]
    got = m.encode(texts, imgs)
    assert seen["norm"] == torch.float32
    assert torch.nn.functional.cosine_similarity(got, ref.encode(texts, imgs)).min() > 0.99


def test_in_run_heldout_score_uses_the_eval_commands_inputs(monkeypatch):
    """Training's held-out precision@1 (training/heldout.py) is scored with the inputs ``llave-fast
    eval`` builds (no cut of the text alone), while training keeps its own cut."""
    import copy
    import types

    from llave_fast.data import SyntheticDataset, retrieval_candidates
    from llave_fast.evaluate import apply_eval_protocol, encode_all, retrieval_eval
    from llave_fast.training import heldout
    from llave_fast.training.config import TrainConfig

    model = build_tiny_model(0).eval()
    model.processor.max_text_tokens = 3  # the run's training cut: short enough to cut every query
    full = LLaVEEmbedder(copy.deepcopy(model.model), copy.deepcopy(model.processor)).eval()
    apply_eval_protocol(full)  # what `llave-fast eval` does to a loaded model
    assert full.processor.max_text_tokens is None
    rset = retrieval_candidates(SyntheticDataset(12, seed=3, split="eval"))
    seen = []

    def spy(embed, processor, rset, batch):
        seen.append(processor)
        return retrieval_eval(embed, processor, rset, batch)

    monkeypatch.setattr(heldout, "retrieval_eval", spy)
    engine = types.SimpleNamespace(module=model)
    with torch.no_grad():
        before = heldout.evaluate_before(engine, model, model.processor, rset, TrainConfig(eval_batch=5), rank=1)
        want = retrieval_eval(full, full.processor, rset, 5)
    (proc,) = seen
    assert proc is not model.processor and model.processor.max_text_tokens == 3  # training's cut untouched
    assert proc.max_text_tokens is None and proc.image_without_placeholder == "drop"
    assert len(proc([LONG])["input_ids"][0]) == len(full.processor([LONG])["input_ids"][0])
    assert before == want
    # and the cut matters here: the queries embed differently under it
    q_cut = encode_all(model, model.processor, rset.query_texts, rset.query_images, 5)
    q_full = encode_all(model, proc, rset.query_texts, rset.query_images, 5)
    assert (q_cut - q_full).abs().max() > 1e-3
