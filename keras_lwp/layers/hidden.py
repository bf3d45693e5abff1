"""The paper's hidden dimensions of convolutions (channel, rows, columns) on CPU/GPU DTensor meshes.

DTensor shards a convolution along its batch only on CPU/GPU (replicated filters; halo exchange only
on TPU; the backprop ops batch-parallel only: DESIGN.md, "Measured facts"). This rule runs Conv1D and
Conv2D (channels_last) split along channel and spatial dims from ops DTensor does shard, and moves
only the halo:

1. Blocks. Each split spatial axis S (P ways on a mesh axis) is reshaped to [P, S/P]; the block axis
   keeps the mesh axis: [N, H, W, C] -> [N, Ph, H/Ph, Pw, W/Pw, C] laid out [n?, h?, -, w?, -, -].
   Block axes stay axes of their own: folded into the batch they would merge two split axes into
   one, which a DTensor layout cannot express (DESIGN.md measured 4x redundant compute).
2. Halo exchange, one spatial axis after the other (so corners come along). The rows other blocks
   need from a block (its last `left` and first `right` rows, one tensor) are relaid to replicated
   along the block axis: an all-gather of those rows only. A 0/1 shift matrix along the block axis
   gives each block its neighbour's rows (zeros past the ends: the convolution's zero padding);
   relaid back to the block split (a local slice) they are concatenated to the block along its
   local rows (a concatenation along the split block axis is refused). Windows reaching further
   than the neighbour block (tiny blocks) gather whole blocks and shift by several blocks.
3. Windows. Each output block reads `window` rows of its extended block from its own offset. With
   'same' or 'causal' padding and the stride dividing the extent the offset is the same for all
   blocks (a slice); with 'valid' padding it drifts block by block and each block picks its window
   with a 0/1 mask along the block axis (exact: x * 1 plus zeros). An extent the split does not
   divide ('valid' only) gets zero rows appended that no window reads.
4. Matmul. The kernel taps' strided rows are gathered along the channel axis (im2col, one spatial
   axis at a time: k0 + k1 slices) and multiplied by the kernel, `einsum("...k,kd->...d")`. Under a
   channel (output filter) split the kernel keeps its out-channel split and the windows get a
   leading axis of the split's size (a product with ones laid out on it), so the input gradient is
   summed over the channel split once, not once per tap.
5. Output. The blocks merge back ([Ph, H'/Ph] -> H', local), bias and activation follow as in
   keras.layers.Conv2D.call, and the result is relaid explicitly to the configuration's output layout
   (DTensor's propagation drops an out-channel split otherwise).

Runnable (`native=True`) and exact (tests/test_hidden_conv.py): sample, channel (groups == 1, as the
builtin rule declares it), and length/height/width for groups == 1 under 'same', 'valid' or 'causal'
padding with any kernel size, stride and dilation, alone or combined on the mesh axes. Left
non-native (planned only with space="full"): spatial splits of grouped convolutions. channels_first
layers keep the builtin rule's sample-only space.

The DimSpec `halo` is what the exchange moves on a 2-way split: `left + right` rows per block
(`halo_geometry`). DTensor's all-gather hands every block's edge rows to every device on the axis,
so on a P-way axis a device receives (P - 1) times that (on CPU, DTensor's all-gather is an
all-reduce of a zero-padded buffer of the gathered size).
"""

import dataclasses
import math

import numpy as np

from keras_lwp.layers.base import register_rule
from keras_lwp.layers.builtin import SPATIAL_NAMES, ConvRule, _tuple


@dataclasses.dataclass(frozen=True)
class HaloGeometry:
    """How one spatial axis of a convolution splits into `parts` blocks.

    Attributes:
        extent: input size along the axis; `padded` the same rounded up to a multiple of `parts`
            (zero rows appended when `parts` does not divide it: no output window reaches them).
        out: output size; `block`, `out_block`: input / output rows per block.
        before: the convolution's zero padding before the first row.
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
    raise ValueError(f"Unsupported convolution padding {padding!r}: expected 'valid', 'same' or 'causal'.")


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


def _padding(info):
    return str(info.config.get("padding", "valid")).lower()


@register_rule("Conv1D", "Conv2D")
class HiddenConvRule(ConvRule):
    """Conv1D/Conv2D with the channel and spatial splits run by keras_lwp (see the module doc)."""

    def supports(self, info, name):
        """Whether this rule computes dimension `name` of the layer exactly."""
        if info.config.get("data_format", "channels_last") != "channels_last":
            return name == "sample"
        if name in ("sample", "channel"):
            return True
        return info.config.get("groups", 1) == 1 and _padding(info) in ("valid", "same", "causal")

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
                                                _padding(info), parts).halo if parts == 2 else d.halo
            if not d.native and self.supports(info, d.name):
                changes["native"] = changes["implemented"] = True
            result.append(dataclasses.replace(d, **changes) if changes else d)
        return result

    def implementation(self, info, config):
        hidden = [d for d in config if d != "sample"]
        if not hidden:
            return None  # a batch split: DTensor runs the layer's own convolution
        refused = [d for d in hidden if not self.supports(info, d)]
        if refused:
            raise ValueError(
                f"Layer '{info.name}' ({info.class_name}, {info.config.get('data_format')}, groups="
                f"{info.config.get('groups', 1)}, padding={_padding(info)!r}) cannot be split along "
                f"{', '.join(refused)} on DTensor: keras_lwp computes channel and spatial splits of "
                "channels_last convolutions (spatial ones for groups == 1 only). Plan it within the "
                "runnable space."
            )
        return hidden_conv


# -- the implementation ------------------------------------------------------------------------

def _axis_size(mesh, axis):
    return int(mesh.dim_size(axis))


def _layout(spec, mesh):
    from tensorflow.experimental import dtensor

    return dtensor.Layout([dtensor.UNSHARDED if a is None else a for a in spec], mesh)


def _relayout(tensor, spec, mesh):
    from tensorflow.experimental import dtensor

    return dtensor.relayout(tensor, _layout(spec, mesh))


def _block_constant(values, rank, position, axis, mesh, dtype):
    """A tensor of `rank` dims, `values` along dim `position` (split on `axis`), 1 elsewhere."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    shape = [1] * rank
    shape[position] = len(values)
    array = np.asarray(values, dtype=np.float32).reshape(shape)
    tensor = dtensor.copy_to_mesh(tf.constant(array, dtype=dtype), dtensor.Layout.replicated(mesh, rank))
    spec = [None] * rank
    spec[position] = axis
    return _relayout(tensor, spec, mesh)


def _shift_blocks(gathered, hop, block_dim, mesh):
    """`gathered` (replicated along its block dim) with block b holding block b - hop, zeros where
    there is none (the convolution's zero padding). A product with a 0/1 shift matrix (exact), not
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


def _rows(tensor, dim, start, stop, step=1):
    index = [slice(None)] * len(tensor.shape)
    index[dim] = slice(start, stop, step)
    return tensor[tuple(index)]


def exchange_halo(blocks, geometry, block_dim, spec, mesh):
    """Extend every block (axis `block_dim`, its rows on `block_dim + 1`) by `geometry.left` rows of
    the blocks before it and `geometry.right` rows of the blocks after it. `spec` is the blocks'
    layout. Only those rows cross devices: all-gathered along the block axis, shifted, sliced back."""
    import tensorflow as tf

    left, right, size = geometry.left, geometry.right, geometry.block
    rows = block_dim + 1
    if not left and not right:
        return blocks
    gathered_spec = list(spec)
    gathered_spec[block_dim] = None
    if left > size or right > size:
        # Windows reaching past the neighbour block (tiny blocks): bring whole blocks.
        edge_left = edge_right = _relayout(blocks, gathered_spec, mesh)
        tail_rows = head_rows = size
    else:
        # One all-gather of the rows others need from this block: its last `left`, first `right` rows.
        pieces = ([_rows(blocks, rows, size - left, size)] if left else []) + (
            [_rows(blocks, rows, 0, right)] if right else [])
        edges = _relayout(tf.concat(pieces, axis=rows) if len(pieces) > 1 else pieces[0], gathered_spec, mesh)
        edge_left = _rows(edges, rows, 0, left)
        edge_right = _rows(edges, rows, left, left + right)
        tail_rows, head_rows = left, right
    parts = []
    if left:
        hops = -(-left // tail_rows)
        shifted = [_shift_blocks(edge_left, hop, block_dim, mesh) for hop in range(hops, 0, -1)]
        halo = tf.concat(shifted, axis=rows) if hops > 1 else shifted[0]
        halo = _rows(halo, rows, halo.shape[rows] - left, halo.shape[rows])
        parts.append(_relayout(halo, spec, mesh))
    parts.append(blocks)
    if right:
        hops = -(-right // head_rows)
        shifted = [_shift_blocks(edge_right, -hop, block_dim, mesh) for hop in range(1, hops + 1)]
        halo = tf.concat(shifted, axis=rows) if hops > 1 else shifted[0]
        parts.append(_relayout(_rows(halo, rows, 0, right), spec, mesh))
    return _relayout(tf.concat(parts, axis=rows), spec, mesh)


def select_windows(extended, geometry, block_dim, axis, mesh):
    """Each block's `geometry.window` rows, starting at its own offset: a slice when every block starts
    at the same offset, else a sum of slices masked by block (exact)."""
    rows = block_dim + 1
    if geometry.uniform:
        start = geometry.offsets[0]
        return _rows(extended, rows, start, start + geometry.window)
    total = None
    for start in sorted(set(geometry.offsets)):
        mask = _block_constant([1.0 if o == start else 0.0 for o in geometry.offsets], len(extended.shape),
                               block_dim, axis, mesh, extended.dtype)
        term = _rows(extended, rows, start, start + geometry.window) * mask
        total = term if total is None else total + term
    return total


def _fits(axis, size, mesh):
    """`axis` if it splits a dimension of `size` evenly (a partial batch may not), else None."""
    if axis is None or size is None:
        return axis
    return axis if size % _axis_size(mesh, axis) == 0 else None


def hidden_conv(layer, place, mesh, inputs, *args, **kwargs):
    """Conv1D/Conv2D under `place.config` (channel and/or spatial splits) from ops DTensor shards."""
    import tensorflow as tf

    if args or kwargs:
        raise TypeError(f"Layer '{layer.name}': unexpected call arguments {args} {kwargs}")
    config = place.config
    x = inputs
    rank = len(x.shape) - 2
    spatial = SPATIAL_NAMES[rank]
    batch = x.shape[0]
    channels = x.shape[-1]
    kernel_size = _tuple(layer.kernel_size, rank)
    strides = _tuple(layer.strides, rank)
    dilation = _tuple(layer.dilation_rate, rank)
    padding = str(layer.padding).lower()
    sample_axis = _fits(config.get("sample"), batch, mesh)
    channel_axis = config.get("channel")
    axes = [config.get(name) for name in spatial]
    # A spatial split whose output this call's shapes do not divide (not the planned ones) stays whole.
    axes = [_fits(a, output_size(x.shape[1 + i], kernel_size[i], strides[i], dilation[i], padding)[0], mesh)
            for i, a in enumerate(axes)]
    geometries = [halo_geometry(x.shape[1 + i], kernel_size[i], strides[i], dilation[i], padding,
                                _axis_size(mesh, a) if a else 1) for i, a in enumerate(axes)]

    # 1. The input split into blocks: [N, P0, S0/P0, (P1, S1/P1,) C], block dims keeping the mesh axes.
    flat_spec = [sample_axis] + [a if g.padded == g.extent else None for a, g in zip(axes, geometries)] + [None]
    x = _relayout(x, flat_spec, mesh)
    if any(g.padded != g.extent for g in geometries):
        # An extent the split does not divide ('valid' padding only): zero rows no window reads.
        x = tf.pad(x, [[0, 0]] + [[0, g.padded - g.extent] for g in geometries] + [[0, 0]])
        # Pinned like its input first: DTensor pads only without a change of layout.
        x = _relayout(_relayout(x, flat_spec, mesh), [sample_axis] + axes + [None], mesh)
    block_shape = [-1 if batch is None else batch]
    block_spec = [sample_axis]
    for a, g in zip(axes, geometries):
        block_shape += [g.parts, g.block]
        block_spec += [a, None]
    block_shape.append(channels)
    block_spec.append(None)
    blocks = _relayout(tf.reshape(x, block_shape), block_spec, mesh)

    # 2-3. Halos, then each output block's input window, one spatial axis after the other.
    for i, (a, g) in enumerate(zip(axes, geometries)):
        blocks = exchange_halo(blocks, g, 1 + 2 * i, block_spec, mesh)
        blocks = select_windows(blocks, g, 1 + 2 * i, a, mesh)

    # 4. An axis for the channel split (ones laid out on it), so the input gradient sums over it once.
    #    It leads (a batch axis of the matmul), so no operand is transposed.
    kernel = tf.convert_to_tensor(layer.kernel)
    filters = kernel.shape[-1]
    if rank > 1:  # taps ordered like the patches below: the last spatial axis outermost
        kernel = tf.transpose(kernel, list(range(rank))[::-1] + [rank, rank + 1])
    taps = math.prod(kernel_size)
    lead = 0
    if channel_axis is not None:
        channel_parts = _axis_size(mesh, channel_axis)
        kernel = tf.reshape(kernel, [taps * channels, channel_parts, filters // channel_parts])
        kernel = _relayout(tf.transpose(kernel, [1, 0, 2]), [channel_axis, None, None], mesh)
        ones = tf.ones_like(kernel[:, :1, :1])  # [parts, 1, 1], split on the channel axis
        blocks = tf.expand_dims(blocks, 0) * tf.reshape(ones, [channel_parts] + [1] * len(blocks.shape))
        blocks = _relayout(blocks, [channel_axis] + block_spec, mesh)
        lead = 1
    else:
        kernel = _relayout(tf.reshape(kernel, [taps * channels, filters]), [None, None], mesh)

    # im2col, one spatial axis at a time (k0 + k1 slices, not k0 * k1): each tap's strided rows of
    # every block go along the channel axis, the later axis' taps outermost.
    patches = blocks
    for i, g in enumerate(geometries):
        stop = (g.out_block - 1) * g.stride + 1
        taps_i = [_rows(patches, lead + 2 + 2 * i, t * g.dilation, t * g.dilation + stop, g.stride)
                  for t in range(g.kernel)]
        patches = tf.concat(taps_i, axis=-1) if len(taps_i) > 1 else taps_i[0]
    letters = "abefghij"[:2 * rank]
    if channel_axis is not None:
        y = tf.einsum(f"pn{letters}k,pkd->pn{letters}d", patches, kernel)
        y = _relayout(y, [channel_axis] + block_spec, mesh)
        y = tf.transpose(y, list(range(1, 2 * rank + 2)) + [0, 2 * rank + 2])  # [N, blocks..., parts, D/parts]
        y = _relayout(y, block_spec[:-1] + [channel_axis, None], mesh)
    else:
        y = tf.einsum(f"n{letters}k,kd->n{letters}d", patches, kernel)
        y = _relayout(y, block_spec, mesh)

    # 5. Blocks back into the output, bias and activation as keras.layers.Conv2D.call.
    out_spec = [sample_axis] + axes + [channel_axis]
    y = tf.reshape(y, [-1 if batch is None else batch] + [g.out for g in geometries] + [filters])
    y = _relayout(y, out_spec, mesh)
    if layer.use_bias:
        y = y + tf.reshape(tf.convert_to_tensor(layer.bias), [1] * (rank + 1) + [filters])
    if layer.activation is not None:
        y = layer.activation(y)
    return y


__all__ = ["HiddenConvRule", "HaloGeometry", "halo_geometry", "hidden_conv", "output_size"]
