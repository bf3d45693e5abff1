"""Tensors and variables on a DTensor mesh: the one module that places anything there.

- layouts: `layout` (keras_lwp's tuple form, a mesh axis or None per dimension, to a dtensor.Layout),
  `spec_of` (back), `fit_spec` (drop the splits a concrete shape does not divide);
- tensors: `relayout`, the one relayout keras_lwp asks DTensor for (between layers, inside the layers
  it computes itself, for random draws and for the loss): it follows `relayout_path.relayout_steps`,
  never a move of a mesh axis that DTensor's all-to-all gets wrong; `to_mesh` packs a host value,
  `to_host` gathers a DTensor;
- variables: `variable_to_mesh` backs a Keras variable by a DVariable, `layer_to_mesh` places a layer's
  weights and seed states, `optimizer_to_mesh` builds an optimizer's state and places it like its weights.

The runtime (parallelize, the fit loop) and the profiler (keras_lwp.cost.timing) both use these.
"""

import types

import numpy as np

from keras_lwp import keras_internals
from keras_lwp.mesh import mesh_spec_of
from keras_lwp.relayout_path import direct_move_is_exact, move_of, relayout_steps

_LAYOUTS = {}


def layout(spec, mesh):
    """The dtensor.Layout of a keras_lwp layout tuple (mesh axis or None per dimension), cached."""
    from tensorflow.experimental import dtensor

    key = (tuple(spec), id(mesh))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = (mesh, dtensor.Layout([dtensor.UNSHARDED if a is None else a for a in spec], mesh))
    return _LAYOUTS[key][1]


def spec_of(dtensor_layout):
    """A dtensor.Layout as keras_lwp's tuple form (mesh axis or None per tensor dimension)."""
    return tuple(None if s == "unsharded" else s for s in dtensor_layout.sharding_specs)


def fit_spec(spec, shape, mesh_spec):
    """Drop the splits a concrete shape does not allow (a partial last batch): replicate instead."""
    return tuple(
        a if a is None or shape[i] is None or shape[i] % mesh_spec.axis_size(a) == 0 else None
        for i, a in enumerate(spec)
    )


def relayout(tensor, spec, mesh, source=None):
    """`tensor` laid out as `spec` on `mesh` (a tensor not on the mesh is put there), through
    relayouts DTensor computes exactly (`_exact_relayout`); `source` is the layout the plan gave
    the tensor, if keras_lwp knows it."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    shape = tuple(tensor.shape)
    spec = fit_spec(spec, shape, mesh_spec_of(mesh))
    if tf.executing_eagerly() and not dtensor.is_dtensor(tensor):
        return to_mesh(tensor, spec, mesh)
    if source is not None:
        source = fit_spec(source, shape, mesh_spec_of(mesh))
    if tensor.dtype == tf.bool:  # DTensor's all-to-all takes no booleans (a mask): move it as int32
        as_int = tf.cast(tensor, tf.int32)
        known = getattr(tensor, "_keras_lwp_spec", None) or source  # the cast drops the mark
        moved = _exact_relayout(as_int, spec, mesh, source=known)
        return tensor if moved is as_int else _marked(tf.cast(moved, tf.bool), spec)
    return _exact_relayout(tensor, spec, mesh, source=source)


def _exact_relayout(tensor, spec, mesh, source=None):
    """`tensor` (a DTensor on `mesh`) laid out as `spec`, through steps DTensor computes exactly.

    The path depends on the layout the tensor has: eagerly DTensor says it; while tracing it is
    the layout keras_lwp gave the tensor (`relayout` marks its results), else `source`. A tensor a
    layer just computed has neither: DTensor relays it directly from the layout its propagation
    chose, which the per-layer numerics tests check for every configuration of every rule."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    spec = tuple(spec)
    if tf.executing_eagerly():
        current = spec_of(dtensor.fetch_layout(tensor))
    else:
        current = getattr(tensor, "_keras_lwp_spec", None) or (tuple(source) if source is not None else None)
    if current is None or len(current) != len(spec):
        return _marked(dtensor.relayout(tensor, layout(spec, mesh)), spec)
    if current == spec:
        return tensor
    for kind, after in relayout_steps(current, spec):
        if kind == "move":
            _, source_dim, target_dim = move_of(current, after)
            if not direct_move_is_exact(len(spec), source_dim, target_dim):
                tensor = _move_through_front(tensor, current, after, source_dim, mesh)
                current = after
                continue
        tensor = dtensor.relayout(tensor, layout(after, mesh))
        current = after
    return _marked(tensor, spec)


def pinned(tensor, spec, mesh):
    """`tensor`, which keras_lwp's marks say is laid out as `spec` already, through an explicit relayout
    to `spec`: no op fixes the layout of a tensor keras_lwp did not relay (a mask an operation of the
    graph computed), and DTensor's propagation may choose another, which its readers laid out as the
    plan says then meet inside a layer."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    if tf.executing_eagerly():  # an eager DTensor has one layout, which DTensor knows
        return tensor
    spec = fit_spec(spec, tuple(tensor.shape), mesh_spec_of(mesh))
    moved = tf.cast(tensor, tf.int32) if tensor.dtype == tf.bool else tensor  # no boolean all-to-all
    moved = dtensor.relayout(moved, layout(spec, mesh))
    return _marked(tf.cast(moved, tf.bool) if tensor.dtype == tf.bool else moved, spec)


def _marked(tensor, spec):
    """Record on a traced tensor the layout keras_lwp gave it (eager tensors carry their own)."""
    try:
        tensor._keras_lwp_spec = spec
    except AttributeError:  # an EagerTensor takes no attributes; DTensor knows its layout
        pass
    return tensor


def _move_through_front(tensor, before, after, source, mesh):
    """Move a mesh axis from non-leading `source` to another non-leading dimension: swap `source`
    with dimension 0 (a local transpose), move from dimension 0 (an all-to-all DTensor gets right),
    swap back."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    perm = list(range(len(before)))
    perm[0], perm[source] = source, 0
    swapped_before = tuple(before[p] for p in perm)
    swapped_after = tuple(after[p] for p in perm)
    tensor = dtensor.relayout(tf.transpose(tensor, perm), layout(swapped_before, mesh))
    tensor = dtensor.relayout(tensor, layout(swapped_after, mesh))
    return dtensor.relayout(tf.transpose(tensor, perm), layout(after, mesh))


# -- host values ---------------------------------------------------------------------------------

def to_mesh(value, spec, mesh):
    """Put a host value on the mesh, each device receiving only its own block (dtensor.pack).

    On a multi-client mesh every client passes the whole value and packs the blocks of its own
    (local) devices."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    if tf.is_tensor(value) and dtensor.is_dtensor(value):  # e.g. an optimizer slot Keras built from a DVariable
        return relayout(value, fit_spec(spec, tuple(value.shape), mesh_spec_of(mesh)), mesh)
    array = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
    mesh_spec = mesh_spec_of(mesh)
    spec = fit_spec(spec, array.shape, mesh_spec)
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
    return dtensor.pack(components, layout(spec, mesh))


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
    current = dtensor.fetch_layout(value)
    if not current.is_fully_replicated():
        value = dtensor.relayout(value, dtensor.Layout.replicated(current.mesh, current.rank))
    return dtensor.unpack(value)[0]


# -- variables -----------------------------------------------------------------------------------

def variable_to_mesh(variable, spec, mesh):
    """Back a Keras variable by a DVariable with layout `spec`, keeping its value; reading it to the
    host (numpy, get_weights, save) gathers it and assigning a host value shards it."""
    from tensorflow.experimental import dtensor

    value = keras_internals.backing_variable(variable)
    if isinstance(value, dtensor.DVariable):
        return
    keras_internals.set_backing_variable(
        variable, dtensor.DVariable(to_mesh(value.read_value(), spec, mesh), trainable=variable.trainable,
                                    name=variable.path.replace("/", "_")),
        layout(spec, mesh))
    variable.__class__ = sharded_class(type(variable))


_SHARDED_CLASSES = {}


def sharded_class(base):
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


def layer_to_mesh(layer, place, mesh):
    """A layer's variables onto the mesh: its weights with their configuration's layouts, the rest
    (a random layer's seed state) replicated. Left on the host, a seed state is read, incremented and
    written by every device of a step at once, racing: masks changed from run to run under one seed."""
    for index, weight in enumerate(getattr(layer, "weights", ())):  # an operation (keras.ops) has none
        variable_to_mesh(weight, place.weight_layout(index), mesh)
    for variable in state_variables(layer):
        variable_to_mesh(variable, (None,) * len(variable.shape), mesh)
    for each in [layer] + keras_internals.sublayers(layer):
        constants_to_mesh(each, mesh)


def constants_to_mesh(layer, mesh):
    """Tensors a layer keeps besides its variables (Normalization's mean and variance), which its call
    captures, made replicated DTensors: DTensor refuses a plain tensor in a function on the mesh."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    for name, value in list(vars(layer).items()):
        if isinstance(value, tf.Tensor) and not isinstance(value, tf.Variable) and tf.executing_eagerly() \
                and not dtensor.is_dtensor(value) and value.shape.rank:
            setattr(layer, name, to_mesh(value, (None,) * value.shape.rank, mesh))


def state_variables(layer):
    """A layer's (or model's) variables that are not weights: the seed states of its random layers."""
    weights = getattr(layer, "weights", ())
    return [v for v in getattr(layer, "variables", ()) if not any(v is w for w in weights)]


# -- optimizer state -----------------------------------------------------------------------------

def optimizer_to_mesh(optimizer, variables, mesh):
    """Build `optimizer` for `variables` (already on the mesh) with its slots made on the host, and
    put its state on the mesh: each slot like its weight, counters replicated."""
    if not optimizer.built:
        host_slots(optimizer)
        optimizer.build(variables)
    dense_sparse_updates(optimizer)
    variables_to_mesh(optimizer.variables, mesh)


def variables_to_mesh(variables, mesh):
    """Variables onto the mesh with the layout Keras gave them (`_layout`: an optimizer slot's is its
    weight's), the others (counters, metric totals) replicated."""
    for variable in variables:
        given = getattr(variable, "_layout", None)
        variable_to_mesh(variable, spec_of(given) if given is not None else (None,) * len(variable.shape), mesh)


def host_slots(optimizer):
    """Keras' TF optimizer creates slots colocated with their weight, which on a DVariable yields a
    plain variable holding a DTensor that DTensor then mis-shapes. Build slots as ordinary host
    variables instead (they keep the weight's `_layout`); `optimizer_to_mesh` moves them."""
    optimizer.add_variable_from_reference = types.MethodType(keras_internals.host_slot_builder(), optimizer)
    inner = getattr(optimizer, "inner_optimizer", None)  # LossScaleOptimizer under mixed precision
    if inner is not None:
        host_slots(inner)


def dense_sparse_updates(optimizer):
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


__all__ = [
    "constants_to_mesh", "dense_sparse_updates", "fit_spec", "host_slots", "layer_to_mesh", "layout",
    "optimizer_to_mesh", "relayout", "sharded_class", "spec_of", "state_variables", "to_host", "to_mesh",
    "variable_to_mesh", "variables_to_mesh",
]
