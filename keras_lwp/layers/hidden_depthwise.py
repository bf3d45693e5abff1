"""DepthwiseConv1D/2D split along sample, channel and rows/columns, from ops DTensor shards.

DTensor has no layout rule for DepthwiseConv2dNativeBackpropFilter; run "replicated" on a
batch-split input it returned one shard's filter gradient (MobileNetV2's depthwise kernels trained
off by 2e-2, runtime.py), so the builtin rule leaves even the sample split out. `hidden_depthwise`
never runs those kernels:

    y[n, h, w, c m + j] = sum_taps x[n, h s + kh d - pad, w s + kw d - pad, c] kernel[kh, kw, c, j]

1. Blocks, halos and windows as for convolutions (keras_lwp.layers.halo); a channel split keeps
   the input channels split all the way (the layer is per channel: nothing moves for it).
2. The kernel taps are strided slices of the windows, stacked [T, ..., C, 1], multiplied by the
   kernel [T, 1.., C, m] and summed over the taps: [.., C, m], merged to the output's c m + j
   channels (C outermost, so a channel split of the input is one of the output). The filter
   gradient is that product's: summed over the sample and spatial splits by one DTensor all-reduce
   (gradient synchronization), per channel block under a channel split. (Per-tap kernel slices
   instead had DTensor all-gather each slice's gradient, and in a compiled 1-D layer lay a slice
   out wrongly: outputs off by O(1). An einsum with C as its batch axis ran as C tiny matrix
   products with transposes around them: 1.2-2.7x slower per layer on 8 logical CPUs.)
3. Blocks merge back; bias and activation as keras' DepthwiseConv.

Runnable and exact (tests/test_hidden_depthwise.py) for channels_last layers with 'valid' or 'same'
padding, any kernel size, stride, dilation and depth multiplier: sample, channel and
length/height/width (a spatial dim's size is the gcd of its input and output extents, as for
pooling, so its input arrives split). All are `runs=KERAS_LWP`: "auto" picks them with
hidden_dimensions=True. channels_first layers keep the builtin space (nothing runnable).
SeparableConv stays whole (its pointwise half makes "channel" two different splits).
"""

import dataclasses
import itertools
import math

from keras_lwp.layers import halo
from keras_lwp.layers.base import KERAS_LWP, DimSpec, register_rule
from keras_lwp.layers.builtin import SPATIAL_NAMES, SampleOnlyConvRule, weight_axes


@register_rule("DepthwiseConv1D", "DepthwiseConv2D")
class HiddenDepthwiseRule(halo.WindowedSplits, SampleOnlyConvRule):
    """DepthwiseConv1D/2D with sample, channel and spatial splits run by keras_lwp."""

    computes = "splits of channels_last DepthwiseConv1D/2D with 'valid' or 'same' padding"

    def dimensions(self, info):
        dims = super().dimensions(info)
        if not self.supports(info):
            return dims
        channels = len(info.output.shape) - 1
        return [dataclasses.replace(dims[0], runs=KERAS_LWP),
                *self.spatial_dims(info, tuple(None for _ in info.weights)),
                DimSpec(name="channel", size=info.inputs[0].shape[-1], output=channels, inputs=(channels,),
                        weights=weight_axes(info, {"kernel": -2, "bias": 0}), runs=KERAS_LWP)]

    def memory_traffic(self, info, call, config):
        """Besides the layer's own passes, a split run by `hidden_depthwise` writes and reads the taps
        (T times the output over the multiplier m): stacked, times the kernel (m-fold), summed; then
        their gradient, the kernel's product, and each tap's gradient scattered into an input-sized
        tensor and summed back. T-fold traffic the native kernel never makes, and the cost of this
        path on a CPU, where its arithmetic is nothing (tests/pure/test_cost.py)."""
        traffic = super().memory_traffic(info, call, config)
        if not config:
            return traffic  # replicated: the native kernel
        kernel = next(w for w in info.weights if w.name.endswith("kernel"))
        taps, multiplier = math.prod(kernel.shape[:-2]), kernel.shape[-1]
        stacked = taps * call.outputs[0].nbytes / multiplier
        return traffic + (3 + 5 * multiplier) * stacked + 2 * taps * call.inputs[0].nbytes

    def tap_passes(self, info, call, config):
        if not config:
            return 0  # replicated: the native kernel
        return math.prod(next(w for w in info.weights if w.name.endswith("kernel")).shape[:-2])

    def implementation(self, info, config):
        if not config:
            return None  # replicated: DTensor runs the layer's own kernels, whole
        self.check_supported(info, config)
        return hidden_depthwise


def hidden_depthwise(layer, place, mesh, inputs, *args, **kwargs):
    """DepthwiseConv1D/2D under `place.config` from ops DTensor shards (see the module doc)."""
    import tensorflow as tf

    config, x, window = halo.window_call(layer, place, inputs, args, kwargs)
    rank, kernel_size, strides, dilation, padding = window.rank, window.size, window.strides, window.dilation, window.padding
    channels = x.shape[-1]
    sample_axis = halo.fits(config.get("sample"), x.shape[0], mesh)
    channel_axis = halo.fits(config.get("channel"), channels, mesh)
    axes, geometries = halo.window_splits(x, config, SPATIAL_NAMES[rank], kernel_size, strides, dilation, padding, mesh)

    # 1. Blocks [N, P0, window0, (P1, window1,) C], each output block's input window.
    blocks, block_spec = halo.to_blocks(x, geometries, axes, sample_axis, channel_axis, mesh)
    blocks = halo.extend_blocks(blocks, geometries, axes, block_spec, mesh)

    # 2. The taps' strided rows stacked [T, N, P0, out0, (P1, out1,) C], times the kernel [T, C, m],
    #    summed over the taps: one product, so the filter gradient is one reduction (and one
    #    all-reduce over the splits of the batch and rows), not one per tap.
    taps = []
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        piece = blocks
        for i, t in enumerate(tap):
            g = geometries[i]
            stop = (g.out_block - 1) * g.stride + 1
            piece = halo.rows(piece, 2 + 2 * i, t * g.dilation, t * g.dilation + stop, g.stride)
        taps.append(piece)
    stacked = halo.relayout(tf.stack(taps, 0), [None] + block_spec, mesh)
    kernel = tf.convert_to_tensor(layer.kernel)
    multiplier = kernel.shape[-1]
    kernel = halo.relayout(tf.reshape(kernel, [len(taps), channels, multiplier]), [None, channel_axis, None], mesh)
    kernel = tf.reshape(kernel, [len(taps)] + [1] * (1 + 2 * rank) + [channels, multiplier])
    y = tf.reduce_sum(stacked[..., None] * kernel, axis=0)
    y = halo.relayout(y, block_spec + [None], mesh)

    # 3. Blocks back into the output ([C, m] -> C m, C outermost; one merge per reshape), bias and
    #    activation.
    y = halo.relayout(tf.reshape(y, [-1 if d is None else d for d in y.shape[:-2]] + [channels * multiplier]),
                      block_spec, mesh)
    y = halo.from_blocks(y, geometries, channels * multiplier, [sample_axis] + axes + [channel_axis], mesh)
    if layer.use_bias:
        y = y + tf.reshape(tf.convert_to_tensor(layer.bias), [1] * (rank + 1) + [channels * multiplier])
    if layer.activation is not None:
        y = layer.activation(y)
    return y


__all__ = ["HiddenDepthwiseRule", "hidden_depthwise"]
