"""keras_lwp against what users would run instead: plain Keras on one device, and Keras 3's own
distribution on JAX. Steady-state steps, each contender in its own process.

    python -m pip install -e ".[peers]"          # jax; without it the JAX contenders are skipped
    python -m benchmarks.bench_peers              # VGG-16, AlexNet, the zoo's transformer
    python -m benchmarks.bench_peers --models alexnet --rounds 4 --plot docs/peers.png

A Keras backend is chosen per process, so every contender is a worker process of its own, started
once per model: it builds the model, compiles it (SGD), traces its step with one fit, then waits.
The driver asks the workers for a round each in turn, the order reversed every other round, so
machine noise hits all alike. A round is one `fit` of --steps + 1 steps; each step's loss is read back
when the step ends, and the first step of the round is left out: the median over every round's steps
is the step time. What a `fit` costs besides its steps (its wall time less --steps + 1 median
steps: building the iterator, the first step's extra, the end of the epoch) is its fixed cost,
printed apart.

Contenders: plain Keras on TensorFlow (one device, no logical devices: as a user runs it); keras_lwp
"data", "owt", "auto" (defaults) and "auto" with cost_model="profiled" on a 4x2 mesh of 8 logical CPU
devices; Keras 3 on JAX on one device, with DataParallel over 8 CPU devices, and with ModelParallel
on a 4x2 mesh whose LayoutMap splits every Dense kernel's output columns. Models: VGG-16 and AlexNet
(examples/zoo.py) at 64x64 with 100 classes, the zoo's transformer (64 tokens, width 256, 10 classes),
batch 32; or any keras.applications model of benchmarks/applications.py's ZOO at its smallest
input (10 classes): each in a process of its own fits models too large for check_applications' one
process. Goals (issue 19): "auto" within 1.15x of the one-device step on VGG-16 and AlexNet, and
never slower than the best of "data"/"owt" beyond the noise.
"""

import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from benchmarks.applications import ZOO  # noqa: E402
from benchmarks.steady import timed_fit  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["vgg16", "alexnet", "transformer"], "Models to time (also any of "
                  "benchmarks/applications.py's ZOO, e.g. inception_resnet_v2).")
flags.DEFINE_list("contenders", None, "Contenders to run (default: all; see CONTENDERS).")
flags.DEFINE_integer("rounds", 6, "Interleaved rounds.")
flags.DEFINE_integer("steps", 8, "Timed steps per round (one more runs first and is left out).")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_string("plot", None, "Write a bar chart of the step times here (needs matplotlib).")
flags.DEFINE_string("worker", None, "Internal: run as the worker of this contender.")
flags.DEFINE_string("model", None, "Internal: the worker's model.")

MESH = {"x": 4, "y": 2}
DEVICES = 8
# contender: (backend, label)
CONTENDERS = {
    "keras-tf": ("tensorflow", "plain Keras on TensorFlow, one device"),
    "data": ("tensorflow", 'keras_lwp "data"'),
    "owt": ("tensorflow", 'keras_lwp "owt"'),
    "auto": ("tensorflow", 'keras_lwp "auto" (defaults: calibrated on the mesh)'),
    "auto-datasheet": ("tensorflow", 'keras_lwp "auto", profile="cpu-emulated" (datasheet figures)'),
    "auto-profiled": ("tensorflow", 'keras_lwp "auto", cost_model="profiled"'),
    "jax": ("jax", "Keras 3 on JAX, one device"),
    "jax-data": ("jax", "Keras 3 on JAX, DataParallel, 8 CPU devices"),
    "jax-model": ("jax", "Keras 3 on JAX, ModelParallel, LayoutMap splitting the Dense kernels"),
}
GOAL_ONE_DEVICE = 1.15
GOAL_PROFILED = 1.05
SIZES = {"vgg16": 64, "alexnet": 64}


# -- the worker (one contender, one model, its own process) -----------------------------------

def _build(keras, name):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples import zoo

    if name == "transformer":
        return zoo.transformer(classes=10)
    if name in SIZES:
        return zoo.build(name, image_size=SIZES[name], classes=100)
    if name not in ZOO:
        raise ValueError(f"Unknown model {name!r}: one of transformer, {', '.join(SIZES)}, {', '.join(ZOO)}")
    builder, size = ZOO[name]
    return getattr(keras.applications, builder)(weights=None, input_shape=(size, size, 3), classes=10)


def _data(model, batches):
    import numpy as np

    rng = np.random.default_rng(0)
    count = batches * FLAGS.batch_size
    shape = tuple(model.inputs[0].shape[1:])
    if model.inputs[0].dtype.startswith("int"):
        x = rng.integers(0, 1000, (count,) + shape).astype("int32")
    else:
        x = rng.standard_normal((count,) + shape, dtype="float32")
    return x, rng.integers(0, model.outputs[0].shape[-1], count)


def _jax_distribution(keras, contender, name):
    """Keras 3's own distribution for the JAX contenders (set before the model is built)."""
    import jax

    devices = jax.devices("cpu")
    if contender == "jax-data":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh((MESH["x"], MESH["y"]), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    probe = _build(keras, name)  # the Dense layers' names, from a copy built without distribution
    for layer in probe.layers:
        if isinstance(layer, keras.layers.Dense):
            layout_map[f"{layer.name}/kernel"] = (None, "model")
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def worker(contender, name):
    backend = CONTENDERS[contender][0]
    if contender in ("data", "owt", "auto", "auto-datasheet", "auto-profiled"):
        import keras_lwp

        keras_lwp.use_virtual_devices(DEVICES)
    import keras

    assert keras.backend.backend() == backend, (keras.backend.backend(), backend)
    keras.utils.set_random_seed(0)
    if contender in ("jax-data", "jax-model"):
        keras.distribution.set_distribution(_jax_distribution(keras, contender, name))
    model = _build(keras, name)
    plan = None
    if backend == "tensorflow" and contender != "keras-tf":
        import keras_lwp

        strategy = "auto" if contender.startswith("auto") else contender
        cost_model = "profiled" if contender == "auto-profiled" else "analytic"
        profile = "cpu-emulated" if contender == "auto-datasheet" else None
        model = keras_lwp.parallelize(model, keras_lwp.make_mesh(MESH), strategy=strategy,
                                      batch_size=FLAGS.batch_size, cost_model=cost_model, profile=profile)
        plan = keras_lwp.strategy_of(model)
    softmax = getattr(model.layers[-1], "activation", None) is keras.activations.softmax  # keras.applications
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax))
    x, y = _data(model, FLAGS.steps + 1)
    def fit_round():
        return timed_fit(model, x, y, FLAGS.batch_size)

    start = time.perf_counter()
    fit_round()  # tracing
    _say({"ready": time.perf_counter() - start,
          "splits": None if plan is None else sum(1 for c in plan.values() if len(c)),
          "plan": None if plan is None else {k: str(c) for k, c in plan.items()}})
    for line in sys.stdin:
        if line.strip() != "round":
            break
        _say(fit_round())


def _say(message):
    print("@@" + json.dumps(message), flush=True)


# -- the driver ------------------------------------------------------------------------------

class Worker:
    def __init__(self, contender, name):
        env = dict(os.environ, KERAS_BACKEND=CONTENDERS[contender][0])
        env.pop("XLA_FLAGS", None)
        if contender in ("jax-data", "jax-model"):
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
        command = [sys.executable, "-m", "benchmarks.bench_peers", f"--worker={contender}", f"--model={name}",
                   f"--steps={FLAGS.steps}", f"--batch_size={FLAGS.batch_size}"]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.contender = contender
        self.process = subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.ready = self.read()

    def read(self):
        for line in self.process.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker {self.contender} ended (exit code {self.process.wait()})")

    def round(self):
        self.process.stdin.write("round\n")
        self.process.stdin.flush()
        return self.read()

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def _have_jax():
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


def time_model(name, contenders):
    workers = {}
    for contender in contenders:  # started one at a time: a worker traces alone
        try:
            workers[contender] = Worker(contender, name)
        except RuntimeError as error:
            print(f"  {contender}: {error}; left out")
    seconds = {c: [] for c in workers}
    fixed = {c: [] for c in workers}
    for index in range(FLAGS.rounds):
        order = list(workers) if index % 2 == 0 else list(reversed(workers))
        for contender in order:
            result = workers[contender].round()
            seconds[contender] += result["steps"]
            fixed[contender].append(result["fixed"])
    for w in workers.values():
        w.close()
    return ({c: statistics.median(v) for c, v in seconds.items()}, {c: statistics.median(v) for c, v in fixed.items()},
            {c: w.ready for c, w in workers.items()})


def main(argv):
    del argv
    if FLAGS.worker:
        logging.set_verbosity(logging.WARNING)
        worker(FLAGS.worker, FLAGS.model)
        return
    contenders = FLAGS.contenders or list(CONTENDERS)
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        raise app.UsageError(f"Unknown contenders {unknown}. Known: {', '.join(CONTENDERS)}")
    if not _have_jax():
        skipped = [c for c in contenders if CONTENDERS[c][0] == "jax"]
        contenders = [c for c in contenders if CONTENDERS[c][0] != "jax"]
        if skipped:
            print(f"jax is not installed (pip install -e '.[peers]'): {', '.join(skipped)} left out")
    print(f"batch {FLAGS.batch_size}, SGD, {FLAGS.rounds} rounds of {FLAGS.steps} steady steps (median), "
          f"keras_lwp on a {MESH['x']}x{MESH['y']} mesh of {DEVICES} logical CPU devices")
    results = {}
    for name in FLAGS.models:
        step, fixed, ready = time_model(name, contenders)
        results[name] = step
        base = step.get("keras-tf")
        print(f"\n{name}")
        print(f"  {'contender':<72} {'s/step':>7} {'x 1 dev':>7} {'fit fixed s':>11} {'splits':>6}")
        for contender, seconds in step.items():
            ratio = f"{seconds / base:.2f}" if base else "-"
            splits = ready[contender]["splits"]
            print(f"  {CONTENDERS[contender][1]:<72} {seconds:7.3f} {ratio:>7} {fixed[contender]:11.2f} "
                  f"{'-' if splits is None else splits:>6}")
        _goals(name, step)
    if FLAGS.plot:
        _plot(results, FLAGS.plot)


def _goals(name, step):
    auto, base = step.get("auto"), step.get("keras-tf")
    if auto is None:
        return
    if base and name in SIZES:
        ratio = auto / base
        print(f"  goal: auto <= {GOAL_ONE_DEVICE}x the one-device step: {ratio:.2f}x "
              f"({'met' if ratio <= GOAL_ONE_DEVICE else 'not met'})")
    rivals = [step[c] for c in ("data", "owt") if c in step]
    if rivals:
        best = min(rivals)
        print(f"  goal: auto at least as fast as the best of data/owt: {best / auto:.2f}x "
              f"({'met' if auto <= best * 1.03 else 'not met'}, 3% noise allowance)")
    profiled = step.get("auto-profiled")
    if profiled:
        print(f"  goal: auto (defaults) within {GOAL_PROFILED - 1:.0%} of the profiled plan's step: "
              f"{auto / profiled:.2f}x ({'met' if auto <= profiled * GOAL_PROFILED else 'not met'})")


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    contenders = [c for c in CONTENDERS if any(c in results[n] for n in names)]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [results[name].get(c, 0.0) for c in contenders]
        ax.barh(range(len(contenders)), values, color=["C1" if c in ("auto", "auto-profiled") else "C0"
                                                      for c in contenders])
        ax.set_yticks(range(len(contenders)), contenders if ax is axes[0][0] else [""] * len(contenders))
        ax.invert_yaxis()
        ax.set_xlabel("s per step (median)")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    app.run(main)
