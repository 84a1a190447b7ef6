"""``hnseg export``: a trained run -> a folder a downstream user can serve with TensorFlow alone.

Export folder::

    model.keras       the run's best (or final) Keras model, byte-for-byte
    saved_model/      TensorFlow SavedModel; signatures ``serving_default`` / ``serve`` (float32)
                      and ``serve_int16`` (int16): input ``ct`` raw HU [N, H, W, C] at the slice
                      geometry of the training data, output ``probabilities`` [N, H, W, O] sigmoid;
                      ``segment_volume`` (float32) and ``segment_volume_int16`` (int16): input ``ct``
                      a whole HU volume [D, H, W] in LPS at the model's in-plane spacing, outputs
                      ``labels`` uint8 [D, H, W] and ``probabilities`` [D, H, W, O]
    metadata.json     organs (channel order), their labels and definitions, slicing config, window
                      and HU statistics, input geometry, versions, source run (folder name); all
                      taken from the run folder (data.json, config.json), never from the shards;
                      ``serving``: the signatures' shapes and what a client does before and after
                      ``segment_volume`` (orientation, in-plane spacing, resampling; docs/serving.md)

The HU window and normalisation are the model's own first layer (``model.HUWindowNormalize``,
checked on export), so the SavedModel takes raw HU. When the slice size is not a multiple of the
U-Net's down-sampling factor, the signature pads the slices with air (-1024 HU) equally on both
sides and crops the probabilities back, so it still takes the slices exactly as ``slicing``
produces them. ``segment_volume`` does in the graph what ``hnseg predict`` does in Python except
the body-centred crop (the U-Net is fully convolutional, so it takes whole slices): so a server
with TensorFlow alone returns the label map. The folder is built under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hnseg_keras import __version__, configs
from hnseg_keras.data import orientation
from hnseg_keras.data.organs import catalogue_from
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
from hnseg_keras.inference.prediction import SPACING_SLACK, THRESHOLD, Segmentation

METADATA_SCHEMA = 1
SELF_CHECK_ATOL = 1e-5  # max |SavedModel - Keras| accepted on the export self-check
SLICE_SIGNATURES = (("serve", "float32"), ("serve_int16", "int16"))  # serving_default = serve
VOLUME_SIGNATURES = (("segment_volume", "float32"), ("segment_volume_int16", "int16"))
SEGMENT_CHUNK = 8  # slices per model call inside segment_volume: memory stays bounded for any depth


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, which: str = "best",
               force: bool = False) -> Path:
    """Export ``<run_dir>/<which>.keras`` to ``out_dir`` (model.keras, saved_model/, metadata.json).

    Refuses an existing ``out_dir`` unless ``force``. Checks that the SavedModel reproduces the Keras
    model (max abs difference <= 1e-5 on random HU slices, and on a random HU volume through
    ``segment_volume``) before renaming the folder into place.
    """
    import tensorflow as tf

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
    metadata["serving"] = serving_description(metadata)
    labels = [metadata["labels"][organ] for organ in metadata["organs"]]
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        shutil.copy2(model_path, tmp / MODEL_FILE)
        write_saved_model(model, tmp / SAVED_MODEL_DIR, metadata["input"], labels)
        loaded = tf.saved_model.load(str(tmp / SAVED_MODEL_DIR))
        metadata["self_check_max_abs_diff"] = _self_check(model, loaded, tmp / SAVED_MODEL_DIR, metadata["input"])
        metadata["segment_volume_self_check_max_abs_diff"] = _segment_volume_self_check(
            model, loaded, tmp / SAVED_MODEL_DIR, metadata)
        metadata[trust.FILES_KEY] = trust.fingerprint(tmp, (MODEL_FILE, SAVED_MODEL_DIR))
        configs.write_json_atomic(tmp / METADATA_FILE, metadata)
    return out_dir


def _check_model_matches(model, metadata: dict, path: Path) -> None:
    channels, organs = model.input_shape[-1], model.output_shape[-1]
    if channels != metadata["input"]["channels"] or organs != len(metadata["organs"]):
        raise HnsegError(f"{path}: model takes {channels} channel(s) and gives {organs} organ(s), but the run's "
                         f"data has {metadata['input']['channels']} and {len(metadata['organs'])}; "
                         "export the model with the run folder it was trained in")
    if any(size is not None for size in model.input_shape[1:3]):
        raise HnsegError(f"{path}: model takes only {model.input_shape[1]}x{model.input_shape[2]} slices; "
                         "segment_volume feeds whole slices of any size, so export a model built by "
                         "build_unet without image_size (as `hnseg train` builds it)")


def _provenance(run_dir: Path, which: str) -> dict:
    import keras
    import tensorflow as tf

    return {
        "format": METADATA_FORMAT, "schema_version": METADATA_SCHEMA, "hnseg_keras_version": __version__,
        "tensorflow_version": tf.__version__, "keras_version": keras.__version__,
        "source_run": run_dir.resolve().name, "which": which,
        "model_file": MODEL_FILE, "saved_model": SAVED_MODEL_DIR,
        "signatures": {"serving_default": "float32", **dict(SLICE_SIGNATURES + VOLUME_SIGNATURES)},
        "output": {"name": "probabilities", "activation": "sigmoid", "threshold": THRESHOLD},
    }


def serving_description(metadata: dict) -> dict:
    """metadata.json's ``serving``: signature shapes (-1 = any) and what a client does around ``segment_volume``.

    The model only knows one orientation and one in-plane spacing, so a client without hnseg-keras
    must bring each CT there first and the labels back afterwards; this section says how, with the
    same rule as ``Predictor.slicing_for``. z is never resampled: there is one output per CT slice.
    """
    geometry = metadata["input"]
    height, width, channels = geometry["height"], geometry["width"], geometry["channels"]
    organs = len(metadata["organs"])
    signatures = {name: {"inputs": {"ct": {"dtype": dtype, "shape": [-1, height, width, channels]}},
                         "outputs": {"probabilities": {"dtype": "float32", "shape": [-1, height, width, organs]}}}
                  for name, dtype in SLICE_SIGNATURES}
    volume_outputs = {"labels": {"dtype": "uint8", "shape": [-1, -1, -1]},
                      "probabilities": {"dtype": "float32", "shape": [-1, -1, -1, organs]}}
    signatures.update({name: {"inputs": {"ct": {"dtype": dtype, "shape": [-1, -1, -1]}}, "outputs": volume_outputs}
                       for name, dtype in VOLUME_SIGNATURES})
    training = metadata.get("training_geometry") or {}
    return {
        "signatures": signatures,
        "axes": ["z", "y", "x"],
        "orientation": training.get("orientation") or orientation.CANONICAL,
        "spacing": _spacing_rule(metadata["slicing"].get("spacing_mm"), training.get("native_spacing_mm")),
        "resample": {"ct": "linear", "ct_fill_hu": AIR_HU, "labels_back": "nearest"},
        "threshold": THRESHOLD,
        "pad_hu": geometry["pad_hu"],
        "size_multiple": geometry["size_multiple"],
        "chunk_slices": SEGMENT_CHUNK,
    }


def _spacing_rule(fixed: float | None, native: dict | None) -> dict:
    """The in-plane spacing a CT must have for the model (``Predictor.slicing_for``, written out for clients)."""
    if fixed is not None:
        return {"mode": "fixed", "in_plane_mm": fixed, "tolerance": SPACING_SLACK,
                "rule": "resample x and y to in_plane_mm unless both lie within tolerance (relative) of it"}
    if not native:
        return {"mode": "unknown", "rule": "trained on each CT's own spacing, not recorded: keep the CT's spacing"}
    return {"mode": "native", "median_mm": native["median"], "min_mm": native["min"], "max_mm": native["max"],
            "tolerance": SPACING_SLACK,
            "rule": "keep a CT whose x and y spacing lie within min_mm * (1 - tolerance) .. max_mm * (1 + "
                    "tolerance); resample any other to median_mm"}


def write_saved_model(model, path: Path, geometry: dict, labels: Sequence[int]) -> None:
    """Write the SavedModel: slice signatures (float32 default, int16) and whole-volume ones (float32, int16).

    ``labels``: the catalogue label value of each output channel (``segment_volume``'s label map).
    """
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

    segment_volume = _volume_segmenter(model, geometry["size_multiple"], channels // 2, labels)
    archive = keras.export.ExportArchive()
    archive.track(model)
    for (name, dtype), fn in zip(SLICE_SIGNATURES, (serve, serve_int16), strict=True):
        spec = tf.TensorSpec([None, height, width, channels], dtype, name="ct")
        archive.add_endpoint(name, fn, input_signature=[spec])
    for name, dtype in VOLUME_SIGNATURES:
        archive.add_endpoint(name, segment_volume, input_signature=[tf.TensorSpec([None, None, None], dtype, name="ct")])
    archive.write_out(str(path), verbose=False)


def _volume_segmenter(model, multiple: int, neighbours: int, labels: Sequence[int]):
    """ct HU [D, H, W] -> {labels uint8 [D, H, W], probabilities [D, H, W, O]}, every step in the graph.

    The steps of ``hnseg predict`` on whole slices: air padding (centred) to the size multiple,
    2k+1 neighbours clamped at the volume ends (``slicing.extract_slices``), SEGMENT_CHUNK slices
    per model call in a ``tf.while_loop``, then ``Segmentation.label_map``: voxels at or above the
    threshold, the most probable organ where several are.
    """
    import tensorflow as tf

    values = tf.constant(list(labels), tf.uint8)
    offsets = tf.range(-neighbours, neighbours + 1)
    organs = len(labels)

    def segment_volume(ct):
        ct = tf.cast(ct, tf.float32)
        depth, height, width = tf.unstack(tf.shape(ct))
        tf.debugging.assert_positive(depth, message="segment_volume: ct [D, H, W] needs at least one slice (D >= 1)")
        pad_h, pad_w = -height % multiple, -width % multiple  # floor modulo: 0 .. multiple - 1
        top, left = pad_h // 2, pad_w // 2
        padded = tf.pad(ct, [[0, 0], [top, pad_h - top], [left, pad_w - left]], constant_values=float(AIR_HU))

        def body(chunk, out):
            centre = tf.range(chunk * SEGMENT_CHUNK, tf.minimum((chunk + 1) * SEGMENT_CHUNK, depth))
            index = tf.clip_by_value(centre[:, None] + offsets[None, :], 0, depth - 1)
            x = tf.transpose(tf.gather(padded, index), [0, 2, 3, 1])  # [n, H', W', 2k+1]
            y = model(x, training=False)[:, top:top + height, left:left + width]
            return chunk + 1, out.write(chunk, y)

        chunks = (depth + SEGMENT_CHUNK - 1) // SEGMENT_CHUNK
        out = tf.TensorArray(tf.float32, size=chunks, infer_shape=False, element_shape=[None, None, None, organs])
        _, out = tf.while_loop(lambda chunk, _: chunk < chunks, body, (tf.constant(0), out), parallel_iterations=1)
        probabilities = out.concat()
        above = tf.reduce_any(probabilities >= THRESHOLD, axis=-1)
        winner = tf.gather(values, tf.argmax(probabilities, axis=-1))
        return {"labels": tf.where(above, winner, tf.zeros([], tf.uint8)), "probabilities": probabilities}

    return segment_volume


def _self_check(model, loaded, path: Path, geometry: dict) -> float:
    """Max |SavedModel - Keras| on random HU slices (both signatures); raises above SELF_CHECK_ATOL.

    ``loaded``: the SavedModel at ``path``, loaded once for both self-checks.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shape = (2, geometry["height"], geometry["width"], geometry["channels"])
    hu = rng.integers(-1024, 1500, size=shape).astype(np.int16)
    (top, bottom), (left, right) = geometry["padding"]
    padded = np.pad(hu.astype(np.float32), [(0, 0), (top, bottom), (left, right), (0, 0)], constant_values=AIR_HU)
    expected = np.asarray(model.predict_on_batch(padded))[:, top:top + shape[1], left:left + shape[2]]
    worst = 0.0
    for name, array in (("serving_default", hu.astype(np.float32)), ("serve_int16", hu)):
        got = loaded.signatures[name](ct=tf.constant(array))["probabilities"].numpy()
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > SELF_CHECK_ATOL:
        raise HnsegError(f"{path}: SavedModel differs from the Keras model by {worst:.2e} "
                         f"(> {SELF_CHECK_ATOL}); report this with the run folder")
    return worst


def _segment_volume_self_check(model, loaded, path: Path, metadata: dict) -> float:
    """Max |segment_volume - Keras slice by slice| on a random HU volume (both dtypes); raises above SELF_CHECK_ATOL.

    The volume has odd H and W (padded and cropped back) and SEGMENT_CHUNK + 2 slices (a partial
    last chunk, clamped neighbours at both ends). The labels must be ``Segmentation.label_map`` of
    the signature's own probabilities.
    """
    import tensorflow as tf

    multiple, channels = metadata["input"]["size_multiple"], metadata["input"]["channels"]
    depth, height, width = SEGMENT_CHUNK + 2, multiple + 3, 2 * multiple + 1  # odd for any multiple >= 2
    hu = np.random.default_rng(1).integers(-1024, 1500, size=(depth, height, width)).astype(np.int16)
    neighbours = channels // 2
    index = np.clip(np.arange(depth)[:, None] + np.arange(-neighbours, neighbours + 1)[None, :], 0, depth - 1)
    (top, bottom), (left, right) = padding_for(height, multiple), padding_for(width, multiple)
    slices = np.pad(np.moveaxis(hu[index], 1, -1).astype(np.float32), [(0, 0), (top, bottom), (left, right), (0, 0)],
                    constant_values=AIR_HU)
    expected = np.asarray(model.predict_on_batch(slices))[:, top:top + height, left:left + width]
    organs, catalogue = tuple(metadata["organs"]), catalogue_from(metadata.get("organ_definitions"))
    worst = 0.0
    for (name, _), array in zip(VOLUME_SIGNATURES, (hu.astype(np.float32), hu), strict=True):
        out = {key: value.numpy() for key, value in loaded.signatures[name](ct=tf.constant(array)).items()}
        worst = max(worst, float(np.abs(out["probabilities"] - expected).max()))
        probabilities = out["probabilities"]
        labels = Segmentation("self-check", organs, np.moveaxis(probabilities >= THRESHOLD, -1, 0),
                              probabilities.argmax(axis=-1).astype(np.uint8), 0.0, depth, catalogue).label_map()
        if out["labels"].dtype != np.uint8 or not np.array_equal(out["labels"], labels):
            raise HnsegError(f"{path}: {name} labels differ from the label map of its probabilities; "
                             "report this with the run folder")
    if worst > SELF_CHECK_ATOL:
        raise HnsegError(f"{path}: segment_volume differs from the Keras model by {worst:.2e} "
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
          f"self-check max |diff| {metadata['self_check_max_abs_diff']:.1e}; segment_volume [D, H, W] HU, "
          f"self-check max |diff| {metadata['segment_volume_self_check_max_abs_diff']:.1e}", file=sys.stderr)
    return 0
