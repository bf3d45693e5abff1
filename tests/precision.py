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
