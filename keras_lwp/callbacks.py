"""Keras callbacks for parallelized models: the plan at the start of training, and the measured
step time beside the predicted one."""

import time
import warnings

import keras
import numpy as np


class PlanReport(keras.callbacks.Callback):
    """Prints the Strategy a parallelized model runs when training begins.

    Args:
        print_fn: where the table goes (default: print).
    """

    def __init__(self, print_fn=print):
        super().__init__()
        self.print_fn = print_fn

    def on_train_begin(self, logs=None):
        from keras_lwp.runtime import strategy_of

        self.print_fn(strategy_of(self.model).summary())


class StepTime(keras.callbacks.Callback):
    """Measures the training step time and logs it beside the plan's prediction.

    Adds `step_time` (median seconds per step this epoch, tracing steps excluded) and
    `predicted_step_time` to the epoch logs, so they reach History and TensorBoard; warns once when
    they differ by more than `tolerance` (a fraction of the measured time).
    """

    def __init__(self, tolerance=0.5, skip_first=1):
        super().__init__()
        self.tolerance = tolerance
        self.skip_first = skip_first
        self._warned = False
        self._seen = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._times = []

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._seen += 1
        if self._seen > self.skip_first:
            self._times.append(time.perf_counter() - self._start)

    def on_epoch_end(self, epoch, logs=None):
        from keras_lwp.runtime import strategy_of

        if logs is None or not self._times:
            return
        measured = float(np.median(self._times))
        predicted = strategy_of(self.model).cost.total
        logs["step_time"] = measured
        logs["predicted_step_time"] = predicted
        if not self._warned and abs(measured - predicted) > self.tolerance * measured:
            self._warned = True
            warnings.warn(
                f"Measured step time {measured * 1e3:.1f} ms differs from the predicted {predicted * 1e3:.1f} ms "
                f"by more than {self.tolerance:.0%}: the cost model is off for this model and mesh "
                "(a calibrated profile fixes the ranking of plans, not only the figure).",
                stacklevel=2,
            )
