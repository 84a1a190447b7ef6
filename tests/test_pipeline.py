"""tf.data pipelines: documented shapes, reproducible seeds, exact validation crop, manifest statistics."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs import augment, pipeline, train_step
from hnseg_keras.inputs.augment import AugmentConfig
from hnseg_keras.inputs.batching import organ_repeats, slice_repeats
from hnseg_keras.inputs.pipeline import PipelineConfig

SIZE, CROP, ORGANS = 40, 32, 2
AUG = AugmentConfig(crop_size=CROP, warp_probability=1.0, elastic_sigma=8.0)
PIPE = PipelineConfig(batch_size=4, shuffle_buffer=16, seed=5)


def _examples(count=10, seed=0):
    """Numpy example dicts in the shard contract's dtypes (with ids that the pipeline drops)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(-1024, 1500, (count, SIZE, SIZE, 1)).astype(np.int16)
    masks = np.zeros((count, SIZE, SIZE, ORGANS), np.uint8)
    for i in range(count):
        masks[i, 10 + i : 20 + i, 12:22, i % ORGANS] = 1
    dist = np.where(masks > 0, -3, 5).astype(np.int8)
    return {"image": image, "masks": masks, "dist_maps": dist, "annotated": np.ones((count, ORGANS), np.uint8),
            "case_id": np.array([f"c{i}" for i in range(count)]), "slice_index": np.arange(count, dtype=np.int64)}


def _dataset(count=10):
    return tf.data.Dataset.from_tensor_slices(_examples(count))


def _collect(dataset):
    return [(x.numpy(), y.numpy()) for x, y in dataset]


def test_train_batches_have_the_documented_shapes():
    batches = _collect(pipeline.build_train_dataset(_dataset(10), PIPE, AUG, np.array([0.1, 0.3], np.float32)))
    assert len(batches) == 2  # 10 examples, batch 4, remainder dropped
    for x, y in batches:
        assert x.shape == (4, CROP, CROP, 1) and x.dtype == np.float32
        assert y.shape == (4, CROP, CROP, 4 * ORGANS + 1) and y.dtype == np.float32
        assert x.min() >= -155.001 and x.max() <= 195.001
        assert set(np.unique(y[..., :ORGANS])) <= {0.0, 1.0}
        lam = y[:, :, :, -1]
        assert np.all(lam == lam[:, :1, :1]) and np.all((lam >= 0) & (lam <= 1))


def test_rare_organ_slices_repeat_in_proportion_to_rarity():
    weights = 1.0 / np.array([160, 164, 158, 166, 52, 49])  # the demo's foreground-slice counts
    repeats = organ_repeats(weights, 4)
    assert repeats.tolist() == [1, 1, 1, 1, 3, 3] and organ_repeats(weights, 2).tolist() == [1, 1, 1, 1, 2, 2]
    masks = np.zeros((4, 8, 8, 6), np.uint8)
    masks[1, 2, 2, 4] = masks[2, 2, 2, 0] = masks[3, 1, 1, 0] = masks[3, 1, 1, 5] = 1
    examples = tf.data.Dataset.from_tensor_slices({"masks": masks, "i": np.arange(4)})
    assert [int(e["i"]) for e in pipeline.repeat_rare(examples, repeats)] == [0, 1, 1, 1, 2, 3, 3, 3]
    assert slice_repeats(masks.any(axis=(1, 2)), repeats).tolist() == [1, 3, 1, 3]  # the arrays path's count
    # In the training stream: organ 1 (odd examples) is 4x rarer in weight, so its slices come twice.
    oversampled = dataclasses.replace(PIPE, rare_organ_repeats=2, shuffle_buffer=1)
    assert len(_collect(pipeline.build_train_dataset(_dataset(8), oversampled, AUG, [0.1, 0.4]))) == 3  # 12 // 4
    assert len(_collect(pipeline.build_train_dataset(_dataset(8), PIPE, AUG, [0.1, 0.4]))) == 2


def test_same_seed_same_stream_and_epochs_differ():
    first = _collect(pipeline.build_train_dataset(_dataset(), PIPE, AUG))
    dataset = pipeline.build_train_dataset(_dataset(), PIPE, AUG)
    again, second_epoch = _collect(dataset), _collect(dataset)
    other = _collect(pipeline.build_train_dataset(_dataset(), dataclasses.replace(PIPE, seed=6), AUG))
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(first[0][0], second_epoch[0][0])  # re-shuffled and re-augmented
    assert not np.array_equal(first[0][0], other[0][0])


def test_batch_seeds_are_distinct_across_repeated_epochs():
    seeds = tf.data.Dataset.zip(tf.data.Dataset.range(3), pipeline.batch_seeds(5)).map(lambda i, s: s).repeat(2)
    values = [tuple(seed.numpy()) for seed in seeds]
    assert len(values) == 6 and len(set(values)) == 6
    assert values == [tuple(seed.numpy()) for seed in
                      tf.data.Dataset.zip(tf.data.Dataset.range(3), pipeline.batch_seeds(5)).map(lambda i, s: s).repeat(2)]


def test_pipeline_stages_equal_augment_batch_on_device():
    """The in-pipeline path (draws in tf.data, XLA resampling) and the on-device path agree."""
    on_host = _collect(pipeline.build_train_dataset(_dataset(), PIPE, AUG, [0.2, 0.5]))
    raw = pipeline.build_train_dataset(_dataset(), dataclasses.replace(PIPE, augment_on_device=True), AUG)
    for (x_host, y_host), (batch, seed) in zip(on_host, raw, strict=True):
        assert batch["image"].shape == (4, SIZE, SIZE, 1) and seed.shape == (2,)
        x, y = train_step.device_augment(batch, seed, AUG, tf.constant([0.2, 0.5]))
        np.testing.assert_allclose(x.numpy(), x_host, atol=1e-3)
        np.testing.assert_allclose(y.numpy(), y_host, atol=1e-3)


@pytest.mark.parametrize("jit", [True, False])
def test_without_warps_training_crops_are_exact_integer_crops(jit):
    examples = _examples(4)
    config = dataclasses.replace(AUG, warp_probability=0.0, mixup=False)
    pipe = dataclasses.replace(PIPE, shuffle_buffer=1, jit_compile=jit)  # keep the order
    (x, y), = _collect(pipeline.build_train_dataset(_dataset(4), pipe, config))
    windowed = np.clip(examples["image"].astype(np.float32), -155, 195)
    for b in range(4):
        hits = [(i, j) for i in range(SIZE - CROP + 1) for j in range(SIZE - CROP + 1)
                if np.array_equal(x[b], windowed[b, i : i + CROP, j : j + CROP])]
        assert len(hits) == 1
        i, j = hits[0]
        np.testing.assert_array_equal(y[b, ..., :ORGANS], examples["masks"][b, i : i + CROP, j : j + CROP])


def test_validation_is_the_exact_centre_crop_without_mixup():
    examples = _examples(6)
    batches = _collect(pipeline.build_validation_dataset(_dataset(6), PIPE, AUG))
    assert [x.shape[0] for x, _ in batches] == [4, 2]  # no remainder dropped
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    top = (SIZE - CROP) // 2
    window = slice(top, top + CROP)
    np.testing.assert_array_equal(x, np.clip(examples["image"][:, window, window].astype(np.float32), -155, 195))
    np.testing.assert_array_equal(y[..., :ORGANS], examples["masks"][:, window, window])
    np.testing.assert_array_equal(y[..., 2 * ORGANS : 3 * ORGANS], y[..., :ORGANS])  # partner = itself
    np.testing.assert_array_equal(y[..., -1], 1.0)


def test_unannotated_organs_are_flagged_in_the_target():
    examples = _examples(4)
    examples["annotated"][:, 1] = 0
    examples["masks"][:, :, :, 1] = 0
    ds = tf.data.Dataset.from_tensor_slices(examples)
    _, y = next(iter(pipeline.build_train_dataset(ds, PIPE, dataclasses.replace(AUG, mixup=False))))
    assert np.all(y.numpy()[..., 1] == -1.0) and np.all(y.numpy()[..., 0] >= 0.0)


def _manifest(counts=None, foreground=(10, 0, 4)):
    histogram = {"first_hu": -1024, "bin_hu": 1, "counts": counts if counts is not None else [0] * 4096}
    organs = {name: {"foreground_slices": n} for name, n in zip("abc", foreground, strict=True)}
    return SimpleNamespace(organs=list("abc"), splits={"train": {"organs": organs}}, intensity_histogram=histogram)


def test_organ_weights_are_inverse_foreground_slice_counts():
    np.testing.assert_allclose(pipeline.organ_weights_from_manifest(_manifest()), [0.1, 1.0, 0.25])


def test_intensity_stats_are_exact_after_the_window():
    counts = [0] * 4096
    for hu, n in ((-1024, 2), (0, 1), (300, 1)):
        counts[hu + 1024] = n
    mean, std = pipeline.intensity_stats(_manifest(counts), (-155.0, 195.0))
    clipped = np.array([-155.0, -155.0, 0.0, 195.0])  # -1024 x2 -> -155, 300 -> 195
    assert mean == pytest.approx(clipped.mean()) and mean == pytest.approx(-28.75)
    assert std == pytest.approx(clipped.std())
    mean_full, _ = pipeline.intensity_stats(_manifest(counts), None)
    assert mean_full == pytest.approx((-1024 * 2 + 0 + 300) / 4)
    with pytest.raises(HnsegError, match="empty"):
        pipeline.intensity_stats(_manifest(), (-155.0, 195.0))


def _write_manifest(root):
    from hnseg_keras.data.shards import CaseRecord, Manifest, ShardInfo, ShardWriter, hu_histogram

    examples = _examples(6)
    records = []
    for split, rows in (("train", range(4)), ("validation", range(4, 6))):
        with ShardWriter(root / split, split) as writer:
            for i in rows:
                writer.write({key: value[i] for key, value in examples.items()} | {"spacing": [1.0, 1.0, 2.0]})
        shards = [ShardInfo(f"{split}/{info.file}", info.slices, info.bytes, info.sha256) for info in writer.finished]
        stats = {name: {"annotated_slices": 4, "foreground_slices": 2, "foreground_pixels": 200} for name in "ab"}
        records.append(CaseRecord(split, split, len(rows), shards, {}, [1, 1], stats,
                                  hu_histogram(examples["image"][list(rows)]).tolist()))
    manifest = Manifest.from_records(records, organs=["a", "b"], slicing={}, image_shape=[SIZE, SIZE, 1])
    manifest.save(root / "manifest.json")
    return root / "manifest.json"


def test_wrappers_read_shards_from_a_manifest(tmp_path):
    path = _write_manifest(tmp_path)
    pipe = dataclasses.replace(PIPE, batch_size=2)
    train = _collect(pipeline.train_dataset(path, pipe, AUG))
    assert len(train) == 2 and train[0][0].shape == (2, CROP, CROP, 1)
    validation = _collect(pipeline.validation_dataset(path, pipe, AUG))
    assert [x.shape[0] for x, _ in validation] == [2]
    with pytest.raises(HnsegError, match="crop_size 64"):
        pipeline.train_dataset(path, pipe, dataclasses.replace(AUG, crop_size=64))


def test_augment_rejects_a_crop_larger_than_the_slices():
    batch = {key: tf.convert_to_tensor(value[:2]) for key, value in _examples(2).items() if key in pipeline.EXAMPLE_KEYS}
    with pytest.raises(HnsegError, match="crop_size 48"):  # the one crop check, for every caller
        augment.augment_batch(batch, [1, 1], dataclasses.replace(AUG, crop_size=48))


def test_render_tile_draws_each_organ_contour_in_its_colour():
    from hnseg_keras.inputs.preview import render_tile
    from hnseg_keras.render import organ_colour

    image = np.full((12, 12, 3), 20.0, np.float32)  # centre channel at the window's middle -> gray 128
    masks = np.zeros((12, 12, 2), np.float32)
    masks[2:7, 2:7, 0] = 1  # 5x5 square: 16 boundary pixels, 9 interior
    tile = render_tile(image, masks, ["BrainStem", "Parotid_L"], (-155.0, 195.0))
    coloured = np.all(tile == organ_colour("BrainStem"), axis=-1)
    assert coloured.sum() == 16 and not coloured[4, 4] and coloured[2, 2]
    assert np.all(tile[4, 4] == 128) and not np.any(np.all(tile == organ_colour("Parotid_L"), axis=-1))


def test_preview_cli_writes_a_grid_and_refuses_to_overwrite(tmp_path, capsys):
    from PIL import Image

    from hnseg_keras import cli

    path = _write_manifest(tmp_path)
    out = tmp_path / "grid.png"
    args = ["preview", "--data", str(path), "--out", str(out), "--count", "4", "--seed", "1"]
    assert cli.main(args) == 0
    with Image.open(out) as grid:
        assert grid.size[0] == 2 * SIZE and grid.size[1] > 2 * SIZE  # 2x2 tiles (crop 256 -> 40) + legend
    assert cli.main(args) == 2 and "--force" in capsys.readouterr().err
    assert cli.main([*args, "--force", "--set", "mixup=false"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png" or ".tmp" in p.name) == ["grid.png"]


def test_configs_round_trip_through_json():
    from hnseg_keras import configs

    for config in (AugmentConfig(window=None, crop_size=None), AUG, PipelineConfig(cache="memory"), PIPE):
        assert configs.from_dict(type(config), configs.to_dict(config)) == config
    with pytest.raises(HnsegError, match="batch_size"):
        PipelineConfig(batch_size=0)
