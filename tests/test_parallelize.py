"""parallelize(): the model keeps its Keras API (fit variants, callbacks, saving) and bad input is refused
before anything changes."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_lwp
from keras_lwp.placement import to_host
from tests import models
from tests.conftest import require_devices

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler

MESH = {"x": 4, "y": 2}
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def data(samples=64, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(samples, 32).astype("float32"), rng.randint(0, 8, samples)


def pair(strategy="auto", **compile_kwargs):
    """The same MLP twice: one on a single device, one parallelized; both compiled alike."""
    keras.utils.set_random_seed(11)
    plain = models.mlp()
    keras.utils.set_random_seed(11)
    sharded = keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh(MESH), strategy=strategy, batch_size=16)
    for model in (plain, sharded):
        model.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"], **compile_kwargs)
    return plain, sharded


def assert_histories_equal(a, b):
    assert set(a.history) == set(b.history)
    for key in a.history:
        np.testing.assert_allclose(b.history[key], a.history[key], rtol=1e-5, err_msg=key)


def assert_weights_equal(a, b):
    for x, y in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7)


FIT_VARIANTS = {
    "dataset": lambda x, y: dict(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(16)),
    "dict-inputs": lambda x, y: dict(x={"features": x}, y=y, batch_size=16),
    "validation-split": lambda x, y: dict(x=x, y=y, batch_size=16, validation_split=0.25),
    "validation-data": lambda x, y: dict(x=x, y=y, batch_size=16, validation_data=(x[:32], y[:32])),
    "sample-weight": lambda x, y: dict(x=x, y=y, batch_size=16,
                                       sample_weight=np.linspace(0.1, 1.0, len(y)).astype("float32")),
    "class-weight": lambda x, y: dict(x=x, y=y, batch_size=16, class_weight={c: 1.0 + c for c in range(8)}),
    "steps-per-epoch": lambda x, y: dict(x=tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat(),
                                         steps_per_epoch=3),
}


@pytest.mark.parametrize("variant", sorted(FIT_VARIANTS))
def test_fit_variants_match_plain_keras(variant):
    x, y = data()
    plain, sharded = pair()
    histories = [m.fit(epochs=2, shuffle=False, verbose=0, **FIT_VARIANTS[variant](x, y)) for m in (plain, sharded)]
    assert_histories_equal(*histories)
    assert_weights_equal(plain, sharded)


def test_fit_and_evaluate_pipelines_run_without_autotuning_unless_the_user_set_it(monkeypatch):
    """tf.data's autotuning thread stalled the iterator's teardown after fit for seconds; keras_lwp
    turns it off on the pipelines fit and evaluate build, and keeps a user's explicit choice."""
    from keras.src.backend.tensorflow import trainer

    seen = []
    original = trainer.TFEpochIterator._get_iterator
    monkeypatch.setattr(trainer.TFEpochIterator, "_get_iterator",
                        lambda self: seen.append(self._distributed_dataset.options().autotune.enabled) or original(self))
    x, y = data()
    _, sharded = pair()
    single = keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh({"x": 1}), batch_size=16)
    single.compile("sgd", LOSS)
    for model in (sharded, single):
        seen.clear()
        model.fit(x, y, batch_size=16, validation_data=(x[:32], y[:32]), verbose=0)
        model.evaluate(x, y, batch_size=16, verbose=0)
        assert seen and set(seen) == {False}, model.name
    chosen = tf.data.Options()
    chosen.autotune.enabled = True
    seen.clear()
    sharded.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16).with_options(chosen), verbose=0)
    assert seen and set(seen) == {True}


def test_jit_compile_trains_like_plain_keras_and_says_xla_is_not_used():
    x, y = data()
    plain, sharded = pair(jit_compile=True)
    with pytest.warns(UserWarning, match="jit_compile=True.*without XLA"):
        histories = [m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0) for m in (plain, sharded)]
    assert_histories_equal(*histories)
    assert_weights_equal(plain, sharded)


def test_callbacks_early_stopping_checkpoint_tensorboard(tmp_path):
    x, y = data()
    plain, sharded = pair()
    histories = []
    for name, model in (("plain", plain), ("sharded", sharded)):
        callbacks = [
            keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0),  # stops after epoch 2
            keras.callbacks.ModelCheckpoint(str(tmp_path / f"{name}.keras")),
            keras.callbacks.TensorBoard(str(tmp_path / f"tb_{name}")),
        ]
        histories.append(model.fit(x, y, batch_size=16, epochs=5, shuffle=False, verbose=0, callbacks=callbacks))
    assert len(histories[1].history["loss"]) == 2
    assert_histories_equal(*histories)
    checkpoint = keras.models.load_model(tmp_path / "sharded.keras")
    np.testing.assert_allclose(checkpoint.predict(x, verbose=0), plain.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    assert any(f.startswith("events") for _, _, files in os.walk(tmp_path / "tb_sharded") for f in files)


def test_save_load_and_reparallelize_on_another_mesh(tmp_path):
    x, y = data()
    _, sharded = pair(strategy="owt")
    sharded.fit(x, y, batch_size=16, epochs=1, verbose=0)
    expected = sharded.predict(x, verbose=0)
    sharded.save(tmp_path / "m.keras")
    # plain Keras, no keras_lwp involved; compile=False: a trained optimizer's state stays on one device
    # (parallelize refuses it), and this model only predicts
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    assert not hasattr(loaded, "_keras_lwp")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    keras_lwp.parallelize(loaded, keras_lwp.make_mesh({"x": 2, "y": 4}), strategy="model", batch_size=16)
    np.testing.assert_allclose(loaded.predict(x, batch_size=16, verbose=0), expected, rtol=1e-5, atol=1e-6)

    sharded.save_weights(tmp_path / "m.weights.h5")
    fresh = keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh(MESH), strategy="data", batch_size=16)
    fresh.load_weights(tmp_path / "m.weights.h5")
    np.testing.assert_allclose(fresh.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)


def test_model_api_is_kept():
    x, y = data()
    plain, sharded = pair(strategy="model")
    lines = []
    sharded.summary(print_fn=lambda line, **kwargs: lines.append(line))
    assert any("hidden" in line for line in lines)
    assert [layer.name for layer in sharded.layers] == [layer.name for layer in plain.layers]
    sharded.set_weights(plain.get_weights())
    assert_weights_equal(plain, sharded)
    assert [w.shape for w in sharded.get_weights()] == [w.shape for w in plain.get_weights()]
    for model in (plain, sharded):
        model.get_layer("hidden").trainable = False
        model.compile(keras.optimizers.Adam(1e-3), LOSS)
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_weights_equal(plain, sharded)
    frozen = sharded.get_layer("hidden").kernel
    np.testing.assert_array_equal(np.asarray(to_host(frozen.value)), plain.get_layer("hidden").kernel.numpy())
    assert keras_lwp.strategy_of(sharded).name == "model"


def test_mixed_precision_is_not_broken():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(3)
        model = keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh(MESH), strategy="owt", batch_size=16)
        model.compile(keras.optimizers.Adam(1e-3), LOSS)
        x, y = data()
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        assert model.predict(x, verbose=0).shape == (64, 8)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def snapshot(model):
    return [np.array(w) for w in model.get_weights()], [type(l.call) for l in model.layers]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(strategy="fast"), ValueError, "strategy must be 'auto'"),
        (dict(overrides={"hidden": {"rows": "x"}}), ValueError, "has no dimension 'rows'"),
        (dict(overrides={"hidden": {"sample": "q"}}), ValueError, "mesh axis 'q' is not in"),
        (dict(batch_size=9), ValueError, "batch_size=9 cannot be split"),
    ],
    ids=["unknown-strategy", "unknown-dimension", "unknown-axis", "indivisible-batch"],
)
def test_bad_arguments_change_nothing(kwargs, error, message):
    model = models.mlp()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), **kwargs)
    after = snapshot(model)
    assert not hasattr(model, "_keras_lwp") and before[1] == after[1]
    for a, b in zip(before[0], after[0]):
        np.testing.assert_array_equal(a, b)


def test_parallelize_twice_is_refused():
    model = keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh(MESH), batch_size=16)
    with pytest.raises(ValueError, match="already parallelized"):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH))


def test_strategy_for_another_model_is_refused():
    plan = keras_lwp.search(models.small_cnn(), MESH, batch_size=16)
    with pytest.raises(ValueError, match="does not have"):
        keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh(MESH), strategy=plan)


def test_subclassed_model_and_too_large_mesh_are_refused():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclass"):
        keras_lwp.parallelize(Net(), keras_lwp.make_mesh(MESH))
    with pytest.raises(ValueError, match="needs 16 CPU devices"):
        keras_lwp.parallelize(models.mlp(), {"x": 4, "y": 4})


def test_integer_input_into_a_float_layer_is_refused():
    inputs = keras.Input((8,), dtype="int32", name="ids")
    model = keras.Model(inputs, keras.layers.Dense(4, name="d")(inputs))
    with pytest.raises(ValueError, match=r"Input 'ids' has dtype int32.*'d', Dense.*dtype='float32'"):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=16)


def test_one_device_mesh():
    require_devices(1)
    keras.utils.set_random_seed(5)
    plain = models.mlp()
    keras.utils.set_random_seed(5)
    single = keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh({"x": 1}), batch_size=16)
    x, y = data()
    for model in (plain, single):
        model.compile(keras.optimizers.Adam(1e-3), LOSS)
    assert_histories_equal(*(m.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0) for m in (plain, single)))


@pytest.mark.parametrize("strategy,eager", [("data", False), ("random", False), ("data", True)])
def test_a_host_constant_in_the_graph_trains_like_one_device(strategy, eager):
    """keras_hub's ViTDet subtracts an `ops.array` of ImageNet means from its input: the functional
    graph holds a host tensor as an operation's argument, which a DTensor step cannot capture."""
    from keras_lwp.planner import random_strategy
    from tests import precision

    def run(parallel):
        with precision.float64():
            keras.utils.set_random_seed(3)
            inputs = keras.Input((6, 6, 3))
            x = (inputs - keras.ops.array([0.485, 0.456, 0.406], "float64")) / keras.ops.array([0.229, 0.224, 0.225],
                                                                                               "float64")
            x = keras.layers.Conv2D(4, 3, name="conv")(x)
            model = keras.Model(inputs, keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x)))
            if parallel:
                plan = strategy if strategy == "data" else random_strategy(model, MESH, 8, seed=0)
                keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=plan, batch_size=8)
            model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          run_eagerly=eager)
            rng = np.random.default_rng(0)
            model.fit(rng.random((16, 6, 6, 3)), rng.integers(0, 3, 16), batch_size=8, shuffle=False, verbose=0)
            return [np.asarray(to_host(v.value)) for v in model.weights]

    for got, want in zip(run(True), run(False)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
