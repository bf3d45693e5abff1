"""keras.applications models parallelized with strategy "auto" on 8 logical CPU devices train a step
equal to the single-device step.

    python -m benchmarks.check_applications
    python -m benchmarks.check_applications --strategies data,model,owt,auto --head_scale 100
    python -m benchmarks.check_applications --models zoo --head_scale 100     # every model in ZOO, "auto"
    python -m benchmarks.check_applications --models zoo --head_scale 100 --rounds 3   # and time the steps
    python -m benchmarks.check_applications --models convnext_tiny --rounds 2 --timed_strategies data,owt,auto
    python -m benchmarks.check_applications --models zoo --strategies random0,random1   # random plans

Slow (a minute or two per model on 2 cores), so it lives here rather than in the test suite. It runs
in float64: these networks at init with batch 8 and 1x1 final feature maps are so ill-conditioned
that perturbing the float32 input by 1e-6 moves ResNet50's first kernel by 0.16 after one step, which
hides any real error; in float64 the same comparison is exact to ~1e-12.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from benchmarks.applications import ZOO  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet50", "inception_v3", "vgg16", "mobilenet_v2"],
                  "keras.applications models (see ZOO), or 'zoo' for all of them.")
flags.DEFINE_string("floatx", "float64", "Keras float type for both runs.")
flags.DEFINE_integer("batch_size", 8, "Global batch size (one step).")
flags.DEFINE_list("strategies", ["auto"], "Strategies to compare with one device (auto, data, model, owt, "
                  "random<seed>: a random valid plan).")
flags.DEFINE_float("input_scale", 1.0, "Scale of the random images.")
flags.DEFINE_integer("rounds", 0, "Timing rounds after the float64 check (0: none): the float32 steady step "
                     "of one device, \"data\" and \"auto\", interleaved, in this process.")
flags.DEFINE_list("timed_strategies", ["data", "auto"], "Strategies the timing rounds run beside one device "
                  "(\"data\" and \"auto\" always; e.g. data,owt,auto).")
flags.DEFINE_integer("timed_steps", 5, "fit steps per timing round (the first of each is left out).")
flags.DEFINE_integer("timed_batch_size", 32, "Global batch size of the timed steps.")
flags.DEFINE_float("head_scale", 1.0, "Factor on the classifier's last kernel: 100 saturates the softmax head "
                   "(loss far above ln 10), where a loss computed from probabilities instead of Keras' logits "
                   "would differ at once.")

OWN_FLAGS = ("floatx", "batch_size", "strategies", "input_scale", "head_scale", "rounds", "timed_steps",
             "timed_batch_size", "timed_strategies")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_lwp

    keras_lwp.use_virtual_devices(8)
    import keras
    import numpy as np

    keras.config.set_floatx(FLAGS.floatx)
    keras.config.set_dtype_policy(FLAGS.floatx)
    import warnings

    warnings.filterwarnings("ignore", category=keras_lwp.layers.UnknownLayerWarning)
    names = list(ZOO) if FLAGS.models == ["zoo"] else FLAGS.models
    if len(names) > 1:  # one process per model: a process that builds them all grows past the machine's memory
        import subprocess

        worst = []
        for name in names:
            argv = [sys.executable, "-m", "benchmarks.check_applications", f"--models={name}"] + [
                f"--{flag}={','.join(map(str, value)) if isinstance(value, list) else value}"
                for flag, value in FLAGS.flag_values_dict().items() if flag in OWN_FLAGS]
            out = subprocess.run(argv, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            lines = [line for line in out.stdout.splitlines() if line.strip()]
            print("\n".join(line for line in lines if not line.startswith("goal:")), flush=True)
            if out.returncode:
                print(f"{name}: failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}", flush=True)
                worst.append(float("inf"))
            worst += [float(line.rsplit("worst ", 1)[1].rstrip(")")) for line in lines if line.startswith("goal:")]
        worst_all = max(worst)
        tolerance = 1e-9 if FLAGS.floatx == "float64" else 1e-5
        print(f"goal: equal within {tolerance:.0e} relative ({FLAGS.floatx}): "
              f"{'met' if worst_all <= tolerance else 'MISSED'} (worst {worst_all:.1e})")
        return
    builders = {name: getattr(keras.applications, ZOO[name][0]) for name in names}
    worst_all = 0.0
    for name in names:
        size = ZOO[name][1]
        rng = np.random.RandomState(0)
        x = (FLAGS.input_scale * rng.rand(FLAGS.batch_size, size, size, 3)).astype(FLAGS.floatx)
        y = rng.randint(0, 10, FLAGS.batch_size)
        reference = _step(builders[name], size, x, y, None)
        for strategy in FLAGS.strategies:
            worst_all = max(worst_all, _compare(name, size, reference, _step(builders[name], size, x, y, strategy),
                                                strategy))
        del reference
        if FLAGS.rounds > 0:
            _time(name, builders[name], size)
    tolerance = 1e-9 if FLAGS.floatx == "float64" else 1e-5
    print(f"goal: equal within {tolerance:.0e} relative ({FLAGS.floatx}): "
          f"{'met' if worst_all <= tolerance else 'MISSED'} (worst {worst_all:.1e})")


def _step(builder, size, x, y, strategy):
    """One fit step of `builder`'s classifier (softmax head, Keras' default loss), on one device
    (strategy None) or parallelized: (loss, weights, seconds, model)."""
    import keras
    import numpy as np

    import keras_lwp
    from keras_lwp.placement import to_host

    keras.utils.set_random_seed(0)
    model = builder(weights=None, input_shape=(size, size, 3), classes=10)
    head = [layer for layer in model.layers if hasattr(layer, "kernel")][-1]  # MobileNet's ends in a 1x1 Conv2D
    head.kernel.assign(FLAGS.head_scale * head.kernel)
    if strategy is not None:
        mesh = keras_lwp.make_mesh({"x": 4, "y": 2})
        if strategy.startswith("random"):  # "random<seed>": a random valid plan, hidden dimensions included
            strategy = keras_lwp.planner.random_strategy(model, mesh, FLAGS.batch_size, int(strategy[6:]))
        keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=FLAGS.batch_size)
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
    start = time.perf_counter()
    loss = model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0, shuffle=False).history["loss"][0]
    seconds = time.perf_counter() - start
    return loss, [np.asarray(to_host(v.value)) for v in model.weights], seconds, model


def _time(name, builder, size):
    """Prints the float32 steady step of one device, "data", "auto" and any other --timed_strategies
    (8 logical devices share this
    machine's cores, and the one-device model runs on one of them: the figures compare the plans with
    each other and with one device's work, not with a machine without logical devices)."""
    import keras
    import numpy as np

    import keras_lwp
    from benchmarks.steady import interleaved_medians, timed_fit

    keras.config.set_floatx("float32")
    keras.config.set_dtype_policy("float32")
    batch = FLAGS.timed_batch_size
    rng = np.random.RandomState(1)
    x = rng.rand(batch * (FLAGS.timed_steps + 1), size, size, 3).astype("float32")
    y = rng.randint(0, 10, len(x))
    models, splits = {}, {}
    strategies = ["data", "auto"] + [other for other in FLAGS.timed_strategies if other not in ("data", "auto")]
    for strategy in [None] + strategies:
        keras.utils.set_random_seed(0)
        model = builder(weights=None, input_shape=(size, size, 3), classes=10)
        if strategy is not None:
            keras_lwp.parallelize(model, keras_lwp.make_mesh({"x": 4, "y": 2}), strategy=strategy, batch_size=batch)
            plan = keras_lwp.strategy_of(model)
            splits[strategy] = f"{sum(1 for c in plan.values() if c)}/{len(plan)}"
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "sparse_categorical_crossentropy")
        timed_fit(model, x[:2 * batch], y[:2 * batch], batch)  # tracing
        models[strategy or "one device"] = model
    step = interleaved_medians(FLAGS.rounds, {
        key: (lambda model=model: timed_fit(model, x, y, batch)["steps"]) for key, model in models.items()})
    others = "".join(f"  {other} {step[other] * 1e3:.1f} ms ({splits[other]} split)" for other in strategies[2:])
    best = min(strategies[:1] + strategies[2:], key=step.get)
    print(f"{name:<13} {size}x{size} float32 batch {batch} steady step: one device {step['one device'] * 1e3:.1f} ms  "
          f"data {step['data'] * 1e3:.1f} ms ({splits['data']} split)  auto {step['auto'] * 1e3:.1f} ms "
          f"({splits['auto']} split){others}  -> auto/one device {step['auto'] / step['one device']:.2f}x, "
          f"{best}/auto {step[best] / step['auto']:.2f}x", flush=True)


def _compare(name, size, reference, run, strategy):
    """Prints and returns the worst weight error of `run` against `reference`, relative to the
    largest weight."""
    import numpy as np

    import keras_lwp

    (ref_loss, ref_w, ref_s, _), (loss, w, s, model) = reference, run
    # Relative to the model's weight scale (as tests/test_numerics.py): a tensor near zero, such as
    # a bias one step from its zero init, holds only float noise relative to itself.
    scale = max(float(np.max(np.abs(a))) for a in ref_w if a.size)
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(ref_w, w)) / scale
    plan = keras_lwp.strategy_of(model)
    split = sum(1 for c in plan.values() if c)
    graph = model._keras_lwp.graph
    whole = sorted({graph.nodes[n]["info"].class_name for n in graph
                    if not keras_lwp.layers.has_rule_for(graph.nodes[n]["info"])})
    print(f"{name:<13} {size}x{size} {strategy:<5} plan on {plan.mesh}: {split}/{len(plan)} layers split  "
          f"loss {ref_loss:.12f} vs {loss:.12f}  worst weight error {worst:.1e} (of the largest weight)  "
          f"step {ref_s:.1f} s vs {s:.1f} s (incl. tracing)  no rule (replicated): {', '.join(whole) or '-'}",
          flush=True)
    return worst


if __name__ == "__main__":
    app.run(main)
