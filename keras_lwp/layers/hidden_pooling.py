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

Runnable (`native=True`) and exact (tests/test_hidden_pooling.py), for any pool size and stride:
MaxPooling's sample split (DTensor's own MaxPool) and, through `hidden_pool`, every split of
channel and the spatial dims, and every split of AveragePooling including the sample (so AvgPoolGrad
never runs on a split). A spatial dim's DimSpec size is the gcd of its input and output extents, so
a split divides both: the input arrives already split, never all-gathered by the layer wrapper.
Its `halo` is what the exchange moves on the smallest split (keras_lwp.layers.halo). Left as the
builtin rule declares them (channels_first layers, 'causal' cannot occur): sample only.
"""

import dataclasses
import functools
import math

import numpy as np

from keras_lwp.layers import halo
from keras_lwp.layers.base import DimSpec, register_rule
from keras_lwp.layers.builtin import SPATIAL_NAMES, PoolRule, _tuple
from keras_lwp.layers.halo import halo_geometry, output_size


def _padding(info):
    return str(info.config.get("padding", "valid")).lower()


def _smallest_split(size):
    """The smallest number of parts (> 1) that divides `size`, or 1."""
    return next((p for p in range(2, size + 1) if size % p == 0), 1)


@register_rule("MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D")
class HiddenPoolRule(PoolRule):
    """Pooling with its spatial and channel splits (and AveragePooling's sample) run by keras_lwp."""

    def supports(self, info):
        """Whether `hidden_pool` computes this layer's splits exactly."""
        return (info.config.get("data_format", "channels_last") == "channels_last"
                and _padding(info) in ("valid", "same") and len(info.output.shape) - 2 in (1, 2))

    @staticmethod
    def average(info):
        return info.class_name.startswith("Average")

    def dimensions(self, info):
        dims = super().dimensions(info)
        if not self.supports(info):
            return dims
        x, y = info.inputs[0], info.output
        rank = len(y.shape) - 2
        pool, strides, _ = self.window(info)
        by_name = {d.name: d for d in dims}
        result = [dataclasses.replace(by_name["sample"], native=True, implemented=self.average(info))]
        for i, name in enumerate(SPATIAL_NAMES[rank]):
            # A split must divide the output (its blocks) and the input (so it arrives split).
            size = math.gcd(x.shape[1 + i], y.shape[1 + i])
            parts = _smallest_split(size)
            rows = halo_geometry(x.shape[1 + i], pool[i], strides[i], 1, _padding(info), parts).halo if parts > 1 else 0
            # The builtin rule declares it only when the stride divides the input; any extent runs here.
            result.append(DimSpec(name, size, 1 + i, (1 + i,), (), halo=rows, native=True, implemented=True))
        result.append(dataclasses.replace(by_name["channel"], native=True, implemented=True))
        return result

    def implementation(self, info, config):
        if not config or (set(config) == {"sample"} and not self.average(info)):
            return None  # replicated, or MaxPool split along the batch: DTensor runs the layer's own op
        if not self.supports(info):
            raise ValueError(
                f"Layer '{info.name}' ({info.class_name}, {info.config.get('data_format')}, padding="
                f"{_padding(info)!r}) cannot be split along {', '.join(config)} on DTensor: keras_lwp "
                "computes splits of channels_last 1-D/2-D pooling with 'valid' or 'same' padding. "
                "Plan it within the runnable space."
            )
        return hidden_pool


# -- the implementation ------------------------------------------------------------------------

def hidden_pool(layer, place, mesh, inputs, *args, **kwargs):
    """Max/AveragePooling1D/2D under `place.config` from ops DTensor shards (see the module doc)."""
    import tensorflow as tf

    if args or kwargs:
        raise TypeError(f"Layer '{layer.name}': unexpected call arguments {args} {kwargs}")
    config = place.config
    x = inputs
    rank = len(x.shape) - 2
    pool = _tuple(layer.pool_size, rank)
    strides = _tuple(layer.strides, rank)
    padding = str(layer.padding).lower()
    average = type(layer).__name__.startswith("Average")
    sample_axis = halo.fits(config.get("sample"), x.shape[0], mesh)
    channel_axis = halo.fits(config.get("channel"), x.shape[-1], mesh)
    axes = []
    for i, name in enumerate(SPATIAL_NAMES[rank]):
        # A split this call's shapes do not divide (not the planned ones) stays whole.
        out = output_size(x.shape[1 + i], pool[i], strides[i], 1, padding)[0]
        axes.append(halo.fits(halo.fits(config.get(name), out, mesh), x.shape[1 + i], mesh))
    geometries = [halo_geometry(x.shape[1 + i], pool[i], strides[i], 1, padding,
                                halo.axis_size(mesh, a) if a else 1) for i, a in enumerate(axes)]

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
