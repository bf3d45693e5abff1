"""What keras_lwp's plumbing costs: parallelize on a 1-device mesh against plain Keras fit, and the
"data" strategy against a hand-written DTensor data-parallel training step, same model and data.

    python -m benchmarks.bench_overhead

Each contender trains the same model for --steps steps after one warm-up step; contenders run
interleaved (A B A B ...) for --rounds rounds so machine noise hits all alike; the median
steady-state step time is printed beside the goal (at most 10% and 5% slower), and
apart from it what each `fit` call costs around its epoch (building the iterator, tearing it down)
under each strategy, beside plain Keras' (the goal: at most as much).
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 60, "Timed steps per round (one epoch of fit; its fixed costs amortize as in real training).")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")


def build_model(keras):
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    batch = FLAGS.batch_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch * (FLAGS.steps + 1), 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, len(x))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    fixed_costs = {}

    def keras_fit(name, model):
        """Steady-state seconds per step: the epoch's time, from its start to its end. What `fit`
        costs around the epoch (building the data iterator, and tearing it down, which tf.data
        sometimes takes a second over) is the same for every step count and is printed apart."""
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss)
        model.fit(x[:batch], y[:batch], batch_size=batch, verbose=0)  # trace

        def run():
            timer = EpochTimer()
            start = time.perf_counter()
            model.fit(x[batch:], y[batch:], batch_size=batch, verbose=0, shuffle=False, callbacks=[timer])
            fixed_costs.setdefault(name, []).append(time.perf_counter() - start - timer.seconds)
            return timer.seconds / FLAGS.steps
        return run

    def hand_written_data_parallel():
        """The DTensor data-parallel loop one writes by hand: an 8-device mesh, the batch packed
        split, weights and the Keras optimizer's slots replicated DVariables, one tf.function step
        with a tf.GradientTape and `optimizer.apply_gradients`."""
        mesh = dtensor.create_mesh([("batch", 8)], device_type="CPU")
        model = build_model(keras)
        from keras.src.optimizers.base_optimizer import BaseOptimizer

        def replicate(variables):
            for variable in variables:
                layout = dtensor.Layout.replicated(mesh, len(variable.shape))
                variable._value = dtensor.DVariable(dtensor.copy_to_mesh(variable.value, layout))

        replicate(model.trainable_variables)
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        # Slots as host variables (Keras' TF optimizer would colocate them with the DVariables), then replicated.
        optimizer.add_variable_from_reference = BaseOptimizer.add_variable_from_reference.__get__(optimizer)
        optimizer.build(model.trainable_variables)
        replicate(optimizer.variables)
        x_layout = dtensor.Layout.batch_sharded(mesh, "batch", 4)
        y_layout = dtensor.Layout.batch_sharded(mesh, "batch", 1)

        @tf.function
        def step(images, labels):
            with tf.GradientTape() as tape:
                value = loss(labels, model(images, training=True))
            grads = tape.gradient(value, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return value

        def shard(array, layout):
            return dtensor.pack(list(np.split(array, 8)), layout)

        step(shard(x[:batch], x_layout), shard(y[:batch], y_layout))

        def run(read_every_step):
            start = time.perf_counter()
            for i in range(1, FLAGS.steps + 1):
                value = step(shard(x[i * batch:(i + 1) * batch], x_layout), shard(y[i * batch:(i + 1) * batch], y_layout))
                if read_every_step:
                    float(dtensor.unpack(value)[0])
            float(dtensor.unpack(value)[0])
            return (time.perf_counter() - start) / FLAGS.steps
        return run

    keras.utils.set_random_seed(0)
    hand_written = hand_written_data_parallel()
    contenders = {
        "plain Keras fit (1 device)": keras_fit("plain Keras fit (1 device)", build_model(keras)),
        "parallelize, 1-device mesh": keras_fit("parallelize, 1-device mesh", keras_lwp.parallelize(
            build_model(keras), keras_lwp.make_mesh({"x": 1}), batch_size=batch)),
        # fit hands every step's loss to its callbacks, which waits for the step; a hand-written loop
        # that reports the loss per step does the same. The loop that never looks is shown for scale.
        "hand-written DTensor data parallel (8)": lambda: hand_written(read_every_step=True),
        "  same, loss read only at the end": lambda: hand_written(read_every_step=False),
    }
    for strategy in ("data", "owt", "auto"):
        name = f"parallelize, strategy {strategy} (8)"
        contenders[name] = keras_fit(name, keras_lwp.parallelize(
            build_model(keras), keras_lwp.make_mesh({"x": 8}), strategy=strategy, batch_size=batch))
    times = {name: [] for name in contenders}
    for _ in range(FLAGS.rounds):
        for name, run in contenders.items():
            times[name].append(run())
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, seconds in median.items():
        print(f"{name:<42} {seconds * 1e3:8.1f} ms/step   (rounds: {', '.join(f'{t * 1e3:.1f}' for t in times[name])})")
    plain_fixed = statistics.median(fixed_costs["plain Keras fit (1 device)"])
    for name, seconds in fixed_costs.items():
        verdict = ""
        if name != "plain Keras fit (1 device)":
            met = statistics.median(seconds) <= plain_fixed
            verdict = f"  (goal: at most plain Keras' median {plain_fixed * 1e3:.0f} ms: {'met' if met else 'MISSED'})"
        print(f"{name:<42} fit's cost around the epoch: median {statistics.median(seconds) * 1e3:.0f} ms "
              f"(rounds: {', '.join(f'{t * 1e3:.0f}' for t in seconds)}){verdict}")
    for ours, base, goal in (("parallelize, 1-device mesh", "plain Keras fit (1 device)", 0.10),
                             ("parallelize, strategy data (8)", "hand-written DTensor data parallel (8)", 0.05)):
        overhead = median[ours] / median[base] - 1
        print(f"{ours} vs {base}: {overhead:+.1%} (goal <= +{goal:.0%}: {'met' if overhead <= goal else 'MISSED'})")


if __name__ == "__main__":
    app.run(main)
