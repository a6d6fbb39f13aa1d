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


def test_question_is_what_the_vqa_item_asks_and_answers():
    """``SyntheticDataset.question(i)``: the item's query is the instruction and the question, its positive the
    answer, the kind ``question_kind``'s; None for i2t and t2i items. Families and question groups too."""
    from llave_fast.data.synthetic import VQA_PREFIX

    for kw in ({}, {"hard_family_size": 3}, {"vqa_questions_per_scene": 2, "tasks": ("vqa",)}):
        ds = SyntheticDataset(18, seed=7, split="train", **kw)
        asked = 0
        for i in range(len(ds)):
            r, q = ds[i], ds.question(i)
            if r["subset"] != "synthetic_vqa":
                assert q is None, (kw, i, q)
                continue
            asked += 1
            assert (VQA_PREFIX + q[0], q[1], q[2]) == (r["qry"], r["pos_text"], ds.question_kind(i)), (kw, i, q)
        assert asked, kw


def _question_alone():
    sys.path.insert(0, str(BENCH))
    import question_alone

    return question_alone


def test_question_alone_predicts_the_commonest_answer_to_the_same_question():
    """Hand-counted: q1 asked 3 times ("a" twice), q2 twice with a tie ("c", "d"), q3 never."""
    import collections

    qa = _question_alone()
    counts = {"q1": collections.Counter({"a": 2, "b": 1}), "q2": collections.Counter({"d": 1, "c": 1})}
    got = qa.predict(counts, [("q1", "a", "count"), ("q1", "b", "count"), ("q2", "d", "colour"),
                              ("q3", "x", "size")])
    assert list(got) == ["count", "colour", "size", "all"]
    assert got["count"] == {"queries": 2, "hits": 1, "expected_hits": 1.0, "unseen": 0, "ties": 0, "p_at_1": 0.5,
                            "expected_p_at_1": 0.5}
    # the tie goes to "c" (alphabetical): a miss, half a hit in expectation
    assert (got["colour"]["hits"], got["colour"]["expected_hits"], got["colour"]["ties"]) == (0, 0.5, 1)
    assert (got["size"]["hits"], got["size"]["unseen"]) == (0, 1)
    assert got["all"] == {"queries": 4, "hits": 1, "expected_hits": 1.5, "unseen": 1, "ties": 1, "p_at_1": 0.25,
                          "expected_p_at_1": 0.375}


def test_question_alone_scores_every_heldout_vqa_query_once(tmp_path):
    """A small config: the kinds hold every VQA-style query of the held-out split the training builds, each
    with the item's kind; the file holds what main returned; rows that are not the split's items are refused."""
    from llave_fast.train import TrainConfig

    qa = _question_alone()
    cfg = TrainConfig(num_train=256, num_eval=48, seed=2, synthetic_tasks=["i2t", "t2i", "vqa", "vqa"])
    (conf := tmp_path / "small.json").write_text(json.dumps({"num_train": 256, "num_eval": 48,
                                                            "synthetic_tasks": ["i2t", "t2i", "vqa", "vqa"]}))
    written = qa.main(["--config", str(conf), "--seeds", "2", "--out", str(tmp_path / "qa.json")])
    assert json.loads((tmp_path / "qa.json").read_text()) == json.loads(json.dumps(written))
    run = written["runs"][0]
    from llave_fast.training.loading import _datasets

    train, evals = _datasets(cfg)
    rset = retrieval_candidates(evals)
    vqa_rows = [q for q, s in enumerate(rset.query_subsets) if s == "synthetic_vqa"]
    kinds = {k: v for k, v in run["vqa"].items() if k != "all"}
    assert run["vqa"]["all"]["queries"] == sum(v["queries"] for v in kinds.values()) == len(vqa_rows) > 0
    for kind, v in kinds.items():
        assert v["queries"] == sum(evals.question_kind(q) == kind for q in vqa_rows), kind
        assert 0 <= v["hits"] <= v["queries"] and v["hits"] <= v["expected_hits"] + v["ties"]
    assert run["training_vqa_items"] == sum(train.question(i) is not None for i in range(len(train)))
    rset.positive = rset.positive.roll(1)  # each query's answer read from another row's target
    with pytest.raises(InvalidArgument, match="not the split's items"):
        qa.heldout_queries(evals, rset)
