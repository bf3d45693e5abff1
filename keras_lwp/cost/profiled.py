"""A cost model measured on the real mesh, as Jia et al. (2018, Sec. 5.1) do it.

    t_o(G, S) = overhead + sum_l (t_c(l, c_l) + t_s(l, c_l)) + sum_e t_x(e, c_u, c_v)

- t_c: each (layer signature, configuration) is run on the mesh the way `parallelize` runs it: a
  copy of the layer, its weights DVariables with the configuration's layouts, its call rewrapped by
  `keras_lwp.runtime._wrap_call` (so the splits keras_lwp implements itself, a convolution's
  channels and rows, run their real halo exchange and partial sums), inputs and output gradients
  DTensors in the configuration's layouts. One `tf.function` does the forward pass and the backward
  pass (the weight gradients, and the input gradients training computes); it is called in a few
  rounds after a warm-up and the fastest round's time per call is kept (`steady`), less that of an
  empty function over the same number of arguments (the call's own dispatch, paid once per training
  step, not once per layer). An InputLayer's t_c is packing a batch onto the mesh in its layout.
- t_s: the gradient all-reduce over the axes that split the work but not the weight, from the
  fitted collectives (keras_lwp.cost.collectives), plus the optimizer's update of the weights'
  shards, measured. DTensor all-reduces the weight gradients inside the measured backward pass, so
  t_c is the measured time less the fitted all-reduce: the sum is what was measured (or the
  all-reduce alone, if noise measured the layer below it).
- t_x: relayouts between layers (forward, and their gradient backward) from the fitted all-gather
  and all-to-all; a layer's own communication (partial sums, halos) is inside its t_c.
- overhead: what a training step costs besides its layers (fit's loop, the loss, the labels, the
  step's dispatch), measured by training a one-Dense model with `fit` on the same devices, less that
  model's own layer costs. The same for every strategy on the same devices.

On a mesh of logical CPU devices every device's work shares the machine's cores, so nothing here
assumes devices run in parallel: whatever the mesh does is what is measured.

Identical layers (same class, configuration, shapes and weights) are measured once. Everything is
kept on disk (keras_lwp.cost.cache), so a second plan of the same model is instant.
"""

import gc
import os
import warnings

import numpy as np

from keras_lwp.config import Config
from keras_lwp.cost.cache import ProfileCache, digest
from keras_lwp.cost.collectives import CollectiveModel, measure_collectives
from keras_lwp.cost.model import AnalyticCostModel, CostModel, LayerCost
from keras_lwp.cost.timing import DEFAULT_OPTIMIZER, DeviceTimer, ProfileError, input_gradients, time_call
from keras_lwp.cost.volume import is_float
from keras_lwp.layers import Placement, dimensions_of, rule_for
from keras_lwp.mesh import mesh_spec_of

# Bump when what is measured, or how, changes: older cache entries are then ignored.
PROFILER_VERSION = 10  # 8: random layers draw their masks whole (wrapping.draws_as_one_device); 9: depthwise splits
# as one product over the taps; 10: taps sliced without strided slices (halo.rows)
# Message sizes (bytes per device) the collectives are timed at.
COLLECTIVE_SIZES = (16 * 2**10, 512 * 2**10, 4 * 2**20)

# -- what identifies a measurement ------------------------------------------------------------------

def layer_signature(info):
    """What a layer's time depends on: class, Keras configuration (less its name and initializers),
    the shapes and dtypes of every call, and its weights. Identical layers share it."""
    config = {k: v for k, v in info.config.items() if k != "name" and not k.endswith("_initializer")}
    return {
        "class": info.class_name,
        "config": config,
        "calls": [[[[list(t.shape), t.dtype] for t in call.inputs], [[list(t.shape), t.dtype] for t in call.outputs],
                   [bool(g) for g in input_gradients(call)]] for call in info.calls],
        "weights": [[w.name.rsplit("/", 1)[-1], list(w.shape), w.dtype, w.trainable] for w in info.weights],
    }


def _describe(info, config):
    shapes = " ".join("x".join(map(str, t.shape)) for t in info.calls[0].inputs) or "-"
    return f"{info.class_name} {shapes} -> {'x'.join(map(str, info.output.shape))} {config}"


def machine_context(device_type):
    """The machine a measurement belongs to: device kind and count, and software versions."""
    import keras
    import tensorflow as tf

    import keras_lwp

    kind = None
    if device_type == "GPU":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            kind = tf.config.experimental.get_device_details(gpus[0]).get("device_name")
    if kind is None:
        kind = _cpu_name()
    return {
        "device_kind": kind,
        "device_type": device_type,
        "logical_devices": len(tf.config.list_logical_devices(device_type)),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "keras_lwp": keras_lwp.__version__,
        "profiler": PROFILER_VERSION,
    }


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def optimizer_key(spec):
    """What an update's time depends on: the optimizer's class and settings (not its learning rate)."""
    if spec is None:
        spec = DEFAULT_OPTIMIZER
    if isinstance(spec, str):
        return spec.lower()
    config = {k: v for k, v in spec.get_config().items() if k not in ("name", "learning_rate")}
    return [type(spec).__name__, config]


# -- the cost model ----------------------------------------------------------------------------------

class ProfiledCostModel(CostModel):
    """Costs measured on this process's devices (see the module docstring).

    Args:
        mesh: the mesh to plan for (a MeshSpec, dict, dtensor.Mesh or keras DeviceMesh); it must fit
            this process's devices.
        optimizer: the optimizer whose update is timed (a Keras optimizer, a name); default the
            model's compiled optimizer when `parallelize`/`search` build the model, else Adam.
        cache_dir: where measurements are kept (default: $KERAS_LWP_CACHE or ~/.cache/keras_lwp).
        progress: show a progress bar while measuring.
        rounds: timed rounds per measurement (the fastest is kept: `steady`).

    Example:

    ```python
    model = keras_lwp.parallelize(model, mesh, cost_model="profiled")       # measures, then caches
    expert = keras_lwp.cost.ProfiledCostModel(mesh, optimizer="sgd", cache_dir="/tmp/profiles")
    plan = keras_lwp.search(model, mesh, cost_model=expert)
    ```
    """

    name = "profiled"

    def __init__(self, mesh, optimizer=None, cache_dir=None, progress=True, rounds=5):
        self.mesh = mesh_spec_of(mesh)
        self.optimizer = optimizer
        self.cache_dir = cache_dir
        self.progress = progress
        self.rounds = rounds
        self._analytic = AnalyticCostModel(self.mesh)
        self._cache = None
        self._timer = None
        self._collectives = None
        self._overhead = None
        self._siblings = {self.mesh: self}
        self._measured = {}    # layer key -> seconds (None: not runnable, analytic instead)
        self._updates = {}     # update key -> seconds
        self._warned = set()

    def __repr__(self):
        return f"ProfiledCostModel({self.mesh}, optimizer={self.optimizer!r})"

    def for_mesh(self, mesh):
        """The same measurements on another mesh of the same devices (the flattened one)."""
        spec = mesh_spec_of(mesh)
        if spec not in self._siblings:
            sibling = type(self)(spec, self.optimizer, self.cache_dir, self.progress, self.rounds)
            sibling._siblings = self._siblings
            self._siblings[spec] = sibling
        return self._siblings[spec]

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def cache(self):
        if self._cache is None:
            self._cache = ProfileCache(machine_context(self.mesh.device_type), self.cache_dir)
        return self._cache

    @property
    def timer(self):
        """The DeviceTimer of this mesh's devices (keras_lwp.cost.timing), made on first use."""
        if self._timer is None:
            from keras_lwp.mesh import make_mesh

            self._timer = DeviceTimer(make_mesh(self.mesh, device_type=self.mesh.device_type), self.rounds)
        return self._timer

    def _mesh_key(self):
        """What the timings depend on besides the layer: the mesh, and the threads each op runs on
        (keras_lwp.use_virtual_devices sets them by the devices per core)."""
        import tensorflow as tf

        return [list(map(list, self.mesh.axes)), self.mesh.device_type,
                tf.config.threading.get_intra_op_parallelism_threads()]

    def _layer_key(self, info, config):
        return digest([PROFILER_VERSION, layer_signature(info), config.to_dict(), self._mesh_key()])

    def _update_key(self, info, place):
        weights = [[list(w.shape), w.dtype, list(place.weight_layout(i))]
                   for i, w in enumerate(info.weights) if w.trainable]
        return digest([optimizer_key(self.optimizer), weights, self._mesh_key()]) if weights else None

    # -- what the planner calls ----------------------------------------------------------------
    def prepare(self, requests):
        """Measure what the layer costs of `requests` [(info, rule, dims, config)] need and the cache
        lacks, with one progress bar; then the tables are built from memory."""
        layers, updates = {}, {}
        for info, _, dims, config in requests:
            key = self._layer_key(info, config)
            if key not in self._measured and self.cache.get("layers", key) is None and key not in layers:
                layers[key] = (info, dims, config)
            place = Placement(info, dims, config, self.mesh)
            update = self._update_key(info, place)
            if update and update not in self._updates and self.cache.get("updates", update) is None:
                updates.setdefault(update, (info, place))
        collectives = self._collectives is None and self.cache.get("collectives", self._collectives_key()) is None
        overhead = self._overhead is None and self.cache.get("overhead", self._overhead_key()) is None
        total = len(layers) + len(updates) + (len(_collective_count(self.mesh)) if collectives else 0) + overhead
        if not total:
            return
        bar = self._progress_bar(total, f"{len(layers)} layer configurations, {len(updates)} weight updates"
                                 + (", collectives" if collectives else "") + (", fit's step overhead" if overhead else ""))
        try:
            if collectives:
                self._collectives = self._measure_collectives(bar)
            for key, (info, dims, config) in layers.items():
                self._layer_seconds(info, dims, config, key)
                bar.add(1)
            for key, (info, place) in updates.items():
                self._update_seconds(info, place, key)
                bar.add(1)
            if overhead:
                self.step_overhead  # noqa: B018 (measures and caches)
                bar.add(1)
        finally:
            self.cache.save()
            gc.collect()  # the measured layers' copies and their DVariables

    def layer_cost(self, info, rule, dims, config):
        analytic = self._analytic.layer_cost(info, rule, dims, config)
        measured = self._layer_seconds(info, dims, config)
        if measured is None:
            return analytic
        place = Placement(info, dims, config, self.mesh)
        allreduce = 0.0
        for index, weight in enumerate(info.weights):
            if place.trained[index]:
                shard = weight.nbytes / self.mesh.parts(place.weight_layout(index))
                allreduce += self.collectives.allreduce_time(shard, place.weight_grad_partial_axes(index))
        # DTensor all-reduced the gradients inside the measured backward pass: split the measured time
        # into the all-reduce the fitted collectives predict and the rest. A tiny layer measured below
        # that all-reduce (timing noise from other work on the cores) costs at least the all-reduce.
        update = self._update_seconds(info, place)
        return LayerCost(max(measured - allreduce, 0.0), allreduce + update, 0.0, analytic.memory)

    def transfer_table(self, tensor, src_layouts, dst_layouts):
        table = np.empty((len(src_layouts), len(dst_layouts)))
        backward = is_float(tensor.dtype)
        for i, src in enumerate(src_layouts):
            for j, dst in enumerate(dst_layouts):
                table[i, j] = self._relayout(tensor.nbytes, src, dst)
                if backward:  # the gradient travels back
                    table[i, j] += self._relayout(tensor.nbytes, dst, src)
        return table

    def transfer_cost(self, tensor, src_layout, dst_layout):
        return float(self.transfer_table(tensor, [tuple(src_layout)], [tuple(dst_layout)])[0, 0])

    def _relayout(self, nbytes, src, dst):
        if src == dst:
            return 0.0
        return self.collectives.relayout_time(nbytes, src, dst)

    @property
    def step_overhead(self):
        """Seconds a training step costs besides its layers (measured once per devices and optimizer)."""
        if self._overhead is None:
            key = self._overhead_key()
            found = self.cache.get("overhead", key)
            if found is None:
                found = self._measure_overhead()
                self.cache.put("overhead", key, found)
                self.cache.save()
            self._overhead = found
        return self._overhead

    @property
    def collectives(self):
        """The fitted CollectiveModel of this mesh (measured on first use)."""
        if self._collectives is None:
            found = self.cache.get("collectives", self._collectives_key())
            if found is not None:
                self._collectives = CollectiveModel.from_dict(self.mesh, found)
            else:
                bar = self._progress_bar(len(_collective_count(self.mesh)), "collectives")
                self._collectives = self._measure_collectives(bar)
                self.cache.save()
        return self._collectives

    # -- measuring ------------------------------------------------------------------------------
    def _progress_bar(self, total, what):
        import keras

        if self.progress:
            print(f"keras_lwp: profiling {what} on {self.mesh} (cached in {os.path.dirname(self.cache.path)})")
        return keras.utils.Progbar(total, verbose=1 if self.progress else 0, unit_name="measurement")

    def _collectives_key(self):
        return digest(["collectives", self._mesh_key(), COLLECTIVE_SIZES])

    def _measure_collectives(self, bar):
        model = measure_collectives(self.timer.dmesh, self.mesh, COLLECTIVE_SIZES,
                                    lambda fn, args: time_call(fn, args, self.rounds), self.timer.baseline(1),
                                    lambda: bar.add(1))
        self.cache.put("collectives", self._collectives_key(), model.to_dict())
        return model

    def _overhead_key(self):
        return digest(["overhead", self.mesh.size, self.mesh.device_type, optimizer_key(self.optimizer)])

    def _layer_seconds(self, info, dims, config, key=None):
        """Measured seconds of the layer's forward + backward under `config`; None when it cannot run
        on its own (the analytic estimate stands in, with a warning)."""
        key = key or self._layer_key(info, config)
        if key in self._measured:
            return self._measured[key]
        found = self.cache.get("layers", key)
        if found is None:
            found = {"seconds": None, "layer": _describe(info, config)}
            try:
                found["seconds"] = self._measure_layer(info, dims, config)
            except ProfileError as error:
                found["error"] = str(error)
            self.cache.put("layers", key, found)
        if found["seconds"] is None:  # said again when read from the cache
            self._warn(info, config, found.get("error", "it failed before"))
        self._measured[key] = found["seconds"]
        return found["seconds"]

    def _warn(self, info, config, error):
        if (info.class_name, str(error)) in self._warned:
            return
        self._warned.add((info.class_name, str(error)))
        warnings.warn(f"keras_lwp could not profile layer '{info.name}' ({info.class_name}) under {config} on "
                      f"{self.mesh}: {error}. Its analytic estimate is used instead.", stacklevel=3)

    def _measure_layer(self, info, dims, config):
        by_name = {d.name: d for d in dims}
        if any(not by_name[d].runnable for d in config):
            raise ProfileError("the configuration splits a dimension keras_lwp does not run")
        place = Placement(info, dims, config, self.mesh)
        if info.class_name == "InputLayer":
            return self.timer.batch_packing(info, place)
        try:
            return self.timer.layer(info, place)
        except ProfileError:
            raise
        except Exception as error:  # noqa: BLE001 (any failure to build or run: say which, fall back)
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise ProfileError(f"{type(error).__name__}: {first_line}") from error

    def _update_seconds(self, info, place, key=None):
        """Measured seconds of the optimizer's update of the layer's trainable weights in their layouts."""
        key = key or self._update_key(info, place)
        if key is None:
            return 0.0
        if key in self._updates:
            return self._updates[key]
        found = self.cache.get("updates", key)
        if found is None:
            found = self.timer.update(info, place, self.optimizer)
            self.cache.put("updates", key, found)
        self._updates[key] = found
        return found

    def _measure_overhead(self):
        """Seconds per `fit` step of a one-Dense model, data parallel on the flattened mesh, less its
        own layer costs."""
        flat = self.mesh.flattened()
        sibling = self.for_mesh(flat)
        (axis, _), = flat.axes
        seconds, graph = sibling.timer.fit_step(self.optimizer, batch=4 * flat.size)
        layers = 0.0
        for name in graph:
            info = graph.nodes[name]["info"]
            layers += sibling.layer_cost(info, rule_for(info), dimensions_of(info), Config({"sample": axis})).total
        return max(seconds - layers, 0.0)


def _collective_count(mesh):
    from keras_lwp.cost.collectives import collective_cases

    return {(kind, axes) for kind, axes, *_ in collective_cases(mesh)}


__all__ = ["ProfiledCostModel", "layer_signature", "machine_context", "optimizer_key"]
