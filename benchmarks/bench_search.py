"""Search time, from layer graph to plan, beside the paper's Table 3.

    python -m benchmarks.bench_search

For each model, the layer graph is read once (its time printed apart: it is Keras' own
get_config and shape bookkeeping); then for 4, 8, 16 and 64 devices the planner builds every
cost table and runs the exact search (auto searches both the 2-D mesh and the flattened one),
median of 3 runs. Meshes are the P100 cluster's (4 GPUs per node), 32 samples per device; the
configuration space is the paper's whole one by default (--space=full).
Goals: Inception-v3 on 8 devices <= 0.4 s; ResNet-101 on 64 devices <= 5 s. Then (--defaults)
`keras_lwp.search` as a user calls it, model to plan: Inception-v3 4x2 batch 64 <= 0.25 s and
ResNet-152 8x8 (32 per device) <= 1 s.
"""

import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["alexnet", "vgg16", "inception_v3", "resnet101"], "Models to plan.")
flags.DEFINE_list("devices", ["4", "8", "16", "64"], "Device counts.")
flags.DEFINE_integer("repeats", 3, "Runs per measurement (the median is printed).")
flags.DEFINE_bool("defaults", True, "Also time keras_lwp.search at defaults against issue 19's goals.")
flags.DEFINE_enum("space", "full", ["full", "runnable"],
                  "full: the paper's whole space (convolutions split by channel and rows too); "
                  "runnable: what parallelize executes today.")

MESHES = {4: {"x": 2, "y": 2}, 8: {"x": 4, "y": 2}, 16: {"x": 4, "y": 4}, 64: {"x": 8, "y": 8}}
PAPER_TABLE3_4GPUS = {"alexnet": 0.02, "vgg16": 0.1, "inception_v3": 0.4}
GOALS = {("inception_v3", 8): 0.4, ("resnet101", 64): 5.0}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from examples import zoo
    from keras_lwp.graph import layer_graph
    from keras_lwp.mesh import mesh_spec_of
    from keras_lwp.planner import plan_graph

    print(f"configuration space: {FLAGS.space}")
    print(f"{'model':<13} {'layers':>6} {'graph s':>8} {'devices':>7} {'mesh':<10} {'plan s':>7} "
          f"{'paper (4 GPUs)':>14} {'goal':>6}  plan")
    for name in FLAGS.models:
        model = zoo.build(name)
        for devices in (int(d) for d in FLAGS.devices):
            mesh = mesh_spec_of(MESHES[devices])
            batch = 32 * devices
            start = time.perf_counter()
            graph = layer_graph(model, batch)
            graph_seconds = time.perf_counter() - start
            times = []
            for _ in range(FLAGS.repeats):
                start = time.perf_counter()
                plan = plan_graph(graph, mesh, batch, profile="p100", space=FLAGS.space)
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            paper = PAPER_TABLE3_4GPUS.get(name) if devices == 4 else None
            goal = GOALS.get((name, devices))
            verdict = "" if goal is None else (" met" if seconds <= goal else " MISSED")
            mesh_text = "x".join(str(s) for _, s in mesh.axes)
            print(f"{name:<13} {graph.number_of_nodes():>6} {graph_seconds:>8.3f} {devices:>7} {mesh_text:<10} "
                  f"{seconds:>7.3f} {'' if paper is None else f'{paper:.2f}':>14} "
                  f"{'' if goal is None else f'{goal:.1f}':>6}{verdict}  {plan.mesh}, {plan.cost.total * 1e3:.1f} ms/step",
                  flush=True)
    if FLAGS.defaults:
        defaults_table()


# What a user's call costs at defaults (runnable space, analytic model), graph reading included: issue 19.
DEFAULT_GOALS = [("inception_v3", {"x": 4, "y": 2}, 64, 0.25), ("resnet152", {"x": 8, "y": 8}, 2048, 1.0)]


def defaults_table():
    import keras

    import keras_lwp

    print("\nkeras_lwp.search(model, mesh, batch_size) at defaults, model to plan (median of --repeats):")
    print(f"{'model':<13} {'mesh':<6} {'batch':>5} {'search s':>8} {'goal':>6}")
    for name, mesh, batch, goal in DEFAULT_GOALS:
        if name == "resnet152":
            model = keras.applications.ResNet152(weights=None, input_shape=(224, 224, 3))
        else:
            from examples import zoo
            model = zoo.build(name)
        keras_lwp.search(model, mesh, batch)  # warm: Keras' first get_config and shape caches
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            keras_lwp.search(model, mesh, batch)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        mesh_text = "x".join(str(size) for size in mesh.values())
        print(f"{name:<13} {mesh_text:<6} {batch:>5} {seconds:>8.3f} {goal:>6.2f} "
              f"{'met' if seconds <= goal else 'not met'}", flush=True)


if __name__ == "__main__":
    app.run(main)
