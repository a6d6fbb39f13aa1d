"""sentence-transformers' ranking losses against llave-fast's fused ones: equal numbers.

On one batch of a tiny randomly initialised BERT (float64, dropout on, the same seed for
both), ``FusedMultipleNegativesRankingLoss`` must give sentence-transformers'
``MultipleNegativesRankingLoss`` loss and parameter gradients, for every combination of
directions x partition_mode x hardness_mode x hardness_strength (0, 9) x hard negatives
(none, two columns); ``FusedCachedMultipleNegativesRankingLoss`` must give
``CachedMultipleNegativesRankingLoss``'s at the same mini_batch_size (cached path and single
pass). ``symmetric_hardness=True`` (LLaVE's weighting in both directions) is checked against
the float64 reference of LLaVE's loss. Nothing is downloaded: the tokenizer and model are
built here.
"""

from __future__ import annotations

import itertools
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

st = pytest.importorskip("sentence_transformers", reason='needs the [st] extra: pip install "llave-fast[st]"')

from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

from llave_fast.integrations.sentence_transformers import (  # noqa: E402
    FusedCachedMultipleNegativesRankingLoss,
    FusedLossFallbackWarning,
    FusedMultipleNegativesRankingLoss,
    fused_mnrl_loss,
)
from llave_fast.reference import reference_loss, reference_per_row  # noqa: E402

WORDS = ("the a one two cat dog bird fish sat ran flew swam on under near mat rug tree pond red blue green big "
         "small old young house car road sky sea").split()


# --------------------------------------------------------------------------- a tiny model, built here


def save_tiny_model(folder, seed: int = 0, hidden: int = 32, dropout: float = 0.1) -> str:
    """A word-level tokenizer and a randomly initialised 2-layer BERT, saved to ``folder``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=32)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(str(folder))
    fast.save_pretrained(str(folder))
    return str(folder)


def load_st_model(folder, dtype=torch.float64) -> SentenceTransformer:
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    tr = Transformer(str(folder))
    model = SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean")], device="cpu")
    return model.to(dtype).train()


def sentences(n: int, seed: int, length=(2, 6)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*length))) for _ in range(n)]


def columns(model, B: int, n_neg: int, seed: int = 0) -> list[dict]:
    """(anchor, positive, negative_1, ...) features of a batch: texts of different lengths per column."""
    return [model.preprocess(sentences(B, seed + 101 * c, (2 + c % 3, 5 + c))) for c in range(2 + n_neg)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def model64(model_dir):
    """One float64 model for the grids (their steps change gradients only, never the weights)."""
    return load_st_model(model_dir)


def loss_and_grads(model, loss_fn, features, seed=1):
    """One step's loss and every parameter gradient, from a fixed RNG state (dropout)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn(features, None)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_close(got, want, tol, what=""):
    (l1, g1), (l0, g0) = got, want
    assert abs(l1.item() - l0.item()) <= tol * max(1.0, abs(l0.item())), f"{what} loss {l1.item()!r} vs {l0.item()!r}"
    assert g0.keys() == g1.keys() and len(g0) > 10, (what, sorted(set(g0) ^ set(g1)))
    # a gradient that is zero in exact arithmetic (attention key biases: softmax is shift-invariant)
    # is rounding noise: such tensors are measured against a millionth of the largest gradient
    floor = 1e-6 * max(g.norm().item() for g in g0.values())
    worst = max(((g1[k] - g0[k]).norm() / max(g0[k].norm().item(), floor)).item() for k in g0)
    assert worst <= tol, f"{what}: largest relative parameter-gradient difference {worst:.2e} (tolerance {tol:.0e})"


# --------------------------------------------------------------------------- the grid

DIRECTIONS = [("query_to_doc",), ("query_to_doc", "doc_to_query")]
PARTITIONS = ["joint", "per_direction"]
HARDNESS = [None, "in_batch_negatives", "hard_negatives", "all_negatives"]
GRID = list(itertools.product(DIRECTIONS, PARTITIONS, HARDNESS, [0.0, 9.0], [0, 2]))


def _id(case):
    dirs, part, hm, a, k = case
    return f"{'+'.join(d.split('_to_')[0][0] + '2' + d.split('_to_')[1][0] for d in dirs)}-{part}-{hm}-{a:g}-neg{k}"


def _kw(dirs, part, hm, a):
    return dict(scale=20.0, directions=dirs, partition_mode=part, hardness_mode=hm, hardness_strength=a)


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_fused_equals_mnrl(model64, case):
    dirs, part, hm, a, n_neg = case
    model = model64
    feats = columns(model, 6, n_neg)
    want = loss_and_grads(model, MultipleNegativesRankingLoss(model, **_kw(dirs, part, hm, a)), feats)
    fused = FusedMultipleNegativesRankingLoss(model, **_kw(dirs, part, hm, a))
    assert fused.uses_fused_loss
    got = loss_and_grads(model, fused, feats)
    assert_close(got, want, 1e-9, _id(case))


@pytest.mark.parametrize("case", GRID, ids=[_id(c) for c in GRID])
def test_fused_cached_equals_cached_mnrl(model64, case):
    """Mini-batches of 4 on a batch of 6: the cached path (re-encode in the loss's backward)."""
    dirs, part, hm, a, n_neg = case
    model = model64
    feats = columns(model, 6, n_neg, seed=7)
    kw = dict(_kw(dirs, part, hm, a), mini_batch_size=4)
    want = loss_and_grads(model, CachedMultipleNegativesRankingLoss(model, **kw), feats)
    got = loss_and_grads(model, FusedCachedMultipleNegativesRankingLoss(model, **kw), feats)
    assert_close(got, want, 1e-9, _id(case))


@pytest.mark.parametrize("mini_batch_size,num_tokens", [(64, None), (3, None), (4, 9)],
                         ids=["single-pass", "mini-batch-3", "by-tokens"])
def test_fused_cached_single_pass_and_token_packing(model64, mini_batch_size, num_tokens):
    """The whole batch in one mini-batch (GradCache's single pass), and mini-batches packed by tokens."""
    model = model64
    feats = columns(model, 5, 2, seed=11)
    kw = dict(_kw(DIRECTIONS[1], "joint", "in_batch_negatives", 9.0), mini_batch_size=mini_batch_size,
              mini_batch_num_tokens=num_tokens)
    want = loss_and_grads(model, CachedMultipleNegativesRankingLoss(model, **kw), feats)
    got = loss_and_grads(model, FusedCachedMultipleNegativesRankingLoss(model, **kw), feats)
    assert_close(got, want, 1e-9)


def test_fused_cached_defers_the_reencode_to_backward_and_scales_by_the_upstream_gradient(model64):
    """What the trainer relies on: forward leaves the parameters' gradients untouched, the loss
    requires grad, and backward of 3 * loss gives 3 x the gradients (accumulation, loss scaling)."""
    model = model64
    feats = columns(model, 6, 1, seed=3)
    loss_fn = FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=2, hardness_mode="all_negatives",
                                                      hardness_strength=9.0)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = loss_fn(feats, None)
    assert loss.requires_grad and all(p.grad is None for p in model.parameters())
    (3 * loss).backward()
    g3 = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    _, g1 = loss_and_grads(model, loss_fn, feats)
    assert g3.keys() == g1.keys() and g1
    for k in g1:
        torch.testing.assert_close(g3[k], 3 * g1[k], rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # evaluation: the loss only, nothing cached
        torch.manual_seed(1)
        value = loss_fn(feats, None)
    assert not value.requires_grad and abs(value.item() - loss.item()) < 1e-12


def test_fused_cached_refuses_a_deepspeed_engine_the_trainer_puts_in_loss_model(model64):
    """The trainer's override_model_in_loss puts its engine in loss.model; GradCache's own refusal hid
    behind the integration's encoder wrapper, and DeepSpeed failed later inside the backward."""
    from llave_fast.errors import LlaveFastError

    class StandInEngine(torch.nn.Module):  # the attributes GradCache recognises an engine by
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *a, **k):
            return self.module(*a, **k)

        def backward(self, loss, **_):
            loss.backward()

        def step(self):
            pass

        def zero_optimization_stage(self):
            return 3

    loss_fn = FusedCachedMultipleNegativesRankingLoss(model64, mini_batch_size=2)
    loss_fn.model = StandInEngine(model64)
    with pytest.raises(LlaveFastError, match=r"DeepSpeed engine needs engine\.backward.*got model StandInEngine"):
        loss_fn(columns(model64, 6, 0), None)


def test_without_sentence_transformers_the_integration_says_how_to_install(monkeypatch):
    import importlib
    import sys

    from llave_fast.errors import MissingDependency

    for name in [m for m in sys.modules if m == "sentence_transformers" or m.startswith("sentence_transformers.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    monkeypatch.delitem(sys.modules, "llave_fast.integrations.sentence_transformers")
    with pytest.raises(MissingDependency, match=r'pip install "llave-fast\[st\]"'):
        importlib.import_module("llave_fast.integrations.sentence_transformers")


def test_fused_and_fused_cached_agree_in_float32(model_dir):
    """float32 model, dropout off: the two fused classes against each other and against
    sentence-transformers at float32 tolerance."""
    model = load_st_model(model_dir, dtype=torch.float32).eval()
    feats = columns(model, 8, 2, seed=5)
    kw = _kw(DIRECTIONS[1], "per_direction", "in_batch_negatives", 9.0)
    want = loss_and_grads(model, MultipleNegativesRankingLoss(model, **kw), feats)
    plain = loss_and_grads(model, FusedMultipleNegativesRankingLoss(model, **kw), feats)
    cached = loss_and_grads(model, FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=3, **kw), feats)
    assert_close(plain, want, 2e-5)
    assert_close(cached, want, 2e-5)


# --------------------------------------------------------------------------- LLaVE's weighting (ours)


def _embeddings(B, d, n_neg, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, d, generator=g, dtype=torch.float64)
    t = q + 0.8 * torch.randn(B, d, generator=g, dtype=torch.float64)
    negs = [q + 1.2 * torch.randn(B, d, generator=g, dtype=torch.float64) for _ in range(n_neg)]
    return [x.requires_grad_() for x in [q, t, *negs]]


@pytest.mark.parametrize("hm,n_neg", [("in_batch_negatives", 0), ("all_negatives", 0), ("all_negatives", 2)])
@pytest.mark.parametrize("part", PARTITIONS)
def test_symmetric_hardness_is_llave_loss(hm, n_neg, part):
    """symmetric_hardness=True: the hardness term in both directions, LLaVE's loss (float64 reference)."""
    embs = _embeddings(7, 12, n_neg, seed=3)
    got = fused_mnrl_loss(embs[0], embs[1], torch.cat(embs[2:]) if n_neg else None, scale=50.0,
                          directions=DIRECTIONS[1], partition_mode=part, hardness_mode=hm, hardness_strength=9.0,
                          symmetric_hardness=True)
    g_got = torch.autograd.grad(got, embs)
    q, t = F.normalize(embs[0], dim=-1), F.normalize(embs[1], dim=-1)
    negs = F.normalize(torch.cat(embs[2:]), dim=-1) if n_neg else None
    if part == "per_direction":
        want = reference_loss(q, t, logit_scale=50.0, alpha=9.0, symmetric=True, negatives=negs)
    else:  # one softmax over both rows: the reference's two one-way rows, combined
        want = torch.logaddexp(
            reference_per_row(q, t, logit_scale=50.0, alpha=9.0, symmetric=False, negatives=negs),
            reference_per_row(t, q, logit_scale=50.0, alpha=9.0, symmetric=False)).mean()
    g_want = torch.autograd.grad(want, embs)
    assert abs(got.item() - want.item()) < 1e-10
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    if part == "per_direction":
        # and it is not sentence-transformers' loss (hardness on query_to_doc only); with "joint" the
        # query_to_doc row can dominate the shared softmax so much that the two differ little
        ours_st = fused_mnrl_loss(embs[0], embs[1], torch.cat(embs[2:]) if n_neg else None, scale=50.0,
                                  directions=DIRECTIONS[1], partition_mode=part, hardness_mode=hm,
                                  hardness_strength=9.0)
        assert abs(ours_st.item() - got.item()) > 1e-6


def test_symmetric_hardness_in_the_loss_classes(model_dir):
    model = load_st_model(model_dir).eval()
    feats = columns(model, 6, 0, seed=9)
    loss_fn = FusedMultipleNegativesRankingLoss(model, scale=50.0, directions=DIRECTIONS[1],
                                                partition_mode="per_direction", hardness_mode="in_batch_negatives",
                                                hardness_strength=9.0, symmetric_hardness=True)
    with torch.no_grad():
        q, t = (model(f)["sentence_embedding"] for f in feats)
        want = reference_loss(F.normalize(q, dim=-1), F.normalize(t, dim=-1), logit_scale=50.0, alpha=9.0)
        assert abs(loss_fn(feats, None).item() - want.item()) < 1e-10
    assert loss_fn.get_config_dict()["symmetric_hardness"] is True


# --------------------------------------------------------------------------- fallback and refusals


@pytest.mark.parametrize("dirs", [("query_to_doc", "query_to_query"),
                                  ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")])
def test_directions_without_a_fused_form_fall_back_with_one_note(model64, dirs):
    model = model64
    feats = columns(model, 5, 1, seed=2)
    kw = _kw(dirs, "joint", "in_batch_negatives", 9.0)
    want = loss_and_grads(model, MultipleNegativesRankingLoss(model, **kw), feats)
    fused = FusedMultipleNegativesRankingLoss(model, **kw)
    assert not fused.uses_fused_loss
    with pytest.warns(FusedLossFallbackWarning, match="query_to_query"):
        got = loss_and_grads(model, fused, feats)
    assert_close(got, want, 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusedLossFallbackWarning)  # once per loss object
        loss_and_grads(model, fused, feats)
    kw_c = dict(kw, mini_batch_size=2)
    want_c = loss_and_grads(model, CachedMultipleNegativesRankingLoss(model, **kw_c), feats)
    with pytest.warns(FusedLossFallbackWarning):
        got_c = loss_and_grads(model, FusedCachedMultipleNegativesRankingLoss(model, **kw_c), feats)
    assert_close(got_c, want_c, 1e-12)


def test_numpy_scalars_are_taken_as_sentence_transformers_takes_them(model64):
    """A sweep's numpy scalars (np.float32 scale and strength, np.int64 mini-batch sizes) build
    sentence-transformers' losses; the drop-ins take them too, as Python numbers, and compute
    the same loss. Other types are refused as types (TypeError), naming the argument."""
    import numpy as np

    kw = dict(scale=np.float32(20.0), hardness_mode="all_negatives", hardness_strength=np.float64(9.0))
    cached = FusedCachedMultipleNegativesRankingLoss(model64, mini_batch_size=np.int64(4),
                                                     mini_batch_num_tokens=np.int32(64), **kw)
    config = cached.get_config_dict()
    assert (config["scale"], config["hardness_strength"], config["mini_batch_size"],
            config["mini_batch_num_tokens"]) == (20.0, 9.0, 4, 64)
    assert type(config["scale"]) is float and type(config["mini_batch_size"]) is int
    features = columns(model64, 4, 1)
    got = loss_and_grads(model64, FusedMultipleNegativesRankingLoss(model64, **kw), features)
    want = loss_and_grads(model64, MultipleNegativesRankingLoss(model64, **kw), features)
    assert_close(got, want, 1e-9, "numpy scalars")
    with pytest.raises(TypeError, match=r"scale must be a positive finite number, got str '20'"):
        FusedMultipleNegativesRankingLoss(model64, scale="20")
    with pytest.raises(TypeError, match=r"hardness_strength .* got bool True"):
        FusedMultipleNegativesRankingLoss(model64, hardness_mode="all_negatives", hardness_strength=True)
    with pytest.raises(TypeError, match=r"mini_batch_size must be a positive int, got float 4.0"):
        FusedCachedMultipleNegativesRankingLoss(model64, mini_batch_size=4.0)
    with pytest.raises(ValueError, match=r"mini_batch_num_tokens must be a positive int or None, got 0"):
        FusedCachedMultipleNegativesRankingLoss(model64, mini_batch_num_tokens=np.int64(0))


@pytest.mark.parametrize("wrapper", ["matryoshka", "adaptive"])
@pytest.mark.parametrize("mini_batch_size", [2, 100], ids=["cached", "single-pass"])
def test_wrappers_around_the_cached_loss_are_refused_by_name(model64, wrapper, mini_batch_size):
    """MatryoshkaLoss / AdaptiveLayerLoss around the fused cached loss (README: not supported) are
    refused, naming the wrapper, whatever the batch: they used to crash in the re-encode with a
    shape mismatch, or (Matryoshka) run when a batch happened to fit the single pass."""
    from sentence_transformers.sentence_transformer.losses import AdaptiveLayerLoss, MatryoshkaLoss

    from llave_fast.errors import LlaveFastError

    inner = FusedCachedMultipleNegativesRankingLoss(model64, mini_batch_size=mini_batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = (MatryoshkaLoss(model64, inner, [32, 16]) if wrapper == "matryoshka"
                else AdaptiveLayerLoss(model64, inner))
    features = columns(model64, 5, 1)
    with pytest.raises(LlaveFastError, match=r"wrapped by sentence-transformers' .*%s.*FusedMultipleNegativesRanking"
                       % ("MatryoshkaLoss" if wrapper == "matryoshka" else "AdaptiveLayerLoss")):
        loss_and_grads(model64, loss, features)
    # the model's forward is put back by the wrapper: the loss alone still runs
    assert torch.isfinite(loss_and_grads(model64, inner, features)[0])


def test_refusals_name_the_argument_and_the_value(model64):
    from sentence_transformers.util import dot_score

    model = model64
    with pytest.raises(ValueError, match=r"similarity_fct must be .*cos_sim.*got 'dot_score'"):
        FusedMultipleNegativesRankingLoss(model, similarity_fct=dot_score)
    with pytest.raises(ValueError, match=r"similarity_fct .*got 'dot_score'"):
        FusedCachedMultipleNegativesRankingLoss(model, similarity_fct=dot_score)
    with pytest.raises(ValueError, match=r"scale must be a positive finite number, got -1"):
        FusedMultipleNegativesRankingLoss(model, scale=-1)
    with pytest.raises(ValueError, match=r"hardness_mode must be one of .* got 'hard'"):
        FusedMultipleNegativesRankingLoss(model, hardness_mode="hard", hardness_strength=1.0)
    with pytest.raises(ValueError, match=r"hardness_strength must be a finite number >= 0, got -2"):
        FusedMultipleNegativesRankingLoss(model, hardness_mode="all_negatives", hardness_strength=-2)
    with pytest.raises(ValueError, match=r"directions must include 'query_to_doc'.*doc_to_query"):
        FusedMultipleNegativesRankingLoss(model, directions=("doc_to_query",))
    with pytest.raises(ValueError, match=r"symmetric_hardness=True .* 'doc_to_query', got directions="):
        FusedMultipleNegativesRankingLoss(model, hardness_mode="in_batch_negatives", hardness_strength=9.0,
                                          symmetric_hardness=True)
    with pytest.raises(ValueError, match=r"symmetric_hardness=True .*got hardness_mode='hard_negatives'"):
        FusedMultipleNegativesRankingLoss(model, directions=DIRECTIONS[1], hardness_mode="hard_negatives",
                                          hardness_strength=9.0, symmetric_hardness=True)
    with pytest.raises(ValueError, match=r"mini_batch_size must be a positive int, got 0"):
        FusedCachedMultipleNegativesRankingLoss(model, mini_batch_size=0)
    with pytest.raises(ValueError, match=r"at least 2 input columns .* got 1"):
        FusedMultipleNegativesRankingLoss(model)([model.preprocess(["a cat"])], None)
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"negatives must hold whole columns of B = 4 .* got 6 rows"):
        fused_mnrl_loss(q, q, torch.randn(6, 8))


def test_embedding_refusals_name_the_argument_passed():
    """fused_mnrl_loss and compute_loss_from_embeddings name what the user passed (anchor, embeddings[k]), not the
    fused loss's own query/target: an empty batch, mixed dtypes or devices were said of "query"/"target"; integer
    embeddings and a negative column of another width or None failed with torch's RuntimeError/TypeError; negative
    columns of 2 and 6 rows beside 4 anchors were read as two whole columns of 4, silently."""
    from llave_fast.errors import InvalidArgumentType, LlaveFastError

    a, p = torch.randn(4, 8), torch.randn(4, 8)
    for call, kind, message in [
        (lambda: fused_mnrl_loss(a[:0], p[:0]), ValueError, r"^anchor is an empty batch \(shape \(0, 8\)\)"),
        (lambda: fused_mnrl_loss(a.double(), p), TypeError, r"^positive has dtype torch.float32 but anchor has dtype "
                                                            r"torch.float64"),
        (lambda: fused_mnrl_loss(a, p, torch.randn(4, 8).double()), TypeError, r"^negatives has dtype torch.float64 "
                                                                               r"but anchor has dtype torch.float32"),
        (lambda: fused_mnrl_loss(a.long(), p.long()), TypeError, r"^anchor must be floating-point embeddings .*got "
                                                                 r"dtype torch.int64"),
        (lambda: fused_mnrl_loss(a, p.to("meta")), ValueError, r"^positive is on meta but anchor is on cpu"),
    ]:
        with pytest.raises(kind, match=message) as e:
            call()
        assert isinstance(e.value, LlaveFastError)
    loss = FusedMultipleNegativesRankingLoss(None)
    for cols, kind, message in [
        ([a, p, torch.randn(2, 8), torch.randn(6, 8)], ValueError,
         r"^embeddings\[2\] \(hard negative column 1\) has shape \(2, 8\) but embeddings\[0\] \(anchor\) has "
         r"\(4, 8\)"),
        ([a, p, torch.randn(4, 8), torch.randn(4, 6)], ValueError, r"^embeddings\[3\] \(hard negative column 2\) "
                                                                   r"has shape \(4, 6\)"),
        ([a, p, None], ValueError, r"^embeddings\[2\] \(hard negative column 1\) must be a \(B, d\) tensor .*got "
                                   r"NoneType"),
        ([a, p.double()], TypeError, r"^embeddings\[1\] \(positive\) has dtype torch.float64 but embeddings\[0\] "
                                     r"\(anchor\) has dtype torch.float32"),
        ("ab", InvalidArgumentType, r"^embeddings must be a list of \(B, d\) tensors .*got str"),
    ]:
        with pytest.raises(kind, match=message) as e:
            loss.compute_loss_from_embeddings(cols, None)
        assert isinstance(e.value, LlaveFastError)
    # 16-bit embeddings are computed in float32 (as cos_sim does): mixed with float32, taken; a generator, taken
    want = loss.compute_loss_from_embeddings([a, p], None)
    assert torch.isfinite(loss.compute_loss_from_embeddings([a.half(), p], None))
    assert loss.compute_loss_from_embeddings(iter([a, p]), None) == want


def test_forward_refuses_texts_one_dict_or_no_model_naming_them(model64):
    """Texts instead of the model's features failed deep in the forward (AttributeError: 'str' object has no
    attribute ...), one dict for all columns as "1 column", and a loss built with model=None with a TypeError;
    columns of other lengths (2 and 6 hard negatives beside 4 anchors) were read by the cached loss as two whole
    columns of 4."""
    from llave_fast.errors import LlaveFastError

    feats = columns(model64, 2, 0)
    for cls in (FusedMultipleNegativesRankingLoss, FusedCachedMultipleNegativesRankingLoss):
        loss = cls(model64)
        for given, message in [(["a cat", "a dog"], r"sentence_features must hold one dict of model inputs per "
                                                    r"column .*got str at column 0 \(anchor\)"),
                               (dict(feats[0]), r"sentence_features must be a list of columns .*got dict")]:
            with pytest.raises(TypeError, match=f"^{cls.__name__}: {message}") as e:
                loss(given, None)
            assert isinstance(e.value, LlaveFastError)
        with pytest.raises(ValueError, match=rf"^{cls.__name__} was built with model=None"):
            cls(None)(feats, None)
    # columns of other lengths: the cached loss read 2 + 6 negatives beside 4 anchors as two whole columns
    ragged = [model64.preprocess(sentences(n, seed=k)) for k, n in enumerate((4, 4, 2, 6))]
    for loss, message in ((FusedCachedMultipleNegativesRankingLoss(model64, mini_batch_size=2),
                           r"column 2 \(hard negative column 1\) of sentence_features holds 2 samples but column 0 "
                           r"\(anchor\) holds 4"),
                          (FusedMultipleNegativesRankingLoss(model64),
                           r"embeddings\[2\] \(hard negative column 1\) has shape \(2, 32\)")):
        with pytest.raises(ValueError, match=message):
            loss(ragged, None)


# --------------------------------------------------------------------------- across ranks


def _rank_cases():
    return [
        (DIRECTIONS[1], "per_direction", "in_batch_negatives", 9.0, 2),
        (DIRECTIONS[1], "joint", "hard_negatives", 9.0, 1),
        (DIRECTIONS[0], "joint", "all_negatives", 9.0, 2),
        (DIRECTIONS[1], "per_direction", None, 0.0, 0),
        (DIRECTIONS[1], "per_direction", "all_negatives", 9.0, 1),
    ]


def check_gather_across_devices(rank, world, cases):
    """Each rank: its slice of one global batch; sentence-transformers' gathered loss vs ours."""
    B, d = 4, 10
    for dirs, part, hm, a, n_neg in cases:
        embs = _embeddings(B * world, d, n_neg, seed=17)
        local = [x.detach()[rank * B:(rank + 1) * B].clone().requires_grad_() for x in embs]
        kw = dict(_kw(dirs, part, hm, a), gather_across_devices=True)
        want = MultipleNegativesRankingLoss(None, **kw).compute_loss_from_embeddings(local, None)
        g_want = torch.autograd.grad(want, local)
        got = FusedMultipleNegativesRankingLoss(None, **kw).compute_loss_from_embeddings(local, None)
        g_got = torch.autograd.grad(got, local)
        assert abs(got.item() - want.item()) < 1e-10, (rank, dirs, part, hm, got.item(), want.item())
        for x, y in zip(g_got, g_want):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_gather_across_devices_two_ranks():
    from llave_fast.testing import spawn_ranks

    import test_st_equivalence as this

    spawn_ranks(this.check_gather_across_devices, 2, _rank_cases())
