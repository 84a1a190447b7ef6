"""``hnseg train``: fit the residual U-Net on prepared shards (or the built-in phantom) into a run folder.

Run folder::

    config.json        the resolved TrainConfig (model normalisation filled in from the data)
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

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import tensorflow as tf

from hnseg_keras import configs
from hnseg_keras.data.phantom import PhantomConfig
from hnseg_keras.data.prepare import PhantomSource, PrepareConfig, prepare
from hnseg_keras.data.shards import Manifest
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs.augment import AugmentConfig
from hnseg_keras.inputs.pipeline import (
    PipelineConfig,
    intensity_stats,
    organ_weights_from_manifest,
    train_dataset,
    validation_dataset,
)
from hnseg_keras.inputs.train_step import augment_in_train_step, augmenter
from hnseg_keras.model.losses import BoundaryRamp, SegmentationLoss
from hnseg_keras.model.metrics import dice_metrics
from hnseg_keras.model.unet import UNetConfig, build_unet, variant_config
from hnseg_keras.training import callbacks as cb

VARIANT_NAMES = ("S", "M", "L")
DEMO_ORGANS = ("BrainStem", "Mandible", "Parotid_L", "Parotid_R", "Submandibular_L", "Submandibular_R")


@dataclass(frozen=True)
class LossConfig:
    """Weights of ``losses.SegmentationLoss``: focal + Dice (+ boundary, optionally ramped over epochs)."""

    focal_weight: float = 1.0
    dice_weight: float = 1.0
    boundary_weight: float = 0.0
    boundary_ramp_epochs: int = 0


@dataclass(frozen=True)
class PhantomDataConfig:
    """The built-in phantom data set, prepared on first use when ``TrainConfig.data`` is None.

    Attributes:
        cases: number of phantom cases (split into train / validation by ``prepare``).
        generator: phantom geometry (in-plane size and spacing, slice spacing, ...).
        prepare: organs and slicing of the shards.
        cache_dir: parent folder of the prepared shards; the data set lives in
            ``<cache_dir>/phantom-<hash of the settings>`` and is reused while its manifest is complete.
        workers: processes used by ``prepare``.
    """
    cases: int = 16
    generator: PhantomConfig = field(default_factory=PhantomConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    cache_dir: str = "tfrecords"
    workers: int = 2


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
        data: manifest.json (or its folder) of prepared shards; None prepares and uses ``phantom``.
        phantom: the built-in data set used when ``data`` is None.
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
    phantom: PhantomDataConfig = field(default_factory=PhantomDataConfig)
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


def demo_phantom() -> PhantomDataConfig:
    """Small phantom for the CPU demo (S preset): 16 cases, 112 px slices of 2 mm, six organs.

    At 2 mm the optic nerves and chiasm are 1-2 pixels wide, more than a few CPU minutes can learn, so
    the demo trains the brain stem, mandible, parotids and submandibular glands.
    """
    return PhantomDataConfig(
        cases=16,
        generator=PhantomConfig(size=128, spacing_mm=1.6, slice_spacing_mm=(2.5, 3.0)),
        prepare=PrepareConfig(organs=DEMO_ORGANS,
                              slicing=SlicingConfig(size=112, spacing_mm=2.0, empty_slice_share=0.1)),
    )


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
    return TrainConfig(variant="S", model=variant_config("S"), augment=AugmentConfig(crop_size=96, mixup=False),
                       loss=LossConfig(1.0, 1.0, 0.0, 0), epochs=30, lr_schedule="cosine", ema_momentum=0.99,
                       pipeline=PipelineConfig(batch_size=8, shuffle_buffer=256, cache="memory"),
                       phantom=demo_phantom())


def load_config(variant: str | None = None, config_file: str | os.PathLike | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Resolve a TrainConfig: variant preset <- config file (partial JSON) <- ``key=value`` overrides.

    The variant is ``variant`` if given, else the file's ``"variant"``, else S.
    """
    data = {}
    if config_file is not None:
        data = configs.read_json(config_file)
        if not isinstance(data, dict):
            raise HnsegError(f"{config_file}: a train config must be a JSON object, e.g. {{\"epochs\": 10}}")
    name = variant or data.get("variant") or "S"
    base = configs.to_dict(preset(name))
    merged = _merge(base, {**data, "variant": base["variant"]}, str(config_file))
    try:
        config = configs.from_dict(TrainConfig, merged)
        return configs.replace_from_overrides(config, list(overrides))
    except HnsegError as error:
        where = f"{config_file}: " if config_file is not None and not overrides else ""
        raise HnsegError(f"{where}{error}") from None
    except (TypeError, ValueError) as error:
        raise HnsegError(f"{config_file or 'overrides'}: invalid train config ({error})") from None


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


def phantom_dataset(phantom: PhantomDataConfig) -> Path:
    """Manifest path of the built-in phantom data set, preparing it on first use (resumable)."""
    settings = configs.to_dict(dataclasses.replace(phantom, cache_dir="", workers=0))
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(phantom.cache_dir) / f"phantom-{digest}"
    manifest_path = folder / "manifest.json"
    if manifest_path.is_file() and Manifest.load(manifest_path).complete:
        return manifest_path
    print(f"preparing the built-in phantom data set ({phantom.cases} cases) in {folder}", file=sys.stderr)
    prepare(PhantomSource(phantom.cases, phantom.generator), folder, phantom.prepare,
            workers=max(1, phantom.workers))
    return manifest_path


def manifest_path_of(config: TrainConfig) -> Path:
    """The manifest to train on: ``config.data`` (file or folder) or the prepared phantom."""
    if config.data is None:
        return phantom_dataset(config.phantom)
    path = Path(config.data)
    if path.is_dir():
        path = path / "manifest.json"
    if not path.is_file():
        raise HnsegError(f"{config.data}: manifest not found; run `hnseg prepare INPUT --out DIR` and pass "
                         "--data DIR/manifest.json, or leave --data out to use the built-in phantom")
    return path


def resolve_for_data(config: TrainConfig, manifest_path: Path) -> TrainConfig:
    """Fill the model's organ count, input channels and HU statistics from the manifest; check sizes."""
    manifest = Manifest.load(manifest_path)
    if not manifest.complete:
        raise HnsegError(f"{manifest_path}: data set is incomplete; rerun `hnseg prepare` to finish it")
    if config.model.window != config.augment.window:
        raise HnsegError(f"model.window={config.model.window} differs from augment.window="
                         f"{config.augment.window}; set both to the same HU window")
    for split in ("train", "validation"):
        if not manifest.splits.get(split, {}).get("slices"):
            raise HnsegError(f"{manifest_path}: split {split!r} has no slices; prepare more cases")
    height = manifest.image_shape[0]
    size = config.augment.crop_size or height
    multiple = config.model.size_multiple
    if size > height or size % multiple:
        raise HnsegError(f"augment.crop_size={config.augment.crop_size} must be <= the slice size {height} "
                         f"and a multiple of {multiple}")
    mean, std = intensity_stats(manifest, config.model.window)
    model = dataclasses.replace(
        config.model, num_organs=len(manifest.organs), input_channels=int(manifest.image_shape[-1]),
        hu_mean=config.model.hu_mean if config.model.hu_mean is not None else round(float(mean), 4),
        hu_std=config.model.hu_std if config.model.hu_std is not None else round(float(std), 4),
    )
    return dataclasses.replace(config, model=model, data=str(manifest_path))


# ----------------------------------------------------------------------------- strategy and run folder


def strategy_from_environment():
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers, MirroredStrategy on >1 GPU,
    else the default (one device) strategy. Create it before any other TensorFlow op runs."""
    raw = os.environ.get("TF_CONFIG")
    if raw:
        try:
            cluster = json.loads(raw).get("cluster", {})
        except (json.JSONDecodeError, AttributeError):
            raise HnsegError("TF_CONFIG is not a JSON object with 'cluster' and 'task'; fix or unset it") from None
        if sum(len(cluster.get(role, [])) for role in ("chief", "worker")) > 1:
            return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def worker_identity(strategy) -> tuple[bool, int]:
    """``(is_chief, task index)``: the chief is task ``chief`` or, without one, worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, 0
    roles = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in roles)
    return chief, task_id


def default_out(config: TrainConfig) -> Path:
    """``runs/phantom-<variant>`` or ``runs/<data folder name>-<variant>``."""
    name = "phantom" if config.data is None else Path(config.data).resolve().parent.name
    if config.data is not None and Path(config.data).is_dir():
        name = Path(config.data).resolve().name
    return Path("runs") / f"{name}-{config.variant}"


# ----------------------------------------------------------------------------- training


def train(config: TrainConfig, callbacks: list | None = None) -> Path:
    """Train a U-Net as ``config`` says and return its run folder.

    Prepares the phantom when ``config.data`` is None, resumes an unfinished run of the same config in
    the same folder, and returns at once for a finished one. ``callbacks`` are appended after the
    built-in ones (after the epoch backup). Ctrl-C saves ``interrupted.keras`` and the summary, then
    re-raises KeyboardInterrupt.
    """
    started = time.monotonic()
    strategy = strategy_from_environment()  # first: multi-worker collectives must be set up before any op
    multi_worker = getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()
    if multi_worker and config.data is None:
        raise HnsegError("several workers (TF_CONFIG) need prepared data: run `hnseg prepare` once and pass --data")
    if multi_worker and config.max_train_minutes is not None:
        # Each worker would read its own clock and could stop (or set its learning rate) alone.
        raise HnsegError("max_train_minutes needs a single worker; with several (TF_CONFIG) cap --epochs instead")
    out = Path(config.out) if config.out else default_out(config)
    manifest_path = manifest_path_of(config)
    config = dataclasses.replace(resolve_for_data(config, manifest_path), out=str(out))
    chief, task = worker_identity(strategy)
    # Every worker runs the same saving code (reading variables may need all of them); only the chief's
    # files land in the run folder, the others write to a sibling scratch folder removed at the end
    # (kept after a kill, so each worker resumes from its own backup).
    run = out if chief else out.with_name(f".{out.name}.worker-{task}")
    resolved = configs.to_dict(config)
    state = cb.check_run_folder(run, resolved)
    if chief:
        print(json.dumps(resolved, indent=2), flush=True)
    if state == "finished":
        print(f"{run}: this configuration already finished training there (summary.json); "
              "use another --out to train again", file=sys.stderr)
        return run
    run.mkdir(parents=True, exist_ok=True)
    configs.write_json_atomic(run / "config.json", resolved)
    _fit(config, strategy, run, manifest_path, chief, multi_worker, list(callbacks or []), started)
    if not chief:
        shutil.rmtree(run, ignore_errors=True)
    return run


def _fit(config: TrainConfig, strategy, run: Path, manifest_path: Path, chief: bool, multi_worker: bool,
         extra_callbacks: list, started: float) -> None:
    organs = list(Manifest.load(manifest_path).organs)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    train_ds, val_ds, steps, val_steps = make_datasets(config, manifest_path, multi_worker)
    with strategy.scope():
        model = build_compiled_model(config, organs)
    augment = device_augmentation(config, manifest_path)
    if augment is not None:
        augment_in_train_step(model, augment)
    loss = model.loss
    initial_epoch = cb.backup_epoch(run / "backup")
    if initial_epoch:
        print(f"resuming {run} after epoch {initial_epoch} of {config.epochs}", file=sys.stderr)
    spent_before = sum(row.get("epoch_time_s", 0.0) for row in cb.read_history(run / "history.csv")
                       if row.get("epoch", math.inf) < initial_epoch)
    clock = cb.TrainingClock(spent_before, started)
    callbacks = make_callbacks(config, run, loss, val_ds, organs, initial_epoch, clock) + extra_callbacks
    callbacks.insert(len(callbacks) - len(extra_callbacks),
                     keras.callbacks.BackupAndRestore(str(run / "backup"), double_checkpoint=True))
    verbose = (1 if sys.stdout.isatty() else 2) if chief else 0
    start = time.perf_counter()
    summary = {"organs": organs, "data": str(manifest_path), "initial_epoch": initial_epoch}
    fixes = _multi_worker_fit_fixes(model, strategy, augment) if multi_worker else contextlib.nullcontext()
    try:
        with fixes:
            model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, steps_per_epoch=steps,
                      validation_steps=val_steps, callbacks=callbacks, verbose=verbose, shuffle=False)
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


def device_augmentation(config: TrainConfig, manifest_path: Path):
    """``(batch, seed) -> (x, y)`` for the train step when ``pipeline.augment_on_device``, else None."""
    if not config.pipeline.augment_on_device:
        return None
    return augmenter(config.augment, organ_weights_from_manifest(Manifest.load(manifest_path)))


@contextlib.contextmanager
def _multi_worker_fit_fixes(model, strategy, augment=None):
    """Work around keras-team/keras#20585: Keras 3.15 ``fit`` under MultiWorkerMirroredStrategy
    (1) all-reduces a whole ``(x, y)`` batch to build the model symbolically and (2) reduces the
    scalar step logs with ``axis=0``; the collective strategy rejects both. Only shapes matter for
    (1), so it builds from this worker's local batch (augmented first when ``augment`` is given);
    (2) becomes a mean over all workers.
    """
    from keras.src.backend.tensorflow import trainer as tf_trainer  # the module fit looks these up in

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(_first_local(strategy), next(batches))
                break
        if augment is not None:
            data_batch = augment(*data_batch[:2])
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    original = tf_trainer.reduce_per_replica

    def reduce_per_replica(values, strategy_, reduction):
        if reduction not in ("auto", "mean"):
            return original(values, strategy_, reduction)
        return keras.tree.map_structure(
            lambda v: strategy_.reduce("MEAN", v, axis=None) if isinstance(v, tf.distribute.DistributedValues) else v,
            values)

    model._maybe_symbolic_build = build
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original


def _first_local(strategy):
    return lambda value: (strategy.experimental_local_results(value)[0]
                          if isinstance(value, tf.distribute.DistributedValues) else value)


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
        model.compile(optimizer=optimizer, loss=loss,
                      metrics=dice_metrics(organs))
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return model


def make_callbacks(config: TrainConfig, run: Path, loss, val_ds, organs, initial_epoch: int,
                   clock: cb.TrainingClock | None = None) -> list:
    """The run's callbacks in order (log-writing ones after those that add log keys).

    ``clock`` times the wall-time budget and the wall-time cosine schedule (default: starts now).
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
    return [
        cb.EpochTimer(),
        BoundaryRamp(loss),
        schedule,
        *([cb.WallTimeBudget(budget, clock)] if budget is not None else []),
        *averaged,
        cb.BestCheckpoint(run / "best.keras", "val_dice", best["val_dice"] if best else -math.inf),
        cb.ValidationImages(val_ds, organs, run / "logs" / "images", count=config.image_slices,
                            window=config.augment.window or (-160.0, 240.0)),
        *(average.back_to_raw() for average in averaged),
        keras.callbacks.TensorBoard(str(run / "logs"), write_graph=False, profile_batch=0),
        keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
    ]


def make_datasets(config: TrainConfig, manifest_path: Path, multi_worker: bool):
    """``(train, validation, steps_per_epoch, validation_steps)``; training repeats endlessly."""
    splits = Manifest.load(manifest_path).splits
    batch = config.pipeline.batch_size
    if splits["train"]["slices"] < batch:
        raise HnsegError(f"{manifest_path}: {splits['train']['slices']} train slices are fewer than the batch "
                         f"size {batch}; lower --batch-size")
    steps = config.steps_per_epoch or splits["train"]["slices"] // batch
    train_ds = train_dataset(manifest_path, config.pipeline, config.augment).repeat()
    val_ds = validation_dataset(manifest_path, config.pipeline, config.augment)
    val_steps = config.validation_steps
    if multi_worker:
        # Every worker must run the same number of steps (whole batches only). Training batches are
        # sharded by element; validation is not sharded, so every worker scores the whole split and
        # all take the same ReduceLROnPlateau decisions.
        val_steps = val_steps or max(1, splits["validation"]["slices"] // batch)
        train_ds = train_ds.with_options(_shard_options(tf.data.experimental.AutoShardPolicy.DATA))
        val_ds = val_ds.with_options(_shard_options(tf.data.experimental.AutoShardPolicy.OFF))
    if val_steps:
        val_ds = val_ds.repeat()
    else:  # a known length spares Keras an end-of-data warning in the first epoch
        val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(-(-splits["validation"]["slices"] // batch)))
    return train_ds, val_ds, steps, val_steps


def _shard_options(policy) -> tf.data.Options:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return options


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", help="preset S, M or L (default: the config file's, else S)")
    parser.add_argument("--data", metavar="MANIFEST",
                        help="manifest.json of prepared shards (default: the built-in phantom, prepared on first use)")
    parser.add_argument("--epochs", type=int, help="number of epochs")
    parser.add_argument("--batch-size", type=int, help="slices per (global) batch")
    parser.add_argument("--steps-per-epoch", type=int, help="training batches per epoch")
    parser.add_argument("--max-minutes", type=float, dest="max_train_minutes",
                        help="wall-time budget: stop after the epoch that would otherwise end past it")
    parser.add_argument("--out", help="run folder (default: runs/<data>-<variant>)")
    parser.add_argument("--config", metavar="FILE", help="JSON train config (partial; e.g. configs/phantom_demo.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, repeatable (e.g. --set model.filters=[8,16,32,64,128])")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.variant, args.config, args.overrides)
    flags = {"data": args.data, "epochs": args.epochs, "steps_per_epoch": args.steps_per_epoch, "out": args.out,
             "max_train_minutes": args.max_train_minutes}
    config = dataclasses.replace(config, **{key: value for key, value in flags.items() if value is not None})
    if args.batch_size is not None:
        config = dataclasses.replace(config, pipeline=dataclasses.replace(config.pipeline, batch_size=args.batch_size))
    try:
        run_dir = train(config)
    except KeyboardInterrupt:
        return 130
    summary = configs.read_json(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
    print(f"run folder: {run_dir} (best val_dice {summary.get('best_val_dice')}, "
          f"{summary.get('epochs_run')} epochs)")
    return 0
