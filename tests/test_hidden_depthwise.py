"""DepthwiseConv1D/2D splits (keras_lwp.layers.hidden_depthwise) on real DTensor, 8 logical CPUs.

As tests/test_hidden_conv.py: layers parallelized with a pinned configuration run wrapped (the code
path `fit` runs) inside a tf.function under a GradientTape; output, input gradient and kernel/bias
gradients must equal a single-device copy within 1e-5 relative. One model per geometry holds one
branch per configuration, each its own input. The sample split is the one DTensor got wrong (its
replicated DepthwiseConv2dNativeBackpropFilter returned one shard's filter gradient).
"""

import keras
import pytest
from tensorflow.experimental import dtensor

from keras_lwp import Config, MeshSpec
from keras_lwp.graph import layer_graph
from keras_lwp.layers import base, configurations, hidden_depthwise, registered_rule, runnable_dims
from tests.harness import assert_matches, mesh_2x2x2, parse, run_branches

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler


def test_the_hidden_rule_is_the_registered_one():
    for name in ("DepthwiseConv1D", "DepthwiseConv2D"):
        assert isinstance(base._RULES[name], hidden_depthwise.HiddenDepthwiseRule)


@pytest.fixture(scope="module")
def mesh():
    return mesh_2x2x2()


CASES = {  # id: (layer class, input shape, arguments, configurations)
    "2d-k3-same-m2": (keras.layers.DepthwiseConv2D, (4, 8, 8, 4), dict(kernel_size=3, padding="same",
                                                                          depth_multiplier=2),
                      ["n=x", "c=x", "n=x,h=y,w=z", "c=x,h=y"]),
    "2d-k3-s2-same": (keras.layers.DepthwiseConv2D, (4, 8, 8, 4), dict(kernel_size=3, strides=2, padding="same"),
                      ["n=x,h=y", "c=x,w=y"]),
    "2d-k3-d2-valid": (keras.layers.DepthwiseConv2D, (4, 10, 10, 4), dict(kernel_size=3, dilation_rate=2),
                       ["h=x,w=y"]),  # 10 -> 6 rows: blocks of 5 -> 3, drifting window offsets
    "1d-k3-same": (keras.layers.DepthwiseConv1D, (4, 16, 4), dict(kernel_size=3, padding="same", depth_multiplier=2),
                   ["n=x", "l=x", "n=x,c=y,l=z"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_depthwise_matches_single_device(mesh, case):
    layer_class, shape, kwargs, configs = CASES[case]
    layers = [layer_class(name=f"depthwise{index}", activation="tanh", bias_initializer="glorot_uniform", **kwargs)
              for index in range(len(configs))]
    results, want, model = run_branches(mesh, layers, configs, shape)
    rank = len(shape) - 2
    names = ["sample", *hidden_depthwise.SPATIAL_NAMES[rank], "channel"]
    graph = layer_graph(model, shape[0])
    for index, (config, got, expected) in enumerate(zip(configs, results, want)):
        assert_matches(got, expected, f"{case} {{{config}}}")
        parsed = parse(config)
        assert dtensor.fetch_layout(got["output"]).sharding_specs == [parsed.get(n, "unsharded") for n in names]
        info = graph.nodes[f"depthwise{index}"]["info"]
        assert registered_rule(info).implementation(info, Config(parsed)) is hidden_depthwise.hidden_depthwise


def test_declared_dimensions():
    inputs = keras.Input((8, 8, 4), name="image")
    layer = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="depthwise")
    model = keras.Model(inputs, layer(inputs))
    info = layer_graph(model, 4).nodes["depthwise"]["info"]
    dims = {d.name: d for d in registered_rule(info).dimensions(info)}
    assert list(dims) == ["sample", "height", "width", "channel"]
    assert all(d.runnable and d.by_keras_lwp for d in dims.values())
    assert dims["height"].halo == dims["width"].halo == 2
    spec = MeshSpec((("x", 2), ("y", 2), ("z", 2)))
    runnable = configurations(info, runnable_dims(list(dims.values())), spec)
    for config in CASES["2d-k3-same-m2"][3] + ["h=x", "n=x,c=y", "n=x,c=y,h=z"]:
        assert Config(parse(config)) in runnable
    inputs = keras.Input((4, 8, 8), name="image")
    layer = keras.layers.DepthwiseConv2D(3, data_format="channels_first", name="depthwise")
    info = layer_graph(keras.Model(inputs, layer(inputs)), 4).nodes["depthwise"]["info"]
    assert configurations(info, runnable_dims(registered_rule(info).dimensions(info)), spec) == [Config()]
