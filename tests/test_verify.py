"""Shards verified (size + sha256, cached by size and mtime) before training; ``hnseg verify``; resume fallback."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from hnseg_keras.cli import main
from hnseg_keras.data import shards
from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.training import resume

CONFIG = PrepareConfig(organs=("BrainStem", "Mandible"), slicing=SlicingConfig(size=32, spacing_mm=5.0,
                                                                               empty_slice_share=0.0))


@pytest.fixture(scope="module")
def prepared(tiny_phantom_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "data"
    prepare(tiny_phantom_root, out, CONFIG)
    return out


@pytest.fixture
def data(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "data"))


def train_shards(folder: Path) -> list[Path]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return [folder / item["file"] for item in manifest["splits"]["train"]["shards"]]


def test_manifest_has_no_absolute_paths(prepared):
    text = (prepared / "manifest.json").read_text()
    assert str(prepared.parent) not in text and '"/' not in text
    assert json.loads(text)["source"].endswith("tiny_phantom0")  # relative to the data folder


def test_unchanged_shards_are_not_hashed_again(data, monkeypatch):
    calls = []
    real = shards.sha256_file
    monkeypatch.setattr(shards, "sha256_file", lambda path: calls.append(Path(path).name) or real(path))
    shards.verify_data(data)
    count = len(calls)
    assert count == sum(len(s["shards"]) for s in json.loads((data / "manifest.json").read_text())["splits"].values())
    assert (data / shards.VERIFIED_CACHE).is_file()
    shards.verify_data(data)
    assert len(calls) == count  # fast path: (size, mtime_ns) unchanged
    first = train_shards(data)[0]
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    shards.verify_data(data)
    assert calls[count:] == [first.name]  # a touched file is hashed again
    shards.verify_data(data, use_cache=False)
    assert len(calls) == 2 * count + 1


def test_shard_replaced_by_another_valid_shard(data):
    first, second = train_shards(data)[:2]
    shards.verify_data(data)  # fills the cache: the replacement must still be noticed
    shutil.copyfile(second, first)
    with pytest.raises(HnsegError, match=rf"^{first}: shard"):
        shards.verify_data(data)


def test_same_size_damage_and_truncation_named_in_one_line(data):
    first, second = train_shards(data)[:2]
    raw = bytearray(first.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    first.write_bytes(bytes(raw))
    with pytest.raises(HnsegError, match=rf"^{first}: shard sha256 differs from manifest.json"):
        shards.verify_data(data)
    second.write_bytes(second.read_bytes()[:100])
    with pytest.raises(HnsegError, match=r"\(and 1 more shard\(s\)\); rerun `hnseg prepare`"):
        shards.verify_data(data)


def test_training_refuses_damaged_shards_before_writing_anything(data, tmp_path):
    from hnseg_keras.training.trainer import load_config, train

    victim = train_shards(data)[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    config = dataclasses.replace(load_config("S"), data=str(data / "manifest.json"), out=str(tmp_path / "run"))
    with pytest.raises(HnsegError, match=rf"^{victim}: shard is \d+ bytes, manifest.json says \d+ \(truncated"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_verify_command_on_data_run_and_missing(data, tmp_path, capsys):
    assert main(["verify", str(data)]) == 0
    assert "match manifest.json" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    from hnseg_keras import configs
    from hnseg_keras.training.trainer import load_config

    configs.write_json_atomic(run / "config.json", configs.to_dict(dataclasses.replace(
        load_config("S"), data=str(data / "manifest.json"))))
    (run / "best.keras").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["verify", str(run)]) == 2
    assert "best.keras: not a readable .keras archive" in capsys.readouterr().err
    (run / "best.keras").unlink()
    assert main(["verify", str(run)]) == 0
    assert "valid training config" in capsys.readouterr().err
    train_shards(data)[0].write_bytes(b"")
    assert main(["verify", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard is 0 bytes" in err


# ----------------------------------------------------------------------------- resume from a damaged backup


def write_pair(backup: Path, epoch: int, suffix: str = "") -> None:
    backup.mkdir(parents=True, exist_ok=True)
    with h5py.File(backup / f"{resume.WEIGHTS}{suffix}", "w") as handle:
        handle["w"] = np.full(3, epoch, np.float32)
    (backup / f"{resume.METADATA}{suffix}").write_text(json.dumps({"epoch": epoch, "batch": -1}))


def test_truncated_metadata_falls_back_to_the_previous_backup(tmp_path, capsys):
    backup = tmp_path / "backup"
    write_pair(backup, 3, ".bkp")
    write_pair(backup, 4)
    assert resume.repair_backup(backup) is None  # a good backup is left alone
    (backup / resume.METADATA).write_text('{"epoch": ')  # truncated
    message = resume.repair_backup(backup)
    assert "resuming from the previous one (after epoch 3)" in message
    assert "previous one (after epoch 3)" in capsys.readouterr().err
    assert json.loads((backup / resume.METADATA).read_text())["epoch"] == 3
    with h5py.File(backup / resume.WEIGHTS) as handle:
        assert handle["w"][0] == 3


def test_both_backups_damaged_start_over(tmp_path, capsys):
    backup = tmp_path / "run" / "backup"
    write_pair(backup, 3, ".bkp")
    write_pair(backup, 4)
    weights = backup / resume.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:64])
    (backup / f"{resume.METADATA}.bkp").write_text("")
    with pytest.raises(HnsegError, match="both epoch backups are damaged"):
        resume.check_backup(backup)
    assert "starts again from epoch 0" in resume.repair_backup(backup)
    assert not backup.exists() and len(list(backup.parent.glob("backup.damaged-*"))) == 1
    assert "starts again from epoch 0" in capsys.readouterr().err


# ----------------------------------------------------------------------------- memory cache budget


def test_memory_cache_estimate_and_fallback(prepared, capsys):
    from hnseg_keras.data.shards import Manifest, read_split
    from hnseg_keras.inputs import cache_budget
    from hnseg_keras.inputs.pipeline import PipelineConfig

    manifest = Manifest.load(prepared)
    example = next(iter(read_split(prepared, "train")))
    decoded = sum(example[key].numpy().nbytes for key in ("image", "masks", "dist_maps", "annotated"))
    assert 0 <= cache_budget.example_bytes(manifest) - decoded <= 64
    slices = manifest.splits["train"]["slices"] + manifest.splits["validation"]["slices"]
    needed = cache_budget.split_bytes(manifest)
    assert needed == slices * cache_budget.example_bytes(manifest)
    memory = PipelineConfig(cache="memory")
    assert cache_budget.fit_cache(memory, prepared / "manifest.json", budget=needed) is memory
    on_disk = cache_budget.fit_cache(memory, prepared / "manifest.json", budget=needed - 1).cache
    assert Path(on_disk).parent.is_dir() and "caching them on disk" in capsys.readouterr().err
    # train and validation share the prefix but not the files: both read back whole, twice
    import tensorflow as tf

    from hnseg_keras.inputs.pipeline import _cache
    for split, values in (("train", range(5)), ("validation", range(10, 13))):
        cached = _cache(tf.data.Dataset.from_tensor_slices(list(values)), on_disk, split)
        assert [int(v) for v in cached] == list(values) == [int(v) for v in cached]
    assert {p.name.split(".")[0] for p in Path(on_disk).parent.iterdir()} == {"slices-train", "slices-validation"}
    assert 0 < cache_budget.memory_bytes() < 1 << 50


# ----------------------------------------------------------------------------- one writer per folder


def test_second_prepare_refused_and_live_temp_files_kept(data, tiny_phantom_root):
    from hnseg_keras.data.prepare import _resume_state
    from hnseg_keras.files import FolderLock, owned_by_live_process, temp_name

    with FolderLock(data, "hnseg prepare"), pytest.raises(HnsegError, match=r"in use by hnseg prepare \(pid"):
        prepare(tiny_phantom_root, data, CONFIG)
    shard = train_shards(data)[0]
    live = temp_name(shard)  # this process: alive
    dead = shard.with_name(f".{shard.name}.999999999-deadbeef.tmp")  # no such pid
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    assert owned_by_live_process(live) and not owned_by_live_process(dead)
    wanted = {case: item["split"] for case, item in json.loads((data / "manifest.json").read_text())["cases"].items()}
    assert len(_resume_state(data, wanted)) == len(wanted)  # every finished case verified and kept
    assert live.exists() and not dead.exists()
    assert prepare(tiny_phantom_root, data, CONFIG).complete  # the rerun finishes, lock released
    assert not (data / ".hnseg.lock").exists()
