"""Wrapped calls: each layer, and the model, runs the layouts its plan gives it.

`wrap_call` replaces a layer's `call`: the inputs are relaid to the layouts the layer's configuration
needs, the layer computes (its own call, or the implementation its rule gives for a split DTensor
cannot run), and the output is relaid to the configuration's output layout, so DTensor inserts exactly
the plan's communication between layers. Random draws inside it are made as on one device
(`draws_as_one_device`), and what Keras reads from an output beside its value (the logits under a
softmax, the mask) survives the relayout (`relayout_output`).
"""

import contextlib

from keras_lwp import keras_internals, placement
from keras_lwp.layers import registered_rule

def wrap_call(layer, place, mesh, sources=None):
    """Relayout the inputs to what the configuration needs and the output to its layout; where the
    layer's rule implements a split DTensor refuses, run that implementation instead of `call`."""
    import keras
    import tensorflow as tf

    sources = sources or {}
    keywords = _keyword_inputs(place.info)
    implementation = registered_rule(place.info).implementation(place.info, place.config)
    if implementation is None:
        original = layer.call
    else:
        def original(*args, **kwargs):
            return implementation(layer, place, mesh, *args, **kwargs)

    @tf.autograph.experimental.do_not_convert
    def call(*args, **kwargs):
        inputs = args[0] if args else None
        rest = args[1:]
        if isinstance(inputs, (list, tuple)):
            inputs = type(inputs)(_relayout_input(place, i, t, mesh, sources) for i, t in enumerate(inputs))
        elif inputs is not None:
            inputs = _relayout_input(place, 0, inputs, mesh, sources)
        # Extra tensor arguments (attention's value/key) are inputs 1, 2, ... of the rule.
        rest = tuple(_relayout_input(place, 1 + i, t, mesh, sources) if tf.is_tensor(t) else t
                     for i, t in enumerate(rest))
        # Tensors passed by keyword (attention's value/key, a block's padding mask) are the inputs the
        # model's call gave them; unplanned ones (a mask Keras adds) keep the layout they have.
        for key, index in keywords.items():
            if tf.is_tensor(kwargs.get(key)):
                kwargs[key] = _relayout_input(place, index, kwargs[key], mesh, sources)
        kwargs = {key: _on_mesh(value, mesh) for key, value in kwargs.items()}
        with draws_as_one_device(mesh), ops_dtensor_runs():
            outputs = original(inputs, *rest, **kwargs) if args else original(**kwargs)
        return keras.tree.map_structure(
            lambda t: relayout_output(t, place.output_layout(t), mesh) if tf.is_tensor(t) else t, outputs)

    layer._keras_lwp_original_call = layer.call
    layer.call = call


def _keyword_inputs(info):
    """{keyword: input index} of the tensors the model's call passes the layer by keyword; attention's
    value and key are inputs 1 and 2 when the graph does not say (a layer planned without its node)."""
    node = info.calls[0].node if info.calls else None
    if node is None:
        return {"value": 1, "key": 2}
    return keras_internals.keyword_inputs(node)


def _relayout_input(place, index, tensor, mesh, sources):
    import tensorflow as tf

    tensor = _on_mesh(tensor, mesh)
    if not tf.is_tensor(tensor) or index >= len(place.info.calls[0].inputs):
        return tensor
    return placement.relayout(tensor, place.input_layout(index, tensor), mesh, source=sources.get(index))


def _on_mesh(value, mesh):
    """A host tensor the model's graph holds as an argument (keras_hub's ViTDet subtracts an
    `ops.array` of ImageNet means from its input), which a DTensor function refuses to capture: made
    a constant of the function being traced, or, run eagerly, put on the mesh replicated."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    if not (isinstance(value, tf.Tensor) and hasattr(value, "numpy")):
        return value
    if tf.executing_eagerly():
        return value if dtensor.is_dtensor(value) else placement.to_mesh(value, (None,) * value.shape.rank, mesh)
    with tf.init_scope():  # eager: is_dtensor and numpy need it
        if dtensor.is_dtensor(value):
            return value
        array = value.numpy()
    return tf.constant(array, dtype=value.dtype)


# Keras' random draws by shape (keras.src.backend.random, which layers and keras.random call).
_SHAPED_DRAWS = ("normal", "uniform", "truncated_normal", "randint")


@contextlib.contextmanager
def draws_as_one_device(mesh):
    """While a wrapped layer's call is traced, Keras' random draws (Dropout's mask, GaussianNoise's
    noise, ...) are made whole on every device, then split like the tensor they meet: the numbers one
    device draws. Left alone, DTensor lays a draw out like its consumer and draws each block from a
    seed mixed with its device's coordinates: another mask than the single-device model's, and
    another for every strategy. The price: each device draws the whole mask, not only its block."""
    import tensorflow as tf
    module = keras_internals.random_module()
    saved = {name: getattr(module, name) for name in _SHAPED_DRAWS + ("dropout",)}

    def whole(draw):
        def wrapped(shape, *args, **kwargs):
            value = draw(shape, *args, **kwargs)
            return placement.relayout(value, (None,) * len(value.shape), mesh)
        return wrapped

    def dropout(inputs, rate, noise_shape=None, seed=None):
        if not isinstance(rate, (int, float)) or not 0 < rate < 1:
            return saved["dropout"](inputs, rate, noise_shape, seed)
        shape = keras_internals.concrete_noise_shape(inputs, noise_shape)
        # Keras' own dropout of ones: 1/(1-rate) where kept, else 0, from the same draw of the same seed.
        mask = saved["dropout"](tf.ones(shape, inputs.dtype), rate, None, seed)
        return inputs * placement.relayout(mask, (None,) * len(mask.shape), mesh)

    for name in _SHAPED_DRAWS:
        setattr(module, name, whole(saved[name]))
    module.dropout = dropout
    try:
        yield
    finally:
        for name, draw in saved.items():
            setattr(module, name, draw)


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
      through SpaceToBatchND, which DTensor has no layout rule for. A convolution runs as the Conv2D
      op with its dilations (the CPU kernel has them); a depthwise one, whose CPU kernel has none, as
      a sum over its taps of the input's shifted windows times the tap's weights.
    - keras.ops.roll (Roll: DTensor has no layout rule for it): slices, concatenated; keras.ops.flip
      (ReverseV2: none either): a slice with step -1.
    - keras.ops.tril and triu (MatrixBandPart: no layout rule): a select with a constant mask.
    - keras.ops.top_k's gradient: TensorFlow's scatters into flat indices it numbers with a range,
      which DTensor laid out wrongly on a batch-split input, silently (a Mixtral-style router trained
      1e-2 away from one device). Here each value's gradient returns through a one-hot product.
    - keras.ops.slice_update at a start known when traced (XlaDynamicUpdateSlice, which crashed the
      process): the update padded to the input's shape, selected where it lands.
    - indexing with ints and new axes (`x[0]`, `x[:, None]`, `mask[None, ...]`): DTensor's layout
      propagation for such a strided slice of a split tensor crashed the process (new axes: a
      segmentation fault in slice_util::ForwardLayoutInference::VisitImplicitAxis) or put the split
      on the wrong dimension (an int before the split one: TimeDistributed's `inputs[i]` failed). A
      slice without them, then squeeze and expand_dims.
    Anything else (a start or shift only known when the step runs, a tensor index) goes to the
    original op.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    nn, numpy, core, math = keras_internals.backend_modules_of_ops()
    conv, depthwise_conv, separable_conv = nn.conv, nn.depthwise_conv, nn.separable_conv
    roll, flip, slice_update, tril, triu = numpy.roll, numpy.flip, core.slice_update, numpy.tril, numpy.triu
    top_k = math.top_k

    def channels_last(data_format):
        return (data_format or keras.config.image_data_format()) == "channels_last"

    def dilated(inputs, dilation_rate):
        """The dilations of a channels_last 1-D/2-D window op, or None if it has none (or is another)."""
        rates = _per_dim(dilation_rate, len(inputs.shape) - 2)
        return rates if len(inputs.shape) in (3, 4) and any(r > 1 for r in rates) else None

    def native_conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
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
            return native_conv(inputs, kernel, strides, padding, data_format, dilation_rate)
        groups = channels // per_group
        if per_group == 1 and channels_last(data_format) and len(inputs.shape) <= 4:
            # [..., 1, groups * m] -> [..., groups, m]: filter g * m + j reads channel g, as depthwise's.
            kernel = tf.reshape(kernel, list(kernel.shape[:-2]) + [groups, kernel.shape[-1] // groups])
            return tap_depthwise_conv(inputs, kernel, strides, padding, data_format, dilation_rate)
        parts = zip(tf.split(inputs, groups, axis=axis), tf.split(kernel, groups, axis=-1))
        return tf.concat([native_conv(x, k, strides, padding, data_format, dilation_rate) for x, k in parts],
                         axis=axis)

    def tap_depthwise_conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        rates = dilated(inputs, dilation_rate)
        if rates is None or not channels_last(data_format):
            as_tuple = lambda value: tuple(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
            return depthwise_conv(inputs, kernel, as_tuple(strides), padding, data_format, as_tuple(dilation_rate))
        return _depthwise_by_taps(tf.convert_to_tensor(inputs), tf.convert_to_tensor(kernel),
                                  _per_dim(strides, len(rates)), padding, rates)

    def tap_separable_conv(inputs, depthwise_kernel, pointwise_kernel, strides=1, padding="valid", data_format=None,
                           dilation_rate=1):
        if dilated(inputs, dilation_rate) is None or not channels_last(data_format):
            return separable_conv(inputs, depthwise_kernel, pointwise_kernel, strides, padding, data_format,
                                  dilation_rate)
        y = tap_depthwise_conv(inputs, depthwise_kernel, strides, padding, data_format, dilation_rate)
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

    def sliced_roll(x, shift, axis=None):
        x = tf.convert_to_tensor(x)
        shifts, axes = _static_ints(shift), _static_ints(0 if axis is None else axis)
        if shifts is None or axes is None or not x.shape.is_fully_defined():
            return roll(x, shift, axis)
        y = tf.reshape(x, [-1]) if axis is None else x  # no axis: the flattened tensor rolls
        for step, ax in np.broadcast(shifts, axes):
            ax = int(ax)
            size = y.shape[ax]
            step = int(step) % size
            if step:  # the last `step` entries move to the front
                y = tf.concat([_slice(y, ax, size - step, size), _slice(y, ax, 0, size - step)], axis=ax)
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

    getitem = tf.Tensor.__getitem__

    def getitem_as_slices(tensor, spec):
        items = spec if isinstance(spec, tuple) else (spec,)
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

    nn.conv, nn.depthwise_conv, nn.separable_conv = grouped_conv, tap_depthwise_conv, tap_separable_conv
    numpy.roll, numpy.flip, core.slice_update = sliced_roll, sliced_flip, selected_slice_update
    numpy.tril, numpy.triu = banded("lower"), banded("upper")
    math.top_k = top_k_by_one_hot
    tf.Tensor.__getitem__ = getitem_as_slices
    try:
        yield
    finally:
        nn.conv, nn.depthwise_conv, nn.separable_conv = conv, depthwise_conv, separable_conv
        numpy.roll, numpy.flip, core.slice_update, numpy.tril, numpy.triu = roll, flip, slice_update, tril, triu
        math.top_k = top_k
        tf.Tensor.__getitem__ = getitem


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

    reach = [(k - 1) * r + 1 for k, r in zip(sizes, rates)]
    if padding.lower() == "same":  # TensorFlow's: the output ceil(S / s), the extra row after
        pads = [max((-(-n // s) - 1) * s + e - n, 0) for n, s, e in zip(x.shape[1:-1], strides, reach)]
        x = tf.pad(x, [[0, 0]] + [[p // 2, p - p // 2] for p in pads] + [[0, 0]])
    outputs = [(n - e) // s + 1 for n, s, e in zip(x.shape[1:-1], strides, reach)]
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
    """`value` (an int, a sequence of ints or a tensor) as a 1-D array of ints known when traced, or None."""
    import numpy as np
    import tensorflow as tf

    items = [value] if tf.is_tensor(value) else np.atleast_1d(np.asarray(value, dtype=object)).tolist()
    known = [tf.get_static_value(item) if tf.is_tensor(item) else item for item in items]
    if any(item is None for item in known):
        return None
    return np.concatenate([np.atleast_1d(np.asarray(item)).astype(np.int64) for item in known])


def _slice(tensor, axis, start, stop):
    """tensor[..., start:stop, ...] along `axis` (a plain slice: DTensor shards it)."""
    import tensorflow as tf

    begin, size = [0] * tensor.shape.rank, tensor.shape.as_list()
    begin[axis], size[axis] = start, stop - start
    return tf.slice(tensor, begin, size)


def wrap_model_outputs(model, graph, plan, mesh):
    """Lay the model's outputs out like the labels (batch split, the rest whole) for the loss:
    DTensor mis-shaped a loss's reshape of a channel-split prediction."""
    import keras
    import tensorflow as tf

    original = model.call
    sample_axis = plan[graph.graph["inputs"][0]].get("sample")

    @tf.autograph.experimental.do_not_convert
    def call(*args, **kwargs):
        outputs = original(*args, **kwargs)
        return keras.tree.map_structure(
            lambda t: relayout_output(t, (sample_axis,) + (None,) * (len(t.shape) - 1), mesh) if tf.is_tensor(t)
            else t, outputs)

    model.call = call


# What Keras reads from a tensor beside its value: the losses' logits (keras/src/backend/tensorflow/
# nn.py: _get_logits takes `_keras_logits`, or the input of the Softmax/Sigmoid op that made the
# output) and the mask Keras' losses and metrics apply (`_keras_mask`).
_LOGITS_OPS = ("Softmax", "Sigmoid")


def relayout_output(tensor, spec, mesh):
    """A layer's (or the model's) output relaid to `spec`, keeping what Keras reads from the output
    tensor itself: a relayout is a new tensor, and from it a cross-entropy would compute on
    probabilities instead of the logits the single-device loss uses (another loss, not rounding)."""
    import tensorflow as tf

    relaid = placement.relayout(tensor, spec, mesh)
    if relaid is tensor:
        return relaid
    logits = getattr(tensor, "_keras_logits", None)
    if logits is None and not tf.executing_eagerly() and getattr(tensor, "op", None) is not None \
            and tensor.op.type in _LOGITS_OPS and len(tensor.op.inputs) == 1:
        logits = tensor.op.inputs[0]
    mask = getattr(tensor, "_keras_mask", None)
    try:
        if logits is not None:
            relaid._keras_logits = placement.relayout(logits, spec, mesh)
        if mask is not None:
            relaid._keras_mask = placement.relayout(mask, spec[:len(mask.shape)], mesh)
    except AttributeError:  # an EagerTensor takes no attributes (run_eagerly): Keras reads none either
        pass
    return relaid


__all__ = ["draws_as_one_device", "ops_dtensor_runs", "relayout_output", "wrap_call", "wrap_model_outputs"]
