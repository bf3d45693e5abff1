"""Test set-up: 8 logical CPU devices, made before TensorFlow initializes its devices.

tests/pure (the search, the rules' tables, the cost arithmetic) needs no TensorFlow: run alone
(`python -m pytest -q tests/pure`, seconds) it never imports it, which tests/pure/test_imports.py checks.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# Plans by the datasheet profile, the same on every machine: "analytic" otherwise calibrates on the
# mesh's devices (keras_lwp.cost.calibration), and plans would follow the machine's speed.
# tests/test_calibration.py checks the calibrated default itself.
os.environ.setdefault("KERAS_LWP_PROFILE", "cpu-emulated")

import contextlib  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

import keras_lwp  # noqa: E402  (imports no TensorFlow)

DEVICES = 8
PURE = pathlib.Path(__file__).parent / "pure"


def pytest_configure(config):
    """Split the CPU before any test module starts TensorFlow, unless only tests/pure runs."""
    paths = [pathlib.Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    if not paths or not all(path == PURE or PURE in path.parents for path in paths):
        keras_lwp.use_virtual_devices(DEVICES)


def require_devices(count):
    """Skip a test that needs more logical devices than this process has."""
    import tensorflow as tf

    have = len(tf.config.list_logical_devices("CPU"))
    if have < count:
        pytest.skip(f"needs {count} logical CPU devices, this process has {have}")


@contextlib.contextmanager
def without_grappler():
    """Grappler off while functions compile inside: it is about half of a DTensor step's compile time
    here (9.5 s of 20 s for test_hub's BERT step) and rewrites only the per-device graphs DTensor has
    already expanded, preserving their values. The gold tests' named strategies (test_numerics*),
    the relayout conformance test and the profiler compile what users run, with it on; the files that
    sweep random plans, rules and fit's options turn it off."""
    import tensorflow as tf

    before = tf.config.optimizer.get_experimental_options().get("disable_meta_optimizer", False)
    tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": before})


@pytest.fixture(scope="module")
def grappler_off():
    """A module's tests compile without Grappler (`without_grappler`): `pytestmark = pytest.mark.usefixtures("grappler_off")`."""
    with without_grappler():
        yield
