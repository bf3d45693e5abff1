"""Plan a model without training it, and explain the plan: the summary table, what differs from data
parallelism, and a drawing of the layer graph (layers colored by configuration, relayouts in red).

    python examples/explain.py                                  # VGG-16 on 4 P100s, as the paper's Table 5
    python examples/explain.py --model alexnet --mesh 4x2 --profile cpu-emulated --out alexnet.png
    python examples/explain.py --memory_limit_mib 2000          # the fastest plan within 2000 MiB a device

Pure planning: nothing runs on devices, so any mesh and profile work on any machine.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "vgg16", "A model of examples/zoo.py.")
flags.DEFINE_integer("image_size", None, "Image size (default: the paper's).")
flags.DEFINE_string("mesh", "4", "Mesh shape: '4', '4x2' or 'x=4,y=2'.")
flags.DEFINE_string("profile", "p100", "Device profile.")
flags.DEFINE_integer("batch_size", None, "Global batch size (default: 32 per device).")
flags.DEFINE_enum("space", "full", ["full", "runnable"], "The paper's whole space, or what parallelize runs.")
flags.DEFINE_float("memory_limit_mib", None, "Per-device memory limit in MiB (default: none).")
flags.DEFINE_string("out", "plan.png", "Drawing of the plan (.png, .svg, .pdf, or .dot for Graphviz).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_lwp
    from examples import zoo
    from keras_lwp.mesh import mesh_spec_of

    mesh = mesh_spec_of(FLAGS.mesh)
    model = zoo.build(FLAGS.model, FLAGS.image_size)
    batch_size = FLAGS.batch_size or 32 * mesh.size
    limit = FLAGS.memory_limit_mib * 2**20 if FLAGS.memory_limit_mib else None
    plan = keras_lwp.search(model, mesh, batch_size, profile=FLAGS.profile, space=FLAGS.space, memory_limit=limit)
    data = keras_lwp.search(model, mesh, batch_size, strategy="data", profile=FLAGS.profile, space=FLAGS.space)
    print(plan.summary())
    print()
    print(data.diff(plan))
    print(f"\ncommunication per step: {plan.communication / 2**20:.1f} MiB against {data.communication / 2**20:.1f} "
          f"MiB for data parallelism")
    print(f"wrote {keras_lwp.plot_strategy(plan, FLAGS.out)}")


if __name__ == "__main__":
    app.run(main)
