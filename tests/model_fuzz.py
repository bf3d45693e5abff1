"""Model fuzzing: random functional models of Keras' layers, trained in float64 under random plans
against the single-device model. Shared by tests/test_same_numbers.py (a sample) and
benchmarks/fuzz_models.py (hundreds).

Two families. A "chain" model (`random_model`) is an input (an image, a sequence, a vector, token ids
with or without padding masks, or a volume), three to seven random layers that fit the tensor in hand
(every so often two of them side by side, joined by a merge layer), and a pooled or flattened head of
five classes, read as logits, under a softmax or by a squared error. The layers are Keras' own:
convolutions of every rank and kind, recurrences, attention, normalizations, pooling, resizing,
reshapes, merges, masks and the layers keras_lwp has no rule for (a Lambda), so plans meet masks,
relayouts and fallbacks nobody wrote down.

A "graph" model (`random_graph_model`) is built the way users compose models: one to three inputs of
different kinds, trunks of those layers and of keras.ops (arithmetic, reductions, transposes, slices,
reshapes) with a functional model or a Sequential nested in them, a layer shared by two calls, and one
to three named outputs (classes, a regression, a sequence), each with its own loss, weight and sample
weights, trained by SGD with momentum or by Adam and validated.
"""

import keras
import numpy as np

import keras_lwp
from keras_lwp.placement import to_host
from keras_lwp.planner import random_strategy
from tests import precision

L = keras.layers
BATCH, STEPS, CLASSES, VOCABULARY = 8, 2, 5, 20
MESHES = ({"x": 2, "y": 2, "z": 2}, {"x": 4, "y": 2}, {"x": 8})
INPUTS = {"image": (8, 8, 3), "sequence": (8, 4), "vector": (12,), "tokens": (8,), "volume": (4, 4, 4, 2)}


def _any_rank(rng, x, name, width):
    return [
        lambda: L.Activation(str(rng.choice(["relu", "tanh", "gelu", "sigmoid", "softplus", "swish"])), name=name)(x),
        lambda: L.LayerNormalization(name=name)(x),
        lambda: L.BatchNormalization(name=name)(x),
        lambda: L.Dense(width, activation=str(rng.choice(["linear", "relu"])), name=name)(x),
        lambda: L.Dense(width, use_bias=False, name=name)(x),
        lambda: L.Dropout(0.0, name=name)(x),
        lambda: L.LeakyReLU(name=name)(x),
        lambda: L.PReLU(name=name)(x),
        lambda: L.ELU(name=name)(x),
        lambda: L.Softmax(name=name)(x),
        lambda: L.UnitNormalization(name=name)(x),
        lambda: L.Rescaling(0.5, 0.1, name=name)(x),
    ]


def _sequence(rng, x, name, width):
    steps, channels = x.shape[1], x.shape[2]
    return [
        lambda: L.Conv1D(width, int(rng.choice([1, 2, 3])), padding=str(rng.choice(["same", "causal", "valid"])),
                         name=name)(x),
        lambda: L.Conv1D(width, 3, padding="same", dilation_rate=2, name=name)(x),
        lambda: L.Conv1D(width, 3, strides=2, padding="same", name=name)(x),
        lambda: L.SeparableConv1D(width, 3, padding="same", name=name)(x),
        lambda: L.DepthwiseConv1D(3, padding="same", name=name)(x),
        lambda: L.Conv1DTranspose(width, 3, strides=2, padding="same", name=name)(x) if steps <= 8 else None,
        lambda: L.LSTM(width, return_sequences=True, name=name)(x),
        lambda: L.LSTM(width, return_sequences=True, go_backwards=True, name=name)(x),
        lambda: L.GRU(width, return_sequences=True, name=name)(x),
        lambda: L.SimpleRNN(width, return_sequences=True, name=name)(x),
        lambda: L.Bidirectional(L.GRU(width, return_sequences=True), name=name)(x),
        lambda: L.Bidirectional(L.LSTM(width, return_sequences=True),
                                merge_mode=str(rng.choice(["concat", "sum", "mul"])), name=name)(x),
        lambda: L.MaxPooling1D(2, padding="same", name=name)(x),
        lambda: L.AveragePooling1D(2, padding="same", name=name)(x),
        lambda: L.GlobalAveragePooling1D(keepdims=True, name=name)(x),
        lambda: L.UpSampling1D(2, name=name)(x) if steps <= 8 else None,
        lambda: L.ZeroPadding1D(1, name=name)(x),
        lambda: L.Cropping1D(1, name=name)(x) if steps > 3 else None,
        lambda: L.MultiHeadAttention(2, 4, name=name)(x, x),
        lambda: L.MultiHeadAttention(2, 4, name=name)(x, x, use_causal_mask=True),
        lambda: L.Attention(name=name)([x, x]),
        lambda: L.AdditiveAttention(name=name)([x, x]),
        lambda: L.Dot(axes=(2, 2), name=name)([x, x]) if steps == channels else None,
        lambda: L.GroupNormalization(2, name=name)(x) if channels % 2 == 0 else None,
        lambda: L.Permute((2, 1), name=name)(x),
        lambda: L.TimeDistributed(L.Dense(width), name=name)(x),
        lambda: L.Reshape((steps * channels // 2, 2), name=name)(x) if (steps * channels) % 2 == 0 else None,
        lambda: L.Masking(0.0, name=name)(x),
        lambda: L.SpatialDropout1D(0.0, name=name)(x),
        lambda: L.Lambda(lambda v: v * 2.0 + 1.0, name=name)(x),
        lambda: L.ActivityRegularization(l1=0.01, name=name)(x),
    ]


def _image(rng, x, name, width):
    size, channels = x.shape[1], x.shape[-1]
    return [
        lambda: L.Conv2D(width, int(rng.choice([1, 3])), padding=str(rng.choice(["same", "valid"])), name=name)(x)
        if size >= 3 else None,
        lambda: L.Conv2D(width, 3, strides=2, padding="same", name=name)(x),
        lambda: L.Conv2D(width, 3, dilation_rate=2, padding="same", name=name)(x),
        lambda: L.Conv2D(channels, 3, padding="same", groups=2, name=name)(x) if channels % 2 == 0 else None,
        lambda: L.Conv2D(width, (1, 3), strides=(1, 2), name=name)(x) if x.shape[2] >= 3 else None,
        lambda: L.SeparableConv2D(width, 3, padding="same", name=name)(x),
        lambda: L.DepthwiseConv2D(3, padding="same", depth_multiplier=int(rng.choice([1, 2])), name=name)(x),
        lambda: L.Conv2DTranspose(width, 3, strides=2, padding="same", name=name)(x) if size <= 8 else None,
        lambda: L.MaxPooling2D(2, padding="same", name=name)(x),
        lambda: L.MaxPooling2D(3, strides=1, padding="same", name=name)(x),
        lambda: L.AveragePooling2D(2, padding="same", name=name)(x),
        lambda: L.AdaptiveMaxPooling2D((2, 2), name=name)(x),
        lambda: L.UpSampling2D(2, name=name)(x) if size <= 8 else None,
        lambda: L.ZeroPadding2D(1, name=name)(x),
        lambda: L.Cropping2D(1, name=name)(x) if size > 3 else None,
        lambda: L.CenterCrop(size - 2, size - 2, name=name)(x) if size > 3 else None,
        lambda: L.Resizing(6, 6, name=name)(x),
        lambda: L.GroupNormalization(2, name=name)(x) if channels % 2 == 0 else None,
        lambda: L.SpatialDropout2D(0.0, name=name)(x),
        lambda: L.Permute((2, 1, 3), name=name)(x),
        lambda: L.Reshape((size * x.shape[2], channels), name=name)(x),
    ]


def _volume(rng, x, name, width):
    """(No 3-D pooling but the global one: TensorFlow has no float64 kernels for MaxPool3D and AvgPool3D.)"""
    size, channels = x.shape[1], x.shape[-1]
    return [
        lambda: L.Conv3D(width, 3, padding="same", name=name)(x),
        lambda: L.Conv3DTranspose(width, 3, strides=2, padding="same", name=name)(x) if size <= 4 else None,
        lambda: L.UpSampling3D(2, name=name)(x) if size <= 4 else None,
        lambda: L.ZeroPadding3D(1, name=name)(x),
        lambda: L.Cropping3D(1, name=name)(x) if size > 3 else None,
        lambda: L.GroupNormalization(2, name=name)(x) if channels % 2 == 0 else None,
        lambda: L.SpatialDropout3D(0.0, name=name)(x),
    ]


def _vector(rng, x, name, width):
    return [
        lambda: L.RepeatVector(4, name=name)(x),
        lambda: L.Reshape((x.shape[1] // 2, 2), name=name)(x) if x.shape[1] % 2 == 0 else None,
    ]


BY_RANK = {2: _vector, 3: _sequence, 4: _image, 5: _volume}


def _ops(rng, x):
    """keras.ops called on the model's tensors, which a functional model holds as nodes of their own."""
    ops, rank = keras.ops, len(x.shape)
    return [
        lambda: x * 2.0 + 1.0,
        lambda: ops.relu(x) - ops.mean(x, axis=-1, keepdims=True),
        lambda: ops.softmax(x, axis=int(rng.integers(1, rank))),
        lambda: ops.concatenate([x, ops.square(x)], axis=-1),
        lambda: ops.transpose(x, (0, 2, 1) + tuple(range(3, rank))) if rank >= 3 else None,
        lambda: x[:, 1:] if x.shape[1] > 2 else None,
        lambda: ops.sum(x, axis=1) if rank >= 3 else None,
        lambda: ops.expand_dims(x, -1) if rank <= 4 else None,
        lambda: ops.reshape(x, (-1, int(np.prod(x.shape[1:])))),
    ]


def _random_layer(rng, x, name, ops=False):
    """One random layer (with `ops`, possibly a keras.ops call) applied to `x`, or None when twenty
    draws found none that fits it."""
    width = int(rng.choice([4, 6, 8]))
    builders = _any_rank(rng, x, name, width) + BY_RANK[len(x.shape)](rng, x, name, width)
    builders += _ops(rng, x) if ops else []
    for _ in range(20):
        try:
            y = builders[rng.integers(len(builders))]()
        except ValueError:  # the layer refuses this shape (a kernel longer than the map, ...)
            y = None
        if y is not None:
            return y
    return None


def random_model(seed):
    """(model, input kind, head): head "logits", "softmax" or "squared"."""
    rng = np.random.default_rng(seed)
    kind = str(rng.choice(sorted(INPUTS)))
    inputs = keras.Input(INPUTS[kind], dtype="int32" if kind == "tokens" else None, name="in")
    x = inputs
    if kind == "tokens":
        x = L.Embedding(VOCABULARY, 6, mask_zero=bool(rng.integers(2)), name="embed")(x)
    for i in range(1, int(rng.integers(3, 8)) + 1):
        if rng.random() < 0.25:  # two layers side by side, merged when their shapes agree
            a, b = _random_layer(rng, x, f"l{i}a"), _random_layer(rng, x, f"l{i}b")
            if a is not None and b is not None and tuple(a.shape) == tuple(b.shape):
                merge = (L.Add, L.Multiply, L.Concatenate, L.Average, L.Maximum, L.Subtract)[rng.integers(6)]
                x = merge(name=f"m{i}")([a, b])
                continue
            if a is not None:
                x = a
                continue
        y = _random_layer(rng, x, f"l{i}")
        x = x if y is None else y
    rank = len(x.shape)
    if rank == 5:
        x = L.GlobalAveragePooling3D(name="pool")(x)
    elif rank == 4:
        x = (L.GlobalAveragePooling2D if rng.random() < 0.5 else L.Flatten)(name="pool")(x)
    elif rank == 3:
        x = (L.GlobalMaxPooling1D if rng.random() < 0.5 else L.Flatten)(name="pool")(x)
    head = str(rng.choice(["logits", "softmax", "squared"]))
    outputs = L.Dense(CLASSES, activation="softmax" if head == "softmax" else None, name="head")(x)
    return keras.Model(inputs, outputs, name=f"fuzz{seed}"), kind, head


def _trunk(rng, x, prefix, layers):
    """`layers` random layers or keras.ops after `x` (fewer where none fits)."""
    for i in range(layers):
        y = _random_layer(rng, x, f"{prefix}{i}", ops=True)
        x = x if y is None else y
    return x


def _nested(rng, x, prefix):
    """`x` through a model nested in the model: functional (two random layers) or a Sequential."""
    if rng.random() < 0.5:
        inner = keras.Input(x.shape[1:], dtype=x.dtype)
        return keras.Model(inner, _trunk(rng, inner, f"{prefix}_", 2), name=prefix)(x)
    width = int(rng.choice([4, 6]))
    return keras.Sequential([L.Dense(width, activation="relu", name=f"{prefix}_a"),
                             L.LayerNormalization(name=f"{prefix}_b")], name=prefix)(x)


def _pooled(x, name):
    """`x` as a (batch, features) tensor."""
    if len(x.shape) == 5:
        return L.GlobalAveragePooling3D(name=name)(x)
    if len(x.shape) == 4:
        return L.GlobalAveragePooling2D(name=name)(x)
    if len(x.shape) == 3:
        return L.GlobalAveragePooling1D(name=name)(x)
    return x


def random_graph_model(seed):
    """(model, {input name: kind}, {output name: head}): head "logits", "squared" or "tagged" (logits
    per position of the first trunk that ends as a sequence)."""
    rng = np.random.default_rng(seed)
    kinds = [str(k) for k in rng.choice(sorted(INPUTS), size=int(rng.integers(1, 4)), replace=False)]
    inputs, features, sequences = {}, [], []
    for n, kind in enumerate(kinds):
        name = f"in_{kind}"
        inputs[name] = x = keras.Input(INPUTS[kind], dtype="int32" if kind == "tokens" else None, name=name)
        if kind == "tokens":
            x = L.Embedding(VOCABULARY, 6, mask_zero=bool(rng.integers(2)), name=f"embed{n}")(x)
        x = _trunk(rng, x, f"t{n}_", int(rng.integers(1, 3)))
        if rng.random() < 0.6:
            x = _nested(rng, x, f"nested{n}")
        x = _trunk(rng, x, f"u{n}_", int(rng.integers(0, 2)))
        if len(x.shape) == 3 and not sequences:
            sequences.append(x)
        features.append(L.Dense(6, activation="tanh", name=f"proj{n}")(_pooled(x, f"pool{n}")))
    if len(features) > 1 and rng.random() < 0.5:  # one layer, two calls
        shared = L.Dense(6, name="shared")
        features[:2] = [shared(features[0]), shared(features[1])]
    x = features[0] if len(features) == 1 else L.Concatenate(name="join")(features)
    heads = {"classes": "logits", "value": "squared"}
    if sequences and rng.random() < 0.5:
        heads["tags"] = "tagged"
    if rng.random() < 0.3:
        del heads[str(rng.choice(["classes", "value"]))]
    outputs = {}
    for name, head in heads.items():
        if head == "logits":
            outputs[name] = L.Dense(CLASSES, name=name)(x)
        elif head == "squared":
            outputs[name] = L.Dense(2, name=name)(L.Dense(4, activation="relu", name=f"{name}_hidden")(x))
        else:
            outputs[name] = L.Dense(CLASSES, name=name)(sequences[0])
    return keras.Model(inputs, outputs, name=f"graph{seed}"), dict(zip(inputs, kinds)), heads


def _inputs(rng, kind, count):
    shape = (count,) + INPUTS[kind]
    return rng.integers(0, VOCABULARY, shape).astype("int32") if kind == "tokens" else rng.standard_normal(shape)


def _parallelize(model, mesh, plan_seed):
    if mesh is not None:
        plan = random_strategy(model, mesh, BATCH, seed=plan_seed) if plan_seed is not None else "auto"
        keras_lwp.parallelize(model, keras_lwp.make_mesh(mesh), strategy=plan, batch_size=BATCH)


def _weights(model):
    return [np.asarray(to_host(v.value)) for v in model.weights]


def train(seed, mesh=None, plan_seed=None):
    """(last loss, weights, predictions) after STEPS steps of SGD with momentum in float64: on one
    device, or on `mesh` under the random plan drawn with `plan_seed` ("auto" when None)."""
    with precision.float64():
        keras.utils.set_random_seed(3)
        model, kind, head = random_model(seed)
        rng = np.random.default_rng(0)
        x = _inputs(rng, kind, BATCH * STEPS)
        y = rng.integers(0, CLASSES, BATCH * STEPS)
        _parallelize(model, mesh, plan_seed)
        if head == "squared":
            loss, y = "mse", keras.utils.to_categorical(y, CLASSES)
        else:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=head == "logits")
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), loss)
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
        predictions = np.asarray(model.predict(x[:BATCH], batch_size=BATCH, verbose=0))
        return history.history["loss"][-1], _weights(model), predictions


def train_graph(seed, mesh=None, plan_seed=None):
    """`train` for `random_graph_model(seed)`: every output's loss weighted, each sample (and each tagged
    position) weighted per output, an accuracy metric on the classes, validation on the first batch,
    SGD with momentum or Adam. The loss is every figure of the last epoch's history (the losses per
    output, the metrics, the validation's); the predictions are every output's, side by side."""
    with precision.float64():
        keras.utils.set_random_seed(3)
        model, kinds, heads = random_graph_model(seed)
        rng = np.random.default_rng(0)
        count = BATCH * STEPS
        x = {name: _inputs(rng, kind, count) for name, kind in kinds.items()}
        shapes = {"classes": (count,), "value": (count, 2), "tags": (count, model.get_layer("tags").output.shape[1])
                  if "tags" in heads else None}
        y = {name: rng.standard_normal(shapes[name]) if head == "squared" else rng.integers(0, CLASSES, shapes[name])
             for name, head in heads.items()}
        _parallelize(model, mesh, plan_seed)
        logits = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        losses = {name: "mse" if head == "squared" else logits for name, head in heads.items()}
        weights = {name: w for name, w in zip(heads, (1.0, 0.5, 0.25))}
        # Adam's epsilon at 1e-3, not 1e-7: a weight whose true gradient is zero (a bias before a
        # BatchNormalization) holds rounding noise of 1e-17 that Adam's division by the gradient's own
        # size turns into steps of 1e-11, different for any other order of the sum, and the check would
        # measure that noise instead of the plan.
        optimizer = (keras.optimizers.SGD(0.1, momentum=0.9) if seed % 2 else keras.optimizers.Adam(1e-2, epsilon=1e-3))
        model.compile(optimizer, losses, loss_weights=weights,
                      metrics={"classes": ["accuracy"]} if "classes" in heads else None)
        sample_weight = {name: rng.uniform(0.5, 1.5, shapes[name][:2] if name == "tags" else count)
                         for name in heads}
        first = ({name: v[:BATCH] for name, v in x.items()}, {name: v[:BATCH] for name, v in y.items()})
        history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                            sample_weight=sample_weight, validation_data=first)
        predicted = model.predict(first[0], batch_size=BATCH, verbose=0)
        predictions = np.concatenate([np.reshape(np.asarray(predicted[name]), (BATCH, -1)) for name in heads], 1)
        figures = np.array([history.history[key][-1] for key in sorted(history.history)])
        return figures, _weights(model), predictions


def worst_error(reference, run):
    """The largest of: the loss' difference (or the history figures', relative to each), each weight's
    (relative to its scale, as plan_fuzz measures it) and the predictions' (relative to their scale)."""
    from tests.plan_fuzz import relative_error

    scale = max(float(np.max(np.abs(reference[2]))), 1e-12)
    figures, want = np.atleast_1d(run[0]), np.atleast_1d(reference[0])
    return max(float(np.max(np.abs(figures - want) / np.maximum(np.abs(want), 1e-12))),
               relative_error(reference[:2], run[:2]),
               float(np.max(np.abs(run[2] - reference[2]))) / scale)
