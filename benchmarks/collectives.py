"""Every collective in a DTensor function, read from the program DTensor compiled for it.

DTensor turns a tf.function into one program per device (SPMD expansion) and inserts the
collectives its layouts need: the relayouts the code asks for, and those its op expanders add by
themselves (an op it can only run replicated quietly gathers its inputs). A patched `relayout` sees
only the first kind; the compiled program has both. With TF_DUMP_GRAPH_PREFIX set and VLOG on for
dtensor_mlir_passes, both before TensorFlow loads (`enable(directory)`), DTensor writes its program
after every pass; `collectives(name)` reads the one written after SPMD expansion.

Bytes are what one device receives, by the conventions of keras_lwp.cost.comm: an all-gather brings
the blocks it lacks (on CPU DTensor lowers it to an all-reduce of a zero-padded buffer, which moves
more; GPU and TPU collectives move this), a ring all-reduce 2 (k - 1) / k of the buffer, an
all-scatter nothing (each device keeps its own slice).
"""

import dataclasses
import glob
import math
import os
import re

_TENSOR = re.compile(r"tensor<([0-9x]*?)x?([a-z]+[0-9]*)>")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1, "i1": 1, "ui8": 1}
_KINDS = {
    "DTensorAllGather": "all-gather", "DTensorAllReduce": "all-reduce", "DTensorAllScatter": "all-scatter",
    "DTensorAllToAll": "all-to-all", "DTensorReduceScatter": "reduce-scatter", "DTensorSend": "send",
    "DTensorRecv": "receive", "CollectivePermute": "permute",
}


def enable(directory):
    """Make DTensor write its compiled programs to `directory`. Call before TensorFlow is imported."""
    os.makedirs(directory, exist_ok=True)
    os.environ["TF_DUMP_GRAPH_PREFIX"] = directory
    modules = [m for m in os.environ.get("TF_CPP_VMODULE", "").split(",") if m]
    os.environ["TF_CPP_VMODULE"] = ",".join(modules + ["dtensor_mlir_passes=1"])


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the compiled program, as one device runs it.

    Attributes:
        kind: "all-gather", "all-reduce", "all-scatter", "all-to-all", "reduce-scatter", ...
        operand, result: local shapes on one device; `itemsize` bytes per element.
        group: devices that take part together (k).
        layout: the result's sharding specs.
    """

    kind: str
    operand: tuple
    result: tuple
    itemsize: int
    group: int
    layout: str

    @property
    def received(self):
        """Bytes one device receives."""
        operand = math.prod(self.operand) * self.itemsize
        result = math.prod(self.result) * self.itemsize
        k = self.group
        if self.kind == "all-gather":
            return result - operand
        if self.kind == "all-reduce":
            return 2 * (k - 1) / k * operand if k > 1 else 0
        if self.kind in ("all-to-all", "reduce-scatter"):
            return (k - 1) / k * operand if k > 1 else 0
        if self.kind == "all-scatter":
            return 0
        return operand

    def __str__(self):
        shape = "x".join(map(str, self.operand)) or "scalar"
        result = "x".join(map(str, self.result)) or "scalar"
        return (f"{self.kind:<14} [{shape}] -> [{result}] over {self.group} devices, layout [{self.layout}]: "
                f"{self.received / 2**10:9.1f} KiB received per device")


def _shape(text):
    match = _TENSOR.search(text)
    dims, dtype = match.groups()
    return tuple(int(d) for d in dims.split("x") if d), _BYTES.get(dtype, 4)


def _constants(program):
    """The shapes of the group-assignment constants, by SSA name."""
    found = {}
    for line in program.splitlines():
        match = re.search(r"(%[\w#]+) = \"tf.Const\".*: \(\) -> (tensor<[^>]*>)", line)
        if match:
            found[match.group(1)] = _shape(match.group(2))[0]
    return found


def parse(program):
    """The collectives of an SPMD-expanded DTensor program (MLIR text), in program order."""
    constants = _constants(program)
    found = []
    for line in program.splitlines():
        match = re.search(r"\"tf\.(\w+)\"\(([^)]*)\)", line)
        if not match or match.group(1) not in _KINDS:
            continue
        kind = _KINDS[match.group(1)]
        signature = line[line.rindex(" : (") + 4:]
        operand_text, result_text = signature.split(") -> ")
        operand, itemsize = _shape(operand_text)
        result, _ = _shape(result_text)
        layout = re.search(r"_layout = \[\"sharding_specs:([^ ]*), mesh", line)
        layout = layout.group(1).rstrip(",") if layout else ""
        args = [a.strip() for a in match.group(2).split(",")]
        if kind in ("all-reduce", "reduce-scatter") and len(args) > 1 and args[1] in constants:
            group = constants[args[1]][-1]
        elif kind == "all-gather":
            group = max(1, math.prod(result) // max(1, math.prod(operand)))
        else:
            group = max(1, math.prod(operand) // max(1, math.prod(result)))
        found.append(Collective(kind, operand, result, itemsize, group, layout))
    return found


def collectives(function_name, directory=None):
    """The collectives of the last compiled `tf.function` named `function_name`."""
    directory = directory or os.environ["TF_DUMP_GRAPH_PREFIX"]
    files = sorted(glob.glob(os.path.join(directory, f"*after_DTensorSPMDExpansion.__inference_{function_name}_*")))
    if not files:
        raise FileNotFoundError(
            f"No DTensor program for a function '{function_name}' in {directory}. Call "
            "benchmarks.collectives.enable(directory) before TensorFlow is imported, and run the function once."
        )
    with open(files[-1]) as f:
        return parse(f.read())


def received(found, kinds=None):
    """Bytes one device receives over `found` (or those of the given kinds)."""
    return sum(c.received for c in found if kinds is None or c.kind in kinds)


__all__ = ["Collective", "collectives", "enable", "parse", "received"]
