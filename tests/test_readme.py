"""The README's data-format examples and Python API snippet run through the real code, so they cannot drift."""

from __future__ import annotations

import json
import os
import re

import pytest
from PIL import Image

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example(name: str) -> str:
    """The fenced block right after ``<!-- example: NAME ... -->`` in the README."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- example: " + re.escape(name) + r"\b[^>]*-->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README has no example block {name!r}"
    return m.group(1)


def _write_with_images(tmp_path, name: str, image_keys) -> tuple[str, list[dict]]:
    """The example as a .jsonl file in tmp_path, with a small image at every path it names."""
    block = _example(name)
    rows = [json.loads(line) for line in block.splitlines() if line.strip()]
    for row in rows:
        for key in image_keys:
            paths = row.get(key) or []
            for rel in [paths] if isinstance(paths, str) else paths:
                if rel:
                    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
                    Image.new("RGB", (24, 16), (200, 30, 30)).save(tmp_path / rel)
    path = tmp_path / f"{name}.jsonl"
    path.write_text(block, encoding="utf-8")
    return str(path), rows


def test_readme_mmeb_train_rows_read_and_collate(tmp_path):
    from llave_fast.data import MMEBDataset, PairCollator
    from llave_fast.data.mmeb import MMEB_COLUMNS
    from llave_fast.model import build_tiny_model

    path, rows = _write_with_images(tmp_path, "mmeb-train", ("qry_image_path", "pos_image_path", "neg_image_path"))
    assert len(rows) == 3
    assert {c for r in rows for c in r} == set(MMEB_COLUMNS)  # the example shows every column
    ds = MMEBDataset([path], str(tmp_path))
    assert len(ds) == 3 and ds.skipped == []
    recs = [ds[i] for i in range(3)]
    for r, rec in zip(rows, recs):
        assert rec["qry"] == r["qry"] and rec["pos_text"] == r["pos_text"]
        assert (rec["qry_image"] is not None) == bool(r["qry_image_path"])
        assert (rec["pos_image"] is not None) == bool(r["pos_image_path"])
    assert ds.query_has_image().tolist() == [True, False, True]
    with_neg = MMEBDataset([path], str(tmp_path), use_negatives=True, skip_bad_rows=True)
    assert len(with_neg) == 1 and with_neg[0]["neg_image"] is not None  # only the third row has a negative
    # the texts (instructions, placeholders) go through the model's processor as they are
    batch = PairCollator(build_tiny_model().processor)(recs)
    assert batch["query"]["input_ids"].shape[0] == 3 and batch["target"]["input_ids"].shape[0] == 3


def test_readme_mmeb_eval_rows_read(tmp_path):
    from llave_fast.data.mmeb_eval import EVAL_COLUMNS, is_eval_file, read_eval_file

    path, rows = _write_with_images(tmp_path, "mmeb-eval", ("qry_img_path", "tgt_img_path"))
    assert len(rows) == 3
    assert {c for r in rows for c in r} == set(EVAL_COLUMNS)
    assert is_eval_file(path)
    read = read_eval_file(path, str(tmp_path))
    assert len(read) == 3
    assert [len(r.cand_texts) for r in read] == [len(r["tgt_text"]) for r in rows]
    assert read[0].qry_image is not None and read[1].qry_image is None
    assert read[1].cand_images[0].endswith("dogs.jpg") and read[2].cand_images == [None, None, None]


def test_readme_python_api_snippet_runs(monkeypatch):
    import llave_fast.train as T

    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        return {"steps": cfg.steps}

    monkeypatch.setattr(T, "train", fake_train)
    code = _example("python-api")
    scope: dict = {}
    exec(compile(code, "README.md:python-api", "exec"), scope)
    cfg = seen["cfg"]
    assert isinstance(cfg, T.TrainConfig)
    assert cfg.data == "MMEB-train/" and cfg.global_batch == 1024 and cfg.output_dir == "runs/llave-0.5b"
    assert cfg.lr_vision == T.TrainConfig.from_json("llave_0.5b.json").lr_vision  # the preset's values stay
    assert scope["metrics"] == {"steps": cfg.steps}


@pytest.mark.parametrize("name", ["mmeb-train", "mmeb-eval"])
def test_readme_examples_have_three_rows(name):
    assert len([ln for ln in _example(name).splitlines() if ln.strip()]) == 3


# ------------------------------------------------------------------ the result tables, against their files
RESULTS = os.path.join(os.path.dirname(README), "benchmarks", "results")
MiB = 2**20


def _table_after(header: str) -> list[list[str]]:
    """The cells of each data row of the README table whose header line starts with ``header``."""
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip().replace("**", "") for c in ln.strip().strip("|").split("|")])
    return rows


def _shown(number: str, value: float) -> bool:
    """Whether ``number`` as printed is ``value`` rounded to the digits printed."""
    decimals = len(number.split(".")[1]) if "." in number else 0
    return abs(float(number) - value) <= 0.5 * 10 ** -decimals + 1e-9


def _records(*files) -> dict:
    out = {}
    for name in files:
        with open(os.path.join(RESULTS, name)) as f:
            for r in json.load(f)["results"]:
                if r.get("status", "ok") == "ok" and r.get("timing", {}).get("median_ms"):
                    out[(r["label"], r["B"])] = (r["timing"]["median_ms"]["fwd_bwd"], r["memory"]["peak_bytes"] / MiB)
    return out


def test_the_h200_loss_table_is_what_its_result_files_hold():
    """Every time and memory figure of the README's H200 loss table, against 2026-11-29.json and -262k.json
    (the tables are written by hand from report.py's output: a slip in a digit fails here)."""
    rec = _records("nvidia-h200/2026-11-29.json", "nvidia-h200/2026-11-29-262k.json")
    labels = ["triton_strip", "reference", "compile", "torch", "triton_tiles", "gemm3", "triton_strip@alpha=0",
              "inf_cl@alpha=0"]
    rows = _table_after("| B = N | fused | eager LLaVE |")
    assert [r[0] for r in rows] == ["4096", "16384", "65536", "262144"], rows
    checked = 0
    for row in rows:
        B = int(row[0])
        for label, cell in zip(labels, row[1:]):
            m = re.fullmatch(r"([\d.]+) ms(?: \((\d+)\))?", cell)
            if m is None:  # "–" (not run) or a note (not finished)
                assert (label, B) not in rec or label == "compile", (label, B, cell)
                continue
            ms, mib = rec[(label, B)]
            assert _shown(m.group(1), ms), (label, B, cell, ms)
            assert m.group(2) is None or int(m.group(2)) == round(mib), (label, B, cell, mib)
            checked += 1
    assert checked >= 25, checked


def test_the_cpu_loss_table_is_what_its_result_file_holds():
    """The README's CPU loss table (2026-12-06-loss.json): times, memory and both ratio columns."""
    rec = _records("amd-epyc-2-cores/2026-12-06-loss.json")
    rows = _table_after("| B = N, d = 1024 | torch (cache) |")
    assert [r[0] for r in rows] == ["2048", "4096", "8192"], rows
    for row in rows:
        B = int(row[0])
        for label, cell in zip(("torch", "torch_chunked", "reference"), row[1:4]):
            ms, mib = rec[(label, B)]
            m = re.fullmatch(r"([\d.]+) ms, (\d+) MiB", cell)
            assert m and _shown(m.group(1), ms) and int(m.group(2)) == round(mib), (label, B, cell, ms, mib)
        ref_ms, ref_mib = rec[("reference", B)]
        for label, cell in zip(("torch", "torch_chunked"), row[4:6]):
            time_r, mem_r = re.findall(r"\d+\.\d+", re.sub(r"\(target[^)]*\)", "", cell))
            ms, mib = rec[(label, B)]
            assert _shown(time_r, ms / ref_ms) and _shown(mem_r, mib / ref_mib), (label, B, cell)


def test_the_default_job_table_is_what_its_result_file_holds():
    """The README's by-task table of the default job, against 2026-12-07-default-job-warmup48.json (seed 0,
    the preset as shipped: its warm-up is checked against the file's too)."""
    with open(os.path.join(RESULTS, "amd-epyc-2-cores", "2026-12-07-default-job-warmup48.json")) as f:
        run = json.load(f)["default_job"][0]
    from llave_fast.train import TrainConfig

    assert run["warmup_steps"] == TrainConfig.from_json("tiny_cpu.json").warmup_steps == 48
    with open(README, encoding="utf-8") as f:
        text = f.read()
    quiet = json.load(open(os.path.join(RESULTS, "amd-epyc-2-cores", "2026-12-07-default-job-warmup48.json")))[
        "rerun_on_a_quiet_machine"]
    assert quiet["same_scores_as_seed_0_above"] and quiet["by_task"] == run["by_task"]
    assert "**149 s wall in all**" in text and _shown("149", quiet["wall_s"]), quiet["wall_s"]
    assert "(237 s, 0.86 s/step at 4.2 to 5.2" in text and _shown("237", run["wall_s"]), run["wall_s"]
    assert run["seed"] == 0
    rows = _table_after("| task | P@1 | chance | × chance |")
    assert len(rows) == 3, rows
    for row in rows:
        task = re.search(r"`(\w+)`", row[0]).group(1)
        got = run["by_task"][task]
        assert _shown(row[1], got["p_at_1"]) and _shown(row[2], got["chance"]), (task, row, got)
        assert _shown(row[3].rstrip("×"), got["p_at_1"] / got["chance"]), (task, row, got)
        assert (int(row[4]), int(row[5])) == (got["num_queries"], got["num_candidates"]), (task, row, got)


def test_the_default_job_by_kind_table_is_what_its_result_file_holds():
    """The README's VQA-style score by question kind, against 2026-12-07-default-job-vqa-by-kind.json
    (benchmarks/vqa_by_kind.py on the shipped job's seeds 0-2: their by-task scores are the ones
    2026-12-07-default-job-warmup48.json records, so the kinds are today's preset's), and the previous
    preset's seed-0 figures it quotes against 2026-11-30-default-job.json."""
    from llave_fast.train import TrainConfig

    folder = os.path.join(RESULTS, "amd-epyc-2-cores")
    with open(os.path.join(folder, "2026-12-07-default-job-vqa-by-kind.json")) as f:
        runs = {r["seed"]: r for r in json.load(f)["runs"]}
    with open(os.path.join(folder, "2026-12-07-default-job-warmup48.json")) as f:
        shipped = {r["seed"]: r for r in json.load(f)["default_job"]}
    assert sorted(runs) == sorted(shipped) == [0, 1, 2]
    for seed, run in runs.items():
        assert run["by_task"] == shipped[seed]["by_task"], seed
        assert run["warmup_steps"] == TrainConfig.from_json("tiny_cpu.json").warmup_steps, seed
    with open(os.path.join(folder, "2026-12-08-vqa-question-alone.json")) as f:
        alone = {r["seed"]: r for r in json.load(f)["runs"]}
    for seed in (0, 1, 2):  # the question-alone file's split is the runs' split: the same queries per kind
        assert {k: v["queries"] for k, v in alone[seed]["vqa"].items() if k != "all"} == {
            k: v["queries"] for k, v in runs[seed]["vqa"]["by_kind"].items()}, seed
    rows = _table_after("| question kind | seed 0 | seed 1 | seed 2 |")
    assert [r[0] for r in rows] == [*runs[0]["vqa"]["by_kind"], "all (VQA-style)"], rows
    for row in rows:
        for seed, cell in zip((0, 1, 2), row[1:4]):
            v, q = runs[seed]["vqa"], alone[seed]["vqa"]
            got, bar = (v, q["all"]) if row[0].startswith("all") else (v["by_kind"][row[0]], q[row[0]])
            assert cell == f"{got['hits']} of {got['queries']} ({bar['hits']})", (row[0], seed, cell, got)
    with open(README, encoding="utf-8") as f:
        flat = " ".join(f.read().split())
    m = re.search(r"\(7680 VQA-style items; ties alphabetical\) scores ([\d.]+) / ([\d.]+) / ([\d.]+) \(seeds 0 / 1 / 2",
                  flat)
    assert m, "the question-alone sentence"
    for seed, shown in zip((0, 1, 2), m.groups()):
        assert _shown(shown, alone[seed]["vqa"]["all"]["p_at_1"]), (seed, shown)
        assert alone[seed]["training_vqa_items"] == 7680 and alone[seed]["num_train"] == TrainConfig.from_json(
            "tiny_cpu.json").num_train
    with open(README, encoding="utf-8") as f:
        text = " ".join(f.read().split())
    m = re.search(r"With the previous preset \(warm-up 10, VQA-style ([\d.]+) on seed 0\), seed 0's kinds were "
                  r"((?:\w+ \d+ of \d+(?:, | and )?)+)", text)
    assert m, "the previous preset's by-kind sentence"
    with open(os.path.join(folder, "2026-11-30-default-job.json")) as f:
        old = json.load(f)["vqa_by_question_kind"]["seed0"]
    old["count"] = {k: old.pop(f"count_{k}") for k in ("all", "colour_or_shape")}  # one kind, the generator's
    hits = {k: round(v["p_at_1"] * v["queries"]) for k, v in old.items() if k != "count"}
    queries = {k: v["queries"] for k, v in old.items() if k != "count"}
    hits["count"] = sum(round(v["p_at_1"] * v["queries"]) for v in old["count"].values())
    queries["count"] = sum(v["queries"] for v in old["count"].values())
    quoted = re.findall(r"(\w+) (\d+) of (\d+)", m.group(2))
    assert len(quoted) == 5 and {k for k, _, _ in quoted} == set(hits), quoted
    for kind, h, q in quoted:
        assert (int(h), int(q)) == (hits[kind], queries[kind]) == (hits[kind], runs[0]["vqa"]["by_kind"][kind][
            "queries"]), kind  # the same split: the same questions per kind
    assert _shown(m.group(1), sum(hits.values()) / sum(queries.values()))
    # the sentences that read the answers retrieved most often
    kinds = {seed: run["vqa"]["by_kind"] for seed, run in runs.items()}
    assert 'no count question is answered "two" on any seed (only "one" and "three")' in text
    # the sentences that compare kinds with the question alone
    assert "on seed 0 the model gets exactly the 21 count questions the question alone gets" in text
    assert kinds[0]["count"]["hits"] == alone[0]["vqa"]["count"]["hits"] == 21
    m = re.search(r"on every seed \((\d+), (\d+), (\d+) colours against (\d+), (\d+), (\d+); (\d+), (\d+), (\d+) "
                  r"positions against (\d+), (\d+), (\d+)\)", text)
    assert m, "the colour and position sentence"
    got = [int(x) for x in m.groups()]
    for i, kind in enumerate(("colour", "position")):
        model, bar = got[6 * i:6 * i + 3], got[6 * i + 3:6 * i + 6]
        assert model == [kinds[sd][kind]["hits"] for sd in (0, 1, 2)], kind
        assert bar == [alone[sd]["vqa"][kind]["hits"] for sd in (0, 1, 2)], kind
        assert all(a > b for a, b in zip(model, bar)), kind
    assert "positions against 2, 2, 2), and counting on seeds 1 and 2." in text
    assert all(kinds[sd]["count"]["hits"] > alone[sd]["vqa"]["count"]["hits"] for sd in (1, 2))
    assert "3 right where the question alone gets 10" in text
    assert (kinds[2]["size"]["hits"], alone[2]["vqa"]["size"]["hits"]) == (3, 10)
    assert all({a for a, _ in k["count"]["most_retrieved"]} == {"one", "three"} for k in kinds.values())
    said = {'seed 0 "large" to all 11 size questions': (0, "size", ["large", 11], 11),
            'seed 1 "circle" to 10 of 11 shape questions': (1, "shape", ["circle", 10], 11),
            'seed 2 "large" to 10 of 11 size questions': (2, "size", ["large", 10], 11)}
    for phrase, (seed, kind, first, n) in said.items():
        assert phrase in text and kinds[seed][kind]["most_retrieved"][0] == first, phrase
        assert kinds[seed][kind]["queries"] == n, phrase
    assert 'size questions, whose commonest answer is "small"' in text
    assert kinds[2]["size"]["most_common_true_answer"][0] == "small"


def test_readme_demo_data_snippet_writes_files_every_command_reads(tmp_path, monkeypatch):
    """The README's "every command without real data" block, run as written: each file it writes is read
    by the reader of the command the README sends it to (train, eval, eval-video)."""
    pytest.importorskip("av")
    from llave_fast.data.mmeb import MMEBDataset
    from llave_fast.data.mmeb_eval import find_eval_datasets, read_eval_set
    from llave_fast.data.video_annotations import read_annotations
    from llave_fast.eval_video import decode_video, find_videos

    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_example("demo-data"), "README.md:demo-data", "exec"), scope)
    assert len(MMEBDataset(["demo/train/Synth.jsonl"], image_dir="demo/train/images")) == 256
    (ds,) = find_eval_datasets(["demo/eval/MSCOCO_i2t.jsonl"])
    assert ds.name == "MSCOCO_i2t" and read_eval_set(ds, "demo/eval").num_queries == 20
    ann = read_annotations("demo/captions.csv")
    paths = find_videos(ann.video_ids, "demo/videos")
    assert [os.path.basename(p) for p in paths] == ["video0.mp4", "video1.mp4"]
    frames, info = decode_video(paths[0])
    assert info["num_frames"] == 30 and frames.shape[-1] == 3


def _architecture_block() -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"## Architecture\s*```\n(.*?)```", text, re.S)
    assert m, "README has no Architecture block"
    return m.group(1)


def test_the_architecture_map_names_every_module_and_subpackage():
    """Every module of llave_fast/ (and every subpackage), every script of benchmarks/ and scripts/ is in the
    README's map, by file name (or a module as llave_fast.NAME)."""
    import llave_fast

    block = _architecture_block()
    root = os.path.dirname(llave_fast.__file__)
    missing = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.endswith(".py") and name not in ("__init__.py", "__main__.py"):
            if name not in block and f"llave_fast.{name[:-3]}" not in block:
                missing.append(name)
        elif os.path.isdir(path) and not name.startswith(("_", ".")) and f"{name}/" not in block:
            missing.append(name + "/")
    for name in sorted(os.listdir(os.path.join(root, "backends"))):
        if name.endswith(".py") and name != "__init__.py" and name[:-3] not in block:
            missing.append("backends/" + name)
    repo = os.path.dirname(README)
    for folder in ("benchmarks", "scripts"):  # their scripts; benchmarks/_*.py are the scripts' shared helpers
        for name in sorted(os.listdir(os.path.join(repo, folder))):
            if name.endswith((".py", ".sh")) and not name.startswith("_") and name not in block:
                missing.append(f"{folder}/{name}")
    assert not missing, f"README's Architecture block does not name {missing}"


def test_the_architecture_map_lists_the_training_modules_in_their_import_order():
    """training/'s modules as the README lists them ("imported one way (bottom to top)"): all of them, and
    each imports only modules named before it."""
    import ast

    import llave_fast.training as pkg

    listed = re.search(r"imported one way \(bottom to top\): (.*?)\(train\(\) itself", _architecture_block(), re.S)
    assert listed, "the training/ line of the Architecture block changed form"
    order = [w.strip() for w in listed.group(1).replace("\n", " ").split(",") if w.strip()]
    folder = os.path.dirname(pkg.__file__)
    have = sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py") and n != "__init__.py")
    assert sorted(order) == have, (order, have)
    for i, name in enumerate(order):
        with open(os.path.join(folder, name + ".py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    used.add(node.module.split(".")[0])
                elif node.level == 1:
                    used.update(a.name for a in node.names)
                elif node.module and node.module.startswith("llave_fast.training."):
                    used.add(node.module.split(".")[2])
        later = sorted(u for u in used if u in order[i:])
        assert not later, f"training/{name}.py imports {later}, listed at or after it in the README"
