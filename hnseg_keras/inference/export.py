"""``hnseg export``: a trained run -> a folder a downstream user can serve with TensorFlow alone.

Export folder::

    model.keras       the run's best (or final) Keras model, byte-for-byte
    saved_model/      TensorFlow SavedModel; signatures ``serving_default`` / ``serve`` (float32)
                      and ``serve_int16`` (int16): input ``ct`` raw HU [N, H, W, C] at the slice
                      geometry of the training data, output ``probabilities`` [N, H, W, O] sigmoid
    metadata.json     organs (channel order) and label values, slicing config, window and HU
                      statistics, input geometry, versions, source run

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
import uuid
from pathlib import Path

import numpy as np

from hnseg_keras import __version__, configs
from hnseg_keras.data.organs import label_value, resolve_organs
from hnseg_keras.data.slicing import AIR_HU, SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import replace_folder
from hnseg_keras.inference import trust

METADATA_FORMAT = "hnseg-keras-export"
METADATA_SCHEMA = 1
MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
METADATA_FILE = "metadata.json"
SELF_CHECK_ATOL = 1e-5  # max |SavedModel - Keras| accepted on the export self-check


def padding_for(size: int, multiple: int) -> tuple[int, int]:
    """(before, after) air padding that makes ``size`` a multiple of ``multiple`` (centred)."""
    total = -size % multiple
    return total // 2, total - total // 2


def load_keras_model(path: str | os.PathLike):
    """Load a ``.keras`` file written by hnseg-keras (inference only, no compile)."""
    import keras

    from hnseg_keras.model import losses, metrics, unet  # noqa: F401  (registers the custom objects)

    path = Path(path)
    if not path.is_file():
        raise HnsegError(f"{path}: model file not found; give a .keras file, an export folder or a run folder")
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as error:  # noqa: BLE001  (Keras raises many types for a bad archive)
        text = str(error).strip().splitlines()
        raise HnsegError(f"{path}: cannot load the Keras model ({text[0][:200] if text else type(error).__name__}); "
                         "re-export it from its run folder") from None


def normalisation_of(model) -> dict:
    """Window / mean / std of the model's input normalisation layer; refuses models without one.

    The layer must follow the input directly (only ``SpatialSizeCheck`` may sit in between), so
    whatever feeds the model raw HU gets exactly the training normalisation.
    """
    from hnseg_keras.model.unet import HUWindowNormalize, SpatialSizeCheck

    inner = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    while inner and isinstance(inner[0], SpatialSizeCheck):
        inner = inner[1:]
    if not inner or not isinstance(inner[0], HUWindowNormalize):
        raise HnsegError(f"model {model.name!r} does not start with the HU window layer (hu_window); export "
                         "needs a model built by hnseg_keras.model.unet.build_unet, which normalises inside the graph")
    layer = inner[0]
    return {"window": list(layer.window) if layer.window else None, "hu_mean": layer.mean, "hu_std": layer.std}


def size_multiple_of(model) -> int:
    """The spatial multiple the U-Net needs (from its ``SpatialSizeCheck`` layer; 16 if absent)."""
    from hnseg_keras.model.unet import SpatialSizeCheck

    checks = [layer for layer in model.layers if isinstance(layer, SpatialSizeCheck)]
    return checks[0].multiple if checks else 16


def run_metadata(run_dir: str | os.PathLike) -> dict:
    """Organs, slicing and input geometry of a training run, from its config.json and data manifest."""
    from hnseg_keras.data.shards import Manifest

    run_dir = Path(run_dir)
    config = configs.read_json(run_dir / "config.json")
    data = config.get("data") if isinstance(config, dict) else None
    if not data:
        raise HnsegError(f"{run_dir / 'config.json'}: names no data manifest ('data'); is this a training run folder?")
    manifest_path = Path(data)
    if not manifest_path.is_absolute() and not manifest_path.exists():
        manifest_path = run_dir / manifest_path
    if not manifest_path.exists():
        raise HnsegError(f"{data}: the run's data manifest is missing (named in {run_dir / 'config.json'}); "
                         "restore the prepared data or point 'data' in config.json at its manifest.json")
    manifest = Manifest.load(manifest_path)
    height, width, channels = (int(v) for v in manifest.image_shape)
    return model_metadata(manifest.organs, manifest.slicing, (height, width, channels),
                          _data_name(manifest_path), config.get("model"))


def _data_name(manifest_path: Path) -> str:
    """The prepared data set's folder name (no absolute path of this machine goes into metadata)."""
    resolved = manifest_path.resolve()
    return resolved.name if resolved.is_dir() else resolved.parent.name


def model_metadata(organs, slicing: dict, image_shape: tuple[int, int, int], manifest: str | None,
                   model_config: dict | None) -> dict:
    """The metadata prediction needs beside a model: organs and labels, slicing, input geometry."""
    organs = list(resolve_organs(organs))
    height, width, channels = image_shape
    return {
        "organs": organs,
        "labels": {name: label_value(name) for name in organs},
        "slicing": configs.to_dict(configs.from_dict(SlicingConfig, slicing)),
        "input": {"name": "ct", "height": height, "width": width, "channels": channels,
                  "dtypes": ["float32", "int16"], "units": "HU", "pad_hu": AIR_HU},
        "manifest": manifest,
        "model_config": model_config,
    }


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
    if out_dir.exists() and not force:
        raise HnsegError(f"{out_dir}: already exists; choose another --out or pass --force")
    metadata = run_metadata(run_dir)
    model = load_keras_model(model_path)
    _check_model_matches(model, metadata, model_path)
    metadata.update(normalisation_of(model))
    multiple = size_multiple_of(model)
    pad_h = padding_for(metadata["input"]["height"], multiple)
    pad_w = padding_for(metadata["input"]["width"], multiple)
    metadata["input"].update(size_multiple=multiple, padding=[list(pad_h), list(pad_w)])
    metadata.update(_provenance(run_dir, which))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        shutil.copy2(model_path, tmp / MODEL_FILE)
        write_saved_model(model, tmp / SAVED_MODEL_DIR, metadata["input"])
        metadata["self_check_max_abs_diff"] = _self_check(model, tmp / SAVED_MODEL_DIR, metadata["input"])
        metadata[trust.FILES_KEY] = trust.fingerprint(tmp, (MODEL_FILE, SAVED_MODEL_DIR))
        configs.write_json_atomic(tmp / METADATA_FILE, metadata)
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


def read_metadata(folder: str | os.PathLike) -> dict:
    """metadata.json of an export folder, checked for the fields prediction needs."""
    path = Path(folder) / METADATA_FILE
    data = configs.read_json(path)
    missing = [key for key in ("organs", "slicing", "input") if not isinstance(data, dict) or key not in data]
    if missing or data.get("format") != METADATA_FORMAT:
        raise HnsegError(f"{path}: not an hnseg-keras export (missing {missing or ['format']}); "
                         "re-export with `hnseg export RUN --out DIR`")
    return data


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
