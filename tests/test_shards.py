"""Records read back equal their source slices; shards are bounded, atomic and verified."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf
from test_slicing import ORGANS, make_case

from hnseg_keras.data.shards import (
    HIST_BINS,
    CaseRecord,
    Manifest,
    ShardInfo,
    ShardWriter,
    encode_example,
    hu_histogram,
    parse_example,
    read_split,
    sha256_file,
)
from hnseg_keras.data.slicing import SlicingConfig, slice_case
from hnseg_keras.errors import HnsegError

CONFIG = SlicingConfig(size=32, spacing_mm=1.0, neighbours=1, empty_slice_margin=1, empty_slice_share=0.0)


def _examples(with_mandible=False):
    return list(slice_case(make_case(with_mandible=with_mandible), ORGANS, CONFIG))


def _assert_same(parsed, source):
    for key in ("image", "masks", "dist_maps", "annotated", "spacing"):
        value = parsed[key].numpy() if hasattr(parsed[key], "numpy") else parsed[key]
        assert value.dtype == np.asarray(source[key]).dtype, key
        np.testing.assert_array_equal(value, source[key], err_msg=key)
    assert parsed["case_id"].numpy().decode() == source["case_id"]
    assert int(parsed["slice_index"]) == source["slice_index"]


def test_parse_example_is_exact_with_static_shapes():
    source = _examples()[2]
    parsed = parse_example(tf.constant(encode_example(source)), (32, 32, 3), len(ORGANS))
    _assert_same(parsed, source)
    assert parsed["image"].shape == (32, 32, 3) and parsed["dist_maps"].shape == (32, 32, 3)
    assert parsed["annotated"].numpy().tolist() == [1, 0, 1]  # Mandible missing -> not annotated


def _write_dataset(tmp_path, examples, max_bytes):
    with ShardWriter(tmp_path, "train/c001", max_bytes=max_bytes) as writer:
        for example in examples:
            writer.write(example)
    assert writer.finished[0].file == "train/c001-000.tfrecord.gz"
    record = CaseRecord("c001", "train", len(examples), writer.finished, {}, [1, 0, 1],
                        {name: {"annotated_slices": 0, "foreground_slices": 0, "foreground_pixels": 0}
                         for name in ORGANS}, hu_histogram(np.array([-2000, 0, 0, 5000])).tolist())
    manifest = Manifest.from_records([record], organs=list(ORGANS), slicing={}, image_shape=[32, 32, 3])
    manifest.save(tmp_path / "manifest.json")
    return manifest


def test_shards_round_trip_bounded_and_checksummed(tmp_path):
    examples = _examples()
    one_record = len(encode_example(examples[0]))
    manifest = _write_dataset(tmp_path, examples, max_bytes=3 * one_record)
    shards = manifest.shards("train")
    assert [info.slices for info in shards] == [3] * (len(examples) // 3) + ([len(examples) % 3] if len(examples) % 3 else [])
    assert not list(tmp_path.rglob("*.tmp"))
    for info in shards:
        assert sha256_file(tmp_path / info.file) == info.sha256
        assert (tmp_path / info.file).stat().st_size == info.bytes
    assert manifest.verify(tmp_path) == []
    parsed = list(read_split(tmp_path / "manifest.json", "train", cycle_length=1))
    assert len(parsed) == len(examples)
    for got, source in zip(parsed, examples, strict=True):
        _assert_same(got, source)


def test_read_split_interleave_keeps_every_record_once(tmp_path):
    examples = _examples()
    _write_dataset(tmp_path, examples, max_bytes=2 * len(encode_example(examples[0])))
    indices = [int(e["slice_index"]) for e in read_split(tmp_path, "train", shuffle_seed=3)]
    assert sorted(indices) == sorted(e["slice_index"] for e in examples)
    again = [int(e["slice_index"]) for e in read_split(tmp_path, "train", cycle_length=4)]
    assert again == [int(e["slice_index"]) for e in read_split(tmp_path, "train", cycle_length=4)]
    # 2 records per shard, 4 shards read in turn: first record of shards 0..3, then their second ones
    ordered = [e["slice_index"] for e in examples]
    assert again[:4] == ordered[0:8:2] and again[4:8] == ordered[1:8:2]
    unordered = [int(e["slice_index"]) for e in read_split(tmp_path, "train", deterministic=False)]
    assert sorted(unordered) == sorted(ordered)


def test_writer_aborts_without_leaving_files(tmp_path):
    examples = _examples()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "x") as writer:
        writer.write(examples[0])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_verify_and_load_report_problems(tmp_path):
    manifest = _write_dataset(tmp_path, _examples(), max_bytes=1 << 20)
    shard = tmp_path / manifest.shards("train")[0].file
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert manifest.verify(tmp_path) == [f"{shard}: sha256 mismatch"]
    shard.unlink()
    assert manifest.verify(tmp_path) == [f"{shard}: missing"]
    with pytest.raises(HnsegError, match="missing; rerun"):
        read_split(tmp_path, "train")
    with pytest.raises(HnsegError, match="unknown split 'tset'"):
        read_split(tmp_path, "tset")
    with pytest.raises(HnsegError, match="has no slices"):
        read_split(tmp_path, "test")
    with pytest.raises(HnsegError, match="manifest not found"):
        Manifest.load(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(HnsegError, match="schema_version 99"):
        Manifest.load(tmp_path)


def test_histogram_and_split_statistics_known_answers():
    counts = hu_histogram(np.array([[-1024, -1030], [0, 3071], [4000, 0]]))
    assert counts.shape == (HIST_BINS,) and counts.sum() == 6
    assert counts[0] == 2 and counts[1024] == 2 and counts[4095] == 2
    stats = {"BrainStem": {"annotated_slices": 4, "foreground_slices": 3, "foreground_pixels": 50}}
    none = {"BrainStem": {"annotated_slices": 0, "foreground_slices": 0, "foreground_pixels": 0}}
    records = [
        CaseRecord("b", "train", 4, [ShardInfo("b-000", 4, 10, "x")], {}, [1], stats, [1] * HIST_BINS),
        CaseRecord("a", "train", 2, [ShardInfo("a-000", 2, 10, "y")], {}, [0], none, [2] * HIST_BINS),
        CaseRecord("c", "validation", 5, [], {}, [1], stats, [7] * HIST_BINS),
    ]
    manifest = Manifest.from_records(records, organs=["BrainStem"], slicing={}, image_shape=[8, 8, 1])
    train = manifest.splits["train"]
    assert train["cases"] == 2 and train["slices"] == 6
    assert [s["file"] for s in train["shards"]] == ["a-000", "b-000"]  # sorted by case id
    assert train["organs"]["BrainStem"] == {"annotated_cases": 1, "annotated_slices": 4,
                                           "foreground_slices": 3, "foreground_pixels": 50}
    assert manifest.splits["test"]["cases"] == 0
    assert manifest.intensity_histogram["counts"][:2] == [3, 3]  # train only: 1 + 2
    assert manifest.cases["c"]["split"] == "validation"
