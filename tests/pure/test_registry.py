"""The rule registry: one rule per layer class, found along the class's ancestry."""

import pytest

from keras_lwp.graph import LayerInfo
from keras_lwp.layers import base, registered_rule, rule_for
from keras_lwp.layers.base import LayerRule, register_rule


class Dense:  # stands for keras.layers.Dense: the registry matches class names along the MRO
    def call(self, inputs):
        return inputs


class ConfiguredDense(Dense):  # keeps Dense's call: computes what Dense computes
    pass


class CustomDense(Dense):  # its own call: Dense's rule says nothing about it
    def call(self, inputs):
        return 2 * inputs


def _info(layer):
    return LayerInfo("layer", type(layer).__name__, {}, (), [], layer)


def test_a_subclass_that_keeps_call_gets_its_ancestors_rule():
    dense_rule = registered_rule(LayerInfo("d", "Dense", {}, ()))
    assert registered_rule(_info(ConfiguredDense())) is dense_rule
    assert _info(ConfiguredDense()).rule_names == ("ConfiguredDense", "Dense")


def test_a_subclass_with_its_own_call_has_no_rule_and_is_named_in_the_warning():
    with pytest.warns(UserWarning, match="CustomDense"):
        rule = rule_for(_info(CustomDense()))
    assert rule.dimensions(_info(CustomDense())) == []


def test_registering_a_class_twice_is_an_error_unless_replace():
    with pytest.raises(ValueError, match="already has the rule .*replace=True"):
        @register_rule("Dense")
        class Another(LayerRule):
            pass

    original = base._RULES["Dense"]
    try:
        @register_rule("Dense", replace=True)
        class Replacement(LayerRule):
            pass

        assert isinstance(registered_rule(LayerInfo("d", "Dense", {}, ())), Replacement)
    finally:
        base._RULES["Dense"] = original


def test_every_builtin_class_is_registered_once():
    """Each specialised module registers its classes; importing keras_lwp.layers raised nothing, and
    the classes they own resolve to their rules (the hidden-dimension implementations)."""
    from keras_lwp.layers import einsum_dense, hidden, hidden_depthwise, hidden_embedding, hidden_pooling

    owners = {"Conv2D": hidden, "MaxPooling2D": hidden_pooling, "AveragePooling1D": hidden_pooling,
              "DepthwiseConv2D": hidden_depthwise, "Embedding": hidden_embedding, "EinsumDense": einsum_dense}
    for name, module in owners.items():
        assert type(base._RULES[name]).__module__ == module.__name__, name


def test_a_dimension_is_built_by_keywords_and_says_who_runs_its_split():
    from keras_lwp.layers import COSTED, DTENSOR, KERAS_LWP, DimSpec

    with pytest.raises(TypeError):
        DimSpec("sample", 8, 0, (0,), ())  # positional: which number is the output axis?
    by_dtensor = DimSpec(name="sample", size=8, output=0, inputs=(0,), weights=())
    assert by_dtensor.runs == DTENSOR and by_dtensor.runnable and not by_dtensor.by_keras_lwp
    computed = DimSpec(name="channel", size=8, output=1, inputs=(1,), weights=(), runs=KERAS_LWP)
    assert computed.runnable and computed.by_keras_lwp
    assert not DimSpec(name="height", size=8, output=1, inputs=(1,), weights=(), runs=COSTED).runnable
    with pytest.raises(ValueError, match="runs='native'"):
        DimSpec(name="width", size=8, output=2, inputs=(2,), weights=(), runs="native")


def test_the_planner_options_are_keywords():
    import inspect

    from keras_lwp.planner import plan_graph, search
    from keras_lwp.runtime import parallelize

    for function in (search, plan_graph, parallelize):
        parameters = inspect.signature(function).parameters.values()
        positional = [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD]
        assert positional[-1] == "strategy", (function.__name__, positional)


@pytest.mark.parametrize("enabled", [True, False])
def test_planning_leaves_the_garbage_collector_as_it_found_it(enabled):
    """The planner pauses Python's cyclic collector while it plans, and gives it back as it was, also
    when planning raises."""
    import gc

    from keras_lwp.mesh import MeshSpec
    from keras_lwp.planner import plan_graph

    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(ValueError, match="space must be"):
            plan_graph(None, MeshSpec((("x", 2),)), 8, space="everything")
        assert gc.isenabled() == enabled
    finally:
        gc.enable()
