"""``hnseg tune``: KerasTuner search over the loss weights, boundary ramp, mixup and learning rate.

Every trial is a normal training run (same datasets, masked losses, callbacks) of the training config
resolved as ``hnseg train`` does (variant <- config file <- ``--set``), with the tuned fields replaced.
The objective is the best epoch's ``val_dice`` (maximised), not ``val_loss``: the loss is a weighted sum
whose scale changes with the very weights being tuned, so losses of two trials are not comparable.

Output folder::

    search_config.json   the search settings and base training config (a resumed search must match)
    search/              KerasTuner project (oracle state, trial_*/trial.json, best-epoch weights)
    trials/<trial_id>/   one training run folder per trial (config.json, history.csv, best.keras,
                         summary.json, logs/ for TensorBoard); execution<k>/ sub-folders when a trial
                         runs several executions
    top_trials.md/.json  completed trials by best val_dice: hyperparameters, epochs run
    best_config.json     the best trial's full training config (its epochs are the trial's; add
                         ``--epochs N`` for a longer run): ``scripts/train.py --config`` runs it

A killed search resumes when run again with the same arguments: completed trials are kept, the trial
that was running restarts from its last finished epoch. ``KERASTUNER_TUNER_ID`` / ``_ORACLE_IP`` /
``_ORACLE_PORT`` distribute the search (KerasTuner's chief/worker mechanism, see the README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import keras_tuner

from hnseg_keras import configs
from hnseg_keras.data.splits import VALIDATION
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import FolderLock, write_text_atomic
from hnseg_keras.training import distributed
from hnseg_keras.training import trainer as training
from hnseg_keras.training.config import TrainConfig, single_window, stored_config
from hnseg_keras.training.run_folder import FINISHED, RunFolder, best_row
from hnseg_keras.training.sources import open_data

TUNERS = ("bayesian", "random", "hyperband")
OBJECTIVE = "val_dice"  # maximised; the loss's scale depends on the tuned weights
TRIALS_DIR = "trials"  # one run folder per trial inside the search folder


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the tuned values; (low, high) pairs are sampled on a log scale.

    Attributes:
        focal_weight, dice_weight: weights of the focal and soft Dice terms.
        boundary_weight: weight of the boundary term (pixels) when the ``boundary`` switch is on;
            off means weight 0 (the L preset's loss).
        max_ramp_epochs: upper end of ``boundary_ramp_epochs`` (0..max, linear); None = half the
            epochs of a trial.
        mixup_alpha: Beta(alpha, alpha) of mixup when the ``mixup`` switch is on.
        learning_rate: Adam's initial learning rate.
    """

    focal_weight: tuple[float, float] = (0.1, 10.0)
    dice_weight: tuple[float, float] = (0.1, 10.0)
    boundary_weight: tuple[float, float] = (1e-3, 1e-1)
    max_ramp_epochs: int | None = None
    mixup_alpha: tuple[float, float] = (0.05, 1.0)
    learning_rate: tuple[float, float] = (1e-4, 1e-2)

    def __post_init__(self):
        for name in ("focal_weight", "dice_weight", "boundary_weight", "mixup_alpha", "learning_rate"):
            low, high = getattr(self, name)
            if not 0 < low < high:
                raise HnsegError(f"search space: {name}=({low}, {high}) must satisfy 0 < low < high")
        if self.max_ramp_epochs is not None and self.max_ramp_epochs < 0:
            raise HnsegError(f"search space: max_ramp_epochs={self.max_ramp_epochs} must be >= 0")


@dataclass(frozen=True)
class TuneConfig:
    """How the search runs; the objective is fixed to ``val_dice`` (max).

    Attributes:
        tuner: "bayesian" (Gaussian-process Bayesian optimisation), "random" or "hyperband".
        max_trials: trials in the search (caps Hyperband too, which otherwise runs its brackets).
        epochs_per_trial: epochs of one trial (Hyperband's maximum); None = the training config's.
        executions_per_trial: trainings per trial, their best val_dice averaged (noise reduction).
        seed: seed of the tuner's sampling (>= 1: KerasTuner treats 0 as "unseeded").
        out: output folder; None = ``runs/tune-<data name>-<variant>``.
        space: ranges of the tuned values.
    """

    tuner: str = "bayesian"
    max_trials: int = 20
    epochs_per_trial: int | None = None
    executions_per_trial: int = 1
    seed: int = 1
    out: str | None = None
    space: SearchSpace = field(default_factory=SearchSpace)

    def __post_init__(self):
        if self.tuner not in TUNERS:
            raise HnsegError(f"--tuner {self.tuner!r} is unknown; choose one of {', '.join(TUNERS)}")
        for name in ("max_trials", "epochs_per_trial", "executions_per_trial", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise HnsegError(f"{flag}={value!r} must be a positive integer")


# ----------------------------------------------------------------------------- values <-> configs


def sample_values(hp, space: SearchSpace, epochs: int, base: TrainConfig) -> dict:
    """Declare and sample the tuned values on ``hp`` (a ``keras_tuner.HyperParameters``).

    Defaults are the base config's values (clamped to the ranges). Returns the active values by name.
    """
    def log_float(name, bounds, default):
        low, high = bounds
        return hp.Float(name, low, high, sampling="log", default=min(max(default, low), high))

    values = {
        "focal_weight": log_float("focal_weight", space.focal_weight, base.loss.focal_weight),
        "dice_weight": log_float("dice_weight", space.dice_weight, base.loss.dice_weight),
        "boundary": hp.Boolean("boundary", default=base.loss.boundary_weight > 0),
        "mixup": hp.Boolean("mixup", default=base.augment.mixup),
        "learning_rate": log_float("learning_rate", space.learning_rate, base.learning_rate),
    }
    max_ramp = space.max_ramp_epochs if space.max_ramp_epochs is not None else epochs // 2
    with hp.conditional_scope("boundary", [True]):
        weight = log_float("boundary_weight", space.boundary_weight, base.loss.boundary_weight or 0.01)
        ramp_default = min(base.loss.boundary_ramp_epochs, max_ramp)
        ramp = (hp.Int("boundary_ramp_epochs", 0, max_ramp, default=ramp_default) if max_ramp > 0
                else hp.Fixed("boundary_ramp_epochs", 0))
    with hp.conditional_scope("mixup", [True]):
        alpha = log_float("mixup_alpha", space.mixup_alpha, base.augment.mixup_alpha)
    if values["boundary"]:
        values.update(boundary_weight=weight, boundary_ramp_epochs=ramp)
    if values["mixup"]:
        values["mixup_alpha"] = alpha
    return values


def apply_values(base: TrainConfig, values: dict) -> TrainConfig:
    """``base`` with the tuned fields replaced by ``values`` (a trial's hyperparameter values).

    ``boundary`` off gives boundary weight and ramp 0; ``mixup`` off keeps the base alpha (unused).
    Keys KerasTuner adds (``tuner/...``) are ignored.
    """
    boundary = bool(values.get("boundary", False))
    loss = dataclasses.replace(
        base.loss,
        focal_weight=float(values["focal_weight"]),
        dice_weight=float(values["dice_weight"]),
        boundary_weight=float(values["boundary_weight"]) if boundary else 0.0,
        boundary_ramp_epochs=int(values.get("boundary_ramp_epochs", 0)) if boundary else 0,
    )
    mixup = bool(values.get("mixup", False))
    augment = dataclasses.replace(
        base.augment, mixup=mixup,
        mixup_alpha=float(values["mixup_alpha"]) if mixup else base.augment.mixup_alpha,
    )
    return dataclasses.replace(base, loss=loss, augment=augment, learning_rate=float(values["learning_rate"]))


def tuned_fields(config: TrainConfig) -> dict:
    """The tuned values as a training config holds them (for tables and TensorBoard's HParams)."""
    return {
        "focal_weight": config.loss.focal_weight,
        "dice_weight": config.loss.dice_weight,
        "boundary_weight": config.loss.boundary_weight,
        "boundary_ramp_epochs": config.loss.boundary_ramp_epochs,
        "mixup": config.augment.mixup,
        "mixup_alpha": config.augment.mixup_alpha if config.augment.mixup else None,
        "learning_rate": config.learning_rate,
    }


# ----------------------------------------------------------------------------- adapters over training


def build_compiled_model(config: TrainConfig, organs: list[str]):
    """``training.build_compiled_model`` with the trial's weight-initialisation seed applied first."""
    import keras

    keras.utils.set_random_seed(config.seed)
    return training.build_compiled_model(config, organs)


class LossWeightHyperModel(keras_tuner.HyperModel):
    """``build(hp)`` samples the tuned values and calls the normal builders; ``fit`` trains the trial
    as ``hnseg train`` does into ``<out>/trials/<trial_id>`` and returns its best epoch's metrics.

    Args:
        base: training config resolved for the data; trials replace the tuned fields.
        tune: the search settings.
        out: the search's output folder.
        data: the data set (``sources.open_data``), opened once for all trials.
    """

    def __init__(self, base: TrainConfig, tune: TuneConfig, out: Path, data):
        super().__init__(name="hnseg_loss_weights")
        self.base, self.tune, self.out = base, tune, Path(out)
        self.data, self.organs = data, list(data.organs)
        self.epochs = tune.epochs_per_trial or base.epochs
        self._executions: dict[str, int] = defaultdict(int)

    def build(self, hp):
        values = sample_values(hp, self.tune.space, self.epochs, self.base)
        return build_compiled_model(apply_values(self.base, values), self.organs)

    def fit(self, hp, model, *args, callbacks=None, epochs=None, initial_epoch=0, **kwargs):
        callbacks = list(callbacks or [])
        trial_id = _trial_id(callbacks)
        execution = self._executions[trial_id]
        self._executions[trial_id] += 1
        run = trial_folder(self.out, trial_id, execution, self.tune.executions_per_trial)
        config = execution_config(apply_values(self.base, hp.values), execution, int(epochs or self.epochs),
                                  run.path)
        try:
            with run.open(config, self.data, "hnseg tune") as state:  # as `hnseg train` opens its run
                if state != FINISHED:
                    if execution and "tuner/trial_id" not in hp.values:  # not a Hyperband continuation
                        model.set_weights(build_compiled_model(config, self.organs).get_weights())
                    _write_hparams(run.logs_dir, tuned_fields(config), f"{trial_id}/{execution}")
                    # the loop `hnseg train` runs; KerasTuner's callbacks after the training ones
                    training.fit_run(config, model, run, self.data, callbacks, initial_epoch)
        except HnsegError as error:  # a config or data problem fails every trial alike: stop the search
            raise SearchStopped(str(error)) from None
        return trial_result(run)


class SearchStopped(keras_tuner.errors.FatalError):
    """A user-facing problem inside a trial; KerasTuner re-raises fatal errors instead of retrying."""


def execution_config(config: TrainConfig, execution: int, epochs: int, run: Path) -> TrainConfig:
    """Config of one execution: execution k shifts the weight and data seeds by k (so repeated
    executions of a trial measure its spread), trains ``epochs`` into ``run``."""
    pipeline = dataclasses.replace(config.pipeline, seed=config.pipeline.seed + execution)
    return dataclasses.replace(config, seed=config.seed + execution, pipeline=pipeline, epochs=epochs,
                               out=str(run))


def _trial_id(callbacks: list) -> str:
    """The trial id KerasTuner's own per-trial callback carries (``TunerCallback.trial``)."""
    for callback in callbacks:
        trial = getattr(callback, "trial", None)
        if trial is not None and hasattr(trial, "trial_id"):
            return str(trial.trial_id)
    raise HnsegError("LossWeightHyperModel.fit runs inside a KerasTuner search (no trial callback found)")


def trial_folder(out: Path, trial_id: str, execution: int, executions: int) -> RunFolder:
    """``<out>/trials/<trial_id>``, or ``.../execution<k>`` when a trial has several executions."""
    folder = Path(out) / TRIALS_DIR / str(trial_id)
    return RunFolder(folder / f"execution{execution}" if executions > 1 else folder)


def _write_hparams(log_dir: Path, values: dict, session: str) -> None:
    """Record the trial's values for TensorBoard's HParams dashboard (``tensorboard --logdir <out>/trials``)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hparams_api

    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default():
        hparams_api.hparams({key: value for key, value in values.items() if value is not None}, trial_id=session)
    writer.close()


def trial_result(run: RunFolder) -> dict[str, float]:
    """Metrics of the best-``val_dice`` epoch of a run folder, plus ``epochs_run`` and ``best_epoch`` (1-based).

    Read from ``history.csv`` so a resumed trial counts its epochs from before the kill too.
    """
    history = run.history()
    best = best_row(history, OBJECTIVE)
    if best is None:
        raise keras_tuner.errors.FailedTrialError(f"{run.history_file}: no finite {OBJECTIVE}; the trial diverged")
    metrics = {key: float(value) for key, value in best.items() if key != "epoch" and math.isfinite(value)}
    return {**metrics, "epochs_run": float(len(history)), "best_epoch": float(best["epoch"] + 1)}


# ----------------------------------------------------------------------------- the search


def distributed_role() -> str | None:
    """``"chief"``, ``"worker"`` under KerasTuner's distributed mode (``KERASTUNER_*`` variables), else None."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return None
    missing = [name for name in ("KERASTUNER_ORACLE_PORT", "KERASTUNER_TUNER_ID") if not os.environ.get(name)]
    if missing:
        raise HnsegError(f"KERASTUNER_ORACLE_IP is set but {' and '.join(missing)} not; set them all "
                         "(chief: KERASTUNER_TUNER_ID=chief, workers: tuner0, tuner1, ...) or unset it")
    return "chief" if "chief" in os.environ["KERASTUNER_TUNER_ID"] else "worker"


def default_out(base: TrainConfig) -> Path:
    """``runs/tune-<data name>-<variant>`` beside training's default run folder."""
    run = training.default_out(base)
    return run.parent / f"tune-{run.name}"


def check_search_folder(out: Path, record: dict) -> None:
    """Refuse a folder holding something else, or a search with other settings (``max_trials`` may grow)."""
    stored_path = out / "search_config.json"
    if not stored_path.is_file():
        # Hidden names are temporary files (another process of a distributed search may be writing).
        if out.exists() and (not out.is_dir() or any(not p.name.startswith(".") for p in out.iterdir())):
            raise HnsegError(f"{out}: exists and holds no search (no search_config.json); choose another --out")
        return
    stored = configs.read_json(stored_path)
    if isinstance(stored, dict) and isinstance(stored.get("train"), dict):  # older searches: two HU windows
        stored = {**stored, "train": single_window(stored["train"], str(stored_path))}
    stored, wanted = _flatten(stored), _flatten(record)
    differs = [key for key in sorted(set(stored) | set(wanted)) if stored.get(key) != wanted.get(key)]
    if differs:
        raise HnsegError(f"{out}: holds a search with different settings ({', '.join(differs[:4])} differ); "
                         "rerun it with its original arguments to resume, or choose another --out")


def _flatten(data, prefix: str = "") -> dict:
    """Dotted keys -> leaf values of nested dicts."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data}
    flat = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def make_tuner(tune: TuneConfig, hypermodel, out: Path, distribution_strategy=None):
    """The KerasTuner tuner over ``<out>/search`` (``overwrite=False``: an existing project is resumed)."""
    common = {
        "hypermodel": hypermodel,
        "objective": keras_tuner.Objective(OBJECTIVE, direction="max"),
        "directory": str(out),
        "project_name": "search",
        "overwrite": False,
        "seed": tune.seed,
        "executions_per_trial": tune.executions_per_trial,
        "distribution_strategy": distribution_strategy,
    }
    if tune.tuner == "hyperband":
        tuner = keras_tuner.Hyperband(max_epochs=hypermodel.epochs, factor=3, **common)
        tuner.oracle.max_trials = tune.max_trials  # the base Oracle stops creating trials at this count
        return tuner
    if tune.tuner == "random":
        return keras_tuner.RandomSearch(max_trials=tune.max_trials, **common)
    return keras_tuner.BayesianOptimization(max_trials=tune.max_trials, **common)


def _strategy():
    """KerasTuner's ``distribution_strategy``: MirroredStrategy on several GPUs, else None."""
    strategy = distributed.strategy_from_environment()
    if distributed.is_multi_worker(strategy):
        raise HnsegError("TF_CONFIG multi-worker training is not used by `hnseg tune`; unset TF_CONFIG and "
                         "distribute trials with KERASTUNER_TUNER_ID / _ORACLE_IP / _ORACLE_PORT instead")
    return strategy if strategy.num_replicas_in_sync > 1 else None


def search(tune: TuneConfig, base: TrainConfig, callbacks: list | None = None) -> Path:
    """Run (or resume) the search and, on the chief or a lone tuner, write the summary files.

    Args:
        tune: search settings.
        base: training config (variant <- config file <- overrides) naming its data; ``base.out`` is not used.
        callbacks: extra Keras callbacks appended to every trial's fit (deep-copied per trial).
    Returns:
        the output folder.
    """
    role = distributed_role()
    base = dataclasses.replace(base, out=None)
    out = Path(tune.out) if tune.out else default_out(base)
    settings = {key: value for key, value in configs.to_dict(tune).items() if key not in ("max_trials", "out")}
    record = {"tune": settings, "train": stored_config(base)}
    check_search_folder(out, record)
    strategy = _strategy()
    data = open_data(base.data)
    if not data.slices(VALIDATION):
        raise HnsegError(f"{data.path}: holds no validation split; the search ranks trials by val_dice")
    resolved = training.resolve_for_data(base, data)
    out.mkdir(parents=True, exist_ok=True)
    # one search per folder; distributed workers share the chief's folder, so only a lone process locks it
    with FolderLock(out, "hnseg tune") if role is None else contextlib.nullcontext():
        configs.write_json_atomic(out / "search_config.json", record)
        hypermodel = LossWeightHyperModel(resolved, tune, out, data)
        tuner = make_tuner(tune, hypermodel, out, strategy)
        try:
            tuner.search(callbacks=list(callbacks or []), verbose=1)
        except SearchStopped as error:
            raise HnsegError(str(error)) from None
        except RuntimeError as error:  # KerasTuner: too many consecutive failed trials
            failed = failed_trials(tuner.oracle) if role is None else []
            cause = failed[-1]["error"] if failed else str(error).strip().splitlines()[0]
            raise HnsegError(f"{out}/search: the search stopped after failed trials (last error: {cause}); "
                             "see search/trial_*/trial.json there") from None
    if role != "worker":
        write_results(tuner.oracle, base, hypermodel.epochs, out)
    return out


# ----------------------------------------------------------------------------- results


def trial_rows(oracle, base: TrainConfig) -> list[dict]:
    """Completed trials, best ``val_dice`` first: tuned values (as the training config holds them),
    best val_dice overall and per organ, epochs run, best epoch (1-based) and the run folder."""
    rows = []
    for rank, trial in enumerate(oracle.get_best_trials(max(1, len(oracle.trials))), start=1):
        metrics = trial.metrics
        names = sorted(metrics.metrics) if hasattr(metrics, "metrics") else []
        last = {name: metrics.get_last_value(name) for name in names}
        rows.append({
            "rank": rank,
            "trial_id": trial.trial_id,
            "val_dice": float(trial.score),
            "epochs_run": _int_or_none(last.get("epochs_run")),
            "best_epoch": _int_or_none(last.get("best_epoch")),
            "hyperparameters": tuned_fields(apply_values(base, trial.hyperparameters.values)),
            "val_dice_per_organ": {name[len("val_dice_"):]: float(value) for name, value in last.items()
                                   if name.startswith("val_dice_") and value is not None},
            "run": f"{TRIALS_DIR}/{trial.trial_id}",
            "values": dict(trial.hyperparameters.values),
        })
    return rows


def _int_or_none(value) -> int | None:
    return None if value is None or not math.isfinite(float(value)) else int(round(float(value)))


def failed_trials(oracle) -> list[dict]:
    """Trials that failed (status FAILED or INVALID) with the last line of their error."""
    failed = []
    for trial in oracle.trials.values():
        if trial.status in ("FAILED", "INVALID"):
            message = (trial.message or "").strip().splitlines()
            failed.append({"trial_id": trial.trial_id, "status": trial.status,
                           "error": message[-1] if message else ""})
    return failed


def markdown_table(rows: list[dict]) -> str:
    """The top-trials table in Markdown."""
    lines = [
        "| rank | trial | best val_dice | epochs run | best epoch | focal | Dice | boundary | ramp epochs "
        "| mixup alpha | learning rate |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        hp = row["hyperparameters"]
        alpha = f"{hp['mixup_alpha']:.3g}" if hp["mixup"] else "off"
        boundary = f"{hp['boundary_weight']:.3g}" if hp["boundary_weight"] else "off"
        lines.append(
            f"| {row['rank']} | {row['trial_id']} | {row['val_dice']:.4f} | {row['epochs_run']} | "
            f"{row['best_epoch']} | {hp['focal_weight']:.3g} | {hp['dice_weight']:.3g} | {boundary} | "
            f"{hp['boundary_ramp_epochs']} | {alpha} | {hp['learning_rate']:.3g} |")
    return "\n".join(lines)


def write_results(oracle, base: TrainConfig, epochs: int, out: Path) -> dict:
    """Write ``top_trials.json`` / ``.md`` and ``best_config.json``; returns the JSON summary.

    The best config is ``base`` with the best trial's values and epochs, and ``out = <out>/best_run``.
    """
    rows, failed = trial_rows(oracle, base), failed_trials(oracle)
    summary = {"objective": f"{OBJECTIVE} (max; best epoch of each trial)", "completed": len(rows),
               "failed": failed, "trials": rows}
    configs.write_json_atomic(out / "top_trials.json", summary)
    text = [f"# Top trials ({len(rows)} completed, {len(failed)} failed), by best {OBJECTIVE}", "",
            markdown_table(rows), ""]
    if rows:
        best = rows[0]
        config = dataclasses.replace(apply_values(base, best["values"]),
                                     epochs=int(best["values"].get("tuner/epochs", epochs)),
                                     out=str(out / "best_run"))
        # a recipe to rerun here (as a command line would be), so it keeps the --data path as given
        configs.write_json_atomic(out / "best_config.json", configs.to_dict(config))
        text += [f"Best: trial {best['trial_id']} ({best['run']}); train it with "
                 f"`python scripts/train.py --config {out / 'best_config.json'}`.", ""]
    write_text_atomic(out / "top_trials.md", "\n".join(text))
    return summary
