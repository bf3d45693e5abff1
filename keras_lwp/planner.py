"""From a Keras model and a mesh to a Strategy: cost tables, search, baselines.

`search(model, mesh, batch_size)` reads the layer graph, builds for every layer the table
{configuration: t_c + t_s + own communication} and for every edge the table
{(producer config, consumer config): t_x}, hands them to `layout_search.optimal_assignment`, and
returns the plan as a Strategy. The baselines ("data", "model", "owt") are Strategies over the same
graph, costed by the same tables, so all of them compare side by side.

A DTensor layout splits a tensor dimension along one mesh axis, so data parallelism over all the
devices of a 4x2 mesh needs the same devices seen as one axis of 8. The baselines use that
flattened mesh, and "auto" searches both the given mesh and the flattened one and keeps the faster
plan: it is never predicted slower than a baseline.
"""

import contextlib
import fnmatch
import gc
import math
from collections.abc import Mapping

import networkx as nx
import numpy as np

from keras_lwp import layout_search
from keras_lwp.config import REPLICATED, Config
from keras_lwp.cost import volume
from keras_lwp.cost.calibration import default_profile
from keras_lwp.cost.devices import get_profile
from keras_lwp.cost.memory import Memory, layer_memory
from keras_lwp.cost.model import COST_MODELS, AnalyticCostModel, CostModel, make_cost_model
from keras_lwp.graph import layer_graph
from keras_lwp.layers import Placement, check_dims, configurations, rule_for, runnable_dims
from keras_lwp.mesh import MeshSpec, mesh_spec_of
from keras_lwp.strategy import EdgeReport, LayerReport, Strategy, StrategyCost

BASELINES = ("data", "model", "owt")
# "auto" runs its searched plan only when that is predicted to save data parallelism at least this
# fraction of data parallelism's communication (gradient sync): else data parallelism, which relays
# nothing. What the plans differ in is mostly communication, which the cost model prices least well
# here: a transformer plan (examples/zoo.py, a 4x2 mesh of 2 cores) predicted to save 3 ms (9.5%) of
# data parallelism's 32 ms of sync measured 167 ms per step against 138 ms. A fraction of the
# communication, not of the step: the compute the plans share would hide any gain (VGG-16's searched
# plan saves 52% of the communication but 4.4% of a step the calibrated model prices 6x long; it
# measured 1.35x faster). Fractions of 2026-12-07's plans, and their plans measured against data
# parallelism: kept are AlexNet 82%, MobileNetV3-Small 75%, BERT 31%, DenseNet121 31% (0.95x),
# InceptionV3 18% (1.04x), InceptionResNetV2 18% (1.09x); data parallelism runs on ResNet50V2 12%
# (1.05x), ResNet50 12% (1.00x), GPT-2 7% (1.02x), ViT 6% (0.98x), Llama 5% (0.99x). Since all-gathers
# are priced as DTensor runs them (cost.comm.ALL_GATHER_FACTOR) plans that relayout save less: DenseNet121
# 28% (1.05x), InceptionV3 15.2% (0.98x, 2 rounds), InceptionResNetV2 14.5% (now data parallelism),
# ResNet50/50V2 10%, BERT 25%, GPT-2, ViT and Llama 4-6%, the transformer 13%.
AUTO_MARGIN = 0.15


def search(model, mesh, batch_size=None, strategy="auto", *, overrides=None, profile=None,
           cost_model="analytic", strict=False, space="runnable", hidden_dimensions=False, memory_limit=None,
           input_shapes=None):
    """Plan a parallelization of `model` over `mesh` without touching the model.

    Args:
        model: a Keras functional or Sequential model (built).
        mesh: a dtensor.Mesh, a keras.distribution.DeviceMesh, or a dict {axis: size} for a mesh
            this machine need not have.
        batch_size: the global batch size; default: the model's static batch size, else 32 per device
            (the paper's setting).
        strategy: "auto" (the optimal plan), a baseline ("data", "model", "owt"), or a Strategy to cost.
        overrides: {layer name or fnmatch pattern: {dimension: mesh axis}} pinning layers; "auto"
            optimizes the rest around them.
        profile: a device profile name (keras_lwp.cost.PROFILES) or DeviceProfile; default by the
            mesh's device type.
        cost_model: "analytic" (from the device `profile`), "profiled" (measured on this process's
            devices, cached on disk: keras_lwp.cost.ProfiledCostModel; it times the update of the
            model's compiled optimizer, else Adam), or a keras_lwp.cost.CostModel built for `mesh`
            (its `for_mesh` gives the flattened mesh's).
        strict: raise instead of planning a layer with no rule as replicated.
        space: "runnable" plans only the splits keras_lwp runs on DTensor today (what `parallelize`
            executes); "full" adds the rest of every rule's dimensions (the paper's whole space),
            for planning and simulation.
        hidden_dimensions: let "auto" choose splits keras_lwp computes itself because DTensor
            refuses them (a convolution's channels and rows; sample splits keras_lwp computes, such
            as AveragePooling's, are always allowed). Off by default: on the emulated CPU
            mesh the analytic cost model rates them faster than they run; cost_model="profiled" measures them.
            Overrides and explicit strategies may use them either way.
        memory_limit: bytes one device may hold (keras_lwp.cost.memory: weights, gradients, Adam's
            slots, activations kept for the backward pass), or "auto" for the device profile's
            memory. "auto" then returns the fastest plan it finds that fits; any strategy that does
            not fit raises MemoryLimitError naming the smallest footprint any plan reaches.
        input_shapes: {input name: shape without the batch} for inputs whose shape the model leaves
            open (a transformer's sequence length: {"token_ids": (128,), "padding_mask": (128,)});
            the plan is for those shapes.

    Returns:
        A Strategy with its predicted cost (`strategy.cost`) and memory.
    """
    spec = mesh_spec_of(mesh)
    batch_size = _batch_size(model, spec, batch_size)
    # A mesh object names devices this process has: price with them, calibrated; a shape plans for
    # devices this machine may not have.
    profile = default_profile(profile, cost_model, devices_present=not isinstance(mesh, (Mapping, str, MeshSpec)))
    with _garbage_collection(False):
        graph = layer_graph(model, batch_size, input_shapes)
    return plan_graph(graph, spec, batch_size, strategy, overrides=overrides, profile=profile, cost_model=cost_model,
                      strict=strict, space=space, hidden_dimensions=hidden_dimensions, memory_limit=memory_limit,
                      optimizer=getattr(model, "optimizer", None))


class MemoryLimitError(ValueError):
    """No plan (or not the plan asked for) fits the memory limit of one device."""


def plan_graph(graph, mesh, batch_size, strategy="auto", *, overrides=None, profile=None, cost_model="analytic",
               strict=False, space="runnable", hidden_dimensions=False, memory_limit=None, optimizer=None):
    """`search` from an already-read layer graph (keras_lwp.graph.layer_graph) and a MeshSpec;
    `optimizer` is the one a "profiled" cost model times the update of."""
    with _garbage_collection(False):
        return _plan_graph(graph, mesh, batch_size, strategy, overrides=overrides, profile=profile,
                           cost_model=cost_model, strict=strict, space=space, hidden_dimensions=hidden_dimensions,
                           memory_limit=memory_limit, optimizer=optimizer)


@contextlib.contextmanager
def _garbage_collection(enabled):
    """Python's cyclic collector on or off inside, then as it was. Planning allocates about a million
    small objects and no cycles that matter; with a model (and TensorFlow) in memory, each full
    collection they trigger walks every object of the process: a quarter of InceptionV3's plan time.
    A profiled cost model's measurements run with it on (`Problem.prepare`)."""
    before = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        yield
    finally:
        (gc.enable if before else gc.disable)()


def _plan_graph(graph, mesh, batch_size, strategy, *, overrides, profile, cost_model, strict, space,
                hidden_dimensions, memory_limit, optimizer):
    spec = mesh_spec_of(mesh)
    if profile == "calibrated":  # once, on the given mesh: its flattened version is the same devices
        profile = get_profile(profile, spec)
    if space not in ("runnable", "full"):
        raise ValueError(f"space must be 'runnable' or 'full'. Received: space={space!r}")
    _check_batch(graph, spec, batch_size)
    cost_models = {}  # one per mesh searched: the given one and its flattened version
    if cost_model is None:
        cost_model = "analytic"
    if isinstance(cost_model, CostModel):
        cost_models[cost_model.mesh] = cost_model
    elif not isinstance(cost_model, str):
        raise TypeError(f"cost_model must be 'analytic', 'profiled' or a keras_lwp.cost.CostModel. "
                        f"Received: {cost_model!r} of type {type(cost_model).__name__}")
    elif cost_model not in COST_MODELS:
        raise ValueError(f"cost_model must be one of {', '.join(repr(k) for k in COST_MODELS)} or a "
                         f"keras_lwp.cost.CostModel. Received: cost_model={cost_model!r}")
    warned = set()  # one warning per unknown layer class per plan

    def cost_model_for(mesh_spec):
        if mesh_spec not in cost_models:
            if isinstance(cost_model, str):
                cost_models[mesh_spec] = make_cost_model(cost_model, mesh_spec, profile, optimizer)
            else:  # a given model's sibling on this mesh, or (a model that has none) the analytic one
                sibling = cost_model.for_mesh(mesh_spec)
                cost_models[mesh_spec] = sibling if sibling is not None else AnalyticCostModel(mesh_spec, profile)
        return cost_models[mesh_spec]

    problems = {}

    def problem_for(mesh_spec):
        if mesh_spec not in problems:
            problems[mesh_spec] = Problem(graph, mesh_spec, cost_model_for(mesh_spec), strict, warned, space)
        return problems[mesh_spec]

    if memory_limit == "auto":
        memory_limit = get_profile(profile, spec).memory_bytes
    if memory_limit is not None and not (isinstance(memory_limit, (int, float)) and memory_limit > 0):
        raise ValueError(f"memory_limit must be a number of bytes > 0 or 'auto'. Received: {memory_limit!r}")

    if overrides is not None and not isinstance(overrides, Mapping):
        raise ValueError(f"overrides must be a dict {{layer name or pattern: {{dimension: mesh axis}}}}, e.g. "
                         f"overrides={{'dense_1': {{'channel': 'y'}}}}. Received: {overrides!r}")
    overrides = dict(overrides or {})
    data = None  # data parallelism's plan, once evaluated
    if isinstance(strategy, Strategy):
        problem = problem_for(_mesh_of_pins(overrides, [strategy.mesh], f"the strategy '{strategy.name}'"))
        assignment = problem.check_strategy(strategy)
        assignment.update(problem.pins(overrides))
        plan = problem.evaluate(assignment, strategy.name)
    elif strategy in BASELINES:
        # A baseline runs on the flattened mesh (one axis: data parallelism over every device), or on
        # the given mesh when the pins name its axes: the pins hold either way.
        mesh_spec = _mesh_of_pins(overrides, [spec.flattened(), spec], f"strategy '{strategy}'")
        problem = problem_for(mesh_spec)
        assignment = problem.baseline(strategy)
        assignment.update(problem.pins(overrides))
        plan = problem.evaluate(assignment, strategy)
    elif strategy != "auto":
        raise ValueError(
            f"strategy must be 'auto', one of {', '.join(BASELINES)}, or a keras_lwp.Strategy. "
            f"Received: {strategy!r}"
        )
    else:
        meshes = [spec] if spec.flattened() == spec else [spec, spec.flattened()]
        if overrides:  # search only the meshes whose axes the pins name
            meshes = [_mesh_of_pins(overrides, meshes, "strategy 'auto'")]
        plan = smallest = None
        for mesh_spec in meshes:
            problem = problem_for(mesh_spec)
            try:
                assignment = problem.optimal(overrides, hidden_dimensions or space == "full", memory_limit)
            except MemoryLimitError as error:
                smallest = smallest if smallest is not None and smallest.memory <= error.smallest.memory else error.smallest
                continue
            candidate = problem.evaluate(assignment, "auto")
            if plan is None or candidate.cost.total < plan.cost.total:
                plan = candidate
        if plan is None:
            raise _memory_error(memory_limit, smallest)
        if not overrides:
            flat = problem_for(spec.flattened())
            data = flat.evaluate(flat.baseline("data"), "data")
            plan = _data_unless_clearly_slower(plan, data, memory_limit)
    if memory_limit is not None and plan.memory > memory_limit:
        raise MemoryLimitError(
            f"Strategy '{plan.name}' needs an estimated {_size(plan.memory)} per device, more than "
            f"memory_limit={_size(memory_limit)}. Largest layers: {_largest_layers(plan)}. "
            "Use strategy='auto', which searches for a plan that fits, or raise memory_limit.")
    # Beside every layer, what data parallelism would cost it: the summary's yardstick.
    if data is None:
        flat = problem_for(spec.flattened())
        data = plan if plan.name == "data" else flat.evaluate(flat.baseline("data"), "data")
    plan.data_parallel = {name: report.total for name, report in data.layers.items()}
    return plan


def _data_unless_clearly_slower(plan, data, memory_limit):
    """`plan` (the searched optimum) if it is predicted to save at least AUTO_MARGIN of the
    communication of `data` (data parallelism's plan), else `data`, renamed "auto" and keeping the
    optimum as `searched` for the summary."""
    if plan.mesh == data.mesh and dict(plan) == dict(data):  # the optimum is data parallelism
        return plan
    fits = memory_limit is None or data.memory <= memory_limit
    if not fits or data.cost.total - plan.cost.total >= AUTO_MARGIN * (data.cost.sync + data.cost.transfer):
        return plan
    data.name, data.searched = "auto", plan
    return data


def _mesh_of_pins(overrides, meshes, what):
    """The first of `meshes` whose axes hold every mesh axis the pins in `overrides` name."""
    named = set()
    for pattern, config in overrides.items():
        if not isinstance(pattern, str):
            raise ValueError(f"The override keyed {pattern!r} names no layer: overrides are keyed by layer names or "
                             f"fnmatch patterns, e.g. overrides={{'dense_1': {{'channel': 'y'}}}}.")
        if not isinstance(config, Mapping):
            raise ValueError(
                f"The override for {pattern!r} is {config!r}; a configuration is a dict {{dimension: mesh axis}}, "
                f"e.g. overrides={{{pattern!r}: {{'sample': 'x', 'channel': 'y'}}}} (an empty dict replicates the layer).")
        known = set().union(*(m.axis_names for m in meshes))
        for dim, axis in config.items():
            if not isinstance(axis, str):
                raise ValueError(
                    f"The override for {pattern!r} splits dimension {dim!r} on {axis!r}: a pin names one mesh axis, "
                    f"one of {' or '.join(repr(list(m.axis_names)) for m in meshes)}.")
            if axis not in known:
                raise ValueError(
                    f"The override for {pattern!r} splits dimension {dim!r} on mesh axis {axis!r}: mesh axis {axis!r} "
                    f"is not in {' nor '.join(str(m) for m in meshes)}. Use one of the axes "
                    f"{' or '.join(repr(list(m.axis_names)) for m in meshes)}.")
        named.update(config.values())
    for mesh_spec in meshes:
        if named <= set(mesh_spec.axis_names):
            return mesh_spec
    raise ValueError(
        f"The overrides name mesh axes {sorted(named)}, but {what} runs on "
        f"{' or '.join(str(m) for m in meshes)}: a plan runs on one mesh, so every pin must name axes of the same one. "
        f"Write the pins with the axes of one of them ({' or '.join(repr(list(m.axis_names)) for m in meshes)}).")


def _size(nbytes):
    """Bytes for people: MiB, or KiB and bytes for small figures (a limit of 1000 bytes is not 0.0 MiB)."""
    if nbytes >= 2**20 / 10:
        return f"{nbytes / 2**20:.1f} MiB"
    if nbytes >= 1024:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes:.0f} bytes"


def _largest_layers(plan, count=3):
    largest = sorted(plan.layers.items(), key=lambda item: -item[1].memory)[:count]
    return ", ".join(f"'{name}' {_size(report.memory)}" for name, report in largest)


def _memory_error(memory_limit, smallest):
    error = MemoryLimitError(
        f"No plan fits memory_limit={_size(memory_limit)} per device: the smallest footprint any "
        f"plan reaches is {smallest.memory_detail}, on {smallest.mesh}. "
        f"Largest layers in that plan: {_largest_layers(smallest)}. Raise memory_limit, use a mesh with more "
        "devices, or a smaller batch size.")
    error.smallest = smallest
    return error


def random_strategy(model, mesh, batch_size, seed, profile=None, input_shapes=None):
    """A valid strategy drawn at random (each layer a uniformly chosen runnable configuration),
    costed like any other: for tests of exactness and of the cost model's ranking."""
    spec = mesh_spec_of(mesh)
    graph = layer_graph(model, batch_size, input_shapes)
    problem = Problem(graph, spec, AnalyticCostModel(spec, profile), warned=set())
    rng = np.random.default_rng(seed)
    assignment = {name: problem.configs[name][rng.integers(len(problem.configs[name]))] for name in problem.nodes}
    return problem.evaluate(assignment, f"random{seed}")


def _batch_size(model, spec, batch_size):
    if batch_size is not None:
        return batch_size
    static = [t.shape[0] for t in getattr(model, "inputs", None) or [] if t.shape and t.shape[0] is not None]
    return static[0] if static else 32 * spec.size


def _check_batch(graph, spec, batch_size):
    candidates = list(dict.fromkeys(spec.axes + spec.flattened().axes))  # a one-axis mesh is its own flattening
    if any(batch_size % size == 0 for _, size in candidates if size > 1):
        return
    if spec.size == 1:
        return
    first = graph.graph["inputs"][0]
    axes = " nor ".join(f"'{name}' (size {size})" for name, size in candidates)
    smallest = min(size for _, size in spec.axes)
    raise ValueError(
        f"batch_size={batch_size} cannot be split on any mesh axis: the 'sample' dimension of layer "
        f"'{first}' (size {batch_size}) is not evenly divided by mesh axis {axes}. Use a batch size that is "
        f"a multiple of {smallest} (for example {batch_size + (-batch_size) % smallest}), or a mesh whose axis divides it."
    )


class Problem:
    """The cost tables of one model graph on one mesh, and the search over them."""

    def __init__(self, graph, mesh, cost_model, strict=False, warned=None, space="runnable"):
        self.graph = graph
        self.mesh = mesh
        self.cost_model = cost_model
        self.nodes = list(nx.topological_sort(graph)) if nx.is_directed_acyclic_graph(graph) else list(graph)
        self.rules = {}
        self.dims = {}
        self.configs = {}
        # Costs, layouts and memory depend on a layer's signature, not its name: identical layers
        # share every table entry (keras_lwp.graph.LayerInfo.signature).
        self.signatures = {}
        shared = {}  # signature: (dims, configs)
        for name in self.nodes:
            info = graph.nodes[name]["info"]
            self.rules[name] = rule_for(info, strict, warned)
            signature = self.signatures[name] = info.signature
            if signature not in shared:
                dims = self.rules[name].dimensions(info)
                dims = dims if space == "full" else runnable_dims(dims)
                shared[signature] = (dims, configurations(info, dims, mesh))
            self.dims[name], self.configs[name] = shared[signature]
        self._layer_costs = {}   # (signature, config): LayerCost
        self._memories = {}      # (signature, config): Memory
        self._placements = {}
        self._edge_tables = {}   # (signatures of u and v, the edge's tensors, configs of u, of v): t_x array
        self._edge_costs = {}    # (u, v, config of u, config of v): t_x

    # -- costs -------------------------------------------------------------------------------
    def layer_cost(self, name, config):
        key = (self.signatures[name], config)
        if key not in self._layer_costs:
            info = self.graph.nodes[name]["info"]
            self._layer_costs[key] = self.cost_model.layer_cost(info, self.rules[name], self.dims[name], config)
        return self._layer_costs[key]

    def _placement(self, name, config):
        key = (name, config)
        if key not in self._placements:
            self._placements[key] = Placement(self.graph.nodes[name]["info"], self.dims[name], config, self.mesh)
        return self._placements[key]

    def edge_table(self, u, v, configs_u, configs_v):
        """t_x over every pair of configurations, as an array [len(configs_u), len(configs_v)]
        (shared by edges between identical layers: read it, do not write to it)."""
        tensors = self.graph.edges[u, v]["tensors"]
        key = (self.signatures[u], self.signatures[v], tuple(tensors), tuple(configs_u), tuple(configs_v))
        table = self._edge_tables.get(key)
        if table is None:
            table = self._edge_tables[key] = self._edge_table(u, v, tensors, configs_u, configs_v)
        return table

    def _edge_table(self, u, v, tensors, configs_u, configs_v):
        table = np.zeros((len(configs_u), len(configs_v)))
        produced_by = self.graph.nodes[u]["info"].calls[0].outputs
        for out_index, call_index, in_index, tensor in tensors:
            produced = produced_by[out_index] if out_index < len(produced_by) else tensor
            src = [self._placement(u, c).output_layout(produced) for c in configs_u]
            dst = [self._placement(v, c).input_layout(in_index, tensor) for c in configs_v]
            src_unique, src_index = _unique(src)
            dst_unique, dst_index = _unique(dst)
            unique = self.cost_model.transfer_table(tensor, src_unique, dst_unique)
            table += unique[np.ix_(src_index, dst_index)]
        return table

    def edge_cost(self, u, v, config_u, config_v):
        """t_x of edge (u, v) under one pair of configurations (the cost tables fill this cache)."""
        key = (u, v, config_u, config_v)
        if key not in self._edge_costs:
            self._edge_costs[key] = float(self.edge_table(u, v, [config_u], [config_v])[0, 0])
        return self._edge_costs[key]

    def prepare(self, allowed):
        """Let the cost model measure, at once, every layer configuration the tables will ask for."""
        requests = {(self.signatures[name], config): (self.graph.nodes[name]["info"], self.rules[name], self.dims[name], config)
                    for name in self.nodes for config in allowed[name]
                    if (self.signatures[name], config) not in self._layer_costs}
        requests = list(requests.values())
        if requests:
            with _garbage_collection(True):  # a profiled model runs TensorFlow here, for minutes
                self.cost_model.prepare(requests)

    def cost_graph(self, allowed):
        """The search's input: node and edge cost tables as layout_search.optimal_assignment takes them."""
        self.prepare(allowed)
        g = nx.DiGraph()
        for name in self.nodes:
            configs = allowed[name]
            costs = np.array([self.layer_cost(name, c).total for c in configs])
            if self.graph.has_edge(name, name):  # a shared layer fed its own output: diagonal only
                costs = costs + np.diag(self.edge_table(name, name, configs, configs))
            g.add_node(name, costs=dict(zip(configs, costs.tolist())))
        for u, v in self.graph.edges:
            if u == v:
                continue
            table = self.edge_table(u, v, allowed[u], allowed[v])
            costs = {(cu, cv): float(table[i, j]) for i, cu in enumerate(allowed[u]) for j, cv in enumerate(allowed[v])}
            self._edge_costs.update(((u, v) + pair, cost) for pair, cost in costs.items())
            g.add_edge(u, v, costs=costs)
        return g

    # -- strategies ----------------------------------------------------------------------------
    def optimal(self, overrides, hidden_dimensions=True, memory_limit=None):
        """The fastest assignment (exact). With `memory_limit`, the fastest one found that fits: the
        search minimizes time + lambda * memory, bisecting lambda (memory is a sum over layers, so
        each search stays exact; a plan off that frontier can be missed, never a wrong fit)."""
        pins = self.pins(overrides)
        allowed = dict(self.configs) if hidden_dimensions else {
            name: [c for c in configs if not self._hidden(name, c)] for name, configs in self.configs.items()}
        allowed.update({name: [config] for name, config in pins.items()})
        graph = self.cost_graph(allowed)
        assignment, _ = layout_search.optimal_assignment(graph)
        if memory_limit is None or self.memory(assignment).total <= memory_limit:
            return assignment
        # The fastest plan does not fit: every split keras_lwp runs may save memory now (a
        # convolution's channel split shards its kernel), whatever hidden_dimensions says.
        allowed = dict(self.configs)
        allowed.update({name: [config] for name, config in pins.items()})
        graph = self.cost_graph(allowed)
        memory = {name: {c: self.layer_memory(name, c).total for c in allowed[name]} for name in self.nodes}

        def weighted(time_weight, memory_weight):
            g = graph.copy()
            for name, costs in memory.items():
                g.nodes[name]["costs"] = {c: time_weight * graph.nodes[name]["costs"][c] + memory_weight * m
                                          for c, m in costs.items()}
            if time_weight == 0:
                for u, v in g.edges:
                    g.edges[u, v]["costs"] = dict.fromkeys(g.edges[u, v]["costs"], 0.0)
            found, _ = layout_search.optimal_assignment(g)
            return found, self.memory(found).total

        smallest, footprint = weighted(0.0, 1.0)
        if footprint > memory_limit:
            error = MemoryLimitError("no plan fits")
            error.smallest = self.evaluate(smallest, "smallest footprint")
            raise error
        low, high = 0.0, 1e-12  # seconds per byte
        best, used = weighted(1.0, high)
        for _ in range(40):
            if used <= memory_limit:
                break
            low, high = high, high * 16
            best, used = weighted(1.0, high)
        else:
            return smallest
        for _ in range(24):
            middle = math.sqrt(low * high) if low else high / 16
            found, used = weighted(1.0, middle)
            if used <= memory_limit:
                best, high = found, middle
            else:
                low = middle
        return best

    def layer_memory(self, name, config):
        key = (self.signatures[name], config)
        if key not in self._memories:
            self._memories[key] = layer_memory(self._placement(name, config), self.mesh)
        return self._memories[key]

    def memory(self, assignment):
        """Memory of one device under an assignment, by kind (keras_lwp.cost.memory.Memory)."""
        total = Memory()
        for name in self.nodes:
            total = total + self.layer_memory(name, assignment[name])
        return total

    def _hidden(self, name, config):
        """Whether `config` uses a hidden dimension: a split other than the samples' that the layer's
        rule computes itself (not DTensor's kernel). A sample split keras_lwp computes (AveragePooling,
        grouped convolutions) exchanges nothing and is what "data" runs, so "auto" may always use it."""
        hidden = {d.name for d in self.dims[name] if d.by_keras_lwp and d.name != "sample"}
        return any(dim in hidden for dim in config)

    def pins(self, overrides):
        """{layer name: configuration} of the overrides ({name or fnmatch pattern: {dimension: axis}})."""
        pinned = {}
        for pattern, assignment in overrides.items():
            matches = [n for n in self.nodes if fnmatch.fnmatchcase(n, pattern)]
            if not matches:
                raise ValueError(
                    f"The override {pattern!r} matches no layer of the model. Layer names: "
                    f"{', '.join(self.nodes[:20])}{' ...' if len(self.nodes) > 20 else ''}"
                )
            try:
                config = Config(assignment)
            except (TypeError, ValueError) as error:
                raise ValueError(f"The override for {pattern!r} ({', '.join(matches[:5])}): {error}") from None
            for name in matches:
                self._check(name, config, "override")
                pinned[name] = config
        return pinned

    def _check(self, name, config, source):
        info = self.graph.nodes[name]["info"]
        problem = check_dims(info, self.dims[name], config, self.mesh)
        if problem:
            raise ValueError(f"Invalid {source} {config}: {problem}. Choose one of: "
                             f"{', '.join(str(c) for c in self.configs[name][:12])}")

    def check_strategy(self, strategy):
        unknown = [name for name in strategy if name not in self.graph]
        if unknown:
            raise ValueError(
                f"The strategy names layers the model does not have: {', '.join(unknown)}. "
                "Search again for this model, or remove those entries."
            )
        assignment = {}
        for name in self.nodes:
            config = strategy.get(name, REPLICATED)
            self._check(name, config, f"configuration of layer '{name}' in the strategy")
            assignment[name] = config
        return assignment

    def baseline(self, kind):
        """The paper's baselines: data, model (channel) and OWT, split along the mesh's largest axis (on
        the flattened mesh, every device; on a mesh of several axes, which pins may ask for, the rest
        replicate)."""
        axis = max(self.mesh.axes, key=lambda item: item[1])[0]
        assignment = {}
        for name in self.nodes:
            info = self.graph.nodes[name]["info"]
            wanted = "sample"
            if kind == "model" or (kind == "owt" and _is_fully_connected(info)):
                wanted = "heads" if info.class_name == "MultiHeadAttention" else "channel"
            if kind == "model" and info.class_name == "InputLayer":
                wanted = None
            config = Config({wanted: axis}) if wanted else REPLICATED
            assignment[name] = config if config in self.configs[name] else REPLICATED
        return assignment

    def evaluate(self, assignment, name):
        """The Strategy for `assignment`, with per-layer and per-edge predicted costs and memory."""
        self.prepare({name: [assignment[name]] for name in self.nodes})
        compute = sync = transfer = 0.0
        layers = {}
        for node in self.nodes:
            cost = self.layer_cost(node, assignment[node])
            incoming = 0.0
            for u in self.graph.predecessors(node):
                incoming += self.edge_cost(u, node, assignment[u], assignment[node])
            layers[node] = LayerReport(class_name=self.graph.nodes[node]["info"].class_name, compute=cost.compute,
                                       sync=cost.sync, transfer=cost.transfer + incoming,
                                       memory=self.layer_memory(node, assignment[node]).total)
            compute += cost.compute
            sync += cost.sync
            transfer += cost.transfer + incoming
        memory = self.memory(assignment)
        edges = self._edge_reports(assignment)
        communication = sum(volume.layer_bytes(self._placement(n, assignment[n]), self.mesh) for n in self.nodes)
        communication += sum(e.nbytes for e in edges)
        return Strategy(
            {n: assignment[n] for n in self.nodes}, self.mesh, name=name,
            cost=StrategyCost(compute, sync, transfer, getattr(self.cost_model, "step_overhead", 0.0)),
            memory=memory.total, layers=layers, profile=getattr(self.cost_model, "name", None),
            memory_detail=memory, edges=edges, communication=communication,
        )

    def _edge_reports(self, assignment):
        reports = []
        for u, v in self.graph.edges:
            relayout = False
            nbytes = 0.0
            produced_by = self.graph.nodes[u]["info"].calls[0].outputs
            for out_index, _, in_index, tensor in self.graph.edges[u, v]["tensors"]:
                produced = produced_by[out_index] if out_index < len(produced_by) else tensor
                src = self._placement(u, assignment[u]).output_layout(produced)
                dst = self._placement(v, assignment[v]).input_layout(in_index, tensor)
                relayout |= src != dst
                nbytes += volume.edge_bytes(tensor, src, dst, self.mesh)
            seconds = self.edge_cost(u, v, assignment[u], assignment[v])
            reports.append(EdgeReport(u, v, seconds, relayout, nbytes))
        return tuple(reports)


def _unique(items):
    """The distinct items in first-seen order, and each item's position among them."""
    positions = {}
    index = [positions.setdefault(item, len(positions)) for item in items]
    return list(positions), index


def _is_fully_connected(info):
    """OWT's model-parallel part: layers on feature vectors (rank-2 outputs), as a CNN's classifier."""
    return info.class_name != "InputLayer" and len(info.output.shape) == 2
