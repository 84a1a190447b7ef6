"""Checks that an export folder is what ``hnseg export`` wrote, before any model in it is loaded.

A SavedModel is a TensorFlow graph: loading and calling it runs whatever ops it holds (file
writes included), so a SavedModel is executable code and is only loaded after every file of it
matched the sha256 that ``export`` stored in ``metadata.json``. A ``.keras`` file is loaded in Keras
safe mode (no Python lambdas are deserialised); beside a ``metadata.json`` its sha256 is checked too.
The hashes detect damage and edits of the model files; they are not a signature (whoever can edit
the folder can edit ``metadata.json`` as well), so keep export folders where only you can write.
"""

from __future__ import annotations

import os
from pathlib import Path

from hnseg_keras.errors import HnsegError
from hnseg_keras.files import sha256_file

FILES_KEY = "files"  # metadata.json: {relative path: sha256} of model.keras and every file of saved_model/
REEXPORT = "re-export it with `hnseg export RUN --out DIR`"


def fingerprint(folder: str | os.PathLike, names: tuple[str, ...] = ("model.keras", "saved_model")) -> dict[str, str]:
    """{path relative to ``folder``: sha256} of the files ``names`` and of every file under the folders among them."""
    folder = Path(folder)
    found = {}
    for name in names:
        path = folder / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            found[file.relative_to(folder).as_posix()] = sha256_file(file)
    return found


def _inside(path: Path, root: Path, what: str) -> None:
    """Refuse a link or a path that leads out of the export folder ``root`` (resolved)."""
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        raise HnsegError(f"{path}: {what} is a link or lies outside the export folder {root.name}; "
                         f"refusing to load it, {REEXPORT}")


def verify_export(folder: str | os.PathLike, metadata: dict, saved_model: bool, model_file: str = "model.keras") -> None:
    """Refuse (one line naming the file) an export whose model files differ from metadata.json's sha256.

    ``saved_model``: the SavedModel will be loaded, so every file under it must be listed and match,
    and nothing may be added. Otherwise only ``model_file`` is checked.
    """
    folder = Path(folder)
    root = folder.resolve()
    listed = metadata.get(FILES_KEY)
    if not isinstance(listed, dict) or not listed:
        raise HnsegError(f"{folder / 'metadata.json'}: records no sha256 of the model files (an older or "
                         f"edited export); {REEXPORT}")
    wanted = [model_file]
    if saved_model:
        saved = folder / str(metadata.get("saved_model", "saved_model"))
        _inside(saved, root, "the SavedModel folder")
        if not saved.is_dir():
            raise HnsegError(f"{saved}: SavedModel folder missing; {REEXPORT}")
        present = {p.relative_to(folder).as_posix() for p in saved.rglob("*") if p.is_file() or p.is_symlink()}
        prefix = saved.relative_to(folder).as_posix() + "/"
        expected = {name for name in listed if name.startswith(prefix)}
        extra = sorted(present - expected)
        if extra:
            raise HnsegError(f"{folder / extra[0]}: not written by `hnseg export` (not in metadata.json); "
                             f"refusing to load the SavedModel, {REEXPORT}")
        wanted += sorted(expected)
    for name in wanted:
        _check_file(folder, root, name, listed)


def _check_file(folder: Path, root: Path, name: str, listed: dict) -> None:
    path = folder / name
    _inside(path, root, "a model file")
    if name not in listed:
        raise HnsegError(f"{path}: has no sha256 in metadata.json; {REEXPORT}")
    if not path.is_file():
        raise HnsegError(f"{path}: missing from the export folder; {REEXPORT}")
    if sha256_file(path) != listed[name]:
        raise HnsegError(f"{path}: sha256 differs from metadata.json (the file changed after export: damaged "
                         f"or modified); refusing to load it, {REEXPORT}")


def check_metadata(metadata: dict, source: str) -> None:
    """Refuse metadata whose parts disagree (organs, channels vs neighbours, slice size)."""
    try:
        geometry = metadata["input"]
        channels, height, width = int(geometry["channels"]), int(geometry["height"]), int(geometry["width"])
        neighbours, size = int(metadata["slicing"]["neighbours"]), int(metadata["slicing"]["size"])
        organs = list(metadata["organs"])
    except (KeyError, TypeError, ValueError) as error:
        raise HnsegError(f"{source}: metadata.json lacks or garbles {error}; {REEXPORT}") from None
    if channels != 2 * neighbours + 1 or (height, width) != (size, size) or not organs:
        raise HnsegError(f"{source}: metadata.json disagrees with itself (input {height}x{width}x{channels}, "
                         f"slicing size {size} with {neighbours} neighbours, {len(organs)} organs); {REEXPORT}")


def check_signature(shape_in, shape_out, metadata: dict, source: str) -> None:
    """Refuse a model whose input channels / output organs (and fixed H, W) differ from its metadata."""
    geometry, organs = metadata["input"], metadata["organs"]
    want_in = (geometry.get("height"), geometry.get("width"), int(geometry["channels"]))
    got_in = tuple(None if d is None else int(d) for d in list(shape_in)[-3:])
    differs = got_in[2] != want_in[2] or int(shape_out[-1]) != len(organs)
    differs |= any(g is not None and w is not None and g != int(w) for g, w in zip(got_in[:2], want_in[:2], strict=True))
    if differs:
        raise HnsegError(f"{source}: the model takes {list(got_in)} (H, W, channels) and gives {shape_out[-1]} organ(s), "
                         f"but metadata.json says {list(want_in)} and {len(organs)}; {REEXPORT}")


def saved_model_shapes(signature) -> tuple[list, list]:
    """(input ``ct`` shape, output ``probabilities`` shape) of a concrete SavedModel signature."""
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if "ct" not in inputs or "probabilities" not in outputs:
        raise HnsegError(f"SavedModel signature has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                         f"not ct -> probabilities; {REEXPORT}")
    return inputs["ct"].shape.as_list(), outputs["probabilities"].shape.as_list()
