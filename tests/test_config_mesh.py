"""Configurations and meshes: small values with readable forms and clear errors."""

import keras
import pytest
from tensorflow.experimental import dtensor

import keras_lwp
from keras_lwp.config import Config
from keras_lwp.mesh import MeshSpec, mesh_spec_of


def test_config_is_canonical_hashable_and_readable():
    a = Config({"channel": "y", "sample": "x"})
    b = Config({"sample": "x", "channel": "y"})
    assert a == b and hash(a) == hash(b)
    assert str(a) == "{n=x, c=y}"
    assert str(Config()) == "{}"
    assert a == {"sample": "x", "channel": "y"}
    assert dict(a) == {"sample": "x", "channel": "y"} and a.axes == ("x", "y")
    with pytest.raises(AttributeError):
        a.foo = 1


def test_config_rejects_an_axis_used_twice():
    with pytest.raises(ValueError, match="at most one dimension"):
        Config({"sample": "x", "channel": "x"})


def test_mesh_spec_from_every_kind_of_mesh():
    spec = mesh_spec_of({"x": 4, "y": 2})
    assert spec == MeshSpec((("x", 4), ("y", 2)), "CPU") and spec.size == 8
    assert spec.axis_stride("x") == 2 and spec.axis_stride("y") == 1
    assert spec.flattened().axes == (("xy", 8),)
    device_mesh = keras.distribution.DeviceMesh((4, 2), ["x", "y"], keras.distribution.list_devices("cpu"))
    assert mesh_spec_of(device_mesh).axes == (("x", 4), ("y", 2))
    mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
    assert isinstance(mesh, dtensor.Mesh) and mesh_spec_of(mesh) == spec
    assert keras_lwp.make_mesh(mesh) is mesh
    assert mesh_spec_of(keras_lwp.make_mesh(device_mesh)) == spec


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (4.5, TypeError, "Expected a mesh"),
        ({"x": 0}, ValueError, "positive integer"),
        ({"x-1": 2}, ValueError, "identifiers"),
        ({}, ValueError, "at least one axis"),
    ],
    ids=["number", "zero-size", "bad-name", "empty"],
)
def test_bad_meshes_say_what_is_wrong(bad, error, message):
    with pytest.raises(error, match=message):
        mesh_spec_of(bad)


def test_mesh_with_more_devices_than_exist():
    with pytest.raises(ValueError, match="needs 16 CPU devices but this process has 8"):
        keras_lwp.make_mesh({"x": 4, "y": 4})


def test_virtual_devices_run_each_op_on_the_cores_per_device():
    """conftest split the CPU into 8 devices: each op gets the cores per device (at least one), not
    TensorFlow's default of every core, which makes the devices' ops contend."""
    import os

    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert tf.config.threading.get_intra_op_parallelism_threads() == max(1, cores // 8)


def test_mesh_written_as_text():
    from keras_lwp.mesh import mesh_spec_of

    assert mesh_spec_of("4x2").axes == (("x", 4), ("y", 2))
    assert mesh_spec_of("8").axes == (("x", 8),)
    assert mesh_spec_of("batch=4,model=2").axes == (("batch", 4), ("model", 2))
    with pytest.raises(ValueError, match="write it as '4x2'"):
        mesh_spec_of("4 by 2")
