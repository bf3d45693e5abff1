"""Device meshes: the pure description the planner uses, and the DTensor mesh training runs on.

`MeshSpec` (axis names and sizes) is all the search and the cost model need, so a plan for a
cluster this machine does not have (16 P100s, 64 H100s) is made from a dict. `make_mesh` builds the
real `dtensor.Mesh` over this process's devices. TensorFlow is imported only where a device is needed.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class MeshSpec:
    """Axis names and sizes of a device mesh, in order (the last axis varies fastest over devices).

    Args:
        axes: tuple of (name, size) pairs.
        device_type: "CPU", "GPU" or "TPU"; informs the default device profile.
    """

    axes: tuple
    device_type: str = "CPU"

    def __post_init__(self):
        names = [name for name, _ in self.axes]
        if not self.axes:
            raise ValueError("A mesh needs at least one axis. Received: no axes. Example: {'x': 4, 'y': 2}.")
        if len(set(names)) != len(names):
            raise ValueError(f"Mesh axis names must be unique. Received: {names}")
        for name, size in self.axes:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(f"Mesh axis names must be identifiers such as 'x'. Received: {name!r}")
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"Mesh axis '{name}' must have a positive integer size. Received: {size!r}")

    @property
    def axis_names(self):
        return tuple(name for name, _ in self.axes)

    @property
    def shape(self):
        return dict(self.axes)

    @property
    def size(self):
        return math.prod(size for _, size in self.axes)

    def axis_size(self, name):
        return dict(self.axes)[name]

    def parts(self, axes):
        """Into how many parts the mesh axes `axes` split a tensor (None entries, as in a layout, split
        nothing): the product of their sizes."""
        return math.prod(self.axis_size(a) for a in axes if a is not None)

    def axis_stride(self, name):
        """How many devices apart two neighbours along `name` are (row-major device order)."""
        stride = 1
        for axis, size in reversed(self.axes):
            if axis == name:
                return stride
            stride *= size
        raise KeyError(name)

    def flattened(self):
        """The same devices as one axis (named by joining the axis names): what data parallelism
        over every device needs, since a DTensor layout splits a dimension along one mesh axis."""
        if len(self.axes) == 1:
            return self
        return MeshSpec(((("".join(self.axis_names)), self.size),), self.device_type)

    def __str__(self):
        return "Mesh(" + ", ".join(f"{n}={s}" for n, s in self.axes) + f", {self.device_type})"

    def to_dict(self):
        return {"axes": [[n, s] for n, s in self.axes], "device_type": self.device_type}

    @classmethod
    def from_dict(cls, data):
        return cls(tuple((str(n), int(s)) for n, s in data["axes"]), data.get("device_type", "CPU"))


def parse_mesh(text):
    """{axis: size} from a mesh written as text: "4x2" (axes x, y, z, w) or "x=4,y=2"; "8" is one axis x."""
    try:
        if "=" in text:
            return {name.strip(): int(size) for name, size in (part.split("=") for part in text.split(","))}
        sizes = [int(s) for s in text.lower().split("x")]
    except ValueError:
        sizes = None
    if not sizes or len(sizes) > 4:
        raise ValueError(f"Cannot read the mesh {text!r}: write it as '4x2' (up to 4 axes) or 'x=4,y=2'.")
    return dict(zip("xyzw", sizes))


def mesh_spec_of(mesh):
    """The MeshSpec of a dict {axis: size}, a text like "4x2" or "x=4,y=2", a MeshSpec, a dtensor.Mesh
    or a keras DeviceMesh."""
    if isinstance(mesh, MeshSpec):
        return mesh
    if isinstance(mesh, str):
        mesh = parse_mesh(mesh)
    if isinstance(mesh, Mapping):
        return MeshSpec(tuple(mesh.items()), "CPU")
    kind = type(mesh).__name__
    if kind == "Mesh" and hasattr(mesh, "dim_names") and hasattr(mesh, "shape"):  # dtensor.Mesh
        return MeshSpec(tuple(zip(mesh.dim_names, (int(s) for s in mesh.shape()))), mesh.device_type())
    if kind == "DeviceMesh" and hasattr(mesh, "axis_names"):  # keras.distribution.DeviceMesh
        device_type = _device_type_of(mesh.devices.flatten()[0]) if mesh.devices.size else "CPU"
        return MeshSpec(tuple(zip(mesh.axis_names, (int(s) for s in mesh.shape))), device_type)
    raise TypeError(
        f"Expected a mesh: a dict such as {{'x': 4, 'y': 2}}, a text such as '4x2', a keras.distribution.DeviceMesh or a "
        f"dtensor.Mesh. Received: {mesh!r} of type {kind}."
    )


def _device_type_of(device):
    text = str(device).upper()
    for kind in ("GPU", "TPU", "CPU"):
        if kind in text:
            return kind
    return "CPU"


def use_virtual_devices(count, device_type="CPU"):
    """Split the first physical CPU into `count` logical devices (tests and demos on one machine).

    Must run before TensorFlow initializes its devices; calling it again with the same count is a no-op.

    The logical devices share the machine's cores and each runs its own ops side by side: unless the
    program chose an intra-op thread count, each op gets the cores per device (at least one), since
    more threads per op only contend with the other devices' ops (on 2 cores, a 4x2 mesh: AlexNet 159
    -> 141 ms per step, the transformer of examples/zoo.py 175 -> 139 ms; benchmarks/bench_step_parts).
    """
    import tensorflow as tf

    if device_type != "CPU":
        raise ValueError(f"Virtual devices are made from the CPU only. Received: device_type={device_type!r}")
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive integer. Received: {count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        have = len(tf.config.list_logical_devices("CPU"))
        if have == count:
            return
        raise RuntimeError(
            f"Cannot split the CPU into {count} logical devices: TensorFlow already initialized its "
            f"devices ({have} CPU device(s)). Call keras_lwp.use_virtual_devices({count}) at the start "
            "of the program, before any TensorFlow operation runs."
        ) from error
    if tf.config.threading.get_intra_op_parallelism_threads() == 0:  # TensorFlow's default: every core
        tf.config.threading.set_intra_op_parallelism_threads(max(1, _cores() // count))


def _cores():
    """How many cores this process may run on."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_mesh(mesh, device_type=None):
    """A `dtensor.Mesh` over this process's devices, or over the devices of every client after
    `keras_lwp.initialize` made this process one client of a multi-client cluster.

    Args:
        mesh: a dict {axis name: size} in order (e.g. {"x": 4, "y": 2}), a keras.distribution.DeviceMesh,
            a MeshSpec or an existing dtensor.Mesh (returned as is).
        device_type: "CPU", "GPU" or "TPU"; defaults to GPU when one exists, else CPU.

    On a multi-client cluster the mesh's devices are numbered client by client (client 0's devices
    first), so the leading axes split across clients and the last axes within one.
    """
    from tensorflow.experimental import dtensor

    if isinstance(mesh, dtensor.Mesh):
        return mesh
    spec = mesh_spec_of(mesh)
    import tensorflow as tf

    from keras_lwp import multihost

    if multihost.is_multi_client():
        return _distributed_mesh(spec, device_type)
    if device_type is None:
        named = _devices_of(mesh, spec.device_type)  # a DeviceMesh says which devices
        device_type = spec.device_type if named else "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    available = len(tf.config.list_logical_devices(device_type))
    if spec.size > available:
        raise ValueError(
            f"The mesh {spec} needs {spec.size} {device_type} devices but this process has {available}. "
            f"Use a smaller mesh, or call keras_lwp.use_virtual_devices({spec.size}) before TensorFlow starts."
        )
    devices = _devices_of(mesh, device_type) or [f"{device_type}:{i}" for i in range(spec.size)]
    if len(devices) < available and not _devices_of(mesh, device_type):
        import warnings

        warnings.warn(
            f"The mesh {spec} uses {spec.size} of this process's {available} {device_type} devices "
            f"({device_type}:0-{spec.size - 1}); the other {available - spec.size} stay idle. Use a mesh of "
            f"{available} devices to use them all.", stacklevel=2)
    return dtensor.create_mesh(list(spec.axes), devices=devices, device_type=device_type)


def _devices_of(mesh, device_type):
    """The devices a keras.distribution.DeviceMesh names, as "CPU:4" (None for other meshes)."""
    named = getattr(mesh, "devices", None)
    if named is None or isinstance(mesh, (Mapping, MeshSpec, str)):
        return None
    import numpy as np

    devices = []
    for device in np.asarray(named).ravel():
        kind, _, index = str(device).split("/")[-1].replace("device:", "").rpartition(":")
        if kind.upper() != device_type:
            raise ValueError(f"The DeviceMesh names device {device!r}, but the mesh is made of {device_type} devices.")
        devices.append(f"{device_type}:{int(index)}")
    return devices


def _distributed_mesh(spec, device_type):
    """The mesh over the devices of every client (dtensor.create_distributed_mesh)."""
    from tensorflow.dtensor.python import config
    from tensorflow.experimental import dtensor

    from keras_lwp import multihost

    cluster = multihost.cluster()
    if device_type is None:
        device_type = cluster.device_type if cluster is not None else "CPU"
    clients = config.num_clients()
    local = config.num_local_devices(device_type)
    if spec.size % clients or spec.size // clients > local:
        raise ValueError(
            f"The mesh {spec} has {spec.size} devices, but a mesh over {clients} clients needs the same "
            f"number on each, at most the {local} {device_type} devices each client has (so a multiple of "
            f"{clients} up to {clients * local}). Use a mesh of {clients * local} devices, e.g. "
            f"{{'x': {clients}, 'y': {local}}}.")
    devices = [f"{device_type}:{i}" for i in range(spec.size // clients)]
    return dtensor.create_distributed_mesh(list(spec.axes), local_devices=devices, device_type=device_type)
