"""SIGTERM while training steps (llave_fast/training/preempt.py): the step under way finishes, the
steps done are checkpointed, the run exits 143 and the same command resumes it. A process that
never reaches the next step still ends, after the grace period or at a second SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from llave_fast import checkpoint as ckpt
from llave_fast.errors import InvalidArgument
from llave_fast.training.preempt import SAME_REQUEST_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))

# the real command, with train_step parked before step PARK's engine step until a line arrives on stdin
_PARKED = """
import os
import select
import sys
import llave_fast.training.loop as loop

PARK = int(sys.argv.pop(1))
PARK_RANK = os.environ.get("PARK_RANK")  # of several ranks, the one parked (unset: every process)
from llave_fast.training import preempt
preempt.SAME_REQUEST_S = float(sys.argv.pop(1))  # shorter than the shipped 5 s: the test's margins stay wide
real = loop.train_step
def parked(run, engine, scheduler, gc, probe, batch, step):
    if step + 1 == PARK and PARK_RANK in (None, os.environ.get("RANK")):
        print("PARKED", flush=True)
        # the SIGTERM arrives here, in the middle of the step. Polled, not a blocking readline: a signal the
        # kernel hands to another thread runs Python's handler only when the main thread next runs Python
        while not select.select([sys.stdin], [], [], 0.05)[0]:
            pass
        sys.stdin.readline()
    return real(run, engine, scheduler, gc, probe, batch, step)

loop.train_step = parked
from llave_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""

ARGS = ["train", "--steps", "5", "--save-every", "100", "--num-train", "160", "--num-eval", "16", "--global-batch",
        "32", "--chunk-size", "16", "--warmup-steps", "1", "--eval-before", "false", "--progress", "false",
        "--num-workers", "1", "--seed", "3"]


PARKED_SAME_S = 0.5  # the parked runs' SAME_REQUEST_S


def _parked_run(out, park: int, signals: int = 1):
    """Run ARGS (one loader worker) parked in step ``park``, send SIGTERM ``signals`` times there to its
    whole process group, let the step go on."""
    p = subprocess.Popen([sys.executable, "-c", _PARKED, str(park), str(PARKED_SAME_S), *ARGS, "--output-dir", str(out)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=ENV, start_new_session=True)
    try:
        seen = []
        for line in p.stdout:
            seen.append(line)
            if line.strip() == "PARKED":
                break
        assert seen and seen[-1].strip() == "PARKED", (seen, p.stderr.read() if p.poll() is not None else "")
        for i in range(signals):
            if i:
                # sooner than PARKED_SAME_S is the first delivered twice (a launcher's); 3 s past it, a handler run
                # late on a loaded machine still sees the two as two
                time.sleep(PARKED_SAME_S + 3)
            os.killpg(p.pid, signal.SIGTERM)  # to the loader's worker too, as scancel or DeepSpeed's launcher
        rest, err = p.communicate("\n", timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, "".join(seen) + rest, err


def _logged_steps(out):
    with open(out / "train_log.jsonl") as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.mark.slow
def test_sigterm_in_a_step_checkpoints_the_steps_done_and_the_same_command_resumes(tmp_path):
    """Before, SIGTERM during training killed the process: the steps since the last checkpoint were
    lost (here all of them: --save-every 100), and the folder held no checkpoint at all."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    rc, stdout, err = _parked_run(out, park=3)
    assert rc == 143, (rc, err[-3000:])
    assert "SIGTERM: the step under way finishes" in err, err[-3000:]
    assert f"stopped by SIGTERM after 3 steps; checkpoint of the steps done: {out / 'checkpoints' / 'step-00000003'}" \
        in err, err[-3000:]
    assert "rerun the same command with --output-dir" in err and "step 3" in err, err[-3000:]
    assert ckpt.complete_tags(str(out / "checkpoints")) == ["step-00000003"]
    assert _logged_steps(out) == [1, 2, 3]
    assert not (out / "eval.json").exists()
    r = subprocess.run([sys.executable, "-m", "llave_fast", *ARGS, "--output-dir", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _logged_steps(out) == [1, 2, 3, 4, 5]
    assert (out / "eval.json").is_file()


@pytest.mark.slow
def test_sigterm_in_the_last_step_keeps_the_run_and_leaves_the_evaluation(tmp_path):
    """In the last step the checkpoint is the final one: the run stops before its evaluation (exit 143),
    and the same command then only evaluates. A second SIGTERM ends the process at once."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    rc, _, err = _parked_run(out, park=5)
    assert rc == 143 and "stopped by SIGTERM after 5 steps" in err, (rc, err[-3000:])
    assert ckpt.complete_tags(str(out / "checkpoints")) == ["step-00000005"] and not (out / "eval.json").exists()
    r = subprocess.run([sys.executable, "-m", "llave_fast", *ARGS, "--output-dir", str(out)], capture_output=True,
                       text=True, timeout=600, cwd=REPO, env=ENV)
    assert r.returncode == 0 and (out / "eval.json").is_file(), r.stderr[-3000:]
    assert _logged_steps(out) == [1, 2, 3, 4, 5]
    # twice: the process ends at the second, without its checkpoint
    out2 = tmp_path / "run2"
    rc, _, err = _parked_run(out2, park=2, signals=2)
    assert rc == 143 and "a second SIGTERM: exiting now" in err, (rc, err[-3000:])
    assert not (out2 / "checkpoints").exists() or ckpt.complete_tags(str(out2 / "checkpoints")) == []


_STUCK = """
import os, signal, sys, time
from llave_fast.training import preempt

preempt.checkpoint_on_sigterm()
pid = os.fork()
if pid == 0:  # a data-loader worker: SIGTERM sent to the process group leaves it alone
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
    os._exit(3)
_, status = os.waitpid(pid, 0)
print("child", os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3, preempt.sigterm_requested(), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
print("requested", preempt.sigterm_requested(), flush=True)
time.sleep(60)  # never reaches a step's start: stuck as a rank waiting on a dead one
print("not ended", flush=True)
"""


def test_a_process_that_never_reaches_the_next_step_ends_after_the_grace_period():
    env = dict(ENV, LLAVE_FAST_SIGTERM_GRACE_S="1.5")
    r = subprocess.run([sys.executable, "-c", _STUCK], capture_output=True, text=True, timeout=50, env=env, cwd=REPO)
    assert r.returncode == 143, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines() == ["child True False", "requested True"], r.stdout
    assert "forced exit in 1.5 s" in r.stderr and "SIGTERM 1.5 s ago and the steps done are not checkpointed" \
        in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_grace_period_is_refused_naming_the_variable(monkeypatch, value):
    from llave_fast.training import preempt

    monkeypatch.setenv("LLAVE_FAST_SIGTERM_GRACE_S", value)
    with pytest.raises(InvalidArgument, match=f"LLAVE_FAST_SIGTERM_GRACE_S must be a number of seconds > 0, got "
                                              f"'{value}'"):
        preempt.grace_seconds()
    monkeypatch.setenv("LLAVE_FAST_SIGTERM_GRACE_S", "")
    assert preempt.grace_seconds() == preempt.DEFAULT_GRACE_S


def test_the_handler_is_only_ours_to_put_back_and_never_replaces_another(monkeypatch):
    from llave_fast.training import preempt

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        preempt.checkpoint_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is preempt._on_sigterm
        preempt.end_checkpoint_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not preempt.sigterm_requested()

        def theirs(signum, frame):
            pass
        signal.signal(signal.SIGTERM, theirs)
        preempt.checkpoint_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is theirs
        preempt.end_checkpoint_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_sigterm_on_another_rank_checkpoints_and_stops_this_one(monkeypatch, tmp_path):
    """The flag rides on the all-reduce each step makes anyway: a rank not signalled stops with the
    one that was, after the same checkpoint (ZeRO-3's save needs every rank)."""
    from llave_fast.training import stops
    from llave_fast.training.run_folder import Terminated

    def all_reduce(t):  # the other rank was sent SIGTERM
        t.add_(torch.tensor([0.0, 1.0], dtype=t.dtype))

    monkeypatch.setattr(stops.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(stops, "collective_device", lambda group=None: torch.device("cpu"))
    rank0_says = []
    monkeypatch.setattr(stops, "_gather_objects", lambda obj, world: [rank0_says[0], obj])  # this is rank 1
    saved = []
    rank0_says[:] = [True]  # rank 0 sees no complete checkpoint of step 4
    with pytest.raises(Terminated, match="stopped by SIGTERM after step 4"):
        stops._stop_if_asked(None, 4, 0, 2, str(tmp_path), save=saved.append)
    assert saved == [4]
    # a rank whose own disk lacks the marker (only rank 0 writes it) follows rank 0's view: no save of its own,
    # which would wait forever for the others in the save's collectives
    rank0_says[:] = [False]
    with pytest.raises(Terminated):
        stops._stop_if_asked(None, 5, 0, 2, str(tmp_path), save=saved.append)
    assert saved == [4]

    def quiet(t):
        pass
    monkeypatch.setattr(stops.dist, "all_reduce", quiet)
    stops._stop_if_asked(None, 5, 0, 2, str(tmp_path), save=saved.append)  # nobody signalled: goes on
    assert saved == [4]


_REENTRANT = r"""
import sys
from llave_fast.training import preempt

preempt.checkpoint_on_sigterm()
print("ready", flush=True)
sys.stderr.write("x" * (4 << 20))  # blocks on the full pipe: the SIGTERM arrives inside this write
sys.stderr.flush()
print("wrote", preempt.sigterm_requested(), flush=True)
preempt.end_checkpoint_on_sigterm()
"""


@pytest.mark.slow
def test_a_sigterm_in_the_middle_of_a_write_to_stderr_is_taken_not_a_crash():
    """The handler runs wherever the main thread was: inside a write to sys.stderr (the progress bar, a
    log line), its own print to the buffered sys.stderr raised RuntimeError("reentrant call"), which
    crashed the run before its checkpoint (stderr is a buffered stream unless PYTHONUNBUFFERED is set)."""
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "-c", _REENTRANT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=REPO)
    try:
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # the child is blocked in its write: nobody reads its stderr yet
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    err = err.replace("x", "")
    assert p.returncode == 0 and out.splitlines() == ["wrote True"], (p.returncode, out, err[-2000:])
    assert "SIGTERM: the step under way finishes" in err and "reentrant" not in err, err[-2000:]


def test_a_sigterm_answered_is_not_a_request_to_the_next_run_in_the_process():
    """Before, the request stayed set after the run it stopped: a second train() in the same process
    (the Python API) whose handler was not installed (another handler in place, or not the main thread)
    stopped at its first step, "stopped by SIGTERM after step 0"."""
    from llave_fast.training import preempt

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        preempt.checkpoint_on_sigterm()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs in the main thread, between bytecodes
            if preempt.sigterm_requested():
                break
            time.sleep(0.01)
        assert preempt.sigterm_requested()
        preempt.end_checkpoint_on_sigterm()  # the run stopped (its watchdog cancelled)
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the next run's process has its own handler
        preempt.checkpoint_on_sigterm()  # installs nothing
        assert not preempt.sigterm_requested()
        preempt.end_checkpoint_on_sigterm()
    finally:
        signal.signal(signal.SIGTERM, before)


_STEPPING = r"""
import time
from llave_fast.training import preempt

preempt.checkpoint_on_sigterm()
print("ready", flush=True)
end = time.time() + 2
while time.time() < end:  # a step, in Python: the handler runs at once
    pass
print("step done", preempt.sigterm_requested(), flush=True)
preempt.end_checkpoint_on_sigterm()
"""

_LAUNCHER = r"""
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
def forward(signum, frame):  # as torchrun and DeepSpeed's launcher do, a moment after the signal
    time.sleep(0.3)
    child.send_signal(signum)
signal.signal(signal.SIGTERM, forward)
sys.exit(child.wait())
"""


@pytest.mark.slow
def test_a_sigterm_to_the_job_and_the_launchers_copy_of_it_are_one_request():
    """A scheduler signals every process of the job (SLURM) or the process group, and the launcher
    above the rank passes its own SIGTERM on: the rank got two, and the second exited at once, without
    the checkpoint the first asked for."""
    p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _STEPPING], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=ENV, cwd=REPO, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        os.killpg(p.pid, signal.SIGTERM)  # the launcher and the rank
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 0 and out.splitlines() == ["step done True"], (p.returncode, out, err)
    assert f"SIGTERM again within {SAME_REQUEST_S:g} s of the first: the same request" in err, err


_TWO_RUNS = """
import os, signal, time
from llave_fast.training import preempt

os.environ["LLAVE_FAST_SIGTERM_GRACE_S"] = "1"
preempt.checkpoint_on_sigterm()               # run 1: grace 1 s, read now
os.environ["LLAVE_FAST_SIGTERM_GRACE_S"] = "soon"  # changed while the run goes on: not read by the handler
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.1)
print("requested", preempt.sigterm_requested(), flush=True)
preempt.end_checkpoint_on_sigterm()           # run 1 answered its request: its watchdog is cancelled
os.environ["LLAVE_FAST_SIGTERM_GRACE_S"] = "30"
preempt.checkpoint_on_sigterm()               # run 2 in the same process
time.sleep(2.5)                               # past run 1's grace: run 1's watchdog must not end run 2
preempt.end_checkpoint_on_sigterm()
print("run 2 went on", flush=True)
"""


def test_the_grace_is_read_at_install_and_a_watchdog_belongs_to_its_own_run():
    r = subprocess.run([sys.executable, "-c", _TWO_RUNS], capture_output=True, text=True, timeout=60, env=ENV, cwd=REPO)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines() == ["requested True", "run 2 went on"], (r.stdout, r.stderr)
    assert "forced exit in 1 s" in r.stderr and "Traceback" not in r.stderr, r.stderr



_HUNG_WORKER = """
import os, signal, sys, time
import torch
import torch.utils.data._utils as du
from llave_fast.training import loading, preempt

du.MP_STATUS_CHECK_INTERVAL = 0.2  # torch waits this long for a worker before its SIGTERM (5 s shipped)

class Hangs(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        if i > 0:
            time.sleep(120)  # a read or a decode that never returns
        return i

preempt.checkpoint_on_sigterm()
loader = torch.utils.data.DataLoader(Hangs(), batch_size=None, num_workers=1, prefetch_factor=2,
                                     multiprocessing_context="fork",
                                     worker_init_fn=preempt.loader_worker_ignores_sigterm)
batches = iter(loader)
assert next(batches) == 0
(worker,) = batches._workers
os.kill(worker.pid, signal.SIGTERM)  # the job's SIGTERM, sent to the whole group: the worker ignores it
time.sleep(0.3)
assert worker.is_alive()
preempt.end_checkpoint_on_sigterm()
STOP_FN(batches)
time.sleep(0.2)
print("ALIVE AFTER STOP", worker.is_alive(), flush=True)
if worker.is_alive():
    worker.kill()  # (the premise's case) so that this process can exit: multiprocessing joins it at exit
"""


@pytest.mark.parametrize("stop, alive", [("loading.stop_loader_workers", False),
                                         ("(lambda b: b._shutdown_workers())", True)])
def test_a_hung_loader_worker_is_killed_when_the_steps_end(stop, alive):
    """The run's loader workers ignore SIGTERM, so the SIGTERM torch sends a worker that did not end in time
    does nothing: a worker hung in a read lived on after the steps, and the run's exit waited on it (multiprocessing
    joins its children at exit). stop_loader_workers kills it. The second case is the premise: torch's own shutdown
    (what dropping the iterator did before) leaves such a worker alive."""
    r = subprocess.run([sys.executable, "-c", _HUNG_WORKER.replace("STOP_FN", stop)], capture_output=True, text=True,
                       env=ENV, timeout=60)
    assert r.returncode == 0 and f"ALIVE AFTER STOP {alive}" in r.stdout, r.stdout + r.stderr
    assert ("did not end; killing it" in r.stderr) is not alive, r.stderr


# ---- two real gloo ranks (CPU), started as torchrun starts them: rank 1 parked in the middle of step 2
TWO_RANK_ARGS = ["train", "--steps", "3", "--save-every", "100", "--num-train", "64", "--num-eval", "0",
                 "--global-batch", "16", "--chunk-size", "8", "--warmup-steps", "1", "--eval-before", "false",
                 "--progress", "false", "--num-workers", "1", "--seed", "3"]


def _rank_env(rank: int, port: int, **extra) -> dict:
    return dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", **extra)


def _two_ranks(out, code_args: list, park_rank: int | None = None):
    """Rank 0 and rank 1 of one run, in one new process group (rank 0 leads it, as a job's), stdout and
    stderr in files beside ``out``; rank ``park_rank``'s stdin and stdout are pipes (``_PARKED`` parks it)."""
    from llave_fast.training.deepspeed_setup import _free_port, warm_deepspeed_ops

    warm_deepspeed_ops()  # once, here, as spawn_ranks does: the ranks only load it
    port, procs = _free_port(), []
    extra = {} if park_rank is None else {"PARK_RANK": str(park_rank)}
    for rank in (0, 1):
        parked = rank == park_rank
        logs = [open(f"{out}.rank{rank}.{name}", "w") for name in ("out", "err")]
        procs.append(subprocess.Popen(
            [sys.executable, *code_args], cwd=REPO, env=_rank_env(rank, port, **extra), text=True,
            stdin=subprocess.PIPE if parked else subprocess.DEVNULL, stdout=subprocess.PIPE if parked else logs[0],
            stderr=logs[1], process_group=0 if rank == 0 else procs[0].pid))
        for f in logs:
            f.close()
    return procs


def _ended(procs) -> list:
    """The ranks' exit statuses; ranks not ended in 300 s (one waiting on another forever) are killed, with
    their group, and the test fails."""
    try:
        return [p.wait(timeout=300) for p in procs]
    finally:
        _killed(procs)


def _killed(procs) -> None:
    if any(p.poll() is None for p in procs):
        os.killpg(procs[0].pid, signal.SIGKILL)  # the ranks' group: their loader workers too
        for p in procs:
            p.communicate()


def _read(out, rank: int, name: str) -> str:
    with open(f"{out}.rank{rank}.{name}") as f:
        return f.read()


def _two_ranks_parked_then_resumed(tmp_path, signal_both: bool):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    procs = _two_ranks(out, ["-c", _PARKED, "2", str(PARKED_SAME_S), *TWO_RANK_ARGS, "--output-dir", str(out)],
                       park_rank=1)
    try:
        seen = []
        for line in procs[1].stdout:
            seen.append(line)
            if line.strip() == "PARKED":
                break
        assert seen and seen[-1].strip() == "PARKED", (seen, _read(out, 0, "err")[-2000:])
        time.sleep(1)  # meanwhile rank 0 goes on into step 2 and waits on rank 1 in a collective (a C call)
        if signal_both:
            os.killpg(procs[0].pid, signal.SIGTERM)  # both ranks and their loader workers, as scancel would
        else:
            os.kill(procs[1].pid, signal.SIGTERM)  # rank 1 only: rank 0 learns it at step 3's start
        procs[1].communicate("\n", timeout=300)
        rcs = _ended(procs)
    finally:
        _killed(procs)
    errs = [_read(out, r, "err") for r in (0, 1)]
    assert rcs == [143, 143], (rcs, errs[0][-3000:], errs[1][-3000:])
    told = [("SIGTERM: the step under way finishes" in e) for e in errs]
    assert told == [signal_both, True], errs
    tag = out / "checkpoints" / "step-00000002"
    assert f"stopped by SIGTERM (it reached {2 if signal_both else 1} of the 2 ranks) after 2 steps; checkpoint " \
           f"of the steps done: {tag}" in errs[0], errs[0][-3000:]
    assert "stopped by SIGTERM" not in errs[1], errs[1][-3000:]  # said once, by rank 0
    assert ckpt.complete_tags(str(out / "checkpoints")) == ["step-00000002"]
    assert json.loads((tag / ckpt.MARKER).read_text()) == {"step": 2}
    assert {f"zero_pp_rank_{r}_mp_rank_00_{part}_states.pt" for r in (0, 1) for part in ("model", "optim")} \
        <= set(os.listdir(tag))  # each rank's shard: both ranks joined the save
    assert _logged_steps(out) == [1, 2]
    # the same command, both ranks: the remaining step
    again = tmp_path / "again"
    rcs = _ended(_two_ranks(again, ["-m", "llave_fast", *TWO_RANK_ARGS, "--output-dir", str(out)]))
    assert rcs == [0, 0], (rcs, _read(again, 0, "err")[-3000:], _read(again, 1, "err")[-3000:])
    assert _logged_steps(out) == [1, 2, 3]
    assert ckpt.latest_complete(str(out / "checkpoints")) == "step-00000003"
    assert "3 of 3 (1 in this run, resumed at step 2)" in _read(again, 0, "out")


@pytest.mark.slow
def test_a_sigterm_to_one_of_two_real_ranks_checkpoints_both_at_the_same_step_and_resumes(tmp_path):
    """gloo, two processes: SIGTERM to rank 1 only, in the middle of step 2. The flag rides on the next
    step's all-reduce: both ranks join the same save of step 2 (rank 0 writes COMPLETE), both exit 143,
    and the same two-rank command trains step 3."""
    _two_ranks_parked_then_resumed(tmp_path, signal_both=False)


@pytest.mark.slow
def test_a_sigterm_to_both_real_ranks_as_a_process_group_kill_checkpoints_once_and_resumes(tmp_path):
    """As scancel or a process-group kill: both ranks (and their loader workers) are sent SIGTERM, rank 0
    while it waits on rank 1 in a collective of step 2. One save of step 2, both exit 143, resumable."""
    _two_ranks_parked_then_resumed(tmp_path, signal_both=True)
