"""Read a Keras 3 functional or Sequential model into a graph of layers.

A node per layer (a layer called at several places is one node with several calls, so its shared
weights get one layout); an edge per producer/consumer pair carrying the tensors that flow on it.
Nested functional models are flattened into their layers. What the rest of keras_lwp reads is plain
data (`LayerInfo`, `LayerCall`, `TensorInfo`), so the cost model and the search never touch Keras.
"""

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx

from keras_lwp import keras_internals


@dataclass(frozen=True)
class TensorInfo:
    """Shape (batch dim resolved to the planned batch size) and dtype of one tensor."""

    shape: tuple
    dtype: str

    @property
    def itemsize(self):
        return dtype_size(self.dtype)

    @functools.cached_property
    def nbytes(self):  # cached: the cost tables ask for it thousands of times
        return math.prod(self.shape) * self.itemsize


@dataclass(frozen=True)
class LayerCall:
    """One place the layer is called: its input and output tensors, and the Keras node of the call
    (its arguments let the profiler call the layer the way the model does).

    `input_gradients` says, per input, whether training needs its gradient: only when trainable
    weights lie upstream (not for the model's inputs); empty when unknown (all float inputs do).
    """

    inputs: tuple
    outputs: tuple
    node: object = field(default=None, repr=False, compare=False)
    input_gradients: tuple = ()


@dataclass(frozen=True)
class WeightInfo:
    name: str
    shape: tuple
    dtype: str
    trainable: bool

    @property
    def nbytes(self):
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass
class LayerInfo:
    """What the planner knows of a layer: class, Keras config, weights and every call."""

    name: str
    class_name: str
    config: dict
    weights: tuple
    calls: list = field(default_factory=list)
    layer: object = field(default=None, repr=False, compare=False)  # the Keras layer, for the rewrap
    sublayers: tuple = ()  # class names of the layers it is made of (a composite layer), nested ones too
    # A composite layer whose call moves entries along the batch axis (runtime.MOVES_SAMPLES): no sample split.
    keeps_batch_whole: bool = False

    @property
    def rule_names(self):
        """The class names a rule may be registered under: the layer's class, then its ancestors up
        to the one that defines `call` (a subclass that only configures Dense computes what Dense
        does; one with its own `call` needs its own rule)."""
        if self.layer is None:
            return (self.class_name,)
        names = []
        for cls in type(self.layer).__mro__:
            names.append(cls.__name__)
            if "call" in vars(cls):
                break
        return tuple(names)

    @functools.cached_property
    def signature(self):
        """A hashable key of everything the layer's costs, layouts and memory depend on: class and
        rule lookup, Keras configuration less its name, weights and every call's tensors. Identical
        layers (the repeated blocks of a ResNet: 517 layers, 48 signatures) share it, so the planner
        prices each kind once. Read once the graph is complete. (The profiled cost model keys its
        on-disk measurements by keras_lwp.cost.profiled.layer_signature, a JSON form that must stay
        stable across versions; this one only lives for one plan.)"""
        weights = tuple((w.shape, w.dtype, w.trainable) for w in self.weights)
        calls = tuple((c.inputs, c.outputs, c.input_gradients) for c in self.calls)
        config = _frozen({k: v for k, v in self.config.items() if k != "name"})
        return (self.rule_names, config, weights, calls, self.sublayers, self.keeps_batch_whole)

    @property
    def output(self):
        """The first output of the first call (what a configuration's dimensions refer to)."""
        return self.calls[0].outputs[0]

    @property
    def inputs(self):
        return self.calls[0].inputs


def _frozen(value):
    """A hashable copy of a Keras config value (dicts and lists nest; anything else unhashable by repr)."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


_DTYPE_SIZES = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
}


def dtype_size(dtype):
    return _DTYPE_SIZES.get(str(dtype), 4)


def layer_graph(model, batch_size, input_shapes=None):
    """The layer graph of a Keras functional or Sequential model.

    `input_shapes` ({input name: shape without the batch}) fixes the dimensions a model leaves open
    (a transformer's sequence length): the graph is then read from a twin of the model called on
    inputs of those shapes, made of the same layers and operations (so the plan applies to the model).

    Returns a `networkx.DiGraph` whose nodes are layer names in topological order with attribute
    `info` (a LayerInfo), and whose edges u->v have attribute `tensors`: a list of
    (producer output index, consumer call index, consumer input index, TensorInfo).
    The graph attribute `inputs` / `outputs` list the model's input layers and output (layer, index) pairs.
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras.Model. Received: {model!r} of type {type(model).__name__}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: batch_size={batch_size!r}")
    functional = _with_static_shapes(_functional_of(model), input_shapes)
    graph = nx.DiGraph(inputs=[], outputs=[])
    reader = _Reader(graph, batch_size)
    sources = {}
    for tensor in functional.inputs:
        name = reader.add_input(tensor)
        sources[id(tensor)] = (name, 0)
        graph.graph["inputs"].append(name)
    reader.trace(functional, sources)
    graph.graph["outputs"] = [sources[id(t)] for t in functional.outputs]
    if not any(graph.nodes[n]["info"].class_name != "InputLayer" for n in graph):
        raise ValueError(
            f"The model '{model.name}' has no layers besides its inputs: there is nothing to parallelize."
        )
    return graph


def _functional_of(model):
    import keras

    if isinstance(model, keras.Sequential):
        if not model.built or keras_internals.sequential_functional(model) is None:
            raise ValueError(
                f"The Sequential model '{model.name}' is not built, so its layers have no shapes. "
                "Give it an input shape (keras.Input(shape=...) as its first layer) or call model.build(...)."
            )
        return keras_internals.sequential_functional(model)
    if keras_internals.functional_graph(model) is None:
        raise TypeError(
            f"keras_lwp reads the layer graph of functional and Sequential models; the model "
            f"'{model.name}' is a subclass ({type(model).__name__}) whose call() it cannot see. "
            "Rebuild it as a functional model (keras.Model(inputs, outputs)) from the same layers, "
            "or wrap its body in one."
        )
    return model


def _with_static_shapes(functional, input_shapes):
    """`functional`, or its twin on inputs of `input_shapes` when it leaves dimensions open."""
    import keras

    open_inputs = [t for t in functional.inputs if any(d is None for d in tuple(t.shape)[1:])]
    if not open_inputs and not input_shapes:
        return functional
    names = [t.name for t in functional.inputs]
    if input_shapes is not None and not isinstance(input_shapes, Mapping):
        raise ValueError(f"input_shapes must be a dict {{input name: shape without the batch}}, e.g. "
                         f"input_shapes={{{names[0]!r}: (128,)}}. Received: {input_shapes!r}")
    input_shapes = dict(input_shapes or {})
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise ValueError(f"input_shapes names {unknown}, which are not inputs of the model '{functional.name}'; "
                         f"its inputs are {names}.")
    missing = [t.name for t in open_inputs if t.name not in input_shapes]
    if missing:
        shapes = {t.name: tuple(t.shape)[1:] for t in open_inputs}
        raise ValueError(
            f"keras_lwp needs static shapes to plan; the model's inputs {shapes} leave dimensions open. Pass their "
            f"shapes without the batch, e.g. input_shapes={{{', '.join(f'{n!r}: (128,)' for n in missing)}}} "
            "(a sequence length of 128), or build the model on inputs of fixed shapes.")
    static = {}
    for tensor in functional.inputs:
        shape = tuple(input_shapes.get(tensor.name, tuple(tensor.shape)[1:]))
        given = tuple(tensor.shape)[1:]
        if len(shape) != len(given) or any(g is not None and g != s for g, s in zip(given, shape)):
            raise ValueError(f"input_shapes[{tensor.name!r}] = {shape} does not fit the input's shape {given} "
                             "(without the batch): give a value for each open dimension and keep the others.")
        static[id(tensor)] = keras.Input(shape, dtype=tensor.dtype, name=tensor.name)
    structure = keras.tree.map_structure(lambda t: static[id(t)], functional.input)
    # The same layers and operations, called once more on the static inputs (nothing is copied).
    return keras.models.clone_model(functional, input_tensors=structure, clone_function=lambda layer: layer)


def _shaped_like(functional, tensors):
    """`functional` (a model nested in the one being read), or its twin on inputs shaped as `tensors`
    (what the outer model calls it on) when its own inputs leave dimensions open: a keras_hub
    backbone called as a layer keeps the open sequence length of its own inputs."""
    import keras

    inner = list(functional.inputs)
    if len(inner) != len(tensors) or all(tuple(i.shape)[1:] == tuple(t.shape)[1:] for i, t in zip(inner, tensors)):
        return functional
    static = {id(i): keras.Input(tuple(t.shape)[1:], dtype=i.dtype, name=i.name) for i, t in zip(inner, tensors)}
    structure = keras.tree.map_structure(lambda t: static[id(t)], functional.input)
    return keras.models.clone_model(functional, input_tensors=structure, clone_function=lambda layer: layer)


class _Reader:
    def __init__(self, graph, batch_size):
        self.graph = graph
        self.batch_size = batch_size
        self.layer_names = {}  # id(layer) -> node name
        self.differentiable = set()  # (node, output index) whose value depends on trainable weights

    def tensor_info(self, tensor):
        shape = tuple(tensor.shape)
        if shape and shape[0] is None:
            shape = (self.batch_size,) + shape[1:]
        if any(s is None for s in shape):
            raise ValueError(
                f"keras_lwp needs static shapes to plan; the tensor '{tensor.name}' has shape {tuple(tensor.shape)}. "
                "Give the model's inputs fixed shapes other than the batch dimension."
            )
        return TensorInfo(tuple(int(s) for s in shape), str(tensor.dtype))

    def node_name(self, layer):
        key = id(layer)
        if key not in self.layer_names:
            name = layer.name
            taken = {n for n in self.graph.nodes}
            suffix = 1
            while name in taken:  # two nested models may hold layers with the same name
                suffix += 1
                name = f"{layer.name}_{suffix}"
            self.layer_names[key] = name
        return self.layer_names[key]

    def add_layer(self, layer):
        name = self.node_name(layer)
        if name not in self.graph:
            weights = tuple(
                WeightInfo(w.path, tuple(int(s) for s in w.shape), str(w.dtype), bool(w.trainable))
                for w in getattr(layer, "weights", ())  # an operation (keras.ops) has none
            )
            try:
                config = layer.get_config()
            except Exception:  # noqa: BLE001  (not implemented, or broken: keras_hub's LlamaTransformerDecoder)
                config = {}
            inner = keras_internals.sublayers(layer)
            self.graph.add_node(name, info=LayerInfo(name, type(layer).__name__, config, weights, [], layer,
                                                     tuple(type(each).__name__ for each in inner)))
        return name

    def add_input(self, tensor):
        layer = keras_internals.history_layer(tensor)
        name = self.add_layer(layer)
        info = self.graph.nodes[name]["info"]
        t = self.tensor_info(tensor)
        info.calls.append(LayerCall((), (t,)))
        return name

    def trace(self, functional, sources):
        """Walk `functional`'s nodes in topological order; `sources` maps id(KerasTensor) to the
        (flat node name, output index) that produces it, and is extended as we go."""
        import keras

        nodes_by_depth = keras_internals.functional_graph(functional)
        for depth in sorted(nodes_by_depth, reverse=True):
            for node in nodes_by_depth[depth]:
                op = node.operation
                if type(op).__name__ == "InputLayer":
                    continue
                inputs = list(node.input_tensors)
                missing = [t for t in inputs if id(t) not in sources]
                if missing:
                    raise ValueError(f"Layer '{op.name}' reads a tensor that is not produced inside the model.")
                if isinstance(op, keras.Model):
                    inner = _shaped_like(_functional_of(op), inputs)
                    inner_sources = {id(i): sources[id(o)] for i, o in zip(inner.inputs, inputs)}
                    self.trace(inner, inner_sources)
                    for outer, produced in zip(node.output_tensors, inner.outputs):
                        sources[id(outer)] = inner_sources[id(produced)]
                    continue
                name = self.add_layer(op)  # a layer, or an operation (keras.ops in a functional model)
                info = self.graph.nodes[name]["info"]
                call_index = len(info.calls)
                gradients = tuple(sources[id(t)] in self.differentiable for t in inputs)
                info.calls.append(
                    LayerCall(
                        tuple(self.tensor_info(t) for t in inputs),
                        tuple(self.tensor_info(t) for t in node.output_tensors),
                        node,
                        gradients,
                    )
                )
                if any(gradients) or any(w.trainable for w in info.weights):
                    self.differentiable.update((name, i) for i in range(len(node.output_tensors)))
                for input_index, tensor in enumerate(inputs):
                    producer, out_index = sources[id(tensor)]
                    if not self.graph.has_edge(producer, name):
                        self.graph.add_edge(producer, name, tensors=[])
                    self.graph.edges[producer, name]["tensors"].append(
                        (out_index, call_index, input_index, self.tensor_info(tensor))
                    )
                for out_index, tensor in enumerate(node.output_tensors):
                    sources[id(tensor)] = (name, out_index)
