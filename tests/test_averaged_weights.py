"""Moving average of the weights (``ema_momentum``) and the seed-spread summary of the benchmark."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import keras
import numpy as np
import pytest

from hnseg_keras.errors import HnsegError
from hnseg_keras.training import callbacks as cb
from hnseg_keras.training.config import load_config

REPO = Path(__file__).resolve().parents[1]
MOMENTUM = 0.5


class RawWeights(keras.callbacks.Callback):
    """Records the model's kernel after every training step (the raw, not the averaged, weights)."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(keras.ops.convert_to_numpy(self.model.weights[0]).copy())


class StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


def fit_line(epochs: int, extra: list, backup: Path | None = None) -> tuple[keras.Model, RawWeights]:
    """A 2 -> 1 linear model fitted with averaged Adam for 3 steps per epoch on fixed data."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    model.compile(optimizer=keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=MOMENTUM), loss="mse")
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]] * 2, np.float32)
    y = x @ np.array([[2.0], [-1.0]], np.float32)
    raw, averaged = RawWeights(), cb.AveragedWeights()
    callbacks = [raw, averaged, averaged.back_to_raw()]
    callbacks += [keras.callbacks.BackupAndRestore(str(backup))] if backup else []
    model.fit(x, y, batch_size=2, epochs=epochs, shuffle=False, verbose=0, validation_data=(x, y),
              callbacks=[*callbacks, *extra])
    return model, raw


def expected_average(steps: list[np.ndarray]) -> np.ndarray:
    """Adam's moving average: the first step's weights, then ``m * average + (1 - m) * weights``."""
    average = steps[0]
    for weights in steps[1:]:
        average = MOMENTUM * average + (1 - MOMENTUM) * weights
    return average


@pytest.mark.parametrize("epochs, extra", [(2, []), (3, [StopAfterFirstEpoch()])],
                         ids=["all epochs", "stopped early"])
def test_training_ends_with_the_moving_average_of_the_raw_weights(epochs, extra):
    model, raw = fit_line(epochs, extra)
    final = keras.ops.convert_to_numpy(model.weights[0])
    assert not np.allclose(final, raw.steps[-1], atol=1e-4)  # the average differs from the last step
    np.testing.assert_allclose(final, expected_average(raw.steps), rtol=1e-5, atol=1e-6)


class Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise KeyboardInterrupt


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    whole, _ = fit_line(3, [])
    with pytest.raises(KeyboardInterrupt):
        fit_line(3, [Interrupt()], tmp_path / "backup")  # the backup holds epoch 1
    resumed, raw = fit_line(3, [], tmp_path / "backup")
    assert len(raw.steps) == 6  # epochs 2 and 3 only
    np.testing.assert_allclose(keras.ops.convert_to_numpy(resumed.weights[0]),
                               keras.ops.convert_to_numpy(whole.weights[0]), rtol=1e-6, atol=1e-7)


def test_ema_momentum_must_be_a_fraction():
    assert load_config("S", None, ["ema_momentum=0.99"]).ema_momentum == 0.99
    for value in ("1.0", "0", "true"):
        with pytest.raises(HnsegError, match="ema_momentum"):
            load_config("S", None, [f"ema_momentum={value}"])


def test_seed_spread_summary_gives_mean_sd_and_worst():
    spec = importlib.util.spec_from_file_location("seed_spread", REPO / "benchmarks" / "seed_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seeds = [{"seed": i, "best_val_dice": v, "test_dice": t, "organ_dice": {"Mandible": m}, "wall_time_s": w}
             for i, (v, t, m, w) in enumerate([(0.8, 0.9, 0.7, 60.0), (0.9, 0.8, 0.9, 120.0)])]
    summary = module.summarize(seeds)
    assert summary["test_dice"] == pytest.approx({"mean": 0.85, "sd": 0.1 / 2 ** 0.5, "worst": 0.8})
    assert summary["organ_dice"]["Mandible"]["worst"] == 0.7 and summary["wall_time_s_max"] == 120.0
    text = module.table({"seeds": seeds, "summary": summary})
    assert "| 1 | 0.900 | 80.0 | 90.0 | 2.0 |" in text and "| **worst** | 0.800 | 80.0 | 70.0 | 2.0 (max) |" in text


def test_seed_spread_runs_the_openkbp_profile_as_documented(tmp_path):
    spec = importlib.util.spec_from_file_location("seed_spread", REPO / "benchmarks" / "seed_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, data, cases = tmp_path / "seed-2", tmp_path / "shards" / "manifest.json", tmp_path / "cases"
    commands = module.openkbp_commands(2, out, ["epochs=3"], None, data, cases)
    assert [command[3] for command in commands] == ["train", "export", "predict", "evaluate"]
    train, export, predict, evaluate = (command[4:] for command in commands)
    assert train == ["--config", str(REPO / "configs" / "openkbp.json"), "--data", str(data), "--out",
                     str(out / "run"), "--set", "seed=2", "--set", "pipeline.seed=2", "--set", "epochs=3"]
    assert export == [str(out / "run"), "--out", str(out / "export"), "--which", "final"]
    assert predict[:3] == [str(cases), "--split", "validation"] and "--largest-component" in predict
    assert evaluate[:4] == ["--pred", str(out / "pred"), "--gt", str(cases / "validation")]
