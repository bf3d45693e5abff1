"""The calibrated default: "analytic" prices with figures measured on the mesh's own devices when they
are in this process, caches them, and keeps the datasheet profile for meshes given as a shape."""

import math

import keras
import numpy as np
import pytest

import keras_lwp
from keras_lwp.cost import calibration


def small_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(4)(x))


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """No profile pinned, an empty cache, nothing calibrated yet in this process."""
    monkeypatch.delenv("KERAS_LWP_PROFILE", raising=False)
    monkeypatch.setenv("KERAS_LWP_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "_calibrated", {})
    return tmp_path


def test_calibrated_profile_is_measured_once_then_read_from_the_cache(fresh, monkeypatch):
    mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
    profile = calibration.calibrated_profile(mesh, progress=False)
    assert profile.name == "calibrated on Mesh(x=4, y=2, CPU)"
    for value in (profile.flops, profile.memory_bandwidth, profile.intra_node.bandwidth, profile.intra_node.latency):
        assert math.isfinite(value) and value > 0
    # Measured, not carried over from the datasheet profile the calibration starts from.
    assert profile.memory_bandwidth != keras_lwp.cost.get_profile("cpu-emulated").memory_bandwidth
    # Per kernel tap: 0.06 ms here since taps are sliced without strided slices (halo.rows; 0.30 ms
    # before), so on a loaded machine the two probes' difference may fall within the noise: 0, never
    # negative, nor the milliseconds of a measurement gone wrong.
    assert math.isfinite(profile.tap_seconds) and 0 <= profile.tap_seconds < 5e-4
    assert profile.concurrent_devices is None  # the devices' sharing of the cores is inside the figures
    assert list(fresh.glob("profiles/*.json")), "the calibration was not written to the cache"

    monkeypatch.setattr(calibration, "_calibrated", {})
    monkeypatch.setattr(calibration, "_measure", lambda *args: pytest.fail("measured again despite the cache"))
    assert calibration.calibrated_profile(mesh, progress=False) == profile


def test_parallelize_calibrates_by_default_and_search_on_a_shape_does_not(fresh):
    mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
    planned = keras_lwp.search(small_model(), {"x": 4, "y": 2}, batch_size=16)
    assert planned.profile == "cpu-emulated"  # a shape: devices this machine may not have

    model = keras_lwp.parallelize(small_model(), mesh, batch_size=16)
    # Calibrated once, on the mesh given, also for the flattened mesh "auto" searches beside it.
    assert keras_lwp.strategy_of(model).profile == "calibrated on Mesh(x=4, y=2, CPU)"
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    history = model.fit(rng.standard_normal((32, 8, 8, 3)).astype("float32"), rng.integers(0, 4, 32),
                        batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # The same devices given as a mesh object to search: calibrated, read from the cache just written.
    assert keras_lwp.search(small_model(), mesh, batch_size=16).profile == "calibrated on Mesh(x=4, y=2, CPU)"


def test_the_environment_pins_the_default_profile(monkeypatch):
    monkeypatch.setenv("KERAS_LWP_PROFILE", "p100")
    mesh = keras_lwp.make_mesh({"x": 8})
    assert keras_lwp.search(small_model(), mesh, batch_size=16).profile == "p100"
    # An explicit profile or another cost model is never replaced.
    assert calibration.default_profile("a100", "analytic", devices_present=True) == "a100"
    assert calibration.default_profile(None, "profiled", devices_present=True) is None


def test_an_unknown_profile_name_lists_calibrated():
    with pytest.raises(ValueError, match="calibrated"):
        keras_lwp.search(small_model(), {"x": 8}, batch_size=16, profile="tpu9")
