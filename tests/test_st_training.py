"""SentenceTransformerTrainer with the fused losses, on the CPU, with nothing downloaded: a tiny
randomly initialised BERT and a word-level tokenizer built here, an in-memory dataset of
(anchor, positive, negative) triplets. A few steps: the loss goes down, a checkpoint is saved,
and the saved model reloads and embeds as the trained one does."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("sentence_transformers", reason='needs the [st] extra: pip install "llave-fast[st]"')
datasets = pytest.importorskip("datasets", reason='needs the [st] extra: pip install "llave-fast[st]"')

from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer  # noqa: E402
from sentence_transformers.sentence_transformer.training_args import (  # noqa: E402
    SentenceTransformerTrainingArguments,
)

from llave_fast.integrations import (  # noqa: E402
    FusedCachedMultipleNegativesRankingLoss,
    FusedMultipleNegativesRankingLoss,
)
from test_st_equivalence import WORDS, load_st_model, save_tiny_model  # noqa: E402

STEPS = 24


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def triplets(n: int, seed: int = 0) -> "datasets.Dataset":
    """Anchors of 4 words, positives: the same words shuffled with one replaced, negatives: others."""
    rng = random.Random(seed)
    rows = {"anchor": [], "positive": [], "negative": []}
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        pos = words[:]
        rng.shuffle(pos)
        pos[rng.randrange(4)] = rng.choice(WORDS)
        rows["anchor"].append(" ".join(words))
        rows["positive"].append(" ".join(pos))
        rows["negative"].append(" ".join(rng.sample(WORDS, 4)))
    return datasets.Dataset.from_dict(rows)


@pytest.mark.parametrize("cached", [False, True], ids=["fused", "fused-cached"])
def test_sentence_transformer_trainer_trains_saves_and_reloads(tmp_path, cached):
    model = load_st_model(save_tiny_model(tmp_path / "base", seed=0), dtype=torch.float32)
    kw = dict(scale=20.0, directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction",
              hardness_mode="in_batch_negatives", hardness_strength=9.0)
    loss = (FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=8, **kw) if cached
            else FusedMultipleNegativesRankingLoss(model, **kw))
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=16, learning_rate=2e-3,
        warmup_steps=0, logging_steps=1, save_strategy="steps", save_steps=STEPS, report_to="none", use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=triplets(16 * STEPS), loss=loss)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, f"the loss did not go down: {losses}"
    ckpt = tmp_path / "out" / f"checkpoint-{STEPS}"
    assert (ckpt / "model.safetensors").exists() or any(ckpt.rglob("*.safetensors")), sorted(ckpt.rglob("*"))
    reloaded = SentenceTransformer(str(ckpt), device="cpu")
    texts = ["the cat sat on the mat", "a big red car", "one old tree near the pond"]
    torch.testing.assert_close(reloaded.encode(texts, convert_to_tensor=True),
                               model.eval().encode(texts, convert_to_tensor=True), rtol=1e-5, atol=1e-6)


def _readme_example(name: str) -> str:
    """The fenced block right after ``<!-- example: NAME -->`` in the README."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- example: " + re.escape(name) + r"\b[^>]*-->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README has no example block {name!r}"
    return m.group(1)


def test_readme_sentence_transformers_snippet_trains(tmp_path, monkeypatch):
    """The README's snippet, run as written but with the tiny model in place of the hub model."""
    code = _readme_example("st-loss")
    hub = 'SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")'
    assert hub in code, "the README snippet's model line changed: update this test"
    model = load_st_model(save_tiny_model(tmp_path / "base", seed=0), dtype=torch.float32)
    monkeypatch.chdir(tmp_path)
    scope = {"_tiny_model": lambda: model}
    exec(compile(code.replace(hub, "_tiny_model()"), "README.md:st-loss", "exec"), scope)
    assert isinstance(scope["loss"], FusedMultipleNegativesRankingLoss) and scope["loss"].uses_fused_loss
    assert scope["trainer"].state.global_step > 0
    assert isinstance(scope["cached"], FusedCachedMultipleNegativesRankingLoss)
