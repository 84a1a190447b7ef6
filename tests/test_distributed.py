"""Multi-worker training (TF_CONFIG): the Keras version guard of the patch in training/distributed.py, and
two local worker processes that must train exactly what one process trains on the same global batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from test_training import _free_ports

from hnseg_keras.errors import HnsegError
from hnseg_keras.training import distributed

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the version guard


def test_installed_keras_is_a_tested_version_and_its_patched_functions_are_there():
    distributed.check_multi_worker_keras()


@pytest.mark.parametrize("version", ["3.16.0", "3.13.2", "4.0.0", "3.16.0.dev2026010100", "nightly"])
def test_untested_keras_version_is_refused_in_one_line(version):
    with pytest.raises(HnsegError) as error:
        distributed.check_keras_version(version)
    message = str(error.value)
    assert "\n" not in message
    assert f"not on keras {version}" in message and "private Keras functions" in message
    assert "tests/test_distributed.py" in message  # why: upgrading needs the two-process test re-run
    assert distributed.tested_keras_range() in message and "unset TF_CONFIG" in message  # what to do


def test_tested_range_covers_exactly_the_tested_minors():
    for major, minor in distributed.TESTED_KERAS_MINORS:
        distributed.check_keras_version(f"{major}.{minor}.0")
        distributed.check_keras_version(f"{major}.{minor}.7")
    assert distributed.tested_keras_range() == "keras>=3.14,<3.16"


def test_pyproject_pins_keras_to_the_tested_range():
    lines = (REPO / "pyproject.toml").read_text().splitlines()
    assert f'"{distributed.tested_keras_range()}",' in [line.strip() for line in lines]


def test_multi_worker_tf_config_with_untested_keras_is_refused_before_the_strategy_exists(monkeypatch):
    import tensorflow as tf

    def never(*args, **kwargs):
        raise AssertionError("MultiWorkerMirroredStrategy was created despite the untested keras")

    monkeypatch.setattr(tf.distribute, "MultiWorkerMirroredStrategy", never)
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                "task": {"type": "worker", "index": 0}}))
    with pytest.raises(HnsegError, match="not on keras 3.99.0"):
        distributed.strategy_from_environment()


def test_changed_private_function_is_refused_before_patching(monkeypatch):
    from keras.src.backend.tensorflow import trainer as tf_trainer

    monkeypatch.setattr(tf_trainer, "reduce_per_replica", lambda values, strategy: values)
    with pytest.raises(HnsegError) as error:
        distributed.check_patch_targets()
    assert "\n" not in str(error.value)
    assert "reduce_per_replica(values, strategy, reduction)" in str(error.value) and "(values, strategy)" in str(
        error.value)
    with pytest.raises(HnsegError, match="reduce_per_replica"), distributed.multi_worker_fit_fixes(None, None):
        pass
    monkeypatch.undo()
    monkeypatch.delattr(tf_trainer.TensorFlowTrainer, "_maybe_symbolic_build")
    with pytest.raises(HnsegError, match="_maybe_symbolic_build.*lacks"):
        distributed.check_patch_targets()


def test_fit_no_longer_calling_the_patched_function_is_refused(monkeypatch):
    from keras.src.backend.tensorflow import trainer as tf_trainer

    monkeypatch.setattr(tf_trainer.TensorFlowTrainer, "fit", lambda self, *args, **kwargs: None)
    with pytest.raises(HnsegError, match="TensorFlowTrainer.fit of keras .* no longer calls"):
        distributed.check_patch_targets()


# ----------------------------------------------------------------------------- two workers == one process

GLOBAL_BATCH, STEPS, EPOCHS = 8, 3, 2

# Run by every process: the strategy and the fit patch exactly as `hnseg train` sets them up
# (trainer.train / fit_run), a tiny conv net without batch norm, plain SGD, a deterministic dataset
# batched by the global batch and sharded by data as sources.ShardData.batches does.
TRAIN_SCRIPT = textwrap.dedent(f"""
    import contextlib, sys
    import numpy as np
    import keras
    import tensorflow as tf
    from hnseg_keras.training import distributed

    strategy = distributed.strategy_from_environment()
    multi_worker = distributed.is_multi_worker(strategy)
    assert multi_worker == (sys.argv[2] == "worker"), strategy
    keras.utils.set_random_seed(0)
    count = {GLOBAL_BATCH} * {STEPS}
    x = (np.arange(count * 64).reshape(count, 8, 8, 1) * 7 % 23 / 23.0).astype("float32")
    y = np.tanh(3.0 * x - 1.0) + 0.1 * np.arange(count).reshape(count, 1, 1, 1) / count
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    data = tf.data.Dataset.from_tensor_slices((x, y.astype("float32"))).batch({GLOBAL_BATCH}).repeat()
    with strategy.scope():
        inputs = keras.Input((8, 8, 1))
        hidden = keras.layers.Conv2D(4, 3, padding="same", activation="tanh")(inputs)
        model = keras.Model(inputs, keras.layers.Conv2D(1, 1)(hidden))
        model.compile(optimizer=keras.optimizers.SGD(0.2), loss="mse", metrics=["mae"])
    initial = {{f"initial_{{index}}": value for index, value in enumerate(model.get_weights())}}
    fixes = distributed.multi_worker_fit_fixes(model, strategy) if multi_worker else contextlib.nullcontext()
    with fixes:
        history = model.fit(data.with_options(options), epochs={EPOCHS}, steps_per_epoch={STEPS}, verbose=0,
                            shuffle=False)
    assert "_maybe_symbolic_build" not in vars(model)  # the patch is undone after fit
    np.savez(sys.argv[1], *model.get_weights(), loss=np.array(history.history["loss"]),
             mae=np.array(history.history["mae"]), replicas=strategy.num_replicas_in_sync,
             chief=distributed.worker_identity(strategy)[0], keras=keras.__version__, **initial)
""")


def _start(out: Path, role: str, tf_config: dict | None) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="-1", KERAS_BACKEND="tensorflow")
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, str(out), role], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_local_workers_end_with_the_weights_of_one_process_on_the_same_global_batches(tmp_path):
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    outs = [tmp_path / "worker-0.npz", tmp_path / "worker-1.npz", tmp_path / "single.npz"]
    processes = [_start(outs[index], "worker", {"cluster": {"worker": workers},
                                                "task": {"type": "worker", "index": index}})
                 for index in range(2)]
    processes.append(_start(outs[2], "single", None))
    try:
        results = [process.communicate(timeout=300) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err[-3000:]
    worker_0, worker_1, single = (np.load(out) for out in outs)
    assert (int(worker_0["replicas"]), int(worker_1["replicas"]), int(single["replicas"])) == (2, 2, 1)
    assert bool(worker_0["chief"]) and not bool(worker_1["chief"])
    assert {str(result["keras"]) for result in (worker_0, worker_1, single)} == {keras.__version__}
    weights = sorted(key for key in single.files if key.startswith("arr_"))
    assert weights and sorted(key for key in worker_0.files if key.startswith("arr_")) == weights
    # Training moved the weights (the comparison is not between untrained models) and lowered the loss.
    assert not np.allclose(single["arr_0"], single["initial_0"], rtol=1e-3) and single["loss"][-1] < single["loss"][0]
    for key in weights:
        np.testing.assert_array_equal(worker_0[key], worker_1[key])  # mirrored: identical on every worker
        np.testing.assert_allclose(worker_0[key], single[key], rtol=1e-4, atol=1e-6, err_msg=key)
    # The step logs are a mean over all workers (the patched reduce_per_replica): the single process's.
    for log in ("loss", "mae"):
        np.testing.assert_allclose(worker_0[log], single[log], rtol=1e-4, err_msg=log)
        np.testing.assert_allclose(worker_1[log], single[log], rtol=1e-4, err_msg=log)
