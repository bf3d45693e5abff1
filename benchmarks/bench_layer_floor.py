"""What one layer adds to a data-parallel step besides its arithmetic: the floor under every plan.

    python -m benchmarks.bench_layer_floor

Issue 19 asks where the step of 8 logical CPU devices goes above the one-device step. Per layer kind
(ReLU, Dense, 1x1 Conv2D, BatchNormalization), a chain of 1 and one of 1 + --extra_layers such
layers on tiny tensors (2x2x16 maps, 4 samples per device: arithmetic is negligible) trains data
parallel through keras_lwp's fit on the --devices-device mesh; the difference over the extra layers
is what one layer costs the step. Beside it: what the default cost model ("analytic", calibrated on
this mesh) predicts for the same difference, and what one all-reduce costs (the calibrated latency
of a ring over the mesh). With DTensor's all-reduce combining off (keras_lwp.runtime: it applied
stale optimizer slots), each trained weight's gradient is one all-reduce of its own.

No goal is printed: this explains the others (bench_peers' distance to the one-device step).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("kinds", ["relu", "dense", "conv", "batchnorm"], "Layer kinds to chain.")
flags.DEFINE_integer("extra_layers", 16, "Layers the long chain has beyond the short one's one.")
flags.DEFINE_integer("devices", 8, "Logical CPU devices (a 1-D mesh of them).")
flags.DEFINE_integer("samples_per_device", 4, "Per-device batch.")


def chain(keras, kind, length):
    """`length` layers of `kind` on 2x2x16 maps, a pooled Dense head."""
    layers = keras.layers
    make = {"relu": lambda: layers.Activation("relu"), "dense": lambda: layers.Dense(16),
            "conv": lambda: layers.Conv2D(16, 1), "batchnorm": lambda: layers.BatchNormalization()}[kind]
    x = inputs = keras.Input((2, 2, 16))
    for _ in range(length):
        x = make()(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import keras_lwp

    keras_lwp.use_virtual_devices(FLAGS.devices)
    import keras

    from keras_lwp.cost import calibration, comm
    from keras_lwp.cost.profiled import ProfiledCostModel
    from keras_lwp.mesh import mesh_spec_of

    keras.config.set_floatx("float32")
    mesh = keras_lwp.make_mesh({"x": FLAGS.devices})
    spec = mesh_spec_of(mesh)
    profile = calibration.calibrated_profile(mesh)
    timer = ProfiledCostModel(spec, optimizer="sgd", progress=False, rounds=3).timer
    batch = FLAGS.samples_per_device * FLAGS.devices
    allreduce = comm.allreduce_time(64.0, ("x",), spec, profile)
    print(f"{spec}, batch {batch}; the calibrated all-reduce of a small gradient: {allreduce * 1e3:.2f} ms")
    print(f"{'layer':<10} {'measured ms per layer':>22} {'predicted (analytic)':>21}")
    for kind in FLAGS.kinds:
        measured, predicted = {}, {}
        for length in (1, 1 + FLAGS.extra_layers):
            model = chain(keras, kind, length)
            predicted[length] = keras_lwp.search(model, mesh, strategy="data", batch_size=batch).cost.total
            measured[length], _ = timer.fit_step("sgd", batch, model=chain(keras, kind, length))
        per_layer = {name: (values[1 + FLAGS.extra_layers] - values[1]) / FLAGS.extra_layers
                     for name, values in (("measured", measured), ("predicted", predicted))}
        print(f"{kind:<10} {per_layer['measured'] * 1e3:>22.3f} {per_layer['predicted'] * 1e3:>21.3f}", flush=True)


if __name__ == "__main__":
    app.run(main)
