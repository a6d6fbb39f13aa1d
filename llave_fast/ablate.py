"""``llave-fast ablate``: what hardness weighting and the number of negatives do, seen in minutes.

LLaVE's claim: weighting each in-batch negative by ``exp(alpha * sim)`` (detached, alpha = 9)
beats plain InfoNCE (alpha = 0), and more negatives help. The ablation trains the default
tiny setting (the preset ``tiny_cpu.json``, in this process, one rank) over a grid

    alpha in --alphas  x  pairs per loss in --batches  x  --seeds seeds

and reports held-out precision@1 per cell (mean and spread over the seeds).

Design (see the README): every run has the same global batch (the largest of --batches),
the same optimizer steps, learning-rate schedule, initialisation and data order for a
given seed; a smaller "batch" ``b`` cuts each global batch into ``global / b`` micro-batches
whose losses see only their own pairs (``accumulation_steps``: LLaVE's gradient-accumulation
negatives), the largest makes every pair of the global batch a negative for every query
(ours). So the only thing a batch cell changes is which pairs each query is contrasted
with. The synthetic data come in families of ``--family-size`` scenes that differ in one
attribute of one object (``hard_family_size``); batches hold whole families, so every loss
batch holds hard negatives, and the held-out split has the same structure.

Output: ``OUT/ablation.json`` (the setting, the machine, one record per run; a run already
recorded is not run again), ``OUT/ablation.png`` and a table of mean +- std per cell.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
from . import _locks
from .errors import InvalidArgument, MissingDependency

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "tiny_cpu.json"
DEFAULT_ALPHAS = (0.0, 9.0)
DEFAULT_BATCHES = (16, 128)
DEFAULT_SEEDS = 3
DEFAULT_FAMILY_SIZE = 4
DEFAULT_OUTPUT = os.path.join("runs", "ablation")
#: --quick: one seed, half the preset's training pairs, 128 held-out queries
QUICK_SEEDS = 1
QUICK_PAIRS_FRACTION = 0.5
QUICK_NUM_EVAL = 128
RESULT_FILE = "ablation.json"
PLOT_FILE = "ablation.png"
# the options of a run that must be equal for two records to be compared (the grid may grow)
SETTING_KEYS = ("config", "global_batch", "steps", "warmup_steps", "num_train", "num_eval", "family_size", "preset")


# -------------------------------------------------------------------------- the grid
def _items(flag: str, value) -> list[str]:
    if isinstance(value, str):
        items = [x.strip() for x in value.split(",")]
    else:
        try:
            items = list(value)
        except TypeError:
            raise InvalidArgument(f"{flag}: expected a comma-separated list, got {value!r}") from None
    if not items or any(isinstance(x, str) and not x for x in items):
        raise InvalidArgument(f"{flag}: expected a non-empty comma-separated list without empty items, got {value!r}")
    return items


def parse_alphas(value) -> list[float]:
    """--alphas: finite numbers, no repeats."""
    out = []
    for x in _items("--alphas", value):
        try:
            a = float(x)
        except (TypeError, ValueError):
            raise InvalidArgument(f"--alphas: {x!r} is not a number (got {value!r})") from None
        if not math.isfinite(a):
            raise InvalidArgument(f"--alphas: {x!r} is not finite (got {value!r})")
        out.append(a)
    if len(set(out)) != len(out):
        raise InvalidArgument(f"--alphas: a value is repeated in {value!r}")
    return out


def parse_batches(value) -> list[int]:
    """--batches: positive integers, no repeats."""
    out = []
    for x in _items("--batches", value):
        try:
            b = int(x) if not isinstance(x, float) or x.is_integer() else None
        except (TypeError, ValueError):
            b = None
        if b is None or isinstance(x, bool) or b < 1:
            raise InvalidArgument(f"--batches: {x!r} is not a positive integer (got {value!r})")
        out.append(b)
    if len(set(out)) != len(out):
        raise InvalidArgument(f"--batches: a value is repeated in {value!r}")
    return out


def _positive(flag: str, v, allow_none: bool = True):
    if v is None and allow_none:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InvalidArgument(f"{flag} must be a positive integer, got {v!r}")
    return v


def plan(*, config: str = DEFAULT_CONFIG, alphas=DEFAULT_ALPHAS, batches=DEFAULT_BATCHES, seeds: int | None = None,
         steps: int | None = None, global_batch: int | None = None, num_eval: int | None = None,
         family_size: int = DEFAULT_FAMILY_SIZE, quick: bool = False) -> dict:
    """The ablation's grid and setting, checked (errors name the flag and the value).

    Defaults: ``global_batch`` the largest of ``batches``; ``steps`` so that a run sees as many
    training pairs as the preset's run (``preset.steps x preset.global_batch / global_batch``;
    --quick: half of that), warm-up scaled with the steps (the preset's fraction, rounded up,
    at least 1 and shorter than the run); ``seeds`` 3 (--quick: 1); ``num_eval`` the preset's
    (--quick: 128).
    """
    from .train import TrainConfig

    alphas, batches = parse_alphas(alphas), parse_batches(batches)
    seeds = _positive("--seeds", seeds)
    steps = _positive("--steps", steps)
    global_batch = _positive("--global-batch", global_batch)
    num_eval = _positive("--num-eval", num_eval)
    from .data.synthetic import MAX_FAMILY_SIZE

    if not isinstance(family_size, int) or isinstance(family_size, bool) or not 1 <= family_size <= MAX_FAMILY_SIZE:
        raise InvalidArgument(f"--family-size must be an integer in 1..{MAX_FAMILY_SIZE}, got {family_size!r}")
    try:
        preset = TrainConfig.from_json(config)
    except FileNotFoundError as e:
        raise InvalidArgument(f"--config {config!r}: {e}") from None
    if preset.data != "synthetic" or preset.model != "tiny":
        raise InvalidArgument(f"--config {config!r}: the ablation trains the tiny model on the synthetic data; this "
                         f"config has model={preset.model!r}, data={preset.data!r}")
    if global_batch is None:
        global_batch = max(batches)
    for b in batches:
        if b > global_batch or global_batch % b:
            raise InvalidArgument(f"--batches: {b} does not divide the global batch of {global_batch} pairs "
                             f"(--global-batch, default the largest of --batches); every value must")
        if b % family_size:
            raise InvalidArgument(f"--batches: {b} is not a multiple of --family-size {family_size}: a loss batch "
                             "holds whole families")
    if global_batch > preset.num_train:
        raise InvalidArgument(f"--global-batch {global_batch} is larger than the preset's {preset.num_train} "
                         f"training samples (num_train in {config})")
    if steps is None:
        pairs = preset.steps * preset.global_batch * (QUICK_PAIRS_FRACTION if quick else 1.0)
        steps = max(1, round(pairs / global_batch))
    warm_frac = preset.warmup_steps / preset.steps if preset.warmup_ratio is None else preset.warmup_ratio
    warmup = min(max(1, math.ceil(warm_frac * steps)), steps - 1) if warm_frac > 0 else 0
    if seeds is None:
        seeds = QUICK_SEEDS if quick else DEFAULT_SEEDS
    if num_eval is None:
        num_eval = QUICK_NUM_EVAL if quick else preset.num_eval
    keep = {k: v for k, v in dataclasses.asdict(preset).items()
            if k not in ("output_dir", "alpha", "seed", "global_batch", "steps", "warmup_steps", "warmup_ratio",
                         "num_eval", "accumulation_steps", "hard_family_size", "progress", "save_every",
                         "eval_before", "epochs", "resume")}
    return {
        "config": config, "alphas": alphas, "batches": batches, "seeds": list(range(seeds)),
        "global_batch": global_batch, "steps": steps, "warmup_steps": warmup, "num_train": preset.num_train,
        "num_eval": num_eval, "family_size": family_size, "quick": bool(quick), "preset": keep,
    }


def setting_of(p: dict) -> dict:
    return {k: p[k] for k in SETTING_KEYS}


def grid(p: dict) -> list[tuple[float, int, int]]:
    """(alpha, batch, seed) of every run, seeds outermost: a stopped ablation has whole seeds done."""
    return [(a, b, s) for s in p["seeds"] for a in p["alphas"] for b in p["batches"]]


def run_name(alpha: float, batch: int, seed: int) -> str:
    return f"alpha{alpha:g}_batch{batch}_seed{seed}"


def _key(r: dict) -> tuple:
    return (float(r["alpha"]), int(r["batch"]), int(r["seed"]))


# -------------------------------------------------------------------------- one run
def train_config(p: dict, alpha: float, batch: int, seed: int, run_dir: str):
    """The TrainConfig of one run of the grid: the preset with the ablation's changes."""
    from .train import TrainConfig

    cfg = TrainConfig.from_json(p["config"])
    cfg.output_dir = run_dir
    cfg.alpha = float(alpha)
    cfg.seed = int(seed)
    cfg.global_batch = p["global_batch"]
    cfg.accumulation_steps = p["global_batch"] // batch  # 1: every pair of the global batch a negative
    cfg.steps, cfg.epochs = p["steps"], None
    cfg.warmup_steps, cfg.warmup_ratio = p["warmup_steps"], None
    cfg.num_eval = p["num_eval"]
    cfg.hard_family_size = p["family_size"]
    cfg.eval_before = False
    cfg.save_every = 0
    cfg.progress = False
    return cfg


def _by_task(result: dict) -> tuple[dict, dict]:
    """({task: P@1}, {task: chance}) from a train() result: its ``by_task`` (each task against
    its own targets) when there is one, else ``p_at_1_after_by_subset`` (synthetic_i2t -> i2t)."""
    by_task = result.get("by_task") or result.get("p_at_1_after_by_task")
    if by_task:
        p1 = {t: (v["p_at_1"] if isinstance(v, dict) else float(v)) for t, v in by_task.items()}
        chance = {t: v["chance"] for t, v in by_task.items() if isinstance(v, dict) and "chance" in v}
        return p1, chance
    subsets = result.get("p_at_1_after_by_subset") or {}
    return {(s[len("synthetic_"):] if s.startswith("synthetic_") else s): v for s, v in subsets.items()}, {}


class RunLog:
    """A run's ``train.log`` as ``sys.stdout`` or ``sys.stderr`` (``name``) while :func:`run_one` trains.

    A library first imported during a run (DeepSpeed, huggingface_hub, transformers) makes its log
    handler then, and ``logging.StreamHandler()`` keeps the ``sys.stderr`` of that moment: the run's
    file itself, closed when the run ends, made every later record of that library a "Logging error"
    (ValueError: I/O operation on closed file) and lost it, in the later runs and in the caller's
    process after the ablation. Once the file is closed, this stream writes to whatever
    ``sys.stdout`` / ``sys.stderr`` is then: the next run's log, or the caller's terminal."""

    def __init__(self, file, name: str):
        self._file, self._name = file, name

    def _target(self):
        if not self._file.closed:
            return self._file
        now = getattr(sys, self._name)
        return getattr(sys, f"__{self._name}__") if now is self else now

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, attr):  # fileno, isatty, encoding, ...: the stream's it writes to now
        return getattr(self._target(), attr)


def run_one(p: dict, alpha: float, batch: int, seed: int, run_dir: str) -> dict:
    """Train one cell of the grid in this process and return its record. train()'s own output
    goes to ``run_dir/train.log``; the run's checkpoint is removed afterwards (its eval.json
    and train_log.jsonl stay)."""
    from .train import train

    cfg = train_config(p, alpha, batch, seed, run_dir)
    # a run not in ablation.json starts afresh: what its folder holds is from a stopped attempt
    # (no checkpoint before the end) or from another setting
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "a") as log, \
            contextlib.redirect_stdout(RunLog(log, "stdout")), contextlib.redirect_stderr(RunLog(log, "stderr")):
        result = train(cfg)
    seconds = time.perf_counter() - t0
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    if result.get("p_at_1_after") is None:
        raise RuntimeError(f"run {run_dir} finished without a held-out evaluation (see {run_dir}/train.log)")
    by_task, chance_by_task = _by_task(result)
    final_loss = None
    log_path = os.path.join(run_dir, "train_log.jsonl")
    if os.path.exists(log_path):
        with open(log_path) as f:
            lines = [ln for ln in f if ln.strip()]
        final_loss = json.loads(lines[-1])["loss"] if lines else None
    return {
        "alpha": float(alpha), "batch": int(batch), "seed": int(seed),
        "global_batch": p["global_batch"], "accumulation_steps": p["global_batch"] // batch,
        "steps": result["steps"], "pairs": result["steps"] * p["global_batch"],
        "p_at_1": result["p_at_1_after"], "p_at_1_by_task": by_task, "chance": result.get("chance"),
        "chance_by_task": chance_by_task, "num_candidates": result.get("num_candidates"),
        "final_loss": final_loss, "seconds": seconds, "train_seconds": result.get("seconds"),
        "median_step_s": result.get("median_step_s"), "run_dir": run_dir,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# -------------------------------------------------------------------------- the results file
def machine_info() -> dict:
    import torch

    return {"processor": platform.processor() or platform.machine(), "machine": platform.machine(),
            "platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def load_results(path: str, setting: dict) -> list[dict]:
    """The records of ``path`` (none if it does not exist); refuses a file made with another setting."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            saved = json.load(f)
        runs, old = saved["runs"], saved["setting"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InvalidArgument(f"{path}: not an ablation results file ({type(e).__name__}: {e}); give another "
                         "--output-dir or remove it") from None
    if old != json.loads(json.dumps(setting)):
        now = json.loads(json.dumps(setting))
        diffs = []
        for k in now:
            a, b = old.get(k), now[k]
            if isinstance(a, dict) and isinstance(b, dict):  # the preset: name the options that differ
                diffs += [f"{k}.{x}: {a.get(x)!r} there, {b.get(x)!r} now" for x in sorted(set(a) | set(b))
                          if a.get(x) != b.get(x)]
            elif a != b:
                diffs.append(f"{k}: {a!r} there, {b!r} now")
        diff = ", ".join(diffs)
        raise InvalidArgument(f"{path} holds runs made with another setting ({diff}); resume it with the options it was "
                         "made with, or give another --output-dir")
    return list(runs)


def save_results(path: str, setting: dict, runs: list[dict]) -> None:
    data = {"setting": setting, "machine": machine_info(), "runs": sorted(runs, key=_key)}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


# -------------------------------------------------------------------------- summary: table and plot
def cells(runs: list[dict]) -> list[dict]:
    """Per (alpha, batch): seeds, P@1 mean and std (sample std; None with one seed), per task alike."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((float(r["alpha"]), int(r["batch"])), []).append(r)
    out = []
    for (a, b), rs in sorted(groups.items()):
        vals = [r["p_at_1"] for r in rs]
        tasks = sorted({t for r in rs for t in r.get("p_at_1_by_task", {})})
        by_task = {}
        for t in tasks:
            tv = [r["p_at_1_by_task"][t] for r in rs if t in r.get("p_at_1_by_task", {})]
            by_task[t] = (statistics.mean(tv), statistics.stdev(tv) if len(tv) > 1 else None)
        out.append({"alpha": a, "batch": b, "n": len(rs), "seeds": sorted(r["seed"] for r in rs), "values": vals,
                    "mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
                    "by_task": by_task, "seconds": statistics.mean(r["seconds"] for r in rs)})
    return out


def _pm(mean: float, std: float | None) -> str:
    return f"{100 * mean:5.1f}" + (f" ± {100 * std:4.1f}" if std is not None else "       ")


def table(runs: list[dict]) -> str:
    """Mean ± std (over seeds) of held-out precision@1, in %, per cell and per task."""
    cs = cells(runs)
    tasks = sorted({t for c in cs for t in c["by_task"]})
    head = f"{'alpha':>6} {'batch':>6} {'seeds':>5}  {'P@1 (%)':>13}" + "".join(f"  {t + ' (%)':>13}" for t in tasks)
    lines = [head + f"  {'s/run':>6}"]
    for c in cs:
        row = f"{c['alpha']:>6g} {c['batch']:>6d} {c['n']:>5d}  {_pm(c['mean'], c['std']):>13}"
        row += "".join(f"  {_pm(*c['by_task'][t]) if t in c['by_task'] else '-':>13}" for t in tasks)
        lines.append(row + f"  {c['seconds']:>6.0f}")
    return "\n".join(lines)


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise MissingDependency("llave-fast ablate draws ablation.png with matplotlib, which is not installed: "
                          "pip install 'llave-fast[train]' (or pip install matplotlib)") from None
    return matplotlib


def plot(runs: list[dict], path: str, setting: dict | None = None) -> None:
    """Grouped bars: P@1 per alpha (groups) and batch (bars), mean over seeds with a ±1 std
    error bar and each seed as a dot; one panel overall and one per task; chance dashed."""
    matplotlib = _require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = cells(runs)
    alphas = sorted({c["alpha"] for c in cs})
    batches = sorted({c["batch"] for c in cs})
    tasks = sorted({t for c in cs for t in c["by_task"]})
    panels = [("all tasks", None)] + [(t, t) for t in tasks]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1, 3.6), squeeze=False, sharey=True)
    width = 0.8 / len(batches)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, task) in zip(axes[0], panels):
        for j, b in enumerate(batches):
            xs, means, errs = [], [], []
            for i, a in enumerate(alphas):
                c = next((c for c in cs if c["alpha"] == a and c["batch"] == b), None)
                if c is None:
                    continue
                if task is None:
                    mean, std, vals = c["mean"], c["std"], c["values"]
                else:
                    if task not in c["by_task"]:
                        continue
                    mean, std = c["by_task"][task]
                    vals = [r["p_at_1_by_task"][task] for r in runs
                            if (r["alpha"], r["batch"]) == (a, b) and task in r.get("p_at_1_by_task", {})]
                x = i + (j - (len(batches) - 1) / 2) * width
                xs.append(x)
                means.append(100 * mean)
                errs.append(100 * std if std is not None else 0.0)
                ax.plot([x] * len(vals), [100 * v for v in vals], "o", color="black", ms=3, zorder=3)
            ax.bar(xs, means, width * 0.9, yerr=errs, capsize=3, color=colours[j % len(colours)],
                   label=f"{b} pairs per loss")
        chances = [r.get("chance") if task is None else r.get("chance_by_task", {}).get(task) for r in runs]
        chances = [c for c in chances if c]
        if chances:
            ax.axhline(100 * statistics.mean(chances), ls="--", color="grey", lw=1, label="chance")
        ax.set_xticks(range(len(alphas)), [f"alpha = {a:g}" for a in alphas])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("held-out precision@1 (%)")
    axes[0][-1].legend(fontsize=8, loc="best")
    if setting is not None:
        fig.suptitle(f"tiny LLaVE, synthetic families of {setting['family_size']}: {setting['steps']} steps of "
                     f"{setting['global_batch']} pairs, {setting['num_eval']} eval queries; mean ± std over seeds, "
                     "dots: seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------- the whole ablation
def run_ablation(output_dir: str = DEFAULT_OUTPUT, *, progress: bool = True, runner=None, **plan_kw) -> dict:
    """Run every (alpha, batch, seed) of the grid not yet in ``output_dir/ablation.json``,
    writing the file after each run; then the plot and the table. The plan and a failed run are
    logged (``llave_fast.ablate``); the table is returned, for the caller to show
    (:func:`format_report`). Returns ``{"plan", "runs", "ran", "skipped", "table", "json", "png"}``.
    ``runner`` (tests) replaces :func:`run_one`."""
    p = plan(**plan_kw)
    _require_matplotlib()  # before an hour of training, not after
    runner = run_one if runner is None else runner
    os.makedirs(output_dir, exist_ok=True)
    with _held_ablation(output_dir):
        return _run_ablation(output_dir, p, runner, progress)


ABLATION_LOCK = ".llave_fast_ablation.lock"


@contextlib.contextmanager
def _held_ablation(output_dir: str):
    """One ablation per folder: a second one would rerun the same cells in the same run folders (and
    remove the first one's live run folder). An flock, dropped by the kernel when its holder dies."""
    lock = os.path.join(output_dir, ABLATION_LOCK)
    f, said = _locks.take(lock)
    if f is None and said is not None:
        raise InvalidArgument(f"the ablation folder {output_dir} is in use by another ablation ({said}; lock file "
                              f"{lock}): give this one another --output-dir, or wait for that one to end")
    try:
        yield
    finally:
        if f is not None:
            _locks.release(f)


def _run_ablation(output_dir: str, p: dict, runner, progress: bool) -> dict:
    path = os.path.join(output_dir, RESULT_FILE)
    setting = setting_of(p)
    runs = load_results(path, setting)
    done = {_key(r) for r in runs}
    todo = [g for g in grid(p) if g not in done]
    skipped = len(grid(p)) - len(todo)
    logger.info(f"ablation: {len(p['alphas'])} alphas x {len(p['batches'])} batches x {len(p['seeds'])} seeds = "
                f"{len(grid(p))} runs of {p['steps']} steps x {p['global_batch']} pairs ({p['family_size']}-scene "
                f"families, {p['num_eval']} eval queries); {skipped} already in {path}, {len(todo)} to run")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(grid(p)), initial=skipped, desc="ablation", unit="run", disable=not progress)
    try:
        for alpha, batch, seed in todo:
            name = run_name(alpha, batch, seed)
            bar.set_postfix_str(f"running {name}")
            run_dir = os.path.join(output_dir, "runs", name)
            try:
                rec = runner(p, alpha, batch, seed, run_dir)
            except Exception:
                logger.error(f"ablation: run {name} failed (its log: {os.path.join(run_dir, 'train.log')}); the "
                             f"runs done so far are in {path}, a rerun goes on from there")
                raise
            # the run's folder relative to OUT: ablation.json stays valid when OUT moves (and names no machine path)
            rec["run_dir"] = os.path.relpath(rec.get("run_dir", run_dir), output_dir)
            runs.append(rec)
            save_results(path, setting, runs)
            bar.update(1)
            bar.set_postfix_str(f"{name}: P@1 {100 * rec['p_at_1']:.1f} %, {rec['seconds']:.0f} s")
    finally:
        bar.close()
    png = os.path.join(output_dir, PLOT_FILE)
    plot(runs, png, setting)
    text = table(runs)
    return {"plan": p, "runs": runs, "ran": len(todo), "skipped": skipped, "table": text, "json": path, "png": png}


def format_report(result: dict) -> str:
    """What ``llave-fast ablate`` prints at the end: the table of :func:`run_ablation`'s result and its files."""
    return (f"held-out precision@1, mean ± std over seeds ({result['plan']['num_eval']} queries per run):\n"
            f"{result['table']}\nresults: {result['json']}\nplot:    {result['png']}")
