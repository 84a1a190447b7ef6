"""The ``hnseg`` command: one thin subcommand per stage.

Each stage module defines ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``hnseg --help`` does not load TensorFlow.
``train`` and ``tune`` live here: they are the one place allowed to join stages (the built-in
phantom is prepared first when ``--data`` is absent), and they share one builder for their flags.
A HnsegError anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import sys
from types import SimpleNamespace

from hnseg_keras import configs
from hnseg_keras.errors import HnsegError

COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("hnseg_keras.data.phantom", "write synthetic head-and-neck CT cases (PDDCA layout)"),
    "scan": ("hnseg_keras.data.scan", "list the cases of an input: layout, CT grid, organs matched, problems"),
    "prepare": ("hnseg_keras.data.prepare", "convert CT cases into TFRecord slice shards with a manifest"),
    "arrays": ("hnseg_keras.inputs.arrays", "write one prepared split as a compressed .npz (for backends without TensorFlow)"),
    "preview": ("hnseg_keras.inputs.preview", "write a PNG grid of augmented training slices"),
    "train": (__name__, "train a residual U-Net on prepared shards (or an `hnseg arrays` file)"),
    "tune": (__name__, "KerasTuner search over loss weights and learning rate"),
    "export": ("hnseg_keras.inference.export", "export a trained run as a TensorFlow SavedModel"),
    "predict": ("hnseg_keras.inference.batch", "segment CT volumes (the released model unless --model is given)"),
    "models": ("hnseg_keras.inference.released", "list the trained models this installation carries"),
    "evaluate": ("hnseg_keras.evaluation.scores", "3D Dice, HD95, surface distance and surface Dice tables"),
    "verify": ("hnseg_keras.verify", "check a prepared data, run or export folder against its recorded sha256"),
}


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, unless its text already names one or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="hnseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hnseg-keras {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=_DefaultsFormatter)
        if name == chosen:
            module = _command(name, module_name)
            module.add_arguments(sub)
    return parser, module


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (tests and wrappers may replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"hnseg: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def setup_logging() -> None:
    """Warnings of the package (``logging.getLogger(__name__)`` in its modules) as one line on stderr each."""
    logger = logging.getLogger("hnseg_keras")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
    logger.setLevel(logging.WARNING)


def op_error_line(error: BaseException) -> str | None:
    """One line for a TensorFlow op error escaping a stage (which names the file or op), else None."""
    if not any(c.__module__.startswith("tensorflow") and c.__name__.endswith("Error") for c in type(error).__mro__):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:400] if lines else 'no message'}"


def _version() -> str:
    """The installed package's version (pip install -e . counts), or "unknown"."""
    from importlib import metadata

    try:
        return metadata.version("hnseg-keras")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _command(name: str, module_name: str):
    if module_name == __name__:
        return SimpleNamespace(add_arguments=globals()[f"add_{name}_arguments"], run=globals()[f"run_{name}"])
    return importlib.import_module(module_name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    setup_logging()
    try:
        parser, module = build_parser(argv)
        args = parser.parse_args(argv)
        if module is None:
            parser.print_help()
            return 1
        return int(module.run(args) or 0)
    except HnsegError as error:
        print(f"hnseg {argv[0] if argv else ''}: error: {error}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hnseg: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        line = op_error_line(error)
        if line is None:
            raise
        print(f"hnseg {argv[0] if argv else ''}: error: {line}".replace("  ", " "), file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------- train and tune


def add_config_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The flags ``train`` and ``tune`` share: which config, which data, where to write."""
    parser.add_argument("--variant", help="preset S, M or L (default: the config file's, else S)")
    parser.add_argument("--data", metavar="MANIFEST|NPZ",
                        help="manifest.json of prepared shards, or an .npz from `hnseg arrays` (any Keras "
                             "backend); default: the built-in phantom, prepared on first use")
    parser.add_argument("--config", metavar="FILE", help="JSON train config (partial; e.g. configs/phantom_demo.json)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train config value, repeatable (e.g. --set model.filters=[8,16,32,64,128])")
    parser.add_argument("--out", help=out_help)


def read_config_file(path) -> tuple[dict, dict | None]:
    """A train config file split into its training part and its optional ``"phantom"`` section."""
    if path is None:
        return {}, None
    data = configs.read_json(path)
    if not isinstance(data, dict):
        raise HnsegError(f"{path}: a train config must be a JSON object, e.g. {{\"epochs\": 10}}")
    data = dict(data)
    return data, data.pop("phantom", None)


def train_config(args: argparse.Namespace, **flags):
    """The TrainConfig the flags describe; without ``--data`` the built-in phantom is prepared first
    (the phantom settings come from the config file's ``"phantom"`` section, else the variant's)."""
    from hnseg_keras.training.config import load_config

    data, phantom = read_config_file(args.config)
    config = load_config(args.variant, data, args.overrides, args.config)
    flags["data"] = args.data
    config = dataclasses.replace(config, **{key: value for key, value in flags.items() if value is not None})
    if config.data is None:
        from hnseg_keras.data import demo_set

        manifest = demo_set.prepare_phantom(demo_set.phantom_settings(config.variant, phantom))
        config = dataclasses.replace(config, data=str(manifest), out=config.out or f"runs/phantom-{config.variant}")
    return config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "run folder (default: runs/<data>-<variant>)")
    parser.add_argument("--epochs", type=int, help="number of epochs")
    parser.add_argument("--batch-size", type=int, help="slices per (global) batch")
    parser.add_argument("--steps-per-epoch", type=int, help="training batches per epoch")
    parser.add_argument("--max-minutes", type=float, dest="max_train_minutes",
                        help="wall-time budget: stop after the epoch that would otherwise end past it")


def run_train(args: argparse.Namespace) -> int:
    from hnseg_keras.training import trainer
    from hnseg_keras.training.run_folder import RunFolder

    config = train_config(args, epochs=args.epochs, steps_per_epoch=args.steps_per_epoch, out=args.out,
                          max_train_minutes=args.max_train_minutes)
    if args.batch_size is not None:
        config = dataclasses.replace(config, pipeline=dataclasses.replace(config.pipeline, batch_size=args.batch_size))
    try:
        run_dir = trainer.train(config)
    except KeyboardInterrupt:
        return 130
    summary_file = RunFolder(run_dir).summary_file
    summary = configs.read_json(summary_file) if summary_file.is_file() else {}
    print(f"run folder: {run_dir} (best val_dice {summary.get('best_val_dice')}, "
          f"{summary.get('epochs_run')} epochs)")
    return 0


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from hnseg_keras.training.tuning import TUNERS

    add_config_arguments(parser, "output folder (default: runs/tune-<data>-<variant>); rerun to resume")
    parser.add_argument("--tuner", default="bayesian", help=f"one of {', '.join(TUNERS)} (default: bayesian)")
    parser.add_argument("--max-trials", type=int, default=20, help="trials in the search (default: 20)")
    parser.add_argument("--epochs-per-trial", type=int,
                        help="epochs of each trial (Hyperband: the maximum; default: the train config's epochs)")
    parser.add_argument("--executions-per-trial", type=int, default=1,
                        help="trainings per trial, best val_dice averaged (default: 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the tuner's sampling, >= 1 (default: 1)")


def run_tune(args: argparse.Namespace) -> int:
    from hnseg_keras.training import tuning

    tune = tuning.TuneConfig(tuner=str(args.tuner).lower(), max_trials=args.max_trials,
                             epochs_per_trial=args.epochs_per_trial, executions_per_trial=args.executions_per_trial,
                             seed=args.seed, out=args.out)
    base = dataclasses.replace(train_config(args), out=None)
    try:
        out = tuning.search(tune, base)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume the search", file=sys.stderr)
        return 130
    if tuning.distributed_role() == "worker":
        print(f"worker {os.environ['KERASTUNER_TUNER_ID']}: no trials left; the chief writes the summary")
        return 0
    summary = configs.read_json(out / "top_trials.json")
    best = summary["trials"][0] if summary["trials"] else None
    print(f"search folder: {out} ({summary['completed']} trials completed; best val_dice "
          f"{best['val_dice']:.4f} in trial {best['trial_id']}; best config: {out / 'best_config.json'})"
          if best else f"search folder: {out} (no completed trial)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
