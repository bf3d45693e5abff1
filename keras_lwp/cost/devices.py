"""Device profiles: how fast a device computes and how fast the links between devices move bytes.

Every number says where it comes from. Peak figures are vendors' datasheets; `efficiency` is the
fraction of peak a well-tuned convolution or matrix multiply reaches (cuDNN/cuBLAS reach 50-70% of
fp32 peak on large layers); the emulated CPU mesh's figures were measured on this project's 2-core
machine (docs/design.md, "Measured facts"). A profile calibrated by profiling the real mesh
replaces these (keras_lwp.cost: the CostModel interface takes any profile).
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Link:
    """A point-to-point link: per-message latency (s) and bandwidth per direction (bytes/s)."""

    latency: float
    bandwidth: float


@dataclass(frozen=True)
class DeviceProfile:
    """A kind of device and the machine it sits in.

    Args:
        name: short name ("p100", "cpu-emulated", ...).
        flops: peak fp32 FLOP/s of one device.
        efficiency: fraction of `flops` that layers reach in practice.
        memory_bandwidth: device memory bytes/s (the roofline's other side).
        memory_bytes: device memory capacity.
        devices_per_node: devices that share the fast intra-node link.
        intra_node: the link between devices of one node.
        inter_node: the link between nodes.
        concurrent_devices: how many devices really compute at once (None: all). Logical CPU devices
            share the machine's cores, so 8 of them on 2 cores take turns.
        collective_overhead: fixed seconds every collective costs besides its links' latency (the
            logical CPU devices of one process synchronize their threads for each one).
        tap_seconds: seconds per training step that each kernel tap of keras_lwp's tap-by-tap
            implementations (LayerRule.tap_passes) costs besides its traffic: the slices, stacks and
            scatters every device runs per tap. Calibrated (keras_lwp.cost.calibration); 0 in the
            datasheet profiles.
        sources: where the numbers come from.
    """

    name: str
    flops: float
    efficiency: float
    memory_bandwidth: float
    memory_bytes: float
    devices_per_node: int
    intra_node: Link
    inter_node: Link
    concurrent_devices: object = None
    collective_overhead: float = 0.0
    tap_seconds: float = 0.0
    sources: str = field(default="", compare=False)

    @property
    def effective_flops(self):
        return self.flops * self.efficiency

    def link_for_axes(self, mesh, axes):
        """The slowest link a collective over `axes` of `mesh` crosses.

        Devices are numbered row-major over the mesh axes, nodes hold consecutive devices, so a group
        along an axis stays in one node when the axis' span (stride * size) fits in a node.
        """
        link = None
        for axis in axes:
            span = mesh.axis_stride(axis) * mesh.axis_size(axis)
            this = self.intra_node if span <= self.devices_per_node else self.inter_node
            if link is None or this.bandwidth < link.bandwidth:
                link = this
        return link or self.intra_node

    def compute_slowdown(self, mesh):
        """How much longer a step's compute takes because devices take turns on shared cores."""
        if self.concurrent_devices is None:
            return 1.0
        return max(1.0, mesh.size / self.concurrent_devices)


GB = 1e9

PROFILES = {
    # Jia et al. 2018's cluster: 4 nodes x 4 P100 (SXM2), NVLink in a node, EDR InfiniBand between nodes.
    "p100": DeviceProfile(
        name="p100",
        flops=10.6e12, efficiency=0.6,
        memory_bandwidth=732 * GB, memory_bytes=16 * 2**30,
        devices_per_node=4,
        intra_node=Link(latency=5e-6, bandwidth=20 * GB),
        inter_node=Link(latency=10e-6, bandwidth=12.5 * GB),
        sources="NVIDIA Tesla P100 datasheet (SXM2: 10.6 TFLOPS fp32, 732 GB/s HBM2, 16 GB; NVLink 1.0 "
                "20 GB/s per direction per link); 100 Gb/s EDR InfiniBand = 12.5 GB/s (Jia et al. 2018, Sec. 6)",
    ),
    "v100": DeviceProfile(
        name="v100",
        flops=15.7e12, efficiency=0.6,
        memory_bandwidth=900 * GB, memory_bytes=32 * 2**30,
        devices_per_node=8,
        intra_node=Link(latency=5e-6, bandwidth=25 * GB),
        inter_node=Link(latency=10e-6, bandwidth=12.5 * GB),
        sources="NVIDIA V100 datasheet (SXM2: 15.7 TFLOPS fp32, 900 GB/s HBM2, 32 GB; NVLink 2.0 25 GB/s per "
                "direction per link, DGX-1 hybrid cube mesh); EDR InfiniBand 100 Gb/s",
    ),
    "a100": DeviceProfile(
        name="a100",
        flops=19.5e12, efficiency=0.6,
        memory_bandwidth=2039 * GB, memory_bytes=80 * 2**30,
        devices_per_node=8,
        intra_node=Link(latency=3e-6, bandwidth=300 * GB),
        inter_node=Link(latency=5e-6, bandwidth=25 * GB),
        sources="NVIDIA A100 datasheet (SXM4 80GB: 19.5 TFLOPS fp32, 2,039 GB/s; NVLink 3 600 GB/s "
                "bidirectional via NVSwitch); HDR InfiniBand 200 Gb/s per GPU (DGX A100)",
    ),
    "h100": DeviceProfile(
        name="h100",
        flops=67e12, efficiency=0.6,
        memory_bandwidth=3350 * GB, memory_bytes=80 * 2**30,
        devices_per_node=8,
        intra_node=Link(latency=3e-6, bandwidth=450 * GB),
        inter_node=Link(latency=5e-6, bandwidth=50 * GB),
        sources="NVIDIA H100 datasheet (SXM5: 67 TFLOPS fp32, 3.35 TB/s HBM3, 80 GB; NVLink 4 900 GB/s "
                "bidirectional); NDR InfiniBand 400 Gb/s per GPU (DGX H100)",
    ),
    # Logical CPU devices on this project's 2-core machine. docs/design.md: a 3x3 conv
    # (N=32, 32x32, 64->128) forward + filter gradient took 217 ms on one device (9.7 GFLOP: ~45 GFLOP/s);
    # two 2048x2048 Dense layers, batch 64, one training step 49 ms (3.2 GFLOP: ~66 GFLOP/s). The same step
    # data-parallel on 8 devices took 681 ms: ~630 ms for all-reducing 32 MB of gradients (2*7/8*32 MB
    # moved) and 8 replicated updates, ~0.1 GB/s for in-process collectives.
    "cpu-emulated": DeviceProfile(
        name="cpu-emulated",
        flops=55e9, efficiency=1.0,
        memory_bandwidth=10 * GB, memory_bytes=3 * 2**30,
        devices_per_node=1 << 30,
        intra_node=Link(latency=50e-6, bandwidth=0.1 * GB),
        inter_node=Link(latency=50e-6, bandwidth=0.1 * GB),
        concurrent_devices=2,
        # cost_model="profiled" fitted this machine's in-process all-reduces to 0.5 ms (2 devices), 1.0 ms
        # (4) and 0.7-1.4 ms (8) fixed each: about 0.5 ms of thread synchronization plus the ring's hops.
        collective_overhead=0.5e-3,
        sources="measured on the project's 2-core machine, TF 2.21, 8 logical CPU devices (docs/design.md); "
                "collective overhead from the profiled cost model's fitted collectives; memory bandwidth "
                "assumed; cost_model=\"profiled\" measures them",
    ),
}


def get_profile(profile, mesh=None):
    """A DeviceProfile from a name in PROFILES, "calibrated" (keras_lwp.cost.calibration) or a profile;
    None picks by the mesh's device type."""
    if isinstance(profile, DeviceProfile):
        return profile
    if profile == "calibrated":  # measured on this process's devices (imports TensorFlow)
        from keras_lwp.cost.calibration import calibrated_profile

        return calibrated_profile(mesh)
    if profile is None:
        kind = getattr(mesh, "device_type", "CPU")
        profile = "cpu-emulated" if kind == "CPU" else "a100"
    if profile not in PROFILES:
        raise ValueError(
            f"Unknown device profile {profile!r}. Known profiles: {', '.join(sorted(PROFILES))}, \"calibrated\" "
            "(measured on this process's devices); or pass a keras_lwp.cost.DeviceProfile."
        )
    return PROFILES[profile]
