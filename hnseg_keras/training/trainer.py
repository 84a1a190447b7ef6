"""``hnseg train``: fit the residual U-Net on prepared data (shards or an arrays file) into a run folder.

Run folder::

    config.json        the resolved TrainConfig (model normalisation filled in from the data)
    data.json          organs, organ definitions, slicing, image shape, normalisation, data folder name
    history.csv        one row per epoch (CSVLogger; ``epoch`` is 0-based), resumed runs append
    best.keras         model of the best ``val_dice`` so far
    final.keras        model after the last epoch (interrupted.keras after Ctrl-C)
    summary.json       status, epochs run, best val_dice overall and per organ, training time
    logs/              TensorBoard: train/ and validation/ scalars, images/ with contour overlays
    backup/            BackupAndRestore state while a run is unfinished (removed when it finishes)

A killed run resumes where it stopped when the same command is run again; a folder holding a
different configuration is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras

from hnseg_keras import configs
from hnseg_keras.data.splits import TRAIN, VALIDATION
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import FolderLock, portable_path
from hnseg_keras.inference import model_io
from hnseg_keras.inputs.augment import HU_RANGE, AugmentConfig, check_crop
from hnseg_keras.inputs.batching import PipelineConfig
from hnseg_keras.inputs.train_step import augment_in_train_step, augmenter
from hnseg_keras.model.losses import BoundaryRamp, SegmentationLoss
from hnseg_keras.model.metrics import dice_metrics
from hnseg_keras.model.unet import UNetConfig, build_unet, variant_config
from hnseg_keras.training import callbacks as cb
from hnseg_keras.training import curves, distributed, resume
from hnseg_keras.training.sources import open_data

VARIANT_NAMES = ("S", "M", "L")


@dataclass(frozen=True)
class LossConfig:
    """Weights of ``losses.SegmentationLoss``: focal + Dice (+ boundary, optionally ramped over epochs)."""

    focal_weight: float = 1.0
    dice_weight: float = 1.0
    boundary_weight: float = 0.0
    boundary_ramp_epochs: int = 0


LR_SCHEDULES = ("plateau", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; ``config.json`` of a run folder is this, resolved.

    Attributes:
        variant: model preset name (S, M, L) the config started from.
        model: U-Net architecture; ``num_organs``, ``input_channels``, ``hu_mean`` and ``hu_std`` are
            set from the data at train time.
        augment, pipeline: training input (window, crop, warps, mixup; tf.data settings).
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
    variant: str = "M"
    model: UNetConfig = field(default_factory=lambda: variant_config("M"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    epochs: int = 200
    learning_rate: float = 1e-3
    lr_schedule: str = "plateau"
    lr_factor: float = 0.5
    lr_patience: int = 10
    ema_momentum: float | None = None
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


# ----------------------------------------------------------------------------- presets and loading


def preset(variant: str) -> TrainConfig:
    """The paper's L (focal + Dice, no mixup) and M (focal + Dice + boundary, weighted mixup), and S.

    L and M train 200 epochs on 280 -> 256 px slices as in the paper; S is the CPU demo (small
    U-Net, small phantom slices, few epochs).
    """
    key = str(variant).strip().upper()
    if key not in VARIANT_NAMES:
        raise HnsegError(f"--variant {variant!r} is unknown; choose one of {', '.join(VARIANT_NAMES)}")
    if key == "L":
        return TrainConfig(variant="L", model=variant_config("L"), augment=AugmentConfig(mixup=False),
                           loss=LossConfig(1.0, 1.0, 0.0, 0))
    if key == "M":
        return TrainConfig(variant="M", model=variant_config("M"), augment=AugmentConfig(mixup=True),
                           loss=LossConfig(1.0, 1.0, 0.01, 20))
    return TrainConfig(variant="S", model=variant_config("S"), augment=AugmentConfig(crop_size=64, mixup=False),
                       loss=LossConfig(1.0, 1.0, 0.0, 0), epochs=30, lr_schedule="cosine", ema_momentum=0.99,
                       pipeline=PipelineConfig(batch_size=8, shuffle_buffer=256, cache="memory",
                                               rare_organ_repeats=4))


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


# ----------------------------------------------------------------------------- data


def resolve_for_data(config: TrainConfig, data) -> TrainConfig:
    """Fill the model's organ count, input channels and HU statistics from ``data`` (a ``sources`` object);
    check that window, crop, batch and schedule fit it."""
    if not data.slices(VALIDATION) and config.lr_schedule == "plateau":
        raise HnsegError(f"{data.path}: holds no validation split, which the plateau schedule watches; pass "
                         "--set lr_schedule=cosine")
    if config.model.window != config.augment.window:
        raise HnsegError(f"model.window={config.model.window} differs from augment.window="
                         f"{config.augment.window}; set both to the same HU window")
    size = check_crop(config.augment.crop_size, data.image_shape[:2])[0]
    if size % config.model.size_multiple:
        raise HnsegError(f"augment.crop_size={config.augment.crop_size}: the training slices must be a multiple of "
                         f"{config.model.size_multiple} px for this U-Net; choose such a crop_size")
    batch = config.pipeline.batch_size
    if data.slices(TRAIN) < batch:
        raise HnsegError(f"{data.path}: {data.slices(TRAIN)} train slices are fewer than the batch size {batch}; "
                         "lower --batch-size")
    mean, std = data.hu_stats(config.model.window)
    model = dataclasses.replace(
        config.model, num_organs=len(data.organs), input_channels=int(data.image_shape[-1]),
        hu_mean=config.model.hu_mean if config.model.hu_mean is not None else round(float(mean), 4),
        hu_std=config.model.hu_std if config.model.hu_std is not None else round(float(std), 4),
    )
    return dataclasses.replace(config, model=model, data=str(data.path))


def describe_data(config: TrainConfig, data) -> dict:
    """The run's ``data.json``: what export and prediction need to know about the training data."""
    model = config.model
    normalisation = {"window": list(model.window) if model.window else None, "hu_mean": model.hu_mean,
                     "hu_std": model.hu_std}
    return model_io.data_description(data.organs, data.slicing, data.image_shape, normalisation, data.name,
                                     data.sha256, data.organ_definitions, data.training_geometry)


def default_out(config: TrainConfig) -> Path:
    """``runs/<data folder name>-<variant>`` (``runs/<npz name>-<variant>`` for arrays)."""
    path = Path(config.data).resolve()
    name = path.stem if path.suffix == ".npz" else path.name if path.is_dir() else path.parent.name
    return Path("runs") / f"{name}-{config.variant}"


# ----------------------------------------------------------------------------- training


def train(config: TrainConfig, callbacks: list | None = None) -> Path:
    """Train a U-Net as ``config`` says and return its run folder.

    Resumes an unfinished run of the same config in the same folder and returns at once for a
    finished one. ``callbacks`` are appended after the built-in ones (after the epoch backup).
    Ctrl-C saves ``interrupted.keras`` and the summary, then re-raises KeyboardInterrupt.
    """
    started = time.monotonic()
    data = open_data(config.data)
    # First: multi-worker collectives must be set up before any TensorFlow op.
    strategy = distributed.strategy_from_environment() if data.needs_tensorflow else None
    multi_worker = distributed.is_multi_worker(strategy)
    if multi_worker and config.max_train_minutes is not None:
        # Each worker would read its own clock and could stop (or set its learning rate) alone.
        raise HnsegError("max_train_minutes needs a single worker; with several (TF_CONFIG) cap --epochs instead")
    out = Path(config.out) if config.out else default_out(config)
    data.verify()  # size + sha256 of the shards, before anything is written
    config = dataclasses.replace(resolve_for_data(config, data), out=str(out))
    chief, task = distributed.worker_identity(strategy)
    # Every worker runs the same saving code (reading variables may need all of them); only the chief's
    # files land in the run folder, the others write to a sibling scratch folder removed at the end
    # (kept after a kill, so each worker resumes from its own backup).
    run = out if chief else out.with_name(f".{out.name}.worker-{task}")
    resolved = stored_config(config)
    state = cb.check_run_folder(run, resolved)
    if chief:
        print(json.dumps(resolved, indent=2), flush=True)
    if state == "finished":
        print(f"{run}: this configuration already finished training there (summary.json); "
              "use another --out to train again", file=sys.stderr)
        return run
    with FolderLock(run, "hnseg train"):  # one writer per run folder
        write_run_files(run, resolved, describe_data(config, data))
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:
            _enable_op_determinism()
        batches = data.batches(config, multi_worker)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = build_compiled_model(config, list(data.organs))
        fit_run(config, model, run, data, list(callbacks or []), batches=batches, started=started,
                strategy=strategy, chief=chief)
    if not chief:
        shutil.rmtree(run, ignore_errors=True)
    return run


def stored_config(config: TrainConfig) -> dict:
    """``config`` as ``config.json`` holds it: ``data`` and ``out`` without the machine's folders
    (:func:`files.portable_path`); a run given an absolute ``--data`` needs ``--data`` again to be rerun."""
    return configs.to_dict(dataclasses.replace(config, data=portable_path(config.data, 2),
                                               out=portable_path(config.out)))


def write_run_files(run: Path, resolved: dict, description: dict) -> None:
    """``config.json`` and ``data.json``: the run folder describes itself from its first epoch on."""
    run.mkdir(parents=True, exist_ok=True)
    configs.write_json_atomic(run / "config.json", resolved)
    configs.write_json_atomic(run / model_io.DATA_FILE, description)


def fit_run(config: TrainConfig, model, run: Path, data, extra_callbacks: list = (), initial_epoch: int = 0, *,
            batches=None, started: float | None = None, strategy=None, chief: bool = True) -> None:
    """The one training loop (``hnseg train``, every ``hnseg tune`` trial, shards or arrays).

    Fits the compiled ``model`` on ``data``'s batches (``batches`` if already made) into ``run``:
    device augmentation when asked for, the run's callbacks, then ``BackupAndRestore`` (resumes from
    ``run/backup``), then ``extra_callbacks``; writes ``final.keras`` and ``summary.json``.
    ``started`` (monotonic) starts the wall-time budget's clock.
    """
    multi_worker = distributed.is_multi_worker(strategy)
    organs = list(data.organs)
    train_ds, val_ds, steps, val_steps, example = batches or data.batches(config, multi_worker)
    augment = augmenter(config.augment, data.organ_weights()) if data.augments_on_device(config) else None
    if augment is not None:
        augment_in_train_step(model, augment, example=example)
    resume.repair_backup(run / "backup")  # a damaged newest backup: the previous one, or epoch 0 (said on stderr)
    resumed = cb.backup_epoch(run / "backup")
    first = max(initial_epoch, resumed)
    if resumed:
        print(f"resuming {run} after epoch {resumed} of {config.epochs}", file=sys.stderr)
    spent_before = sum(row.get("epoch_time_s", 0.0) for row in cb.read_history(run / "history.csv")
                       if row.get("epoch", math.inf) < first)
    callbacks = [*make_callbacks(config, run, model.loss, val_ds, organs, first, cb.TrainingClock(spent_before, started)),
                 keras.callbacks.BackupAndRestore(str(run / "backup"), double_checkpoint=True), *extra_callbacks]
    verbose = (1 if sys.stdout.isatty() else 2) if chief else 0
    start = time.perf_counter()
    summary = {"organs": organs, "data": portable_path(data.path, 2), "initial_epoch": first, "resumed_from_epoch": resumed,
               "backend": keras.backend.backend()}
    fixes = distributed.multi_worker_fit_fixes(model, strategy, augment) if multi_worker else contextlib.nullcontext()
    try:
        with fixes:
            model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=steps, validation_steps=val_steps, callbacks=callbacks, verbose=verbose,
                      shuffle=False)
    except KeyboardInterrupt:
        cb.save_model_atomic(model, run / "interrupted.keras")
        cb.write_summary(run, config.epochs, "interrupted", time.perf_counter() - start, summary)
        print(f"\ninterrupted: saved {run / 'interrupted.keras'}; run the same command again to resume "
              "from the last finished epoch", file=sys.stderr)
        raise
    cb.save_model_atomic(model, run / "final.keras")
    budget = next((c for c in callbacks if isinstance(c, cb.WallTimeBudget)), None)
    summary["stopped_by_budget"] = budget is not None and budget.stopped_epoch is not None
    cb.write_summary(run, config.epochs, "finished", time.perf_counter() - start, summary)


def build_compiled_model(config: TrainConfig, organs: list[str]):
    """The U-Net compiled with Adam, the masked SegmentationLoss and the Dice metrics.

    ``config`` must be resolved for the data (``resolve_for_data``); call inside a strategy scope.
    """
    policy = keras.mixed_precision.global_policy()
    try:
        if config.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        model = build_unet(config.model)
        loss = SegmentationLoss(config.model.num_organs, **dataclasses.asdict(config.loss))
        ema = config.ema_momentum
        optimizer = keras.optimizers.Adam(config.learning_rate, use_ema=ema is not None, ema_momentum=ema or 0.99)
        model.compile(optimizer=optimizer, loss=loss, metrics=dice_metrics(organs))
        # Built here, its variables need not be created while the first train step is traced, which
        # would trace that step twice (~10 s for S on a 2-core CPU; same numbers).
        model.optimizer.build(model.trainable_variables)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return model


def make_callbacks(config: TrainConfig, run: Path, loss, val_ds, organs, initial_epoch: int,
                   clock: cb.TrainingClock | None = None) -> list:
    """The run's callbacks in order (log-writing ones after those that add log keys).

    ``clock`` times the wall-time budget and the wall-time cosine schedule (default: starts now).
    Without validation data (arrays) there is no best checkpoint and no validation images; without
    TensorFlow no TensorBoard logs.
    """
    clock = clock or cb.TrainingClock()
    cb.trim_history(run / "history.csv", initial_epoch)
    history = cb.read_history(run / "history.csv")
    best = cb.best_row(history)
    budget = None if config.max_train_minutes is None else 60.0 * config.max_train_minutes
    if config.lr_schedule == "cosine":
        schedule = cb.CosineSchedule(config.learning_rate, config.epochs, budget, clock)
    else:
        schedule = cb.ResumableReduceLROnPlateau(history, monitor="val_dice", mode="max", factor=config.lr_factor,
                                                 patience=config.lr_patience, verbose=1)
    averaged = [cb.AveragedWeights()] if config.ema_momentum is not None else []
    validation = [] if val_ds is None else [
        cb.BestCheckpoint(run / "best.keras", "val_dice", best["val_dice"] if best else -math.inf),
        cb.ValidationImages(val_ds, organs, run / "logs" / "images", count=config.image_slices,
                            window=config.augment.window or HU_RANGE),
    ]
    tensorboard = [keras.callbacks.TensorBoard(str(run / "logs"), write_graph=False, profile_batch=0)]
    return [
        cb.TrainProgress(budget, clock, best),  # first: its epoch line comes before the others' messages
        cb.EpochTimer(),
        BoundaryRamp(loss),
        schedule,
        *([cb.WallTimeBudget(budget, clock)] if budget is not None else []),
        *averaged,  # validation, best.keras and the images see the moving average of the weights
        *validation,
        *(average.back_to_raw() for average in averaged),
        *(tensorboard if _has_tensorflow() else []),
        keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
        curves.TrainingCurves(run / "history.csv", run / curves.FILE_NAME, organs),
    ]


def _has_tensorflow() -> bool:
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _enable_op_determinism() -> None:
    """TensorFlow's deterministic kernels (bit-for-bit repeatable runs on one machine; slower)."""
    try:
        import tensorflow as tf
    except ImportError:  # other backends: the seeds alone decide
        return
    tf.config.experimental.enable_op_determinism()
