"""Where a plan's step goes against the one-device step: the figures of docs/how-it-works.md, "Where
the rest of the step goes".

    python -m benchmarks.bench_step_parts                       # AlexNet: one device and "auto", convolutions trained and frozen
    python -m benchmarks.bench_step_parts --variants auto,hidden,every_core --frozen=false

Each variant runs in its own process (the one-device one without logical devices, as a user runs it;
the others on a 4x2 mesh of 8 logical CPUs): the model of examples/zoo.py at 64x64, 100 classes,
batch 32, SGD; --rounds fits of --steps steady steps, each step's loss read back, the first left out;
the median step. Variants:
- one: plain Keras on one device;
- auto: keras_lwp's default plan;
- hidden: "auto" with hidden_dimensions=True (convolutions may split by channel);
- every_core: "auto" with each op on every core (TensorFlow's default, which use_virtual_devices
  replaces by the cores per device).
With --frozen (the default) each variant runs again with its convolutions frozen (trainable=False):
what training them costs, apart from the rest of the step.

No goal is printed: this explains bench_peers' distance to the one-device step.
"""

import json
import os
import statistics
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "alexnet", "A model of examples/zoo.py (alexnet, vgg16, transformer).")
flags.DEFINE_list("variants", ["one", "auto"], "Variants to time: one, auto, hidden, every_core.")
flags.DEFINE_boolean("frozen", True, "Also time each variant with its convolutions frozen.")
flags.DEFINE_integer("rounds", 4, "Timed fits per variant.")
flags.DEFINE_integer("steps", 8, "Steady steps per fit (one more is run and left out).")
flags.DEFINE_string("worker", None, "Internal: run one variant in this process (JSON).")

BATCH = 32


def worker(spec):
    variant, frozen = spec["variant"], spec["frozen"]
    if variant != "one":
        import keras_lwp

        if variant == "every_core":
            import tensorflow as tf

            tf.config.threading.set_intra_op_parallelism_threads(len(os.sched_getaffinity(0)))
        keras_lwp.use_virtual_devices(8)
    import keras
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.steady import timed_fit
    from examples import zoo

    keras.utils.set_random_seed(0)
    model = zoo.build(spec["model"], image_size=64, classes=100)
    for layer in model.layers:
        if frozen and isinstance(layer, keras.layers.Conv2D):
            layer.trainable = False
    if variant != "one":
        model = keras_lwp.parallelize(model, keras_lwp.make_mesh({"x": 4, "y": 2}), batch_size=BATCH,
                                      hidden_dimensions=variant == "hidden")
    softmax = getattr(model.layers[-1], "activation", None) is keras.activations.softmax
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax))
    rng = np.random.default_rng(0)
    count = (spec["steps"] + 1) * BATCH
    shape = tuple(model.inputs[0].shape[1:])
    if model.inputs[0].dtype.startswith("int"):
        x = rng.integers(0, 1000, (count,) + shape).astype("int32")
    else:
        x = rng.standard_normal((count,) + shape, dtype="float32")
    y = rng.integers(0, model.outputs[0].shape[-1], count)
    timed_fit(model, x, y, BATCH)  # tracing
    steps = []
    for _ in range(spec["rounds"]):
        steps += timed_fit(model, x, y, BATCH)["steps"]
    print("@@" + json.dumps(statistics.median(steps)), flush=True)


def main(argv):
    del argv
    if FLAGS.worker:
        worker(json.loads(FLAGS.worker))
        return
    print(f"{FLAGS.model} (images at 64x64), batch {BATCH}, SGD; median of {FLAGS.rounds} fits of {FLAGS.steps} steady steps, "
          "each variant in its own process")
    for variant in FLAGS.variants:
        for frozen in ([False, True] if FLAGS.frozen else [False]):
            spec = dict(variant=variant, frozen=frozen, model=FLAGS.model, rounds=FLAGS.rounds, steps=FLAGS.steps)
            done = subprocess.run([sys.executable, "-m", "benchmarks.bench_step_parts", "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                                      os.path.abspath(__file__))))
            lines = [line for line in done.stdout.splitlines() if line.startswith("@@")]
            if done.returncode or not lines:
                print(f"  {variant:<11} {'frozen' if frozen else 'trained':<8} failed:\n{done.stderr[-2000:]}")
                continue
            seconds = json.loads(lines[-1][2:])
            print(f"  {variant:<11} convolutions {'frozen' if frozen else 'trained':<8} {seconds * 1e3:8.1f} ms/step",
                  flush=True)


if __name__ == "__main__":
    app.run(main)
