"""Hidden dimensions of a convolution on a CPU DTensor mesh: the halo exchange against a naive
spatial split, and the out-channel split, for one 3x3 'same' Conv2D (docs/design.md's example).

    python -m benchmarks.bench_halo

One training-style step (forward + filter gradient) of the same layer and data under:
  (a) one device (plain Keras, no DTensor);
  (b) the batch split 8 ways (DTensor's own convolution, the mesh seen as one axis of 8);
  (c) batch x height on the 4x2 mesh, through keras_lwp.layers.hidden (halo exchange);
  (d) batch x out-channel on the 4x2 mesh, through keras_lwp.layers.hidden;
  (e) batch split on x plus an explicit all-gather of the height-split input along y, then
      DTensor's batch-parallel convolution (what a naive spatial split costs).
Contenders run interleaved for --rounds rounds of --steps steps; the median is printed, and each
contender's filter gradient is checked against (a). The bytes one device receives for the input
in (c) (the halo rows, from the shapes the implementation relays out) and in (e) (the all-gather)
are printed beside the goal: (c) moves less than a quarter of (e). benchmarks/bench_moves.py reads
every collective (backward pass included) from DTensor's compiled program, for pooling, depthwise
convolution, Embedding and EinsumDense splits too.
"""

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 32, "Global batch size N.")
flags.DEFINE_integer("size", 32, "Image height and width.")
flags.DEFINE_integer("in_channels", 64, "Input channels.")
flags.DEFINE_integer("filters", 128, "Output channels.")
flags.DEFINE_integer("kernel", 3, "Kernel size (padding 'same', stride 1).")
flags.DEFINE_string("mesh", "4x2", "Mesh shape AxB: the batch on the first axis, height or channel on the second.")
flags.DEFINE_integer("steps", 10, "Timed steps per round.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import keras_lwp

    outer, inner = (int(s) for s in FLAGS.mesh.lower().split("x"))
    keras_lwp.use_virtual_devices(outer * inner)
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    from keras_lwp import Config, MeshSpec, Strategy
    from keras_lwp.layers import halo, hidden
    from keras_lwp.placement import layout, to_host, to_mesh

    n, size, cin, cout, k = FLAGS.batch, FLAGS.size, FLAGS.in_channels, FLAGS.filters, FLAGS.kernel
    mesh_axes = {"x": outer, "y": inner}
    mesh = keras_lwp.make_mesh(mesh_axes)
    flat = keras_lwp.make_mesh({"xy": outer * inner})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, size, size, cin), dtype="float32")

    def build():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((size, size, cin), name="image")
        layer = keras.layers.Conv2D(cout, k, padding="same", name="conv")
        return keras.Model(inputs, layer(inputs)), layer

    _, reference_layer = build()
    weights = reference_layer.get_weights()

    def timed(step, data):
        step(data)  # trace and compile

        def run():
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                out = step(data)
            np.asarray(to_host(out[0]))  # wait for the last step
            return (time.perf_counter() - start) / FLAGS.steps
        return run

    def filter_step(layer, before=None):
        @tf.function
        def step(data):
            with tf.GradientTape() as tape:
                inputs = data if before is None else before(data)
                loss = tf.reduce_sum(layer(inputs))
            return tape.gradient(loss, [layer.kernel, layer.bias])
        return step

    def one_device():
        _, layer = build()
        layer.set_weights(weights)
        with tf.device("/CPU:0"):
            data = tf.constant(x)
        return filter_step(layer), data

    layers = {}

    def config_name(config):
        return ",".join(f"{d}={a}" for d, a in sorted(config.items()))

    def sharded(dmesh, config, input_spec, before=None):
        model, layer = build()
        layer.set_weights(weights)
        spec = MeshSpec(tuple((name, int(s)) for name, s in zip(dmesh.dim_names, dmesh.shape())))
        keras_lwp.parallelize(model, dmesh, strategy=Strategy({"image": Config({}), "conv": Config(config)}, spec),
                              batch_size=n)
        layers[config_name(config)] = layer
        return filter_step(layer, before), to_mesh(x, input_spec, dmesh)

    def gather_height(data):
        return dtensor.relayout(data, layout(("x", None, None, None), mesh))

    setups = {
        "(a) one device": one_device(),
        f"(b) batch split {outer * inner} ways": sharded(flat, {"sample": "xy"}, ("xy", None, None, None)),
        f"(c) batch {outer} x height {inner} (halo)": sharded(mesh, {"sample": "x", "height": "y"},
                                                             ("x", "y", None, None)),
        f"(d) batch {outer} x out-channel {inner}": sharded(mesh, {"sample": "x", "channel": "y"},
                                                           ("x", None, None, None)),
        f"(e) batch {outer} + all-gather of height": sharded(mesh, {"sample": "x"}, ("x", "y", None, None),
                                                            before=gather_height),
    }
    want = [np.asarray(g) for g in setups["(a) one device"][0](setups["(a) one device"][1])]
    contenders, errors = {}, {}
    for name, (step, data) in setups.items():
        got = [np.asarray(to_host(g)) for g in step(data)]
        errors[name] = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(got, want))
        contenders[name] = timed(step, data)
    times = {name: [] for name in contenders}
    for _ in range(FLAGS.rounds):
        for name, run in contenders.items():
            times[name].append(run())

    print(f"Conv2D {k}x{k} 'same', N={n}, {size}x{size}, {cin}->{cout}; forward + filter gradient; "
          f"mesh {outer}x{inner} of logical CPUs; median of {FLAGS.rounds} rounds x {FLAGS.steps} steps")
    for name in contenders:
        print(f"{name:<40} {statistics.median(times[name]) * 1e3:8.1f} ms/step   (rounds: "
              f"{', '.join(f'{t * 1e3:.1f}' for t in times[name])}; filter gradient vs (a): {errors[name]:.1e})")

    # Bytes one device receives for the input in the forward pass (only the filter gradient is
    # computed, so no input gradient travels back): (c) from the relayouts the implementation makes,
    # recorded on one eager call; (e) from its all-gather. A relayout from local blocks of b elements
    # to local blocks of a elements brings a - b elements from other devices.
    def local_elements(shape, specs):
        parts = 1
        for spec in specs:
            if spec != "unsharded":
                parts *= int(mesh.dim_size(spec))
        return int(np.prod(shape)) // parts

    def received(tensor, after):
        before = dtensor.fetch_layout(tensor).sharding_specs
        after = ["unsharded" if a is None else a for a in after]
        return (local_elements(tensor.shape, after) - local_elements(tensor.shape, before)) * tensor.dtype.size

    halo_moves = []
    original = halo.relayout

    def recording(tensor, spec, dmesh):
        moved = received(tensor, spec)
        if moved > 0:
            halo_moves.append((tuple(tensor.shape), moved))
        return original(tensor, spec, dmesh)

    halo.relayout = recording
    try:
        layers[config_name({"sample": "x", "height": "y"})](to_mesh(x, ("x", "y", None, None), mesh))
    finally:
        halo.relayout = original
    halo = sum(moved for _, moved in halo_moves)
    gather = received(to_mesh(x, ("x", "y", None, None), mesh), ("x", None, None, None))
    for shape, moved in halo_moves:
        print(f"(c) relayout of {list(shape)} to replicated along y: {moved / 2**10:.0f} KiB received per device")
    print(f"(c) total: {halo / 2**10:.0f} KiB received per device (halo rows: "
          f"{hidden.halo_geometry(size, k, 1, 1, 'same', inner).halo} per block of {size // inner})")
    print(f"(e) all-gather of [{n}, {size}, {size}, {cin}] along y: {gather / 2**10:.0f} KiB received per device")
    ratio = halo / gather
    print(f"(c) moves {ratio:.3f} of (e)'s bytes (goal < 0.25: {'met' if ratio < 0.25 else 'MISSED'})")
    fastest = min(times, key=lambda name: statistics.median(times[name]))
    print(f"fastest: {fastest}")


if __name__ == "__main__":
    app.run(main)
