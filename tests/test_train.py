"""The training loop on the CPU: ranks agree, kill-and-resume, export-and-reload."""

import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from llave_fast.testing import spawn_ranks  # noqa: E402

import _train_workers as W  # noqa: E402


def _losses(run_dir):
    with open(os.path.join(run_dir, "train_log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted single-rank run of 4 steps, checkpoints every 2."""
    out = str(tmp_path_factory.mktemp("ref"))
    spawn_ranks(W.run_train, 1, dict(out=out))
    return out


@pytest.mark.slow
def test_two_ranks_zero3_match_one_rank(reference_run, tmp_path):
    out = str(tmp_path / "two")
    spawn_ranks(W.run_train, 2, dict(out=out))
    one, two = _losses(reference_run), _losses(out)
    assert len(one) == len(two) == 4
    assert one[0] != one[-1], "the loss must move"
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-4 * abs(a), f"1 rank {one} vs 2 ranks {two}"


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_trajectory(reference_run, tmp_path):
    out = str(tmp_path / "resumed")
    # dies after 3 steps: the last complete checkpoint is step 2, step 3 is lost
    spawn_ranks(W.run_train, 1, dict(out=out, stop_after=3))
    assert len(_losses(out)) == 3
    # a save that was killed half-way: a folder without the COMPLETE marker
    torn = os.path.join(out, "checkpoints", "step-00000003")
    os.makedirs(torn)
    with open(os.path.join(torn, "garbage.pt"), "wb") as f:
        f.write(b"\0" * 10)
    # resumed in-process (no loader workers) and keeping more checkpoints: both may change on
    # resume, and the data order and the trajectory do not depend on them
    spawn_ranks(W.run_train, 1, dict(out=out, num_workers=0, keep_checkpoints=3))
    assert _losses(out) == _losses(reference_run)
    with open(os.path.join(out, "train_config.json")) as f:
        saved = json.load(f)
    assert (saved["num_workers"], saved["keep_checkpoints"], saved["stop_after"]) == (0, 3, None)
    assert saved["_history"][-1] == {**saved["_history"][-1], "at_step": 2, "changed": {
        "keep_checkpoints": [2, 3], "num_workers": [2, 0], "stop_after": [3, None]}}
    with open(os.path.join(out, "eval.json")) as f, open(os.path.join(reference_run, "eval.json")) as g:
        assert json.load(f)["p_at_1_after"] == json.load(g)["p_at_1_after"]


@pytest.mark.slow
def test_eval_json_scores_each_task_against_its_own_targets(reference_run):
    from llave_fast.train import TrainConfig, summary_text

    with open(os.path.join(reference_run, "eval.json")) as f:
        result = json.load(f)
    by = result["by_task"]
    assert set(by) == {"i2t", "t2i", "vqa"}
    assert sum(v["num_queries"] for v in by.values()) == 16  # tiny_cfg's num_eval
    for v in by.values():
        assert set(v) == {"p_at_1", "chance", "num_queries", "num_candidates"}
        assert v["chance"] == pytest.approx(1 / v["num_candidates"]) and 0.0 <= v["p_at_1"] <= 1.0
        assert v["num_candidates"] < result["num_candidates"]  # only its own task's targets
    # the old keys stay: overall precision@1 against all targets, split by subset
    assert set(result["p_at_1_after_by_subset"]) == {"synthetic_i2t", "synthetic_t2i", "synthetic_vqa"}
    text = summary_text(result, TrainConfig(steps=4))
    assert "precision@1 by task" in text
    for task, v in by.items():
        row = next(line.split() for line in text.splitlines() if line.split()[:1] == [task])
        assert row[1:3] == [f"{v['p_at_1']:.3f}", f"{v['chance']:.4f}"] and row[4:] == [str(v["num_queries"]),
                                                                                       str(v["num_candidates"])]


@pytest.mark.slow
def test_export_reloads_with_the_same_embeddings(reference_run, tmp_path):
    from llave_fast.data import SyntheticDataset
    from llave_fast.evaluate import evaluate_model
    from llave_fast.export import export_run, load_run_model
    from llave_fast.model import LLaVEEmbedder

    merged, tag = load_run_model(reference_run)
    assert tag == "step-00000004"
    path = export_run(reference_run, str(tmp_path / "fp32"), dtype="fp32")
    reloaded = LLaVEEmbedder.from_pretrained(path)
    ds = SyntheticDataset(6, seed=9, split="eval")
    texts = [ds[i]["qry"] for i in range(6)]
    images = [ds[i]["qry_image"] for i in range(6)]
    with torch.no_grad():
        a = merged(merged.processor(texts, images))
        b = reloaded(reloaded.processor(texts, images))
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    # the eval of the export equals the eval the training run printed
    with open(os.path.join(reference_run, "eval.json")) as f:
        trained = json.load(f)
    again = evaluate_model(path, "synthetic", num_eval=16, seed=3)
    assert again["p_at_1"] == trained["p_at_1_after"]
    assert again["by_task"] == trained["by_task"]
    # the default export is 16-bit and close to the fp32 weights
    path16 = export_run(reference_run, str(tmp_path / "bf16"))
    m16 = LLaVEEmbedder.from_pretrained(path16, torch_dtype="auto")
    assert m16.dtype == torch.bfloat16
    with torch.no_grad():
        c = m16(m16.processor(texts, images)).float()
    assert (c - a).norm() / a.norm() < 3e-2


def test_a_trained_model_carries_llaves_video_layout(reference_run, tmp_path):
    """LLaVE's training writes mm_newline_position "grid" (and bilinear pooling) into the model it
    trains; ours does too, in the run's base/config.json and in every export, and the exported model
    embeds videos with no key missing."""
    from llave_fast.export import export_run
    from llave_fast.model import LLaVEEmbedder
    from llave_fast.model.video import check_video_config

    want = {"mm_newline_position": "grid", "mm_spatial_pool_mode": "bilinear", "add_faster_video": False}
    path = export_run(reference_run, str(tmp_path / "e"), dtype="fp32")
    for folder in (os.path.join(reference_run, "base"), path):
        with open(os.path.join(folder, "config.json")) as f:
            saved = json.load(f)
        assert {k: saved.get(k) for k in want} == want, folder
    reloaded = LLaVEEmbedder.from_pretrained(path)
    check_video_config(reloaded.config)
    assert {k: getattr(reloaded.config, k) for k in want} == want


@pytest.mark.slow
def test_eval_on_mmeb_candidate_lists(reference_run, tmp_path):
    """`llave-fast eval` on MMEB-eval style files: each query against its own candidates."""
    from llave_fast.cli import main
    from llave_fast.data import SyntheticDataset
    from llave_fast.data.mmeb_eval import read_eval_file
    from llave_fast.evaluate import evaluate_model
    from llave_fast.export import export_run

    path = export_run(reference_run, str(tmp_path / "m"), dtype="fp32")
    ds = SyntheticDataset(40, seed=5, split="eval")
    text_targets = [ds[i] for i in range(40) if ds[i]["pos_image"] is None][:12]
    rows = []
    for k in range(0, 12, 3):
        r = text_targets[k]
        img = f"q{k}.png"
        if r["qry_image"] is not None:
            r["qry_image"].save(tmp_path / img)
        rows.append({"qry_text": r["qry"], "qry_img_path": img if r["qry_image"] is not None else "",
                     "tgt_text": [text_targets[j]["pos_text"] for j in (k, k + 1, k + 2)],
                     "tgt_img_path": ["", "", ""]})
    f = tmp_path / "eval.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = evaluate_model(path, str(f))
    assert result["protocol"].startswith("per-query")
    assert result["datasets"]["eval"]["num_queries"] == 4  # every row: MMEB-eval files are scored in full
    assert 0.0 <= result["p_at_1"] <= 1.0
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", path, "--data", str(f), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["p_at_1"] == result["p_at_1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"qry_text": "x", "tgt_text": ["a", "b"], "tgt_img_path": [""]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .*2 candidates but tgt_img_path has 1"):
        read_eval_file(str(bad))


def test_eval_precision_follows_the_device(monkeypatch):
    """`llave-fast eval`: bf16 on CUDA (LLaVE's 16-bit evaluation), fp32 on the CPU, flags override."""
    from llave_fast.evaluate import eval_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert eval_precision() == (torch.device("cpu"), torch.float32)
    assert eval_precision("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA is not available"):
        eval_precision("cuda")
    with pytest.raises(ValueError, match=r"dtype must be one of \['auto', .*'llave'\], got 'int8'"):
        eval_precision("cpu", "int8")
    with pytest.raises(ValueError, match="device must be"):
        eval_precision("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert eval_precision() == (torch.device("cuda"), torch.bfloat16)
    assert eval_precision("auto", "fp32") == (torch.device("cuda"), torch.float32)


@pytest.mark.slow
def test_eval_runs_in_the_requested_precision(reference_run, tmp_path):
    from llave_fast.evaluate import evaluate_model
    from llave_fast.export import export_run

    path = export_run(reference_run, str(tmp_path / "fp32"), dtype="fp32")
    a = evaluate_model(path, "synthetic", num_eval=16, seed=3)
    assert (a["device"], a["dtype"]) == ("cpu" if not torch.cuda.is_available() else "cuda",
                                        "float32" if not torch.cuda.is_available() else "bfloat16")
    b = evaluate_model(path, "synthetic", num_eval=16, seed=3, device="cpu", dtype="bf16")
    assert (b["device"], b["dtype"]) == ("cpu", "bfloat16")


# ---------------------------------------------------------------- the package's shape (issue 24)
def _training_modules():
    import pathlib

    import llave_fast.training as pkg

    return {p.stem: p for p in pathlib.Path(pkg.__file__).parent.glob("*.py") if p.stem != "__init__"}


def _listed_order():
    """The modules as llave_fast.train's docstring lists them, bottom (config) to top (loop)."""
    import re

    import llave_fast.train as T

    return re.findall(r"^    (\w+)  +\S", T.__doc__, re.M)


def test_training_modules_import_one_way_and_never_upward():
    """Each module of llave_fast.training imports only modules listed before it in llave_fast.train's
    docstring (config at the bottom, loop at the top), and none imports llave_fast.train, cli, ablate
    or testing, at module level or inside a function."""
    import ast

    modules = _training_modules()
    order = _listed_order()
    assert sorted(order) == sorted(modules), (order, sorted(modules))
    assert order[0] == "config" and order[-1] == "loop"
    for name, path in modules.items():
        below = set(order[: order.index(name)])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                if node.level == 1:
                    assert target[1:].split(".")[0] in below, f"{name} imports {target} (line {node.lineno})"
                else:
                    top = target.lstrip(".").split(".")
                    if node.level == 2 or top[0] == "llave_fast":
                        parts = top[1:] if top[0] == "llave_fast" else top
                        assert parts[:1] not in (["train"], ["cli"], ["ablate"], ["testing"], ["training"]), \
                            f"{name} imports {target} (line {node.lineno})"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[:2] not in (["llave_fast", m] for m in
                                                            ("train", "cli", "ablate", "testing")), (name, alias.name)


def test_training_modules_are_small_and_the_loop_fits_a_screen():
    import inspect

    from llave_fast.training import loop

    sizes = {name: len(path.read_text().splitlines()) for name, path in _training_modules().items()}
    assert max(sizes.values()) <= 300, sizes
    assert len(inspect.getsource(loop._train).splitlines()) <= 60


def test_without_a_bar_the_loop_prints_only_its_lines(capsys):
    """No progress bar (--progress false, or ranks other than 0): updates print nothing, the lines the
    loop writes above the bar (skipped rows) are still printed, one each."""
    from llave_fast.training.console import progress_bar, say

    for rank, enabled in ((0, False), (1, True)):
        bar = progress_bar(rank, total=5, initial=1, enabled=enabled)
        bar.set_postfix_str("loss 1.0000")
        bar.update(1)
        say(bar, f"step 2: skipped bad row (rank {rank})")
        bar.close()
        captured = capsys.readouterr()
        assert captured.out == f"step 2: skipped bad row (rank {rank})\n" and captured.err == ""
    bar = progress_bar(0, total=5, initial=1, enabled=True)  # rank 0 with a bar: the bar goes to stderr
    bar.update(1)
    bar.close()
    captured = capsys.readouterr()
    assert captured.out == "" and "train" in captured.err and "2/5" in captured.err


def test_the_step_loss_states_every_choice_that_matters():
    """The run's loss passes local_loss, symmetric, reduction, backend and determinism itself (a
    change of a default in llave_fast.loss must not change what training computes); the probe's
    per-direction diagnosis is the single-rank loss of each direction."""
    from llave_fast.loss import FusedHardnessLoss
    from llave_fast.reference import reference_loss
    from llave_fast.train import MicroStepLoss, TrainConfig
    from llave_fast.training.step import build_loss

    probe = build_loss(TrainConfig(loss_backend="torch", logit_scale=20.0, alpha=3.0), world=1)
    loss = probe.loss_fn
    assert isinstance(loss, FusedHardnessLoss)
    assert (loss.local_loss, loss.distributed, loss.symmetric, loss.reduction, loss.backend,
            loss.deterministic, loss.logit_scale, loss.alpha) == (True, False, True, "mean", "torch", False, 20.0, 3.0)
    micro = build_loss(TrainConfig(accumulation_steps=2), world=2).loss_fn  # across ranks: the gathered batch
    assert isinstance(micro, MicroStepLoss) and micro.steps == 2
    assert (micro.loss_fn.local_loss, micro.loss_fn.distributed) == (True, True)

    g = torch.Generator().manual_seed(1)
    q, t = torch.nn.functional.normalize(torch.randn(2, 6, 8, generator=g), dim=-1)
    probe(q, t)
    got = probe.directions(20.0, 3.0)
    want = {"query->target": reference_loss(q.double(), t.double(), logit_scale=20.0, alpha=3.0, symmetric=False),
            "target->query": reference_loss(t.double(), q.double(), logit_scale=20.0, alpha=3.0, symmetric=False)}
    assert got.keys() == want.keys()
    for k in want:
        assert abs(got[k] - want[k].item()) < 1e-4, (k, got[k], want[k].item())


# ---------------------------------------------------------------- GradCache chunks padded to their own rows
def _mixed_pairs(n=10):
    from PIL import Image

    texts = ["a red circle", "three blue stars at the top left of the picture in a row", "x"]
    q_txt, q_img, t_txt, t_img = [], [], [], []
    for i in range(n):
        img = Image.new("RGB", (40 + 9 * i, 30 + 5 * (i % 3)), (20 * i, 200 - 15 * i, 90))
        q_txt.append(("<image> " if i % 2 else "") + texts[i % 3] + f" {i}")
        q_img.append(img if i % 2 else None)
        t_txt.append(("<image>" if i % 3 == 0 else texts[(i + 1) % 3]))
        t_img.append(img if i % 3 == 0 else None)
    return q_txt, q_img, t_txt, t_img


def test_chunks_drop_only_columns_no_row_of_the_chunk_uses():
    from llave_fast.model import build_tiny_model
    from llave_fast.training.step import by_length, chunks

    proc = build_tiny_model(0).processor
    q_txt, q_img, _, _ = _mixed_pairs()
    for side in ("right", "left"):
        batch = proc(q_txt, q_img, padding_side=side)
        s, order = by_length(batch)
        lengths = batch["attention_mask"].sum(dim=1)
        assert torch.equal(s["attention_mask"].sum(dim=1), lengths.sort(stable=True).values)
        assert [x is None for x in s["pixel_values"]] == [batch["pixel_values"][i] is None for i in order.tolist()]
        for c in chunks(s, 3):
            mask = c["attention_mask"]
            assert mask.shape[1] == int(mask.sum(dim=1).max())  # padded to its own longest row only
            ids = c["input_ids"][mask.bool()]
            assert ids.numel() == int(mask.sum())
        whole = torch.cat([c["input_ids"][c["attention_mask"].bool()] for c in chunks(s, 3)])
        assert torch.equal(whole, s["input_ids"][s["attention_mask"].bool()])  # no real token lost
        # a side that fits one chunk (GradCache's single pass) is left as collated: sorting would gain
        # nothing there and only change the rounding, and with it the default job's numbers
        rows = batch["attention_mask"].shape[0]
        same, none = by_length(batch, rows)
        assert same is batch and none is None
        assert by_length(batch, rows - 1)[1] is not None


@pytest.mark.parametrize("negatives", [False, True])
def test_sorted_trimmed_chunks_give_the_plain_steps_loss_and_gradients(negatives):
    """Rows sorted by length and chunks cut to their own longest row (the training step) give the
    loss and gradients of GradCache on the batch as collated (both within float rounding)."""
    from llave_fast.gradcache import GradCache
    from llave_fast.model import build_tiny_model
    from llave_fast.training.config import TrainConfig
    from llave_fast.training.step import build_loss, by_length, chunks

    model = build_tiny_model(0)
    model.train()
    proc = model.processor
    q_txt, q_img, t_txt, t_img = _mixed_pairs()
    q, t = proc(q_txt, q_img), proc(t_txt, t_img)
    n = proc(list(reversed(t_txt)), list(reversed(t_img))) if negatives else None
    ids = torch.arange(10)
    kw = dict(target_ids=torch.cat([ids, 100 + ids]) if negatives else ids, query_ids=ids)
    cfg = TrainConfig(loss_backend="torch")
    results = []
    for sort in (False, True):
        model.zero_grad(set_to_none=True)
        probe = build_loss(cfg, 1)
        if sort:
            (qs, qo), (ts, to), (ns, no) = by_length(q), by_length(t), by_length(n)
            assert not torch.equal(qo, torch.arange(10))  # the order really changes
            loss = GradCache(model, probe, 3, split=chunks)(qs, ts, ns, orders=(qo, to, no), **kw)
        else:
            loss = GradCache(model, probe, 3)(q, t, n, **kw)
        results.append((loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) <= 1e-5 * abs(l0), (l0, l1)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-6, msg=k)


# ------------------------------------------------------------------ transformers under ZeRO-3
@pytest.mark.parametrize("version, ok", [("5.17.0", False), ("5.22.2", False), ("5.23.0", True), ("5.25.0", True),
                                         ("6.0.0.dev0", True)])
def test_zero3_from_config_needs_a_transformers_that_gathers_what_it_initialises(version, ok):
    """transformers 5.3-5.22 (5.17 on the lent GPU machines) fail to build a model from its config
    under ZeRO-3 ("Fan in and fan out can not be computed"): refused first, naming the version and the fix."""
    from llave_fast.errors import MissingDependency
    from llave_fast.training.engine import ZERO3_MIN_TRANSFORMERS, check_zero3_transformers

    if ok:
        check_zero3_transformers(version)
        return
    with pytest.raises(MissingDependency) as err:
        check_zero3_transformers(version)
    msg = str(err.value)
    assert f"transformers {version} cannot build" in msg and f"transformers>={ZERO3_MIN_TRANSFORMERS}" in msg, msg
    assert "--deepspeed-config" in msg, msg


def test_build_model_checks_transformers_only_where_it_builds_from_a_config_under_zero3(monkeypatch):
    import transformers

    from llave_fast.errors import MissingDependency
    from llave_fast.training import engine
    from llave_fast.training.config import TrainConfig

    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    built = []
    # no real HfDeepSpeedConfig: it would switch transformers' ZeRO-3 mode on for the rest of the session
    monkeypatch.setattr(transformers.integrations, "HfDeepSpeedConfig", lambda ds: built.append("zero3 mode"))
    monkeypatch.setattr(engine, "_HF_DS_CONFIG", None)

    def stub(name):
        return lambda *a, **k: built.append(name) or 1 / 0

    monkeypatch.setattr("llave_fast.model.build_tiny_model", stub("tiny"))
    monkeypatch.setattr("llave_fast.model.arch.build_arch_model", stub("arch"))
    monkeypatch.setattr("llave_fast.model.LLaVEEmbedder.from_pretrained", stub("checkpoint"))
    zero3, zero2 = {"zero_optimization": {"stage": 3}}, {"zero_optimization": {"stage": 2}}
    for model in ("tiny", "arch:llave-0.5b"):  # from a config: refused before anything is built
        with pytest.raises(MissingDependency, match="transformers 5.17.0 cannot build"):
            engine.build_model(TrainConfig(model=model), zero3, False)
    assert built == []
    # a checkpoint under ZeRO-3 (transformers' from_pretrained, not its from-config init), and stage 2:
    # no check, the (stubbed) build runs
    for model, ds in (("some/checkpoint", zero3), ("tiny", zero2)):
        with pytest.raises(ZeroDivisionError):
            engine.build_model(TrainConfig(model=model), ds, False)
    assert built == ["zero3 mode", "checkpoint", "tiny"]
    from transformers.integrations import is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()


def test_the_transformers_floor_is_one_number_everywhere():
    """pyproject's [train] extra, and the wheel that fetch_wheels.sh carries to the GPU machine and
    gpu_check.sh's stage T installs (both read the constant through _steps.sh's transformers_floor)."""
    import re
    import subprocess

    from llave_fast.training.engine import ZERO3_MIN_TRANSFORMERS

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = re.search(r'"transformers>=([0-9.]+)"', open(os.path.join(root, "pyproject.toml")).read())
    from packaging.version import Version

    assert extra and Version(extra.group(1)) == Version(ZERO3_MIN_TRANSFORMERS), extra
    got = subprocess.run(["bash", "-c", "source benchmarks/_steps.sh && transformers_floor"], cwd=root,
                         capture_output=True, text=True)
    assert got.returncode == 0 and got.stdout.strip() == ZERO3_MIN_TRANSFORMERS, got
    for script in ("fetch_wheels.sh", "gpu_check.sh"):
        assert "$(transformers_floor)" in open(os.path.join(root, "benchmarks", script)).read(), script


_LAUNCHER_ENV = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}  # as this module found them


@pytest.mark.parametrize("cuda, current, local", [(True, 1, "1"), (True, 0, "1"), (False, 0, "9")])
def test_a_caller_s_group_keeps_the_caller_s_device(monkeypatch, cuda, current, local):
    """init_distributed joining a group the caller made: LOCAL_RANK (which DeepSpeed's engine moves to)
    defaults to the CUDA device the caller chose, and where that is still device 0 (maybe never chosen)
    to the rank modulo the node's 8 devices, never to the global rank (no device index on a second node:
    "invalid device ordinal"); without CUDA to the rank, as before."""
    import deepspeed
    import torch.distributed as dist

    from llave_fast.training import deepspeed_setup as S

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # absent now, and again after the test (setenv records)
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 9)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 16)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl" if cuda else "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: None)
    assert S.init_distributed() == (9, 16)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", local)


def test_the_caller_s_group_test_leaves_no_launcher_variables():
    """The test above sets RANK and WORLD_SIZE through init_distributed: left behind, every later DeepSpeed
    run in the process would believe it is one rank of 16 (zero.Init refuses; a fresh-clone CI run saw it)."""
    now = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    assert now == _LAUNCHER_ENV, now


def test_the_step_hands_the_loss_the_duplicate_ids_only_when_asked():
    """mask_duplicates: the batch's target ids (then the negatives' ids, which may repeat a positive's)
    go to the loss as target_ids, and the queries are labelled with their targets' ids (t->q masks a
    query whose target is the positive's duplicate). Off: no ids at all. Checked where the training
    step calls GradCache, so a loop that stopped passing them would fail here."""
    import types

    from llave_fast.training import loop
    from llave_fast.training.config import TrainConfig
    from llave_fast.training.step import duplicate_ids

    ids, neg_ids = torch.tensor([5, 7, 5, 9]), torch.tensor([7, 11, 12, 13])
    side = {"input_ids": torch.ones(4, 3, dtype=torch.long), "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    batch = {"query": side, "target": side, "negatives": side, "target_ids": ids, "negative_ids": neg_ids}
    got = duplicate_ids(batch, True)
    assert torch.equal(got["target_ids"], torch.cat([ids, neg_ids])) and torch.equal(got["query_ids"], ids)
    assert duplicate_ids(batch, False) == {}
    no_neg_ids = duplicate_ids(dict(batch, negative_ids=None), True)  # negatives without ids: never masked
    assert torch.equal(no_neg_ids["target_ids"], ids)

    seen = []

    def gc(q, t, n, orders=None, **kw):
        seen.append(kw)
        return torch.tensor(1.0)

    engine = types.SimpleNamespace(device=torch.device("cpu"), step=lambda: None)
    scheduler = types.SimpleNamespace(get_last_lr=lambda: [1e-4])
    probe = types.SimpleNamespace(non_finite=lambda: [0.0, 0.0], clear=lambda: None)
    for mask in (True, False):
        run = types.SimpleNamespace(cfg=TrainConfig(mask_duplicates=mask, chunk_size=8), rank=0, world=1,
                                    ckpt_root="unused")
        loss, lr = loop.train_step(run, engine, scheduler, gc, probe, dict(batch), 0)
        assert (loss, lr) == (1.0, 1e-4)
    assert set(seen[0]) == {"target_ids", "query_ids"} and torch.equal(seen[0]["target_ids"], torch.cat([ids, neg_ids]))
    assert torch.equal(seen[0]["query_ids"], ids) and seen[1] == {}


def test_ranks_that_resolved_other_options_or_data_are_refused_naming_each_difference(monkeypatch):
    """Each rank builds the batch order from its own row count and options: a rank started with another
    --num-train (or seed, or copy of the data) trained on other rows, silently. Paths may differ."""
    from llave_fast.training import stops
    from llave_fast.training.config import TrainConfig

    cfg = TrainConfig(num_train=64, seed=3, data="synthetic")
    data = {"train_rows": 64, "skipped_rows_at_build": 0, "bf16": False}

    def two_ranks(change, data_change=None):
        def gather(mine, world):
            other = dict(mine, **change)
            other.update({f"(data) {k}": v for k, v in (data_change or {}).items()})
            return [mine, other]
        monkeypatch.setattr(stops, "_gather_objects", gather)

    two_ranks({})
    stops.check_ranks_agree(cfg, 2, data)  # alike: nothing said
    stops.check_ranks_agree(cfg, 1, data)  # one rank: nothing to compare
    two_ranks({"num_train": 80, "seed": 4}, {"train_rows": 80})
    with pytest.raises(ValueError, match="the 2 ranks disagree") as info:
        stops.check_ranks_agree(cfg, 2, data)
    msg = str(info.value)
    assert "num_train: rank 0 64, rank 1 80" in msg and "seed: rank 0 3, rank 1 4" in msg
    assert "(data) train_rows: rank 0 64, rank 1 80" in msg
    # paths are per node: rank 1 reading its own copy of the data under another folder is fine
    seen = []
    monkeypatch.setattr(stops, "_gather_objects", lambda mine, world: seen.append(mine) or [mine, dict(mine)])
    stops.check_ranks_agree(TrainConfig(num_train=64, data="/node1/mmeb", output_dir="/node1/run"), 2, data)
    stops.check_ranks_agree(TrainConfig(num_train=64, data="/node2/mmeb", output_dir="/node2/run"), 2, data)
    assert seen[0] == seen[1] and "data" not in seen[0] and "num_train" in seen[0]


def test_a_resume_with_another_rank_count_is_refused_before_the_model_is_built(tmp_path):
    """ZeRO checkpoints are per rank: DeepSpeed failed deep in its loader (a tensor size mismatch, a bare
    AssertionError), after minutes of model building, and train_config.json had recorded the resume."""
    from llave_fast.train import ResumeRefused, plan_resume
    from llave_fast.training.config import TrainConfig

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "COMPLETE").write_text("")
    cfg = TrainConfig(output_dir=str(run))
    import dataclasses

    saved = dict(dataclasses.asdict(cfg), _data={"train_rows": 100, "bf16": False, "world_size": 2})
    (run / "train_config.json").write_text(json.dumps(saved))
    with pytest.raises(ResumeRefused, match=r"trained on 2 rank\(s\); 1 now"):
        plan_resume(cfg, 100, False, 1)
    tag, _history = plan_resume(cfg, 100, False, 2)
    assert tag == "step-00000002"
    del saved["_data"]["world_size"]  # a run from before the rank count was recorded: not compared
    (run / "train_config.json").write_text(json.dumps(saved))
    assert plan_resume(cfg, 100, False, 1)[0] == "step-00000002"


@pytest.mark.slow
def test_zero3_starts_from_other_weights_than_zero2_for_one_seed_but_loads_the_same_checkpoint(tmp_path):
    """Pins what README's Training section says: a model trained from scratch under ZeRO-3 is built under
    deepspeed.zero.Init, whose draws differ from a ZeRO-2 build of the same seed (the randomly initialised
    weights differ; norms and zero biases agree); a checkpoint loads the same weights under both stages.
    Two ranks, so ZeRO-3 really partitions."""
    spawn_ranks(W.initial_weights_by_stage, 2, dict(out=str(tmp_path), seed=3))
    with open(tmp_path / "report.json") as f:
        report = json.load(f)
    for build in ("tiny", "checkpoint"):
        assert report[build]["params"] == 68 and report[build]["partitioned"], report
    differ = report["tiny"]["differ"]
    assert "model.language_model.embed_tokens.weight" in differ and len(differ) > 20, report
    assert not any("norm" in n for n in differ), differ
    assert report["checkpoint"]["differ"] == [], report


def test_a_loss_backend_that_cannot_run_here_is_refused_before_the_model_is_built(monkeypatch):
    """--loss-backend triton where triton cannot run (a CPU without TRITON_INTERPRET) used to pass the
    checks, build the model, evaluate, and fail at step 1: check_config now asks the loss's own rule
    (backends.resolve_backend) and refuses with its message."""
    from llave_fast.backends import triton_backend
    from llave_fast.errors import InvalidArgument
    from llave_fast.train import TrainConfig, check_config

    monkeypatch.setattr(triton_backend, "available_on", lambda device: (False, f"no kernels on {device.type}"))
    with pytest.raises(InvalidArgument, match=r"loss_backend \(--loss-backend\) 'triton': backend='triton' cannot run here: "
                                              r"no kernels on (cpu|cuda)"):
        check_config(TrainConfig(loss_backend="triton"), 1)
    for backend in ("auto", "torch", "reference"):
        check_config(TrainConfig(loss_backend=backend), 1)


def test_the_summary_says_what_was_trained_on_beside_the_data_size():
    """2 steps of 64 pairs over 15360 rows used to read "rows: 15360 used": the data's size."""
    from llave_fast.training.report import run_result, summary_text
    from llave_fast.train import TrainConfig

    cfg = TrainConfig(steps=2, global_batch=64, output_dir="run")
    r = run_result(cfg, steps=2, start=0, resumed=False, seconds=1.0, world=1, step_times=[0.5, 0.5], waits=[0, 0],
                   train_rows=15360, skipped_at_build=3, skipped_in_training=1, ckpt_root="run/checkpoints")
    text = summary_text(r, cfg)
    assert "used" not in text, text
    assert "15359 training rows usable, 4 skipped" in text, text
    assert "trained on:  128 pairs (2 steps x 64;" in text, text


def test_sigterm_raises_in_the_main_thread_only_while_a_start_runs(monkeypatch):
    """SIGTERM is Terminated (a KeyboardInterrupt: the start cleans up as after Ctrl-C) from the start
    of train() to its first step, and ignored while the clean-up runs (a launcher's second SIGTERM);
    afterwards, when someone else set a handler, and in one of several ranks (a handler would wait for
    a blocked collective), it is left alone."""
    import signal

    from llave_fast.training.run_folder import (Terminated, end_sigterm_as_interrupt, sigterm_as_interrupt,
                                                sigterm_ignored_while_cleaning_up)

    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    try:
        sigterm_as_interrupt()
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
        sigterm_ignored_while_cleaning_up()
        signal.raise_signal(signal.SIGTERM)  # ignored: the clean-up goes on
        end_sigterm_as_interrupt()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        sigterm_ignored_while_cleaning_up()  # nothing installed: nothing changes
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        monkeypatch.setenv("WORLD_SIZE", "2")
        sigterm_as_interrupt()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        end_sigterm_as_interrupt()
        monkeypatch.delenv("WORLD_SIZE")

        def theirs(signum, frame):
            pass
        signal.signal(signal.SIGTERM, theirs)
        sigterm_as_interrupt()
        assert signal.getsignal(signal.SIGTERM) is theirs
        end_sigterm_as_interrupt()
        assert signal.getsignal(signal.SIGTERM) is theirs
    finally:
        signal.signal(signal.SIGTERM, before)


def test_train_leaves_its_process_as_it_found_it(tmp_path):
    """train() in a process that goes on (a notebook, ablate, a test) left transformers' ZeRO-3 mode on and
    its launcher variables set: every model built afterwards in that process was partitioned at birth (a
    ZeRO-2 run after a ZeRO-3 one failed: "'weight' must be 2-D"), and a later start took the old
    MASTER_PORT. It also left TOKENIZERS_PARALLELISM "false" (the caller's tokenizers on one thread), its
    filters of DeepSpeed's deprecation warnings, and the global RNG seeded with the run's seed (the caller's
    own seeding no longer decided its next draw). In a fresh process with none of these variables: a failed
    start, a ZeRO-3 run, a ZeRO-2 run, and a ZeRO-3 run under a caller's own transformers ZeRO-3 config,
    which is the current one again after."""
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in W.RUN_ENV_KEYS}
    env["PYTHONPATH"] = os.pathsep.join([tests, os.path.dirname(tests), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", f"import _train_workers as W; W.runs_in_one_process({str(tmp_path)!r})"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    before, *after, caller = report
    assert before["env"] == {k: None for k in W.RUN_ENV_KEYS} and not before["zero3"], before
    assert before["quieted"] == [], before
    assert before["params"] > 0 and before["empty_params"] == 0, before
    assert [a["tag"] for a in after] == ["failed start", "zero3.json run", "zero2.json run"], after
    assert after[0]["error"] == "MissingFile", after[0]
    assert [a.get("steps") for a in after[1:]] == [2, 2], after
    for a in after:
        assert a["env"] == before["env"], a  # the launcher variables and the tokenizers switch the run set are gone
        assert a["quieted"] == before["quieted"] and a["draw"] == before["draw"], a
        assert not a["zero3"] and a["empty_params"] == 0 and a["params"] == before["params"], a
        assert a["group"], a  # the group stays: DeepSpeed keeps groups made from it for the process's life
    assert caller == {"tag": "caller's config", "steps": 2, "caller_config_current": True}, caller


def test_the_run_summary_says_pass_for_one_and_passes_for_other_counts():
    """It said "1 passes over the training rows" when a run trained on its rows once."""
    from llave_fast.training.report import _passes

    assert [_passes(n) for n in (1.0, 1.0004, 0.5, 2.0, 0.0, 1.25)] == [
        "1 pass", "1 pass", "0.5 passes", "2 passes", "0 passes", "1.25 passes"]
