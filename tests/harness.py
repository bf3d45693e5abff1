"""The per-layer test harness of the hidden-dimension tests: a layer parallelized with a pinned
configuration, run wrapped (the code path `fit` runs) on the mesh inside a tf.function under a
GradientTape, against a plain single-device copy with the same weights.

One model holds one branch per (layer, configuration), each branch its own input, so one trace checks
a whole grid and every branch's input gradient is its own.
"""

import keras
import numpy as np
import tensorflow as tf

import keras_lwp
from keras_lwp import Config, Strategy
from keras_lwp.mesh import mesh_spec_of
from keras_lwp.placement import to_host, to_mesh
from tests.conftest import require_devices

ABBREVIATION = {"n": "sample", "c": "channel", "h": "height", "w": "width", "l": "length", "v": "vocabulary",
                "r": "reduction"}


def parse(config):
    """'n=x,h=y' -> {"sample": "x", "height": "y"}."""
    if not config:
        return {}
    return {ABBREVIATION[key]: axis for key, axis in (item.split("=") for item in config.split(","))}


def mesh_2x2x2():
    require_devices(8)
    return keras_lwp.make_mesh({"x": 2, "y": 2, "z": 2})


def normal(rng, shape):
    return rng.standard_normal(shape, dtype="float32")


def run_branches(mesh, layers, configs, input_shape, values=normal, seed=0):
    """Branch i is layers[i] (named, not built) under configs[i] ('n=x,h=y'), fed its own input drawn
    by values(rng, input_shape) and named in{i}. Returns (got, want, model): per branch, sharded and
    single-device {"output", "input gradient" (float inputs only), "<weight> gradient" per trainable
    weight: tensor}."""
    keras.utils.set_random_seed(seed)  # the weights are made when the model is
    rng = np.random.default_rng(seed)
    xs = [values(rng, input_shape) for _ in layers]
    differentiable = xs[0].dtype.kind == "f"
    inputs = [keras.Input(input_shape[1:], dtype=x.dtype.name, name=f"in{i}") for i, x in enumerate(xs)]
    model = keras.Model(inputs, [layer(tensor) for layer, tensor in zip(layers, inputs)])

    want, cotangents = [], []
    for layer, x in zip(layers, xs):
        plain = type(layer).from_config(layer.get_config())
        plain.build(input_shape)
        plain.set_weights(layer.get_weights())
        with tf.GradientTape() as tape:
            xt = tf.constant(x)
            if differentiable:
                tape.watch(xt)
            y = plain(xt)
            cotangent = rng.standard_normal(y.shape, dtype="float32")
            loss = tf.reduce_sum(y * cotangent)
        sources = ([xt] if differentiable else []) + list(plain.trainable_weights)
        want.append(_named(y, tape.gradient(loss, sources), plain, differentiable))
        cotangents.append(cotangent)

    strategy = {f"in{i}": Config() for i in range(len(layers))}
    strategy.update({layer.name: Config(parse(config)) for layer, config in zip(layers, configs)})
    keras_lwp.parallelize(model, mesh, strategy=Strategy(strategy, mesh_spec_of(mesh)), batch_size=input_shape[0])

    @tf.function
    def step(xs, cs):
        with tf.GradientTape() as tape:
            if differentiable:
                tape.watch(xs)
            ys = [layer(x) for layer, x in zip(layers, xs)]
            loss = tf.add_n([tf.reduce_sum(y * c) for y, c in zip(ys, cs)])
        sources = [([x] if differentiable else []) + list(layer.trainable_weights) for layer, x in zip(layers, xs)]
        return [_named(y, grads, layer, differentiable)
                for y, grads, layer in zip(ys, tape.gradient(loss, sources), layers)]

    got = step([to_mesh(x, (None,) * x.ndim, mesh) for x in xs], [to_mesh(c, (None,) * c.ndim, mesh)
                                                                   for c in cotangents])
    return got, want, model


def _named(output, gradients, layer, differentiable):
    names = (["input"] if differentiable else []) + [w.name for w in layer.trainable_weights]
    # IndexedSlices (an embedding table's gradient) as a dense tensor.
    return {"output": output, **{f"{n} gradient": tf.convert_to_tensor(g) for n, g in zip(names, gradients)}}


def assert_matches(got, want, what=""):
    """Each sharded result equals its single-device one within 1e-5 relative (to the largest entry)."""
    assert got.keys() == want.keys(), what
    for name in want:
        a, b = np.asarray(to_host(got[name])), np.asarray(want[name])
        assert a.shape == b.shape, f"{what} {name}: shape {a.shape} != {b.shape}"
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))), err_msg=f"{what} {name}")
