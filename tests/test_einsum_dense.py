"""EinsumDense's column- and row-parallel splits (keras_lwp.layers.einsum_dense) on real DTensor.

As tests/test_hidden_conv.py: layers parallelized with a pinned configuration run wrapped (the code
path `fit` runs) inside a tf.function under a GradientTape; output, input gradient and kernel/bias
gradients must equal a single-device copy within 1e-5 relative. One model per equation holds one
branch per configuration, each its own input.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

import keras_lwp
from keras_lwp import Config, MeshSpec, Strategy
from keras_lwp.graph import layer_graph
from keras_lwp.layers import Placement, base, configurations, einsum_dense, registered_rule, runnable_dims
from keras_lwp.mesh import mesh_spec_of
from keras_lwp.runtime import to_host, to_mesh
from tests.conftest import require_devices

ABBREVIATION = {"n": "sample", "l": "length", "c": "channel", "r": "reduction"}


def parse(config):
    """'n=x,r=y' -> {"sample": "x", "reduction": "y"}."""
    if not config:
        return {}
    return {ABBREVIATION[key]: axis for key, axis in (item.split("=") for item in config.split(","))}


def test_the_split_rule_is_the_registered_one():
    assert isinstance(base._RULES["EinsumDense"], einsum_dense.SplitEinsumDenseRule)


@pytest.fixture(scope="module")
def mesh():
    require_devices(8)
    return keras_lwp.make_mesh({"x": 2, "y": 2, "z": 2})


EQUATIONS = {  # id: (input shape, EinsumDense arguments, configurations)
    "ab,bc->ac": ((4, 8), dict(equation="ab,bc->ac", output_shape=6, bias_axes="c", activation="tanh"),
                  ["n=x", "c=x", "r=x", "n=x,c=y", "n=x,r=y", "c=x,r=y", "n=x,c=y,r=z"]),
    "abc,cd->abd": ((4, 4, 8), dict(equation="abc,cd->abd", output_shape=(4, 6), bias_axes="d"),
                    ["l=x", "c=x", "r=x", "n=x,l=y,c=z", "n=x,l=y,r=z", "c=x,r=y"]),
    "abc,cde->abde": ((4, 4, 8), dict(equation="abc,cde->abde", output_shape=(4, 4, 6), bias_axes="de"),
                      ["c=x", "r=x", "n=x,c=y", "n=x,l=y,r=z", "c=x,r=y"]),
    # A bias along e only: under a split of d its gradient is a partial sum.
    "abc,cde->abde-bias-e": ((4, 4, 8), dict(equation="abc,cde->abde", output_shape=(4, 4, 6), bias_axes="e"),
                             ["n=x,c=y", "c=x,r=y"]),
}


@pytest.mark.parametrize("case", list(EQUATIONS))
def test_einsum_dense_matches_single_device(mesh, case):
    shape, kwargs, configs = EQUATIONS[case]
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs, outputs, layers, plain, strategy = [], [], [], [], {}
    for index, config in enumerate(configs):
        tensor = keras.Input(shape[1:], name=f"in{index}")
        layer = keras.layers.EinsumDense(name=f"dense{index}", bias_initializer="glorot_uniform", **kwargs)
        inputs.append(tensor)
        outputs.append(layer(tensor))
        layers.append(layer)
        twin = keras.layers.EinsumDense(**kwargs)
        twin.build(shape)
        twin.set_weights(layer.get_weights())
        plain.append(twin)
        strategy[f"in{index}"] = Config()
        strategy[f"dense{index}"] = Config(parse(config))
    model = keras.Model(inputs, outputs)
    xs = [rng.standard_normal(shape, dtype="float32") for _ in configs]
    want, cotangents = [], []
    for layer, x in zip(plain, xs):
        with tf.GradientTape() as tape:
            xt = tf.constant(x)
            tape.watch(xt)
            y = layer(xt)
            cotangent = rng.standard_normal(y.shape, dtype="float32")
            loss = tf.reduce_sum(y * cotangent)
        want.append([y, *tape.gradient(loss, [xt, layer.kernel, layer.bias])])
        cotangents.append(cotangent)

    keras_lwp.parallelize(model, mesh, strategy=Strategy(strategy, mesh_spec_of(mesh)), batch_size=shape[0])

    @tf.function
    def step(xs, cs):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            ys = [layer(x) for layer, x in zip(layers, xs)]
            loss = tf.add_n([tf.reduce_sum(y * c) for y, c in zip(ys, cs)])
        grads = tape.gradient(loss, [xs, [[layer.kernel, layer.bias] for layer in layers]])
        return ys, grads

    ys, (dxs, dweights) = step([to_mesh(x, (None,) * x.ndim, mesh) for x in xs],
                               [to_mesh(c, (None,) * c.ndim, mesh) for c in cotangents])
    graph = layer_graph(model, shape[0])
    for index, config in enumerate(configs):
        got = [ys[index], dxs[index], *dweights[index]]
        for name, a, b in zip(("output", "input gradient", "kernel gradient", "bias gradient"), got, want[index]):
            a, b = np.asarray(to_host(a)), np.asarray(b)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))),
                                       err_msg=f"{case} {{{config}}} {name}")
        info = graph.nodes[f"dense{index}"]["info"]
        place = Placement(info, registered_rule(info).dimensions(info), Config(parse(config)), mesh_spec_of(mesh))
        assert dtensor.fetch_layout(ys[index]).sharding_specs == [a or "unsharded" for a in
                                                                  place.output_layout(info.output)]
        assert dtensor.fetch_layout(layers[index].kernel.value).sharding_specs == [
            a or "unsharded" for a in place.weight_layout(0)]


def test_declared_dimensions_and_what_they_communicate():
    inputs = keras.Input((4, 8), name="tokens")
    layer = keras.layers.EinsumDense("abc,cde->abde", output_shape=(4, 4, 6), bias_axes="de", name="proj")
    model = keras.Model(inputs, layer(inputs))
    info = layer_graph(model, 4).nodes["proj"]["info"]
    dims = {d.name: d for d in registered_rule(info).dimensions(info)}
    assert list(dims) == ["sample", "length", "channel", "reduction"]
    assert all(d.native and not d.implemented for d in dims.values())
    spec = MeshSpec((("x", 2), ("y", 2), ("z", 2)))
    runnable = configurations(info, runnable_dims(list(dims.values())), spec)
    for config in EQUATIONS["abc,cde->abde"][2]:
        assert Config(parse(config)) in runnable
    # Column-parallel: kernel [c, d, e] and bias [d, e] split along d, the input gradient partial.
    column = Placement(info, list(dims.values()), Config({"sample": "x", "channel": "y"}), spec)
    assert column.weight_layout(0) == (None, "y", None) and column.weight_layout(1) == ("y", None)
    assert column.output_layout(info.output) == ("x", None, "y", None)
    assert column.input_grad_partial_axes(0) == ("y",) and column.output_partial_axes() == ()
    # Row-parallel: kernel rows and the input's last axis split, the output a partial sum.
    row = Placement(info, list(dims.values()), Config({"sample": "x", "reduction": "y"}), spec)
    assert row.weight_layout(0) == ("y", None, None) and row.input_layout(0, info.inputs[0]) == ("x", None, "y")
    assert row.output_partial_axes() == ("y",) and row.input_grad_partial_axes(0) == ()
    assert row.weight_grad_partial_axes(0) == ("x",)


def test_ellipsis_equations_keep_the_sample_split():
    inputs = keras.Input((4, 8), name="tokens")
    layer = keras.layers.EinsumDense("...b,bc->...c", output_shape=6, name="proj")
    model = keras.Model(inputs, layer(inputs))
    info = layer_graph(model, 4).nodes["proj"]["info"]
    assert [d.name for d in registered_rule(info).dimensions(info)] == ["sample"]
