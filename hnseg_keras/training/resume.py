"""The files inside a run folder's ``backup/`` (Keras' format): read them, and resume from a damaged one.

Keras' ``BackupAndRestore(double_checkpoint=True)`` keeps ``latest.weights.h5`` +
``training_metadata.json`` and the previous epoch's pair as ``*.bkp``. Keras falls back to the
``.bkp`` pair only when the weights fail to load; a truncated ``training_metadata.json`` stops
every resume with a JSON error. ``RunFolder.resume_epoch`` runs ``repair_backup`` before ``fit``: it
restores the newest readable pair, or moves a wholly damaged backup aside so the run starts again
from epoch 0, and ``read_pair`` then tells the epoch the run resumes after.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from hnseg_keras.errors import HnsegError
from hnseg_keras.files import atomic_path

log = logging.getLogger(__name__)
WEIGHTS = "latest.weights.h5"
METADATA = "training_metadata.json"
PREVIOUS = ".bkp"


def read_pair(backup: Path, suffix: str = "") -> int | None:
    """The epoch of the (weights, metadata) pair with ``suffix``, or None when either is missing or damaged."""
    import h5py

    try:
        epoch = json.loads((backup / f"{METADATA}{suffix}").read_text())["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            return None
        weights = backup / f"{WEIGHTS}{suffix}"
        if weights.exists():  # a backup written before the first epoch ends has no weights yet
            with h5py.File(weights, "r") as handle:
                handle.visit(lambda name: None)
        return epoch
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


def repair_backup(backup_dir: str | os.PathLike) -> str | None:
    """Make the newest readable backup the current one; returns what was done (also logged as a warning), or None."""
    backup = Path(backup_dir)
    if not (backup / METADATA).exists() and not (backup / WEIGHTS).exists():
        return None
    if read_pair(backup) is not None:
        return None
    previous = read_pair(backup, PREVIOUS)
    if previous is not None:
        for name in (WEIGHTS, METADATA):
            source = backup / f"{name}{PREVIOUS}"
            if source.exists():
                with atomic_path(backup / name) as temp:
                    shutil.copyfile(source, temp)
        message = (f"{backup}: the newest epoch backup is damaged; resuming from the previous one "
                   f"(after epoch {previous})")
    else:
        aside = backup.with_name(f"{backup.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(backup, aside)
        message = (f"{backup}: both epoch backups are damaged (moved to {aside.name}); "
                   "training starts again from epoch 0")
    log.warning(message)
    return message


def check_backup(backup_dir: str | os.PathLike) -> str:
    """One line for ``hnseg verify``: which backup a resume would use; HnsegError when none is readable."""
    backup = Path(backup_dir)
    current, previous = read_pair(backup), read_pair(backup, PREVIOUS)
    if current is not None:
        return f"{backup}: epoch backup readable (after epoch {current})"
    if previous is not None:
        return f"{backup}: newest epoch backup damaged; a resume falls back to the previous one (after epoch {previous})"
    raise HnsegError(f"{backup}: both epoch backups are damaged; rerunning the training starts again from epoch 0")
