"""Training: config resolution, run-folder rules, resume after a kill, Ctrl-C, multi-worker, CLI errors."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

from hnseg_keras import cli, configs, render
from hnseg_keras.data import demo_set
from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.inputs import train_step
from hnseg_keras.training import callbacks as cb
from hnseg_keras.training import sources
from hnseg_keras.training import trainer as training
from hnseg_keras.training.config import VARIANT_NAMES, TrainConfig, load_config, preset, stored_config
from hnseg_keras.training.run_folder import FINISHED, NEW, RESUME, RunFolder, best_row, read_history

REPO = Path(__file__).resolve().parents[1]
ORGANS = ("BrainStem", "Mandible", "Parotid_L")
# Tiny S: 4 levels of 4..32 filters on 32 px crops of 40 px slices at 5 mm, 3 organs.
TINY_OVERRIDES = [
    "model.filters=[4,8,16,32]", "augment.crop_size=32", "augment.warp_probability=0.0",
    "pipeline.batch_size=4", "pipeline.shuffle_buffer=64", "pipeline.parallel_reads=2", "image_slices=2",
]


@pytest.fixture(scope="session")
def tiny_manifest(tiny_phantom_root, tmp_path_factory) -> Path:
    """Shards of the 5 tiny phantom cases (3 train / 1 validation / 1 test), 40 px at 5 mm, 3 organs."""
    out = tmp_path_factory.mktemp("tiny_shards") / "shards"
    config = PrepareConfig(organs=ORGANS, slicing=SlicingConfig(size=40, spacing_mm=5.0, empty_slice_share=0.0))
    prepare(tiny_phantom_root, out, config)
    return out / "manifest.json"


def tiny_config(manifest: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config("S", None, [*TINY_OVERRIDES, f"data={manifest}", f"out={out}", *extra])


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_presets_round_trip_through_json(variant):
    config = preset(variant)
    again = configs.from_dict(TrainConfig, json.loads(json.dumps(configs.to_dict(config))))
    assert again == config


def test_the_config_defaults_are_the_s_preset_as_load_config_s():
    assert TrainConfig() == preset("S") == load_config()
    assert TrainConfig().variant == "S" and TrainConfig().model.name == "unet_S"


def test_presets_follow_the_paper():
    large, mixup = preset("L"), preset("M")
    for config in (large, mixup):
        assert config.epochs == 200 and config.learning_rate == 1e-3
        assert config.lr_factor == 0.5 and config.lr_patience == 10
        assert config.model.filters == (64, 128, 256, 512, 1024)
    assert large.model.units_per_level == 2 and mixup.model.units_per_level == 1
    assert large.loss.boundary_weight == 0.0 and not large.augment.mixup
    assert mixup.loss.boundary_weight > 0.0 and mixup.augment.mixup
    assert preset("s").epochs < 200


def test_load_config_layers_preset_file_and_overrides(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"variant": "M", "epochs": 7, "model": {"filters": [4, 8, 16, 32, 64]},
                                "augment": {"mixup": False}}))
    config = load_config(None, path, ["epochs=9", "loss.dice_weight=2"])
    assert config.variant == "M" and config.epochs == 9 and config.loss.dice_weight == 2.0
    assert config.model.filters == (4, 8, 16, 32, 64) and config.model.units_per_level == 1  # rest from M
    assert config.loss.boundary_weight == preset("M").loss.boundary_weight
    assert not config.augment.mixup
    assert load_config("L", path).variant == "L"  # --variant wins over the file
    assert load_config("L", path).model.units_per_level == 2
    assert load_config().variant == "S"


@pytest.mark.parametrize("content, overrides, fragment", [
    ("{not json", [], "not valid JSON"),
    ("[1, 2]", [], "JSON object"),
    ('{"epochz": 3}', [], "epochz"),
    ('{"model": {"filterz": [4]}}', [], "model.filterz"),
    ("{}", ["epochs=0"], "epochs=0"),
    ("{}", ["learning_rate=-1"], "learning_rate"),
    ("{}", ["no_such_key=1"], "no_such_key"),
])
def test_bad_configs_raise_one_line_errors(tmp_path, content, overrides, fragment):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(HnsegError, match=fragment) as info:
        load_config("S", path, overrides)
    assert "\n" not in str(info.value)


def test_old_config_files_may_carry_the_window_twice_when_both_agree(tmp_path, caplog):
    """The HU window lives in augment.window alone; files written before also have model.window."""
    both = tmp_path / "old.json"
    both.write_text(json.dumps({"model": {"window": [-155, 195]}, "augment": {"window": [-155.0, 195.0]}}))
    with caplog.at_level(logging.WARNING, logger="hnseg_keras"):
        assert load_config("S", both) == load_config("S", both) == preset("S")
    warnings = [record.getMessage() for record in caplog.records if "model.window is ignored" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(str(both))  # once per file
    assert load_config("S", {"model": {"window": [-155, 195]}}) == preset("S")  # equal to the preset's window
    differ = tmp_path / "differ.json"
    differ.write_text(json.dumps({"model": {"window": [-100, 300]}, "augment": {"window": [-155, 195]}}))
    with pytest.raises(HnsegError, match=r"^.*differ.json: model.window=\[-100, 300\] differs from augment.window"
                       ) as info:
        load_config("S", differ)
    assert "\n" not in str(info.value)
    with pytest.raises(HnsegError, match="differs from augment.window"):
        load_config("S", {"model": {"window": [-100, 300]}})
    run = RunFolder(tmp_path / "run")  # a run folder of an older version resumes
    resolved = stored_config(preset("S"))
    configs.write_json_atomic(run.config_file, {**resolved, "model": {**resolved["model"], "window": [-155, 195]}})
    assert run.check(resolved) == RESUME


def test_unknown_variant_is_refused():
    with pytest.raises(HnsegError, match="'XL'"):
        load_config("XL")


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    missing = tmp_path / "nothing" / "manifest.json"
    assert cli.main(["train", "--data", str(missing), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and "\n" not in err and "hnseg prepare" in err
    assert cli.main(["train", "--variant", "Q"]) == 2
    assert "'Q'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- run folder helpers


def test_run_folder_states(tmp_path):
    wanted = {"epochs": 3, "model": {"filters": [4, 8]}, "out": "a"}
    run = RunFolder(tmp_path / "run")
    assert run.check(wanted) == NEW
    run.path.mkdir()
    assert run.check(wanted) == NEW  # empty folder
    configs.write_json_atomic(run.config_file, {**wanted, "out": "moved"})
    assert run.check(wanted) == RESUME
    configs.write_json_atomic(run.summary_file, {"status": "finished"})
    assert run.check(wanted) == FINISHED
    with pytest.raises(HnsegError, match=r"finished run of a different config \(model.filters differ"):
        run.check({**wanted, "model": {"filters": [4, 16]}})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(HnsegError, match="no config.json"):
        RunFolder(other).check(wanted)


def test_run_folder_names_each_file_once(tmp_path):
    run = RunFolder(tmp_path)
    names = [run.config_file, run.data_file, run.history_file, run.curves_file, run.summary_file, run.logs_dir,
             run.images_dir, run.backup_dir, *(run.model_file(which) for which in ("best", "final", "interrupted"))]
    assert [str(path.relative_to(tmp_path)) for path in names] == [
        "config.json", "data.json", "history.csv", "training_curves.png", "summary.json", "logs", "logs/images",
        "backup", "best.keras", "final.keras", "interrupted.keras"]
    with pytest.raises(ValueError, match="latest"):
        run.model_file("latest")
    worker = RunFolder.of_worker(tmp_path / "run", chief=False, task=1)
    assert worker.path == tmp_path / ".run.worker-1" and RunFolder.of_worker(tmp_path / "run", True, 0).path == (
        tmp_path / "run")


def test_opening_a_run_folder_locks_it_and_writes_config_and_data(tiny_manifest, tmp_path):
    data = sources.open_data(tiny_manifest)
    config = training.resolve_for_data(tiny_config(tiny_manifest, tmp_path / "run"), data)
    run = RunFolder(tmp_path / "run")
    with run.open(config, data, "hnseg train") as state:
        assert state == NEW
        assert configs.read_json(run.config_file)["model"]["num_organs"] == len(ORGANS)
        assert configs.read_json(run.data_file)["normalisation"]["window"] == list(config.augment.window)
        with pytest.raises(HnsegError, match="in use by hnseg train"), run.open(config, data, "hnseg tune"):
            pass  # a second writer is refused while the first holds the folder
    with run.open(config, data, "hnseg train") as state:
        assert state == RESUME
    configs.write_json_atomic(run.summary_file, {"status": "finished"})
    with run.open(config, data, "hnseg train") as state:
        assert state == FINISHED


def test_history_helpers(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_dice\n0,1.0,0.1\n1,0.8,0.5\n2,0.7,0.4\n3,0.6,0.3\n")
    history = read_history(path)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert best_row(history)["epoch"] == 1
    callback = cb.ResumableReduceLROnPlateau(history, monitor="val_dice", mode="max", patience=10)
    callback.on_train_begin()
    assert callback.best == 0.5 and callback.wait == 2  # two epochs without improvement since the best
    RunFolder(tmp_path).trim_history(2)
    assert path.read_text() == "epoch,loss,val_dice\n0,1.0,0.1\n1,0.8,0.5\n"
    assert read_history(tmp_path / "missing.csv") == [] and best_row([]) is None


def test_validation_images_render_truth_left_and_prediction_right():
    x = np.full((1, 8, 8, 1), 20.0, np.float32)  # mid-window grey
    masks = np.zeros((1, 8, 8, 1), np.float32)
    masks[0, 2:6, 2:6, 0] = 1.0
    y = np.concatenate([masks, np.zeros((1, 8, 8, 2), np.float32), np.zeros_like(masks), np.ones_like(masks)], -1)
    import tensorflow as tf

    callback = cb.ValidationImages(tf.data.Dataset.from_tensors((x, y)), ["Mandible"], "/unused", count=1)
    image = callback.render(x[0], masks[0], np.zeros((8, 8, 1), bool))
    assert image.shape == (8, 16, 3) and image.dtype == np.uint8
    colour = render.organ_colour("Mandible")  # the catalogue's colour, as everywhere else
    assert (image[:, :8][render.contour(masks[0, ..., 0] > 0)] == colour).all()
    assert (image[2, 8 + 2] == image[0, 0]).all()  # nothing predicted: right panel is plain CT


# ----------------------------------------------------------------------------- training runs


class _StopAfter(keras.callbacks.Callback):
    """Raises ``error`` at the end of epoch ``epoch`` (after the built-in backup was written)."""

    def __init__(self, epoch, error):
        super().__init__()
        self.epoch, self.error = epoch, error

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise self.error


def test_ctrl_c_then_rerun_resumes_and_completes_the_run_folder(tiny_manifest, tmp_path, capsys):
    config = tiny_config(tiny_manifest, tmp_path / "run", "epochs=2")
    with pytest.raises(KeyboardInterrupt):
        training.train(config, callbacks=[_StopAfter(0, KeyboardInterrupt())])
    run = tmp_path / "run"
    assert (run / "interrupted.keras").is_file() and not (run / "final.keras").exists()
    assert configs.read_json(run / "summary.json")["status"] == "interrupted"
    assert RunFolder(run).resume_epoch() == 1
    capsys.readouterr()

    assert training.train(config) == run  # resumes at the second epoch
    printed = json.loads(capsys.readouterr().out.split("\nEpoch")[0])
    assert printed["model"]["num_organs"] == 3 and printed["model"]["hu_std"] > 0
    assert configs.read_json(run / "config.json") == printed
    described = configs.read_json(run / "data.json")
    assert described["organs"] == list(ORGANS) and described["image_shape"] == [40, 40, 1]
    assert described["manifest"] == tiny_manifest.parent.name and len(described["manifest_sha256"]) == 64
    assert described["normalisation"] == {"window": list(printed["augment"]["window"]),
                                          "hu_mean": printed["model"]["hu_mean"], "hu_std": printed["model"]["hu_std"]}
    assert described["slicing"] == configs.read_json(tiny_manifest)["slicing"]
    assert described["organ_definitions"] == configs.read_json(tiny_manifest)["organ_definitions"]
    assert set(described["organ_definitions"]) == set(ORGANS)
    history = read_history(run / "history.csv")
    assert [row["epoch"] for row in history] == [0, 1]
    assert {"loss", "val_loss", "val_dice", "val_dice_Mandible", "learning_rate", "epoch_time_s"} <= set(history[0])
    summary = configs.read_json(run / "summary.json")
    assert summary["status"] == "finished" and summary["initial_epoch"] == 1 and summary["epochs_run"] == 2
    assert summary["best_val_dice"] == max(row["val_dice"] for row in history)
    assert set(summary["best_val_dice_per_organ"]) == set(ORGANS)
    model = keras.saving.load_model(run / "final.keras")
    assert model.output_shape == (None, None, None, 3)
    assert (run / "best.keras").is_file() and not (run / "backup").exists()
    assert list((run / "logs" / "images").iterdir()) and (run / "logs" / "validation").is_dir()
    # No folder of this machine in anything the run wrote (config, summary, history, TensorBoard, models).
    for path in (p for p in run.rglob("*") if p.is_file()):
        content = path.read_bytes()
        assert str(tiny_manifest.parent).encode() not in content and str(tmp_path).encode() not in content, path
    assert configs.read_json(run / "config.json")["data"] == f"{tiny_manifest.parent.name}/manifest.json"
    # The same config again returns at once; a different one is refused.
    assert training.train(config) == run
    assert read_history(run / "history.csv") == history
    with pytest.raises(HnsegError, match="finished run of a different config"):
        training.train(tiny_config(tiny_manifest, tmp_path / "run", "epochs=3"))


@pytest.mark.slow
def test_short_fit_lowers_the_loss_and_raises_val_dice(tiny_manifest, tmp_path):
    # 3 tiny train cases learn slowly at the paper's 1e-3; a larger step shows the trend in seconds.
    config = tiny_config(tiny_manifest, tmp_path / "run", "epochs=25", "learning_rate=0.01")
    run = training.train(config)
    history = read_history(run / "history.csv")
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    assert max(row["val_dice"] for row in history[-10:]) > history[0]["val_dice"] + 0.05


@pytest.mark.slow
def test_a_killed_run_resumes_at_the_second_epoch(tiny_manifest, tmp_path):
    """os._exit after the first epoch's backup (no cleanup at all), then the same config again."""
    out = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data={tiny_manifest}", f"out={out}", "epochs=3", "steps_per_epoch=2"]
    script = textwrap.dedent(f"""
        import os, keras
        from hnseg_keras.training import trainer as training
        from hnseg_keras.training.config import load_config
        class Kill(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                os._exit(17)
        training.train(load_config("S", None, {overrides!r}), callbacks=[Kill()])
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 17, result.stderr[-2000:]
    assert [row["epoch"] for row in read_history(out / "history.csv")] == [0]
    training.train(load_config("S", None, overrides))
    assert [row["epoch"] for row in read_history(out / "history.csv")] == [0, 1, 2]
    assert configs.read_json(out / "summary.json")["initial_epoch"] == 1


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_two_local_workers_train_one_epoch_with_multi_worker_mirrored_strategy(tiny_manifest, tmp_path):
    out = tmp_path / "run"
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    overrides = [*TINY_OVERRIDES, f"data={tiny_manifest}", f"out={out}", "epochs=1", "steps_per_epoch=2"]
    script = textwrap.dedent(f"""
        import tensorflow as tf
        from hnseg_keras.training import distributed, trainer as training
        from hnseg_keras.training.config import load_config
        strategy = distributed.strategy_from_environment()
        assert isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy), strategy
        assert strategy.num_replicas_in_sync == 2
        training.train(load_config("S", None, {overrides!r}))
    """)
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})}
        processes.append(subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert [row["epoch"] for row in read_history(out / "history.csv")] == [0]
    assert configs.read_json(out / "summary.json")["status"] == "finished"
    assert (out / "final.keras").is_file() and not (tmp_path / ".run.worker-1").exists()


def test_phantom_demo_config_file_is_the_s_preset():
    """configs/phantom_demo.json spells out the README demo; it must not drift from the S preset."""
    data, phantom = cli.read_config_file(REPO / "configs" / "phantom_demo.json")
    assert load_config(None, data) == preset("S")
    assert demo_set.phantom_settings("S", phantom) == demo_set.demo_phantom()
    assert demo_set.phantom_settings("S", {"cases": 8}).prepare == demo_set.demo_phantom().prepare


# ----------------------------------------------------------------------------- schedule and budget


def test_cosine_learning_rate_runs_from_base_to_one_percent():
    assert cb.cosine_learning_rate(2e-3, 0.0) == pytest.approx(2e-3)
    assert cb.cosine_learning_rate(2e-3, 0.5) == pytest.approx((2e-3 + 2e-5) / 2)
    assert cb.cosine_learning_rate(2e-3, 1.0) == pytest.approx(2e-5)
    assert cb.cosine_learning_rate(2e-3, 3.0) == pytest.approx(2e-5)  # past the end: stays at the floor
    assert cb.cosine_learning_rate(1.0, 0.25, final_fraction=0.0) == pytest.approx(0.5 + 0.5 * np.cos(np.pi / 4))


class _FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class _Model:
    stop_training = False


def test_wall_time_budget_stops_before_the_epoch_that_would_overrun():
    ticks = _FakeClock()
    clock = cb.TrainingClock(spent_before=5.0, clock=ticks)  # 5 s from an earlier session
    budget = cb.WallTimeBudget(50.0, clock)
    budget.set_model(_Model())
    stopped = []
    for epoch in range(10):
        budget.on_epoch_begin(epoch)
        ticks.now += 10.0 if epoch else 14.0  # the first epoch (tracing) is the longest
        budget.on_epoch_end(epoch)
        if budget.model.stop_training:
            stopped.append(epoch)
            break
    # Elapsed after epochs 0, 1, 2: 19, 29, 39 s; 29 + 14 <= 50 continues, 39 + 14 > 50 stops.
    assert stopped == [2] and budget.stopped_epoch == 2


def test_cosine_schedule_follows_epochs_or_the_clock():
    schedule = cb.CosineSchedule(1e-2, epochs=4)
    assert [schedule.progress(epoch) for epoch in range(4)] == [0.0, 0.25, 0.5, 0.75]
    ticks = _FakeClock()
    timed = cb.CosineSchedule(1e-2, epochs=100, seconds=60.0, clock=cb.TrainingClock(clock=ticks))
    ticks.now += 30.0
    assert timed.progress(1) == pytest.approx(0.5)


@pytest.mark.parametrize("overrides, fragment", [
    (["lr_schedule=linear"], "lr_schedule='linear' is unknown"),
    (["max_train_minutes=0"], "max_train_minutes=0.0 must be a positive number"),
])
def test_bad_schedule_settings_are_refused(overrides, fragment):
    with pytest.raises(HnsegError, match=fragment):
        load_config("S", None, overrides)


def test_cosine_run_under_a_budget_logs_a_falling_learning_rate(tiny_manifest, tmp_path):
    config = tiny_config(tiny_manifest, tmp_path / "run", "epochs=4", "steps_per_epoch=2", "learning_rate=0.01",
                         "lr_schedule=cosine")
    run = training.train(config)
    rates = [row["learning_rate"] for row in read_history(run / "history.csv")]
    assert rates == pytest.approx([cb.cosine_learning_rate(0.01, epoch / 4) for epoch in range(4)], rel=1e-5)
    # A budget far below one epoch stops after the first (an epoch always finishes; tiny runs take seconds).
    budgeted = training.train(tiny_config(tiny_manifest, tmp_path / "budget", "epochs=5", "steps_per_epoch=2",
                                          "max_train_minutes=0.001"))
    summary = configs.read_json(budgeted / "summary.json")
    assert summary["epochs_run"] == 1 and summary["stopped_by_budget"] is True
    assert (budgeted / "final.keras").is_file()


def test_augment_on_device_trains_on_what_the_host_pipeline_would_have_made(tiny_manifest, tmp_path):
    """The patched train step augments the raw (batch, seed) itself: same loss and same updated
    weights as a plain step fed the augmented batch; a whole run saves the plain U-Net."""
    data = sources.open_data(tiny_manifest)
    config = training.resolve_for_data(
        tiny_config(tiny_manifest, tmp_path / "run", "pipeline.augment_on_device=true",
                    "augment.warp_probability=1.0", "augment.mixup=true", "epochs=1", "steps_per_epoch=2"), data)
    train_ds, *_ = data.batches(config)
    batch, seed = next(iter(train_ds))
    assert batch["image"].shape == (4, 40, 40, 1) and seed.shape == (2,)
    augment = train_step.augmenter(config.augment, data.organ_weights())
    x, y = augment(batch, seed)
    assert x.shape == (4, 32, 32, 1) and y.shape == (4, 32, 32, 4 * len(ORGANS) + 1)

    on_device, on_host = (training.build_compiled_model(config, list(ORGANS)) for _ in range(2))
    on_host.set_weights(on_device.get_weights())
    train_step.augment_in_train_step(on_device, augment)
    train_step.augment_in_train_step(on_device, augment)  # idempotent: still one augmentation per step
    device_loss = on_device.train_on_batch(batch, seed, return_dict=True)["loss"]
    host_loss = on_host.train_on_batch(x, y, return_dict=True)["loss"]
    assert device_loss == pytest.approx(host_loss, rel=1e-4)
    for a, b in zip(on_device.get_weights(), on_host.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)

    run = training.train(config)
    assert [row["epoch"] for row in read_history(run / "history.csv")] == [0]
    model = keras.saving.load_model(run / "final.keras")
    assert "_unaugmented_train_step" not in model.__dict__ and model.output_shape == (None, None, None, 3)


def test_the_optimizer_is_built_with_the_model(tiny_manifest, tmp_path):
    """Built before ``fit``, Adam's variables (moments, moving average) are not created while the first
    train step is traced, so that step is traced once; its first update is the usual Adam step."""
    data = sources.open_data(tiny_manifest)
    config = training.resolve_for_data(tiny_config(tiny_manifest, tmp_path / "run", "ema_momentum=0.9"), data)
    model = training.build_compiled_model(config, list(ORGANS))
    assert model.optimizer.built and len(model.optimizer.variables) > 3 * len(model.trainable_variables)
    x, y = next(iter(data.batches(config)[0]))
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    model.train_on_batch(x, y)
    # Adam's first step moves every weight with a non-zero gradient by about the learning rate.
    moved = [np.abs(keras.ops.convert_to_numpy(v) - b).max() for v, b in zip(model.trainable_variables, before,
                                                                             strict=True)]
    assert max(moved) == pytest.approx(config.learning_rate, rel=0.05)


def test_saved_models_carry_the_weights_but_not_the_optimizer_state(tiny_manifest, tmp_path):
    """best/final .keras are for prediction: the weights alone, and the model keeps training after a save."""
    import zipfile

    import h5py

    from hnseg_keras.inference.model_io import load_keras_model
    from hnseg_keras.training.run_folder import save_model_atomic

    data = sources.open_data(tiny_manifest)
    config = training.resolve_for_data(tiny_config(tiny_manifest, tmp_path / "run"), data)
    model = training.build_compiled_model(config, list(ORGANS))
    x, y = next(iter(data.batches(config)[0]))
    model.train_on_batch(x, y)
    optimizer = model.optimizer
    path = save_model_atomic(model, tmp_path / "best.keras")
    assert model.optimizer is optimizer

    with zipfile.ZipFile(path) as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        assert "optimizer" not in weights
        stored = []
        weights.visititems(lambda name, item: stored.append(item.size) if isinstance(item, h5py.Dataset) else None)
    assert sum(stored) == sum(int(np.prod(v.shape)) for v in model.weights)

    loaded = load_keras_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded.predict_on_batch(x)),
                               keras.ops.convert_to_numpy(model.predict_on_batch(x)), atol=1e-6)
    before = keras.ops.convert_to_numpy(model.trainable_variables[0])
    model.train_on_batch(x, y)  # the optimizer put back still steps
    assert np.abs(keras.ops.convert_to_numpy(model.trainable_variables[0]) - before).max() > 0
