"""Explaining a plan: the summary table, diff, JSON with edges, DOT and PNG drawings; and the
memory-aware search (pure planning here; the estimate against TensorFlow's own tensors in
test_memory_on_mesh)."""

import json

import keras
import numpy as np
import pytest

import keras_lwp
from keras_lwp import MemoryLimitError, Strategy
from tests import models

MESH = {"x": 4, "y": 2}


@pytest.fixture(scope="module")
def wide():
    keras.utils.set_random_seed(0)
    return models.wide_head(features=256, width=2048, classes=100)


@pytest.fixture(scope="module")
def plans(wide):
    return {kind: keras_lwp.search(wide, MESH, batch_size=16, strategy=kind) for kind in ("auto", "data", "owt")}


def test_summary_is_a_table_with_the_data_parallel_yardstick(plans):
    auto, data = plans["auto"], plans["data"]
    text = auto.summary()
    header = text.splitlines()[1].split()
    assert header[:3] == ["layer", "class", "configuration"]
    assert "data-parallel" in header and "memory" in header
    for layer in auto:
        row = next(line for line in text.splitlines() if line.startswith(layer + " "))
        assert f"{data.layers[layer].total * 1e3:.3f}" in row  # the layer's cost under data parallelism
        assert str(auto[layer]) in row
    assert f"data parallelism: {data.cost.total * 1e3:.3f} ms" in text
    assert "estimated memory per device" in text and "optimizer" in text


def test_diff_lists_exactly_the_layers_that_differ(plans):
    auto, data = plans["auto"], plans["data"]
    changes = data.diff(auto)
    differing = [name for name in auto if auto[name] != data[name]]
    assert differing, "the wide head should not be planned data-parallel"
    assert [c.layer for c in changes] == differing
    for change in changes:
        assert change.before == data[change.layer] and change.after == auto[change.layer]
        assert change.seconds_after == pytest.approx(auto.layers[change.layer].total)
    assert len(auto.diff(auto)) == 0
    text = str(changes)
    assert f"{len(differing)} of {len(auto)} layers differ" in text
    assert all(name in text for name in differing)


def test_json_round_trip_keeps_edges(plans):
    auto = plans["auto"]
    again = Strategy.from_json(auto.to_json())
    assert again == auto and again.edges == auto.edges
    assert json.loads(auto.to_json())["edges"]


def test_relayout_edges(plans):
    """Data parallelism keeps every activation split by sample: no edge relayouts. OWT's dense layers
    split by channel need their whole input and make a channel-split output, so every edge into or
    out of one relayouts (an all-gather)."""
    data, owt = plans["data"], plans["owt"]
    assert len(data.edges) == len(data) - 1 and not any(e.relayout for e in data.edges)
    assert {(e.src, e.dst) for e in owt.edges} == {(u, v) for u, v in zip(list(owt)[:-1], list(owt)[1:])}
    for edge in owt.edges:
        assert edge.relayout == ("channel" in owt[edge.src] or "channel" in owt[edge.dst])
        assert (edge.transfer > 0) == edge.relayout


def test_dot_export_needs_nothing_and_marks_relayouts(plans, tmp_path):
    owt = plans["owt"]
    path = keras_lwp.plot_strategy(owt, str(tmp_path / "plan.dot"))
    text = open(path).read()
    assert text.startswith('digraph "owt"')
    assert text.count('color="red"') == sum(e.relayout for e in owt.edges) > 0
    for layer in owt:
        assert f'"{layer}" [label=' in text


def test_png_drawing(plans, tmp_path):
    pytest.importorskip("matplotlib")
    path = keras_lwp.plot_strategy(plans["auto"], str(tmp_path / "plan.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_model_that_is_not_parallelized_says_what_to_do(wide, tmp_path):
    with pytest.raises(ValueError, match="not parallelized"):
        keras_lwp.plot_strategy(wide, str(tmp_path / "plan.dot"))


# -- memory --------------------------------------------------------------------------------------

def test_memory_estimate_by_kind(plans):
    data = plans["data"]
    detail = data.memory_detail
    weights = sum(np.prod(w.shape) * 4 for w in models.wide_head(features=256, width=2048, classes=100).weights)
    assert detail.weights == pytest.approx(weights)  # data parallelism replicates every weight
    assert detail.gradients == pytest.approx(weights)
    assert detail.optimizer == pytest.approx(2 * weights)  # Adam's m and v
    assert detail.total == pytest.approx(data.memory)
    assert sum(report.memory for report in data.layers.values()) == pytest.approx(data.memory)


def test_search_finds_a_plan_that_fits_where_data_parallelism_does_not(wide, plans):
    data, free = plans["data"], plans["auto"]
    limit = (free.memory + data.memory) / 2
    limit = min(limit, data.memory * 0.9)
    fitted = keras_lwp.search(wide, MESH, batch_size=16, memory_limit=limit)
    assert fitted.memory <= limit < data.memory
    assert fitted.cost.total >= free.cost.total - 1e-12  # never faster than the unconstrained optimum
    with pytest.raises(MemoryLimitError, match="Strategy 'data' needs an estimated .* Largest layers"):
        keras_lwp.search(wide, MESH, batch_size=16, strategy="data", memory_limit=limit)


def test_a_tight_limit_trades_speed_for_memory():
    """On P100s the fastest plan of this MLP holds 9.6 MiB a device and the leanest 2.3 MiB: a limit
    between them gets a plan that fits and is slower than the fastest."""
    model = models.mlp(features=512, hidden=2048, classes=8)
    plan = dict(batch_size=256, profile="p100")
    free = keras_lwp.search(model, MESH, **plan)
    with pytest.raises(MemoryLimitError) as caught:
        keras_lwp.search(model, MESH, memory_limit=2**10, **plan)
    smallest = caught.value.smallest.memory
    assert smallest < 0.5 * free.memory
    limit = (smallest + free.memory) / 2
    tight = keras_lwp.search(model, MESH, memory_limit=limit, **plan)
    assert tight.memory <= limit
    assert tight.cost.total > free.cost.total
    assert keras_lwp.search(model, MESH, memory_limit=smallest * 1.0001, **plan).memory <= smallest * 1.0001


def test_no_plan_fits_names_the_smallest_footprint_and_the_largest_layers(wide):
    with pytest.raises(MemoryLimitError) as caught:
        keras_lwp.search(wide, MESH, batch_size=16, memory_limit=2**20)
    message = str(caught.value)
    assert "No plan fits memory_limit=1.0 MiB" in message
    assert "smallest footprint any plan reaches is" in message and "Largest layers" in message
    assert caught.value.smallest.memory > 2**20


def test_memory_limit_auto_uses_the_device_memory(wide):
    plan = keras_lwp.search(wide, MESH, batch_size=16, profile="p100", memory_limit="auto")
    assert plan.memory <= 16 * 2**30
    with pytest.raises(ValueError, match="memory_limit must be"):
        keras_lwp.search(wide, MESH, batch_size=16, memory_limit=-5)


def test_memory_estimate_against_the_tensors_tensorflow_holds():
    """Parallelize under a limit data parallelism exceeds, train a step with Adam, and add up the bytes
    of every variable's shard on each device (weights and Adam's slots, as DTensor holds them): the
    plan's estimate of that persistent state matches within 1% on every device. (TensorFlow reports
    no allocator statistics for CPU devices, so activations and gradients, which live only inside the
    step, are not checked here.)"""
    from tensorflow.experimental import dtensor

    from tests.conftest import require_devices

    require_devices(8)
    model = models.mlp(features=512, hidden=2048, classes=8)
    data = keras_lwp.search(model, MESH, batch_size=64, strategy="data")
    limit = data.memory * 0.6
    model = keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), batch_size=64, memory_limit=limit)
    plan = keras_lwp.strategy_of(model)
    assert plan.memory <= limit
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    model.fit(rng.standard_normal((64, 512), dtype="float32"), rng.integers(0, 8, 64), batch_size=64, verbose=0)
    held = np.zeros(8)
    for variable in list(model.weights) + list(model.optimizer.variables):
        value = getattr(variable, "_value", variable)
        held += [component.numpy().nbytes for component in dtensor.unpack(value.read_value())]
    estimate = plan.memory_detail.persistent
    np.testing.assert_allclose(held, estimate, rtol=0.01)


# -- communication volume ------------------------------------------------------------------------

def test_data_parallel_volume_is_the_ring_all_reduce_of_every_gradient(wide, plans):
    """8 devices in a ring each send 2 * 7/8 of every gradient: 14x the weights in all."""
    weights = sum(np.prod(w.shape) * 4 for w in wide.trainable_weights)
    assert plans["data"].communication == pytest.approx(8 * 2 * 7 / 8 * weights)


def test_relayout_volume_of_an_all_gather():
    """A batch-split activation gathered whole on 8 devices: each device receives the 7/8 it lacks,
    forward; backward the gradient goes from whole to split, a local slice that moves nothing."""
    from keras_lwp.cost import volume
    from keras_lwp.mesh import MeshSpec

    mesh = MeshSpec((("d", 8),))
    nbytes = 8 * 1024 * 4.0
    assert volume.relayout_total_bytes(nbytes, ("d", None), (None, None), mesh) == pytest.approx(8 * 7 / 8 * nbytes)
    assert volume.relayout_total_bytes(nbytes, (None, None), ("d", None), mesh) == 0.0
    # An all-to-all (sample split to channel split): each device keeps 1/8 of its block.
    assert volume.relayout_total_bytes(nbytes, ("d", None), (None, "d"), mesh) == pytest.approx(8 * 7 / 64 * nbytes)


def test_owt_moves_less_than_data_parallelism_on_a_wide_head(plans):
    assert plans["owt"].communication < plans["data"].communication / 10
    for edge in plans["owt"].edges:
        assert (edge.nbytes > 0) == edge.relayout
