"""The ``llave-fast`` command line: help, defaults, flag syntax, errors, eval of a run folder."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llave_fast import __version__
from llave_fast.cli import HIDDEN_FIELDS, build_parser, is_user_error, train_config_from_args
from _helpers import run_cli as _main  # noqa: E402
from llave_fast.train import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=120, cwd=None):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "llave_fast", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env)


def _train_actions(argv):
    parser = build_parser(argv)
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions}




# ------------------------------------------------------------------------------ help and version
def test_bare_command_prints_help_and_version_exists():
    r = _run()
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: llave-fast")
    for cmd in ("train", "export", "eval"):
        assert f"    {cmd} " in r.stdout
    assert "Traceback" not in r.stderr
    v = _run("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"llave-fast {__version__}"


def test_train_help_describes_every_option_and_hides_test_only_ones(capsys):
    actions = _train_actions(["train"])
    for f in dataclasses.fields(TrainConfig):
        a = actions[f.name]
        if f.name in HIDDEN_FIELDS or f.metadata.get("hidden"):
            assert a.help == "==SUPPRESS==", f"--{f.name} is test-only and must not be in --help"
            continue
        assert f.metadata.get("help"), f"TrainConfig.{f.name} has no help text"
        assert f.metadata["help"].rstrip(".") in a.help
        assert "Value: " in a.help and "Default: " in a.help, a.help
    rc, out, _ = _main(capsys, "train", "--help")
    assert rc == 0
    assert "--stop-after" not in out
    assert "--global-batch INT" in out and "--subsets A,B,..." in out and "{auto,triton,torch,reference}" in out
    assert "comma-separated list" in out and "true or false" in out and "'none' unsets it" in out


@pytest.mark.parametrize("config", ["tiny_cpu.json", "llave_0.5b.json", "llave_0.5b_recipe.json"])
def test_train_help_shows_the_default_that_applies(config):
    """The default shown for every flag is the value the run would use: the preset's, else the built-in one."""
    from llave_fast.cli_train_flags import _show

    argv = ["train"] if config == "tiny_cpu.json" else ["train", "--config", config]
    actions = _train_actions(argv)
    applies = TrainConfig.from_json(config)
    for f in dataclasses.fields(TrainConfig):
        if f.name in HIDDEN_FIELDS:
            continue
        shown = actions[f.name].help.split("Default: ")[1]
        assert shown.split(" (from ")[0] == _show(getattr(applies, f.name)).replace("%", "%%"), (f.name, shown)
    if config == "llave_0.5b_recipe.json":  # values only the preset sets say where they come from
        assert actions["epochs"].help.endswith("Default: 1 (from llave_0.5b_recipe.json; built-in none)")
        assert "Default: 0.03 (from llave_0.5b_recipe.json" in actions["warmup_ratio"].help


def test_train_help_with_an_unreadable_config_still_works(capsys):
    rc, out, _ = _main(capsys, "train", "--config", "no_such_preset.json", "--help")
    assert rc == 0 and "built-in ones" in out and "no_such_preset.json" in out


# ------------------------------------------------------------------------------ flag syntax and merging
def test_flags_parse_lists_bools_none_and_override_the_config():
    argv = ["train", "--config", "llave_0.5b_recipe.json", "--subsets", "MSCOCO,VisDial", "--epochs", "none",
            "--use-negatives", "--mask-duplicates", "false", "--loss-backend", "torch", "--lr", "2e-5",
            "--max-length", "none", "--stop-after", "3"]
    args = build_parser(argv).parse_args(argv)
    cfg = train_config_from_args(args)
    recipe = TrainConfig.from_json("llave_0.5b_recipe.json")
    assert cfg.subsets == ["MSCOCO", "VisDial"]
    assert cfg.epochs is None and recipe.epochs == 1  # 'none' unsets what the preset set
    assert cfg.use_negatives is True and cfg.mask_duplicates is False
    assert cfg.loss_backend == "torch" and cfg.lr == 2e-5 and cfg.max_length is None
    assert cfg.stop_after == 3  # hidden, but still a flag
    assert cfg.global_batch == recipe.global_batch  # not given: the preset's value
    assert TrainConfig.from_json("tiny_cpu.json").save_every == 50 != TrainConfig().save_every
    default = train_config_from_args(build_parser(["train"]).parse_args(["train"]))
    assert default.save_every == 50  # tiny_cpu.json is the default preset


def test_a_short_run_on_the_command_line_cuts_the_presets_warmup_with_a_note(capsys):
    from llave_fast.train import check_config

    preset = TrainConfig.from_json("tiny_cpu.json")
    assert preset.warmup_steps >= 2  # the case: the default preset's warm-up is longer than --steps 2
    for steps, want in ((2, 0), (preset.warmup_steps, preset.warmup_steps // 10)):
        argv = ["train", "--steps", str(steps)]
        cfg = train_config_from_args(build_parser(argv).parse_args(argv))
        assert (cfg.steps, cfg.warmup_steps) == (steps, want)
        check_config(cfg, world=1)  # what the run checks first: accepted now
        err = capsys.readouterr().err
        assert f"config's warm-up ({preset.warmup_steps} steps) is not shorter than --steps {steps}" in err
    argv = ["train", "--steps", "2", "--warmup-steps", "5"]  # given by the user: never changed, still refused
    cfg = train_config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.warmup_steps == 5 and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="warmup_steps=5 is not shorter than the run"):
        check_config(cfg, world=1)
    argv = ["train", "--steps", "100"]  # long enough: the preset's warm-up stands, no note
    cfg = train_config_from_args(build_parser(argv).parse_args(argv))
    assert cfg.warmup_steps == preset.warmup_steps and capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, needle", [
    (["train", "--global-batch", "abc"], "argument --global-batch: invalid int value: 'abc'"),
    (["train", "--loss-backend", "cuda"], "argument --loss-backend: invalid choice: 'cuda'"),
    (["train", "--subsets", "a,,b"], "argument --subsets: expected a comma-separated list without empty items, got 'a,,b'"),
    (["train", "--bf16", "maybe"], "argument --bf16: expected true or false, got 'maybe'"),
    (["train", "--epochs", "1x"], "argument --epochs: invalid float or 'none' value: '1x'"),
    (["eval", "--model", "m", "--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    (["export", "--run", "r", "--dtype", "llave"], "argument --dtype: invalid choice: 'llave'"),
    (["eval-video", "--model", "m", "--videos", "v", "--annotations", "a", "--output-dir", "o", "--dtype", "bf"],
     "argument --dtype: invalid choice: 'bf'"),
    (["eval", "--model", "m", "--num-eval", "0"], "argument --num-eval: expected a positive integer, got '0'"),
    (["export"], "the following arguments are required: --run"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["train", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["train", "--save-every", "-1"], "argument --save-every: expected an integer >= 0, got '-1'"),
    (["train", "--bad-images", "ignore"], "argument --bad-images: invalid choice: 'ignore' (choose from 'skip', "
                                          "'fail', 'none')"),
    (["ablate", "--alphas", "a,b"], "argument --alphas: 'a' is not a number (got 'a,b')"),
    (["ablate", "--batches", "16,0"], "argument --batches: '0' is not a positive integer"),
    (["ablate", "--seeds", "0"], "argument --seeds: expected a positive integer, got '0'"),
    (["ablate", "--family-size", "9"], "argument --family-size: expected an integer in 1..8, got '9'"),
    (["eval", "--model", "m", "--hard-family-size", "9"], "argument --hard-family-size: expected an integer in 1..8, "
                                                          "got '9'"),
    (["eval", "--model", "m", "--synthetic-background", "dark"], "argument --synthetic-background: invalid choice: "
                                                                 "'dark' (choose from 'plain', 'varied')"),
])
def test_bad_flag_values_print_one_error_and_exit_2(capsys, argv, needle):
    rc, out, err = _main(capsys, *argv)
    assert rc == 2
    assert needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err  # the error and where to read more


def test_optional_choices_take_none_and_ablate_takes_a_list_starting_with_a_negative_number(monkeypatch, capsys):
    """--bad-images none unsets the option; ``ablate --alphas -1,9`` used to be argparse's "expected one
    argument" (a leading minus read as a flag)."""
    import llave_fast.cli as cli

    args = build_parser(["train"]).parse_args(["train", "--bad-images", "none", "--loss-backend", "torch"])
    assert args.bad_images is None and args.loss_backend == "torch"
    seen = {}
    monkeypatch.setitem(cli.COMMANDS, "ablate", lambda a: seen.setdefault("alphas", a.alphas) and 0)
    for argv in (["--alphas", "-1,9"], ["--alphas=-1,9"], ["--alphas", "-0.5"]):
        seen.clear()
        rc, _, err = _main(capsys, "ablate", *argv)
        assert rc == 0 and seen["alphas"] == argv[-1].removeprefix("--alphas="), (argv, err)


def test_dtype_is_one_flag_with_every_spelling_in_export_eval_and_eval_video():
    from llave_fast.dtypes import dtype_name

    video = ["eval-video", "--model", "m", "--videos", "v", "--annotations", "a", "--output-dir", "o"]
    commands = {"export": (["export", "--run", "r"], "bf16"), "eval": (["eval", "--model", "m"], "auto"),
                "eval-video": (video, "auto")}
    for name, (argv, default) in commands.items():
        parser = build_parser(argv)
        assert parser.parse_args(argv).dtype == default, name
        for spelling, short in (("bf16", "bf16"), ("bfloat16", "bf16"), ("torch.bfloat16", "bf16"), ("half", "fp16"),
                                ("float16", "fp16"), ("fp32", "fp32"), ("float32", "fp32"), ("torch.bf16", "bf16")):
            assert parser.parse_args([*argv, "--dtype", spelling]).dtype == short, (name, spelling)
            # the library's own rule gives the same answer (llave_fast.dtypes.dtype_name)
            assert dtype_name(spelling) == short, spelling
        sub = next(a for a in parser._actions if a.dest == "command").choices[name]
        flag = next(a for a in sub._actions if "--dtype" in a.option_strings)
        assert flag.choices == (["bf16", "fp16", "fp32"] if name == "export" else
                                ["auto", "bf16", "fp16", "fp32", "llave"]), name


def test_the_command_shows_the_librarys_log_on_stderr_once(capsys):
    import logging

    from llave_fast.cli import configure_logging

    log = logging.getLogger("llave_fast.some_module")
    configure_logging()
    configure_logging()  # a second call (a second main() in one process) adds no second handler
    log.info("a note for the user")
    log.debug("not shown")
    out, err = capsys.readouterr()
    assert out == "" and err == "a note for the user\n"


# ------------------------------------------------------------------------------ user errors vs bugs
def _bad_configs(tmp_path):
    bad_json = tmp_path / "broken.json"
    bad_json.write_text('{"steps": 3,}')
    bad_type = tmp_path / "typed.json"
    bad_type.write_text('{"global_batch": "64"}')
    unknown = tmp_path / "unknown.json"
    unknown.write_text('{"global_bach": 64}')
    return bad_json, bad_type, unknown


def test_user_errors_print_one_line_naming_the_argument_and_exit_1(tmp_path, capsys):
    bad_json, bad_type, unknown = _bad_configs(tmp_path)
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    (a_model := tmp_path / "model").mkdir()  # past the model-folder check: the other arguments are checked first
    (a_model / "config.json").write_text("{}")
    (array := tmp_path / "array.json").write_text("[1, 2]")
    (null := tmp_path / "null.json").write_text("null")
    cases = [
        (["train", "--config", "nope.json"], ["--config 'nope.json'", "not found"]),
        (["train", "--config", str(bad_json)], ["--config", "broken.json", "not valid JSON"]),
        (["train", "--config", str(bad_type)], ["--config", "global_batch must be an integer", "'64'"]),
        (["train", "--config", str(unknown)], ["--config", "unknown training options", "global_bach"]),
        (["eval", "--model", str(tmp_path / "missing")], ["--model", "missing'", "no such folder"]),
        (["eval", "--model", str(not_a_run)], ["--model", "empty'", "is not a model folder"]),
        (["eval", "--model", str(a_model), "--data", str(tmp_path / "x.jsonl")], ["--data", "x.jsonl", "no such"]),
        (["eval", "--model", str(a_model), "--image-dir", str(bad_json)], ["--image-dir", "not a folder"]),
        (["eval", "--model", str(a_model), "--device", "tpu"], ["device must be", "'tpu'"]),
        (["export", "--run", str(not_a_run)], ["--run", "empty'", "not a llave-fast training run folder"]),
        (["train", "--config", str(array)], ["--config", "a training config is a JSON object", "got an array"]),
        (["train", "--config", str(null)], ["--config", "a training config is a JSON object", "got null"]),
        (["eval", "--model", str(a_model), "--output", str(tmp_path)], ["--output", "a folder; give a file name"]),
        (["eval", "--model", str(a_model), "--output-dir", str(bad_json)], ["--output-dir", "a file, not a folder"]),
        (["eval", "--model", str(a_model), "--output", str(tmp_path / "no" / "m.json")],
         ["--output", "does not exist"]),
    ]
    for argv, needles in cases:
        rc, out, err = _main(capsys, *argv)
        assert rc == 1, (argv, err)
        lines = err.strip().splitlines()
        assert lines[0].startswith(f"llave-fast {argv[0]}: error: "), (argv, err)
        assert all(n in lines[0] for n in needles), (argv, lines[0])
        assert "Traceback" not in err and len(lines) == 2, (argv, err)


def test_an_output_dir_that_is_a_file_is_refused_before_anything(tmp_path, capsys, monkeypatch):
    """It used to print "run folder: PATH", join a process group, then fail with "File exists"."""
    import llave_fast.train as train_module

    monkeypatch.setattr(train_module, "train", lambda cfg: pytest.fail("train() must not start"))
    (f := tmp_path / "afile").write_text("x")
    rc, out, err = _main(capsys, "train", "--output-dir", str(f), "--steps", "2", "--warmup-steps", "1")
    assert rc == 1 and out == "", (out, err)
    assert err.splitlines()[0] == f"llave-fast train: error: --output-dir {str(f)!r} is a file, not a folder", err


def test_eval_of_a_runs_checkpoints_or_step_folder_names_the_run_folder(tmp_path, capsys):
    """It used to say "no config.json in '...'", naming neither --model nor what to give."""
    run = tmp_path / "run"
    (step := run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    rc, _, err = _main(capsys, "eval", "--model", str(run / "checkpoints"))
    assert rc == 1 and "--model" in err and f"give the run folder --model {run} " in err, err
    rc, _, err = _main(capsys, "eval", "--model", str(step))
    assert rc == 1 and f"give the run folder --model {run} " in err, err
    assert f"export --run {run} --tag step-00000002" in err, err


def test_a_hub_id_that_cannot_be_fetched_is_refused_naming_model(capsys, monkeypatch):
    """eval with --model owner/name that the hub could not give said "'owner/name' is not a local folder and could
    not be fetched ...", naming no flag (eval-video goes through the same wrapper)."""
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError(f"planted: no network for {repo_id}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    rc, out, err = _main(capsys, "eval", "--model", "org/never-there", "--num-eval", "8")
    line = next(line for line in err.splitlines() if ": error: " in line)
    assert rc == 1 and out == "", err
    assert line.startswith("llave-fast eval: error: --model 'org/never-there' is not a local folder and could not be "
                           "fetched from the Hugging Face hub (OSError: planted: no network"), line


def test_only_the_flags_own_hub_id_is_renamed_to_the_flag(tmp_path, monkeypatch):
    """The flag was put on any error whose message began "'<id>' is not a local folder": it now follows the
    error's type and the id it carries, so another model the command loads (a run's base) keeps its message."""
    from llave_fast.cli import UsageError
    from llave_fast.cli_commands import _hub_model_named, _looks_local
    from llave_fast.errors import HubModelUnavailable, MissingFile
    from llave_fast.model.embedder import looks_like_hub_id

    mine = HubModelUnavailable("'org/a' is not a local folder and could not be fetched", model_id="org/a")
    assert isinstance(mine, MissingFile) and isinstance(mine, FileNotFoundError) and mine.model_id == "org/a"
    with pytest.raises(UsageError, match=r"^--model 'org/a' is not a local folder"):
        with _hub_model_named("--model", "org/a"):
            raise mine
    other = HubModelUnavailable("'org/base' is not a local folder and could not be fetched", model_id="org/base")
    lookalike = MissingFile("'org/a' is not a local folder and could not be fetched (a message, not the type)")
    for exc in (other, lookalike):
        with pytest.raises(MissingFile) as got:
            with _hub_model_named("--model", "org/a"):
                raise exc
        assert got.value is exc
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "here").mkdir()
    for name, hub in (("org/name", True), ("/abs/name", False), ("./org/name", False), ("../x", False),
                      ("~/x", False), ("name", False), ("a/b/c", False), ("org/here", True)):
        assert looks_like_hub_id(name) is hub, name
        assert _looks_local(name) is (not hub or os.path.exists(name)), name


def test_train_with_a_hub_id_that_cannot_be_fetched_is_refused_naming_model(tmp_path):
    """train --model owner/name that the hub could not give said "'owner/name' is not a local folder ...",
    naming no flag, as eval did. In a process of its own: a start joins a process group and sets transformers'
    ZeRO-3 mode, which outlive a failed train() in the process that called it."""
    code = ("import sys, huggingface_hub\n"
            "def offline(repo_id, **kw):\n"
            "    raise OSError(f'planted: no network for {repo_id}')\n"
            "huggingface_hub.snapshot_download = offline\n"
            "from llave_fast.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code, "train", "--model", "org/never-there", "--output-dir",
                        str(tmp_path / "run"), "--steps", "1", "--progress", "false"],
                       capture_output=True, text=True, env=env, timeout=300)
    line = next((line for line in r.stderr.splitlines() if ": error: " in line), r.stderr[-3000:])
    assert r.returncode == 1, r.stderr[-3000:]
    assert line.startswith("llave-fast train: error: --model 'org/never-there' is not a local folder and could not "
                           "be fetched from the Hugging Face hub (OSError: planted: no network"), line


def test_a_folder_without_a_model_is_refused_naming_model_and_the_model_folders_below_it(tmp_path, capsys):
    """eval / eval-video / train said "no config.json in '...'" (train after making and removing a run
    folder), naming neither --model nor what to give."""
    def _error_line(err):
        return next(line for line in err.splitlines() if ": error: " in line)

    (empty := tmp_path / "empty").mkdir()
    for argv in (("eval", "--model", str(empty), "--data", str(tmp_path)),
                 ("eval-video", "--model", str(empty), "--videos", str(tmp_path), "--annotations", str(tmp_path),
                  "--output-dir", str(tmp_path / "ev")),
                 ("train", "--model", str(empty), "--steps", "2", "--output-dir", str(tmp_path / "out"))):
        rc, out, err = _main(capsys, *argv)
        line = _error_line(err)
        assert rc == 1 and line.startswith(f"llave-fast {argv[0]}: error: --model {str(empty)!r} is not a model "
                                           "folder (no config.json in it): give a 'llave-fast export' output"), err
        assert ("a training run's --output-dir" in line) == (argv[0] != "train"), line
    assert not (tmp_path / "out").exists()
    # a hub cache: the snapshot is named; a parent of a run folder: eval takes the run, train its export
    (snap := tmp_path / "hub" / "models--org--name" / "snapshots" / "abc").mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (run := tmp_path / "runs" / "r1").mkdir(parents=True)
    (run / "train_config.json").write_text("{}")
    (run / "base").mkdir()
    (run / "base" / "config.json").write_text("{}")
    rc, _, err = _main(capsys, "eval", "--model", str(tmp_path / "hub"), "--data", str(tmp_path))
    assert rc == 1 and _error_line(err).endswith(f"; model folders inside it: {snap}"), err
    rc, _, err = _main(capsys, "eval", "--model", str(tmp_path / "runs"), "--data", str(tmp_path))
    assert rc == 1 and _error_line(err).endswith(f"; model folders inside it: {run}"), err
    rc, _, err = _main(capsys, "train", "--model", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "out"))
    assert rc == 1 and "give a 'llave-fast export' output" in err and str(run / "base") not in err, err
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text("{}")
    rc, _, err = _main(capsys, "train", "--model", str(tmp_path / "runs"), "--output-dir", str(tmp_path / "out"))
    assert rc == 1 and _error_line(err).endswith(f"; model folders inside it: {run / 'export'}"), err
    # a run folder given to train as its starting weights
    rc, _, err = _main(capsys, "train", "--model", str(run), "--output-dir", str(tmp_path / "out"))
    assert rc == 1 and f"--model {str(run)!r} is a training run folder, not a model: to continue that run, give " \
        f"--output-dir {run} " in err and f"'llave-fast export --run {run}'" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("saved", [True, False])
def test_an_interrupted_run_says_where_to_resume(tmp_path, capsys, monkeypatch, saved):
    import llave_fast.train as train_module
    from llave_fast import checkpoint as ckpt

    out = tmp_path / "run"

    def interrupted(cfg):
        os.makedirs(os.path.join(cfg.output_dir, "checkpoints", ckpt.tag_for(20)))
        if saved:
            (out / "checkpoints" / ckpt.tag_for(20) / ckpt.MARKER).write_text(json.dumps({"step": 20}))
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    rc, _, err = _main(capsys, "train", "--output-dir", str(out), "--steps", "30")
    assert rc == 130 and err.strip().splitlines()[-1] == "llave-fast: interrupted", err
    if saved:
        assert f"newest complete checkpoint is {out / 'checkpoints' / ckpt.tag_for(20)} (step 20)" in err, err
        assert f"--output-dir {out} to resume" in err, err
    else:
        assert "no complete checkpoint" in err and "starts from step 0" in err, err


def test_an_existing_writable_output_file_is_accepted_whatever_its_folder():
    from llave_fast.cli_commands import _writable_file

    _writable_file("--output", os.devnull)  # /dev is not writable by a user; /dev/null is


def test_a_misspelled_option_of_the_python_api_is_refused():
    """``cfg.global_bach = 8`` used to train with the default batch, silently."""
    from llave_fast.errors import InvalidArgument

    cfg = TrainConfig()
    with pytest.raises(InvalidArgument, match=r"TrainConfig has no option 'global_bach'; did you mean 'global_batch'"):
        cfg.global_bach = 8
    with pytest.raises(InvalidArgument, match=r"no option 'zzz' \(see llave-fast train --help\)"):
        cfg.zzz = 1
    cfg.global_batch = 8  # a real option still is one
    assert cfg.global_batch == 8 and not hasattr(cfg, "global_bach")


def test_debug_shows_the_traceback(tmp_path):
    r = _run("eval", "--model", str(tmp_path / "missing"), "--debug")
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr
    assert "UsageError: --model" in r.stderr
    r = _run("--debug", "train", "--config", "nope.json")  # before the command too
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_bad_data_is_a_user_error(tmp_path, capsys):
    from llave_fast.model import build_tiny_model

    folder = tmp_path / "tiny"
    build_tiny_model().save_pretrained(str(folder))
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"qry_text": "a cat", "qry_img_path": "", "tgt_text": ["cat", "dog"],
                                "tgt_img_path": ["", "missing.png"]}) + "\n")
    rc, out, err = _main(capsys, "eval", "--model", str(folder), "--data", str(data), "--num-eval", "4")
    assert rc == 1
    assert "eval.jsonl:1: candidate 1 image not found" in err and "missing.png" in err
    assert "Traceback" not in err
    # where a relative path was looked up, and what to pass (as the MMEB-train reader says it)
    assert f"looked up under the data file's folder {str(tmp_path)!r}: pass --image-dir" in err, err
    (tmp_path / "imgs").mkdir()
    rc, out, err = _main(capsys, "eval", "--model", str(folder), "--data", str(data), "--num-eval", "4",
                         "--image-dir", str(tmp_path / "imgs"))
    assert rc == 1 and f"relative to --image-dir {str(tmp_path / 'imgs')!r}: is that the folder" in err, err
    # MMEB-train rows read by eval: the reader's advice names training flags, which eval does not have
    train_rows = tmp_path / "train_rows.jsonl"
    train_rows.write_text(json.dumps({"qry": "a cat", "pos_text": "cat", "qry_image_path": "missing.png",
                                      "pos_image_path": ""}) + "\n")
    rc, out, err = _main(capsys, "eval", "--model", str(folder), "--data", str(train_rows), "--num-eval", "4")
    assert rc == 1 and "train_rows.jsonl:1" in err and "missing.png" in err, err
    assert not any(flag in err for flag in ("--skip-bad-rows", "--bad-images", "--check-images")), err


def test_only_our_own_checks_count_as_user_errors():
    from llave_fast.evaluate import eval_precision
    from llave_fast.export import export_run

    def caught(fn, *a, **k):
        try:
            fn(*a, **k)
        except Exception as e:  # noqa: BLE001
            return e
        raise AssertionError("no exception")

    assert is_user_error(caught(eval_precision, "tpu"))  # our check: InvalidArgument (a ValueError)
    assert is_user_error(caught(eval_precision, 3))  # our check: InvalidArgumentType (a TypeError)
    assert is_user_error(caught(export_run, "/nonexistent-run"))  # a missing file, wherever found
    # the same types raised by a library, or by a wrong call, are bugs: they keep their traceback
    import torch

    assert not is_user_error(caught(torch.device, "not a device"))
    assert not is_user_error(caught(eval_precision, "cpu", "fp32", "extra"))
    assert not is_user_error(caught(int, "x"))
    assert not is_user_error(caught(lambda: {}["k"]))
    # recognised by type, wherever raised: a plain ValueError is not ours, a LlaveFastError is
    from llave_fast.errors import InvalidArgument, LlaveFastError

    assert not is_user_error(ValueError("x"))
    assert is_user_error(InvalidArgument("x")) and isinstance(InvalidArgument("x"), ValueError)
    assert issubclass(type(caught(eval_precision, "tpu")), LlaveFastError)


def test_every_check_in_the_package_raises_a_typed_error():
    """A check that raises a bare ValueError / TypeError / ImportError would be reported by the
    command line as an internal error with a traceback; every one must use llave_fast.errors."""
    import pathlib
    import re

    import llave_fast

    root = pathlib.Path(llave_fast.__file__).parent
    bare = []
    for path in sorted(root.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\braise (ValueError|TypeError|ImportError|FileNotFoundError|NotADirectoryError|KeyError)\b", line):
                bare.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not bare, "bare built-in errors raised by llave-fast's checks:\n" + "\n".join(bare)


def test_eval_keeps_what_libraries_print_off_stdout(tmp_path, monkeypatch, capsys):
    """DeepSpeed prints "Setting accelerator to CPU" on the stdout of the moment it is first imported:
    when that happened inside eval, `eval ... > metrics.json` held a line that is no JSON (seen in a test
    run whose order made eval the first to import it)."""
    import llave_fast.evaluate as ev

    def chatty(*a, **k):
        print("[WARNING] Setting accelerator to CPU.")
        return {"p_at_1": 0.25, "num_eval": 4}

    monkeypatch.setattr(ev, "evaluate_model", chatty)
    (model := tmp_path / "m").mkdir()
    (model / "config.json").write_text("{}")
    rc, out, err = _main(capsys, "eval", "--model", str(model), "--num-eval", "4")
    assert rc == 0 and json.loads(out) == {"p_at_1": 0.25, "num_eval": 4}, (out, err)
    assert "Setting accelerator to CPU" in err


def test_internal_errors_keep_the_traceback_and_say_so(monkeypatch, capsys):
    import llave_fast.evaluate as ev

    def broken(*a, **k):
        return {}["p_at_1"]  # a bug: KeyError

    monkeypatch.setattr(ev, "evaluate_model", broken)
    rc, out, err = _main(capsys, "eval", "--model", "owner/name")
    assert rc == 1
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert "internal error" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("flags, needles", [
    (["--accumulation-steps", "3"], ["not divisible into accumulation_steps=3"]),
    (["--max-text-tokens", "0"], ["max_text_tokens must be a positive int or None, got 0"]),
    (["--deepspeed-config", "nothere.json"], ["deepspeed_config (--deepspeed-config) 'nothere.json' not found"]),
], ids=["accumulation-steps", "max-text-tokens", "deepspeed-config"])
def test_train_option_check_is_one_line(tmp_path, flags, needles):
    """A value the training loop refuses (its check_config, the DeepSpeed config it reads) stops the
    command in one line, before the run folder is made. (A process of its own: the run joins a
    process group first, which would stay in this one.)"""
    r = _run("train", *flags, "--output-dir", str(tmp_path / "run"), "--num-workers", "0", timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    err = [ln for ln in r.stderr.strip().splitlines() if "[WARNING]" not in ln and "[INFO]" not in ln]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert err[-2].startswith("llave-fast train: error: ") and all(n in err[-2] for n in needles), err
    assert not (tmp_path / "run").exists()
    # stdout stays for the run's report: no "run folder:" for a start refused, no DeepSpeed chatter
    assert r.stdout == "", r.stdout


# ------------------------------------------------------------------------------ eval of a training run folder
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("cli") / "run"
    r = _run("train", "--steps", "2", "--save-every", "1", "--num-train", "128", "--num-eval", "16",
             "--global-batch", "32", "--chunk-size", "16", "--warmup-steps", "1", "--eval-before", "false", "--progress", "false",
             "--num-workers", "0", "--seed", "3", "--hard-family-size", "2", "--synthetic-background", "varied",
             "--output-dir", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return out


def test_eval_of_a_run_folder_uses_its_newest_complete_checkpoint_and_its_own_split(run_dir, tmp_path, capsys):
    """``eval --model RUN`` gives the run's eval.json scores: the same model, and the same held-out split
    (the run's seed, query count, hard-family size and background, read from its train_config.json; eval's
    old fixed seed 0, 256 queries, independent scenes on plain grey scored another split)."""
    with open(run_dir / "eval.json") as f:
        trained = json.load(f)
    rc, out, err = _main(capsys, "eval", "--model", str(run_dir), "--output", str(tmp_path / "m.json"))
    assert rc == 0, err
    result = json.loads(out)
    assert result["checkpoint"] == "step-00000002"
    # the same model as the run's own final eval, on the same queries and candidates
    assert (result["p_at_1"], result["by_task"]) == (trained["p_at_1_after"], trained["by_task"])
    assert result["synthetic_split"] == {"num_eval": 16, "seed": 3, "image_size": 64, "hard_family_size": 2,
                                         "background": "varied", "from_run": list(SPLIT_OPTIONS)}
    assert "warning" not in err, err
    assert json.loads((tmp_path / "m.json").read_text()) == result


SPLIT_OPTIONS = ("num_eval", "seed", "image_size", "hard_family_size", "background")


def _eval_without_a_model(monkeypatch):
    """eval with the model left out (nothing loaded, nothing scored): returns the list of the synthetic
    splits it builds."""
    import types

    import llave_fast.data as data
    import llave_fast.evaluate as ev

    built = []

    class Recorded(data.SyntheticDataset):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            built.append(self)

    monkeypatch.setattr(data, "SyntheticDataset", Recorded)
    monkeypatch.setattr(ev, "load_eval_model", lambda *a, **k: (types.SimpleNamespace(processor=None), {}))
    monkeypatch.setattr(ev, "retrieval_eval", lambda embed, proc, rset, batch: {"num_queries": rset.num_queries})
    return built


def _split_of(ds) -> tuple:
    return ds.num_samples, ds.seed, ds.image_size, ds.hard_family_size, ds.background


def _fake_run(folder, **saved):
    """A training run folder as eval sees it before loading weights: train_config.json and checkpoints/."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "train_config.json").write_text(json.dumps(saved))
    return str(folder)


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning: ")]


def test_eval_of_a_run_folder_takes_every_split_option_not_given_from_the_run(tmp_path, monkeypatch, capsys):
    built = _eval_without_a_model(monkeypatch)
    run = _fake_run(tmp_path / "run", data="synthetic", seed=5, num_eval=12, image_size=48, hard_family_size=4,
                    synthetic_background="varied", steps=2)
    rc, out, err = _main(capsys, "eval", "--model", run)
    assert rc == 0, err
    assert _split_of(built[-1]) == (12, 5, 48, 4, "varied") and _warnings(err) == [], err
    assert json.loads(out)["synthetic_split"] == {"num_eval": 12, "seed": 5, "image_size": 48, "hard_family_size": 4,
                                                  "background": "varied", "from_run": list(SPLIT_OPTIONS)}
    # a given option wins; one that differs from the run's is said, one line each, naming the flag and both values
    rc, out, err = _main(capsys, "eval", "--model", run, "--seed", "0", "--image-size", "64", "--hard-family-size", "4")
    assert rc == 0, err
    assert _split_of(built[-1]) == (12, 0, 64, 4, "varied")
    warned = _warnings(err)
    assert len(warned) == 2 and "--seed 0 differs from the run's own seed 5" in warned[0], err
    assert "--image-size 64 differs from the run's own image_size 48" in warned[1], err
    assert json.loads(out)["synthetic_split"]["from_run"] == ["num_eval", "background"]
    rc, out, err = _main(capsys, "eval", "--model", run, "--num-eval", "4", "--synthetic-background", "plain")
    assert rc == 0 and _split_of(built[-1]) == (4, 5, 48, 4, "plain"), err
    assert [w.split(" (")[0] for w in _warnings(err)] == [
        "warning: --num-eval 4 differs from the run's own num_eval 12",
        "warning: --synthetic-background plain differs from the run's own synthetic_background varied"], err


def test_eval_of_an_older_run_or_one_without_a_synthetic_split_falls_back_to_the_defaults(tmp_path, monkeypatch,
                                                                                          capsys):
    built = _eval_without_a_model(monkeypatch)
    # a run older than hard_family_size and synthetic_background: their old defaults, no error
    old = _fake_run(tmp_path / "old", seed=2, num_eval=8, image_size=64)
    rc, out, err = _main(capsys, "eval", "--model", old)
    assert rc == 0 and _split_of(built[-1]) == (8, 2, 64, 1, "plain") and _warnings(err) == [], err
    assert json.loads(out)["synthetic_split"]["from_run"] == ["num_eval", "seed", "image_size"]
    # ... and those defaults are what the run was scored on: a different value is said
    rc, out, err = _main(capsys, "eval", "--model", old, "--hard-family-size", "2")
    assert rc == 0 and _split_of(built[-1]) == (8, 2, 64, 2, "plain"), err
    assert len(_warnings(err)) == 1 and "--hard-family-size 2 differs from the run's own hard_family_size 1" in err
    # a run that skipped its held-out evaluation (num_eval 0): 256 queries of its split, any --num-eval without a word
    none = _fake_run(tmp_path / "none", data="synthetic", seed=4, num_eval=0)
    rc, out, err = _main(capsys, "eval", "--model", none)
    assert rc == 0 and _split_of(built[-1]) == (256, 4, 64, 1, "plain") and _warnings(err) == [], err
    rc, out, err = _main(capsys, "eval", "--model", none, "--num-eval", "4")
    assert rc == 0 and _split_of(built[-1]) == (4, 4, 64, 1, "plain") and _warnings(err) == [], err
    # a run trained on MMEB files has no synthetic held-out split: the defaults, as for any model
    mmeb = _fake_run(tmp_path / "mmeb", data="train.jsonl", seed=7, num_eval=16, image_size=48)
    rc, out, err = _main(capsys, "eval", "--model", mmeb)
    assert rc == 0 and _split_of(built[-1]) == (256, 0, 64, 1, "plain") and _warnings(err) == [], err
    # a train_config.json that holds no run's options is refused, naming the file and the field
    bad = _fake_run(tmp_path / "bad", seed="3")
    rc, out, err = _main(capsys, "eval", "--model", bad)
    assert rc == 1 and "train_config.json: seed must be an integer, got '3'" in err, err


def test_eval_of_a_model_that_is_no_run_folder_keeps_the_fixed_defaults(tmp_path, monkeypatch, capsys):
    built = _eval_without_a_model(monkeypatch)
    (model := tmp_path / "export").mkdir()
    (model / "config.json").write_text("{}")
    (model / "train_config.json").write_text(json.dumps({"seed": 3, "hard_family_size": 2}))  # not a run folder
    for name in (str(model), "owner/name"):
        rc, out, err = _main(capsys, "eval", "--model", name)
        assert rc == 0 and _split_of(built[-1]) == (256, 0, 64, 1, "plain"), err
        assert json.loads(out)["synthetic_split"] == {**dict.fromkeys(SPLIT_OPTIONS), "num_eval": 256, "seed": 0,
                                                      "image_size": 64, "hard_family_size": 1, "background": "plain",
                                                      "from_run": []}
        rc, out, err = _main(capsys, "eval", "--model", name, "--seed", "3", "--hard-family-size", "2")
        assert rc == 0 and _split_of(built[-1]) == (256, 3, 64, 2, "plain") and _warnings(err) == [], err
    parser = build_parser(["eval"])
    args = parser.parse_args(["eval", "--model", "m"])
    assert (args.num_eval, args.seed, args.image_size, args.hard_family_size, args.synthetic_background) == (None,) * 5


def test_synthetic_split_options_with_data_files_are_refused(tmp_path):
    """--seed, --image-size, --hard-family-size, --synthetic-background change nothing for data files: said, not
    dropped (they used to be ignored)."""
    from llave_fast.errors import InvalidArgument
    from llave_fast.evaluate import evaluate_model

    with pytest.raises(InvalidArgument, match=r"seed=3 \(--seed\), background='varied' \(--synthetic-background\): "
                                              r"for the synthetic split only"):
        evaluate_model("owner/name", [str(tmp_path / "a.jsonl")], seed=3, background="varied")


def test_eval_of_a_run_folder_without_a_complete_checkpoint_says_what_to_do(run_dir, tmp_path, capsys):
    import shutil

    torn = tmp_path / "torn"
    shutil.copytree(run_dir, torn)
    for tag in os.listdir(torn / "checkpoints"):
        marker = torn / "checkpoints" / tag / "COMPLETE"
        if marker.exists():
            marker.unlink()
    rc, out, err = _main(capsys, "eval", "--model", str(torn), "--num-eval", "4")
    assert rc == 1
    line = err.strip().splitlines()[0]
    assert "training run folder without a complete checkpoint" in line and "2 step(s) logged" in line, line
    # what it suggests works: not export (which needs a checkpoint too and says the same), but a new run
    assert "llave-fast export" not in line and f"llave-fast train --output-dir {torn}" in line, line
    rc, out, err = _main(capsys, "export", "--run", str(torn))
    assert rc == 1 and "training run folder without a complete checkpoint" in err, err


def test_export_of_a_tag_that_does_not_exist_lists_the_complete_ones(run_dir, capsys):
    rc, out, err = _main(capsys, "export", "--run", str(run_dir), "--tag", "step-99", "--output", str(run_dir / "x"))
    line = err.strip().splitlines()[0]
    assert rc == 1 and "step-99 does not exist" in line and "step-00000001, step-00000002" in line, err
    assert not (run_dir / "x").exists()


def test_export_keeps_deepspeeds_merge_progress_off_stdout(run_dir, tmp_path, capsys):
    """zero_to_fp32 prints its progress: on stdout it broke `export ... | head` and callers parsing the output."""
    rc, out, err = _main(capsys, "export", "--run", str(run_dir), "--output", str(tmp_path / "x"))
    assert rc == 0, err
    said = ("Processing zero checkpoint", "Detected checkpoint of type", "Reconstructed")
    assert not [ln for ln in out.splitlines() if any(s in ln for s in said)], out
    assert any(s in err for s in said), err  # said, on stderr


def test_rerunning_a_finished_run_trains_nothing_and_keeps_its_results(run_dir, tmp_path):
    import shutil

    done = tmp_path / "done"
    shutil.copytree(run_dir, done)
    before = (done / "eval.json").read_bytes()
    r = _run("train", "--steps", "2", "--save-every", "1", "--num-train", "128", "--num-eval", "16",
             "--global-batch", "32", "--chunk-size", "16", "--warmup-steps", "1", "--eval-before", "false",
             "--progress", "false", "--num-workers", "0", "--seed", "3", "--hard-family-size", "2",
             "--synthetic-background", "varied", "--output-dir", str(done), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"the run in {done} is complete (2 of 2 steps): nothing to train" in r.stdout, r.stdout
    assert (done / "eval.json").read_bytes() == before  # its timing and scores were overwritten before


def test_a_resumed_run_does_not_score_its_trained_weights_as_before_training(run_dir, tmp_path):
    import shutil

    part = tmp_path / "part"
    shutil.copytree(run_dir, part)
    shutil.rmtree(part / "checkpoints" / "step-00000002")
    (part / "eval.json").unlink()
    r = _run("train", "--steps", "2", "--save-every", "1", "--num-train", "128", "--num-eval", "16",
             "--global-batch", "32", "--chunk-size", "16", "--warmup-steps", "1", "--eval-before", "true",
             "--progress", "false", "--num-workers", "0", "--seed", "3", "--hard-family-size", "2",
             "--synthetic-background", "varied", "--output-dir", str(part), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "eval_before: not measured" in r.stdout, r.stdout
    assert "before training: precision@1" not in r.stdout, r.stdout
    assert json.loads((part / "eval.json").read_text()).get("p_at_1_before") is None


def test_export_takes_the_newest_checkpoint_again_when_a_running_run_removes_it(run_dir, tmp_path, monkeypatch):
    import shutil

    from llave_fast import export

    live = tmp_path / "live"
    shutil.copytree(run_dir, live)
    real = export.consolidated_state_dict
    calls = []

    def pruned_meanwhile(rd, tag):  # the run removes step 2 while export reads it (a later one is complete)
        calls.append(tag)
        if tag == "step-00000002":
            os.rename(live / "checkpoints" / "step-00000001", live / "checkpoints" / "step-00000003")
            (live / "checkpoints" / "step-00000003" / "COMPLETE").write_text(json.dumps({"step": 3}))
            shutil.rmtree(live / "checkpoints" / tag)
            raise FileNotFoundError(f"checkpoint {tag} does not exist")
        return real(rd, tag)

    monkeypatch.setattr(export, "consolidated_state_dict", pruned_meanwhile)
    model, tag = export.load_run_model(str(live))
    assert calls == ["step-00000002", "step-00000003"] and tag == "step-00000003"
    with pytest.raises(FileNotFoundError):  # a tag the user named is not replaced by another
        export.load_run_model(str(live), tag="step-00000009")


def test_a_killed_exports_half_folder_is_removed_by_the_next_export(tmp_path):
    import subprocess
    import sys

    from llave_fast.export import _remove_dead_exports

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process id that has exited
    out = tmp_path / "export"
    (tmp_path / f"export.new-{dead}").mkdir()
    (tmp_path / f"export.new-{os.getppid()}").mkdir()  # a live process's: left alone
    (tmp_path / "export.new-other").mkdir()  # not an export's name
    _remove_dead_exports(str(out))
    assert sorted(os.listdir(tmp_path)) == sorted([f"export.new-{os.getppid()}", "export.new-other"])


def test_a_run_still_starting_is_not_called_stopped(tmp_path):
    import fcntl

    from llave_fast.export import no_checkpoint_message

    (tmp_path / "base").mkdir()
    with open(tmp_path / ".llave_fast.lock", "a+") as f:
        f.write("pid 123 on host, started now\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = no_checkpoint_message(str(tmp_path))
    assert "is still running (pid 123 on host, started now)" in held and "stopped" not in held, held
    assert "stopped while starting" in no_checkpoint_message(str(tmp_path))  # its run gone: the lock is free


def test_eval_json_has_the_keys_the_readme_names_and_one_path_convention(run_dir):
    """The README's sentence on eval.json names its precision keys; every path in it is absolute."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sentence = next(line for line in readme.splitlines() if "in `eval.json`" in line and "p_at_1" in line)
    keys = re.findall(r"`(p_at_1\w*)`", sentence)
    assert len(keys) >= 2, sentence
    result = json.loads((run_dir / "eval.json").read_text())
    assert set(keys) <= set(result), (keys, sorted(result))
    for key in ("run_dir", "checkpoint", "eval_json"):
        assert os.path.isabs(result[key]), (key, result[key])
    assert result["checkpoint"] == os.path.join(result["run_dir"], "checkpoints", "step-00000002")


# ------------------------------------------------------------------------------ what a fresh user meets
def test_an_unknown_flag_says_what_was_meant(capsys):
    rc, out, err = _main(capsys, "train", "--batch-size", "0")
    assert rc == 2 and "unrecognized arguments: --batch-size 0" in err and "use --global-batch" in err, err
    assert "llave-fast train --help" in err, err
    rc, out, err = _main(capsys, "train", "--stepz", "3")
    assert rc == 2 and "did you mean --steps" in err, err


def test_real_data_with_the_default_preset_leaves_its_synthetic_options_out(capsys):
    """The default preset (tiny_cpu.json) sets synthetic_tasks; --data FILE must not be refused for it."""
    from llave_fast.train import SYNTHETIC_ONLY, check_config

    args = build_parser(["train"]).parse_args(["train", "--data", "x.jsonl"])
    cfg = train_config_from_args(args)
    err = capsys.readouterr().err
    assert cfg.synthetic_tasks is None and "synthetic_tasks=['i2t', 't2i', 'vqa', 'vqa']" in err, err
    assert {"synthetic_tasks", "synthetic_background"} <= set(SYNTHETIC_ONLY)
    check_config(cfg, 1)  # nothing left to refuse
    cfg.synthetic_background = "varied"  # a synthetic-only value a config could carry: refused, not ignored
    with pytest.raises(ValueError, match=r"synthetic_background='varied' applies to the synthetic data only"):
        check_config(cfg, 1)
    # given on the command line, it is refused, and the message says what to do
    args = build_parser(["train"]).parse_args(["train", "--data", "x.jsonl", "--synthetic-tasks", "i2t"])
    cfg = train_config_from_args(args)
    with pytest.raises(ValueError, match=r"synthetic_tasks=\['i2t'\] applies to the synthetic data only.*"
                                         r"drop --synthetic-tasks"):
        check_config(cfg, 1)


def test_resume_refusal_lists_only_options_a_user_can_give(tmp_path):
    from llave_fast.train import ResumeRefused, plan_resume

    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    (run / "checkpoints" / "step-00000002" / "COMPLETE").write_text("")
    (run / "train_config.json").write_text(json.dumps({"lr": 0.5}))
    cfg = TrainConfig(output_dir=str(run))
    with pytest.raises(ResumeRefused) as info:
        plan_resume(cfg, 100)
    msg = str(info.value)
    assert "lr: 0.5 in the run, 0.001 now" in msg and "--save-every" in msg, msg
    assert "stop_after" not in msg and "stop-after" not in msg, msg


_STOP_BEFORE_THE_MODEL = """
import sys
import llave_fast.training.loop as loop

def stop_here(run):  # the start is done up to the model: say so, then wait to be signalled
    print("READY", flush=True)
    sys.stdin.readline()
    raise SystemExit("not signalled")

loop.prepare_model = stop_here
from llave_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_before_the_first_step_cleans_up_as_ctrl_c_does(tmp_path):
    """SIGTERM (kill, a scheduler) at the start used to kill the process and leave .llave_fast.lock and
    train_config.json; now the start cleans up and exits 143. The real-size preset on a machine without
    CUDA also warns, once, that a step takes very long there (it used to sit at 0 steps without a word)."""
    import signal

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-c", _STOP_BEFORE_THE_MODEL, "train", "--config", "llave_0.5b_arch.json",
                          "--num-train", "64", "--global-batch", "16", "--chunk-size", "16", "--steps", "2",
                          "--warmup-steps", "1", "--num-workers", "0", "--output-dir", str(out)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=env)
    try:
        lines = []
        for line in p.stdout:  # blocks until the child is parked just before the model would be built
            lines.append(line)
            if line.strip() == "READY":
                break
        assert lines and lines[-1].strip() == "READY", lines
        assert sorted(os.listdir(out)) == [".llave_fast.lock", "train_config.json"]
        p.send_signal(signal.SIGTERM)
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 143 and err.strip().splitlines()[-1] == "llave-fast: terminated", (p.returncode, err)
    assert not out.exists(), sorted(os.listdir(out))
    import torch

    if not torch.cuda.is_available():
        assert err.count("is not the built-in tiny one") == 1 and "'arch:llave-0.5b'" in err, err


def test_a_start_that_fails_leaves_no_half_made_run_folder(tmp_path):
    """--model names a folder that is no model (its config.json of no known kind: refused when the model
    is built, after the run folder was made): the run folder this start made is gone; in a folder that was
    there, only what the start wrote goes. A folder that never trained is said to be one."""
    new = tmp_path / "new"
    (nomodel := tmp_path / "nomodel").mkdir()
    (nomodel / "config.json").write_text("{}")
    r = _run("train", "--model", str(nomodel), "--output-dir", str(new), "--steps", "2",
             "--warmup-steps", "1", timeout=300)
    assert r.returncode == 1 and "is neither llava_qwen" in r.stderr, r.stderr[-2000:]
    assert not new.exists(), sorted(p.name for p in new.iterdir())
    kept = tmp_path / "kept"
    (kept / "base").mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    (kept / "base" / "model.bin").write_text("mine too")  # there before the start: never touched
    r = _run("train", "--model", str(nomodel), "--output-dir", str(kept), "--steps", "2",
             "--warmup-steps", "1", timeout=300)
    assert r.returncode == 1 and sorted(p.name for p in kept.iterdir()) == ["base", "notes.txt"], r.stderr[-2000:]
    assert (kept / "base" / "model.bin").read_text() == "mine too"
    assert "removed what it had written" in r.stderr and "train_config.json" in r.stderr, r.stderr[-2000:]
    (kept / "base" / "model.bin").unlink()
    (kept / "base").rmdir()
    # a folder left by a start that died without cleaning up (killed): eval says it never trained
    (kept / "train_config.json").write_text("{}")
    r = _run("eval", "--model", str(kept), "--num-eval", "4", timeout=300)
    assert r.returncode == 1 and "never trained" in r.stderr and "no config.json" not in r.stderr, r.stderr


@pytest.mark.slow
def test_deepspeed_op_probe_stays_off_the_terminal_when_stderr_is_redirected(tmp_path):
    """ablate sends each run's output to a log (sys.stderr redirected, fd 2 not): DeepSpeed's probe of
    its ops (async_io links -laio) must not reach fd 2. Without the quiet probe it does on a machine
    without libaio (the control), so the check can fail."""
    pytest.importorskip("deepspeed")
    code = """
import contextlib, sys
quiet = sys.argv[1] == "quiet"
with open(sys.argv[2], "w") as log, contextlib.redirect_stderr(log):
    if quiet:
        from llave_fast.train import quiet_deepspeed_op_probe
        quiet_deepspeed_op_probe()
    import deepspeed.ops
    print(len(deepspeed.ops.__compatible_ops__))
"""
    control = subprocess.run([sys.executable, "-c", code, "loud", str(tmp_path / "a.log")], capture_output=True,
                             text=True, timeout=600)
    quiet = subprocess.run([sys.executable, "-c", code, "quiet", str(tmp_path / "b.log")], capture_output=True,
                           text=True, timeout=600)
    assert control.returncode == 0 and quiet.returncode == 0, control.stderr[-2000:] + quiet.stderr[-2000:]
    if "-laio" not in control.stderr:
        pytest.skip("this machine has libaio: DeepSpeed's probe makes no noise here to keep off the terminal")
    assert "-laio" not in quiet.stderr and "collect2" not in quiet.stderr, quiet.stderr


def test_eval_of_a_run_still_training_loads_the_checkpoint_it_names(run_dir, tmp_path, monkeypatch):
    """A run still training may complete a checkpoint between the moment eval names one (its cache
    key, mmeb_eval.json) and the moment it loads weights: it must load exactly the one it named."""
    import llave_fast.checkpoint as ckpt
    import llave_fast.export as export
    from llave_fast.data.mmeb_eval import write_mmeb_eval
    from llave_fast.evaluate import evaluate_model

    files, image_dir = write_mmeb_eval(str(tmp_path / "eval"), "MSCOCO_i2t", 4, num_candidates=3, seed=1)
    tags = ckpt.complete_tags(str(run_dir / "checkpoints"))
    assert len(tags) >= 2, tags
    calls = []
    real_latest = ckpt.latest_complete

    def latest_then_a_new_save(root):  # first asked: an older one; afterwards a newer one has landed
        calls.append(root)
        return tags[-2] if len(calls) == 1 else real_latest(root)

    loaded = []
    real_state = export.consolidated_state_dict
    monkeypatch.setattr(ckpt, "latest_complete", latest_then_a_new_save)
    monkeypatch.setattr(export, "consolidated_state_dict",
                        lambda run, tag=None: loaded.append(tag) or real_state(run, tag))
    result = evaluate_model(str(run_dir), files, image_dir=image_dir, device="cpu", dtype="fp32",
                            output_dir=str(tmp_path / "out"), progress=False)
    assert loaded == [tags[-2]] and result["checkpoint"] == tags[-2], (loaded, result.get("checkpoint"))


def test_the_deepspeed_launchers_local_rank_flag_is_taken(monkeypatch):
    """DeepSpeed's launcher appends --local_rank=N (torch.distributed.launch --local-rank=N): every rank
    stopped with 'unrecognized arguments' before. Taken out, checked against LOCAL_RANK or standing in."""
    from llave_fast.cli import _launcher_local_rank

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _launcher_local_rank(["train", "--steps", "2", "--local_rank=1"]) == ["train", "--steps", "2"]
    assert _launcher_local_rank(["--local-rank", "1", "train"]) == ["train"]
    with pytest.raises(SystemExit, match="--local_rank=0 disagrees with LOCAL_RANK=1"):
        _launcher_local_rank(["train", "--local_rank=0"])
    with pytest.raises(SystemExit, match="must be a device index"):
        _launcher_local_rank(["train", "--local_rank=x"])
    monkeypatch.delenv("LOCAL_RANK")
    assert _launcher_local_rank(["train", "--local_rank=3"]) == ["train"] and os.environ["LOCAL_RANK"] == "3"


def test_rank_without_the_launchers_other_variables_is_a_clear_error(monkeypatch):
    """RANK alone sent DeepSpeed into MPI discovery: 'internal error (No module named mpi4py)'."""
    import torch.distributed as dist

    from llave_fast.training import deepspeed_setup

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "0")
    for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="RANK=0 is set but MASTER_ADDR, MASTER_PORT are not: start several ranks with"):
        deepspeed_setup.init_distributed()


@pytest.mark.parametrize("command", ["eval", "eval-video", "export", "ablate"])
def test_one_process_commands_refuse_to_run_as_one_of_several_ranks(monkeypatch, command):
    from llave_fast.cli_commands import _one_process
    from llave_fast.cli_console import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=f"{command} runs in one process.*WORLD_SIZE=2"):
        _one_process(command)
    monkeypatch.setenv("WORLD_SIZE", "1")
    _one_process(command)


def test_a_multi_line_error_is_printed_whole_by_rank_0_only(monkeypatch, capsys):
    """Every rank refuses a resume together: 8 ranks printed the whole option list 8 times."""
    from llave_fast import cli
    from llave_fast.errors import InvalidArgument

    def refuse(args):
        raise InvalidArgument("a run made with other options:\n  lr: 0.5 in the run, 0.001 now")

    monkeypatch.setitem(cli.COMMANDS, "export", refuse)
    for rank, whole in (("0", True), ("3", False)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["export", "--run", "x"]) == 1
        err = capsys.readouterr().err
        assert ("lr: 0.5 in the run" in err) == whole, err
        assert err.startswith("[rank 3] " if rank == "3" else "llave-fast export: error: a run made with"), err
