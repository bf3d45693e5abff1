"""Layer rules: what a layer can split, and the layouts that follow from a configuration.

A rule describes a layer kind by its parallelizable dimensions, each tied to the tensor axes it
splits, the way an einsum index ties operands together:

    Dense  y[n, c] = sum_r x[n, r] * kernel[r, c]
           sample:    y axis 0, x axis 0,    kernel -         (kernel gradient is a partial sum: sync)
           channel:   y axis 1, x -,         kernel axis 1    (x gradient is a partial sum)
           reduction: y -,       x axis 1,   kernel axis 0    (y is a partial sum: all-reduce)

From that one table everything follows mechanically (`Placement`): the DTensor layout of the output,
of each input and of each weight under a configuration, and which tensors come out as partial sums
over which mesh axes (a tensor that lacks a split dimension's index is summed over it). Rules are
registered per Keras class name with `register_rule`; a layer with no rule is planned replicated
and named in one warning. Pure Python: no TensorFlow here.
"""

import itertools
import math
import warnings
from dataclasses import dataclass

from keras_lwp.config import REPLICATED, Config


# Who runs a split of a dimension (DimSpec.runs).
DTENSOR = "dtensor"      # TensorFlow DTensor shards the layer's own call
KERAS_LWP = "keras_lwp"  # the rule's `implementation` computes it from ops DTensor shards
COSTED = "costed"        # nothing runs it yet: costed, and searched only in the full space


@dataclass(frozen=True, kw_only=True)
class DimSpec:
    """One parallelizable dimension of a layer (built by keywords).

    Args:
        name: "sample", "channel", "height", ... (see keras_lwp.config.DIMENSION_ORDER).
        size: its extent; a mesh axis splits it only when the size divides evenly.
        output: the output tensor axis it splits, or None when the output is a partial sum over it.
        inputs: per input, the tensor axis it splits, or None when the layer needs that input whole
            along it (then the input's gradient is a partial sum over it).
        weights: per weight, the weight axis it splits, or None (the weight's gradient is then a
            partial sum over it: gradient synchronization).
        halo: elements of neighbouring data a split needs at each block edge (convolution windows).
        stats: the layer reduces statistics over this dimension (BatchNormalization).
        runs: who runs a split of it: DTENSOR (the layer's own call, sharded by DTensor), KERAS_LWP
            (the rule's `implementation`: "auto" picks such splits only with hidden_dimensions=True;
            overrides and explicit strategies may always use them) or COSTED (nothing runs it yet).
        whole_gradient: the weights split along this dimension get their gradient whole along it (an
            IndexedSlices over the whole weight, which the optimizer densifies), so its synchronization
            carries the unsplit extent (Embedding's vocabulary split).
        partial_sums: how many times a pass all-reduces a partial sum of the output (forward) or of
            an input's gradient (backward) under a split of it where they are partial: 1 for a
            layer, one per row-parallel product for a layer made of layers (a transformer block
            all-reduces after its attention and after its feed-forward).
    """

    name: str
    size: int
    output: object
    inputs: tuple
    weights: tuple
    halo: int = 0
    stats: bool = False
    runs: str = DTENSOR
    whole_gradient: bool = False
    partial_sums: int = 1

    def __post_init__(self):
        if self.runs not in (DTENSOR, KERAS_LWP, COSTED):
            raise ValueError(f"DimSpec {self.name!r}: runs={self.runs!r}; use DTENSOR, KERAS_LWP or COSTED "
                             "(keras_lwp.layers.base).")

    @property
    def runnable(self):
        """A split of it runs (DTensor shards the layer's call, or the rule's implementation computes it)."""
        return self.runs != COSTED

    @property
    def by_keras_lwp(self):
        """A split of it runs through the rule's implementation rather than the layer's own call."""
        return self.runs == KERAS_LWP


class LayerRule:
    """How one kind of layer parallelizes. Subclass and register with `register_rule`.

    `dimensions(info)` lists the DimSpecs; `forward_flops(info, call)` the work of one call.
    """

    def dimensions(self, info):
        raise NotImplementedError

    def forward_flops(self, info, call):
        return float(sum(_numel(t.shape) for t in call.outputs))

    def memory_traffic(self, info, call, config):
        """Bytes one call moves through memory, forward and backward, over all its shards (the cost
        model divides by the split): by default three passes over its inputs and outputs. A rule whose
        implementation of `config` materializes more (keras_lwp.layers.hidden_depthwise) says so."""
        del info, config
        return 3.0 * sum(t.nbytes for t in call.inputs + call.outputs)

    def tap_passes(self, info, call, config):
        """How many kernel taps keras_lwp's own implementation of `config` handles one by one (a slice
        forward, its scatter backward, per tap), each priced at the profile's calibrated `tap_seconds`:
        0 where DTensor runs the layer's own kernels (the default)."""
        del info, call, config
        return 0

    def trained_weights(self, info):
        """Per weight, whether training computes its gradient (and so synchronizes and updates it):
        its `trainable` flag, unless no call of the layer reads it."""
        return tuple(w.trainable for w in info.weights)

    def implementation(self, info, config):
        """How to run the layer under `config` when DTensor cannot shard its own call: a function
        `(layer, placement, mesh, *call_args, **call_kwargs) -> outputs` built from ops DTensor does
        shard, or None to run the layer's call (DTensor propagates the layouts)."""
        return None


def unsupported_split(info, dims, details, computes):
    """The error of an implementation asked for a split it does not compute: names the layer, what
    about it decides (`details`), the dimensions and what keras_lwp computes instead."""
    return ValueError(
        f"Layer '{info.name}' ({info.class_name}, {details}) cannot be split along {', '.join(dims)} on DTensor: "
        f"keras_lwp computes {computes}. Plan it within the runnable space.")


def no_extra_arguments(layer, args, kwargs):
    """Implementations take the layer's inputs only: anything else would be silently ignored."""
    if args or kwargs:
        raise TypeError(f"Layer '{layer.name}': unexpected call arguments {args} {kwargs}")


_RULES = {}


def register_rule(*class_names, replace=False):
    """Class decorator: `@register_rule("Dense")` makes the rule plan every layer of that Keras class
    (and of its subclasses that keep its `call`). A class has one rule: registering it again raises,
    unless `replace=True` says the new rule is meant to take the old one's place."""

    def decorate(rule_class):
        for class_name in class_names:
            current = _RULES.get(class_name)
            if current is not None and not replace:
                raise ValueError(
                    f"Layer class {class_name!r} already has the rule {type(current).__name__}; registering "
                    f"{rule_class.__name__} for it too would leave import order to pick one. Pass "
                    f"register_rule({class_name!r}, replace=True) to replace it.")
            _RULES[class_name] = rule_class()
        return rule_class

    return decorate


_COMPOSITE = []  # the rule of layers made of other layers that have no rule of their own (keras_lwp.layers.composite)


def _lookup(info):
    for name in getattr(info, "rule_names", (info.class_name,)):
        rule = _RULES.get(name)
        if rule is not None:
            return rule
    if getattr(info, "sublayers", ()) and _COMPOSITE:
        return _COMPOSITE[0]
    return None


def set_composite_rule(rule):
    """The rule of layers made of sub-layers that have no rule of their own (keras_lwp.layers.composite)."""
    _COMPOSITE[:] = [rule]


def is_composite(info):
    """Whether the layer is planned by the composite rule (made of sub-layers, no rule of its own)."""
    return bool(_COMPOSITE) and _lookup(info) is _COMPOSITE[0]


class ReplicatedRule(LayerRule):
    """The fallback: a layer with no rule runs whole on every device."""

    def dimensions(self, info):
        return []


_REPLICATED_RULE = ReplicatedRule()


class UnknownLayerWarning(UserWarning):
    pass


def rule_for(info, strict=False, warned=None):
    """The rule for a layer; unknown classes fall back to replicated, warned once per class
    among the calls that share the `warned` set (one plan)."""
    rule = _lookup(info)
    if rule is not None:
        return rule
    message = (
        f"keras_lwp has no parallelization rule for layers of class {info.class_name} "
        f"(layer '{info.name}'), so it runs replicated on every device. To shard it, register a rule: "
        f"@keras_lwp.layers.register_rule('{info.class_name}') on a keras_lwp.layers.LayerRule subclass."
    )
    if strict:
        raise ValueError(message.replace("so it runs replicated on every device", "and strict=True was given"))
    if warned is None or info.class_name not in warned:
        if warned is not None:
            warned.add(info.class_name)
        warnings.warn(message, UnknownLayerWarning, stacklevel=4)
    return _REPLICATED_RULE


def registered_rule(info):
    """The rule for a layer, replicated for unknown classes, without a warning (the plan warned)."""
    return _lookup(info) or _REPLICATED_RULE


def dimensions_of(info, space="runnable"):
    """A layer's DimSpecs (quietly: the plan already warned about layers with no rule)."""
    dims = registered_rule(info).dimensions(info)
    return dims if space == "full" else runnable_dims(dims)


def has_rule(class_name):
    return class_name in _RULES


def has_rule_for(info):
    """Whether a rule plans this layer (its class or an ancestor that shares its call)."""
    return _lookup(info) is not None


def _numel(shape):
    return math.prod(shape)


class Placement:
    """A layer under one configuration: layouts of its tensors and what it must communicate.

    Layouts are tuples with one entry per tensor axis: the mesh axis splitting it, or None.
    """

    def __init__(self, info, dims, config, mesh):
        self.info = info
        self.config = config
        self.mesh = mesh
        by_name = {d.name: d for d in dims}
        self.split = [(by_name[dim], axis) for dim, axis in config.items()]
        self._trained = None

    def _layout(self, rank, axis_of):
        layout = [None] * rank
        for dim, mesh_axis in self.split:
            position = axis_of(dim)
            if position is not None:
                layout[position] = mesh_axis
        return tuple(layout)

    def output_layout(self, tensor):
        return self._layout(len(tensor.shape), lambda d: None if d.output is None else d.output % len(tensor.shape))

    def input_layout(self, index, tensor):
        def axis_of(d):
            if index >= len(d.inputs) or d.inputs[index] is None:
                return None
            return d.inputs[index] % len(tensor.shape)

        return self._layout(len(tensor.shape), axis_of)

    def weight_layout(self, index):
        shape = self.info.weights[index].shape

        def axis_of(d):
            if index >= len(d.weights) or d.weights[index] is None:
                return None
            return d.weights[index] % len(shape)

        return self._layout(len(shape), axis_of)

    def weight_grad_layout(self, index):
        """Layout of weight `index`'s gradient as it is synchronized: the weight's own, but whole along
        the dimensions whose gradient arrives whole (`DimSpec.whole_gradient`)."""
        shape = self.info.weights[index].shape

        def axis_of(d):
            if d.whole_gradient or index >= len(d.weights) or d.weights[index] is None:
                return None
            return d.weights[index] % len(shape)

        return self._layout(len(shape), axis_of)

    @property
    def trained(self):
        """Per weight, whether training computes its gradient (LayerRule.trained_weights)."""
        if self._trained is None:
            self._trained = registered_rule(self.info).trained_weights(self.info)
        return self._trained

    def shards(self):
        """How many pieces the layer's work is cut into (the product of the used axes' sizes)."""
        return math.prod(self.mesh.axis_size(axis) for _, axis in self.split)

    def output_partial_axes(self):
        """Mesh axes over which the output is a partial sum (all-reduced in the forward pass)."""
        return tuple(axis for d, axis in self.split if d.output is None)

    def input_grad_partial_axes(self, index):
        """Mesh axes over which the gradient of input `index` is a partial sum (all-reduced backward)."""
        return tuple(axis for d, axis in self.split if index >= len(d.inputs) or d.inputs[index] is None)

    def partial_sums(self):
        """How many all-reduces of the output (forward) and of an input gradient (backward) a pass
        makes over the partial axes (DimSpec.partial_sums; 1 when nothing is partial)."""
        return max((d.partial_sums for d, _ in self.split if d.output is None), default=1)

    def weight_grad_partial_axes(self, index):
        """Mesh axes over which weight `index`'s gradient is a partial sum: gradient synchronization."""
        return tuple(axis for d, axis in self.split if index >= len(d.weights) or d.weights[index] is None)

    def halo_splits(self):
        return [(d, axis) for d, axis in self.split if d.halo > 0]

    def stats_axes(self):
        return tuple(axis for d, axis in self.split if d.stats)


def check_dims(info, dims, config, mesh):
    """Why `config` is not valid for this layer on `mesh`, or None when it is."""
    by_name = {d.name: d for d in dims}
    for dim, axis in config.items():
        if dim not in by_name:
            known = ", ".join(by_name) or "none: the layer runs replicated"
            return (
                f"layer '{info.name}' ({info.class_name}) has no dimension '{dim}'; "
                f"its parallelizable dimensions are: {known}"
            )
        if axis not in mesh.shape:
            return f"layer '{info.name}': mesh axis '{axis}' is not in {mesh} (axes: {', '.join(mesh.axis_names)})"
        size, parts = by_name[dim].size, mesh.axis_size(axis)
        if size % parts:
            return (
                f"layer '{info.name}' ({info.class_name}): dimension '{dim}' of size {size} cannot be split "
                f"on mesh axis '{axis}' of size {parts}, since {parts} does not evenly divide {size}"
            )
    return None


def runnable_dims(dims):
    """The dimensions keras_lwp can run on DTensor today."""
    return [d for d in dims if d.runnable]


def configurations(info, dims, mesh):
    """Every valid configuration of a layer on a mesh, replicated first, in a fixed order.

    Each mesh axis goes to at most one dimension and each dimension gets at most one axis
    (a DTensor layout maps a tensor axis to one mesh axis); the dimension's size must divide.
    """
    choices = []
    for axis, parts in mesh.axes:
        choices.append([None] + [d.name for d in dims if d.size % parts == 0])
    found = []
    for assignment in itertools.product(*choices):
        used = [d for d in assignment if d is not None]
        if len(set(used)) != len(used):
            continue
        found.append(Config({d: axis for d, (axis, _) in zip(assignment, mesh.axes) if d is not None}))
    position = {axis: i for i, axis in enumerate(mesh.axis_names)}
    found.sort(key=lambda c: (len(c), tuple((position[a], d) for d, a in c.items())))
    return found or [REPLICATED]
