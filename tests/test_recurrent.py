"""Recurrent layers train, evaluate and predict like one device (float64), under every kind of plan.

A parallelized LSTM used to kill the process in `fit` (DTensor and the TensorList ops of Keras' while
loop); keras_lwp.layers.recurrent runs recurrences unrolled and splits them along the samples. The models:
an LSTM, a stacked GRU and SimpleRNN, a ConvLSTM2D, and a Bidirectional LSTM followed by a go_backwards GRU.
"""

import functools

import keras
import numpy as np
import pytest

import keras_lwp
from keras_lwp.planner import random_strategy
from keras_lwp.placement import to_host
from tests import precision

pytestmark = pytest.mark.usefixtures("grappler_off")  # compile time: see conftest.without_grappler

MESH = {"x": 4, "y": 2}
BATCH = 8
LENGTH = 4  # time steps: the recurrences run unrolled, so a step's compile time grows with it
L = keras.layers


def lstm():
    inputs = keras.Input((LENGTH, 6), name="sequence")
    return keras.Model(inputs, L.Dense(10, name="head")(L.LSTM(16, name="lstm")(inputs)))


def stacked():
    inputs = keras.Input((LENGTH, 6), name="sequence")
    x = L.GRU(12, return_sequences=True, name="gru")(inputs)
    x = L.SimpleRNN(8, name="rnn")(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x))


def bidirectional():
    inputs = keras.Input((LENGTH, 6), name="sequence")
    x = L.Bidirectional(L.LSTM(8, return_sequences=True), name="bi")(inputs)
    x = L.GRU(6, go_backwards=True, return_sequences=True, name="backwards")(x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


def masked_bidirectional():
    """Token ids with padding (id 0) anywhere in the sequence, not only at its end: Bidirectional's
    backward layer zeroes its masked outputs, which Keras' unrolled loop did at the wrong steps."""
    inputs = keras.Input((LENGTH,), dtype="int32", name="tokens")
    x = L.Embedding(5, 6, mask_zero=True, name="embed")(inputs)
    x = L.Bidirectional(L.GRU(4, return_sequences=True), name="bi")(x)
    x = L.Flatten(name="flat")(x)  # every step's output, the zeroed ones too
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def conv_lstm():
    inputs = keras.Input((3, 6, 6, 2), name="frames")
    x = L.ConvLSTM2D(4, 3, padding="same", name="convlstm")(inputs)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x))


MODELS = {"lstm": lstm, "stacked": stacked, "bidirectional": bidirectional, "conv_lstm": conv_lstm,
          "masked_bidirectional": masked_bidirectional}


@functools.lru_cache(maxsize=None)
def one_device(model_name):
    return run(model_name)


def run(model_name, strategy=None, eager=False):
    with precision.float64():
        keras.utils.set_random_seed(4)
        model = MODELS[model_name]()
        rng = np.random.default_rng(0)
        shape = (2 * BATCH,) + tuple(model.inputs[0].shape[1:])
        x = rng.integers(0, 5, shape) if "int" in str(model.inputs[0].dtype) else rng.standard_normal(shape)
        y = rng.integers(0, model.outputs[0].shape[-1], 2 * BATCH)
        if strategy is not None:
            if strategy == "random":
                strategy = random_strategy(model, MESH, BATCH, seed=1)
            keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=strategy, batch_size=BATCH)
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      run_eagerly=eager)
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        evaluated = model.evaluate(x, y, batch_size=BATCH, verbose=0)
        predicted = model.predict(x, batch_size=BATCH, verbose=0)
        weights = [np.asarray(to_host(v.value)) for v in model.weights]
        return history.history["loss"], evaluated, predicted, weights


# Every model under a random plan (which mixes the rules' splits); the plain LSTM also under "auto"
# (test_input_shapes_fix_an_open_sequence_length trains it under "data").
CASES = [("lstm", "auto"), ("lstm", "random"), ("stacked", "random"),
         ("conv_lstm", "random"), ("bidirectional", "random"), ("masked_bidirectional", "data")]


@pytest.mark.parametrize("model_name,strategy", CASES, ids=[f"{m}-{s}" for m, s in CASES])
def test_recurrent_models_train_like_one_device(model_name, strategy):
    want = one_device(model_name)
    got = run(model_name, strategy)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-9)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-9, atol=1e-12)
    for got_weight, want_weight in zip(got[3], want[3]):
        np.testing.assert_allclose(got_weight, want_weight, rtol=1e-9, atol=1e-12)


def test_a_recurrence_run_eagerly_trains_like_one_device():
    """Run eagerly, the recurrence's zero initial state is made on the host, and DTensor's ops refused
    it beside the sharded inputs: the eager step now runs on the mesh's default."""
    want, got = one_device("masked_bidirectional"), run("masked_bidirectional", "data", eager=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-9)
    for got_weight, want_weight in zip(got[3], want[3]):
        np.testing.assert_allclose(got_weight, want_weight, rtol=1e-9, atol=1e-12)


def test_an_unknown_sequence_length_is_refused_before_any_change():
    inputs = keras.Input((None, 6), name="sequence")
    model = keras.Model(inputs, L.Dense(3)(L.LSTM(4, name="lstm")(inputs)))
    with pytest.raises(ValueError, match="needs static shapes.*input_shapes=.'sequence'"):
        keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=BATCH)
    assert getattr(model, "_keras_lwp", None) is None


def test_input_shapes_fix_an_open_sequence_length():
    """The plan is made for the given length; the model trains like one device at that length."""
    def open_lstm():
        inputs = keras.Input((None, 6), name="sequence")
        return keras.Model(inputs, L.Dense(10, name="head")(L.LSTM(16, name="lstm")(inputs)))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * BATCH, LENGTH, 6))
    y = rng.integers(0, 10, 2 * BATCH)
    runs = []
    for parallel in (False, True):
        with precision.float64():
            keras.utils.set_random_seed(4)
            model = open_lstm()
            if parallel:
                keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy="data", batch_size=BATCH,
                                      input_shapes={"sequence": (LENGTH, 6)})
            model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
            runs.append([np.asarray(to_host(v.value)) for v in model.weights])
    for want, got in zip(*runs):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
