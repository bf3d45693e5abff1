"""The relayout path (keras_lwp.relayout_path), pure: which moves DTensor gets wrong, and that every
path is made of steps the conformance test (tests/test_relayout.py) covers."""

import itertools

from keras_lwp.relayout_path import direct_move_is_exact, move_of, relayout_steps

AXES = (None, "x", "y", "z")


def _layouts(rank):
    return [c for c in itertools.product(AXES, repeat=rank) if len([a for a in c if a]) == len({a for a in c if a})]


def test_the_path_never_asks_for_a_wrong_move():
    """Every step is an unshard, a shard or a single move, and moves DTensor gets wrong are
    exactly the non-leading ones the report names (rank 4: all six; rank 5: eight of twelve)."""
    wrong = {rank: sorted((s, t) for s in range(1, rank) for t in range(1, rank)
                          if s != t and not direct_move_is_exact(rank, s, t)) for rank in (2, 3, 4, 5)}
    assert wrong[2] == wrong[3] == []
    assert wrong[4] == [(1, 2), (1, 3), (2, 1), (2, 3), (3, 1), (3, 2)]
    assert wrong[5] == [(1, 2), (1, 3), (1, 4), (2, 1), (3, 1), (3, 4), (4, 1), (4, 3)]
    for src, dst in itertools.product(_layouts(3), repeat=2):
        before = src
        for kind, after in relayout_steps(src, dst):
            changed = [d for d in range(3) if before[d] != after[d]]
            if kind == "unshard":
                assert all(after[d] is None for d in changed)
            elif kind == "shard":
                assert all(before[d] is None for d in changed)
            else:  # one axis leaves one dimension for a free one
                axis, source, target = move_of(before, after)
                assert sorted(changed) == sorted([source, target]) and after[target] == axis
            before = after
        assert before == dst
