"""Reading Keras models into a layer graph."""

import keras
import pytest

from keras_lwp.graph import layer_graph
from tests import models


def test_branchy_model_graph():
    g = layer_graph(models.branchy(), batch_size=8)
    assert g.graph["inputs"] == ["a", "b"]
    assert g.graph["outputs"] == [("out1", 0), ("out2", 0)]
    shared = g.nodes["shared"]["info"]
    assert len(shared.calls) == 2                                  # one node, two calls: one layout
    assert shared.calls[0].inputs[0].shape == (8, 16)
    assert [w.shape for w in shared.weights] == [(16, 16), (16,)]
    assert set(g.predecessors("add")) == {"shared"}
    assert len(g.edges["shared", "add"]["tensors"]) == 2           # both calls feed add
    assert set(g.predecessors("concat")) == {"add", "shared"}
    assert g.nodes["concat"]["info"].output.shape == (8, 32)


def test_nested_models_are_flattened():
    inner_in = keras.Input((8,))
    inner = keras.Model(inner_in, keras.layers.Dense(4, name="inner_dense")(inner_in), name="inner")
    inputs = keras.Input((8,), name="x")
    h = keras.layers.Dense(8, name="pre")(inputs)
    outputs = keras.layers.Dense(2, name="post")(inner(h))
    g = layer_graph(keras.Model(inputs, outputs), batch_size=4)
    assert list(g.nodes) == ["x", "pre", "inner_dense", "post"]
    assert list(g.edges) == [("x", "pre"), ("pre", "inner_dense"), ("inner_dense", "post")]


def test_sequential_and_layers_without_weights():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(name="flat"), keras.layers.Dense(3, name="d")])
    g = layer_graph(model, batch_size=2)
    assert g.nodes["flat"]["info"].weights == ()
    assert g.nodes["d"]["info"].output.shape == (2, 3)


def test_a_layer_fed_its_own_output_is_one_node_with_a_self_loop():
    inputs = keras.Input((6,))
    d = keras.layers.Dense(6, name="twice")
    g = layer_graph(keras.Model(inputs, d(d(inputs))), batch_size=2)
    assert g.has_edge("twice", "twice") and len(g.nodes["twice"]["info"].calls) == 2


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.d = keras.layers.Dense(2)

    def call(self, x):
        return self.d(x)


def test_subclassed_model_is_refused_with_the_way_out():
    with pytest.raises(TypeError, match=r"subclass \(Subclassed\).*functional model"):
        layer_graph(Subclassed(), batch_size=2)


def test_model_without_layers_is_refused():
    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match="nothing to parallelize"):
        layer_graph(keras.Model(inputs, inputs), batch_size=2)


def test_not_a_model_and_bad_batch():
    with pytest.raises(TypeError, match="Expected a keras.Model"):
        layer_graph("model", batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        layer_graph(models.mlp(), batch_size=0)
