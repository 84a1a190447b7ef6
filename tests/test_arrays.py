"""The numpy copy of a split (``hnseg arrays``): exact round trip, shared planes, aligned crops, clean errors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs import arrays
from hnseg_keras.inputs.arrays import RawBatches, SliceArrays, from_examples, quantise
from hnseg_keras.inputs.augment import AugmentConfig
from hnseg_keras.inputs.train_step import device_augment

REPO = Path(__file__).resolve().parents[1]
WINDOW = (-155.0, 195.0)
STEP_HU = (WINDOW[1] - WINDOW[0]) / 255  # one uint8 code


def _examples(k=1, size=8, slices=(3, 4, 5, 9), organs=2):
    """2.5D examples of one volume whose plane z holds the constant HU 10 * z (+ a ramp in x)."""
    out = []
    for s in slices:
        image = np.stack([np.full((size, size), 10.0 * (s + j - k)) + np.arange(size) for j in range(2 * k + 1)], -1)
        masks = np.zeros((size, size, organs), np.uint8)
        masks[s % size, :, 0] = 1
        masks[:, s % size, organs - 1] = 1
        out.append({"image": image.astype(np.int16), "masks": masks, "annotated": np.array([1, s % 2], np.uint8),
                    "case_id": b"case_a", "slice_index": s})
    return out


def test_planes_are_shared_and_images_come_back_within_one_code():
    examples = _examples()
    data = from_examples(examples, ["BrainStem", "Mandible"], {"neighbours": 1}, WINDOW)
    # slices 3, 4, 5 (k=1) need planes 2..6, slice 9 needs 8..10: 5 + 3 planes, not 4 x 3
    assert data.planes.shape == (8, 8, 8)
    for i, example in enumerate(examples):
        back = data.images([i])[0]
        assert back.shape == (8, 8, 3)
        np.testing.assert_allclose(back, example["image"], atol=STEP_HU / 2 + 1e-4)
        np.testing.assert_array_equal(data.organ_masks([i])[0], example["masks"])
        np.testing.assert_array_equal(data.annotated[i], example["annotated"])
    assert list(data.slice_index) == [3, 4, 5, 9] and set(data.case_ids) == {"case_a"}


def test_quantise_clips_to_the_window():
    codes = quantise(np.array([-1024, -155, 20, 195, 3000]), WINDOW)
    np.testing.assert_array_equal(codes, [0, 0, round(175 / STEP_HU), 255, 255])


def test_fewer_neighbours_is_the_middle_of_the_channels():
    data = from_examples(_examples(k=2), ["BrainStem", "Mandible"], {"neighbours": 2}, WINDOW)
    one = data.neighbours(1)
    np.testing.assert_array_equal(one.images([0]), data.images([0])[..., 1:4])
    assert one.meta["slicing"]["neighbours"] == 1 and data.meta["slicing"]["neighbours"] == 2
    np.testing.assert_array_equal(data.neighbours(0).images([2])[..., 0], data.images([2])[..., 2])
    with pytest.raises(HnsegError, match="neighbours 0..2"):
        data.neighbours(3)


def test_save_load_round_trip_leaves_no_temporary_file(tmp_path):
    data = from_examples(_examples(), ["BrainStem", "Mandible"], {"neighbours": 1}, WINDOW, {"hu_mean": 1.5})
    path = data.save(tmp_path / "sub" / "train.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.npz"]
    back = SliceArrays.load(path)
    for key in ("planes", "channels", "masks", "annotated", "case_ids", "slice_index"):
        np.testing.assert_array_equal(getattr(back, key), getattr(data, key))
    assert back.meta == data.meta and back.organs == ["BrainStem", "Mandible"] and back.window == WINDOW


def test_load_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(HnsegError, match="no such arrays file"):
        SliceArrays.load(tmp_path / "nope.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(HnsegError, match="not a readable hnseg arrays file"):
        SliceArrays.load(tmp_path / "other.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(HnsegError, match="not a readable"):
        SliceArrays.load(tmp_path / "text.npz")


def test_more_than_eight_organs_is_refused():
    with pytest.raises(HnsegError, match="at most 8"):
        from_examples(_examples(organs=9), [f"o{i}" for i in range(9)], {}, WINDOW)


def _positional_examples(size=12, count=6):
    """Channel 0 = 50 * example, channel 1 encodes (row, col); mask 1 marks row == example."""
    rows, cols = np.indices((size, size))
    position = 3 * (rows * size + cols)
    examples = []
    for s in range(count):
        image = np.stack([np.full((size, size), 50 * s), position, np.zeros((size, size))], -1)
        masks = np.stack([(rows + cols) % 3 == 0, rows == s], -1).astype(np.uint8)
        examples.append({"image": image.astype(np.int16), "masks": masks, "annotated": np.array([1, s % 2]),
                         "case_id": f"c{s}", "slice_index": 0})
    return examples, from_examples(examples, ["BrainStem", "Mandible"], {}, (-10.0, 500.0))  # 2 HU per code


def test_export_matches_the_tfrecord_split(tiny_phantom_root, tmp_path):
    config = PrepareConfig(organs=("BrainStem", "Mandible", "Parotid_L"),
                           slicing=SlicingConfig(size=32, spacing_mm=None, neighbours=1))
    prepare(tiny_phantom_root, tmp_path / "shards", config)
    out = arrays.export_split(tmp_path / "shards", "train", tmp_path / "train.npz", WINDOW)
    data = SliceArrays.load(out)
    from hnseg_keras.data.shards import read_split

    examples = list(read_split(tmp_path / "shards" / "manifest.json", "train").as_numpy_iterator())
    assert len(data) == len(examples) > 0
    assert data.planes.shape[0] < 3 * len(examples)  # neighbours shared
    for i, example in enumerate(examples):
        want = np.clip(example["image"].astype(np.float32), *WINDOW)
        np.testing.assert_allclose(data.images([i])[0], want, atol=STEP_HU / 2 + 1e-3)
        np.testing.assert_array_equal(data.organ_masks([i])[0], example["masks"])
        np.testing.assert_array_equal(data.annotated[i], example["annotated"])
    assert data.meta["slicing"]["neighbours"] == 1 and data.meta["hu_std"] > 0
    with pytest.raises(HnsegError, match="--force"):
        arrays.export_split(tmp_path / "shards", "train", out, WINDOW)


def test_cli_errors_are_one_line(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", "hnseg_keras.cli", "arrays", str(tmp_path), "--out",
                             str(tmp_path / "a.npz"), "--window", "100", "0"], capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "LOW must be below HIGH" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="JAX is not installed")
def test_raw_batches_hand_whole_slices_and_a_seed_to_the_train_step():
    examples, data = _positional_examples()
    batches = RawBatches(data, batch_size=5, steps=3, seed=4)
    batch, seed = batches[1]
    again, seed_again = batches[1]
    assert seed.dtype == np.int32 and seed.shape == (2,) and np.array_equal(seed, seed_again)
    np.testing.assert_array_equal(batch["image"], again["image"])
    assert batch["image"].shape == (5, 12, 12, 3) and batch["masks"].shape == (5, 12, 12, 2)
    for b in range(5):
        s = int(round(batch["image"][b, 0, 0, 0] / 50))
        np.testing.assert_allclose(batch["image"][b], data.images([s])[0])
        np.testing.assert_array_equal(batch["masks"][b], examples[s]["masks"])
        np.testing.assert_array_equal(batch["annotated"][b], [1, s % 2])
    assert not batch["dist_maps"].any()
    # What the train step makes of it: aligned 7 px crops, -1 where the organ is not annotated.
    x, y = device_augment(batch, seed, AugmentConfig(window=(-10.0, 500.0), crop_size=7, warp_probability=0.0,
                                                     mixup=False))
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == (5, 7, 7, 3) and y.shape == (5, 7, 7, 9)
    for b in range(5):
        s = int(round(x[b, 0, 0, 0] / 50))
        r0, c0 = divmod(int(round(x[b, 0, 0, 1] / 3)), 12)
        window = (slice(r0, r0 + 7), slice(c0, c0 + 7))
        np.testing.assert_array_equal(y[b, ..., 0], examples[s]["masks"][window][..., 0])
        np.testing.assert_array_equal(y[b, ..., 1], examples[s]["masks"][window][..., 1] if s % 2 else -1.0)


def test_each_epoch_draws_new_batches_reproducibly():
    _, data = _positional_examples()
    batches = RawBatches(data, batch_size=4, steps=2, seed=1)
    first = batches[0][1]
    batches.on_epoch_end()
    second = batches[0][1]
    assert not np.array_equal(first, second)
    replay = RawBatches(data, batch_size=4, steps=2, seed=1)
    replay.on_epoch_end()
    np.testing.assert_array_equal(replay[0][1], second)


def test_organ_weights_are_inverse_foreground_slice_counts():
    _, data = _positional_examples(count=6)  # organ 0 in every slice; organ 1 (row == s) in all 6 too
    np.testing.assert_allclose(data.organ_weights(), [1 / 6, 1 / 6])
    examples = _examples(slices=(3, 4, 5, 9))  # organ 1 is column s % 8 in each of the 4 slices
    for example in examples[:3]:
        example["masks"][..., 0] = 0
    data = from_examples(examples, ["BrainStem", "Mandible"], {}, WINDOW)
    np.testing.assert_allclose(data.organ_weights(), [1.0, 1 / 4])


def test_rare_organ_slices_are_drawn_as_often_as_their_repeats():
    examples = _examples(slices=(3, 4, 5, 9))
    for example in examples[1:]:
        example["masks"][..., 1] = 0  # organ 1 only in the first of the four slices: repeats [1, 2]
    data = from_examples(examples, ["BrainStem", "Mandible"], {}, WINDOW)
    assert data.organ_presence().tolist() == [[True, True], [True, False], [True, False], [True, False]]
    weighted = RawBatches(data, batch_size=4, steps=500, seed=3, rare_organ_repeats=4)
    np.testing.assert_allclose(weighted.probabilities, [2 / 5, 1 / 5, 1 / 5, 1 / 5])
    drawn = np.concatenate([weighted._draw(i)[1] for i in range(500)])
    assert abs(np.mean(drawn == 0) - 0.4) < 0.03  # 2000 draws: sd 0.011
    assert RawBatches(data, batch_size=4, steps=1, seed=3).probabilities is None  # uniform by default


@pytest.mark.parametrize("augment", [["augment.warp_probability=0"], ["augment.warp_probability=1", "augment.mixup=true"]],
                         ids=["crop-only", "warp-and-mixup"])
def test_hnseg_train_on_arrays_runs_under_jax_without_tensorflow(tmp_path, augment):
    """The GPU machine's conditions: KERAS_BACKEND=jax and no TensorFlow importable at all."""
    rows, cols = np.indices((32, 32))
    examples = [{"image": np.repeat(np.where((rows - 16) ** 2 + (cols - 10 - s) ** 2 < 30, 60, -50)[..., None], 3,
                                    -1).astype(np.int16),
                 "masks": (((rows - 16) ** 2 + (cols - 10 - s) ** 2 < 30)[..., None]).astype(np.uint8),
                 "annotated": np.array([1]), "case_id": "c", "slice_index": s} for s in range(8)]
    data = from_examples(examples, ["BrainStem"], {"size": 32, "spacing_mm": None, "neighbours": 1,
                                                   "empty_slice_margin": 3, "empty_slice_share": 0.1,
                                                   "body_threshold_hu": -500.0}, WINDOW,
                         {"hu_mean": 0.0, "hu_std": 50.0, "manifest": "shards", "manifest_sha256": "0" * 64})
    data.save(tmp_path / "train.npz")
    hide = tmp_path / "hide" / "tensorflow"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('no TensorFlow on this machine')\n")
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=f"{hide.parent}{os.pathsep}{REPO}", JAX_PLATFORMS="cpu")
    settings = ["model.filters=[4,8]", "augment.crop_size=16", "pipeline.batch_size=4", "pipeline.parallel_calls=0",
                "lr_schedule=cosine", *augment]
    result = subprocess.run([sys.executable, "-m", "hnseg_keras.cli", "train", "--data", str(tmp_path / "train.npz"),
                             "--out", str(tmp_path / "run"), "--epochs", "2", "--steps-per-epoch", "2",
                             *[item for value in settings for item in ("--set", value)]],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["backend"] == "jax" and summary["status"] == "finished" and summary["epochs_run"] == 2
    described = json.loads((run / "data.json").read_text())
    assert described["organs"] == ["BrainStem"] and described["image_shape"] == [32, 32, 3]
    assert described["normalisation"] == {"window": list(WINDOW), "hu_mean": 0.0, "hu_std": 50.0}
    assert described["manifest"] == "shards"
    import keras

    from hnseg_keras.inference.model_io import load_keras_model
    from hnseg_keras.inference.prediction import load_predictor

    model = load_keras_model(run / "final.keras")  # saved under JAX, loads here
    assert model.input_shape[-1] == 3
    probs = keras.ops.convert_to_numpy(model(data.images([0])))
    assert probs.shape == (1, 32, 32, 1) and np.all((probs >= 0) & (probs <= 1))
    assert load_predictor(run).organs == ("BrainStem",)  # the run folder describes itself


def test_arrays_without_validation_refuse_the_plateau_schedule(tmp_path, capsys):
    _, data = _positional_examples(count=6)
    data.save(tmp_path / "train.npz")
    from hnseg_keras import cli

    assert cli.main(["train", "--data", str(tmp_path / "train.npz"), "--set", "lr_schedule=plateau",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "lr_schedule=cosine" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
