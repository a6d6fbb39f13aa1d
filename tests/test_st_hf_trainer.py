"""The Hugging Face Trainer recipe (llave_fast.integrations.hf_trainer): FusedHardnessLoss in
``compute_loss`` for a shared or two-tower encoder. A few CPU steps bring the loss down; under
two gloo ranks (torchrun, the Trainer's own DDP) one SGD step equals the single-process step on
the whole global batch, which is what the gather across ranks is for. Nothing is downloaded."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, TrainingArguments  # noqa: E402

from llave_fast import FusedHardnessLoss  # noqa: E402
from llave_fast.errors import LlaveFastError  # noqa: E402
from llave_fast.integrations.hf_trainer import DualEncoder, FusedContrastiveTrainer, TextPairCollator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog bird fish sat ran on under mat rug tree pond red blue green big small old house car".split()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def tiny_bert(seed: int, dropout: float = 0.1) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=len(WORDS) + 4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=dropout,
                                attention_probs_dropout_prob=dropout), add_pooling_layer=False)


def rows(n: int, seed: int = 0, negatives: bool = True) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        pos = words[:]
        rng.shuffle(pos)
        r = {"query": " ".join(words), "target": " ".join(pos)}
        if negatives:
            r["negative"] = " ".join(rng.sample(WORDS, 4))
        out.append(r)
    return out


@pytest.mark.parametrize("towers", [1, 2], ids=["shared", "two-tower"])
def test_trainer_recipe_trains(tmp_path, towers):
    model = DualEncoder(tiny_bert(0), tiny_bert(1) if towers == 2 else None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = 20
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16,
                             learning_rate=2e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             remove_unused_columns=False, seed=0, disable_tqdm=True)
    trainer = FusedContrastiveTrainer(model=model, args=args, train_dataset=rows(16 * steps),
                                      data_collator=TextPairCollator(tiny_tokenizer(), negative_key="negative"),
                                      logit_scale=20.0, alpha=9.0)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps and sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    assert isinstance(trainer.fused_loss(), FusedHardnessLoss) and not trainer.fused_loss().distributed
    moved = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved == ({"query_encoder", "target_encoder"} if towers == 2 else {"query_encoder"})


def test_trainer_recipe_refusals():
    model = DualEncoder(tiny_bert(0))
    with pytest.raises(ValueError, match=r"pooling must be one of .* got 'max'"):
        DualEncoder(tiny_bert(0), pooling="max")
    with pytest.raises(TypeError, match=r"query_encoder must be a torch module, got str"):
        DualEncoder("bert")
    with pytest.raises(KeyError, match=r"rows \[0\] have no 'target'"):
        TextPairCollator(tiny_tokenizer())([{"query": "a cat"}])
    # a misspelt negative key is refused, not taken for a batch without negatives (which holds the key)
    rows = [{"query": "a cat", "target": "a photo of a cat", "negative": "a dog"},
            {"query": "a car", "target": "a red car", "negative": ["a bus", "a van"]}]
    with pytest.raises(LlaveFastError, match=r"negative_key='neg' is in none of the 2 rows .*'negative'"):
        TextPairCollator(tiny_tokenizer(), negative_key="neg")(rows)
    assert TextPairCollator(tiny_tokenizer(), negative_key="negative")(rows)["negatives"]["input_ids"].shape[0] == 3
    none = TextPairCollator(tiny_tokenizer(), negative_key="negative")([dict(r, negative=None) for r in rows])
    assert sorted(none) == ["query", "target"]
    # once a batch held the key, a later batch whose rows all leave it out is a batch without negatives
    collate = TextPairCollator(tiny_tokenizer(), negative_key="negative")
    collate(rows)
    assert sorted(collate([{k: v for k, v in r.items() if k != "negative"} for r in rows])) == ["query", "target"]
    with pytest.raises(ValueError, match=r"alpha"):
        FusedContrastiveTrainer(model=model, args=TrainingArguments(output_dir="unused", use_cpu=True,
                                                                    report_to="none"),
                                alpha=float("nan"))


def test_the_collator_refuses_an_empty_or_non_text_value_naming_the_row_and_key():
    """An empty negative "" was tokenised to [CLS] [SEP] and trained on as a hard negative of no words (a blank
    query or target as a text of no words); a number failed inside the tokenizer, a dict was read as its keys."""
    good = {"query": "a cat", "target": "a photo of a cat", "negative": "a dog"}
    collate = TextPairCollator(tiny_tokenizer(), negative_key="negative")
    cases = [({"negative": ""}, ValueError, r"row 1's 'negative' is an empty text \(''\).*None or \[\] under "
                                           r"'negative'"),
             ({"negative": ["a bus", "  "]}, ValueError, r"row 1's 'negative'\[1\] is an empty text \('  '\)"),
             ({"query": ""}, ValueError, r"row 1's 'query' is an empty text .*every query and target needs a text"),
             ({"target": " \n"}, ValueError, r"row 1's 'target' is an empty text"),
             ({"target": 7}, TypeError, r"row 1's 'target' must be a text, got int 7"),
             ({"negative": [None]}, TypeError, r"row 1's 'negative'\[0\] must be a text, got NoneType"),
             ({"negative": {"a dog": 1}}, TypeError, r"row 1's 'negative' must be a text, a list of texts, None or "
                                                     r"\[\], got dict")]
    for change, kind, message in cases:
        with pytest.raises(kind, match=message) as e:
            collate([good, {**good, **change}])
        assert isinstance(e.value, LlaveFastError)
    assert collate([good, {**good, "negative": []}])["negatives"]["input_ids"].shape[0] == 1


@pytest.mark.parametrize("kw,kind,message", [
    ({"max_length": 2}, ValueError, r"max_length must leave room for a text: more than the tokenizer's 2 special "
                                    r"token\(s\) it adds, got 2"),
    ({"max_length": 0}, ValueError, r"max_length must leave room .*got 0"),
    ({"max_length": -1}, ValueError, r"max_length must leave room .*got -1"),
    ({"max_length": True}, TypeError, r"max_length must be a positive int or None, got bool True"),
    ({"max_length": "8"}, TypeError, r"max_length must be a positive int or None, got str '8'"),
    ({"target_key": "query"}, ValueError, r"query_key and target_key are both 'query'"),
    ({"negative_key": "target"}, ValueError, r"target_key and negative_key are both 'target'"),
    ({"query_key": None}, TypeError, r"query_key must be a str, got NoneType None"),
], ids=["max_length-specials-only", "max_length-0", "max_length-negative", "max_length-bool", "max_length-str",
        "same-keys", "negative-is-target", "key-None"])
def test_the_collator_refuses_settings_that_would_train_on_nothing_or_fail_later(kw, kind, message):
    """max_length=2 cut every text to [CLS] [SEP] (trained on texts of no words, silently); 0, 1 and True were
    ignored by the tokenizer; -1 and "8" failed in it (OverflowError, TypeError) at the first batch; one key for two
    sides trained each query against itself (or as its own hard negative)."""
    with pytest.raises(kind, match=message) as e:
        TextPairCollator(tiny_tokenizer(), **kw)
    assert isinstance(e.value, LlaveFastError)


def test_the_collator_refuses_no_tokenizer_and_an_empty_batch():
    with pytest.raises(TypeError, match=r"tokenizer must be a tokenizer \(callable on a list of texts\), got str"):
        TextPairCollator("bert-base-uncased")
    with pytest.raises(ValueError, match=r"TextPairCollator: rows is empty"):  # was the tokenizer's IndexError
        TextPairCollator(tiny_tokenizer())([])
    assert TextPairCollator(tiny_tokenizer(), max_length=3)([{"query": "a cat", "target": "a dog"}])["query"][
        "input_ids"].shape == (1, 3)


_RANK_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from transformers import TrainingArguments
    from llave_fast.integrations.hf_trainer import DualEncoder, FusedContrastiveTrainer, TextPairCollator
    import test_st_hf_trainer as T

    out, towers = sys.argv[1], int(sys.argv[2])
    model = DualEncoder(T.tiny_bert(0, dropout=0.0), T.tiny_bert(1, dropout=0.0) if towers == 2 else None)
    args = TrainingArguments(output_dir=out + "/run", max_steps=1, per_device_train_batch_size=int(sys.argv[3]),
                             learning_rate=0.5, optim="sgd", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
                             lr_scheduler_type="constant", save_strategy="no", report_to="none", use_cpu=True,
                             remove_unused_columns=False, seed=0, disable_tqdm=True,
                             ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    trainer = FusedContrastiveTrainer(model=model, args=args, train_dataset=T.rows(8, seed=5),
                                      data_collator=TextPairCollator(T.tiny_tokenizer(), negative_key="negative"),
                                      logit_scale=20.0, alpha=9.0)
    trainer.train()
    if trainer.args.process_index == 0:
        torch.save({{"params": {{n: p.detach() for n, p in model.named_parameters()}},
                    "distributed": trainer.fused_loss().distributed, "world": trainer.args.world_size}},
                   out + "/params.pt")
    import torch.distributed as dist
    if dist.is_initialized():  # leave together: a rank exiting while gloo still talks aborts the other
        dist.barrier()
        dist.destroy_process_group()
    # then without interpreter finalization, as llave_fast.testing's ranks do: DDP's reducer still
    # holds the gloo group there, and tearing it down with gloo's threads alive can abort a rank
    # ("terminate called without an active exception") after the run itself has finished
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


def _run(tmp_path, name, nproc, towers):
    folder = tmp_path / name
    folder.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_"))}
    env["OMP_NUM_THREADS"] = "1"
    per_device = 8 // nproc
    if nproc == 1:
        cmd = [sys.executable, str(script), str(folder), str(towers), str(per_device)]
    else:
        # --standalone: a local rendezvous on a free port (other test sessions may share the machine)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), str(folder), str(towers), str(per_device)]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return torch.load(folder / "params.pt", weights_only=True)


@pytest.mark.parametrize("towers", [1, 2], ids=["shared", "two-tower"])
def test_trainer_recipe_across_two_ranks_equals_the_global_batch(tmp_path, towers):
    """2 ranks x 4 pairs (each rank's queries against all 8 targets and 8 negatives, DDP's
    average) take the same SGD step as one process on the 8 pairs."""
    one = _run(tmp_path, "one", 1, towers)
    two = _run(tmp_path, "two", 2, towers)
    assert two["distributed"] and two["world"] == 2 and not one["distributed"]
    base = _initial_params(towers)
    # the step itself (parameters after minus before) must agree; a step that is zero in exact
    # arithmetic (attention key biases) is measured against a millionth of the largest one
    steps = {n: p - base[n] for n, p in one["params"].items()}
    floor = 1e-6 * max(d.norm().item() for d in steps.values())
    errs = {n: ((two["params"][n] - base[n] - d).norm() / max(d.norm().item(), floor)).item() for n, d in steps.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, f"the two-rank step differs from the global-batch step by {errs[worst]:.2e} ({worst})"


def _initial_params(towers):
    model = DualEncoder(tiny_bert(0, dropout=0.0), tiny_bert(1, dropout=0.0) if towers == 2 else None)
    return {n: p.detach() for n, p in model.named_parameters()}


def test_readme_trainer_snippet_trains(tmp_path, monkeypatch):
    """The README's Trainer snippet, run as written with the tiny model and tokenizer in place of the hub's."""
    import re

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- example: hf-trainer\b[^>]*-->\s*```\w*\n(.*?)```", text, re.S)
    assert m, "README has no example block 'hf-trainer'"
    code = m.group(1)
    subs = {'AutoTokenizer.from_pretrained("bert-base-uncased")': "_tiny_tokenizer()",
            'AutoModel.from_pretrained("bert-base-uncased")': "_tiny_bert()"}
    for old, new in subs.items():
        assert old in code, f"the README snippet no longer has {old}: update this test"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    scope = {"_tiny_tokenizer": tiny_tokenizer, "_tiny_bert": lambda: tiny_bert(0)}
    exec(compile(code, "README.md:hf-trainer", "exec"), scope)
    assert scope["trainer"].state.global_step > 0


def test_trainer_recipe_evaluate_reports_the_loss(tmp_path):
    """evaluate() reports eval_loss, the fused loss of the evaluation batch without dropout (the Trainer
    computes an evaluation loss only for a model with labels or one that says it returns a loss)."""
    model = DualEncoder(tiny_bert(0))
    data = rows(6, seed=3)
    collate = TextPairCollator(tiny_tokenizer(), negative_key="negative")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=6, report_to="none", use_cpu=True,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = FusedContrastiveTrainer(model=model, args=args, eval_dataset=data, data_collator=collate,
                                      logit_scale=20.0, alpha=9.0)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics, metrics
    model.eval()
    with torch.no_grad():
        out = model(**collate(data))
        want = FusedHardnessLoss(20.0, 9.0)(out["query"], out["target"], negatives=out["negatives"])
    assert abs(metrics["eval_loss"] - want.item()) <= 1e-5 * want.item(), (metrics, want.item())


def test_trainer_recipe_refuses_what_it_would_ignore_or_drop(tmp_path):
    """A loss_fn with loss settings beside it (they would be ignored), and a TextPairCollator key that the
    Trainer's remove_unused_columns would drop before the collator sees it: refused at construction,
    naming them."""
    model = DualEncoder(tiny_bert(0))
    keep = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    with pytest.raises(LlaveFastError, match=r"loss_fn=.* and logit_scale=33\.0: the loss_fn is used as is"):
        FusedContrastiveTrainer(model=model, args=keep, loss_fn=FusedHardnessLoss(20.0, 0.0), logit_scale=33.0)
    trainer = FusedContrastiveTrainer(model=model, args=keep, loss_fn=FusedHardnessLoss(20.0, 0.0))
    assert trainer.fused_loss().logit_scale == 20.0
    assert FusedContrastiveTrainer(model=model, args=keep, alpha=2.0).fused_loss().alpha == 2.0
    drop = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")  # remove_unused_columns=True
    with pytest.raises(LlaveFastError, match=r"TextPairCollator reads 'negative': pass remove_unused_columns=False"):
        FusedContrastiveTrainer(model=model, args=drop, train_dataset=rows(4),
                                data_collator=TextPairCollator(tiny_tokenizer(), negative_key="negative"))
    with pytest.raises(LlaveFastError, match=r"reads 'anchor'"):
        FusedContrastiveTrainer(model=model, args=drop,
                                data_collator=TextPairCollator(tiny_tokenizer(), query_key="anchor"))
    # keys that are the forward's arguments survive the removal: accepted
    FusedContrastiveTrainer(model=model, args=drop, data_collator=TextPairCollator(tiny_tokenizer()))


def test_the_same_encoder_as_both_towers_is_shared(tmp_path):
    """DualEncoder(m, m) is the shared encoder, registered once: the Trainer's save (safetensors, which
    refuses tensors registered twice) works, as for DualEncoder(m)."""
    bert = tiny_bert(0)
    model = DualEncoder(bert, bert)
    assert model.shared and model.target_encoder is None
    state = model.state_dict()
    assert len({v.data_ptr() for v in state.values()}) == len(state)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to="none",
                             use_cpu=True, remove_unused_columns=False, disable_tqdm=True, save_strategy="no")
    trainer = FusedContrastiveTrainer(model=model, args=args, train_dataset=rows(4),
                                      data_collator=TextPairCollator(tiny_tokenizer(), negative_key="negative"))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").exists()


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pooling_finds_the_last_kept_token_on_either_padding_side(side):
    """pooling="last" takes each row's last unpadded token: with right padding the count of kept tokens
    minus one, with left padding (decoder tokenizers set for generation) the final column. Counting the
    kept tokens under left padding picked a padded position's or a middle token's hidden state."""
    model = DualEncoder(tiny_bert(0), pooling="last", normalize=False)
    hidden = torch.arange(3 * 5, dtype=torch.float32).reshape(3, 5, 1).expand(3, 5, 2).contiguous()
    lengths = [5, 3, 1]
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 5 - n:] = 1
    want = [n - 1 for n in lengths] if side == "right" else [4, 4, 4]
    got = model._pool(hidden, mask)
    assert torch.equal(got, hidden[torch.arange(3), want]), (got, want)


def test_a_given_local_loss_across_ranks_is_used_with_a_warning(tmp_path, monkeypatch):
    """Across ranks a given loss_fn that is not distributed is used as is (each rank's own targets only),
    but not silently: one warning says the global batch needs a distributed loss. The built loss is
    distributed, and a distributed loss_fn draws no warning."""
    import warnings

    import torch.distributed as dist

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    local = FusedContrastiveTrainer(model=DualEncoder(tiny_bert(0)), args=args, loss_fn=FusedHardnessLoss(20.0, 9.0))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.warns(UserWarning,
                      match=r"not distributed, but the run has 2 ranks.*local_loss=True, distributed=True"):
        assert local.fused_loss() is local.loss_fn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local.fused_loss()  # once
        given = FusedHardnessLoss(20.0, 9.0, local_loss=True, distributed=True)
        FusedContrastiveTrainer(model=DualEncoder(tiny_bert(0)), args=args, loss_fn=given).fused_loss()
        built = FusedContrastiveTrainer(model=DualEncoder(tiny_bert(0)), args=args).fused_loss()
    assert built.distributed and built.local_loss
