"""Blocks and halos: the machinery behind keras_lwp's spatial splits of windowed layers.

DTensor shards a convolution or a pooling window along its batch only on CPU/GPU (halo exchange
only on TPU: docs/design.md, "Measured facts"). keras_lwp.layers.hidden (Conv1D/Conv2D) and
keras_lwp.layers.hidden_pooling (Max/AveragePooling1D/2D) split the spatial axes themselves, from
ops DTensor does shard, and move only the halo:

1. Blocks (`to_blocks`). Each split spatial axis S (P ways on a mesh axis) is reshaped to [P, S/P];
   the block axis keeps the mesh axis: [N, H, W, C] -> [N, Ph, H/Ph, Pw, W/Pw, C] laid out
   [n?, h?, -, w?, -, c?]. Block axes stay axes of their own: folded into the batch they would merge
   two split axes into one, which a DTensor layout cannot express (docs/design.md measured 4x redundant
   compute).
2. Halo exchange (`exchange_halo`), one spatial axis after the other (so corners come along). The
   rows other blocks need from a block (its last `left` and first `right` rows, one tensor) are
   relaid to replicated along the block axis: an all-gather of those rows only. A 0/1 shift matrix
   along the block axis gives each block its neighbour's rows (zeros past the ends: the window's
   zero padding); relaid back to the block split (a local slice) they are concatenated to the block
   along its local rows (a concatenation along the split block axis is refused). Windows reaching
   further than the neighbour block (tiny blocks) gather whole blocks and shift by several blocks.
   An axis that is not split is zero-padded in place: nothing moves.
3. Windows (`select_windows`). Each output block reads `window` rows of its extended block from its
   own offset. With 'same' or 'causal' padding and the stride dividing the extent the offset is the
   same for all blocks (a slice); with 'valid' padding it drifts block by block and each block picks
   its window with a 0/1 mask along the block axis (exact: x * 1 plus zeros). An extent the split
   does not divide ('valid' only) gets zero rows appended that no window reads.
4. The layer's own arithmetic on each block's window (the caller's), then `from_blocks` merges the
   blocks back ([Ph, H'/Ph] -> H', local) and relays the result out explicitly.

`HaloGeometry.halo` is what the exchange moves on one axis: `left + right` rows per block. DTensor's
all-gather hands every block's edge rows to every device on the axis, so on a P-way axis a device
receives (P - 1) times that (on CPU, DTensor's all-gather is an all-reduce of a zero-padded buffer of
the gathered size). The cost model prices it from the rule's DimSpec `halo`.

Every relayout goes through `relayout` (looked up on this module at call time), so a test or a
benchmark can record what crosses devices by patching that one name.
"""

import dataclasses
import math

import numpy as np

from keras_lwp import placement
from keras_lwp.layers.base import KERAS_LWP, DimSpec, no_extra_arguments, unsupported_split
from keras_lwp.layers.builtin import SPATIAL_NAMES, as_tuple, padding_of


@dataclasses.dataclass(frozen=True)
class HaloGeometry:
    """How one spatial axis of a windowed layer (convolution, pooling) splits into `parts` blocks.

    Attributes:
        extent: input size along the axis; `padded` the same rounded up to a multiple of `parts`
            (zero rows appended when `parts` does not divide it: no output window reaches them).
        out: output size; `block`, `out_block`: input / output rows per block.
        before: the window's zero padding before the first row.
        left, right: rows each block needs from the blocks before / after it.
        offsets: per block, where its first window starts in its extended block (left halo first).
        window: rows of the extended block its output block reads.
    """

    extent: int
    out: int
    parts: int
    kernel: int
    stride: int
    dilation: int
    before: int
    padded: int
    block: int
    out_block: int
    left: int
    right: int
    offsets: tuple
    window: int

    @property
    def uniform(self):
        return len(set(self.offsets)) == 1

    @property
    def halo(self):
        return self.left + self.right

    def input_rows(self):
        """[parts, window]: the input row each block's window row stands for (< 0 or >= extent: padding)."""
        return np.array([[b * self.out_block * self.stride - self.before + r for r in range(self.window)]
                         for b in range(self.parts)])

    def window_starts(self):
        """[parts, out_block]: the input row where each output row's window starts (< 0: padding)."""
        return np.array([[(b * self.out_block + o) * self.stride - self.before for o in range(self.out_block)]
                         for b in range(self.parts)])


def output_size(extent, kernel, stride, dilation, padding):
    """Output size and zero padding before the first row, as TensorFlow (and Keras) compute them."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        return (extent - span) // stride + 1, 0
    if padding == "same":
        out = -(-extent // stride)
        return out, max((out - 1) * stride + span - extent, 0) // 2
    if padding == "causal":
        return (extent - 1) // stride + 1, span - 1
    raise ValueError(f"Unsupported padding {padding!r}: expected 'valid', 'same' or 'causal'.")


def halo_geometry(extent, kernel, stride, dilation, padding, parts):
    """The HaloGeometry of one spatial axis split `parts` ways (its output must divide evenly)."""
    out, before = output_size(extent, kernel, stride, dilation, padding)
    if out < 1 or out % parts:
        raise ValueError(f"An output extent of {out} cannot be split into {parts} equal blocks.")
    padded = -(-extent // parts) * parts
    block, out_block = padded // parts, out // parts
    window = (out_block - 1) * stride + (kernel - 1) * dilation + 1
    starts = [b * (out_block * stride - block) - before for b in range(parts)]  # relative to the block
    left = max(0, -min(starts))
    right = max(0, max(starts) + window - block)
    return HaloGeometry(extent, out, parts, kernel, stride, dilation, before, padded, block, out_block,
                        left, right, tuple(s + left for s in starts), window)


def axis_size(mesh, axis):
    return int(mesh.dim_size(axis))


def layout(spec, mesh):
    return placement.layout(spec, mesh)


def relayout(tensor, spec, mesh):
    return placement.relayout(tensor, spec, mesh)


def block_constant(values, rank, position, axis, mesh, dtype):
    """A tensor of `rank` dims, `values` along dim `position` (split on `axis`), 1 elsewhere."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    shape = [1] * rank
    shape[position] = len(values)
    array = np.asarray(values, dtype=np.float32).reshape(shape)
    tensor = dtensor.copy_to_mesh(tf.constant(array, dtype=dtype), dtensor.Layout.replicated(mesh, rank))
    spec = [None] * rank
    spec[position] = axis
    return relayout(tensor, spec, mesh)


def shift_blocks(gathered, hop, block_dim, mesh):
    """`gathered` (replicated along its block dim) with block b holding block b - hop, zeros where
    there is none (the window's zero padding). A product with a 0/1 shift matrix (exact), not
    a concatenation along the block dim: DTensor's layout propagation may split that dim there, and
    a concatenation along a split dim is refused."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    parts = gathered.shape[block_dim]
    shift = np.eye(parts, k=hop, dtype=np.float32)  # shift[b, c] = 1 where c = b + hop
    shift = dtensor.copy_to_mesh(tf.constant(shift, dtype=gathered.dtype), dtensor.Layout.replicated(mesh, 2))
    letters = "abcefghijklm"[:len(gathered.shape)]
    source = letters
    target = letters[:block_dim] + "z" + letters[block_dim + 1:]
    return tf.einsum(f"{source},{letters[block_dim]}z->{target}", gathered, shift)


def rows(tensor, dim, start, stop, step=1):
    """tensor[..., start:stop:step, ...] along `dim` (0 <= start), from Slice and Reshape, whose
    gradients are a Pad and a Reshape: a strided slice's gradient (StridedSliceGrad) ran about 4 ms per
    call on 8 logical CPUs for a 3x3 convolution's tap of a few hundred thousand numbers, 10x the
    layer's matmul. Every `step`-th row: the rows padded to whole groups of `step`, reshaped
    [count, step], the first of each group kept."""
    import tensorflow as tf

    rank, size = len(tensor.shape), tensor.shape[dim]
    count = len(range(start, min(stop, size), step))
    begin, extent = [0] * rank, [-1] * rank
    begin[dim], extent[dim] = min(start, size), max(0, min(count * step, size - start))
    piece = tf.slice(tensor, begin, extent)
    if step == 1 or count == 0:
        return piece
    short = count * step - extent[dim]
    if short:
        piece = tf.pad(piece, [[0, short if d == dim else 0] for d in range(rank)])
    shape = [d if d is not None else tf.shape(piece)[i] for i, d in enumerate(piece.shape)]
    grouped = tf.reshape(piece, shape[:dim] + [count, step] + shape[dim + 1:])
    begin, extent = [0] * (rank + 1), [-1] * (rank + 1)
    extent[dim + 1] = 1
    return tf.reshape(tf.slice(grouped, begin, extent), shape[:dim] + [count] + shape[dim + 1:])


def exchange_halo(blocks, geometry, block_dim, spec, mesh):
    """Extend every block (axis `block_dim`, its rows on `block_dim + 1`) by `geometry.left` rows of
    the blocks before it and `geometry.right` rows of the blocks after it. `spec` is the blocks'
    layout. Only those rows cross devices: all-gathered along the block axis, shifted, sliced back."""
    import tensorflow as tf

    left, right, size = geometry.left, geometry.right, geometry.block
    row_dim = block_dim + 1
    if not left and not right:
        return blocks
    if geometry.parts == 1:  # the axis is not split: its zero padding, in place (nothing moves)
        paddings = [[0, 0] for _ in blocks.shape]
        paddings[row_dim] = [left, right]
        return relayout(tf.pad(blocks, paddings), spec, mesh)
    gathered_spec = list(spec)
    gathered_spec[block_dim] = None
    if left > size or right > size:
        # Windows reaching past the neighbour block (tiny blocks): bring whole blocks.
        edge_left = edge_right = relayout(blocks, gathered_spec, mesh)
        tail_rows = head_rows = size
    else:
        # One all-gather of the rows others need from this block: its last `left`, first `right` rows.
        pieces = ([rows(blocks, row_dim, size - left, size)] if left else []) + (
            [rows(blocks, row_dim, 0, right)] if right else [])
        edges = relayout(tf.concat(pieces, axis=row_dim) if len(pieces) > 1 else pieces[0], gathered_spec, mesh)
        edge_left = rows(edges, row_dim, 0, left)
        edge_right = rows(edges, row_dim, left, left + right)
        tail_rows, head_rows = left, right
    parts = []
    if left:
        hops = -(-left // tail_rows)
        shifted = [relayout(shift_blocks(edge_left, hop, block_dim, mesh), gathered_spec, mesh)
                   for hop in range(hops, 0, -1)]
        halo = tf.concat(shifted, axis=row_dim) if hops > 1 else shifted[0]
        halo = rows(halo, row_dim, halo.shape[row_dim] - left, halo.shape[row_dim])
        parts.append(relayout(halo, spec, mesh))
    parts.append(blocks)
    if right:
        hops = -(-right // head_rows)
        shifted = [relayout(shift_blocks(edge_right, -hop, block_dim, mesh), gathered_spec, mesh)
                   for hop in range(1, hops + 1)]
        halo = tf.concat(shifted, axis=row_dim) if hops > 1 else shifted[0]
        parts.append(relayout(rows(halo, row_dim, 0, right), spec, mesh))
    return relayout(tf.concat(parts, axis=row_dim), spec, mesh)


def select_windows(extended, geometry, block_dim, axis, mesh):
    """Each block's `geometry.window` rows, starting at its own offset: a slice when every block starts
    at the same offset, else a sum of slices masked by block (exact)."""
    row_dim = block_dim + 1
    if geometry.uniform:
        start = geometry.offsets[0]
        return rows(extended, row_dim, start, start + geometry.window)
    total = None
    for start in sorted(set(geometry.offsets)):
        mask = block_constant([1.0 if o == start else 0.0 for o in geometry.offsets], len(extended.shape),
                               block_dim, axis, mesh, extended.dtype)
        term = rows(extended, row_dim, start, start + geometry.window) * mask
        total = term if total is None else total + term
    return total


def fits(axis, size, mesh):
    """`axis` if it splits a dimension of `size` evenly (a partial batch may not), else None."""
    if axis is None or size is None:
        return axis
    return axis if size % axis_size(mesh, axis) == 0 else None


def rows_constant(values, rank, block_dim, axis, mesh, dtype):
    """A tensor of `rank` dims holding the 2-D `values` [blocks, rows] on dims (`block_dim`,
    `block_dim + 1`), the block dim split on `axis`, 1 elsewhere (a per-block, per-row factor)."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    values = np.asarray(values)
    shape = [1] * rank
    shape[block_dim], shape[block_dim + 1] = values.shape
    tensor = dtensor.copy_to_mesh(tf.constant(values.reshape(shape), dtype=dtype), dtensor.Layout.replicated(mesh, rank))
    spec = [None] * rank
    spec[block_dim] = axis
    return relayout(tensor, spec, mesh)


def to_blocks(x, geometries, axes, sample_axis, channel_axis, mesh):
    """`x` [N, S0, (S1,) C] as blocks [N, P0, S0/P0, (P1, S1/P1,) C], each block dim on its mesh axis
    (`axes`, None for an axis not split), the batch on `sample_axis`, channels on `channel_axis`.
    Returns the blocks and their layout."""
    import tensorflow as tf

    batch, channels = x.shape[0], x.shape[-1]
    flat_spec = [sample_axis] + [a if g.padded == g.extent else None for a, g in zip(axes, geometries)]
    flat_spec.append(channel_axis)
    x = relayout(x, flat_spec, mesh)
    if any(g.padded != g.extent for g in geometries):
        # An extent the split does not divide ('valid' padding only): zero rows no window reads.
        x = tf.pad(x, [[0, 0]] + [[0, g.padded - g.extent] for g in geometries] + [[0, 0]])
        # Pinned like its input first: DTensor pads only without a change of layout.
        x = relayout(relayout(x, flat_spec, mesh), [sample_axis] + list(axes) + [channel_axis], mesh)
    block_shape = [-1 if batch is None else batch]
    block_spec = [sample_axis]
    for a, g in zip(axes, geometries):
        block_shape += [g.parts, g.block]
        block_spec += [a, None]
    block_shape.append(channels)
    block_spec.append(channel_axis)
    return relayout(tf.reshape(x, block_shape), block_spec, mesh), block_spec


def extend_blocks(blocks, geometries, axes, block_spec, mesh, lead=0):
    """Halos, then each output block's input window, one spatial axis after the other: the split axes
    first, in order (the second exchange carries the first one's halo rows: corners), then the axes
    not split, padded in place (so no exchange carries their padding). `lead` counts dims in front of
    the batch (none by default)."""
    order = [i for i, g in enumerate(geometries) if g.parts > 1] + [i for i, g in enumerate(geometries) if g.parts == 1]
    for i in order:
        blocks = exchange_halo(blocks, geometries[i], lead + 1 + 2 * i, block_spec, mesh)
        blocks = select_windows(blocks, geometries[i], lead + 1 + 2 * i, axes[i], mesh)
    return blocks


def from_blocks(y, geometries, channels, out_spec, mesh):
    """Output blocks [N, P0, S0'/P0, (P1, S1'/P1,) C...] merged into [N, S0', (S1',) channels], laid out
    `out_spec`."""
    import tensorflow as tf

    batch = y.shape[0]
    y = tf.reshape(y, [-1 if batch is None else batch] + [g.out for g in geometries] + [channels])
    return relayout(y, out_spec, mesh)



def smallest_split(size):
    """The smallest number of parts (> 1) that divides `size`, or 1."""
    return next((p for p in range(2, size + 1) if size % p == 0), 1)


def windowed_dim(name, axis, x, y, window, stride, dilation, padding, weights):
    """The DimSpec of spatial dimension `name` (tensor axis `axis`) of a windowed layer keras_lwp
    computes (pooling, depthwise convolution), input `x`, output `y`: its size is the gcd of the input
    and output extents, so a split divides both (the input arrives split, never all-gathered), and
    its halo is what the exchange moves on the smallest split."""
    size = math.gcd(x.shape[axis], y.shape[axis])
    parts = smallest_split(size)
    rows = halo_geometry(x.shape[axis], window, stride, dilation, padding, parts).halo if parts > 1 else 0
    return DimSpec(name=name, size=size, output=axis, inputs=(axis,), weights=weights, halo=rows, runs=KERAS_LWP)



def window_splits(x, config, names, window, strides, dilation, padding, mesh):
    """(mesh axis or None, HaloGeometry) per spatial dimension `names` of `x` (channels_last) under
    `config`, for a windowed layer keras_lwp computes. A split that this call's shapes do not divide
    (input and output: not the planned shapes) stays whole."""
    axes = []
    for i, name in enumerate(names):
        out = output_size(x.shape[1 + i], window[i], strides[i], dilation[i], padding)[0]
        axes.append(fits(fits(config.get(name), out, mesh), x.shape[1 + i], mesh))
    geometries = [halo_geometry(x.shape[1 + i], window[i], strides[i], dilation[i], padding,
                                axis_size(mesh, a) if a else 1) for i, a in enumerate(axes)]
    return axes, geometries




@dataclasses.dataclass(frozen=True)
class Window:
    """A windowed layer's call, as its implementation needs it: one value per spatial dimension."""

    rank: int  # spatial dimensions
    size: tuple  # kernel_size or pool_size
    strides: tuple
    dilation: tuple
    padding: str  # lower case


def window_call(layer, place, inputs, args, kwargs):
    """(configuration, input, Window) of a call of a Conv, DepthwiseConv or Pooling layer's
    implementation on channels_last `inputs`; it takes the inputs only."""
    no_extra_arguments(layer, args, kwargs)
    rank = len(inputs.shape) - 2
    size = layer.kernel_size if hasattr(layer, "kernel_size") else layer.pool_size
    window = Window(rank, as_tuple(size, rank), as_tuple(layer.strides, rank),
                    as_tuple(getattr(layer, "dilation_rate", 1), rank), str(layer.padding).lower())
    return place.config, inputs, window


class WindowedSplits:
    """Mixin of the rules whose splits keras_lwp computes here for channels_last 1-D/2-D windowed layers
    with 'valid' or 'same' padding (pooling, depthwise convolution): which layers, and the error for
    the others. `computes` says what, for the error."""

    computes = "splits of channels_last 1-D/2-D windowed layers with 'valid' or 'same' padding"

    def supports(self, info):
        """Whether this rule's implementation computes the layer's splits exactly."""
        return (info.config.get("data_format", "channels_last") == "channels_last"
                and padding_of(info) in ("valid", "same")
                and len(info.output.shape) - 2 in (1, 2))

    def spatial_dims(self, info, weights):
        """The layer's spatial DimSpecs, each computed by keras_lwp (`windowed_dim`); `weights` per weight."""
        x, y = info.inputs[0], info.output
        window, strides, dilation = self.window(info)
        return [windowed_dim(name, 1 + i, x, y, window[i], strides[i], dilation[i], padding_of(info), weights)
                for i, name in enumerate(SPATIAL_NAMES[len(y.shape) - 2])]

    def check_supported(self, info, config):
        if not self.supports(info):
            raise unsupported_split(info, config, f"{info.config.get('data_format')}, padding={padding_of(info)!r}",
                                    self.computes)


__all__ = [
    "HaloGeometry", "Window", "WindowedSplits", "axis_size", "block_constant", "exchange_halo", "extend_blocks", "fits", "from_blocks",
    "halo_geometry", "layout", "output_size", "relayout", "rows", "rows_constant", "select_windows", "shift_blocks",
    "smallest_split", "to_blocks", "window_call", "window_splits", "windowed_dim",
]
