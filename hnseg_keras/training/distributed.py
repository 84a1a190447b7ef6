"""Distribution strategies for ``hnseg train`` (TensorFlow only): several GPUs or several workers.

TensorFlow is imported inside the functions, so training from arrays under another backend never
loads it.
"""

from __future__ import annotations

import contextlib
import json
import os

import keras

from hnseg_keras.errors import HnsegError


def strategy_from_environment():
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers, MirroredStrategy on >1 GPU,
    else the default (one device) strategy. Create it before any other TensorFlow op runs."""
    import tensorflow as tf

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
    """Work around keras-team/keras#20585: Keras 3.15 ``fit`` under MultiWorkerMirroredStrategy
    (1) all-reduces a whole ``(x, y)`` batch to build the model symbolically and (2) reduces the
    scalar step logs with ``axis=0``; the collective strategy rejects both. Only shapes matter for
    (1), so it builds from this worker's local batch (augmented first when ``augment`` is given);
    (2) becomes a mean over all workers.
    """
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

    model._maybe_symbolic_build = build
    tf_trainer.reduce_per_replica = reduce_per_replica
    try:
        yield
    finally:
        tf_trainer.reduce_per_replica = original
