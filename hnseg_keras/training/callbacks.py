"""The callbacks of ``trainer.fit_run``; the files they write are the run folder's (``run_folder.py``).

Resuming: ``BackupAndRestore`` restores weights, optimizer state (learning rate included) and the
epoch; ``ResumableReduceLROnPlateau`` and ``BestCheckpoint`` take what it does not from the run's
``history.csv`` (the plateau counter, the best ``val_dice`` seen, so ``best.keras`` is not overwritten
by a worse resumed epoch).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import keras
import numpy as np

from hnseg_keras import render
from hnseg_keras.inputs.augment import HU_WINDOW
from hnseg_keras.inputs.targets import unpack_targets
from hnseg_keras.progress import bar, clock_time, format_seconds
from hnseg_keras.training.run_folder import save_model_atomic

# ----------------------------------------------------------------------------- callbacks


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_time_s`` (wall seconds of the epoch, validation included) to the epoch logs.

    Place it before CSVLogger / TensorBoard so they record it.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and hasattr(self, "_start"):
            logs["epoch_time_s"] = time.perf_counter() - self._start


class TrainingClock:
    """Wall seconds spent training: those of earlier sessions of a resumed run plus this one's."""

    def __init__(self, spent_before: float = 0.0, started: float | None = None, clock=time.monotonic):
        self.clock = clock
        self.start = (clock() if started is None else started) - spent_before

    def elapsed(self) -> float:
        return self.clock() - self.start


class WallTimeBudget(keras.callbacks.Callback):
    """Stops training after the epoch when one more (as long as the longest so far) would overrun.

    Args:
        seconds: the budget.
        clock: the run's ``TrainingClock`` (its start is the budget's start, loading included).
    """

    def __init__(self, seconds: float, clock: TrainingClock):
        super().__init__()
        self.seconds, self.clock = float(seconds), clock
        self.longest = 0.0
        self.stopped_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.clock.elapsed()

    def on_epoch_end(self, epoch, logs=None):
        now = self.clock.elapsed()
        self.longest = max(self.longest, now - getattr(self, "_epoch_start", now))
        if now + self.longest > self.seconds:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            print(f"wall-time budget: stopping after epoch {epoch + 1} ({now / 60:.1f} of "
                  f"{self.seconds / 60:.1f} min; the next epoch would end past it)", flush=True)


class TrainProgress(keras.callbacks.ProgbarLogger):
    """``fit``'s progress on stderr, written like prepare/predict/evaluate (``progress.py``).

    Each epoch end writes one line: epoch, steps, loss and val_dice, elapsed time, time left and the
    expected end as a clock time. On a terminal a bar is also redrawn within the epoch (at most once a
    second); in a log only the epoch lines. Training ends with a closing line.

    Time left is the mean epoch time of this session (a resumed run: of the epochs since resuming;
    after the first epoch, which also traces the model, without it) times the epochs still to run, or, when the wall-time budget ends sooner, the epochs that
    ``WallTimeBudget``'s rule lets run (with a wall-time cosine schedule the budget ends the run).

    Being a ProgbarLogger, it takes the place of Keras' own bar (``fit`` adds none when one is given)
    and is silent under ``verbose=0`` (workers other than the chief). Place it first among the run's
    callbacks: its epoch line then comes before their messages.

    Args:
        budget: wall-time budget in seconds (``max_train_minutes``), or None.
        clock: the run's ``TrainingClock`` (elapsed time as the budget counts it); tests pass a fake.
        best: best ``history.csv`` row of the epochs before a resume (``run_folder.best_row``), or None.
        stream: where lines go (stderr by default).
        interactive: redraw a bar within the epoch; default: whether ``stream`` is a terminal.
        wall_clock: seconds since the epoch, for the expected end's clock time.
    """

    def __init__(self, budget: float | None = None, clock: TrainingClock | None = None,
                 best: dict[str, float] | None = None, stream=None, interactive: bool | None = None,
                 wall_clock=time.time):
        super().__init__()
        self.budget, self.clock = budget, clock or TrainingClock()
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.wall_clock = wall_clock
        self.best = (best["val_dice"], int(best["epoch"])) if best else None
        self.first = self.last = None  # epochs (0-based) of this session
        self.longest = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        if self.first is None:
            self.first, self.session_start = epoch, self.clock.elapsed()
        self.epoch, self.epoch_start, self.seen, self.drawn = epoch, self.clock.elapsed(), 0, -math.inf
        self.paced_from = None

    def on_train_batch_end(self, batch, logs=None):
        self.seen = batch + 1
        now = self.clock.elapsed()
        if self.paced_from is None:  # the pace is timed after the first step, which may trace the model
            self.paced_from = (now, self.seen)
        if not (self.verbose and self.interactive) or now - self.drawn < 1.0:
            return
        self.drawn = now
        steps = f"{bar(self.seen, self.target)} {self.seen}/{self.target}" if self.target else f"{self.seen}"
        text = f"\r\x1b[Ktrain epoch {self.epoch + 1}/{self.epochs} {steps} steps"
        since, seen = self.paced_from
        if self.target and self.seen > seen:
            left = (now - since) / (self.seen - seen) * (self.target - self.seen)
            text += f" (epoch time left {format_seconds(left)})"
        self.stream.write(text)
        self.stream.flush()

    def remaining(self, epoch: int) -> float:
        """Seconds left after ``epoch`` (0-based) ends: epochs still to run times the mean epoch time."""
        now = self.clock.elapsed()
        if epoch > self.first:  # leave out the first epoch of the session: it includes tracing
            mean = (now - self.after_first) / (epoch - self.first)
        else:
            mean = now - self.session_start
        epochs_left = self.epochs - epoch - 1
        if self.budget is not None and self.longest > 0:  # WallTimeBudget: stop when now + longest > budget
            epochs_left = min(epochs_left, math.floor(max(self.budget - now, 0.0) / self.longest))
        return epochs_left * mean

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        now = self.clock.elapsed()
        self.longest = max(self.longest, now - self.epoch_start)
        self.last = epoch
        if epoch == self.first:
            self.after_first = now
        dice = logs.get("val_dice")
        if dice is not None and math.isfinite(dice) and (self.best is None or dice > self.best[0]):
            self.best = (float(dice), epoch)
        if not self.verbose:
            return
        steps = f"{self.seen}/{self.target}" if self.target else f"{self.seen}"
        scores = "".join(f", {key} {logs[key]:.4f}" for key in ("loss", "val_dice") if key in logs)
        left = self.remaining(epoch)
        times = f"{format_seconds(now)} elapsed"
        if left > 0:
            times += f", time left {format_seconds(left)}, ends at {clock_time(left, self.wall_clock())}"
        self.write(f"train epoch {epoch + 1}/{self.epochs}: {steps} steps{scores} ({times})")

    def on_train_end(self, logs=None):
        if not self.verbose:
            return
        elapsed = format_seconds(self.clock.elapsed())
        if self.last is None:  # resumed after the last epoch's backup: nothing left to run
            self.write(f"train: no epoch left to run ({elapsed})")
            return
        line = f"train: {self.last + 1} of {self.epochs} epochs in {elapsed}"
        if self.first:  # resumed
            line += f" ({self.last + 1 - self.first} in this session)"
        if self.best is not None:
            line += f"; best val_dice {self.best[0]:.4f} at epoch {self.best[1] + 1}"
        self.write(line)

    def write(self, line: str) -> None:
        self.stream.write(("\r\x1b[K" if self.interactive else "") + line + "\n")
        self.stream.flush()


def cosine_learning_rate(base: float, progress: float, final_fraction: float = 0.01) -> float:
    """Half-cosine from ``base`` (progress 0) to ``base * final_fraction`` (progress >= 1)."""
    progress = min(max(float(progress), 0.0), 1.0)
    floor = base * final_fraction
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineSchedule(keras.callbacks.Callback):
    """Sets the learning rate at each epoch start from the run's progress (0..1).

    Progress is ``epoch / epochs``, or elapsed / ``seconds`` of the ``clock`` when a wall-time budget is
    given (the number of epochs that fit is not known in advance). A resumed run continues the curve.
    """

    def __init__(self, base: float, epochs: int, seconds: float | None = None, clock: TrainingClock | None = None,
                 final_fraction: float = 0.01):
        super().__init__()
        if seconds is not None and clock is None:
            raise ValueError("a wall-time cosine schedule needs the run's clock")
        self.base, self.epochs, self.seconds, self.clock = float(base), int(epochs), seconds, clock
        self.final_fraction = final_fraction

    def progress(self, epoch: int) -> float:
        if self.seconds is not None:
            return self.clock.elapsed() / self.seconds
        return epoch / self.epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.rate = cosine_learning_rate(self.base, self.progress(epoch), self.final_fraction)
        self.model.optimizer.learning_rate = self.rate

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:  # the plateau schedule logs it too; history.csv keeps one column
            logs["learning_rate"] = self.rate


class ResumableReduceLROnPlateau(keras.callbacks.ReduceLROnPlateau):
    """ReduceLROnPlateau whose ``best`` and ``wait`` continue from earlier epochs of a resumed run.

    Args:
        history: rows of ``history.csv`` of the epochs already done (``RunFolder.history``).
        other arguments: those of ``keras.callbacks.ReduceLROnPlateau``.
    """

    def __init__(self, history: list[dict[str, float]] | None = None, **kwargs):
        super().__init__(**kwargs)
        self._history = list(history or [])

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        values = [row.get(self.monitor, math.nan) for row in self._history]
        values = [value for value in values if math.isfinite(value)]
        if not values:
            return
        best_index = max(range(len(values)), key=lambda i: (values[i], -i))
        self.best = values[best_index]
        # Epochs since the best, modulo reductions already made (each resets the counter).
        self.wait = (len(values) - 1 - best_index) % max(1, self.patience)


class ValidationImages(keras.callbacks.Callback):
    """Each epoch, writes fixed validation slices with ground-truth and predicted contours to TensorBoard.

    Each image is ``[H, 2W, 3]``: left the ground truth, right the prediction (``p >= 0.5``), as
    one-pixel contours in each organ's colour over the soft-tissue-windowed centre CT channel.

    Args:
        dataset: batched validation ``(x [B,H,W,C] HU, y packed)`` dataset; the slices with the most
            annotated organs in the first ``scan_batches`` batches are chosen, once.
        organs: organ names in channel order (for the colours).
        log_dir: folder of the image summaries (e.g. ``run/logs/images``).
        count: number of slices shown.
    """

    def __init__(self, dataset, organs, log_dir, count: int = 4, scan_batches: int = 8,
                 window: tuple[float, float] = HU_WINDOW):
        super().__init__()
        self.organs = list(organs)
        self.log_dir = str(log_dir)
        self.window = window
        self.x, self.masks = _pick_slices(dataset, len(self.organs), count, scan_batches)
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if self.x is None or not len(self.x):
            return
        import tensorflow as tf  # summaries are TensorBoard's (tf) side, not model code

        probabilities = keras.ops.convert_to_numpy(self.model(self.x, training=False))
        images = [self.render(x, truth, prob >= 0.5)
                  for x, truth, prob in zip(self.x, self.masks, probabilities, strict=True)]
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        with self._writer.as_default():
            tf.summary.image("validation_contours", np.stack(images), step=epoch, max_outputs=len(images))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def render(self, x, truth, predicted) -> np.ndarray:
        """uint8 [H, 2W, 3]: GT contours (left) and predicted contours (right) on the CT.

        x: [H, W, C] HU; truth: [H, W, O] in {0, 1} (unannotated organs all 0); predicted: bool [H, W, O].
        """
        centre = x[..., x.shape[-1] // 2]
        return np.concatenate([render.overlay(centre, truth, self.organs, self.window),
                               render.overlay(centre, predicted, self.organs, self.window)], axis=1)


def _pick_slices(dataset, num_organs: int, count: int, scan_batches: int):
    """The ``count`` slices with the most annotated foreground organs: (x [N,H,W,C], masks [N,H,W,O])."""
    xs, masks = [], []
    for x, y in dataset.take(scan_batches):
        xs.append(keras.ops.convert_to_numpy(x))
        masks.append(keras.ops.convert_to_numpy(unpack_targets(y, num_organs).masks))
    if not xs:
        return None, None
    x, mask = np.concatenate(xs), np.concatenate(masks)
    organs_present = (mask.reshape(len(mask), -1, num_organs).max(axis=1) > 0).sum(axis=-1)
    order = np.argsort(-organs_present, kind="stable")[:count]
    order.sort()
    return x[order].astype(np.float32), mask[order]


class BestCheckpoint(keras.callbacks.Callback):
    """Saves the model to ``path`` (atomically) whenever ``monitor`` exceeds the best so far (mode max).

    Args:
        path: ``.keras`` file, e.g. ``run/best.keras``.
        monitor: epoch log key, ``val_dice`` by default.
        best: best value of earlier epochs of a resumed run (-inf for a new run).
    """

    def __init__(self, path, monitor: str = "val_dice", best: float = -math.inf):
        super().__init__()
        self.path = Path(path)
        self.monitor = monitor
        self.best = best

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not math.isfinite(float(value)) or float(value) <= self.best:
            return
        self.best = float(value)
        save_model_atomic(self.model, self.path)


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """Validates and checkpoints the optimizer's moving average of the weights (Adam ``use_ema``).

    Validation runs with the average swapped in (``SwapEMAWeights``), and it stays in through the epoch
    end for the callbacks that follow (best checkpoint, images) until ``back_to_raw`` swaps it out,
    so the epoch backup holds the raw weights and the average in their own places and a resumed run
    continues exactly. ``fit`` ends by copying the average into the model (``final.keras``).
    """

    def __init__(self):
        super().__init__(swap_on_epoch=False)

    def on_test_end(self, logs=None):
        """Keeps the average in after validation: the epoch end, which follows, wants it there
        (two swaps fewer per epoch, ~0.3 s for S on a 2-core CPU)."""

    def on_epoch_end(self, epoch, logs=None):
        if not self._ema_weights_in_model:
            self._swap_variables()
            self._ema_weights_in_model = True

    def back_to_raw(self) -> keras.callbacks.Callback:
        """The callback to place after those that should see the average (before the backup)."""
        averaged = self

        class BackToRaw(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if averaged._ema_weights_in_model:
                    averaged._swap_variables()
                    averaged._ema_weights_in_model = False

        return BackToRaw()
