"""The evaluation tables: results.md (per organ, mean +- sd), results.csv and results.json."""

from __future__ import annotations

import math
from pathlib import Path

from hnseg_keras.errors import HnsegError
from hnseg_keras.files import write_json_atomic, write_text_atomic

METRICS = ("dice", "hd95_mm", "asd_mm", "surface_dice")


def _cell(stats: dict, scale: float = 1.0, with_std: bool = True) -> str:
    if stats.get("mean") is None:
        return "—"
    text = f"{stats['mean'] * scale:.2f}"
    return text + (f" ± {stats['std'] * scale:.2f}" if with_std and stats.get("std") is not None else "")


def format_markdown(results: dict) -> str:
    """Markdown table like the seed paper's Table 2: organ rows + a mean row, then flagged cases."""
    seed = results["protocol"] == "seed2d"
    header = ["Organ", "n", "Dice (%)", "HD95 (mm)", "ASD (mm)", "Surface Dice (%)", "Tol (mm)", "No surface"]
    header += ["Dice 2D/slice (%)"] if seed else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary = results["summary"]
    for organ in results["organs"]:
        row = summary[organ]
        cells = [organ, str(row["n"]), _cell(row["dice"], 100), _cell(row["hd95_mm"]), _cell(row["asd_mm"]),
                 _cell(row["surface_dice"], 100), f"{row['tolerance_mm']:.2f}", str(row["no_surface"])]
        lines.append("| " + " | ".join(cells + ([_cell(row["dice2d_seed"], 100)] if seed else [])) + " |")
    mean = summary["mean"]
    cells = ["**Mean**", str(mean["n"]), _cell(mean["dice"], 100), _cell(mean["hd95_mm"]), _cell(mean["asd_mm"]),
             _cell(mean["surface_dice"], 100), "", ""] + ([_cell(mean["dice2d_seed"], 100)] if seed else [])
    lines.append("| " + " | ".join(cells) + " |")
    flagged = [f"{case_id}/{organ}: {entry['flag'].replace('_', ' ')}" for case_id, metrics in results["cases"].items()
               for organ, entry in metrics.items() if entry["flag"]]
    if flagged:
        lines += ["", "Flagged (one empty: Dice 0, no HD95/ASD; both empty: Dice 1, HD95 0): " + "; ".join(flagged)]
    if results.get("missing_predictions"):
        lines += ["", "Cases without a prediction (skipped): " + ", ".join(results["missing_predictions"])]
    return "\n".join(lines) + "\n"


def format_csv(results: dict) -> str:
    """One row per organ plus the mean row; metric values as fractions / mm."""
    pairs = [(m, s) for m in METRICS for s in ("mean", "std")]
    pairs += [("dice2d_seed", "mean"), ("dice2d_seed", "slices")] if results["protocol"] == "seed2d" else []
    header = ["organ", "n", "no_surface", "tolerance_mm"] + [f"{m}_{s}" for m, s in pairs]
    lines = [",".join(header)]
    summary = results["summary"]
    for organ in [*results["organs"], "mean"]:
        row = summary[organ]
        values = [organ, row["n"], row.get("no_surface", ""), row.get("tolerance_mm", "")]
        values += [row[m].get(s) for m, s in pairs]
        lines.append(",".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in values))
    return "\n".join(lines) + "\n"


def _json_safe(value):
    """NaN / inf -> None recursively, so results.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


RESULT_FILES = ("results.json", "results.csv", "results.md")


def write_results(results: dict, out_dir, force: bool = False) -> list[Path]:
    """Write results.json / .csv / .md into ``out_dir`` (temp name then rename); refuse to overwrite."""
    out_dir = Path(out_dir)
    existing = [name for name in RESULT_FILES if (out_dir / name).exists()]
    if existing and not force:
        raise HnsegError(f"{out_dir / existing[0]}: results already exist; pass --force or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "results.json", _json_safe(results))
    for name, text in (("results.csv", format_csv(results)), ("results.md", format_markdown(results))):
        write_text_atomic(out_dir / name, text)
    return [out_dir / name for name in RESULT_FILES]
