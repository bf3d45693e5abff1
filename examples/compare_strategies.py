"""Every strategy of every chosen model, side by side: measured on this machine's mesh of logical CPU
devices, or simulated on the paper's P100 cluster.

    python examples/compare_strategies.py                       # AlexNet and VGG-16 on 8 logical CPUs
    python examples/compare_strategies.py --simulate p100       # the paper's cluster, 1-16 GPUs

Measured: each model is parallelized once per strategy and traced; then the contenders run interleaved
(A B C D, A B C D, ...), after a warm-up round, for --rounds rounds of --steps steps so machine noise
hits all alike; the median steady-state step gives samples/s. The goals compare "auto" with the best
baseline round by round (same machine state), the spread of those per-round ratios being the noise.
Writes results.md, results.csv and throughput.png (samples/s per strategy and model, and the bytes each
strategy moves per step) to --out_dir.

Simulated: the cost model's predicted throughput of data, model, OWT and layer-wise ("auto", the whole
configuration space including the hidden dimensions) on 1, 2, 4, 8 and 16 GPUs of the P100 profile
(4 per node), 32 images per GPU, 224x224 (299x299 for Inception-v3), printed beside the paper's figures;
writes simulated.md, simulated.csv and simulated.png.
"""

import csv
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["alexnet", "vgg16"], "Models (examples/zoo.py names).")
flags.DEFINE_list("strategies", ["data", "model", "owt", "auto"], "Strategies to compare.")
flags.DEFINE_integer("devices", 8, "Logical CPU devices (measured mode).")
flags.DEFINE_string("mesh", "4x2", "Mesh for 'auto' (measured mode): '4x2' or 'x=4,y=2'.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (measured mode).")
flags.DEFINE_integer("image_size", 64, "Image size (measured mode).")
flags.DEFINE_integer("classes", 100, "Classes (measured mode).")
flags.DEFINE_integer("steps", 6, "Timed steps per round.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_string("cost_model", None, "Cost model for planning (default: the library's default).")
flags.DEFINE_string("out_dir", "results", "Where the tables and the plot go.")
flags.DEFINE_string("simulate", None, "A device profile (e.g. p100): predict instead of measuring.")

# Jia et al. 2018, Sec. 6 (16 P100 GPUs, 4 per node; 32 images per GPU).
PAPER = {
    "speedup_over_data_at_16": {"alexnet": 2.2, "vgg16": 1.5, "inception_v3": 1.4},
    "scaling_1_to_16": {"alexnet": 12.2, "vgg16": 14.8, "inception_v3": 15.5},
    "less_communication": "1.3-23.0x less than data and model parallelism",
}
PAPER_IMAGE_SIZE = {"alexnet": 224, "vgg16": 224, "inception_v3": 299}


def _repo_on_path():
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_table(path, header, rows):
    with open(path + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


# -- measured ------------------------------------------------------------------------------------

def measure():
    import keras_lwp

    keras_lwp.use_virtual_devices(FLAGS.devices)
    import keras
    import numpy as np

    from examples import zoo

    mesh = keras_lwp.make_mesh(FLAGS.mesh)
    rng = np.random.default_rng(0)
    contenders = {}
    for name in FLAGS.models:
        size = None if name == "transformer" else FLAGS.image_size
        for strategy in FLAGS.strategies:
            keras.utils.set_random_seed(0)
            model = zoo.build(name, size, FLAGS.classes)
            kwargs = dict(strategy=strategy, batch_size=FLAGS.batch_size)
            if FLAGS.cost_model:
                kwargs["cost_model"] = FLAGS.cost_model
            model = keras_lwp.parallelize(model, mesh, **kwargs)
            shape = (FLAGS.batch_size * FLAGS.steps,) + tuple(model.inputs[0].shape[1:])
            if name == "transformer":
                x = rng.integers(0, 1000, shape).astype("int32")
            else:
                x = rng.standard_normal(shape, dtype="float32")
            y = rng.integers(0, FLAGS.classes, len(x))
            from_logits = name in ("alexnet", "transformer")
            model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits))
            started = time.perf_counter()
            model.fit(x[:FLAGS.batch_size], y[:FLAGS.batch_size], batch_size=FLAGS.batch_size, verbose=0)
            print(f"{name:>12} {strategy:>5}: planned, sharded and traced in {time.perf_counter() - started:.1f} s; "
                  f"{keras_lwp.strategy_of(model).cost}", flush=True)
            contenders[name, strategy] = (model, x, y)

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    times = {key: [] for key in contenders}
    for round_ in range(-1, FLAGS.rounds):  # round -1 warms up: a first full epoch after tracing runs slow
        for key, (model, x, y) in contenders.items():
            timer = EpochTimer()
            model.fit(x, y, batch_size=FLAGS.batch_size, verbose=0, shuffle=False, callbacks=[timer])
            if round_ >= 0:
                times[key].append(timer.seconds / FLAGS.steps)
        print(f"round {round_ + 1}/{FLAGS.rounds} done" if round_ >= 0 else "warm-up round done", flush=True)

    header = ["model", "strategy", "mesh", "samples/s", "ms/step (median)", "ms/step (rounds)", "spread %",
              "predicted ms/step", "communication MiB/step", "vs data"]
    rows = []
    results = {}
    for (name, strategy), (model, _, _) in contenders.items():
        plan = keras_lwp.strategy_of(model)
        step = statistics.median(times[name, strategy])
        spread = (max(times[name, strategy]) - min(times[name, strategy])) / step
        results[name, strategy] = (FLAGS.batch_size / step, plan.communication, spread)
    for (name, strategy), (model, _, _) in contenders.items():
        plan = keras_lwp.strategy_of(model)
        throughput, communication, spread = results[name, strategy]
        data = results.get((name, "data"))
        rows.append([name, strategy, str(plan.mesh), f"{throughput:.1f}",
                     f"{FLAGS.batch_size / throughput * 1e3:.1f}",
                     " ".join(f"{t * 1e3:.0f}" for t in times[name, strategy]), f"{spread * 100:.0f}",
                     f"{plan.cost.total * 1e3:.1f}", f"{communication / 2**20:.1f}",
                     f"{throughput / data[0]:.2f}x" if data else ""])
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    print(_write_table(os.path.join(FLAGS.out_dir, "results"), header, rows))
    for name in FLAGS.models:
        others = [s for s in ("data", "model", "owt") if (name, s) in results]
        if "auto" in FLAGS.strategies and others:
            best = max(others, key=lambda s: results[name, s][0])
            # Interleaved rounds see the same machine: compare auto with the best baseline round by round,
            # and call the spread of those per-round ratios the noise.
            ratios = [b / a for a, b in zip(times[name, "auto"], times[name, best])]
            ratio, noise = statistics.median(ratios), (max(ratios) - min(ratios)) / 2
            verdict = "met" if ratio >= 1 - noise else "MISSED"
            print(f"{name}: auto / best baseline ({best}) = {ratio:.2f}x, median of the rounds "
                  f"{' '.join(f'{r:.2f}' for r in ratios)} (goal: not slower beyond the noise +-{noise:.2f}: {verdict})")
            if name in ("alexnet", "vgg16") and (name, "data") in results:
                ratios = [d / a for a, d in zip(times[name, "auto"], times[name, "data"])]
                ratio = statistics.median(ratios)
                print(f"{name}: auto / data = {ratio:.2f}x, median of the rounds "
                      f"(goal >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})")
    _plot_measured(results, os.path.join(FLAGS.out_dir, "throughput.png"))


def _plot_measured(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install keras_lwp[plot])")
        return
    models = list(dict.fromkeys(name for name, _ in results))
    strategies = list(dict.fromkeys(s for _, s in results))
    figure, (speed, volume) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(strategies)
    for i, strategy in enumerate(strategies):
        xs = [m + i * width for m in range(len(models))]
        speed.bar(xs, [results[name, strategy][0] if (name, strategy) in results else 0 for name in models],
                  width, label=strategy)
        volume.bar(xs, [results[name, strategy][1] / 2**20 if (name, strategy) in results else 0 for name in models],
                   width, label=strategy)
    for axes, label in ((speed, "samples / s (measured)"), (volume, "communication MiB / step (all devices)")):
        axes.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models)
        axes.set_ylabel(label)
        axes.legend(fontsize=8)
    volume.set_yscale("log")
    figure.suptitle(f"{FLAGS.devices} logical CPU devices, batch {FLAGS.batch_size}, {FLAGS.image_size}x{FLAGS.image_size}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


# -- simulated -----------------------------------------------------------------------------------

def cluster_mesh(gpus, per_node=4):
    """The P100 cluster's devices as a mesh: one axis within a node, one across nodes."""
    if gpus <= per_node:
        return {"gpu": gpus}
    return {"node": gpus // per_node, "gpu": per_node}


def simulate(profile):
    from examples import zoo
    from keras_lwp.graph import layer_graph
    from keras_lwp.mesh import mesh_spec_of
    from keras_lwp.planner import plan_graph

    counts = (1, 2, 4, 8, 16)
    header = ["model", "GPUs", "strategy", "samples/s", "vs data", "communication GiB/step", "plan s"]
    rows = []
    throughput = {}
    volume = {}
    for name in ("alexnet", "vgg16", "inception_v3"):
        model = zoo.build(name, PAPER_IMAGE_SIZE[name])
        for gpus in counts:
            mesh = mesh_spec_of(cluster_mesh(gpus))
            graph = layer_graph(model, 32 * gpus)
            for strategy in ("data", "model", "owt", "auto"):
                started = time.perf_counter()
                plan = plan_graph(graph, mesh, 32 * gpus, strategy, profile=profile, space="full",
                                  hidden_dimensions=True)
                seconds = time.perf_counter() - started
                throughput[name, gpus, strategy] = 32 * gpus / plan.cost.total
                volume[name, gpus, strategy] = plan.communication
                rows.append([name, gpus, strategy, f"{throughput[name, gpus, strategy]:.0f}",
                             f"{throughput[name, gpus, strategy] / throughput[name, gpus, 'data']:.2f}x",
                             f"{plan.communication / 2**30:.3f}", f"{seconds:.2f}"])
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    print(_write_table(os.path.join(FLAGS.out_dir, "simulated"), header, rows))
    print(f"\nAt 16 GPUs ({profile} profile) beside Jia et al. 2018:")
    print(f"{'model':<13} {'auto/data':>9} {'paper':>6}   {'data/auto bytes':>15} {'model/auto bytes':>16}   "
          f"{'auto 1->16':>10} {'paper':>6}")
    for name in ("alexnet", "vgg16", "inception_v3"):
        auto = throughput[name, 16, "auto"]
        print(f"{name:<13} {auto / throughput[name, 16, 'data']:>8.2f}x "
              f"{PAPER['speedup_over_data_at_16'][name]:>5.1f}x   "
              f"{_ratio(volume[name, 16, 'data'], volume[name, 16, 'auto']):>15} "
              f"{_ratio(volume[name, 16, 'model'], volume[name, 16, 'auto']):>16}   "
              f"{auto / throughput[name, 1, 'auto']:>9.1f}x {PAPER['scaling_1_to_16'][name]:>5.1f}x")
    print(f"paper: {PAPER['less_communication']}")
    _plot_simulated(throughput, counts, profile, os.path.join(FLAGS.out_dir, "simulated.png"))


def _ratio(a, b):
    return "inf" if b == 0 else f"{a / b:.1f}x"


def _plot_simulated(throughput, counts, profile, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install keras_lwp[plot])")
        return
    models = ("alexnet", "vgg16", "inception_v3")
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name in zip(axes, models):
        for strategy, marker in (("data", "o"), ("model", "s"), ("owt", "^"), ("auto", "*")):
            ax.plot(counts, [throughput[name, g, strategy] for g in counts], marker=marker,
                    label="layer-wise (auto)" if strategy == "auto" else strategy)
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_title(name)
        ax.set_xlabel("GPUs")
        ax.set_ylabel("images / s (predicted)")
        ax.legend(fontsize=7)
    figure.suptitle(f"Simulated on the {profile} profile, 32 images per GPU")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    _repo_on_path()
    if FLAGS.simulate:
        simulate(FLAGS.simulate)
    else:
        measure()


if __name__ == "__main__":
    app.run(main)
