"""Wrapped calls: each layer, and the model, runs the layouts its plan gives it.

`wrap_call` replaces a layer's `call`: the inputs are relaid to the layouts the layer's configuration
needs, the layer computes (its own call, or the implementation its rule gives for a split DTensor
cannot run), and the output is relaid to the configuration's output layout, so DTensor inserts exactly
the plan's communication between layers. Random draws inside it are made as on one device
(`draws_as_one_device`), ops DTensor cannot run are computed from ops it runs (`op_rewrites`), and
what Keras reads from an output beside its value (the logits under a
softmax, the mask) survives the relayout (`relayout_output`).
"""

import contextlib

from keras_lwp import keras_internals, placement
from keras_lwp.op_rewrites import ops_dtensor_runs
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
        masks = _InputMasks(mesh)
        if isinstance(inputs, (list, tuple)):
            inputs = type(inputs)(_relayout_input(place, i, t, mesh, sources, masks) for i, t in enumerate(inputs))
        elif inputs is not None:
            inputs = _relayout_input(place, 0, inputs, mesh, sources, masks)
        # Extra tensor arguments (attention's value/key) are inputs 1, 2, ... of the rule.
        rest = tuple(_relayout_input(place, 1 + i, t, mesh, sources, masks) if tf.is_tensor(t) else t
                     for i, t in enumerate(rest))
        # Tensors passed by keyword (attention's value/key, a block's padding mask) are the inputs the
        # model's call gave them.
        for key, index in keywords.items():
            if tf.is_tensor(kwargs.get(key)):
                kwargs[key] = _relayout_input(place, index, kwargs[key], mesh, sources, masks)
        for key, value in kwargs.items():
            if (key == "mask" or key.endswith("_mask")) and key not in keywords:
                kwargs[key] = masks.argument(value)
        kwargs = {key: _on_mesh(value, mesh) for key, value in kwargs.items()}
        with draws_as_one_device(mesh), ops_dtensor_runs():
            outputs = original(inputs, *rest, **kwargs) if args else original(**kwargs)
        masks.write_back()
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


def _relayout_input(place, index, tensor, mesh, sources, masks):
    """Input `index` relaid to the layout the configuration needs, with its Keras mask (`masks`)."""
    import tensorflow as tf

    tensor = _on_mesh(tensor, mesh)
    if not tf.is_tensor(tensor) or index >= len(place.info.calls[0].inputs):
        return tensor
    spec = place.input_layout(index, tensor)
    relaid = placement.relayout(tensor, spec, mesh, source=sources.get(index))
    masks.carry(tensor, relaid, spec)
    return relaid


class _InputMasks:
    """The Keras masks of a wrapped call's inputs, laid out like the relaid inputs.

    A relayout is a new tensor, and Keras keeps a mask on the tensor (`_keras_mask`): each relaid input
    carries its mask over, and the mask arguments Keras filled from the inputs (`mask`, `query_mask`,
    ...) are replaced by the carried ones. Left where they were, DTensor met two layouts of one batch
    inside the layer and failed, or the mask was lost (MultiHeadAttention reads its query's from the
    query tensor). What the call does to its inputs' masks is done to the model's tensors too
    (MultiHeadAttention clears them, and the Add or Multiply after it reads them)."""

    def __init__(self, mesh):
        self.mesh = mesh
        self.carried = {}  # id of an input's mask -> the mask laid out like the relaid input
        self.moved = []  # (input, relaid input, the mask it was given)

    def carry(self, tensor, relaid, spec):
        mask = keras_internals.keras_mask(tensor)
        if mask is None:
            return
        self.carried[id(mask)] = laid_out = _mask_laid_out(mask, tensor, spec, self.mesh)
        keras_internals.set_keras_mask(relaid, laid_out)
        if relaid is not tensor:
            self.moved.append((tensor, relaid, laid_out))

    def argument(self, value):
        import keras

        return keras.tree.map_structure(lambda mask: self.carried.get(id(mask), mask), value)

    def write_back(self):
        for tensor, relaid, given in self.moved:
            now = keras_internals.keras_mask(relaid)
            if now is not given:
                keras_internals.set_keras_mask(tensor, now)


def _mask_laid_out(mask, tensor, spec, mesh):
    """A mask over `tensor`'s leading axes laid out like them; any other mask whole on every device. Pinned
    when it is there already: one mask read by layers laid out differently otherwise had its layout
    chosen by DTensor's propagation, which then failed inside one of them."""
    rank = len(mask.shape)
    spec = tuple(spec)[:rank] if tuple(mask.shape) == tuple(tensor.shape)[:rank] else (None,) * rank
    laid_out = placement.relayout(mask, spec, mesh)
    return placement.pinned(mask, spec, mesh) if laid_out is mask else laid_out


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
    logits = getattr(tensor, "_keras_logits", None) if relaid is not tensor else None
    if relaid is not tensor and logits is None and not tf.executing_eagerly() \
            and getattr(tensor, "op", None) is not None and tensor.op.type in _LOGITS_OPS and len(tensor.op.inputs) == 1:
        logits = tensor.op.inputs[0]
    if logits is not None:
        try:
            relaid._keras_logits = placement.relayout(logits, spec, mesh)
        except AttributeError:  # an EagerTensor takes no attributes (run_eagerly): Keras reads none either
            pass
    # The mask too when the tensor stays: Keras set it after the call that made the tensor, from that
    # call's inputs, in their layout.
    mask = keras_internals.keras_mask(tensor)
    if mask is not None:
        keras_internals.set_keras_mask(relaid, _mask_laid_out(mask, tensor, spec, mesh))
    return relaid


__all__ = ["draws_as_one_device", "relayout_output", "wrap_call", "wrap_model_outputs"]
