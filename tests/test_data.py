"""llave_fast.data: the synthetic dataset, the MMEB reader and the pair collator (CPU, fast).

The synthetic images are checked by pixel analysis, independently of the code that wrote
the captions: every object is a connected component of one exact palette colour, its slot
is the nearest slot centre, its size its extent, its shape from fill ratio and bottom row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from llave_fast.data import (
    IMAGE_PLACEHOLDER,
    SYNTHETIC_VOCAB,
    BadDataError,
    MMEBDataset,
    PairCollator,
    SyntheticDataset,
    stable_id,
    stable_ids,
    synthetic_eval_candidates,
    synthetic_words,
)
from llave_fast.data.synthetic import COLOUR_RGB, SLOT_CENTERS, VQA_PREFIX
from llave_fast.errors import InvalidArgument

S = 64
PHRASE_SLOT = {
    "on the left": "left",
    "on the right": "right",
    "at the top": "top",
    "at the bottom": "bottom",
    "in the center": "center",
}
COUNTS = ["one", "two", "three", "four", "five"]
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star"}


# ---------------------------------------------------------------- pixel analysis
def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a boolean mask, as lists of (y, x) (a star's tip may touch diagonally)."""
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for ny, nx in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        comps.append(comp)
    return comps


def analyse(img: Image.Image) -> set[tuple[str, str, str, str]]:
    """The objects an image shows, as {(size, colour, shape, slot)}, read from its pixels."""
    a = np.asarray(img).astype(int)
    assert a.shape == (S, S, 3)
    bg = a[0, 0]
    assert bg[0] == bg[1] == bg[2], "background must be grey"
    mask = (a != bg).any(-1)
    objects = set()
    for comp in _components(mask):
        ys = np.array([p[0] for p in comp])
        xs = np.array([p[1] for p in comp])
        colours = {tuple(a[y, x]) for y, x in comp}
        assert len(colours) == 1, f"an object must be one flat colour, got {colours}"
        (rgb,) = colours
        names = [n for n, c in COLOUR_RGB.items() if tuple(c) == rgb]
        assert names, f"colour {rgb} is not in the palette"
        cy, cx = (ys.mean() + 0.5) / S, (xs.mean() + 0.5) / S
        slot = min(SLOT_CENTERS, key=lambda s: (SLOT_CENTERS[s][0] - cx) ** 2 + (SLOT_CENTERS[s][1] - cy) ** 2)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        size = "large" if max(h, w) > 0.195 * S else "small"
        fill = len(comp) / (h * w)
        bottom = (ys == ys.max()).sum() / w
        if fill > 0.9:
            shape = "square"
        elif fill > 0.65:
            shape = "circle"
        else:
            shape = "triangle" if bottom > 0.6 else "star"
        objects.add((size, names[0], shape, slot))
    return objects


CAPTION_OBJ = re.compile(r"a (small|large) (\w+) (\w+) (on the left|on the right|at the top|at the bottom|in the center)")


def parse_caption(caption: str) -> set[tuple[str, str, str, str]]:
    objs = CAPTION_OBJ.findall(caption)
    rebuilt = [f"a {sz} {c} {sh} {ph}" for sz, c, sh, ph in objs]
    # nothing in the caption but these objects, joined by ", " and " and ", ending in "."
    assert caption == (
        rebuilt[0] + "." if len(rebuilt) == 1 else ", ".join(rebuilt[:-1]) + " and " + rebuilt[-1] + "."
    ), caption
    slots = [PHRASE_SLOT[ph] for *_, ph in objs]
    assert slots == sorted(slots, key=["top", "left", "center", "right", "bottom"].index), caption  # canonical order
    return {(sz, c, sh, PHRASE_SLOT[ph]) for sz, c, sh, ph in objs}


def answer_from_pixels(question: str, objs: set) -> str:
    """Answer a synthetic VQA question from the pixel-derived objects."""
    q = question.split(": ", 1)[1]
    by_slot = {o[3]: o for o in objs}
    if q == "how many shapes are there?":
        return COUNTS[len(objs) - 1]
    m = re.fullmatch(r"how many (\w+) shapes are there\?", q)
    if m:
        return COUNTS[sum(o[1] == m.group(1) for o in objs) - 1]
    m = re.fullmatch(r"how many (\w+) are there\?", q)
    if m:
        return COUNTS[sum(o[2] == PLURAL[m.group(1)] for o in objs) - 1]
    m = re.fullmatch(r"what colou?r is the shape (.+)\?", q)
    if m:
        return by_slot[PHRASE_SLOT[m.group(1)]][1]
    m = re.fullmatch(r"what shape is (.+)\?", q)
    if m:
        return by_slot[PHRASE_SLOT[m.group(1)]][2]
    m = re.fullmatch(r"what is the size of the shape (.+)\?", q)
    if m:
        return by_slot[PHRASE_SLOT[m.group(1)]][0]
    m = re.fullmatch(r"where is the (\w+) (\w+)\?", q)
    if m:
        (o,) = [o for o in objs if (o[1], o[2]) == (m.group(1), m.group(2))]
        return o[3]
    raise AssertionError(f"unknown question form: {q!r}")


def _fingerprint(rec) -> tuple:
    img = lambda im: None if im is None else hashlib.sha256(im.tobytes()).hexdigest()
    return (
        rec["qry"], img(rec["qry_image"]), rec["pos_text"], img(rec["pos_image"]),
        rec["neg_text"], img(rec["neg_image"]), rec["target_id"], rec["query_id"], rec["subset"], rec["row"],
    )  # fmt: skip


# ---------------------------------------------------------------- synthetic: determinism
def test_synthetic_items_deterministic_and_access_order_independent():
    a = SyntheticDataset(40, seed=3)
    b = SyntheticDataset(40, seed=3)
    forward = [_fingerprint(a[i]) for i in range(40)]
    assert [_fingerprint(a[i]) for i in range(40)] == forward  # same item twice
    backward = [_fingerprint(b[i]) for i in reversed(range(40))][::-1]
    assert backward == forward  # another instance, another access order
    assert _fingerprint(a[-1]) == forward[-1]
    with pytest.raises(IndexError):
        a[40]


def test_synthetic_seeds_and_splits_differ():
    base = [_fingerprint(r) for r in SyntheticDataset(30, seed=0)]
    other_seed = [_fingerprint(r) for r in SyntheticDataset(30, seed=1)]
    eval_split = [_fingerprint(r) for r in SyntheticDataset(30, seed=0, split="eval")]
    # images differ item by item (a different random stream), not just somewhere
    assert sum(x[1] != y[1] or x[3] != y[3] for x, y in zip(base, other_seed)) >= 28
    assert sum(x[1] != y[1] or x[3] != y[3] for x, y in zip(base, eval_split)) >= 28
    with pytest.raises(ValueError, match="split"):
        SyntheticDataset(3, split="test")


def _child_fingerprints(code: str) -> str:
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_synthetic_and_ids_identical_in_another_process():
    code = (
        "import hashlib, json\n"
        "from llave_fast.data import SyntheticDataset, PairCollator\n"
        "ds = SyntheticDataset(24, seed=5, split='eval', hard_negatives=True)\n"
        "recs = [ds[i] for i in range(24)]\n"
        "h = hashlib.sha256()\n"
        "for r in recs:\n"
        "    for k in ('qry_image', 'pos_image', 'neg_image'):\n"
        "        h.update(r[k].tobytes() if r[k] is not None else b'-')\n"
        "    h.update((r['qry'] + r['pos_text'] + (r['neg_text'] or '')).encode())\n"
        "out = PairCollator(lambda t, i: len(t), use_negatives=True)(recs)\n"
        "print(json.dumps([h.hexdigest(), out['target_ids'].tolist(), out['query_ids'].tolist(), out['negative_ids'].tolist()]))\n"
    )
    child = json.loads(_child_fingerprints(code))
    ds = SyntheticDataset(24, seed=5, split="eval", hard_negatives=True)
    recs = [ds[i] for i in range(24)]
    h = hashlib.sha256()
    for r in recs:
        for k in ("qry_image", "pos_image", "neg_image"):
            h.update(r[k].tobytes() if r[k] is not None else b"-")
        h.update((r["qry"] + r["pos_text"] + (r["neg_text"] or "")).encode())
    out = PairCollator(lambda t, i: len(t), use_negatives=True)(recs)
    assert child == [h.hexdigest(), out["target_ids"].tolist(), out["query_ids"].tolist(), out["negative_ids"].tolist()]


# ---------------------------------------------------------------- synthetic: content
def test_synthetic_task_styles():
    ds = SyntheticDataset(60, seed=0)
    by_task = {}
    for r in ds:
        by_task.setdefault(r["subset"], []).append(r)
    assert set(by_task) == {"synthetic_i2t", "synthetic_t2i", "synthetic_vqa"}
    assert all(len(v) == 20 for v in by_task.values())
    for r in by_task["synthetic_i2t"]:
        assert r["qry"].startswith(IMAGE_PLACEHOLDER) and r["qry"].endswith("what is in the image?")
        assert isinstance(r["qry_image"], Image.Image) and r["pos_image"] is None
        assert IMAGE_PLACEHOLDER not in r["pos_text"]
    for r in by_task["synthetic_t2i"]:
        assert r["qry_image"] is None and IMAGE_PLACEHOLDER not in r["qry"]
        assert isinstance(r["pos_image"], Image.Image) and r["pos_text"].startswith(IMAGE_PLACEHOLDER)
    for r in by_task["synthetic_vqa"]:
        assert isinstance(r["qry_image"], Image.Image) and r["qry"].endswith("?")
        assert r["pos_image"] is None and len(r["pos_text"].split()) == 1
    for r in ds:
        assert r["neg_text"] is None and r["neg_image"] is None and r["neg_id"] is None
        assert r["qry_image"] is None or (r["qry_image"].mode, r["qry_image"].size) == ("RGB", (S, S))
    # single-task datasets
    assert {r["subset"] for r in SyntheticDataset(6, tasks=("vqa",))} == {"synthetic_vqa"}


@pytest.mark.parametrize("split", ["train", "eval"])
def test_synthetic_captions_match_pixels(split):
    ds = SyntheticDataset(240, seed=11, split=split, tasks=("i2t", "t2i"))
    counts = Counter()
    for r in ds:
        if r["subset"] == "synthetic_i2t":
            image, caption = r["qry_image"], r["pos_text"]
        else:
            image, caption = r["pos_image"], r["qry"]
        seen, said = analyse(image), parse_caption(caption)
        assert seen == said, f"row {r['row']}: pixels show {sorted(seen)}, caption says {caption!r}"
        counts[len(said)] += 1
        counts.update(o[2] for o in said)
    # every count 1..3 and every shape occurred, so the check covered them
    assert {1, 2, 3} <= set(counts) and {"circle", "square", "triangle", "star"} <= set(counts)


def test_synthetic_vqa_answers_match_pixels():
    ds = SyntheticDataset(300, seed=2, tasks=("vqa",))
    kinds = Counter()
    for r in ds:
        objs = analyse(r["qry_image"])
        assert r["pos_text"] == answer_from_pixels(r["qry"], objs), (r["row"], r["qry"], sorted(objs))
        kinds[r["qry"].split(": ", 1)[1].split()[1]] += 1  # "many", "colour"/"color", "shape", "is"
    assert {"many", "shape", "is"} <= set(kinds) and ({"colour", "color"} & set(kinds))
    # the dominant non-background colour of a one-object image is the named colour
    one = SyntheticDataset(30, seed=4, tasks=("i2t",), max_shapes=1)
    for r in one:
        a = np.asarray(r["qry_image"]).reshape(-1, 3)
        fg = a[(a != a[0]).any(-1)]
        rgb, _ = Counter(map(tuple, fg)).most_common(1)[0]
        (name,) = [n for n, c in COLOUR_RGB.items() if c == rgb]
        assert f" {name} " in r["pos_text"]


def test_synthetic_vocabulary_closed():
    assert all(w == w.lower() for w in SYNTHETIC_VOCAB) and len(set(SYNTHETIC_VOCAB)) == len(SYNTHETIC_VOCAB)
    vocab = set(SYNTHETIC_VOCAB)
    used = Counter()
    for split in ("train", "eval"):
        for r in SyntheticDataset(300, seed=7, split=split, hard_negatives=True):
            for text in (r["qry"], r["pos_text"], r["neg_text"]):
                words = synthetic_words(text)
                assert set(words) <= vocab, f"{text!r}: {set(words) - vocab}"
                used.update(words)
    assert {"red", "star", "three", "center", "large", "?", ",", "."} <= set(used)
    assert "What" in synthetic_words(f"{IMAGE_PLACEHOLDER} What is") and "<" not in synthetic_words(IMAGE_PLACEHOLDER)


def test_synthetic_target_ids_canonical():
    ds = SyntheticDataset(300, seed=1, tasks=("vqa", "t2i"))
    by_text: dict[tuple, set] = {}
    for r in ds:
        key = (r["pos_text"], r["pos_image"] is not None and r["qry"])  # t2i: the caption names the image
        by_text.setdefault(key, set()).add(r["target_id"])
    assert all(len(ids) == 1 for ids in by_text.values())  # equal targets, equal ids
    ids = [next(iter(v)) for v in by_text.values()]
    assert len(set(ids)) == len(ids)  # different targets, different ids
    answers = Counter(r["pos_text"] for r in ds if r["subset"] == "synthetic_vqa")
    assert max(answers.values()) > 5  # duplicate answers do occur


def test_synthetic_hard_negatives():
    plain = SyntheticDataset(45, seed=9)
    hard = SyntheticDataset(45, seed=9, hard_negatives=True)
    for p, h in zip(plain, hard):
        assert _fingerprint(p)[:4] == _fingerprint(h)[:4]  # negatives change no positive
        assert h["neg_id"] != h["target_id"] and (h["neg_text"], h["neg_image"]) != (None, None)
        if h["subset"] == "synthetic_t2i":
            pos, neg = analyse(h["pos_image"]), analyse(h["neg_image"])
            assert len(pos) == len(neg) and len(pos - neg) == 1  # one object changed
        elif h["subset"] == "synthetic_i2t":
            assert len(parse_caption(h["pos_text"]) - parse_caption(h["neg_text"])) == 1
        else:
            assert h["neg_text"] != h["pos_text"] and len(h["neg_text"].split()) == 1


def test_synthetic_image_generation_speed():
    ds = SyntheticDataset(2000, seed=0)
    t0 = time.perf_counter()
    for i in range(2000):
        ds[i]
    per_item_ms = (time.perf_counter() - t0) / 2000 * 1e3
    # budget 2 ms per image; a loaded CI machine gets 2.5x slack
    assert per_item_ms < 5.0, f"{per_item_ms:.3f} ms per item"


def test_synthetic_eval_candidates():
    ds = SyntheticDataset(120, seed=0, split="eval")
    rs = synthetic_eval_candidates(ds)
    recs = list(ds)
    assert rs.num_queries == 120
    assert rs.num_candidates == len({r["target_id"] for r in recs}) < 120  # deduplicated
    assert rs.chance == pytest.approx(1 / rs.num_candidates)
    for q, r in enumerate(recs):
        assert rs.cand_ids[rs.positive[q]] == r["target_id"] and rs.query_texts[q] == r["qry"]
    oracle = torch.nn.functional.one_hot(rs.positive, rs.num_candidates).float()
    assert rs.precision_at_1(oracle) == 1.0
    wrong = torch.nn.functional.one_hot((rs.positive + 1) % rs.num_candidates, rs.num_candidates).float()
    assert rs.precision_at_1(wrong) == 0.0
    assert set(rs.precision_at_1_by_subset(oracle).values()) == {1.0}
    assert rs.precision_at_1_from_embeddings(torch.eye(rs.num_candidates)[rs.positive], torch.eye(rs.num_candidates)) == 1.0
    # every score is the exact ratio hits / queries (a float32 mean wrote 0.3333333432674408 for 1/3)
    right = torch.arange(120) % 3 == 0
    mixed = torch.where(right[:, None], oracle, wrong)
    assert rs.precision_at_1(mixed) == 40 / 120
    for subset, v in rs.precision_at_1_by_subset(mixed).items():
        ix = [q for q, r in enumerate(recs) if r["subset"] == subset] if "subset" in recs[0] else None
        assert ix is None or v == int(right[ix].sum()) / len(ix), subset
    for task, v in rs.precision_at_1_by_task(mixed).items():
        assert v["p_at_1"] == int(v["p_at_1"] * v["num_queries"] + 0.5) / v["num_queries"], (task, v)
    # two queries with the same answer are both right when that one candidate is retrieved
    vqa = [q for q, r in enumerate(recs) if r["pos_text"] == "one"]
    assert len(vqa) >= 2 and len({int(rs.positive[q]) for q in vqa}) == 1
    with pytest.raises(ValueError, match="num_candidates"):
        rs.precision_at_1(torch.zeros(3, 3))


# ---------------------------------------------------------------- MMEB fixtures
def _image(path, mode="RGB", colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 6), colour if mode != "L" else 90).save(path)


def _rows(n=4, neg=False):
    rows = []
    for i in range(n):
        r = {
            "qry": f"{IMAGE_PLACEHOLDER}\nRepresent the given image with the following question: q{i}?",
            "qry_image_path": f"sub/q{i}.png",
            "pos_text": "yes" if i % 2 else "no",
            "pos_image_path": "",
        }
        if neg:
            r.update(neg_text=f"{IMAGE_PLACEHOLDER}\nneg {i}", neg_image_path=f"sub/n{i}.png")
        rows.append(r)
    return rows


def _write_images(img_dir, n=4, neg=False):
    for i in range(n):
        _image(img_dir / f"sub/q{i}.png", mode=("L", "RGBA", "RGB")[i % 3])
        if neg:
            _image(img_dir / f"sub/n{i}.png", colour=(0, 0, 255))


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# ---------------------------------------------------------------- MMEB reading
def test_mmeb_jsonl_reading(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 4)
    _jsonl(tmp_path / "data" / "VQA_A.jsonl", _rows(4))
    t2i = [{"qry": "a cat", "qry_image_path": "", "pos_text": f"{IMAGE_PLACEHOLDER}\nRepresent the given image.", "pos_image_path": "sub/q0.png"}]
    _jsonl(tmp_path / "data" / "T2I_B.jsonl", t2i)
    ds = MMEBDataset(tmp_path / "data", img)
    assert len(ds) == 5 and ds.subsets == ["T2I_B", "VQA_A"]
    recs = list(ds)
    vqa = [r for r in recs if r["subset"] == "VQA_A"]
    assert [r["row"] for r in vqa] == [0, 1, 2, 3]
    for r in vqa:
        assert r["qry_image"].mode == "RGB" and r["qry_image"].size == (8, 6)  # L and RGBA converted
        assert r["pos_image"] is None and r["neg_text"] is None and r["neg_image"] is None
        assert r["target_id"] == r["pos_text"] + "\x00" and r["query_id"] == r["qry"] + "\x00" + f"sub/q{r['row']}.png"
    assert vqa[0]["qry"] == _rows(4)[0]["qry"]  # placeholder kept as is
    (b,) = [r for r in recs if r["subset"] == "T2I_B"]
    assert b["qry_image"] is None and b["pos_image"].size == (8, 6) and b["target_id"].endswith("\x00sub/q0.png")
    # subset selection, a list of files, max rows
    assert len(MMEBDataset(tmp_path / "data", img, subsets=["VQA_A"])) == 4
    assert len(MMEBDataset([tmp_path / "data" / "T2I_B.jsonl"], img)) == 1
    assert len(MMEBDataset(tmp_path / "data", img, max_rows_per_subset=2)) == 3
    with pytest.raises(ValueError, match="NOPE"):
        MMEBDataset(tmp_path / "data", img, subsets=["NOPE"])


def test_mmeb_parquet_reading_hub_layout(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 4, neg=True)
    _parquet(tmp_path / "mmeb" / "VQA_A" / "original-00000-of-00001.parquet", _rows(4, neg=True))
    _parquet(tmp_path / "mmeb" / "VQA_A" / "diverse_instruction-00000-of-00001.parquet", _rows(3, neg=True))
    _parquet(tmp_path / "mmeb" / "VQA_A" / "original-00001-of-00001.parquet", _rows(2, neg=True))
    ds = MMEBDataset(tmp_path / "mmeb", img, split="original", use_negatives=True)
    assert ds.subsets == ["VQA_A"] and len(ds) == 6
    r = ds[1]
    assert r["subset"] == "VQA_A" and r["row"] == 1 and r["qry_image"].mode == "RGB"
    assert r["neg_text"] == f"{IMAGE_PLACEHOLDER}\nneg 1" and r["neg_image"].getpixel((0, 0)) == (0, 0, 255)
    assert r["neg_id"] == r["neg_text"] + "\x00sub/n1.png"
    assert len(MMEBDataset(tmp_path / "mmeb", img)) == 9  # no split: every shard
    assert len(MMEBDataset(tmp_path / "mmeb", img, max_rows_per_subset=5, split="original")) == 5


def test_mmeb_negatives_only_when_asked(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 2, neg=True)
    f = _jsonl(tmp_path / "S.jsonl", _rows(2, neg=True))
    os.remove(img / "sub/n1.png")  # not opened (nor checked) unless negatives are asked for
    plain = MMEBDataset(f, img)
    assert all(r["neg_text"] is None and r["neg_image"] is None and r["neg_id"] is None for r in plain)
    with pytest.raises(BadDataError, match=r"S\.jsonl:2: .*image file not found.*n1\.png"):
        MMEBDataset(f, img, use_negatives=True)
    no_neg = _jsonl(tmp_path / "T.jsonl", _rows(2))
    with pytest.raises(BadDataError, match="T.jsonl.*use_negatives=True but no neg_text"):
        MMEBDataset(no_neg, img, use_negatives=True)


def test_mmeb_image_dir_defaults_to_data_folder(tmp_path):
    _write_images(tmp_path / "d", 2)
    f = _jsonl(tmp_path / "d" / "S.jsonl", _rows(2))
    assert MMEBDataset(f)[1]["qry_image"].size == (8, 6)


# ---------------------------------------------------------------- MMEB bad data
def _bad(kind, img_dir):
    """Rows whose row 2 is bad in the given way; returns (rows, expected reason pattern)."""
    rows = _rows(4)
    r = rows[2]
    if kind == "missing image":
        r["qry_image_path"] = "sub/nope.png"
        return rows, r"image file not found.*nope\.png"
    if kind == "empty query":
        r.update(qry="  ", qry_image_path="")
        return rows, "empty query"
    if kind == "empty target":
        r.update(pos_text="", pos_image_path="")
        return rows, "empty target"
    if kind == "unknown column":
        r["extra"] = 1
        return rows, r"unknown column.*'extra'"
    if kind == "missing column":
        del r["pos_text"]
        return rows, r"missing required column.*'pos_text'"
    if kind == "wrong type":
        r["pos_text"] = 7
        return rows, r"'pos_text' holds int"
    if kind == "placeholder without image":
        r["qry_image_path"] = ""
        return rows, "placeholder"
    if kind == "invalid json":
        rows[2] = '{"qry": "x", '
        return rows, "invalid JSON"
    if kind == "unreadable image":
        (img_dir / "sub" / "q2.png").write_bytes(b"not a png at all")
        return rows, r"unreadable image.*q2\.png"
    raise AssertionError(kind)


BAD_KINDS = [
    "missing image", "empty query", "empty target", "unknown column", "missing column", "wrong type",
    "placeholder without image", "invalid json", "unreadable image",
]  # fmt: skip


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_mmeb_bad_data_names_row_and_file(tmp_path, kind):
    img = tmp_path / "images"
    _write_images(img, 4)
    rows, pattern = _bad(kind, img)
    f = _jsonl(tmp_path / "BadSet.jsonl", rows)
    with pytest.raises(BadDataError) as info:
        ds = MMEBDataset(f, img)  # the unreadable image passes the existence check ...
        assert kind == "unreadable image"
        [ds[i] for i in range(len(ds))]  # ... and fails when read
    err = info.value
    assert err.source == str(f) and err.row == 2
    assert f"{f}:3: " in str(err)  # FILE:LINE, 1-based (row 2 from 0)
    assert re.search(pattern, str(err)), str(err)
    if kind == "unreadable image":  # found at build time when decoding is asked for
        with pytest.raises(BadDataError, match=r"\.jsonl:3: .*unreadable image"):
            MMEBDataset(f, img, check_images="decode")


@pytest.mark.parametrize("kind", ["missing image", "empty target", "unknown column", "wrong type"])
def test_mmeb_parquet_bad_data(tmp_path, kind):
    img = tmp_path / "images"
    _write_images(img, 4)
    rows, pattern = _bad(kind, img)
    if kind == "unknown column":  # parquet has one schema: every row gets the column
        for r in rows:
            r["extra"] = 1
    if kind == "wrong type":  # a column is one type: two negatives where one belongs
        rows[2]["pos_text"] = "no"
        for r in rows:
            r.update(neg_text=["a", "b"] if r is rows[2] else ["a"], neg_image_path="")
        pattern = r"'neg_text' holds a list of 2"
    f = _parquet(tmp_path / "BadSet.parquet", rows)
    with pytest.raises(BadDataError, match=pattern) as info:
        MMEBDataset(f, img, use_negatives=kind == "wrong type")  # a negative is looked at only when used
    assert str(f) in str(info.value)
    # a file problem names the file alone; a row of a parquet table is "row N", 1-based (row 2 from 0)
    assert (f"{f}: " if kind == "unknown column" else f"{f}: row 3: ") in str(info.value)


def test_mmeb_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    img = tmp_path / "images"
    _write_images(img, 6)
    rows = _rows(6)
    rows[1]["qry_image_path"] = "sub/missing.png"
    rows[3].update(qry="", qry_image_path="")
    (img / "sub" / "q4.png").write_bytes(b"\x89PNG broken")
    f = _jsonl(tmp_path / "S.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb"):
        ds = MMEBDataset(f, img, skip_bad_rows=True)
    assert len(ds) == 4
    assert [(s, r) for s, r, _ in ds.skipped] == [(str(f), 1), (str(f), 3)]
    assert "image file not found" in ds.skipped[0][2] and "empty query" in ds.skipped[1][2]
    logged = [m.getMessage() for m in caplog.records]
    assert any(f"{f}:2: " in m and "missing.png" in m for m in logged)
    assert any(f"{f}:4: " in m and "empty query" in m for m in logged)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb"):
        seen = [ds[i]["row"] for i in range(len(ds))]
    # row 4's image is unreadable: the next good row (5) stands in, and the skip is recorded
    assert seen == [0, 2, 5, 5]
    assert ds.skipped[-1][:2] == (str(f), 4) and "unreadable image" in ds.skipped[-1][2]
    assert any(f"{f}:5: " in m.getMessage() for m in caplog.records)
    assert len(ds) + len(ds.skipped) == 6 + 1  # every row is either served or accounted for (4 is both)
    with pytest.raises(BadDataError):
        MMEBDataset(f, img)  # the default stops


def test_mmeb_hub_name_needs_datasets(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install datasets"):
        MMEBDataset("TIGER-Lab/MMEB-train", tmp_path, subsets=["MSCOCO"])
    with pytest.raises(FileNotFoundError):
        MMEBDataset(tmp_path / "no_such_dir", tmp_path)


# ---------------------------------------------------------------- collator
class FakeProcessor:
    """Records every call; returns one row per item (a hash of the text, whether it has an image)."""

    def __init__(self):
        self.calls = []

    def __call__(self, texts, images):
        self.calls.append((list(texts), list(images)))
        return {
            "input_ids": stable_ids(texts).unsqueeze(1),
            "has_image": torch.tensor([im is not None for im in images]),
        }


def _rec(text, target, neg=None, image=None, row=0):
    return {
        "qry": text, "qry_image": image, "pos_text": target, "pos_image": None,
        "neg_text": neg, "neg_image": None, "target_id": target + "\x00", "query_id": text + "\x00",
        "neg_id": None if neg is None else neg + "\x00", "subset": "s", "row": row,
    }  # fmt: skip


def test_collator_ids_and_processor_calls():
    im = Image.new("RGB", (4, 4))
    recs = [_rec("q0", "red", "blue", im), _rec("q1", "green", "red"), _rec("q2", "red", "green", row=2)]
    proc = FakeProcessor()
    out = PairCollator(proc)(recs)
    assert len(proc.calls) == 2 and out["negatives"] is None and out["negative_ids"] is None  # not asked
    assert proc.calls[0] == (["q0", "q1", "q2"], [im, None, None]) and proc.calls[0][1][0] is im
    assert proc.calls[1] == (["red", "green", "red"], [None, None, None])
    assert out["query"]["has_image"].tolist() == [True, False, False]
    t = out["target_ids"]
    assert t.dtype == torch.int64 and t.shape == (3,)
    assert t[0] == t[2] and t[0] != t[1]  # duplicate targets share an id
    assert len(set(out["query_ids"].tolist())) == 3
    assert t.tolist() == [stable_id("red\x00"), stable_id("green\x00"), stable_id("red\x00")]

    proc = FakeProcessor()
    out = PairCollator(proc, use_negatives=True)(recs)
    assert len(proc.calls) == 3 and proc.calls[2][0] == ["blue", "red", "green"]
    assert out["negatives"]["input_ids"].shape == (3, 1)
    # a negative equal to another row's positive gets that positive's id (so it is masked there)
    assert out["negative_ids"][1] == out["target_ids"][0] and out["negative_ids"].dtype == torch.int64

    with pytest.raises(ValueError, match="row 7 .*no hard negative"):
        PairCollator(FakeProcessor(), use_negatives=True)([_rec("q", "t", None, row=7)])
    with pytest.raises(ValueError, match="empty batch"):
        PairCollator(FakeProcessor())([])


def test_stable_ids_across_processes():
    keys = ["red\x00", "a large red circle on the left.\x00", f"{IMAGE_PLACEHOLDER}\nx\x00sub/q1.png", "ünï\x00"]
    code = (
        "import json\nfrom llave_fast.data import stable_ids\n"
        f"print(json.dumps(stable_ids({keys!r}).tolist()))\n"
    )
    assert json.loads(_child_fingerprints(code)) == stable_ids(keys).tolist()
    assert len(set(stable_ids(keys).tolist())) == len(keys)


def test_collator_in_dataloader_workers():
    ds = SyntheticDataset(24, seed=1, hard_negatives=True)
    collate = PairCollator(FakeProcessor(), use_negatives=True)
    serial = list(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate))
    workers = list(torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate, num_workers=2))
    assert len(serial) == len(workers) == 3
    for k, (a, b) in enumerate(zip(serial, workers)):
        for key in ("target_ids", "query_ids", "negative_ids"):
            assert torch.equal(a[key], b[key])
        assert torch.equal(a["query"]["input_ids"], b["query"]["input_ids"])
        subsets = [ds[i]["subset"] for i in range(8 * k, 8 * k + 8)]
        assert b["query"]["has_image"].tolist() == [s != "synthetic_t2i" for s in subsets]
        assert b["target"]["has_image"].tolist() == [s == "synthetic_t2i" for s in subsets]


def test_mmeb_skip_bad_rows_read_problems(tmp_path, caplog):
    img = tmp_path / "images"
    _write_images(img, 4)
    rows = _rows(4)
    rows[0]["pos_text"] = 3.5
    rows[2] = "[not json"
    f = _jsonl(tmp_path / "S.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb"):
        ds = MMEBDataset(f, img, skip_bad_rows=True)
    assert [r["row"] for r in ds] == [1, 3]
    assert [(r, why.split(":")[0]) for _, r, why in ds.skipped] == [(0, "column 'pos_text' holds float, expected a string"), (2, "invalid JSON")]
    assert sum(":3: " in m.getMessage() for m in caplog.records) == 1


def test_mmeb_parquet_needs_pyarrow(monkeypatch, tmp_path):
    f = tmp_path / "S.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install pyarrow"):
        MMEBDataset(f, tmp_path)


def test_mmeb_query_modality_without_opening_images(tmp_path):
    """What --group-by-modality reads: which queries carry an image, per kept row, in dataset order."""
    img = tmp_path / "images"
    _write_images(img, 4)
    _jsonl(tmp_path / "data" / "VQA_A.jsonl", _rows(3))
    t2i = [{"qry": f"a cat {i}", "qry_image_path": "", "pos_text": f"{IMAGE_PLACEHOLDER}\nRepresent the given image.",
            "pos_image_path": "sub/q0.png"} for i in range(2)]
    _jsonl(tmp_path / "data" / "T2I_B.jsonl", t2i)
    ds = MMEBDataset(tmp_path / "data", img)
    has = ds.query_has_image()
    assert has.dtype == bool and has.tolist() == [ds[i]["qry_image"] is not None for i in range(len(ds))]
    assert sorted(has.tolist()) == [False, False, True, True, True]


# ---------------------------------------------------------------- bad images (issue 14)
def test_mmeb_missing_relative_image_suggests_image_dir(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 4)
    f = _jsonl(tmp_path / "data" / "S.jsonl", _rows(4))  # paths relative to images/, not to data/
    with pytest.raises(BadDataError, match=r"looked up under the data file's folder .*pass --image-dir") as info:
        MMEBDataset(f)
    assert str(tmp_path / "data") in str(info.value) and "--bad-images skip" in str(info.value)
    with pytest.raises(BadDataError, match=r"relative to --image-dir .*is that the folder"):
        MMEBDataset(f, tmp_path / "data")
    assert len(MMEBDataset(f, img)) == 4


def test_mmeb_check_images_decodes_all_with_progress_and_bad_images_decides(tmp_path, capsys):
    img = tmp_path / "images"
    _write_images(img, 6)
    (img / "sub" / "q4.png").write_bytes(b"\x89PNG broken")  # exists: only decoding finds it
    f = _jsonl(tmp_path / "S.jsonl", _rows(6))
    with pytest.raises(BadDataError, match=r"S\.jsonl:5: .*unreadable image.*--bad-images skip") as info:
        MMEBDataset(f, img, check_images="decode", progress=True)
    assert "--check-images" not in str(info.value)  # it is on: not suggested again
    assert "checking images" in capsys.readouterr().err  # the progress bar
    ds = MMEBDataset(f, img, check_images="decode", bad_images="skip")
    assert len(ds) == 5 and ds.images_checked == 6
    # one image by two spellings (sub/./q0.png, sub/../sub/q0.png) is decoded once
    spelled = _rows(6)
    spelled[1]["qry_image_path"], spelled[2]["qry_image_path"] = "sub/./q0.png", "sub/../sub/q0.png"
    assert MMEBDataset(_jsonl(tmp_path / "T.jsonl", spelled), img, check_images="decode",
                       bad_images="skip").images_checked == 4
    assert [(s, r) for s, r, _ in ds.skipped] == [(str(f), 4)] and "unreadable image" in ds.skipped[0][2]
    # bad_images governs images only: a bad row still follows skip_bad_rows
    rows = _rows(6)
    rows[1].update(qry="", qry_image_path="")
    g = _jsonl(tmp_path / "T.jsonl", rows)
    with pytest.raises(BadDataError, match=r"T\.jsonl:2: .*empty query"):
        MMEBDataset(g, img, check_images="decode", bad_images="skip")
    # ... and bad_images="fail" stops on an image even when bad rows are skipped
    with pytest.raises(BadDataError, match=r"T\.jsonl:5: .*unreadable image"):
        MMEBDataset(g, img, check_images="decode", bad_images="fail", skip_bad_rows=True)


def test_mmeb_bad_images_at_read_time(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 6)
    (img / "sub" / "q4.png").write_bytes(b"\x89PNG broken")
    f = _jsonl(tmp_path / "S.jsonl", _rows(6))
    fail = MMEBDataset(f, img, bad_images="fail", skip_bad_rows=True)
    with pytest.raises(BadDataError, match=r"S\.jsonl:5: .*unreadable image.*--check-images"):
        fail[4]
    skip = MMEBDataset(f, img, bad_images="skip")
    assert skip[4]["row"] == 5 and [r for _, r, _ in skip.skipped] == [4]
    with pytest.raises(ValueError, match=r"bad_images must be 'skip', 'fail' or None, got 'drop'"):
        MMEBDataset(f, img, bad_images="drop")


def test_plain_and_varied_backgrounds_differ_only_in_the_grey():
    plain = SyntheticDataset(24, seed=1, split="eval")
    varied = SyntheticDataset(24, seed=1, split="eval", background="varied")
    greys_plain, greys_varied = set(), set()
    for a, b in zip(plain, varied):
        # the same scene, question and answer: only the background's grey level differs
        assert {k: a[k] for k in ("qry", "pos_text", "target_id", "subset")} == \
               {k: b[k] for k in ("qry", "pos_text", "target_id", "subset")}
        img_a, img_b = (np.asarray(r["qry_image"] if r["qry_image"] is not None else r["pos_image"]) for r in (a, b))
        greys_plain.add(int(img_a[0, 0, 0]))
        greys_varied.add(int(img_b[0, 0, 0]))
        assert analyse(Image.fromarray(img_a)) == analyse(Image.fromarray(img_b))
    assert greys_plain == {128}
    assert len(greys_varied) > 10 and all(100 <= g <= 156 for g in greys_varied)
    assert "background='varied'" in repr(varied)
    with pytest.raises(ValueError, match="background must be one of .*'stripes'"):
        SyntheticDataset(4, background="stripes")


def test_precision_by_task_scores_each_task_against_its_own_targets():
    ds = SyntheticDataset(60, seed=0, split="eval")
    rs = synthetic_eval_candidates(ds)
    tasks = {"i2t", "t2i", "vqa"}
    oracle = torch.nn.functional.one_hot(rs.positive, rs.num_candidates).float()
    by = rs.precision_at_1_by_task(oracle)
    assert set(by) == tasks
    recs = list(ds)
    for t, v in by.items():
        own = {r["target_id"] for r in recs if r["subset"] == f"synthetic_{t}"}
        assert v["num_queries"] == sum(r["subset"] == f"synthetic_{t}" for r in recs)
        assert v["num_candidates"] == len(own) and v["chance"] == pytest.approx(1 / len(own))
        assert v["p_at_1"] == 1.0
    assert sum(v["num_queries"] for v in by.values()) == rs.num_queries
    # every query's top score on another task's target: a miss against all targets of the
    # split, but that candidate is not among its own task's, where the positive wins
    other = torch.zeros_like(oracle)
    subsets = [s.removeprefix("synthetic_") for s in rs.query_subsets]
    cand_task = {int(rs.positive[q]): subsets[q] for q in range(rs.num_queries)}
    for q, t in enumerate(subsets):
        foreign = next(c for c, ct in cand_task.items() if ct != t)
        other[q, foreign] = 2.0
        other[q, rs.positive[q]] = 1.0
    assert rs.precision_at_1(other) == 0.0
    assert {t: v["p_at_1"] for t, v in rs.precision_at_1_by_task(other).items()} == dict.fromkeys(tasks, 1.0)
    # within a task, a wrong candidate of the same task is a miss
    wrong = oracle.clone()
    for q, t in enumerate(subsets):
        if t == "i2t":
            wrong[q, next(c for c, ct in cand_task.items() if ct == t and c != int(rs.positive[q]))] = 2.0
    assert rs.precision_at_1_by_task(wrong)["i2t"]["p_at_1"] == 0.0
    assert rs.precision_at_1_by_task(wrong)["vqa"]["p_at_1"] == 1.0
    with pytest.raises(ValueError, match="num_candidates"):
        rs.precision_at_1_by_task(torch.zeros(3, 3))
    # MMEB-train subsets are tasks under their own names
    from llave_fast.data.synthetic import task_name

    names = ("synthetic_t2i", "MSCOCO_i2t", "VisDial")
    assert [task_name(n) for n in names] == ["t2i", "MSCOCO_i2t", "VisDial"]


def test_vqa_questions_per_scene_groups_one_scene_under_different_questions():
    q = 3
    ds = SyntheticDataset(36, seed=4, vqa_questions_per_scene=q)
    plain = SyntheticDataset(36, seed=4)
    tasks = [ds.task(i) for i in range(len(ds))]
    assert tasks == [("i2t", "t2i", "vqa")[(i // q) % 3] for i in range(len(ds))]  # groups share their task
    assert list(ds.query_has_image()) == [t != "t2i" for t in tasks]
    assert [ds.family(i) for i in range(len(ds))] == [i // q for i in range(len(ds))]
    vqa_groups = 0
    for first in range(0, len(ds), q):
        recs = [ds[first + m] for m in range(q)]
        if tasks[first] != "vqa":  # i2t / t2i groups: independent scenes
            assert len({ds.scene(first + m).caption for m in range(q)}) == q
            continue
        vqa_groups += 1
        pixels = [np.asarray(r["qry_image"]) for r in recs]
        assert all(np.array_equal(pixels[0], p) for p in pixels[1:])  # one image ...
        assert len({r["qry"] for r in recs}) == q  # ... under q different questions ...
        assert len({r["pos_text"] for r in recs}) == q  # ... with different answers
        assert all(r["qry"].startswith(VQA_PREFIX) for r in recs)
        assert len({ds.scene(first + m) for m in range(q)}) == 1
    assert vqa_groups == 4
    a, b = ds[7], SyntheticDataset(36, seed=4, vqa_questions_per_scene=q)[7]  # a pure function of (seed, split, i)
    assert (a["qry"], a["pos_text"]) == (b["qry"], b["pos_text"])
    one = SyntheticDataset(36, seed=4, vqa_questions_per_scene=1)
    assert all(one[i]["qry"] == plain[i]["qry"] and one[i]["pos_text"] == plain[i]["pos_text"] for i in range(12))
    for bad in (0, 5, True, 2.0):
        with pytest.raises(ValueError, match=rf"vqa_questions_per_scene must be an int in 1..4 .*got {bad!r}"):
            SyntheticDataset(8, vqa_questions_per_scene=bad)


def test_mmeb_empty_file_and_truncated_json_say_what_they_are(tmp_path):
    """An empty file is named and called empty; a truncated line's JSON error gives Python's column
    (the newline is not parsed, which moved it to "line 2, column 1"); every place is FILE:LINE."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"no rows: .*empty\.jsonl is empty"):
        MMEBDataset(str(empty))
    row = json.dumps({"qry": "a", "qry_image_path": "", "pos_text": "b", "pos_image_path": ""})
    trunc = tmp_path / "trunc.jsonl"
    trunc.write_text(row + "\n\n" + row[:-1] + "\n")
    expected = None
    try:
        json.loads(row[:-1])
    except json.JSONDecodeError as exc:
        expected = exc.colno
    with pytest.raises(BadDataError, match=rf"trunc\.jsonl:3: invalid JSON: .* at column {expected}\b"):
        MMEBDataset(str(trunc))
    # every row bad and skipped: the message names the file, the count by reason and the first place
    with pytest.raises(ValueError, match=r"no usable rows in .*trunc2\.jsonl: all 1 rows were bad.*trunc2\.jsonl:1: "):
        (tmp_path / "trunc2.jsonl").write_text(row[:-1] + "\n")
        MMEBDataset(str(tmp_path / "trunc2.jsonl"), skip_bad_rows=True)


def test_mmeb_non_utf8_deeply_nested_and_huge_lines_are_bad_rows(tmp_path, monkeypatch):
    """Three lines that used to stop the run as an internal error (or hold a whole huge line in memory)
    are bad rows at FILE:LINE, skippable with skip_bad_rows like any other."""
    import llave_fast.data.mmeb as mmeb

    good = json.dumps({"qry": "a", "qry_image_path": "", "pos_text": "b", "pos_image_path": ""})
    f = tmp_path / "odd.jsonl"
    f.write_bytes(b"\n".join([good.encode(), b'{"qry": "caf\xe9"}', b"[" * 100000 + b"]" * 100000,
                              b'{"qry": "' + b"x" * 400000 + b'"}', good.encode()]) + b"\n")
    limit = 300000  # above the 200 kB nested line, below the 400 kB long one
    monkeypatch.setattr(mmeb.jsonl_lines, "__defaults__", (limit,))
    with pytest.raises(BadDataError, match=r"odd\.jsonl:2: not UTF-8 text"):
        MMEBDataset(str(f))
    ds = MMEBDataset(str(f), skip_bad_rows=True)
    assert len(ds) == 2
    reasons = {ds.where(src, row): why for src, row, why in ds.skipped}
    assert set(reasons) == {f"{f}:2", f"{f}:3", f"{f}:4"}, reasons
    assert "not UTF-8" in reasons[f"{f}:2"] and "nested too deeply" in reasons[f"{f}:3"], reasons
    assert f"a line of {400000 + 12} bytes, over the limit of {limit} bytes" in reasons[f"{f}:4"], reasons


def test_mmeb_images_over_the_pixel_limit_are_bad_images_refused_before_decoding(tmp_path, monkeypatch):
    """A decompression bomb (a small file promising a huge canvas) is refused from its header: a bad
    image at FILE:LINE, which bad_images decides; the limit is a documented default with a knob."""
    from PIL import Image as PILImage

    import llave_fast.data.mmeb as mmeb
    from llave_fast.train import TrainConfig

    assert 600_000 < mmeb.MAX_IMAGE_PIXELS < PILImage.MAX_IMAGE_PIXELS  # above anyres 2x2 at 384, below Pillow
    assert TrainConfig().max_image_pixels == mmeb.MAX_IMAGE_PIXELS
    img = tmp_path / "images"
    img.mkdir()
    PILImage.new("L", (300, 200)).save(img / "big.png")  # 60000 pixels, a few hundred bytes
    PILImage.new("RGB", (20, 10)).save(img / "small.png")
    rows = [{"qry": "<|image_1|> a", "qry_image_path": "big.png", "pos_text": "b", "pos_image_path": ""},
            {"qry": "<|image_1|> c", "qry_image_path": "small.png", "pos_text": "d", "pos_image_path": ""}]
    f = tmp_path / "px.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    decoded = []
    real_convert = PILImage.Image.convert
    monkeypatch.setattr(PILImage.Image, "convert", lambda im, *a, **k: decoded.append(im.size) or real_convert(im, *a, **k))
    ds = mmeb.MMEBDataset(str(f), str(img), max_image_pixels=50_000)
    with pytest.raises(BadDataError, match=r"px\.jsonl:1: unreadable image \(300 x 200 = 60000 pixels, over the "
                                           r"limit of 50000 \(--max-image-pixels"):
        ds[0]
    assert (300, 200) not in decoded  # refused from the header, never decoded
    with pytest.raises(BadDataError, match=r"px\.jsonl:1: .*over the limit"):
        mmeb.MMEBDataset(str(f), str(img), max_image_pixels=50_000, check_images="decode")
    skipping = mmeb.MMEBDataset(str(f), str(img), max_image_pixels=50_000, check_images="decode", bad_images="skip")
    assert len(skipping) == 1 and "over the limit" in skipping.skipped[0][2]
    assert mmeb.MMEBDataset(str(f), str(img), max_image_pixels=0)[0]["qry_image"].size == (300, 200)  # 0: no limit
    with pytest.raises(ValueError, match=r"max_image_pixels must be an int >= 0"):
        mmeb.MMEBDataset(str(f), str(img), max_image_pixels=-1)


def test_placeholders_the_processor_refuses_are_bad_rows_when_read(tmp_path):
    """<image>, <|image_2|> without an image, or two placeholders with one: the processor refuses
    them in a DataLoader worker mid-run (no FILE:LINE, not skippable); the reader finds them first."""
    from llave_fast.data.mmeb import BadDataError

    img = tmp_path / "images"
    _write_images(img, 6)
    rows = _rows(6)
    rows[1].update(qry="<image> what is shown", qry_image_path="")
    rows[2].update(qry="<|image_2|> what is shown", qry_image_path="")
    rows[4].update(qry=f"{IMAGE_PLACEHOLDER} a {IMAGE_PLACEHOLDER} b")
    f = _jsonl(tmp_path / "S.jsonl", rows)
    with pytest.raises(BadDataError, match=r"S\.jsonl:2: qry has an image placeholder \(<image> or <\|image_N\|>\) "
                                           r"but qry_image_path is empty"):
        MMEBDataset(f, img)
    ds = MMEBDataset(f, img, skip_bad_rows=True)
    assert [r for _, r, _ in ds.skipped] == [1, 2, 4] and len(ds) == 3
    assert "qry has 2 image placeholders, but a side holds one image" in ds.skipped[2][2]


def test_one_file_named_twice_is_read_once_and_mixed_splits_are_said(tmp_path, caplog):
    img = tmp_path / "images"
    _write_images(img, 4)
    f = _jsonl(tmp_path / "d" / "S.jsonl", _rows(4))
    again = str(tmp_path / "d" / ".." / "d" / "S.jsonl")
    assert len(MMEBDataset([f, again, str(tmp_path / "d")], img)) == 4  # was 12, silently
    hub = tmp_path / "hub" / "A"
    for split in ("original", "diverse_instruction"):
        _jsonl(hub / f"{split}-00000-of-00001.jsonl", _rows(4))
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb"):
        assert len(MMEBDataset(str(hub), img)) == 8
    assert "shards of 2 splits (diverse_instruction, original) and all are read" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb"):
        assert len(MMEBDataset(str(hub), img, split="original")) == 4
    assert "splits" not in caplog.text


def test_a_parquet_with_corrupt_pages_is_bad_data_naming_the_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llave_fast.data.mmeb import BadDataError

    rows = [dict(r, qry_image_path="", qry=r["qry"].split("\n", 1)[1]) for r in _rows(200)]
    path = tmp_path / "S.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy")
    raw = bytearray(path.read_bytes())
    for k in range(100, 400):  # the data pages, past the magic bytes, before the footer
        raw[k] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(BadDataError, match=r"S\.parquet: not a readable parquet file: "):
        MMEBDataset(str(path), str(tmp_path))


def _t2i(image_path, text="a cat"):
    return {"qry": text, "qry_image_path": "", "pos_text": f"{IMAGE_PLACEHOLDER}\nRepresent the given image.",
            "pos_image_path": image_path}


def test_ids_follow_the_image_file_not_how_the_row_writes_it(tmp_path):
    # two tables, each with its own folder as image folder, both write "a.png": two images
    for d in ("d1", "d2"):
        _image(tmp_path / d / "a.png")
        _jsonl(tmp_path / d / f"S_{d}.jsonl", [_t2i("a.png")])
    ds = MMEBDataset([tmp_path / "d1", tmp_path / "d2"])
    target = f"{IMAGE_PLACEHOLDER}\nRepresent the given image.\x00"
    assert sorted(r["target_id"] for r in ds) == [target + "d1/a.png", target + "d2/a.png"]  # was a.png twice
    # one image written three ways (./, a folded .., absolute) is one image; its query likewise
    _image(tmp_path / "img" / "sub" / "b.png")
    rows = [_t2i("sub/b.png"), _t2i("./sub/b.png"), _t2i("sub/../sub/b.png"), _t2i(str(tmp_path / "img/sub/b.png"))]
    rows += [dict(qry=f"{IMAGE_PLACEHOLDER}\nq", qry_image_path=p, pos_text="t", pos_image_path="")
             for p in ("sub/b.png", "./sub//b.png")]
    ds = MMEBDataset(_jsonl(tmp_path / "S.jsonl", rows), tmp_path / "img")
    assert [r["target_id"] for r in ds][:4] == [target + "sub/b.png"] * 4
    assert [r["query_id"] for r in ds][4:] == [f"{IMAGE_PLACEHOLDER}\nq\x00sub/b.png"] * 2
    ids = PairCollator(lambda texts, images: None)(list(ds))["target_ids"]
    assert ids[:4].unique().numel() == 1  # the loss masks them as one target


def test_a_symbolic_link_and_its_file_are_one_image(tmp_path):
    # a file, a relative and an absolute link to it, and the file through a linked folder: one image, one id
    img = tmp_path / "img"
    _image(img / "sub" / "b.png")
    (img / "rel.png").symlink_to(os.path.join("sub", "b.png"))
    (img / "abs.png").symlink_to(img / "sub" / "b.png")
    (img / "alias").symlink_to(img / "sub", target_is_directory=True)
    _image(img / "sub" / "c.png")  # another image stays another
    rows = [_t2i(p) for p in ("sub/b.png", "rel.png", "abs.png", "alias/b.png", "sub/c.png")]
    ds = MMEBDataset(_jsonl(tmp_path / "S.jsonl", rows), img)
    target = f"{IMAGE_PLACEHOLDER}\nRepresent the given image.\x00"
    assert [r["target_id"] for r in ds] == [target + "sub/b.png"] * 4 + [target + "sub/c.png"]  # was 4 ids
    ids = PairCollator(lambda texts, images: None)(list(ds))["target_ids"]
    assert ids[:4].unique().numel() == 1 and ids[4] != ids[0]  # the loss masks them as one target
    # two tables with their own image folders: a link in d1 to d2's file is d2's image
    for d in ("d1", "d2"):
        _image(tmp_path / "two" / d / "a.png")
        _jsonl(tmp_path / "two" / d / f"S_{d}.jsonl", [_t2i("a.png")])
    (tmp_path / "two" / "d2" / "b.png").symlink_to(tmp_path / "two" / "d1" / "a.png")
    _jsonl(tmp_path / "two" / "d2" / "S_d2b.jsonl", [_t2i("b.png")])
    ds = MMEBDataset([tmp_path / "two" / "d1", tmp_path / "two" / "d2"], allow_outside_image_dir=True)
    assert Counter(r["target_id"] for r in ds) == {target + "d1/a.png": 2, target + "d2/a.png": 1}
    # one real folder named by two paths (the second through a link), each holding a table: one id per image
    _image(tmp_path / "real" / "a.png")
    _jsonl(tmp_path / "real" / "S1.jsonl", [_t2i("a.png")])
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    ds = MMEBDataset([tmp_path / "real" / "S1.jsonl", _jsonl(tmp_path / "link" / "S2.jsonl", [_t2i("a.png")])])
    assert len({r["target_id"] for r in ds}) == 1, [r["target_id"] for r in ds]


def test_check_images_checks_the_file_the_loader_opens(tmp_path):
    """'..' after a symbolic link is applied by the kernel after the link: a textual normalisation checked
    img/x.png where the loader opens img/deep/x.png (unreadable), and the row passed the check."""
    img = tmp_path / "img"
    _image(img / "x.png")
    (img / "deep" / "d").mkdir(parents=True)
    (img / "deep" / "x.png").write_bytes(b"not a png")
    (img / "sub").symlink_to(img / "deep" / "d", target_is_directory=True)
    ds = MMEBDataset(_jsonl(tmp_path / "S.jsonl", [_t2i("sub/../x.png"), _t2i("x.png")]), img,
                     check_images="decode", bad_images="skip")
    assert len(ds) == 1 and ds.skipped[0][1] == 0, ds.skipped


def test_hub_layouts_name_subsets_by_folder_or_file_or_are_refused(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 4)
    # data/<subset>-<split>-00000-of-00001: subset and split in the file name (was: subset "data" for all)
    for subset, split, n in (("A-OKVQA", "original", 3), ("MSCOCO", "original", 2),
                             ("MSCOCO", "diverse_instruction", 4)):
        _jsonl(tmp_path / "flat" / "data" / f"{subset}-{split}-00000-of-00001.jsonl", _rows(n))
    ds = MMEBDataset(tmp_path / "flat", img, split="original")
    assert ds.subsets == ["A-OKVQA", "MSCOCO"] and len(ds) == 5
    assert Counter(r["subset"] for r in ds) == {"A-OKVQA": 3, "MSCOCO": 2}
    # the parquet converter's <subset>/<split>/0000.parquet (was: subset "0000" for all)
    _parquet(tmp_path / "conv" / "A" / "original" / "0000.parquet", _rows(3))
    _parquet(tmp_path / "conv" / "A" / "original" / "0001.parquet", _rows(2))
    _parquet(tmp_path / "conv" / "B" / "original" / "0000.parquet", _rows(1))
    _parquet(tmp_path / "conv" / "B" / "diverse_instruction" / "0000.parquet", _rows(4))
    ds = MMEBDataset(tmp_path / "conv", img, split="original", max_rows_per_subset=4)
    assert Counter(r["subset"] for r in ds) == {"A": 4, "B": 1}  # 4 of A's 5: the cap is per subset
    # a shard name no layout explains is refused, naming the file and the layouts
    odd = _jsonl(tmp_path / "odd" / "MSCOCO" / "diverse-instruction-00000-of-00001.jsonl", _rows(1))
    with pytest.raises(ValueError, match=rf"{re.escape(str(odd))}: a shard named .* in folder 'MSCOCO' fits none of "
                                         r"the layouts read \(<subset>\.jsonl"):
        MMEBDataset(tmp_path / "odd", img)
    # the same shard of one subset twice (two copies, or two subsets named alike) is never merged
    for copy in ("c1", "c2"):
        _jsonl(tmp_path / "two" / copy / "MSCOCO" / "original-00000-of-00001.jsonl", _rows(1))
    with pytest.raises(ValueError, match=r"c1/MSCOCO/original-00000-of-00001\.jsonl and .*c2/MSCOCO/original-00000-of-"
                                         r"00001\.jsonl are both read as the same shard of subset 'MSCOCO'"):
        MMEBDataset(tmp_path / "two", img)


def test_converter_shards_without_their_split_folder_are_read_as_subsets(tmp_path, caplog):
    img = tmp_path / "images"
    _write_images(img, 4)
    # c/<subset>/0000.parquet (the converter's layout, split level left out) was read as splits of a subset "c"
    _parquet(tmp_path / "c" / "MSCOCO" / "0000.parquet", _rows(3))
    _parquet(tmp_path / "c" / "MSCOCO" / "0001.parquet", _rows(1))
    _parquet(tmp_path / "c" / "N24News" / "0000.parquet", _rows(2))
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb"):
        ds = MMEBDataset(tmp_path / "c", img, split="original")
    assert ds.subsets == ["MSCOCO", "N24News"] and "shards of 2 splits" not in caplog.text
    assert Counter(r["subset"] for r in ds) == {"MSCOCO": 4, "N24News": 2}
    assert MMEBDataset(tmp_path / "c" / "MSCOCO", img).subsets == ["MSCOCO"]  # the subset folder itself
    # with the split level, from the root, the subset folder or the split folder: subset MSCOCO, split original
    _parquet(tmp_path / "conv" / "MSCOCO" / "original" / "0000.parquet", _rows(2))
    _parquet(tmp_path / "conv" / "MSCOCO" / "diverse_instruction" / "0000.parquet", _rows(1))
    for d in ("conv", "conv/MSCOCO", "conv/MSCOCO/original"):
        ds = MMEBDataset(tmp_path / d, img, split="original")
        assert ds.subsets == ["MSCOCO"] and len(ds) == 2


def test_same_named_tables_in_two_folders_are_refused_not_merged(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 4)
    # a/MSCOCO.jsonl and b/MSCOCO.jsonl were one subset: max_rows_per_subset=3 read a's 3 rows and none of b's
    a = _jsonl(tmp_path / "a" / "MSCOCO.jsonl", _rows(3))
    b = _jsonl(tmp_path / "b" / "MSCOCO.jsonl", _rows(3))
    for kw in ({}, {"max_rows_per_subset": 3}, {"subsets": ["MSCOCO"]}):
        with pytest.raises(InvalidArgument, match=rf"{re.escape(str(a))} and {re.escape(str(b))} would both be read "
                                                  r"as subset 'MSCOCO' \(split None\), in two folders: .* not merged"):
            MMEBDataset([tmp_path / "a", tmp_path / "b"], img, **kw)
    assert len(MMEBDataset([tmp_path / "a", tmp_path / "a" / "MSCOCO.jsonl"], img)) == 3  # one file twice: once
    (tmp_path / "alias").symlink_to(tmp_path / "a", target_is_directory=True)
    assert len(MMEBDataset([tmp_path / "a", tmp_path / "alias"], img)) == 3  # one folder by two names: once
    # shards of one subset and split in two folders, or of two shard counts, or beside a one-file table
    for k, folder in enumerate(("s1", "s2")):
        _jsonl(tmp_path / "sh" / folder / "MSCOCO" / f"original-0000{k}-of-00002.jsonl", _rows(1))
    with pytest.raises(InvalidArgument, match=r"s1/MSCOCO/original-00000-of-00002\.jsonl and .*s2/MSCOCO/original-00001"
                                              r"-of-00002\.jsonl would both be read as subset 'MSCOCO' \(split "
                                              r"'original'\), in two folders"):
        MMEBDataset(tmp_path / "sh", img)
    _jsonl(tmp_path / "cnt" / "MSCOCO" / "original-00000-of-00002.jsonl", _rows(1))
    _jsonl(tmp_path / "cnt" / "MSCOCO" / "original-00001-of-00003.jsonl", _rows(1))
    with pytest.raises(InvalidArgument, match=r"shards of 2 and of 3"):
        MMEBDataset(tmp_path / "cnt", img)
    with pytest.raises(InvalidArgument, match=rf"subset 'MSCOCO' is both a one-file table \({re.escape(str(a))}\) "
                                              r"and shards \(.*original-00000-of-00002\.jsonl\)"):
        MMEBDataset([a, tmp_path / "sh" / "s1"], img)
    # the layouts the hub writes still read: one subset's splits in their own folders
    _jsonl(tmp_path / "ok" / "MSCOCO" / "original-00000-of-00001.jsonl", _rows(2))
    _jsonl(tmp_path / "ok" / "MSCOCO" / "diverse_instruction-00000-of-00001.jsonl", _rows(1))
    _jsonl(tmp_path / "ok" / "N24News" / "original-00000-of-00001.jsonl", _rows(1))
    assert Counter(r["subset"] for r in MMEBDataset(tmp_path / "ok", img)) == {"MSCOCO": 3, "N24News": 1}
    # a subset not picked (subsets=) is neither refused nor warned about: only what is read is checked
    _jsonl(tmp_path / "c" / "VOC.jsonl", _rows(2))
    assert len(MMEBDataset([tmp_path / "a", tmp_path / "b", tmp_path / "c"], img, subsets=["VOC"])) == 2


def test_a_subset_missing_some_of_its_hub_shards_is_said(tmp_path, caplog):
    """original-00000-of-00003 and 00002 without 00001 (a partial download) read as a smaller subset, silently."""
    img = tmp_path / "images"
    _write_images(img, 4)
    for k in (0, 2):
        _jsonl(tmp_path / "d" / "MSCOCO" / f"original-0000{k}-of-00003.jsonl", _rows(1))
    _jsonl(tmp_path / "d" / "N24News" / "original-00000-of-00001.jsonl", _rows(1))
    with caplog.at_level(logging.WARNING, logger="llave_fast"):
        ds = MMEBDataset(tmp_path / "d", img)
    assert Counter(r["subset"] for r in ds) == {"MSCOCO": 2, "N24News": 1}  # trained on what is there
    said = [r.getMessage() for r in caplog.records if "shards" in r.getMessage()]
    assert len(said) == 1 and "MSCOCO (split original): 1 of its 3 shards missing (00001)" in said[0], said
    assert "N24News" not in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llave_fast"):
        assert len(MMEBDataset(tmp_path / "d", img, subsets=["N24News"])) == 1  # MSCOCO not read: not said
    assert not [r for r in caplog.records if "shards" in r.getMessage()]
    caplog.clear()
    _jsonl(tmp_path / "d" / "MSCOCO" / "original-00001-of-00003.jsonl", _rows(1))
    with caplog.at_level(logging.WARNING, logger="llave_fast"):
        assert len(MMEBDataset(tmp_path / "d", img)) == 4
    assert not [r for r in caplog.records if "shards" in r.getMessage()]


def test_a_plain_json_table_is_said_when_found_and_refused_with_a_hint_when_named(tmp_path, caplog):
    img = tmp_path / "images"
    _write_images(img, 4)
    d = tmp_path / "d"
    _jsonl(d / "MSCOCO.jsonl", _rows(2))
    saved = d / "sub" / "N24News.json"  # a table saved as JSON instead of JSON lines: was passed over silently
    saved.parent.mkdir()
    saved.write_text(json.dumps(_rows(3)))
    _jsonl(d / ".cache" / "x.json", ["{}"])  # hidden: searched as before (not at all)
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb_tables"):
        ds = MMEBDataset(d, img)
    assert Counter(r["subset"] for r in ds) == {"MSCOCO": 2}
    assert f"1 .json file(s) under {d} are not read (e.g. {saved}): MMEB data is JSON lines" in caplog.text
    with pytest.raises(InvalidArgument, match=rf"{re.escape(str(saved))}: unsupported data file type '\.json'; .*"
                                              r"MMEB data is JSON lines \(\.jsonl: one JSON object a line\)"):
        MMEBDataset(saved, img)
    with pytest.raises(FileNotFoundError, match=rf"no .* files under .*sub \(1 \.json file\(s\), e\.g\. "
                                                rf"{re.escape(str(saved))}: MMEB data is JSON lines"):
        MMEBDataset(d / "sub", img)


def test_hidden_folders_are_not_searched_and_endings_are_read_in_any_case_or_refused(tmp_path, caplog):
    import gzip

    from llave_fast.data.mmeb_eval import find_eval_datasets

    img = tmp_path / "images"
    _write_images(img, 4)
    d = tmp_path / "d"
    _jsonl(d / "UPPER.JSONL", _rows(2))
    (d / "Z.jsonl.gz").write_bytes(gzip.compress(_jsonl(tmp_path / "z.jsonl", _rows(3)).read_bytes()))
    for hidden in (".ipynb_checkpoints/UPPER-checkpoint.jsonl", ".git/x/S.jsonl", ".cache/S.parquet", ".S.jsonl"):
        _jsonl(d / hidden, _rows(1))
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb_tables"):
        ds = MMEBDataset(d, img)
    assert Counter(r["subset"] for r in ds) == {"UPPER": 2, "Z": 3}  # .JSONL and .jsonl.gz were passed over
    assert f"4 data-like file(s) under {d} are not read: 4 in hidden folders or with hidden names" in caplog.text
    assert len(MMEBDataset(d / ".git", img)) == 1  # a hidden folder named is read
    # compressed data that is not read: refused, naming the file, when named; found in a folder beside the
    # tables (metadata.json.gz, say), left out and counted in the warning, the tables still read
    for name, why in (("W.parquet.gz", "a parquet file compresses its own pages"), ("V.json.gz", "gunzip it and name "
                      "it .jsonl"), ("X.JSONL.BZ2", "only .jsonl.gz is read compressed")):
        f = d / "more" / name
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")
        with pytest.raises(ValueError, match=rf"{re.escape(str(f))}: files ending \.\w+\.\w+ are not read: .*{why}"):
            MMEBDataset(f, img)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb_tables"):
            assert Counter(r["subset"] for r in MMEBDataset(d, img)) == {"UPPER": 2, "Z": 3}
        assert "5 data-like file(s)" in caplog.text and "1 in a compressed form that is not read" in caplog.text
        f.unlink()
    # one folder holding a one-file subset twice (MSCOCO.jsonl beside its .jsonl.gz) was read twice: refused
    both = tmp_path / "both"
    _jsonl(both / "MSCOCO.jsonl", _rows(2))
    (both / "MSCOCO.jsonl.gz").write_bytes(gzip.compress((both / "MSCOCO.jsonl").read_bytes()))
    with pytest.raises(ValueError, match=r"MSCOCO\.jsonl and .*MSCOCO\.jsonl\.gz are both read as one folder's copies "
                                         r"of subset 'MSCOCO'"):
        MMEBDataset(both, img)
    # a cut gzip stream names the file
    cut = d / "more" / "Cut.jsonl.gz"
    cut.write_bytes((d / "Z.jsonl.gz").read_bytes()[:-12])
    with pytest.raises(BadDataError, match=rf"{re.escape(str(cut))}: not a readable gzip file"):
        MMEBDataset(cut, img)
    # the evaluation reader finds and reads the same files
    e = tmp_path / "e"
    e.mkdir()
    row = {"qry_text": "q", "tgt_text": ["a", "b"]}
    (e / "EV.jsonl.gz").write_bytes(gzip.compress((json.dumps(row) + "\n").encode()))
    _jsonl(e / ".ipynb_checkpoints" / "EV-checkpoint.jsonl", [row])
    assert [(x.name, x.files) for x in find_eval_datasets(e)] == [("EV", [str(e / "EV.jsonl.gz")])]


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "2", None])
def test_max_rows_per_subset_is_checked(tmp_path, bad):
    img = tmp_path / "images"
    _write_images(img, 4)
    f = _jsonl(tmp_path / "S.jsonl", _rows(4))
    if bad is None:  # the good values: None, an int, a numpy int
        assert [len(MMEBDataset(f, img, max_rows_per_subset=n)) for n in (None, 3, np.int64(2))] == [4, 3, 2]
        return
    with pytest.raises(ValueError, match=rf"max_rows_per_subset must be a positive int \(the first N rows of each "
                                         rf"subset\) or None \(every row\), got {re.escape(repr(bad))}$"):
        MMEBDataset(f, img, max_rows_per_subset=bad)


def test_rows_whose_image_llave_drops_are_counted_and_said_in_the_summary(tmp_path):
    from llave_fast.train import TrainConfig, summary_text
    from llave_fast.training.report import run_result

    img = tmp_path / "images"
    _write_images(img, 4)
    rows = _rows(4)
    rows[0]["qry"] = "no placeholder here"  # qry_image_path sub/q0.png: LLaVE drops it
    rows[1]["pos_image_path"] = "sub/q1.png"  # pos_text "yes" has no placeholder: dropped
    rows[2].update(qry="still none", qry_image_path="sub/missing.png")  # bad (missing image): skipped, not counted
    ds = MMEBDataset(_jsonl(tmp_path / "S.jsonl", rows), img, skip_bad_rows=True)
    assert (len(ds), len(ds.skipped), ds.rows_with_image_dropped) == (3, 1, 2)
    cfg = TrainConfig(steps=2, output_dir=str(tmp_path / "run"))
    r = run_result(cfg, steps=2, start=0, resumed=False, seconds=1.0, world=1, step_times=[0.5],
                   waits=[0.0], train_rows=len(ds), skipped_at_build=1, skipped_in_training=0, ckpt_root=str(tmp_path),
                   rows_with_image_dropped=ds.rows_with_image_dropped)
    assert ("  images:      2 of the rows read have an image on a side whose text has no image placeholder: LLaVE's "
            "rule drops it and embeds the text alone") in summary_text(r, cfg).splitlines()
    r["rows_with_image_dropped"] = None  # data that does not count them (synthetic): no line
    assert "images:" not in summary_text(r, cfg)


def test_negatives_not_used_are_never_checked_nor_opened(tmp_path):
    img = tmp_path / "images"
    _write_images(img, 5, neg=True)
    rows = _rows(5, neg=True)
    rows[0]["neg_text"] = ["two", "negatives"]  # not a string
    rows[1]["neg_text"] = 5
    rows[2]["neg_image_path"] = "../outside.png"  # leads out of the image folder
    (img / "sub" / "n3.png").write_bytes(b"\x89PNG truncated")  # does not decode
    f = _jsonl(tmp_path / "S.jsonl", rows)
    for check in ("exists", "decode"):
        ds = MMEBDataset(f, img, check_images=check)
        assert (len(ds), ds.skipped) == (5, [])  # was: rows 1 and 2 refused for their negatives
        assert [r["neg_id"] for r in ds] == [None] * 5
    ds = MMEBDataset(f, img, use_negatives=True, skip_bad_rows=True, check_images="decode")
    assert [row for _, row, _ in ds.skipped] == [0, 1, 2, 3] and len(ds) == 1
    for (_, _, why), want in zip(ds.skipped, ("column 'neg_text' holds a list of 2, expected a string",
                                              "column 'neg_text' holds int, expected a string",
                                              "image path outside the image folder: '../outside.png' (neg_image_path)",
                                              "unreadable image (cannot identify image file")):
        assert why.startswith(want), why


@pytest.mark.slow  # two gloo ranks
def test_check_images_decodes_a_share_on_each_rank_and_every_rank_drops_the_same_rows(tmp_path):
    from llave_fast.testing import spawn_ranks

    import _data_workers as W

    img = tmp_path / "img"
    rows = []
    for i in range(10):
        (img / f"i{i}.png").parent.mkdir(parents=True, exist_ok=True)
        if i in (3, 8):
            (img / f"i{i}.png").write_bytes(b"not a png")  # unreadable: found by one rank alone
        else:
            _image(img / f"i{i}.png")
        rows.append(_t2i(f"i{i}.png", text=f"text {i}"))
        rows.append(_t2i(f"i{i}.png", text=f"again {i}"))  # one image named twice is decoded once
    data = _jsonl(tmp_path / "S.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    spawn_ranks(W.decode_share, 2, str(data), str(img), str(out))
    got = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    opened = [set(g["opened"]) for g in got]
    assert [len(g["opened"]) for g in got] == [g["here"] for g in got] == [5, 5]  # each rank half (was 10 each)
    assert opened[0].isdisjoint(opened[1]) and opened[0] | opened[1] == {f"i{i}.png" for i in range(10)}
    assert [g["checked"] for g in got] == [10, 10]
    assert got[0]["skipped"] == got[1]["skipped"] and got[0]["rows"] == got[1]["rows"]
    assert sorted(r for _, r, _ in got[0]["skipped"]) == [6, 7, 16, 17]  # both rows of i3 and of i8, on both ranks
    assert all("unreadable image" in why for _, _, why in got[0]["skipped"])


def test_ranks_that_checked_other_images_are_refused_not_crashed(monkeypatch):
    """As many distinct images on every rank but other ones (other data): refused naming the image, not a bare
    KeyError from the lookup."""
    import torch.distributed as dist

    other = (2, [(0, "b.png", "unreadable image")])  # rank 1: two images too, one of them not named here

    def gather(box, mine):
        box[0], box[1] = mine, other

    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "all_gather_object", gather)
    paths = {"/d/a.png": (0, "a.png"), "/d/c.png": (0, "c.png")}
    with pytest.raises(InvalidArgument, match=r"rank 1 checked image 'b\.png' of table 0.*read other data"):
        MMEBDataset._exchange_problems(paths, {"/d/a.png": None})
    other = (2, [(0, "c.png", "unreadable image")])
    assert MMEBDataset._exchange_problems(paths, {"/d/a.png": None}) == {"/d/c.png": "unreadable image"}


def test_the_parquet_converters_partial_conversion_is_read_as_its_split_and_said(tmp_path, caplog):
    """The hub's parquet converter writes <subset>/partial-<split>/0000.parquet for a dataset it converted only in
    part: it was read as a subset named 'partial-original' (split None), whatever the folder above said."""
    img = tmp_path / "images"
    _write_images(img, 4)
    _parquet(tmp_path / "conv" / "MSCOCO" / "partial-original" / "0000.parquet", _rows(3))
    _parquet(tmp_path / "conv" / "MSCOCO" / "partial-original" / "0001.parquet", _rows(1))
    _parquet(tmp_path / "conv" / "MSCOCO" / "diverse_instruction" / "0000.parquet", _rows(2))
    _parquet(tmp_path / "conv" / "N24News" / "original" / "0000.parquet", _rows(2))
    with caplog.at_level(logging.WARNING, logger="llave_fast"):
        ds = MMEBDataset(tmp_path / "conv", img, split="original")
    assert ds.subsets == ["MSCOCO", "N24News"]
    assert Counter(r["subset"] for r in ds) == {"MSCOCO": 4, "N24News": 2}  # trained on what is there
    said = [r.getMessage() for r in caplog.records if "partial conversion" in r.getMessage()]
    part = tmp_path / "conv" / "MSCOCO" / "partial-original"
    assert len(said) == 1 and "1 subset(s)" in said[0] and f"MSCOCO (split original, in {part})" in said[0], said
    assert "N24News" not in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llave_fast"):  # the partial split not read: not said
        assert Counter(r["subset"] for r in MMEBDataset(tmp_path / "conv", img, split="diverse_instruction")) == \
            {"MSCOCO": 2}
    assert not [r for r in caplog.records if "partial conversion" in r.getMessage()]
    # beside the whole split's own folder: two copies of one subset and split, refused as before
    _parquet(tmp_path / "conv" / "MSCOCO" / "original" / "0000.parquet", _rows(1))
    with pytest.raises(InvalidArgument, match=r"original/0000\.parquet and .*partial-original/0000\.parquet are both "
                                              r"read as the same shard of subset 'MSCOCO' \(split 'original'\)"):
        MMEBDataset(tmp_path / "conv", img, split="original")
