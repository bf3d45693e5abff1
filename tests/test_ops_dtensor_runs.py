"""The ops a parallelized step computes its own way (keras_lwp.op_rewrites.ops_dtensor_runs) give what
TensorFlow's and NumPy's give, on the host, forward and backward: indexing with ints and new axes,
roll, flip, slice_update, tril/triu, top_k, and grouped and dilated convolutions. (On the mesh: tests/test_same_numbers.py.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_lwp import op_rewrites
from keras_lwp.op_rewrites import ops_dtensor_runs

SPECS = [
    (slice(None), None), (None, Ellipsis), (0,), (-1,), (2, None), (None, 0, None), (Ellipsis, 1),
    (Ellipsis, None), (slice(None), -2), (slice(1, None), 0, None, slice(None, None, -1)), (1, 2, 3),
    (None, None, slice(None), Ellipsis, 0), (slice(None, None, 2), None, -3), (np.int64(1), Ellipsis),
]


@pytest.mark.parametrize("spec", SPECS, ids=[str(spec) for spec in SPECS])
def test_indexing_with_ints_and_new_axes_is_numpys(spec):
    array = np.arange(4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6)
    x = tf.constant(array)
    with ops_dtensor_runs():
        got = x[spec]
        with tf.GradientTape() as tape:
            tape.watch(x)
            gradient = tape.gradient(tf.reduce_sum(x[spec] * 3.0), x)
    np.testing.assert_array_equal(got.numpy(), array[spec])
    want_gradient = np.zeros_like(array)
    np.add.at(want_gradient, spec, 3.0)
    np.testing.assert_array_equal(gradient.numpy(), want_gradient)


def test_out_of_range_indexing_keeps_tensorflows_error():
    with ops_dtensor_runs(), pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        tf.constant(np.zeros((3, 2)))[5]


@pytest.mark.parametrize("shift, axis", [(2, 1), (-3, 0), ((1, -2), (0, 2)), (7, None), (0, 1)])
def test_roll_is_numpys(shift, axis):
    array = np.arange(3 * 4 * 5, dtype=np.float64).reshape(3, 4, 5)
    with ops_dtensor_runs():
        got = keras.ops.roll(tf.constant(array), shift, axis=axis)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), np.roll(array, shift, axis=axis))


@pytest.mark.parametrize("axis", [None, 1, (0, -1)])
def test_flip_is_numpys(axis):
    array = np.arange(3 * 4 * 5, dtype=np.float64).reshape(3, 4, 5)
    with ops_dtensor_runs():
        got = keras.ops.flip(tf.constant(array), axis=axis)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), np.flip(array, axis=axis))


@pytest.mark.parametrize("sorted_", [True, False])
def test_top_k_and_its_gradient_are_tensorflows(sorted_):
    x = tf.constant(np.random.default_rng(2).standard_normal((3, 4, 7)))
    weights = tf.constant(np.arange(1.0, 4.0))

    def values_indices_gradient():
        with tf.GradientTape() as tape:
            tape.watch(x)
            values, indices = keras.ops.top_k(x, 3, sorted=sorted_)
            loss = tf.reduce_sum(tf.sin(values) * weights)
        return values, indices, tape.gradient(loss, x)

    want = values_indices_gradient()
    with ops_dtensor_runs():
        got = values_indices_gradient()
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("start", [(0, 0), (1, 2), (2, 3), (5, 9)], ids=["origin", "inside", "edge", "clamped"])
def test_slice_update_is_keras_own(start):
    inputs, updates = tf.constant(np.arange(20.0).reshape(4, 5)), tf.constant(-np.ones((2, 2)))
    want = keras.ops.slice_update(inputs, start, updates)  # XLA's dynamic_update_slice clamps the start
    with ops_dtensor_runs():
        got = keras.ops.slice_update(inputs, start, updates)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want))


def test_a_start_known_only_when_run_goes_to_keras_own_slice_update():
    """A start mixing ints and a tensor whose value the trace does not know: the original op, no error."""
    inputs, updates = tf.constant(np.arange(20.0).reshape(4, 5)), tf.constant(-np.ones((2, 2)))
    function = lambda row: keras.ops.slice_update(inputs, (row, 1), updates)  # noqa: E731
    want = tf.function(function)(tf.constant(1))
    with ops_dtensor_runs():
        got = tf.function(function)(tf.constant(1))
    np.testing.assert_array_equal(got.numpy(), want.numpy())


@pytest.mark.parametrize("k", [0, 1, -2])
@pytest.mark.parametrize("op", ["tril", "triu"])
def test_tril_and_triu_are_numpys(op, k):
    array = np.random.default_rng(1).standard_normal((2, 4, 5))
    with ops_dtensor_runs():
        got = getattr(keras.ops, op)(tf.constant(array), k)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), getattr(np, op)(array, k))


@pytest.mark.parametrize("rank, channels, filters, groups", [(2, 8, 8, 2), (2, 8, 16, 8), (1, 6, 9, 3), (2, 4, 4, 4)])
def test_grouped_convolution_is_keras_own(rank, channels, filters, groups):
    """Against Keras' own (an XLA-compiled function on CPU), forward and every gradient, in float64."""
    rng = np.random.default_rng(rank + channels)
    make = keras.layers.Conv2D if rank == 2 else keras.layers.Conv1D
    layer = make(filters, 3, strides=2, padding="same", groups=groups, dtype="float64")
    x = tf.constant(rng.standard_normal((2,) + (7,) * rank + (channels,)))
    layer.build(x.shape)

    def forward_and_gradients():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.sin(y))
        return [y] + tape.gradient(loss, [x, layer.kernel.value, layer.bias.value])

    want = forward_and_gradients()
    with ops_dtensor_runs():
        got = forward_and_gradients()
        graph = tf.function(layer.call).get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph.as_graph_def()
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    assert not any(node.attr["_XlaMustCompile"].b for node in nodes if "_XlaMustCompile" in node.attr), \
        "the grouped convolution must not run as Keras' XLA-compiled function"
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


def test_the_rewrites_are_what_runs():
    """Inside the context the graph holds the rewritten ops, none of those DTensor fails on."""
    def traced_ops(function, *args):
        with ops_dtensor_runs():
            graph = tf.function(function).get_concrete_function(*args).graph
        return {op.type for op in graph.get_operations()}

    x = tf.TensorSpec((4, 5, 6), tf.float64)
    ops = traced_ops(lambda t: (t[:, None], t[1], keras.ops.roll(t, 2, axis=1), keras.ops.tril(t), keras.ops.flip(t, 1),
                                keras.ops.slice_update(t, (0, 1, 1), tf.zeros((4, 2, 2), tf.float64))), x)
    assert {"ExpandDims", "Squeeze", "GatherV2", "SelectV2"} <= ops, ops
    assert not ops & {"Roll", "XlaDynamicUpdateSlice", "MatrixBandPart", "ReverseV2"}, ops

    def top_k_gradient(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            values = keras.ops.top_k(t, 2)[0]
        return tape.gradient(values, t)

    ops = traced_ops(top_k_gradient, x)
    assert "OneHot" in ops and "ScatterNd" not in ops, ops


def _value_and_gradient(function, array):
    x = tf.constant(array)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = function(x)
        loss = sum(tf.reduce_sum(t * t) for t in tf.nest.flatten(y))
    return [t.numpy() for t in tf.nest.flatten(y)], tape.gradient(loss, x).numpy()


LOOPS = {  # name: a function of a [4, 3, 5] float64 tensor running a keras.ops loop
    "fori_loop": lambda x: keras.ops.fori_loop(0, 3, lambda i, v: v * 0.5 + x[:, i], x[:, 0] * 0.0),
    "fori_loop_tensor_bounds": lambda x: keras.ops.fori_loop(tf.constant(1), tf.constant(4),
                                                             lambda i, v: v * v * 0.1 + tf.cast(i, x.dtype), x),
    "scan": lambda x: keras.ops.scan(lambda c, t: (c * 0.9 + t, c * t), x[0] * 0.0, x),
    "scan_reverse_nested": lambda x: keras.ops.scan(
        lambda c, t: ((c[0] + t["a"], c[1] * 0.5 + t["b"]), (c[0] * t["a"], c[1])), (x[0, 0], x[0, 1]),
        {"a": x[:, 0], "b": x[:, 1]}, reverse=True),
    "scan_length_only": lambda x: keras.ops.scan(lambda c, _: (c * 0.5 + 1.0, c), x[0], length=3),
    "map": lambda x: keras.ops.map(lambda t: tf.reduce_sum(t * t, axis=0), x),
    "map_nested": lambda x: keras.ops.map(lambda t: (t["a"] * t["b"], t["a"]), {"a": x, "b": x * 2.0}),
}


@pytest.mark.parametrize("name", sorted(LOOPS))
def test_unrolled_loops_are_keras_own(name):
    """fori_loop, scan and map run unrolled: the same values and gradients as Keras' while loops, and
    no while loop or TensorList left."""
    array = np.random.default_rng(5).standard_normal((4, 3, 5))
    want = _value_and_gradient(LOOPS[name], array)
    with ops_dtensor_runs():
        got = _value_and_gradient(LOOPS[name], array)
        graph = tf.function(LOOPS[name]).get_concrete_function(tf.TensorSpec(array.shape, tf.float64)).graph
    for a, b in zip(got[0] + [got[1]], want[0] + [want[1]]):
        np.testing.assert_array_equal(a, b)
    ops = {op.type for op in graph.get_operations()}
    assert not {t for t in ops if t.startswith(("While", "TensorList", "TensorArray"))}, ops


@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_cumprod_is_keras_own(axis):
    """Products over doubling distances: the same products in another order (float64 rounding apart),
    and the same gradient (TensorFlow's divides by the input, so no zeros here)."""
    array = np.random.default_rng(6).uniform(0.5, 1.5, (3, 5, 6))
    function = lambda x: keras.ops.cumprod(x, axis=axis)  # noqa: E731
    want = _value_and_gradient(function, array)
    with ops_dtensor_runs():
        got = _value_and_gradient(function, array)
    np.testing.assert_allclose(got[0][0], np.cumprod(array, axis=axis), rtol=1e-14)
    np.testing.assert_allclose(got[0][0], want[0][0], rtol=1e-14)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12)


@pytest.mark.parametrize("offset, axis1, axis2", [(0, 0, 1), (0, -2, -1), (1, 1, 2), (-2, 2, 0), (4, 0, 2), (-4, 1, 2)])
def test_diagonal_is_numpys(offset, axis1, axis2):
    array = np.random.default_rng(7).standard_normal((4, 5, 6))
    function = lambda x: keras.ops.diagonal(x, offset=offset, axis1=axis1, axis2=axis2)  # noqa: E731
    want = _value_and_gradient(function, array)
    with ops_dtensor_runs():
        got = _value_and_gradient(function, array)
        graph = tf.function(function).get_concrete_function(tf.TensorSpec(array.shape, tf.float64)).graph
    np.testing.assert_array_equal(got[0][0], np.diagonal(array, offset, axis1, axis2))
    np.testing.assert_array_equal(got[1], want[1])
    assert "MatrixDiagPartV3" not in {op.type for op in graph.get_operations()}


def test_a_loop_too_long_to_unroll_keeps_its_while_loop():
    def traced_ops():
        with ops_dtensor_runs():
            graph = tf.function(lambda t: keras.ops.fori_loop(0, op_rewrites.MAX_UNROLLED_STEPS + 1,
                                                              lambda i, v: v * 0.5, t)).get_concrete_function(
                tf.TensorSpec((2,), tf.float64)).graph
        return {op.type for op in graph.get_operations()}

    assert {"While", "StatelessWhile"} & traced_ops()


DILATED = [
    ("Conv1D", dict(filters=5, kernel_size=3, dilation_rate=2, padding="causal"), (11, 4)),
    ("Conv2D", dict(filters=5, kernel_size=3, dilation_rate=2, padding="same"), (9, 8, 4)),
    ("Conv2D", dict(filters=6, kernel_size=(3, 2), dilation_rate=(2, 3), padding="valid", groups=2), (9, 8, 4)),
    ("DepthwiseConv2D", dict(kernel_size=3, dilation_rate=2, padding="same", depth_multiplier=2), (9, 8, 4)),
    ("DepthwiseConv2D", dict(kernel_size=(2, 3), dilation_rate=(3, 2), padding="valid"), (9, 8, 4)),
    ("DepthwiseConv1D", dict(kernel_size=3, dilation_rate=3, padding="same"), (10, 4)),
    ("SeparableConv2D", dict(filters=5, kernel_size=3, dilation_rate=2, padding="same"), (9, 8, 4)),
]


@pytest.mark.parametrize("kind, config, shape", DILATED, ids=[f"{k}-{c.get('padding')}" for k, c, _ in DILATED])
def test_dilated_convolution_is_keras_own(kind, config, shape):
    """Without SpaceToBatchND (no DTensor layout rule), forward and every gradient, in float64."""
    layer = getattr(keras.layers, kind)(dtype="float64", **config)
    x = tf.constant(np.random.default_rng(3).standard_normal((2,) + shape))
    layer.build(x.shape)
    weights = [w.value for w in layer.weights]

    def forward_and_gradients():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.sin(y))
        return [y] + tape.gradient(loss, [x] + weights)

    want = forward_and_gradients()
    with ops_dtensor_runs():
        got = forward_and_gradients()
        graph = tf.function(layer.call).get_concrete_function(tf.TensorSpec(x.shape, x.dtype)).graph
    assert "SpaceToBatchND" not in {op.type for op in graph.get_operations()}
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)
