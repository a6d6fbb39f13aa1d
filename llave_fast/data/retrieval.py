"""The retrieval evaluation of a record dataset: every query against every distinct target
(:class:`RetrievalSet`, built by :func:`retrieval_candidates`), scored as precision@1 overall, per
subset, and per task as MMEB scores each dataset on its own."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgument

__all__ = ["RetrievalSet", "retrieval_candidates", "task_name"]


@dataclass
class RetrievalSet:
    """Every query of a split against every distinct target of that split.

    Candidates are the split's targets deduplicated by ``target_id``, so each query has
    exactly one correct candidate (``positive[q]``) and a retrieved candidate is correct
    exactly when it has the query's ``target_id``. Chance precision@1 is ``1 / C``.
    """

    query_texts: list[str]
    query_images: list  # PIL.Image.Image | None
    query_subsets: list[str]
    cand_texts: list[str]
    cand_images: list  # PIL.Image.Image | None
    cand_ids: list[str]  # target_id of each candidate (unique)
    positive: torch.Tensor  # (Q,) int64 index into the candidates

    @property
    def num_queries(self) -> int:
        return len(self.query_texts)

    @property
    def num_candidates(self) -> int:
        return len(self.cand_texts)

    @property
    def chance(self) -> float:
        return 1.0 / max(self.num_candidates, 1)

    def _hits(self, scores: torch.Tensor) -> torch.Tensor:
        if tuple(scores.shape) != (self.num_queries, self.num_candidates):
            raise InvalidArgument(
                f"scores must be (num_queries, num_candidates) = ({self.num_queries}, {self.num_candidates}), "
                f"got {tuple(scores.shape)}"
            )
        return scores.argmax(dim=1).cpu() == self.positive

    def precision_at_1(self, scores: torch.Tensor) -> float:
        """Fraction of queries whose top-scored candidate is their target; ``scores`` is (Q, C)."""
        return _fraction(self._hits(scores)) if self.num_queries else 0.0

    def precision_at_1_by_subset(self, scores: torch.Tensor) -> dict[str, float]:
        hits = self._hits(scores)
        out = {}
        for subset in sorted(set(self.query_subsets)):
            mask = torch.tensor([s == subset for s in self.query_subsets])
            out[subset] = _fraction(hits[mask])
        return out

    def precision_at_1_by_task(self, scores: torch.Tensor) -> dict[str, dict]:
        """Per task, as MMEB scores each dataset on its own: a task's queries against only the
        distinct targets of that task's queries (an image->text query never competes with
        VQA answers or t2i images). Returns ``{task: {"p_at_1", "chance", "num_queries",
        "num_candidates"}}``, chance being ``1 / num_candidates`` of that task; the task of
        a query is its subset (``synthetic_i2t`` -> ``i2t``; an MMEB-train subset keeps its name)."""
        out = {}
        for task, (rows, cols, top) in self.top1_by_task(scores).items():
            hit = top == self.positive[rows]
            out[task] = {"p_at_1": _fraction(hit), "chance": 1.0 / len(cols),
                         "num_queries": len(rows), "num_candidates": len(cols)}
        return out

    def top1_by_task(self, scores: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """What :meth:`precision_at_1_by_task` scores, query by query: ``{task: (rows, cols, top)}``,
        ``rows`` the task's query indices (ascending), ``cols`` its candidates (the distinct targets of
        those queries, ascending candidate indices) and ``top[k]`` the candidate index query
        ``rows[k]`` retrieves among ``cols`` (a hit when it is ``positive[rows[k]]``)."""
        self._hits(scores)  # checks the shape
        out = {}
        tasks = [task_name(s) for s in self.query_subsets]
        for task in sorted(set(tasks)):
            rows = torch.tensor([q for q, t in enumerate(tasks) if t == task], dtype=torch.int64)
            cols = torch.unique(self.positive[rows])  # sorted candidate indices of this task's targets
            sub = scores.cpu()[rows][:, cols]
            out[task] = (rows, cols, cols[sub.argmax(dim=1)])
        return out

    def precision_at_1_from_embeddings(self, query_emb: torch.Tensor, cand_emb: torch.Tensor) -> float:
        """Precision@1 of embeddings (Q, d) against (C, d) by dot product (cosine if normalised)."""
        return self.precision_at_1(query_emb.float() @ cand_emb.float().t())


def _fraction(hits: torch.Tensor) -> float:
    """The share of true entries, as the exact ratio of two ints (a float32 mean wrote 0.3333333432674408)."""
    return int(hits.sum()) / hits.numel()


def task_name(subset: str) -> str:
    """The task a query's subset names: ``synthetic_vqa`` -> ``vqa``; other subsets (MMEB-train's) as they are."""
    return subset[len("synthetic_"):] if subset.startswith("synthetic_") else subset


def retrieval_candidates(dataset, limit: int | None = None) -> RetrievalSet:
    """Build the retrieval evaluation of any record dataset (its first ``limit`` items)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    q_texts, q_images, q_subsets, c_texts, c_images, c_ids, positive = [], [], [], [], [], [], []
    index: dict[str, int] = {}
    for i in range(n):
        r = dataset[i]
        q_texts.append(r["qry"])
        q_images.append(r["qry_image"])
        q_subsets.append(r["subset"])
        tid = r["target_id"]
        if tid not in index:
            index[tid] = len(c_ids)
            c_texts.append(r["pos_text"])
            c_images.append(r["pos_image"])
            c_ids.append(tid)
        positive.append(index[tid])
    return RetrievalSet(q_texts, q_images, q_subsets, c_texts, c_images, c_ids, torch.tensor(positive, dtype=torch.int64))
