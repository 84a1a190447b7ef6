"""`hnseg prepare`: splits, end-to-end conversion, resume after kill -9, refusals, real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from own_data_builders import read_one
from test_shards import _assert_same
from test_slicing import make_case

from hnseg_keras import cli, configs
from hnseg_keras.data.cases import CaseRef, write_pddca_case
from hnseg_keras.data.prepare import PrepareConfig, assign_splits, prepare
from hnseg_keras.data.shards import Manifest, read_split
from hnseg_keras.data.slicing import SlicingConfig, slice_case
from hnseg_keras.errors import HnsegError

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "openkbp-hn"
ORGANS = ("BrainStem", "Mandible", "Parotid_L")
CONFIG = PrepareConfig(organs=ORGANS, slicing=SlicingConfig(size=32, spacing_mm=1.2, empty_slice_margin=1,
                                                            empty_slice_share=0.5))


def write_cases(root: Path, specs, shape=(10, 40, 48)):
    """PDDCA folders: specs = [(split folder or '', case id, with_mandible)]."""
    for split, case_id, with_mandible in specs:
        case = make_case(shape=shape, with_mandible=with_mandible)
        case.case_id = case_id
        case.ct = case.ct + np.int16(len(case_id) % 7)  # cases differ a little
        write_pddca_case(case, root / split / case_id)
    return root


SPECS = [("train", "p1", True), ("train", "p2", False), ("validation", "p3", True)]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hnseg_keras.cli", "prepare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def _error_lines(stderr: str):
    """The CLI's own lines (TensorFlow's import noise, if any, is not ours)."""
    return [line for line in stderr.splitlines() if line.startswith("hnseg")]


def _snapshot(folder: Path):
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_pddca_splits_are_deterministic_by_case_id():
    refs = [CaseRef(f"0522c{n:04d}", Path("."), None) for n in [*range(1, 34), *range(555, 570)]]
    splits = assign_splits(refs, PrepareConfig())
    assert [splits[f"0522c{n:04d}"] for n in range(555, 570)] == ["test"] * 15
    assert sorted(splits.values()).count("validation") == 8 and sorted(splits.values()).count("train") == 25
    assert assign_splits(list(reversed(refs)), PrepareConfig()) == splits  # order of discovery is irrelevant
    assert assign_splits(refs, PrepareConfig(split_seed=7)) != splits
    hinted = [CaseRef("0522c0555", Path("."), "train"), CaseRef("x", Path("."), "val")]
    assert assign_splits(hinted, PrepareConfig()) == {"0522c0555": "train", "x": "validation"}


def test_prepare_config_round_trip_and_checks():
    config = PrepareConfig(organs=("brainstem", "LeftParotid"), slicing=SlicingConfig(spacing_mm=None))
    assert config.organs == ("BrainStem", "Parotid_L")
    assert configs.from_dict(PrepareConfig, json.loads(json.dumps(configs.to_dict(config)))) == config
    with pytest.raises(HnsegError, match="compression_level 12"):
        PrepareConfig(compression_level=12)


def test_split_file_both_forms_and_errors(tmp_path):
    refs = [CaseRef(name, Path("."), "train") for name in ("a", "b", "c")]
    (tmp_path / "lists.json").write_text(json.dumps({"train": ["a"], "test": ["b", "c"]}))
    assert assign_splits(refs, CONFIG, str(tmp_path / "lists.json")) == {"a": "train", "b": "test", "c": "test"}
    (tmp_path / "map.json").write_text(json.dumps({"a": "val", "b": "train"}))
    with pytest.raises(HnsegError, match="no split for case\\(s\\) c"):
        assign_splits(refs, CONFIG, str(tmp_path / "map.json"))


def test_prepare_writes_exact_records_and_consistent_manifest(tmp_path):
    root = write_cases(tmp_path / "in", SPECS)
    manifest = prepare(root, tmp_path / "out", CONFIG)
    assert manifest.complete and manifest.verify(tmp_path / "out") == []
    assert manifest.image_shape == [32, 32, 1] and manifest.organs == list(ORGANS)
    assert {case: entry["split"] for case, entry in manifest.cases.items()} == {
        "p1": "train", "p2": "train", "p3": "validation"}
    train = manifest.splits["train"]
    assert train["organs"]["Mandible"]["annotated_cases"] == 1 and train["organs"]["BrainStem"]["annotated_cases"] == 2
    # every train slice's centre channel is counted once in the HU histogram
    assert sum(manifest.intensity_histogram["counts"]) == train["slices"] * 32 * 32
    expected = [e for e in slice_case(read_one(root / "train" / "p2", ORGANS), ORGANS, CONFIG.slicing)]
    parsed = [e for e in read_split(tmp_path / "out", "train", cycle_length=1) if e["case_id"] == b"p2"]
    assert len(parsed) == len(expected) == manifest.cases["p2"]["slices"]
    for got, source in zip(parsed, expected, strict=True):
        _assert_same(got, source)
    assert all(int(e["annotated"][1]) == 0 and not e["dist_maps"].numpy()[..., 1].any() for e in parsed)
    pixels = sum(int(e["masks"].numpy()[..., 0].sum()) for e in read_split(tmp_path / "out", "train"))
    assert train["organs"]["BrainStem"]["foreground_pixels"] == pixels


def test_rerun_skips_cleans_and_redoes_damaged_cases(tmp_path, capsys):
    root = write_cases(tmp_path / "in", SPECS)
    out = tmp_path / "out"
    first = prepare(root, out, CONFIG)
    shard = out / first.splits["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-3])  # damaged shard -> its case is redone
    (out / "train" / ".p9-000.tfrecord.gz.tmp").write_bytes(b"stale")
    (out / "train" / "p9-000.tfrecord.gz").write_bytes(b"orphan")
    capsys.readouterr()
    second = prepare(root, out, CONFIG)
    assert "skipping 2 finished case(s)" in capsys.readouterr().err
    assert second.verify(out) == [] and second.splits == first.splits
    assert not (out / "train" / "p9-000.tfrecord.gz").exists()
    assert not list(out.rglob("*.tmp"))


def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path):
    result = _cli(tmp_path / "missing", "--out", tmp_path / "out")
    assert result.returncode == 2 and "input folder not found" in result.stderr
    assert result.stderr.strip().splitlines() == _error_lines(result.stderr)  # no TF import for this
    assert len(_error_lines(result.stderr)) == 1 and not (tmp_path / "out").exists()
    root = write_cases(tmp_path / "in", SPECS[:1])
    assert cli.main(["prepare", str(root), "--out", str(tmp_path / "out"), "--organs", *ORGANS,
                     "--size", "32", "--workers", "1"]) == 0
    before = _snapshot(tmp_path / "out")
    with pytest.raises(HnsegError, match="different input or configuration \\(config\\); choose a new --out"):
        prepare(root, tmp_path / "out", CONFIG)
    result = _cli(root, "--out", tmp_path / "out", "--organs", *ORGANS, "--size", "48")
    assert result.returncode == 2 and "choose a new --out" in result.stderr
    assert len(_error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr
    assert _snapshot(tmp_path / "out") == before
    broken = write_cases(tmp_path / "broken", SPECS[:1])
    (broken / "train" / "p1" / "img.nrrd").unlink()
    result = _cli(broken, "--out", tmp_path / "out2", "--size", "32")
    assert result.returncode == 2 and "has no img.nrrd" in result.stderr and len(_error_lines(result.stderr)) == 1
    assert not (tmp_path / "out2").exists()
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(HnsegError, match="not a prepare output"):
        prepare(root, tmp_path / "user", CONFIG)


@pytest.mark.slow
def test_kill_9_then_rerun_matches_an_uninterrupted_run(tmp_path):
    args = ["--phantom", "6", "--phantom-size", "96", "--phantom-spacing", "2.5", "--size", "64", "--spacing", "4",
            "--neighbours", "1", "--workers", "1"]
    reference = _cli("--out", tmp_path / "ref", *args)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "hnseg_keras.cli", "prepare", "--out", str(out), *args],
                               cwd=REPO, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((out / "cases").glob("*.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not Manifest.load(out).complete  # killed mid-way
    rerun = _cli("--out", out, *args[:-1], "2")  # parallel (spawn) workers on the rerun
    assert rerun.returncode == 0, rerun.stderr
    assert "skipping" in rerun.stderr
    resumed, uninterrupted = Manifest.load(out), Manifest.load(tmp_path / "ref")
    assert resumed.complete and resumed.verify(out) == []
    assert {s: v["slices"] for s, v in resumed.splits.items()} == {s: v["slices"] for s, v in uninterrupted.splits.items()}
    assert resumed.splits["train"]["organs"] == uninterrupted.splits["train"]["organs"]
    assert resumed.intensity_histogram == uninterrupted.intensity_histogram
    listed = {info["file"] for split in resumed.splits.values() for info in split["shards"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.tfrecord.gz")}
    assert listed == on_disk  # no duplicates, no orphans
    assert not list(out.rglob("*.tmp"))


def test_phantom_folder_splits_and_missing_annotations(tiny_phantom_root, tmp_path):
    config = PrepareConfig(slicing=SlicingConfig(size=48, spacing_mm=5.0, empty_slice_share=0.0))
    manifest = prepare(tiny_phantom_root, tmp_path / "out", config)
    assert {name: split["cases"] for name, split in manifest.splits.items()} == {"train": 3, "validation": 1, "test": 1}
    assert manifest.splits["train"]["organs"]["Mandible"]["annotated_cases"] == 2  # phantom_0000 lacks it
    assert manifest.splits["train"]["organs"]["BrainStem"]["annotated_cases"] == 3
    seen = 0
    for example in read_split(tmp_path / "out", "train"):
        if example["case_id"] == b"phantom_0000":
            assert example["annotated"].numpy().tolist() == [1, 1, 0, 1, 1, 1, 1, 0, 0]
            assert not example["dist_maps"].numpy()[..., [2, 7, 8]].any()
            seen += 1
    assert seen == manifest.cases["phantom_0000"]["slices"] > 0
    assert manifest.verify(tmp_path / "out") == []


def test_phantom_is_written_as_a_folder_then_prepared_like_any_input(tmp_path, capsys):
    args = ["prepare", "--phantom", "3", "--phantom-size", "48", "--phantom-spacing", "5", "--size", "32",
            "--spacing", "5", "--organs", "BrainStem", "Mandible", "--workers", "1"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    assert cli.main([*args, "--out", str(tmp_path / "mine")]) == 2
    assert "not a prepare output" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]  # nothing written into it
    out = tmp_path / "out"
    assert cli.main([*args, "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    assert manifest.complete and manifest.source == "phantom-cases" and manifest.prepare["phantom"] is None
    assert cli.main([*args, "--out", str(out)]) == 0  # a rerun keeps the phantom and the finished cases
    assert "skipping 3 finished case(s)" in capsys.readouterr().err
    again = prepare(out / "phantom-cases", tmp_path / "again", PrepareConfig(
        organs=("BrainStem", "Mandible"), slicing=SlicingConfig(size=32, spacing_mm=5.0)))
    assert {case: entry["slices"] for case, entry in again.cases.items()} == {
        case: entry["slices"] for case, entry in manifest.cases.items()}


def test_demo_set_reuses_a_complete_cache_and_rebuilds_an_unfinished_one_of_before(tmp_path):
    from hnseg_keras.data import demo_set
    from hnseg_keras.data.phantom import PhantomConfig

    settings = demo_set.PhantomDataConfig(cases=3, generator=PhantomConfig(size=48, spacing_mm=5.0),
                                          prepare=PrepareConfig(organs=ORGANS, slicing=SlicingConfig(
                                              size=32, spacing_mm=5.0)), cache_dir=str(tmp_path), workers=1)
    path = demo_set.prepare_phantom(settings)
    assert Manifest.load(path).complete and Manifest.load(path).source == "phantom-cases"
    before = _snapshot(path.parent)
    legacy = json.loads(path.read_text())
    legacy.update(source="phantom:3", complete=True)  # as prepared while prepare generated phantoms
    path.write_text(json.dumps(legacy))
    assert demo_set.prepare_phantom(settings) == path and Manifest.load(path).source == "phantom:3"  # kept
    legacy["complete"] = False  # an interrupted run of before: rebuilt
    path.write_text(json.dumps(legacy))
    assert demo_set.prepare_phantom(settings) == path
    assert Manifest.load(path).complete and Manifest.load(path).source == "phantom-cases"
    assert [name for name, _ in _snapshot(path.parent)] == [name for name, _ in before]


@pytest.mark.realdata
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="../shared/data/openkbp-hn is absent")
def test_real_openkbp_cases(tmp_path):
    root = tmp_path / "subset"
    picks = [("train", sorted(os.listdir(REAL_DATA / "train"))[:2]), ("validation", ["pt_201"])]
    for split, names in picks:
        (root / split).mkdir(parents=True)
        for name in names:
            (root / split / name).symlink_to(REAL_DATA / split / name)
    organs = ["BrainStem", "Mandible", "Parotid_L", "Parotid_R"]
    assert cli.main(["prepare", str(root), "--out", str(tmp_path / "out"), "--organs", *organs,
                     "--spacing", "none", "--size", "128", "--workers", "1"]) == 0
    manifest = Manifest.load(tmp_path / "out")
    assert manifest.complete and manifest.verify(tmp_path / "out") == []
    assert manifest.splits["train"]["cases"] == 2 and manifest.splits["validation"]["cases"] == 1
    example = next(iter(read_split(tmp_path / "out", "validation")))
    assert example["image"].shape == (128, 128, 1) and example["masks"].shape == (128, 128, 4)
    spacing = read_one(REAL_DATA / "validation" / "pt_201", organs).spacing
    np.testing.assert_allclose(example["spacing"].numpy(), spacing, rtol=1e-6)
