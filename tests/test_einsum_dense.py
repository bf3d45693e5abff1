"""EinsumDense's column- and row-parallel splits (keras_lwp.layers.einsum_dense) on real DTensor.

As tests/test_hidden_conv.py: layers parallelized with a pinned configuration run wrapped (the code
path `fit` runs) inside a tf.function under a GradientTape; output, input gradient and kernel/bias
gradients must equal a single-device copy within 1e-5 relative. One model per equation holds one
branch per configuration, each its own input.
"""

import keras
import pytest
from tensorflow.experimental import dtensor

from keras_lwp import Config, MeshSpec
from keras_lwp.graph import layer_graph
from keras_lwp.layers import Placement, base, configurations, einsum_dense, registered_rule, runnable_dims
from keras_lwp.mesh import mesh_spec_of
from tests.harness import assert_matches, mesh_2x2x2, parse, run_branches

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler


def test_the_split_rule_is_the_registered_one():
    assert isinstance(base._RULES["EinsumDense"], einsum_dense.SplitEinsumDenseRule)


@pytest.fixture(scope="module")
def mesh():
    return mesh_2x2x2()


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
    layers = [keras.layers.EinsumDense(name=f"dense{index}", bias_initializer="glorot_uniform", **kwargs)
              for index in range(len(configs))]
    results, want, model = run_branches(mesh, layers, configs, shape)
    graph = layer_graph(model, shape[0])
    for index, (config, got, expected) in enumerate(zip(configs, results, want)):
        assert_matches(got, expected, f"{case} {{{config}}}")
        info = graph.nodes[f"dense{index}"]["info"]
        place = Placement(info, registered_rule(info).dimensions(info), Config(parse(config)), mesh_spec_of(mesh))
        assert dtensor.fetch_layout(got["output"]).sharding_specs == [a or "unsharded" for a in
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
    assert all(d.runnable and not d.by_keras_lwp for d in dims.values())
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
