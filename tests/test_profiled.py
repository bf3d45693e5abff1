"""The profiled cost model: it measures a tiny model on the mesh, the cache hits on the second call,
a changed layer misses, and the planner builds one per mesh it searches. The collective arithmetic
and the cache file are checked without devices."""

import keras
import pytest

import keras_lwp
from keras_lwp.config import Config
from keras_lwp.cost import CollectiveModel, LinearFit, ProfiledCostModel
from keras_lwp.cost.cache import ProfileCache, clear_cache
from keras_lwp.cost.collectives import axis_groups, collective_cases, fit_line, relayout_steps
from keras_lwp.mesh import MeshSpec
from tests import models

MESH = MeshSpec((("x", 4), ("y", 2)))
SMALL = {"x": 2}  # two devices: few configurations, so profiling takes seconds


# -- pure: collectives and the cache ---------------------------------------------------------------

@pytest.mark.parametrize(
    "src, dst, expected",
    [
        (("x", None), ("x", None), []),
        ((None, None), ("x", None), []),                                      # a local slice
        (("x", None), (None, None), [("allgather", ("x",), (None, None))]),
        (("x", None), (None, "x"), [("alltoall", ("x",), ("x", None))]),       # one axis moves
        (("x", "y"), (None, None), [("allgather", ("x", "y"), (None, None))]),
        (("x", "y"), ("y", "x"), [("allgather", ("x",), (None, "y")), ("alltoall", ("y",), (None, "y"))]),
        (("x", None), ("y", None), [("allgather", ("x",), (None, None))]),     # gathered, then sliced on y
        (("x", "y"), (None, "y"), [("allgather", ("x",), (None, "y"))]),
        ((None, "y"), ("x", None), [("allgather", ("y",), ("x", None))]),     # sliced on x first
    ],
    ids=["same", "slice", "gather", "alltoall", "gather-2d", "swap", "move-axis", "gather-keep", "slice-then-gather"],
)
def test_relayout_steps_follow_the_path_placement_runs(src, dst, expected):
    assert relayout_steps(src, dst) == expected


def test_fit_line_recovers_latency_and_bandwidth():
    fit = fit_line([1e3, 1e5, 1e6], [1e-4 + 1e3 / 1e9, 1e-4 + 1e5 / 1e9, 1e-4 + 1e6 / 1e9])
    assert fit.latency == pytest.approx(1e-4)
    assert fit.bandwidth == pytest.approx(1e9)
    assert fit_line([1e3, 1e6], [2e-3, 1e-3]) == LinearFit(1.5e-3, 0.0)   # noise: flat
    noisy = fit_line([1e3, 1e5, 1e6], [1e-5, 3e-5, 1.2e-3])              # intercept below zero
    assert 0.0 < noisy.latency <= 1e-5 and noisy.seconds_per_byte > 0.0   # latency stays positive


def test_collective_model_prices_relayouts_by_the_bytes_of_each_step():
    fits = {(kind, axes): LinearFit(1e-4, 1e-9) for kind in ("allreduce", "allgather") for axes in axis_groups(MESH)}
    fits[("alltoall", ("x",))] = LinearFit(1e-5, 1e-10)
    model = CollectiveModel(MESH, fits)
    nbytes = 8e6
    assert model.relayout_time(nbytes, ("x", None), ("x", None)) == 0.0
    assert model.relayout_time(nbytes, (None, None), ("x", "y")) == 0.0
    # An all-gather over x of a tensor split x and y: each device ends with 1/2 of it.
    assert model.relayout_time(nbytes, ("x", "y"), (None, "y")) == pytest.approx(1e-4 + nbytes / 2 * 1e-9)
    # An all-to-all moves a block of 1/4 of the tensor.
    assert model.relayout_time(nbytes, ("x", None), (None, "x")) == pytest.approx(1e-5 + nbytes / 4 * 1e-10)
    assert model.allreduce_time(4e6, ("x",)) == pytest.approx(1e-4 + 4e6 * 1e-9)
    assert model.allreduce_time(4e6, ()) == 0.0
    assert CollectiveModel.from_dict(MESH, model.to_dict()).fits == model.fits
    cases = {(kind, axes) for kind, axes, *_ in collective_cases(MESH)}
    assert ("allgather", ("x", "y")) in cases and ("alltoall", ("y",)) in cases


def test_cache_round_trip_and_clear(tmp_path):
    cache = ProfileCache({"device_kind": "test"}, str(tmp_path))
    cache.put("layers", "abc", {"seconds": 1.5})
    cache.save()
    other = ProfileCache({"device_kind": "test"}, str(tmp_path))
    assert other.get("layers", "abc") == {"seconds": 1.5}
    assert ProfileCache({"device_kind": "another"}, str(tmp_path)).get("layers", "abc") is None
    # Two writers: the second save keeps the first one's entries.
    other.put("layers", "def", {"seconds": 2.0})
    cache.put("layers", "ghi", {"seconds": 3.0})
    other.save()
    cache.save()
    assert len(ProfileCache({"device_kind": "test"}, str(tmp_path))) == 3
    assert clear_cache(str(tmp_path)) == 1
    assert ProfileCache({"device_kind": "test"}, str(tmp_path)).get("layers", "abc") is None


# -- on the mesh ------------------------------------------------------------------------------------

class Counting(ProfiledCostModel):
    """Counts the layer configurations it measures (misses of the cache)."""

    measured = 0

    def _measure_layer(self, info, dims, config):
        if not info.name.startswith("keras_lwp_probe"):  # not the model fit's overhead is measured with
            Counting.measured += 1
        return super()._measure_layer(info, dims, config)


def counted(cache_dir, **kwargs):
    Counting.measured = 0
    return Counting(SMALL, cache_dir=str(cache_dir), progress=False, **kwargs)


@pytest.fixture(scope="module")
def profiled_cache(tmp_path_factory):
    """A cache holding the tiny MLP's data-parallel profile on 2 devices (measured once per module)."""
    directory = tmp_path_factory.mktemp("profiles")
    model = counted(directory)
    plan = keras_lwp.search(models.mlp(), SMALL, batch_size=16, strategy="data", cost_model=model)
    return directory, plan, Counting.measured


def test_profiling_a_tiny_model_runs(profiled_cache):
    _, plan, measured = profiled_cache
    assert measured == 3  # the input and the two Dense layers, each under {n=x}
    assert plan.profile == "profiled"
    assert plan.cost.total > 0 and plan.cost.overhead >= 0
    for name in ("hidden", "logits"):
        report = plan.layers[name]
        assert report.compute >= 0 and report.sync > 0  # the gradient all-reduce and the update
        assert report.compute + report.sync < 1.0         # seconds: a tiny layer


def test_second_call_hits_the_cache(profiled_cache):
    directory, plan, _ = profiled_cache
    again = keras_lwp.search(models.mlp(), SMALL, batch_size=16, strategy="data", cost_model=counted(directory))
    assert Counting.measured == 0
    assert again.cost == plan.cost


def test_a_changed_layer_misses(profiled_cache):
    directory, _, _ = profiled_cache
    keras_lwp.search(models.mlp(hidden=48), SMALL, batch_size=16, strategy="data", cost_model=counted(directory))
    # 'hidden' has other units and 'logits' another input width; the input layer is unchanged.
    assert Counting.measured == 2


def test_identical_layers_are_measured_once(tmp_path):
    inputs = keras.Input((16,), name="features")
    x = keras.layers.Dense(16, name="a")(inputs)
    x = keras.layers.Dense(16, name="b")(x)
    model = keras.Model(inputs, keras.layers.Dense(16, name="c")(x))
    keras_lwp.search(model, SMALL, batch_size=16, strategy="data", cost_model=counted(tmp_path))
    # The input, 'a' (its input needs no gradient: nothing trainable upstream), and 'b' = 'c'.
    assert Counting.measured == 3


def test_the_graph_says_which_inputs_need_gradients():
    from keras_lwp.graph import layer_graph

    graph = layer_graph(models.small_cnn(), 8)
    needs = {name: graph.nodes[name]["info"].calls[0].input_gradients for name in graph
             if graph.nodes[name]["info"].class_name != "InputLayer"}
    assert needs["conv1"] == (False,)  # the image: training never differentiates the data
    assert needs["pool1"] == needs["conv2"] == needs["fc2"] == (True,)


def test_string_builds_a_profiled_model_per_mesh(monkeypatch):
    """"auto" on a 2-D mesh searches the mesh and its flattened version: the string "profiled"
    builds a profiled model for each (here one that measures nothing, to stay fast)."""
    import keras_lwp.cost.profiled as profiled

    built = []

    class Recording(ProfiledCostModel):
        def __init__(self, mesh, *args, **kwargs):
            super().__init__(mesh, *args, **kwargs)
            built.append(self.mesh)

        def prepare(self, requests):
            pass

        def layer_cost(self, info, rule, dims, config):
            return self._analytic.layer_cost(info, rule, dims, config)

        def transfer_table(self, tensor, src_layouts, dst_layouts):
            return self._analytic.transfer_table(tensor, src_layouts, dst_layouts)

        step_overhead = 0.0

    monkeypatch.setattr(profiled, "ProfiledCostModel", Recording)
    plan = keras_lwp.search(models.mlp(), MESH, batch_size=16, cost_model="profiled")
    assert set(built) == {MESH, MESH.flattened()}
    assert plan.profile == "profiled"
    # A CostModel object gives its sibling for the flattened mesh.
    given = Recording(MESH)
    built.clear()
    keras_lwp.search(models.mlp(), MESH, batch_size=16, cost_model=given)
    assert built == [MESH.flattened()]


def test_parallelize_with_the_profiled_model_trains(profiled_cache, monkeypatch):
    directory, _, _ = profiled_cache
    monkeypatch.setenv("KERAS_LWP_CACHE", str(directory))
    model = models.mlp()
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    keras_lwp.parallelize(model, keras_lwp.make_mesh(SMALL), strategy="data", batch_size=16, cost_model="profiled")
    assert keras_lwp.strategy_of(model).profile == "profiled"
    import numpy as np

    x = np.random.RandomState(0).randn(32, 32).astype("float32")
    history = model.fit(x, np.arange(32) % 8, batch_size=16, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_bad_cost_model_is_refused():
    with pytest.raises(ValueError, match="'analytic', 'profiled'"):
        keras_lwp.search(models.mlp(), SMALL, batch_size=16, cost_model="measured")
    with pytest.raises(TypeError, match="CostModel"):
        keras_lwp.search(models.mlp(), SMALL, batch_size=16, cost_model=3)


def test_unrunnable_configuration_falls_back_to_the_analytic_estimate(tmp_path):
    """A configuration keras_lwp cannot run (the full space's batch split of a transposed convolution,
    whose gradients DTensor gets wrong) is estimated analytically, with a warning."""
    inputs = keras.Input((8, 8, 4))
    model = keras.Model(inputs, keras.layers.Conv2DTranspose(4, 3, padding="same", name="up")(inputs))
    cost_model = counted(tmp_path)
    with pytest.warns(UserWarning, match="analytic estimate"):
        plan = keras_lwp.search(model, SMALL, batch_size=16, strategy=keras_lwp.Strategy(
            {"up": Config({"sample": "x"})}, MeshSpec((("x", 2),))), cost_model=cost_model, space="full")
    assert plan.layers["up"].compute > 0
    with pytest.warns(UserWarning, match="does not run"):  # said again when the cache answers
        keras_lwp.search(model, SMALL, batch_size=16, strategy=keras_lwp.Strategy(
            {"up": Config({"sample": "x"})}, MeshSpec((("x", 2),))), cost_model=counted(tmp_path), space="full")
    assert Counting.measured == 0


def test_overhead_is_part_of_the_total_and_survives_json():
    from keras_lwp.strategy import Strategy, StrategyCost

    cost = StrategyCost(0.010, 0.002, 0.001, overhead=0.003)
    assert cost.total == pytest.approx(0.016)
    assert "overhead 3.000" in str(cost)
    plan = Strategy({"hidden": Config({"sample": "x"})}, MeshSpec((("x", 2),)), cost=cost, profile="profiled")
    assert Strategy.from_json(plan.to_json()).cost == cost
