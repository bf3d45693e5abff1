"""Plan fuzzing: random runnable strategies (hidden dimensions included) of three CNNs that mix
Conv2D, BatchNormalization, DepthwiseConv2D, pooling, Concatenate and a residual Add, each trained two
steps in float64 on a 2x2x2 mesh of logical CPUs against the single-device model.

    python -m benchmarks.fuzz_plans --plans 17

prints each plan's worst relative weight error and how many matched to 1e-9 (goal: all). A sample of
these plans runs in the test suite (tests/test_same_numbers.py).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("plans", 17, "Random plans per model (three models).")
flags.DEFINE_integer("first_seed", 0, "Seed of the first plan.")
flags.DEFINE_float("tolerance", 1e-9, "Largest relative weight error that counts as equal.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    from tests import plan_fuzz

    matched = total = 0
    for name in plan_fuzz.MODELS:
        reference = plan_fuzz.train(name)
        for seed in range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.plans):
            try:
                run = plan_fuzz.train(name, seed)
                error = plan_fuzz.relative_error(reference, run)
                splits = sum(1 for layer in run[2] if run[2][layer])
                verdict = "ok" if error <= FLAGS.tolerance else "DIFFERS"
                print(f"{name:13s} plan {seed:3d}: {splits:2d} layers split, worst relative weight error "
                      f"{error:.2e}  {verdict}", flush=True)
            except Exception as exc:  # a plan that fails to run counts as a mismatch, named
                error = float("inf")
                print(f"{name:13s} plan {seed:3d}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            total += 1
            matched += error <= FLAGS.tolerance
    print(f"{matched} of {total} random plans equal to one device within {FLAGS.tolerance:g} (goal: all)")


if __name__ == "__main__":
    app.run(main)
