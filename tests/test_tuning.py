"""`hnseg tune`: search space <-> training config, a 2-trial search killed mid-trial and resumed, the
summary and best config (trained by `hnseg train --config`), refusals, and a distributed chief + worker."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import keras_tuner
import pytest

from hnseg_keras import cli, configs
from hnseg_keras.data.prepare import PrepareConfig, prepare
from hnseg_keras.data.slicing import SlicingConfig
from hnseg_keras.errors import HnsegError
from hnseg_keras.files import LOCK_NAME
from hnseg_keras.training import sources, tuning
from hnseg_keras.training import trainer as training
from hnseg_keras.training.config import LossConfig, TrainConfig, load_config, preset, stored_config
from hnseg_keras.training.run_folder import best_row, read_history

REPO = Path(__file__).resolve().parents[1]
ORGANS = ("BrainStem", "Mandible", "Parotid_L")
# A two-level U-Net with 4/8 filters on 32 px slices, no warps: one epoch of 2 steps takes seconds.
TINY = ["model.filters=[4,8]", "model.convs_per_unit=1", "augment.crop_size=32", "augment.warp_probability=0",
        "pipeline.batch_size=4", "pipeline.shuffle_buffer=16", "steps_per_epoch=2", "image_slices=1"]


@pytest.fixture(scope="module")
def tiny_data(tiny_phantom_root, tmp_path_factory) -> Path:
    """Manifest of 32 px shards of the tiny phantom (3 train cases, 1 validation), three organs."""
    out = tmp_path_factory.mktemp("tune_data") / "shards"
    prepare(tiny_phantom_root, out, PrepareConfig(organs=ORGANS, slicing=SlicingConfig(
        size=32, spacing_mm=5.0, empty_slice_share=0.0)))
    return out / "manifest.json"


def tiny_base(manifest: Path, *overrides: str) -> TrainConfig:
    config = load_config("S", None, [*TINY, *overrides])
    return dataclasses.replace(config, data=str(manifest))


# ----------------------------------------------------------------------------- space <-> config


def test_apply_values_sets_exactly_the_tuned_fields():
    base = preset("M")
    values = {"focal_weight": 0.5, "dice_weight": 2.0, "boundary": True, "boundary_weight": 0.02,
              "boundary_ramp_epochs": 7, "mixup": True, "mixup_alpha": 0.4, "learning_rate": 3e-4,
              "tuner/epochs": 9}
    config = tuning.apply_values(base, values)
    assert config.loss == LossConfig(0.5, 2.0, 0.02, 7)
    assert (config.augment.mixup, config.augment.mixup_alpha, config.learning_rate) == (True, 0.4, 3e-4)
    # Nothing else moved.
    same = dataclasses.replace(config, loss=base.loss, augment=base.augment, learning_rate=base.learning_rate)
    assert same == base
    off = tuning.apply_values(base, {**values, "boundary": False, "mixup": False})
    assert off.loss == LossConfig(0.5, 2.0, 0.0, 0)
    assert (off.augment.mixup, off.augment.mixup_alpha) == (False, base.augment.mixup_alpha)
    assert tuning.tuned_fields(off)["mixup_alpha"] is None


def test_space_defaults_are_the_base_config_and_conditions_hold():
    base = preset("M")  # focal 1, Dice 1, boundary 0.01 ramped over 20 epochs, mixup alpha 0.2
    hp = keras_tuner.HyperParameters()
    values = tuning.sample_values(hp, tuning.SearchSpace(), epochs=40, base=base)
    assert values == {"focal_weight": 1.0, "dice_weight": 1.0, "boundary": True, "boundary_weight": 0.01,
                      "boundary_ramp_epochs": 20, "mixup": True, "mixup_alpha": 0.2, "learning_rate": 1e-3}
    assert tuning.apply_values(base, values) == base
    spec = {item.name: item for item in hp.space}
    assert spec["focal_weight"].sampling == spec["learning_rate"].sampling == "log"
    assert (spec["boundary_ramp_epochs"].min_value, spec["boundary_ramp_epochs"].max_value) == (0, 20)
    assert [c.name for c in spec["mixup_alpha"].conditions] == ["mixup"]
    assert [c.name for c in spec["boundary_weight"].conditions] == ["boundary"]
    # Switched off, the conditional values are not active: L's loss has no boundary term, no mixup.
    hp_off = keras_tuner.HyperParameters()
    off = tuning.sample_values(hp_off, tuning.SearchSpace(), epochs=40, base=preset("L"))
    assert (off["boundary"], off["mixup"]) == (False, False)
    assert "boundary_weight" not in off and "mixup_alpha" not in off


def test_build_only_samples_and_compiles_the_normal_model(tiny_data):
    data = sources.open_data(tiny_data)
    base = training.resolve_for_data(tiny_base(tiny_data, "learning_rate=0.002"), data)
    hypermodel = tuning.LossWeightHyperModel(base, tuning.TuneConfig(epochs_per_trial=4), Path("unused"), data)
    hp = keras_tuner.HyperParameters()
    hp.values.update(focal_weight=0.3, dice_weight=3.0, boundary=True, boundary_weight=0.05,
                     boundary_ramp_epochs=2, mixup=False, learning_rate=0.005)
    model = hypermodel.build(hp)
    assert model.output_shape == (None, None, None, len(ORGANS))
    loss = model.loss
    assert (loss.focal_weight, loss.dice_weight, loss.boundary_weight, loss.boundary_ramp_epochs) == (
        0.3, 3.0, 0.05, 2)
    assert float(keras.ops.convert_to_numpy(loss.boundary_scale)) == 0.5  # ramp value of epoch 0 of 2
    assert math.isclose(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)), 0.005, rel_tol=1e-6)


# ----------------------------------------------------------------------------- search, kill, resume


class InterruptAtEpochEnd(keras.callbacks.Callback):
    """Raises KeyboardInterrupt (a Ctrl-C / kill) at the end of the ``at``-th epoch of the whole search.

    The count is a class attribute because KerasTuner deep-copies callbacks for every trial.
    """

    seen = 0
    at = 0

    def on_epoch_end(self, epoch, logs=None):
        type(self).seen += 1
        if type(self).seen == type(self).at:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def resumed_search(tiny_data, tmp_path_factory):
    """A 2-trial random search of 2 epochs each, interrupted after trial 1's first epoch, then resumed.

    Returns (out folder, base config, snapshot of trial 0's history before the resume).
    """
    out = tmp_path_factory.mktemp("tune") / "search"
    tune = tuning.TuneConfig(tuner="random", max_trials=2, epochs_per_trial=2, seed=3, out=str(out))
    base = tiny_base(tiny_data)
    InterruptAtEpochEnd.seen, InterruptAtEpochEnd.at = 0, 3  # trial 0: epochs 1-2; trial 1: epoch 1
    with pytest.raises(KeyboardInterrupt):
        tuning.search(tune, base, callbacks=[InterruptAtEpochEnd()])
    assert not (out / "top_trials.json").exists()
    history_0 = (out / "trials" / "0" / "history.csv").read_bytes()
    assert len(read_history(out / "trials" / "1" / "history.csv")) == 1
    InterruptAtEpochEnd.seen, InterruptAtEpochEnd.at = 0, -1
    tuning.search(tune, base, callbacks=[InterruptAtEpochEnd()])
    return out, base, history_0, InterruptAtEpochEnd.seen


def test_killed_search_resumes_only_the_unfinished_trial(resumed_search):
    out, _, history_0, epochs_after_resume = resumed_search
    assert epochs_after_resume == 1  # only trial 1's second epoch ran after the resume
    assert (out / "trials" / "0" / "history.csv").read_bytes() == history_0  # trial 0 not re-run
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1"]
    history_1 = read_history(out / "trials" / "1" / "history.csv")
    assert [row["epoch"] for row in history_1] == [0.0, 1.0]
    summary_1 = configs.read_json(out / "trials" / "1" / "summary.json")
    assert (summary_1["status"], summary_1["resumed_from_epoch"], summary_1["epochs_run"]) == ("finished", 1, 2)
    assert (out / "trials" / "1" / "logs").is_dir()
    for trial in ("0", "1"):  # each trial opened its run folder as `hnseg train` does, and let go of it
        assert (out / "trials" / trial / "data.json").is_file() and not (out / "trials" / trial / LOCK_NAME).exists()
    oracle = json.loads((out / "search" / "oracle.json").read_text())
    assert oracle["end_order"] == ["0", "1"] and oracle["ongoing_trials"] == {}


def test_summary_tables_and_best_config_match_the_trial_histories(resumed_search):
    out, base, _, _ = resumed_search
    summary = configs.read_json(out / "top_trials.json")
    assert summary["completed"] == 2 and summary["failed"] == []
    rows = summary["trials"]
    for row in rows:  # best val_dice and epochs straight from each trial's history.csv
        history = read_history(out / row["run"] / "history.csv")
        best = best_row(history)
        assert row["val_dice"] == pytest.approx(best["val_dice"], rel=1e-6)
        assert (row["epochs_run"], row["best_epoch"]) == (2, int(best["epoch"]) + 1)
        trial_config = configs.read_json(out / row["run"] / "config.json")
        assert row["hyperparameters"]["learning_rate"] == trial_config["learning_rate"]
        assert row["hyperparameters"]["focal_weight"] == trial_config["loss"]["focal_weight"]
        assert set(row["val_dice_per_organ"]) == set(ORGANS)
    assert rows[0]["val_dice"] >= rows[1]["val_dice"] and [r["rank"] for r in rows] == [1, 2]
    markdown = (out / "top_trials.md").read_text()
    assert f"| 1 | {rows[0]['trial_id']} | {rows[0]['val_dice']:.4f} | 2 |" in markdown
    best_config = load_config(None, out / "best_config.json")
    expected = dataclasses.replace(tuning.apply_values(base, rows[0]["values"]), epochs=2,
                                   out=str(out / "best_run"))
    assert best_config == expected
    assert configs.read_json(out / "best_config.json") == configs.to_dict(expected)


def test_best_config_trains_with_train_script(resumed_search, tmp_path, capsys):
    out, _, _, _ = resumed_search
    run = tmp_path / "best_run"
    assert cli.main(["train", "--config", str(out / "best_config.json"), "--epochs", "1", "--out", str(run)]) == 0
    summary = configs.read_json(run / "summary.json")
    assert (summary["status"], summary["epochs_run"]) == ("finished", 1)
    trained = configs.read_json(run / "config.json")
    best = configs.read_json(out / "best_config.json")
    assert trained["loss"] == best["loss"] and trained["learning_rate"] == best["learning_rate"]


# ----------------------------------------------------------------------------- refusals


def test_resume_with_other_settings_is_refused(resumed_search):
    out, base, _, _ = resumed_search
    tune = tuning.TuneConfig(tuner="random", max_trials=3, epochs_per_trial=2, seed=4, out=str(out))
    with pytest.raises(HnsegError, match=r"tune\.seed differ"):
        tuning.search(tune, base)
    with pytest.raises(HnsegError, match=r"train\.learning_rate differ"):
        tuning.search(dataclasses.replace(tune, seed=3), dataclasses.replace(base, learning_rate=0.01))


def test_a_search_of_an_older_version_with_the_window_twice_resumes(tmp_path):
    record = {"tune": {"tuner": "random"}, "train": stored_config(preset("S"))}
    train = record["train"]
    old = {**record, "train": {**train, "model": {**train["model"], "window": train["augment"]["window"]}}}
    configs.write_json_atomic(tmp_path / "search_config.json", old)
    tuning.check_search_folder(tmp_path, record)  # accepted: the two windows agree
    old["train"]["model"]["window"] = [-100.0, 300.0]
    configs.write_json_atomic(tmp_path / "search_config.json", old)
    with pytest.raises(HnsegError, match="model.window=.* differs from augment.window"):
        tuning.check_search_folder(tmp_path, record)


def test_foreign_output_folder_is_refused(tiny_data, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(HnsegError, match="holds no search"):
        tuning.search(tuning.TuneConfig(max_trials=1, out=str(tmp_path)), tiny_base(tiny_data))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("args, message", [
    (["--tuner", "grid"], "--tuner 'grid' is unknown; choose one of bayesian, random, hyperband"),
    (["--max-trials", "0"], "--max-trials=0 must be a positive integer"),
    (["--set", "epochs"], "override 'epochs' is not of the form key=value"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    assert cli.main(["tune", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hnseg tune: error:") and message in err[0]


def test_distributed_variables_must_be_complete(monkeypatch):
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.delenv("KERASTUNER_ORACLE_PORT", raising=False)
    monkeypatch.delenv("KERASTUNER_TUNER_ID", raising=False)
    with pytest.raises(HnsegError, match="KERASTUNER_ORACLE_PORT and KERASTUNER_TUNER_ID"):
        tuning.distributed_role()


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_distributed_chief_and_worker(tiny_data, tmp_path):
    out = tmp_path / "search"
    port = str(_free_port())
    command = [sys.executable, str(REPO / "scripts" / "tune.py"), "--variant", "S", "--data", str(tiny_data),
               "--tuner", "random", "--max-trials", "2", "--epochs-per-trial", "1", "--out", str(out)]
    for item in TINY:
        command += ["--set", item]
    base_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERASTUNER_ORACLE_IP": "127.0.0.1",
                "KERASTUNER_ORACLE_PORT": port}
    chief = subprocess.Popen(command, cwd=tmp_path, env={**base_env, "KERASTUNER_TUNER_ID": "chief"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    worker = subprocess.run(command, cwd=tmp_path, env={**base_env, "KERASTUNER_TUNER_ID": "tuner0"},
                            capture_output=True, text=True, timeout=600)
    chief_output, _ = chief.communicate(timeout=120)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert chief.returncode == 0, chief_output[-2000:]
    assert "no trials left" in worker.stdout
    summary = configs.read_json(out / "top_trials.json")
    assert summary["completed"] == 2
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1"]
    assert (out / "best_config.json").is_file()
    assert "search folder:" in chief_output


@pytest.mark.slow
def test_executions_are_seeded_apart_and_averaged(tiny_data, tmp_path):
    tune = tuning.TuneConfig(tuner="random", max_trials=1, epochs_per_trial=1, executions_per_trial=2,
                             out=str(tmp_path / "search"))
    out = tuning.search(tune, tiny_base(tiny_data))
    runs = [out / "trials" / "0" / f"execution{k}" for k in (0, 1)]
    seeds = [configs.read_json(run / "config.json")["seed"] for run in runs]
    assert seeds == [0, 1]
    best = [best_row(read_history(run / "history.csv"))["val_dice"] for run in runs]
    row = configs.read_json(out / "top_trials.json")["trials"][0]
    assert row["val_dice"] == pytest.approx(sum(best) / 2, rel=1e-6)


@pytest.mark.slow
def test_hyperband_continues_trials_from_their_initial_epoch(tiny_data, tmp_path):
    tune = tuning.TuneConfig(tuner="hyperband", max_trials=4, epochs_per_trial=3, out=str(tmp_path / "search"))
    out = tuning.search(tune, tiny_base(tiny_data))
    rows = configs.read_json(out / "top_trials.json")["trials"]
    assert len(rows) == 4
    continued = [row for row in rows if row["values"].get("tuner/trial_id")]
    assert continued, "Hyperband's second round continues a trial of its first round"
    for row in continued:
        history = read_history(out / row["run"] / "history.csv")
        start, stop = row["values"]["tuner/initial_epoch"], row["values"]["tuner/epochs"]
        assert [int(r["epoch"]) for r in history] == list(range(start, stop))
    best = rows[0]
    assert configs.read_json(out / "best_config.json")["epochs"] == best["values"].get("tuner/epochs", 3)
