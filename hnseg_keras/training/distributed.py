"""Distribution strategies for ``hnseg train`` (TensorFlow only): several GPUs or several workers.

TensorFlow is imported inside the functions, so training from arrays under another backend never
loads it.

Keras does not support MultiWorkerMirroredStrategy (keras-team/keras#20585), so multi-worker ``fit``
runs with two private Keras functions replaced (:func:`multi_worker_fit_fixes`). That is tested on
the Keras minor versions in :data:`TESTED_KERAS_MINORS` only, and any other is refused when a
multi-worker run starts (:func:`check_multi_worker_keras`). To add a version: install it, run
``pytest tests/test_distributed.py`` (two worker processes must end with the weights of one process
training the same global batches), add it here and widen the ``keras`` range in pyproject.toml.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import types

import keras

from hnseg_keras.errors import HnsegError

# Keras (major, minor) versions that tests/test_distributed.py passed on with the patch below.
# 3.14.0 and 3.15.1 were run; their patched functions are the same code.
TESTED_KERAS_MINORS = ((3, 14), (3, 15))

# What multi_worker_fit_fixes replaces or calls: (module, class or None, function, its parameters).
_TF_TRAINER = "keras.src.backend.tensorflow.trainer"
_PATCH_TARGETS = (
    (_TF_TRAINER, None, "reduce_per_replica", ("values", "strategy", "reduction")),
    (_TF_TRAINER, "TensorFlowTrainer", "_maybe_symbolic_build", ("self", "iterator", "data_batch")),
    ("keras.src.trainers.trainer", "Trainer", "_symbolic_build", ("self", "iterator", "data_batch")),
)


def tested_keras_range() -> str:
    """The pip requirement of the tested versions, e.g. ``keras>=3.14,<3.16``."""
    low, high = min(TESTED_KERAS_MINORS), max(TESTED_KERAS_MINORS)
    return f"keras>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}"


def _keras_minor(version: str) -> tuple[int, int] | None:
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _refusal(problem: str) -> HnsegError:
    return HnsegError(f"multi-worker training (TF_CONFIG) {problem}; install a tested keras "
                      f"(pip install '{tested_keras_range()}') or train on one worker (unset TF_CONFIG)")


def check_keras_version(version: str | None = None) -> None:
    """Refuse a Keras (default: the installed one) whose minor version the multi-worker patch was not tested on."""
    version = keras.__version__ if version is None else version
    if _keras_minor(version) not in TESTED_KERAS_MINORS:
        tested = ", ".join(f"{major}.{minor}" for major, minor in TESTED_KERAS_MINORS)
        raise _refusal(f"replaces private Keras functions (keras-team/keras#20585) and is tested on keras {tested}, "
                       f"not on keras {version} (supporting it needs tests/test_distributed.py, two worker "
                       "processes, to pass on it first)")


def _code_names(code: types.CodeType) -> set[str]:
    """Global and attribute names used by ``code`` and the functions defined inside it."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def check_patch_targets() -> None:
    """Refuse unless the private Keras functions the patch replaces exist with the expected parameters
    and ``fit`` still reaches them where the patch puts its replacements."""
    import importlib

    for module_name, class_name, name, parameters in _PATCH_TARGETS:
        try:
            owner = importlib.import_module(module_name)
        except ImportError:
            owner = None
        owner = getattr(owner, class_name, None) if class_name else owner
        function = getattr(owner, name, None)
        try:
            found = tuple(inspect.signature(function).parameters) if callable(function) else None
        except (TypeError, ValueError):
            found = None
        if found != parameters:
            where = ".".join(part for part in (module_name, class_name, name) if part)
            has = "lacks" if found is None else f"has as ({', '.join(found)})"
            raise _refusal(f"replaces the private Keras function {where}({', '.join(parameters)}), which "
                           f"keras {keras.__version__} {has}")
    trainer = importlib.import_module(_TF_TRAINER).TensorFlowTrainer
    for caller, callee in (("fit", "_maybe_symbolic_build"), ("_make_function", "reduce_per_replica")):
        code = getattr(inspect.unwrap(getattr(trainer, caller, None)), "__code__", None)  # fit: filter_traceback
        if code is None or callee not in _code_names(code):
            raise _refusal(f"replaces the private Keras function {callee}, which TensorFlowTrainer.{caller} of "
                           f"keras {keras.__version__} no longer calls")


def check_multi_worker_keras() -> None:
    """Both checks; run when a multi-worker run starts, before any TensorFlow collective is set up."""
    check_keras_version()
    check_patch_targets()


def strategy_from_environment():
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers, MirroredStrategy on >1 GPU,
    else the default (one device) strategy. Create it before any other TensorFlow op runs.

    Several workers with a Keras the multi-worker patch is not tested on: HnsegError.
    """
    import tensorflow as tf

    raw = os.environ.get("TF_CONFIG")
    if raw:
        try:
            cluster = json.loads(raw).get("cluster", {})
        except (json.JSONDecodeError, AttributeError):
            raise HnsegError("TF_CONFIG is not a JSON object with 'cluster' and 'task'; fix or unset it") from None
        if sum(len(cluster.get(role, [])) for role in ("chief", "worker")) > 1:
            check_multi_worker_keras()
            return tf.distribute.MultiWorkerMirroredStrategy()
    if len(tf.config.list_logical_devices("GPU")) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_multi_worker(strategy) -> bool:
    return strategy is not None and getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)()


def worker_identity(strategy) -> tuple[bool, int]:
    """``(is_chief, task index)``: the chief is task ``chief`` or, without one, worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True, 0
    roles = resolver.cluster_spec().as_dict()
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in roles)
    return chief, task_id


@contextlib.contextmanager
def multi_worker_fit_fixes(model, strategy, augment=None):
    """Work around keras-team/keras#20585: Keras 3.14/3.15 ``fit`` under MultiWorkerMirroredStrategy
    (1) all-reduces a whole ``(x, y)`` batch to build the model symbolically and (2) reduces the
    scalar step logs with ``axis=0``; the collective strategy rejects both. Only shapes matter for
    (1), so it builds from this worker's local batch (augmented first when ``augment`` is given);
    (2) becomes a mean over all workers. Refuses (HnsegError) a Keras it is not tested on.
    """
    check_multi_worker_keras()
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer as tf_trainer  # the module fit looks these up in

    def first_local(value):
        return strategy.experimental_local_results(value)[0] if isinstance(value, tf.distribute.DistributedValues) \
            else value

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = keras.tree.map_structure(first_local, next(batches))
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

    had_own_build = "_maybe_symbolic_build" in vars(model)
    model._maybe_symbolic_build = build
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original
        if not had_own_build:
            del model._maybe_symbolic_build
