"""parallelize(model, mesh): run a Strategy on TensorFlow DTensor behind plain `fit`.

Every change parallelize makes to Keras objects, and every private Keras name it uses, is listed in
keras_lwp.keras_internals (checked by tests/test_keras_internals.py).

What it does to the model (docs/design.md, "Measured facts"):
- every weight becomes a `dtensor.DVariable` with its layer's weight layout, and keeps that layout as
  `_layout`, which Keras passes on to the optimizer slots built from it;
- each layer's `call` is wrapped: inputs are relaid to the layouts the layer's configuration needs
  and the output to the configuration's output layout, so DTensor inserts exactly the plan's
  communication between layers;
- the optimizer's variables (counters replicated, slots like their weight) and every metric's state
  are moved onto the mesh when a train/test function is made (both exist only after compile and
  Keras' symbolic build, so compile may come before or after parallelize);
- Keras' TF train/test/predict functions wrap steps in `tf.experimental.Optional`, which DTensor
  cannot lay out; ours take one batch at a time from the same iterator, shard it along the batch
  and run the stock `train_step`/`test_step`/`predict_step` in a `tf.function`. Compile metrics are
  built (and moved to the mesh) before the first step: Keras builds them lazily inside it, where their
  variables would stay off the mesh and count wrong.
A batch whose size a mesh axis does not divide (the last partial batch) runs with the sample
dimension replicated along that axis: same numbers, nothing dropped.

On a mesh spanning several clients (keras_lwp.multihost), each client packs only its own devices'
blocks of the batch it is given (the whole global batch), host reads gather across clients, and
parallelize checks that every client runs the same plan and starts from client 0's weights.
"""

import contextlib
import os
import types
import weakref

import numpy as np

from keras_lwp import keras_internals, multihost, placement
from keras_lwp.graph import layer_graph
from keras_lwp.layers import Placement, dimensions_of, has_rule_for, registered_rule
from keras_lwp.mesh import make_mesh, mesh_spec_of
from keras_lwp.placement import spec_of
from keras_lwp.planner import plan_graph, _batch_size
from keras_lwp.strategy import Strategy

# Ops with no DTensor layout rule (docs/design.md), run replicated: AveragePooling's gradient, the
# depthwise convolution's filter gradient (DepthwiseConv2D, SeparableConv2D, so MobileNet).
for _op in ("AVGPOOLGRAD", "DEPTHWISECONV2DNATIVEBACKPROPFILTER", "DEPTHWISECONV2DNATIVEBACKPROPINPUT"):
    os.environ.setdefault(f"DTENSOR_ENABLE_REPLICATED_SPMD_AS_DEFAULT_TF.{_op}", "1")
# DTensor's all-reduce combining silently applied stale Adam/momentum slot values on some graphs
# (reproduced here: a branchy model under OWT and a transformer block under data parallelism trained
# to different weights). One all-reduce per group makes every case match one device.
os.environ.setdefault("DTENSOR_ALLREDUCE_COMBINE_OPTIMIZATION_GROUP_SIZE", "1")


class ParallelizedModel:
    """What parallelize attaches to a model (as `model._keras_lwp`)."""

    def __init__(self, strategy, mesh, graph):
        self.strategy = strategy
        self.mesh = mesh
        self.graph = graph
        self.input_specs = {}  # (input name, rank) -> layout the batch is packed with


def strategy_of(model):
    """The Strategy a parallelized model runs."""
    state = getattr(model, "_keras_lwp", None)
    if state is None:
        raise ValueError(f"The model '{model.name}' is not parallelized. Call keras_lwp.parallelize(model, mesh).")
    return state.strategy


def parallelize(model, mesh, strategy="auto", overrides=None, batch_size=None, profile=None, cost_model="analytic",
                strict=False, hidden_dimensions=False, memory_limit=None):
    """Shard `model` over `mesh` layer by layer, then train it with the usual `compile`/`fit`.

    Args:
        model: a built Keras functional or Sequential model.
        mesh: a dtensor.Mesh, a keras.distribution.DeviceMesh or a dict {axis: size} over this
            process's devices.
        strategy: "auto" (searched), "data", "model", "owt", or a Strategy (e.g. from
            keras_lwp.search or Strategy.from_json).
        overrides: {layer name or pattern: {dimension: mesh axis}} pinned for the search.
        batch_size: the global batch size to plan for (default: 32 per device).
        profile, strict, hidden_dimensions, memory_limit: as in keras_lwp.search.
        cost_model: "analytic", "profiled" (measure every layer configuration on this mesh once,
            then read it from the cache; compile first so the profile times your optimizer's
            update, else Adam's), or a keras_lwp.cost.CostModel; as in keras_lwp.search.

    Returns:
        The same model object, now running sharded; `keras_lwp.strategy_of(model)` is its plan.

    Example:

    ```python
    keras_lwp.use_virtual_devices(8)
    model = keras_lwp.parallelize(model, keras_lwp.make_mesh({"x": 4, "y": 2}))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=64)
    ```
    """
    if getattr(model, "_keras_lwp", None) is not None:
        raise ValueError(
            f"The model '{model.name}' is already parallelized (strategy "
            f"'{model._keras_lwp.strategy.name}' on {model._keras_lwp.strategy.mesh}). Parallelize a fresh "
            "model, or load its weights into one: parallelize changes the model in place."
        )
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and getattr(optimizer, "built", False):
        raise ValueError(
            f"The optimizer of model '{model.name}' is already built (the model was trained): its state lives on one "
            "device and is keyed to the variables parallelize replaces. Parallelize before the first fit, or "
            "compile with a new optimizer first (model.compile(optimizer=...)), then parallelize.")
    dmesh = make_mesh(mesh)
    spec = mesh_spec_of(dmesh)
    batch_size = _batch_size(model, spec, batch_size)
    graph = layer_graph(model, batch_size)  # refuses subclassed and empty models before any change
    _check_float_inputs(graph)
    _refuse_layers_dtensor_cannot_run(graph)
    if isinstance(strategy, str) and strategy.endswith(".json"):
        strategy = Strategy.from_json(strategy)
    plan = plan_graph(graph, spec, batch_size, strategy, overrides, profile, cost_model, strict,
                      hidden_dimensions=hidden_dimensions, memory_limit=memory_limit,
                      optimizer=getattr(model, "optimizer", None))
    run_mesh = _mesh_for(plan.mesh, dmesh)
    # Multi-client: every client must run this plan (keras_lwp.multihost) and start from the same weights.
    multihost.agree(f"the plan of model '{model.name}'", _what_runs(plan), advice=(
        "Every client must plan the same model on the same mesh with the same batch size, strategy, overrides "
        "and cost model (a profiled cost model measured once and shared): compare "
        "keras_lwp.strategy_of(model).summary() across the clients."))
    model._keras_lwp = ParallelizedModel(plan, run_mesh, graph)
    if spec.size == 1:
        return model  # one device: nothing to shard, so no DTensor machinery either (and no overhead)
    _weights_from_first_client(model, run_mesh)
    _apply(graph, plan, run_mesh)
    _wrap_model_outputs(model, graph, plan, run_mesh)
    _install_functions(model)
    return model


def _what_runs(plan):
    """The part of a plan that decides what every device computes: its mesh and layer configurations
    (not its predicted costs, which a cost model may compute differently without changing the plan)."""
    import json

    layers = {name: sorted(dict(plan[name]).items()) for name in plan}
    return json.dumps({"mesh": plan.mesh.to_dict(), "layers": layers}, sort_keys=True)


def _weights_from_first_client(model, mesh):
    """On a multi-client mesh, give every client client 0's weights and seed states (random
    initializations differ unless every client seeded alike)."""
    if not multihost.is_multi_client():
        return
    variables = model.weights + _state_variables(model)  # seed states too: every client draws alike
    values = multihost.broadcast_from_first_client([np.asarray(v.numpy()) for v in variables], mesh)
    for variable, value in zip(variables, values):
        variable.assign(value)


def _check_float_inputs(graph):
    for name in graph.graph["inputs"]:
        tensor = graph.nodes[name]["info"].output
        consumers = [graph.nodes[v]["info"] for v in graph.successors(name)]
        if "float" in tensor.dtype or all(c.class_name == "Embedding" for c in consumers):
            continue
        first = consumers[0] if consumers else None
        raise ValueError(
            f"Input '{name}' has dtype {tensor.dtype}, but the layer that reads it "
            f"('{first.name}', {first.class_name}) computes in floats. Declare the input as "
            f"keras.Input(..., dtype='float32') and cast the data, or feed integers to an Embedding."
        )


# Ops TensorFlow DTensor has no layout rule for: a step that contains one fails ("does not implement
# layout propagation"), and the TensorList ops of a while loop (Keras' recurrences) crashed the process.
UNRUNNABLE_OPS = frozenset({
    "TensorListReserve", "TensorListFromTensor", "TensorListStack", "TensorListGetItem", "TensorListSetItem",
    "TensorListPushBack", "TensorListPopBack", "TensorListConcatV2", "TensorListSplit", "TensorListGather",
    "TensorListScatterIntoExistingList", "TensorArrayV3", "OptionalFromValue", "ExtractImagePatches",
    "FusedBatchNormV3", "FusedBatchNormGradV3", "ReverseV2",
})


def _refuse_layers_dtensor_cannot_run(graph):
    """A layer with no rule runs replicated, as the user's own code; refuse it, before any change, when
    that code uses an op DTensor cannot run, naming the layer, the op and the way out."""
    for name in graph:
        info = graph.nodes[name]["info"]
        if info.class_name == "InputLayer" or has_rule_for(info):
            continue
        unrunnable = sorted(_ops_of(info) & UNRUNNABLE_OPS)
        if unrunnable:
            raise ValueError(
                f"Layer '{name}' ({info.class_name}) has no keras_lwp rule and computes with {unrunnable[0]}, an op "
                "TensorFlow DTensor cannot run on a mesh (it fails, or crashes the process). Register a rule whose "
                "implementation avoids that op (keras_lwp.layers.register_rule; docs/how-it-works.md, 'Adding a layer "
                "rule'), or build the model without this layer.")


def _ops_of(info):
    """The op types of one call of a layer, forward and backward (while-loop bodies included)."""
    import keras
    import tensorflow as tf

    call = info.calls[0] if info.calls else None
    if call is None or call.node is None or info.layer is None:
        return set()
    layer = info.layer
    specs = [tf.TensorSpec(t.shape, tf.as_dtype(t.dtype)) for t in call.inputs]

    def forward_and_backward(*xs):
        floats = [x for x in xs if x.dtype.is_floating]
        with tf.GradientTape() as tape:
            tape.watch(floats)
            args, kwargs = keras_internals.call_arguments(call.node, {id(t): x for t, x in zip(call.node.input_tensors, xs)})
            out = layer(*args, **kwargs)
        outs = [o for o in keras.tree.flatten(out) if tf.is_tensor(o) and o.dtype.is_floating]
        sources = floats + list(layer.trainable_variables)
        return tape.gradient(outs, sources) if outs and sources else outs

    try:
        graph_def = tf.function(forward_and_backward).get_concrete_function(*specs).graph.as_graph_def()
    except Exception:  # noqa: BLE001  a layer that cannot be traced alone: its step will say why
        return set()
    ops = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


def _mesh_for(plan_mesh, dmesh):
    """The dtensor.Mesh a plan runs on: the given one, or the same devices with the plan's axes."""
    from tensorflow.experimental import dtensor

    if mesh_spec_of(dmesh).axes == plan_mesh.axes:
        return dmesh
    if mesh_spec_of(dmesh).size != plan_mesh.size:
        raise ValueError(
            f"The strategy was planned for {plan_mesh} ({plan_mesh.size} devices) but the mesh has "
            f"{mesh_spec_of(dmesh).size} devices. Search again on this mesh."
        )
    # The same devices, numbered the same way (row-major), seen with the plan's axes; on a
    # multi-client mesh each client keeps its own local devices.
    global_ids = np.asarray(dmesh.global_device_ids()).reshape([size for _, size in plan_mesh.axes])
    return dtensor.Mesh(list(plan_mesh.axis_names), global_ids, list(dmesh.local_device_ids()),
                        list(dmesh.local_devices()))


def dtensor_layout(spec, mesh):
    """The dtensor.Layout of a keras_lwp layout tuple (cached: every batch is packed with one)."""
    return placement.layout(spec, mesh)


def _fit(spec, shape, mesh_spec):
    """Drop the splits a concrete shape does not allow (a partial last batch): replicate instead."""
    return tuple(
        a if a is None or shape[i] is None or shape[i] % mesh_spec.axis_size(a) == 0 else None
        for i, a in enumerate(spec)
    )


def relayout_to(tensor, spec, mesh, source=None):
    """`tensor` laid out as `spec` on `mesh` (a tensor not on the mesh is put there), through
    relayouts DTensor computes exactly (keras_lwp.placement); `source` is the layout the plan gave
    the tensor, if keras_lwp knows it."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    shape = tuple(tensor.shape)
    spec = _fit(spec, shape, mesh_spec_of(mesh))
    if tf.executing_eagerly() and not dtensor.is_dtensor(tensor):
        return to_mesh(tensor, spec, mesh)
    if source is not None:
        source = _fit(source, shape, mesh_spec_of(mesh))
    return placement.relayout(tensor, spec, mesh, source=source)


def to_mesh(value, spec, mesh):
    """Put a host value on the mesh, each device receiving only its own block (dtensor.pack).

    On a multi-client mesh every client passes the whole value and packs the blocks of its own
    (local) devices."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    if tf.is_tensor(value) and dtensor.is_dtensor(value):  # e.g. an optimizer slot Keras built from a DVariable
        return placement.relayout(value, _fit(spec, tuple(value.shape), mesh_spec_of(mesh)), mesh)
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    mesh_spec = mesh_spec_of(mesh)
    spec = _fit(spec, array.shape, mesh_spec)
    sizes = [s for _, s in mesh_spec.axes]
    components = []
    for coords in _local_coordinates(mesh):
        block = []
        for axis, mesh_axis in enumerate(spec):
            if mesh_axis is None:
                block.append(slice(None))
            else:
                index = mesh_spec.axis_names.index(mesh_axis)
                width = array.shape[axis] // sizes[index]
                block.append(slice(coords[index] * width, (coords[index] + 1) * width))
        components.append(array[tuple(block)])  # a view: no copy on the host
    return dtensor.pack(components, dtensor_layout(spec, mesh))


_COORDINATES = {}


def _local_coordinates(mesh):
    """Mesh coordinates of this client's devices, in the order dtensor.pack takes components."""
    key = id(mesh)
    if key not in _COORDINATES:
        ids = np.asarray(mesh.global_device_ids())
        where = {int(d): tuple(int(c) for c in np.unravel_index(i, ids.shape)) for i, d in enumerate(ids.ravel())}
        _COORDINATES[key] = (mesh, [where[int(d)] for d in mesh.local_device_ids()])
    return _COORDINATES[key][1]


def to_host(value):
    """A DTensor gathered into one ordinary tensor (sharded DTensors have no .numpy()).

    The relayout to replicated is an all-gather over every device of the mesh, those of other
    clients too: on a multi-client mesh every client gets the whole value (and must call this too)."""
    from tensorflow.experimental import dtensor

    if isinstance(value, dtensor.DVariable):
        value = value.read_value()
    if not dtensor.is_dtensor(value):
        return value
    layout = dtensor.fetch_layout(value)
    if not layout.is_fully_replicated():
        value = dtensor.relayout(value, dtensor.Layout.replicated(layout.mesh, layout.rank))
    return dtensor.unpack(value)[0]


def _variable_to_mesh(variable, spec, mesh):
    """Back a Keras variable by a DVariable with layout `spec`, keeping its value; reading it to the
    host (numpy, get_weights, save) gathers it and assigning a host value shards it."""
    from tensorflow.experimental import dtensor

    value = keras_internals.backing_variable(variable)
    if isinstance(value, dtensor.DVariable):
        return
    keras_internals.set_backing_variable(
        variable, dtensor.DVariable(to_mesh(value.read_value(), spec, mesh), trainable=variable.trainable,
                                    name=variable.path.replace("/", "_")),
        dtensor_layout(spec, mesh))
    variable.__class__ = _sharded_class(type(variable))


_SHARDED_CLASSES = {}


def _sharded_class(base):
    """A subclass of Keras' TF Variable whose host-side reads and writes go through the mesh."""
    if base in _SHARDED_CLASSES.values():
        return base
    if base not in _SHARDED_CLASSES:
        import tensorflow as tf
        from tensorflow.experimental import dtensor

        class MeshVariable(base):
            def numpy(self):
                return np.asarray(to_host(self._value))

            def __array__(self, dtype=None, copy=None):
                return np.asarray(to_host(self._value), dtype=dtype)

            def _direct_assign(self, value):
                if tf.executing_eagerly() and not dtensor.is_dtensor(value):
                    value = to_mesh(tf.cast(value, self._value.dtype), spec_of(self._layout), self._layout.mesh)
                self._value.assign(value)

        MeshVariable.__name__ = MeshVariable.__qualname__ = f"Mesh{base.__name__}"
        _SHARDED_CLASSES[base] = MeshVariable
    return _SHARDED_CLASSES[base]


def _apply(graph, plan, mesh):
    spec = mesh_spec_of(mesh)
    for name in graph:
        info = graph.nodes[name]["info"]
        if info.class_name == "InputLayer":
            continue
        place = Placement(info, dimensions_of(info), plan[name], spec)
        layer_to_mesh(info.layer, place, mesh)
        _wrap_call(info.layer, place, mesh, _input_sources(graph, plan, name, spec))


def _input_sources(graph, plan, name, spec):
    """{input index: the layout the plan gives the tensor arriving there} for a layer's inputs, where
    every call of the layer receives it in the same layout: the relayout into the layer then takes an
    exact path without asking DTensor which layout the tensor has."""
    sources = {}
    for producer in graph.predecessors(name):
        info = graph.nodes[producer]["info"]
        place = Placement(info, dimensions_of(info), plan[producer], spec)
        produced = info.calls[0].outputs
        for out_index, _, in_index, tensor in graph.edges[producer, name]["tensors"]:
            layout = place.output_layout(produced[out_index] if out_index < len(produced) else tensor)
            sources[in_index] = layout if sources.get(in_index, layout) == layout else None
    return {index: layout for index, layout in sources.items() if layout is not None}


def layer_to_mesh(layer, place, mesh):
    """A layer's variables onto the mesh: its weights with their configuration's layouts, the rest
    (a random layer's seed state) replicated. Left on the host, a seed state is read, incremented and
    written by every device of a step at once, racing: masks changed from run to run under one seed."""
    for index, weight in enumerate(layer.weights):
        _variable_to_mesh(weight, place.weight_layout(index), mesh)
    for variable in _state_variables(layer):
        _variable_to_mesh(variable, (None,) * len(variable.shape), mesh)


def _state_variables(layer):
    """A layer's (or model's) variables that are not weights: the seed states of its random layers."""
    return [v for v in layer.variables if not any(v is w for w in layer.weights)]


def _wrap_call(layer, place, mesh, sources=None):
    """Relayout the inputs to what the configuration needs and the output to its layout; where the
    layer's rule implements a split DTensor refuses, run that implementation instead of `call`."""
    import keras
    import tensorflow as tf

    sources = sources or {}
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
        for key, index in (("value", 1), ("key", 2)):
            if tf.is_tensor(kwargs.get(key)):
                kwargs[key] = _relayout_input(place, index, kwargs[key], mesh, sources)
        with _draws_as_one_device(mesh):
            outputs = original(inputs, *rest, **kwargs) if args else original(**kwargs)
        return keras.tree.map_structure(
            lambda t: _relayout_output(t, place.output_layout(t), mesh) if tf.is_tensor(t) else t, outputs)

    layer._keras_lwp_original_call = layer.call
    layer.call = call


# Keras' random draws by shape (keras.src.backend.random, which layers and keras.random call).
_SHAPED_DRAWS = ("normal", "uniform", "truncated_normal", "randint")


@contextlib.contextmanager
def _draws_as_one_device(mesh):
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
            return relayout_to(value, (None,) * len(value.shape), mesh)
        return wrapped

    def dropout(inputs, rate, noise_shape=None, seed=None):
        if not isinstance(rate, (int, float)) or not 0 < rate < 1:
            return saved["dropout"](inputs, rate, noise_shape, seed)
        shape = keras_internals.concrete_noise_shape(inputs, noise_shape)
        # Keras' own dropout of ones: 1/(1-rate) where kept, else 0, from the same draw of the same seed.
        mask = saved["dropout"](tf.ones(shape, inputs.dtype), rate, None, seed)
        return inputs * relayout_to(mask, (None,) * len(mask.shape), mesh)

    for name in _SHAPED_DRAWS:
        setattr(module, name, whole(saved[name]))
    module.dropout = dropout
    try:
        yield
    finally:
        for name, draw in saved.items():
            setattr(module, name, draw)


def _wrap_model_outputs(model, graph, plan, mesh):
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
            lambda t: _relayout_output(t, (sample_axis,) + (None,) * (len(t.shape) - 1), mesh) if tf.is_tensor(t)
            else t, outputs)

    model.call = call


# What Keras reads from a tensor beside its value: the losses' logits (keras/src/backend/tensorflow/
# nn.py: _get_logits takes `_keras_logits`, or the input of the Softmax/Sigmoid op that made the
# output) and the mask Keras' losses and metrics apply (`_keras_mask`).
_LOGITS_OPS = ("Softmax", "Sigmoid")


def _relayout_output(tensor, spec, mesh):
    """A layer's (or the model's) output relaid to `spec`, keeping what Keras reads from the output
    tensor itself: a relayout is a new tensor, and from it a cross-entropy would compute on
    probabilities instead of the logits the single-device loss uses (another loss, not rounding)."""
    import tensorflow as tf

    relaid = relayout_to(tensor, spec, mesh)
    if relaid is tensor:
        return relaid
    logits = getattr(tensor, "_keras_logits", None)
    if logits is None and not tf.executing_eagerly() and getattr(tensor, "op", None) is not None \
            and tensor.op.type in _LOGITS_OPS and len(tensor.op.inputs) == 1:
        logits = tensor.op.inputs[0]
    mask = getattr(tensor, "_keras_mask", None)
    try:
        if logits is not None:
            relaid._keras_logits = relayout_to(logits, spec, mesh)
        if mask is not None:
            relaid._keras_mask = relayout_to(mask, spec[:len(mask.shape)], mesh)
    except AttributeError:  # an EagerTensor takes no attributes (run_eagerly): Keras reads none either
        pass
    return relaid


def _relayout_input(place, index, tensor, mesh, sources):
    import tensorflow as tf

    if not tf.is_tensor(tensor) or index >= len(place.info.calls[0].inputs):
        return tensor
    return relayout_to(tensor, place.input_layout(index, tensor), mesh, source=sources.get(index))


# -- train / test / predict functions -----------------------------------------------------------

def _install_functions(model):
    model.make_train_function = types.MethodType(_make_train_function, model)
    model.make_test_function = types.MethodType(_make_test_function, model)
    model.make_predict_function = types.MethodType(_make_predict_function, model)
    model.train_function = model.test_function = model.predict_function = None


def _move_state_to_mesh(model):
    """Optimizer and metric variables onto the mesh: slots like their weight, the rest replicated."""
    mesh = model._keras_lwp.mesh
    variables = []
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        if not optimizer.built:
            _host_slots(optimizer)
            optimizer.build(model.trainable_variables)
        _dense_sparse_updates(optimizer)
        variables += list(optimizer.variables)
    for metric in model.metrics:
        variables += list(metric.variables)
    for variable in variables:
        layout = getattr(variable, "_layout", None)
        _variable_to_mesh(variable, spec_of(layout) if layout is not None else (None,) * len(variable.shape), mesh)


def _dense_sparse_updates(optimizer):
    """An optimizer's sparse additions to a variable (an Embedding's gradient rows: ResourceScatterAdd/
    Sub, which have no DTensor layout rule) made dense: the dense sum of the rows adds what the
    scatter adds, duplicates included. The optimizer's arithmetic on the rows (Adam squares each row
    before duplicates are summed) is untouched, as on one device."""
    import tensorflow as tf

    for target in (optimizer, getattr(optimizer, "inner_optimizer", None)):  # LossScaleOptimizer's too
        if target is None or getattr(target, "_keras_lwp_dense_updates", False):
            continue
        for name in ("assign_add", "assign_sub"):
            update = getattr(target, name)

            def dense(variable, value, update=update):
                if isinstance(value, tf.IndexedSlices):
                    value = tf.convert_to_tensor(value)
                return update(variable, value)

            setattr(target, name, dense)
        target._keras_lwp_dense_updates = True


def _host_slots(optimizer):
    """Keras' TF optimizer creates slots colocated with their weight, which on a DVariable yields a
    plain variable holding a DTensor that DTensor then mis-shapes. Build slots as ordinary host
    variables instead (they keep the weight's `_layout`); `_move_state_to_mesh` moves them."""
    optimizer.add_variable_from_reference = types.MethodType(keras_internals.host_slot_builder(), optimizer)
    inner = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer under mixed precision
    if inner is not None:
        _host_slots(inner)


def _batch_to_mesh(model, data):
    """Shard a batch (x, y, sample_weight) along the sample axis the input layers use."""
    import keras
    import tensorflow as tf

    state = model._keras_lwp
    plan, graph = state.strategy, state.graph
    input_names = graph.graph["inputs"]
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)

    def place(name, value):
        key = (name, len(value.shape))
        if key not in state.input_specs:
            info = graph.nodes[name]["info"]
            placement = Placement(info, dimensions_of(info), plan[name], plan.mesh)
            state.input_specs[key] = placement.output_layout(value)
        return to_mesh(value, state.input_specs[key], state.mesh)

    if isinstance(x, dict):  # named inputs: keys are the input layers' names
        unknown = sorted(set(x) - set(input_names))
        if unknown:
            raise ValueError(f"The data names inputs {unknown} that the model does not have; its inputs are "
                             f"{input_names}. Key the input dict by those names.")
        x = {key: place(key, value) for key, value in x.items()}
    else:
        x = keras.tree.pack_sequence_as(x, [place(n, v) for n, v in zip(input_names, keras.tree.flatten(x))])
    sample_axis = plan[input_names[0]].get("sample")

    def batch_split(value):
        if value is None or not tf.is_tensor(value) and not isinstance(value, np.ndarray):
            return value
        spec = (sample_axis,) + (None,) * (len(value.shape) - 1) if len(value.shape) else ()
        return to_mesh(value, spec, state.mesh)

    y = keras.tree.map_structure(batch_split, y)
    sample_weight = keras.tree.map_structure(batch_split, sample_weight)
    return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)


def _agree_on_batch(model, batch):
    """Multi-client: check that every client feeds this batch (each packs only its own devices'
    blocks of it, so clients with different data would silently train on a mix)."""
    if not multihost.is_multi_client():
        return
    import hashlib

    import keras

    digest = hashlib.sha256()
    for value in keras.tree.flatten(batch):
        if value is None:
            continue
        array = np.ascontiguousarray(value.numpy() if hasattr(value, "numpy") else np.asarray(value))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    multihost.agree(f"the first batch of an epoch of model '{model.name}'", digest.hexdigest(), advice=(
        "Every client must pass fit/evaluate/predict the whole global batch: the same arrays in the same "
        "order, shuffled with a seed every client shares (keras_lwp.initialize seeds Keras, NumPy and "
        "TensorFlow alike; a tf.data pipeline needs the same seeds on every client too)."))


def _step_function(model, step):
    import tensorflow as tf

    # No reduce_retracing: a relaxed (None) batch dimension would hide whether the batch divides.
    return step if model.run_eagerly else tf.function(step)


def _make_train_function(model, force=False):
    if model.train_function is not None and not force:
        return model.train_function
    model.train_function = _stepper(model, model.train_step)
    return model.train_function


def _make_test_function(model, force=False):
    if model.test_function is not None and not force:
        return model.test_function
    model.test_function = _stepper(model, model.test_step)
    return model.test_function


def _stepper(model, step_function):
    """A Keras train/test function: one sharded batch at a time through Keras' own step.

    The step returns the metric results as replicated DTensors, so no host copy. DTensor dispatches
    a step asynchronously, so the next batch is taken and packed onto the mesh while the current
    step runs; it is kept for the next call on the same iterator (Keras keeps one iterator across
    epochs when steps_per_epoch is set)."""
    import tensorflow as tf

    step = _step_function(model, step_function)
    ready = []
    checked = []  # a weak reference to the iterator whose first batch the clients compared (multi-client)
    pending = []  # [iterator, its next batch packed (None if packing failed), the batch]

    def take(iterator):
        if pending:
            source, packed, batch = pending
            pending.clear()  # also drops a batch prefetched from an iterator Keras has let go
            if source is iterator:
                return packed if packed is not None else _batch_to_mesh(model, batch)
        batch = next(iterator)
        if multihost.is_multi_client() and (not checked or checked[0]() is not iterator):
            checked[:] = [_weak(iterator)]  # its first batch (an epoch's): every client must feed the same
            _agree_on_batch(model, batch)
        if not ready:
            # Keras builds compile metrics lazily inside the first step; built there, their
            # variables would not be on the mesh (accuracy's count came out 7x too large).
            if getattr(model, "optimizer", None) is not None and not model.optimizer.built:
                _host_slots(model.optimizer)
            keras_internals.symbolic_build(model, batch)
            _move_state_to_mesh(model)
            ready.append(True)
        return _batch_to_mesh(model, batch)

    def prefetch(iterator):
        try:
            batch = next(iterator)
        except (StopIteration, tf.errors.OutOfRangeError):
            return  # the next call's next() raises it again, where Keras expects it
        try:
            pending[:] = [iterator, _batch_to_mesh(model, batch), batch]
        except Exception:  # take() packs it again and raises at its own step
            pending[:] = [iterator, None, batch]

    def function(iterator):
        # Like Keras' own: an execution the data ends inside returns the steps it ran (its callbacks
        # follow); the next call, with nothing left, ends the epoch.
        logs = None
        for _ in range(model.steps_per_execution):
            try:
                batch = take(iterator)
            except (StopIteration, tf.errors.OutOfRangeError):
                if logs is None:
                    raise
                break
            logs = step(batch)
            prefetch(iterator)
        return logs

    return function


def _weak(value):
    """A weak reference to `value`, or a strong one for objects that take none (a list iterator)."""
    try:
        return weakref.ref(value)
    except TypeError:
        return lambda: value


def _make_predict_function(model, force=False):
    import keras

    if model.predict_function is not None and not force:
        return model.predict_function
    step = _step_function(model, model.predict_step)

    def function(data):
        outputs = []
        for batch in data:
            if not outputs:
                _agree_on_batch(model, batch)
            outputs.append(keras.tree.map_structure(to_host, step(_batch_to_mesh(model, batch))))
        if len(outputs) == 1:
            return outputs[0]
        return keras.tree.map_structure(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *outputs)

    model.predict_function = function
    return function


__all__ = ["parallelize", "strategy_of", "to_host", "to_mesh"]
