"""llave_fast.testing: multi-rank tests on a machine whose DeepSpeed op cache is cold.

The CI flake (tests/test_model.py::test_zero3_partitions_at_load_and_every_weight_lands
aborting on a fresh machine, then passing) came from the ranks JIT-building DeepSpeed's
CPU communication op themselves; ``spawn_ranks`` now builds it once before spawning. This
file empties the extension folder (a private one: TORCH_EXTENSIONS_DIR) and checks that
the warm-up builds the op, clears a lock left by a killed builder, and that the spawned
ranks then only load it.
"""

from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("deepspeed")

from llave_fast import testing  # noqa: E402


def _ds_init_rank(rank, world):
    import deepspeed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    deepspeed.init_distributed(dist_backend="gloo")  # loads deepspeed_shm_comm
    import torch
    import torch.distributed as dist

    x = torch.ones(3) * (rank + 1)
    dist.all_reduce(x)
    assert x.tolist() == [3.0, 3.0, 3.0]


@pytest.mark.slow
def test_cold_extension_cache_is_built_once_before_the_ranks_start(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv(testing.WARM_ENV, raising=False)  # restored afterwards
    build_dir = testing.extension_dir()
    assert build_dir.startswith(str(tmp_path)) and not os.listdir(build_dir)
    # a killed builder's lock: torch's FileBaton would wait on it forever
    lock = os.path.join(build_dir, "lock")
    open(lock, "w").close()
    old = time.time() - testing.STALE_LOCK_S - 60
    os.utime(lock, (old, old))

    note = testing.warm_deepspeed_ops(force=True)
    assert "removed a stale build lock" in note and "built deepspeed_shm_comm" in note, note
    (so,) = [f for f in os.listdir(build_dir) if f.endswith(".so")]
    built_at = os.path.getmtime(os.path.join(build_dir, so))
    assert not os.path.exists(lock)

    testing.spawn_ranks(_ds_init_rank, 2)  # warm already: the ranks load the op, build nothing
    assert os.path.getmtime(os.path.join(build_dir, so)) == built_at
    assert testing.warm_deepspeed_ops() == "already warm in this process"
    # a process this one starts (a rank) inherits the word that the folder is warm
    assert os.environ[testing.WARM_ENV] == build_dir
    testing._warmed_dirs.discard(build_dir)
    assert testing.warm_deepspeed_ops() == "already warm (built by the parent process)"


@pytest.mark.parametrize("cuda, local_world, warmed", [(False, "2", True), (False, "1", False), (True, "2", False)])
def test_several_cpu_ranks_of_a_training_run_build_the_op_in_turn(monkeypatch, cuda, local_world, warmed):
    """``llave-fast train`` under a launcher with several CPU ranks on one machine warms
    DeepSpeed's op (a file lock: one builds, the others wait and load it) before
    ``deepspeed.init_distributed``, where every rank would otherwise build it at once."""
    import deepspeed
    import torch

    from llave_fast.training import deepspeed_setup

    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    # where init_distributed looks it up (llave_fast.testing re-exports it from there)
    monkeypatch.setattr(deepspeed_setup, "warm_deepspeed_ops", lambda force=False: calls.append("warm") or "built")
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: calls.append(("init", dist_backend)))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: int(local_world))
    for k, v in dict(RANK="0", WORLD_SIZE=local_world, LOCAL_RANK="0", LOCAL_WORLD_SIZE=local_world, MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    assert deepspeed_setup.init_distributed() == (0, int(local_world))
    backend = "nccl" if cuda else "gloo"
    assert ("warm" in calls) is warmed
    assert calls[-1] == ("init", backend)  # the op is warm before the group (and DeepSpeed) starts


@pytest.mark.parametrize("built", [False, True])
def test_one_cpu_rank_says_when_deepspeed_builds_its_op(tmp_path, monkeypatch, capsys, built):
    """One CPU rank: DeepSpeed builds its op inside init_distributed, silently (1-2 min on a fresh
    machine); the run says so first, and says nothing once the op is built."""
    import deepspeed
    import torch

    from llave_fast.training import deepspeed_setup

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build_dir = testing.extension_dir()
    if built:
        open(os.path.join(build_dir, testing.SHM_OP + ".so"), "w").close()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend: None)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    assert deepspeed_setup.init_distributed() == (0, 1)
    out = capsys.readouterr().out
    assert ("DeepSpeed builds its CPU communication op" in out) is (not built), out
    if not built:
        assert build_dir in out and "once" in out, out


def test_a_fresh_build_lock_is_left_alone(tmp_path, monkeypatch):
    """A lock younger than STALE_LOCK_S may belong to a build in progress elsewhere: not removed."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build_dir = testing.extension_dir()
    lock = os.path.join(build_dir, "lock")
    open(lock, "w").close()
    assert testing._remove_stale_lock(build_dir) is None and os.path.exists(lock)


def _every_rank_fails(rank, world):
    import torch.distributed as dist

    dist.barrier()
    raise ValueError(f"rank {rank} of {world}: a check fails")


@pytest.mark.slow
def test_a_failing_rank_still_fails_the_caller():
    """Ranks that pass leave by os._exit(0); a rank's exception must still reach the caller."""
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException, match=r"rank [01] of 2: a check fails"):
        testing.spawn_ranks(_every_rank_fails, 2)


def test_the_op_warm_up_lives_in_production_code_and_testing_re_exports_it():
    """Production code never imports llave_fast.testing (testing may import production): the warm-up
    is the training package's, and testing's names are the same objects."""
    import ast
    import pathlib

    from llave_fast.training import deepspeed_setup

    for name in ("warm_deepspeed_ops", "extension_dir", "_remove_stale_lock", "_warmed_dirs", "WARM_ENV"):
        assert getattr(testing, name) is getattr(deepspeed_setup, name), name
    package = pathlib.Path(testing.__file__).parent
    importers = []
    for path in package.rglob("*.py"):
        if path.name == "testing.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] == "testing" \
                    and (node.level or node.module.startswith("llave_fast")):
                importers.append(f"{path.relative_to(package)}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name == "llave_fast.testing" for a in node.names):
                importers.append(f"{path.relative_to(package)}:{node.lineno}")
    assert not importers, f"production modules importing llave_fast.testing: {importers}"
