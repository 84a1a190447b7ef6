"""``hnseg train``: fit the residual U-Net on prepared data (shards or an arrays file) into a run folder.

``train`` resolves the config for the data, opens the run folder (``run_folder.RunFolder``: its files,
checks and resume state) and runs ``fit_run``, the one training loop, which ``hnseg tune`` trials run
too. A killed run resumes where it stopped when the same command is run again; a folder holding a
different configuration is refused. The config and its presets are ``config.py``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import keras

from hnseg_keras.data.splits import TRAIN, VALIDATION
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import portable_path
from hnseg_keras.inputs.augment import HU_RANGE, check_crop
from hnseg_keras.inputs.train_step import augment_in_train_step, augmenter
from hnseg_keras.model.losses import BoundaryRamp, SegmentationLoss
from hnseg_keras.model.metrics import dice_metrics
from hnseg_keras.model.unet import build_unet
from hnseg_keras.training import callbacks as cb
from hnseg_keras.training import curves, distributed
from hnseg_keras.training.config import (
    TrainConfig,
    load_config,  # noqa: F401  (tests/test_verify.py, tests/test_openkbp_profile.py import it from here)
    stored_config,
)
from hnseg_keras.training.run_folder import FINISHED, RunFolder, best_row, time_spent
from hnseg_keras.training.sources import open_data

# ----------------------------------------------------------------------------- data


def resolve_for_data(config: TrainConfig, data) -> TrainConfig:
    """Fill the model's organ count, input channels and HU statistics from ``data`` (a ``sources`` object);
    check that window, crop, batch and schedule fit it."""
    if not data.slices(VALIDATION) and config.lr_schedule == "plateau":
        raise HnsegError(f"{data.path}: holds no validation split, which the plateau schedule watches; pass "
                         "--set lr_schedule=cosine")
    size = check_crop(config.augment.crop_size, data.image_shape[:2])[0]
    if size % config.model.size_multiple:
        raise HnsegError(f"augment.crop_size={config.augment.crop_size}: the training slices must be a multiple of "
                         f"{config.model.size_multiple} px for this U-Net; choose such a crop_size")
    batch = config.pipeline.batch_size
    if data.slices(TRAIN) < batch:
        raise HnsegError(f"{data.path}: {data.slices(TRAIN)} train slices are fewer than the batch size {batch}; "
                         "lower --batch-size")
    mean, std = data.hu_stats(config.augment.window)
    model = dataclasses.replace(
        config.model, num_organs=len(data.organs), input_channels=int(data.image_shape[-1]),
        hu_mean=config.model.hu_mean if config.model.hu_mean is not None else round(float(mean), 4),
        hu_std=config.model.hu_std if config.model.hu_std is not None else round(float(std), 4),
    )
    return dataclasses.replace(config, model=model, data=str(data.path))


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
    run = RunFolder.of_worker(out, chief, task)
    with run.open(config, data, "hnseg train") as state:
        if chief:
            print(json.dumps(stored_config(config), indent=2), flush=True)
        if state == FINISHED:
            print(f"{run}: this configuration already finished training there ({run.summary_file.name}); "
                  "use another --out to train again", file=sys.stderr)
            return run.path
        keras.utils.set_random_seed(config.seed)
        if config.deterministic:
            _enable_op_determinism()
        batches = data.batches(config, multi_worker)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model = build_compiled_model(config, list(data.organs))
        fit_run(config, model, run, data, list(callbacks or []), batches=batches, started=started,
                strategy=strategy, chief=chief)
    if not chief:
        run.discard()
    return run.path


def fit_run(config: TrainConfig, model, run: RunFolder, data, extra_callbacks: list = (), initial_epoch: int = 0,
            *, batches=None, started: float | None = None, strategy=None, chief: bool = True) -> None:
    """The one training loop (``hnseg train``, every ``hnseg tune`` trial, shards or arrays).

    Fits the compiled ``model`` on ``data``'s batches (``batches`` if already made) into the opened
    ``run``: device augmentation when asked for, the run's callbacks, then ``BackupAndRestore``
    (resumes from the run's backup), then ``extra_callbacks``; writes ``final.keras`` and
    ``summary.json``. ``started`` (monotonic) starts the wall-time budget's clock.
    """
    multi_worker = distributed.is_multi_worker(strategy)
    organs = list(data.organs)
    train_ds, val_ds, steps, val_steps, example = batches or data.batches(config, multi_worker)
    augment = augmenter(config.augment, data.organ_weights()) if data.augments_on_device(config) else None
    if augment is not None:
        augment_in_train_step(model, augment, example=example)
    resumed = run.resume_epoch()
    first = max(initial_epoch, resumed)
    if resumed:
        print(f"resuming {run} after epoch {resumed} of {config.epochs}", file=sys.stderr)
    clock = cb.TrainingClock(time_spent(run.history(), before_epoch=first), started)
    backup = keras.callbacks.BackupAndRestore(str(run.backup_dir), double_checkpoint=True)
    callbacks = [*make_callbacks(config, run, model.loss, val_ds, organs, first, clock), backup, *extra_callbacks]
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
        saved = run.save_model(model, "interrupted")
        run.write_summary(config.epochs, "interrupted", time.perf_counter() - start, summary)
        print(f"\ninterrupted: saved {saved}; run the same command again to resume "
              "from the last finished epoch", file=sys.stderr)
        raise
    run.save_model(model, "final")
    budget = next((c for c in callbacks if isinstance(c, cb.WallTimeBudget)), None)
    summary["stopped_by_budget"] = budget is not None and budget.stopped_epoch is not None
    run.write_summary(config.epochs, "finished", time.perf_counter() - start, summary)


def build_compiled_model(config: TrainConfig, organs: list[str]):
    """The U-Net compiled with Adam, the masked SegmentationLoss and the Dice metrics.

    ``config`` must be resolved for the data (``resolve_for_data``); call inside a strategy scope.
    The model's first layer clips to the training input's window (``augment.window``).
    """
    policy = keras.mixed_precision.global_policy()
    try:
        if config.mixed_precision:
            keras.mixed_precision.set_global_policy("mixed_float16")
        model = build_unet(config.model, window=config.augment.window)
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


def make_callbacks(config: TrainConfig, run: RunFolder, loss, val_ds, organs, initial_epoch: int,
                   clock: cb.TrainingClock | None = None) -> list:
    """The run's callbacks in order (log-writing ones after those that add log keys).

    ``clock`` times the wall-time budget and the wall-time cosine schedule (default: starts now).
    Without validation data (arrays) there is no best checkpoint and no validation images; without
    TensorFlow no TensorBoard logs.
    """
    clock = clock or cb.TrainingClock()
    run.trim_history(initial_epoch)
    history = run.history()
    best = best_row(history)
    budget = None if config.max_train_minutes is None else 60.0 * config.max_train_minutes
    if config.lr_schedule == "cosine":
        schedule = cb.CosineSchedule(config.learning_rate, config.epochs, budget, clock)
    else:
        schedule = cb.ResumableReduceLROnPlateau(history, monitor="val_dice", mode="max", factor=config.lr_factor,
                                                 patience=config.lr_patience, verbose=1)
    averaged = [cb.AveragedWeights()] if config.ema_momentum is not None else []
    validation = [] if val_ds is None else [
        cb.BestCheckpoint(run.model_file("best"), "val_dice", best["val_dice"] if best else -math.inf),
        cb.ValidationImages(val_ds, organs, run.images_dir, count=config.image_slices,
                            window=config.augment.window or HU_RANGE),
    ]
    tensorboard = [keras.callbacks.TensorBoard(str(run.logs_dir), write_graph=False, profile_batch=0)]
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
        keras.callbacks.CSVLogger(str(run.history_file), append=True),
        curves.TrainingCurves(run.history_file, run.curves_file, organs),
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
