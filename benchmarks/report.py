#!/usr/bin/env python3
"""Markdown tables (for the README) from the JSON files the benchmarks write.

    python benchmarks/report.py FILE.json [...] [--tune tune.json] [--junit tests.xml]

A file is read by its content: loss (bench_loss.py), tuning (bench_tune.py); any other JSON gets a
line saying it is not rendered here. Prints nothing it did not read (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MiB = 1024 * 1024
# the fused rows over which "fused / reference" and "fused / 3 GEMMs" take the fastest (old files
# may hold a "triton_tiles" row: the backward removed since)
FUSED = ("triton", "triton_cache", "triton_stream", "triton_strip", "triton_tiles", "torch")


def _fmt_ms(x):
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def loss_table(payloads) -> list[str]:
    lines = []
    for pl in payloads:
        dev = pl["meta"]["device"]["name"]
        ver = pl["meta"]["versions"]
        lines.append(f"Loss, fwd+bwd median ms (peak extra memory MiB) on **{dev}**, torch {ver.get('torch')}, "
                     f"triton {ver.get('triton')}, {pl['meta'].get('date_utc', pl['meta'].get('date', ''))}:")
        if pl.get("interrupted"):
            lines.append(f"(run interrupted: {pl['interrupted']}; the rows below are what it finished)")
        elif pl.get("partial"):
            lines.append("(partial file: the run did not finish; the rows below are what it had written)")
        lines.append("")
        ok = [r for r in pl["results"] if r.get("status") == "ok"]
        labels = []
        for r in pl["results"]:
            if r["label"] not in labels:
                labels.append(r["label"])
        lines.append("| dtype | d | B = N | " + " | ".join(labels) + " | fused / reference | fused / 3 GEMMs |")
        lines.append("|" + " --- |" * (len(labels) + 5))
        keys = sorted({(r["dtype"], r["d"], r["B"]) for r in pl["results"]})
        for dn, d, B in keys:
            row = {r["label"]: r for r in pl["results"] if (r["dtype"], r["d"], r["B"]) == (dn, d, B)}
            cells = []
            for lab in labels:
                r = row.get(lab)
                if r is None:
                    cells.append("")
                elif r.get("status") == "ok":
                    cells.append(f"{_fmt_ms(r['timing']['median_ms']['fwd_bwd'])} "
                                 f"({r['memory']['peak_bytes'] / MiB:.0f})")
                else:
                    cells.append(r.get("status", "?"))
            fused = [row[x] for x in FUSED if x in row and row[x] in ok]
            best = min(fused, key=lambda r: r["timing"]["median_ms"]["fwd_bwd"]) if fused else None

            def ratio(den):
                if best is None or den not in row or row[den] not in ok:
                    return "-"
                v = best["timing"]["median_ms"]["fwd_bwd"] / row[den]["timing"]["median_ms"]["fwd_bwd"]
                return f"{v:.2f} ({best['label']})"

            lines.append(f"| {dn} | {d} | {B} | " + " | ".join(cells) + f" | {ratio('reference')} | {ratio('gemm3')} |")
        ceil = pl["meta"].get("ceilings")
        if ceil:
            lines.append("")
            lines.append(f"Ceilings measured in the same run: copy {ceil['copy']['tb_per_s']:.2f} TB/s (read + write), "
                         f"bf16 GEMM {ceil['mm_bf16']['tflop_per_s']:.0f} TFLOP/s.")
        lines.append("")
    return lines


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
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    # a test running when pytest was interrupted is written as a testcase with no name
    cut = sum(1 for c in cases if not c.get("name"))
    cases = [c for c in cases if c.get("name")]
    bad, skipped = [], 0
    for c in cases:
        kinds = {child.tag for child in c}
        if "skipped" in kinds:
            skipped += 1
        for tag in ("failure", "error"):
            el = c.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                bad.append(f"  {tag.upper()}: {c.get('classname')}::{c.get('name')}: {msg[0][:200] if msg else ''}")
                break
    n_fail = sum(1 for b in bad if b.startswith("  FAILURE"))
    n_err = len(bad) - n_fail
    passed = len(cases) - skipped - len(bad)
    return [f"Compiled-kernel tests ({path.name}): {passed} passed, {n_fail} failed, {n_err} errors, "
            f"{skipped} skipped, of {len(cases)} reported"
            + (f"; {cut} cut off by the interruption (junit has no name for it)" if cut else "")] + bad + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loss", nargs="*", type=Path, help="JSON files written by bench_loss.py (or bench_tune.py)")
    p.add_argument("--tune", type=Path, default=None)
    p.add_argument("--junit", type=Path, default=None, help="a pytest junit XML file: counts and failures")
    args = p.parse_args(argv)
    lines, losses = [], []
    for f in args.loss:
        pl = json.loads(f.read_text())
        if isinstance(pl, dict) and isinstance(pl.get("results"), list) and all("label" in r for r in pl["results"]):
            losses.append(pl)
        elif isinstance(pl, dict) and "fwd" in pl and "bwd" in pl:
            lines += tune_lines(pl)
        else:
            lines += [f"{f.name}: not a loss or tuning file (written by another benchmark): not rendered here", ""]
    lines = loss_table(losses) + lines
    if args.tune:
        lines += tune_lines(json.loads(args.tune.read_text()))
    if args.junit:
        lines += junit_lines(args.junit)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
