"""parallelize(model, mesh): run a Strategy on TensorFlow DTensor behind plain `fit`.

Every change parallelize makes to Keras objects, and every private Keras name it uses, is listed in
keras_lwp.keras_internals (checked by tests/test_keras_internals.py). The work is split along its seams:

| module                | what it does to the model                                                    |
|-----------------------|------------------------------------------------------------------------------|
| keras_lwp.placement   | every weight (and seed state) becomes a `dtensor.DVariable` in its layer's  |
|                       | weight layout; the optimizer's and metrics' state goes on the mesh likewise |
| keras_lwp.wrapping    | each layer's `call` (and the model's) relays its inputs and output to the   |
|                       | plan's layouts, so DTensor inserts exactly the plan's communication          |
| keras_lwp.fit_loop    | Keras' train/test/predict functions, replaced by ones DTensor can run       |
| keras_lwp.op_rewrites | while a step is traced, ops DTensor cannot run (or runs wrong) computed     |
|                       | from ops it runs: grouped/dilated convolutions, roll, top_k's gradient, ... |

This module checks the model, plans it (keras_lwp.planner) and applies the plan. On a mesh spanning
several clients (keras_lwp.multihost), each client packs only its own devices' blocks of the batch it
is given (the whole global batch), host reads gather across clients, and parallelize checks that every
client runs the same plan and starts from client 0's weights.
"""

import os
import warnings

import numpy as np

from keras_lwp import fit_loop, keras_internals, multihost, op_rewrites, placement, wrapping
from keras_lwp.cost.calibration import default_profile
from keras_lwp.graph import layer_graph
from keras_lwp.layers import Placement, dimensions_of, has_rule_for, is_composite
from keras_lwp.mesh import make_mesh, mesh_spec_of
from keras_lwp.placement import to_host, to_mesh
from keras_lwp.planner import plan_graph, _batch_size
from keras_lwp.strategy import Strategy

# Ops with no DTensor layout rule (docs/design.md), run replicated: AveragePooling's gradient (3-D's
# too: AveragePooling3D, which has no rule, failed its step without it), the depthwise convolution's
# filter gradient (DepthwiseConv2D, SeparableConv2D, so MobileNet).
for _op in ("AVGPOOLGRAD", "AVGPOOL3DGRAD", "DEPTHWISECONV2DNATIVEBACKPROPFILTER", "DEPTHWISECONV2DNATIVEBACKPROPINPUT"):
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


def parallelize(model, mesh, strategy="auto", *, overrides=None, batch_size=None, profile=None, cost_model="analytic",
                strict=False, hidden_dimensions=False, memory_limit=None, input_shapes=None):
    """Shard `model` over `mesh` layer by layer, then train it with the usual `compile`/`fit`.

    Args:
        model: a built Keras functional or Sequential model.
        mesh: a dtensor.Mesh, a keras.distribution.DeviceMesh or a dict {axis: size} over this
            process's devices.
        strategy: "auto" (searched), "data", "model", "owt", or a Strategy (e.g. from
            keras_lwp.search or Strategy.from_json).
        overrides: {layer name or pattern: {dimension: mesh axis}} pinned for the search.
        batch_size: the global batch size to plan for (default: 32 per device).
        profile, strict, hidden_dimensions, memory_limit, input_shapes: as in keras_lwp.search.
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
    graph = layer_graph(model, batch_size, input_shapes)  # refuses subclassed and empty models before any change
    _check_float_inputs(graph)
    _check_layers_run_on_dtensor(graph)
    if isinstance(strategy, str) and strategy.endswith(".json"):
        strategy = Strategy.from_json(strategy)
    if isinstance(strategy, Strategy):
        strategy = _batch_kept_whole(strategy, graph)
    profile = default_profile(profile, cost_model, devices_present=True)
    plan = plan_graph(graph, spec, batch_size, strategy, overrides=overrides, profile=profile, cost_model=cost_model,
                      strict=strict, hidden_dimensions=hidden_dimensions, memory_limit=memory_limit,
                      optimizer=getattr(model, "optimizer", None))
    run_mesh = _mesh_for(plan.mesh, dmesh)
    # Multi-client: every client must run this plan (keras_lwp.multihost) and start from the same weights.
    multihost.agree(f"the plan of model '{model.name}'", _what_runs(plan), advice=(
        "Every client must plan the same model on the same mesh with the same batch size, strategy, overrides "
        "and cost model (a profiled cost model measured once and shared): compare "
        "keras_lwp.strategy_of(model).summary() across the clients."))
    model._keras_lwp = ParallelizedModel(plan, run_mesh, graph)
    fit_loop.install_pipeline_options(model)
    if spec.size == 1:
        return model  # one device: nothing to shard, so no DTensor machinery either (and no overhead)
    _weights_from_first_client(model, run_mesh)
    _apply(graph, plan, run_mesh)
    wrapping.wrap_model_outputs(model, graph, plan, run_mesh)
    fit_loop.install_functions(model)
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
    variables = model.weights + placement.state_variables(model)  # seed states too: every client draws alike
    values = multihost.broadcast_from_first_client([np.asarray(v.numpy()) for v in variables], mesh)
    for variable, value in zip(variables, values):
        variable.assign(value)


def _check_float_inputs(graph):
    """Refuse an integer input that a layer keras_lwp plans reads as its data (a Dense or Conv fed token
    ids); ids for an Embedding, and masks or ids passed to other layers and operations, are fine."""
    for name in graph.graph["inputs"]:
        tensor = graph.nodes[name]["info"].output
        if "float" in tensor.dtype:
            continue
        for consumer in graph.successors(name):
            info = graph.nodes[consumer]["info"]
            as_data = any(in_index == 0 for _, _, in_index, _ in graph.edges[name, consumer]["tensors"])
            # A layer made of layers (keras_hub's TokenAndPositionEmbedding) may look its ids up itself.
            if (as_data and has_rule_for(info) and not is_composite(info)
                    and not any(n.endswith("Embedding") for n in info.rule_names)):
                raise ValueError(
                    f"Input '{name}' has dtype {tensor.dtype}, but the layer that reads it ('{info.name}', "
                    f"{info.class_name}) computes in floats. Declare the input as keras.Input(..., dtype='float32') "
                    "and cast the data, or feed integers to an Embedding.")


# Ops TensorFlow DTensor has no layout rule for: a step that contains one fails ("does not implement
# layout propagation"), and the TensorList ops of a while loop (Keras' recurrences) crashed the process.
UNRUNNABLE_OPS = frozenset({
    "TensorListReserve", "TensorListFromTensor", "TensorListStack", "TensorListGetItem", "TensorListSetItem",
    "TensorListPushBack", "TensorListPopBack", "TensorListConcatV2", "TensorListSplit", "TensorListGather",
    "TensorListScatterIntoExistingList", "TensorArrayV3", "OptionalFromValue", "ExtractImagePatches",
    "FusedBatchNormV3", "FusedBatchNormGradV3", "ReverseV2",
    # tf.roll and XLA's dynamic_update_slice (run replicated by DTensor's default, it crashed the
    # process). keras.ops.roll and slice_update with shifts and starts known when traced avoid them
    # (op_rewrites.ops_dtensor_runs).
    "XlaDynamicUpdateSlice", "Roll",
    # No layout rule, whatever the layouts (each failed a step whose layer ran replicated, 2026-12-07):
    # a dilated convolution's way on CPU (keras.ops' dilated convolutions avoid it), cumulative
    # products, matrix diagonals (keras.ops.cumprod and diagonal avoid them) and inverses.
    "SpaceToBatchND", "BatchToSpaceND", "Cumprod", "MatrixDiagPartV3", "MatrixInverse",
    "ImageProjectiveTransformV3",  # RandomZoom, RandomTranslation, RandomRotation
})
# What `_ops_of` reports for a function compiled with XLA (jit_compile=True): DTensor runs it without
# XLA, to wrong values and no error. Keras computes grouped convolutions so (keras_hub's HGNetV2 blocks
# trained 2e-3 away from one device, its loss read 0): wrapped calls run those without XLA
# (op_rewrites.ops_dtensor_runs), so what is left is a layer's own jit_compile.
JIT_COMPILED = "an XLA-compiled function (jit_compile=True)"
# What `_ops_of` reports for a call that moves entries along its inputs' batch axis through a rewrite
# (op_rewrites.leading_axis_moves): split by samples, DTensor cannot lay that out (its first step
# failed), so a layer made of layers doing so is kept whole along the batch.
MOVES_SAMPLES = "a keras.ops roll, map or scan along the batch axis"


def _check_layers_run_on_dtensor(graph):
    """A layer with no rule runs replicated, as the user's own code; refuse it, before any change, when
    that code uses an op DTensor cannot run, naming the layer, the op and the way out. A layer made of
    layers whose call moves entries along its batch axis is marked to stay whole along it (with a
    warning): split by samples, DTensor cannot lay that out."""
    for name in graph:
        info = graph.nodes[name]["info"]
        if info.class_name == "InputLayer" or has_rule_for(info) and not is_composite(info):
            continue  # a composite layer runs its own call: its ops are checked like an unknown layer's
        ops = _ops_of(info)
        if MOVES_SAMPLES in ops and is_composite(info):
            info.keeps_batch_whole = True
            warnings.warn(
                f"Layer '{name}' ({info.class_name}) computes {MOVES_SAMPLES}, which TensorFlow DTensor cannot lay out "
                f"when the layer is split by samples: keras_lwp runs it whole along the batch, under any strategy.",
                stacklevel=3)
        unrunnable = sorted(ops & (UNRUNNABLE_OPS | {JIT_COMPILED}))
        if unrunnable and type(info.layer).__module__.startswith("keras.src.layers.preprocessing"):
            raise ValueError(
                f"Layer '{name}' ({info.class_name}) computes with {unrunnable[0]}, an op TensorFlow DTensor cannot run on "
                f"a mesh. It is a preprocessing layer: apply it to the data instead (a tf.data pipeline's "
                f"`dataset.map(lambda x, y: (layer(x, training=True), y))`), and parallelize the model without it.")
        if unrunnable:
            loop = ""
            if unrunnable[0].startswith(("TensorList", "TensorArray")):
                loop = (f" TensorFlow runs a loop so (a while loop, tf.TensorArray, or a keras.ops fori_loop, scan or map "
                        f"over more than {op_rewrites.MAX_UNROLLED_STEPS} steps or over a number of steps not known "
                        f"when traced; keras_lwp runs the shorter ones unrolled).")
            raise ValueError(
                f"Layer '{name}' ({info.class_name}) runs its own code (no keras_lwp rule of its own) and computes with {unrunnable[0]}, an op "
                f"TensorFlow DTensor cannot run on a mesh (it fails, crashes the process, or computes wrong values).{loop} Register a rule whose "
                "implementation avoids that op (keras_lwp.layers.register_rule; docs/how-it-works.md, 'Adding a layer "
                "rule'), or build the model without this layer.")


def _batch_kept_whole(strategy, graph):
    """`strategy`, with the layers that keep their batch whole (LayerInfo.keeps_batch_whole, warned
    about) run whole where it splits them by samples."""
    whole = {name for name, config in strategy.items() if name in graph and "sample" in dict(config)
             and graph.nodes[name]["info"].keeps_batch_whole}
    if not whole:
        return strategy
    configs = {name: ({} if name in whole else dict(config)) for name, config in strategy.items()}
    return Strategy(configs, strategy.mesh, name=strategy.name)


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
        with op_rewrites.ops_dtensor_runs(), op_rewrites.leading_axis_moves() as moved:  # as a wrapped call runs them
            graph_def = tf.function(forward_and_backward).get_concrete_function(*specs).graph.as_graph_def()
    except Exception:  # noqa: BLE001  a layer that cannot be traced alone: its step will say why
        return set()
    nodes = list(graph_def.node) + [node for function in graph_def.library.function for node in function.node_def]
    ops = {node.op for node in nodes}
    if set(moved) & {t.shape[0] for t in call.inputs if t.shape}:  # (a time axis as long as the batch counts too)
        ops.add(MOVES_SAMPLES)
    if any("_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b for node in nodes):
        ops.add(JIT_COMPILED)
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


def _apply(graph, plan, mesh):
    spec = mesh_spec_of(mesh)
    for name in graph:
        info = graph.nodes[name]["info"]
        if info.class_name == "InputLayer":
            continue
        place = Placement(info, dimensions_of(info), plan[name], spec)
        placement.layer_to_mesh(info.layer, place, mesh)
        wrapping.wrap_call(info.layer, place, mesh, _input_sources(graph, plan, name, spec))


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


# to_host and to_mesh: where users and tests have always imported them from.
__all__ = ["parallelize", "strategy_of", "to_host", "to_mesh"]
