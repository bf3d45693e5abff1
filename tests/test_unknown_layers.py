"""Layers keras_lwp has no rule for: each either trains correctly (replicated, named in a warning) or is
refused by parallelize with an error naming the layer, the op and the way out; none kills the process.

Run in a subprocess, since what is checked is that the interpreter survives: a parallelized LSTM used
to crash it inside `fit`.
"""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os, sys, warnings
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras_lwp
    keras_lwp.use_virtual_devices(8)
    import keras, numpy as np, tensorflow as tf
    from keras_lwp.placement import to_host

    class Scale(keras.layers.Layer):  # plain ops, no rule: runs replicated
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1],), initializer="ones")
        def call(self, x):
            return tf.tanh(x) * self.w

    class Running(keras.layers.Layer):  # a while loop over a TensorArray (TensorList ops), no rule
        def call(self, x):
            steps = tf.TensorArray(x.dtype, size=x.shape[1])
            def body(i, total, steps):
                total = total + x[:, i]
                return i + 1, total, steps.write(i, total)
            _, _, steps = tf.while_loop(lambda i, *_: i < x.shape[1], body, (0, tf.zeros_like(x[:, 0]), steps))
            return tf.transpose(steps.stack(), [1, 0, 2])

    def model_with(layer, recurrent=False):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((6, 4))
        x = layer(inputs)
        x = keras.layers.LSTM(5, name="lstm")(x) if recurrent else keras.layers.Flatten()(x)
        return keras.Model(inputs, keras.layers.Dense(3)(x))

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 6, 4)).astype("float32"), rng.integers(0, 3, 16)

    def train(model):
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        model.predict(x, batch_size=8, verbose=0)
        return [np.asarray(to_host(v.value)) for v in model.weights]

    mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
    want = train(model_with(Scale(name="scale"), recurrent=True))
    model = model_with(Scale(name="scale"), recurrent=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_lwp.parallelize(model, mesh, batch_size=8)
    assert any("Scale" in str(w.message) for w in caught), "the layer with no rule is named in a warning"
    got = train(model)
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want)), "replicated fallback trains"
    print("scale: trained like plain Keras")

    model = model_with(Running(name="running"))
    try:
        keras_lwp.parallelize(model, mesh, batch_size=8)
    except ValueError as error:
        assert "'running'" in str(error) and "TensorList" in str(error) and "register_rule" in str(error), error
        print("running: refused")
    assert getattr(model, "_keras_lwp", None) is None
    train(model)  # the refused model still trains, unparallelized

    from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

    class Patch(keras.layers.Layer):  # a mask made with XLA's dynamic_update_slice (keras.ops.slice_update's op)
        def call(self, x):
            mask = dynamic_update_slice(tf.ones((6, 4), x.dtype), tf.zeros((2, 4), x.dtype), [0, 0])
            return x * mask

    def assert_refused(layer, *words):
        """parallelize refuses the model around `layer`, naming it and `words`, and changes nothing."""
        model = model_with(layer)
        try:
            keras_lwp.parallelize(model, mesh, batch_size=8)
            raise AssertionError(f"layer '{layer.name}' was not refused")
        except ValueError as error:
            assert f"'{layer.name}'" in str(error) and all(w in str(error) for w in words), error
        assert getattr(model, "_keras_lwp", None) is None
        train(model)

    assert_refused(Patch(name="patch"), "XlaDynamicUpdateSlice")

    class Compiled(keras.layers.Layer):  # its own XLA-compiled function: DTensor would run it without XLA
        def call(self, x):
            return tf.function(lambda t: tf.tanh(t) * 2.0, jit_compile=True)(x)

    assert_refused(Compiled(name="compiled"), "jit_compile=True")

    class Grouped(keras.layers.Layer):  # a grouped convolution inside, which Keras compiles with XLA
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = keras.layers.Conv1D(4, 3, groups=2, padding="same")
        def call(self, x):
            return self.conv(x)

    want = train(model_with(Grouped(name="grouped")))
    model = model_with(Grouped(name="grouped"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras_lwp.parallelize(model, mesh, batch_size=8)
    got = train(model)
    assert all(np.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(got, want)), "grouped convolution trains"
    print("grouped: trained like plain Keras")
    # An op keras_lwp does not know DTensor lacks: fit says which, and the process survives.
    from keras_lwp import runtime
    runtime.UNRUNNABLE_OPS = runtime.UNRUNNABLE_OPS - {"XlaDynamicUpdateSlice"}
    model = model_with(Patch(name="patch"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras_lwp.parallelize(model, mesh, batch_size=8)
    try:
        train(model)
        raise AssertionError("the step ran an op DTensor has no layout rule for")
    except NotImplementedError as error:
        assert "XlaDynamicUpdateSlice" in str(error) and "UNRUNNABLE_OPS" in str(error), error
        print("patch: refused, then explained at fit")
    print("done")
''')


def test_layers_without_rules_train_or_are_refused_and_the_process_survives():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}"
    assert result.stdout.split()[-1] == "done"
    assert "scale: trained like plain Keras" in result.stdout and "running: refused" in result.stdout
    assert "patch: refused, then explained at fit" in result.stdout
    assert "grouped: trained like plain Keras" in result.stdout
