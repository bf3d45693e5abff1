"""What each of keras_lwp's own implementations moves between devices, read from the program DTensor
compiled (benchmarks/collectives.py), against what the cost model prices and a naive alternative.

    python -m benchmarks.bench_moves

Each case is one layer, parallelized with its configuration pinned (its input arriving already laid
out as the configuration wants it, so the layer wrapper moves nothing), run once as a training step
would: output, input gradient and weight gradients in one tf.function. Every collective DTensor put
in that function is listed with the bytes one device receives, including any DTensor added on its
own. Beside the total: the cost model's bytes for the same placement (halo both ways, partial-sum
all-reduces, gradient synchronization), and
  - for the spatial splits (pooling, and the convolution for comparison), what the forward pass
    receives against an all-gather of the whole input along the split axis (the naive split);
  - for the weight splits (Embedding, EinsumDense), the same layer with that dimension replicated
    instead ({n=x}): what the split adds (partial sums) or saves (gradient synchronization).
The goal: every implementation receives no more than the cost model prices, and a spatial split's
forward pass less than a quarter of the all-gather.
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
    from keras_lwp.placement import relayout, to_mesh

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
            total += ring(weight.nbytes / split(place.weight_grad_layout(index)), place.weight_grad_partial_axes(index))
        return total

    def run(index, layer, shape, config, dtype="float32", high=None, show=True):
        """(bytes received per device over a training step, over the forward pass, the cost model's)."""
        inputs = keras.Input(shape[1:], dtype=dtype, name="data")
        model = keras.Model(inputs, layer(inputs))
        graph = layer_graph(model, shape[0])
        info = graph.nodes[layer.name]["info"]
        place = Placement(info, dimensions_of(info), Config(config), spec)
        # The input arrives as the layer wants it (the wrapper then moves nothing).
        wanted = place.input_layout(0, info.inputs[0])
        names = [d.name for d in dimensions_of(graph.nodes["data"]["info"])]
        input_config = {names[i]: a for i, a in enumerate(wanted) if a is not None}
        strategy = Strategy({"data": Config(input_config), layer.name: Config(config)}, spec)
        keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=shape[0])
        rng = np.random.default_rng(index)
        if dtype == "float32":
            x = rng.standard_normal(shape, dtype="float32")
        else:
            x = rng.integers(0, high, shape).astype(dtype)
        x = to_mesh(x, wanted, mesh)
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
            grads = tape.gradient(loss, sources)
            # As the optimizer takes them: dense (an Embedding's IndexedSlices densified), laid out
            # like their weight (its slots).
            return grads[:len(grads) - len(weights)] + [
                relayout(tf.convert_to_tensor(g), place.weight_layout(i), mesh)
                for i, g in enumerate(grads[len(grads) - len(weights):])]

        forward.__name__, step.__name__ = f"moves_{index}_forward", f"moves_{index}_step"
        tf.function(forward)(x)
        tf.function(step)(x, cotangent)
        ahead = collectives.received(collectives.collectives(forward.__name__, dump))
        found = collectives.collectives(step.__name__, dump)
        moved = collectives.received(found)
        model_bytes = predicted(place, info.calls[0])
        if show:
            print(f"\n{layer.__class__.__name__} {Config(config)} on mesh {outer}x{inner}, forward + all gradients:")
            for c in found:
                if c.received:
                    print(f"  {c}")
            quiet = len([c for c in found if not c.received])
            if quiet:
                print(f"  (+ {quiet} all-scatters: local slices, nothing received)")
            print(f"  received per device: {moved / 2**10:.1f} KiB, of which forward {ahead / 2**10:.1f} KiB; "
                  f"the cost model prices {model_bytes / 2**10:.1f} KiB")
        return moved, ahead, model_bytes, place, info

    goals = []

    def spatial(index, title, make, shape, config, dim):
        print(f"\n== {title}")
        moved, ahead, model_bytes, place, info = run(index, make(), shape, config)
        x = info.inputs[0]
        src = place.input_layout(0, x)
        dst = tuple(None if a == config[dim] else a for a in src)
        gather = relayout_bytes(x.nbytes, src, dst, spec)
        print(f"  an all-gather of the input [{', '.join(map(str, x.shape))}] along {config[dim]}: "
              f"{gather / 2**10:.1f} KiB; the forward pass receives {ahead / gather:.3f} of it")
        goals.append((title, moved, model_bytes, ahead / gather < 0.25))

    def weighted(index, title, make, shape, config, **kwargs):
        print(f"\n== {title}")
        moved, ahead, model_bytes, _, _ = run(index, make(), shape, config, **kwargs)
        alone = {"sample": config["sample"]}
        other, other_ahead, _, _, _ = run(100 + index, make(), shape, alone, show=False, **kwargs)
        print(f"  the same layer with {Config(alone)}: {other / 2**10:.1f} KiB (forward {other_ahead / 2**10:.1f} "
              f"KiB); the split {'adds' if moved > other else 'saves'} {abs(moved - other) / 2**10:.1f} KiB")
        goals.append((title, moved, model_bytes, True))

    n = 32
    image = (n, 32, 32, 64)
    spatial(0, "MaxPooling2D 3x3 stride 2 'same', height split", lambda: keras.layers.MaxPooling2D(
        3, strides=2, padding="same", name="layer"), image, {"sample": "x", "height": "y"}, "height")
    spatial(1, "AveragePooling2D 3x3 stride 1 'same', width split", lambda: keras.layers.AveragePooling2D(
        3, strides=1, padding="same", name="layer"), image, {"sample": "x", "width": "y"}, "width")
    spatial(2, "AveragePooling2D 2x2, sample and channel split (AvgPoolGrad avoided)",
            lambda: keras.layers.AveragePooling2D(2, name="layer"), image, {"sample": "x", "channel": "y"}, "sample")
    spatial(3, "Conv2D 3x3 'same' 64->128, height split (keras_lwp.layers.hidden)", lambda: keras.layers.Conv2D(
        128, 3, padding="same", name="layer"), image, {"sample": "x", "height": "y"}, "height")
    spatial(8, "DepthwiseConv2D 3x3 'same', sample and channel split (no DepthwiseConv2dNativeBackpropFilter)",
            lambda: keras.layers.DepthwiseConv2D(3, padding="same", name="layer"), image,
            {"sample": "x", "channel": "y"}, "sample")
    spatial(9, "DepthwiseConv2D 3x3 'same', height split", lambda: keras.layers.DepthwiseConv2D(
        3, padding="same", name="layer"), image, {"sample": "x", "height": "y"}, "height")
    vocabulary, width, length = 8192, 256, 64
    for index, dim in enumerate(("vocabulary", "channel")):
        weighted(4 + index, f"Embedding {vocabulary}x{width} on ids [{n}, {length}], {dim} split",
                 lambda: keras.layers.Embedding(vocabulary, width, name="layer"), (n, length),
                 {"sample": "x", dim: "y"}, dtype="int32", high=vocabulary)
    for index, dim in enumerate(("channel", "reduction")):
        weighted(6 + index, f"EinsumDense 'abc,cde->abde' 512 -> 8x128 on [{n}, {length}, 512], {dim} split",
                 lambda: keras.layers.EinsumDense("abc,cde->abde", output_shape=(length, 8, 128), bias_axes="de",
                                                  name="layer"), (n, length, 512), {"sample": "x", dim: "y"})
    print()
    for title, moved, model_bytes, spatial_ok in goals:
        ok = moved <= 1.0001 * model_bytes and spatial_ok
        print(f"{moved / 2**10:9.1f} KiB, priced {model_bytes / 2**10:9.1f} KiB: {'met   ' if ok else 'MISSED'}  {title}")


if __name__ == "__main__":
    app.run(main)
