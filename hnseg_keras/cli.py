"""The ``hnseg`` command: one thin subcommand per stage.

Each stage module defines ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their subcommand runs, so ``hnseg --help`` does not load TensorFlow.
A HnsegError anywhere becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from hnseg_keras.errors import HnsegError

COMMANDS: dict[str, tuple[str, str]] = {
    "phantom": ("hnseg_keras.data.phantom", "write synthetic head-and-neck CT cases (PDDCA layout)"),
    "scan": ("hnseg_keras.data.scan", "list the cases of an input: layout, CT grid, organs matched, problems"),
    "prepare": ("hnseg_keras.data.prepare", "convert CT cases into TFRecord slice shards with a manifest"),
    "arrays": ("hnseg_keras.inputs.arrays", "write one prepared split as a compressed .npz (for backends without TensorFlow)"),
    "preview": ("hnseg_keras.inputs.preview", "write a PNG grid of augmented training slices"),
    "train": ("hnseg_keras.training.trainer", "train a residual U-Net on prepared shards"),
    "tune": ("hnseg_keras.training.tuning", "KerasTuner search over loss weights and learning rate"),
    "export": ("hnseg_keras.inference.export", "export a trained run as a TensorFlow SavedModel"),
    "predict": ("hnseg_keras.inference.prediction", "segment CT volumes with a trained or exported model"),
    "evaluate": ("hnseg_keras.evaluation.scores", "3D Dice, HD95, surface distance and surface Dice tables"),
    "verify": ("hnseg_keras.data.verify", "check a prepared data, run or export folder against its recorded sha256"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, object | None]:
    parser = argparse.ArgumentParser(prog="hnseg", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hnseg-keras {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
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


if __name__ == "__main__":
    sys.exit(main())
