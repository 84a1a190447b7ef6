"""``hnseg train``'s progress lines: the callback fed known times (a fake clock), then a tiny real run."""

from __future__ import annotations

import io
import json
import re
import time

from test_training import TINY_OVERRIDES, _Model, tiny_manifest  # noqa: F401  (the fixture, shared)
from test_training import _FakeClock as _Ticks  # monotonic seconds that move only when a test says so

from hnseg_keras import cli
from hnseg_keras.progress import clock_time
from hnseg_keras.training import callbacks as cb

NOON = time.mktime((2025, 1, 15, 12, 0, 0, 0, 0, -1))  # local noon: the clock times below hold in any zone
STEPS = 40
SCORES = {"loss": 0.5, "val_dice": 0.7}


def _progress(ticks, epochs=10, budget=None, spent_before=0.0, best=None, stream=None, interactive=None,
              verbose=2):
    stream = stream if stream is not None else io.StringIO()
    start = ticks.now
    progress = cb.TrainProgress(budget, cb.TrainingClock(spent_before, clock=ticks), best, stream=stream,
                                interactive=interactive, wall_clock=lambda: NOON + ticks.now - start)
    progress.set_params({"verbose": verbose, "epochs": epochs, "steps": STEPS})
    return progress


def _epoch(progress, ticks, epoch, seconds=10.0, logs=None):
    """One epoch of ``STEPS`` batches taking ``seconds`` in all, as ``fit`` calls the callback."""
    progress.on_epoch_begin(epoch)
    for batch in range(STEPS):
        ticks.now += seconds / STEPS
        progress.on_train_batch_end(batch)
    progress.on_epoch_end(epoch, dict(SCORES if logs is None else logs))


def test_each_epoch_line_says_steps_scores_elapsed_time_left_and_the_end():
    ticks = _Ticks()
    progress = _progress(ticks)
    for epoch in range(3):
        _epoch(progress, ticks, epoch)
    lines = progress.stream.getvalue().splitlines()
    head = "40/40 steps, loss 0.5000, val_dice 0.7000"
    assert lines == [
        f"train epoch 1/10: {head} (10 s elapsed, time left 1 min 30 s, ends at 12:01)",
        f"train epoch 2/10: {head} (20 s elapsed, time left 1 min 20 s, ends at 12:01)",
        f"train epoch 3/10: {head} (30 s elapsed, time left 1 min 10 s, ends at 12:01)",
    ]


def test_the_first_epoch_which_traces_the_model_is_left_out_of_the_pace():
    ticks = _Ticks()
    progress = _progress(ticks)
    for epoch, seconds in enumerate((40.0, 10.0, 10.0)):
        _epoch(progress, ticks, epoch, seconds)
    lines = progress.stream.getvalue().splitlines()
    assert "time left 6 min 00 s" in lines[0]  # one epoch known: 9 x 40 s
    assert "time left 1 min 20 s" in lines[1] and "time left 1 min 10 s" in lines[2]  # 10 s epochs from then on


def test_a_budget_that_ends_sooner_wins_and_agrees_with_where_the_budget_stops():
    ticks = _Ticks()
    progress = _progress(ticks, budget=65.0)
    budget = cb.WallTimeBudget(65.0, progress.clock)  # one clock for both, as make_callbacks gives them
    budget.set_model(_Model())
    for epoch in range(10):
        budget.on_epoch_begin(epoch)
        _epoch(progress, ticks, epoch)
        budget.on_epoch_end(epoch)
        if budget.model.stop_training:
            break
    lines = progress.stream.getvalue().splitlines()
    # After 30 s, 7 epochs of 10 s would take 70 s, but the budget's rule runs 3 more:
    # 40 + 10 <= 65 and 50 + 10 <= 65 go on, 60 + 10 > 65 stops.
    assert "(30 s elapsed, time left 30 s, ends at 12:01)" in lines[2]
    assert "(50 s elapsed, time left 10 s, ends at 12:01)" in lines[4]
    assert budget.stopped_epoch == 5 and lines[-1].endswith("(1 min 00 s elapsed)")  # no time left to say


def test_a_resumed_run_counts_only_the_epochs_still_to_run():
    ticks = _Ticks()
    # 7 epochs of 10 s in an earlier session; its best val_dice 0.8 at epoch index 4.
    progress = _progress(ticks, spent_before=70.0, best={"epoch": 4.0, "val_dice": 0.8})
    for epoch, dice in zip((7, 8, 9), (0.75, 0.85, 0.8), strict=True):
        _epoch(progress, ticks, epoch, logs={"loss": 0.25, "val_dice": dice})
    progress.on_train_end()
    lines = progress.stream.getvalue().splitlines()
    assert lines[0] == ("train epoch 8/10: 40/40 steps, loss 0.2500, val_dice 0.7500 "
                        "(1 min 20 s elapsed, time left 20 s, ends at 12:00)")
    assert lines[-1] == ("train: 10 of 10 epochs in 1 min 40 s (3 in this session); "
                         "best val_dice 0.8500 at epoch 9")


def test_the_closing_line_without_validation_and_with_an_earlier_best():
    ticks = _Ticks()
    progress = _progress(ticks, epochs=2)
    for epoch in range(2):
        _epoch(progress, ticks, epoch, logs={"loss": 0.5})  # arrays data: no val_dice
    progress.on_train_end()
    assert progress.stream.getvalue().splitlines() == [
        "train epoch 1/2: 40/40 steps, loss 0.5000 (10 s elapsed, time left 10 s, ends at 12:00)",
        "train epoch 2/2: 40/40 steps, loss 0.5000 (20 s elapsed)",
        "train: 2 of 2 epochs in 20 s",
    ]
    resumed = _progress(ticks, epochs=2, spent_before=10.0, best={"epoch": 0.0, "val_dice": 0.9})
    _epoch(resumed, ticks, 1)
    resumed.on_train_end()
    assert resumed.stream.getvalue().splitlines()[-1] == (
        "train: 2 of 2 epochs in 20 s (1 in this session); best val_dice 0.9000 at epoch 1")


def test_a_log_gets_only_the_epoch_lines_and_a_terminal_a_bar_redrawn_at_most_each_second():
    ticks = _Ticks()
    log = _progress(ticks, stream=io.StringIO())  # not a tty: no bar
    _epoch(log, ticks, 0)
    assert "\r" not in log.stream.getvalue() and len(log.stream.getvalue().splitlines()) == 1

    terminal = _progress(ticks, interactive=True)
    _epoch(terminal, ticks, 0)  # 40 batches of 0.25 s: a draw at 0.25, 1.25, ..., 9.25 s
    text = terminal.stream.getvalue()
    draws = text.split("\r\x1b[K")[1:]
    assert len(draws) == 11 and draws[-1].startswith("train epoch 1/10: 40/40 steps")  # 10 bars, the line
    assert draws[0] == "train epoch 1/10 [........................] 1/40 steps"  # no pace from one step
    assert draws[5] == "train epoch 1/10 [############............] 21/40 steps (epoch time left 4.8 s)"
    assert "\n" not in "".join(draws[:-1])


def test_verbose_zero_is_silent():
    """fit(verbose=0): the workers other than the chief write nothing."""
    ticks = _Ticks()
    quiet = _progress(ticks, verbose=0, interactive=True)
    _epoch(quiet, ticks, 0)
    quiet.on_train_end()
    assert quiet.stream.getvalue() == ""


def test_clock_time_adds_the_date_when_the_end_is_not_today():
    assert clock_time(70, NOON) == "12:01"
    assert clock_time(13 * 3600, NOON) == "2025-01-16 01:00"


def test_hnseg_train_prints_epoch_lines_with_time_left(tiny_manifest, tmp_path, capsys):  # noqa: F811
    overrides = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]
    code = cli.main(["train", "--data", str(tiny_manifest), "--out", str(tmp_path / "run"), "--epochs", "2",
                     "--steps-per-epoch", "2", *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    number = r"-?\d+\.\d{4}"
    head = rf"2/2 steps, loss {number}, val_dice {number}"
    first = rf"^train epoch 1/2: {head} \(.+ elapsed, time left .+, ends at \d\d:\d\d\)$"
    assert re.search(first, err, re.MULTILINE), err[-2000:]
    assert re.search(rf"^train epoch 2/2: {head} \(.+ elapsed\)$", err, re.MULTILINE)
    closing = r"^train: 2 of 2 epochs in .+; best val_dice \d\.\d{4} at epoch [12]$"
    assert re.search(closing, err, re.MULTILINE)
    # Keras' own bar is off: stdout holds the resolved config and the run folder line only.
    config, last = out.rsplit("\n", 2)[:2]
    assert json.loads(config)["epochs"] == 2 and last.startswith("run folder: ")
