"""A layer's parallelization configuration: which mesh axis splits which dimension.

Pure Python (no TensorFlow): the search, the cost model and the Strategy all key on these.
"""

from collections.abc import Mapping

# Canonical order of the dimension names and the paper's one-letter abbreviations
# ({n=4}, {n=1,h=2,w=2}, {c=4} in Jia et al., Table 5).
DIMENSION_ORDER = ("sample", "length", "height", "width", "channel", "heads", "reduction", "vocabulary")
ABBREVIATIONS = {
    "sample": "n",
    "length": "l",
    "height": "h",
    "width": "w",
    "channel": "c",
    "heads": "a",
    "reduction": "r",
    "vocabulary": "v",
}


def _dim_key(dim):
    return (DIMENSION_ORDER.index(dim), dim) if dim in DIMENSION_ORDER else (len(DIMENSION_ORDER), dim)


class Config(Mapping):
    """A read-only mapping {dimension: mesh axis} of the dimensions a layer splits.

    Empty means the layer is replicated (every device computes all of it). Hashable and
    ordered canonically, so equal configurations compare and hash equal.

    >>> c = Config({"channel": "y", "sample": "x"})
    >>> str(c), c["sample"], Config() == Config({})
    ('{n=x, c=y}', 'x', True)
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, assignment=None):
        items = dict(assignment or {})
        axes = list(items.values())
        if len(set(axes)) != len(axes):
            raise ValueError(
                f"A mesh axis may split at most one dimension of a layer. Received: {items}. "
                "Give each mesh axis to one dimension."
            )
        for dim, axis in items.items():
            if not isinstance(dim, str) or not isinstance(axis, str):
                raise TypeError(f"Configuration entries are {{dimension: mesh axis}} strings. Received: {items}")
        object.__setattr__(self, "_items", tuple(sorted(items.items(), key=lambda kv: _dim_key(kv[0]))))
        object.__setattr__(self, "_hash", hash(self._items))  # the search hashes configurations ~10^5 times

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only")

    def __getitem__(self, dim):
        for d, axis in self._items:
            if d == dim:
                return axis
        raise KeyError(dim)

    def __iter__(self):
        return (d for d, _ in self._items)

    def __len__(self):
        return len(self._items)

    def items(self):  # the planner's hot path: skip Mapping's per-key lookups
        return self._items

    def __hash__(self):
        return self._hash

    def __reduce__(self):  # rebuilt, not copied: a string's hash differs between processes
        return Config, (dict(self._items),)

    def __eq__(self, other):
        if isinstance(other, Config):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __lt__(self, other):
        return self._items < other._items

    @property
    def axes(self):
        """The mesh axes this configuration uses, in dimension order."""
        return tuple(axis for _, axis in self._items)

    def dim_of(self, axis):
        """The dimension that `axis` splits, or None."""
        for d, a in self._items:
            if a == axis:
                return d
        return None

    def __str__(self):
        if not self._items:
            return "{}"
        return "{" + ", ".join(f"{ABBREVIATIONS.get(d, d)}={a}" for d, a in self._items) + "}"

    def __repr__(self):
        return f"Config({dict(self._items)!r})"

    def to_dict(self):
        return dict(self._items)


REPLICATED = Config()
