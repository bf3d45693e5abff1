"""Ops TensorFlow DTensor cannot run, or runs wrong, computed from ops it runs while a parallelized
step is traced (`ops_dtensor_runs`): Keras' TensorFlow backend functions that keras.ops call by
attribute are swapped for the time of the trace (keras_internals lists them), and so is
`tf.Tensor.__getitem__`. Each rewrite computes what the original computes (tests/test_ops_dtensor_runs.py
against the originals with gradients, tests/test_same_numbers.py on the mesh); anything a rewrite does
not cover goes to the original.
"""

import contextlib

import numpy as np

from keras_lwp import keras_internals


@contextlib.contextmanager
def ops_dtensor_runs():
    """While a parallelized step is traced, ops whose TensorFlow form DTensor cannot run are computed
    from ops it runs, to the same numbers (in layers that run their own call: keras_hub's HGNetV2 and
    Swin Transformer blocks, any user's layer, dilated convolutions; and in the loss):

    - a grouped convolution (keras.ops.conv), which Keras compiles with XLA on CPU; DTensor runs the
      compiled function's ops without XLA, and TensorFlow's CPU kernels give wrong gradients with no
      error. It runs as one depthwise convolution when each group has one input channel, else as one
      convolution per group, concatenated. (Conv1D/Conv2D layers keras_lwp places itself run
      `keras_lwp.layers.hidden`'s implementation instead.)
    - a dilated convolution (keras.ops.conv, depthwise_conv, separable_conv): TensorFlow computes it
      through SpaceToBatchND, which DTensor has no layout rule for (the CPU kernels have no dilated
      gradients, or no dilations at all). It runs from the input's windows, one per kernel tap: one
      matmul for a convolution, a weighted sum for a depthwise one.
    - keras.ops.roll (Roll: DTensor has no layout rule for it): a gather of the rolled positions (not
      slices concatenated: DTensor refuses a concat along a split dimension); keras.ops.flip
      (ReverseV2: none either): a slice with step -1.
    - keras.ops.tril and triu (MatrixBandPart: no layout rule): a select with a constant mask.
    - keras.ops.top_k's gradient: TensorFlow's scatters into flat indices it numbers with a range,
      which DTensor laid out wrongly on a batch-split input, silently (a Mixtral-style router trained
      1e-2 away from one device). Here each value's gradient returns through a one-hot product.
    - keras.ops.slice_update at a start known when traced (XlaDynamicUpdateSlice, which crashed the
      process): the update padded to the input's shape, selected where it lands.
    - keras.ops.fori_loop, scan and map over a number of steps known when traced (at most
      MAX_UNROLLED_STEPS): TensorFlow runs them as a while loop whose gradient, and scan's and map's
      TensorArrays, are TensorLists, which DTensor cannot run. They run unrolled: the same body on
      the same values, step after step, the steps' outputs stacked.
    - keras.ops.cumprod (Cumprod: no layout rule): products over doubling distances (log2 n
      multiplies of the tensor by its shifted self), the same products in another order;
      keras.ops.diagonal (MatrixDiagPartV3: none either): a gather of the diagonal's positions.
    - indexing with ints and new axes (`x[0]`, `x[:, None]`, `mask[None, ...]`): DTensor's layout
      propagation for such a strided slice of a split tensor crashed the process (new axes: a
      segmentation fault in slice_util::ForwardLayoutInference::VisitImplicitAxis) or put the split
      on the wrong dimension (an int before the split one: TimeDistributed's `inputs[i]` failed). A
      slice without them, then squeeze and expand_dims.
    Anything else (a start or shift only known when the step runs, a tensor index) goes to the
    original op.
    """
    import keras
    import tensorflow as tf

    nn, numpy, core, math = keras_internals.backend_modules_of_ops()
    conv, depthwise_conv, separable_conv = nn.conv, nn.depthwise_conv, nn.separable_conv
    roll, flip, slice_update, tril, triu = numpy.roll, numpy.flip, core.slice_update, numpy.tril, numpy.triu
    top_k = math.top_k
    fori_loop, scan, map_over = core.fori_loop, core.scan, core.map
    cumprod, diagonal = numpy.cumprod, numpy.diagonal

    def channels_last(data_format):
        return (data_format or keras.config.image_data_format()) == "channels_last"

    def dilated(inputs, dilation_rate):
        """The dilations of a channels_last 1-D/2-D window op, or None if it has none (or is another)."""
        rates = _per_dim(dilation_rate, len(inputs.shape) - 2)
        return rates if len(inputs.shape) in (3, 4) and any(r > 1 for r in rates) else None

    def conv_by_taps(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        rates = dilated(inputs, dilation_rate)
        if rates is None or not channels_last(data_format):
            return conv(inputs, kernel, strides, padding, data_format, dilation_rate)
        kernel = tf.convert_to_tensor(kernel)
        windows = _tap_windows(tf.convert_to_tensor(inputs), kernel.shape[:-2], _per_dim(strides, len(rates)),
                               padding, rates)
        patches = tf.concat(windows, axis=-1)  # [N, S'.., taps x C]: the kernel's rows, in its order
        letters = "nhw"[:len(patches.shape) - 1]  # no "...": DTensor's einsum does not broadcast
        return tf.einsum(f"{letters}k,kf->{letters}f", patches, tf.reshape(kernel, [-1, kernel.shape[-1]]))

    def grouped_conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        axis = -1 if channels_last(data_format) else 1
        kernel = tf.convert_to_tensor(kernel)
        channels, per_group = inputs.shape[axis], kernel.shape[-2]
        if channels is None or per_group is None or channels == per_group:
            return conv_by_taps(inputs, kernel, strides, padding, data_format, dilation_rate)
        groups = channels // per_group
        if per_group == 1 and channels_last(data_format) and len(inputs.shape) <= 4:
            # [..., 1, groups * m] -> [..., groups, m]: filter g * m + j reads channel g, as depthwise's.
            kernel = tf.reshape(kernel, list(kernel.shape[:-2]) + [groups, kernel.shape[-1] // groups])
            return depthwise_conv_by_taps(inputs, kernel, strides, padding, data_format, dilation_rate)
        parts = zip(tf.split(inputs, groups, axis=axis), tf.split(kernel, groups, axis=-1))
        return tf.concat([conv_by_taps(x, k, strides, padding, data_format, dilation_rate) for x, k in parts],
                         axis=axis)

    def depthwise_conv_by_taps(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        rates = dilated(inputs, dilation_rate)
        if rates is None or not channels_last(data_format):
            as_tuple = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
            return depthwise_conv(inputs, kernel, as_tuple(strides), padding, data_format, as_tuple(dilation_rate))
        return _depthwise_by_taps(tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel),
                                  _per_dim(strides, len(rates)), padding, rates)

    def separable_conv_by_taps(inputs, depthwise_kernel, pointwise_kernel, strides=1, padding="valid", data_format=None,
                           dilation_rate=1):
        if dilated(inputs, dilation_rate) is None or not channels_last(data_format):
            return separable_conv(inputs, depthwise_kernel, pointwise_kernel, strides, padding, data_format,
                                  dilation_rate)
        y = depthwise_conv_by_taps(inputs, depthwise_kernel, strides, padding, data_format, dilation_rate)
        return conv(y, pointwise_kernel, 1, "valid", data_format, 1)

    def top_k_by_one_hot(x, k, sorted=True):
        x = tf.convert_to_tensor(x)
        if x.shape.rank is None or x.shape[-1] is None or not x.dtype.is_floating:
            return top_k(x, k, sorted)

        @tf.custom_gradient
        def values_and_indices(x):
            values, indices = tf.math.top_k(x, k, sorted=sorted)

            def gradient(d_values, d_indices=None):  # each picked value's gradient back at its place
                return tf.reduce_sum(tf.one_hot(indices, x.shape[-1], dtype=d_values.dtype) * d_values[..., None], -2)
            return (values, indices), gradient
        return values_and_indices(x)

    def banded(keep):
        def band(x, k=0):  # tril/triu: a select with a constant mask (MatrixBandPart has no DTensor rule)
            x = tf.convert_to_tensor(x)
            offset = _static_ints(k)
            if offset is None or len(x.shape) < 2 or None in x.shape[-2:]:
                return (tril if keep == "lower" else triu)(x, k)
            rows, columns = np.indices(x.shape[-2:])
            inside = columns - rows <= offset[0] if keep == "lower" else columns - rows >= offset[0]
            return tf.where(inside, x, tf.zeros_like(x))
        return band

    def sliced_flip(x, axis=None):  # a slice with step -1 (ReverseV2 has no DTensor rule)
        x = tf.convert_to_tensor(x)
        axes = _static_ints(range(x.shape.rank) if axis is None else axis)
        if axes is None or x.shape.rank is None:
            return flip(x, axis)
        axes = {int(a) % x.shape.rank for a in axes}
        return x[tuple(slice(None, None, -1) if a in axes else slice(None) for a in range(x.shape.rank))]

    def gathered_roll(x, shift, axis=None):
        x = tf.convert_to_tensor(x)
        shifts, axes = _static_ints(shift), _static_ints(0 if axis is None else axis)
        if shifts is None or axes is None or not x.shape.is_fully_defined():
            return roll(x, shift, axis)
        y = tf.reshape(x, [-1]) if axis is None else x  # no axis: the flattened tensor rolls
        for step, ax in np.broadcast(shifts, axes):
            ax = int(ax)
            size = y.shape[ax]
            step = int(step) % size
            if step:  # the last `step` entries move to the front (a gather: DTensor refuses a concat
                # along a split dimension, as the batch's or a flattened batch-split tensor's)
                y = tf.gather(y, np.roll(np.arange(size), step), axis=ax)
                if axis is not None and ax % y.shape.rank == 0:
                    _moved_along_first_axis(size)
        return tf.reshape(y, x.shape)

    def selected_slice_update(inputs, start_indices, updates):
        inputs, updates = tf.convert_to_tensor(inputs), tf.convert_to_tensor(updates, dtype=inputs.dtype)
        starts = _static_ints(start_indices)
        if starts is None or not (inputs.shape.is_fully_defined() and updates.shape.is_fully_defined()):
            return slice_update(inputs, start_indices, updates)
        shape, sizes = inputs.shape.as_list(), updates.shape.as_list()
        starts = [min(max(int(s), 0), n - u) for s, n, u in zip(starts, shape, sizes)]  # clamped as XLA's
        where = np.zeros(shape, bool)
        where[tuple(slice(s, s + u) for s, u in zip(starts, sizes))] = True
        padded = tf.pad(updates, [[s, n - s - u] for s, n, u in zip(starts, shape, sizes)])
        return tf.where(where, padded, inputs)

    def unrolled_fori_loop(lower, upper, body_fun, init_val):
        bounds = _static_ints((lower, upper))
        if bounds is None or not 0 <= bounds[1] - bounds[0] <= MAX_UNROLLED_STEPS:
            return fori_loop(lower, upper, body_fun, init_val)
        dtype = lower.dtype if tf.is_tensor(lower) else tf.int32  # the index tf.while_loop would pass
        value = init_val
        for i in range(int(bounds[0]), int(bounds[1])):
            value = body_fun(tf.constant(i, dtype), value)
        return value

    def unrolled_scan(f, init, xs=None, length=None, reverse=False, unroll=1):
        flat_xs = [tf.convert_to_tensor(x) for x in keras.tree.flatten(xs)] if xs is not None else []
        steps = length if length is not None else (flat_xs[0].shape[0] if flat_xs else None)
        if steps is None or not 0 < int(steps) <= MAX_UNROLLED_STEPS:
            return scan(f, init, xs, length, reverse, unroll)
        if flat_xs:
            _moved_along_first_axis(steps)
        # as Keras' scan: each step's output packed like (and shaped like) the carry
        flat_init = [tf.convert_to_tensor(c) for c in keras.tree.flatten(init)]
        pack = lambda flat: keras.tree.pack_sequence_as(init, flat) if keras.tree.is_nested(init) else flat[0]  # noqa: E731
        carry, outputs = pack(flat_init), {}
        for i in (reversed(range(int(steps))) if reverse else range(int(steps))):
            step_xs = None
            if flat_xs:
                step = [x[i] for x in flat_xs]
                step_xs = keras.tree.pack_sequence_as(xs, step) if keras.tree.is_nested(xs) else step[0]
            new_carry, ys = f(carry, step_xs)
            if ys is not None:
                outputs[i] = keras.tree.flatten(ys)
            if new_carry is not None:
                carry = pack(keras.tree.flatten(new_carry))
        stacked = [tf.stack([outputs[i][j] if i in outputs else tf.zeros_like(c) for i in range(int(steps))])
                   for j, c in enumerate(flat_init)]
        return carry, pack(stacked)

    def unrolled_map(f, xs):
        flat_xs = [tf.convert_to_tensor(x) for x in keras.tree.flatten(xs)]
        steps = flat_xs[0].shape[0] if flat_xs and flat_xs[0].shape.rank else None
        if steps is None or not 0 < steps <= MAX_UNROLLED_STEPS:
            return map_over(f, xs)
        _moved_along_first_axis(steps)
        nested = keras.tree.is_nested(xs)
        outputs = [f(keras.tree.pack_sequence_as(xs, [x[i] for x in flat_xs]) if nested else flat_xs[0][i])
                   for i in range(steps)]
        return keras.tree.map_structure(lambda *each: tf.stack(each), *outputs)

    def doubled_cumprod(x, axis=None, dtype=None):
        x = keras.ops.convert_to_tensor(x, dtype=dtype)
        if x.dtype == tf.bool or x.shape.rank is None or (axis is None and not x.shape.is_fully_defined()):
            return cumprod(x, axis, dtype)
        if axis is None:
            x, axis = tf.reshape(x, [-1]), 0
        rank = x.shape.rank
        axis = int(axis) % rank
        size = x.shape[axis]
        if size is None:
            return cumprod(x, axis, dtype)
        positions = np.arange(size)
        y, shift = x, 1
        while shift < size:  # y[i] = x[i - 2 shift + 1] ... x[i] after each pass: multiply by y[i - shift],
            # gathered (slices of a split dimension, as the batch's, need sizes it divides)
            earlier = tf.gather(y, np.maximum(positions - shift, 0), axis=axis)
            inside = (positions >= shift).reshape([size if a == axis else 1 for a in range(rank)])
            y = y * tf.where(inside, earlier, tf.ones_like(earlier))
            shift *= 2
        return y

    def gathered_diagonal(x, offset=0, axis1=0, axis2=1):
        x = tf.convert_to_tensor(x)
        rank, shift = x.shape.rank, _static_ints(offset)
        if rank is None or rank < 2 or shift is None:
            return diagonal(x, offset, axis1, axis2)
        first, second, shift = int(axis1) % rank, int(axis2) % rank, int(shift[0])
        rows, columns = x.shape[first], x.shape[second]
        if rows is None or columns is None or not -rows < shift < columns:
            return diagonal(x, offset, axis1, axis2)
        x = tf.transpose(x, [a for a in range(rank) if a not in (first, second)] + [first, second])
        flat = tf.reshape(x, tf.concat([tf.shape(x)[:-2], [rows * columns]], 0))
        positions = [i * columns + i + shift for i in range(max(0, -shift), min(rows, columns - shift))]
        return tf.gather(flat, positions, axis=-1)

    getitem = tf.Tensor.__getitem__

    def getitem_as_slices(tensor, spec):
        items = spec if isinstance(spec, tuple) else (spec,)
        items = tuple(_static_int_or_item(item) for item in items)  # an unrolled loop's index: an int
        is_int = lambda item: isinstance(item, (int, np.integer)) and not isinstance(item, bool)  # noqa: E731
        plain = all(item is None or item is Ellipsis or isinstance(item, slice) or is_int(item) for item in items)
        if not plain or not any(item is None or is_int(item) for item in items) or tensor.shape.rank is None:
            return getitem(tensor, spec)
        rank, shape = tensor.shape.rank, tensor.shape.as_list()
        consumed = sum(1 for item in items if item is not None and item is not Ellipsis)
        rest, squeezed, new_axes = [], [], []  # the spec without ints and Nones; where they act
        axis = kept = 0  # the input's axis; the axis in getitem(tensor, rest), whose ints keep their axis
        for item in items:
            if item is None:  # its place in the result: the axes kept before it, and the earlier Nones
                new_axes.append(kept - len(squeezed) + len(new_axes))
                continue
            if is_int(item):
                size = shape[axis] if axis < rank else None
                if size is None or not -size <= item < size:
                    return getitem(tensor, spec)  # TensorFlow's own error, or an unknown size
                start = int(item) % size
                rest.append(slice(start, start + 1))
                squeezed.append(kept)
            else:
                rest.append(item)
            step = rank - consumed if item is Ellipsis else 1
            axis, kept = axis + step, kept + step
        result = getitem(tensor, tuple(rest)) if rest else tensor
        result = tf.squeeze(result, squeezed) if squeezed else result
        for axis in new_axes:
            result = tf.expand_dims(result, axis)
        return result

    nn.conv, nn.depthwise_conv, nn.separable_conv = grouped_conv, depthwise_conv_by_taps, separable_conv_by_taps
    numpy.roll, numpy.flip, core.slice_update = gathered_roll, sliced_flip, selected_slice_update
    numpy.tril, numpy.triu = banded("lower"), banded("upper")
    math.top_k = top_k_by_one_hot
    core.fori_loop, core.scan, core.map = unrolled_fori_loop, unrolled_scan, unrolled_map
    numpy.cumprod, numpy.diagonal = doubled_cumprod, gathered_diagonal
    tf.Tensor.__getitem__ = getitem_as_slices
    try:
        yield
    finally:
        nn.conv, nn.depthwise_conv, nn.separable_conv = conv, depthwise_conv, separable_conv
        numpy.roll, numpy.flip, core.slice_update, numpy.tril, numpy.triu = roll, flip, slice_update, tril, triu
        math.top_k = top_k
        core.fori_loop, core.scan, core.map = fori_loop, scan, map_over
        numpy.cumprod, numpy.diagonal = cumprod, diagonal
        tf.Tensor.__getitem__ = getitem


_LEADING_AXIS_MOVES = []  # the lists `leading_axis_moves` records into, innermost last


@contextlib.contextmanager
def leading_axis_moves():
    """Records, into the list it yields, the size of each first axis a rewritten op moves entries
    along while active: a roll along axis 0, a map or scan over axis 0. On a layer's batch axis inside
    a layer made of layers split by samples, DTensor cannot lay those out (runtime keeps such a layer
    whole along the batch)."""
    sizes = []
    _LEADING_AXIS_MOVES.append(sizes)
    try:
        yield sizes
    finally:
        _LEADING_AXIS_MOVES.remove(sizes)


def _moved_along_first_axis(size):
    for sizes in _LEADING_AXIS_MOVES:
        sizes.append(int(size))


# Loops of more steps keep their while loop (and are refused by parallelize, which sees its TensorLists):
# an unrolled loop's trace and graph grow with its steps.
MAX_UNROLLED_STEPS = 256


def _static_int_or_item(item):
    """A scalar int tensor whose value is known when traced (an unrolled loop's index) as that int;
    any other index item as it is."""
    import tensorflow as tf

    if tf.is_tensor(item) and item.dtype.is_integer and item.shape.rank == 0:
        value = tf.get_static_value(item)
        return item if value is None else int(value)
    return item


def _per_dim(value, rank):
    """A window op's strides or dilations as a list of `rank` ints."""
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * rank


def _tap_windows(x, sizes, strides, padding, rates):
    """The windows of a channels_last window op on `x` [N, S.., C], one per kernel tap (the last
    spatial dim's fastest): each [N, S'.., C], the input rows the tap meets, from Slice and Reshape
    (`halo.rows`). The CPU kernels have no dilated gradients (Conv2DBackpropInput) or none at all
    (DepthwiseConv2dNative), and TensorFlow's way round them, SpaceToBatchND, has no DTensor rule."""
    import itertools

    import tensorflow as tf

    from keras_lwp.layers import halo

    pads, outputs = [[0, 0]], []
    for n, k, s, r in zip(x.shape[1:-1], sizes, strides, rates):
        out, before = halo.output_size(n, k, s, r, padding.lower())  # TensorFlow's sizes and padding
        pads.append([before, max((out - 1) * s + (k - 1) * r + 1 - n - before, 0)])
        outputs.append(out)
    x = tf.pad(x, pads + [[0, 0]]) if any(p != [0, 0] for p in pads) else x
    windows = []
    for tap in itertools.product(*[range(k) for k in sizes]):
        window = x
        for i, (t, r, s, n) in enumerate(zip(tap, rates, strides, outputs)):
            window = halo.rows(window, 1 + i, t * r, t * r + (n - 1) * s + 1, s)
        windows.append(window)
    return windows


def _depthwise_by_taps(x, kernel, strides, padding, rates):
    """A channels_last depthwise convolution [N, S.., C] * [K.., C, m] -> [N, S'.., C m]: the sum over
    the kernel's taps of each tap's window times its weights."""
    import tensorflow as tf

    channels, multiplier = kernel.shape[-2:]
    weights = tf.unstack(tf.reshape(kernel, [-1, channels, multiplier]))
    y = None
    for window, weight in zip(_tap_windows(x, kernel.shape[:-2], strides, padding, rates), weights):
        term = window[..., None] * weight
        y = term if y is None else y + term
    return tf.reshape(y, [-1 if d is None else d for d in y.shape[:-2]] + [channels * multiplier])


def _static_ints(value):
    """`value` (an int, a tensor, or a sequence of them) as a 1-D array of ints known when traced, or None."""
    import tensorflow as tf

    # a sequence item by item: NumPy cannot take a symbolic tensor, and one may be among ints
    items = list(value) if isinstance(value, (list, tuple, range)) else [value]
    known = [tf.get_static_value(item) if tf.is_tensor(item) else item for item in items]
    if any(item is None for item in known):
        return None
    return np.concatenate([np.atleast_1d(np.asarray(item)).astype(np.int64) for item in known])
