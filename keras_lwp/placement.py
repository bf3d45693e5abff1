"""Tensors on a DTensor mesh: layouts, and the one relayout keras_lwp asks DTensor for.

Every relayout keras_lwp emits (between layers, inside the layers it computes itself, for random
draws and for the loss) goes through `relayout`, which follows `relayout_path.relayout_steps`:
never a move of a mesh axis that DTensor's all-to-all gets wrong (keras_lwp.relayout_path).
"""

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


def relayout(tensor, spec, mesh, source=None):
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
