"""The end of a run: its result (returned by ``train``; eval.json when the held-out evaluation ran)
and the summary printed last."""

from __future__ import annotations

import os

from .config import TrainConfig
from .stops import _last_checkpoint


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def run_result(cfg: TrainConfig, *, steps: int, start: int, resumed: bool, seconds: float, world: int,
               step_times: list, waits: list, train_rows: int, skipped_at_build: int, skipped_in_training: int,
               ckpt_root: str, rows_with_image_dropped: int | None = None) -> dict:
    """What the run did: steps, time, rows used and skipped, where its folder and newest checkpoint are
    (``eval_json`` stays None until the held-out evaluation writes it). ``rows_with_image_dropped``:
    the training rows with an image LLaVE's rule drops (no placeholder in its text; the data's
    ``rows_with_image_dropped``, counted when it was read; None when the data does not say)."""
    return {"steps": steps, "global_batch": cfg.global_batch, "seconds": seconds, "world_size": world,
            "steps_this_run": steps - start, "resumed_at_step": start if resumed else None,
            "median_step_s": _median(step_times), "median_data_wait_s": _median(waits),
            "train_rows": train_rows, "skipped_rows_at_build": skipped_at_build,
            "skipped_rows_in_training": skipped_in_training, "rows_with_image_dropped": rows_with_image_dropped,
            "run_dir": os.path.abspath(cfg.output_dir), "checkpoint": _last_checkpoint(ckpt_root), "eval_json": None}


def summary_text(r: dict, cfg: TrainConfig) -> str:
    """The end-of-run summary: rows read and skipped, pairs trained on (steps x pairs per step: a row
    drawn in several steps counts each time), steps, time, where everything is."""
    med = r["median_step_s"]
    wait = r["median_data_wait_s"]
    resumed = "" if r["resumed_at_step"] is None else f", resumed at step {r['resumed_at_step']}"
    stopped = "" if r["steps"] >= cfg.steps else f" (stopped early: --stop-after {cfg.stop_after})"
    timing = (f"{r['seconds']:.1f} s, median {med:.3f} s/step, median data wait {wait * 1000:.0f} ms/step"
              if med is not None else f"{r['seconds']:.1f} s")
    skipped = r["skipped_rows_at_build"] + r["skipped_rows_in_training"]
    lines = [
        "run summary:",
        f"  steps:       {r['steps']} of {cfg.steps} ({r['steps_this_run']} in this run{resumed}){stopped}, "
        f"{r['global_batch']} pairs per step",
        f"  time:        {timing}",
        f"  data:        {r['train_rows'] - r['skipped_rows_in_training']} training rows usable, {skipped} skipped "
        f"({r['skipped_rows_at_build']} when the data was "
        f"read, {r['skipped_rows_in_training']} found unreadable during training)",
        f"  trained on:  {r['steps'] * r['global_batch']} pairs ({r['steps']} steps x {r['global_batch']}; "
        f"{_passes(r['steps'] * r['global_batch'] / max(1, r['train_rows']))} over the training rows)",
        *([] if r.get("rows_with_image_dropped") is None else [
            f"  images:      {r['rows_with_image_dropped']} of the rows read have an image on a side whose text has no "
            "image placeholder: LLaVE's rule drops it and embeds the text alone"]),
        f"  run folder:  {r['run_dir']}",
        f"  checkpoint:  {r['checkpoint'] or 'none saved'}",
        f"  eval.json:   {r['eval_json'] or 'not written (no held-out set, or the run stopped early)'}",
    ]
    if r.get("by_task"):
        lines += ["  precision@1 by task (each task's queries against its own task's distinct targets):",
                  task_table(r["by_task"])]
    return "\n".join(lines)


def task_table(by_task: dict, indent: str = "    ") -> str:
    """``by_task`` of an evaluation as a text table: P@1, chance, their ratio, queries, candidates."""
    rows = [f"{indent}{'task':<12} {'P@1':>6} {'chance':>7} {'x chance':>9} {'queries':>8} {'candidates':>11}"]
    for task, v in by_task.items():
        ratio = v["p_at_1"] / v["chance"] if v["chance"] else float("nan")
        rows.append(f"{indent}{task:<12} {v['p_at_1']:>6.3f} {v['chance']:>7.4f} {ratio:>8.1f}x "
                    f"{v['num_queries']:>8d} {v['num_candidates']:>11d}")
    return "\n".join(rows)


def _passes(n: float) -> str:
    """``n`` passes, to 3 significant digits: "1 pass", "0.5 passes", "2 passes"."""
    shown = f"{n:.3g}"
    return f"{shown} {'pass' if shown == '1' else 'passes'}"

