"""A Hugging Face ``Trainer`` recipe: contrastive training with ``FusedHardnessLoss``.

::

    from transformers import AutoModel, AutoTokenizer, TrainingArguments
    from llave_fast.integrations.hf_trainer import DualEncoder, FusedContrastiveTrainer, TextPairCollator

    tok = AutoTokenizer.from_pretrained(path)
    model = DualEncoder(AutoModel.from_pretrained(path))                  # one shared encoder
    # model = DualEncoder(AutoModel.from_pretrained(q), AutoModel.from_pretrained(t))  # two towers
    trainer = FusedContrastiveTrainer(
        model=model, args=TrainingArguments(output_dir, remove_unused_columns=False, ...),
        train_dataset=rows,                                   # dicts {"query": str, "target": str[, "negative": str]}
        data_collator=TextPairCollator(tok, negative_key="negative"),
        logit_scale=50.0, alpha=9.0,                          # LLaVE's loss
    )
    trainer.train()

``FusedContrastiveTrainer.compute_loss`` encodes the queries, targets (and hard negatives) of
the batch and returns ``FusedHardnessLoss`` of them. Across ranks (``torchrun``; the Trainer
wraps the model in DDP) the loss is built with ``local_loss=True, distributed=True`` over the
ranks of ``torch.distributed``: every rank's queries are scored against the
targets of the whole global batch, each rank gets LLaVE's per-rank local loss, gradients flow
through the gather, and DDP's average makes the step the global batch's.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..loss import FusedHardnessLoss
from ..errors import InvalidArgument, InvalidArgumentType, MissingDependency, MissingKey

__all__ = ["DualEncoder", "FusedContrastiveTrainer", "TextPairCollator"]

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - the [train] extra is missing
    raise MissingDependency('llave_fast.integrations.hf_trainer needs transformers: pip install "llave-fast[train]"') from exc


POOLINGS = ("mean", "cls", "last")


class DualEncoder(nn.Module):
    """Query and target encoders (one shared module, or two towers) with pooling.

    query_encoder: a transformers model (or any module returning ``last_hidden_state``).
    target_encoder: a second tower for the targets (and hard negatives); default (or the query
        encoder itself): the query encoder, shared and registered once.
    pooling: "mean" (over the attention mask), "cls" (first token), "last" (last unpadded
        token, for decoder models, padded on either side), or a callable ``pool(hidden, attention_mask)``.
    normalize: L2-normalise the embeddings (LLaVE scores cosine similarities).
    """

    def __init__(self, query_encoder: nn.Module, target_encoder: nn.Module | None = None, *,
                 pooling: str | Callable = "mean", normalize: bool = True):
        super().__init__()
        if not isinstance(query_encoder, nn.Module):
            raise InvalidArgumentType(f"query_encoder must be a torch module, got {type(query_encoder).__name__}")
        if target_encoder is not None and not isinstance(target_encoder, nn.Module):
            raise InvalidArgumentType(f"target_encoder must be a torch module or None, got {type(target_encoder).__name__}")
        if not callable(pooling) and pooling not in POOLINGS:
            raise InvalidArgument(f"pooling must be one of {POOLINGS} or a callable, got {pooling!r}")
        if not isinstance(normalize, bool):
            raise InvalidArgumentType(f"normalize must be True or False, got {normalize!r}")
        self.query_encoder = query_encoder
        # None: shared (registered once; the same module passed twice is shared too, or its weights would be
        # registered under both names and a Trainer's safetensors save would refuse the shared tensors)
        self.target_encoder = None if target_encoder is query_encoder else target_encoder
        self.pooling = pooling
        self.normalize = normalize

    @property
    def shared(self) -> bool:
        return self.target_encoder is None

    def _pool(self, hidden: Tensor, mask: Tensor | None) -> Tensor:
        if callable(self.pooling):
            return self.pooling(hidden, mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            if mask is None:
                return hidden[:, -1]
            # the last position the mask keeps, whichever side the tokenizer pads (left-padded decoders
            # included: there it is the final column, not the count of kept tokens minus one)
            keep = mask.ne(0)
            cols = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
            last = torch.where(keep, cols, torch.zeros_like(cols)).amax(dim=1).to(hidden.device)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        if mask is None:
            return hidden.mean(dim=1)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)

    def encode(self, inputs: dict, side: str = "query") -> Tensor:
        """Pooled (and, with ``normalize``, unit) embeddings (B, d) of tokenised ``inputs`` by the
        ``side`` ("query" or "target") encoder."""
        if side not in ("query", "target"):
            raise InvalidArgument(f"side must be 'query' or 'target', got {side!r}")
        if not isinstance(inputs, dict) and not hasattr(inputs, "keys"):
            raise InvalidArgumentType(f"inputs must be a dict of model inputs (input_ids, attention_mask, ...), "
                            f"got {type(inputs).__name__}")
        enc = self.query_encoder if side == "query" or self.target_encoder is None else self.target_encoder
        out = enc(**inputs)
        hidden = out["last_hidden_state"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
        emb = self._pool(hidden, inputs.get("attention_mask"))
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def forward(self, query: dict | None = None, target: dict | None = None, negatives: dict | None = None) -> dict:
        """Embeddings of whichever sides are given: {"query": (B, d), "target": (B, d), "negatives": (M, d)}."""
        out = {}
        if query is not None:
            out["query"] = self.encode(query, "query")
        if target is not None:
            out["target"] = self.encode(target, "target")
        if negatives is not None:
            out["negatives"] = self.encode(negatives, "target")
        return out


class TextPairCollator:
    """Rows ``{query_key: str, target_key: str[, negative_key: str or list of str]}`` -> tokenised
    ``{"query": ..., "target": ...[, "negatives": ...]}`` for ``DualEncoder`` (a row's hard
    negatives, one or several, all go into one "negatives" batch). With ``negative_key`` set, a
    first batch none of whose rows holds that key is refused (a misspelt key is not taken for a batch
    without negatives); once a batch has held it, rows may leave it out. A row without negatives
    holds the key with None or [] (or, after the first batch, leaves it out). A text that is not a
    str, or is empty or blank (``""``: it would be trained on as a text of no words), is refused
    naming the row and key."""

    def __init__(self, tokenizer, *, query_key: str = "query", target_key: str = "target",
                 negative_key: str | None = None, max_length: int | None = None):
        if not callable(tokenizer):
            raise InvalidArgumentType(f"tokenizer must be a tokenizer (callable on a list of texts), got "
                                      f"{type(tokenizer).__name__} {tokenizer!r:.60}")
        keys = {"query_key": query_key, "target_key": target_key, "negative_key": negative_key}
        for name, key in keys.items():
            if not isinstance(key, str) and not (name == "negative_key" and key is None):
                raise InvalidArgumentType(f"{name} must be a str{' or None' if name == 'negative_key' else ''}, got "
                                          f"{type(key).__name__} {key!r}")
        named = [(n, k) for n, k in keys.items() if k is not None]
        same = [(a, b) for i, (a, ka) in enumerate(named) for b, kb in named[i + 1:] if ka == kb]
        if same:  # a query trained against itself, or each query its own hard negative
            a, b = same[0]
            raise InvalidArgument(f"{a} and {b} are both {keys[a]!r}: the query, target and negative texts are three "
                                  "keys of a row")
        if max_length is not None:
            if not isinstance(max_length, int) or isinstance(max_length, bool):
                raise InvalidArgumentType(f"max_length must be a positive int or None, got "
                                          f"{type(max_length).__name__} {max_length!r}")
            special = getattr(tokenizer, "num_special_tokens_to_add", None)
            special = special() if callable(special) else 0
            if max_length <= special:  # 0 and 1 were ignored by the tokenizer, a count <= its special tokens
                # cut every text to those tokens alone: trained on texts of no words
                raise InvalidArgument(f"max_length must leave room for a text: more than the tokenizer's {special} "
                                      f"special token(s) it adds, got {max_length}")
        self.tokenizer = tokenizer
        self.query_key, self.target_key, self.negative_key = query_key, target_key, negative_key
        self.max_length = max_length

    def _tok(self, texts: list[str]) -> dict:
        return dict(self.tokenizer(texts, padding=True, truncation=self.max_length is not None,
                                   max_length=self.max_length, return_tensors="pt"))

    def __call__(self, rows: list[dict]) -> dict:
        """Tokenised ``{"query": ..., "target": ...[, "negatives": ...]}`` of ``rows`` (see the class docstring)."""
        if not rows:
            raise InvalidArgument("TextPairCollator: rows is empty: a batch needs at least one row")
        for key in (self.query_key, self.target_key):
            missing = [i for i, r in enumerate(rows) if key not in r]
            if missing:
                raise MissingKey(f"TextPairCollator: rows {missing[:5]} have no {key!r} (keys of row "
                               f"{missing[0]}: {sorted(rows[missing[0]])})")
        batch = {"query": self._tok([_text(r[self.query_key], i, self.query_key) for i, r in enumerate(rows)]),
                 "target": self._tok([_text(r[self.target_key], i, self.target_key) for i, r in enumerate(rows)])}
        if self.negative_key is not None:
            if any(self.negative_key in r for r in rows):
                self._negative_key_seen = True
            elif not getattr(self, "_negative_key_seen", False):  # a misspelt key would train without negatives
                raise MissingKey(f"TextPairCollator: negative_key={self.negative_key!r} is in none of the {len(rows)} "
                                 f"rows (keys of row 0: {sorted(rows[0]) if rows else []}); a row without hard "
                                 "negatives holds the key with None or []")
            negs = []
            for i, r in enumerate(rows):
                v = r.get(self.negative_key)
                if v is None or isinstance(v, str):
                    negs += [] if v is None else [_text(v, i, self.negative_key, negative=True)]
                elif isinstance(v, (list, tuple)):
                    negs += [_text(x, i, self.negative_key, negative=True, index=k) for k, x in enumerate(v)]
                else:
                    raise InvalidArgumentType(f"TextPairCollator: row {i}'s {self.negative_key!r} must be a text, a "
                                              f"list of texts, None or [], got {type(v).__name__} {v!r:.60}")
            if negs:
                batch["negatives"] = self._tok(negs)
        return batch


def _text(value, row: int, key: str, *, negative: bool = False, index: int | None = None) -> str:
    """A row's text, refused where it is none (tokenised, an empty or blank one was trained on as a text
    of no words: an empty hard negative, say, silently pulled every query away from that embedding)."""
    where = f"row {row}'s {key!r}" + ("" if index is None else f"[{index}]")
    if not isinstance(value, str):
        raise InvalidArgumentType(f"TextPairCollator: {where} must be a text, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        way_out = (f"a row without hard negatives holds None or [] under {key!r}" if negative else
                   "every query and target needs a text")
        raise InvalidArgument(f"TextPairCollator: {where} is an empty text ({value!r}), which would be trained on as "
                              f"a text of no words; {way_out}")
    return value


class FusedContrastiveTrainer(Trainer):
    """``transformers.Trainer`` whose loss is ``FusedHardnessLoss`` on a ``DualEncoder``'s embeddings.

    loss_fn: a ``FusedHardnessLoss`` to use as is (one process); default: one built on the first
        step from logit_scale, alpha and backend, across ranks with the world of torch.distributed.
        Given a ``loss_fn``, pass none of logit_scale, alpha, backend (they would be ignored: refused).
    logit_scale, alpha, backend: the loss's settings (LLaVE: 50, 9; "auto": Triton kernels on
        CUDA, the chunked PyTorch path elsewhere).
    Batches are ``{"query": inputs, "target": inputs[, "negatives": inputs]}`` (``TextPairCollator``);
    pass ``remove_unused_columns=False`` in the TrainingArguments where the collator reads a key
    that is not an argument of ``DualEncoder.forward`` (query, target, negatives): the Trainer would
    drop that column first (refused at construction for a ``TextPairCollator``).
    ``evaluate()`` reports ``eval_loss``: the same loss on the evaluation batches, without grad.
    """

    def __init__(self, *args, loss_fn: FusedHardnessLoss | None = None, logit_scale: float | None = None,
                 alpha: float | None = None, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if loss_fn is not None and not isinstance(loss_fn, FusedHardnessLoss):
            raise InvalidArgumentType(f"loss_fn must be a FusedHardnessLoss or None, got {type(loss_fn).__name__}")
        given = {k: v for k, v in (("logit_scale", logit_scale), ("alpha", alpha), ("backend", backend))
                 if v is not None}
        if loss_fn is not None and given:
            settings = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise InvalidArgument(
                f"FusedContrastiveTrainer got loss_fn={loss_fn!r} and {settings}: "
                "the loss_fn is used as is, so those settings would be ignored; set them on the loss_fn, or pass "
                "them without a loss_fn")
        self.loss_fn = loss_fn
        self._loss_settings = dict(logit_scale=50.0, alpha=9.0, backend="auto")
        self._loss_settings.update(given)
        FusedHardnessLoss(**self._loss_settings)  # checks the settings now, with the loss's own messages
        self._check_columns_kept()
        # the Trainer computes an evaluation loss only for a model with labels or one whose forward returns
        # a loss; the loss here is compute_loss's, so evaluate() must ask for it (eval_loss)
        self.can_return_loss = True

    def _check_columns_kept(self) -> None:
        """With ``remove_unused_columns`` (the Trainer's default) the Trainer drops every row key that is
        not an argument of the model's forward before the collator sees it: refuse a ``TextPairCollator``
        that reads such a key (it would otherwise fail on the first batch, blaming the rows)."""
        collator = self.data_collator
        if not (getattr(self.args, "remove_unused_columns", False) and isinstance(collator, TextPairCollator)):
            return
        model = self.model.module if hasattr(self.model, "module") else self.model
        kept = set(inspect.signature(model.forward).parameters) | {"label", "label_ids"} | set(self.label_names)
        keys = [k for k in (collator.query_key, collator.target_key, collator.negative_key) if k is not None]
        dropped = [k for k in keys if k not in kept]
        if dropped:
            raise InvalidArgument(
                f"TrainingArguments(remove_unused_columns=True) makes the Trainer drop the row keys that are not "
                f"arguments of {type(model).__name__}.forward ({', '.join(sorted(kept - {'label', 'label_ids'}))}), "
                f"but the TextPairCollator reads {', '.join(map(repr, dropped))}: pass remove_unused_columns=False")

    def fused_loss(self) -> FusedHardnessLoss:
        """The loss of this run (built once: across ranks, over the ranks of torch.distributed). A given
        ``loss_fn`` that is not distributed, across ranks, is used as is with a warning (once): each rank's
        queries then see only that rank's targets, not the global batch the built loss would give."""
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.loss_fn is None:
            if world > 1:
                self.loss_fn = FusedHardnessLoss(**self._loss_settings, local_loss=True, distributed=True)
            else:
                self.loss_fn = FusedHardnessLoss(**self._loss_settings)
        elif world > 1 and not self.loss_fn.distributed and not getattr(self, "_warned_local", False):
            self._warned_local = True
            warnings.warn(
                f"FusedContrastiveTrainer: the loss_fn given is not distributed, but the run has {world} ranks: "
                "each rank's queries see only its own targets and negatives, not the global batch; pass "
                "FusedHardnessLoss(..., local_loss=True, distributed=True), or no loss_fn, for the global batch",
                stacklevel=2)
        return self.loss_fn

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch=None):
        """``FusedHardnessLoss`` of the batch's query, target (and hard-negative) embeddings; with
        ``return_outputs``, also the embeddings as ``DualEncoder.forward`` returns them."""
        for key in ("query", "target"):
            if key not in inputs:
                raise MissingKey(f"FusedContrastiveTrainer: a batch needs 'query' and 'target' inputs, got keys "
                               f"{sorted(inputs)} (see TextPairCollator)")
        out = model(query=inputs["query"], target=inputs["target"], negatives=inputs.get("negatives"))
        loss = self.fused_loss()(out["query"], out["target"], negatives=out.get("negatives"))
        return (loss, out) if return_outputs else loss
