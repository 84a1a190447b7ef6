"""``hnseg verify PATH``: check a prepared shard folder, a training run folder or an export folder.

Shards against the manifest's size and sha256; a run's config, data and model files; an export's
model files against the sha256 in its metadata.json (the same checks ``train`` and ``predict`` run
before they start). Prints one line per check; the first problem is the error (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from hnseg_keras.errors import HnsegError


def verify_shard_folder(folder: Path, use_cache: bool = True) -> str:
    from hnseg_keras.data.shards import verify_data

    manifest = verify_data(folder / "manifest.json", use_cache=use_cache)
    count = sum(len(split["shards"]) for split in manifest.splits.values())
    state = "complete" if manifest.complete else "INCOMPLETE (rerun the same `hnseg prepare` to finish it)"
    return f"{folder}: {count} shard(s) match manifest.json (size + sha256); data set {state}"


def verify_keras_archive(path: Path) -> None:
    """A ``.keras`` file must be a readable zip with config.json (no model is loaded)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    except (zipfile.BadZipFile, OSError) as error:
        raise HnsegError(f"{path}: not a readable .keras archive ({error}); retrain or re-export") from None
    if bad is not None or "config.json" not in names:
        raise HnsegError(f"{path}: damaged .keras archive ({bad or 'no config.json'}); retrain or re-export")


def verify_run_folder(folder: Path, use_cache: bool = True) -> list[str]:
    from hnseg_keras.training.config import read_stored
    from hnseg_keras.training.resume import check_backup
    from hnseg_keras.training.run_folder import RunFolder

    run = RunFolder(folder)
    config = read_stored(run.config_file)  # a run's config.json, older ones with two HU windows too
    lines = [f"{run.config_file}: valid training config"]
    data = Path(config.data) if config.data else None
    if data is not None and data.suffix != ".npz":  # an arrays file is checked whole when it is opened
        manifest = data if data.exists() or data.is_absolute() else folder / data
        lines.append(verify_shard_folder(manifest if manifest.is_dir() else manifest.parent, use_cache))
    for model in sorted(folder.glob("*.keras")):
        verify_keras_archive(model)
        lines.append(f"{model}: readable .keras archive")
    if run.backup_dir.is_dir():
        lines.append(check_backup(run.backup_dir))
    return lines


def verify_export_folder(folder: Path) -> str:
    from hnseg_keras.inference import trust
    from hnseg_keras.inference.model_io import read_metadata

    metadata = read_metadata(folder)
    trust.check_metadata(metadata, str(folder))
    trust.verify_export(folder, metadata, saved_model=True)
    verify_keras_archive(folder / "model.keras")
    return f"{folder}: {len(metadata[trust.FILES_KEY])} model file(s) match metadata.json (sha256)"


def verify(path: str, use_cache: bool = True) -> list[str]:
    """Lines describing what was checked; HnsegError at the first problem."""
    folder = Path(path)
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise HnsegError(f"{path}: no such folder; give a prepared data folder, a run folder or an export folder")
    if (folder / "manifest.json").is_file():
        return [verify_shard_folder(folder, use_cache)]
    if (folder / "metadata.json").is_file():
        return [verify_export_folder(folder)]
    if (folder / "config.json").is_file():
        return verify_run_folder(folder, use_cache)
    raise HnsegError(f"{folder}: holds no manifest.json, metadata.json or config.json; give a prepared data "
                     "folder, an export folder or a training run folder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="PATH", help="prepared data folder, training run folder or export folder")
    parser.add_argument("--full", action="store_true",
                        help="hash every shard again (by default shards unchanged since their last check are skipped)")


def run(args: argparse.Namespace) -> int:
    for line in verify(args.path, use_cache=not args.full):
        print(line, file=sys.stderr)
    print("ok")
    return 0
