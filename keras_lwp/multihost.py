"""Multi-host training on DTensor's own multi-client runtime.

Each host (or each process on one host) is one DTensor *client*: it runs the same Python program,
owns its local devices, and together the clients form one global mesh. `initialize` makes this
process one client; after it, `keras_lwp.make_mesh` builds the mesh over the devices of all clients
and `parallelize` / `fit` / `evaluate` / `predict` / `get_weights` work as in one process:

- every client passes the *whole* global batch to `fit` (the same arrays, in the same order) and
  packs only its own devices' blocks of it onto the mesh (`dtensor.pack` on a multi-client mesh
  takes the local components);
- host reads (`get_weights`, `predict`, logged metrics) gather across clients: a relayout to
  replicated is an all-gather over every device, after which each client reads its own copy.

Every client must run the same plan. keras_lwp guarantees that as follows:
- the search is deterministic: the same model, mesh, batch size and cost model give the same plan
  in every process (no timing, no hash-order dependence); the analytic cost model reads no clock;
- a cost model built from measurements (profiling) must be measured once and shared (e.g. saved
  and loaded by every client), never measured on each client;
- `parallelize` checks it: the clients exchange a hash of the plan through the coordination
  service and fail with `ClientMismatchError`, naming the clients that differ, before any weight
  is placed. The first batch of every epoch is checked the same way (each client must feed the
  same batches), and the initial weights are taken from client 0 (an all-reduce), so clients whose
  random initialization differed still train one model.

A client that dies makes the others fail instead of hanging: a collective with a dead peer fails
at once ("Connection reset by peer"), and a peer that stops answering (hung, stopped) is declared
dead by the coordination service after `heartbeat_timeout` seconds ("The following tasks are
unhealthy (stopped sending heartbeats)"). A client that never starts makes the others fail after
`register_timeout` seconds (the coordination service's registration barrier; without it they would
wait an hour, its fixed device-propagation timeout). Agreement checks wait at most as long.

```python
import keras_lwp
keras_lwp.initialize(client_id=0, jobs=["host0:9000", "host1:9000"], local_devices=4)
mesh = keras_lwp.make_mesh({"x": 4, "y": 2})      # 8 devices: 4 on each client
model = keras_lwp.parallelize(model, mesh)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
model.fit(x, y, batch_size=64)                    # the same x, y on every client
```
"""

import hashlib
import os
from dataclasses import dataclass

import numpy as np

_CLUSTER = None
_TIMEOUT = 60.0  # seconds a client waits for another in the key-value store (initialize's register_timeout)
_CHECKS = 0  # agreement checks this client has made; numbers their keys (every client makes the same sequence)


class ClientMismatchError(ValueError):
    """The clients of a multi-client cluster disagree on something they must share (plan, batches)."""


class ClientFailedError(RuntimeError):
    """Another client did not start, died or stopped answering while this one waited for it."""


@dataclass(frozen=True)
class Cluster:
    """This process's place in a DTensor cluster (what `initialize` set up).

    Attributes:
        client_id: this client's index, 0 .. num_clients - 1.
        num_clients: the number of clients (processes).
        jobs: each client's "host:port", by client id.
        job_name: the TensorFlow job name every client shares.
        device_type: "CPU" or "GPU".
        local_devices: devices on this client (every client has as many).
        seed: the random seed every client was given.
    """

    client_id: int
    num_clients: int
    jobs: tuple
    job_name: str
    device_type: str
    local_devices: int
    seed: int

    @property
    def multi_client(self):
        return bool(self.jobs)

    @property
    def global_devices(self):
        return self.local_devices * self.num_clients

    def __repr__(self):
        if not self.multi_client:
            return f"Cluster(one process, {self.local_devices} {self.device_type} devices, seed={self.seed})"
        return (f"Cluster(client {self.client_id} of {self.num_clients}, {self.local_devices} {self.device_type} "
                f"devices each, jobs={list(self.jobs)}, seed={self.seed})")


def cluster():
    """The Cluster `initialize` set up in this process, or None."""
    return _CLUSTER


def is_multi_client():
    """Whether this process is one client of a multi-client cluster: `initialize` with jobs, or
    `dtensor.initialize_accelerator_system` with $DTENSOR_JOBS set."""
    if _CLUSTER is not None:
        return _CLUSTER.multi_client
    from tensorflow.dtensor.python import accelerator_util, config

    return accelerator_util.is_initialized() and not config.is_local_mode()


def _client_and_count():
    from tensorflow.dtensor.python import config

    return config.client_id(), config.num_clients()


def initialize(client_id=None, num_clients=None, jobs=None, local_devices=None, device_type="CPU", job_name=None,
               seed=None, heartbeat_timeout=10.0, register_timeout=60.0):
    """Make this process one client of a multi-client DTensor cluster.

    Call it at the start of the program, before any TensorFlow operation runs, in every client;
    then build the mesh with `keras_lwp.make_mesh` (it spans the devices of all clients) and use
    `parallelize` and `fit` as in one process, with the same data and the same model code on
    every client.

    Every client computes the same plan: the search is deterministic (same model, mesh, batch size
    and cost model give the same plan; nothing is timed), a cost model built from measurements
    must be measured once and given to every client, and `parallelize` exchanges a hash of the plan
    between the clients and raises `ClientMismatchError` if any differ. `initialize` also seeds
    Python, NumPy, TensorFlow and Keras with one seed on every client (so `fit`'s shuffling and
    the model's random initialization agree), and `parallelize` takes the initial weights from
    client 0.

    Args:
        client_id: this client's index (default: $DTENSOR_CLIENT_ID, else 0).
        num_clients: the number of clients (default: the number of jobs; if given, checked against it;
            $DTENSOR_NUM_CLIENTS is read the same way).
        jobs: every client's "host:port", in client order, as a list or a comma-separated string
            (default: $DTENSOR_JOBS). Empty: this process is the only client (it just gets its
            devices and the seed).
        local_devices: devices on each client. For CPU: how many logical devices to split this
            process's CPU into (default: 1); for GPU: the local GPUs (default: all of them).
        device_type: "CPU" or "GPU".
        job_name: the TensorFlow job name (default: $DTENSOR_JOB_NAME, else "worker").
        seed: the random seed for every client (default: client 0 draws one and sends it to the others).
        heartbeat_timeout: seconds after which a client that stopped answering is declared dead and the
            others fail (the coordination service's heartbeat timeout).
        register_timeout: seconds the clients wait for each other to start.

    Returns:
        A Cluster describing this process's place (also `keras_lwp.multihost.cluster()`).

    Example: two processes on this machine with two logical CPUs each; process 1 runs the same
    program with client_id=1 (or set DTENSOR_CLIENT_ID and DTENSOR_JOBS and call `initialize(local_devices=2)`).
    examples/launch_local.py starts such processes.

    ```python
    keras_lwp.initialize(client_id=0, jobs="localhost:9000,localhost:9001", local_devices=2)
    mesh = keras_lwp.make_mesh({"x": 2, "y": 2})  # x across the two processes, y within each
    ```
    """
    global _CLUSTER, _TIMEOUT
    if _CLUSTER is not None:
        raise RuntimeError(f"keras_lwp.initialize was already called in this process: {_CLUSTER!r}. "
                           "Call it once, at the start of the program.")
    import tensorflow as tf
    from tensorflow.dtensor.python import accelerator_util
    from tensorflow.python.eager import context

    device_type = str(device_type).upper()
    if device_type not in ("CPU", "GPU"):
        raise ValueError(f"device_type must be 'CPU' or 'GPU'. Received: device_type={device_type!r}")
    if jobs is None:
        jobs = os.environ.get("DTENSOR_JOBS", "")
    if isinstance(jobs, str):
        jobs = [job.strip() for job in jobs.split(",") if job.strip()]
    jobs = tuple(jobs)
    for job in jobs:
        if ":" not in job:
            raise ValueError(f"Each job must be 'host:port'. Received: {job!r} in jobs={list(jobs)}")
    if num_clients is None and os.environ.get("DTENSOR_NUM_CLIENTS"):
        num_clients = int(os.environ["DTENSOR_NUM_CLIENTS"])
    if num_clients is not None and num_clients != max(len(jobs), 1):
        raise ValueError(
            f"num_clients={num_clients} but {len(jobs)} job address(es) were given ({list(jobs)}). Give one "
            "'host:port' per client in jobs (or $DTENSOR_JOBS), in client order.")
    num_clients = max(len(jobs), 1)
    if client_id is None:
        client_id = int(os.environ.get("DTENSOR_CLIENT_ID", "0"))
    if not 0 <= client_id < num_clients:
        raise ValueError(f"client_id must be in [0, {num_clients}) for {num_clients} client(s). "
                         f"Received: client_id={client_id}")
    job_name = job_name or os.environ.get("DTENSOR_JOB_NAME") or "worker"
    if context.context()._initialized:  # noqa: SLF001 (DTensor's own check, made before it is too late)
        raise RuntimeError(
            "TensorFlow has already initialized its devices, so this process can no longer join a cluster. "
            "Call keras_lwp.initialize(...) at the start of the program, before any TensorFlow operation.")

    if device_type == "CPU":
        local_devices = 1 if local_devices is None else local_devices
        if not isinstance(local_devices, int) or local_devices < 1:
            raise ValueError(f"local_devices must be a positive integer. Received: {local_devices!r}")
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * local_devices)
    else:
        gpus = tf.config.list_physical_devices("GPU")
        local_devices = len(gpus) if local_devices is None else local_devices
        if not 1 <= local_devices <= len(gpus):
            raise ValueError(f"local_devices={local_devices} but this host has {len(gpus)} GPU(s).")
        tf.config.set_visible_devices(gpus[:local_devices], "GPU")

    if jobs:
        # What dtensor.initialize_accelerator_system does in multi-client mode, with the coordination
        # service's timeouts set: DTensor's own call leaves them at TensorFlow's defaults.
        os.environ.update(DTENSOR_CLIENT_ID=str(client_id), DTENSOR_JOB_NAME=job_name, DTENSOR_JOBS=",".join(jobs))
        os.environ.pop("DTENSOR_NUM_CLIENTS", None)  # removed from TF; the count follows from the jobs
        from tensorflow.core.protobuf import cluster_pb2, tensorflow_server_pb2
        from tensorflow.python.platform import remote_utils

        leader = f"/job:{job_name}/replica:0/task:0"
        ctx = context.context()
        ctx.configure_collective_ops(collective_leader=leader)
        ctx.configure_coordination_service(
            service_type="standalone", service_leader=leader, enable_health_check=True,
            heartbeat_timeout_in_ms=int(heartbeat_timeout * 1000),
            cluster_register_timeout_in_ms=int(register_timeout * 1000),
            shutdown_barrier_timeout_in_ms=int(register_timeout * 1000))
        # Without the registration barrier a client that never starts leaves the others waiting for
        # its devices for an hour (the service's fixed device-propagation timeout), not register_timeout.
        ctx.coordination_service.cluster_register_with_barrier = True
        cluster_def = cluster_pb2.ClusterDef()
        cluster_def.job.add(name=job_name, tasks=dict(enumerate(jobs)))
        server_def = tensorflow_server_pb2.ServerDef(
            cluster=cluster_def, default_session_config=context.get_config(), job_name=job_name,
            task_index=client_id, protocol=remote_utils.get_default_communication_protocol())
        server_def.default_session_config.rpc_options.num_channels_per_target = 4
        server_def.default_session_config.experimental.recv_buf_max_chunk = -1
        ctx.enable_collective_ops(server_def)
        try:
            context.ensure_initialized()  # blocks until every client has registered (or register_timeout)
        except tf.errors.OpError as error:
            raise ClientFailedError(
                f"Client {client_id} could not join the cluster {list(jobs)} within register_timeout="
                f"{register_timeout:g} s ({type(error).__name__}: {_tf_message(error)}). Every client must start "
                "(with its own client_id) and reach the others at these addresses.") from error
        accelerator_util.set_initialized(device_type)
    else:
        for name in ("DTENSOR_JOBS", "DTENSOR_CLIENT_ID", "DTENSOR_NUM_CLIENTS"):
            os.environ.pop(name, None)

    _TIMEOUT = register_timeout
    seed = _agree_on_seed(seed, client_id, bool(jobs))
    _CLUSTER = Cluster(client_id, num_clients, jobs, job_name, device_type, local_devices, seed)
    import keras

    keras.utils.set_random_seed(_CLUSTER.seed)
    return _CLUSTER


def _agree_on_seed(seed, client_id, multi_client):
    """Client 0's seed (the given one, or one it draws), the same on every client."""
    if seed is None and (client_id == 0 or not multi_client):
        seed = int.from_bytes(os.urandom(4), "little") >> 1
    if not multi_client:
        return int(seed)
    from tensorflow.python.eager import context

    key = "keras_lwp/seed"
    if client_id == 0:
        context.context().set_config_key_value(key, str(int(seed)))
        return int(seed)
    shared = int(_get_key(key, "the random seed", 0, client_id))
    if seed is not None and int(seed) != shared:
        raise ClientMismatchError(
            f"Client {client_id} was given seed={seed} but client 0 uses seed={shared}. Give every "
            "client the same seed, or none (client 0 then picks one for all).")
    return shared


def _get_key(key, what, client, me):
    """A value another client put in the coordination service's key-value store (bounded wait)."""
    from tensorflow.python.eager import context

    try:
        return context.context().get_config_key_value(key, timeout_in_ms=int(_TIMEOUT * 1000))
    except Exception as error:  # DeadlineExceeded, Unavailable (a dead peer), Aborted
        raise ClientFailedError(
            f"Client {me} waited for {what} from client {client} and did not get it within {_TIMEOUT:g} s "
            f"({type(error).__name__}: {_tf_message(error)}). That client died, hangs, or runs a different "
            "program: check its log.") from error


def _tf_message(error):
    """TensorFlow's own account of a failure, without the gRPC details that follow it."""
    lines = []
    for line in str(error).strip().splitlines():
        if line.startswith("Additional GRPC error"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines)[:600]


def agree(what, payload, advice=None):
    """Check that every client has the same `payload` (str or bytes); raise ClientMismatchError if not.

    Each client publishes a hash of its payload through the coordination service's key-value store
    and reads all the others'. A no-op outside multi-client mode. Every client must make the same
    sequence of checks (they run the same program); a client that does not come makes the others
    fail after a timeout, naming it.
    """
    if not is_multi_client():
        return
    from tensorflow.python.eager import context

    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    digest = hashlib.sha256(data).hexdigest()
    global _CHECKS
    me, count = _client_and_count()
    _CHECKS += 1
    prefix = f"keras_lwp/agree/{_CHECKS}/{what}"
    context.context().set_config_key_value(f"{prefix}/{me}", digest)
    digests = {client: digest if client == me else _get_key(f"{prefix}/{client}", what, client, me)
               for client in range(count)}
    # Nobody raises (and exits, maybe taking client 0's coordination service with it) before every
    # client has read every hash: then each reports the mismatch itself.
    try:
        context.context().wait_at_barrier(f"{prefix}/read", int(_TIMEOUT * 1000))
    except Exception as error:  # noqa: BLE001 (a peer died or hangs after publishing)
        raise ClientFailedError(f"Client {me} waited for the others to compare {what} and they did not come "
                                f"within {_TIMEOUT:g} s ({type(error).__name__}: {_tf_message(error)}).") from error
    groups = {}
    for client, value in digests.items():
        groups.setdefault(value, []).append(client)
    if len(groups) > 1:
        _leave_together(prefix, me, count)
        mine = groups[digest]
        others = sorted(c for c in digests if c not in mine)
        raise ClientMismatchError(
            f"The clients do not agree on {what}: clients {mine} have one (sha256 {digest[:12]}), clients "
            f"{others} another. " + (advice or "Every client must run the same program on the same data."))


def _leave_together(prefix, me, count):
    """Before every client raises the same mismatch: client 0, which hosts the coordination service,
    leaves last, once every other client is out of the barrier (else a peer still in it sees the
    service vanish instead of the mismatch). Bounded waits; a peer that died is not waited for."""
    from tensorflow.python.eager import context

    if me == 0:
        for client in range(1, count):
            try:
                context.context().get_config_key_value(f"{prefix}/passed/{client}", timeout_in_ms=int(_TIMEOUT * 1000))
            except Exception:  # noqa: BLE001 (that peer died after the barrier: nothing to wait for)
                pass
        return
    try:
        context.context().set_config_key_value(f"{prefix}/passed/{me}", "1")
    except Exception:  # noqa: BLE001 (client 0 read it and left before this call returned: every digest
        pass           # is already here, so the mismatch stands)


def broadcast_from_first_client(arrays, mesh):
    """The values client 0 has for `arrays` (a list of NumPy arrays), on every client.

    One all-reduce per dtype over the devices of `mesh`: the first device contributes the values,
    every other device zeros. Outside multi-client mode the arrays are returned as they are.
    """
    if not is_multi_client() or not arrays:
        return list(arrays)
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    global_ids = np.asarray(mesh.global_device_ids()).ravel()
    flat = dtensor.Mesh(["_all"], np.arange(global_ids.size), list(mesh.local_device_ids()),
                        list(mesh.local_devices()))
    first = int(global_ids[0])
    layout = dtensor.Layout(["_all", dtensor.UNSHARDED], flat)
    arrays = [np.asarray(a) for a in arrays]
    result = list(arrays)
    by_dtype = {}
    for index, array in enumerate(arrays):
        by_dtype.setdefault(np.dtype(array.dtype).str, []).append(index)
    for dtype, indices in by_dtype.items():
        kind = np.dtype(dtype)
        wire = np.int64 if kind.kind in "iub" else np.float64  # exact for every float and int weight
        values = np.concatenate([arrays[i].astype(wire).ravel() for i in indices])[None]
        components = [values if device == first else np.zeros_like(values) for device in mesh.local_device_ids()]
        summed = tf.reduce_sum(dtensor.pack(components, layout), axis=0)
        total = dtensor.unpack(summed)[0].numpy()
        offset = 0
        for i in indices:
            size = arrays[i].size
            result[i] = total[offset:offset + size].reshape(arrays[i].shape).astype(kind)
            offset += size
    return result


__all__ = ["Cluster", "ClientFailedError", "ClientMismatchError", "agree", "broadcast_from_first_client", "cluster", "initialize",
           "is_multi_client"]
