"""Model files and the metadata beside them: the one place export and prediction load and describe models.

A training run describes itself: ``data.json`` (written at training start) holds the organs, their
definitions, the slicing, the image shape and the normalisation of its data, so nothing downstream
opens the shard manifest again. An export folder carries the same facts in ``metadata.json``.
Neither file holds absolute paths: folders move between machines.
"""

from __future__ import annotations

import os
from pathlib import Path

from hnseg_keras import configs
from hnseg_keras.data.organs import catalogue_from, label_value, resolve_organs
from hnseg_keras.data.slicing import AIR_HU, SlicingConfig
from hnseg_keras.errors import HnsegError

DATA_FILE = "data.json"
METADATA_FILE = "metadata.json"
MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
METADATA_FORMAT = "hnseg-keras-export"
DATA_KEYS = ("organs", "organ_definitions", "slicing", "image_shape", "normalisation", "manifest", "manifest_sha256")


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


def data_description(organs, slicing, image_shape, normalisation: dict, manifest: str | None,
                     manifest_sha256: str | None, organ_definitions: dict | None = None,
                     training_geometry: dict | None = None) -> dict:
    """The content of a run's ``data.json``; ``manifest`` is the data folder's name, never a path.

    ``organ_definitions`` is copied through as the manifest holds it (None when it has none).
    ``training_geometry`` (``Manifest.training_geometry``: orientation, fixed or native in-plane
    spacing, organ volume ranges) lets prediction bring each CT to the grid the model learned on.
    """
    if isinstance(slicing, SlicingConfig):
        slicing = configs.to_dict(slicing)
    if manifest is not None and (os.sep in str(manifest) or "/" in str(manifest)):
        raise ValueError(f"data.json names the data folder, not a path: {manifest!r}")
    return {"organs": list(organs), "organ_definitions": organ_definitions, "slicing": dict(slicing),
            "image_shape": [int(v) for v in image_shape],
            "normalisation": {key: normalisation[key] for key in ("window", "hu_mean", "hu_std")},
            "manifest": manifest, "manifest_sha256": manifest_sha256, "training_geometry": training_geometry}


def read_data_description(run_dir: str | os.PathLike) -> dict:
    """``data.json`` of a run folder, checked for the keys downstream stages read."""
    path = Path(run_dir) / DATA_FILE
    if not path.is_file():
        raise HnsegError(f"{path}: missing; is {run_dir} a folder `hnseg train` wrote? (runs from before data.json "
                         "need retraining)")
    data = configs.read_json(path)
    missing = [key for key in DATA_KEYS if not isinstance(data, dict) or key not in data]
    if missing:
        raise HnsegError(f"{path}: lacks {', '.join(missing)}; it was not written by `hnseg train`")
    return data


def model_metadata(data: dict, model_config: dict | None) -> dict:
    """The metadata prediction needs beside a model, from a run's data description (``data.json``)."""
    catalogue = catalogue_from(data.get("organ_definitions"))  # the user's own organs too
    organs = list(resolve_organs(data["organs"], catalogue))
    height, width, channels = data["image_shape"]
    return {
        "organs": organs,
        "labels": {name: label_value(name, catalogue) for name in organs},
        "organ_definitions": data.get("organ_definitions"),
        "slicing": configs.to_dict(configs.from_dict(SlicingConfig, data["slicing"])),
        "input": {"name": "ct", "height": height, "width": width, "channels": channels,
                  "dtypes": ["float32", "int16"], "units": "HU", "pad_hu": AIR_HU},
        "manifest": data.get("manifest"),
        "manifest_sha256": data.get("manifest_sha256"),
        "training_geometry": data.get("training_geometry"),  # None: a model from before it was recorded
        "model_config": model_config,
    }


def run_metadata(run_dir: str | os.PathLike) -> dict:
    """Model metadata of a training run folder, from its ``data.json`` and ``config.json`` alone."""
    run_dir = Path(run_dir)
    config = configs.read_json(run_dir / "config.json")
    model_config = config.get("model") if isinstance(config, dict) else None
    return model_metadata(read_data_description(run_dir), model_config)


def read_metadata(folder: str | os.PathLike) -> dict:
    """metadata.json of an export folder, checked for the fields prediction needs."""
    path = Path(folder) / METADATA_FILE
    data = configs.read_json(path)
    missing = [key for key in ("organs", "slicing", "input") if not isinstance(data, dict) or key not in data]
    if missing or data.get("format") != METADATA_FORMAT:
        raise HnsegError(f"{path}: not an hnseg-keras export (missing {missing or ['format']}); "
                         "re-export with `hnseg export RUN --out DIR`")
    return data
