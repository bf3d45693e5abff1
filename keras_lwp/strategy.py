"""Strategy: the configuration of every layer, with its predicted cost. Pure Python."""

import json
from collections.abc import Mapping
from dataclasses import dataclass

from keras_lwp.config import Config
from keras_lwp.mesh import MeshSpec


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


@dataclass(frozen=True)
class LayerReport:
    """One row of a Strategy's summary: a layer's class and predicted costs (seconds, bytes)."""

    class_name: str
    compute: float
    sync: float
    transfer: float
    memory: float


class Strategy(Mapping):
    """A mapping from layer name to that layer's Config, over a mesh, with its predicted cost.

    Attributes:
        mesh: the MeshSpec the configurations refer to.
        name: "auto", "data", "model", "owt" or "custom".
        cost: StrategyCost (seconds per training step), or None when not costed.
        memory: estimated peak bytes on one device (weights, gradients, optimizer slots, activations).
        layers: {layer name: LayerReport} behind `summary()`.
    """

    def __init__(self, configs, mesh, name="custom", cost=None, memory=None, layers=None, profile=None):
        self._configs = {str(k): v if isinstance(v, Config) else Config(v) for k, v in configs.items()}
        self.mesh = mesh if isinstance(mesh, MeshSpec) else MeshSpec.from_dict(mesh)
        self.name = name
        self.cost = cost
        self.memory = memory
        self.layers = dict(layers or {})
        self.profile = profile

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
        """A table a person reads: per layer its configuration and predicted costs; totals below."""
        rows = [("layer", "class", "configuration", "compute ms", "sync ms", "transfer ms")]
        for layer, config in self._configs.items():
            report = self.layers.get(layer)
            if report is None:
                rows.append((layer, "", str(config), "", "", ""))
            else:
                rows.append((layer, report.class_name, str(config), f"{report.compute * 1e3:.3f}",
                             f"{report.sync * 1e3:.3f}", f"{report.transfer * 1e3:.3f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        right = {3, 4, 5}

        def line(row):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

        text = [f"Strategy '{self.name}' on {self.mesh}" + (f", profile {self.profile}" if self.profile else "")]
        text.append(line(rows[0]))
        text.append("  ".join("-" * w for w in widths))
        text.extend(line(r) for r in rows[1:])
        if self.cost is not None:
            text.append(f"predicted step: {self.cost}")
        if self.memory is not None:
            text.append(f"estimated peak memory per device: {self.memory / 2**20:.1f} MiB")
        out = "\n".join(text)
        if print_fn is not None:
            print_fn(out)
        return out

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
        )
