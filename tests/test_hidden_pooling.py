"""Hidden dimensions of pooling (keras_lwp.layers.hidden_pooling) on real DTensor, 8 logical CPUs.

As tests/test_hidden_conv.py: the layers are parallelized with a Strategy pinning their configuration
and run wrapped (the code path `fit` runs) on sharded data inside a tf.function under a GradientTape;
output and input gradient must equal a plain single-device copy within 1e-5 relative. To keep the
traces few, one model holds one branch per (layer class, configuration), each branch its own input,
so every branch's input gradient is its own.

Grid: Max/AveragePooling2D, pool 2 and 3, strides equal to, smaller and larger than the pool, 'same'
and 'valid' (drifting window offsets), times every kind of configuration on the 2x2x2 mesh;
Max/AveragePooling1D likewise; edge geometries on a 4x2 mesh (four blocks, windows two blocks away).
Inputs are normals rounded down to multiples of 0.5, minus 1: windows hold ties, which MaxPoolGrad
breaks in row-major order, and most maxima are below the 0 that a 'same' window would read past the
input if the padding were not kept out.
"""

import keras
import numpy as np
import pytest
from tensorflow.experimental import dtensor

import keras_lwp
from keras_lwp import Config, MeshSpec, Strategy
from keras_lwp.graph import layer_graph
from keras_lwp.layers import base, configurations, halo, hidden_pooling, registered_rule, runnable_dims
from keras_lwp.mesh import mesh_spec_of
from keras_lwp.placement import to_host, to_mesh
from tests.conftest import require_devices
from tests import precision
from tests.harness import assert_matches, mesh_2x2x2, parse, run_branches

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler

POOL_CLASSES = ("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D")
def test_the_hidden_rule_is_the_registered_one():
    for name in POOL_CLASSES:
        assert isinstance(base._RULES[name], hidden_pooling.HiddenPoolRule)


@pytest.fixture(scope="module")
def mesh():
    return mesh_2x2x2()


def ties(rng, shape):
    """Multiples of 0.5 below 0 mostly: windows hold ties, and few maxima are above a padding 0."""
    return np.floor(2 * rng.standard_normal(shape, dtype="float32")) / 2 - 1


def expected_output_specs(config, rank):
    names = ["sample", *hidden_pooling.SPATIAL_NAMES[rank], "channel"]
    return [config.get(name, "unsharded") for name in names]


def check_grid(mesh, classes, geometry_kwargs, configs, input_shape):
    branches = [(c, config) for c in classes for config in configs]
    layers = [layer_class(name=f"pool{index}", **geometry_kwargs) for index, (layer_class, _) in enumerate(branches)]
    results, want, model = run_branches(mesh, layers, [config for _, config in branches], input_shape, ties)
    rank = len(input_shape) - 2
    for index, ((layer_class, config), got, expected) in enumerate(zip(branches, results, want)):
        what = f"{layer_class.__name__} {geometry_kwargs} {{{config}}}"
        assert_matches(got, expected, what)
        assert dtensor.fetch_layout(got["output"]).sharding_specs == expected_output_specs(parse(config), rank), what
        info = layer_graph(model, input_shape[0]).nodes[f"pool{index}"]["info"]
        implementation = registered_rule(info).implementation(info, Config(parse(config)))
        native = layer_class.__name__.startswith("Max") and config in ("", "n=x")
        assert implementation is (None if native else hidden_pooling.hidden_pool), what


# Every kind of configuration on the geometry with the most going on ('same' padding at one end, a
# one-row halo); the others, whose DTensor traces cost ~0.5 s a branch, on the splits their geometry
# changes (spatial ones), plus AveragePooling's sample split.
ALL_2D = ["n=x", "c=x", "h=x", "w=y", "n=x,h=y", "c=x,w=y", "h=x,w=y", "n=x,h=y,w=z", "n=x,c=y,h=z"]
GEOMETRIES_2D = {  # id: (input height = width, pooling arguments, configurations)
    "p3-s2-same": (8, dict(pool_size=3, strides=2, padding="same"), ALL_2D),
    "p2": (8, dict(pool_size=2), ["n=x", "h=x,w=y"]),
    "p3-s1-same": (8, dict(pool_size=3, strides=1, padding="same"), ["h=x,w=y", "n=x,c=y,h=z"]),
    # 'valid' with drifting window offsets: 10 -> 4 rows, blocks of 5 -> 2 starting at rows 0 and 4.
    "p3-s2-valid-drift": (10, dict(pool_size=3, strides=2, padding="valid"), ["n=x", "h=x", "c=x,w=y", "n=x,h=y,w=z"]),
    "p2-s3-same": (12, dict(pool_size=2, strides=3, padding="same"), ["n=x,h=y,w=z"]),  # windows skip rows
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES_2D))
def test_pooling2d_matches_single_device(mesh, geometry):
    size, kwargs, configs = GEOMETRIES_2D[geometry]
    check_grid(mesh, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D), kwargs, configs, (4, size, size, 4))


ALL_1D = ["n=x", "c=x", "l=x", "n=x,l=y", "c=x,l=y", "n=x,c=y,l=z"]
GEOMETRIES_1D = {
    "p3-s2-same": (16, dict(pool_size=3, strides=2, padding="same"), ALL_1D),
    "p2": (16, dict(pool_size=2), ["n=x", "l=x"]),
    "p3-s1-valid-drift": (18, dict(pool_size=3, strides=1, padding="valid"), ["n=x,l=y", "c=x,l=y"]),  # 9 -> 8 a block
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES_1D))
def test_pooling1d_matches_single_device(mesh, geometry):
    length, kwargs, configs = GEOMETRIES_1D[geometry]
    check_grid(mesh, (keras.layers.MaxPooling1D, keras.layers.AveragePooling1D), kwargs, configs, (4, length, 4))


EDGE_CASES = {  # id: (mesh, input shape, pooling arguments, configurations)
    # Four blocks of 2 rows; a 5-row window reaches 2 rows each way (one neighbour), a 7-row one 3
    # rows (two blocks away: whole neighbour blocks travel).
    "p5-s1-same-4-blocks": ({"x": 4, "y": 2}, (2, 8, 8, 2), dict(pool_size=5, strides=1, padding="same"),
                            ["c=y,h=x"]),
    "p7-s1-same-two-hops": ({"x": 4, "y": 2}, (2, 8, 8, 2), dict(pool_size=(7, 3), strides=1, padding="same"),
                            ["h=x,w=y"]),
    # 'valid' with four distinct window offsets: 20 rows, pool 5 stride 1 -> 16 (4 blocks of 5 -> 4).
    "p5-s1-valid-4-blocks": ({"x": 4, "y": 2}, (2, 20, 8, 2), dict(pool_size=(5, 3), strides=(1, 2), padding="valid"),
                             ["n=y,h=x"]),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_edge_geometries_match_single_device(case):
    require_devices(8)
    axes, shape, kwargs, configs = EDGE_CASES[case]
    check_grid(keras_lwp.make_mesh(axes), (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D), kwargs,
               configs, shape)


def test_halo_exchange_gathers_only_the_halo_rows(mesh, monkeypatch):
    """Eagerly (op by op): every relayout that un-splits a dimension carries only halo rows, never
    the input; the geometry's halo is what the DimSpec declares."""
    inputs = keras.Input((16, 16, 8), name="image")
    layer = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool")
    model = keras.Model(inputs, layer(inputs))
    config = {"sample": "x", "height": "y", "width": "z"}
    keras_lwp.parallelize(model, mesh, strategy=Strategy({"image": Config(config), "pool": Config(config)},
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
    info = layer_graph(model, 4).nodes["pool"]["info"]
    halos = {d.name: d.halo for d in registered_rule(info).dimensions(info)}
    assert halos["height"] == halos["width"] == 1
    # 9-row windows from blocks of 8 rows ('same' pads one row at the end): each block needs the first
    # row of the next. Height: [N, 2 blocks, 1 edge row, 2 column blocks, 8 columns, C]; then width on
    # the height windows (corners included): [N, 2, 9 rows, 2 blocks, 1 edge column, C].
    assert gathered == [((4, 2, 1, 2, 8, 8), 1), ((4, 2, 9, 2, 1, 8), 3)]


def test_pooling_splits_train_like_one_device(mesh):
    """A CNN whose pooling layers are split along rows, columns, channel and (average) sample, trained
    with `fit` (Adam): the same losses and weights as one device (conv1's kernel gradient comes back
    through the row- and column-split max pooling). In float64: in float32 Adam (lr 1e-2) turns the
    reduction order of a split gradient into 2e-5 on single weights, which would hide a real error."""
    with precision.float64():
        _train_pooling_splits(mesh)


def _train_pooling_splits(mesh):
    def build():
        keras.utils.set_random_seed(5)
        inputs = keras.Input((8, 8, 3), name="image")
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
        x = keras.layers.MaxPooling2D(3, strides=1, padding="same", name="maxpool")(x)
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
        x = keras.layers.AveragePooling2D(2, name="avgpool")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        return keras.Model(inputs, keras.layers.Dense(4, name="head")(x))

    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 8, 8, 3))
    y = rng.integers(0, 4, 16)

    def train(model):
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return history.history["loss"], [np.asarray(to_host(v.value)) for v in model.weights]

    want_loss, want_weights = train(build())
    model = build()
    # The convolutions stay on DTensor's batch split: Adam (lr 1e-2) turns the float noise of a
    # channel-split convolution's im2col sums into 2e-5 here, which is not what this test is about.
    configs = {"image": "n=x", "conv1": "n=x", "maxpool": "n=x,h=y,w=z", "conv2": "n=x",
               "avgpool": "n=x,c=y", "flatten": "n=x", "head": "n=x"}
    strategy = Strategy({name: Config(parse(c)) for name, c in configs.items()}, mesh_spec_of(mesh))
    keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=8)
    loss, weights = train(model)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-9)
    for index, (got, want) in enumerate(zip(weights, want_weights)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * float(np.max(np.abs(want))),
                                   err_msg=f"weight {index}")


# -- what the rule declares ----------------------------------------------------------------------

def pool_info(layer, input_shape):
    inputs = keras.Input(input_shape[1:], name="image")
    model = keras.Model(inputs, layer(inputs))
    return layer_graph(model, input_shape[0]).nodes[layer.name]["info"]


SPEC = MeshSpec((("x", 2), ("y", 2), ("z", 2)))


@pytest.mark.parametrize("class_name", ["MaxPooling2D", "AveragePooling2D"])
def test_declared_runnable_configurations_include_the_tested_ones(class_name):
    layer_class = getattr(keras.layers, class_name)
    for geometry, (size, kwargs, configs) in GEOMETRIES_2D.items():
        info = pool_info(layer_class(name="pool", **kwargs), (4, size, size, 4))
        dims = {d.name: d for d in registered_rule(info).dimensions(info)}
        assert all(d.runnable for d in dims.values()), geometry
        assert dims["sample"].by_keras_lwp == class_name.startswith("Average")
        assert all(dims[name].by_keras_lwp for name in ("height", "width", "channel"))
        runnable = configurations(info, runnable_dims(list(dims.values())), SPEC)
        for config in configs:
            assert Config(parse(config)) in runnable, (geometry, config)


def test_spatial_splits_must_divide_input_and_output():
    """AlexNet's pool (3x3, stride 2, 'valid') on 55 rows gives 27: no split divides both, so none
    is offered (the input would arrive whole: an all-gather). 10 -> 4 rows split 2 ways only."""
    info = pool_info(keras.layers.MaxPooling2D(3, strides=2, name="pool"), (4, 55, 55, 8))
    dims = {d.name: d for d in registered_rule(info).dimensions(info)}
    assert dims["height"].size == dims["width"].size == 1
    assert not any({"height", "width"} & set(c) for c in configurations(info, list(dims.values()), SPEC))
    info = pool_info(keras.layers.MaxPooling2D(3, strides=2, name="pool"), (4, 10, 10, 8))
    dims = {d.name: d for d in registered_rule(info).dimensions(info)}
    assert dims["height"].size == 2 and dims["height"].halo == 1


@pytest.mark.parametrize("kwargs,extent,halo_rows", [
    (dict(pool_size=2), 8, 0),
    (dict(pool_size=3, strides=2, padding="same"), 8, 1),
    (dict(pool_size=3, strides=1, padding="same"), 8, 2),
    (dict(pool_size=3, strides=2, padding="valid"), 10, 1),
    (dict(pool_size=2, strides=3, padding="same"), 12, 0),
], ids=["p2", "p3-s2-same", "p3-s1-same", "p3-s2-valid", "p2-s3-same"])
def test_dimspec_halo_is_what_the_exchange_moves(kwargs, extent, halo_rows):
    info = pool_info(keras.layers.MaxPooling2D(name="pool", **kwargs), (4, extent, extent, 4))
    dims = {d.name: d for d in registered_rule(info).dimensions(info)}
    geometry = halo.halo_geometry(extent, kwargs["pool_size"], kwargs.get("strides") or kwargs["pool_size"], 1,
                                  kwargs.get("padding", "valid"), 2)
    assert dims["height"].halo == dims["width"].halo == geometry.halo == halo_rows


def test_channels_first_keeps_the_builtin_space():
    info = pool_info(keras.layers.AveragePooling2D(2, data_format="channels_first", name="pool"), (4, 4, 8, 8))
    rule = registered_rule(info)
    dims = rule.dimensions(info)
    assert configurations(info, runnable_dims(dims), SPEC) == [Config()]
    with pytest.raises(ValueError, match="channels_last"):
        rule.implementation(info, Config({"sample": "x"}))
    info = pool_info(keras.layers.MaxPooling2D(2, data_format="channels_first", name="pool"), (4, 4, 8, 8))
    assert {d.name for d in runnable_dims(registered_rule(info).dimensions(info))} == {"sample"}
