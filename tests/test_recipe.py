"""LLaVE's published recipe as a preset: its options, each tested, and a tiny run of it
that exports and reloads with the same embeddings."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch

from llave_fast.train import BatchOrder, MicroStepLoss, TrainConfig, batch_indices, check_config, warmup_cosine

import _recipe_workers as W

pytestmark = pytest.mark.slow  # processes, ranks, wheel builds or compiles: -m 'not slow' skips them


def test_preset_is_llaves_recipe():
    c = TrainConfig.from_json("llave_0.5b_recipe.json")
    assert c.model == "lmms-lab/llava-onevision-qwen2-0.5b-ov"  # OneVision's base, not LLaVE itself
    assert (c.lr_vision, c.lr, c.lr_projector, c.weight_decay) == (0.0, 1e-5, 1e-5, 0.0)
    assert (c.warmup_ratio, c.min_lr_ratio, c.epochs) == (0.03, 0.0, 1)
    assert (c.image_grid, c.max_length, c.max_text_tokens) == ("(1x1),...,(2x2)", 4096, None)
    assert (c.mmeb_split, c.max_rows_per_subset, len(c.subsets)) == ("original", 50000, 20)
    assert (c.global_batch, c.accumulation_steps, c.group_by_modality, c.mask_duplicates) == (256, 8, True, False)
    check_config(c, world=8)  # 8 ranks x 4 pairs x 8 micro-steps
    assert c.global_batch // 8 // c.accumulation_steps == 4
    ours = TrainConfig.from_json("llave_0.5b.json")
    assert (ours.accumulation_steps, ours.mask_duplicates) == (1, True)  # our preset: every pair a negative


def test_every_option_is_a_documented_flag():
    from llave_fast.cli import HIDDEN_FIELDS, main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["train", "--config", "llave_0.5b_recipe.json", "--help"])
    text = " ".join(buf.getvalue().split())
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
        if f.name in HIDDEN_FIELDS:  # test-only (stop_after): a flag, but not in --help
            assert "--" + f.name.replace("_", "-") not in text, f.name
            continue
        assert "--" + f.name.replace("_", "-") in text, f.name
    for phrase in ("each micro-batch's loss sees only its own pairs", "only image queries or only text-only",
                   "cut each whole sequence, image tokens inserted", "(1x1),...,(2x2)", "warm-up as a fraction"):
        assert phrase in text, phrase


def test_check_config_names_the_option():
    c = TrainConfig(global_batch=16, accumulation_steps=3)
    with pytest.raises(ValueError, match="8 pairs per rank, not divisible into accumulation_steps=3"):
        check_config(c, world=2)
    with pytest.raises(ValueError, match="warmup_ratio must be in"):
        check_config(TrainConfig(warmup_ratio=1.5), world=1)
    with pytest.raises(ValueError, match="epochs must be positive"):
        check_config(TrainConfig(epochs=0), world=1)


def test_warmup_ratio_and_cosine_to_zero():
    from llave_fast.train import resolve_warmup

    c = TrainConfig(steps=2586, warmup_ratio=0.03, min_lr_ratio=0.0)  # 662K pairs / 256 = 2586 steps
    c.warmup_steps = resolve_warmup(c)
    assert c.warmup_steps == 78  # ceil(77.58)
    assert warmup_cosine(0, c) == pytest.approx(1 / 78)
    assert warmup_cosine(77, c) == pytest.approx(1.0)
    assert warmup_cosine(c.steps, c) == pytest.approx(0.0, abs=1e-12)


def test_cosine_decay_has_its_shape_and_stops_at_the_floor():
    """Between the warm-up and the end: half-cosine from 1 to min_lr_ratio (the presets' 5 % floor),
    never below it, never rising; a linear decay or a dropped floor fails here."""
    c = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.05)
    assert [warmup_cosine(s, c) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert warmup_cosine(10, c) == pytest.approx(1.0)
    assert warmup_cosine(60, c) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way: half the span
    assert warmup_cosine(35, c) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 4)))  # a quarter
    assert warmup_cosine(110, c) == pytest.approx(0.05) and warmup_cosine(500, c) == pytest.approx(0.05)
    decay = [warmup_cosine(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and min(decay) == pytest.approx(0.05)


def test_batches_grouped_by_modality():
    from llave_fast.data import SyntheticDataset

    ds = SyntheticDataset(200, seed=1)
    has = ds.query_has_image()
    assert has.tolist() == [ds[i]["qry_image"] is not None for i in range(20)] + has[20:].tolist()
    order = BatchOrder(len(ds), 16, seed=5, query_has_image=has)
    assert order.per_epoch == int(has.sum()) // 16 + int((~has).sum()) // 16
    seen, kinds = set(), set()
    for step in range(order.per_epoch):
        idx = order(step)
        assert len(idx) == 16 and not seen & set(idx)  # no sample twice in an epoch
        seen |= set(idx)
        kind = set(has[idx].tolist())
        assert len(kind) == 1, f"step {step} mixes image and text-only queries"
        kinds |= kind
    assert kinds == {True, False}
    assert BatchOrder(len(ds), 16, 5, has)(3) == order(3)  # a pure function of (seed, step)
    assert order(order.per_epoch) != order(0)  # a new epoch, a new order
    plain = BatchOrder(len(ds), 16, 5)
    assert plain(7) == batch_indices(7, len(ds), 16, 5)
    with pytest.raises(ValueError, match="fewer than one global batch of 16 in either modality"):
        BatchOrder(20, 16, 0, np.arange(20) % 2 == 0)


def test_micro_step_loss_is_gradient_accumulation_with_per_step_negatives():
    from llave_fast.loss import FusedHardnessLoss
    from llave_fast.reference import reference_loss

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    t = torch.nn.functional.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    loss = MicroStepLoss(FusedHardnessLoss(50.0, 9.0, backend="torch"), 3)(q, t)
    loss.backward()
    gq, gt = q.grad.clone(), t.grad.clone()
    # what LLaVE's accumulation computes: each micro-step's loss over its own 4 pairs, scaled by 1/3, gradients summed
    q.grad = t.grad = None
    for i in range(3):
        sl = slice(4 * i, 4 * i + 4)
        (reference_loss(q[sl], t[sl], logit_scale=50.0, alpha=9.0) / 3).backward()
    torch.testing.assert_close(gq, q.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(gt, t.grad, rtol=0, atol=1e-10)
    whole = reference_loss(q, t, logit_scale=50.0, alpha=9.0)
    assert abs(whole.item() - loss.item()) > 1e-3  # fewer negatives: a different loss
    with pytest.raises(ValueError, match="does not split into accumulation_steps=5"):
        MicroStepLoss(FusedHardnessLoss(50.0, 9.0, backend="torch"), 5)(q, t)


def test_micro_step_loss_across_ranks():
    from llave_fast.testing import spawn_ranks

    spawn_ranks(W.micro_loss_rank, 2, 2)


def test_set_image_grid_overrides_model_and_processor():
    from PIL import Image

    from llave_fast.model import build_tiny_model

    m = build_tiny_model(image_size=64, patch_size=16, max_grid=1).eval()
    m.set_image_grid("(1x1),...,(2x2)")
    assert m.config.image_grid_pinpoints == m.processor.image_grid_pinpoints
    assert sorted(map(tuple, m.processor.image_grid_pinpoints)) == [(64, 64), (64, 128), (128, 64), (128, 128)]
    batch = m.processor(["<|image_1|>\nx"], [Image.new("RGB", (130, 60))])
    assert batch["pixel_values"][0].shape[0] == 3  # base + a 2-wide grid
    with torch.no_grad():
        assert torch.isfinite(m(batch)).all()
    with pytest.raises(ValueError, match="image_grid .* tile size 64"):
        m.set_image_grid([[100, 64]])


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from llave_fast.testing import spawn_ranks

    out = str(tmp_path_factory.mktemp("recipe"))
    spawn_ranks(W.run_recipe, 2, out)
    return out


def test_recipe_run_resolves_epochs_and_warmup(recipe_run):
    with open(os.path.join(recipe_run, "train_config.json")) as f:
        ran = json.load(f)
    from llave_fast.data import SyntheticDataset

    has = SyntheticDataset(64, seed=ran["seed"]).query_has_image()
    assert ran["steps"] == int(has.sum()) // 16 + int((~has).sum()) // 16 == 3  # one epoch, grouped
    assert ran["warmup_steps"] == 1  # ceil(0.03 x 3)
    with open(os.path.join(recipe_run, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [e["step"] for e in log] == [1, 2, 3] and all(np.isfinite(e["loss"]) for e in log)


def test_recipe_export_reloads_with_the_same_embeddings(recipe_run, tmp_path):
    from llave_fast.data import SyntheticDataset
    from llave_fast.export import export_run, load_run_model
    from llave_fast.model import LLaVEEmbedder

    merged, _ = load_run_model(recipe_run)
    path = export_run(recipe_run, str(tmp_path / "fp32"), dtype="fp32")
    again = LLaVEEmbedder.from_pretrained(path)
    for m in (merged, again):  # the recipe's grid and length travel with the model
        assert sorted(map(tuple, m.config.image_grid_pinpoints)) == [(64, 64), (64, 128), (128, 64), (128, 128)]
        assert m.processor.max_length == 4096 and m.processor.max_text_tokens is None
    ds = SyntheticDataset(6, seed=9, split="eval")
    texts = [ds[i]["qry"] for i in range(6)]
    images = [ds[i]["qry_image"] for i in range(6)]
    a, b = merged.encode(texts, images), again.encode(texts, images)
    err = (a - b).abs().max().item()
    assert err <= 1e-6, f"max abs error {err:.2e}"
    fresh = W.recipe_cfg("unused")
    from llave_fast.model import build_tiny_model

    init = build_tiny_model(fresh.seed, image_size=64, patch_size=16, max_grid=1)
    init.set_image_grid("(1x1),...,(2x2)")
    assert (init.encode(texts, images) - a).abs().max().item() > 1e-4  # the run did train


def test_flags_override_the_preset(monkeypatch):
    import llave_fast.train as T
    from llave_fast.cli import main

    seen = {}
    monkeypatch.setattr(T, "train", lambda cfg: seen.setdefault("cfg", cfg))
    assert main(["train", "--config", "llave_0.5b_recipe.json", "--model", "tiny", "--accumulation-steps", "1",
                 "--mask-duplicates", "true", "--group-by-modality", "false", "--image-grid", "[[384, 768]]",
                 "--max-length", "2048", "--warmup-ratio", "0.1", "--epochs", "2", "--subsets", "MSCOCO,CIRR"]) == 0
    c = seen["cfg"]
    assert (c.model, c.accumulation_steps, c.mask_duplicates, c.group_by_modality) == ("tiny", 1, True, False)
    assert (c.image_grid, c.max_length, c.warmup_ratio, c.epochs, c.subsets) == (
        "[[384, 768]]", 2048, 0.1, 2.0, ["MSCOCO", "CIRR"])
    assert (c.lr_vision, c.mmeb_split, c.max_rows_per_subset) == (0.0, "original", 50000)  # the rest from the preset
