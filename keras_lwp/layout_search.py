"""Exact search for the cheapest parallelization configuration of every layer.

Formulation
-----------
The model is a computation graph ``G = (V, E)`` (a ``networkx.DiGraph``).
Every layer ``l`` in ``V`` may run in one configuration ``c_l`` out of a finite
set ``C_l`` (the keys of the node attribute ``costs``); a strategy ``S`` picks
one ``c_l`` for every layer.  Following Jia et al. (2018, section 4) its
estimated time per iteration is::

    t_o(G, S) = sum_{l in V}          t_n(l, c_l)
              + sum_{e=(u,v) in E}    t_x(e, c_u, c_v)

where ``t_n(l, c) = graph.nodes[l]["costs"][c]`` is the layer's compute plus
synchronisation time under ``c`` (the paper's ``t_c + t_s``) and
``t_x(e, c_u, c_v) = graph.edges[u, v]["costs"][(c_u, c_v)]`` is the time to
move the tensor along ``e`` when producer and consumer use ``c_u`` and ``c_v``.
A pair absent from an edge table is forbidden (``t_x = +inf``).  We return
``argmin_S t_o(G, S)`` and its value -- :func:`search` and
:func:`optimal_assignment`; :func:`assignment_cost` evaluates ``t_o`` for any
strategy.

Representation (``_build_problem``)
    Configurations are numbered by their position in each node's ``costs``
    dict.  Node ``l`` becomes a 1-D float64 table ``t_n[l]`` of length
    ``|C_l|``; edge ``(u, v)`` becomes a 2-D table of shape ``(|C_u|, |C_v|)``
    filled with ``+inf`` where a pair is missing.  Edges are undirected
    factors: a table is stored under the scope ``(u, v)`` sorted by node
    position (transposed if needed), so ``u->v`` and ``v->u`` meet under one
    scope.  Every table -- node, edge or produced by elimination -- is one
    ``(scope, ndarray)`` factor; ``t_o`` is the sum of all factors.

Edge elimination (``_Problem.add``)
    Two factors with the same scope are replaced by their sum, ``O(C^2)`` for
    an edge.  This is the paper's edge elimination of parallel edges.

Node elimination (``_Problem.eliminate``, order from ``_Problem._next_reducible``)
    A node ``x`` with exactly two neighbours ``u, w`` is folded into a new edge
    ``T[c_u, c_w] = min_c (t_n[x][c] + E_ux[c_u, c] + E_xw[c, c_w])``, a
    (min, +) matrix product costing ``O(C^3)``.  The paper's rule needs one
    in-edge and one out-edge; as factors are undirected any two neighbours
    will do.  We also fold a leaf (one neighbour ``u``) into ``u``'s node
    table, ``t_n[u][c_u] += min_c (t_n[x][c] + E_ux[c_u, c])`` in ``O(C^2)``,
    and resolve an isolated node as ``min_c t_n[x][c]``.  Degree <= 2 nodes
    are eliminated first, lowest degree first, ties by node position, with
    edge elimination applied to every factor created, until none is left.
    What remains is the paper's residual graph with ``K`` nodes (each of
    degree >= 3); see :func:`reduce_graph` and ``SearchStats.residual_nodes``.
    A tree, chain or series-parallel graph reduces to ``K = 0``, at
    ``O(C^2)`` per leaf and ``O(C^3)`` per degree-2 node.

Paper's complexity
    Jia et al. enumerate all ``C^K`` strategies of the residual graph, for
    ``O(E C^3 + K C^K)`` in total.

What we add to stay exact on every graph (``_Problem.solve``)
    Instead of enumerating the residual graph we keep eliminating: the next
    node is the one whose elimination adds the fewest new edges (min-fill;
    ties by fewer neighbours, then node position, ``_Problem._next_min_fill``);
    node elimination takes over again whenever a node drops to degree <= 2.
    Eliminating ``x`` sums every factor that mentions ``x`` into one table
    over ``x`` and all its neighbours and minimises ``x`` out -- bucket
    elimination (Dechter, 1999) with factors of any arity, of which the
    degree-2 rule above is the special case.  Cost: ``O(C^(w+1))`` per node
    where ``w`` is the neighbour count at elimination time.  If that table
    would hold more than ``max_table_entries`` entries, we *condition*
    instead (``_Problem._condition``): pick the remaining node with the most
    neighbours (ties by position), and for each of its configurations fix it
    (slice it out of its factors, which may make the rest reducible again),
    solve the rest recursively and keep the cheapest.  Memory stays bounded
    and the result stays exact; time grows with the number of conditioned
    configurations.

Recovering the strategy (``_Step.recover``)
    Eliminations are undone in reverse order: each node takes the
    configuration minimising the sum of its bucket's factors given the
    configurations already chosen for its neighbours (which were all
    eliminated later).  The buckets keep the original factor tables, so no
    argmin tables are stored.

Tie rule
    The result is a pure function of the graph's node order, edge order and
    the iteration order of the ``costs`` dicts (never of hash values).  While
    undoing eliminations each node takes the *earliest* configuration in its
    ``costs`` dict among those that are optimal given the configurations
    already fixed for the nodes decided before it (eliminated after it);
    when conditioning, the earliest configuration of the conditioned node
    whose sub-problem is strictly cheapest wins.  Consequences: if all costs
    are equal every node gets its first configuration, and a node whose
    choice does not matter gets its first among the equally good ones.
    Equal sums that differ only by floating-point rounding are not ties.

References
----------
Z. Jia, S. Lin, C. R. Qi, A. Aiken. "Exploring Hidden Dimensions in
Parallelizing Convolutional Neural Networks." ICML 2018, PMLR 80
(published there as "... in Accelerating Convolutional Neural Networks");
arXiv:1802.04924.  Section 5.2, Algorithm 1 (node and edge elimination).

R. Dechter. "Bucket elimination: A unifying framework for reasoning."
Artificial Intelligence 113(1-2):41-85, 1999.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np

__all__ = [
    "optimal_assignment",
    "search",
    "reduce_graph",
    "assignment_cost",
    "SearchResult",
    "SearchStats",
]

DEFAULT_MAX_TABLE_ENTRIES = 2**24  # 128 MiB of float64 per intermediate table

_NO_FINITE = "no assignment with finite cost exists"


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchStats:
    """What one :func:`search` did.  Counts add up over conditioned branches."""

    num_nodes: int
    num_edges: int
    #: nodes removed by the paper's node elimination (degree <= 2 here)
    node_eliminations: int
    #: merges of two factors over the same pair/tuple of nodes
    edge_eliminations: int
    #: K: nodes left in the top-level problem when no degree <= 2 node
    #: remained (or when conditioning was first needed); 0 if all reduced
    residual_nodes: int
    #: eliminations of nodes with >= 3 neighbours (min-fill order)
    general_eliminations: int
    #: times a node was fixed to each of its configurations in turn
    conditionings: int
    #: entries of the largest intermediate table built
    largest_table: int
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    assignment: dict
    total: float
    stats: SearchStats


def optimal_assignment(graph, *, max_table_entries=DEFAULT_MAX_TABLE_ENTRIES):
    """Return ``(assignment, total)`` minimising ``t_o`` exactly.

    ``assignment`` maps every node (in ``graph.nodes`` order) to a key of its
    ``costs`` dict; ``total`` is ``assignment_cost(graph, assignment)``.
    Raises ``ValueError`` for malformed costs or if no finite strategy exists.
    See the module docstring for the algorithm and the tie rule.
    """
    result = search(graph, max_table_entries=max_table_entries)
    return result.assignment, result.total


def search(graph, *, max_table_entries=DEFAULT_MAX_TABLE_ENTRIES):
    """Like :func:`optimal_assignment` but returns a :class:`SearchResult`."""
    if max_table_entries < 1:
        raise ValueError("max_table_entries must be >= 1")
    start = time.perf_counter()
    counters = _Counters()
    nodes = list(graph.nodes)
    configs, problem = _build_problem(graph, nodes, counters)
    try:
        _, chosen = problem.solve(max_table_entries, top=True)
    except _Infeasible as exc:
        raise ValueError(exc.describe(nodes)) from None
    assignment = {node: configs[i][chosen[i]] for i, node in enumerate(nodes)}
    total = assignment_cost(graph, assignment)
    stats = counters.freeze(
        len(nodes), graph.number_of_edges(), time.perf_counter() - start
    )
    return SearchResult(assignment, total, stats)


def reduce_graph(graph):
    """Apply only node and edge elimination; return the residual graph.

    The result is an undirected ``networkx.Graph`` on the ``K`` nodes that
    are left (in ``graph.nodes`` order), with an edge between two nodes that
    share a cost table.  ``K`` is 0 for chains, trees and series-parallel
    graphs; :func:`search` solves whatever is left exactly.
    """
    nodes = list(graph.nodes)
    _, problem = _build_problem(graph, nodes, _Counters())
    problem.start_reduction()
    while (x := problem._next_reducible()) is not None:
        problem.eliminate(x)
    residual = nx.Graph()
    residual.add_nodes_from(nodes[v] for v in problem.variables())
    for scope in sorted(problem.factors):
        residual.add_edges_from(
            (nodes[a], nodes[b]) for a, b in itertools.combinations(scope, 2)
        )
    return residual


def assignment_cost(graph, assignment):
    """``t_o(G, S)`` for ``S = assignment``; ``inf`` if a pair is forbidden.

    Summed with ``math.fsum`` so the value does not depend on summation order.
    """
    terms = [graph.nodes[n]["costs"][assignment[n]] for n in graph.nodes]
    for u, v, data in graph.edges(data=True):
        terms.append(data["costs"].get((assignment[u], assignment[v]), math.inf))
    return math.fsum(terms)


# --------------------------------------------------------------------------
# Building factors from the graph
# --------------------------------------------------------------------------


def _build_problem(graph, nodes, counters):
    """Convert cost dicts to arrays once; return (configs, _Problem)."""
    index = {node: i for i, node in enumerate(nodes)}
    configs, unary = [], []
    for node in nodes:
        costs = graph.nodes[node].get("costs")
        if not isinstance(costs, Mapping) or not costs:
            raise ValueError(f"node {node!r} needs a non-empty 'costs' dict")
        configs.append(list(costs))
        unary.append(_to_array(costs.values(), f"node {node!r}"))
        if np.all(unary[-1] == np.inf):
            raise ValueError(
                f"{_NO_FINITE}: node {node!r} costs +inf in every configuration"
            )
    problem = _Problem([len(c) for c in configs], counters)
    for i, table in enumerate(unary):
        problem.add((i,), table)
    for u, v, data in graph.edges(data=True):
        iu, iv = index[u], index[v]
        table = _edge_table(u, v, data, configs[iu], configs[iv])
        _check_edge_feasible(u, v, table, unary[iu], unary[iv])
        if iu == iv:  # self-loop: only (c, c) pairs can ever be chosen
            problem.add((iu,), np.diagonal(table).copy())
        elif iu < iv:
            problem.add((iu, iv), table)
        else:
            problem.add((iv, iu), np.ascontiguousarray(table.T))
    return configs, problem


def _to_array(values, what):
    try:
        array = np.fromiter(values, dtype=np.float64, count=len(values))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: costs must be real numbers ({exc})") from None
    if np.isnan(array).any() or (array == -np.inf).any():
        raise ValueError(f"{what}: costs must not be NaN or -inf")
    return array


def _edge_table(u, v, data, configs_u, configs_v):
    """Dense (|C_u|, |C_v|) table, +inf where a pair is missing."""
    costs = data.get("costs")
    if not isinstance(costs, Mapping):
        raise ValueError(f"edge ({u!r}, {v!r}) needs a 'costs' dict")
    what = f"edge ({u!r}, {v!r})"
    shape = (len(configs_u), len(configs_v))
    # Fast path: a full table written in product order (the usual way of
    # building it) maps to positions without hashing a single key.
    if len(costs) == shape[0] * shape[1] and all(
        map(operator.eq, costs, itertools.product(configs_u, configs_v))
    ):
        return _to_array(costs.values(), what).reshape(shape)
    rows, cols = _pair_positions(costs, configs_u, configs_v, what)
    table = np.full(shape, np.inf)
    table[rows, cols] = _to_array(costs.values(), what)
    return table


def _pair_positions(costs, configs_u, configs_v, what):
    pos_u = {c: k for k, c in enumerate(configs_u)}
    pos_v = {c: k for k, c in enumerate(configs_v)}
    rows = np.empty(len(costs), dtype=np.intp)
    cols = np.empty(len(costs), dtype=np.intp)
    for k, pair in enumerate(costs):
        try:
            cu, cv = pair
            rows[k], cols[k] = pos_u[cu], pos_v[cv]
        except (TypeError, ValueError, KeyError):
            raise ValueError(
                f"{what}: key {pair!r} is not a (config_u, config_v) pair "
                "of configurations of its endpoints"
            ) from None
    return rows, cols


def _check_edge_feasible(u, v, table, unary_u, unary_v):
    """Name the edge if no pair of allowed configurations is allowed on it."""
    if u == v:
        combined = np.diagonal(table) + unary_u
    else:
        combined = table + unary_u[:, None] + unary_v[None, :]
    if np.all(combined == np.inf):
        raise ValueError(
            f"{_NO_FINITE}: edge ({u!r}, {v!r}) forbids every pair of "
            "configurations its endpoints allow"
        )


# --------------------------------------------------------------------------
# Variable elimination with conditioning
# --------------------------------------------------------------------------


@dataclass
class _Counters:
    node_eliminations: int = 0
    edge_eliminations: int = 0
    residual_nodes: int | None = None
    general_eliminations: int = 0
    conditionings: int = 0
    largest_table: int = 0

    def freeze(self, num_nodes, num_edges, seconds):
        return SearchStats(
            num_nodes=num_nodes,
            num_edges=num_edges,
            node_eliminations=self.node_eliminations,
            edge_eliminations=self.edge_eliminations,
            residual_nodes=self.residual_nodes or 0,
            general_eliminations=self.general_eliminations,
            conditionings=self.conditionings,
            largest_table=self.largest_table,
            seconds=seconds,
        )


class _Infeasible(Exception):
    """No finite completion; carries the variables to name in the error."""

    def __init__(self, var, neighbours, why):
        super().__init__(var, neighbours, why)
        self.var, self.neighbours, self.why = var, neighbours, why

    def describe(self, nodes):
        around = ", ".join(repr(nodes[n]) for n in self.neighbours)
        return (
            f"{_NO_FINITE}: {self.why} node "
            f"{nodes[self.var]!r}" + (f" (neighbours: {around})" if around else "")
        )


@dataclass
class _Step:
    """One eliminated variable and the factors of its bucket."""

    var: int
    scopes: list
    tables: list

    def recover(self, chosen):
        """Earliest best configuration of ``var`` given its neighbours'."""
        vector = None
        for scope, table in zip(self.scopes, self.tables):
            index = tuple(slice(None) if v == self.var else chosen[v] for v in scope)
            part = table[index]
            # Same factor order and operations as _combine -> same floats,
            # so argmin agrees with the minimum taken during elimination.
            vector = part if vector is None else vector + part
        return int(np.argmin(vector))  # argmin: first index among ties


def _combine(scopes, tables, union):
    """Sum factors broadcast onto ``union`` (sorted), smallest first."""
    axis = {v: i for i, v in enumerate(union)}
    total = None
    for scope, table in zip(scopes, tables):
        shape = [1] * len(union)
        for v, n in zip(scope, table.shape):
            shape[axis[v]] = n
        part = table.reshape(shape)
        total = part if total is None else total + part
    return total


@dataclass
class _Problem:
    """A sum of factors over variables 0..n-1 (node positions)."""

    domains: list
    counters: _Counters
    factors: dict = field(default_factory=dict)  # scope -> ndarray
    scopes_of: dict = field(default_factory=dict)  # var -> set of scopes
    constant: float = 0.0
    _heap: list = field(default_factory=list)  # (degree, var) candidates
    _fill: dict = field(default_factory=dict)  # var -> min-fill key cache

    # ---- factor store ----------------------------------------------------

    def add(self, scope, table):
        """Insert a factor; merge with one of equal scope (edge elimination)."""
        if not scope:
            self.constant += float(table)
            return
        if scope in self.factors:
            # Never in place: eliminated buckets may still hold the old array.
            self.factors[scope] = self.factors[scope] + table
            if len(scope) > 1:
                self.counters.edge_eliminations += 1
            return
        self.factors[scope] = table
        for v in scope:
            self.scopes_of.setdefault(v, set()).add(scope)

    def variables(self):
        return sorted(self.scopes_of)

    def neighbours(self, x):
        return sorted(set().union(*self.scopes_of[x]) - {x})

    def table_size(self, x):
        """Entries of the table eliminating ``x`` would build."""
        return math.prod(self.domains[v] for v in self.neighbours(x)) * self.domains[x]

    # ---- elimination ----------------------------------------------------

    def eliminate(self, x):
        """Minimise ``x`` out of the sum; return the _Step that undoes it."""
        by_size = sorted(self.scopes_of.pop(x), key=lambda s: (self.factors[s].size, s))
        tables = [self.factors.pop(s) for s in by_size]
        for scope in by_size:
            for v in scope:
                if v != x:
                    self.scopes_of[v].discard(scope)
        union = sorted(set().union(*by_size))
        combined = _combine(by_size, tables, union)
        self.counters.largest_table = max(self.counters.largest_table, combined.size)
        message = combined.min(axis=union.index(x))
        rest = tuple(v for v in union if v != x)
        if np.all(message == np.inf):
            raise _Infeasible(x, rest, "all configurations are forbidden around")
        self.add(rest, message)
        self._after_elimination(rest)
        return _Step(x, by_size, tables)

    def _after_elimination(self, touched):
        """Queue neighbours that became reducible; drop stale fill scores."""
        self._queue_if_reducible(touched)
        if self._fill:
            stale = set(touched)
            for v in touched:
                stale.update(self.neighbours(v))
            for v in stale:
                self._fill.pop(v, None)

    def _next_reducible(self):
        """Lowest-degree variable with <= 2 neighbours, ties by position."""
        while self._heap:
            degree, x = heapq.heappop(self._heap)
            if x not in self.scopes_of:
                continue  # already eliminated
            now = len(self.neighbours(x))
            if now == degree:
                return x
            if now <= 2:  # stale entry: requeue with the current degree
                heapq.heappush(self._heap, (now, x))
        return None

    def _next_min_fill(self):
        return min(self.scopes_of, key=self._fill_key)

    def _fill_key(self, x):
        if x not in self._fill:
            nbrs = self.neighbours(x)
            adjacent = {v: set(self.neighbours(v)) for v in nbrs}
            fill = sum(
                b not in adjacent[a] for a, b in itertools.combinations(nbrs, 2)
            )
            self._fill[x] = (fill, len(nbrs), x)
        return self._fill[x]

    # ---- solving --------------------------------------------------------

    def start_reduction(self):
        """Queue every variable that node elimination can remove now."""
        self._heap = []
        self._queue_if_reducible(self.variables())

    def _queue_if_reducible(self, variables):
        for v in variables:
            degree = len(self.neighbours(v))
            if degree <= 2:
                heapq.heappush(self._heap, (degree, v))

    def solve(self, limit, top=False):
        """Return (value, {var: config index}) for all remaining variables.

        Raises _Infeasible if no finite completion exists.
        """
        self.start_reduction()
        steps = []
        while self.scopes_of:
            x = self._next_reducible()
            reducible = x is not None
            if not reducible:
                self._note_residual(top)
                x = self._next_min_fill()
            if self.table_size(x) > limit and self.neighbours(x):
                self._note_residual(top)
                value, chosen = self._condition(limit)
                break
            steps.append(self.eliminate(x))
            if reducible:
                self.counters.node_eliminations += 1
            else:
                self.counters.general_eliminations += 1
        else:
            value, chosen = self.constant, {}
        for step in reversed(steps):
            chosen[step.var] = step.recover(chosen)
        return value, chosen

    def _note_residual(self, top):
        """Record K the first time the top level needs more than reduction."""
        if top and self.counters.residual_nodes is None:
            self.counters.residual_nodes = len(self.scopes_of)

    def _condition(self, limit):
        """Fix the busiest variable to each configuration; keep the best."""
        z = max(self.scopes_of, key=lambda v: (len(self.neighbours(v)), -v))
        self.counters.conditionings += 1
        best_value, best = math.inf, None
        for k in range(self.domains[z]):
            try:
                value, chosen = self._fixed(z, k).solve(limit)
            except _Infeasible:
                continue
            if value < best_value:  # strict: earliest config wins ties
                best_value, best = value, {**chosen, z: k}
        if best is None:
            raise _Infeasible(
                z, self.neighbours(z), "every configuration is infeasible for"
            )
        return best_value, best

    def _fixed(self, z, k):
        """A copy of this problem with variable ``z`` fixed to config ``k``."""
        sub = _Problem(self.domains, self.counters, constant=self.constant)
        for scope in sorted(self.factors):
            table = self.factors[scope]
            if z in scope:
                axis = scope.index(z)
                table = table[(slice(None),) * axis + (k,)]
                scope = scope[:axis] + scope[axis + 1 :]
            sub.add(scope, table)
        return sub
