"""Model fuzzing: random functional models of Keras' layers (tests/model_fuzz.py), each trained two
steps in float64 on one device, then on 8 logical CPUs (meshes 2x2x2, 4x2 and 8 in turn) under a random
plan and under "auto", against it.

    python -m benchmarks.fuzz_models --models 100
    python -m benchmarks.fuzz_models --models 100 --family graph    # inputs, keras.ops, nesting, outputs

prints each run's worst error (loss, weights, predictions; relative) and how many matched to 1e-9
(goal: all). A model that fails on one device too is skipped and counted apart. A sample runs in the
test suite (tests/test_same_numbers.py).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("models", 100, "Random models.")
flags.DEFINE_integer("first_seed", 0, "Seed of the first model.")
flags.DEFINE_float("tolerance", 1e-9, "Largest relative error that counts as equal.")
flags.DEFINE_enum("family", "chain", ["chain", "graph"], "Models of one input and a chain of layers "
                  "(model_fuzz.random_model), or of several inputs, keras.ops, nested models, a shared layer and "
                  "several outputs (model_fuzz.random_graph_model).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import warnings

    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    import keras

    from tests import model_fuzz

    build, train = ((model_fuzz.random_model, model_fuzz.train) if FLAGS.family == "chain"
                    else (model_fuzz.random_graph_model, model_fuzz.train_graph))
    warnings.simplefilter("ignore")  # the layers with no rule, named once per model: not what is measured
    matched = total = skipped = 0
    for seed in range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.models):
        try:
            reference = train(seed)
        except Exception as exc:  # a model Keras cannot train on one device: not keras_lwp's to match
            skipped += 1
            print(f"model {seed:4d}: fails on one device too ({type(exc).__name__}), skipped", flush=True)
            continue
        mesh = model_fuzz.MESHES[seed % len(model_fuzz.MESHES)]
        layers = " ".join(type(node).__name__ for node in build(seed)[0].operations  # layers and keras.ops
                          if not isinstance(node, keras.layers.InputLayer))
        for plan_seed in (seed, None):
            plan = f"random{seed}" if plan_seed is not None else "auto"
            try:
                error = model_fuzz.worst_error(reference, train(seed, mesh, plan_seed))
                verdict = "ok" if error <= FLAGS.tolerance else "DIFFERS"
                print(f"model {seed:4d} {plan:>10s} on {'x'.join(str(s) for s in mesh.values()):5s}: worst error "
                      f"{error:.1e}  {verdict}  [{layers}]", flush=True)
            except Exception as exc:  # a plan that fails to run counts as a mismatch, named
                error = float("inf")
                print(f"model {seed:4d} {plan:>10s}: FAILED {type(exc).__name__}: {str(exc)[:300]}  [{layers}]",
                      flush=True)
            total += 1
            matched += error <= FLAGS.tolerance
    print(f"{matched} of {total} runs equal to one device within {FLAGS.tolerance:g} (goal: all); "
          f"{skipped} models failing on one device too, skipped")


if __name__ == "__main__":
    app.run(main)
