"""``hnseg scan``: what every case of an input holds, before a long run.

For each case: layout, CT size and spacing, the organs matched with the structure / ROI / label
name each came from, the names that matched nothing, and the problems ``prepare`` would refuse.
Headers only (plus nnU-Net label maps, whose values are checked against dataset.json). Exit
status 1 when any case has a problem.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hnseg_keras.data import layouts
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import refuse_existing, write_json_atomic


def scan(root: str | Path, reading: layouts.Reading | None = None) -> dict:
    """``{"cases": {case id: {"layout", "size", "spacing_mm", "orientation", "organs", "unmatched", "problems"}}}``.

    ``orientation`` is how the CT is stored ("LPS", "RAS", ...); every command reads it into LPS.
    """
    reading = reading or layouts.Reading()
    refs = layouts.find_refs(root, reading)
    report: dict = {"cases": {}}
    for number, ref in enumerate(refs, 1):
        try:
            entry = layouts.describe(ref, reading)
            entry["problems"] = []
        except HnsegError as error:
            entry = {"layout": ref.layout, "organs": {}, "unmatched": [], "problems": [str(error)]}
        if ref.split:
            entry["split"] = ref.split
        report["cases"][ref.case_id] = entry
        print(f"scan [{number}/{len(refs)}] {ref.case_id}", file=sys.stderr, flush=True)
    return report


def format_table(report: dict) -> str:
    """One line per case, then its unmatched names and problems indented below it."""
    lines = [f"{'case':<20} {'layout':<7} {'size':<14} {'spacing mm':<20} {'stored':<7} organs (from)"]
    for case_id, entry in report["cases"].items():
        size = "x".join(str(v) for v in entry.get("size", [])) or "-"
        spacing = "x".join(f"{v:g}" for v in entry.get("spacing_mm", [])) or "-"
        organs = ", ".join(f"{organ} ({name})" for organ, name in entry["organs"].items()) or "none"
        stored = entry.get("orientation") or "-"
        lines.append(f"{case_id:<20} {entry['layout']:<7} {size:<14} {spacing:<20} {stored:<7} {organs}")
        if entry["unmatched"]:
            lines.append(f"{'':<20} unmatched: {', '.join(entry['unmatched'])}")
        lines += [f"{'':<20} PROBLEM: {problem}" for problem in entry["problems"]]
    bad = sum(1 for entry in report["cases"].values() if entry["problems"])
    lines.append(f"{len(report['cases'])} case(s), {bad} with problems")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT", help="folder of cases (PDDCA, DICOM tree, nnU-Net raw) or a CT file")
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--force", action="store_true", help="replace an existing --json file")
    layouts.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.json:
        refuse_existing(args.json, args.force, "choose another --json file or pass --force")
    report = scan(args.input, layouts.reading_from_args(args))
    print(format_table(report), end="")
    if args.json:
        write_json_atomic(args.json, json.loads(json.dumps(report)))
        print(f"scan: wrote {args.json}", file=sys.stderr)
    return 1 if any(entry["problems"] for entry in report["cases"].values()) else 0
