"""A training run folder: the names of its files and its life, from opening to the summary.

Run folder::

    config.json          the resolved TrainConfig (model statistics filled in from the data)
    data.json            organs, organ definitions, slicing, image shape, normalisation, data folder name
                         (its format is ``inference.model_io``'s: export and prediction read it)
    history.csv          one row per epoch (CSVLogger; ``epoch`` is 0-based), resumed runs append
    training_curves.png  loss, validation Dice per organ and learning rate, redrawn from history.csv
    best.keras           model of the best ``val_dice`` so far
    final.keras          model after the last epoch (interrupted.keras after Ctrl-C)
    summary.json         status, epochs run, best val_dice overall and per organ, training time
    logs/                TensorBoard: train/ and validation/ scalars, images/ with contour overlays
    backup/              BackupAndRestore state while a run is unfinished (``resume.py``; Keras removes
                         it when the run finishes)

Every name is spelled here and nowhere else in ``training``: ``hnseg train`` and every ``hnseg tune``
trial open their folder with :meth:`RunFolder.open`, and the loop and its callbacks take their paths
from it. A new per-run file is one more name (and, when the folder writes it itself, one method) here.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import LOCK_NAME, FolderLock, atomic_path, temp_name
from hnseg_keras.inference import model_io
from hnseg_keras.training import resume
from hnseg_keras.training.config import TrainConfig, single_window, stored_config

CONFIG_FILE = "config.json"
DATA_FILE = model_io.DATA_FILE
HISTORY_FILE = "history.csv"
CURVES_FILE = "training_curves.png"
SUMMARY_FILE = "summary.json"
MODEL_SUFFIX = ".keras"
MODELS = ("best", "final", "interrupted")  # <name>.keras
LOGS_DIR = "logs"
IMAGES_DIR = "images"  # inside logs/
BACKUP_DIR = "backup"

NEW, RESUME, FINISHED = "new", "resume", "finished"


class RunFolder:
    """The files of one training run and what may happen to them.

    Args:
        path: the run folder (created when it is opened).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def of_worker(cls, out: str | os.PathLike, chief: bool, task: int) -> RunFolder:
        """The folder a worker of a distributed run writes: ``out`` on the chief, else a sibling scratch
        folder (``.<name>.worker-<task>``, removed by :meth:`discard`, kept after a kill so each worker
        resumes from its own backup). Every worker runs the same saving code (reading variables may
        need all of them), but only the chief's files are the run's."""
        out = Path(out)
        return cls(out if chief else out.with_name(f".{out.name}.worker-{task}"))

    # ------------------------------------------------------------------------- names

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def data_file(self) -> Path:
        return self.path / DATA_FILE

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def curves_file(self) -> Path:
        return self.path / CURVES_FILE

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def logs_dir(self) -> Path:
        return self.path / LOGS_DIR

    @property
    def images_dir(self) -> Path:
        return self.logs_dir / IMAGES_DIR

    @property
    def backup_dir(self) -> Path:
        return self.path / BACKUP_DIR

    def model_file(self, which: str) -> Path:
        """``best.keras``, ``final.keras`` or ``interrupted.keras``."""
        if which not in MODELS:
            raise ValueError(f"model {which!r} is not one of a run folder's {MODELS}")
        return self.path / f"{which}{MODEL_SUFFIX}"

    # ------------------------------------------------------------------------- life

    def check(self, resolved: dict) -> str:
        """``NEW``, ``RESUME`` (unfinished run of the same config) or ``FINISHED`` (same config, done).

        ``resolved`` is the config as ``config.json`` holds it. Raises HnsegError for a folder of
        something else or of a run with a different configuration.
        """
        run = self.path
        if not run.exists():
            return NEW
        if not run.is_dir():
            raise HnsegError(f"{run}: exists and is not a folder; choose another --out")
        if not self.config_file.is_file():
            if any(p.name != LOCK_NAME for p in run.iterdir()):
                raise HnsegError(f"{run}: is not empty and holds no training run (no {CONFIG_FILE}); "
                                 "choose another --out")
            return NEW
        stored = configs.read_json(self.config_file)
        if isinstance(stored, dict):  # a run from before the HU window had one home
            stored = single_window(stored, str(self.config_file))
        summary = configs.read_json(self.summary_file) if self.summary_file.is_file() else {}
        finished = summary.get("status") == "finished"
        differs = _differences(stored, resolved)
        if differs:
            state = "a finished" if finished else "an unfinished"
            raise HnsegError(f"{run}: holds {state} run of a different config ({', '.join(differs[:4])} "
                             "differ); choose another --out or delete that folder")
        return FINISHED if finished else RESUME

    @contextlib.contextmanager
    def open(self, config: TrainConfig, data, what: str) -> Iterator[str]:
        """Check the folder against ``config`` (resolved for ``data``, a ``sources`` object) and yield
        its state; unless the run is finished, hold the folder's lock (one writer; ``what`` names the
        holder) while the block runs, after writing ``config.json`` and ``data.json``, so the folder
        describes itself from its first epoch on."""
        resolved = stored_config(config)
        state = self.check(resolved)
        if state == FINISHED:
            yield state
            return
        with FolderLock(self.path, what):
            configs.write_json_atomic(self.config_file, resolved)
            configs.write_json_atomic(self.data_file, describe_data(config, data))
            yield state

    def discard(self) -> None:
        """Remove a worker's scratch folder once its run is over."""
        shutil.rmtree(self.path, ignore_errors=True)

    def resume_epoch(self) -> int:
        """Epochs the epoch backup holds (0 without one); a damaged newest backup is first replaced by
        the previous one, or moved aside (said on stderr), so ``BackupAndRestore`` can load it."""
        resume.repair_backup(self.backup_dir)
        return resume.read_pair(self.backup_dir) or 0

    # ------------------------------------------------------------------------- history and summary

    def history(self) -> list[dict[str, float]]:
        """Rows of ``history.csv`` (:func:`read_history`)."""
        return read_history(self.history_file)

    def trim_history(self, epochs: int) -> None:
        """Keep only rows of epochs < ``epochs`` (a kill between the CSV row and the backup repeats one)."""
        path = self.history_file
        if not path.is_file():
            return
        with path.open(newline="") as handle:
            lines = list(csv.reader(handle))
        if not lines:
            return
        header, rows = lines[0], lines[1:]
        column = header.index("epoch") if "epoch" in header else 0
        kept = [row for row in rows if row and _float(row[column]) < epochs]
        if len(kept) == len(rows):
            return
        with atomic_path(path) as temp, temp.open("w", newline="") as handle:
            csv.writer(handle).writerows([header, *kept])

    def write_summary(self, epochs: int, status: str, session_seconds: float, extra: dict) -> dict:
        """Write ``summary.json`` from ``history.csv``: best val_dice (overall and per organ), times."""
        history = self.history()
        best = best_row(history) or {}
        organs = extra.get("organs", [])
        summary = {
            "status": status,
            "epochs": epochs,
            "epochs_run": len(history),
            **extra,
            "best_epoch_index": int(best["epoch"]) if best else None,
            "best_val_dice": best.get("val_dice"),
            "best_val_dice_per_organ": {name: best.get(f"val_dice_{name}") for name in organs},
            "max_val_dice_per_organ": {
                name: max((row.get(f"val_dice_{name}", math.nan) for row in history), default=None)
                for name in organs
            },
            "final_val_dice": history[-1].get("val_dice") if history else None,
            "train_time_s": time_spent(history),
            "session_wall_time_s": session_seconds,
        }
        summary = json.loads(json.dumps(summary), parse_constant=lambda _: None)  # NaN -> null
        configs.write_json_atomic(self.summary_file, summary)
        return summary

    def save_model(self, model, which: str) -> Path:
        """Save ``model`` as ``<which>.keras`` (``MODELS``), atomically."""
        return save_model_atomic(model, self.model_file(which))


def describe_data(config: TrainConfig, data) -> dict:
    """The run's ``data.json``: what export and prediction need to know about the training data."""
    model, window = config.model, config.augment.window
    normalisation = {"window": list(window) if window else None, "hu_mean": model.hu_mean,
                     "hu_std": model.hu_std}
    return model_io.data_description(data.organs, data.slicing, data.image_shape, normalisation, data.name,
                                     data.sha256, data.organ_definitions, data.training_geometry)


def _differences(stored, wanted, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (``out`` is ignored: a run folder may be moved)."""
    if not isinstance(stored, dict) or not isinstance(wanted, dict):
        return [] if stored == wanted else [prefix.rstrip(".") or "config"]
    found = []
    for key in sorted(set(stored) | set(wanted)):
        if not prefix and key == "out":
            continue
        found += _differences(stored.get(key), wanted.get(key), f"{prefix}{key}.")
    return found


def read_history(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a CSVLogger file as dicts of floats (``epoch`` 0-based); [] when missing."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = []
        for row in csv.DictReader(handle):
            rows.append({key: _float(value) for key, value in row.items() if key})
        return rows


def _float(text: str | None) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def best_row(history: list[dict[str, float]], monitor: str = "val_dice") -> dict[str, float] | None:
    """The row with the highest finite ``monitor`` (the first one on ties), or None."""
    rows = [row for row in history if math.isfinite(row.get(monitor, math.nan))]
    return max(rows, key=lambda row: row[monitor]) if rows else None


def time_spent(history: list[dict[str, float]], before_epoch: int | None = None) -> float:
    """Training seconds (``EpochTimer``'s ``epoch_time_s``) of all rows, or of those before an epoch."""
    return sum(row.get("epoch_time_s", 0.0) for row in history
               if before_epoch is None or row.get("epoch", math.inf) < before_epoch)


def save_model_atomic(model, path: str | os.PathLike) -> Path:
    """``model.save`` without the optimizer's state to a temporary ``.keras`` name beside ``path``, then
    rename into place.

    Saved models are for prediction and export; a resumed run restores the optimizer from ``backup/``.
    Adam's two moments would make every file three times the size of the weights.
    """
    path = Path(path)
    temp = temp_name(path).with_suffix(MODEL_SUFFIX)  # per process; Keras insists on the suffix
    try:
        with _optimizer_detached(model):
            model.save(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _optimizer_detached(model):
    """Keras writes whatever ``model.optimizer`` holds; hide it for the save and put it back."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        yield
        return
    model.optimizer = None
    try:
        yield
    finally:
        model.optimizer = optimizer
