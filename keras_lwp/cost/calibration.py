"""A device profile calibrated on the real mesh in seconds: the figures the analytic cost model
prices with, measured instead of read from a datasheet.

The analytic model prices a layer from its FLOPs and bytes and a link's latency and bandwidth. The
datasheet figures can be far off on a given machine, and what matters for a plan is their ratio: on
this project's 2-core machine the "cpu-emulated" profile priced ResNet50's compute 8x too cheap
against its all-reduces, so "auto" replicated layers and measured 4x the step of data parallelism.
`calibrated_profile` measures on the mesh's own devices, with `ProfiledCostModel`'s timer and cache:

- links: the all-reduce over the whole mesh at three sizes, fitted to latency + bytes / bandwidth and
  read as a ring (keras_lwp.cost.comm.allreduce_time);
- fit's overhead per step (ProfiledCostModel.step_overhead);
- compute: a small CNN's whole training step, data parallel through the real fit loop; the FLOP rate
  is its FLOPs per device over that time less its communication and overhead, so the devices'
  sharing of the machine's cores is inside the figure (no `concurrent_devices` slowdown on top);
- memory bandwidth: likewise from a probe of element-wise layers, over the bytes they move (5.4 GB/s
  per device on that machine's 4x2 mesh, against the datasheet profile's 10 GB/s, which sat beside a
  FLOP rate with the sharing inside and priced memory-bound layers about 2x too cheap);
- seconds per kernel tap of keras_lwp's tap-by-tap implementations (split depthwise and grouped
  convolutions): the step of a probe of 5x5 depthwise layers on 2x2 maps less the same probe's with
  1x1 kernels, less the arithmetic and traffic the extra taps add at the figures above, over the
  extra taps. A difference of two steps, not one step less everything else priced: the remainder
  of the latter was a few per cent of the step, within the noise, and came out 0 on a faster machine.
  Since taps are sliced without strided slices (halo.rows) a tap costs about 0.06 ms here (0.30 ms
  before), and on a loaded machine the difference itself can fall within the noise: then 0.

About 30 s on that machine, cached per machine and mesh. `default_profile` makes it what "analytic"
uses when the mesh's devices are in this process (keras_lwp.planner, keras_lwp.runtime).
"""

import dataclasses
import os

from keras_lwp.config import Config
from keras_lwp.cost.devices import DeviceProfile, Link, get_profile
from keras_lwp.cost.model import AnalyticCostModel
from keras_lwp.layers import dimensions_of, rule_for
from keras_lwp.mesh import mesh_spec_of

CALIBRATION_VERSION = 7  # 2: float32 probe with deep convolutions on 2x2 maps; 3: latency never 0;
# 4: memory bandwidth measured; 5: seconds per kernel tap of keras_lwp's tap-by-tap implementations;
# 6: seconds per tap from two depthwise probes' difference; 7: taps sliced without strided slices (halo.rows)
# Per-device batch of the probes: the few samples a device gets from a typical global batch.
PROBE_SAMPLES = 4
TAP_PROBE_LAYERS = 6

_calibrated = {}  # (MeshSpec, cache dir) -> DeviceProfile, for this process


def _probe_model():
    """A small CNN whose training step calibration times, in float32 whatever Keras' default: from
    wide, shallow convolutions down to deep ones on 2x2 maps (where CPU kernels run slowest per
    FLOP, and which a plan may replicate), normalization, a Dense head."""
    import keras

    layers = keras.layers
    x = inputs = keras.Input((16, 16, 32), dtype="float32", name="keras_lwp_probe_images")
    for filters, kernel in ((64, 3), (128, 3), (256, 3), (512, 3), (1024, 1)):
        x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, dtype="float32")(x)
        x = layers.BatchNormalization(dtype="float32")(x)
        x = layers.Activation("relu", dtype="float32")(x)
        if x.shape[1] > 2:
            x = layers.MaxPooling2D(dtype="float32")(x)
    x = layers.GlobalAveragePooling2D(dtype="float32")(x)
    x = layers.Dense(512, activation="relu", dtype="float32")(x)
    return keras.Model(inputs, layers.Dense(10, dtype="float32")(x), name="keras_lwp_probe")


def _traffic_probe_model():
    """A model whose training step is memory traffic: a cheap 1x1 convolution, then element-wise
    layers (a residual chain of activations and products, as in MobileNetV3's and EfficientNet's
    blocks) on activations of the size a device's few samples give, a Dense head."""
    import keras

    layers = keras.layers
    x = inputs = keras.Input((16, 16, 64), dtype="float32", name="keras_lwp_probe_activations")
    x = layers.Conv2D(64, 1, use_bias=False, dtype="float32")(x)
    for _ in range(4):
        gate = layers.Activation("sigmoid", dtype="float32")(x)
        y = layers.Multiply(dtype="float32")([x, gate])
        x = layers.Add(dtype="float32")([x, layers.ReLU(dtype="float32")(y)])
    x = layers.GlobalAveragePooling2D(dtype="float32")(x)
    return keras.Model(inputs, layers.Dense(10, dtype="float32")(x), name="keras_lwp_traffic_probe")


def _tap_probe_model(kernel):
    """Depthwise convolutions with `kernel`-wide kernels on the small maps a depthwise network ends
    in (2x2, a device's few samples), which data parallelism runs through
    keras_lwp.layers.hidden_depthwise: what their step grows by with the kernel is the fixed cost per
    kernel tap of that implementation, not arithmetic or traffic (MobileNetV2 at 32x32 on 8 logical
    CPUs: 7.8 ms per split 3x3 layer on 1x1 maps, priced at 0.5 ms by its traffic)."""
    import keras

    layers = keras.layers
    x = inputs = keras.Input((2, 2, 64), dtype="float32", name="keras_lwp_probe_maps")
    for _ in range(TAP_PROBE_LAYERS):
        x = layers.DepthwiseConv2D(kernel, padding="same", use_bias=False, dtype="float32")(x)
    x = layers.GlobalAveragePooling2D(dtype="float32")(x)
    return keras.Model(inputs, layers.Dense(10, dtype="float32")(x), name="keras_lwp_tap_probe")


def default_profile(profile, cost_model, devices_present):
    """The profile "analytic" prices with when the caller gave none: $KERAS_LWP_PROFILE if set (a
    profile name, e.g. "cpu-emulated" to plan with the datasheet figures, as the test suite does);
    else "calibrated" when the mesh's devices are in this process (single-client: clients that
    calibrated apart could plan apart); else None, the profile of the mesh's device type."""
    if profile is not None or cost_model not in (None, "analytic"):
        return profile
    if os.environ.get("KERAS_LWP_PROFILE"):
        return os.environ["KERAS_LWP_PROFILE"]
    if devices_present:
        from keras_lwp import multihost

        if not multihost.is_multi_client():
            return "calibrated"
    return None


def calibrated_profile(mesh, cache_dir=None, progress=True):
    """The DeviceProfile of `mesh` (a dtensor.Mesh, or the MeshSpec of devices this process has),
    measured once per machine and mesh and cached (see the module docstring)."""
    spec = mesh_spec_of(mesh)
    key = (spec, cache_dir)
    if key not in _calibrated:
        _calibrated[key] = _calibrate(spec, cache_dir, progress)
    return _calibrated[key]


def _calibrate(spec, cache_dir, progress):
    from keras_lwp.cost.cache import digest
    from keras_lwp.cost.profiled import ProfiledCostModel

    base = get_profile(None, spec)
    if spec.size <= 1:
        return dataclasses.replace(base, concurrent_devices=None)
    profiler = ProfiledCostModel(spec, cache_dir=cache_dir, progress=False, rounds=3)
    key = digest(["calibration", CALIBRATION_VERSION, profiler._mesh_key()])
    found = profiler.cache.get("calibration", key)
    if found is None:
        found = _measure(spec, profiler, progress)
        profiler.cache.put("calibration", key, found)
        profiler.cache.save()
    link = Link(latency=found["latency"], bandwidth=found["bandwidth"])
    return dataclasses.replace(
        base, name=f"calibrated on {spec}", flops=found["flops"], efficiency=1.0,
        memory_bandwidth=found["memory_bandwidth"], tap_seconds=found["tap_seconds"],
        intra_node=link, inter_node=link, concurrent_devices=None,
        collective_overhead=0.0,
        sources=f"calibrated on {spec} of this machine (keras_lwp.cost.calibration); memory capacity from "
                f"the {base.name!r} profile")


def _measure(spec, profiler, progress):
    import keras

    if progress:
        print(f"keras_lwp: calibrating the cost model on {spec} (once per machine and mesh; cached in "
              f"{profiler.cache.path})")
    bar = keras.utils.Progbar(6, verbose=1 if progress else 0, unit_name="measurement")
    flat = spec.flattened()
    sibling = profiler.for_mesh(flat)
    # Links: the all-reduce over every mesh axis, read as a ring (keras_lwp.cost.comm.allreduce_time):
    # 2 (k-1)/k of the buffer over each link, 2 (k-1) hops.
    allreduce = sibling.collectives.fit("allreduce", (flat.axes[0][0],))
    k = spec.size
    bandwidth = 2.0 * (k - 1) / k / max(allreduce.seconds_per_byte, 1e-15)
    latency = allreduce.latency / (2.0 * (k - 1))
    bar.add(1)
    overhead = sibling.step_overhead
    bar.add(1)
    # Compute: the probe's whole training step, data parallel through the real fit loop, less its
    # gradient all-reduces, update and fit's overhead, over its FLOPs per device. Timed inside a
    # whole step, not layer by layer: a layer alone keeps its tensors in cache and runs several times
    # faster than it does between other layers.
    link = Link(latency=latency, bandwidth=bandwidth)
    batch = PROBE_SAMPLES * k
    seconds, graph = sibling.timer.fit_step(profiler.optimizer, batch, model=_probe_model())
    flops, _, communication = _work(graph, flat, link)
    bar.add(1)
    flop_rate = flops / max(seconds - overhead - communication, 0.1 * seconds)
    # Memory bandwidth: the element-wise probe's step likewise, less its few FLOPs at that rate, over
    # the bytes its layers move per device (the roofline's other side, with the devices' sharing of
    # the machine's memory and cores inside it, as for the FLOP rate).
    seconds, graph = sibling.timer.fit_step(profiler.optimizer, batch, model=_traffic_probe_model())
    flops, nbytes, communication = _work(graph, flat, link)
    bar.add(1)
    traffic_seconds = max(seconds - overhead - communication - flops / flop_rate, 0.1 * seconds)
    memory_bandwidth = nbytes / traffic_seconds
    # Per kernel tap of the tap-by-tap implementations: what the depthwise probe's step grows by from
    # 1x1 to 5x5 kernels (fit's overhead, the all-reduces and the maps' traffic cancel), less the
    # arithmetic and traffic the larger kernels add at the rates just measured, over the added taps.
    work = {}
    for kernel in (1, 5):
        seconds, graph = sibling.timer.fit_step(profiler.optimizer, batch, model=_tap_probe_model(kernel))
        flops, nbytes, _ = _work(graph, flat, link)
        work[kernel] = (seconds - flops / flop_rate - nbytes / memory_bandwidth, _taps(graph, flat))
        bar.add(1)
    (small, small_taps), (large, large_taps) = work[1], work[5]
    tap_seconds = max(large - small, 0.0) / (large_taps - small_taps)
    return {"flops": flop_rate, "memory_bandwidth": memory_bandwidth, "bandwidth": bandwidth, "latency": latency,
            "tap_seconds": tap_seconds}


def _work(graph, mesh, link):
    """(FLOPs, bytes, communication seconds) per device of `graph`'s data-parallel training step on
    `mesh`, as the analytic model counts them: priced at one FLOP/s with memory free, at one byte/s
    with arithmetic free, and over `link` (the unit profiles' updates take no time)."""
    def unit(flops, memory_bandwidth):
        return AnalyticCostModel(mesh, DeviceProfile(
            name="unit", flops=flops, efficiency=1.0, memory_bandwidth=memory_bandwidth, memory_bytes=1.0,
            devices_per_node=mesh.size, intra_node=link, inter_node=link))

    by_flops, by_bytes = unit(1.0, float("inf")), unit(float("inf"), 1.0)
    sample = Config({"sample": mesh.axes[0][0]})
    flops = nbytes = communication = 0.0
    for name in graph:
        info = graph.nodes[name]["info"]
        rule, dims = rule_for(info), dimensions_of(info)
        cost = by_flops.layer_cost(info, rule, dims, sample)
        flops += cost.compute
        nbytes += by_bytes.layer_cost(info, rule, dims, sample).compute
        communication += cost.transfer + cost.sync
    return flops, nbytes, communication


def _taps(graph, mesh):
    """The kernel taps `graph`'s data-parallel step handles one by one (LayerRule.tap_passes)."""
    sample = Config({"sample": mesh.axes[0][0]})
    return sum(rule_for(info).tap_passes(info, call, sample)
               for info in (graph.nodes[name]["info"] for name in graph) for call in info.calls)


__all__ = ["calibrated_profile", "default_profile"]
