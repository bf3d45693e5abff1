"""The plan report and the step-time callback."""

import warnings

import keras
import numpy as np

import keras_lwp
from keras_lwp.callbacks import PlanReport, StepTime
from tests import models


def test_plan_report_and_step_time_reach_history():
    model = keras_lwp.parallelize(models.mlp(), keras_lwp.make_mesh({"x": 4, "y": 2}), batch_size=16)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.RandomState(0).randn(64, 32).astype("float32")
    y = np.random.RandomState(1).randint(0, 8, 64)
    printed = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                            callbacks=[PlanReport(print_fn=printed.append), StepTime(tolerance=0.0)])
    plan = keras_lwp.strategy_of(model)
    assert printed == [plan.summary()]
    assert len(history.history["step_time"]) == 2 and all(t > 0 for t in history.history["step_time"])
    assert history.history["predicted_step_time"] == [plan.cost.total] * 2
    # tolerance 0: any difference warns, and only once.
    assert sum("differs from the predicted" in str(w.message) for w in caught) == 1
