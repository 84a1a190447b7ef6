"""``TrainConfig``: everything a training run depends on, its S/M/L presets and how a config is resolved.

A config is resolved in layers: variant preset <- a partial JSON file (or its dict) <- ``key=value``
overrides (:func:`load_config`). ``TrainConfig()`` is the S preset, so a config that names no variant
and the dataclass's own defaults agree.

The HU window has one home, ``augment.window``: the input pipeline clips the images to it and the
model's first layer is built with it (``trainer.build_compiled_model``). Config files written before
it moved also carry ``model.window``; :func:`single_window` accepts them when the two are equal
(``model.window`` is ignored, with one warning per file) and refuses them when they differ.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import portable_path
from hnseg_keras.inputs.augment import AugmentConfig
from hnseg_keras.inputs.batching import PipelineConfig
from hnseg_keras.model.losses import DICE_OVER
from hnseg_keras.model.unet import UNetConfig, variant_config

log = logging.getLogger(__name__)

VARIANT_NAMES = ("S", "M", "L")
LR_SCHEDULES = ("plateau", "cosine")


@dataclass(frozen=True)
class LossConfig:
    """Weights of ``losses.SegmentationLoss``: focal + Dice (+ boundary, optionally ramped over epochs).

    ``dice_over``: ``"slice"`` (one soft Dice per slice and organ), ``"batch"`` (one per organ over
    the batch; needed when organs are absent from most slices, see ``losses.batch_dice_terms``) or
    ``"batch_present"`` (the same, but an organ absent from the whole batch adds no Dice term).
    """

    focal_weight: float = 1.0
    dice_weight: float = 1.0
    boundary_weight: float = 0.0
    boundary_ramp_epochs: int = 0
    dice_over: str = "slice"

    def __post_init__(self):
        if self.dice_over not in DICE_OVER:
            raise HnsegError(f"train config: loss.dice_over={self.dice_over!r} is unknown; choose one of "
                             f"{', '.join(DICE_OVER)}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; ``config.json`` of a run folder is this, resolved.

    The defaults are the S preset (the CPU demo: small U-Net, small crops, few epochs).

    Attributes:
        variant: model preset name (S, M, L) the config started from.
        model: U-Net architecture; ``num_organs``, ``input_channels``, ``hu_mean`` and ``hu_std`` are
            set from the data at train time.
        augment, pipeline: training input (the HU window of both the input and the model, crop,
            warps, mixup; tf.data settings).
        loss: loss weights.
        epochs, learning_rate: Adam and the schedule (the batch size is ``pipeline.batch_size``,
            the global batch under a distribution strategy).
        lr_schedule: ``"plateau"`` (the paper's ReduceLROnPlateau on ``val_dice``: ``lr_factor`` after
            ``lr_patience`` epochs without gain) or ``"cosine"`` (half-cosine from ``learning_rate`` to
            1 % of it over the run: over ``max_train_minutes`` of wall time when set, else over
            ``epochs``; a fixed budget is best spent ending at a small step, and the final model is
            then the one to keep without choosing an epoch on validation data).
        lr_factor, lr_patience: the plateau schedule's settings.
        ema_momentum: keep an exponential moving average of the weights (Adam's ``use_ema``) with this
            momentum per step, validate and checkpoint it, and end with it in ``final.keras``; it
            smooths out the swing of the last steps of a short run. None: plain weights.
        max_train_minutes: wall-time budget counted from the start of ``train`` (earlier sessions of a
            resumed run count with their epoch times); training stops after the epoch that would
            otherwise end past it. None: ``epochs`` alone decides.
        data: manifest.json (or its folder) of prepared shards, or an ``hnseg arrays`` .npz file
            (None: the command line prepares the built-in phantom and fills this in).
        out: run folder; None gives ``runs/<data name>-<variant>``.
        seed: weight initialisation seed (``pipeline.seed`` drives data order and augmentation).
        mixed_precision: train with the ``mixed_float16`` policy (GPU; float32 output layer).
        deterministic: TensorFlow's op determinism (``enable_op_determinism``), for bit-for-bit repeats on
            one machine where an op would otherwise pick a thread-order-dependent kernel (GPUs); slower.
        steps_per_epoch: training batches per epoch; None = train slices // pipeline.batch_size.
        validation_steps: validation batches per epoch; None = the whole validation split.
        image_slices: validation slices drawn with contours into TensorBoard each epoch.
    """

    variant: str = "S"
    model: UNetConfig = field(default_factory=lambda: variant_config("S"))
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_size=64, mixup=False))
    pipeline: PipelineConfig = field(default_factory=lambda: PipelineConfig(
        batch_size=8, shuffle_buffer=256, cache="memory", rare_organ_repeats=4))
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 30
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
    lr_factor: float = 0.5
    lr_patience: int = 10
    ema_momentum: float | None = 0.99
    max_train_minutes: float | None = None
    data: str | None = None
    out: str | None = None
    seed: int = 0
    mixed_precision: bool = False
    deterministic: bool = False
    steps_per_epoch: int | None = None
    validation_steps: int | None = None
    image_slices: int = 4

    def __post_init__(self):
        if str(self.variant).upper() not in VARIANT_NAMES:
            raise HnsegError(f"variant {self.variant!r} is unknown; choose one of {', '.join(VARIANT_NAMES)}")
        for name in ("epochs", "lr_patience", "steps_per_epoch", "validation_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise HnsegError(f"train config: {name}={value!r} must be a positive integer")
        if not isinstance(self.learning_rate, int | float) or not self.learning_rate > 0:
            raise HnsegError(f"train config: learning_rate={self.learning_rate!r} must be a positive number")
        if not 0 < self.lr_factor < 1:
            raise HnsegError(f"train config: lr_factor={self.lr_factor!r} must be in (0, 1)")
        ema = self.ema_momentum
        if ema is not None and (isinstance(ema, bool) or not isinstance(ema, int | float) or not 0 < ema < 1):
            raise HnsegError(f"train config: ema_momentum={ema!r} must be in (0, 1) or null (e.g. 0.99)")
        if self.lr_schedule not in LR_SCHEDULES:
            raise HnsegError(f"train config: lr_schedule={self.lr_schedule!r} is unknown; "
                             f"choose one of {', '.join(LR_SCHEDULES)}")
        minutes = self.max_train_minutes
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, int | float)
                                    or not minutes > 0):
            raise HnsegError(f"train config: max_train_minutes={minutes!r} must be a positive number or null")


def preset(variant: str) -> TrainConfig:
    """The paper's L (focal + Dice, no mixup) and M (focal + Dice + boundary, weighted mixup), and S.

    L and M train 200 epochs on 280 -> 256 px slices with the plateau schedule as in the paper; S is
    the CPU demo, ``TrainConfig()`` itself.
    """
    key = str(variant).strip().upper()
    if key not in VARIANT_NAMES:
        raise HnsegError(f"--variant {variant!r} is unknown; choose one of {', '.join(VARIANT_NAMES)}")
    if key == "S":
        return TrainConfig()
    paper = {"epochs": 200, "lr_schedule": "plateau", "ema_momentum": None, "pipeline": PipelineConfig()}
    if key == "L":
        return TrainConfig(variant="L", model=variant_config("L"), augment=AugmentConfig(mixup=False),
                           loss=LossConfig(1.0, 1.0, 0.0, 0), **paper)
    return TrainConfig(variant="M", model=variant_config("M"), augment=AugmentConfig(mixup=True),
                       loss=LossConfig(1.0, 1.0, 0.01, 20), **paper)


def load_config(variant: str | None = None, config: str | os.PathLike | dict | None = None,
                overrides: list[str] | tuple[str, ...] = (), where: str | None = None) -> TrainConfig:
    """Resolve a TrainConfig: variant preset <- config (a partial JSON file, or its dict read already,
    named ``where`` in errors) <- ``key=value`` overrides. The variant is ``variant`` if given, else
    the config's ``"variant"``, else S."""
    data, where = (config, where) if isinstance(config, dict) else ({}, config)
    if config is not None and not isinstance(config, dict):
        data = configs.read_json(config)
        if not isinstance(data, dict):
            raise HnsegError(f"{config}: a train config must be a JSON object, e.g. {{\"epochs\": 10}}")
    base = configs.to_dict(preset(variant or data.get("variant") or "S"))
    data = single_window(data, str(where) if where is not None else "train config", base["augment"]["window"])
    merged = _merge(base, {**data, "variant": base["variant"]}, str(where))
    try:
        return configs.replace_from_overrides(configs.from_dict(TrainConfig, merged), list(overrides))
    except HnsegError as error:
        prefix = f"{where}: " if where is not None and not overrides else ""
        raise HnsegError(f"{prefix}{error}") from None
    except (TypeError, ValueError) as error:
        raise HnsegError(f"{where or 'overrides'}: invalid train config ({error})") from None


def _merge(base: dict, update: dict, where: str, prefix: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; unknown keys raise HnsegError."""
    merged = dict(base)
    for key, value in update.items():
        if key not in base:
            raise HnsegError(f"{where}: unknown key {prefix + key!r}; accepted: {sorted(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict):
            merged[key] = _merge(base[key], value, where, f"{prefix}{key}.")
        else:
            merged[key] = value
    return merged


_warned_files: set[str] = set()


def single_window(data: dict, where: str, default_window=None) -> dict:
    """``data`` (a train config as JSON) without the ``model.window`` of older files.

    Older files wrote the HU window twice, as ``model.window`` and ``augment.window``. Equal, the first is
    dropped with a warning (once per file); different, the file is refused. ``default_window`` stands in
    for an ``augment.window`` the file leaves to its preset.
    """
    model = data.get("model")
    if not isinstance(model, dict) or "window" not in model:
        return data
    model = dict(model)
    legacy = model.pop("window")
    augment = data.get("augment")
    window = augment["window"] if isinstance(augment, dict) and "window" in augment else default_window
    if _as_window(legacy) != _as_window(window):
        raise HnsegError(f"{where}: model.window={legacy} differs from augment.window={window}; the HU "
                         "window is augment.window alone now: set it there and delete model.window")
    if where not in _warned_files:
        _warned_files.add(where)
        log.warning("%s: model.window is ignored (the HU window is augment.window alone now, equal here); "
                    "delete model.window", where)
    return {**data, "model": model}


def _as_window(value):
    """A window as a comparable value: (low, high) floats, None, or ``value`` itself when malformed."""
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int | float) for v in value):
        return float(value[0]), float(value[1])
    return value


def read_stored(path: str | os.PathLike) -> TrainConfig:
    """A run folder's ``config.json`` as a TrainConfig (an older run's too: see :func:`single_window`)."""
    data = configs.read_json(path)
    if not isinstance(data, dict):
        raise HnsegError(f"{path}: a train config must be a JSON object; is this a run folder's config.json?")
    return configs.from_dict(TrainConfig, single_window(data, str(path)))


def stored_config(config: TrainConfig) -> dict:
    """``config`` as ``config.json`` holds it: ``data`` and ``out`` without the machine's folders
    (:func:`files.portable_path`); a run given an absolute ``--data`` needs ``--data`` again to be rerun."""
    return configs.to_dict(dataclasses.replace(config, data=portable_path(config.data, 2),
                                               out=portable_path(config.out)))
