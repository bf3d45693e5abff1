"""Recurrent layers (SimpleRNN, LSTM, GRU, ConvLSTM, RNN over a cell, Bidirectional): split along the
sample, run unrolled.

Keras runs a recurrence as a `tf.while_loop` over TensorLists; DTensor has no layout rule for the
TensorList ops (TensorListStack, ...) and a parallelized LSTM under `fit` crashed the process. Unrolled
(`unroll=True`, a Python loop over the known time steps) the same cell computes the same operations on
ordinary tensors, which DTensor shards along the batch; a backwards recurrence (go_backwards) then walks
its time steps in reverse in Python, with no ReverseV2 (which DTensor cannot lay out). Bidirectional
reverses its backward outputs with `ops.flip`: while it runs, that flip is a gather of the time steps in
reverse order. A masked backwards recurrence that zeroes its masked outputs (Bidirectional's) runs
forwards over its reversed inputs and mask (`backwards_masks_in_order`), where Keras' unrolled loop
zeroed the wrong steps. The layers' own settings are restored after tracing, so the model's config and
saved files do not change. The time steps must be known.
"""

import contextlib
import math

from keras_lwp.layers.base import DimSpec, LayerRule, register_rule


def _recurrent_layers(layer):
    """The layer and the RNNs inside it (Bidirectional's forward and backward layers)."""
    layers = [layer]
    for name in ("forward_layer", "backward_layer", "layer"):
        inner = getattr(layer, name, None)
        if inner is not None and hasattr(inner, "unroll"):
            layers.append(inner)
    return [each for each in layers if hasattr(each, "unroll")]


@contextlib.contextmanager
def unrolled(layer):
    layers = _recurrent_layers(layer)
    saved = [each.unroll for each in layers]
    for each in layers:
        each.unroll = True
    try:
        yield
    finally:
        for each, value in zip(layers, saved):
            each.unroll = value


@contextlib.contextmanager
def flips_by_gather():
    """While a recurrent layer's call is traced, `keras.ops.flip` (Bidirectional's reversal of its backward
    outputs) gathers the flipped axis' indices in reverse order: the same values, without ReverseV2."""
    import tensorflow as tf

    from keras_lwp import keras_internals

    ops = keras_internals.ops_module()
    saved = ops.flip

    def flip(x, axis=None):
        if axis is None or not isinstance(axis, int) or x.shape[axis] is None:
            return saved(x, axis=axis)
        return tf.gather(x, tf.range(x.shape[axis] - 1, -1, -1), axis=axis)

    ops.flip = flip
    try:
        yield
    finally:
        ops.flip = saved


@contextlib.contextmanager
def backwards_masks_in_order():
    """While a recurrent layer's call is traced, a masked backwards recurrence that zeroes its masked
    outputs (Bidirectional's backward layer) runs forwards over its inputs and mask reversed, which is
    the same recurrence: Keras' unrolled loop zeroes the outputs, which come in reversed time order, by
    the mask in input order (its while loop, which one device runs, by the reversed mask). Bidirectional
    over a sequence masked in its middle trained 5e-3 away from one device."""
    import tensorflow as tf

    from keras_lwp import keras_internals

    backend = keras_internals.backend_module()
    saved = backend.rnn

    def rnn(step_function, inputs, initial_states, go_backwards=False, mask=None, constants=None, unroll=False,
            input_length=None, time_major=False, zero_output_for_mask=False, return_all_outputs=True):
        if unroll and go_backwards and mask is not None and zero_output_for_mask:
            time = 0 if time_major else 1
            reverse = lambda t: tf.gather(t, tf.range(t.shape[time] - 1, -1, -1), axis=time)  # noqa: E731
            inputs, mask, go_backwards = tf.nest.map_structure(reverse, inputs), reverse(mask), False
        return saved(step_function, inputs, initial_states, go_backwards=go_backwards, mask=mask,
                     constants=constants, unroll=unroll, input_length=input_length, time_major=time_major,
                     zero_output_for_mask=zero_output_for_mask, return_all_outputs=return_all_outputs)

    backend.rnn = rnn
    try:
        yield
    finally:
        backend.rnn = saved


@register_rule("SimpleRNN", "LSTM", "GRU", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D", "Bidirectional")
class RecurrentRule(LayerRule):
    """The recurrence runs along time on every device; the samples split."""

    def dimensions(self, info):
        x, y = info.inputs[0], info.output
        if len(x.shape) > 2 and x.shape[1] is None:
            raise ValueError(
                f"Layer '{info.name}' ({info.class_name}) runs its recurrence unrolled on the mesh (DTensor cannot "
                "lay out the TensorList ops of a while loop), which needs the number of time steps: give the "
                "model's input a fixed sequence length, e.g. keras.Input((T, features)).")
        return [DimSpec(name="sample", size=y.shape[0], output=0, inputs=tuple(0 for _ in info.inputs),
                        weights=tuple(None for _ in info.weights))]

    def forward_flops(self, info, call):
        x = call.inputs[0]
        steps = x.shape[1] if len(x.shape) > 2 and x.shape[1] else 1
        per_sample = sum(math.prod(w.shape) for w in info.weights if len(w.shape) >= 2)
        spatial = math.prod(x.shape[2:-1]) if len(x.shape) > 3 else 1  # ConvLSTM: every position
        return 2.0 * x.shape[0] * steps * spatial * per_sample

    def implementation(self, info, config):
        def run(layer, place, mesh, *args, **kwargs):
            with unrolled(layer), flips_by_gather(), backwards_masks_in_order():
                return type(layer).call(layer, *args, **kwargs)

        return run
