"""The VQA-style score by question kind (benchmarks/vqa_by_kind.py) and the library pieces it reads:
``SyntheticDataset.question_kind`` and ``RetrievalSet.top1_by_task``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from llave_fast.data import SyntheticDataset, retrieval_candidates
from llave_fast.data.synthetic import ANSWERS, QUESTION_KINDS
from llave_fast.errors import InvalidArgument

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("kw", [{}, {"hard_family_size": 3}, {"vqa_questions_per_scene": 2, "tasks": ("vqa",)}])
def test_question_kind_is_what_the_items_answer_names(kw):
    """Every VQA item has the kind of the question it asks (its answer is one of that kind's answers, and
    the question words say the kind); i2t and t2i items have none. Families and question groups too."""
    ds = SyntheticDataset(24, seed=5, split="eval", **kw)
    seen = set()
    for i in range(len(ds)):
        r, kind = ds[i], ds.question_kind(i)
        if r["subset"] != "synthetic_vqa":
            assert kind is None, (i, r["subset"], kind)
            continue
        assert kind in QUESTION_KINDS and r["pos_text"] in ANSWERS[kind], (i, r["qry"], r["pos_text"], kind)
        word = {"count": "how many", "colour": "colo", "shape": "what shape", "size": "size", "position": "where"}
        assert word[kind] in r["qry"], (i, r["qry"], kind)
        seen.add(kind)
    assert len(seen) >= 2, seen  # a family asks about colour, shape or size
    assert ds.question_kind(-1) == ds.question_kind(len(ds) - 1)


def test_top1_by_task_is_what_precision_at_1_by_task_scores():
    rset = retrieval_candidates(SyntheticDataset(30, seed=2, split="eval", image_size=32))
    scores = torch.randn(rset.num_queries, rset.num_candidates, generator=torch.Generator().manual_seed(0))
    scores[torch.arange(0, rset.num_queries, 3), rset.positive[::3]] += 10  # some hits
    tops, by_task = rset.top1_by_task(scores), rset.precision_at_1_by_task(scores)
    assert set(tops) == set(by_task) == {"i2t", "t2i", "vqa"}
    assert sorted(torch.cat([rows for rows, _, _ in tops.values()]).tolist()) == list(range(rset.num_queries))
    for task, (rows, cols, top) in tops.items():
        assert bool(torch.isin(top, cols).all()) and bool(torch.isin(rset.positive[rows], cols).all())
        hits = int((top == rset.positive[rows]).sum())
        assert (hits / len(rows), len(rows), len(cols)) == (
            by_task[task]["p_at_1"], by_task[task]["num_queries"], by_task[task]["num_candidates"])


@pytest.mark.slow
def test_vqa_by_kind_reproduces_the_runs_vqa_score(tmp_path):
    """A tiny run of 4 steps: the script's kinds hold every VQA-style query of the held-out split once,
    their hits sum to the run's own VQA-style score, and a run whose eval.json says otherwise is refused."""
    from _train_workers import run_train

    from llave_fast.testing import spawn_ranks

    sys.path.insert(0, str(BENCH))
    import vqa_by_kind

    run = str(tmp_path / "run")
    spawn_ranks(run_train, 1, dict(out=run))
    with open(os.path.join(run, "eval.json")) as f:
        result = json.load(f)
    out = tmp_path / "kinds.json"
    written, (members,) = vqa_by_kind.main([run, "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(written))
    assert {"cpu_count", "usable_cores"} <= set(on_disk["machine"]["device"]) and on_disk["machine"]["load_average"]
    got = on_disk["runs"][0]["vqa"]
    vqa, kinds = result["by_task"]["vqa"], got["by_kind"]
    assert sum(k["queries"] for k in kinds.values()) == vqa["num_queries"] == got["queries"]
    assert sum(k["hits"] for k in kinds.values()) / vqa["num_queries"] == vqa["p_at_1"] == got["p_at_1"]
    rows = [q for qs in members.values() for q in qs]
    evals = SyntheticDataset(16, seed=3, split="eval")  # tiny_cfg's held-out split
    assert sorted(rows) == [i for i in range(len(evals)) if evals[i]["subset"] == "synthetic_vqa"]
    assert len(rows) == len(set(rows))
    for kind, qs in members.items():
        assert all(evals.question_kind(q) == kind for q in qs), kind
        assert kinds[kind]["queries"] == len(qs) and 0 < len(kinds[kind]["most_retrieved"]) <= 3
    # an eval.json the rebuilt scores do not give: refused, naming the run
    result["by_task"]["vqa"]["p_at_1"] += 1 / vqa["num_queries"]  # one hit more
    with open(os.path.join(run, "eval.json"), "w") as f:
        json.dump(result, f)
    with pytest.raises(InvalidArgument, match="rebuilt held-out scores"):
        vqa_by_kind.score_run(run)
