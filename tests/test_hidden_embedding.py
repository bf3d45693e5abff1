"""Embedding's channel and vocabulary splits (keras_lwp.layers.hidden_embedding) on real DTensor.

As tests/test_hidden_conv.py: layers parallelized with a pinned configuration run wrapped (the code
path `fit` runs) inside a tf.function under a GradientTape; output and table gradient must equal a
single-device copy within 1e-5 relative (the ids are integers: no input gradient). One model holds
one branch per configuration, each its own ids, so one trace checks them all. Ids repeat within a
batch (the table gradient sums them) and some are negative (counted from the end, as keras.ops.take).
A training test with Adam checks the table gradient's form too: Adam squares its rows before the
duplicate ids are summed, so only the single-device form (one row per id) trains the same.
"""

import keras
import numpy as np
import pytest
from tensorflow.experimental import dtensor

import keras_lwp
from keras_lwp import Config, MeshSpec, Strategy
from keras_lwp.graph import layer_graph
from keras_lwp.layers import base, configurations, hidden_embedding, registered_rule, runnable_dims
from keras_lwp.mesh import mesh_spec_of
from keras_lwp.placement import to_host
from tests.harness import assert_matches, mesh_2x2x2, parse, run_branches

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler

VOCABULARY, WIDTH = 16, 8


def test_the_hidden_rule_is_the_registered_one():
    assert isinstance(base._RULES["Embedding"], hidden_embedding.HiddenEmbeddingRule)


@pytest.fixture(scope="module")
def mesh():
    return mesh_2x2x2()


def ids(rng, shape):
    """Ids that repeat within a batch, some negative (counted from the end)."""
    return rng.integers(-VOCABULARY, VOCABULARY, shape).astype("int32")


CASES = {  # id: (ids shape, configurations)
    "sequence": ((4, 6), ["n=x", "l=x", "c=x", "v=x", "n=x,v=y", "l=x,v=y", "c=x,v=y", "n=x,c=y,v=z",
                          "n=x,l=y,c=z"]),
    "one-id-per-sample": ((4,), ["c=x", "v=x", "n=x,c=y,v=z"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_embedding_matches_single_device(mesh, case):
    shape, configs = CASES[case]
    layers = [keras.layers.Embedding(VOCABULARY, WIDTH, name=f"embed{index}") for index in range(len(configs))]
    results, want, model = run_branches(mesh, layers, configs, shape, ids)
    names = ["sample", "length"][:len(shape)] + ["channel"]
    for index, (config, got, expected) in enumerate(zip(configs, results, want)):
        config = parse(config)
        assert_matches(got, expected, str(config))
        assert dtensor.fetch_layout(got["output"]).sharding_specs == [config.get(n, "unsharded") for n in names], config
        table = dtensor.fetch_layout(layers[index].embeddings.value).sharding_specs
        assert table == [config.get("vocabulary", "unsharded"), config.get("channel", "unsharded")], config
        info = layer_graph(model, shape[0]).nodes[f"embed{index}"]["info"]
        implementation = registered_rule(info).implementation(info, Config(config))
        assert implementation is (hidden_embedding.hidden_embedding if "vocabulary" in config else None), config


def test_split_tables_train_like_one_device(mesh):
    """A bag-of-words classifier whose two tables are split by rows and by columns, trained with `fit`
    (Adam): the same losses and weights as one device."""

    def build():
        keras.utils.set_random_seed(3)
        ids = keras.Input((6,), dtype="int32", name="ids")
        rows = keras.layers.Embedding(VOCABULARY, WIDTH, name="rows")(ids)
        columns = keras.layers.Embedding(VOCABULARY, WIDTH, name="columns")(ids)
        x = keras.layers.Concatenate(name="join")([rows, columns])
        x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
        return keras.Model(ids, keras.layers.Dense(3, name="head")(x))

    rng = np.random.default_rng(2)
    x = rng.integers(0, VOCABULARY, (16, 6)).astype("int32")
    y = rng.integers(0, 3, 16)

    def train(model):
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        return history.history["loss"], [np.asarray(to_host(v.value)) for v in model.weights]

    want_loss, want_weights = train(build())
    model = build()
    configs = {"ids": "n=x", "rows": "n=x,v=y", "columns": "n=x,c=y", "join": "n=x", "gap": "n=x", "head": "n=x"}
    strategy = Strategy({name: Config(parse(c)) for name, c in configs.items()}, mesh_spec_of(mesh))
    keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=8)
    loss, weights = train(model)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for index, (got, want) in enumerate(zip(weights, want_weights)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(want))),
                                   err_msg=f"weight {index}")


# -- what the rule declares ----------------------------------------------------------------------

def embedding_info(layer, ids_shape):
    ids = keras.Input(ids_shape[1:], dtype="int32", name="ids")
    model = keras.Model(ids, layer(ids))
    return layer_graph(model, ids_shape[0]).nodes[layer.name]["info"]


SPEC = MeshSpec((("x", 2), ("y", 2), ("z", 2)))


def test_declared_dimensions_and_what_they_communicate():
    from keras_lwp.layers import Placement

    info = embedding_info(keras.layers.Embedding(VOCABULARY, WIDTH, name="embed"), (4, 6))
    rule = registered_rule(info)
    dims = {d.name: d for d in rule.dimensions(info)}
    assert all(d.runnable for d in dims.values())
    assert [n for n, d in dims.items() if d.by_keras_lwp] == ["vocabulary"]
    runnable = configurations(info, runnable_dims(list(dims.values())), SPEC)
    for config in CASES["sequence"][1]:
        assert Config(parse(config)) in runnable, config
    # The vocabulary split: the output is a partial sum over its axis (all-reduced), the table is
    # split by rows, its gradient (one row per id, densified whole by the optimizer) synchronized
    # whole over the sample axis only.
    place = Placement(info, list(dims.values()), Config({"sample": "x", "vocabulary": "y"}), SPEC)
    assert place.output_partial_axes() == ("y",)
    assert place.weight_layout(0) == ("y", None)
    assert place.weight_grad_partial_axes(0) == ("x",)
    assert place.weight_grad_layout(0) == (None, None)
    # The channel split: nothing partial forward, the table and its gradient split by columns.
    place = Placement(info, list(dims.values()), Config({"sample": "x", "channel": "y"}), SPEC)
    assert place.output_partial_axes() == () and place.weight_layout(0) == (None, "y")
    assert place.weight_grad_layout(0) == (None, "y")
    assert place.output_layout(info.output) == ("x", None, "y")
