"""Trust and a full disk (issue 23, items 1 and 4).

1. No code runs from a checkpoint: a pickle planted in any ``.pt`` file of a run folder (model
   states, optimizer states) is refused, naming the file, by ``eval --model RUN``, ``export --run
   RUN`` and a resumed ``train``, and nothing in it runs; DeepSpeed's own loads are weights_only
   (tested with the early check of the files switched off), and every load of a clean run is too.
2. A full disk: a torn last log line is cut on resume; a full disk while checkpointing or logging
   says "no space left on DEVICE while writing FILE; last complete checkpoint: ..." (a real ENOSPC
   on a small tmpfs in a private mount namespace, where this machine allows it; simulated twins
   always run); rewrites are atomic; an export over an earlier one swaps a new folder in.

Training runs in subprocesses (one gloo rank); eval and export run in this process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import _train_workers as W  # noqa: E402
import _trust_workers as TW  # noqa: E402

MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIM_STATES = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
TESTS = os.path.dirname(os.path.abspath(__file__))


def _spawn(fn, kw):
    from llave_fast.testing import spawn_ranks

    spawn_ranks(fn, 1, kw)


def _log_steps(path):
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real run folder (steps=2, a checkpoint each step, the before-training eval in its client
    state): step 1, then a torn step-2 log line (a crash mid-write), then a resume to step 2 that
    records every torch.load it makes."""
    pytest.importorskip("deepspeed")
    base = tmp_path_factory.mktemp("trust")
    out = str(base / "run")
    kw = dict(out=out, steps=2, save_every=1, eval_before=True, num_workers=0)
    _spawn(W.run_train, dict(kw, stop_after=1))
    log = os.path.join(out, "train_log.jsonl")
    with open(log, "a") as f:
        f.write('{"step": 2, "loss": 0.69')  # no newline: the process died here
    report = str(base / "loads")
    _spawn(TW.train_spying, dict(kw, report=report))
    with open(report + "-rank0.json") as f:
        loads = json.load(f)["loads"]
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    return {"dir": out, "loads": loads, "result": result}


def _copy(run, tmp_path) -> str:
    dst = str(tmp_path / "run")
    shutil.copytree(run["dir"], dst)
    return dst


# ================================================================== 1. no code runs from a checkpoint
def test_a_resumed_run_loads_every_file_weights_only_and_cuts_a_torn_log_line(run):
    r = run["result"]
    assert (r["steps"], r["resumed_at_step"], r["steps_this_run"]) == (2, 1, 1)
    assert r["p_at_1_before"] is not None  # the client state's eval came back through a weights_only load
    pt = [(p, wo) for p, wo in run["loads"] if p.endswith(".pt")]
    names = {os.path.basename(p) for p, _ in pt}
    assert {MODEL_STATES, OPTIM_STATES} <= names, run["loads"]
    assert all(wo is True for _, wo in run["loads"]), run["loads"]
    assert _log_steps(os.path.join(run["dir"], "train_log.jsonl")) == [1, 2]  # the torn line is gone


def test_allowed_globals_are_exactly_what_deepspeeds_files_hold(run):
    from llave_fast.checkpoint import _allowed, allowed_globals

    folder = os.path.join(run["dir"], "checkpoints", "step-00000002")
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(folder, OPTIM_STATES))
    assert set(unsafe) <= {f"{g.__module__}.{g.__qualname__}" for g in allowed_globals()}, unsafe
    assert torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(folder, MODEL_STATES)) == []
    before = set(map(str, torch.serialization.get_safe_globals()))
    with _allowed():
        assert torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(folder, OPTIM_STATES)) == []
    assert set(map(str, torch.serialization.get_safe_globals())) == before  # scoped: nothing left allowed after


@pytest.mark.slow
def test_a_zero2_run_resumes_and_exports_through_weights_only_loads(tmp_path):
    """ZeRO-2's files differ (mp_rank_00_model_states.pt; its optimizer states hold fragment_address)."""
    pytest.importorskip("deepspeed")
    from llave_fast.export import export_run

    out = str(tmp_path / "run")
    kw = dict(out=out, steps=2, save_every=1, num_workers=0, deepspeed_config="zero2.json")
    _spawn(W.run_train, dict(kw, stop_after=1))
    report = str(tmp_path / "loads")
    _spawn(TW.train_spying, dict(kw, report=report))
    with open(report + "-rank0.json") as f:
        loads = json.load(f)["loads"]
    assert {"mp_rank_00_model_states.pt", OPTIM_STATES} <= {os.path.basename(p) for p, _ in loads}, loads
    assert all(wo is True for _, wo in loads), loads
    with open(os.path.join(out, "result.json")) as f:
        assert json.load(f)["resumed_at_step"] == 1
    export_run(out, str(tmp_path / "export"), dtype="fp32")


def test_export_of_a_clean_run_loads_only_weights_only(run, tmp_path, monkeypatch):
    from llave_fast.export import export_run

    loads = []
    real = torch.load

    def spy(f, *a, **k):
        loads.append((str(f), k.get("weights_only")))
        return real(f, *a, **k)

    monkeypatch.setattr(torch, "load", spy)
    export_run(run["dir"], str(tmp_path / "export"), dtype="fp32")
    assert {os.path.basename(p) for p, _ in loads} >= {MODEL_STATES, OPTIM_STATES}, loads
    assert all(wo is True for _, wo in loads), loads


def _cli(capsys, *argv):
    from llave_fast.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, err


@pytest.mark.parametrize("name", [MODEL_STATES, OPTIM_STATES])
@pytest.mark.parametrize("precheck", [True, False], ids=["checked-first", "loads-alone"])
def test_a_planted_pickle_is_refused_by_eval_and_export_naming_the_file(run, tmp_path, capsys, monkeypatch,
                                                                        name, precheck):
    from llave_fast import checkpoint as ckpt

    if not precheck:  # the loads themselves (zero_to_fp32's, through safe_load) must refuse
        monkeypatch.setattr(ckpt, "check_files", lambda folder: None)
    out = _copy(run, tmp_path)
    marker = str(tmp_path / "pwned")
    planted = os.path.join(out, "checkpoints", "step-00000002", name)
    TW.plant(planted, marker)
    for argv in (("eval", "--model", out, "--num-eval", "8"),
                 ("export", "--run", out, "--output", str(tmp_path / "export"))):
        rc, err = _cli(capsys, *argv)
        assert not os.path.exists(marker), f"{argv[0]}: the planted pickle ran"
        assert rc == 1 and f"refusing to load {planted}: " in err and "posix.system" in err, err
        assert "internal error" not in err, err
    assert not os.path.exists(tmp_path / "export")


@pytest.mark.parametrize("name,precheck", [(MODEL_STATES, False), (OPTIM_STATES, False), (OPTIM_STATES, True)],
                         ids=["model-states-loads-alone", "optim-states-loads-alone", "optim-states-checked-first"])
@pytest.mark.slow
def test_a_resumed_run_refuses_a_planted_pickle_naming_the_file(run, tmp_path, name, precheck):
    out = _copy(run, tmp_path)
    marker = str(tmp_path / "pwned")
    planted = os.path.join(out, "checkpoints", "step-00000002", name)
    TW.plant(planted, marker)
    os.remove(os.path.join(out, "result.json"))
    os.remove(os.path.join(out, "eval.json"))  # with it, a rerun of the finished run loads nothing: it is done
    with pytest.raises(Exception) as info:
        _spawn(TW.train_spying, dict(out=out, steps=2, save_every=1, eval_before=True, num_workers=0,
                                     report=str(tmp_path / "loads"), no_precheck=not precheck))
    assert not os.path.exists(marker), "the planted pickle ran"
    msg = str(info.value)
    assert f"UntrustedCheckpoint: refusing to load {planted}: " in msg and "posix.system" in msg, msg[-3000:]
    with open(tmp_path / "loads-rank0.json") as f:
        loads = json.load(f)["loads"]
    assert all(wo is True for _, wo in loads), loads
    if not precheck:  # DeepSpeed itself got as far as the planted file, through the weights_only load
        assert planted in [p for p, _ in loads], loads


@pytest.mark.slow
def test_two_ranks_refuse_together_when_one_ranks_file_is_planted(tmp_path):
    """Only rank 1 loads its optimizer states; both ranks check every file first and refuse at once,
    with the same message, instead of rank 0 going on into DeepSpeed's collectives alone."""
    pytest.importorskip("deepspeed")
    from llave_fast.testing import spawn_ranks

    out = str(tmp_path / "run")
    kw = dict(out=out, steps=2, save_every=1, num_workers=0)
    spawn_ranks(W.run_train, 2, dict(kw, stop_after=1))
    marker = str(tmp_path / "pwned")
    planted = os.path.join(out, "checkpoints", "step-00000001", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    TW.plant(planted, marker)
    report = str(tmp_path / "loads")
    with pytest.raises(Exception, match="refusing to load"):
        spawn_ranks(TW.train_spying, 2, dict(kw, report=report))
    assert not os.path.exists(marker), "the planted pickle ran"
    errors = []
    for rank in (0, 1):
        with open(f"{report}-rank{rank}.json") as f:
            errors.append(json.load(f)["error"])
    assert errors[0] == errors[1] and f"refusing to load {planted}: " in errors[0], errors


def test_safe_load_names_an_unreadable_file(tmp_path):
    from llave_fast.checkpoint import check_files, safe_load

    bad = tmp_path / "x.pt"
    bad.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=rf"{bad} is not a readable checkpoint file"):
        safe_load(str(bad))
    with pytest.raises(ValueError, match=rf"{bad} is not a readable checkpoint file"):
        check_files(str(tmp_path))


# ================================================================== 2. a full disk
def test_resume_cuts_a_torn_last_log_line_and_names_any_other_bad_line(tmp_path, capsys):
    from llave_fast.train import _truncate_log

    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.5}) for s in (1, 2, 3)]
    log.write_text("\n".join(lines) + "\n" + '{"step": 4, "lo')
    _truncate_log(str(log), 2)
    assert log.read_text() == "\n".join(lines[:2]) + "\n"
    assert "cut the torn last line" in capsys.readouterr().out
    # a whole last entry without its newline is kept (and given one)
    log.write_text(lines[0] + "\n" + lines[1])
    _truncate_log(str(log), 3)
    assert log.read_text() == "\n".join(lines[:2]) + "\n"
    # a bad line before the last is not a torn write: the resume stops, naming FILE:LINE
    log.write_text(lines[0] + "\n" + "garbage\n" + lines[2] + "\n")
    with pytest.raises(ValueError, match=rf"{log}:2: not a log entry"):
        _truncate_log(str(log), 3)
    assert [p.name for p in tmp_path.iterdir()] == ["train_log.jsonl"]  # no temporary file left


class _OsWithFullDisk:
    """``os`` as train.py sees it, except that a write stores ``room`` bytes, then raises ENOSPC."""

    def __init__(self, room: int):
        self.room = room

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        if self.room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, bytes(data[:self.room]))
        self.room -= n
        return n


def test_a_log_line_cut_by_a_full_disk_is_taken_back_and_named(tmp_path, monkeypatch):
    """Simulated (a write that stores 10 bytes, then ENOSPC); the real one is the tmpfs test below."""
    from llave_fast.checkpoint import DiskFull
    from llave_fast.training import runlog as T  # the module that writes train_log.jsonl

    root = tmp_path / "checkpoints"
    (root / "step-00000001").mkdir(parents=True)
    (root / "step-00000001" / "COMPLETE").write_text('{"step": 1}')
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n')
    monkeypatch.setattr(T, "os", _OsWithFullDisk(10))
    with pytest.raises(DiskFull) as info:
        T._append_log(str(log), {"step": 2, "loss": 0.25}, str(root))
    assert log.read_text() == '{"step": 1}\n'  # the 10 bytes that went in were cut back off
    msg = str(info.value)
    assert msg.startswith("no space left on ") and f"while writing {log}; last complete checkpoint: " \
        f"{root}/step-00000001 " in msg, msg


def test_a_full_disk_while_checkpointing_names_the_file_and_the_last_checkpoint(tmp_path, monkeypatch):
    """Simulated with an engine whose second file write fails as torch.save reports it (a generic stream
    error, no errno) on a disk left with 0 bytes; the real one is the tmpfs test below."""
    from llave_fast import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    (root / "step-00000001").mkdir(parents=True)
    (root / "step-00000001" / "COMPLETE").write_text('{"step": 1}')

    class Inner:
        def save(self, state, path):
            with open(path, "wb") as f:
                f.write(b"partial")
            if "optim" in path:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    class Engine:
        checkpoint_engine = Inner()

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            os.makedirs(os.path.join(save_dir, tag))
            for name in (MODEL_STATES, OPTIM_STATES):
                self.checkpoint_engine.save({}, os.path.join(save_dir, tag, name))

    real = shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: real(p)._replace(free=0))
    engine = Engine()
    with pytest.raises(ckpt.DiskFull) as info:
        ckpt.save(engine, str(root), 2, {})
    msg = str(info.value)
    assert msg.startswith("no space left on ") and f"while writing {root}/step-00000002/{OPTIM_STATES}; " \
        f"last complete checkpoint: {root}/step-00000001 " in msg, msg
    assert msg.endswith(f"). The unfinished {root}/step-00000002 was removed"), msg
    assert sorted(os.listdir(root)) == ["step-00000001"]
    assert isinstance(engine.checkpoint_engine, Inner)  # the guard is gone after the save
    # plenty of space: the same stream error is not a full disk, and passes unchanged
    monkeypatch.setattr(ckpt.shutil, "disk_usage", real)
    with pytest.raises(RuntimeError, match="inline_container") as info:
        ckpt.save(engine, str(root), 2, {})
    assert not isinstance(info.value, ckpt.DiskFull)


def test_a_save_removes_torn_checkpoints_of_other_steps(tmp_path):
    """A save killed midway leaves a folder without its marker; after a resume with another
    --save-every no later save lands on that step, so it stayed forever. Every save removes them."""
    from llave_fast import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    (root / "step-00000001").mkdir(parents=True)
    (root / "step-00000001" / "COMPLETE").write_text('{"step": 1}')
    (root / "step-00000003").mkdir()  # torn: no marker
    (root / "step-00000003" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (root / "notes").mkdir()  # not a checkpoint's name: left alone

    class Inner:
        def save(self, state, path):
            with open(path, "wb") as f:
                f.write(b"state")

    class Engine:
        checkpoint_engine = Inner()

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            os.makedirs(os.path.join(save_dir, tag))
            self.checkpoint_engine.save({}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))

    ckpt.save(Engine(), str(root), 4, {})
    assert sorted(p for p in os.listdir(root) if p.startswith("step-")) == ["step-00000001", "step-00000004"]
    assert (root / "notes").is_dir()


def test_rewrites_are_atomic_and_a_failed_one_keeps_the_file(tmp_path, monkeypatch):
    from llave_fast import checkpoint as ckpt
    from llave_fast.cli import is_user_error
    from llave_fast.evaluate import _write_json_atomic

    for write in (lambda p: ckpt.write_atomic(p, "new"), lambda p: _write_json_atomic(p, {"new": 1})):
        path = tmp_path / "eval.json"
        path.write_text("old")

        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(ckpt.os, "fsync", full)
        with pytest.raises(ckpt.DiskFull, match=rf"^no space left on .* while writing {path}$") as info:
            write(str(path))
        assert is_user_error(info.value)  # the command prints it as one error line, not an internal error
        assert path.read_text() == "old" and os.listdir(tmp_path) == ["eval.json"]
        monkeypatch.undo()
        write(str(path))
        assert path.read_text() != "old" and os.listdir(tmp_path) == ["eval.json"]
        path.unlink()


def test_export_over_an_earlier_one_swaps_a_new_folder_in(run, tmp_path, monkeypatch):
    from llave_fast.export import export_run
    from llave_fast.model import LLaVEEmbedder

    dest = tmp_path / "export"
    export_run(run["dir"], str(dest), dtype="fp32")
    (dest / "left-over.txt").write_text("from an earlier export")
    export_run(run["dir"], str(dest), dtype="fp32")
    assert not (dest / "left-over.txt").exists()  # a new folder, not files written into the old one
    assert sorted(os.listdir(tmp_path)) == ["export"]
    LLaVEEmbedder.from_pretrained(str(dest))
    # a failed export leaves the earlier one whole, and nothing beside it
    before = sorted(os.listdir(dest))
    monkeypatch.setattr(LLaVEEmbedder, "save_pretrained",
                        lambda self, path, **kw: (os.makedirs(path, exist_ok=True), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        export_run(run["dir"], str(dest), dtype="fp32")
    assert sorted(os.listdir(dest)) == before and sorted(os.listdir(tmp_path)) == ["export"]
    # a folder that is not an export is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"--output '{other}' is a folder that holds other files and is not a "
                                         "llave-fast export"):
        export_run(run["dir"], str(other))
    assert (other / "notes.txt").read_text() == "mine"


def _private_tmpfs_works(tmp_path) -> str | None:
    """None when this process may mount a tmpfs in a private mount namespace; else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command"
    if os.geteuid() != 0:
        return "not root: cannot mount a tmpfs"
    probe = tmp_path / "probe"
    probe.mkdir()
    r = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
                       capture_output=True, text=True)
    return None if r.returncode == 0 else f"unshare -m / mount refused: {r.stderr.strip()}"


@pytest.mark.slow
def test_a_real_full_disk_in_a_checkpoint_and_in_the_log_is_named_and_the_run_resumes(tmp_path):
    pytest.importorskip("deepspeed")
    why = _private_tmpfs_works(tmp_path)
    if why:
        pytest.skip(f"a real ENOSPC needs a private tmpfs ({why}); the simulated tests above cover the logic")
    mount, report = tmp_path / "mnt", tmp_path / "report.json"
    mount.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(TESTS), TESTS,
                                                       os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run(["unshare", "-m", sys.executable, os.path.join(TESTS, "_trust_workers.py"), "full-disk",
                        str(mount), str(report)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and report.exists(), (r.stdout[-3000:], r.stderr[-3000:])
    rep = json.loads(report.read_text())
    out = os.path.join(str(mount), "run")
    root = os.path.join(out, "checkpoints")
    last = os.path.join(root, "step-00000001")
    # A: the step-2 checkpoint met ENOSPC (torch.save: a generic stream error): named as a full disk
    msg = rep["checkpoint_error"]
    assert msg and "DiskFull: no space left on tmpfs (tmpfs mounted at " + str(mount) in msg, msg
    assert f"while writing {root}/step-00000002/" in msg and f"; last complete checkpoint: {last} " in msg, msg
    assert rep["tags_after_checkpoint_error"] == ["step-00000001"]  # the unfinished step 2 was removed
    # B: the log line met ENOSPC after 40 bytes: named, and cut back off
    msg = rep["log_error"]
    assert msg and f"DiskFull: no space left on tmpfs (tmpfs mounted at {mount}" in msg, msg
    assert f"while writing {out}/train_log.jsonl; last complete checkpoint: {last} " in msg, msg
    assert rep["log_after_log_error"] == rep["padded_first_line"], rep["log_after_log_error"][-300:]
    # C: with space again the same command resumes and finishes; the log holds every step once
    assert rep["resume_error"] is None, rep["resume_error"]
    assert [json.loads(line)["step"] for line in rep["final_log"].splitlines()] == [1, 2, 3]
    assert rep["result"]["steps"] == 3 and rep["result"]["resumed_at_step"] == 1
    assert rep["final_tags"] == ["step-00000002", "step-00000003"]
