"""Communication volume: bytes a training step moves between devices, summed over all devices.

The paper compares strategies by this figure as well as by time (Jia et al. 2018, Sec. 6: layer-wise
parallelism moves 1.3-23x less than data and model parallelism). Like memory, it depends on the
layouts only, so every cost model shares it:

- a ring all-reduce over k devices sends 2(k-1)/k of the reduced shard from every device in the group
  (gradient synchronization, partial sums of a split reduction, normalization statistics);
- a relayout moves, to every device, the part of the block it needs that it does not hold;
- a spatial split receives its halo rows from the other blocks, forward and backward.
"""


import numpy as np

from keras_lwp.cost.comm import received_per_device


def allreduce_bytes(shard_bytes, axes, mesh):
    """Bytes a ring all-reduce of `shard_bytes` per device over `axes` sends, over the whole mesh."""
    k = mesh.parts(axes)
    return 0.0 if k <= 1 else mesh.size * 2.0 * (k - 1) / k * shard_bytes


def relayout_total_bytes(nbytes, src, dst, mesh):
    """Bytes all devices together receive to move a tensor of `nbytes` from layout src to dst."""
    if tuple(src) == tuple(dst):
        return 0.0
    return float(np.sum(received_per_device(tuple(src), tuple(dst), mesh))) * nbytes


def halo_bytes(place, call, mesh):
    """Bytes one device receives per pass for the halos of its spatial splits: `halo` rows (kernel
    extent minus stride) per block, from every other block on the axis, since DTensor's all-gather
    of the edge rows delivers all of them (keras_lwp.layers.hidden)."""
    if not place.halo_splits():
        return 0.0
    total = 0.0
    x = call.inputs[0]
    layout = place.input_layout(0, x)
    for dim, axis in place.halo_splits():
        if axis not in layout:
            continue
        position = layout.index(axis)
        others = mesh.parts(layout) / mesh.axis_size(axis)
        parts = mesh.axis_size(axis)
        total += (parts - 1) * dim.halo * x.nbytes / x.shape[position] / others
    return total


def is_float(dtype):
    """Whether a tensor of `dtype` carries a gradient back (integer ids do not)."""
    return "float" in str(dtype)


def layer_bytes(place, mesh):
    """Bytes a layer's own configuration moves per training step: partial sums of its output and of
    its input gradients, halos forward and backward, normalization statistics, and the all-reduce of
    its weight gradients."""
    info = place.info
    total = 0.0
    reductions = place.partial_sums()
    for call in info.calls:
        for out in call.outputs:
            total += reductions * allreduce_bytes(out.nbytes / mesh.parts(place.output_layout(out)),
                                                  place.output_partial_axes(), mesh)
        for index, tensor in enumerate(call.inputs):
            if is_float(tensor.dtype):
                total += reductions * allreduce_bytes(tensor.nbytes / mesh.parts(place.input_layout(index, tensor)),
                                                      place.input_grad_partial_axes(index), mesh)
        total += 2 * mesh.size * halo_bytes(place, call, mesh)
        if place.stats_axes():
            channels = info.output.shape[-1] / mesh.parts(
                tuple(a for d, a in place.config.items() if d == "channel"))
            total += 2 * allreduce_bytes(2 * 4 * channels, place.stats_axes(), mesh)
    for index, weight in enumerate(info.weights):
        if place.trained[index]:
            total += allreduce_bytes(weight.nbytes / mesh.parts(place.weight_layout(index)),
                                     place.weight_grad_partial_axes(index), mesh)
    return total


def edge_bytes(tensor, src, dst, mesh):
    """Bytes a relayout on an edge moves per step: the tensor forward and, for floats, its gradient back."""
    forward = relayout_total_bytes(tensor.nbytes, src, dst, mesh)
    return forward + (relayout_total_bytes(tensor.nbytes, dst, src, mesh) if is_float(tensor.dtype) else 0.0)
