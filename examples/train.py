"""Plan and train a model on a mesh of logical CPU devices: the plan, then samples per second.

    python examples/train.py                      # AlexNet, 64x64 images, 8 devices as 4x2, strategy auto
    python examples/train.py --model vgg16 --strategy data --mesh x=4,y=2 --steps 6

Synthetic data; the plan is printed before training; throughput excludes the first (tracing) step.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "alexnet", ["alexnet", "vgg16", "inception_v3", "resnet101", "transformer"],
                  "Model to train (random weights).")
flags.DEFINE_integer("devices", 8, "Logical CPU devices to split this machine into.")
flags.DEFINE_string("mesh", "4x2", "Mesh shape: '4x2' (axes x, y, ...) or 'x=4,y=2'.")
flags.DEFINE_string("strategy", "auto", "auto, data, model, owt, or a path to a Strategy JSON file.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("image_size", 64, "Image height and width for the CNNs.")
flags.DEFINE_integer("classes", 100, "Number of classes.")
flags.DEFINE_integer("steps", 8, "Training steps to time (after one warm-up step).")
flags.DEFINE_string("profile", None, "Device profile for the analytic cost model (default: by device type).")
flags.DEFINE_enum("cost_model", "analytic", ["analytic", "profiled"],
                  "analytic: FLOPs and bytes against the device profile; profiled: measured on this mesh "
                  "(minutes the first time, then cached under ~/.cache/keras_lwp).")
flags.DEFINE_string("plan_out", None, "Write the chosen Strategy as JSON here.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # DTensor logs every mesh it makes at INFO
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_lwp

    keras_lwp.use_virtual_devices(FLAGS.devices)
    import keras
    import numpy as np

    from examples import zoo

    mesh = keras_lwp.make_mesh(FLAGS.mesh)
    keras.utils.set_random_seed(0)  # same weights and dropout seeds for every strategy: comparable losses
    model = zoo.build(FLAGS.model, FLAGS.image_size if FLAGS.model != "transformer" else None, FLAGS.classes)
    print(f"{FLAGS.model}: {model.count_params():,} parameters, batch {FLAGS.batch_size}, mesh {FLAGS.mesh}")
    # Compiled first, so a profiled cost model times this optimizer's update.
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=FLAGS.model != "vgg16"
                                                             and FLAGS.model != "inception_v3"
                                                             and FLAGS.model != "resnet101"))
    cost_model = FLAGS.cost_model
    if cost_model == "profiled":  # one cost model for the baselines and the plan: measured once
        cost_model = keras_lwp.cost.ProfiledCostModel(mesh, optimizer=model.optimizer)
    for baseline in ("data", "model", "owt"):
        other = keras_lwp.search(model, mesh, FLAGS.batch_size, strategy=baseline, profile=FLAGS.profile,
                                 cost_model=cost_model)
        print(f"  predicted {baseline:>5}: {other.cost}")
    started = time.perf_counter()
    model = keras_lwp.parallelize(model, mesh, strategy=FLAGS.strategy, batch_size=FLAGS.batch_size,
                                  profile=FLAGS.profile, cost_model=cost_model)
    plan = keras_lwp.strategy_of(model)
    print(f"planned and sharded in {time.perf_counter() - started:.2f} s")
    print(plan.summary())
    if FLAGS.plan_out:
        with open(FLAGS.plan_out, "w") as f:
            f.write(plan.to_json())

    rng = np.random.default_rng(0)
    samples = FLAGS.batch_size * (FLAGS.steps + 1)
    if FLAGS.model == "transformer":
        x = rng.integers(0, 1000, (samples,) + tuple(model.inputs[0].shape[1:])).astype("int32")
    else:
        x = rng.standard_normal((samples,) + tuple(model.inputs[0].shape[1:]), dtype="float32")
    y = rng.integers(0, FLAGS.classes, samples)

    times = []
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: times.append(time.perf_counter()),
        on_train_batch_end=lambda batch, logs: times.append(time.perf_counter()))
    history = model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    step_times = [end - begin for begin, end in zip(times[2::2], times[3::2])]  # skip the tracing step
    measured = float(np.median(step_times))
    print(f"loss {history.history['loss'][-1]:.4f}; median step {measured * 1e3:.1f} ms over {len(step_times)} "
          f"steps (predicted {plan.cost.total * 1e3:.1f} ms): {FLAGS.batch_size / measured:.1f} samples/s")


if __name__ == "__main__":
    app.run(main)
