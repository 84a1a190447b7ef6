"""Seed spread of a short training: run it once per seed and report mean, sd and worst case.

A single short training lands wherever its seed and the CPU's arithmetic take it; the spread over
seeds is the honest figure to quote. Each seed trains with ``--set seed=N --set pipeline.seed=N``
(weights, data order and augmentation) plus any ``--set`` given here, into ``<runs>/seed-N``. A seed
folder that finished earlier with the same settings is reused, so a killed benchmark picks up where it
stopped; an unfinished one (a temporary folder) is started over.

    python benchmarks/seed_spread.py --seeds 5 --runs runs/seeds --out demo_seeds.json
    python benchmarks/seed_spread.py --profile openkbp --seeds 3 --runs runs/openkbp/seeds \
        --data runs/openkbp/shards/manifest.json --cases ../shared/data/openkbp-hn --out openkbp_seeds.json

``--profile demo`` (default) runs ``scripts/demo.py`` (the main job; scored on its test cases).
``--profile openkbp`` runs the OpenKBP 36-minute profile on prepared shards: train, export the final
weights, predict the ``validation`` cases of ``--cases`` with largest-component cleanup, evaluate.

Prints per seed the best validation Dice, the held-out mean 3D Dice and each organ's 3D Dice (mean
over the cases), the wall time, then mean, sd and worst case over the seeds, with the CPU model and
the date. ``--md`` also writes that table as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hnseg_keras import configs, files
from hnseg_keras.errors import HnsegError

REPO = Path(__file__).resolve().parent.parent
RECORD = "seed_run.json"


def cpu_model() -> str:
    """The CPU's model name and core count, from /proc/cpuinfo (``platform`` elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else platform.machine()}, {len(names) or os.cpu_count()} logical CPUs"


def seed_overrides(seed: int, overrides: list[str]) -> list[str]:
    """``--set`` arguments: ``seed`` and ``pipeline.seed`` first, then ``overrides``."""
    return [arg for item in [f"seed={seed}", f"pipeline.seed={seed}", *overrides] for arg in ("--set", item)]


def demo_commands(seed: int, out: Path, overrides: list[str], config: str | None) -> list[list[str]]:
    """The demo's command line for one seed (it trains, predicts and evaluates into ``out``)."""
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out)]
    return [command + (["--config", config] if config else []) + seed_overrides(seed, overrides)]


def openkbp_commands(seed: int, out: Path, overrides: list[str], config: str | None, data: Path,
                     cases: Path) -> list[list[str]]:
    """The OpenKBP profile for one seed, as in results/openkbp.md: train on the shards of ``data``,
    export the final weights, predict and score the validation cases of ``cases``."""
    hnseg = [sys.executable, "-m", "hnseg_keras.cli"]
    organs = configs.read_json(REPO / "configs" / "openkbp_prepare.json")["organs"]  # what the shards hold
    return [
        [*hnseg, "train", "--config", config or str(REPO / "configs" / "openkbp.json"), "--data", str(data),
         "--out", str(out / "run"), *seed_overrides(seed, overrides)],
        [*hnseg, "export", str(out / "run"), "--out", str(out / "export"), "--which", "final"],
        [*hnseg, "predict", str(cases), "--split", "validation", "--model", str(out / "export"),
         "--out", str(out / "pred"), "--largest-component"],
        [*hnseg, "evaluate", "--pred", str(out / "pred"), "--gt", str(cases / "validation"),
         "--organs", *organs, "--out", str(out / "evaluation")],
    ]


def read_seed(folder: Path) -> dict:
    """One seed's figures from a finished demo folder: validation (run/summary.json) and test Dice."""
    summary = json.loads((folder / "run" / "summary.json").read_text())
    results = json.loads((folder / "evaluation" / "results.json").read_text())
    rows = results["summary"]
    return {
        "best_val_dice": summary["best_val_dice"],
        "best_epoch": None if summary["best_epoch_index"] is None else summary["best_epoch_index"] + 1,
        "final_val_dice": summary["final_val_dice"],
        "train_time_s": summary["train_time_s"],
        "test_dice": rows["mean"]["dice"]["mean"],
        "test_hd95_mm": rows["mean"]["hd95_mm"]["mean"],
        "organ_dice": {organ: rows[organ]["dice"]["mean"] for organ in results["organs"]},
    }


def run_seed(seed: int, runs: Path, overrides: list[str], config: str | None, profile: str, commands) -> dict:
    """Figures of one seed, running ``commands(seed, folder)`` unless ``<runs>/seed-N`` finished with
    these settings."""
    folder = runs / f"seed-{seed}"
    wanted = {"seed": seed, "overrides": overrides, "config": config, "profile": profile}
    if folder.exists():
        record = json.loads((folder / RECORD).read_text()) if (folder / RECORD).is_file() else {}
        record = {"profile": "demo", **record}  # records written before profiles existed are demo runs
        if {key: record.get(key) for key in wanted} != wanted:
            raise HnsegError(f"{folder}: holds a run of other settings (or none); choose another --runs "
                             "or delete that folder")
        print(f"seed {seed}: reusing {folder}", file=sys.stderr, flush=True)
        return {**record, **read_seed(folder)}
    with files.atomic_path(folder) as temp:
        started = time.perf_counter()
        for command in commands(seed, temp):
            print(f"seed {seed}: {shlex.join(command)}", file=sys.stderr, flush=True)
            status = subprocess.run(command, cwd=REPO).returncode
            if status != 0:
                step = command[3] if command[1] == "-m" else Path(command[1]).name
                raise HnsegError(f"seed {seed}: {step} failed (exit {status}); see its output above")
        record = {**wanted, "wall_time_s": time.perf_counter() - started}
        files.write_json_atomic(temp / RECORD, record)
        figures = read_seed(temp)
    return {**record, **figures}


def remove_stale_temps(runs: Path) -> None:
    """Delete temporary seed folders left by killed benchmarks (not those of a running one)."""
    for temp in runs.glob(".seed-*.tmp"):
        if temp.is_dir() and not files.owned_by_live_process(temp):
            shutil.rmtree(temp, ignore_errors=True)


def spread(values: list[float]) -> dict:
    """mean, sample sd (None for one value) and worst (lowest) value."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "worst": min(values)}


def summarize(seeds: list[dict]) -> dict:
    """Spread over seeds of best val Dice, test mean Dice and each organ's test Dice; wall times."""
    organs = list(seeds[0]["organ_dice"])
    summary = {"best_val_dice": spread([s["best_val_dice"] for s in seeds]),
               "test_dice": spread([s["test_dice"] for s in seeds]),
               "organ_dice": {o: spread([s["organ_dice"][o] for s in seeds]) for o in organs}}
    summary["wall_time_s_max"] = max(s["wall_time_s"] for s in seeds)
    return summary


def table(report: dict) -> str:
    """Markdown: one row per seed, then mean, sd and worst; Dice in %, val Dice as a fraction."""
    seeds, summary = report["seeds"], report["summary"]
    organs, scored = list(summary["organ_dice"]), report.get("scored", "test")
    lines = [f"| seed | best val_dice | {scored} mean Dice (%) | " + " | ".join(organs) + " | wall (min) |",
             "|" + "---|" * (len(organs) + 4)]
    for s in seeds:
        cells = [str(s["seed"]), f"{s['best_val_dice']:.3f}", f"{100 * s['test_dice']:.1f}",
                 *(f"{100 * s['organ_dice'][o]:.1f}" for o in organs), f"{s['wall_time_s'] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for key in ("mean", "sd", "worst"):
        def cell(stats, scale=100.0, digits=1, key=key):
            return "—" if stats[key] is None else f"{scale * stats[key]:.{digits}f}"
        wall = f"{summary['wall_time_s_max'] / 60:.1f} (max)" if key == "worst" else ""
        cells = [f"**{key}**", cell(summary["best_val_dice"], 1.0, 3), cell(summary["test_dice"]),
                 *(cell(summary["organ_dice"][o]) for o in organs), wall]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def profile_commands(args):
    """``commands(seed, folder)`` of the chosen profile; checks its inputs first."""
    if args.profile == "demo":
        def commands(seed, out):
            return demo_commands(seed, out, args.set, args.config)
    else:
        data, cases = Path(args.data).resolve(), Path(args.cases).resolve()
        if not data.is_file():
            raise HnsegError(f"--data {args.data}: no such manifest; prepare the shards first "
                             "(hnseg prepare, as in results/openkbp.md)")
        if not (cases / "validation").is_dir():
            raise HnsegError(f"--cases {args.cases}: holds no validation/ folder of cases to score")

        def commands(seed, out):
            return openkbp_commands(seed, out, args.set, args.config, data, cases)
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    parser.add_argument("--runs", default="runs/seeds", help="folder of the seed runs (reused on a rerun)")
    parser.add_argument("--out", required=True, help="JSON report to write (refused if it exists)")
    parser.add_argument("--md", help="also write the table as Markdown here (refused if it exists)")
    parser.add_argument("--profile", choices=("demo", "openkbp"), default="demo",
                        help="demo: the main job (default); openkbp: the OpenKBP 36-minute profile")
    parser.add_argument("--data", default="runs/openkbp/shards/manifest.json",
                        help="openkbp: manifest of the prepared shards")
    parser.add_argument("--cases", default="../shared/data/openkbp-hn",
                        help="openkbp: the case folder (its validation/ cases are predicted and scored)")
    parser.add_argument("--config", help="training config (default: the profile's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override for every seed, repeatable")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        raise HnsegError(f"--seeds {args.seeds}: give at least 1")
    for path in filter(None, (args.out, args.md)):
        files.refuse_existing(path, hint="choose another file name")
    runs = Path(args.runs).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(runs)
    commands = profile_commands(args)
    seeds = [run_seed(seed, runs, args.set, args.config, args.profile, commands) for seed in range(args.seeds)]
    report = {"command": shlex.join(["python", "benchmarks/seed_spread.py", *(argv or sys.argv[1:])]),
              "machine": cpu_model(), "date": time.strftime("%Y-%m-%d"), "profile": args.profile,
              "scored": "test" if args.profile == "demo" else "validation-case", "overrides": args.set,
              "seeds": seeds, "summary": summarize(seeds)}
    files.write_json_atomic(args.out, report)
    text = table(report)
    if args.md:
        files.write_text_atomic(args.md, text)
    print(f"\n{report['machine']}, {report['date']}\n\n{text}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HnsegError as error:
        print(f"seed_spread: error: {error}", file=sys.stderr)
        sys.exit(2)
