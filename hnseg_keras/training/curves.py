"""The run folder's training curves (``RunFolder.curves_file``): how training goes, without TensorBoard.

Three panels over the epochs: training and validation loss, validation Dice per organ (each in
its catalogue colour, the mean in black) and the learning rate (log scale). Redrawn from
``history.csv`` after an epoch at most every ``every_s`` seconds and when training ends, so a resumed
run shows its earlier epochs too; written through a temporary name, so an image viewer never catches
a half-written file.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import keras

from hnseg_keras.render import organ_colour, save_figure
from hnseg_keras.training.run_folder import read_history


def _series(history: list[dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """(1-based epochs, values) of the rows where ``key`` is finite."""
    pairs = [(int(row["epoch"]) + 1, row[key]) for row in history if math.isfinite(row.get(key, math.nan))]
    return [epoch for epoch, _ in pairs], [value for _, value in pairs]


def curves_figure(history: list[dict[str, float]], organs: Sequence[str]):
    """A matplotlib Figure of ``history`` (rows of history.csv): loss, validation Dice, learning rate."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(7.0, 7.5), dpi=80, layout="constrained")
    loss_ax, dice_ax, rate_ax = figure.subplots(3, 1, sharex=True)
    for key, style in (("loss", "-"), ("val_loss", "--")):
        loss_ax.plot(*_series(history, key), style, color="black", label=key)
    loss_ax.set_ylabel("loss")
    for organ in organs:
        colour = [c / 255 for c in organ_colour(organ)]
        dice_ax.plot(*_series(history, f"val_dice_{organ}"), "o-", color=colour, linewidth=2, markersize=4, label=organ)
    dice_ax.plot(*_series(history, "val_dice"), color="black", linewidth=2, label="mean")
    dice_ax.set_ylabel("validation Dice")
    dice_ax.set_ylim(0.0, 1.0)
    epochs, rates = _series(history, "learning_rate")
    rate_ax.plot(epochs, rates, color="black")
    if rates and min(rates) > 0 and max(rates) > 2 * min(rates):  # a constant rate reads better on a linear axis
        rate_ax.set_yscale("log")
    rate_ax.set_ylabel("learning rate")
    rate_ax.set_xlabel("epoch")
    rate_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (loss_ax, dice_ax, rate_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", ncols=2 if ax is dice_ax else 1)
    best = max(_series(history, "val_dice")[1], default=None)
    figure.suptitle(f"{len(history)} epochs" + (f", best validation Dice {best:.3f}" if best is not None else ""))
    return figure


def write_curves(history_csv: str | os.PathLike, path: str | os.PathLike, organs: Sequence[str]) -> Path | None:
    """Draw ``history_csv`` into the PNG ``path``; None (nothing written) while the history is empty."""
    history = read_history(history_csv)
    if not history:
        return None
    return save_figure(curves_figure(history, organs), path)


class TrainingCurves(keras.callbacks.Callback):
    """Redraws the curves PNG; place it after the CSVLogger that writes ``history_csv``.

    Drawing costs ~0.5 s, a few percent of a short CPU epoch, so after an epoch it redraws only when
    ``every_s`` seconds have passed since the last drawing (the first epoch always draws); the end of
    training always draws.
    """

    def __init__(self, history_csv: str | os.PathLike, path: str | os.PathLike, organs: Sequence[str],
                 every_s: float = 30.0, clock=time.monotonic):
        super().__init__()
        self.history_csv, self.path, self.organs = Path(history_csv), Path(path), list(organs)
        self.every_s, self.clock = float(every_s), clock
        self.drawn_at = None

    def on_epoch_end(self, epoch, logs=None):
        if self.drawn_at is None or self.clock() - self.drawn_at >= self.every_s:
            self.draw()

    def on_train_end(self, logs=None):
        self.draw()

    def draw(self):
        write_curves(self.history_csv, self.path, self.organs)
        self.drawn_at = self.clock()
