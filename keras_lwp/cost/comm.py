"""Communication costs on a mesh: collectives and relayouts, from bytes that really move.

A layout is a tuple with one entry per tensor axis: the mesh axis splitting it, or None. A
relayout's cost comes from the bytes the busiest device must receive: the block it needs minus the
part of that block it already holds. Computing this per device (meshes are small) makes every case
exact: a local slice moves nothing, an all-gather moves (k-1)/k of the tensor, an all-to-all
(k-1)/k^2, and a mesh axis that moves from one tensor axis to another is handled without guesswork.
Those are the bytes a relayout needs (keras_lwp.cost.volume counts them, as the paper does); its time
is priced from what DTensor moves, which for an all-gather is twice that (ALL_GATHER_FACTOR).
"""

import functools
import math

import numpy as np

from keras_lwp.relayout_path import relayout_steps


@functools.lru_cache(maxsize=None)
def _coordinates(mesh):
    """Device coordinates [devices, axes], row-major like dtensor.create_mesh."""
    sizes = [size for _, size in mesh.axes]
    return np.stack(np.unravel_index(np.arange(math.prod(sizes)), sizes), axis=1)


def _interval(layout_axis, mesh, coords):
    """Per device, the [start, stop) fraction of a tensor axis it holds."""
    if layout_axis is None:
        n = coords.shape[0]
        return np.zeros(n), np.ones(n)
    index = mesh.axis_names.index(layout_axis)
    parts = mesh.axis_size(layout_axis)
    start = coords[:, index] / parts
    return start, start + 1.0 / parts


def received_per_device(src, dst, mesh, gather_factor=1.0):
    """Per device, the fraction of the tensor's bytes it receives to relayout from src to dst, along
    the steps keras_lwp runs (keras_lwp.relayout_path: DTensor's direct all-to-all is wrong for some
    moves); each step receives the block it needs minus the part of it the device already holds,
    an all-gather ("unshard" step) `gather_factor` times that."""
    total = np.zeros(_coordinates(mesh).shape[0])
    before = tuple(src)
    for kind, after in relayout_steps(before, tuple(dst)):
        total += _received_in_one_step(before, after, mesh) * (gather_factor if kind == "unshard" else 1.0)
        before = after
    return total


def _received_in_one_step(src, dst, mesh):
    coords = _coordinates(mesh)
    overlap = np.ones(coords.shape[0])
    needed = np.ones(coords.shape[0])
    for s_axis, d_axis in zip(src, dst):
        s0, s1 = _interval(s_axis, mesh, coords)
        d0, d1 = _interval(d_axis, mesh, coords)
        overlap *= np.clip(np.minimum(s1, d1) - np.maximum(s0, d0), 0.0, None)
        needed *= d1 - d0
    return needed - overlap


# DTensor runs an all-gather as an all-reduce of the gathered block, zero but for each device's part
# (TensorFlow's dtensor/mlir/utils/collective_lowering.cc, on CPU and GPU meshes): a ring moves
# 2 (k-1)/k of the block, twice what the device lacks. Timed on the 4x2 CPU mesh (idle, a scratch
# script), a gather of 1-17 MB from [x, y] to replicated took 1.2-1.6x an all-reduce of that size.
ALL_GATHER_FACTOR = 2.0


@functools.lru_cache(maxsize=1 << 16)
def received_fraction(src, dst, mesh, gather_factor=1.0):
    """Fraction of the tensor's bytes the busiest device receives to go from layout src to dst (an
    all-gather's counted `gather_factor` times: ALL_GATHER_FACTOR for what DTensor moves)."""
    if src == dst:
        return 0.0
    return float(np.max(received_per_device(src, dst, mesh, gather_factor)))


def allreduce_time(nbytes, axes, mesh, profile):
    """Ring all-reduce of `nbytes` (per device) over the devices spanned by `axes`."""
    k = mesh.parts(axes)
    if k <= 1 or nbytes == 0:
        return 0.0
    link = profile.link_for_axes(mesh, axes)
    return 2.0 * (k - 1) / k * nbytes / link.bandwidth + 2.0 * (k - 1) * link.latency + profile.collective_overhead


@functools.lru_cache(maxsize=1 << 16)
def relayout_coefficients(src, dst, mesh, profile):
    """(seconds per byte of the whole tensor, fixed seconds) of the relayout src -> dst."""
    fraction = received_fraction(src, dst, mesh, ALL_GATHER_FACTOR)
    if fraction == 0.0:
        return 0.0, 0.0
    moved_axes = {a for a, b in zip(src, dst) if a != b} - {None}
    moved_axes |= {b for a, b in zip(src, dst) if a != b} - {None}
    axes = tuple(sorted(moved_axes))
    link = profile.link_for_axes(mesh, axes)
    peers = mesh.parts(axes)
    return fraction / link.bandwidth, (peers - 1) * link.latency + profile.collective_overhead


def relayout_time(nbytes, src, dst, mesh, profile):
    """Seconds to move a tensor of `nbytes` (whole) from layout `src` to layout `dst`."""
    per_byte, fixed = relayout_coefficients(tuple(src), tuple(dst), mesh, profile)
    return per_byte * nbytes + fixed


def relayout_bytes(nbytes, src, dst, mesh):
    """Bytes the busiest device receives for the relayout src -> dst."""
    return received_fraction(tuple(src), tuple(dst), mesh) * nbytes
