"""Tests for keras_lwp.layout_search (pure Python: numpy + networkx only)."""

import itertools
import math
import os
import pathlib
import random
import subprocess
import sys
from dataclasses import dataclass

import networkx as nx
import numpy as np
import pytest

from keras_lwp.layout_search import (
    assignment_cost,
    optimal_assignment,
    reduce_graph,
    search,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository (tests/pure/this file)
INF = math.inf


@dataclass(frozen=True)
class Split:
    """A hashable, frozen config object (like a real parallel config)."""

    data: int
    model: int


# ---------------------------------------------------------------------------
# Independent oracle
# ---------------------------------------------------------------------------


def cost_of(graph, assignment):
    """t_o recomputed directly from the dicts (forbidden pair -> inf)."""
    total = sum(graph.nodes[n]["costs"][assignment[n]] for n in graph.nodes)
    for u, v, data in graph.edges(data=True):
        total += data["costs"].get((assignment[u], assignment[v]), INF)
    return total


def brute_force_min(graph):
    """Minimum of t_o over the full product of configurations."""
    nodes = list(graph.nodes)
    configs = [list(graph.nodes[n]["costs"]) for n in nodes]
    pos = {n: i for i, n in enumerate(nodes)}
    total = np.zeros([len(c) for c in configs])

    def along(axes, table):
        shape = [1] * len(nodes)
        for axis, size in zip(axes, table.shape):
            shape[axis] = size
        return table.reshape(shape)

    for i, n in enumerate(nodes):
        costs = graph.nodes[n]["costs"]
        total = total + along([i], np.array([costs[c] for c in configs[i]], float))
    for u, v, data in graph.edges(data=True):
        iu, iv = pos[u], pos[v]
        get = data["costs"].get
        if iu == iv:
            diag = np.array([get((c, c), INF) for c in configs[iu]], float)
            total = total + along([iu], diag)
            continue
        table = np.array(
            [[get((a, b), INF) for b in configs[iv]] for a in configs[iu]], float
        )
        if iu > iv:
            iu, iv, table = iv, iu, table.T
        total = total + along([iu, iv], table)
    return float(total.min())


# ---------------------------------------------------------------------------
# Random graphs
# ---------------------------------------------------------------------------

CONFIG_POOLS = [
    ["dp", "mp", "hybrid", "pipe"],
    [(1, 8), (2, 4), (4, 2), (8, 1)],
    [Split(1, 8), Split(2, 4), Split(4, 2), Split(8, 1)],
    [0, "x", (1, "y"), Split(3, 3)],
]


def random_graph(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    graph = nx.DiGraph()
    for i in range(n):
        pool = rng.choice(CONFIG_POOLS)
        configs = rng.sample(pool, rng.randint(1, 4))
        graph.add_node(f"n{i}", costs={c: rng.uniform(0, 10) for c in configs})
    shape = seed % 4
    if shape == 0:  # complete graph K_n, random orientation
        pairs = list(itertools.combinations(range(n), 2))
    elif shape == 1:  # cycle
        pairs = [(i, (i + 1) % n) for i in range(n)] if n > 2 else [(0, 1)]
    else:  # random density, including antiparallel edges
        p = rng.random()
        pairs = [e for e in itertools.permutations(range(n), 2) if rng.random() < p]
    forbid = rng.choice([0.0, 0.0, 0.1, 0.3])
    for i, j in pairs:
        if rng.random() < 0.5:
            i, j = j, i
        u, v = f"n{i}", f"n{j}"
        cu, cv = graph.nodes[u]["costs"], graph.nodes[v]["costs"]
        table = {
            (a, b): rng.uniform(0, 10)
            for a in cu
            for b in cv
            if rng.random() >= forbid
        }
        graph.add_edge(u, v, costs=table)
    if seed % 7 == 3:  # a self-loop: only (c, c) pairs count
        u = "n0"
        cu = list(graph.nodes[u]["costs"])
        graph.add_edge(u, u, costs={(a, a): rng.uniform(0, 3) for a in cu})
    return graph


def check_against_brute_force(graph, **kwargs):
    expected = brute_force_min(graph)
    if expected == INF:
        with pytest.raises(ValueError):
            optimal_assignment(graph, **kwargs)
        return
    assignment, total = optimal_assignment(graph, **kwargs)
    assert list(assignment) == list(graph.nodes)
    assert all(assignment[n] in graph.nodes[n]["costs"] for n in graph.nodes)
    assert isinstance(total, float)
    assert np.isclose(total, expected, rtol=1e-12, atol=1e-12)
    assert np.isclose(cost_of(graph, assignment), total, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(240))
def test_random_graph_matches_brute_force(seed):
    check_against_brute_force(random_graph(seed))


@pytest.mark.parametrize("seed", range(0, 240, 3))
def test_random_graph_matches_brute_force_when_conditioning(seed):
    # A limit of 4 entries forces conditioning almost everywhere.
    check_against_brute_force(random_graph(seed), max_table_entries=4)


def test_random_graphs_are_mostly_feasible():
    # Guard the oracle test against degenerating into "everything raises".
    feasible = sum(brute_force_min(random_graph(s)) < INF for s in range(240))
    assert feasible > 180


# ---------------------------------------------------------------------------
# Hand-built graphs with obvious answers
# ---------------------------------------------------------------------------


def uniform_edge(cu, cv, same=0.0, different=1.0):
    return {(a, b): same if a == b else different for a in cu for b in cv}


def test_chain_with_one_clearly_cheapest_config():
    configs = ["dp", "mp", "hybrid"]
    graph = nx.DiGraph()
    names = [f"layer{i}" for i in range(6)]
    for name in names:
        graph.add_node(name, costs={"dp": 1.0, "mp": 5.0, "hybrid": 7.0})
    for u, v in zip(names, names[1:]):
        graph.add_edge(u, v, costs=uniform_edge(configs, configs, 0.5, 3.0))
    assignment, total = optimal_assignment(graph)
    assert assignment == {name: "dp" for name in names}
    assert total == pytest.approx(6 * 1.0 + 5 * 0.5)


def test_diamond_places_the_mismatch_on_the_cheapest_edges():
    xy = ["x", "y"]
    graph = nx.DiGraph()
    graph.add_node("a", costs={"x": 0.0, "y": 100.0})
    graph.add_node("b", costs={"x": 0.0, "y": 0.0})
    graph.add_node("c", costs={"x": 0.0, "y": 0.0})
    graph.add_node("d", costs={"x": 100.0, "y": 0.0})
    graph.add_edge("a", "b", costs=uniform_edge(xy, xy, 0.0, 5.0))
    graph.add_edge("a", "c", costs=uniform_edge(xy, xy, 0.0, 5.0))
    graph.add_edge("b", "d", costs=uniform_edge(xy, xy, 0.0, 1.0))
    graph.add_edge("c", "d", costs=uniform_edge(xy, xy, 0.0, 1.0))
    assignment, total = optimal_assignment(graph)
    assert assignment == {"a": "x", "b": "x", "c": "x", "d": "y"}
    assert total == 2.0


def test_cheapest_node_configs_conflicting_with_a_huge_edge_cost():
    pq = ["p", "q"]
    graph = nx.DiGraph()
    graph.add_node("u", costs={"p": 0.0, "q": 2.0})
    graph.add_node("v", costs={"p": 1.0, "q": 0.0})
    graph.add_edge("u", "v", costs=uniform_edge(pq, pq, 0.0, 1000.0))
    assignment, total = optimal_assignment(graph)
    assert assignment == {"u": "p", "v": "p"}
    assert total == 1.0


def test_empty_graph():
    assert optimal_assignment(nx.DiGraph()) == ({}, 0.0)


def test_isolated_nodes_take_their_cheapest_config():
    graph = nx.DiGraph()
    graph.add_node("a", costs={"p": 3.0, "q": 1.0})
    graph.add_node("b", costs={(1, 2): 0.5})
    graph.add_node("c", costs={"p": 2.0, "q": 2.0, "r": 4.0})
    assignment, total = optimal_assignment(graph)
    assert assignment == {"a": "q", "b": (1, 2), "c": "p"}
    assert total == 3.5


def test_antiparallel_edges_are_merged():
    graph = nx.DiGraph()
    graph.add_node("u", costs={"p": 0.0, "q": 0.0})
    graph.add_node("v", costs={"p": 0.0, "q": 0.0})
    graph.add_edge("u", "v", costs={("p", "p"): 5, ("p", "q"): 1, ("q", "p"): 5, ("q", "q"): 5})
    graph.add_edge("v", "u", costs={("p", "p"): 5, ("q", "p"): 1, ("p", "q"): 9, ("q", "q"): 5})
    assignment, total = optimal_assignment(graph)
    assert assignment == {"u": "p", "v": "q"}
    assert total == 2.0
    check_against_brute_force(graph)


def test_edge_table_in_any_key_order_and_with_forbidden_pairs():
    configs = ["a", "b", "c"]
    graph = nx.DiGraph()
    graph.add_node(0, costs={c: 0.0 for c in configs})
    graph.add_node(1, costs={c: 0.0 for c in configs})
    pairs = list(itertools.product(configs, configs))
    random.Random(0).shuffle(pairs)
    table = {pair: float(k) for k, pair in enumerate(pairs) if pair != pairs[0]}
    graph.add_edge(0, 1, costs=table)
    assignment, total = optimal_assignment(graph)
    assert (assignment[0], assignment[1]) == pairs[1]
    assert total == 1.0


# ---------------------------------------------------------------------------
# Determinism and ties
# ---------------------------------------------------------------------------


def equal_cost_graph():
    graph = nx.complete_graph(4, create_using=nx.DiGraph)  # both directions
    graph = nx.relabel_nodes(graph, {i: f"k{i}" for i in range(4)})
    nx.add_path(graph, ["k3", "tail1", "tail2"])
    configs = {
        "k0": ["b", "a"], "k1": [(2, 1), (1, 2)], "k2": [Split(1, 1), "z"],
        "k3": ["q", "p", "r"], "tail1": ["m", "n"], "tail2": [7, 3],
    }
    for node, cfgs in configs.items():
        graph.nodes[node]["costs"] = {c: 1.0 for c in cfgs}
    for u, v in graph.edges:
        cu, cv = configs[u], configs[v]
        graph.edges[u, v]["costs"] = {(a, b): 0.25 for a in cu for b in cv}
    return graph, {node: cfgs[0] for node, cfgs in configs.items()}


@pytest.mark.parametrize("limit", [2**24, 4])
def test_all_equal_costs_pick_every_nodes_first_config(limit):
    graph, first = equal_cost_graph()
    results = [optimal_assignment(graph, max_table_entries=limit) for _ in range(3)]
    assert all(result == results[0] for result in results)
    assert results[0][0] == first


_HASHSEED_SCRIPT = """
import itertools, json, random
import networkx as nx
from keras_lwp.layout_search import optimal_assignment

rng = random.Random(7)
names = ["input", "conv_a", "conv_b", "conv_c", "concat", "dense", "softmax"]
graph = nx.DiGraph()
configs = ["data", "model", "spatial", "hybrid"]
for name in names:
    graph.add_node(name, costs={c: float(rng.randint(0, 2)) for c in configs})
edges = [("input", "conv_a"), ("input", "conv_b"), ("input", "conv_c"),
         ("conv_a", "concat"), ("conv_b", "concat"), ("conv_c", "concat"),
         ("conv_a", "conv_b"), ("conv_b", "conv_c"), ("conv_a", "conv_c"),
         ("concat", "dense"), ("dense", "softmax")]
for u, v in edges:  # few distinct values -> many ties
    graph.add_edge(u, v, costs={(a, b): float(rng.randint(0, 1))
                                for a in configs for b in configs})
for limit in (2**24, 16):
    assignment, total = optimal_assignment(graph, max_table_entries=limit)
    print(json.dumps([list(assignment.items()), total]))
"""


def test_result_independent_of_hash_seed():
    outputs = []
    for hash_seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        proc = subprocess.run(
            [sys.executable, "-c", _HASHSEED_SCRIPT],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) == 2


# ---------------------------------------------------------------------------
# Conditioning and reduction
# ---------------------------------------------------------------------------


def complete_graph(n, n_configs, seed):
    rng = random.Random(seed)
    graph = nx.DiGraph()
    configs = [f"c{k}" for k in range(n_configs)]
    for i in range(n):
        graph.add_node(i, costs={c: rng.uniform(0, 5) for c in configs})
    for i, j in itertools.combinations(range(n), 2):
        graph.add_edge(i, j, costs={(a, b): rng.uniform(0, 5) for a in configs for b in configs})
    return graph


@pytest.mark.parametrize("seed", range(5))
def test_conditioning_on_k5_matches_brute_force(seed):
    graph = complete_graph(5, 3, seed)
    check_against_brute_force(graph, max_table_entries=8)
    result = search(graph, max_table_entries=8)
    assert result.stats.conditionings > 0
    assert result.stats.largest_table <= 8
    assert result.stats.residual_nodes == 5
    assert result.total == pytest.approx(search(graph).total, abs=1e-12)


def test_dense_graph_uses_general_elimination():
    graph = complete_graph(6, 2, seed=11)
    result = search(graph)
    assert result.stats.residual_nodes == 6
    assert result.stats.general_eliminations > 0
    assert result.stats.conditionings == 0
    assert result.total == pytest.approx(brute_force_min(graph), abs=1e-12)


def test_grid_is_exact():
    rng = random.Random(5)
    grid = nx.grid_2d_graph(3, 4)
    graph = nx.DiGraph()
    configs = ["r", "s"]
    for node in grid.nodes:
        graph.add_node(node, costs={c: rng.uniform(0, 5) for c in configs})
    for u, v in grid.edges:
        graph.add_edge(u, v, costs={(a, b): rng.uniform(0, 5) for a in configs for b in configs})
    check_against_brute_force(graph)
    check_against_brute_force(graph, max_table_entries=4)


def inception_like_graph(n_configs=2, seed=0):
    """stem -> 4 chains of different length -> concat -> head."""
    rng = random.Random(seed)
    configs = [("dp", k) for k in range(n_configs)]
    graph = nx.DiGraph()

    def layer(name):
        graph.add_node(name, costs={c: rng.uniform(0, 5) for c in configs})

    def connect(u, v):
        graph.add_edge(u, v, costs={(a, b): rng.uniform(0, 5) for a in configs for b in configs})

    for name in ("input", "stem", "concat", "head"):
        layer(name)
    connect("input", "stem")
    for branch, length in enumerate([1, 2, 3, 2]):
        previous = "stem"
        for k in range(length):
            name = f"branch{branch}_{k}"
            layer(name)
            connect(previous, name)
            previous = name
        connect(previous, "concat")
    connect("stem", "concat")  # a shortcut edge in parallel with the branches
    connect("concat", "head")
    return graph


def test_series_parallel_graph_reduces_completely():
    graph = inception_like_graph()
    residual = reduce_graph(graph)
    assert residual.number_of_nodes() <= 2
    result = search(graph)
    assert result.stats.residual_nodes <= 2
    assert result.stats.node_eliminations == graph.number_of_nodes()
    assert result.stats.edge_eliminations > 0  # branches merge into stem-concat
    assert result.stats.general_eliminations == 0
    assert result.stats.conditionings == 0
    assert result.total == pytest.approx(brute_force_min(graph), abs=1e-12)


def test_reduce_graph_keeps_the_irreducible_core():
    graph = complete_graph(4, 2, seed=1)
    nx.add_path(graph, [3, "tail1", "tail2"])
    for node in ("tail1", "tail2"):
        graph.nodes[node]["costs"] = {"c0": 1.0, "c1": 2.0}
    for u, v in [(3, "tail1"), ("tail1", "tail2")]:
        graph.edges[u, v]["costs"] = uniform_edge(["c0", "c1"], ["c0", "c1"])
    residual = reduce_graph(graph)
    assert list(residual.nodes) == [0, 1, 2, 3]
    assert residual.number_of_edges() == 6
    assert search(graph).stats.residual_nodes == 4
    check_against_brute_force(graph)


def test_long_chain_with_many_configs():
    rng = np.random.default_rng(0)
    configs = [(d, m) for d in range(1, 6) for m in range(1, 5)]
    graph = nx.DiGraph()
    for i in range(60):
        graph.add_node(i, costs=dict(zip(configs, rng.random(len(configs)))))
    for i in range(59):
        pairs = itertools.product(configs, configs)
        graph.add_edge(i, i + 1, costs=dict(zip(pairs, rng.random(len(configs) ** 2))))
    result = search(graph)
    assert result.stats.residual_nodes == 0
    assert result.stats.largest_table <= len(configs) ** 2  # leaves only: O(C^2)
    # Exact check by dynamic programming along the chain.
    best = np.array([graph.nodes[0]["costs"][c] for c in configs])
    for i in range(1, 60):
        edge = graph.edges[i - 1, i]["costs"]
        table = np.array([[edge[(a, b)] for b in configs] for a in configs])
        node = np.array([graph.nodes[i]["costs"][c] for c in configs])
        best = (best[:, None] + table).min(axis=0) + node
    assert result.total == pytest.approx(best.min(), rel=1e-12)
    assert result.total == assignment_cost(graph, result.assignment)


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


def test_empty_costs_names_the_node():
    graph = nx.DiGraph()
    graph.add_node("conv_7", costs={})
    with pytest.raises(ValueError, match="conv_7"):
        optimal_assignment(graph)


def test_missing_costs_names_the_node():
    graph = nx.DiGraph()
    graph.add_node("dense_2")
    with pytest.raises(ValueError, match="dense_2"):
        optimal_assignment(graph)


@pytest.mark.parametrize("table", [{}, {("p", "x"): 1.0}])
def test_all_pairs_forbidden_names_the_edge(table):
    graph = nx.DiGraph()
    graph.add_node("u", costs={"p": 1.0, "q": 1.0})
    graph.add_node("v", costs={"p": 1.0, "q": 1.0})
    graph.add_edge("u", "v", costs={k: v for k, v in table.items() if k[1] != "x"})
    with pytest.raises(ValueError, match=r"no assignment with finite cost.*edge \('u', 'v'\) forbids"):
        optimal_assignment(graph)


def test_globally_infeasible_graph_raises():
    # Two-colouring a triangle: each edge allows only different configs.
    graph = nx.DiGraph()
    ab = ["a", "b"]
    different = {(x, y): 0.0 for x in ab for y in ab if x != y}
    for node in ("t0", "t1", "t2"):
        graph.add_node(node, costs={"a": 0.0, "b": 0.0})
    for u, v in [("t0", "t1"), ("t1", "t2"), ("t2", "t0")]:
        graph.add_edge(u, v, costs=dict(different))
    for limit in (2**24, 2):
        with pytest.raises(ValueError, match="no assignment with finite cost.*'t"):
            optimal_assignment(graph, max_table_entries=limit)


def test_unknown_config_in_edge_table_raises():
    graph = nx.DiGraph()
    graph.add_node("u", costs={"p": 1.0})
    graph.add_node("v", costs={"p": 1.0})
    graph.add_edge("u", "v", costs={("p", "p"): 1.0, ("p", "nope"): 2.0})
    with pytest.raises(ValueError, match="nope"):
        optimal_assignment(graph)


def test_node_with_only_infinite_costs_raises():
    graph = nx.DiGraph()
    graph.add_node("u", costs={"p": 1.0})
    graph.add_node("blocked", costs={"p": INF, "q": INF})
    with pytest.raises(ValueError, match="no assignment with finite cost.*'blocked'"):
        optimal_assignment(graph)


def test_nan_cost_raises():
    graph = nx.DiGraph()
    graph.add_node("u", costs={"p": float("nan")})
    with pytest.raises(ValueError, match="'u'"):
        optimal_assignment(graph)
