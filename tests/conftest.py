"""Test set-up: 8 logical CPU devices, made before TensorFlow initializes its devices."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest  # noqa: E402

import keras_lwp  # noqa: E402

DEVICES = 8
keras_lwp.use_virtual_devices(DEVICES)


def require_devices(count):
    """Skip a test that needs more logical devices than this process has."""
    import tensorflow as tf

    have = len(tf.config.list_logical_devices("CPU"))
    if have < count:
        pytest.skip(f"needs {count} logical CPU devices, this process has {have}")
