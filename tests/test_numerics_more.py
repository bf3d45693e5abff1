"""The gold test (tests/test_numerics.py) on the transformer block and the two-input, two-output
branchy model: every strategy, the same numbers as one device; and default "auto" on layers whose
sample split keras_lwp computes."""

import pytest

import keras_lwp
from tests import models
from tests.test_numerics import BATCH, MESH, check_gold, gold_cases

# Momentum (an optimizer matter, not a layer one) on the branchy model; the transformer, the costliest
# to compile, runs Adam under every strategy.
GOLD = gold_cases(["branchy"]) + gold_cases(["transformer"], momentum=False)


@pytest.mark.parametrize("model_name,strategy,optimizer_name", GOLD, ids=["-".join(case) for case in GOLD])
def test_sharded_training_equals_single_device(model_name, strategy, optimizer_name):
    check_gold(model_name, strategy, optimizer_name)


def test_default_auto_splits_layers_keras_lwp_computes_by_samples():
    """AveragePooling and a grouped convolution, whose sample split keras_lwp computes itself: the plan
    the default "auto" makes splits both by samples and trains to the one-device numbers."""
    plan = keras_lwp.search(models.pooled_cnn(), MESH, BATCH)
    assert "sample" in dict(plan["avg_pool"]) and "sample" in dict(plan["grouped"]), plan.summary()
    check_gold("pooled", "auto", "adam")
