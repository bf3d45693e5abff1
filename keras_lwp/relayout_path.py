"""Relayouts DTensor computes correctly, and an exact path for every other one (no TensorFlow here).

A layout is a tuple with one entry per tensor dimension: the mesh axis splitting it, or None.
DTensor's relayout between two layouts is exact when it only unshards dimensions (an all-gather) or
only shards them (a local slice). A mesh axis that *moves* from one dimension to another goes
through an all-to-all, and on CPU/GPU that all-to-all returns wrong values, silently, forward and in
the gradient, when neither dimension is the leading one and the rank is not 2 * min(dims) + 1
(rank-4 moves 1->2, 1->3, 2->3 and back; rank 5 1<->2, 1<->3, 1<->4, 3<->4). The cause, in
TensorFlow's `EmitCollectiveAllToAll` (tensorflow/dtensor/mlir/utils/collective_lowering.cc): the
transpose that brings the moved dimensions to the front rotates the dimensions left by min(dims),
and the one that "undoes" it after the collective rotates them left by min(dims) + 1, which is the
inverse only when rank == 2 * min(dims) + 1. docs/relayouts.md has the report and reproduction.

`relayout_steps(src, dst)` breaks any relayout into steps of three kinds, each covered by the
relayout conformance test (tests/test_relayout.py):
- "shard": some dimensions gain a mesh axis (a local slice), nothing else changes; first for axes
  the source does not use, so later all-gathers move smaller blocks;
- "unshard": some dimensions lose their mesh axis (an all-gather), nothing else changes;
- "move": one mesh axis moves from dimension i to dimension j (free in the source); run as an
  all-to-all, through a transpose that puts dimension i first when the direct one is wrong;
- "shard" again, last, for the rest.
Moves that form a cycle (two axes swapping dimensions) cannot go one after the other: the cycle is
broken by unsharding one of its axes first and sharding it at the end. The cost model prices the
same steps (keras_lwp.cost.comm), so what is priced is what runs.
"""

import functools


def direct_move_is_exact(rank, source_dim, target_dim):
    """Whether DTensor's own all-to-all moves a mesh axis from `source_dim` to `target_dim` exactly."""
    low = min(source_dim, target_dim)
    return low == 0 or rank == 2 * low + 1


@functools.lru_cache(maxsize=1 << 14)
def relayout_steps(src, dst):
    """The layouts a relayout from `src` to `dst` passes through, each step exact on DTensor.

    Returns a tuple of (kind, layout) with kind in "unshard", "move", "shard": the layout reached by
    that step. Empty when src == dst."""
    src, dst = tuple(src), tuple(dst)
    if len(src) != len(dst):
        raise ValueError(f"A relayout keeps the rank: {src} -> {dst}")
    if src == dst:
        return ()
    where_src = {axis: dim for dim, axis in enumerate(src) if axis is not None}
    where_dst = {axis: dim for dim, axis in enumerate(dst) if axis is not None}
    moves = {axis: (where_src[axis], where_dst[axis]) for axis in where_src
             if axis in where_dst and where_src[axis] != where_dst[axis]}
    steps = []
    current = list(src)

    def step(kind, changes):
        for dim, axis in changes:
            current[dim] = axis
        steps.append((kind, tuple(current)))

    # 0. Slice first by the axes the source does not use, on dimensions it leaves whole: every
    #    all-gather that follows then gathers smaller blocks.
    early = [(dim, axis) for dim, axis in enumerate(dst)
             if axis is not None and axis not in where_src and src[dim] is None]
    if early:
        step("shard", early)
    # 1. Unshard the axes that leave the layout.
    leaving = [(dim, None) for axis, dim in where_src.items() if axis not in where_dst]
    if leaving:
        step("unshard", leaving)
    # 2. Move axes one at a time into free dimensions; break cycles by unsharding one axis.
    pending = dict(moves)
    while pending:
        ready = [axis for axis, (_, target) in pending.items() if current[target] is None]
        if ready:
            axis = min(ready)
            source, target = pending.pop(axis)
            step("move", [(source, None), (target, axis)])
        else:  # every target is held by another moving axis: a cycle
            axis = min(pending)
            source, _ = pending.pop(axis)
            step("unshard", [(source, None)])
    # 3. Shard what is still missing (new axes, and axes unsharded to break a cycle).
    arriving = [(dim, axis) for dim, axis in enumerate(dst) if axis is not None and current[dim] != axis]
    if arriving:
        step("shard", arriving)
    assert tuple(current) == dst, (src, dst, steps)
    return tuple(steps)


def move_of(before, after):
    """(axis, source dim, target dim) of a "move" step."""
    (source,) = [d for d, (a, b) in enumerate(zip(before, after)) if a is not None and b is None]
    (target,) = [d for d, (a, b) in enumerate(zip(before, after)) if a is None and b is not None]
    return before[source], source, target
