"""Collectives measured on the real mesh, fitted to latency + bytes / bandwidth.

The profiled cost model prices gradient synchronization and the relayouts between layers with what
the mesh's own collectives cost, not with datasheet bandwidths:

- `allreduce` over each group of mesh axes (a gradient that a split of the batch leaves partial);
- `allgather` over each group of mesh axes (a relayout that unshards);
- `alltoall` over each mesh axis (a relayout that moves one mesh axis from one tensor axis to another).

Each is timed on a few message sizes and fitted to `latency + bytes * seconds_per_byte` (`LinearFit`),
where `bytes` is what one device holds after the collective (the reduced buffer, the gathered block,
the re-split block). A relayout is priced the way DTensor performs it (`relayout_steps`): slices
that need no communication, then one all-gather of the axes whose placement changes, then slices;
the one exception is a single mesh axis moving between two tensor axes, which TensorFlow runs as an
all-to-all. Halo exchanges and the partial sums a layer's own split implies are part of that layer's
measured compute time (keras_lwp.cost.profiled), so they are not priced here.

Everything but `measure_collectives` is pure Python.
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np

from keras_lwp import relayout_path as path

KINDS = ("allreduce", "allgather", "alltoall")


@dataclass(frozen=True)
class LinearFit:
    """Seconds of one collective as `latency + nbytes * seconds_per_byte` (both >= 0)."""

    latency: float
    seconds_per_byte: float

    def time(self, nbytes):
        return self.latency + nbytes * self.seconds_per_byte if nbytes > 0 else 0.0

    @property
    def bandwidth(self):
        """Bytes per second (inf when the fit found no per-byte cost)."""
        return 1.0 / self.seconds_per_byte if self.seconds_per_byte > 0 else math.inf

    def __str__(self):
        return f"{self.latency * 1e6:.0f} us + bytes / {self.bandwidth / 1e9:.3g} GB/s"


def fit_line(sizes, seconds):
    """Least-squares `latency + size * seconds_per_byte`: the collective's latency and inverse
    bandwidth from timings at a few message sizes. The latency stays positive (a collective never
    runs in no time): where noise puts the intercept at or below zero it is taken as half the fastest
    timing, the bandwidth fitted to the rest."""
    sizes = np.asarray(sizes, dtype=float)
    seconds = np.asarray(seconds, dtype=float)
    if len(sizes) == 1:
        return LinearFit(max(float(seconds[0]), 0.0), 0.0)
    slope, intercept = np.polyfit(sizes, seconds, 1)
    if slope < 0:  # timings flat in size (noise): all latency
        return LinearFit(max(float(np.mean(seconds)), 0.0), 0.0)
    if intercept <= 0:
        intercept = 0.5 * float(np.min(seconds))
        slope = max(float(np.dot(sizes, seconds - intercept) / np.dot(sizes, sizes)), 0.0)
    return LinearFit(float(intercept), float(slope))


def axis_groups(mesh):
    """Every non-empty group of mesh axes (of size > 1), as sorted tuples: the groups a collective
    can run over."""
    names = [name for name, size in mesh.axes if size > 1]
    return [tuple(sorted(group)) for r in range(1, len(names) + 1) for group in itertools.combinations(names, r)]


def relayout_steps(src, dst):
    """The collectives a relayout from `src` to `dst` runs (tuples with one mesh axis or None per
    tensor axis): a list of (kind, axes, layout whose per-device block the step's bytes are). They
    follow keras_lwp.relayout_path, the path keras_lwp.placement.relayout takes: an unshard is an
    all-gather, a move an all-to-all (through a local transpose where DTensor's own is wrong), a
    shard a local slice (free, left out)."""
    steps = []
    before = tuple(src)
    for kind, after in path.relayout_steps(before, tuple(dst)):
        if kind == "unshard":
            gathered = tuple(sorted(a for a, b in zip(before, after) if a is not None and b is None))
            steps.append(("allgather", gathered, after))
        elif kind == "move":
            axis, _, _ = path.move_of(before, after)
            steps.append(("alltoall", (axis,), before))
        before = after
    return steps


class CollectiveModel:
    """Fitted collective times on one mesh: {(kind, axes): LinearFit}.

    Args:
        mesh: the MeshSpec the collectives were measured on.
        fits: {(kind, axes tuple): LinearFit}, kind one of KINDS, axes a sorted tuple of mesh axes.
    """

    def __init__(self, mesh, fits):
        self.mesh = mesh
        self.fits = dict(fits)

    def __repr__(self):
        return f"CollectiveModel({self.mesh}, {len(self.fits)} fits)"

    def fit(self, kind, axes):
        axes = tuple(sorted(a for a in axes if self.mesh.axis_size(a) > 1))
        if not axes:
            return None
        found = self.fits.get((kind, axes))
        if found is None and kind == "alltoall":  # an all-to-all is at most an all-gather
            found = self.fits.get(("allgather", axes))
        if found is None:
            raise KeyError(f"No measured {kind} over mesh axes {axes} on {self.mesh}.")
        return found

    def allreduce_time(self, nbytes, axes):
        """All-reduce of a buffer of `nbytes` per device over the mesh axes `axes`."""
        fit = self.fit("allreduce", axes)
        return fit.time(nbytes) if fit is not None else 0.0

    def relayout_time(self, nbytes, src, dst):
        """Seconds to relayout a tensor of `nbytes` (whole) from layout `src` to `dst`."""
        seconds = 0.0
        for kind, axes, layout in relayout_steps(src, dst):
            fit = self.fit(kind, axes)
            if fit is not None:
                seconds += fit.time(nbytes / self.mesh.parts(layout))
        return seconds

    def to_dict(self):
        return {f"{kind}:{','.join(axes)}": [fit.latency, fit.seconds_per_byte] for (kind, axes), fit in self.fits.items()}

    @classmethod
    def from_dict(cls, mesh, data):
        fits = {}
        for key, (latency, per_byte) in data.items():
            kind, axes = key.split(":")
            fits[(kind, tuple(axes.split(",")))] = LinearFit(latency, per_byte)
        return cls(mesh, fits)

    def describe(self):
        """One line per fit, for people."""
        return "\n".join(f"{kind:<9} over {','.join(axes):<6} {fit}" for (kind, axes), fit in sorted(self.fits.items()))


# -- measuring (TensorFlow) ------------------------------------------------------------------------

def collective_cases(mesh):
    """What to time on `mesh`: (kind, axes, global shape, source layout, operation), the operation
    being "reduce" (sum over axis 0, split on the group: an all-reduce of the rest) or the target
    layout of a relayout. Shapes are [group size or 1, columns]; the columns set the message size."""
    cases = []
    for axes in axis_groups(mesh):
        k = mesh.parts(axes)
        # One tensor axis can carry one mesh axis, so a group of several axes is reduced/gathered
        # over as many tensor axes, each of its size.
        lead = tuple(mesh.axis_size(a) for a in axes)
        src = tuple(axes) + (None,)
        cases.append(("allreduce", axes, lead, src, "reduce"))
        cases.append(("allgather", axes, lead, src, (None,) * (len(axes) + 1)))
        if len(axes) == 1:
            cases.append(("alltoall", axes, (k,), (axes[0], None), (None, axes[0])))
    return cases


def message_bytes(kind, shape, src, mesh):
    """Bytes per device the fit is in terms of, for a case of `collective_cases`."""
    nbytes = 4 * math.prod(shape)
    if kind == "allreduce":
        return nbytes / math.prod(shape[:-1])
    if kind == "allgather":
        return nbytes
    return nbytes / mesh.parts(src)


def measure_collectives(dmesh, mesh, sizes, timer, baseline=0.0, progress=None):
    """Time every collective of `collective_cases(mesh)` at each per-device message size in `sizes`
    (bytes) on the dtensor.Mesh `dmesh`, and fit each. `timer(fn, args)` returns seconds per call
    (keras_lwp.cost.timing.time_call), `baseline` the seconds of an empty call, subtracted;
    `progress()` is called after each collective."""
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    from keras_lwp.placement import layout, to_mesh

    fits = {}
    for kind, axes, lead, src, operation in collective_cases(mesh):
        k = math.prod(lead)
        points, seconds = [], []
        for size in sizes:
            columns = max(1, int(size // 4))
            if kind == "allgather":
                columns = max(1, int(size // 4 // k))
            if kind == "alltoall":
                columns = max(k, int(size // 4) // k * k)
            shape = lead + (columns,)
            value = to_mesh(np.ones(shape, dtype="float32"), src, dmesh)
            if operation == "reduce":
                reduce_axes = list(range(len(lead)))
                fn = tf.function(lambda t, axes=reduce_axes: tf.reduce_sum(t, axis=axes))
            else:
                fn = tf.function(lambda t, target=layout(operation, dmesh): dtensor.relayout(t, target))
            elapsed = timer(fn, (value,)) - baseline
            points.append(message_bytes(kind, shape, src, mesh))
            seconds.append(max(elapsed, 0.0))
        fits[(kind, axes)] = fit_line(points, seconds)
        if progress is not None:
            progress()
    return CollectiveModel(mesh, fits)
