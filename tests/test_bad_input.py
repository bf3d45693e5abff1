"""Bad and unusual input: an error that says what happened, where and the way out, raised before
anything changes (the model then trains like plain Keras), or behaviour like plain Keras."""

import warnings

import keras
import numpy as np
import pytest

import keras_lwp
from keras_lwp import Strategy
from keras_lwp.mesh import MeshSpec
from keras_lwp.placement import to_host
from tests import precision

MESH = {"x": 4, "y": 2}
L = keras.layers


def mlp():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((12,), name="features")
    x = L.Dense(16, activation="relu", name="d1")(inputs)
    return keras.Model(inputs, L.Dense(4, name="d2")(x))


def data(samples=32):
    rng = np.random.default_rng(0)
    return rng.standard_normal((samples, 12)).astype("float32"), rng.integers(0, 4, samples)


def trained_weights(model, steps_per_execution=1):
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    model.fit(*data(), batch_size=8, epochs=1, shuffle=False, verbose=0)
    return [np.asarray(to_host(v.value)) for v in model.weights]


@pytest.mark.parametrize("kwargs, message", [
    (dict(overrides={"d1": "x"}), r"override for 'd1' is 'x'; a configuration is a dict \{dimension: mesh axis\}"),
    (dict(overrides={"d1": {"sample": "x", "channel": "x"}}), r"'d1'.*A mesh axis may split at most one dimension"),
    (dict(overrides={"d1": {"channel": "q"}}), r"'d1' splits dimension 'channel' on mesh axis 'q'.*Use one of the axes"),
    (dict(overrides={"d1": {"channel": ["x", "y"]}}),
     r"'d1' splits dimension 'channel' on \['x', 'y'\]: a pin names one mesh axis"),
    (dict(overrides={3: {"channel": "x"}}), r"The override keyed 3 names no layer: overrides are keyed by layer"),
    (dict(overrides=[("d1", "x")]), r"overrides must be a dict \{layer name or pattern"),
    (dict(input_shapes=(16,)), r"input_shapes must be a dict \{input name: shape without the batch\}"),
    (dict(strategy="data", memory_limit=1000), r"memory_limit=1000 bytes"),
], ids=["bare-axis", "axis-twice", "unknown-axis", "axis-list", "key-not-a-name", "overrides-not-a-dict",
        "input-shapes-not-a-dict", "tiny-memory-limit"])
def test_errors_name_the_place_and_the_way_out_and_change_nothing(kwargs, message):
    model = mlp()
    with pytest.raises(ValueError, match=message):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=8, **kwargs)
    assert getattr(model, "_keras_lwp", None) is None
    for got, want in zip(trained_weights(model), trained_weights(mlp())):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_strategy_with_an_axis_twice_names_the_layer():
    with pytest.raises(ValueError, match="Layer 'd1': A mesh axis may split at most one dimension"):
        Strategy({"d1": {"sample": "x", "channel": "x"}}, MeshSpec((("x", 4), ("y", 2))))


def test_parallelize_after_fit_is_refused_with_the_way_out():
    model = mlp()
    trained_weights(model)
    with pytest.raises(ValueError, match="already built .*Parallelize before the first fit, or compile with a new"):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=8)
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=8)  # the way out works
    model.fit(*data(), batch_size=8, epochs=1, verbose=0)


def test_embedding_splits_train_with_plain_sgd():
    def build():
        keras.utils.set_random_seed(3)
        ids = keras.Input((5,), dtype="int32", name="ids")
        x = L.Embedding(32, 8, name="embed")(ids)
        return keras.Model(ids, L.Dense(3, name="head")(L.GlobalAveragePooling1D(name="gap")(x)))

    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 32, (16, 5)).astype("int32"), rng.integers(0, 3, 16)
    runs = []
    for strategy in (None, Strategy({"ids": {"sample": "x"}, "embed": {"sample": "x", "channel": "y"},
                                     "gap": {"sample": "x"}, "head": {"sample": "x"}}, MeshSpec((("x", 4), ("y", 2))))):
        model = build()
        if strategy is not None:
            keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=strategy, batch_size=8)
        model.compile(keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        runs.append([np.asarray(to_host(v.value)) for v in model.weights])
    for got, want in zip(*runs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_steps_per_execution_calls_back_like_plain_keras(steps_per_execution):
    def batches(parallel):
        model = mlp()
        if parallel:
            keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=8)
        model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      steps_per_execution=steps_per_execution)
        seen = {"train": [], "test": []}
        record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen["train"].append(b))
        record.on_test_batch_end = lambda b, logs=None: seen["test"].append(b)
        x, y = data(40)  # 5 batches of 8
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        model.evaluate(x, y, batch_size=8, verbose=0, callbacks=[record])
        return seen, [np.asarray(to_host(v.value)) for v in model.weights]

    plain, plain_weights = batches(False)
    parallel, parallel_weights = batches(True)
    assert parallel == plain
    for got, want in zip(parallel_weights, plain_weights):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_keras_device_mesh_runs_on_the_devices_it_names():
    devices = keras.distribution.list_devices("cpu")[4:8]
    mesh = keras_lwp.make_mesh(keras.distribution.DeviceMesh((2, 2), ["x", "y"], devices=devices))
    assert [d.split(":")[-1] for d in mesh.local_devices()] == ["4", "5", "6", "7"]


def test_a_mesh_smaller_than_the_devices_says_so():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_lwp.make_mesh({"x": 3, "y": 2})
    assert any("uses 6 of this process's 8 CPU devices" in str(w.message) for w in caught)


def test_an_augmentation_layer_dtensor_cannot_run_is_refused_with_the_data_pipeline_as_the_way_out():
    """RandomZoom computes with ImageProjectiveTransformV3, which DTensor has no rule for: refused
    before any change, pointing at tf.data; the model still trains like plain Keras."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.RandomZoom(0.2, seed=1, name="zoom")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten()(x)))
    with pytest.raises(ValueError, match=r"'zoom' \(RandomZoom\).*ImageProjectiveTransformV3.*dataset\.map"):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=8)
    assert getattr(model, "_keras_lwp", None) is None
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.zeros((8, 8, 8, 3), "float32"), np.zeros(8), batch_size=8, verbose=0)


def test_a_loop_too_long_to_unroll_is_refused_naming_the_limit():
    """keras.ops loops of up to MAX_UNROLLED_STEPS steps run unrolled on the mesh; a longer one keeps
    TensorFlow's while loop over TensorLists, which DTensor cannot run: refused before any change,
    saying so."""
    steps = keras_lwp.op_rewrites.MAX_UNROLLED_STEPS + 1
    inputs = keras.Input((4,), name="features")
    x = L.Lambda(lambda t: keras.ops.fori_loop(0, steps, lambda i, v: v * 0.5 + t, t), name="loop")(inputs)
    model = keras.Model(inputs, L.Dense(2, name="head")(x))
    with pytest.raises(ValueError, match=rf"'loop' \(Lambda\).*TensorList.*more than {steps - 1} steps"):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=8)
    assert getattr(model, "_keras_lwp", None) is None


class _PerSampleBlock(L.Layer):
    """A layer made of layers whose call maps over its batch axis (keras.ops.map, unrolled on the mesh):
    split by samples, DTensor cannot stack the mapped samples into a batch-split tensor."""

    def build(self, shape):
        self.inner = L.Dense(shape[-1], name="inner")
        self.inner.build(shape)

    def call(self, x):
        return keras.ops.map(lambda sample: sample * keras.ops.sum(sample), self.inner(x))


def _per_sample_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6, 4), name="sequence")
    x = _PerSampleBlock(name="per_sample")(L.Dense(4, name="pre")(inputs))
    return keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(x)))


def _fit_per_sample(model):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 6, 4)), rng.integers(0, 3, 16)
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    return [np.asarray(to_host(v.value)) for v in model.weights]


@pytest.mark.filterwarnings("ignore::keras_lwp.layers.UnknownLayerWarning")
@pytest.mark.parametrize("strategy", ["data", "auto", "split"])
def test_a_block_mapping_over_its_batch_runs_whole_along_it_with_a_warning(strategy):
    """Split by samples, its first step failed; parallelize sees the map (op_rewrites.leading_axis_moves)
    and keeps the block whole along the batch, under the baselines, the search and a given strategy
    that splits it by samples alike."""
    if strategy == "split":
        strategy = Strategy({name: {"sample": "x"} for name in ("sequence", "pre", "per_sample", "head")},
                            MeshSpec(tuple(MESH.items())))
    with precision.float64():
        model = _per_sample_model()
        with pytest.warns(UserWarning, match=r"Layer 'per_sample' \(_PerSampleBlock\) computes a keras.ops roll, map"):
            keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=strategy, batch_size=8)
        assert "sample" not in dict(keras_lwp.strategy_of(model)["per_sample"])
        got, want = _fit_per_sample(model), _fit_per_sample(_per_sample_model())
    scale = max(float(np.max(np.abs(w))) for w in want)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * scale)


@pytest.mark.filterwarnings("ignore::keras_lwp.layers.UnknownLayerWarning")
def test_a_layout_conflict_at_the_first_step_names_the_blocks_split_by_samples(monkeypatch):
    """Were the map not seen, DTensor would fail the first step with an error that points nowhere:
    keras_lwp's names the blocks the plan splits by samples and the override that keeps one whole."""
    monkeypatch.setattr(keras_lwp.op_rewrites, "_moved_along_first_axis", lambda size: None)
    model = _per_sample_model()
    keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy="data", batch_size=8)
    with pytest.raises(NotImplementedError, match=r"by samples: 'per_sample'.*overrides=\{'<its name>': \{\}\}"):
        _fit_per_sample(model)
