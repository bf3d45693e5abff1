"""Hidden dimensions of pooling (rows, columns, channel; AveragePooling's sample) on DTensor meshes.

DTensor runs MaxPool and AvgPool batch-parallel or replicated only, and AvgPoolGrad has no layout
rule at all: run "replicated" under a batch split it returned one shard's gradient (docs/design.md). This
rule runs MaxPooling1D/2D and AveragePooling1D/2D (channels_last, 'valid' or 'same') split along
length/height/width, channel and sample from ops DTensor shards, moving only the halo:

1. Blocks, halos and windows as for convolutions (keras_lwp.layers.halo): each output block's input
   window, `(out_block - 1) * stride + pool` rows, with `pool - stride`-ish rows from the neighbours.
   The channels keep their split all the way (pooling is per channel: a channel split moves nothing).
2. The window's taps are strided slices of it, reduced one spatial axis at a time, the last axis
   first. Max: `tf.maximum` folded left to right, whose gradient goes to the first argument on a
   tie, so the gradient reaches the first maximum in row-major order, as MaxPoolGrad's does (after a
   ReLU, all-zero windows are common). 'same' padding adds the dtype's lowest value at the rows a
   window reads past the input (they hold the exchange's zeros), so padding never wins. Average:
   the taps' sum divided by the number of input rows the window covers (TensorFlow's 'same' average
   leaves the padding out of the count), a constant per block and output row.
3. The blocks merge back into the output, relaid explicitly to the configuration's layout.

Runnable and exact (tests/test_hidden_pooling.py), for any pool size and stride:
MaxPooling's sample split (DTensor's own MaxPool) and, through `hidden_pool`, every split of
channel and the spatial dims, and every split of AveragePooling including the sample (so AvgPoolGrad
never runs on a split). A spatial dim's DimSpec size is the gcd of its input and output extents, so
a split divides both: the input arrives already split, never all-gathered by the layer wrapper.
Its `halo` is what the exchange moves on the smallest split (keras_lwp.layers.halo). Left as the
builtin rule declares them (channels_first layers, 'causal' cannot occur): sample only.
"""

import dataclasses
import functools

import numpy as np

from keras_lwp.layers import halo
from keras_lwp.layers.base import DTENSOR, KERAS_LWP, register_rule
from keras_lwp.layers.builtin import SPATIAL_NAMES, PoolRule


@register_rule("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D")
class HiddenPoolRule(halo.WindowedSplits, PoolRule):
    """Pooling with its spatial and channel splits (and AveragePooling's sample) run by keras_lwp."""

    computes = "splits of channels_last 1-D/2-D pooling with 'valid' or 'same' padding"

    @staticmethod
    def average(info):
        return info.class_name.startswith("Average")

    def dimensions(self, info):
        dims = super().dimensions(info)
        if not self.supports(info):
            return dims
        by_name = {d.name: d for d in dims}
        # The builtin rule declares a spatial dim only when the stride divides the input; any extent runs here.
        return [dataclasses.replace(by_name["sample"], runs=KERAS_LWP if self.average(info) else DTENSOR),
                *self.spatial_dims(info, ()),
                dataclasses.replace(by_name["channel"], runs=KERAS_LWP)]

    def implementation(self, info, config):
        if not config or (set(config) == {"sample"} and not self.average(info)):
            return None  # replicated, or MaxPool split along the batch: DTensor runs the layer's own op
        self.check_supported(info, config)
        return hidden_pool


# -- the implementation ------------------------------------------------------------------------

def hidden_pool(layer, place, mesh, inputs, *args, **kwargs):
    """Max/AveragePooling1D/2D under `place.config` from ops DTensor shards (see the module doc)."""
    import tensorflow as tf

    config, x, window = halo.window_call(layer, place, inputs, args, kwargs)
    rank, pool, strides, padding = window.rank, window.size, window.strides, window.padding
    average = type(layer).__name__.startswith("Average")
    sample_axis = halo.fits(config.get("sample"), x.shape[0], mesh)
    channel_axis = halo.fits(config.get("channel"), x.shape[-1], mesh)
    axes, geometries = halo.window_splits(x, config, SPATIAL_NAMES[rank], pool, strides, (1,) * rank, padding, mesh)

    # 1. Blocks [N, P0, window0, (P1, window1,) C], each output block's input window.
    blocks, block_spec = halo.to_blocks(x, geometries, axes, sample_axis, channel_axis, mesh)
    blocks = halo.extend_blocks(blocks, geometries, axes, block_spec, mesh)
    rank_blocks = len(blocks.shape)
    if not average:
        # Rows past the input (the exchange's zeros): the lowest value, so padding never wins.
        lowest = tf.as_dtype(blocks.dtype).min
        for i, (a, g) in enumerate(zip(axes, geometries)):
            where = g.input_rows()
            outside = (where < 0) | (where >= g.extent)
            if outside.any():
                blocks = blocks + halo.rows_constant(np.where(outside, lowest, 0.0), rank_blocks, 1 + 2 * i, a, mesh,
                                                     blocks.dtype)

    # 2. The taps of each window, reduced one spatial axis at a time, the last axis first.
    for i in reversed(range(rank)):
        g = geometries[i]
        stop = (g.out_block - 1) * g.stride + 1
        taps = [halo.rows(blocks, 2 + 2 * i, t, t + stop, g.stride) for t in range(g.kernel)]
        blocks = tf.add_n(taps) if average else functools.reduce(tf.maximum, taps)
    if average:
        count = None
        for i, (a, g) in enumerate(zip(axes, geometries)):
            starts = g.window_starts()
            covered = np.minimum(starts + g.kernel, g.extent) - np.maximum(starts, 0)
            term = halo.rows_constant(covered.astype(np.float32), rank_blocks, 1 + 2 * i, a, mesh, blocks.dtype)
            count = term if count is None else count * term
        blocks = blocks / count

    # 3. Blocks back into the output.
    return halo.from_blocks(blocks, geometries, x.shape[-1], [sample_axis] + axes + [channel_axis], mesh)


__all__ = ["HiddenPoolRule", "hidden_pool"]
