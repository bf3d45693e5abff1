"""Multi-client DTensor on one machine: N client processes, M logical CPU devices each, one mesh.

    python examples/launch_local.py                          # 2 clients x 2 devices, small CNN, OWT
    python examples/launch_local.py --clients 2 --devices 4 --mesh 2x4 --strategy auto
    python examples/launch_local.py --single                 # the same training in one process, N*M devices

Each client is this script run again with --client_id, on a free loopback port; all of them run the
same training (the same seed, data and model: keras_lwp.initialize makes them agree) on a mesh that
spans the devices of every client, and client 0 writes the weights and results to --out. The launcher
prints every client's output prefixed by its id and waits for them. If a client exits with an error
(or dies: --die_client/--die_after_step kill one on purpose), the others must fail on their own
(DTensor's collectives and the coordination service's heartbeat); the launcher waits --grace seconds
for that, then kills what is left, and says which client died first. It never waits longer than --timeout.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 2, "Client processes to start.")
flags.DEFINE_integer("devices", 2, "Logical CPU devices per client.")
flags.DEFINE_string("mesh", "2x2", "Mesh shape over all clients' devices: '2x2' (axes x, y, ...) or 'x=2,y=2'. "
                    "Devices are numbered client by client, so the leading axis splits across clients.")
flags.DEFINE_enum("model", "small_cnn", ["mlp", "small_cnn", "noisy_cnn", "transformer_block"],
                  "A model from tests/models.py.")
flags.DEFINE_string("strategy", "owt", "auto, data, model, owt, or a path to a Strategy JSON file.")
flags.DEFINE_multi_string("override", [], "Pin a layer for the search: 'layer=dimension:axis,dimension:axis', "
                          "e.g. --override=fc1=channel:x (repeat for more layers).")
flags.DEFINE_integer("batch_size", 16, "Global batch size (every client feeds the whole batch).")
flags.DEFINE_integer("steps", 3, "Training steps.")
flags.DEFINE_integer("seed", 1234, "Random seed of every client (weights, data shuffling).")
flags.DEFINE_bool("single", False, "Run one process with clients*devices devices instead (the reference).")
flags.DEFINE_string("out", None, "Directory where client 0 writes weights.npz and results.npz (losses, "
                    "evaluate, predict).")
flags.DEFINE_float("timeout", 300.0, "Seconds after which the launcher kills every client.")
flags.DEFINE_float("grace", 45.0, "Seconds the other clients get to fail on their own after one fails.")
flags.DEFINE_float("heartbeat_timeout", 10.0, "Seconds after which a client that stopped answering is dead.")
flags.DEFINE_float("register_timeout", 60.0, "Seconds the clients wait for each other to start.")
# Set by the launcher for each client, and by tests.
flags.DEFINE_integer("client_id", None, "Run as this client (internal: the launcher sets it).")
flags.DEFINE_string("jobs", None, "Every client's host:port, comma-separated (internal).")
flags.DEFINE_multi_string("differ", [], "'client:weights|data|plan' (tests): that client starts from other random "
                          "weights (parallelize must take client 0's), feeds other data or plans another strategy "
                          "(every client must refuse to train).")
flags.DEFINE_integer("die_client", None, "This client fails on purpose ...")
flags.DEFINE_integer("die_after_step", 1, "... after this many training steps ...")
flags.DEFINE_enum("die_how", "exit", ["exit", "hang"], "... by exiting abruptly (os._exit), or by hanging "
                  "(SIGSTOP: alive but silent, which only the heartbeat timeout detects).")
flags.DEFINE_integer("skip_client", None, "Do not start this client (tests: the others must give up after "
                     "--register_timeout).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIED = 17  # exit code of a client killed on purpose
PEER_FAILED = 3  # exit code of a client that failed because another one did


def free_ports(count):
    """Distinct free loopback ports (bound together, so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def parse_overrides(items):
    """{'fc1': {'channel': 'x'}} from ['fc1=channel:x']."""
    overrides = {}
    for item in items:
        layer, _, assignment = item.partition("=")
        overrides[layer] = dict(part.split(":") for part in assignment.split(",") if part)
    return overrides


def parse_mesh(text):
    if "=" in text:
        return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}
    sizes = [int(s) for s in text.lower().split("x")]
    return dict(zip("xyzw"[: len(sizes)], sizes))


# -- one client (or the single process) ------------------------------------------------------------

def train(client_id, jobs):
    sys.path.insert(0, ROOT)
    import keras_lwp

    local = FLAGS.devices if jobs else FLAGS.clients * FLAGS.devices
    cluster = keras_lwp.initialize(client_id, jobs=jobs or None, local_devices=local, seed=FLAGS.seed,
                                   heartbeat_timeout=FLAGS.heartbeat_timeout,
                                   register_timeout=FLAGS.register_timeout)
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # DTensor logs every mesh it makes at INFO
    import keras
    import numpy as np

    from tests import models

    print(cluster, flush=True)
    mesh = keras_lwp.make_mesh(parse_mesh(FLAGS.mesh))
    model = getattr(models, FLAGS.model)()
    differ = {what for client, _, what in (item.partition(":") for item in FLAGS.differ) if int(client) == client_id}
    if "weights" in differ:  # and the seed states of its random layers
        other = np.random.default_rng(client_id + 1)
        for variable in model.variables:
            if variable.dtype.startswith("float"):
                variable.assign(other.standard_normal(variable.shape).astype(variable.dtype))
            else:
                variable.assign(other.integers(1, 2**30, variable.shape).astype(variable.dtype))
    strategy = FLAGS.strategy
    if "plan" in differ:
        strategy = "data" if strategy != "data" else "owt"
    model = keras_lwp.parallelize(model, mesh, strategy=strategy, batch_size=FLAGS.batch_size,
                                  overrides=parse_overrides(FLAGS.override) or None)
    plan = keras_lwp.strategy_of(model)
    if client_id == 0:
        print(plan.summary(), flush=True)

    rng = np.random.default_rng(1 if "data" in differ else 0)  # the same data on every client
    samples = FLAGS.batch_size * FLAGS.steps
    x = rng.standard_normal((samples,) + tuple(model.inputs[0].shape[1:]), dtype="float32")
    y = rng.integers(0, model.outputs[0].shape[-1], samples)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    losses = []

    class Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))
            print(f"client {client_id}: step {batch + 1} loss {losses[-1]:.6f}", flush=True)
            if FLAGS.die_client == client_id and batch + 1 == FLAGS.die_after_step:
                print(f"client {client_id}: {'dying' if FLAGS.die_how == 'exit' else 'hanging'} on purpose "
                      f"(--die_client) at t={time.time():.2f}", flush=True)
                if FLAGS.die_how == "hang":
                    os.kill(os.getpid(), signal.SIGSTOP)
                os._exit(DIED)

    model.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, shuffle=True, verbose=0, callbacks=[Steps()])
    # Host reads are collectives (an all-gather): every client makes them, client 0 writes.
    evaluated = model.evaluate(x, y, batch_size=FLAGS.batch_size, verbose=0)
    predicted = model.predict(x[: FLAGS.batch_size], batch_size=FLAGS.batch_size, verbose=0)
    weights = model.get_weights()
    if FLAGS.out and client_id == 0:
        os.makedirs(FLAGS.out, exist_ok=True)
        np.savez(os.path.join(FLAGS.out, "weights.npz"), *weights)
        np.savez(os.path.join(FLAGS.out, "results.npz"), losses=np.array(losses), evaluate=np.array(evaluated),
                 predict=predicted)
    print(f"client {client_id}: done, training loss {losses[-1]:.6f}, evaluate loss {float(evaluated):.6f}",
          flush=True)


def run_client(client_id, jobs):
    import tensorflow as tf

    sys.path.insert(0, ROOT)
    from keras_lwp.multihost import ClientFailedError

    try:
        train(client_id, jobs)
    except (ClientFailedError, tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.InternalError,
            tf.errors.CancelledError, tf.errors.DeadlineExceededError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        print(f"client {client_id}: FAILED at t={time.time():.2f} because another client failed "
              f"({type(error).__name__}): {' '.join(lines[:3])}", file=sys.stderr, flush=True)
        os._exit(PEER_FAILED)  # not sys.exit: TF's multi-client shutdown would wait for the dead peer
    except BaseException:  # noqa: BLE001 (any other error: show it, and exit without waiting for peers)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)  # DTensor cannot shut down in multi-client mode; every collective has completed


# -- the launcher ------------------------------------------------------------------------------------

def launch():
    if FLAGS.single:
        clients, jobs = 1, ""
    else:
        clients = FLAGS.clients
        jobs = ",".join(f"localhost:{p}" for p in free_ports(clients))
    passed = [arg for arg in sys.argv[1:] if not arg.startswith(("--client_id", "--jobs", "--single"))]
    name = "single" if FLAGS.single else "client"
    processes = {}
    started = time.monotonic()
    for client in range(clients):
        if client == FLAGS.skip_client and not FLAGS.single:
            print(f"not starting client {client} (--skip_client)", flush=True)
            continue
        args = [sys.executable, os.path.abspath(__file__), f"--client_id={client}", f"--jobs={jobs}"]
        processes[client] = subprocess.Popen(args + passed, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True, cwd=ROOT)
    print(f"started 1 process with {FLAGS.clients * FLAGS.devices} devices" if FLAGS.single else
          f"started {len(processes)} clients with {FLAGS.devices} devices each on {jobs}", flush=True)
    readers = [threading.Thread(target=_relay, args=(p, f"[{name} {i}] "), daemon=True)
               for i, p in processes.items()]
    for reader in readers:
        reader.start()

    codes = dict.fromkeys(processes)
    first_failure = None  # (client, seconds) of the first non-zero exit
    killed = []
    while None in codes.values():
        time.sleep(0.05)
        now = time.monotonic() - started
        for i, p in processes.items():
            if codes[i] is None and p.poll() is not None:
                codes[i] = p.returncode
                print(f"{name} {i} exited with code {p.returncode} after {now:.1f} s"
                      + {DIED: " (failed on purpose)", PEER_FAILED: " (because another client failed)"}.get(
                          p.returncode, ""), flush=True)
                if p.returncode != 0 and first_failure is None:
                    first_failure = (i, now)
        deadline = FLAGS.timeout if first_failure is None else min(FLAGS.timeout, first_failure[1] + FLAGS.grace)
        if now > deadline:
            why = (f"still running after the {FLAGS.timeout:g} s timeout" if first_failure is None else
                   f"still running {FLAGS.grace:g} s after {name} {first_failure[0]} failed")
            for i, p in processes.items():
                if codes[i] is None:
                    p.kill()
                    codes[i] = p.wait()
                    killed.append(i)
                    print(f"{name} {i} killed by the launcher: {why}", flush=True)
    for reader in readers:
        reader.join(timeout=5)
    if all(code == 0 for code in codes.values()):
        print(f"all {len(processes)} exited cleanly in {time.monotonic() - started:.1f} s", flush=True)
        return 0
    # The cause: a client that exited with an error of its own, else one that hung (the launcher killed it).
    causes = [i for i, code in codes.items() if code not in (0, PEER_FAILED) and i not in killed] or killed
    followers = [i for i, code in codes.items() if code == PEER_FAILED]
    reports = [f"{name} {i} " + ("hung (killed by the launcher)" if i in killed else
                                 "died" if codes[i] == DIED else "failed") + f" (code {codes[i]})" for i in causes]
    if FLAGS.skip_client is not None and not FLAGS.single:
        reports.insert(0, f"client {FLAGS.skip_client} never started")
    reports += [f"{name} {i} failed on its own with a clear error (code {codes[i]})" for i in followers]
    print("FAILED: " + "; ".join(reports), flush=True)
    return 1


def _relay(process, prefix):
    noise = ("I0000", "WARNING: All log messages", "W0000", "E0000", "To enable the following", "Could not find cuda")
    for line in process.stdout:
        if not line.startswith(noise) and "cuda" not in line:
            print(prefix + line, end="", flush=True)


def main(argv):
    del argv
    if FLAGS.client_id is not None:
        run_client(FLAGS.client_id, FLAGS.jobs)
    sys.exit(launch())


if __name__ == "__main__":
    app.run(main)
