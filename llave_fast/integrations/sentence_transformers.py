"""sentence-transformers' (multiple negatives) ranking losses, computed by llave-fast's fused loss.

``FusedMultipleNegativesRankingLoss`` and ``FusedCachedMultipleNegativesRankingLoss`` take the
constructor arguments of sentence-transformers' ``MultipleNegativesRankingLoss`` and
``CachedMultipleNegativesRankingLoss`` (6.3) and the same inputs: (anchor, positive) pairs or
(anchor, positive, negative_1, ..., negative_n) tuples. They return sentence-transformers'
numbers (loss and gradients, to float rounding) without its B x N score matrices: the loss is
``llave_fast.hardness_weighted_loss`` on the unit-normalised embeddings (cosine similarity),
and the cached one encodes through ``llave_fast.GradCache`` (``defer_backward=True``: the
trainer's ``loss.backward()`` runs the cached re-encode).

How sentence-transformers' arguments map onto the fused loss (``s`` = scale, ``a`` =
hardness_strength; sentence-transformers adds the hardness term ``a * sg(cos)`` to
query_to_doc logits only):

* the hardness alpha of in-batch candidates (other anchors' positives and hard negatives):
  ``a`` for hardness_mode "in_batch_negatives" and "all_negatives", else 0; of an anchor's own
  hard negatives: ``a`` for "hard_negatives" and "all_negatives", else 0;
* query_to_doc alone: one one-way call (``symmetric=False``) with the hard negatives as
  ``negatives=``;
* query_to_doc + doc_to_query, partition_mode "per_direction", and both alphas 0 (no hardness):
  one symmetric call: the fused loss's (L_q2t + L_t2q) / 2 is sentence-transformers' average
  of the two directions;
* otherwise two one-way calls, reduction "none": query_to_doc with its alpha, doc_to_query
  (each positive against every anchor) with alpha 0; "per_direction" averages the two per-row
  losses, "joint" (one softmax over both rows, the positive counted in each) is
  ``logaddexp(L_q2d, L_d2q)`` per row, since both rows share the positive's logit;
* where an anchor's own hard negatives take another alpha than its in-batch candidates
  ("in_batch_negatives" or "hard_negatives" with hard negatives and a > 0), the fused call
  leaves them out (``target_ids``: each negative carries its anchor's id) and their B x n
  logits are added row by row: ``logaddexp(L_masked, logsumexp(own logits) - s * S_ii)``;
* ``gather_across_devices=True``: ``distributed=True`` (LLaVE's per-rank local loss: this
  rank's anchors against every rank's documents, this rank's positives against every rank's
  anchors, gradients through the gather), which is what sentence-transformers computes.

``symmetric_hardness=True`` (llave-fast's own argument, not sentence-transformers'): the
hardness term is added to the doc_to_query logits too, as LLaVE's loss does: with
directions ("query_to_doc", "doc_to_query"), "per_direction" and "in_batch_negatives" (no hard
negatives) or "all_negatives", this is LLaVE's symmetric loss
(``llave_fast.reference.reference_loss``), in one fused call.

Directions "query_to_query" and "doc_to_doc" have no fused form: the loss falls back to
sentence-transformers' own computation (a ``FusedLossFallbackWarning``, once per loss object).
Only cosine similarity is computed (``similarity_fct=sentence_transformers.util.cos_sim``);
any other ``similarity_fct`` is refused.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InvalidArgument, InvalidArgumentType, MissingDependency

try:
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )
    from sentence_transformers.util import cos_sim
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise MissingDependency(
        "llave_fast.integrations.sentence_transformers needs sentence-transformers 6.3: "
        f'pip install "llave-fast[st]" ({type(exc).__name__}: {exc})'
    ) from exc

from .._checks import BACKENDS
from ..gradcache import GradCache
from ..loss import hardness_weighted_loss

__all__ = [
    "FusedMultipleNegativesRankingLoss",
    "FusedCachedMultipleNegativesRankingLoss",
    "FusedLossFallbackWarning",
    "fused_mnrl_loss",
]

logger = logging.getLogger(__name__)

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
FUSED_DIRECTIONS = ("query_to_doc", "doc_to_query")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")

_LLAVE_CITATION = """
@article{lan2025llave,
    title={LLaVE: Large Language and Vision Embedding Models with Hardness-Weighted Contrastive Learning},
    author={Lan, Zhibin and Niu, Liqiang and Meng, Fandong and Zhou, Jie and Su, Jinsong},
    journal={arXiv preprint arXiv:2503.04812},
    year={2025}
}
"""


class FusedLossFallbackWarning(UserWarning):
    """A configuration the fused loss cannot compute exactly: sentence-transformers' own code runs."""


# --------------------------------------------------------------------------- arguments


def _is_real(x) -> bool:
    """A real number, numpy's scalars included (sentence-transformers takes them); not a bool
    (numpy's bool is no ``numbers.Real``)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_scale(scale) -> float:
    if not _is_real(scale):
        raise InvalidArgumentType(f"scale must be a positive finite number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale) or not scale > 0:
        raise InvalidArgument(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)


def _check_count(name: str, value, optional: bool = False) -> int | None:
    """A positive int (numpy's integers too, as sentence-transformers takes them), or None if ``optional``."""
    if value is None and optional:
        return None
    what = "a positive int" + (" or None" if optional else "")
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < 1:
        raise InvalidArgument(f"{name} must be {what}, got {value!r}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be True or False, got {value!r}")
    return value


def _check_directions(directions, partition_mode) -> tuple[str, ...]:
    if isinstance(directions, str) or not isinstance(directions, (tuple, list)):
        raise InvalidArgumentType(f"directions must be a tuple of direction names {DIRECTIONS}, got {directions!r}")
    directions = tuple(directions)
    if not directions:
        raise InvalidArgument("directions must name at least one direction, got ()")
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise InvalidArgument(f"directions: {bad} are not directions; valid: {DIRECTIONS} (got directions={directions!r})")
    if "query_to_doc" not in directions:
        raise InvalidArgument(f"directions must include 'query_to_doc' (it holds the positive pair), got {directions!r}")
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise InvalidArgument(
            "partition_mode='per_direction' needs the positive in every direction's candidates; "
            f"'query_to_query' and 'doc_to_doc' have none (got directions={directions!r}): use partition_mode='joint'"
        )
    return directions


def _check_hardness(hardness_mode, hardness_strength, note: bool = False) -> float:
    if hardness_mode not in HARDNESS_MODES:
        raise InvalidArgument(f"hardness_mode must be one of {HARDNESS_MODES}, got {hardness_mode!r}")
    if not _is_real(hardness_strength):
        raise InvalidArgumentType(f"hardness_strength must be a finite number >= 0, got "
                                  f"{type(hardness_strength).__name__} {hardness_strength!r}")
    if not math.isfinite(hardness_strength) or hardness_strength < 0:
        raise InvalidArgument(f"hardness_strength must be a finite number >= 0, got {hardness_strength!r}")
    if note and hardness_mode is not None and hardness_strength == 0:
        logger.warning(f"hardness_mode={hardness_mode!r} with hardness_strength=0: no hardness weighting is applied")
    return float(hardness_strength)


def _check_symmetric_hardness(symmetric_hardness, directions, hardness_mode) -> bool:
    _check_bool("symmetric_hardness", symmetric_hardness)
    if not symmetric_hardness:
        return False
    if "doc_to_query" not in directions:
        raise InvalidArgument(
            "symmetric_hardness=True adds the hardness term to the doc_to_query logits: directions must include "
            f"'doc_to_query', got directions={directions!r}"
        )
    extra = set(directions) - set(FUSED_DIRECTIONS)
    if extra:
        raise InvalidArgument(
            f"symmetric_hardness=True is computed by the fused loss only, and directions {sorted(extra)} are not "
            f"(they fall back to sentence-transformers' computation, which has no such option); got directions={directions!r}"
        )
    if hardness_mode not in ("in_batch_negatives", "all_negatives"):
        raise InvalidArgument(
            "symmetric_hardness=True weights doc_to_query's in-batch candidates like query_to_doc's: it needs "
            f"hardness_mode 'in_batch_negatives' or 'all_negatives', got hardness_mode={hardness_mode!r}"
        )
    return True


def _is_cosine(similarity_fct) -> bool:
    if similarity_fct is cos_sim:
        return True
    # ``model.similarity`` of a model whose similarity function is cosine
    owner = getattr(similarity_fct, "__self__", None)
    if getattr(similarity_fct, "__name__", None) == "similarity" and owner is not None:
        name = getattr(owner, "similarity_fn_name", None)
        return str(getattr(name, "value", name)) == "cosine"
    return False


def _check_similarity(similarity_fct):
    if not _is_cosine(similarity_fct):
        name = getattr(similarity_fct, "__qualname__", None) or type(similarity_fct).__name__
        raise InvalidArgument(
            "similarity_fct must be sentence_transformers.util.cos_sim (cosine similarity, the only one the fused loss "
            f"computes), got {name!r}; for another similarity use sentence-transformers' own "
            "MultipleNegativesRankingLoss / CachedMultipleNegativesRankingLoss"
        )
    return similarity_fct


# --------------------------------------------------------------------------- the loss on embeddings


def _alphas(hardness_mode, hardness_strength, symmetric_hardness) -> tuple[float, float, float]:
    """(alpha of in-batch query_to_doc candidates, alpha of an anchor's own hard negatives,
    alpha of doc_to_query candidates)."""
    a = float(hardness_strength) if hardness_mode is not None else 0.0
    a_in = a if hardness_mode in ("in_batch_negatives", "all_negatives") else 0.0
    a_own = a if hardness_mode in ("hard_negatives", "all_negatives") else 0.0
    return a_in, a_own, (a_in if symmetric_hardness else 0.0)


def _unit(x: Tensor) -> Tensor:
    # as sentence-transformers' cos_sim: 16-bit (and 8-bit) floats are upcast to float32 first
    if torch.is_floating_point(x) and torch.finfo(x.dtype).bits < 32:
        x = x.float()
    return F.normalize(x, p=2, dim=-1)


def _check_alike(anchor: Tensor, others, anchor_name: str = "anchor") -> None:
    """Floating-point embeddings on the anchor's device, of the dtype the anchor's is computed in (16-bit
    ones in float32, as ``cos_sim`` does): refused naming the argument the user passed (the fused loss
    would name its own arguments, query and target, or a tensor of ints would fail in the normalisation)."""
    def computed_in(x: Tensor) -> torch.dtype:
        return torch.float32 if torch.finfo(x.dtype).bits < 32 else x.dtype

    for name, x in ((anchor_name, anchor), *others):
        if x is not None and not torch.is_floating_point(x):
            raise InvalidArgumentType(f"{name} must be floating-point embeddings (float16, bfloat16, float32 or "
                                      f"float64), got dtype {x.dtype}")
    for name, x in others:
        if x is None:
            continue
        if x.device != anchor.device:
            raise InvalidArgument(f"{name} is on {x.device} but {anchor_name} is on {anchor.device}: move the "
                                  "embeddings to one device")
        if computed_in(x) != computed_in(anchor):
            raise InvalidArgumentType(
                f"{name} has dtype {x.dtype} but {anchor_name} has dtype {anchor.dtype}: cast the embeddings to one "
                "dtype (16-bit ones are computed in float32, as sentence-transformers' cos_sim does, and mix with "
                "float32)")


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fused_mnrl_loss(
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    scale: float = 20.0,
    directions: tuple[str, ...] = ("query_to_doc",),
    partition_mode: str = "joint",
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
    symmetric_hardness: bool = False,
    gather_across_devices: bool = False,
    backend: str = "auto",
) -> Tensor:
    """sentence-transformers' MultipleNegativesRankingLoss (cosine) on embeddings, by the fused loss.

    anchor, positive: (B, d) embeddings, not necessarily normalised (row i of each is a pair).
    negatives: optional (n * B, d) hard negatives, column by column as sentence-transformers
        concatenates them: rows k*B .. k*B+B-1 are the k-th hard negative of anchors 0 .. B-1.
    directions: a subset of ("query_to_doc", "doc_to_query") that includes "query_to_doc".
    Other arguments: as the loss classes (see the module docstring for the mapping).
    """
    scale = _check_scale(scale)
    _check_choice_value("partition_mode", partition_mode, PARTITION_MODES)
    directions = _check_directions(directions, partition_mode)
    extra = set(directions) - set(FUSED_DIRECTIONS)
    if extra:
        raise InvalidArgument(f"fused_mnrl_loss computes directions {FUSED_DIRECTIONS} only, got directions={directions!r} "
                         "(the loss classes fall back to sentence-transformers' computation for the others)")
    strength = _check_hardness(hardness_mode, hardness_strength)
    symmetric_hardness = _check_symmetric_hardness(symmetric_hardness, directions, hardness_mode)
    _check_choice_value("backend", backend, BACKENDS)
    _check_bool("gather_across_devices", gather_across_devices)
    for name, x in (("anchor", anchor), ("positive", positive)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InvalidArgument(f"{name} must be a (B, d) tensor of embeddings, got {got}")
    if positive.shape != anchor.shape:
        raise InvalidArgument(f"positive must have anchor's shape {tuple(anchor.shape)}, got {tuple(positive.shape)}")
    B = anchor.shape[0]
    if B == 0 or anchor.shape[1] == 0:
        what = "is an empty batch" if B == 0 else "has embeddings of width 0"
        raise InvalidArgument(f"anchor {what} (shape {tuple(anchor.shape)}): the loss needs at least one pair "
                              "of embeddings")
    if negatives is not None:
        if not isinstance(negatives, Tensor) or negatives.dim() != 2 or negatives.shape[1] != anchor.shape[1]:
            got = tuple(negatives.shape) if isinstance(negatives, Tensor) else type(negatives).__name__
            raise InvalidArgument(f"negatives must be an (n * B, {anchor.shape[1]}) tensor, got {got}")
        if negatives.shape[0] == 0:
            negatives = None
        elif negatives.shape[0] % B:
            raise InvalidArgument(
                f"negatives must hold whole columns of B = {B} hard negatives (n * B rows, column by column), "
                f"got {negatives.shape[0]} rows"
            )
    _check_alike(anchor, (("positive", positive), ("negatives", negatives)))
    a_in, a_own, a_d2q = _alphas(hardness_mode, strength, symmetric_hardness)
    rank, world = _world()
    distributed = gather_across_devices and world > 1
    q, d = _unit(anchor), _unit(positive)
    neg = None if negatives is None else _unit(negatives)
    # LLaVE's per-rank local loss across ranks (the loss's default is the global loss)
    common = dict(logit_scale=scale, backend=backend, distributed=distributed, local_loss=True)
    split_own = neg is not None and a_own != a_in
    both = "doc_to_query" in directions

    if not both and not split_own:
        return hardness_weighted_loss(q, d, alpha=a_in, symmetric=False, negatives=neg, **common)
    if both and partition_mode == "per_direction" and not split_own and a_in == a_d2q:
        # (L_q2t + L_t2q) / 2 in one sweep: sentence-transformers' per-direction average
        return hardness_weighted_loss(q, d, alpha=a_in, symmetric=True, negatives=neg, **common)
    if split_own:
        l_q2d = _q2d_own_apart(q, d, neg, scale, a_in, a_own, rank if distributed else 0, common)
    else:
        l_q2d = hardness_weighted_loss(q, d, alpha=a_in, symmetric=False, negatives=neg, reduction="none", **common)
    if not both:
        return l_q2d.mean()
    # each positive against every anchor (no hard negatives in this direction)
    l_d2q = hardness_weighted_loss(d, q, alpha=a_d2q, symmetric=False, reduction="none", **common)
    if partition_mode == "per_direction":
        return ((l_q2d + l_d2q) / 2).mean()
    # joint: one softmax over both rows; each row's loss is its log-sum-exp minus the shared positive logit
    return torch.logaddexp(l_q2d, l_d2q).mean()


def _q2d_own_apart(q, d, neg, scale, a_in, a_own, rank, common) -> Tensor:
    """Per-row query_to_doc loss where an anchor's own hard negatives take alpha ``a_own`` and every
    other candidate ``a_in``: the fused call with the own negatives masked out (each carries its
    anchor's id), plus their B x n logits, combined by log-sum-exp."""
    B = q.shape[0]
    n = neg.shape[0] // B
    ids = torch.arange(B, device=q.device, dtype=torch.int64)
    # unique across ranks: the ids are gathered with the candidates
    target_ids = torch.cat([ids, ids.repeat(n)]) + (rank << 32)
    masked = hardness_weighted_loss(q, d, alpha=a_in, symmetric=False, negatives=neg, target_ids=target_ids,
                                    reduction="none", **common)
    s_own = (neg.reshape(n, B, -1) * q.unsqueeze(0)).sum(dim=-1)  # (n, B): anchor i with its own negatives
    z_own = scale * s_own + a_own * s_own.detach()
    pos = (q * d).sum(dim=-1)
    own_term = torch.logsumexp(z_own, dim=0) - scale * pos
    return torch.logaddexp(masked.to(own_term.dtype), own_term)


def _check_choice_value(name, value, choices):
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {choices}, got {value!r}")
    return value


# --------------------------------------------------------------------------- the loss classes


class _FusedMNRLBase(nn.Module):
    """What both classes share: arguments, the fused-or-fallback choice, config and citation."""

    _twin = None  # sentence-transformers' own loss, built on the first fallback (not a child module)
    _warned = False

    def _setup(self, model, scale, similarity_fct, gather_across_devices, directions, partition_mode,
               hardness_mode, hardness_strength, symmetric_hardness, backend):
        self.model = model
        self.scale = _check_scale(scale)
        self.similarity_fct = _check_similarity(similarity_fct)
        self.gather_across_devices = _check_bool("gather_across_devices", gather_across_devices)
        self.partition_mode = _check_choice_value("partition_mode", partition_mode, PARTITION_MODES)
        self.directions = _check_directions(directions, partition_mode)
        self.hardness_mode = hardness_mode
        self.hardness_strength = _check_hardness(hardness_mode, hardness_strength, note=True)
        self.symmetric_hardness = _check_symmetric_hardness(symmetric_hardness, self.directions, hardness_mode)
        self.backend = _check_choice_value("backend", backend, BACKENDS)

    @property
    def uses_fused_loss(self) -> bool:
        """False where this configuration falls back to sentence-transformers' computation."""
        return set(self.directions) <= set(FUSED_DIRECTIONS)

    def _note_fallback(self):
        if not self._warned:
            self._warned = True
            other = sorted(set(self.directions) - set(FUSED_DIRECTIONS))
            warnings.warn(
                f"{type(self).__name__}: directions {other} have no fused form; this loss is computed by "
                "sentence-transformers' own code (same numbers, its memory and speed)",
                FusedLossFallbackWarning, stacklevel=3,
            )

    def _loss_kwargs(self) -> dict:
        return dict(scale=self.scale, directions=self.directions, partition_mode=self.partition_mode,
                    hardness_mode=self.hardness_mode, hardness_strength=self.hardness_strength,
                    symmetric_hardness=self.symmetric_hardness, gather_across_devices=self.gather_across_devices,
                    backend=self.backend)

    def _st_kwargs(self) -> dict:
        return dict(scale=self.scale, similarity_fct=self.similarity_fct,
                    gather_across_devices=self.gather_across_devices, directions=self.directions,
                    partition_mode=self.partition_mode, hardness_mode=self.hardness_mode,
                    hardness_strength=self.hardness_strength)

    def _loss_on_embeddings(self, anchor, positive, negatives=None) -> Tensor:
        return fused_mnrl_loss(anchor, positive, negatives, **self._loss_kwargs())

    def get_config_dict(self) -> dict[str, Any]:
        """The loss's arguments, as sentence-transformers writes them into a saved model's card."""
        from sentence_transformers.util import similarity_fct_name

        return {
            "scale": self.scale,
            "similarity_fct": similarity_fct_name(self.similarity_fct),
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "hardness_mode": self.hardness_mode,
            "hardness_strength": self.hardness_strength,
            "symmetric_hardness": self.symmetric_hardness,
            "backend": self.backend,
        }

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    @property
    def citation(self) -> str:
        return _LLAVE_CITATION


def _role(k: int) -> str:
    return ("anchor", "positive")[k] if k < 2 else f"hard negative column {k - 1}"


def _columns(embeddings) -> list[Tensor]:
    """``compute_loss_from_embeddings``'s columns, each a (B, d) tensor of one B and d (every column holds one row
    per anchor: columns of other lengths were concatenated and read as whole columns of B, or failed in
    ``torch.cat``), named ``embeddings[k]`` where they are not."""
    if isinstance(embeddings, (str, bytes, dict)) or not isinstance(embeddings, Iterable):
        raise InvalidArgumentType(f"embeddings must be a list of (B, d) tensors [anchor, positive, negative_1, ...], "
                                  f"got {type(embeddings).__name__}")
    embeddings = list(embeddings)
    for k, x in enumerate(embeddings):
        if not isinstance(x, Tensor) or x.dim() != 2:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise InvalidArgument(f"embeddings[{k}] ({_role(k)}) must be a (B, d) tensor of embeddings, got {got}")
        if k and x.shape != embeddings[0].shape:
            raise InvalidArgument(
                f"embeddings[{k}] ({_role(k)}) has shape {tuple(x.shape)} but embeddings[0] (anchor) has "
                f"{tuple(embeddings[0].shape)}: every column holds one (d-wide) embedding per anchor, row i of each "
                "belonging to anchor i")
    if embeddings:
        _check_alike(embeddings[0], [(f"embeddings[{k}] ({_role(k)})", x) for k, x in enumerate(embeddings) if k],
                     "embeddings[0] (anchor)")
    return embeddings


def _feature_columns(sentence_features, loss) -> list:
    """The trainer's columns, at least 2, one dict of model inputs each (``model.preprocess(texts)``): texts, or
    one dict for all, failed deep in the model's forward (an AttributeError), a loss built with ``model=None``
    (for ``compute_loss_from_embeddings``) with a TypeError."""
    name = type(loss).__name__
    if hasattr(sentence_features, "keys") or isinstance(sentence_features, (str, bytes)) \
            or not isinstance(sentence_features, Iterable):
        raise InvalidArgumentType(f"{name}: sentence_features must be a list of columns (anchor, positive[, "
                                  f"negatives]), one dict of model inputs each, got {type(sentence_features).__name__}")
    features = list(sentence_features)
    if len(features) < 2:
        raise InvalidArgument(f"{name} needs at least 2 input columns (anchor, positive[, negatives]), "
                              f"got {len(features)}")
    for k, f in enumerate(features):
        if not hasattr(f, "keys") or not hasattr(f, "__getitem__"):
            raise InvalidArgumentType(
                f"{name}: sentence_features must hold one dict of model inputs per column (what "
                f"model.preprocess(texts) or the trainer's collator gives), got {type(f).__name__} at column {k} "
                f"({_role(k)})")
    if loss.model is None:
        raise InvalidArgument(f"{name} was built with model=None, which computes compute_loss_from_embeddings "
                              "only: give it the SentenceTransformer model to train on sentence_features")
    return features


def _embed_columns(model, features: list) -> list[Tensor]:
    """Every column's embeddings, as sentence-transformers' MultipleNegativesRankingLoss embeds them."""
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # another layout: one forward per column
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


class FusedMultipleNegativesRankingLoss(_FusedMNRLBase):
    """sentence-transformers' ``MultipleNegativesRankingLoss``, computed by llave-fast's fused loss.

    Arguments as sentence-transformers' (6.3): ``model``, ``scale`` (20), ``similarity_fct``
    (cosine only), ``gather_across_devices``, ``directions``, ``partition_mode``,
    ``hardness_mode``, ``hardness_strength``; and llave-fast's own, keyword-only:
    ``symmetric_hardness`` (LLaVE's weighting of the doc_to_query logits too, see the module
    docstring) and ``backend`` ("auto": Triton kernels on CUDA, the chunked PyTorch path
    elsewhere). Inputs: (anchor, positive[, negative_1, ...]) columns, labels unused.
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct=cos_sim,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        *,
        symmetric_hardness: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self._setup(model, scale, similarity_fct, gather_across_devices, directions, partition_mode,
                    hardness_mode, hardness_strength, symmetric_hardness, backend)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """The loss of one batch: the model's features of its (anchor, positive[, negative_1, ...])
        columns, as sentence-transformers' trainer passes them; ``labels`` is unused."""
        features = _feature_columns(sentence_features, self)
        return self.compute_loss_from_embeddings(_embed_columns(self.model, features), labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The loss of already computed column embeddings ``[anchor, positive, negative_1, ...]``, each (B, d)."""
        embeddings = _columns(embeddings)
        if len(embeddings) < 2:
            raise InvalidArgument(f"embeddings must hold at least 2 columns (anchor, positive[, negatives]), "
                             f"got {len(embeddings)}")
        if not self.uses_fused_loss:
            self._note_fallback()
            return self._st_loss().compute_loss_from_embeddings(list(embeddings), labels)
        anchor, positive, *negatives = embeddings
        return self._loss_on_embeddings(anchor, positive, torch.cat(negatives) if negatives else None)

    def _st_loss(self) -> MultipleNegativesRankingLoss:
        if self._twin is None:
            # not a child module: nothing of it is saved, moved or overridden by a trainer
            object.__setattr__(self, "_twin", MultipleNegativesRankingLoss(self.model, **self._st_kwargs()))
        for k, v in self._st_kwargs().items():
            setattr(self._twin, k, v)
        return self._twin


class _Columns(list):
    """The hard-negative columns of one batch (a list of feature dicts), split column by column."""


class _Encoder:
    """``encoder(features) -> sentence embeddings`` for GradCache; exposes a DDP model's ``no_sync``
    (GradCache then skips the gradient reduction on all chunks but the last)."""

    def __init__(self, model):
        from ..gradcache import _is_deepspeed_engine

        if _is_deepspeed_engine(model):  # the trainer put its engine in loss.model: GradCache's own refusal
            raise InvalidArgument(
                "FusedCachedMultipleNegativesRankingLoss runs its re-encode inside the trainer's backward, but a "
                "DeepSpeed engine needs engine.backward for every mini-batch: train this loss without DeepSpeed, "
                f"or use FusedMultipleNegativesRankingLoss (got model {type(model).__name__})")
        self.model = model
        if hasattr(model, "no_sync"):
            self.no_sync = model.no_sync

    def __call__(self, features):
        return self.model(features)["sentence_embedding"]


class FusedCachedMultipleNegativesRankingLoss(_FusedMNRLBase):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss``: the fused loss through
    llave-fast's ``GradCache``.

    Arguments as sentence-transformers' (6.3): those of ``FusedMultipleNegativesRankingLoss``
    plus ``mini_batch_size`` (samples per forward with grad), ``mini_batch_num_tokens`` (pack
    mini-batches by token count instead) and ``show_progress_bar``. Every column is encoded in
    mini-batches without grad, the loss and its embedding gradients are computed once on the
    whole batch, and the returned loss's backward (the trainer's) re-encodes each mini-batch
    with grad under its recorded RNG state and backpropagates the cached gradient, as
    sentence-transformers' own cached loss does. When the whole batch (every column) fits one
    mini-batch of ``mini_batch_size`` samples, GradCache's single pass encodes once with grad
    instead (same numbers, one forward fewer).
    """

    def __init__(
        self,
        model,
        scale: float = 20.0,
        similarity_fct=cos_sim,
        mini_batch_size: int = 32,
        mini_batch_num_tokens: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        *,
        symmetric_hardness: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self._setup(model, scale, similarity_fct, gather_across_devices, directions, partition_mode,
                    hardness_mode, hardness_strength, symmetric_hardness, backend)
        self.mini_batch_size = _check_count("mini_batch_size", mini_batch_size)
        self.mini_batch_num_tokens = _check_count("mini_batch_num_tokens", mini_batch_num_tokens, optional=True)
        self.show_progress_bar = _check_bool("show_progress_bar", show_progress_bar)
        self.last_pass: str | None = None  # GradCache's path in the last forward: "single" or "cached"
        try:
            from sentence_transformers.base.losses.gradcache import has_static_embedding_input
        except ImportError:  # pragma: no cover - another layout
            has_static_embedding_input = None
        if has_static_embedding_input is not None and model is not None and has_static_embedding_input(model):
            raise InvalidArgument(
                f"{type(self).__name__} splits every input column into mini-batches, which a model built on a "
                "StaticEmbedding cannot take (its inputs have no batch dimension); got such a model: use "
                "FusedMultipleNegativesRankingLoss instead"
            )

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """The loss of one batch (its columns' features; ``labels`` unused): every column encoded in
        mini-batches without grad; the returned loss's backward re-encodes them with grad."""
        features = _feature_columns(sentence_features, self)
        if not self.uses_fused_loss:
            self._note_fallback()
            return self._st_loss()(features, labels)
        _refuse_output_wrappers(self.model, type(self).__name__)
        encoder = _Encoder(self.model)
        cache = GradCache(
            encoder, self._loss_on_grad_cache, self.mini_batch_size, split=self._split, count=_sample_count,
            progress=self.show_progress_bar, defer_backward=True,
            # packed by tokens, a mini-batch's sample count says nothing about its memory
            single_pass=self.mini_batch_num_tokens is None,
        )
        counts = [_sample_count(f) for f in features]
        if any(c != counts[0] for c in counts):  # as compute_loss_from_embeddings refuses their embeddings
            k = next(k for k, c in enumerate(counts) if c != counts[0])
            raise InvalidArgument(
                f"{type(self).__name__}: column {k} ({_role(k)}) of sentence_features holds {counts[k]} samples but "
                f"column 0 (anchor) holds {counts[0]}: every column holds one sample per anchor (columns of 2 and 6 "
                "hard negatives beside 4 anchors were read as two whole columns)")
        negatives = _Columns(features[2:]) if len(features) > 2 else None
        loss = cache(features[0], features[1], negatives)
        self.last_pass = cache.last_pass  # "single" when the whole batch fits one mini-batch: no re-encode
        return loss

    def _loss_on_grad_cache(self, anchor, positive, negatives=None):
        return self._loss_on_embeddings(anchor, positive, negatives)

    def _split(self, inputs, chunk_size):
        if isinstance(inputs, _Columns):  # hard negatives: each column's mini-batches, column after column
            return [chunk for column in inputs for chunk in self._split(column, chunk_size)]
        from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges

        return [_create_minibatch(inputs, begin, end)
                for begin, end in _minibatch_ranges(inputs, chunk_size, self.mini_batch_num_tokens)]

    def _st_loss(self) -> CachedMultipleNegativesRankingLoss:
        if self._twin is None:
            twin = CachedMultipleNegativesRankingLoss(
                self.model, mini_batch_size=self.mini_batch_size, mini_batch_num_tokens=self.mini_batch_num_tokens,
                show_progress_bar=self.show_progress_bar, **self._st_kwargs())
            object.__setattr__(self, "_twin", twin)
        self._twin.model = self.model  # a trainer may have put a wrapped (DDP) model into this loss
        for k, v in self._st_kwargs().items():
            setattr(self._twin, k, v)
        self._twin.mini_batch_size = self.mini_batch_size
        self._twin.mini_batch_num_tokens = self.mini_batch_num_tokens
        self._twin.show_progress_bar = self.show_progress_bar
        return self._twin

    def get_config_dict(self) -> dict[str, Any]:
        """The loss's arguments (with the mini-batch sizes), as sentence-transformers writes them into a model card."""
        out = super().get_config_dict()
        out.update(mini_batch_size=self.mini_batch_size, mini_batch_num_tokens=self.mini_batch_num_tokens)
        return out


#: the forward wrappers sentence-transformers' MatryoshkaLoss and AdaptiveLayerLoss put on the model (and its
#: first module) while their inner loss runs: they change or cache the embeddings between the cached loss's
#: two passes, so the re-encode would not reproduce the first pass
_OUTPUT_WRAPPERS = {"ForwardDecorator": "MatryoshkaLoss or AdaptiveLayerLoss",
                    "TransformerDecorator": "AdaptiveLayerLoss"}


def _refuse_output_wrappers(model, loss_name: str) -> None:
    """Refuse a model whose forward (or its first module's) a sentence-transformers wrapper loss replaced
    (README: not supported; it crashed in the re-encode, or worked only when the batch took the single pass)."""
    inner = getattr(model, "module", model)  # a DDP-wrapped model's own
    mods = [model, inner] + ([inner[0]] if isinstance(inner, nn.Sequential) and len(inner) else [])
    for m in mods:
        fwd = getattr(m, "__dict__", {}).get("forward")  # set on the instance, over the class's forward
        wrapper = _OUTPUT_WRAPPERS.get(type(fwd).__name__) if fwd is not None else None
        if wrapper:
            raise InvalidArgument(
                f"{loss_name} is wrapped by sentence-transformers' {wrapper} (the model's forward is its "
                f"{type(fwd).__name__}), which drives a cached loss's internals and is not supported here: put "
                "FusedMultipleNegativesRankingLoss inside the wrapper, or use sentence-transformers' "
                "CachedMultipleNegativesRankingLoss")


def _sample_count(chunk) -> int:
    from sentence_transformers.base.losses.gradcache import _get_batch_size

    return int(_get_batch_size(chunk))
