"""What each of keras_lwp's own implementations moves between devices, read from the program DTensor
compiled (benchmarks/collectives.py), against what the cost model prices and a naive alternative.

    python -m benchmarks.bench_moves

Each case is one layer, parallelized with its configuration pinned (its input arriving already laid
out as the configuration wants it, so the layer wrapper moves nothing), run once as a training step
would: output, input gradient and weight gradients in one tf.function. Every collective DTensor put
in that function is listed with the bytes one device receives, including any DTensor added on its
own. Beside the total: the cost model's bytes for the same placement (halo both ways, partial-sum
all-reduces, gradient synchronization) and what the naive alternative would receive:
  - spatial splits of pooling: an all-gather of the whole input along the split axis;
  - Embedding's vocabulary split: an all-gather of the table;
  - EinsumDense's row split: an all-gather of the kernel.
"""

import os
import tempfile

from absl import app, flags, logging

from benchmarks import collectives

FLAGS = flags.FLAGS
flags.DEFINE_string("mesh", "4x2", "Mesh shape AxB: the batch on the first axis, the hidden split on the second.")
flags.DEFINE_string("dump_dir", None, "Where DTensor writes its programs (default: a temporary directory).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    dump = FLAGS.dump_dir or tempfile.mkdtemp(prefix="keras_lwp_moves_")
    collectives.enable(dump)  # before TensorFlow loads
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras_lwp

    outer, inner = (int(s) for s in FLAGS.mesh.lower().split("x"))
    keras_lwp.use_virtual_devices(outer * inner)
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_lwp import Config, Strategy
    from keras_lwp.cost.comm import relayout_bytes
    from keras_lwp.cost.model import AnalyticCostModel
    from keras_lwp.graph import layer_graph
    from keras_lwp.layers import Placement, dimensions_of
    from keras_lwp.mesh import mesh_spec_of
    from keras_lwp.runtime import to_mesh

    mesh = keras_lwp.make_mesh({"x": outer, "y": inner})
    spec = mesh_spec_of(mesh)
    model_costs = AnalyticCostModel(spec)

    def ring(nbytes, axes):
        k = int(np.prod([spec.axis_size(a) for a in axes])) if axes else 1
        return 2 * (k - 1) / k * nbytes if k > 1 else 0.0

    def predicted(place, call):
        """Bytes one device receives by the cost model: halos forward and backward, partial sums of
        the output (forward) and of the input gradients (backward), weight gradient all-reduces."""
        split = lambda layout: int(np.prod([spec.axis_size(a) for a in layout if a is not None]))  # noqa: E731
        total = 2 * model_costs.halo_bytes(place, call)
        out = call.outputs[0]
        total += ring(out.nbytes / split(place.output_layout(out)), place.output_partial_axes())
        for index, tensor in enumerate(call.inputs):
            if "float" in tensor.dtype:
                total += ring(tensor.nbytes / split(place.input_layout(index, tensor)),
                              place.input_grad_partial_axes(index))
        for index, weight in enumerate(place.info.weights):
            total += ring(weight.nbytes / split(place.weight_layout(index)), place.weight_grad_partial_axes(index))
        return total

    def run(index, title, layer, shape, config, naive, dtype="float32", high=None):
        inputs = keras.Input(shape[1:], batch_size=None, dtype=dtype, name="data")
        model = keras.Model(inputs, layer(inputs))
        graph = layer_graph(model, shape[0])
        info = graph.nodes[layer.name]["info"]
        place = Placement(info, dimensions_of(info), Config(config), spec)
        input_config = {d: a for d, a in config.items() if d in ("sample", "length", "height", "width")}
        if info.class_name.endswith("Pooling2D") or info.class_name.endswith("Pooling1D"):
            input_config = {d: a for d, a in config.items() if d != "vocabulary"}
        strategy = Strategy({"data": Config(input_config), layer.name: Config(config)}, spec)
        keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=shape[0])
        rng = np.random.default_rng(index)
        if dtype == "float32":
            x = rng.standard_normal(shape, dtype="float32")
        else:
            x = rng.integers(0, high, shape).astype(dtype)
        x = to_mesh(x, place.input_layout(0, info.inputs[0]), mesh)
        out = info.output
        cotangent = to_mesh(rng.standard_normal(out.shape, dtype="float32"), place.output_layout(out), mesh)
        weights = list(layer.trainable_weights)

        def forward(x):
            return layer(x)

        def step(x, cotangent):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x) * cotangent)
            sources = ([x] if dtype == "float32" else []) + [w.value for w in weights]
            return tape.gradient(loss, sources)

        forward.__name__, step.__name__ = f"moves_{index}_forward", f"moves_{index}_step"
        tf.function(forward)(x)
        tf.function(step)(x, cotangent)
        ahead = collectives.received(collectives.collectives(forward.__name__, dump))
        found = collectives.collectives(step.__name__, dump)
        moved = collectives.received(found)
        print(f"\n{title}, {Config(config)} on mesh {outer}x{inner} (forward + all gradients):")
        for c in found:
            if c.received:
                print(f"  {c}")
        quiet = len([c for c in found if not c.received])
        if quiet:
            print(f"  (+ {quiet} all-scatters: local slices, nothing received)")
        model_bytes = predicted(place, info.calls[0])
        naive_name, naive_bytes = naive(info, place)
        print(f"  received per device: {moved / 2**10:.1f} KiB, of which forward {ahead / 2**10:.1f} KiB "
              f"(cost model: {model_bytes / 2**10:.1f} KiB)")
        print(f"  {naive_name} (forward alone): {naive_bytes / 2**10:.1f} KiB; forward ratio "
              f"{ahead / naive_bytes:.3f}, whole step ratio {moved / naive_bytes:.3f}")
        return moved, model_bytes, naive_bytes

    def gather_input_along(dim):
        def naive(info, place):
            x = info.inputs[0]
            src = place.input_layout(0, x)
            dst = tuple(None if a == place.config[dim] else a for a in src)
            return f"all-gather of the input [{', '.join(map(str, x.shape))}] along {place.config[dim]}", \
                relayout_bytes(x.nbytes, src, dst, spec)
        return naive

    results = {}
    n = 32
    results["pool"] = run(0, f"MaxPooling2D 3x3 stride 2 'same' on [{n}, 32, 32, 64]",
                          keras.layers.MaxPooling2D(3, strides=2, padding="same", name="layer"), (n, 32, 32, 64),
                          {"sample": "x", "height": "y"}, gather_input_along("height"))
    results["avgpool"] = run(1, f"AveragePooling2D 3x3 stride 1 'same' on [{n}, 32, 32, 64]",
                             keras.layers.AveragePooling2D(3, strides=1, padding="same", name="layer"),
                             (n, 32, 32, 64), {"sample": "x", "width": "y"}, gather_input_along("width"))
    results["avgpool-n"] = run(2, f"AveragePooling2D 2x2 on [{n}, 32, 32, 64]",
                               keras.layers.AveragePooling2D(2, name="layer"), (n, 32, 32, 64),
                               {"sample": "x", "channel": "y"}, gather_input_along("sample"))
    results["conv"] = run(3, f"Conv2D 3x3 'same' 64->128 on [{n}, 32, 32, 64]",
                          keras.layers.Conv2D(128, 3, padding="same", name="layer"), (n, 32, 32, 64),
                          {"sample": "x", "height": "y"}, gather_input_along("height"))
    print()
    for name, (moved, model, naive) in results.items():
        ok = moved <= 1.0001 * model and moved < naive
        print(f"{name:<12} receives {moved / 2**10:8.1f} KiB per step, the cost model prices {model / 2**10:8.1f} KiB, "
              f"the naive alternative {naive / 2**10:8.1f} KiB forward alone: goal (no more than priced, less than "
              f"naive) {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    app.run(main)
