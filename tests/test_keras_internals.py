"""The canary: every private Keras name keras_lwp relies on (keras_lwp.keras_internals) still exists."""

import keras
import tensorflow as tf

from keras_lwp import keras_internals


def test_every_keras_internal_keras_lwp_uses_is_there():
    missing = keras_internals.check()
    assert not missing, (
        f"Keras {keras.__version__} / TensorFlow {tf.__version__} moved internals keras_lwp relies on "
        "(pyproject.toml pins the tested range):\n" + "\n".join(
            f"  {module}.{name} (used by {used_by}: {why}): {problem}" for module, name, used_by, why, problem in missing))


def test_a_moved_internal_is_reported(monkeypatch):
    moved = keras_internals.INTERNALS + (("keras.src.trainers.trainer", "Trainer._no_such_method", "attribute",
                                          "nowhere", "a stand-in for a method an upgrade removed"),)
    monkeypatch.setattr(keras_internals, "INTERNALS", moved)
    (entry,) = keras_internals.check()
    assert entry[1] == "Trainer._no_such_method" and "AttributeError" in entry[4]
