"""Strategy: the configuration of every layer, with its predicted cost. Pure Python."""

import json
from collections.abc import Mapping
from dataclasses import dataclass

from keras_lwp.config import Config
from keras_lwp.cost.model import LayerCost
from keras_lwp.mesh import MeshSpec, mesh_spec_of


@dataclass(frozen=True)
class StrategyCost:
    """Predicted seconds per training step, split as in Jia et al.: compute (t_c), parameter
    synchronization (t_s) and transfer (t_x, plus the communication a layer's own split implies);
    `overhead` is what a step costs besides its layers (a profiled cost model measures it; the
    same for every strategy on the same devices)."""

    compute: float
    sync: float
    transfer: float
    overhead: float = 0.0

    @property
    def total(self):
        return self.compute + self.sync + self.transfer + self.overhead

    def __str__(self):
        overhead = f", overhead {self.overhead * 1e3:.3f}" if self.overhead else ""
        return (f"{self.total * 1e3:.3f} ms/step (compute {self.compute * 1e3:.3f}, "
                f"sync {self.sync * 1e3:.3f}, transfer {self.transfer * 1e3:.3f}{overhead})")


@dataclass(frozen=True, kw_only=True)
class LayerReport(LayerCost):
    """One row of a Strategy's summary: a layer's class and predicted costs (seconds, bytes).
    `transfer` includes the relayouts into the layer."""

    class_name: str


@dataclass(frozen=True)
class EdgeReport:
    """An edge of the layer graph under a strategy: seconds of relayout (forward and backward),
    whether any tensor on it changes layout at all, and the bytes that moves over all devices."""

    src: str
    dst: str
    transfer: float
    relayout: bool
    nbytes: float = 0.0


@dataclass(frozen=True)
class LayerChange:
    """A layer two strategies configure differently, with its predicted seconds under each."""

    layer: str
    before: Config
    after: Config
    seconds_before: object = None
    seconds_after: object = None


class StrategyDiff(list):
    """Strategy.diff's result: a list of LayerChange that prints as a table."""

    def __init__(self, changes, before, after):
        super().__init__(changes)
        self.before, self.after = before, after

    def __str__(self):
        head = f"'{self.before.name}' -> '{self.after.name}': {len(self)} of {len(self.after)} layers differ"
        if self.before.cost is not None and self.after.cost is not None:
            head += (f"; predicted step {self.before.cost.total * 1e3:.3f} -> {self.after.cost.total * 1e3:.3f} ms")
        if self.before.mesh != self.after.mesh:
            head += f"; mesh {self.before.mesh} -> {self.after.mesh}"
        rows = [("layer", "before", "after", "ms before", "ms after")]
        for c in self:
            rows.append((c.layer, str(c.before), str(c.after), _ms(c.seconds_before), _ms(c.seconds_after)))
        return "\n".join([head, *_table(rows, right={3, 4})])


def _config_of(layer, assignment):
    """A layer's Config from a {dimension: mesh axis} dict, errors naming the layer."""
    if not isinstance(assignment, Mapping):
        raise ValueError(f"The configuration of layer '{layer}' is {assignment!r}; a configuration is a dict "
                         "{dimension: mesh axis}, e.g. {'sample': 'x', 'channel': 'y'} ({} replicates the layer).")
    try:
        return Config(assignment)
    except (TypeError, ValueError) as error:
        raise type(error)(f"Layer '{layer}': {error}") from None


class Strategy(Mapping):
    """A mapping from layer name to that layer's Config, over a mesh, with its predicted cost.

    Attributes:
        mesh: the mesh the configurations refer to: a MeshSpec, a dict {axis: size}, a text like "4x2", a
            dtensor.Mesh or a keras DeviceMesh (kept as its MeshSpec).
        name: "auto", "data", "model", "owt" or "custom".
        cost: StrategyCost (seconds per training step), or None when not costed.
        memory: estimated bytes on one device (weights, gradients, optimizer slots, activations);
            `memory_detail` splits it (keras_lwp.cost.memory.Memory).
        communication: bytes a training step moves between devices, summed over all of them
            (keras_lwp.cost.volume).
        layers: {layer name: LayerReport} behind `summary()`; `edges`: EdgeReport per graph edge;
            `data_parallel`: {layer name: seconds the layer would take under data parallelism}.
        searched: for an "auto" plan that kept data parallelism, the searched optimum, predicted to
            save less than keras_lwp.planner.AUTO_MARGIN of data parallelism's communication; else None.
    """

    def __init__(self, configs, mesh, name="custom", cost=None, memory=None, layers=None, profile=None,
                 memory_detail=None, edges=(), data_parallel=None, communication=None):
        self._configs = {str(k): v if isinstance(v, Config) else _config_of(k, v) for k, v in configs.items()}
        serialized = isinstance(mesh, Mapping) and not isinstance(mesh.get("axes", 0), int)  # to_json's form
        self.mesh = MeshSpec.from_dict(mesh) if serialized else mesh_spec_of(mesh)
        self.name = name
        self.cost = cost
        self.memory = memory
        self.memory_detail = memory_detail
        self.layers = dict(layers or {})
        self.edges = tuple(edges)
        self.data_parallel = dict(data_parallel or {})
        self.communication = communication
        self.profile = profile
        self.searched = None

    def __getitem__(self, layer_name):
        return self._configs[layer_name]

    def __iter__(self):
        return iter(self._configs)

    def __len__(self):
        return len(self._configs)

    def __eq__(self, other):
        if not isinstance(other, Strategy):
            return NotImplemented
        return self._configs == other._configs and self.mesh == other.mesh

    __hash__ = None

    def __repr__(self):
        cost = f", cost={self.cost}" if self.cost else ""
        return f"<Strategy {self.name} on {self.mesh}, {len(self)} layers{cost}>"

    def summary(self, print_fn=None):
        """A table a person reads: per layer its configuration, predicted compute, sync and transfer
        (relayouts into the layer included), memory per device, and what the layer would cost under
        data parallelism; the totals below."""
        rows = [("layer", "class", "configuration", "compute ms", "sync ms", "transfer ms", "memory MiB",
                 "data-parallel ms")]
        for layer, config in self._configs.items():
            report = self.layers.get(layer)
            data = _ms(self.data_parallel.get(layer))
            if report is None:
                rows.append((layer, "", str(config), "", "", "", "", data))
            else:
                rows.append((layer, report.class_name, str(config), _ms(report.compute), _ms(report.sync),
                             _ms(report.transfer), f"{report.memory / 2**20:.2f}", data))
        text = [f"Strategy '{self.name}' on {self.mesh}" + (f", profile {self.profile}" if self.profile else "")]
        text.extend(_table(rows, right={3, 4, 5, 6, 7}))
        if self.cost is not None:
            line = f"predicted step: {self.cost}"
            if self.data_parallel:
                data = sum(self.data_parallel.values()) + self.cost.overhead
                line += f"; data parallelism: {data * 1e3:.3f} ms ({data / self.cost.total:.2f}x this plan's time)"
            text.append(line)
        if self.searched is not None:
            from keras_lwp.planner import AUTO_MARGIN

            text.append(f"kept data parallelism: the best plan searched ({self.searched.mesh}, "
                        f"{self.searched.cost.total * 1e3:.3f} ms) is predicted to save less than {AUTO_MARGIN:.0%} of "
                        "data parallelism's communication, within the cost model's error; `.searched.summary()` "
                        "shows it")
        if self.communication is not None:
            text.append(f"communication per step, all devices: {self.communication / 2**20:.2f} MiB")
        relayouts = [e for e in self.edges if e.relayout]
        if self.edges:
            text.append(f"relayouts: {len(relayouts)} of {len(self.edges)} edges change layout"
                        + (f" ({sum(e.transfer for e in relayouts) * 1e3:.3f} ms)" if relayouts else ""))
        if self.memory is not None:
            detail = self.memory_detail if self.memory_detail is not None else f"{self.memory / 2**20:.2f} MiB"
            text.append(f"estimated memory per device: {detail}")
        out = "\n".join(text)
        if print_fn is not None:
            print_fn(out)
        return out

    def diff(self, other):
        """The layers whose configuration differs between this strategy and `other` (a StrategyDiff:
        a list of LayerChange that prints as a table), in this strategy's layer order."""
        changes = []
        for layer in list(self) + [name for name in other if name not in self]:
            mine, theirs = self.get(layer), other.get(layer)
            if mine != theirs:
                report, other_report = self.layers.get(layer), other.layers.get(layer)
                changes.append(LayerChange(layer, mine, theirs, report and report.total,
                                           other_report and other_report.total))
        return StrategyDiff(changes, self, other)

    def to_dot(self):
        """The layer graph in Graphviz DOT: layers filled by configuration, edges that relayout in
        red with their predicted seconds. No dependency; render with `dot -Tpng`."""
        colors = _colors(self)
        lines = [f'digraph "{self.name}" {{', "  rankdir=TB;", '  node [shape=box, style="rounded,filled"];']
        for layer, config in self._configs.items():
            report = self.layers.get(layer)
            label = f"{layer}\\n{report.class_name if report else ''}\\n{config}"
            lines.append(f'  "{layer}" [label="{label}", fillcolor="{colors[str(config)]}"];')
        for edge in self.edges:
            style = (f' [color="red", penwidth=2, label="{edge.transfer * 1e3:.3f} ms"]' if edge.relayout else "")
            lines.append(f'  "{edge.src}" -> "{edge.dst}"{style};')
        lines.append("}")
        return "\n".join(lines) + "\n"
    def to_json(self):
        data = {
            "name": self.name,
            "mesh": self.mesh.to_dict(),
            "layers": {k: v.to_dict() for k, v in self._configs.items()},
        }
        if self.cost is not None:
            data["cost"] = {"compute": self.cost.compute, "sync": self.cost.sync, "transfer": self.cost.transfer}
            if self.cost.overhead:
                data["cost"]["overhead"] = self.cost.overhead
        if self.memory is not None:
            data["memory"] = self.memory
        if self.profile is not None:
            data["profile"] = self.profile
        if self.communication is not None:
            data["communication"] = self.communication
        if self.edges:
            data["edges"] = [[e.src, e.dst, e.transfer, e.relayout, e.nbytes] for e in self.edges]
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text):
        """A Strategy from `to_json()` output (a string or a path to a .json file)."""
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        data = json.loads(text)
        cost = data.get("cost")
        return cls(
            {k: Config(v) for k, v in data["layers"].items()},
            MeshSpec.from_dict(data["mesh"]),
            name=data.get("name", "custom"),
            cost=StrategyCost(**cost) if cost else None,
            memory=data.get("memory"),
            profile=data.get("profile"),
            edges=[EdgeReport(*edge) for edge in data.get("edges", ())],
            communication=data.get("communication"),
        )


def _ms(seconds):
    return "" if seconds is None else f"{seconds * 1e3:.3f}"


def _table(rows, right):
    """Lines of a text table: a header, a rule, the rows; columns in `right` right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return [line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])]


# Colors for configurations, replicated first (light grey); from matplotlib's tab20, so the DOT
# export and the PNG agree without importing matplotlib.
_PALETTE = ("#dddddd", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
            "#dbdb8d", "#9edae5", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
            "#e377c2", "#bcbd22", "#17becf", "#7f7f7f")


def _colors(strategy):
    """{configuration text: color}, in order of first appearance, replicated always grey."""
    colors = {"{}": _PALETTE[0]}
    for config in strategy.values():
        key = str(config)
        if key not in colors:
            colors[key] = _PALETTE[1 + (len(colors) - 1) % (len(_PALETTE) - 1)]
    return colors
