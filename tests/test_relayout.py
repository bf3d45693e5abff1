"""Relayout conformance: every relayout keras_lwp asks DTensor for computes the identity, forward and
in the gradient.

DTensor's own relayout returns wrong values, silently, when a mesh axis moves between two
non-leading dimensions of a rank-4 or rank-5 tensor (keras_lwp.relayout_path). keras_lwp.placement
.relayout routes around it. This test runs it over layouts of ranks 2 to 5 on 1-D, 2-D and 3-D meshes
of the 8 logical CPUs: for every rank and every (source dimension, destination dimension) pair a move of a mesh
axis drawn at random (the other axes placed at random too), plus random pairs of
layouts, each compared with NumPy forward and in the gradient, exactly (a relayout only moves numbers).
One tf.function per mesh and rank keeps it to seconds.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.experimental import dtensor

from keras_lwp import placement
from keras_lwp.placement import to_host, to_mesh
from tests.conftest import require_devices

MESHES = {"1d": (("x", 8),), "2d": (("x", 4), ("y", 2)), "3d": (("x", 2), ("y", 2), ("z", 2))}
RANDOM_PAIRS = 8  # per mesh and rank, beside the moves


def _layouts(axes, rank):
    names = [None] + [name for name, _ in axes]
    return [c for c in itertools.product(names, repeat=rank)
            if len([a for a in c if a]) == len({a for a in c if a})]


def _pairs(axes, rank, rng):
    """Every (source dim, destination dim) move of a random axis, the other dims drawn at random, then random pairs."""
    layouts = _layouts(axes, rank)
    pairs = []
    for source, target in itertools.product(range(rank), range(rank)):
        if source == target:
            continue
        axis = axes[rng.integers(len(axes))][0]
        # layouts with `axis` on `source`, and on `target` after the move, the rest kept where possible
        sources = [s for s in layouts if s[source] == axis]
        src = sources[rng.integers(len(sources))]
        dst = list(src)
        dst[source] = None
        occupant = dst[target]
        dst[target] = axis
        if occupant is not None and rng.integers(2):  # sometimes the displaced axis swaps into the source
            dst[source] = occupant
        pairs.append((src, tuple(dst)))
    for _ in range(RANDOM_PAIRS):
        i, j = rng.integers(len(layouts), size=2)
        pairs.append((layouts[i], layouts[j]))
    return pairs


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_relayout_is_exact(mesh_name, rank):
    require_devices(8)
    axes = MESHES[mesh_name]
    mesh = dtensor.create_mesh(list(axes), device_type="CPU")
    rng = np.random.default_rng(rank * 10 + len(axes))
    pairs = _pairs(axes, rank, rng)
    shape = (8,) * rank
    values = [rng.standard_normal(shape) for _ in pairs]
    cotangents = [rng.standard_normal(shape) for _ in pairs]
    xs = [to_mesh(v, src, mesh) for v, (src, _) in zip(values, pairs)]
    ws = [to_mesh(w, dst, mesh) for w, (_, dst) in zip(cotangents, pairs)]

    @tf.function
    def run(xs, ws):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            ys = [placement.relayout(x, dst, mesh, source=src) for x, (src, dst) in zip(xs, pairs)]
            loss = tf.add_n([tf.reduce_sum(y * w) for y, w in zip(ys, ws)])
        return ys, tape.gradient(loss, xs)

    ys, grads = run(xs, ws)
    wrong = []
    for (src, dst), value, cotangent, y, grad in zip(pairs, values, cotangents, ys, grads):
        assert placement.spec_of(dtensor.fetch_layout(y)) == dst
        forward = np.abs(np.asarray(to_host(y)) - value).max()
        backward = np.abs(np.asarray(to_host(grad)) - cotangent).max()
        if forward or backward:
            wrong.append(f"{src} -> {dst}: forward off by {forward:.3g}, gradient by {backward:.3g}")
    assert not wrong, f"{len(wrong)} of {len(pairs)} relayouts are not exact:\n" + "\n".join(wrong)
