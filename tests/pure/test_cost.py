"""The cost arithmetic, checked against what the collectives must move. No TensorFlow needed."""

import math

import pytest

from keras_lwp.cost import AnalyticCostModel, allreduce_time, get_profile, received_fraction
from keras_lwp.cost.comm import ALL_GATHER_FACTOR, relayout_coefficients
from keras_lwp.graph import LayerCall, LayerInfo, TensorInfo, WeightInfo
from keras_lwp.layers import Placement, configurations, rule_for
from keras_lwp.config import Config
from keras_lwp.mesh import MeshSpec

MESH = MeshSpec((("x", 4), ("y", 2)))


@pytest.mark.parametrize(
    "src, dst, expected",
    [
        (("x", None), ("x", None), 0.0),               # same layout
        ((None, None), ("x", None), 0.0),              # local slice
        (("x", None), (None, None), 3 / 4),            # all-gather over x
        (("x", None), (None, "x"), 1 / 4 - 1 / 16),    # all-to-all over x
        (("x", "y"), (None, None), 1 - 1 / 8),         # all-gather over both
        (("x", None), ("y", None), 3 / 4),             # re-split dim 0 from x to y: all-gather x, then slice on y
        (("x", "y"), ("y", "x"), 3 / 8 + 1 / 4),         # swap: gather x (a cycle), move y 1->0, slice x
    ],
    ids=["same", "slice", "allgather", "alltoall", "gather-2d", "axis-swap", "two-axes-swap"],
)
def test_received_fraction_is_what_a_device_lacks(src, dst, expected):
    assert received_fraction(src, dst, MESH) == pytest.approx(expected)


def test_an_all_gather_is_priced_as_the_all_reduce_dtensor_runs():
    """DTensor gathers by all-reducing the zero-padded block: per byte, a gather to replicated costs
    an all-reduce of the whole; an all-to-all and the gathers inside a longer relayout are priced by the
    same rule (the gather step twice what is lacking, the move once)."""
    profile = get_profile("p100")
    mesh = MeshSpec((("x", 4),))
    link = profile.intra_node
    per_byte, _ = relayout_coefficients(("x", None), (None, None), mesh, profile)
    assert per_byte == pytest.approx(2 * 3 / 4 / link.bandwidth)
    assert per_byte * 1e6 == pytest.approx(allreduce_time(1e6, ("x",), mesh, profile) - 6 * link.latency)
    per_byte, _ = relayout_coefficients(("x", None), (None, "x"), mesh, profile)
    assert per_byte == pytest.approx((1 / 4 - 1 / 16) / link.bandwidth)
    # the two-axes swap: gather x (twice 3/8), move y, slice x
    assert received_fraction(("x", "y"), ("y", "x"), MESH, ALL_GATHER_FACTOR) == pytest.approx(2 * 3 / 8 + 1 / 4)


def test_allreduce_is_a_ring():
    profile = get_profile("p100")
    mesh = MeshSpec((("x", 4),))
    t = allreduce_time(1e6, ("x",), mesh, profile)
    link = profile.intra_node
    assert t == pytest.approx(2 * 3 / 4 * 1e6 / link.bandwidth + 6 * link.latency)
    assert allreduce_time(1e6, (), mesh, profile) == 0.0


def test_cross_node_axes_use_the_slow_link():
    profile = get_profile("p100")  # 4 GPUs per node
    mesh = MeshSpec((("node", 4), ("gpu", 4)))
    assert profile.link_for_axes(mesh, ("gpu",)) == profile.intra_node
    assert profile.link_for_axes(mesh, ("node",)) == profile.inter_node


def dense_info(batch=64, n_in=512, n_out=256):
    x, y = TensorInfo((batch, n_in), "float32"), TensorInfo((batch, n_out), "float32")
    weights = (WeightInfo("d/kernel", (n_in, n_out), "float32", True), WeightInfo("d/bias", (n_out,), "float32", True))
    return LayerInfo("d", "Dense", {"units": n_out}, weights, [LayerCall((x,), (y,))])


def test_data_parallel_sync_is_the_gradient_allreduce():
    """alpa's check: with the batch split, t_s is the all-reduce of every gradient plus the update."""
    info = dense_info()
    rule = rule_for(info)
    dims = rule.dimensions(info)
    mesh = MeshSpec((("d", 8),))
    model = AnalyticCostModel(mesh, "p100")
    cost = model.layer_cost(info, rule, dims, Config({"sample": "d"}))
    weight_bytes = sum(w.nbytes for w in info.weights)
    update = weight_bytes * 7 / model.profile.memory_bandwidth
    assert cost.sync == pytest.approx(allreduce_time(weight_bytes, ("d",), mesh, model.profile) + update)
    assert cost.transfer == 0.0
    # Column-parallel: the kernel is split, nothing to all-reduce, but the input gradient is partial.
    col = model.layer_cost(info, rule, dims, Config({"channel": "d"}))
    assert col.sync == pytest.approx(update / 8)
    assert col.transfer == pytest.approx(allreduce_time(64 * 512 * 4, ("d",), mesh, model.profile))
    # Splitting the work divides compute.
    replicated = model.layer_cost(info, rule, dims, Config())
    assert cost.compute == pytest.approx(replicated.compute / 8)


def test_configurations_respect_divisibility_and_one_axis_per_dim():
    info = dense_info(batch=6, n_in=512, n_out=10)
    dims = rule_for(info).dimensions(info)
    configs = configurations(info, dims, MESH)
    assert configs[0] == Config()
    assert Config({"sample": "x"}) not in configs        # 4 does not divide 6
    assert Config({"sample": "y"}) in configs
    assert Config({"channel": "x"}) not in configs       # 4 does not divide 10
    assert Config({"reduction": "x", "channel": "y"}) in configs
    assert all(len(set(c.axes)) == len(c) for c in configs)
    assert len(configs) == len(set(configs))


def test_emulated_cpu_devices_take_turns():
    cpu = get_profile("cpu-emulated")
    assert cpu.compute_slowdown(MeshSpec((("x", 8),))) == 4.0
    assert get_profile("p100").compute_slowdown(MeshSpec((("x", 8),))) == 1.0
    with pytest.raises(ValueError, match="Known profiles"):
        get_profile("tpu-v9")


def test_halo_split_moves_only_the_halo():
    """A height split of a 3x3 conv exchanges 2 rows per block edge, far less than gathering the input."""
    x = TensorInfo((8, 32, 32, 64), "float32")
    y = TensorInfo((8, 32, 32, 64), "float32")
    weights = (WeightInfo("c/kernel", (3, 3, 64, 64), "float32", True), WeightInfo("c/bias", (64,), "float32", True))
    info = LayerInfo("c", "Conv2D", {"kernel_size": (3, 3), "strides": (1, 1), "dilation_rate": (1, 1),
                                     "groups": 1, "data_format": "channels_last"}, weights, [LayerCall((x,), (y,))])
    rule = rule_for(info)
    dims = rule.dimensions(info)
    mesh = MeshSpec((("h", 4),))
    model = AnalyticCostModel(mesh, "p100")
    place = Placement(info, dims, Config({"height": "h"}), mesh)
    row = x.nbytes / 32
    # 2 edge rows per block, gathered from the 3 other blocks (DTensor's all-gather delivers them all).
    assert model.halo_bytes(place, info.calls[0]) == pytest.approx(3 * 2 * row)
    gathered = received_fraction(("h",), (None,), mesh) * x.nbytes  # 24 of the 32 rows
    assert model.halo_bytes(place, info.calls[0]) <= gathered / 4
    halo = model.layer_cost(info, rule, dims, Config({"height": "h"})).transfer
    assert 0 < halo and math.isfinite(halo)


def depthwise_info(batch=32, side=8, channels=96, kernel=5, multiplier=1):
    x = TensorInfo((batch, side, side, channels), "float32")
    y = TensorInfo((batch, side, side, channels * multiplier), "float32")
    config = {"kernel_size": (kernel, kernel), "strides": (1, 1), "padding": "same", "dilation_rate": (1, 1),
              "depth_multiplier": multiplier, "data_format": "channels_last", "use_bias": False}
    weights = (WeightInfo("dw/kernel", (kernel, kernel, channels, multiplier), "float32", True),)
    return LayerInfo("dw", "DepthwiseConv2D", config, weights, [LayerCall((x,), (y,))])


def test_depthwise_splits_pay_for_their_taps():
    """A depthwise split runs as a product over the kernel's T taps (keras_lwp.layers.hidden_depthwise),
    materializing T copies of the output and their gradients; the native kernel, replicated, does not.
    On emulated CPU devices, which share the cores, that traffic outweighs a 2-way split: the model
    must price it above running the layer whole (measured on 8 logical CPUs, this layer: 9.9 ms
    replicated, 20.9 ms split by samples over the 4x2 mesh's y, 8.3 ms over all 8 devices)."""
    info = depthwise_info()
    rule = rule_for(info)
    dims = rule.dimensions(info)
    call = info.calls[0]
    io = 3.0 * sum(t.nbytes for t in call.inputs + call.outputs)
    taps = 25
    assert rule.memory_traffic(info, call, Config()) == io
    assert rule.memory_traffic(info, call, Config({"sample": "x"})) == pytest.approx(
        io + 8 * taps * call.outputs[0].nbytes + 2 * taps * call.inputs[0].nbytes)
    model = AnalyticCostModel(MESH, get_profile("cpu-emulated"))
    whole = model.layer_cost(info, rule, dims, Config()).compute
    half = model.layer_cost(info, rule, dims, Config({"sample": "y"})).compute
    assert half > whole


def test_tap_by_tap_implementations_pay_the_calibrated_seconds_per_tap():
    """keras_lwp's depthwise and grouped-convolution splits handle the kernel's taps one by one, a fixed
    cost per tap that neither arithmetic nor traffic shows (MobileNetV2 on 8 logical CPUs: a split 3x3
    depthwise layer on 1x1 maps took 7.8 ms, its traffic priced 0.5 ms). The profile's tap_seconds
    prices each tap where that implementation runs, and nothing where DTensor runs the native kernel."""
    import dataclasses

    info, dense, grouped = depthwise_info(), conv_info(groups=1), conv_info(groups=96)
    call = info.calls[0]
    assert rule_for(info).tap_passes(info, call, Config()) == 0
    assert rule_for(info).tap_passes(info, call, Config({"sample": "x"})) == 25
    assert rule_for(dense).tap_passes(dense, dense.calls[0], Config({"sample": "x"})) == 0
    assert rule_for(dense).tap_passes(dense, dense.calls[0], Config({"channel": "x"})) == 49
    assert rule_for(grouped).tap_passes(grouped, grouped.calls[0], Config()) == 49  # grouped: always hidden_conv
    assert rule_for(grouped).tap_passes(grouped, grouped.calls[0], Config({"height": "x"})) == 49  # always ours
    base = get_profile("cpu-emulated")
    assert base.tap_seconds == 0.0
    plain, taxed = AnalyticCostModel(MESH, base), AnalyticCostModel(MESH, dataclasses.replace(base, tap_seconds=1e-3))
    dims = rule_for(info).dimensions(info)
    for config, extra in ((Config(), 0.0), (Config({"sample": "x"}), 25e-3), (Config({"channel": "y"}), 25e-3)):
        got = taxed.layer_cost(info, rule_for(info), dims, config).compute
        assert got == pytest.approx(plain.layer_cost(info, rule_for(info), dims, config).compute + extra)


def conv_info(groups, channels=96, filters=96, kernel=7, batch=32, side=8):
    x = TensorInfo((batch, side, side, channels), "float32")
    y = TensorInfo((batch, side, side, filters), "float32")
    config = {"kernel_size": (kernel, kernel), "strides": (1, 1), "padding": "same", "dilation_rate": (1, 1),
              "groups": groups, "data_format": "channels_last", "filters": filters}
    weights = (WeightInfo("c/kernel", (kernel, kernel, channels // groups, filters), "float32", True),)
    return LayerInfo("c", "Conv2D", config, weights, [LayerCall((x,), (y,))])


def test_convolutions_keras_lwp_computes_pay_for_their_patches():
    """hidden_conv's patches (T taps times the input channels per output position) are traffic the
    native convolution never makes: a batch split DTensor runs costs the default three passes; a
    grouped convolution (always hidden_conv) or a channel split adds the patches, eight passes with
    one filter per group (its product is materialized), four otherwise."""
    dense, grouped = conv_info(groups=1), conv_info(groups=96)
    call = dense.calls[0]
    io = 3.0 * sum(t.nbytes for t in call.inputs + call.outputs)
    taps, scatter = 49, 2 * 49 * call.inputs[0].nbytes
    rule = rule_for(dense)
    assert rule.memory_traffic(dense, call, Config({"sample": "x"})) == io
    assert rule.memory_traffic(dense, call, Config({"channel": "x"})) == pytest.approx(
        io + 4 * taps * call.outputs[0].nbytes + scatter)
    assert rule_for(grouped).memory_traffic(grouped, call, Config()) == pytest.approx(
        io + 8 * taps * call.outputs[0].nbytes + scatter)


def test_full_space_prices_splits_keras_lwp_does_not_run():
    """space="full" plans a grouped convolution's spatial splits, which no implementation computes:
    pricing them must not ask for one (it raises)."""
    info = conv_info(groups=96)
    rule = rule_for(info)
    call = info.calls[0]
    assert rule.memory_traffic(info, call, Config({"height": "x"})) == rule.memory_traffic(info, call, Config())
    with pytest.raises(ValueError, match="cannot be split along height"):
        rule.implementation(info, Config({"height": "x"}))
