"""Training runs (issue 14): honest resume, data off the critical path, bad data found early,
misconfigurations refused before the model is built, a non-finite loss stops at once, and the
end-of-run summary. Fast parts in-process; runs on one gloo rank with tiny configs."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest
import torch

from llave_fast.train import (
    RESUME_MAY_CHANGE,
    BatchOrder,
    ResumeRefused,
    TrainConfig,
    check_config,
    check_data_fit,
    plan_resume,
    progress_line,
    quiet_known_warnings,
    resolve_length,
    step_loader,
    write_run_config,
)

import _train_workers as W  # noqa: E402

pytestmark = pytest.mark.slow  # processes, ranks, wheel builds or compiles: -m 'not slow' skips them


# ---------------------------------------------------------------- misconfigurations
def test_check_config_refuses_bad_values_naming_option_and_value():
    cases = {
        "chunk_size must be a positive int, got 0": dict(chunk_size=0),
        "num_workers must be an int >= 0, got -1": dict(num_workers=-1),
        "prefetch_batches must be a positive int, got 0": dict(prefetch_batches=0),
        "lr must be a finite number >= 0, got nan": dict(lr=float("nan")),
        "grad_clip must be a finite number > 0, got 0": dict(grad_clip=0),
        "bad_images must be 'skip', 'fail' or None (follow --skip-bad-rows), got 'drop'": dict(bad_images="drop"),
        "loss_backend must be one of": dict(loss_backend="cuda"),
        "steps must be a positive int (or set epochs), got 0": dict(steps=0),
        "warmup_steps=10 is not shorter than the run (steps=10)": dict(steps=10, warmup_steps=10),
        "image_dir='/nonexistent-llave' is not a folder": dict(data="x.jsonl", image_dir="/nonexistent-llave"),
        "max_rows_per_subset must be a positive int or None, got 2.5": dict(max_rows_per_subset=2.5),
        "max_rows_per_subset must be a positive int or None, got '2'": dict(max_rows_per_subset="2"),
    }
    for msg, kw in cases.items():
        with pytest.raises(ValueError) as info:
            check_config(TrainConfig(**kw), world=1)
        assert msg in str(info.value), (kw, str(info.value))
    check_config(TrainConfig(steps=2, warmup_steps=1), world=1)


def test_batch_larger_than_the_data_and_warmup_of_the_whole_run_are_refused():
    with pytest.raises(ValueError, match=r"global_batch=64 is larger than the training data: 40 usable rows in "
                                         r"the synthetic training set \(--num-train\)"):
        check_data_fit(TrainConfig(global_batch=64), 40)
    with pytest.raises(ValueError, match=r"global_batch=16, group_by_modality=True: .*fewer than one global batch"):
        check_data_fit(TrainConfig(global_batch=16, group_by_modality=True), 20, [i % 2 == 0 for i in range(20)])
    order = check_data_fit(TrainConfig(global_batch=16), 40)
    c = TrainConfig(global_batch=16, epochs=1, warmup_steps=5)  # one epoch = 2 steps
    with pytest.raises(ValueError, match=r"warmup_steps=5: not shorter than the run \(epochs=1 gives steps=2\)"):
        resolve_length(c, order)
    c = TrainConfig(global_batch=16, steps=1, warmup_ratio=0.5)
    with pytest.raises(ValueError, match=r"warmup_ratio=0.5 gives 1 warm-up steps: not shorter than the run "
                                         r"\(steps=1\)"):
        resolve_length(c, order)


def test_oversized_batch_stops_before_the_model_is_built(tmp_path):
    from llave_fast.testing import spawn_ranks

    out = str(tmp_path / "run")
    with pytest.raises(Exception, match=r"global_batch=16 is larger than the training data: 8 usable rows"):
        spawn_ranks(W.run_train, 1, dict(out=out, num_train=8))
    assert not os.path.exists(os.path.join(out, "base")), "the model was built before the check"


# ---------------------------------------------------------------- resume must not lie
def _saved_run(tmp_path, **kw):
    """A run folder as a finished run leaves it, without training: its config and a complete checkpoint."""
    cfg = W.tiny_cfg(str(tmp_path / "run"), **kw)
    os.makedirs(os.path.join(cfg.output_dir, "checkpoints", "step-00000004"))
    with open(os.path.join(cfg.output_dir, "checkpoints", "step-00000004", "COMPLETE"), "w") as f:
        f.write('{"step": 4}')
    write_run_config(cfg, [{"started": "then", "at_step": 0}], {"train_rows": 64})
    return cfg.output_dir


def test_resume_refuses_each_changed_option_with_both_values(tmp_path):
    out = _saved_run(tmp_path)
    with pytest.raises(ResumeRefused) as info:
        plan_resume(W.tiny_cfg(out, lr=0.01, global_batch=32, seed=4), 64)
    msg = str(info.value)
    for line in ("lr: 0.001 in the run, 0.01 now", "global_batch: 16 in the run, 32 now", "seed: 3 in the run, 4 now"):
        assert line in msg, msg
    assert "step-00000004" in msg and "--output-dir" in msg
    with open(os.path.join(out, "train_config.json")) as f:
        assert json.load(f)["lr"] == 0.001  # the refused run did not rewrite the record


def test_resume_applies_and_records_harmless_options(tmp_path):
    out = _saved_run(tmp_path)
    cfg = W.tiny_cfg(out, save_every=1, num_workers=0)
    tag, history = plan_resume(cfg, 64)
    assert tag == "step-00000004"
    assert history[0] == {"started": "then", "at_step": 0}
    assert history[-1]["at_step"] == 4
    assert history[-1]["changed"] == {"num_workers": [2, 0], "save_every": [2, 1]}
    assert {"save_every", "num_workers", "chunk_size"} <= RESUME_MAY_CHANGE and "lr" not in RESUME_MAY_CHANGE
    write_run_config(cfg, history, {"train_rows": 64})
    assert TrainConfig.from_json(os.path.join(out, "train_config.json")).save_every == 1  # still a valid config


def test_resume_compares_the_precision_and_config_file_as_resolved(tmp_path):
    """bf16 unset resolved to fp32 on a machine without CUDA: --bf16 false is the same run, and the
    same unset bf16 on a CUDA machine (bf16) is another one; a DeepSpeed config named by its path is
    the shipped name's file. Raw values were compared: the first refused, the second let through."""
    from llave_fast.training.config import CONFIG_DIR

    cfg = W.tiny_cfg(str(tmp_path / "run"))
    os.makedirs(os.path.join(cfg.output_dir, "checkpoints", "step-00000004"))
    with open(os.path.join(cfg.output_dir, "checkpoints", "step-00000004", "COMPLETE"), "w") as f:
        f.write('{"step": 4}')
    write_run_config(cfg, [{"started": "then", "at_step": 0}], {"train_rows": 64, "bf16": False})
    out = cfg.output_dir
    assert plan_resume(W.tiny_cfg(out, bf16=False), 64, bf16=False)[0] == "step-00000004"
    assert plan_resume(W.tiny_cfg(out, deepspeed_config=os.path.join(CONFIG_DIR, "zero3.json")), 64, bf16=False)[0]
    with pytest.raises(ResumeRefused, match=r"bf16 \(resolved precision\): 'fp32' in the run, 'bf16' now"):
        plan_resume(W.tiny_cfg(out), 64, bf16=True)


def test_resume_choice_and_changed_data_are_explicit(tmp_path):
    out = _saved_run(tmp_path)
    with pytest.raises(ResumeRefused, match=r"resume=false but the run folder .* holds checkpoints \(newest "
                                            r"complete: step-00000004\)"):
        plan_resume(W.tiny_cfg(out, resume=False), 64)
    assert plan_resume(W.tiny_cfg(out, resume=True), 64)[0] == "step-00000004"
    with pytest.raises(ResumeRefused, match=r"resume=true but .* holds no complete checkpoint"):
        plan_resume(W.tiny_cfg(str(tmp_path / "new"), resume=True), 64)
    assert plan_resume(W.tiny_cfg(str(tmp_path / "new"), resume=False), 64)[0] is None
    with pytest.raises(ResumeRefused, match=r"was trained on 64 usable rows .*; 60 now"):
        plan_resume(W.tiny_cfg(out), 60)


# ---------------------------------------------------------------- data off the critical path
def _batches(loader):
    return [(item["step"], item["batch"]) for item in loader]


def test_step_loader_gives_the_same_batches_with_and_without_workers():
    from llave_fast.data import PairCollator, SyntheticDataset
    from llave_fast.model import build_tiny_model

    proc = build_tiny_model(0, image_size=32, patch_size=8, max_grid=1).processor
    ds = SyntheticDataset(24, seed=1, image_size=32)
    order = BatchOrder(len(ds), 8, seed=1)
    col = PairCollator(proc)
    rng = torch.get_rng_state()
    inline = _batches(step_loader(ds, col, order, 1, 4, 0, 5, num_workers=0))
    assert torch.equal(torch.get_rng_state(), rng), "the loader drew from the global RNG"
    workers = _batches(step_loader(ds, col, order, 1, 4, 0, 5, num_workers=2, prefetch_batches=2))
    resumed = _batches(step_loader(ds, col, order, 1, 4, 3, 5, num_workers=2))
    assert [s for s, _ in inline] == [0, 1, 2, 3, 4] and [s for s, _ in resumed] == [3, 4]
    for (_, a), (_, b) in zip(inline, workers):
        assert torch.equal(a["target_ids"], b["target_ids"])
        assert torch.equal(a["query"]["input_ids"], b["query"]["input_ids"])
        for x, y in zip(a["query"]["pixel_values"], b["query"]["pixel_values"]):
            assert (x is None and y is None) or torch.equal(x, y)
    assert all(torch.equal(a["target_ids"], b["target_ids"]) for (_, a), (_, b) in zip(inline[3:], resumed))
    # this rank's half of each step's global batch
    want = [ds[i]["target_id"] for i in order(0)[4:8]]
    from llave_fast.data import stable_ids

    assert torch.equal(inline[0][1]["target_ids"], stable_ids(want))


# ---------------------------------------------------------------- progress line and warnings
def test_progress_line_has_units():
    line = progress_line(1.23456, 0.5, 128.0, 0.012)
    assert line == "loss 1.2346 | 0.50 s/step | 128 pairs/s | data wait 12 ms"


def test_known_deprecation_warnings_are_filtered_others_kept():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_known_warnings()
        for _ in range(3):
            warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use x", FutureWarning)
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use y", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else is deprecated"]


def test_after_a_run_the_known_warnings_warn_again_unless_the_caller_had_quieted_them():
    from llave_fast.training.console import forget_known_warnings

    message = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use y"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        before = list(warnings.filters)
        quiet_known_warnings()  # as a run does
        forget_known_warnings(before)  # as its end does
        warnings.warn(message, FutureWarning)
        quiet_known_warnings()  # the caller's own
        before = list(warnings.filters)
        quiet_known_warnings()
        forget_known_warnings(before)
        warnings.warn(message, FutureWarning)
    assert [str(w.message) for w in seen] == [message]


# ---------------------------------------------------------------- runs (1 gloo rank, tiny)
def _run(**kw):
    from llave_fast.testing import spawn_ranks

    spawn_ranks(W.run_train, 1, kw)
    with open(os.path.join(kw["out"], "result.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_each_run_closes_its_tensorboard_writer_and_a_resumed_one_purges_the_steps_it_runs_again(tmp_path):
    """The writer was never closed: each run in a process that goes on (a notebook, ablate) left its thread
    and event file open, its last events unwritten (TensorBoard writes every two minutes) until the process
    ended; and a resumed run logged again the steps an earlier attempt had logged after its checkpoint."""
    from llave_fast.testing import spawn_ranks

    spawn_ranks(W.tensorboard_writers, 1, {"out": str(tmp_path)})
    made = json.loads((tmp_path / "writers.json").read_text())
    assert made == [{"purge_step": None, "steps": [1, 2], "closed": True},
                    {"purge_step": 3, "steps": [3, 4], "closed": True}], made


def test_corrupt_image_fails_with_a_checkpoint_then_resumes_skipping_it(tmp_path, capfd):
    data, img = W.write_mmeb(str(tmp_path / "mmeb"), 48)
    rows = [json.loads(line) for line in open(data)]
    order = BatchOrder(48, 16, seed=3)
    # a row read first by step 2 (index 1), whose image exists but does not decode
    bad = next(i for i in order(1) if rows[i]["qry_image_path"])
    bad_path = os.path.join(img, rows[bad]["qry_image_path"])
    with open(bad_path, "wb") as f:
        f.write(b"\x89PNG truncated")
    out = str(tmp_path / "run")
    kw = dict(out=out, data=data, image_dir=img, steps=3, save_every=0, bad_images="fail")
    with pytest.raises(Exception) as info:
        _run(**kw)
    msg = str(info.value)
    assert "bad data in the batch of step 2" in msg and f"{data}:{bad + 1}: " in msg and bad_path in msg, msg
    assert "checkpoint of the 1 steps done" in msg and "--bad-images skip" in msg, msg
    from llave_fast.checkpoint import complete_tags

    assert complete_tags(os.path.join(out, "checkpoints")) == ["step-00000001"]
    capfd.readouterr()
    # the user chooses to skip: the run resumes from step 1 (bad_images may change on resume)
    r = _run(**dict(kw, bad_images="skip", progress=True))
    cap = capfd.readouterr()
    assert (r["steps"], r["steps_this_run"], r["resumed_at_step"]) == (3, 2, 1)
    assert (r["train_rows"], r["skipped_rows_at_build"], r["skipped_rows_in_training"]) == (48, 0, 1)
    assert r["rows_with_image_dropped"] == 0  # every image of these rows has its placeholder
    assert cap.out.count(f"step 2: skipped bad row: {data}:{bad + 1}: ") == 1  # FILE:LINE
    assert "skipping bad row" not in cap.err  # reported once, above the bar, not by the worker's log too
    assert "run folder: " + out in cap.out
    summary = cap.out[cap.out.index("run summary:"):]
    for want in ("steps:       3 of 3 (2 in this run, resumed at step 1)", "data:        47 training rows usable, 1 skipped",
                 "trained on:  48 pairs (3 steps x 16;",
                 "1 found unreadable during training", f"checkpoint:  {out}/checkpoints/step-00000003",
                 "images:      0 of the rows read have an image on a side whose text has no image placeholder"):
        assert want in summary, summary
    # the progress line: units, and no deprecation warning cutting it
    assert "s/step | " in cap.err and "pairs/s" in cap.err and "data wait" in cap.err
    assert "FutureWarning" not in cap.err, cap.err[-2000:]
    with open(os.path.join(out, "train_config.json")) as f:
        saved = json.load(f)
    assert saved["bad_images"] == "skip"
    assert saved["_history"][-1]["at_step"] == 1
    assert saved["_history"][-1]["changed"]["bad_images"] == ["fail", "skip"]


def test_non_finite_loss_stops_at_once_naming_step_parts_and_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(Exception) as info:
        _run(out=out, lr=1e30, lr_projector=1e30, lr_vision=1e30, save_every=1, steps=4)
    msg = str(info.value)
    assert "non-finite loss at step 2" in msg and "rank 0: loss nan" in msg, msg
    assert "non-finite embedding values: query" in msg, msg
    assert "over its own pairs: query->target nan, target->query nan" in msg, msg
    assert os.path.join(out, "checkpoints", "step-00000001") in msg, msg
    assert not os.path.exists(os.path.join(out, "checkpoints", "step-00000002"))
    with open(os.path.join(out, "train_log.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1]


def test_check_images_option_decodes_before_training(tmp_path):
    from llave_fast.data import BadDataError
    from llave_fast.train import _datasets

    data, img = W.write_mmeb(str(tmp_path / "mmeb"), 20)
    rows = [json.loads(line) for line in open(data)]
    bad = next(i for i, r in enumerate(rows) if r["qry_image_path"])
    with open(os.path.join(img, rows[bad]["qry_image_path"]), "wb") as f:
        f.write(b"not an image")
    cfg = TrainConfig(data=data, image_dir=img, check_images=True)
    with pytest.raises(BadDataError, match=rf":{bad + 1}: .*unreadable image"):
        _datasets(cfg)
    train_set, _ = _datasets(TrainConfig(data=data, image_dir=img, check_images=True, bad_images="skip"))
    assert len(train_set) == 19 and [r for _, r, _ in train_set.skipped] == [bad]
    assert len(_datasets(TrainConfig(data=data, image_dir=img))[0]) == 20  # without the check: found in training


def test_bad_image_on_one_rank_stops_both_at_the_same_step(tmp_path):
    """Only rank 1's share of step 2 holds the bad image: both ranks stop there, no rank hangs
    in a collective, and the 1 step done is checkpointed."""
    from llave_fast.checkpoint import complete_tags
    from llave_fast.testing import spawn_ranks

    data, img = W.write_mmeb(str(tmp_path / "mmeb"), 32)
    rows = [json.loads(line) for line in open(data)]
    bad = next(i for i in BatchOrder(32, 16, seed=3)(1)[8:] if rows[i]["qry_image_path"])
    with open(os.path.join(img, rows[bad]["qry_image_path"]), "wb") as f:
        f.write(b"not an image")
    out = str(tmp_path / "run")
    with pytest.raises(Exception, match=rf"bad data in the batch of step 2: .*Synth\.jsonl:{bad + 1}: "):
        spawn_ranks(W.run_train, 2, dict(out=out, data=data, image_dir=img, steps=2, save_every=0,
                                         bad_images="fail"))
    assert complete_tags(os.path.join(out, "checkpoints")) == ["step-00000001"]


def test_synthetic_background_option_reaches_both_splits_and_the_preset_is_plain():
    from llave_fast.cli import build_parser, train_config_from_args
    from llave_fast.train import _datasets

    assert TrainConfig.from_json("tiny_cpu.json").synthetic_background == "plain"
    argv = ["train", "--synthetic-background", "varied", "--num-train", "8", "--num-eval", "4"]
    cfg = train_config_from_args(build_parser(argv).parse_args(argv))
    train, evals = _datasets(cfg)
    assert train.background == evals.background == "varied"
    assert len({train.scene(i).background for i in range(8)}) > 1
    with pytest.raises(SystemExit):  # argparse refuses a value outside the choices
        build_parser(["train"]).parse_args(["train", "--synthetic-background", "stripes"])
    bad = TrainConfig(synthetic_background="stripes", num_train=8, num_eval=4)  # e.g. from a JSON config
    with pytest.raises(ValueError, match="background must be one of .*'stripes'"):
        _datasets(bad)


def test_vqa_questions_per_scene_config_is_checked_and_batches_keep_groups_whole():
    from llave_fast.train import _datasets

    cfg = TrainConfig(num_train=48, num_eval=12, global_batch=12, vqa_questions_per_scene=4,
                      synthetic_tasks=["i2t", "vqa", "vqa"])
    check_config(cfg, world=1)
    train, evals = _datasets(cfg)
    assert (train.vqa_questions_per_scene, evals.vqa_questions_per_scene) == (4, 1)  # eval: one question per scene
    assert train.tasks == ("i2t", "vqa", "vqa") and evals.tasks == ("i2t", "t2i", "vqa")
    order = check_data_fit(cfg, len(train))
    for step in range(8):
        batch = order(step)
        assert sorted(batch) == sorted(set(batch)) and len(batch) == 12
        assert sorted({i // 4 for i in batch}) == sorted(i // 4 for i in batch[::4])  # whole groups, in order
        assert all(batch[j + 1] == batch[j] + 1 for j in range(12) if j % 4 != 3)
    with pytest.raises(ValueError, match=r"vqa_questions_per_scene=4 does not divide the loss batch: "
                                         r"global_batch=12 .* gives 6 pairs per loss"):
        check_config(TrainConfig(global_batch=12, accumulation_steps=2, vqa_questions_per_scene=4), world=1)
    with pytest.raises(ValueError, match=r"vqa_questions_per_scene must be an int in 1..4, got 5"):
        check_config(TrainConfig(global_batch=20, vqa_questions_per_scene=5), world=1)
    with pytest.raises(ValueError, match=r"vqa_questions_per_scene=2 applies to the synthetic data only"):
        check_config(TrainConfig(data="x.jsonl", vqa_questions_per_scene=2), world=1)
    with pytest.raises(ValueError, match=r"synthetic_tasks must list tasks among i2t, t2i, vqa, got \['vqa', 'x'\]"):
        check_config(TrainConfig(synthetic_tasks=["vqa", "x"]), world=1)


def test_num_eval_zero_trains_without_a_held_out_evaluation(tmp_path):
    """--num-eval 0: no held-out set, no evaluation before or after, no eval.json (it used to
    crash encoding an empty split); a negative count is refused before anything is built."""
    from llave_fast.testing import spawn_ranks

    out = str(tmp_path / "run")
    spawn_ranks(W.run_train, 1, dict(out=out, num_eval=0, steps=2, save_every=0, eval_before=True))
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    assert result["steps"] == 2 and result["eval_json"] is None and "by_task" not in result
    assert not os.path.exists(os.path.join(out, "eval.json"))
    with pytest.raises(ValueError, match="num_eval must be an int >= 0, got -1"):
        check_config(W.tiny_cfg(out, num_eval=-1), world=1)


# ---------------------------------------------------------------- one run per folder
_HOLDER = """
import sys, time
from llave_fast.train import hold_run_folder
hold_run_folder(sys.argv[1], 0, 1)
print("HOLDING", flush=True)
time.sleep(120)
"""


def _hold(folder):
    """A live process that holds ``folder`` (killed by the caller)."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "HOLDING"
    return p


def test_a_second_run_in_a_folder_in_use_is_refused_at_once(tmp_path):
    """Two runs in one --output-dir used to mix (one's config, the other's weights): the second is
    refused before it reads or writes anything there, and the message names the other process."""
    from llave_fast.testing import spawn_ranks
    from llave_fast.train import LOCK_FILE

    out = tmp_path / "run"
    holder = _hold(out)
    try:
        (out / "train_config.json").write_text('{"seed": 0}')  # the live run's own file
        with pytest.raises(Exception, match=rf"RunFolderInUse: .*in use by another run \(pid {holder.pid} on .*"
                                            r"--output-dir"):
            spawn_ranks(W.run_train, 1, dict(out=str(out), seed=1))
        assert (out / "train_config.json").read_text() == '{"seed": 0}'
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE, "train_config.json"]
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    from llave_fast.train import LOCK_FILE, _release_run_folder, hold_run_folder

    out = tmp_path / "run"
    holder = _hold(out)
    holder.kill()  # killed: its line stays in the lock file, its lock goes with it
    holder.wait()
    assert f"pid {holder.pid}" in (out / LOCK_FILE).read_text()
    try:
        hold_run_folder(str(out), 0, 1)
        assert f"cleared a stale lock of {out}" in capsys.readouterr().out
        assert f"pid {os.getpid()}" in (out / LOCK_FILE).read_text()
    finally:
        _release_run_folder()
    assert (out / LOCK_FILE).read_text() == ""  # a run that ended leaves no name behind
    hold_run_folder(str(out), 0, 1)  # free again, and no note
    _release_run_folder()
    assert "stale" not in capsys.readouterr().out


def test_ranks_agree_on_the_default_folder_and_on_a_refusal(tmp_path):
    """Without --output-dir every rank used to name the folder from its own clock; now rank 0 names it.
    A folder in use is refused on every rank (no rank left waiting in a collective)."""
    from llave_fast.testing import spawn_ranks

    busy = tmp_path / "busy"
    holder = _hold(busy)
    try:
        spawn_ranks(W.agree_and_hold, 2, dict(busy=str(busy), report=str(tmp_path)))
    finally:
        holder.kill()
        holder.wait()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["name"] == r1["name"] and r0["name"].startswith("runs" + os.sep), (r0, r1)
    assert r0["refused"] and r0["refused"] == r1["refused"] and f"pid {holder.pid}" in r0["refused"], (r0, r1)
