"""The gold test (tests/test_numerics.py) on the transformer block and the two-input, two-output
branchy model: every strategy, the same numbers as one device."""

import pytest

from tests.test_numerics import check_gold, gold_cases

GOLD = gold_cases(["branchy", "transformer"])


@pytest.mark.parametrize("model_name,strategy,optimizer_name", GOLD, ids=["-".join(case) for case in GOLD])
def test_sharded_training_equals_single_device(model_name, strategy, optimizer_name):
    check_gold(model_name, strategy, optimizer_name)
