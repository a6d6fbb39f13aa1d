"""MMEB-eval at full size: the 36-dataset table, reading (jsonl, parquet, shards), encode-once,
MMEB's hit rule with ties to the positive, mmeb_eval.json, the resume cache, bad rows, the table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from _helpers import run_cli as _main  # noqa: E402
from llave_fast.data.mmeb import BadDataError  # noqa: E402
from llave_fast.data.mmeb_eval import find_eval_datasets, read_eval_set, write_mmeb_eval  # noqa: E402
from llave_fast.data.mmeb_tasks import META_TASKS, MMEB_TASKS, meta_task_of, split_of  # noqa: E402
from llave_fast.evaluate import candidate_list_hits, format_mmeb_table  # noqa: E402




def _rows(path):
    if str(path).endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _distinct_inputs(files, root):
    """(text, absolute image path or None) of every query and candidate, deduplicated, recomputed here."""
    seen = set()
    for path in files:
        for r in _rows(path):
            seen.add((r["qry_text"], os.path.join(root, r["qry_img_path"]) if r["qry_img_path"] else None))
            for t, im in zip(r["tgt_text"], r["tgt_img_path"]):
                seen.add((t, os.path.join(root, im) if im else None))
    return seen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from llave_fast.model import build_tiny_model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_model().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Three MMEB-named sets (jsonl, one parquet file, a folder of two parquet shards) and one
    set MMEB does not have; candidates drawn from a shared pool."""
    root = tmp_path_factory.mktemp("mmeb")
    files = {
        "MSCOCO_i2t": write_mmeb_eval(str(root), "MSCOCO_i2t", 6, num_candidates=5, task="i2t", seed=1)[0],
        "VizWiz": write_mmeb_eval(str(root), "VizWiz", 5, num_candidates=4, task="vqa", seed=2,
                                  file_format="parquet")[0],
        "ImageNet-1K": write_mmeb_eval(str(root), "ImageNet-1K", 5, num_candidates=4, task="t2i", seed=3,
                                       file_format="parquet", shards=2)[0],
        "MySet": write_mmeb_eval(str(root), "MySet", 4, num_candidates=3, task="i2t", seed=4)[0],
    }
    return root, files


# ------------------------------------------------------------------------------ the table of 36
def test_the_36_datasets_by_meta_task_and_split():
    assert len(MMEB_TASKS) == 36
    by_task = {m: sum(1 for t, _ in MMEB_TASKS.values() if t == m) for m in META_TASKS}
    assert by_task == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    by_split = {s: sum(1 for _, x in MMEB_TASKS.values() if x == s) for s in ("ind", "ood")}
    assert by_split == {"ind": 20, "ood": 16}
    assert (meta_task_of("ImageNet-1K"), split_of("ImageNet-1K")) == ("classification", "ind")
    assert (meta_task_of("Visual7W-Pointing"), split_of("Visual7W-Pointing")) == ("grounding", "ood")
    assert (meta_task_of("WebQA"), split_of("Wiki-SS-NQ")) == ("retrieval", "ood")
    assert meta_task_of("MySet") is None and split_of("MySet") is None


# ------------------------------------------------------------------------------ hit rule
def test_ties_go_to_the_positive_and_a_strictly_better_candidate_wins():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.6, 0.8, 0.0], [0.6, 0.8, 0.0],
                                                    [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    # rows: 0 query; 1 the positive; 2 a distinct input with the positive's embedding; 3 scores higher; 4 lower
    hits = candidate_list_hits(e, [0, 0, 0, 0, 0], [[1, 1, 1, 1, 1], [1, 2, 4], [1, 4, 3], [1], [3, 1, 1]])
    assert hits.tolist() == [True, True, False, True, True]


def test_distinct_inputs_with_bit_identical_embeddings_tie_whatever_their_positions():
    """Six distinct inputs with one embedding (the same image under six paths): every list of them is
    a tie, so a hit. Scored by input index, a matrix-vector product over the six rows rounded them
    differently and 104 of 200 such lists were misses."""
    misses = []
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        q, c = (torch.nn.functional.normalize(torch.randn(128, generator=g), dim=0) for _ in range(2))
        emb = torch.stack([q] + [c] * 6)
        if not candidate_list_hits(emb, [0], [[1, 2, 3, 4, 5, 6]]).item():
            misses.append(seed)
    assert not misses, f"{len(misses)} of 200 ties scored as misses (seeds {misses[:5]}...)"
    # a candidate that truly scores higher still wins
    g = torch.Generator().manual_seed(0)
    q, c = (torch.nn.functional.normalize(torch.randn(128, generator=g), dim=0) for _ in range(2))
    assert not candidate_list_hits(torch.stack([q, c, c, q]), [0], [[1, 2, 3]]).item()


def test_five_copies_of_the_positive_are_a_hit_and_a_better_distinct_candidate_a_miss(tiny, tmp_path, capsys):
    from PIL import Image

    from llave_fast.model import LLaVEEmbedder

    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (24, 40), (30, 30, 200)).save(tmp_path / "blue.png")
    pos = "<|image_1|>\nrepresent the given image."
    m = LLaVEEmbedder.from_pretrained(str(tiny)).eval()
    q = "find an image of a red square"
    e = m.encode([q, pos, pos], [None, Image.open(tmp_path / "red.png"), Image.open(tmp_path / "blue.png")])
    better = "blue.png" if float(e[0] @ e[2]) > float(e[0] @ e[1]) else "red.png"
    worse = "red.png" if better == "blue.png" else "blue.png"
    rows = [{"qry_text": q, "qry_img_path": "", "tgt_text": [pos] * 5, "tgt_img_path": [worse] * 5},
            {"qry_text": q, "qry_img_path": "", "tgt_text": [pos, pos], "tgt_img_path": [worse, better]}]
    f = tmp_path / "Ties.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", f, "--output-dir", tmp_path / "out")
    assert rc == 0, err
    got = json.loads(out)["datasets"]["Ties"]
    assert (got["num_hits"], got["num_queries"], got["num_encoded"]) == (1, 2, 3)


# ------------------------------------------------------------------------------ reading
def test_every_hub_layout_of_mmeb_eval_names_its_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    def write(rel, n=1):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist([{"qry_text": f"q{i}", "qry_img_path": "", "tgt_text": ["a", "b"],
                                              "tgt_img_path": ["", ""]} for i in range(n)]), path)
        return str(path)

    names = ("ImageNet-1K", "N24News")
    layouts = {  # TIGER-Lab/MMEB-eval as stored (push_to_hub), flat data/, the hub's parquet converter, its subset level
        "hub": "{}/test-00000-of-00001.parquet", "flat": "data/{}-test-00000-of-00001.parquet",
        "conv": "{}/test/0000.parquet", "nosplit": "{}/0000.parquet"}
    for layout, pattern in layouts.items():
        made = {n: write(f"{layout}/" + pattern.format(n), n=k + 1) for k, n in enumerate(names)}
        found = find_eval_datasets([str(tmp_path / layout)])  # conv: datasets named '0000' (refused as two of one name)
        assert [(d.name, d.files) for d in found] == [(n, [made[n]]) for n in names], layout  # flat: refused
        assert [read_eval_set(d).num_queries for d in found] == [1, 2]
    (one,) = find_eval_datasets([str(tmp_path / "conv" / "N24News")])  # the converter's subset folder: was '0000'
    assert one.name == "N24News"
    # a converter's two shards are one dataset; one in another split, shard counts that differ, or a copy are refused
    second = write("conv/N24News/test/0001.parquet")
    assert find_eval_datasets([str(tmp_path / "conv" / "N24News")])[0].files == [one.files[0], second]
    write("conv/N24News/validation/0000.parquet")
    with pytest.raises(ValueError, match=r"shards of 'N24News' .* belong to different splits \(.*test/0000\.parquet and "
                                         r".*validation/0000\.parquet\)"):
        find_eval_datasets([str(tmp_path / "conv")])
    write("flat/data/N24News-test-00001-of-00002.parquet")
    with pytest.raises(ValueError, match=r"N24News-test-00000-of-00001\.parquet and .*N24News-test-00001-of-00002\."
                                         r"parquet are shards of 1 and of 2 of dataset 'N24News'"):
        find_eval_datasets([str(tmp_path / "flat")])
    write("hub2/N24News/test-00000-of-00001.parquet")
    (tmp_path / "hub2" / "N24News" / "test-00000-of-00001.jsonl").write_text(
        json.dumps({"qry_text": "q", "tgt_text": ["a", "b"]}) + "\n")
    with pytest.raises(ValueError, match=r"are both shard 0 of dataset 'N24News'"):
        find_eval_datasets([str(tmp_path / "hub2")])
    # a dataset without some of its shards is refused (its score would pass for the whole dataset's)
    write("part/N24News/test-00000-of-00003.parquet")
    write("part/N24News/test-00002-of-00003.parquet")
    with pytest.raises(ValueError, match=r"1 dataset\(s\) lack some of their hub shards .*N24News \(split test\): 1 of "
                                         r"its 3 shards missing \(00001\)"):
        find_eval_datasets([str(tmp_path / "part")])
    write("part/N24News/test-00001-of-00003.parquet")
    assert len(find_eval_datasets([str(tmp_path / "part")])[0].files) == 3
    # the hub parquet converter's partial conversion (<name>/partial-test/: the first part of a dataset too large for
    # it) is refused, as a partial download is (it was a dataset named 'partial-test', scored as if whole)
    write("conv_part/N24News/partial-test/0000.parquet")
    write("conv_part/N24News/partial-test/0001.parquet")
    write("conv_part/ImageNet-1K/test/0000.parquet")
    with pytest.raises(ValueError, match=r"1 dataset\(s\) are the hub parquet converter's partial conversion .*: "
                                         r"N24News \(split test, in .*conv_part/N24News/partial-test\): download"):
        find_eval_datasets([str(tmp_path / "conv_part")])
    assert [d.name for d in find_eval_datasets([str(tmp_path / "conv_part" / "ImageNet-1K")])] == ["ImageNet-1K"]


def test_datasets_are_named_by_file_or_shard_folder(sets, tmp_path):
    root, files = sets
    found = find_eval_datasets([str(root)])
    assert sorted(d.name for d in found) == sorted(files)
    shards = next(d for d in found if d.name == "ImageNet-1K")
    assert [os.path.basename(p) for p in shards.files] == ["test-00000-of-00002.parquet", "test-00001-of-00002.parquet"]
    es = read_eval_set(shards, str(root))
    assert es.num_queries == 5  # both shards, one dataset
    assert len(es.pairs) == len(_distinct_inputs(shards.files, str(root)))
    assert read_eval_set(shards, str(root), max_queries=4).num_queries == 4
    # the same name twice, and a mix of MMEB-eval and MMEB-train files, are refused
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "VizWiz.jsonl").write_text(json.dumps({"qry_text": "x", "tgt_text": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="two datasets are named 'VizWiz'"):
        find_eval_datasets([files["VizWiz"][0], str(other / "VizWiz.jsonl")])
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"qry": "x", "qry_image_path": "", "pos_text": "a", "pos_image_path": ""}) + "\n")
    with pytest.raises(ValueError, match="mixes MMEB-eval files"):
        find_eval_datasets([files["MySet"][0], str(train)])
    assert find_eval_datasets([str(train)]) is None
    # shards of two splits in one folder are not one dataset (they used to be merged, rows counted twice)
    import shutil

    mixed = tmp_path / "mixed" / "ImageNet-1K"
    mixed.mkdir(parents=True)
    for name in ("test-00000-of-00001.parquet", "validation-00000-of-00001.parquet"):
        shutil.copy(shards.files[0], mixed / name)
    with pytest.raises(ValueError, match=r"shards of 'ImageNet-1K' .* different splits \(test-00000-of-00001\.parquet "
                                         r"and validation-00000-of-00001\.parquet\)"):
        find_eval_datasets([str(mixed)])
    assert [d.files for d in find_eval_datasets([str(mixed / "test-00000-of-00001.parquet")])] == \
        [[str(mixed / "test-00000-of-00001.parquet")]]
    # one file under two spellings is one file; a byte-order mark does not hide the eval columns
    viz = files["VizWiz"][0]
    again = os.path.join(os.path.dirname(viz), "..", os.path.basename(os.path.dirname(viz)), os.path.basename(viz))
    (found,) = find_eval_datasets([viz, again])
    assert found.files == [viz]
    # two datasets whose files are links to one file stay two datasets
    (shared := tmp_path / "shared.jsonl").write_text(json.dumps({"qry_text": "q", "tgt_text": ["a", "b"]}) + "\n")
    (tmp_path / "A.jsonl").symlink_to(shared)
    (tmp_path / "B.jsonl").symlink_to(shared)
    assert [d.name for d in find_eval_datasets([str(tmp_path / "A.jsonl"), str(tmp_path / "B.jsonl")])] == ["A", "B"]
    bom = tmp_path / "Bom.jsonl"
    bom.write_text(json.dumps({"qry_text": "q", "tgt_text": ["a", "b"]}) + "\n", encoding="utf-8-sig")
    assert [d.name for d in find_eval_datasets([str(bom)])] == ["Bom"]
    assert read_eval_set(find_eval_datasets([str(bom)])[0]).num_queries == 1


# ------------------------------------------------------------------------------ end to end
def test_cli_end_to_end_encodes_each_distinct_input_once_and_scores_as_mmeb(sets, tiny, tmp_path, capsys,
                                                                          monkeypatch):
    from llave_fast.model import LLaVEEmbedder

    root, files = sets
    rows_encoded = []
    real_forward = LLaVEEmbedder.forward

    def counting(self, batch):
        rows_encoded.append(batch["input_ids"].shape[0])
        return real_forward(self, batch)

    monkeypatch.setattr(LLaVEEmbedder, "forward", counting)
    out_dir = tmp_path / "out"
    data = [files["MSCOCO_i2t"][0], files["VizWiz"][0], os.path.join(root, "ImageNet-1K"), files["MySet"][0]]
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", *data, "--image-dir", root,
                         "--output-dir", out_dir, "--batch", "4")
    assert rc == 0, err
    result = json.loads(out)
    with open(out_dir / "mmeb_eval.json") as f:
        assert json.load(f) == result
    ds = result["datasets"]
    assert list(ds) == ["MSCOCO_i2t", "VizWiz", "ImageNet-1K", "MySet"]
    # encode once: the rows the model saw are exactly the distinct (text, image) inputs
    distinct = {n: len(_distinct_inputs(fs, str(root))) for n, fs in files.items()}
    assert {n: ds[n]["num_encoded"] for n in ds} == distinct
    assert sum(rows_encoded) == sum(distinct.values())
    assert max(rows_encoded) <= 4
    assert {n: ds[n]["num_queries"] for n in ds} == {"MSCOCO_i2t": 6, "VizWiz": 5, "ImageNet-1K": 5, "MySet": 4}
    assert {n: (ds[n]["meta_task"], ds[n]["split"]) for n in ds} == {
        "MSCOCO_i2t": ("retrieval", "ind"), "VizWiz": ("vqa", "ood"), "ImageNet-1K": ("classification", "ind"),
        "MySet": (None, None)}
    p = {n: ds[n]["p_at_1"] for n in ds}
    assert result["meta_tasks"] == {"classification": p["ImageNet-1K"], "vqa": p["VizWiz"],
                                    "retrieval": p["MSCOCO_i2t"], "grounding": None}
    assert result["ind"] == pytest.approx((p["MSCOCO_i2t"] + p["ImageNet-1K"]) / 2)
    assert result["ood"] == p["VizWiz"]
    assert result["overall"] == pytest.approx(sum(p.values()) / 4) and result["p_at_1"] == result["overall"]
    assert len(result["mmeb_not_scored"]) == 33
    assert (result["model"], result["device"], result["dtype"]) == (str(tiny), "cpu", "float32")
    # the README's "Output." list names every field of the result and of a dataset's record
    readme = Path(__file__).resolve().parent.parent / "README.md"
    bullet = readme.read_text(encoding="utf-8").split("- **Output.** `OUT/mmeb_eval.json`", 1)[1].split("\n- **", 1)[0]
    fields = set(result) | {k for d in ds.values() for k in d}
    assert not {k for k in fields if f"`{k}`" not in bullet}, "README, MMEB evaluation, Output: fields not named"
    # P@1 recomputed here from embeddings of each input alone (batch of 1), scored by MMEB's rule
    monkeypatch.setattr(LLaVEEmbedder, "forward", real_forward)
    from PIL import Image

    m = LLaVEEmbedder.from_pretrained(str(tiny)).eval()

    def emb(text, rel):
        img = Image.open(os.path.join(root, rel)).convert("RGB") if rel else None
        return m.encode([text], [img])[0].double()

    for name in ("MSCOCO_i2t", "VizWiz"):
        hits = 0
        for r in _rows(files[name][0]):
            q = emb(r["qry_text"], r["qry_img_path"])
            s = [float(q @ emb(t, im)) for t, im in zip(r["tgt_text"], r["tgt_img_path"])]
            assert min(abs(s[0] - x) for x in s[1:]) > 1e-5, "a near-tie: the recomputation cannot decide"
            hits += s[0] >= max(s[1:])
        assert ds[name]["num_hits"] == hits and ds[name]["p_at_1"] == hits / ds[name]["num_queries"]
    # the table: grouped by meta-task, percentages with one decimal, the means
    table = format_mmeb_table(result)
    assert table in err
    lines = table.splitlines()
    assert lines[0].startswith("| meta-task | dataset |")
    order = [ln.split("|")[2].strip() for ln in lines[2:6]]
    assert order == ["ImageNet-1K", "VizWiz", "MSCOCO_i2t", "MySet"]
    assert f"| vqa | VizWiz | OOD | 5 | {100 * p['VizWiz']:.1f} |" in table
    assert f"| **overall** | mean of 4 | | 20 | **{100 * result['overall']:.1f}** |" in table


def test_an_interrupted_evaluation_resumes_and_a_changed_setting_recomputes(sets, tiny, tmp_path, capsys,
                                                                          monkeypatch):
    import llave_fast.evaluate as ev

    root, files = sets
    encoded = []
    real = ev.encode_pairs

    def counting(model, pairs, **kw):
        encoded.append(kw["desc"])
        return real(model, pairs, **kw)

    monkeypatch.setattr(ev, "encode_pairs", counting)
    out_dir = tmp_path / "out"
    args = ["eval", "--model", tiny, "--data", files["MSCOCO_i2t"][0], files["VizWiz"][0], "--image-dir", root,
            "--output-dir", out_dir]
    rc, out, err = _main(capsys, *args)
    assert rc == 0, err
    first = json.loads(out)
    assert encoded == ["MSCOCO_i2t", "VizWiz"]
    cache = out_dir / "mmeb_eval_cache"
    assert sorted(os.listdir(cache)) == ["MSCOCO_i2t.json", "VizWiz.json"]
    # interrupted before VizWiz was written: only VizWiz is computed again, with the same result
    os.remove(cache / "VizWiz.json")
    encoded.clear()
    rc, out, err = _main(capsys, *args)
    assert rc == 0, err
    assert encoded == ["VizWiz"]
    assert "MSCOCO_i2t: P@1" in err and "from " + str(cache / "MSCOCO_i2t.json") in err
    again = json.loads(out)
    assert again["datasets"] == first["datasets"] | {"VizWiz": again["datasets"]["VizWiz"]}
    assert again["datasets"]["VizWiz"]["p_at_1"] == first["datasets"]["VizWiz"]["p_at_1"]
    # all cached: nothing encoded, the model not even loaded
    encoded.clear()
    real_load = ev.load_eval_model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded though every dataset is cached")

    monkeypatch.setattr(ev, "load_eval_model", no_load)
    assert _main(capsys, *args)[0] == 0 and encoded == []
    monkeypatch.setattr(ev, "load_eval_model", real_load)
    # another query cap is another evaluation: recomputed, and the reason is printed
    rc, out, err = _main(capsys, *args, "--max-queries", "2")
    assert rc == 0, err
    assert encoded == ["MSCOCO_i2t", "VizWiz"]
    # (the images key changes too: it covers the images of the rows read)
    assert "cached with other settings (" in err and "max_queries: None -> 2); recomputing" in err
    assert json.loads(out)["datasets"]["VizWiz"]["num_queries"] == 2
    # a corrupt cache file is recomputed, saying so
    (cache / "VizWiz.json").write_text("{not json")
    encoded.clear()
    rc, out, err = _main(capsys, *args, "--max-queries", "2")
    assert rc == 0 and encoded == ["VizWiz"] and "unreadable cache" in err
    # valid JSON of another shape (a key that is no mapping, a missing result) too, and each cache file is read once
    opened = []
    real_open = open

    def counting_open(path, *a, **k):
        if str(path).startswith(str(cache)):
            opened.append(os.path.basename(str(path)))
        return real_open(path, *a, **k)

    for bad in ({"key": [1], "result": {}}, {"key": {}}, [1, 2]):
        (cache / "VizWiz.json").write_text(json.dumps(bad))
        encoded.clear()
        opened.clear()
        monkeypatch.setattr("builtins.open", counting_open)
        rc, out, err = _main(capsys, *args, "--max-queries", "2")
        monkeypatch.setattr("builtins.open", real_open)
        assert rc == 0 and encoded == ["VizWiz"] and "unreadable cache" in err, (bad, err)
        assert opened.count("MSCOCO_i2t.json") == 1, opened
    # what an evaluation writes into the model folder is not part of the model
    from llave_fast.evaluate import model_key

    before = model_key(str(tiny), torch.device("cpu"), torch.float32)
    (tiny / "mmeb_eval.json").write_text("{}")
    (tiny / ".DS_Store").write_text("")
    assert model_key(str(tiny), torch.device("cpu"), torch.float32) == before
    # a model folder whose config (not only its weights) changed is another model: recomputed
    config = os.path.join(tiny, "config.json")
    st = os.stat(config)
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    encoded.clear()
    rc, out, err = _main(capsys, *args, "--max-queries", "2")
    assert rc == 0 and encoded == ["MSCOCO_i2t", "VizWiz"] and "cached with other settings (model_files:" in err, err
    # an image the rows name was replaced (same path, new contents): recomputed, the images named as the reason
    images = sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert images
    for img in images:
        st = os.stat(img)
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    encoded.clear()
    rc, out, err = _main(capsys, *args, "--max-queries", "2")
    assert rc == 0 and encoded == ["MSCOCO_i2t", "VizWiz"] and "cached with other settings (images:" in err, err


def test_bad_rows_name_the_file_and_the_row(tiny, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"qry_text": "a cat", "qry_img_path": "", "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]}
    f = tmp_path / "Bad.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tgt_img_path": [""]}) + "\n")
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", f)
    assert rc == 1 and "Bad.jsonl:2: tgt_text has 2 candidates but tgt_img_path has 1" in err
    assert "Traceback" not in err
    pq.write_table(pa.Table.from_pylist([good, good, {**good, "tgt_text": [], "tgt_img_path": []}]),
                   tmp_path / "BadP.parquet")
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", tmp_path / "BadP.parquet")
    assert rc == 1 and "BadP.parquet: row 3: tgt_text is an empty candidate list" in err
    (tmp_path / "broken.png").write_bytes(b"not a png")
    f = tmp_path / "BadImg.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tgt_img_path": ["", "broken.png"]}) + "\n")
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", f)
    assert rc == 1 and "BadImg.jsonl:2: image " in err and "broken.png cannot be read" in err
    # a text the processor refuses (an image placeholder without an image): the row behind that input
    f = tmp_path / "BadText.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "tgt_text": ["cat", "<|image_1|> a dog"]}) + "\n")
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", f)
    assert rc == 1 and "BadText.jsonl:2: the text has an image placeholder" in err and "Traceback" not in err
    with pytest.raises(BadDataError, match=r"Bad\.jsonl:2: "):
        read_eval_set(find_eval_datasets([str(tmp_path / "Bad.jsonl")])[0])


def test_query_flags_say_what_they_apply_to(tiny, tmp_path, capsys, sets):
    root, files = sets
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--max-queries", "3")
    assert rc == 1 and "--max-queries 3 applies to MMEB-eval files" in err
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--output-dir", tmp_path)
    assert rc == 1 and "applies to MMEB-eval files" in err
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", files["MySet"][0], "--image-dir", root,
                         "--num-eval", "2", "--max-queries", "3")
    assert rc == 1 and "give --max-queries alone" in err
    # --num-eval with MMEB-eval files caps each dataset, with a note; comma-separated --data still works
    rc, out, err = _main(capsys, "eval", "--model", tiny, "--data", f"{files['MySet'][0]},{files['MSCOCO_i2t'][0]}",
                         "--image-dir", root, "--num-eval", "2")
    assert rc == 0, err
    assert "caps the queries of each dataset, as --max-queries 2 does" in err and "no --output-dir" in err
    res = json.loads(out)
    assert {n: d["num_queries"] for n, d in res["datasets"].items()} == {"MySet": 2, "MSCOCO_i2t": 2}
    assert res["max_queries"] == 2


def test_a_non_utf8_or_deeply_nested_eval_line_is_bad_data_at_file_line(tmp_path):
    from llave_fast.data.mmeb_eval import read_eval_file

    good = json.dumps({"qry_text": "a", "qry_img_path": "", "tgt_text": ["x"], "tgt_img_path": [""]}).encode()
    f = tmp_path / "Odd.jsonl"
    f.write_bytes(good + b"\n" + b'{"qry_text": "caf\xe9"}\n')
    with pytest.raises(BadDataError, match=r"Odd\.jsonl:2: not UTF-8 text"):
        read_eval_file(str(f))
    f.write_bytes(good + b"\n\n" + b"[" * 100000 + b"]" * 100000 + b"\n")
    with pytest.raises(BadDataError, match=r"Odd\.jsonl:3: invalid JSON: nested too deeply"):
        read_eval_file(str(f))


def test_queries_with_a_single_candidate_are_counted_in_a_warning(tmp_path, caplog):
    """One candidate is a hit whatever the model (a tgt_text string is read as one candidate): the
    reader says how many queries are such, so a perfect score on them is not mistaken for skill."""
    import logging

    from llave_fast.data.mmeb_eval import read_eval_file

    f = tmp_path / "Single.jsonl"
    rows = [{"qry_text": "x", "tgt_text": "a cow"},
            {"qry_text": "y", "tgt_text": ["a cow", "a dog"], "tgt_img_path": ["", ""]},
            {"qry_text": "z", "tgt_text": ["a hen"], "tgt_img_path": [""]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb_eval"):
        got = read_eval_file(str(f))
    assert [len(r.cand_texts) for r in got] == [1, 2, 1]
    assert "Single.jsonl: 2 of 3 queries have a single candidate" in caplog.text, caplog.text
    caplog.clear()
    from llave_fast.data.mmeb_eval import find_eval_datasets as find, read_eval_set as read_set

    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb_eval"):
        read_set(find([str(f)])[0])  # the reader the eval command takes
    assert "Single: 2 of 3 queries have a single candidate" in caplog.text, caplog.text
    f.write_text(json.dumps({"qry_text": "x", "tgt_text": '["a cow", "a cat"]'}) + "\n")
    with pytest.raises(BadDataError, match=r"Single\.jsonl:1: tgt_text holds the string .*a list written as text"):
        read_eval_file(str(f))
    caplog.clear()
    f.write_text(json.dumps(rows[1]) + "\n")
    with caplog.at_level(logging.WARNING, logger="llave_fast.data.mmeb_eval"):
        read_eval_file(str(f))
    assert "single candidate" not in caplog.text


def test_a_name_close_to_an_mmeb_dataset_is_pointed_out(caplog):
    import logging

    from llave_fast.evaluate import _warn_near_mmeb_names

    with caplog.at_level(logging.WARNING, logger="llave_fast.evaluate"):
        _warn_near_mmeb_names(["MSCOCO-i2t", "ImageNet1K", "VizWiz", "MySet"])
    assert "'MSCOCO-i2t' is not one of MMEB's 36 (did you mean 'MSCOCO_i2t'?)" in caplog.text
    assert "'ImageNet1K' is not one of MMEB's 36 (did you mean 'ImageNet-1K'?)" in caplog.text
    assert "'VizWiz'" not in caplog.text and "MySet" not in caplog.text  # MMEB's own, and a name of its own
