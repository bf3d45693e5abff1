"""The models the paper evaluates (and two more), built with random weights for planning and training.

keras.applications gives VGG-16, Inception-v3 and ResNet-101 (weights=None: nothing is downloaded);
AlexNet is not in keras.applications, so it is defined here as in Krizhevsky et al. 2012 (the
single-tower variant of "One weird trick", Krizhevsky 2014, that Jia et al. 2018 evaluate).
"""

import keras

NAMES = ("alexnet", "vgg16", "inception_v3", "resnet101", "transformer")


def alexnet(image_size=224, classes=1000):
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Conv2D(64, 11, strides=4, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    x = keras.layers.Conv2D(192, 5, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool2")(x)
    x = keras.layers.Conv2D(384, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.Conv2D(256, 3, padding="same", activation="relu", name="conv4")(x)
    x = keras.layers.Conv2D(256, 3, padding="same", activation="relu", name="conv5")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool5")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(4096, activation="relu", name="fc6")(x)
    x = keras.layers.Dropout(0.5, name="drop6")(x)
    x = keras.layers.Dense(4096, activation="relu", name="fc7")(x)
    x = keras.layers.Dropout(0.5, name="drop7")(x)
    outputs = keras.layers.Dense(classes, name="fc8")(x)
    return keras.Model(inputs, outputs, name="alexnet")


def transformer(length=64, width=256, heads=8, blocks=2, vocabulary=1000, classes=10):
    """A small encoder: embedding, `blocks` x (self-attention + MLP, post-norm), pooled classifier."""
    tokens = keras.Input((length,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(vocabulary, width, name="embed")(tokens)
    for b in range(blocks):
        attended = keras.layers.MultiHeadAttention(heads, width // heads, name=f"mha{b}")(x, x)
        x = keras.layers.LayerNormalization(name=f"ln{b}a")(keras.layers.Add(name=f"res{b}a")([x, attended]))
        h = keras.layers.Dense(4 * width, activation="relu", name=f"ffn{b}a")(x)
        h = keras.layers.Dense(width, name=f"ffn{b}b")(h)
        x = keras.layers.LayerNormalization(name=f"ln{b}b")(keras.layers.Add(name=f"res{b}b")([x, h]))
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(tokens, keras.layers.Dense(classes, name="classifier")(x), name="transformer")


def build(name, image_size=None, classes=1000):
    """A model by name; image_size defaults to the paper's (224, and 299 for Inception-v3)."""
    if name == "alexnet":
        return alexnet(image_size or 224, classes)
    if name == "vgg16":
        return keras.applications.VGG16(weights=None, input_shape=(image_size or 224,) * 2 + (3,), classes=classes)
    if name == "inception_v3":
        return keras.applications.InceptionV3(weights=None, input_shape=(image_size or 299,) * 2 + (3,),
                                              classes=classes)
    if name == "resnet101":
        return keras.applications.ResNet101(weights=None, input_shape=(image_size or 224,) * 2 + (3,),
                                            classes=classes)
    if name == "transformer":
        return transformer(classes=classes)
    raise ValueError(f"Unknown model {name!r}. Known: {', '.join(NAMES)}")
