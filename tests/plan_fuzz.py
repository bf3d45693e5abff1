"""Plan fuzzing: random valid strategies, hidden dimensions included, trained in float64 against the
single-device model. Shared by tests/test_same_numbers.py (a sample) and benchmarks/fuzz_plans.py (50+).

Every model mixes the layers whose splits meet in a CNN: Conv2D (channel, height, width splits computed
by keras_lwp), BatchNormalization, DepthwiseConv2D, Max/AveragePooling2D, Concatenate, a residual Add
and Dense. A random strategy draws each layer's configuration uniformly from everything `parallelize`
runs, so channel-split activations meet width-split convolutions and every other pairing.
"""

import keras
import numpy as np

import keras_lwp
from tests import precision
from keras_lwp.placement import to_host
from keras_lwp.planner import random_strategy

MESH = {"x": 2, "y": 2, "z": 2}
BATCH = 8
STEPS = 2
L = keras.layers


def residual_cnn(size=8):
    inputs = keras.Input((size, size, 4), name="image")
    x = L.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.ReLU(name="r1")(x)
    y = L.Conv2D(8, 3, padding="same", name="c2")(x)
    x = L.Add(name="add")([x, y])
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Flatten(name="flat")(x)
    return keras.Model(inputs, L.Dense(6, name="head")(x), name="residual_cnn")


def branch_cnn(size=8):
    inputs = keras.Input((size, size, 4), name="image")
    a = L.Conv2D(8, 1, name="a1")(inputs)
    b = L.DepthwiseConv2D(3, padding="same", name="b_dw")(inputs)
    b = L.Conv2D(8, 1, name="b1")(b)
    x = L.Concatenate(name="cat")([a, b])
    x = L.BatchNormalization(name="bn")(x)
    x = L.AveragePooling2D(2, name="avg")(x)
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c3")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(6, name="head")(x), name="branch_cnn")


def mobile_cnn(size=8):
    inputs = keras.Input((size, size, 4), name="image")
    x = L.Conv2D(8, 3, strides=1, padding="same", name="stem")(inputs)
    x = L.BatchNormalization(name="bn0")(x)
    x = L.ReLU(name="relu0")(x)
    y = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    y = L.BatchNormalization(name="bn1")(y)
    y = L.Conv2D(8, 1, name="project")(y)
    x = L.Add(name="res")([x, y])
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = L.AveragePooling2D(2, name="avg")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(16, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(6, name="head")(x), name="mobile_cnn")


MODELS = {"residual_cnn": residual_cnn, "branch_cnn": branch_cnn, "mobile_cnn": mobile_cnn}


def train(model_name, strategy_seed=None, optimizer="momentum"):
    """Weights after STEPS steps of float64 training, and the losses, on one device or on a random plan."""
    with precision.float64():
        keras.utils.set_random_seed(3)
        model = MODELS[model_name]()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((BATCH * STEPS,) + tuple(model.inputs[0].shape[1:]))
        y = rng.integers(0, model.outputs[0].shape[-1], BATCH * STEPS)
        plan = None
        if strategy_seed is not None:
            plan = random_strategy(model, MESH, BATCH, seed=strategy_seed)
            keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=plan, batch_size=BATCH)
        opt = keras.optimizers.SGD(0.1, momentum=0.9) if optimizer == "momentum" else keras.optimizers.Adam(1e-2)
        model.compile(opt, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        weights = [np.asarray(to_host(v.value)) for v in model.weights]
        return history.history["loss"][-1], weights, plan


def relative_error(reference, run):
    """The largest difference of any weight relative to that weight's scale, floored at 1e-3 of the
    model's largest weight: a weight whose true gradient is zero (a convolution's bias before
    BatchNormalization, which removes it) holds only rounding noise (1e-17), whatever the plan."""
    floor = 1e-3 * max(float(np.max(np.abs(w))) for w in reference[1] if w.size)
    worst = 0.0
    for want, got in zip(reference[1], run[1]):
        scale = max(float(np.max(np.abs(want))), floor)
        worst = max(worst, float(np.max(np.abs(got - want))) / scale)
    return worst
