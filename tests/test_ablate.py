"""``llave-fast ablate`` and the hard-negative families it trains on.

The families: members differ in exactly one attribute of one object (train and eval splits),
batches keep them whole, family size 1 is exactly the independent scenes. The ablation: a
real 2 x 2 x 1 grid through the command (records, plot, table, a rerun that skips every
run), resume and setting checks with a stand-in runner, bad grid values naming the flag.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from llave_fast import ablate as A
from llave_fast.cli import main
from llave_fast.data import SyntheticDataset
from llave_fast.train import BatchOrder, TrainConfig, _datasets, batch_indices, check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = ("shape", "colour", "size", "slot")


# ---------------------------------------------------------------- the families
def _difference(a, b) -> list[tuple[str, object, object]]:
    """(field, value in a, value in b) over the objects the two scenes do not share; the scenes
    must have the same number of objects and background."""
    assert a.background == b.background and len(a.objects) == len(b.objects)
    key = lambda o: (o.shape, o.colour, o.size, o.slot)  # noqa: E731
    only_a = [o for o in a.objects if key(o) not in {key(x) for x in b.objects}]
    only_b = [o for o in b.objects if key(o) not in {key(x) for x in a.objects}]
    assert len(only_a) == len(only_b) == 1, (a.caption, b.caption)
    (oa,), (ob,) = only_a, only_b
    assert (oa.dx, oa.dy, oa.scale) == (ob.dx, ob.dy, ob.scale)  # the same object, changed
    return [(f, getattr(oa, f), getattr(ob, f)) for f in FIELDS if getattr(oa, f) != getattr(ob, f)]


@pytest.mark.parametrize("split", ["train", "eval"])
@pytest.mark.parametrize("k", [2, 4, 8])
def test_family_members_differ_in_exactly_one_attribute(split, k):
    ds = SyntheticDataset(6 * k + 1, seed=5, split=split, hard_family_size=k, max_shapes=3)
    varied = set()
    for f in range(6):
        members = range(f * k, (f + 1) * k)
        assert {ds.family(i) for i in members} == {f} and {ds.task(i) for i in members} == {ds.task(f * k)}
        recs = [ds[i] for i in members]
        assert len({r["target_id"] for r in recs}) == k, "members are distinct targets"
        diffs = [_difference(ds.scene(i), ds.scene(j)) for i, j in itertools.combinations(members, 2)]
        assert all(len(d) == 1 for d in diffs), diffs
        fields = {d[0][0] for d in diffs}
        assert len(fields) == 1, "a family varies one attribute of one object"
        varied |= fields
        if ds.task(f * k) == "vqa":  # one question, about the varied attribute: every answer differs
            assert len({r["qry"] for r in recs}) == 1 and len({r["pos_text"] for r in recs}) == k
        # the record shows the member's scene
        cap = [r["pos_text"] if ds.task(i) == "i2t" else r["qry"] for i, r in zip(members, recs)]
        if ds.task(f * k) != "vqa":
            assert cap == [ds.scene(i).caption for i in members]
    assert ds.family(6 * k) == 6 and ds[6 * k]["row"] == 6 * k  # an incomplete last family is fine
    assert varied  # k = 8: only colour has 8 values
    if k == 8:
        assert varied == {"colour"}


def test_family_size_one_is_todays_dataset_and_families_share_only_the_first_scene():
    plain, one = SyntheticDataset(24, seed=2), SyntheticDataset(24, seed=2, hard_family_size=1)
    for i in range(24):
        a, b = plain[i], one[i]
        assert {k: v for k, v in a.items() if "image" not in k} == {k: v for k, v in b.items() if "image" not in k}
        for side in ("qry_image", "pos_image"):
            assert (a[side] is None) == (b[side] is None)
            if a[side] is not None:
                assert a[side].tobytes() == b[side].tobytes()
    assert one.query_has_image().tolist() == plain.query_has_image().tolist()
    fam = SyntheticDataset(24, seed=2, hard_family_size=4)
    assert fam.scene(0) == plain.scene(0) and fam.scene(4) == plain.scene(4)  # a family's first member: item i's
    assert fam.scene(1) != plain.scene(1)
    assert fam.query_has_image().tolist() == [fam.task(i) != "t2i" for i in range(24)]
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match=rf"hard_family_size must be an int in 1..8 .*got {bad!r}"):
            SyntheticDataset(8, hard_family_size=bad)


def test_training_config_passes_families_to_both_splits_and_checks_them():
    cfg = TrainConfig(num_train=32, num_eval=16, hard_family_size=4)
    train, evals = _datasets(cfg)
    assert train.hard_family_size == evals.hard_family_size == 4 and evals.split == "eval"
    assert len(_difference(evals.scene(8), evals.scene(9))) == 1  # the held-out split holds families too
    check_config(TrainConfig(global_batch=16, accumulation_steps=2, hard_family_size=4), world=1)
    with pytest.raises(ValueError, match=r"hard_family_size=4 does not divide the loss batch: global_batch=16 .* "
                                         r"accumulation_steps=8 gives 2 pairs per loss"):
        check_config(TrainConfig(global_batch=16, accumulation_steps=8, hard_family_size=4), world=1)
    with pytest.raises(ValueError, match=r"hard_family_size must be an int in 1..8, got 9"):
        check_config(TrainConfig(global_batch=72, hard_family_size=9), world=1)
    with pytest.raises(ValueError, match=r"hard_family_size=2 applies to the synthetic data only"):
        check_config(TrainConfig(data="x.jsonl", hard_family_size=2), world=1)


def test_batch_order_keeps_families_whole_and_is_unchanged_without_them():
    plain = BatchOrder(50, 8, seed=1)
    assert [plain(s) for s in range(8)] == [batch_indices(s, 50, 8, 1) for s in range(8)]
    order = BatchOrder(50, 8, seed=1, family_size=4)  # 12 families and an incomplete one (48, 49)
    seen = []
    for step in range(order.per_epoch * 2):
        b = order(step)
        assert len(b) == 8
        for start in range(0, 8, 4):  # consecutive whole families, in member order
            f = b[start]
            assert f % 4 == 0 and b[start:start + 4] == list(range(f, f + 4)), b
        seen.append(b)
    epoch = sorted(i for b in seen[: order.per_epoch] for i in b)
    assert epoch == list(range(48)), "an epoch covers every complete family once"
    assert seen[: order.per_epoch] != seen[order.per_epoch:], "epochs are shuffled differently"
    assert seen[0] == BatchOrder(50, 8, seed=1, family_size=4)(0), "a pure function of (seed, step)"
    # grouped by modality: a family goes with its first member
    ds = SyntheticDataset(48, hard_family_size=4)
    grouped = BatchOrder(48, 8, seed=2, query_has_image=ds.query_has_image(), family_size=4)
    for step in range(grouped.per_epoch):
        b = grouped(step)
        assert len({ds.task(i) != "t2i" for i in b}) == 1 and all(b[j] % 4 == 0 for j in (0, 4))
    with pytest.raises(ValueError, match=r"family_size must be a positive int, got 0"):
        BatchOrder(48, 8, seed=2, family_size=0)


# ---------------------------------------------------------------- the grid and its errors
@pytest.mark.parametrize("kw,match", [
    (dict(alphas="0,x"), r"--alphas: 'x' is not a number"),
    (dict(alphas="0,9,0"), r"--alphas: a value is repeated"),
    (dict(alphas="0,,9"), r"--alphas: expected a non-empty comma-separated list"),
    (dict(alphas="nan"), r"--alphas: 'nan' is not finite"),
    (dict(batches="16,0"), r"--batches: '0' is not a positive integer"),
    (dict(batches="16,2.5"), r"--batches: '2.5' is not a positive integer"),
    (dict(batches="16,24"), r"--batches: 16 does not divide the global batch of 24 pairs"),
    (dict(batches="16,128", global_batch=64), r"--batches: 128 does not divide the global batch of 64"),
    (dict(batches="6,12"), r"--batches: 6 is not a multiple of --family-size 4"),
    (dict(seeds=0), r"--seeds must be a positive integer, got 0"),
    (dict(steps=-1), r"--steps must be a positive integer, got -1"),
    (dict(num_eval=0), r"--num-eval must be a positive integer, got 0"),
    (dict(family_size=9), r"--family-size must be an integer in 1..8, got 9"),
    (dict(config="no_such.json"), r"--config 'no_such.json'"),
    (dict(config="llave_0.5b.json"), r"--config 'llave_0.5b.json': the ablation trains the tiny model"),
])
def test_bad_grid_values_name_the_flag(kw, match):
    with pytest.raises(ValueError, match=match):
        A.plan(**kw)


def test_bad_grid_value_is_one_line_from_the_command(tmp_path, capsys):
    """A value of the wrong form is a bad command line (argparse's error, exit status 2); one the grid cannot
    use (a batch that does not divide the global batch) is found by the plan (exit status 1)."""
    with pytest.raises(SystemExit) as info:
        main(["ablate", "--output-dir", str(tmp_path / "out"), "--batches", "16,x"])
    out, err = capsys.readouterr()
    assert info.value.code == 2 and err.splitlines()[0] == (
        "llave-fast ablate: error: argument --batches: 'x' is not a positive integer (got '16,x')"), err
    rc = main(["ablate", "--output-dir", str(tmp_path / "out"), "--batches", "16,6"])
    out, err = capsys.readouterr()
    assert rc == 1 and err.splitlines()[0].startswith("llave-fast ablate: error: ") and "6 does not divide" in err, err
    assert not os.path.exists(tmp_path / "out" / "ablation.json")


def test_plan_scales_steps_and_warmup_with_the_preset():
    preset = TrainConfig.from_json("tiny_cpu.json")
    full, quick = A.plan(), A.plan(quick=True)
    pairs = preset.steps * preset.global_batch
    assert full["global_batch"] == 128 and full["steps"] == round(pairs / 128) and full["seeds"] == [0, 1, 2]
    assert quick["steps"] == round(pairs / 2 / 128) and quick["seeds"] == [0] and quick["num_eval"] == 128
    for p in (full, quick):  # the preset's warm-up fraction, rounded up, shorter than the run
        assert p["warmup_steps"] == min(-(-preset.warmup_steps * p["steps"] // preset.steps), p["steps"] - 1)
    assert A.plan(steps=1)["warmup_steps"] == 0 and A.plan(steps=2)["warmup_steps"] == 1
    cfg = A.train_config(full, 9.0, 16, 2, "/nowhere")
    assert (cfg.alpha, cfg.seed, cfg.global_batch, cfg.accumulation_steps, cfg.hard_family_size) == (9.0, 2, 128, 8, 4)
    check_config(cfg, world=1)
    assert A.train_config(full, 0.0, 128, 0, "/nowhere").accumulation_steps == 1
    assert len(A.grid(full)) == 2 * 2 * 3


# ---------------------------------------------------------------- resume (a stand-in runner)
def _fake_runner(calls):
    def run(p, alpha, batch, seed, run_dir):
        calls.append((alpha, batch, seed))
        p1 = 0.1 + 0.02 * alpha + batch / 1000 + 0.01 * seed
        return {"alpha": alpha, "batch": batch, "seed": seed, "steps": p["steps"], "p_at_1": p1,
                "p_at_1_by_task": {"i2t": p1, "vqa": p1 / 2}, "chance": 0.01, "chance_by_task": {"i2t": 0.05},
                "seconds": 1.0, "run_dir": run_dir}
    return run


def test_a_second_ablation_on_one_folder_is_refused_while_the_first_runs(tmp_path):
    """Both used to run every cell in the same run folders, each removing the other's live one."""
    out = str(tmp_path / "abl")
    kw = dict(alphas="0", batches="8", seeds=1, steps=3, num_eval=16, progress=False)
    seen = []

    def nested(p, alpha, batch, seed, run_dir):  # while the first holds the folder, a second starts
        with pytest.raises(ValueError, match=r"ablation folder .*abl is in use by another ablation \(pid \d+"):
            A.run_ablation(out, runner=_fake_runner([]), **kw)
        seen.append(run_dir)
        return _fake_runner([])(p, alpha, batch, seed, run_dir)

    A.run_ablation(out, runner=nested, **kw)
    assert len(seen) == 1
    assert A.run_ablation(out, runner=_fake_runner([]), **kw)["skipped"] == 1  # free again once it ended


def test_resume_skips_recorded_runs_and_refuses_another_setting(tmp_path):
    out = str(tmp_path / "abl")
    kw = dict(alphas="0,9", batches="8,16", seeds=2, steps=3, num_eval=16, progress=False)
    calls = []
    r = A.run_ablation(out, runner=_fake_runner(calls), **kw)
    assert (r["ran"], r["skipped"], len(calls)) == (8, 0, 8)
    assert calls[:4] == [(0.0, 8, 0), (0.0, 16, 0), (9.0, 8, 0), (9.0, 16, 0)], "seeds outermost"
    calls.clear()
    r = A.run_ablation(out, runner=_fake_runner(calls), **kw)
    assert (r["ran"], r["skipped"], calls) == (0, 8, [])
    # a run missing from the file (a stopped ablation) is the only one run again
    path = os.path.join(out, "ablation.json")
    with open(path) as f:
        saved = json.load(f)
    saved["runs"] = [x for x in saved["runs"] if (x["alpha"], x["batch"], x["seed"]) != (9.0, 8, 1)]
    with open(path, "w") as f:
        json.dump(saved, f)
    r = A.run_ablation(out, runner=_fake_runner(calls), **kw)
    assert (r["ran"], calls) == (1, [(9.0, 8, 1)]) and len(r["runs"]) == 8
    # a larger grid runs only its new cells
    calls.clear()
    A.run_ablation(out, runner=_fake_runner(calls), **dict(kw, alphas="0,3,9"))
    assert sorted(calls) == [(3.0, 8, 0), (3.0, 8, 1), (3.0, 16, 0), (3.0, 16, 1)]
    with pytest.raises(ValueError, match=r"holds runs made with another setting \(steps: 3 there, 4 now\)"):
        A.run_ablation(out, runner=_fake_runner(calls), **dict(kw, steps=4))
    with open(path) as f:
        saved = json.load(f)
    assert saved["setting"]["steps"] == 3 and len(saved["runs"]) == 12
    assert {"processor", "cores", "torch", "date"} <= set(saved["machine"])


def test_table_gives_mean_and_std_per_cell_with_units():
    runs = [{"alpha": a, "batch": b, "seed": s, "p_at_1": p, "p_at_1_by_task": {"i2t": p}, "seconds": 10.0}
            for a, b, s, p in [(0.0, 16, 0, 0.10), (0.0, 16, 1, 0.20), (9.0, 16, 0, 0.30), (9.0, 16, 1, 0.50)]]
    text = A.table(runs)
    lines = text.splitlines()
    assert "P@1 (%)" in lines[0] and "i2t (%)" in lines[0] and "s/run" in lines[0]
    assert lines[1].split()[:6] == ["0", "16", "2", "15.0", "±", "7.1"], lines[1]
    assert lines[2].split()[:6] == ["9", "16", "2", "40.0", "±", "14.1"], lines[2]


# ---------------------------------------------------------------- the real thing, through the command
def _cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llave_fast", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def test_ablate_command_trains_the_grid_writes_results_plot_table_and_resumes(tmp_path, caplog):
    out = str(tmp_path / "abl")
    args = ("ablate", "--output-dir", out, "--alphas", "0,9", "--batches", "8,16", "--seeds", "1", "--steps", "2",
            "--num-eval", "16")
    p = _cli(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(out, "ablation.json")) as f:
        saved = json.load(f)
    runs = saved["runs"]
    assert sorted((r["alpha"], r["batch"], r["seed"]) for r in runs) == [(0.0, 8, 0), (0.0, 16, 0), (9.0, 8, 0),
                                                                          (9.0, 16, 0)]
    for r in runs:
        assert {"alpha", "batch", "seed", "steps", "p_at_1", "p_at_1_by_task", "seconds", "global_batch",
                "accumulation_steps"} <= set(r)
        assert r["steps"] == 2 and r["global_batch"] == 16 and r["accumulation_steps"] == 16 // r["batch"]
        assert 0 <= r["p_at_1"] <= 1 and set(r["p_at_1_by_task"]) == {"i2t", "t2i", "vqa"} and r["seconds"] > 0
        # relative to OUT (no machine path in a results file)
        assert r["run_dir"] == os.path.join("runs", f"alpha{r['alpha']:g}_batch{r['batch']}_seed{r['seed']}")
        assert os.path.exists(os.path.join(out, r["run_dir"], "eval.json"))
        assert not os.path.exists(os.path.join(out, r["run_dir"], "checkpoints")), "checkpoints are removed"
    assert saved["setting"]["family_size"] == 4 and saved["machine"]["cores"] == os.cpu_count()
    png = os.path.join(out, "ablation.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    assert "held-out precision@1, mean ± std over seeds" in p.stdout
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] in (["0"], ["9"])]
    assert [r[:3] for r in rows] == [["0", "8", "1"], ["0", "16", "1"], ["9", "8", "1"], ["9", "16", "1"]], p.stdout
    assert "run folder:" not in p.stdout, "train()'s own output goes to each run's train.log"
    assert f"results: {os.path.join(out, 'ablation.json')}" in p.stdout
    # the plan is logged: a command-line user reads it on stderr, apart from the table on stdout
    assert "ablation: 2 alphas x 2 batches x 1 seeds = 4 runs of 2 steps" in p.stderr and "0 already in" in p.stderr
    assert "ablation: 2 alphas" not in p.stdout
    # the rerun (same options, as the command passes them) trains nothing
    def must_not_run(*a):
        raise AssertionError(f"run {a[1:4]} was already recorded")

    with caplog.at_level("INFO", logger="llave_fast.ablate"):
        r = A.run_ablation(out, runner=must_not_run, progress=False, alphas="0,9", batches="8,16", seeds=1, steps=2,
                           num_eval=16)
    said = [m.getMessage() for m in caplog.records if m.name == "llave_fast.ablate"]
    assert (r["ran"], r["skipped"]) == (0, 4) and "4 already in" in said[0] and "0 to run" in said[0], said
    assert A.format_report(r).splitlines()[1:] == r["table"].splitlines() + [
        f"results: {os.path.join(out, 'ablation.json')}", f"plot:    {os.path.join(out, 'ablation.png')}"]
    with open(os.path.join(out, "ablation.json")) as f:
        assert json.load(f)["runs"] == runs


def test_a_log_handler_made_during_a_run_writes_to_the_stream_of_the_moment_after_it(tmp_path, monkeypatch, capsys):
    """A library first imported inside run_one makes its ``logging.StreamHandler()`` then, on the run's
    redirected stderr: once train.log was closed, each of its records was a "Logging error" and lost, in
    the next runs and in the caller's process after the ablation."""
    import logging

    import llave_fast.train as T

    lib = logging.getLogger("test_ablate.a_library_imported_during_the_first_run")
    lib.propagate = False
    monkeypatch.setattr(lib, "handlers", [])
    seen = []

    def fake_train(cfg):
        if not lib.handlers:  # the library's import, in the first run only
            lib.addHandler(logging.StreamHandler())
        lib.warning("the library says something during run %s", cfg.seed)
        seen.append(cfg.seed)
        return {"steps": cfg.steps, "p_at_1_after": 0.5, "seconds": 1.0}

    monkeypatch.setattr(T, "train", fake_train)
    p = A.plan(config="tiny_cpu.json", alphas="9", batches="16", seeds=2, steps=2, num_eval=16)
    for seed in (0, 1):
        A.run_one(p, 9.0, 16, seed, str(tmp_path / f"run{seed}"))
    lib.warning("the library says something after the ablation")
    out = capsys.readouterr()
    assert seen == [0, 1]
    assert "Logging error" not in out.err and "closed file" not in out.err, out.err
    assert "the library says something after the ablation" in out.err
    for seed in (0, 1):  # each run's own records in its own log, the later run's included
        with open(tmp_path / f"run{seed}" / "train.log") as f:
            text = f.read()
        assert f"during run {seed}" in text and "Logging error" not in text, text
