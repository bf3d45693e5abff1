"""The paper's hidden dimensions of convolutions (channel, rows, columns) on CPU/GPU DTensor meshes.

DTensor shards a convolution along its batch only on CPU/GPU (replicated filters; halo exchange only
on TPU; the backprop ops batch-parallel only: docs/design.md, "Measured facts"). This rule runs Conv1D and
Conv2D (channels_last) split along channel and spatial dims from ops DTensor does shard, and moves
only the halo:

1-3. Blocks, halo exchange and per-block windows: keras_lwp.layers.halo (shared with pooling).
4. Matmul. The kernel taps' strided rows are gathered along the channel axis (im2col, one spatial
   axis at a time: k0 + k1 slices) and multiplied by the kernel, `einsum("...k,kd->...d")`. Under a
   channel (output filter) split the kernel keeps its out-channel split and the windows get a
   leading axis of the split's size (a product with ones laid out on it), so the input gradient is
   summed over the channel split once, not once per tap.
5. Output. The blocks merge back ([Ph, H'/Ph] -> H', local), bias and activation follow as in
   keras.layers.Conv2D.call, and the result is relaid explicitly to the configuration's output layout
   (DTensor's propagation drops an out-channel split otherwise).

Runnable (`runs=KERAS_LWP`) and exact (tests/test_hidden_conv.py): sample, channel (groups == 1, as
the builtin rule declares it), and length/height/width for groups == 1 under 'same', 'valid' or 'causal'
padding with any kernel size, stride and dilation, alone or combined on the mesh axes. Left
`COSTED` (planned only with space="full"): spatial splits of grouped convolutions. channels_first
layers keep the builtin rule's sample-only space.

The DimSpec `halo` is what the exchange moves on a 2-way split: `left + right` rows per block
(`halo_geometry`); keras_lwp.layers.halo says what a P-way split moves.
"""

import dataclasses
import math

from keras_lwp.layers import halo
from keras_lwp.layers.base import KERAS_LWP, register_rule, unsupported_split
from keras_lwp.layers.builtin import SPATIAL_NAMES, ConvRule, padding_of
from keras_lwp.layers.halo import HaloGeometry, halo_geometry, output_size


@register_rule("Conv1D", "Conv2D")
class HiddenConvRule(ConvRule):
    """Conv1D/Conv2D with the channel and spatial splits run by keras_lwp (see the module doc)."""

    def supports(self, info, name):
        """Whether this rule computes dimension `name` of the layer exactly."""
        if info.config.get("data_format", "channels_last") != "channels_last":
            return name == "sample"
        if name in ("sample", "channel"):
            return True
        return info.config.get("groups", 1) == 1 and padding_of(info) in ("valid", "same", "causal")

    def dimensions(self, info):
        dims = super().dimensions(info)
        rank = len(info.output.shape) - 2
        spatial = SPATIAL_NAMES.get(rank, ())
        kernel, strides, dilation = self.window(info) if spatial else ((), (), ())
        result = []
        for d in dims:
            changes = {}
            if d.name in spatial and self.supports(info, d.name):
                i = spatial.index(d.name)
                # What the exchange moves per block on a 2-way split (the cost model's halo rows).
                parts = 2 if info.output.shape[1 + i] % 2 == 0 else 1
                changes["halo"] = halo_geometry(info.inputs[0].shape[1 + i], kernel[i], strides[i], dilation[i],
                                                padding_of(info), parts).halo if parts == 2 else d.halo
            if not d.runnable and self.supports(info, d.name):
                changes["runs"] = KERAS_LWP
            result.append(dataclasses.replace(d, **changes) if changes else d)
        return result

    def memory_traffic(self, info, call, config):
        """Besides the layer's own passes, `hidden_conv` writes and reads its patches (T taps times
        the input channels per output position): forward, their gradient backward, each tap's
        gradient scattered into an input-sized tensor; with one filter per group, the product too
        (as keras_lwp.layers.hidden_depthwise). Nothing that matters beside a dense convolution's
        arithmetic; a grouped one's is small, and its patches are what it costs on a CPU."""
        traffic = super().memory_traffic(info, call, config)
        if not self._computes(info, config):
            return traffic  # DTensor runs the layer's own convolution
        kernel = next(w for w in info.weights if w.name.endswith("kernel"))
        taps, channels, filters = math.prod(kernel.shape[:-2]), call.inputs[0].shape[-1], kernel.shape[-1]
        groups = info.config.get("groups", 1)
        patches = taps * call.outputs[0].nbytes * channels / filters
        passes = 8 if groups > 1 and filters == groups else 4
        return traffic + passes * patches + 2 * taps * call.inputs[0].nbytes

    def tap_passes(self, info, call, config):
        if not self._computes(info, config):
            return 0  # DTensor runs the layer's own convolution
        return math.prod(next(w for w in info.weights if w.name.endswith("kernel")).shape[:-2])

    def implementation(self, info, config):
        hidden = [d for d in config if d != "sample"]
        refused = [d for d in hidden if not self.supports(info, d)]
        if refused:
            raise unsupported_split(
                info, refused, f"{info.config.get('data_format')}, groups={info.config.get('groups', 1)}, "
                f"padding={padding_of(info)!r}", "channel and spatial splits of channels_last convolutions "
                "(spatial ones for groups == 1 only)")
        return hidden_conv if self._computes(info, config) else None

    @staticmethod
    def _computes(info, config):
        """Whether `hidden_conv` runs the layer under `config`, rather than DTensor its own call."""
        if info.config.get("groups", 1) > 1 and info.config.get("data_format", "channels_last") == "channels_last":
            # Keras computes a grouped convolution on CPU in an XLA-compiled function, which DTensor runs
            # to wrong values (a batch-split Conv2D with groups=16 trained 1e-2 away): always ours.
            return True
        return any(d != "sample" for d in config)  # else a batch split (or none): the layer's own call


# -- the implementation ------------------------------------------------------------------------

def hidden_conv(layer, place, mesh, inputs, *args, **kwargs):
    """Conv1D/Conv2D under `place.config` (channel and/or spatial splits) from ops DTensor shards."""
    import tensorflow as tf

    config, x, window = halo.window_call(layer, place, inputs, args, kwargs)
    rank, kernel_size, strides, dilation, padding = window.rank, window.size, window.strides, window.dilation, window.padding
    spatial = SPATIAL_NAMES[rank]
    batch, channels = x.shape[0], x.shape[-1]
    groups = getattr(layer, "groups", 1)
    sample_axis = halo.fits(config.get("sample"), batch, mesh)
    channel_axis = config.get("channel")
    axes = [config.get(name) for name in spatial]
    # A spatial split whose output this call's shapes do not divide (not the planned ones) stays whole.
    axes = [halo.fits(a, output_size(x.shape[1 + i], kernel_size[i], strides[i], dilation[i], padding)[0], mesh)
            for i, a in enumerate(axes)]
    geometries = [halo_geometry(x.shape[1 + i], kernel_size[i], strides[i], dilation[i], padding,
                                halo.axis_size(mesh, a) if a else 1) for i, a in enumerate(axes)]

    # 1-3. The input in blocks [N, P0, S0/P0, (P1, S1/P1,) C] (block dims keeping the mesh axes, the
    #      input channels whole), extended by the halos, each output block's input window.
    blocks, block_spec = halo.to_blocks(x, geometries, axes, sample_axis, None, mesh)
    blocks = halo.extend_blocks(blocks, geometries, axes, block_spec, mesh)

    # 4. An axis for the channel split (ones laid out on it), so the input gradient sums over it once.
    #    It leads (a batch axis of the matmul), so no operand is transposed.
    kernel = tf.convert_to_tensor(layer.kernel)
    filters = kernel.shape[-1]
    if rank > 1:  # taps ordered like the patches below: the last spatial axis outermost
        kernel = tf.transpose(kernel, list(range(rank))[::-1] + [rank, rank + 1])
    taps = math.prod(kernel_size)
    lead = 0
    if channel_axis is not None:
        channel_parts = halo.axis_size(mesh, channel_axis)
        kernel = tf.reshape(kernel, [taps * channels, channel_parts, filters // channel_parts])
        kernel = halo.relayout(tf.transpose(kernel, [1, 0, 2]), [channel_axis, None, None], mesh)
        ones = tf.ones_like(kernel[:, :1, :1])  # [parts, 1, 1], split on the channel axis
        blocks = tf.expand_dims(blocks, 0) * tf.reshape(ones, [channel_parts] + [1] * len(blocks.shape))
        blocks = halo.relayout(blocks, [channel_axis] + block_spec, mesh)
        lead = 1
    elif groups > 1:  # [taps, groups, in-channels of a group, filters of a group]
        kernel = tf.transpose(tf.reshape(kernel, [taps, channels // groups, groups, filters // groups]), [0, 2, 1, 3])
        kernel = halo.relayout(kernel, [None] * 4, mesh)
    else:
        kernel = halo.relayout(tf.reshape(kernel, [taps * channels, filters]), [None, None], mesh)

    # im2col, one spatial axis at a time (k0 + k1 slices, not k0 * k1): each tap's strided rows of
    # every block go along the channel axis, the later axis' taps outermost.
    patches = blocks
    for i, g in enumerate(geometries):
        stop = (g.out_block - 1) * g.stride + 1
        taps_i = [halo.rows(patches, lead + 2 + 2 * i, t * g.dilation, t * g.dilation + stop, g.stride)
                  for t in range(g.kernel)]
        patches = tf.concat(taps_i, axis=-1) if len(taps_i) > 1 else taps_i[0]
    letters = "abefghij"[:2 * rank]
    if channel_axis is not None:
        y = tf.einsum(f"pn{letters}k,pkd->pn{letters}d", patches, kernel)
        y = halo.relayout(y, [channel_axis] + block_spec, mesh)
        y = tf.transpose(y, list(range(1, 2 * rank + 2)) + [0, 2 * rank + 2])  # [N, blocks..., parts, D/parts]
        y = halo.relayout(y, block_spec[:-1] + [channel_axis, None], mesh)
    elif groups > 1:  # each group's channels meet only its own filters
        patches = tf.reshape(patches, list(patches.shape[:-1]) + [taps, groups, channels // groups])
        if filters == groups:
            # One filter per group (a depthwise convolution written as Conv2D, as ConvNeXt's): a product
            # summed over the taps and the group's channels. The einsum, with the groups as its batch
            # axis, runs one tiny matrix product per group: a 7x7 layer of 96 groups, batch 32 of 8x8,
            # on 8 logical CPUs took 382 ms replicated that way, 120 ms this way (28 and 15 ms split
            # by samples). With several filters per group the product would hold the patches once per
            # filter: the einsum stays.
            y = tf.reduce_sum(patches[..., None] * kernel, axis=[-4, -2])
        else:
            y = tf.einsum(f"n{letters}tgc,tgco->n{letters}go", patches, kernel)
        y = halo.relayout(tf.reshape(y, list(y.shape[:-2]) + [filters]), block_spec, mesh)
    else:
        y = tf.einsum(f"n{letters}k,kd->n{letters}d", patches, kernel)
        y = halo.relayout(y, block_spec, mesh)

    # 5. Blocks back into the output, bias and activation as keras.layers.Conv2D.call.
    y = halo.from_blocks(y, geometries, filters, [sample_axis] + axes + [channel_axis], mesh)
    if layer.use_bias:
        y = y + tf.reshape(tf.convert_to_tensor(layer.bias), [1] * (rank + 1) + [filters])
    if layer.activation is not None:
        y = layer.activation(y)
    return y


__all__ = ["HiddenConvRule", "HaloGeometry", "halo_geometry", "hidden_conv", "output_size"]
