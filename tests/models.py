"""Small Keras models the tests plan and train (built fresh for every call: Keras names are global)."""

import keras


def mlp(features=32, hidden=64, classes=8):
    inputs = keras.Input((features,), name="features")
    x = keras.layers.Dense(hidden, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="mlp")


def small_cnn(size=16, channels=3, classes=10):
    inputs = keras.Input((size, size, channels), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(classes, name="fc2")(x)
    return keras.Model(inputs, outputs, name="small_cnn")


def noisy_cnn(size=16, channels=3, classes=10):
    """small_cnn with every kind of random layer: their draws must be the single device's."""
    inputs = keras.Input((size, size, channels), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.SpatialDropout2D(0.25, name="spatial_drop")(x)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.GaussianNoise(0.1, name="noise")(x)
    x = keras.layers.GaussianDropout(0.1, name="gaussian_drop")(x)
    x = keras.layers.AlphaDropout(0.1, name="alpha_drop")(x)
    outputs = keras.layers.Dense(classes, name="fc2")(x)
    return keras.Model(inputs, outputs, name="noisy_cnn")


def branchy():
    """Two inputs, two outputs, add and concatenate, one layer called twice."""
    a = keras.Input((16,), name="a")
    b = keras.Input((16,), name="b")
    shared = keras.layers.Dense(16, activation="relu", name="shared")
    xa, xb = shared(a), shared(b)
    added = keras.layers.Add(name="add")([xa, xb])
    joined = keras.layers.Concatenate(name="concat")([added, xa])
    out1 = keras.layers.Dense(4, name="out1")(joined)
    out2 = keras.layers.Dense(2, name="out2")(added)
    return keras.Model([a, b], [out1, out2], name="branchy")


def transformer_block(length=8, width=16, heads=2, dropout=0.0):
    inputs = keras.Input((length, width), name="tokens")
    attended = keras.layers.MultiHeadAttention(heads, width // heads, dropout=dropout, name="mha")(inputs, inputs)
    x = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add(name="res1")([inputs, attended]))
    h = keras.layers.Dense(2 * width, activation="relu", name="ffn1")(x)
    h = keras.layers.Dense(width, name="ffn2")(h)
    x = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add(name="res2")([x, h]))
    outputs = keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling1D(name="gap")(x))
    return keras.Model(inputs, outputs, name="transformer_block")


def conv_stack(channels=8, size=32):
    """Few channels, large images: the data-parallel regime."""
    inputs = keras.Input((size, size, 3))
    x = inputs
    for c in (channels, channels, 2 * channels):
        x = keras.layers.Conv2D(c, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="conv_stack")


def wide_head(features=1024, width=8192, classes=1000):
    """Huge dense layers, small batch: the model-parallel regime."""
    inputs = keras.Input((features,), name="features")
    x = keras.layers.Dense(width, activation="relu", name="fc1")(inputs)
    x = keras.layers.Dense(width, activation="relu", name="fc2")(x)
    return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name="wide_head")


def mobile_block(size=8):
    """DepthwiseConv2D, AveragePooling2D and BatchNormalization: layers DTensor cannot differentiate
    sharded, so keras_lwp keeps them whole."""
    inputs = keras.Input((size, size, 4), name="image")
    x = keras.layers.Conv2D(8, 1, name="expand")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="depthwise")(x)
    x = keras.layers.AveragePooling2D(2, name="avgpool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="head")(x), name="mobile_block")


def pooled_cnn(size=32):
    """Layers whose sample split keras_lwp computes itself (AveragePooling, a grouped convolution):
    "data" splits them, and so may the default "auto" (it does at 32x32, batch 16, on 4x2)."""
    inputs = keras.Input((size, size, 8), name="image")
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.AveragePooling2D(2, name="avg_pool")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", groups=4, name="grouped")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="pooled_cnn")
