#!/usr/bin/env python3
"""Markdown tables (for the README) from the JSON files the benchmarks write.

    python benchmarks/report.py FILE.json [...] [--tune tune.json] [--junit tests.xml]

A file is read by its content: loss (bench_loss.py), tuning (the retired bench_tune.py's files); any other JSON gets a
line saying it is not rendered here. Prints nothing it did not read (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MiB = 1024 * 1024
# the fused rows over which "fused / reference" and "fused / 3 GEMMs" take the fastest (old files
# may hold a "triton_tiles" row: the backward removed since)
FUSED = ("triton", "triton_cache", "triton_stream", "triton_strip", "triton_tuned", "triton_tiles", "torch",
         "torch_chunked")


def _ms(r) -> float:
    return r["timing"]["median_ms"]["fwd_bwd"]


def _cell(r) -> str:
    """A loss table cell: median ms (peak MiB), or the status of a row that was not timed."""
    if r is None:
        return ""
    if r.get("status") == "PARTIAL":  # stopped in its timing loop: the runs it took, never as a full median
        med = r["timing"].get("partial_median_ms", {}).get("fwd_bwd")
        if not r["repeats_done"]:  # stopped in its warm-ups: it was never timed
            return f"PARTIAL (stopped before its first of {r['repeats_planned']} timed runs)"
        return (f"PARTIAL ({r['repeats_done']} of {r['repeats_planned']} runs"
                + ("" if med is None else f": {med:.1f} ms") + ")")
    if r.get("status") != "ok":
        return r.get("status", "?")
    peak = r["memory"]["peak_bytes"]  # None: the run was stopped before its memory figure
    mib = "-" if peak is None else f"{peak / MiB:.0f}"
    return (f"{_ms(r):.1f}" if _ms(r) >= 10 else f"{_ms(r):.2f}") + f" ({mib})"


def loss_table(pl) -> list[str]:
    meta, ver = pl["meta"], pl["meta"]["versions"]
    lines = [f"Loss, fwd+bwd median ms (peak extra memory MiB) on **{meta['device']['name']}**, torch "
             f"{ver.get('torch')}, triton {ver.get('triton')}, {meta.get('date_utc', meta.get('date', ''))}:"]
    if pl.get("interrupted"):
        cut = any(r.get("status") == "PARTIAL" for r in pl["results"])
        lines.append(f"(run interrupted: {pl['interrupted']}; the rows below are what it finished"
                     + ("; PARTIAL: stopped in its timing loop, the runs it took" if cut else "") + ")")
    elif pl.get("partial"):
        lines.append("(partial file: the run did not finish; the rows below are what it had written)")
    labels = list(dict.fromkeys(r["label"] for r in pl["results"]))
    if not labels:  # a header of no columns is no table
        lines += ["", "(no results in this file)"]
    else:
        lines += ["", "| dtype | d | B = N | " + " | ".join(labels) + " | fused / reference | fused / 3 GEMMs |",
                  "|" + " --- |" * (len(labels) + 5)]
    for dn, d, B in sorted({(r["dtype"], r["d"], r["B"]) for r in pl["results"]}):
        row = {r["label"]: r for r in pl["results"] if (r["dtype"], r["d"], r["B"]) == (dn, d, B)}
        ok = {lab: r for lab, r in row.items() if r.get("status") == "ok"}
        cells = [_cell(row.get(lab)) for lab in labels]
        best = min((ok[x] for x in FUSED if x in ok), key=_ms, default=None)
        cells += [f"{_ms(best) / _ms(ok[den]):.2f} ({best['label']})" if best is not None and den in ok else "-"
                  for den in ("reference", "gemm3")]
        lines.append(f"| {dn} | {d} | {B} | " + " | ".join(cells) + " |")
    for t in pl.get("autotune") or []:  # key: kind, device type and index, dtype, then the shape class
        ok = [c for c in t["candidates"] if "ms" in c]
        choice = ", ".join(f"{k}={v}" for k, v in t["choice"].items()) or "the base configuration"
        base = (f" (base configuration {t['base_ms']:.3f} ms: {t['base_ms'] / t['ms']:.2f}x)" if t.get("base_ms")
                else "")
        sweep = f" in a {t['wall_s']:.1f} s sweep" if "wall_s" in t else ""
        lines.append(f"Autotune {t['key'][0]} {t['key'][3]} {t['key'][4:-1]}: {choice} in {t['ms']:.3f} ms{base}; "
                     f"{len(ok)} candidates timed, {len(t['candidates']) - len(ok)} refused{sweep}.")
    if ceil := meta.get("ceilings"):
        lines += ["", f"Ceilings measured in the same run: copy {ceil['copy']['tb_per_s']:.2f} TB/s (read + write), "
                      f"bf16 GEMM {ceil['mm_bf16']['tflop_per_s']:.0f} TFLOP/s."]
    return lines + [""]


def tune_lines(res) -> list[str]:
    s = res.get("summary")
    if not s:
        return ["(tuning run has no summary)", ""]
    out = [f"Tuning at B = N = {res['config']['B']}, d = {res['config']['d']} {res['config']['dtype']} on "
           f"**{res['meta']['device']['name']}**: default fwd+bwd {s['default_fwd_bwd_ms']:.2f} ms, best "
           f"{s['best_fwd_bwd_ms']:.2f} ms (forward {s['best_fwd']['config'] or 'default'}, backward "
           f"{s['best_bwd']['config'] or 'default'})."]
    if "floor" in res:
        out.append(f"Three cuBLAS GEMMs: {res['floor']['three_gemms_ms']:.2f} ms; best / floor "
                   f"{s['best_over_floor']:.2f}, default / floor {s['default_over_floor']:.2f}.")
    return out + [""]


def junit_lines(path: Path) -> list[str]:
    """One line of counts from a pytest junit file, then one line per failed or errored test."""
    cases = list(ET.parse(path).getroot().iter("testcase"))
    # a test running when pytest was interrupted is written as a testcase with no name
    cut = sum(1 for c in cases if not c.get("name"))
    cases = [c for c in cases if c.get("name")]
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    bad = []
    for c in cases:
        el = c.find("failure") if c.find("failure") is not None else c.find("error")
        if el is not None:
            msg = (el.get("message") or el.text or "").strip().splitlines()
            bad.append(f"  {el.tag.upper()}: {c.get('classname')}::{c.get('name')}: {msg[0][:200] if msg else ''}")
    n_fail = sum(1 for b in bad if b.startswith("  FAILURE"))
    return [f"Compiled-kernel tests ({path.name}): {len(cases) - skipped - len(bad)} passed, {n_fail} failed, "
            f"{len(bad) - n_fail} errors, {skipped} skipped, of {len(cases)} reported"
            + (f"; {cut} cut off by the interruption (junit has no name for it)" if cut else "")] + bad + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loss", nargs="*", type=Path,
                   help="JSON files written by bench_loss.py (or the retired bench_tune.py)")
    p.add_argument("--tune", type=Path, default=None)
    p.add_argument("--junit", type=Path, default=None, help="a pytest junit XML file: counts and failures")
    args = p.parse_args(argv)

    def read(path: Path):
        try:
            return json.loads(path.read_text())
        except OSError as e:
            p.error(f"{path}: cannot be read ({e.strerror or e})")
        except ValueError as e:  # JSONDecodeError, or bytes that are no text
            p.error(f"{path}: not a JSON file ({e})")

    tables, lines = [], []
    for f in args.loss:
        pl = read(f)
        if isinstance(pl, dict) and isinstance(pl.get("results"), list) and all("label" in r for r in pl["results"]):
            tables += loss_table(pl)
        elif isinstance(pl, dict) and "fwd" in pl and "bwd" in pl:
            lines += tune_lines(pl)
        else:
            lines += [f"{f.name}: not a loss or tuning file (written by another benchmark): not rendered here", ""]
    if args.tune:
        lines += tune_lines(read(args.tune))
    if args.junit:
        lines += junit_lines(args.junit)
    print("\n".join(tables + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
