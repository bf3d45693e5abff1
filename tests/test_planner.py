"""keras_lwp.search: the plan for a model, its baselines, overrides, and errors."""

import warnings

import keras
import pytest

import keras_lwp
from keras_lwp.config import Config
from keras_lwp.layers import UnknownLayerWarning
from tests import models

MESH = {"x": 4, "y": 2}
MODELS = {
    "pooled_cnn": (models.pooled_cnn, 64),
    "mlp": (models.mlp, 64),
    "small_cnn": (models.small_cnn, 32),
    "branchy": (models.branchy, 16),
    "transformer": (models.transformer_block, 16),
    "conv_stack": (models.conv_stack, 256),
    "wide_head": (models.wide_head, 32),
}


@pytest.mark.parametrize("profile", ["cpu-emulated", "p100"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_is_never_predicted_slower_than_a_baseline(name, profile):
    build, batch = MODELS[name]
    model = build()
    auto = keras_lwp.search(model, MESH, batch_size=batch, profile=profile, hidden_dimensions=True)
    assert set(auto) == {layer for layer in auto.layers}
    if auto.searched is not None:  # data parallelism kept (planner.AUTO_MARGIN): the optimum is beside it
        data = keras_lwp.search(model, MESH, batch_size=batch, strategy="data", profile=profile)
        assert dict(auto) == dict(data) and auto.cost.total == pytest.approx(data.cost.total)
        auto = auto.searched
    for baseline in ("data", "model", "owt"):
        other = keras_lwp.search(model, MESH, batch_size=batch, strategy=baseline, profile=profile)
        assert auto.cost.total <= other.cost.total * (1 + 1e-9), (baseline, other.summary(), auto.summary())
    # Without keras_lwp's own convolution splits, auto still beats the baselines that need none.
    default = keras_lwp.search(model, MESH, batch_size=batch, profile=profile)
    default = default.searched or default
    assert default.cost.total >= auto.cost.total * (1 - 1e-9)
    for baseline in ("data", "owt"):
        other = keras_lwp.search(model, MESH, batch_size=batch, strategy=baseline, profile=profile)
        assert default.cost.total <= other.cost.total * (1 + 1e-9), (baseline, other.summary(), default.summary())


def test_auto_uses_hidden_convolution_splits_only_when_asked():
    model = models.small_cnn()
    default = keras_lwp.search(model, MESH, batch_size=32)
    for name in ("conv1", "conv2"):
        assert set(default[name]) <= {"sample"}, default.summary()
    pinned = keras_lwp.search(model, MESH, batch_size=32, overrides={"conv2": {"channel": "y"}})
    assert pinned["conv2"] == Config({"channel": "y"})


def test_regime_switch_conv_stack_is_data_parallel():
    plan = keras_lwp.search(models.conv_stack(), MESH, batch_size=512, profile="cpu-emulated")
    convs = [name for name, report in plan.layers.items() if report.class_name == "Conv2D"]
    assert convs and all(set(plan[c]) == {"sample"} for c in convs)
    assert all(plan[c]["sample"] == "xy" for c in convs)          # all 8 devices on the batch


@pytest.mark.parametrize("profile", ["cpu-emulated", "p100"])
def test_regime_switch_wide_dense_head_is_model_parallel(profile):
    plan = keras_lwp.search(models.wide_head(), MESH, batch_size=32, profile=profile)
    dense = [name for name, report in plan.layers.items() if report.class_name == "Dense"]
    for name in dense[:2]:  # the two 8192-wide layers: their kernels are split, not replicated
        assert set(plan[name]) & {"channel", "reduction"}, plan.summary()
        assert "sample" not in plan[name]
    data = keras_lwp.search(models.wide_head(), MESH, batch_size=32, strategy="data", profile=profile)
    assert plan.cost.total < data.cost.total / 5


def test_auto_keeps_data_parallelism_unless_the_plan_saves_enough_communication(monkeypatch):
    """"auto" runs its searched optimum only when it saves at least AUTO_MARGIN of data parallelism's
    communication; else data parallelism, with the optimum kept beside it and named in the summary,
    unless data parallelism does not fit the memory limit."""
    from keras_lwp import planner

    data = keras_lwp.search(models.wide_head(), MESH, batch_size=32, strategy="data", profile="p100")
    found = keras_lwp.search(models.wide_head(), MESH, batch_size=32, profile="p100")
    saved = (data.cost.total - found.cost.total) / (data.cost.sync + data.cost.transfer)
    assert found.searched is None and dict(found) != dict(data) and saved > planner.AUTO_MARGIN

    monkeypatch.setattr(planner, "AUTO_MARGIN", saved * 1.01)  # the same plan, just short of the margin
    kept = keras_lwp.search(models.wide_head(), MESH, batch_size=32, profile="p100")
    assert kept.name == "auto" and dict(kept) == dict(data) and kept.mesh == data.mesh
    assert dict(kept.searched) == dict(found) and kept.searched.cost.total == pytest.approx(found.cost.total)
    assert "kept data parallelism: the best plan searched" in kept.summary()

    # Data parallelism that does not fit is no fallback: the optimum that fits runs.
    limit = (found.memory + data.memory) / 2
    assert found.memory < limit < data.memory
    fitting = keras_lwp.search(models.wide_head(), MESH, batch_size=32, profile="p100", memory_limit=limit)
    assert fitting.searched is None and fitting.memory <= limit and dict(fitting) != dict(data)

    # An optimum that is data parallelism is no plan kept beside itself.
    model = models.small_cnn()
    plan = keras_lwp.search(model, MESH, batch_size=512, profile="cpu-emulated")
    assert dict(plan) == dict(keras_lwp.search(model, MESH, batch_size=512, strategy="data", profile="cpu-emulated"))
    assert plan.searched is None and "kept data parallelism" not in plan.summary()


def test_baselines_are_what_the_paper_calls_them():
    model = models.small_cnn()
    data = keras_lwp.search(model, MESH, batch_size=32, strategy="data")
    assert data.mesh.axes == (("xy", 8),)
    assert all(c == Config({"sample": "xy"}) for c in data.values())
    owt = keras_lwp.search(model, MESH, batch_size=32, strategy="owt")
    assert owt["conv1"] == Config({"sample": "xy"}) and owt["fc1"] == Config({"channel": "xy"})
    model_parallel = keras_lwp.search(model, MESH, batch_size=32, strategy="model", space="full")
    assert model_parallel["conv2"] == Config({"channel": "xy"}) and model_parallel["image"] == Config()
    # A convolution's channel split runs through keras_lwp.layers.hidden, pooling's through hidden_pooling.
    runnable = keras_lwp.search(model, MESH, batch_size=32, strategy="model")
    assert runnable["conv2"] == Config({"channel": "xy"}) and runnable["fc1"] == Config({"channel": "xy"})
    assert runnable["pool1"] == Config({"channel": "xy"})


def test_cost_parts_add_up_and_summary_reads():
    plan = keras_lwp.search(models.small_cnn(), MESH, batch_size=32)
    c = plan.cost
    assert c.total == pytest.approx(c.compute + c.sync + c.transfer) and c.compute > 0
    assert sum(r.compute for r in plan.layers.values()) == pytest.approx(c.compute)
    assert plan.memory > 0
    text = plan.summary()
    for layer, config in plan.items():
        assert layer in text and str(config) in text
    assert "predicted step" in text and "ms/step" in text


def test_json_round_trip_and_recosting_a_strategy():
    model = models.transformer_block()
    plan = keras_lwp.search(model, MESH, batch_size=16)
    again = keras_lwp.Strategy.from_json(plan.to_json())
    assert again == plan and again.cost == plan.cost and again.mesh == plan.mesh
    recosted = keras_lwp.search(model, MESH, batch_size=16, strategy=again)
    assert recosted.cost.total == pytest.approx(plan.cost.total)


def test_a_strategy_written_by_hand_takes_any_form_of_mesh():
    configs = {"dense": {"sample": "x"}}
    meshes = [{"x": 4, "y": 2}, "4x2", "x=4,y=2", keras_lwp.MeshSpec((("x", 4), ("y", 2)))]
    assert len({keras_lwp.Strategy(configs, mesh).mesh for mesh in meshes}) == 1
    assert keras_lwp.Strategy(configs, {"axes": [["x", 4], ["y", 2]]}).mesh == keras_lwp.MeshSpec((("x", 4), ("y", 2)))


def test_overrides_pin_layers_and_the_search_does_the_rest():
    model = models.small_cnn()
    free = keras_lwp.search(model, MESH, batch_size=32, space="full")
    pinned = keras_lwp.search(model, MESH, batch_size=32, overrides={"conv*": {"sample": "x", "height": "y"}},
                              space="full")
    assert pinned["conv1"] == pinned["conv2"] == Config({"sample": "x", "height": "y"})
    assert pinned.mesh.axes == (("x", 4), ("y", 2))
    assert pinned.cost.total >= free.cost.total * (1 - 1e-9)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"nope": {"sample": "x"}}, "matches no layer"),
        ({"fc1": {"height": "x"}}, "has no dimension 'height'"),
        ({"fc1": {"sample": "z"}}, "mesh axis 'z' is not in"),
        ({"fc2": {"channel": "x"}}, "dimension 'channel' of size 10 cannot be split on mesh axis 'x' of size 4"),
    ],
    ids=["unknown-layer", "unknown-dim", "unknown-axis", "indivisible"],
)
def test_bad_overrides_name_layer_dimension_and_axis(overrides, message):
    with pytest.raises(ValueError, match=message):
        keras_lwp.search(models.small_cnn(), MESH, batch_size=32, overrides=overrides)


def test_strategy_naming_missing_layers_is_refused():
    plan = keras_lwp.search(models.mlp(), MESH, batch_size=64)
    foreign = keras_lwp.Strategy({**plan, "ghost": Config()}, plan.mesh)
    with pytest.raises(ValueError, match="does not have: ghost"):
        keras_lwp.search(models.mlp(), MESH, batch_size=64, strategy=foreign)


def test_batch_size_no_axis_divides():
    with pytest.raises(ValueError, match=r"batch_size=9 .*'sample' dimension of layer 'features'.*multiple of 2 \(for example 10\)"):
        keras_lwp.search(models.mlp(), MESH, batch_size=9)


def test_bad_mesh_and_bad_strategy_name():
    with pytest.raises(TypeError, match="Expected a mesh"):
        keras_lwp.search(models.mlp(), [4, 2], batch_size=8)
    with pytest.raises(ValueError, match="strategy must be 'auto'"):
        keras_lwp.search(models.mlp(), MESH, batch_size=8, strategy="fast")


def test_subclassed_and_empty_models_are_refused():
    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclass"):
        keras_lwp.search(Net(), MESH, batch_size=8)
    inputs = keras.Input((3,))
    with pytest.raises(ValueError, match="nothing to parallelize"):
        keras_lwp.search(keras.Model(inputs, inputs), MESH, batch_size=8)


def test_unknown_layer_runs_replicated_with_one_warning_and_strict_refuses():
    inputs = keras.Input((8,))
    x = keras.layers.Lambda(lambda t: t * 2, name="double")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = keras_lwp.search(model, MESH, batch_size=8)
    assert plan["double"] == Config()
    named = [w for w in caught if issubclass(w.category, UnknownLayerWarning)]
    assert len(named) == 1
    assert "Lambda" in str(named[0].message) and "'double'" in str(named[0].message)
    assert "register_rule" in str(named[0].message)
    with pytest.raises(ValueError, match="no parallelization rule for layers of class Lambda"):
        keras_lwp.search(model, MESH, batch_size=8, strict=True)


def test_search_takes_a_real_dtensor_mesh():
    mesh = keras_lwp.make_mesh(MESH)
    plan = keras_lwp.search(models.mlp(), mesh, batch_size=64)
    assert plan.mesh.axes in ((("x", 4), ("y", 2)), (("xy", 8),))


def test_a_weight_no_call_reads_is_not_synchronized():
    """An untied ReversibleEmbedding called forward only never trains its reverse table: its data-parallel
    gradient all-reduce and update are the plain Embedding's (no phantom all-reduce for the unused table)."""
    def model(layer):
        ids = keras.Input((16,), dtype="int32", name="ids")
        return keras.Model(ids, keras.layers.Dense(4, name="head")(layer(ids)))

    untied = keras.layers.ReversibleEmbedding(512, 64, tie_weights=False, name="table")
    plain = keras.layers.Embedding(512, 64, name="table")
    costs = [keras_lwp.search(model(layer), MESH, batch_size=16, strategy="data").layers["table"]
             for layer in (untied, plain)]
    assert costs[0].sync == pytest.approx(costs[1].sync, rel=1e-9) and costs[1].sync > 0


def test_identical_layers_share_cost_entries_and_differing_ones_do_not():
    """The planner prices a layer's kind once (LayerInfo.signature): equal for layers that differ only
    in name, different as soon as anything a cost reads differs (configuration, shape, trainability)."""
    from keras_lwp.graph import layer_graph
    from keras_lwp.mesh import mesh_spec_of
    from keras_lwp.planner import Problem
    from keras_lwp.cost.model import AnalyticCostModel

    inputs = keras.Input((16, 16, 8))
    first = keras.layers.Conv2D(8, 3, padding="same", name="first")(inputs)  # no input gradient: unlike a
    a = keras.layers.Conv2D(8, 3, padding="same", name="a")(first)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(a)             # same kind as a
    c = keras.layers.Conv2D(8, 3, padding="same", strides=2, name="c")(b)  # strides differ
    d = keras.layers.Conv2D(8, 5, padding="same", name="d")(c)             # kernel and input shape differ
    e = keras.layers.Conv2D(8, 3, padding="same", name="e")(b)             # same as a, but frozen below
    model = keras.Model(inputs, [d, e])
    model.get_layer("e").trainable = False
    graph = layer_graph(model, 32)
    signature = {name: graph.nodes[name]["info"].signature for name in graph}
    assert signature["a"] == signature["b"]
    assert len({signature[n] for n in ["first", "a", "c", "d", "e"]}) == 5

    class Counting(AnalyticCostModel):
        calls = 0

        def layer_cost(self, info, rule, dims, config):
            Counting.calls += 1
            return super().layer_cost(info, rule, dims, config)

    spec = mesh_spec_of(MESH)
    problem = Problem(graph, spec, Counting(spec, "cpu-emulated"))
    for name in "ab":
        for config in problem.configs[name]:
            problem.layer_cost(name, config)
    assert problem.configs["a"] == problem.configs["b"]
    assert Counting.calls == len(problem.configs["a"])


@pytest.mark.parametrize("strategy", ["auto", "data", "owt"])
def test_sharing_entries_between_identical_layers_changes_no_plan(strategy, monkeypatch):
    """Pricing each kind of layer once is exact: with every layer made its own kind, the plan, its
    cost and its memory are the same, on a model of repeated blocks (a residual stack)."""
    from keras_lwp.graph import LayerInfo

    inputs = keras.Input((16, 16, 16))
    x = inputs
    for block in range(3):
        y = keras.layers.Conv2D(16, 3, padding="same", name=f"conv{block}a")(x)
        y = keras.layers.BatchNormalization(name=f"bn{block}")(y)
        y = keras.layers.ReLU(name=f"relu{block}")(y)
        y = keras.layers.Conv2D(16, 3, padding="same", name=f"conv{block}b")(y)
        x = keras.layers.Add(name=f"add{block}")([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(256, activation="relu", name="fc1")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="fc2")(x))
    shared = keras_lwp.search(model, MESH, batch_size=32, strategy=strategy, profile="cpu-emulated",
                              hidden_dimensions=True)
    original = LayerInfo.signature
    monkeypatch.setattr(LayerInfo, "signature", property(lambda info: (info.name, original.func(info))))
    alone = keras_lwp.search(model, MESH, batch_size=32, strategy=strategy, profile="cpu-emulated",
                             hidden_dimensions=True)
    assert dict(shared) == dict(alone) and str(shared.mesh) == str(alone.mesh)
    assert shared.cost == alone.cost and shared.memory == alone.memory
    assert shared.layers == alone.layers


@pytest.mark.parametrize("mesh, named", [({"x": 8}, "mesh axis 'x' (size 8). Use"),
                                         ({"x": 4, "y": 2}, "'x' (size 4) nor 'y' (size 2) nor 'xy' (size 8)")])
def test_an_indivisible_batch_names_each_axis_once(mesh, named):
    with pytest.raises(ValueError, match="batch_size=7 cannot be split") as raised:
        keras_lwp.search(models.mlp(), mesh, batch_size=7)
    assert named in str(raised.value)
