"""Hidden dimensions of convolutions (keras_lwp.layers.hidden) on real DTensor, 8 logical CPUs.

Each case builds a one-layer functional model, parallelizes it with a Strategy that pins the
convolution's configuration, and runs the wrapped layer (the code path `fit` runs) on sharded data
inside a tf.function under a GradientTape. Output, input gradient and kernel/bias gradients must equal
a plain single-device copy of the layer with the same weights within 1e-5 relative.

Grid: every geometry (kernel 1/3, 11 stride 4 'same' and 'valid', stride 2, 'valid', dilation 2)
times every configuration on the 2x2x2 mesh; Conv1D ('causal', strided, odd length, two-block halo);
edge geometries (extent not divisible by the split, windows two blocks away, four blocks).

"""

import keras
import numpy as np
import pytest
from tensorflow.experimental import dtensor

import keras_lwp
from keras_lwp import Config, MeshSpec, Strategy
from keras_lwp.graph import layer_graph
from keras_lwp.layers import base, configurations, halo, hidden, registered_rule, runnable_dims
from keras_lwp.mesh import mesh_spec_of
from keras_lwp.placement import to_host, to_mesh
from tests.conftest import require_devices
from tests.harness import assert_matches, mesh_2x2x2, parse, run_branches

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler

CONV_CLASSES = ("Conv1D", "Conv2D")


def test_the_hidden_rule_is_the_registered_one():
    for name in CONV_CLASSES:
        assert isinstance(base._RULES[name], hidden.HiddenConvRule)


@pytest.fixture(scope="module")
def mesh():
    return mesh_2x2x2()


CONFIGS = ["c=x", "n=x,c=y", "h=x", "n=x,h=y", "h=x,w=y", "n=x,h=y,w=z", "c=x,h=y"]
GEOMETRIES = {  # id: (input height = width, Conv2D arguments); k3-d2 has the halo (2 rows) a kernel of 5 has
    "k1": (8, dict(kernel_size=1, padding="same")),
    "k3": (8, dict(kernel_size=3, padding="same")),
    "k11-s4": (16, dict(kernel_size=11, strides=4, padding="same")),
    "k11-s4-valid": (16, dict(kernel_size=11, strides=4, padding="valid")),
    "k3-s2": (8, dict(kernel_size=3, strides=2, padding="same")),
    "k3-valid": (8, dict(kernel_size=3, padding="valid")),
    "k3-d2": (8, dict(kernel_size=3, dilation_rate=2, padding="same")),
}
CONV2D_CASES = [(g, c) for g in GEOMETRIES for c in CONFIGS]


def run_conv(mesh, layer_class, input_shape, config, **layer_kwargs):
    """(sharded results, single-device results, the sharded layer, its model) of one convolution."""
    layer = layer_class(4, activation="tanh", name="conv", **layer_kwargs)
    got, want, model = run_branches(mesh, [layer], [config], input_shape)
    return got[0], want[0], layer, model


def assert_runs_hidden(model, layer, config, mesh):
    """The layer runs keras_lwp's implementation, its kernel split as the configuration says."""
    info = layer_graph(model, 4).nodes["conv"]["info"]
    assert registered_rule(info).implementation(info, Config(config)) is hidden.hidden_conv
    specs = dtensor.fetch_layout(layer.kernel.value).sharding_specs
    assert specs[-1] == config.get("channel", "unsharded")
    assert set(specs[:-1]) == {"unsharded"}


def expected_output_specs(config, rank):
    names = ["sample", *hidden.SPATIAL_NAMES[rank], "channel"]
    return [config.get(name, "unsharded") for name in names]


@pytest.mark.parametrize("geometry,config", CONV2D_CASES, ids=[f"{g}-{{{c}}}" for g, c in CONV2D_CASES])
def test_conv2d_matches_single_device(mesh, geometry, config):
    size, kwargs = GEOMETRIES[geometry]
    got, want, layer, model = run_conv(mesh, keras.layers.Conv2D, (4, size, size, 3), config, **kwargs)
    assert_matches(got, want, f"{geometry} {{{config}}}")
    config = parse(config)
    assert dtensor.fetch_layout(got["output"]).sharding_specs == expected_output_specs(config, 2)
    assert_runs_hidden(model, layer, config, mesh)


CONV1D_CASES = {  # id: (length, Conv1D arguments, configurations)
    "k3-causal": (16, dict(kernel_size=3, padding="causal"), ["l=x", "n=x,l=y", "c=x,l=y"]),
    "k3-s2-same": (16, dict(kernel_size=3, strides=2, padding="same"), ["n=x,l=y", "c=x,l=y"]),
    "k2-valid-odd-length": (17, dict(kernel_size=2, padding="valid"), ["l=x", "n=x,c=y,l=z"]),
    "k5-d4-causal-two-hops": (16, dict(kernel_size=5, dilation_rate=4, padding="causal"), ["n=x,l=y", "c=x"]),
}
CONV1D_GRID = [(g, c) for g, (_, _, configs) in CONV1D_CASES.items() for c in configs]


@pytest.mark.parametrize("geometry,config", CONV1D_GRID, ids=[f"{g}-{{{c}}}" for g, c in CONV1D_GRID])
def test_conv1d_matches_single_device(mesh, geometry, config):
    length, kwargs, _ = CONV1D_CASES[geometry]
    got, want, _, _ = run_conv(mesh, keras.layers.Conv1D, (4, length, 3), config, **kwargs)
    assert_matches(got, want, f"{geometry} {{{config}}}")
    assert dtensor.fetch_layout(got["output"]).sharding_specs == expected_output_specs(parse(config), 1)


EDGE_CASES = {  # id: (mesh, input shape, Conv2D arguments, configuration)
    # An input extent the split does not divide (11 rows, 8 output rows): zero rows appended, and
    # per-block window offsets ('valid' drift) picked by masks, in both spatial axes at once.
    "k4-valid-11x11-odd-extent": ({"x": 2, "y": 2, "z": 2}, (4, 11, 11, 3), dict(kernel_size=4, padding="valid"),
                                  "n=x,h=y,w=z"),
    # Windows reaching two blocks away (halo 6 rows, blocks of 4): whole neighbour blocks travel.
    "k5-d3-two-hops": ({"x": 2, "y": 2, "z": 2}, (4, 8, 8, 3), dict(kernel_size=5, dilation_rate=3, padding="same"),
                       "h=x,w=y"),
    # Four blocks (4x2 mesh): four distinct window offsets, extent 18 padded to 20.
    "k3-valid-4-blocks": ({"x": 4, "y": 2}, (4, 18, 8, 3), dict(kernel_size=3, padding="valid"), "n=y,h=x"),
    "k3-4-blocks-channel": ({"x": 4, "y": 2}, (2, 16, 8, 3), dict(kernel_size=3, padding="same"), "c=y,h=x"),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_geometries_match_single_device(case):
    require_devices(8)
    axes, shape, kwargs, config = EDGE_CASES[case]
    got, want, _, _ = run_conv(keras_lwp.make_mesh(axes), keras.layers.Conv2D, shape, config, **kwargs)
    assert_matches(got, want, case)


def test_halo_exchange_gathers_only_the_halo_rows(mesh, monkeypatch):
    """Eagerly (op by op): every relayout that un-splits a dimension carries only halo rows, never
    the input; the geometry's halo is what the DimSpec declares."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 16, 8), name="image")
    layer = keras.layers.Conv2D(8, 3, padding="same", name="conv")
    model = keras.Model(inputs, layer(inputs))
    config = {"sample": "x", "height": "y", "width": "z"}
    keras_lwp.parallelize(model, mesh, strategy=Strategy({"image": Config(config), "conv": Config(config)},
                                                         mesh_spec_of(mesh)), batch_size=4)
    gathered = []
    original = halo.relayout

    def recording(tensor, spec, dmesh):
        before = dtensor.fetch_layout(tensor).sharding_specs
        for axis, (old, new) in enumerate(zip(before, spec)):
            if old != "unsharded" and new is None:
                gathered.append((tuple(tensor.shape), axis))
        return original(tensor, spec, dmesh)

    monkeypatch.setattr(halo, "relayout", recording)
    x = to_mesh(np.random.default_rng(0).standard_normal((4, 16, 16, 8), dtype="float32"), ("x", "y", "z", None),
                mesh)
    layer(x)
    info = layer_graph(model, 4).nodes["conv"]["info"]
    halos = {d.name: d.halo for d in registered_rule(info).dimensions(info)}
    assert halos["height"] == halos["width"] == 2
    # Height: [N, 2 blocks, 1 + 1 edge rows, 2 column blocks, 8 columns, C]; then width on the
    # height-extended blocks (corners included): [N, 2, 8 + 2 rows, 2 blocks, 1 + 1 edge columns, C].
    assert gathered == [((4, 2, 2, 2, 8, 8), 1), ((4, 2, 10, 2, 2, 8), 3)]


def test_hidden_configurations_train_like_one_device(mesh):
    """Two convolutions with hidden splits and a dense head trained with `fit` (Adam): the same
    losses and weights as one device."""

    def build():
        keras.utils.set_random_seed(5)
        inputs = keras.Input((8, 8, 3), name="image")
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
        x = keras.layers.Conv2D(8, 3, padding="valid", activation="relu", name="conv2")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        return keras.Model(inputs, keras.layers.Dense(4, name="head")(x))

    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8, 8, 3), dtype="float32")
    y = rng.integers(0, 4, 16)

    def train(model):
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return history.history["loss"], [np.asarray(to_host(v.value)) for v in model.weights]

    want_loss, want_weights = train(build())
    model = build()
    configs = {"image": "n=x", "conv1": "n=x,h=y,w=z", "conv2": "c=x,h=y", "flatten": "n=x", "head": "n=x"}
    strategy = Strategy({name: Config(parse(c)) for name, c in configs.items()}, mesh_spec_of(mesh))
    keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=8)
    loss, weights = train(model)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for index, (got, want) in enumerate(zip(weights, want_weights)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))),
                                   err_msg=f"weight {index}")


# -- what the rule declares ----------------------------------------------------------------------

def conv_info(layer, input_shape):
    inputs = keras.Input(input_shape[1:], name="image")
    model = keras.Model(inputs, layer(inputs))
    return layer_graph(model, input_shape[0]).nodes[layer.name]["info"]


SPEC = MeshSpec((("x", 2), ("y", 2), ("z", 2)))


def runnable(info):
    dims = registered_rule(info).dimensions(info)
    return dims, configurations(info, runnable_dims(dims), SPEC)


def test_declared_runnable_configurations_include_the_tested_ones():
    for geometry, (size, kwargs) in GEOMETRIES.items():
        info = conv_info(keras.layers.Conv2D(4, name="conv", **kwargs), (4, size, size, 3))
        dims, configs = runnable(info)
        assert all(d.runnable for d in dims), geometry
        for config in CONFIGS:
            assert Config(parse(config)) in configs, (geometry, config)
            assert registered_rule(info).implementation(info, Config(parse(config))) is hidden.hidden_conv
        assert registered_rule(info).implementation(info, Config({"sample": "x"})) is None


@pytest.mark.parametrize("case", ["channels_first", "groups=2"])
def test_configurations_declared_not_runnable_are_absent(case):
    if case == "channels_first":
        layer = keras.layers.Conv2D(4, 3, padding="same", data_format="channels_first", name="conv")
        info = conv_info(layer, (4, 4, 8, 8))
        hidden_dims = {"channel", "height", "width"}
    else:
        layer = keras.layers.Conv2D(4, 3, padding="same", groups=2, name="conv")
        info = conv_info(layer, (4, 8, 8, 4))
        hidden_dims = {"height", "width"}  # channel: no such dimension for groups != 1
    rule = registered_rule(info)
    dims = rule.dimensions(info)
    left_out = {d.name for d in dims if not d.runnable}
    assert left_out == ({"height", "width"} if case == "groups=2" else set())
    _, configs = runnable(info)
    assert configs and not any(set(c) & hidden_dims for c in configs)
    assert any("sample" in c for c in configs)
    if case == "groups=2":
        full = configurations(info, dims, SPEC)
        assert Config({"height": "x"}) in full  # planned with space="full" only
        with pytest.raises(ValueError, match="groups == 1"):
            rule.implementation(info, Config({"height": "x"}))


@pytest.mark.parametrize("start,stop,step", [
    (0, 7, 1), (2, 5, 1), (3, 99, 1), (7, 7, 1), (9, 12, 1),
    (0, 7, 2), (1, 7, 2), (1, 6, 3), (0, 1, 4), (5, 99, 4), (6, 7, 5), (8, 12, 2),
])
def test_rows_is_pythons_slice_with_a_fast_gradient(start, stop, step):
    """halo.rows equals tensor[:, start:stop:step] (stop past the end, an empty result, a last group
    short of `step` rows) and its gradient is Python slicing's, without a strided slice."""
    import tensorflow as tf

    x = tf.constant(np.arange(2 * 7 * 3, dtype="float64").reshape(2, 7, 3))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        got, want = halo.rows(x, 1, start, stop, step), x[:, start:stop:step]
        weights = tf.constant(np.arange(1, want.shape.num_elements() + 1, dtype="float64").reshape(want.shape))
        got_sum, want_sum = tf.reduce_sum(got * weights), tf.reduce_sum(want * weights)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    np.testing.assert_array_equal(tape.gradient(got_sum, x).numpy(), tape.gradient(want_sum, x).numpy())

    @tf.function
    def traced(value):
        return halo.rows(value, 1, start, stop, step)

    ops = {op.type for op in traced.get_concrete_function(x).graph.get_operations()}
    assert "StridedSlice" not in ops


@pytest.mark.parametrize("kwargs,extent,halo", [
    (dict(kernel_size=3, padding="same"), 8, 2),
    (dict(kernel_size=1, padding="same"), 8, 0),
    (dict(kernel_size=11, strides=4, padding="same"), 16, 7),
    (dict(kernel_size=11, strides=4, padding="valid"), 16, 7),
    (dict(kernel_size=3, padding="valid"), 8, 2),
    (dict(kernel_size=2, strides=2, padding="valid"), 8, 0),
    (dict(kernel_size=3, dilation_rate=2, padding="same"), 8, 4),
], ids=["k3", "k1", "k11-s4", "k11-s4-valid", "k3-valid", "k2-s2-valid", "k3-d2"])
def test_dimspec_halo_is_what_the_exchange_moves(kwargs, extent, halo):
    info = conv_info(keras.layers.Conv2D(4, name="conv", **kwargs), (4, extent, extent, 3))
    dims = {d.name: d for d in registered_rule(info).dimensions(info)}
    geometry = hidden.halo_geometry(extent, kwargs["kernel_size"], kwargs.get("strides", 1),
                                    kwargs.get("dilation_rate", 1), kwargs["padding"], 2)
    assert dims["height"].halo == dims["width"].halo == geometry.left + geometry.right == halo
