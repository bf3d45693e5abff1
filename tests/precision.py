"""float64 for a test's models: floatx and the global dtype policy both (a policy set once, even back
to "float32", overrides floatx; test_parallelize's mixed-precision test sets one)."""

import contextlib

import keras


@contextlib.contextmanager
def float64():
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(floatx)
        keras.config.set_dtype_policy(policy)


@contextlib.contextmanager
def float64_throughout():
    """keras_hub 0.32's Llama (and Gemma, Mistral, ...) computes its attention softmax, SiLU and RMS
    norms in float32 whatever the dtype. In a float64 run those casts round to float32 and turn the
    1e-16 differences of a sum split over devices into 1e-7 ones (Llama, one device against data
    parallelism on 8, 3 Adam steps: 2.9e-7 with them, 1.7e-15 without; Gemma under a random plan:
    1.5e-8). Inside this context they run in float64, alike for one device and every strategy, so
    the float64 check sees what keras_lwp changes and nothing else."""
    cast, init = keras.ops.cast, keras.layers.Layer.__init__

    def float64_cast(x, dtype):
        if (keras.backend.standardize_dtype(dtype) == "float32" and hasattr(x, "dtype")
                and keras.backend.standardize_dtype(x.dtype) == "float64"):
            return x
        return cast(x, dtype)

    def float64_init(self, *args, **kwargs):
        if kwargs.get("dtype") == "float32":
            kwargs["dtype"] = "float64"
        init(self, *args, **kwargs)

    keras.ops.cast, keras.layers.Layer.__init__ = float64_cast, float64_init
    try:
        yield
    finally:
        keras.ops.cast, keras.layers.Layer.__init__ = cast, init
