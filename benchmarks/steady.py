"""Steady-state step timing shared by the benchmarks: a fit whose every step's loss is read back, the
first step left out, and fit's fixed cost (what the call spends besides its steps) reported apart."""

import statistics
import time


def timed_fit(model, x, y, batch_size):
    """Fits one epoch of (x, y): {"steps": seconds of each step after the first, "fixed": the fit's wall
    time beyond its steps, each counted at the median step}."""
    import keras

    ends = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # the step's result read back: the step is done
            ends.append(time.perf_counter())

    start = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[StepTimer()])
    done = time.perf_counter()
    steps = [b - a for a, b in zip(ends, ends[1:])]
    return {"steps": steps, "fixed": (done - start) - len(ends) * statistics.median(steps)}


def interleaved_medians(rounds, contenders):
    """{key: median step seconds} of `contenders` ({key: a function running one timed round and returning
    its step seconds}), `rounds` rounds in forward and reverse order in turn, so that drift in the
    machine's speed falls on every contender alike."""
    seconds = {key: [] for key in contenders}
    for round_index in range(rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for key in order:
            seconds[key] += contenders[key]()
    return {key: statistics.median(values) for key, values in seconds.items()}
