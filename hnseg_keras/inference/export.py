"""``hnseg export``: a trained run -> a folder a downstream user can serve with TensorFlow alone.

Export folder::

    model.keras       the run's best (or final) Keras model, byte-for-byte
    saved_model/      TensorFlow SavedModel; signatures ``serving_default`` / ``serve`` (float32)
                      and ``serve_int16`` (int16): input ``ct`` raw HU [N, H, W, C] at the slice
                      geometry of the training data, output ``probabilities`` [N, H, W, O] sigmoid
    metadata.json     organs (channel order), their labels and definitions, slicing config, window
                      and HU statistics, input geometry, versions, source run (folder name); all
                      taken from the run folder (data.json, config.json), never from the shards

The HU window and normalisation are the model's own first layer (``model.HUWindowNormalize``,
checked on export), so the SavedModel takes raw HU. When the slice size is not a multiple of the
U-Net's down-sampling factor, the signature pads the slices with air (-1024 HU) equally on both
sides and crops the probabilities back, so it still takes the slices exactly as ``slicing``
produces them. The folder is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from hnseg_keras import __version__, configs
from hnseg_keras.data.slicing import AIR_HU
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import atomic_path, refuse_existing
from hnseg_keras.inference import trust
from hnseg_keras.inference.model_io import (
    METADATA_FILE,
    METADATA_FORMAT,
    MODEL_FILE,
    SAVED_MODEL_DIR,
    load_keras_model,
    normalisation_of,
    padding_for,
    read_metadata,
    run_metadata,
    size_multiple_of,
)

METADATA_SCHEMA = 1
SELF_CHECK_ATOL = 1e-5  # max |SavedModel - Keras| accepted on the export self-check


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, which: str = "best",
               force: bool = False) -> Path:
    """Export ``<run_dir>/<which>.keras`` to ``out_dir`` (model.keras, saved_model/, metadata.json).

    Refuses an existing ``out_dir`` unless ``force``. Checks that the SavedModel reproduces the Keras
    model (max abs difference <= 1e-5 on random HU slices) before renaming the folder into place.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if which not in ("best", "final"):
        raise HnsegError(f"--which {which!r}: choose best or final")
    model_path = run_dir / f"{which}.keras"
    if not run_dir.is_dir():
        raise HnsegError(f"{run_dir}: run folder not found; give the folder `hnseg train` wrote")
    if not model_path.is_file():
        found = sorted(p.name for p in run_dir.glob("*.keras")) or ["none"]
        raise HnsegError(f"{model_path}: not found (.keras files there: {', '.join(found)}); "
                         "train longer or pass --which with one that exists")
    refuse_existing(out_dir, force)
    metadata = run_metadata(run_dir)
    model = load_keras_model(model_path)
    _check_model_matches(model, metadata, model_path)
    metadata.update(normalisation_of(model))
    multiple = size_multiple_of(model)
    pad_h = padding_for(metadata["input"]["height"], multiple)
    pad_w = padding_for(metadata["input"]["width"], multiple)
    metadata["input"].update(size_multiple=multiple, padding=[list(pad_h), list(pad_w)])
    metadata.update(_provenance(run_dir, which))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        shutil.copy2(model_path, tmp / MODEL_FILE)
        write_saved_model(model, tmp / SAVED_MODEL_DIR, metadata["input"])
        metadata["self_check_max_abs_diff"] = _self_check(model, tmp / SAVED_MODEL_DIR, metadata["input"])
        metadata[trust.FILES_KEY] = trust.fingerprint(tmp, (MODEL_FILE, SAVED_MODEL_DIR))
        configs.write_json_atomic(tmp / METADATA_FILE, metadata)
    return out_dir


def _check_model_matches(model, metadata: dict, path: Path) -> None:
    channels, organs = model.input_shape[-1], model.output_shape[-1]
    if channels != metadata["input"]["channels"] or organs != len(metadata["organs"]):
        raise HnsegError(f"{path}: model takes {channels} channel(s) and gives {organs} organ(s), but the run's "
                         f"data has {metadata['input']['channels']} and {len(metadata['organs'])}; "
                         "export the model with the run folder it was trained in")


def _provenance(run_dir: Path, which: str) -> dict:
    import keras
    import tensorflow as tf

    return {
        "format": METADATA_FORMAT, "schema_version": METADATA_SCHEMA, "hnseg_keras_version": __version__,
        "tensorflow_version": tf.__version__, "keras_version": keras.__version__,
        "source_run": run_dir.resolve().name, "which": which,
        "model_file": MODEL_FILE, "saved_model": SAVED_MODEL_DIR,
        "signatures": {"serving_default": "float32", "serve": "float32", "serve_int16": "int16"},
        "output": {"name": "probabilities", "activation": "sigmoid", "threshold": 0.5},
    }


def write_saved_model(model, path: Path, geometry: dict) -> None:
    """Write the SavedModel with the float32 (default) and int16 serving signatures."""
    import keras
    import tensorflow as tf
    from keras import ops

    height, width, channels = geometry["height"], geometry["width"], geometry["channels"]
    (top, bottom), (left, right) = geometry["padding"]

    def serve(ct):
        x = ops.pad(ct, [[0, 0], [top, bottom], [left, right], [0, 0]], constant_values=float(AIR_HU))
        y = model(x, training=False)
        return {"probabilities": y[:, top:top + height, left:left + width, :]}

    def serve_int16(ct):
        return serve(ops.cast(ct, "float32"))

    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, fn, dtype in (("serve", serve, tf.float32), ("serve_int16", serve_int16, tf.int16)):
        spec = tf.TensorSpec([None, height, width, channels], dtype, name="ct")
        archive.add_endpoint(name, fn, input_signature=[spec])
    archive.write_out(str(path), verbose=False)


def _self_check(model, path: Path, geometry: dict) -> float:
    """Max |SavedModel - Keras| on random HU slices (both signatures); raises above SELF_CHECK_ATOL."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shape = (2, geometry["height"], geometry["width"], geometry["channels"])
    hu = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    (top, bottom), (left, right) = geometry["padding"]
    padded = np.pad(hu.astype(np.float32), [(0, 0), (top, bottom), (left, right), (0, 0)], constant_values=AIR_HU)
    expected = np.asarray(model.predict_on_batch(padded))[:, top:top + shape[1], left:left + shape[2]]
    loaded = tf.saved_model.load(str(path))
    worst = 0.0
    for name, array in (("serving_default", hu.astype(np.float32)), ("serve_int16", hu)):
        got = loaded.signatures[name](ct=tf.constant(array))["probabilities"].numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > SELF_CHECK_ATOL:
        raise HnsegError(f"{path}: SavedModel differs from the Keras model by {worst:.2e} "
                         f"(> {SELF_CHECK_ATOL}); report this with the run folder")
    return worst


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="training run folder (holds config.json and best.keras)")
    parser.add_argument("--out", required=True, help="export folder to create")
    parser.add_argument("--which", choices=("best", "final"), default="best",
                        help="which model of the run to export (default: best)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")


def run(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, which=args.which, force=args.force)
    metadata = read_metadata(out)
    geometry = metadata["input"]
    print(f"exported {args.run} ({args.which}) -> {out}: {len(metadata['organs'])} organs, input ct "
          f"[N, {geometry['height']}, {geometry['width']}, {geometry['channels']}] HU float32|int16, "
          f"self-check max |diff| {metadata['self_check_max_abs_diff']:.1e}", file=sys.stderr)
    return 0
