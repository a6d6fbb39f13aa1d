"""What a run says on the terminal: rank 0's lines, the progress bar and its postfix, and the
known warnings that would cut the bar. Imports nothing of the training package."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("llave_fast.train")  # the name users filter on, from before the package split


def _log(rank: int, msg: str) -> None:
    """A line of the run's report: printed by rank 0 only."""
    if rank == 0:
        print(msg, flush=True)


def progress_bar(rank: int, total: int, initial: int, enabled: bool):
    """The steps' progress bar: rank 0's, when ``enabled``; otherwise tqdm's disabled bar, on which
    updates do nothing and :func:`say` still prints."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=rank != 0 or not enabled)


def say(bar, line: str) -> None:
    """Print ``line`` above the progress bar (every rank; a disabled bar prints it as a plain line)."""
    bar.write(line)
    sys.stdout.flush()


def progress_line(loss: float, step_s: float, pairs_per_s: float, data_wait_s: float) -> str:
    """The progress bar's postfix: every number with its unit."""
    return (f"loss {loss:.4f} | {step_s:.2f} s/step | {pairs_per_s:.0f} pairs/s | "
            f"data wait {data_wait_s * 1000:.0f} ms")


# DeepSpeed's ZeRO-3 calls these every step; torch warns on each call, and each warning cuts
# the progress bar. Other warnings still show (written above the bar).
KNOWN_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._all_gather_base` is a private function"),
    (FutureWarning, r"`torch\.distributed\._reduce_scatter_base` is a private function"),
)


def quiet_known_warnings() -> None:
    """Ignore the known repeated deprecation warnings of DeepSpeed's collectives (once, globally)."""
    import warnings

    for category, pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def _is_known_filter(f) -> bool:
    action, message, category, module, lineno = f
    return (action == "ignore" and module is None and lineno == 0 and message is not None
            and (category, message.pattern) in KNOWN_WARNINGS)


def forget_known_warnings(before: list) -> None:
    """Remove the filters :func:`quiet_known_warnings` added since ``before`` (a copy of
    ``warnings.filters`` taken then): after a run, a caller's own calls of those collectives warn
    again. A filter that was there before stays."""
    import warnings

    keep = [f for f in warnings.filters if f in before or not _is_known_filter(f)]
    if len(keep) != len(warnings.filters):
        warnings.filters[:] = keep
        mutated = getattr(warnings, "_filters_mutated", None)  # the module's cache of its filters
        if mutated is not None:
            mutated()
