"""Evaluation pictures and the per-case table behind them.

``per_case.csv`` (always written by ``hnseg evaluate``) is long format, one row per case, organ and
metric (``case,organ,metric,value``; empty value where undefined), ready for pandas, R or a
spreadsheet pivot. ``hnseg evaluate --plots`` adds ``boxplots.png``: per metric, one box per organ
in the organ's catalogue colour, with every case drawn as a dot (test sets are small, the dots
matter more than the boxes).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

from hnseg_keras.files import write_text_atomic
from hnseg_keras.render import organ_colour, save_figure

# metric key in results.json -> (axis title, scale applied for display)
PLOTTED = {
    "dice": ("Dice (%)", 100.0),
    "hd95_mm": ("HD95 (mm)", 1.0),
    "asd_mm": ("average surface distance (mm)", 1.0),
    "surface_dice": ("surface Dice (%)", 100.0),
}
LONG_METRICS = ("dice", "hd95_mm", "asd_mm", "surface_dice", "hausdorff_mm", "dice2d")
CSV_NAME, PLOT_NAME = "per_case.csv", "boxplots.png"


def long_rows(results: dict) -> list[tuple[str, str, str, float]]:
    """(case, organ, metric, value) for every case and organ in ``results`` (the results.json dict)."""
    rows = []
    for case_id, metrics in results["cases"].items():
        for organ in results["organs"]:
            entry = metrics.get(organ)
            if entry is None:
                continue
            rows += [(case_id, organ, name, entry[name]) for name in LONG_METRICS if name in entry]
    return rows


def format_long_csv(results: dict) -> str:
    """``case,organ,metric,value`` text; NaN / None become an empty value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "organ", "metric", "value"])
    for case_id, organ, metric, value in long_rows(results):
        defined = value is not None and math.isfinite(value)
        writer.writerow([case_id, organ, metric, f"{value:.6g}" if defined else ""])
    return buffer.getvalue()


def values_by_organ(results: dict, metric: str) -> dict[str, list[float]]:
    """{organ: finite values of ``metric`` over the cases} (undefined distances left out)."""
    found: dict[str, list[float]] = {organ: [] for organ in results["organs"]}
    for _case, organ, name, value in long_rows(results):
        if name == metric and value is not None and math.isfinite(value):
            found[organ].append(float(value))
    return found


def box_plot_figure(results: dict, metrics=tuple(PLOTTED)):
    """A matplotlib Figure (no pyplot state): one panel per metric, one coloured box per organ."""
    import numpy as np
    from matplotlib.figure import Figure

    organs = [organ for organ in results["organs"] if any(organ in m for m in results["cases"].values())]
    figure = Figure(figsize=(max(6.0, 0.9 * len(organs) + 2.0), 2.6 * len(metrics)), dpi=80, layout="constrained")
    axes = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)  # fixed jitter: the same results give the same picture
    for ax, metric in zip(axes, metrics, strict=True):
        title, scale = PLOTTED[metric]
        data = values_by_organ(results, metric)
        series = [[v * scale for v in data[organ]] for organ in organs]
        boxes = ax.boxplot(series, patch_artist=True, widths=0.6, showfliers=False)
        ax.set_xticks(range(1, len(organs) + 1), organs, rotation=20, fontsize=8)
        for patch, organ in zip(boxes["boxes"], organs, strict=True):
            patch.set_facecolor([c / 255 for c in organ_colour(organ)] + [0.6])
        for position, values in enumerate(series, 1):
            ax.plot(position + rng.uniform(-0.15, 0.15, len(values)), values, "k.", markersize=4)
        ax.set_ylabel(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    cases = len(results["cases"])
    figure.suptitle(f"{cases} case{'s' if cases != 1 else ''}, one dot each", fontsize=10)
    return figure


def write_all(results: dict, out_dir: str | os.PathLike, with_plots: bool) -> list[Path]:
    """Write ``per_case.csv`` and, with ``with_plots``, ``boxplots.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    written = [write_text_atomic(out_dir / CSV_NAME, format_long_csv(results))]
    if with_plots:
        written.append(save_figure(box_plot_figure(results), out_dir / PLOT_NAME))
    return written
